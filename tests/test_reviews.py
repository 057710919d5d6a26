"""Operator reviews: the Review contract refuses bad input with one clear reason; the
dashboard's desk sends each distinct review once (a duplicate click sends nothing, a retry
after the broker was down resends the same review_id); the sink appends each review to a real
DuckDB file exactly once (replays add no row), dead-letters a review of an unknown frame, and
never touches the inspection; through a real broker, end to end."""

from __future__ import annotations

import threading
import time
import uuid
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from dashboard.reviews import ReviewDesk, publish
from linewatch import store
from linewatch.messages import Review
from linewatch.settings import Settings
from result_factory import make_result


def _settings(tmp_path, base: Settings | None = None) -> Settings:
    s = base or Settings()
    return s.model_copy(update={
        "storage": s.storage.model_copy(update={"db_path": tmp_path / "lw.duckdb",
                                                "registry_dir": tmp_path / "profiles"}),
        "sink": s.sink.model_copy(update={"group_id": f"sink-{uuid.uuid4().hex[:8]}", "max_wait_ms": 100}),
    })


def _rec(topic: str, value: bytes, offset: int):
    return SimpleNamespace(topic=topic, partition=0, offset=offset, key=b"k", value=value, headers=[])


@pytest.mark.parametrize("kw, why", [
    ({"reviewer": "  "}, "reviewer"),
    ({"reviewer": ""}, "reviewer"),
    ({"verdict": "confirm", "category": "cosmetic"}, "category"),
    ({"verdict": "confirm", "category": None}, "needs its category"),
    ({"verdict": "false_call", "category": "surface"}, "takes no category"),
    ({"verdict": "maybe"}, "verdict"),
    ({"frame_id": "../../etc/passwd"}, "frame_id"),
])
def test_bad_reviews_are_refused_with_a_reason(kw, why):
    base = {"frame_id": "f-1", "product": "cap", "verdict": "false_call", "reviewer": "ana"}
    with pytest.raises(ValidationError) as exc:
        Review(**{**base, **kw})
    assert why in str(exc.value)


def test_desk_sends_once_keeps_a_failed_review_and_refuses_unknown_frames():
    sent: list[Review] = []
    down = {"on": True}

    def send(r: Review) -> None:
        if down["on"]:
            raise ConnectionError("Kafka broker not reachable at 127.0.0.1:1 within 1s")
        sent.append(r)

    desk = ReviewDesk()
    args = dict(frame_id="f-1", product="cap", verdict="false_call", category="surface", reviewer=" ana ", note="")
    first = desk.submit(**args, send=send)
    assert first.level == "error" and "not reachable" in first.message and "kept on this page" in first.message
    assert desk.unsent is not None and desk.unsent.category is None  # category dropped for a false call
    down["on"] = False
    ok = desk.submit(**args, send=send)
    assert ok.level == "success" and ok.review.review_id == first.review.review_id  # the same review, resent
    again = desk.submit(**args, send=send)  # a duplicate click
    assert again.level == "info" and "Already recorded" in again.message and len(sent) == 1
    other = desk.submit(**{**args, "verdict": "confirm", "category": "surface"}, send=send)
    assert other.level == "success" and other.review.review_id != ok.review.review_id and len(sent) == 2
    assert desk.submit(**{**args, "reviewer": ""}, send=send).level == "error"
    bad = desk.submit(**{**args, "verdict": "confirm", "category": "cosmetic"}, send=send)
    assert bad.level == "error" and "category" in bad.message
    unknown = desk.submit(**{**args, "product": None}, send=send)
    assert unknown.level == "error" and "No frame 'f-1'" in unknown.message and len(sent) == 2


