"""Evidence frames: the sink keeps the original bytes of every defect frame and of the sampled
normal frames as files beside a real DuckDB file, once per frame, readable back byte for byte,
under the retention policy (age, size cap oldest first, pending reviews kept)."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from types import SimpleNamespace

from linewatch import store
from linewatch.evidence import keep_reason, sampled
from linewatch.settings import Settings
from result_factory import make_result


def _settings(tmp_path: Path, **evidence) -> Settings:
    s = Settings()
    return s.model_copy(update={
        "storage": s.storage.model_copy(update={"db_path": tmp_path / "lw.duckdb",
                                                "registry_dir": tmp_path / "profiles"}),
        "evidence": s.evidence.model_copy(update=evidence),
    })


def _frame_bytes(i: int, size: int = 2000) -> bytes:
    return b"\xff\xd8" + bytes([i % 251]) * size


def _result(i: int, t0: int, verdict: str = "defect", size: int = 2000):
    r = make_result(i, verdict=verdict, category="surface" if verdict == "defect" else "unknown",
                    capture_ts_ms=t0 + i, frame_id=f"f-{i}")
    return r.model_copy(update={"frame_b64": base64.b64encode(_frame_bytes(i, size)).decode(),
                                "frame_encoding": "jpeg", "evidence": keep_reason(r.frame_id, verdict, 1.0)})


def _records(results, start_offset: int = 0, topic: str = "results"):
    return [SimpleNamespace(topic=topic, partition=0, offset=start_offset + k, key=b"cam", value=r.to_bytes(),
                            headers=[]) for k, r in enumerate(results)]


def test_sample_is_deterministic_and_near_its_rate():
    ids = [f"cam-{i}-{i * 7919:x}" for i in range(20_000)]
    kept = sum(sampled(f, 0.01) for f in ids)
    assert 150 <= kept <= 250  # 1 % of 20 000 = 200, binomial sd 14
    assert [sampled(f, 0.01) for f in ids[:500]] == [sampled(f, 0.01) for f in ids[:500]]
    assert not any(sampled(f, 0.0) for f in ids[:100]) and all(sampled(f, 1.0) for f in ids[:100])
    assert keep_reason("x", "defect", 0.0) == "defect"


def test_sink_keeps_each_frame_once_and_reads_it_back(tmp_path):
    from workers.sink import Sink

    settings = _settings(tmp_path)
    sink = Sink(settings)
    sink.start()
    t0 = int(time.time() * 1000)
    results = [_result(i, t0, "defect" if i % 2 == 0 else "ok") for i in range(10)]
    results[1] = results[1].model_copy(update={"frame_b64": None, "frame_encoding": None, "evidence": None})
    sink.handle_batch(_records(results))
    sink.handle_batch(_records(results))  # a replay: no second row, same files
    with store.reading(settings.storage.db_path) as con:
        rows = con.execute("SELECT frame_id, reason, bytes FROM evidence ORDER BY capture_ts_ms").fetchall()
    assert [r[0] for r in rows] == [f"f-{i}" for i in range(10) if i != 1]
    assert {r[1] for r in rows} == {"defect", "sample"} and all(r[2] == 2002 for r in rows)
    assert sink.stats.evidence_kept == 9 and sink.stats.evidence_bytes == 9 * 2002
    got = store.read_evidence(settings.storage.db_path, "f-4")
    assert got is not None and got.data == _frame_bytes(4) and got.encoding == "jpeg" and got.reason == "defect"
    assert store.read_evidence(settings.storage.db_path, "f-1") is None
    root = store.evidence_root(settings.storage.db_path)
    assert root == tmp_path / "lw.duckdb.evidence" and len(list(root.glob("*/*"))) == 9
    # a tampered file is never served
    (root / store.evidence.relative_name("f-6", "jpeg")).write_bytes(b"not the frame")
    assert store.read_evidence(settings.storage.db_path, "f-6") is None


def test_retention_holds_the_cap_oldest_first_and_keeps_pending_reviews(tmp_path):
    from workers.sink import Sink

    cap = 20 * 2002
    settings = _settings(tmp_path, max_bytes=cap, sweep_interval_s=3600)
    sink = Sink(settings)
    sink.start()
    t0 = int(time.time() * 1000)
    sink.handle_batch(_records([_result(i, t0) for i in range(15)]))
    with store.writing(settings.storage.db_path) as con:  # f-0's review is pending ('unsure')
        con.execute("INSERT INTO reviews VALUES ('r0', 'f-0', 'widget', 'unsure', NULL, 'ana', NULL, ?, ?, 0, 0)",
                    [t0, t0])
    total_after = []
    for b in range(1, 8):
        sink.handle_batch(_records([_result(i, t0) for i in range(15 * b, 15 * (b + 1))], start_offset=15 * b))
        total_after.append(sink._evidence_total)
    root = store.evidence_root(settings.storage.db_path)
    with store.reading(settings.storage.db_path) as con:
        kept = [r[0] for r in con.execute("SELECT frame_id FROM evidence ORDER BY capture_ts_ms").fetchall()]
        indexed = con.execute("SELECT sum(bytes) FROM evidence").fetchone()[0]
    assert max(total_after) <= cap and indexed <= cap
    assert kept[0] == "f-0"  # the oldest, but its review is pending
    newest = [f"f-{i}" for i in range(120)][-len(kept) + 1:]
    assert kept[1:] == newest  # everything else: the newest, oldest deleted first
    assert len(list(root.glob("*/*"))) == len(kept)  # files went with their rows
    assert sink.stats.evidence_deleted == 120 - len(kept)
    # the age limit: everything not pending is older than a millisecond
    settings2 = _settings(tmp_path, max_bytes=cap, max_age_days=1e-9)
    sink2 = Sink(settings2)
    sink2.start()
    res = sink2.retain(force=True)
    assert res is not None and res.total_bytes == 2002 and res.pending_bytes == 2002
    assert [p.name for p in root.glob("*/*")] == [Path(store.evidence.relative_name("f-0", "jpeg")).name]


def test_orphan_files_are_swept_at_start(tmp_path):
    from workers.sink import Sink

    settings = _settings(tmp_path)
    Sink(settings).start()
    root = store.evidence_root(settings.storage.db_path)
    rel, _ = store.write_file(root, "never-indexed", b"xx", "jpeg")  # a crash before the row
    (root / rel).with_name(".tmp-abc").write_bytes(b"half")
    sink = Sink(settings)
    sink.start()
    assert not list(root.glob("*/*"))
