"""Learned region extent: fitted on validation masks, never adds a region, the same offline and in the worker."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibration.extent_fit import fit_extent
from calibration.categorizer_samples import served_mask
from linewatch.inspection.extent import EXTENT_FEATURES, ExtentModel, ExtentSettings, extent_features
from linewatch.inspection.verdict import judge
from linewatch.profiles import PROFILE_FILE, Profile, Registry

S = 96


def disc_frames(n: int, seed: int = 0, varied: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Textured grey frames with one dark disc each; the map peaks at the disc's centre and falls
    off inside it, so a threshold at 0.6 cuts about the inner half (what PaDiM does to a defect
    whose edge it sees only weakly). ``varied``: peaks from 0.3 to 3.0, so that no single
    threshold fits every disc. Returns (images, maps, true masks)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    images, maps, masks = [], [], []
    for _ in range(n):
        img = np.clip(150 + rng.normal(0, 6, (S, S, 3)), 0, 255)
        cy, cx, r = rng.uniform(30, 66), rng.uniform(30, 66), rng.uniform(8, 13)
        d = np.hypot(yy - cy, xx - cx)
        disc = d <= r
        img[disc] = np.clip(70 + rng.normal(0, 6, (int(disc.sum()), 3)), 0, 255)
        amp = rng.uniform(0.3, 3.0) if varied else 1.0
        amap = (amp * np.exp(-(d / (0.75 * r)) ** 2 * 1.1)).astype(np.float32) + \
            rng.uniform(0, 0.03, (S, S)).astype(np.float32)
        images.append(img.astype(np.uint8))
        maps.append(amap)
        masks.append(disc)
    return np.stack(images), np.stack(maps), np.stack(masks)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def fitted():
    images, maps, masks = disc_frames(16)
    return fit_extent(maps, maps, images, masks, 0.6, seed=0)


def test_extent_learns_whole_defects_from_validation_masks(fitted, tmp_path):
    from linewatch.inspection.forest import externalise, internalise

    assert fitted.params is not None and fitted.reason.startswith("region extent on")
    assert fitted.iou_extent > fitted.iou_plain + 0.15  # held-out validation images
    # stored as plain JSON plus the forest as a skops file (no pickle), read back as it was fitted
    stored = json.loads(json.dumps(externalise(fitted.params, tmp_path, "extent")))
    assert stored["features"] == list(EXTENT_FEATURES) and stored["classifier"] == {"skops": "extent.skops"}
    params = internalise(stored, tmp_path)
    assert type(params["classifier"]).__name__ == "RandomForestClassifier"
    model = ExtentModel.from_params(params)
    assert model.settings == ExtentSettings(**{k: v for k, v in stored.items() if k != "classifier"})
    images, maps, masks = disc_frames(8, seed=1)  # frames the forest never saw
    plain = np.mean([_iou(maps[k] >= 0.6, masks[k]) for k in range(8)])
    grown = [model.apply(maps[k], images[k], maps[k] >= 0.6, 0.6) for k in range(8)]
    fresh = ExtentModel.from_params(fitted.params)
    assert all((g == fresh.apply(maps[k], images[k], maps[k] >= 0.6, 0.6)).all() for k, g in enumerate(grown))
    grown_iou = np.mean([_iou(g, masks[k]) for k, g in enumerate(grown)])
    assert plain < 0.5 and grown_iou > plain + 0.2


def test_extent_never_adds_a_region_and_keeps_every_detection(fitted):
    images, maps, masks = disc_frames(1, seed=2)
    img, amap = images[0].copy(), maps[0]
    img[5:15, 80:90] = 60  # a second dark patch the map does not flag
    thresholded = amap >= 0.6
    model = ExtentModel.from_params(fitted.params)
    out = model.apply(amap, img, thresholded, 0.6)
    assert not out[5:15, 80:90].any()  # no region where the threshold found none
    assert (out & thresholded).any()
    # a thresholded region the forest would erase keeps its own shape
    lone = np.zeros_like(thresholded)
    lone[80:84, 10:14] = True  # plain material: the forest calls it background
    out2 = model.apply(amap, images[0], thresholded | lone, 0.6)
    assert out2[80:84, 10:14].all()
    assert not model.apply(amap, img, np.zeros_like(thresholded), 0.6).any()
    # parameters fitted on another version's features: the thresholded regions, unchanged
    other = {**fitted.params, "features": ["map_rel", "something_else"]}
    assert (ExtentModel.from_params(other).apply(amap, img, thresholded, 0.6) == thresholded).all()


def test_extent_on_a_crop_equals_the_whole_frame(fitted):
    """The worker computes the pixel features on the zone's bounding box only: same masks."""
    from linewatch.inspection.extent import _crop, extent_zone

    images, maps, _ = disc_frames(2, seed=4)
    rng = np.random.default_rng(4)
    big_img = np.clip(150 + rng.normal(0, 6, (240, 224, 3)), 0, 255).astype(np.uint8)
    big_map = rng.uniform(0, 0.03, (240, 224)).astype(np.float32)
    big_img[130:226, 120:216], big_map[130:226, 120:216] = images[0], maps[0]  # near a corner
    big_img[0:96, 0:96], big_map[0:96, 0:96] = images[1], maps[1] * 1.6  # the frame's peak: outside the first crop
    for sub in (np.s_[120:, 110:], np.s_[:, :]):  # one region; then two far apart (box: most of the frame)
        m = np.zeros(big_map.shape, bool)
        m[sub] = big_map[sub] >= 0.6
        box = _crop(extent_zone(m), 2)
        assert box[0].start % 2 == 0 and box[1].start % 2 == 0
        model = ExtentModel.from_params(fitted.params)
        cropped = model.apply(big_map, big_img, m, 0.6)
        whole = model.apply(big_map, big_img, m, 0.6, crop=False)
        assert (cropped != whole).sum() <= 2 and cropped.sum() > m.sum()
    one = np.zeros(big_map.shape, bool)
    one[120:, 110:] = big_map[120:, 110:] >= 0.6
    ys, xs = _crop(extent_zone(one), 2)
    assert (ys.stop - ys.start) * (xs.stop - xs.start) < 0.5 * one.size


