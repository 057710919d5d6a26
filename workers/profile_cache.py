"""A bounded LRU of fully loaded profiles (profile + model + engine), with hot reload.

Why this shape:
- ``get`` is on the hot path, so a hit touches no file: the registry's CURRENT pointers are
  polled by ``refresh`` at most every ``reload_interval_s`` (the worker calls it between
  batches).
- A new version is loaded completely (profile.json, weights, engine) *before* it replaces the
  old entry, so no frame is ever processed by a half-loaded profile; a frame keeps the
  snapshot it was grouped with for its whole batch.
- A version that fails to load never replaces a working one (the old one stays in force and
  the failure is logged and counted); a product with no usable version raises ProfileError,
  cached for ``reload_interval_s`` so a corrupt profile costs one load attempt per interval,
  not one per frame.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from linewatch.errors import ModelError
from linewatch.inspection.extent import ExtentModel
from linewatch.models.registry import SavedModel
from linewatch.profiles import ONNX_FILE, Profile, ProfileError, Registry

if TYPE_CHECKING:
    from linewatch.models.base import AnomalyModel

log = logging.getLogger(__name__)

EngineFactory = Callable[["AnomalyModel", Path | None, Profile], Any]


@dataclass(frozen=True)
class LoadedProfile:
    """A profile ready to serve. ``model`` is kept only when the engine runs the torch model
    itself; an ONNX Runtime / TensorRT engine owns its own copy of the weights, and dropping
    the torch one (tens of MB of float32 factors for a 256-px PaDiM) lets one worker hold
    many products."""

    profile: Profile  # learned parts (forests) loaded
    model: AnomalyModel | None
    engine: Any  # workers.engines.Engine
    load_s: float
    extent: ExtentModel | None = None  # built once per load, not per frame
    loaded_at: float = field(default_factory=time.time)

    @property
    def product(self) -> str:
        return self.profile.product

    @property
    def version(self) -> int:
        return self.profile.version


def _warm(engine: Any, profile: Profile, vdir: Path) -> None:
    """One batch of one blank frame through a freshly built engine: ONNX Runtime, torch and
    TensorRT allocate and pick their kernels on the first run (tens to hundreds of ms), which
    the first real frame would otherwise pay. Part of the load, so a hot-reloaded version is
    warm before it replaces the old one."""
    import numpy as np

    size = profile.input_size
    try:
        # one frame's tiles: the batch shape a frame of this product brings
        engine.run(np.zeros((profile.framing.n_tiles, size, size, 3), np.uint8))
    except Exception as exc:
        raise ProfileError(f"{vdir}: the engine failed its first run: {type(exc).__name__}: {exc}") from None


@dataclass
class _Failure:
    version: int | None
    error: ProfileError
    at: float


@dataclass(frozen=True)
class ReloadEvent:
    product: str
    old_version: int | None
    new_version: int | None
    ok: bool
    error: str | None = None
    load_s: float = 0.0
    engine: str | None = None


class ProfileCache:
    def __init__(self, registry: Registry, engine_factory: EngineFactory, capacity: int = 32,
                 reload_interval_s: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 on_event: Callable[[ReloadEvent], None] | None = None, warm: bool = True):
        self.registry = registry
        self.warm = warm
        self.engine_factory = engine_factory
        self.capacity = capacity
        self.reload_interval_s = reload_interval_s
        self.clock = clock
        self.on_event = on_event
        self._entries: OrderedDict[str, LoadedProfile] = OrderedDict()
        self._failures: dict[str, _Failure] = {}
        self._last_refresh = clock()
        self._lock = threading.Lock()  # get/refresh may be called from a bench thread too
        self.loads = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, product: str) -> bool:
        return product in self._entries

    def cached(self) -> dict[str, int]:
        return {p: e.version for p, e in self._entries.items()}

    # -- loading -------------------------------------------------------------------------------
    def _load(self, product: str, version: int | None = None) -> LoadedProfile:
        t0 = time.perf_counter()
        try:
            profile = self.registry.load_learned(product, version)
            model = SavedModel(self.registry.version_dir(product, profile.version))  # loaded by a torch engine only
        except ModelError as exc:  # Registry.load converts most, be safe
            raise ProfileError(str(exc)) from None
        except ProfileError:
            raise
        except Exception as exc:  # a profile that crashes a loader is a corrupt profile
            raise ProfileError(f"profile {product!r} v{version}: cannot load: {type(exc).__name__}: {exc}") from None
        vdir = self.registry.version_dir(product, profile.version)
        onnx = vdir / ONNX_FILE
        try:
            engine = self.engine_factory(model, onnx if onnx.is_file() else None, profile)
        except Exception as exc:
            raise ProfileError(f"{vdir}: no engine could run this profile: {type(exc).__name__}: {exc}") from None
        self.loads += 1
        keep = model.load() if str(getattr(engine, "name", "torch")).startswith("torch") else None
        if self.warm:
            _warm(engine, profile, vdir)
        try:
            extent = profile.extent_model()
        except Exception as exc:
            raise ProfileError(f"{vdir}: learned region extent unusable: {type(exc).__name__}: {exc}") from None
        return LoadedProfile(profile, keep, engine, time.perf_counter() - t0, extent)

    def _current(self, product: str) -> int | None:
        try:
            return self.registry.current_version(product)
        except ProfileError:
            raise
        except OSError as exc:
            raise ProfileError(f"{self.registry.root / product}: unreadable ({exc})") from None

    def _insert(self, entry: LoadedProfile) -> None:
        self._entries[entry.product] = entry
        self._entries.move_to_end(entry.product)
        while len(self._entries) > self.capacity:
            old, _ = self._entries.popitem(last=False)
            self.evictions += 1
            log.info("profile cache full (%d): evicted %s", self.capacity, old)

    def _emit(self, event: ReloadEvent) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # metrics must never break serving
                log.exception("profile event hook failed")

    def preload(self) -> list[ReloadEvent]:
        """Load (and warm) every product with a published profile, up to the capacity, so the
        first frames of a product pay neither the load nor the engine's first-run cost. A
        product that fails to load is reported and skipped (its frames go to the DLQ with the
        reason, as they would without a preload)."""
        events: list[ReloadEvent] = []
        for product in self.registry.products()[: self.capacity]:
            if product in self._entries:
                continue
            try:
                entry = self.get(product)
            except ProfileError as exc:
                events.append(ReloadEvent(product, None, None, False, error=str(exc)))
                continue
            events.append(ReloadEvent(product, None, entry.version, True, load_s=entry.load_s,
                                      engine=getattr(entry.engine, "name", None)))
        return events

    # -- the hot path --------------------------------------------------------------------------
    def get(self, product: str) -> LoadedProfile:
        """The loaded profile in force for ``product`` (LRU hit: no I/O); ProfileError when
        the product has no usable published profile."""
        with self._lock:
            entry = self._entries.get(product)
            if entry is not None:
                self._entries.move_to_end(product)
                return entry
            failure = self._failures.get(product)
            if failure is not None and self.clock() - failure.at < self.reload_interval_s:
                raise failure.error
            version: int | None = None
            try:
                version = self._current(product)
                if version is None:
                    raise ProfileError(f"unknown product {product!r}: no published profile in {self.registry.root}")
                entry = self._load(product, version)
            except ProfileError as exc:
                self._failures[product] = _Failure(version, exc, self.clock())
                if failure is None or str(failure.error) != str(exc):
                    log.warning("%s", exc)
                raise
            self._failures.pop(product, None)
            self._insert(entry)
            log.info("loaded profile %s v%d (%s, %s) in %.2fs", product, entry.version,
                     entry.profile.model_kind, getattr(entry.engine, "name", "?"), entry.load_s)
            self._emit(ReloadEvent(product, None, entry.version, True, load_s=entry.load_s,
                                   engine=getattr(entry.engine, "name", None)))
            return entry

    # -- hot reload ----------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> list[ReloadEvent]:
        """Check CURRENT for every cached product (at most every reload_interval_s unless
        ``force``); load a changed version completely, then swap it in."""
        now = self.clock()
        if not force and now - self._last_refresh < self.reload_interval_s:
            return []
        self._last_refresh = now
        events: list[ReloadEvent] = []
        for product, entry in list(self._entries.items()):
            try:
                version = self._current(product)
            except ProfileError as exc:
                events.append(self._reload_failed(product, entry.version, None, exc))
                continue
            if version is None or version == entry.version:
                continue
            prev = self._failures.get(product)
            if prev is not None and prev.version == version and now - prev.at < self.reload_interval_s * 10:
                continue  # this version already failed recently; keep serving the old one
            try:
                new = self._load(product, version)
            except ProfileError as exc:
                events.append(self._reload_failed(product, entry.version, version, exc))
                continue
            with self._lock:
                if product in self._entries:
                    self._entries[product] = new
                else:
                    self._insert(new)
                self._failures.pop(product, None)
            log.info("hot reload: %s v%d -> v%d (%s) in %.2fs", product, entry.version, new.version,
                     getattr(new.engine, "name", "?"), new.load_s)
            ev = ReloadEvent(product, entry.version, new.version, True, load_s=new.load_s,
                             engine=getattr(new.engine, "name", None))
            events.append(ev)
            self._emit(ev)
        return events

    def _reload_failed(self, product: str, old: int, new: int | None, exc: ProfileError) -> ReloadEvent:
        self._failures[product] = _Failure(new, exc, self.clock())
        log.error("hot reload of %s to v%s failed, v%d stays in force: %s", product, new, old, exc)
        ev = ReloadEvent(product, old, new, False, error=str(exc))
        self._emit(ev)
        return ev
