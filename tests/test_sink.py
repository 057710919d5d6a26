"""The sink against a real Kafka broker and a real DuckDB file: every result exactly once,
replays make no second row, offsets committed only after DuckDB has the batch, alerts on
the topic and in the table, and the dashboard reading while the sink writes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from linewatch import store
from linewatch.errors import UserError
from linewatch.messages import Alert, DlqRecord, FrameHeaders
from linewatch.settings import Settings
from result_factory import make_result

ROOT = Path(__file__).resolve().parent.parent


def _sink_settings(base: Settings, db: Path, **alerts) -> Settings:
    return base.model_copy(update={
        "storage": base.storage.model_copy(update={"db_path": db}),
        "sink": base.sink.model_copy(update={"group_id": f"sink-{uuid.uuid4().hex[:8]}", "max_batch": 100,
                                             "max_wait_ms": 100}),
        "alerts": base.alerts.model_copy(update=alerts) if alerts else base.alerts,
    })


def _produce(settings: Settings, results=(), dlq=(), raw=(), key: str | None = None) -> None:
    from linewatch.kafka.io import make_producer, send_nowait

    producer = make_producer(settings)
    try:
        pending = [send_nowait(producer, settings.topics.results, r.to_bytes(), key=key or r.frame_id)
                   for r in results]
        for headers, rec in dlq:
            pending.append(send_nowait(producer, settings.topics.dlq, b"\xff\xd8 original bytes",
                                       key=headers.camera, headers=[*headers.to_kafka(), rec.to_header()]))
        for value in raw:
            pending.append(send_nowait(producer, settings.topics.results, value, key="garbage"))
        producer.flush(timeout=60)
        for p in pending:
            p.result(timeout=60)
    finally:
        producer.close(timeout=10)


def _run(settings: Settings, max_records: int, limit_s: float = 120):
    """run_sink with a safety stop so a bug fails the test instead of hanging it."""
    from workers.sink import run_sink

    stop = threading.Event()
    timer = threading.Timer(limit_s, stop.set)
    timer.start()
    try:
        stats = run_sink(settings, stop_event=stop, max_records=max_records)
    finally:
        timer.cancel()
    assert not stop.is_set(), f"sink did not reach {max_records} records within {limit_s}s: {stats}"
    return stats


def _results(n: int, product: str = "widget", start: int = 0, defect_every: int = 4):
    t0 = int(time.time() * 1000) - 60_000
    return [
        make_result(i, product=product, camera=f"cam-{i % 3}", verdict="defect" if i % defect_every == 0 else "ok",
                    category=("surface", "structural", "contamination", "combined")[i % 4] if i % defect_every == 0
                    else "unknown", capture_ts_ms=t0 + i * 10, frame_id=f"{product}-{i}")
        for i in range(start, start + n)
    ]


def test_sink_refuses_a_file_that_is_not_duckdb(tmp_path):
    """Before touching Kafka (no broker here): one clear line, exit 2 from the CLI."""
    from workers.sink import run_sink

    bad = tmp_path / "results.duckdb"
    bad.write_text("id,verdict\n1,ok\n")
    settings = Settings(storage={"db_path": bad}, kafka={"bootstrap_servers": "127.0.0.1:1", "connect_timeout_s": 1})
    with pytest.raises(UserError, match="not a DuckDB database"):
        run_sink(settings, max_records=1)
    proc = subprocess.run([sys.executable, "-m", "linewatch.cli", "sink", "--db", str(bad), "--bootstrap-servers",
                           "127.0.0.1:1"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "not a DuckDB database" in err[0]


class _Rec:
    """The fields of a kafka-python ConsumerRecord the sink reads (fast unit tests only)."""

    def __init__(self, topic, partition, offset, value, key=None, headers=None):
        self.topic, self.partition, self.offset = topic, partition, offset
        self.value, self.key, self.headers = value, key, headers or []


def test_handle_batch_without_kafka(tmp_path):
    """Sink.handle_batch on in-process records: a forged `dlq` header sent by a camera is
    ignored in favour of the worker's (appended last), garbage on `results` is kept as a
    rejected event, and a replayed batch feeds the alert state machine nothing."""
    from workers.sink import Sink

    settings = Settings(storage={"db_path": tmp_path / "lw.duckdb"},
                        alerts={"window_frames": 10, "max_defect_rate": 0.5, "max_consecutive_defects": 3})
    sink = Sink(settings)
    sink.start()
    t = settings.topics
    results = [make_result(i, verdict="defect", category="surface", capture_ts_ms=1000 + i, frame_id=f"f{i}")
               for i in range(3)]
    forged = DlqRecord(frame_id="x", reason="forged", stage="other", worker_id="evil", source_topic="frames",
                       source_partition=9, source_offset=9)
    real = DlqRecord(frame_id="x", reason="zero-byte frame", stage="decode", worker_id="w1", source_topic="frames",
                     source_partition=0, source_offset=5)
    records = [_Rec(t.results, 0, i, r.to_bytes(), key=r.frame_id.encode()) for i, r in enumerate(results)]
    records += [_Rec(t.dlq, 0, 0, b"", headers=[forged.to_header(), ("product", b"widget"), ("camera", b"\xff"),
                                                real.to_header()]),
                _Rec(t.results, 1, 0, b"{\"frame_id\": 1}", key=b"k")]
    wr = sink.handle_batch(records)
    assert len(wr.inserted_ids) == 3 and sink.stats.rejected == 1
    assert [(a.kind, a.state) for a in sink._pending_alerts] == [("consecutive_defects", "raised")]
    with store.reading(settings.storage.db_path) as con:
        rows = con.execute("SELECT reason, worker_id, product, camera, source_partition FROM dlq_events "
                           "ORDER BY source_topic").fetchall()
    assert ("zero-byte frame", "w1", "widget", None, 0) in rows
    assert not any(r[0] == "forged" for r in rows)
    assert any(r[0].startswith("sink: invalid result") and r[1] == "sink" for r in rows)
    sink._pending_alerts.clear()
    wr = sink.handle_batch(records)  # replay
    assert wr.inserted_ids == [] and sink._pending_alerts == [] and sink.stats.inserted == 3


@pytest.mark.integration
@pytest.mark.slow
def test_every_result_once_replays_deduplicated_dlq_and_garbage_kept(kafka_settings, tmp_path):
    db = tmp_path / "lw.duckdb"
    settings = _sink_settings(kafka_settings, db)
    results = _results(300)
    replayed = results[:7]  # a worker retried these: same frame ids on the topic twice
    dlq = []
    for k in range(3):
        h = FrameHeaders(frame_id=f"bad-{k}", product="widget", camera="cam-9", line="line-A", seq=k, capture_ts_ms=1)
        dlq.append((h, DlqRecord(frame_id=h.frame_id, reason="truncated JPEG", stage="decode", worker_id="w1",
                                 source_topic=settings.topics.frames, source_partition=0, source_offset=100 + k)))
    _produce(settings, results + replayed, dlq=dlq + dlq[:1], raw=[b"not json at all"])
    total = 300 + 7 + 4 + 1

    stats = _run(settings, total)
    assert (stats.records, stats.inserted, stats.duplicates, stats.rejected) == (total, 300, 7, 1)
    assert store.count_rows(db) == 300
    defects = [r for r in results if r.verdict == "defect"]
    assert store.count_rows(db, "defect_images") == len(defects)
    assert store.count_rows(db, "dlq_events") == 3 + 1  # 3 distinct DLQ frames + the unreadable result
    with store.reading(db) as con:
        assert con.execute("SELECT count(DISTINCT frame_id) FROM inspections").fetchone()[0] == 300
        assert con.execute("SELECT count(*) FROM inspections WHERE verdict = 'defect'").fetchone()[0] == len(defects)
        assert con.execute(
            "SELECT count(*) FROM inspections i JOIN defect_images d USING (frame_id) "
            "WHERE d.mask_png IS NOT NULL AND d.thumbnail_jpeg IS NOT NULL AND i.verdict = 'defect'"
        ).fetchone()[0] == len(defects)
        reasons = dict(con.execute("SELECT reason, count(*) FROM dlq_events GROUP BY 1").fetchall())
    assert reasons["truncated JPEG"] == 3
    assert any(r.startswith("sink: invalid result") for r in reasons)

    # the whole topic replayed by a fresh consumer group: not one new row
    again = _sink_settings(kafka_settings, db)
    stats2 = _run(again, total)
    assert stats2.inserted == 0 and stats2.duplicates == 307 and stats2.dlq == 0
    assert store.count_rows(db) == 300 and store.count_rows(db, "dlq_events") == 4


@pytest.mark.integration
@pytest.mark.slow
def test_offsets_are_committed_only_after_duckdb_has_the_batch(kafka_settings, tmp_path, monkeypatch):
    """The DuckDB write fails on the third batch (the sink dies); a restart in the same group
    resumes from the last committed batch and ends with every row exactly once."""
    from workers import sink as sink_mod

    db = tmp_path / "lw.duckdb"
    settings = _sink_settings(kafka_settings, db)
    _produce(settings, _results(500))
    real = sink_mod.store.write_batch
    calls = {"n": 0}

    def failing(con, results, **kw):
        if results:
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError("disk full (injected)")
        return real(con, results, **kw)

    monkeypatch.setattr(sink_mod.store, "write_batch", failing)
    with pytest.raises(OSError, match="disk full"):
        _run(settings, 500)
    written = store.count_rows(db)
    assert 0 < written < 500
    committed = _committed(settings)
    assert committed == written, "Kafka offsets must cover exactly the rows DuckDB committed"

    monkeypatch.setattr(sink_mod.store, "write_batch", real)
    stats = _run(settings, 500 - committed)  # same group: resumes after the committed offsets
    assert stats.inserted == 500 - written and stats.duplicates == 0
    assert store.count_rows(db) == 500


def _committed(settings: Settings) -> int:
    from kafka import TopicPartition

    from linewatch.kafka.io import make_consumer

    c = make_consumer(settings, settings.sink.group_id)
    try:
        parts = c.partitions_for_topic(settings.topics.results) or set()
        total = 0
        for p in parts:
            off = c.committed(TopicPartition(settings.topics.results, p))
            total += off or 0
        return total
    finally:
        c.close()


@pytest.mark.integration
@pytest.mark.slow
def test_alerts_raised_and_cleared_on_topic_and_in_database(kafka_settings, tmp_path):
    db = tmp_path / "lw.duckdb"
    settings = _sink_settings(kafka_settings, db, window_frames=10, max_defect_rate=0.3, max_consecutive_defects=5)
    t0 = int(time.time() * 1000) - 10_000
    seq = "o" * 10 + "d" * 6 + "o" * 12  # run of 6 defects, rate up to 60 %, then back to 0
    results = [make_result(i, product="bottle", verdict="defect" if v == "d" else "ok", category="surface",
                           capture_ts_ms=t0 + i * 5, frame_id=f"b-{i}") for i, v in enumerate(seq)]
    # one batch at a time, in order, like a line producing frames
    settings = settings.model_copy(update={"sink": settings.sink.model_copy(update={"max_batch": 4})})
    _produce(settings, results, key="bottle")  # one partition: the sink sees them in line order
    stats = _run(settings, len(results))
    assert stats.alerts_raised == 2 and stats.alerts_cleared == 2 and stats.alerts_published == 4

    from linewatch.kafka.io import make_consumer

    from kafka import TopicPartition

    c = make_consumer(settings, None, consumer_timeout_ms=5000)
    c.assign([TopicPartition(settings.topics.alerts, 0)])
    c.seek_to_beginning()
    got = [Alert.model_validate_json(m.value) for m in c]
    c.close()
    assert sorted((a.kind, a.state) for a in got) == [
        ("consecutive_defects", "cleared"), ("consecutive_defects", "raised"),
        ("defect_rate", "cleared"), ("defect_rate", "raised")]
    assert all(m.product == "bottle" for m in got)
    with store.reading(db) as con:
        rows = con.execute("SELECT kind, state, published FROM alerts ORDER BY ts_ms, kind").fetchall()
        assert store.active_alerts(con) == []
    assert len(rows) == 4 and all(p for _, _, p in rows)


@pytest.mark.integration
@pytest.mark.slow
def test_dashboard_reads_while_the_sink_writes(kafka_settings, tmp_path):
    """The real sink writes 2000 results arriving over ~10 s while a separate process runs the
    dashboard's queries in a loop: no error reaches the reader, its frame counts never go
    down, and the final count is exact."""
    from workers.sink import run_sink

    db = tmp_path / "lw.duckdb"
    settings = _sink_settings(kafka_settings, db)
    out, stop_file = tmp_path / "reader.json", tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, str(ROOT / "tests" / "db_reader_proc.py"), str(db), str(out),
                               str(stop_file), "1"], cwd=ROOT)
    stop = threading.Event()
    box: dict = {}
    sink = threading.Thread(target=lambda: box.setdefault("stats", run_sink(settings, stop_event=stop,
                                                                            max_records=2000)))
    try:
        sink.start()
        for k in range(20):  # 20 bursts of 100, like cameras producing
            _produce(settings, _results(100, start=k * 100))
            time.sleep(0.4)
        sink.join(timeout=180)
        assert not sink.is_alive(), "sink did not finish"
    finally:
        stop.set()
        stop_file.touch()
        try:
            reader.wait(timeout=60)
        finally:
            if reader.poll() is None:
                reader.kill()
    seen = json.loads(out.read_text())
    st = box.get("stats")
    reads = sorted(seen["read_ms"]) or [0.0]
    print(f"\nreader: {len(seen['counts'])} snapshots, distinct counts {len(set(seen['counts']))}, "
          f"read p50 {reads[len(reads) // 2]:.0f} ms max {reads[-1]:.0f} ms, errors {len(seen['errors'])}; "
          f"sink: {st.batches if st else '?'} batches, {st.write_seconds if st else 0:.1f} s in DuckDB")
    assert seen["errors"] == []
    counts = seen["counts"]
    assert len(counts) >= 10, f"reader read only {len(counts)} times"
    assert all(a <= b for a, b in zip(counts, counts[1:])), "counts went backwards"
    assert len(set(counts)) > 3, "the reader should have seen the data grow while the sink wrote"
    assert counts[-1] == 2000 == store.count_rows(db)
    assert box["stats"].inserted == 2000


def _sink_env(settings: Settings) -> dict:
    import os

    t = settings.topics
    env = dict(os.environ)
    env.update({
        "LINEWATCH_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "LINEWATCH_TOPICS__RESULTS": t.results, "LINEWATCH_TOPICS__DLQ": t.dlq,
        "LINEWATCH_TOPICS__ALERTS": t.alerts, "LINEWATCH_TOPICS__FRAMES": t.frames,
        "LINEWATCH_TOPICS__PROFILES": t.profiles,
        "LINEWATCH_TOPICS__FRAMES_PARTITIONS": str(t.frames_partitions),
        "LINEWATCH_TOPICS__RESULTS_PARTITIONS": str(t.results_partitions),
        "LINEWATCH_STORAGE__DB_PATH": str(settings.storage.db_path),
        "LINEWATCH_SINK__GROUP_ID": settings.sink.group_id,
        "LINEWATCH_SINK__MAX_BATCH": "200",
    })
    return env


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.faults
def test_sink_killed_with_sigkill_then_restarted(kafka_settings, tmp_path):
    """`linewatch sink` as a real process, SIGKILLed while it writes, then restarted: every
    result ends up exactly once (at-least-once delivery + idempotent inserts)."""
    import signal

    db = tmp_path / "lw.duckdb"
    settings = _sink_settings(kafka_settings, db)
    n = 3000
    results = _results(n)
    # in two halves: the second is produced while the sink runs and the kill follows at once, so
    # it lands while the sink works through it (polling the row count alone could not: a fast
    # sink wrote all 3000 between two reads, the reader waiting on the writer's lock)
    _produce(settings, results[: n // 2])
    env = _sink_env(settings)
    cmd = [sys.executable, "-m", "linewatch.cli", "sink"]
    first = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 120:
            try:
                if store.count_rows(db) > 0:
                    break
            except (store.DatabaseMissing, store.NotADatabase):
                pass
            time.sleep(0.05)
        _produce(settings, results[n // 2 :])
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    before = store.count_rows(db)
    assert 0 < before < n, f"kill should land mid-run (rows at kill: {before})"
    t1 = time.monotonic()
    second = subprocess.run([*cmd, "--idle-timeout", "5"], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    stats = json.loads(second.stdout.strip().splitlines()[-1])
    recovered_s = time.monotonic() - t1 - 5
    print(f"\nSIGKILL at {before} rows; restart wrote {stats['inserted']} new, skipped {stats['duplicates']} "
          f"replayed, {recovered_s:.1f} s to catch up")
    with store.reading(db) as con:
        rows, distinct = con.execute("SELECT count(*), count(DISTINCT frame_id) FROM inspections").fetchone()
    assert rows == distinct == n
    assert stats["inserted"] == n - before