def test_extent_stays_off_without_enough_images_or_when_it_does_not_clear_the_bar(monkeypatch):
    images, maps, masks = disc_frames(3)
    off = fit_extent(maps, maps, images, masks, 0.6)
    assert off.params is None and "need 4" in off.reason
    images, maps, masks = disc_frames(16)
    import calibration.extent_fit as ef

    # a forest whose masks lose the defect's rim on held-out images must be refused
    monkeypatch.setattr(ef.ExtentModel, "apply", lambda self, raw, img, m, thr, crop=True: m & (raw >= 0.8))
    refused = ef.fit_extent(maps, maps, images, masks, 0.6)
    assert refused.params is None and "under the adoption bar" in refused.reason
    assert refused.iou_extent < refused.iou_plain - 0.005
    # one that changes nothing gains nothing: refused too (the paired gain must exceed max(0.005, 2 SE))
    monkeypatch.setattr(ef.ExtentModel, "apply", lambda self, raw, img, m, thr, crop=True: m)
    idle = ef.fit_extent(maps, maps, images, masks, 0.6)
    assert idle.params is None and "under the adoption bar" in idle.reason
    assert idle.iou_extent == idle.iou_plain


def test_worker_serves_the_offline_extent(fitted, tmp_path):
    images, maps, masks = disc_frames(4, seed=3)
    prof = Profile(product="w", model_kind="padim", backbone="none", input_size=S, threshold=0.6,
                   threshold_method="iou", min_region_px=0, extent=fitted.params)
    (tmp_path / "model").mkdir()
    reg = Registry(tmp_path / "registry")
    stored = reg.publish(prof, source_dir=tmp_path / "model")
    on_disk = json.loads((reg.version_dir("w", stored.version) / PROFILE_FILE).read_text())
    assert on_disk["extent"]["classifier"] == {"skops": "extent.skops"}  # the forest beside it, not in the JSON
    loaded = reg.load_learned("w")  # as the worker loads it
    extent = loaded.extent_model()
    assert isinstance(extent, ExtentModel)
    for k in range(4):
        fv = judge(maps[k], float(maps[k].max()), loaded, S, S, images[k], extent)
        offline = served_mask(maps, k, 0.6, maps, images, fitted.params)
        assert fv.verdict == "defect" and ((fv.mask > 0) == offline).all()
        assert fv.regions[0].area_px == int(offline.sum())
        assert offline.sum() > (maps[k] >= 0.6).sum()  # the extent grew the region
    # without the frame (or without an extent) the worker serves the thresholded regions
    fv = judge(maps[0], float(maps[0].max()), loaded, S, S, None, extent)
    assert ((fv.mask > 0) == (maps[0] >= 0.6)).all()
    fv = judge(maps[0], float(maps[0].max()), loaded, S, S, images[0], None)
    assert ((fv.mask > 0) == (maps[0] >= 0.6)).all()
    plain = prof.model_copy(update={"extent": None})
    assert plain.extent_model() is None  # a profile without an extent: off