def test_sink_appends_each_review_once_and_never_touches_the_inspection(tmp_path):
    from workers.sink import Sink

    settings = _settings(tmp_path)
    sink = Sink(settings)
    sink.start()
    t0 = int(time.time() * 1000)
    frame = make_result(1, product="cap", verdict="defect", category="surface", capture_ts_ms=t0, frame_id="f-1")
    sink.handle_batch([_rec("results", frame.to_bytes(), 0)])
    with store.reading(settings.storage.db_path) as con:
        before = con.execute("SELECT * FROM inspections").fetchall()
    r1 = Review(frame_id="f-1", product="cap", verdict="confirm", category="contamination", reviewer="ana",
                reviewed_ts_ms=t0 + 1)
    r2 = Review(frame_id="f-1", product="cap", verdict="false_call", reviewer="bo", reviewed_ts_ms=t0 + 2)
    stray = Review(frame_id="no-such-frame", product="cap", verdict="unsure", reviewer="ana")
    wrong = Review(frame_id="f-1", product="brick", verdict="unsure", reviewer="ana")
    recs = [_rec("reviews", r.to_bytes(), k) for k, r in enumerate((r1, r2, stray, wrong))]
    recs.append(_rec("reviews", b'{"frame_id": "f-1", "verdict": "confirm"}', 4))
    sink.handle_batch(recs)
    sink.handle_batch(recs)  # a replay after a crash
    assert sink.stats.reviews == 2
    with store.reading(settings.storage.db_path) as con:
        rows = con.execute("SELECT review_id, verdict, category, reviewer FROM reviews ORDER BY reviewed_ts_ms").fetchall()
        latest = con.execute("SELECT verdict, reviewer FROM latest_reviews WHERE frame_id = 'f-1'").fetchall()
        dlq = con.execute("SELECT source_topic, source_offset, reason FROM dlq_events ORDER BY source_offset").fetchall()
        after = con.execute("SELECT * FROM inspections").fetchall()
    assert rows == [(r1.review_id, "confirm", "contamination", "ana"), (r2.review_id, "false_call", None, "bo")]
    assert latest == [("false_call", "bo")]
    assert [(t, o) for t, o, _ in dlq] == [("reviews", 2), ("reviews", 3), ("reviews", 4)]  # once each
    assert "unknown frame id 'no-such-frame'" in dlq[0][2] and "is 'cap', not 'brick'" in dlq[1][2]
    assert "invalid review" in dlq[2][2]
    assert after == before


@pytest.mark.integration
def test_review_through_a_real_broker_reaches_duckdb_exactly_once(kafka_settings, tmp_path):
    from workers.sink import run_sink

    settings = _settings(tmp_path, kafka_settings)
    from linewatch.kafka.io import make_producer, send_checked

    frame = make_result(7, product="cap", verdict="defect", category="surface", frame_id="f-7",
                        capture_ts_ms=int(time.time() * 1000))
    producer = make_producer(settings)
    try:
        send_checked(producer, settings.topics.results, frame.to_bytes(), key="cam")
    finally:
        producer.close(timeout=5)
    review = Review(frame_id="f-7", product="cap", verdict="false_call", reviewer="ana", note="shadow")
    publish(settings, review)
    publish(settings, review)  # the same review sent twice (a retry whose first send did arrive)
    stop = threading.Event()
    timer = threading.Timer(90, stop.set)
    timer.start()
    try:
        stats = run_sink(settings, stop_event=stop, max_records=3)
    finally:
        timer.cancel()
    assert stats.reviews == 1 and stats.reviews_rejected == 0
    with store.reading(settings.storage.db_path) as con:
        rows = con.execute("SELECT review_id, frame_id, verdict, reviewer, note FROM reviews").fetchall()
    assert rows == [(review.review_id, "f-7", "false_call", "ana", "shadow")]


def test_publish_to_an_unreachable_broker_fails_fast_with_a_reason(tmp_path):
    from linewatch.kafka.io import KafkaIOError

    s = Settings(kafka={"bootstrap_servers": "127.0.0.1:1"}, dashboard={"review_timeout_s": 2})
    desk = ReviewDesk()
    t = time.monotonic()
    out = desk.submit(frame_id="f-1", product="cap", verdict="unsure", category=None, reviewer="ana", note=None,
                      send=lambda r: publish(s, r))
    assert time.monotonic() - t < 15
    assert out.level == "error" and "not reachable" in out.message and desk.unsent is not None
    with pytest.raises(KafkaIOError):
        publish(s, desk.unsent)
