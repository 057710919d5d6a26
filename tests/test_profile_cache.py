"""The worker's profile cache: bounded LRU, hot reload, never a half-loaded profile."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from linewatch.profiles import ProfileError, Registry
from worker_helpers import plain_image, publish_mean_profile, register_test_family
from workers.engines import TorchEngine
from workers.profile_cache import ProfileCache

register_test_family()


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _factory(calls=None):
    def build(model, onnx_path, profile):
        if calls is not None:
            calls.append((profile.product, profile.version))
        return TorchEngine(model, max_batch=4)
    return build


def test_lru_is_bounded_and_a_hit_touches_no_file(tmp_path):
    for p in ("a", "b", "c"):
        publish_mean_profile(tmp_path, p)
    calls = []
    cache = ProfileCache(Registry(tmp_path), _factory(calls), capacity=2, reload_interval_s=60)
    a = cache.get("a")
    assert a.version == 1 and a.engine.name == "torch-cpu"
    maps, scores = a.engine.run(np.stack([plain_image(64)]))
    assert maps.shape == (1, 64, 64) and scores.shape == (1,)
    cache.get("b")
    assert cache.get("a") is a  # hit, and "a" becomes most recent
    cache.get("c")              # evicts "b", the least recently used
    assert set(cache.cached()) == {"a", "c"} and cache.evictions == 1
    (tmp_path / "a" / "CURRENT").write_text("garbage\n")  # a hit does not read CURRENT
    assert cache.get("a") is a
    assert calls == [("a", 1), ("b", 1), ("c", 1)]


def test_unknown_and_corrupt_products_raise_and_are_not_retried_every_frame(tmp_path):
    publish_mean_profile(tmp_path, "good")
    prof = publish_mean_profile(tmp_path, "bad")
    (Registry(tmp_path).version_dir("bad", prof.version) / "weights.safetensors").write_bytes(b"not safetensors")
    clock = Clock()
    calls = []
    cache = ProfileCache(Registry(tmp_path), _factory(calls), capacity=4, reload_interval_s=2, clock=clock)
    with pytest.raises(ProfileError, match="unknown product 'nope'"):
        cache.get("nope")
    with pytest.raises(ProfileError, match="weights.safetensors"):
        cache.get("bad")
    loads = cache.loads
    with pytest.raises(ProfileError, match="weights.safetensors"):
        cache.get("bad")  # cached failure, no new attempt within the interval
    assert cache.loads == loads
    # publishing the product makes it available after the interval, without a restart
    publish_mean_profile(tmp_path, "nope")
    with pytest.raises(ProfileError):
        cache.get("nope")
    clock.t += 3
    assert cache.get("nope").version == 1
    assert cache.get("good").version == 1


def test_hot_reload_swaps_only_a_completely_loaded_version(tmp_path):
    publish_mean_profile(tmp_path, "p", threshold=0.25)
    gate = threading.Event()
    entered = threading.Event()

    def slow_factory(model, onnx_path, profile):
        if profile.version == 2:
            entered.set()
            assert gate.wait(10)
        return TorchEngine(model, max_batch=4)

    events = []
    cache = ProfileCache(Registry(tmp_path), slow_factory, reload_interval_s=0.01, on_event=events.append)
    v1 = cache.get("p")
    assert v1.profile.threshold == 0.25
    publish_mean_profile(tmp_path, "p", threshold=0.4)
    t = threading.Thread(target=cache.refresh, kwargs={"force": True})
    t.start()
    assert entered.wait(10)
    # while v2 is loading, every frame still gets the whole v1
    for _ in range(5):
        assert cache.get("p") is v1
        time.sleep(0.01)
    gate.set()
    t.join(10)
    v2 = cache.get("p")
    assert v2.version == 2 and v2.profile.threshold == 0.4 and v2.model is not v1.model
    assert [(e.product, e.old_version, e.new_version, e.ok) for e in events] == [("p", None, 1, True), ("p", 1, 2, True)]


def test_a_corrupt_new_version_keeps_the_old_one_in_force(tmp_path):
    publish_mean_profile(tmp_path, "p")
    reg = Registry(tmp_path)
    cache = ProfileCache(reg, _factory(), reload_interval_s=0.01)
    v1 = cache.get("p")
    v2 = publish_mean_profile(tmp_path, "p")
    (reg.version_dir("p", v2.version) / "model.json").write_text("{not json")
    events = cache.refresh(force=True)
    assert len(events) == 1 and not events[0].ok and "model.json" in events[0].error
    assert cache.get("p") is v1
    # a later good version is picked up
    publish_mean_profile(tmp_path, "p")
    events = cache.refresh(force=True)
    assert events[-1].ok and cache.get("p").version == 3


def test_refresh_is_rate_limited(tmp_path):
    publish_mean_profile(tmp_path, "p")
    clock = Clock()
    cache = ProfileCache(Registry(tmp_path), _factory(), reload_interval_s=5, clock=clock)
    cache.get("p")
    publish_mean_profile(tmp_path, "p")
    assert cache.refresh() == []   # too soon
    clock.t += 6
    assert [e.new_version for e in cache.refresh()] == [2]


class CountingEngine:
    """Counts engine runs; the first run of a fresh engine is what a warm-up must absorb."""

    name = "counting"

    def __init__(self, fail: bool = False):
        self.runs: list[int] = []
        self.fail = fail

    def run(self, images):
        if self.fail:
            raise RuntimeError("kernel selection failed")
        self.runs.append(len(images))
        return np.zeros((len(images), 64, 64), np.float32), np.zeros(len(images), np.float32)


def test_preload_loads_and_warms_every_published_profile_and_reports_the_broken_one(tmp_path):
    for p in ("a", "b"):
        publish_mean_profile(tmp_path, p)
    prof = publish_mean_profile(tmp_path, "bad")
    (Registry(tmp_path).version_dir("bad", prof.version) / "weights.safetensors").write_bytes(b"not safetensors")
    engines: dict[str, CountingEngine] = {}

    def build(model, onnx_path, profile):
        engines[profile.product] = CountingEngine()
        return engines[profile.product]

    cache = ProfileCache(Registry(tmp_path), build, capacity=8, reload_interval_s=60)
    events = cache.preload()
    assert {(e.product, e.new_version, e.ok) for e in events} == {("a", 1, True), ("b", 1, True), ("bad", None, False)}
    assert cache.cached() == {"a": 1, "b": 1}
    assert all(e.runs == [1] for e in engines.values())  # warmed once at load, before any frame
    before = len(engines["a"].runs)
    cache.get("a")  # a hit: no load, no second warm-up
    assert len(engines["a"].runs) == before


def test_a_version_whose_engine_fails_its_first_run_never_replaces_the_served_one(tmp_path):
    publish_mean_profile(tmp_path, "w")
    state = {"fail": False}

    def build(model, onnx_path, profile):
        return CountingEngine(fail=state["fail"])

    cache = ProfileCache(Registry(tmp_path), build, capacity=2, reload_interval_s=60)
    assert cache.get("w").version == 1
    publish_mean_profile(tmp_path, "w")
    state["fail"] = True
    (ev,) = cache.refresh(force=True)
    assert not ev.ok and "failed its first run" in ev.error and cache.get("w").version == 1
