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
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from linewatch.models.base import AnomalyModel, ModelError

PROFILE_FILE = "profile.json"
CURRENT_FILE = "CURRENT"
ONNX_FILE = "model.onnx"
_VERSION_DIR = re.compile(r"^v(\d{4,})$")
_PRODUCT = r"^[A-Za-z0-9_.\-]{1,64}$"

ThresholdMethod = Literal["iou", "f1", "roc", "normal_std", "normal_quantile", "manual"]


class ProfileError(ValueError):
    """A profile is missing, corrupt or cannot be published; the message names the file."""


class Profile(BaseModel):
    product: str = Field(pattern=_PRODUCT)
    version: int = Field(0, ge=0, description="assigned by the registry at publish")
    model_kind: str
    backbone: str
    input_size: int = Field(ge=32, le=2048)
    threshold: float = Field(description="pixel threshold on the anomaly map")
    threshold_method: ThresholdMethod
    image_threshold: float | None = Field(None, description="image-score threshold; default = pixel threshold")
    min_region_px: int = Field(16, ge=0, description="regions smaller than this (at model size) are ignored")
    refine_fraction: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "peak-relative region refinement: a map pixel counts only if it is >= this fraction of the "
        "map's maximum in its refine_window neighbourhood (calibrated on validation; 0 = off)"))
    refine_window: int = Field(33, ge=3, le=255, description="odd side (model-size pixels) of the refinement window")
    guide_radius: int = Field(0, ge=0, le=64, description=(
        "edge-aware guided filter of the map by the frame's grey image before thresholding "
        "(box radius in model-size pixels; 0 = off)"))
    guide_eps: float = Field(1e-3, gt=0.0, description="guided-filter regulariser (grey levels in 0..1)")
    cue_scale: float = Field(0.0, ge=0.0, description=(
        "colour cue fused with the map before thresholding: pixels that look like the normal material "
        "around them are damped (workers.pipeline.cue_map; z-score scale; 0 = off)"))
    cue_floor: float = Field(0.5, ge=0.0, le=1.0, description="least weight the colour cue leaves a pixel")
    cue_window: int = Field(33, ge=3, le=255, description="odd side (model-size pixels) of the cue's normal box")
    cue_sigma: float = Field(0.0, ge=0.0, le=32.0, description=(
        "Gaussian blur (model-size pixels) of the colour cue's damping factor (0 = per pixel, as in older profiles)"))
    extent: dict[str, Any] | None = Field(None, description=(
        "learned region extent (workers.extent): a pixel forest, fitted on the validation masks, that reshapes "
        "the thresholded regions; None = off (older profiles, or it cost held-out validation IoU)"))
    thresholds: dict[str, float | None] = {}
    threshold_reason: str = ""
    calibration_metrics: dict[str, Any] = {}
    categorizer: dict[str, Any] | None = None
    background: bool | None = None
    background_source: Literal["detected", "override", "unknown"] = "unknown"
    created_by: str = Field(default_factory=lambda: _whoami())
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    parent_version: int | None = None
    notes: str = ""

    @property
    def effective_image_threshold(self) -> float:
        return self.threshold if self.image_threshold is None else self.image_threshold


# the mask step's settings: ``workers.pipeline.segmentation_map``'s keyword arguments, carried
# under the same names by a Profile and by a calibration ThresholdReport
MASK_STEP_FIELDS = ("refine_fraction", "refine_window", "guide_radius", "guide_eps", "cue_scale", "cue_floor",
                    "cue_window", "cue_sigma")


def mask_step(obj: Any) -> dict[str, Any]:
    """The mask-step settings of a Profile or ThresholdReport, as ``segmentation_map`` keywords."""
    return {k: getattr(obj, k) for k in MASK_STEP_FIELDS}


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
            return Profile.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise ProfileError(f"{path}: missing") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "profile"
            raise ProfileError(f"{path}: invalid {where}: {first['msg']}") from None

    def load(self, product: str, version: int | None = None) -> tuple[Profile, AnomalyModel]:
        """The profile and its model, fully loaded (raises ProfileError naming the file)."""
        profile = self.read_profile(product, version)
        vdir = self.version_dir(product, profile.version)
        try:
            model = AnomalyModel.load(vdir)
        except ModelError as exc:
            raise ProfileError(str(exc)) from None
        return profile, model

    # -- writing ------------------------------------------------------------------------------
    def publish(self, profile: Profile, model: AnomalyModel | None = None, *,
                source_dir: Path | None = None, export_onnx: bool = True,
                make_current: bool = True) -> Profile:
        """Write a new immutable version and flip CURRENT to it. Returns the stored profile.

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
            (tmp / PROFILE_FILE).write_text(stored.model_dump_json(indent=2))
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
