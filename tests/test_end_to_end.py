"""The product end to end: synthetic frames with known ground truth -> the real producer ->
a real Kafka broker -> the worker (real PaDiM profiles, fitted and calibrated here) -> the
sink -> a real DuckDB file; then every stored row is checked against the same profiles run
OFFLINE on the very same JPEG bytes.

Cheap on purpose (2 products, 128 px models, 30 training images, 32 frames): the point is
the plumbing and the contract between the parts, not the model quality.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRODUCTS = ("cap", "brick")  # cap: an object on a backdrop; brick: a close-up texture
INPUT_SIZE = 128
FRAME_SIZE = 256
N_GOOD = 8  # per product
DEFECT_CATEGORIES = ("structural", "surface", "contamination", "combined") * 2  # 8 per product


@pytest.fixture(scope="session")
def e2e_registry(tmp_path_factory) -> Path:
    """One small PaDiM profile per product, fitted and calibrated through the real
    calibration path (threshold from the anomalous validation images), published once per
    session."""
    import torch

    from calibration.workflow import calibrate_product
    from linewatch.synth import generate_dataset

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("e2e-data")
    registry = tmp_path_factory.mktemp("e2e-registry")
    generate_dataset(root, products=list(PRODUCTS), size=INPUT_SIZE, seed=3, n_train=30, n_test_good=6,
                     n_test_per_category=6, progress=False)
    for product in PRODUCTS:
        profile = calibrate_product(root, product, registry, "padim", input_size=INPUT_SIZE, seed=3,
                                    options={"d": 32}, progress=False)
        assert profile.version == 1 and profile.categorizer is not None
        assert "expert" not in profile.categorizer
    return registry


def _list_source(name: str, frames: list[bytes]):
    """A FrameSource over pre-encoded frames, so every frame's ground truth is known."""
    from producers.sources import FrameSource, SourceFrame

    class ListSource(FrameSource):
        kind = "list"

        def __iter__(self):
            for k, data in enumerate(frames):
                yield SourceFrame(data, "jpeg", f"{name}#{k}", int(time.time() * 1000))

    src = ListSource()
    src.name = name
    return src


def _frames(product: str):
    """(jpeg bytes, SynthSample) for normal and defective frames of the synthetic line at
    camera resolution (the worker decodes them down to the model size)."""
    from linewatch.synth import SyntheticProduct
    from producers.sources import encode_image

    sp = SyntheticProduct(product, size=FRAME_SIZE, seed=11)
    samples = [sp.normal(5000 + i) for i in range(N_GOOD)]
    samples += [sp.defective(5000 + i, c) for i, c in enumerate(DEFECT_CATEGORIES)]
    out = []
    for s in samples:
        out.append((encode_image(cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR), "jpeg", 92), s))
    return out


def _thread(fn, box: dict, key: str) -> threading.Thread:
    def target():
        try:
            box[key] = fn()
        except BaseException as exc:  # surfaced by the test
            box[key + "_error"] = exc

    t = threading.Thread(target=target, name=f"e2e-{key}", daemon=True)
    t.start()
    return t