def test_extent_features_are_finite_and_in_order():
    images, maps, masks = disc_frames(1)
    f = extent_features(maps[0], images[0], maps[0] >= 0.6, 0.6)
    assert f.shape == (S, S, len(EXTENT_FEATURES)) and np.isfinite(f).all()
    inside = EXTENT_FEATURES.index("inside")
    assert ((f[..., inside] > 0) == (maps[0] >= 0.6)).all()


class LookupModel:
    """A stand-in model that returns the stored map of each known frame."""

    kind = "padim"
    backbone_name = "none"
    input_size = S

    def __init__(self, images: np.ndarray, maps: np.ndarray):
        self.by_frame = {img.tobytes(): m for img, m in zip(images, maps)}

    def predict(self, images: np.ndarray, batch_size: int = 16):
        m = np.stack([self.by_frame[img.tobytes()] for img in images])
        return m, m.reshape(len(m), -1).max(1)


def test_calibration_fits_the_extent_and_the_report_shows_served_regions(tmp_path):
    """threshold_model -> profile -> evaluate_model -> HTML report, through the real calibration path."""
    from pathlib import Path

    from calibration.data import LabelledSet
    from calibration.workflow import evaluate_model, make_profile, threshold_model
    from calibration.report import write_report

    # 32 validation images: enough for the paired gain to clear max(0.005, 2 SE) (calibration.adoption)
    images, maps, masks = disc_frames(40, seed=5, varied=True)

    def labelled(sl: slice) -> LabelledSet:
        n = len(images[sl])
        return LabelledSet([Path(f"/x/{k}.png") for k in range(n)], images[sl], masks[sl], ["surface"] * n,
                           [True] * n, ["d"] * n)

    model = LookupModel(images, maps)
    val, test = labelled(slice(0, 32)), labelled(slice(32, 40))
    report, _ = threshold_model(model, val, refine=False)  # type: ignore[arg-type]
    assert report.extent is not None and report.extent_reason.startswith("region extent on")
    assert any(n.startswith("region extent on") for n in report.notes)
    profile = make_profile("w", model, report)  # type: ignore[arg-type]
    assert profile.extent == report.extent
    ev = evaluate_model("padim", "w", model, test, report, val)  # type: ignore[arg-type]
    ext = ev.extra["extent"]
    assert ext["n_anomalous"] == 8 and ext["iou_served"] > ext["iou_thresholded"] + 0.05
    # it grows the regions of weak discs and trims those of strong ones: no single threshold can
    assert ev.served_masks is not None
    grown = ev.served_masks.sum((1, 2)) - (ev.maps >= report.threshold).sum((1, 2))
    assert (grown > 0).any() and (grown < 0).any()
    index = write_report([ev], tmp_path, title="w")
    html = index.read_text()
    assert "Region extent" in html and "overlays below show the served regions" in html
    assert (tmp_path / "w_padim_overlays.png").stat().st_size > 1000
