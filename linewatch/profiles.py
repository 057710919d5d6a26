"""Per-product profiles and the versioned, immutable registry.

Layout::

    <registry>/<product>/v0003/profile.json      the Profile below
                              /model.json         model config (kind, backbone, options)
                              /weights.safetensors learned tensors (never pickle)
                              /model.onnx         whole inference graph (optional)
                              /engines/…          cached TensorRT engines
    <registry>/<product>/CURRENT                  "3\n" -- the version in force

Publishing writes ``.v0003.tmp-<uid>`` completely, fsyncs, renames it to ``v0003`` and only
then atomically replaces ``CURRENT``: a reader either sees the old version or the whole new
one, and a publish killed half-way leaves only a temp folder that is never loaded.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, ValidationError

from linewatch.errors import ModelError
from linewatch.inspection.geometry import Framing, Geometry, Roi
from linewatch.inspection.mask import MaskStep

if TYPE_CHECKING:
    from linewatch.inspection.extent import ExtentModel
    from linewatch.models.base import AnomalyModel

PROFILE_FILE = "profile.json"
CURRENT_FILE = "CURRENT"
ONNX_FILE = "model.onnx"
_VERSION_DIR = re.compile(r"^v(\d{4,})$")
_PRODUCT = r"^[A-Za-z0-9_.\-]{1,64}$"

# 2: the mask step as one MaskStep, learned forests as skops files (format 1 had flat mask-step
# fields and JSON forests inside profile.json; such profiles are refused, never misread)
PROFILE_FORMAT = 2

ThresholdMethod = Literal["iou", "f1", "roc", "normal_std", "normal_quantile", "manual"]


class ProfileError(ValueError):
    """A profile is missing, corrupt or cannot be published; the message names the file."""


class Profile(BaseModel):
    format: int = Field(PROFILE_FORMAT, description="profile.json layout; older ones are refused at load")
    product: str = Field(pattern=_PRODUCT)
    version: int = Field(0, ge=0, description="assigned by the registry at publish")
    model_kind: str
    backbone: str
    input_size: int = Field(ge=32, le=2048, description="the model's square input (one tile) in pixels")
    geometry: Geometry = Field(default_factory=Geometry, description=(
        "ROI, tiles and calibrated frame size (linewatch.inspection.geometry); the default is the whole frame "
        "squashed to input_size, as profiles before geometry were"))
    threshold: float = Field(description="pixel threshold on the anomaly map")
    threshold_method: ThresholdMethod
    image_threshold: float | None = Field(None, description="image-score threshold; default = pixel threshold")
    min_region_px: int = Field(16, ge=0, description="regions smaller than this (in view pixels) are ignored")
    mask_step: MaskStep = Field(default_factory=MaskStep, description=(
        "how the anomaly map becomes the thresholded map (linewatch.inspection.mask)"))
    extent: dict[str, Any] | None = Field(None, description=(
        "learned region extent (linewatch.inspection.extent): ExtentSettings plus its pixel forest, stored as "
        "a skops file in the version folder; None = off"))
    thresholds: dict[str, float | None] = {}
    threshold_reason: str = ""
    calibration_metrics: dict[str, Any] = {}
    categorizer: dict[str, Any] | None = Field(None, description=(
        "categorizer parameters (linewatch.inspection.categorize); its classifiers are skops files in the "
        "version folder"))
    background: bool | None = None
    background_source: Literal["detected", "override", "unknown"] = "unknown"
    created_by: str = Field(default_factory=lambda: _whoami())
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    parent_version: int | None = None
    notes: str = ""

    @property
    def effective_image_threshold(self) -> float:
        return self.threshold if self.image_threshold is None else self.image_threshold

    @property
    def framing(self) -> Framing:
        """The view and tile grid every frame of this product goes through."""
        return self.geometry.framing(self.input_size)

    @property
    def frame_box(self) -> Roi:
        """The frame rectangle the view shows on a frame of the calibrated size (the ROI, else
        the whole recorded frame; input_size square for profiles that record none): where the
        offline verdicts' boxes sit."""
        g = self.geometry
        if g.roi is not None:
            return g.roi
        w, h = g.frame_size or (self.input_size, self.input_size)
        return Roi(x=0, y=0, w=w, h=h)


    def extent_model(self) -> ExtentModel | None:
        """The learned extent ready to apply (its forest loaded: ``Registry.load``), or None."""
        if not self.extent:
            return None
        from linewatch.inspection.extent import ExtentModel

        forest = self.extent.get("classifier")
        if forest is None or isinstance(forest, dict):
            raise ProfileError(f"profile {self.product} v{self.version}: extent forest not loaded (Registry.load)")
        return ExtentModel.from_params(self.extent)

    def learned_files(self) -> list[str]:
        """The skops files this profile's learned parts are stored in."""
        from linewatch.inspection.forest import stored_files

        return [*stored_files(self.extent or {}), *stored_files(self.categorizer or {})]


