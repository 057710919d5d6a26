"""Frame geometry (linewatch.inspection.geometry): ROI, view, tiles and stitching, the same for
calibration (TiledModel) and the worker (BatchProcessor); regions in frame pixels; bad geometry
as a one-line error offline and a DLQ record in the stream."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from linewatch.errors import UserError
from linewatch.inspection.frames import decode_frame, load_image_file
from linewatch.inspection.geometry import Geometry, GeometryError, Roi, TiledModel, parse_tiles
from linewatch.inspection.verdict import inspect_images
from linewatch.messages import InspectionResult
from linewatch.profiles import Profile
from worker_helpers import FakeRecord, encode, frame_headers
from workers.pipeline import BatchProcessor

MAX_PX = 64_000_000
ROI = Roi(x=96, y=32, w=320, h=320)


class RedEngine:
    """Map = red channel / 255: a red square is a defect exactly where it is."""

    name = "fake-red"
    input_size = 64

    def __init__(self):
        self.batches: list[tuple[int, ...]] = []

    def run(self, images):
        self.batches.append(images.shape)
        maps = images[..., 0].astype(np.float32) / 255.0
        return maps, maps.reshape(len(images), -1).max(1)

    def predict(self, images, batch_size=16):
        return self.run(images)


def _frame(w=512, h=384, squares=((200, 150, 6),)) -> np.ndarray:
    img = np.full((h, w, 3), 40, np.uint8)
    for x, y, r in squares:
        img[y : y + r, x : x + r] = (255, 0, 0)
    return img


def _profile(geometry: Geometry, **kw) -> Profile:
    base = dict(product="widget", version=1, model_kind="padim", backbone="none", input_size=64, threshold=0.5,
                threshold_method="manual", min_region_px=1, geometry=geometry)
    base.update(kw)
    return Profile(**base)


def _processor(profile: Profile, engine, camera_roi=None) -> BatchProcessor:
    loaded = SimpleNamespace(profile=profile, engine=engine, extent=None)
    return BatchProcessor(SimpleNamespace(get=lambda product: loaded), worker_id="w", results_topic="results",
                          dlq_topic="dlq", max_frame_pixels=MAX_PX, thumbnail_size=64, decode_threads=2,
                          camera_roi=camera_roi)


def test_views_tiles_and_stitching():
    g = Geometry(roi=ROI, tiles=(2, 2)).resolved(512, 384)
    f = g.framing(64)
    assert f.view_hw == (112, 112) and f.n_tiles == 4 and not f.identity  # 64 + 64 * 0.75
    views = np.random.default_rng(0).integers(0, 255, (3, 112, 112, 3), dtype=np.uint8)
    tiles = f.tile(views)
    assert tiles.shape == (12, 64, 64, 3)
    # stitching a map that is the image itself gives the image back (overlaps averaged)
    maps, scores = f.stitch(tiles[..., 1].astype(np.float32))
    np.testing.assert_allclose(maps, views[..., 1].astype(np.float32), atol=1e-4)
    np.testing.assert_allclose(scores, views[..., 1].reshape(3, -1).max(1), atol=1e-4)
    # a bare size is the geometry of profiles before geometry existed: the frame squashed, no tiling
    legacy = Geometry().framing(64)
    assert legacy.identity and legacy.view_hw == (64, 64)
    # the aspect ratio is kept: a 1x1 view of a wide frame is padded for the model, not stretched
    wide = Geometry().resolved(512, 256).framing(64)
    assert wide.view_hw == (32, 64) and wide.padded_hw == (64, 64)
    assert wide.tile(np.zeros((1, 32, 64, 3), np.uint8)).shape == (1, 64, 64, 3)
    assert Geometry(keep_aspect=False).resolved(512, 256).framing(64).view_hw == (64, 64)


def test_jpeg_decode_is_reduced_for_the_roi_then_cropped():
    frame = _frame(2048, 1536, squares=((800, 600, 40),))
    g = Geometry(roi=Roi(x=384, y=128, w=1280, h=1280)).resolved(2048, 1536)
    f = g.framing(64)
    assert f.decode_factor(g.roi) == 8  # 1280 / 8 = 160 >= 64: never decoded larger than needed
    view, w, h = decode_frame(encode(frame, quality=95), f, MAX_PX, "jpeg")
    assert (w, h) == (2048, 1536) and view.shape == (64, 64, 3)
    ref = cv2.resize(frame[128:1408, 384:1664], (64, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(view.astype(int) - ref.astype(int)).mean() < 4  # the same picture as cropping the whole frame


def test_offline_and_stream_maps_agree_for_a_tiled_profile():
    """TiledModel (calibration) and BatchProcessor (worker) give the same maps, scores and
    verdicts for the same bytes of a tiled profile; one engine batch holds every tile."""
    g = Geometry(roi=ROI, tiles=(2, 2)).resolved(512, 384)
    prof = _profile(g)
    frames = [encode(_frame(squares=((150 + 20 * i, 100 + 15 * i, 5),)), "png") for i in range(3)]
    frames.append(encode(_frame(squares=()), "png"))
    engine = RedEngine()
    proc = _processor(prof, engine)
    out = proc.process([FakeRecord(b, frame_headers("widget", i, encoding="png").to_kafka(), offset=i)
                        for i, b in enumerate(frames)]).out
    proc.close()
    assert engine.batches == [(16, 64, 64, 3)]  # 4 frames x 4 tiles in one call
    stream = [InspectionResult.from_bytes(o.value) for o in out]
    views = np.stack([decode_frame(b, prof.framing, MAX_PX, "png")[0] for b in frames])
    maps, scores = TiledModel(RedEngine(), prof.framing).predict(views)
    offline = inspect_images(views, maps, scores, prof)
    assert [r.verdict for r in stream] == [v.verdict for v in offline] == ["defect"] * 3 + ["ok"]
    np.testing.assert_allclose([r.image_score for r in stream], scores, rtol=1e-6)
    for r, v in zip(stream, offline):
        assert [x.bbox for x in r.regions] == [x.bbox for x in v.regions]


def test_region_boxes_are_frame_pixels():
    """A defect at a known place of a 512x384 frame is reported there through the ROI and tiles
    (to within one view pixel of the 320 -> 112 px scale)."""
    g = Geometry(roi=ROI, tiles=(2, 2)).resolved(512, 384)
    proc = _processor(_profile(g), RedEngine())
    out = proc.process([FakeRecord(encode(_frame(squares=((300, 250, 12),)), "png"),
                                   frame_headers("widget", 0, encoding="png").to_kafka())]).out
    r = InspectionResult.from_bytes(out[0].value)
    assert r.verdict == "defect" and (r.width, r.height) == (512, 384) and len(r.regions) == 1
    x, y, w, h = r.regions[0].bbox
    px = 320 / 112
    assert abs(x - 300) <= 2 * px and abs(y - 250) <= 2 * px
    assert abs(x + w - 312) <= 2 * px and abs(y + h - 262) <= 2 * px
    # a camera whose product sits 40 px further right: its ROI override finds the same defect there
    proc2 = _processor(_profile(g), RedEngine(), camera_roi={"cam9": "136,32,320,320"})
    out = proc2.process([FakeRecord(encode(_frame(squares=((340, 250, 12),)), "png"),
                                    frame_headers("widget", 0, camera="cam9", encoding="png").to_kafka())]).out
    r2 = InspectionResult.from_bytes(out[0].value)
    assert abs(r2.regions[0].bbox[0] - 340) <= 2 * px and r2.image_score == pytest.approx(r.image_score, abs=0.02)
    proc.close()
    proc2.close()


def test_bad_geometry_offline_is_one_line_naming_the_problem(tmp_path):
    with pytest.raises(GeometryError, match="leaves the 512x384 calibration frame"):
        Geometry(roi=Roi(x=300, y=0, w=320, h=320)).resolved(512, 384)
    with pytest.raises(GeometryError, match="tiles 3x3 do not fit"):
        Geometry(roi=Roi(x=0, y=0, w=500, h=60), tiles=(3, 3)).resolved(512, 384).framing(64)
    with pytest.raises(GeometryError, match="expected RxC"):
        parse_tiles("2by2")
    with pytest.raises(GeometryError, match="expected X,Y,W,H"):
        Roi.parse("1,2,3")
    # a calibration image of another size than the first: the file and the problem
    g = Geometry(roi=ROI).resolved(512, 384)
    odd = tmp_path / "odd.png"
    cv2.imwrite(str(odd), _frame(640, 480))
    with pytest.raises(UserError, match=r"odd\.png: frame is 640x480, the profile was calibrated on 512x384"):
        load_image_file(odd, g.framing(64))


def test_bad_geometry_in_the_stream_goes_to_the_dlq_and_the_batch_goes_on():
    g = Geometry(roi=ROI, tiles=(2, 2)).resolved(512, 384)
    proc = _processor(_profile(g), RedEngine(), camera_roi={"cam7": "400,100,320,320"})
    recs = [FakeRecord(encode(_frame(640, 480), "png"), frame_headers("widget", 0, encoding="png").to_kafka(), offset=0),
            FakeRecord(encode(_frame(), "png"), frame_headers("widget", 1, camera="cam7", encoding="png").to_kafka(),
                       offset=1),
            FakeRecord(encode(_frame(), "png"), frame_headers("widget", 2, encoding="png").to_kafka(), offset=2)]
    out = proc.process(recs).out
    proc.close()
    assert [o.kind for o in out] == ["dlq", "dlq", "defect"]
    assert "frame is 640x480, the profile was calibrated on 512x384" in out[0].reason
    assert "leaves the 512x384 frame" in out[1].reason


def test_profiles_record_their_geometry_and_old_ones_read_as_before(tmp_path):
    from linewatch.profiles import Registry

    g = Geometry(roi=ROI, tiles=(3, 3), overlap=0.3).resolved(512, 384)
    prof = _profile(g)
    back = Profile.model_validate_json(prof.model_dump_json())
    assert back.geometry == g and back.framing.view_hw == prof.framing.view_hw
    raw = prof.model_dump(mode="json")
    raw.pop("geometry")  # a profile written before geometry existed
    assert Profile.model_validate(raw).framing.identity
    del Registry  # the registry round trip is covered by tests/test_calibration_cli.py