def test_frames_flow_end_to_end_and_match_offline(kafka_settings, e2e_registry, tmp_path):
    from linewatch.profiles import ONNX_FILE, Registry
    from linewatch.messages import CATEGORIES
    from linewatch.store import count_rows, reading
    from producers.producer import CameraConfig, FrameProducer
    from workers.engines import select_engine
    from linewatch.inspection.frames import decode_frame
    from linewatch.inspection.verdict import judge
    from workers.sink import run_sink
    from workers.worker import run_worker

    db = tmp_path / "line.duckdb"
    tag = kafka_settings.topics.frames
    settings = kafka_settings.model_copy(update={
        "storage": kafka_settings.storage.model_copy(update={"db_path": db, "registry_dir": e2e_registry}),
        "worker": kafka_settings.worker.model_copy(update={
            "group_id": f"e2e-workers-{tag}", "max_batch": 8, "max_wait_ms": 50, "threads": 1}),
        "sink": kafka_settings.sink.model_copy(update={"group_id": f"e2e-sink-{tag}", "max_wait_ms": 200}),
    })

    # ---- ground truth, and the real producer path ------------------------------------------
    truth: dict[bytes, tuple[str, object]] = {}
    cameras = []
    for product in PRODUCTS:
        frames = _frames(product)
        for data, sample in frames:
            truth[data] = (product, sample)
        cameras.append((CameraConfig(camera=f"{product}-cam-1", product=product, line="line-e2e", fps=0),
                        _list_source(product, [d for d, _ in frames])))
    assert len(truth) == len(PRODUCTS) * (N_GOOD + len(DEFECT_CATEGORIES))  # all frames distinct

    sent: dict[str, bytes] = {}  # frame_id -> the exact bytes on the wire

    def on_delivery(headers, value, _metadata) -> None:
        sent[headers.frame_id] = value

    box: dict = {}
    stop = threading.Event()
    n_frames = len(truth)
    # The sink stops by itself after one record per frame (results + DLQ). It runs in this
    # process, so the test reads DuckDB only once it has stopped (DuckDB refuses a second,
    # read-only connection to a file this process holds read-write).
    sink_t = _thread(lambda: run_sink(settings, stop_event=stop, max_records=n_frames), box, "sink")
    worker_t = _thread(lambda: run_worker(settings, stop_event=stop, worker_id="e2e-worker", create_topics=False,
                                          install_signals=False), box, "worker")
    try:
        stats = FrameProducer(settings, cameras, on_delivery=on_delivery, report_every_s=0).run(
            handle_signals=False)
        assert stats.sent == len(truth) and len(sent) == len(truth)

        sink_t.join(180)
        assert not sink_t.is_alive(), "the frames did not all reach the sink within 180 s"
    finally:
        stop.set()
        worker_t.join(60)
        sink_t.join(60)
    assert not worker_t.is_alive() and not sink_t.is_alive()
    for key in ("sink_error", "worker_error"):
        if key in box:
            raise box[key]
    assert box["worker"].dlq == 0 and box["worker"].results >= len(sent)
    assert box["sink"].records == n_frames and count_rows(db) == n_frames

    # ---- what the database holds ---------------------------------------------------------
    with reading(db) as con:
        rows = con.execute(
            "SELECT frame_id, product, camera, line, verdict, image_score, region_count, category, "
            "category_confidence, background, profile_version, model_kind, width, height, latency_ms "
            "FROM inspections").fetchall()
        ids_per_frame = dict(con.execute(
            "SELECT frame_id, count(*) FROM inspections GROUP BY frame_id").fetchall())
        images = {r[0]: r[1:] for r in con.execute(
            "SELECT frame_id, thumbnail_jpeg, mask_png, heatmap_png FROM defect_images").fetchall()}
        regions = Counter(r[0] for r in con.execute("SELECT frame_id FROM defect_regions").fetchall())
        region_cats = con.execute("SELECT DISTINCT category FROM defect_regions").fetchall()
        dlq = con.execute("SELECT count(*) FROM dlq_events").fetchone()[0]

    assert dlq == 0
    assert set(ids_per_frame) == set(sent) and set(ids_per_frame.values()) == {1}  # exactly one row each
    by_id = {r[0]: r for r in rows}

    # ---- the same profiles, OFFLINE, on the same bytes -----------------------------------
    reg = Registry(e2e_registry)
    offline: dict[str, tuple[str, float, int]] = {}
    for product in PRODUCTS:
        profile, model = reg.load(product)
        engine = select_engine(model, reg.version_dir(product, profile.version) / ONNX_FILE, "auto", 1, 8)
        fids = [f for f, v in sent.items() if truth[v][0] == product]
        decoded = [decode_frame(sent[f], profile.input_size, 10**8) for f in fids]
        maps, scores = engine.run(np.stack([d[0] for d in decoded]))
        for k, f in enumerate(fids):
            fv = judge(maps[k], float(scores[k]), profile, FRAME_SIZE, FRAME_SIZE, decoded[k][0], profile.extent_model())
            offline[f] = (fv.verdict, float(scores[k]), len(fv.regions))
        # the stored rows name the profile that judged them, and its background flag
        for f in fids:
            assert by_id[f][10] == profile.version and by_id[f][11] == "padim"
            assert by_id[f][9] is (product == "cap")

    for f, (verdict, score, n_regions) in offline.items():
        row = by_id[f]
        assert row[4] == verdict, f"{f}: stream says {row[4]}, offline says {verdict}"
        assert row[5] == pytest.approx(score, rel=1e-4, abs=1e-4)
        assert row[6] == n_regions
    stream_counts = Counter((r[1], r[4]) for r in rows)
    offline_counts = Counter((truth[sent[f]][0], v[0]) for f, v in offline.items())
    assert stream_counts == offline_counts

    # ---- anomalous frames carry regions, mask and images; normal-verdict frames do not -----
    for f, row in by_id.items():
        product, sample = truth[sent[f]]
        assert row[1] == product and row[2] == f"{product}-cam-1" and row[3] == "line-e2e"
        assert (row[12], row[13]) == (FRAME_SIZE, FRAME_SIZE)
        assert row[14] is not None and row[14] >= 0
        if row[4] == "defect":
            assert f in images, f"{f}: defect without defect_images row"
            thumb, mask_png, heat_png = images[f]
            assert thumb and mask_png and heat_png
            mask = cv2.imdecode(np.frombuffer(mask_png, np.uint8), cv2.IMREAD_GRAYSCALE)
            assert mask is not None and (mask > 0).any()
            assert cv2.imdecode(np.frombuffer(thumb, np.uint8), cv2.IMREAD_COLOR) is not None
            assert row[6] >= 1 and regions[f] == row[6]
            assert row[7] in CATEGORIES and row[7] != "unknown" and 0.0 <= row[8] <= 1.0
        else:
            assert f not in images and regions[f] == 0 and row[6] == 0
    assert {c for (c,) in region_cats} <= set(CATEGORIES)

    # ---- not vacuous: the profiles see the known defects ---------------------------------
    verdicts = Counter(r[4] for r in rows)
    assert verdicts["defect"] > 0 and verdicts["ok"] > 0
    flagged = Counter((truth[sent[f]][1].category != "good", by_id[f][4] == "defect") for f in by_id)
    defective = flagged[(True, True)] + flagged[(True, False)]
    good = flagged[(False, True)] + flagged[(False, False)]
    recall, false_alarms = flagged[(True, True)] / defective, flagged[(False, True)] / good
    assert recall > false_alarms, f"recall {recall:.2f} vs false alarms {false_alarms:.2f}"