def _whoami() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- reading ------------------------------------------------------------------------------
    def products(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / CURRENT_FILE).is_file())

    def versions(self, product: str) -> list[int]:
        pdir = self.root / product
        if not pdir.is_dir():
            return []
        out = []
        for p in pdir.iterdir():
            m = _VERSION_DIR.match(p.name)
            if m and (p / PROFILE_FILE).is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def current_version(self, product: str) -> int | None:
        path = self.root / product / CURRENT_FILE
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return None
        if not text.isdigit():
            raise ProfileError(f"{path}: corrupt pointer {text[:40]!r}")
        return int(text)

    def version_dir(self, product: str, version: int) -> Path:
        return self.root / product / f"v{version:04d}"

    def read_profile(self, product: str, version: int | None = None) -> Profile:
        if version is None:
            version = self.current_version(product)
            if version is None:
                raise ProfileError(f"no published profile for product {product!r} in {self.root}")
        path = self.version_dir(product, version) / PROFILE_FILE
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise ProfileError(f"{path}: missing") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProfileError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict) or raw.get("format", 1) != PROFILE_FORMAT:
            got = raw.get("format", 1) if isinstance(raw, dict) else "?"
            raise ProfileError(f"{path}: written by another linewatch version (profile format {got}, this version "
                               f"reads {PROFILE_FORMAT}); re-run `linewatch calibrate run --product {product}`")
        try:
            return Profile.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "profile"
            raise ProfileError(f"{path}: invalid {where}: {first['msg']}") from None

    def load_learned(self, product: str, version: int | None = None) -> Profile:
        """The profile with its learned parts (the forests) loaded from their files; no model.
        Raises ProfileError naming the file."""
        from linewatch.inspection.forest import internalise

        profile = self.read_profile(product, version)
        vdir = self.version_dir(product, profile.version)
        if profile.categorizer is not None:
            from linewatch.inspection.categorize import PARAMS_VERSION

            got = profile.categorizer.get("version")
            if got != PARAMS_VERSION:
                raise ProfileError(
                    f"{vdir / PROFILE_FILE}: categorizer written by another linewatch version (categorizer "
                    f"version {got}, this version reads {PARAMS_VERSION}); re-run "
                    f"`linewatch calibrate run --product {product}`")
        try:
            return profile.model_copy(update={"extent": internalise(profile.extent, vdir),
                                              "categorizer": internalise(profile.categorizer, vdir)})
        except ModelError as exc:
            raise ProfileError(str(exc)) from None

    def load(self, product: str, version: int | None = None) -> tuple[Profile, AnomalyModel]:
        """The profile (learned parts loaded) and its model (raises ProfileError naming the file)."""
        profile = self.load_learned(product, version)
        try:
            from linewatch.models.registry import load_model

            model = load_model(self.version_dir(product, profile.version))
        except ModelError as exc:
            raise ProfileError(str(exc)) from None
        return profile, model

    # -- writing ------------------------------------------------------------------------------
    def publish(self, profile: Profile, model: AnomalyModel | None = None, *,
                source_dir: Path | None = None, export_onnx: bool = True,
                make_current: bool = True) -> Profile:
        """Write a new immutable version and flip CURRENT to it. Returns the profile under its new
        version (learned parts as given).

        Either ``model`` (saved fresh) or ``source_dir`` (an existing version's folder whose
        model files are copied, used by recalibrate) supplies the weights.
        """
        if (model is None) == (source_dir is None):
            raise ValueError("publish needs exactly one of model or source_dir")
        pdir = self.root / profile.product
        pdir.mkdir(parents=True, exist_ok=True)
        existing = self.versions(profile.product)
        version = (max(existing) + 1) if existing else 1
        stored = profile.model_copy(update={"version": version})
        tmp = pdir / f".v{version:04d}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            if model is not None:
                model.save(tmp)
                if export_onnx:
                    from linewatch.models.export import export_onnx as _export

                    _export(model, tmp / ONNX_FILE)
            else:
                for name in os.listdir(source_dir):
                    if name in (PROFILE_FILE, "engines"):
                        continue
                    src = Path(source_dir) / name
                    if src.is_file():
                        shutil.copy2(src, tmp / name)
            # learned parts still in memory go to skops files; references (a recalibration's copied
            # files) stay as they are
            from linewatch.inspection.forest import externalise

            on_disk = stored.model_copy(update={"extent": externalise(stored.extent, tmp, "extent"),
                                                "categorizer": externalise(stored.categorizer, tmp, "categorizer")})
            (tmp / PROFILE_FILE).write_text(on_disk.model_dump_json(indent=2))
            for f in tmp.iterdir():
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            final = self.version_dir(profile.product, version)
            os.rename(tmp, final)  # fails if another publisher took this version
            _fsync_dir(pdir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if make_current:
            self.set_current(profile.product, version)
        return stored

    def set_current(self, product: str, version: int) -> None:
        if version not in self.versions(product):
            raise ProfileError(f"product {product!r} has no version {version}")
        pdir = self.root / product
        tmp = pdir / f".CURRENT.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_text(f"{version}\n")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, pdir / CURRENT_FILE)
        _fsync_dir(pdir)

    def rollback(self, product: str, to_version: int | None = None) -> int:
        """Point CURRENT at an earlier version (default: the one before the current)."""
        current = self.current_version(product)
        versions = self.versions(product)
        if to_version is None:
            earlier = [v for v in versions if current is not None and v < current]
            if not earlier:
                raise ProfileError(f"product {product!r}: no version before {current} to roll back to")
            to_version = earlier[-1]
        self.set_current(product, to_version)
        return to_version

    def describe(self, product: str) -> list[dict[str, Any]]:
        current = self.current_version(product)
        rows = []
        for v in self.versions(product):
            p = self.read_profile(product, v)
            rows.append({"version": v, "current": v == current, "model": p.model_kind,
                         "threshold": p.threshold, "method": p.threshold_method,
                         "created_at": p.created_at.isoformat(timespec="seconds"),
                         "created_by": p.created_by})
        return rows


def profile_json_schema() -> dict[str, Any]:
    return json.loads(json.dumps(Profile.model_json_schema()))
