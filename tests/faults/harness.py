"""Fault-injection harness (issue 7): a real broker, real worker and sink SUBPROCESSES (so they
can be SIGKILLed), a real DuckDB file, a fixed bounded load of synthetic JPEG frames, and one
accounting check at the end of every scenario:

    every produced frame has exactly one row in DuckDB ``inspections`` or exactly one
    ``dlq_events`` row (the sink's copy of ``frames.dlq``); none missing, none twice.

Frames are identified by their Kafka coordinates on ``frames`` (known from the producer's
acknowledgements) as well as by frame id, so a DLQ'd frame whose headers were destroyed is
still accounted for. Each scenario writes its figures to ``test-artifacts/faults/<name>.json``;
``scripts/faults_report.py`` runs the suite and prints the table.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from linewatch.messages import FrameHeaders
from linewatch.settings import (
    KafkaSettings,
    SinkSettings,
    StorageSettings,
    TopicSettings,
    WorkerSettings,
)
from linewatch.settings import Settings as _Settings

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "faults"
PARTITIONS = 4
IMAGE_SIZE = 128
PRODUCTS = ("cap", "pcb")


def pytest_collection_modifyitems(items):
    for item in items:
        if "/faults/" in str(item.fspath):
            for m in ("faults", "integration", "slow"):
                item.add_marker(getattr(pytest.mark, m))


# ---------------------------------------------------------------------------------------------
# small helpers
def now_ms() -> int:
    return int(time.time() * 1000)


def wait_until(pred, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def camera_ids(n_partitions: int = PARTITIONS, per_partition: int = 1) -> list[str]:
    """Camera ids whose keys hash (kafka-python's murmur2, as the producer does) onto every
    partition, so every worker of the group has cameras to serve."""
    from kafka.partitioner.default import murmur2

    got: dict[int, list[str]] = defaultdict(list)
    i = 0
    while any(len(got[p]) < per_partition for p in range(n_partitions)):
        cam = f"cam-{i}"
        p = (murmur2(cam.encode()) & 0x7FFFFFFF) % n_partitions
        if len(got[p]) < per_partition:
            got[p].append(cam)
        i += 1
    return [c for p in range(n_partitions) for c in got[p]]


# ---------------------------------------------------------------------------------------------
# session fixtures: broker, profile registry, frame bank
# the faults brokers: 384 MB heap, 120 s to start, 3 tries on fresh free ports (a port may be taken
# between the check and the bind); not tied to the pytest process's life (die_with_parent off)
_BROKER = {"heap_mb": 384, "start_timeout_s": 120, "attempts": 3, "die_with_parent": False}


@pytest.fixture(scope="session")
def fault_broker(tmp_path_factory):
    """A real single-node KRaft broker on free ports, for the whole faults session."""
    from linewatch.kafka.broker import temporary_broker

    with temporary_broker(tmp_path_factory.mktemp("faults-broker"), stop_timeout_s=20, **_BROKER) as broker:
        yield broker


def start_broker(home: Path, **settings):
    """A broker like ``fault_broker`` that the caller stops (and restarts) itself; ``settings``
    go to BrokerSettings (``secured=True``: SASL_SSL, one SCRAM user per role, ACLs)."""
    from linewatch.kafka.broker import start_on_free_ports

    return start_on_free_ports(home, **_BROKER, **settings)


@dataclass
class ProfileBank:
    registry_dir: Path
    thresholds: dict[str, float]
    fit_s: float


@pytest.fixture(scope="session")
def profile_bank(tmp_path_factory) -> ProfileBank:
    """A registry template with one small real PaDiM profile per product (input 128, 20 normal
    training frames, threshold = 1.2 x the highest normal pixel score), plus a product
    ``corrupt`` whose weights are garbage. Scenarios copy it."""
    import torch

    from linewatch.models.padim import PaDiM
    from linewatch.profiles import Profile, Registry
    from linewatch.synth import SyntheticProduct

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("faults-registry") / "profiles"
    reg = Registry(root)
    t0 = time.perf_counter()
    thresholds = {}
    for name in PRODUCTS:
        sp = SyntheticProduct(name, size=IMAGE_SIZE, seed=0)
        imgs = np.stack([sp.normal(i).image for i in range(20)])
        model = PaDiM(input_size=IMAGE_SIZE).fit(imgs, progress=False)
        maps, _ = model.predict(imgs)
        thr = float(maps.max()) * 1.2
        thresholds[name] = thr
        reg.publish(Profile(product=name, model_kind="padim", backbone="efficientnet_lite0", input_size=IMAGE_SIZE,
                            threshold=thr, threshold_method="manual", notes="faults suite"), model)
    # a product whose only profile is corrupt: copy cap's files, then destroy the weights
    src = reg.version_dir("cap", 1)
    dst = reg.version_dir("corrupt", 1)
    shutil.copytree(src, dst)
    prof = json.loads((dst / "profile.json").read_text())
    prof["product"] = "corrupt"
    (dst / "profile.json").write_text(json.dumps(prof))
    (dst / "weights.safetensors").write_bytes(b"\x00garbage, not safetensors" * 10)
    (dst / "model.onnx").write_bytes(b"garbage, not onnx" * 10)
    reg.set_current("corrupt", 1)
    return ProfileBank(root, thresholds, time.perf_counter() - t0)


@dataclass
class FrameBank:
    """Pre-encoded JPEGs per product (normal and defective), made once per session."""

    jpegs: dict[str, list[bytes]]


@pytest.fixture(scope="session")
def frame_bank() -> FrameBank:
    from linewatch.synth import SyntheticProduct

    out: dict[str, list[bytes]] = {}
    for name in PRODUCTS:
        sp = SyntheticProduct(name, size=IMAGE_SIZE, seed=1)
        imgs = [sp.normal(1000 + i).image for i in range(24)]
        imgs += [sp.defective(2000 + i, c).image for i, c in enumerate(("structural", "surface", "contamination",
                                                                         "combined") * 2)]
        out[name] = [cv2.imencode(".jpg", cv2.cvtColor(im, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
                     .tobytes() for im in imgs]
    return FrameBank(out)


# ---------------------------------------------------------------------------------------------
# frames and the producer
@dataclass
class Frame:
    """One record to produce. ``headers`` None = the normal FrameHeaders built at send time;
    otherwise the exact (possibly broken) headers to send. ``expect`` = a regex the DLQ reason
    must match (None = must become an inspection row)."""

    fid: str
    camera: str
    product: str
    value: bytes
    kind: str = "good"
    headers: list[tuple[str, bytes]] | None = None
    expect: str | None = None
    seq: int = 0


def good_frames(bank: FrameBank, n: int, prefix: str, cameras: list[str]) -> list[Frame]:
    frames = []
    for i in range(n):
        cam = cameras[i % len(cameras)]
        product = PRODUCTS[(i // len(cameras)) % len(PRODUCTS)] if len(cameras) < 2 else \
            PRODUCTS[cameras.index(cam) % len(PRODUCTS)]
        imgs = bank.jpegs[product]
        seq = i // len(cameras)
        frames.append(Frame(f"{prefix}-{cam}-{seq}", cam, product, imgs[(i * 7) % len(imgs)], seq=seq))
    return frames


@dataclass
class Sent:
    frame: Frame
    partition: int
    offset: int
    t_send: float  # epoch seconds
    attempts: int


class LoadProducer(threading.Thread):
    """Sends a fixed list of frames at a fixed rate through linewatch's own Kafka helpers;
    a failed delivery (broker down) is retried with the same frame id until ``retry_s``."""

    def __init__(self, settings: _Settings, frames: list[Frame], rate_fps: float, retry_s: float = 120.0):
        super().__init__(daemon=True, name="load-producer")
        self.settings = settings
        self.frames = frames
        self.rate = rate_fps
        self.retry_s = retry_s
        self.sent: list[Sent] = []
        self.failed: list[tuple[Frame, str]] = []
        self.retries = 0
        self.error: BaseException | None = None
        self.started_at = 0.0
        self.finished_at = 0.0
        self.stop_event = threading.Event()

    def _headers(self, f: Frame) -> list[tuple[str, bytes]]:
        if f.headers is not None:
            return f.headers
        return FrameHeaders(frame_id=f.fid, product=f.product, camera=f.camera, line="line-F", seq=f.seq,
                            capture_ts_ms=now_ms(), encoding="jpeg").to_kafka()

    def run(self) -> None:
        from linewatch.kafka.io import BrokerUnavailable, DeliveryError, make_producer, send_nowait

        try:
            producer = make_producer(self.settings, client_id="faults-load", linger_ms=5)
        except BaseException as exc:
            self.error = exc
            return
        self.started_at = time.time()
        pending: list[tuple[Frame, Any, float, int]] = []
        first_try: dict[str, float] = {}

        def settle(block: bool) -> None:
            keep = []
            for f, p, t, attempts in pending:
                if not block and not p.done():
                    keep.append((f, p, t, attempts))
                    continue
                try:
                    md = p.result(timeout=90)
                    self.sent.append(Sent(f, md.partition, md.offset, t, attempts))
                except DeliveryError as exc:
                    if time.time() - first_try[f.fid] > self.retry_s:
                        self.failed.append((f, str(exc)))
                        continue
                    self.retries += 1
                    time.sleep(0.2)
                    keep.append(submit(f, attempts + 1))
            pending[:] = keep

        def submit(f: Frame, attempts: int):
            while True:
                try:
                    t = time.time()
                    first_try.setdefault(f.fid, t)
                    return (f, send_nowait(producer, self.settings.topics.frames, f.value, key=f.camera,
                                           headers=self._headers(f)), t, attempts)
                except (BrokerUnavailable, DeliveryError) as exc:  # metadata not available: broker down
                    if time.time() - first_try[f.fid] > self.retry_s:
                        raise
                    self.retries += 1
                    time.sleep(0.5)

        try:
            t0 = time.monotonic()
            for i, f in enumerate(self.frames):
                if self.stop_event.is_set():
                    break
                delay = t0 + i / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pending.append(submit(f, 1))
                if len(pending) >= 64:
                    settle(block=False)
            producer.flush(timeout=120)
            while pending:
                settle(block=True)
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished_at = time.time()
            with contextlib.suppress(Exception):
                producer.close(timeout=10)


# ---------------------------------------------------------------------------------------------
# services as subprocesses
@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log: Path
    started_at: float
    killed_at: float | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


class Pipeline:
    """One scenario's pipeline: topics named after the scenario, its own DuckDB file, its
    own copy of the registry, worker and sink subprocesses it starts, kills and stops.

    On a secured broker every party runs as its own role's user (``as_role``): the worker and
    the sink subprocesses, the admin creating the topics (after the broker's super user applied
    the role ACLs for this scenario's topic names), the load producer a test builds."""

    def __init__(self, name: str, broker, tmp: Path, registry_template: Path, *,
                 worker: dict | None = None, sink: dict | None = None):
        self.name = name
        self.broker = broker
        self.tmp = tmp
        self.registry_dir = tmp / "profiles"
        shutil.copytree(registry_template, self.registry_dir)
        self.db = tmp / "linewatch.duckdb"
        self.services: list[Service] = []
        self.events: list[dict[str, Any]] = []  # faults, with their times
        w = {"group_id": f"{name}-workers", "max_batch": 16, "max_wait_ms": 50, "threads": 1,
             "reload_interval_s": 1.0, **(worker or {})}
        s = {"group_id": f"{name}-sink", "max_batch": 200, "max_wait_ms": 200, **(sink or {})}
        self.settings = _Settings(
            kafka=KafkaSettings(bootstrap_servers=broker.bootstrap_servers, client_id=f"faults-{name}",
                                connect_timeout_s=20),
            topics=TopicSettings(frames=f"{name}.frames", results=f"{name}.results", dlq=f"{name}.frames.dlq",
                                 alerts=f"{name}.alerts", profiles=f"{name}.profiles", reviews=f"{name}.reviews",
                                 frames_partitions=PARTITIONS, results_partitions=2),
            storage=StorageSettings(db_path=self.db, registry_dir=self.registry_dir),
            worker=WorkerSettings(**w),
            sink=SinkSettings(**s),
        )

    @property
    def secured(self) -> bool:
        return bool(getattr(self.broker, "secured", False))

    def as_role(self, role: str) -> _Settings:
        """These settings with ``role``'s Kafka user on a secured broker; unchanged otherwise."""
        if not self.secured:
            return self.settings
        ks = self.broker.kafka_settings(role, client_id=self.settings.kafka.client_id,
                                        connect_timeout_s=self.settings.kafka.connect_timeout_s)
        return self.settings.model_copy(update={"kafka": ks})

    # -- environment for the subprocesses: the same settings, as LINEWATCH_ env vars ---------
    def env(self, role: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
        env["LINEWATCH_HOME"] = str(self.tmp / "home")
        if os.environ.get("LINEWATCH_CACHE"):
            env["LINEWATCH_CACHE"] = os.environ["LINEWATCH_CACHE"]
        s = self.as_role(role) if role else self.settings
        for section in ("kafka", "topics", "storage", "worker", "sink", "evidence", "dashboard"):
            for key, value in getattr(s, section).model_dump(exclude_defaults=True).items():
                env[f"LINEWATCH_{section.upper()}__{key.upper()}"] = str(value)
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        return env

    def _spawn(self, name: str, args: list[str], role: str | None = None) -> Service:
        log = self.tmp / f"{name}.log"
        fh = open(log, "ab")
        proc = subprocess.Popen([sys.executable, "-m", "linewatch.cli", "-v", *args], cwd=REPO, env=self.env(role),
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        fh.close()
        svc = Service(name, proc, log, time.time())
        self.services.append(svc)
        return svc

    def start_worker(self, worker_id: str, *extra: str) -> Service:
        return self._spawn(worker_id, ["work", "--worker-id", worker_id, *extra], role="worker")

    def start_sink(self, name: str = "sink") -> Service:
        return self._spawn(name, ["sink"], role="sink")

    def kill(self, svc: Service, sig: int = signal.SIGKILL, what: str | None = None) -> float:
        t = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.kill(svc.proc.pid, sig)
        if sig == signal.SIGKILL:
            svc.proc.wait(timeout=30)
            svc.killed_at = t
        self.events.append({"t": t, "kind": what or f"kill {svc.name}", "service": svc.name})
        return t

    def stop_all(self, timeout: float = 30.0) -> None:
        for svc in self.services:
            if svc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(svc.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for svc in self.services:
            try:
                svc.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                svc.proc.kill()
                svc.proc.wait(timeout=10)
        keep = ARTIFACTS / "logs" / self.name  # pytest rotates tmp dirs: keep the evidence
        keep.mkdir(parents=True, exist_ok=True)
        for svc in self.services:
            with contextlib.suppress(OSError):
                shutil.copy2(svc.log, keep / svc.log.name)

    def logs_tail(self, n: int = 30) -> str:
        out = []
        for svc in self.services:
            lines = svc.text().splitlines()[-n:]
            out.append(f"---- {svc.name} (rc={svc.proc.poll()}) ----\n" + "\n".join(lines))
        return "\n".join(out)

    # -- waiting on the services ------------------------------------------------------------
    def wait_assigned(self, svc: Service, timeout: float = 90.0) -> list[int]:
        """Until the worker logs its partition assignment (it joined the group)."""
        def got():
            m = re.findall(r"partitions assigned: \[([0-9, ]*)\]", svc.text())
            if not svc.alive():
                raise RuntimeError(f"{svc.name} exited early:\n{svc.text()[-3000:]}")
            return [int(x) for x in m[-1].split(",") if x.strip()] if m else None
        try:
            return wait_until(got, timeout, what=f"{svc.name} to join the group")
        except TimeoutError as exc:
            # Where it waits: the CLI dumps every thread's stack to its log on SIGUSR1.
            with contextlib.suppress(ProcessLookupError):
                os.kill(svc.proc.pid, signal.SIGUSR1)
            time.sleep(1.0)
            raise TimeoutError(f"{exc}; its log ends:\n{svc.text()[-6000:]}") from None

    def wait_sink_ready(self, svc: Service, timeout: float = 60.0) -> None:
        def ready():
            if not svc.alive():
                raise RuntimeError(f"{svc.name} exited early:\n{svc.text()[-3000:]}")
            return "->" in svc.text() and self.db.exists()
        wait_until(ready, timeout, what=f"{svc.name} to start")

    def create_topics(self) -> None:
        from linewatch.kafka.io import ensure_topics

        if self.secured:
            from linewatch.kafka.acls import apply_acls, bindings
            from linewatch.kafka.io import make_admin

            admin = make_admin(self.as_role("broker"), timeout_s=60)
            try:
                apply_acls(admin, bindings(self.settings, self.broker.secrets.users()))
            finally:
                admin.close()
        ensure_topics(self.as_role("admin"), timeout_s=60)

    # -- reading the outcome ----------------------------------------------------------------
    def read_db(self) -> tuple[list[tuple], list[tuple]]:
        from linewatch import store

        if not self.db.exists():
            return [], []
        with store.reading(self.db, timeout_s=30) as con:
            if store.schema_version(con) == 0:
                return [], []
            rows = con.execute(
                "SELECT frame_id, kafka_partition, kafka_offset, worker_id, processed_ts_ms, stored_ts_ms, "
                "profile_version, verdict FROM inspections").fetchall()
            dlq = con.execute(
                "SELECT source_partition, source_offset, frame_id, stage, reason, worker_id, stored_ts_ms "
                "FROM dlq_events WHERE source_topic = ?", [self.settings.topics.frames]).fetchall()
        return rows, dlq

    def wait_accounted(self, sent: list[Sent], timeout: float) -> "Accounting":
        """Poll DuckDB until every sent frame is accounted for (bounded), then account."""
        t0 = time.monotonic()
        acc = None
        while True:
            rows, dlq = self.read_db()
            acc = account(sent, rows, dlq)
            if acc.missing == 0 or time.monotonic() - t0 > timeout:
                break
            time.sleep(1.0)
        # a little longer: a late duplicate (replay) would show up now
        time.sleep(2.0)
        rows, dlq = self.read_db()
        acc = account(sent, rows, dlq)
        acc.wait_s = time.monotonic() - t0
        acc.raw_dlq_records, acc.raw_dlq_redeliveries = self.raw_dlq()
        return acc

    def raw_dlq(self) -> tuple[int, int]:
        """(records on the frames.dlq topic, how many of them repeat a source offset):
        redeliveries the at-least-once worker made and the sink deduplicated."""
        from kafka import TopicPartition

        from linewatch.kafka.io import make_consumer

        consumer = make_consumer(self.as_role("sink"), None, None, client_id=f"faults-{self.name}-dlqread",
                                 consumer_timeout_ms=3000)
        try:
            parts = consumer.partitions_for_topic(self.settings.topics.dlq) or set()
            tps = [TopicPartition(self.settings.topics.dlq, p) for p in parts]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            end = consumer.end_offsets(tps)
            seen: Counter = Counter()
            n = 0
            deadline = time.monotonic() + 30
            while any(consumer.position(tp) < end[tp] for tp in tps) and time.monotonic() < deadline:
                for recs in consumer.poll(timeout_ms=500).values():
                    for r in recs:
                        n += 1
                        info = dict(r.headers or []).get("dlq")
                        try:
                            d = json.loads(info)
                            seen[(d["source_partition"], d["source_offset"])] += 1
                        except Exception:
                            seen[("?", r.offset)] += 1
            return n, sum(c - 1 for c in seen.values() if c > 1)
        finally:
            consumer.close()

    def group_generations(self, group: str) -> list[int]:
        """Generations the broker's group coordinator stabilized for ``group`` (from its log):
        one per rebalance."""
        try:
            text = self.broker.log_file.read_text(errors="replace")
        except OSError:
            return []
        return [int(g) for g in re.findall(rf"Stabilized group {re.escape(group)} generation (\d+)", text)]


@dataclass
class Accounting:
    produced: int
    rows: int
    dlq: int
    missing: int
    duplicated: int
    missing_ids: list[str] = field(default_factory=list)
    duplicated_ids: list[str] = field(default_factory=list)
    unexpected_rows: int = 0  # rows whose frame was not produced by this scenario
    wait_s: float = 0.0
    raw_dlq_records: int = 0
    raw_dlq_redeliveries: int = 0
    by_fid_outcome: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("by_fid_outcome")
        d["missing_ids"] = d["missing_ids"][:20]
        d["duplicated_ids"] = d["duplicated_ids"][:20]
        return d


def account(sent: list[Sent], rows: list[tuple], dlq: list[tuple]) -> Accounting:
    """Exactly one outcome per produced frame: an inspections row (by frame id) or a
    dlq_events row (by its coordinates on `frames`)."""
    rows_by_fid = Counter(r[0] for r in rows)
    dlq_at = Counter((d[0], d[1]) for d in dlq)
    by_fid: dict[str, list[Sent]] = defaultdict(list)
    for s in sent:
        by_fid[s.frame.fid].append(s)
    missing, dup = [], []
    outcome = {}
    for fid, copies in by_fid.items():
        n_rows = rows_by_fid.get(fid, 0)
        n_dlq = sum(dlq_at.get((s.partition, s.offset), 0) for s in copies)
        # a frame sent twice by a producer retry may legitimately be DLQ'd once per copy
        n_dlq_distinct = min(n_dlq, 1) if n_rows == 0 else n_dlq
        total = n_rows + n_dlq_distinct
        if total == 0:
            missing.append(fid)
        elif total > 1:
            dup.append(fid)
        outcome[fid] = "row" if n_rows else ("dlq" if n_dlq else "missing")
    produced_fids = set(by_fid)
    produced_coords = {(s.partition, s.offset) for s in sent}
    unexpected = sum(1 for r in rows if r[0] not in produced_fids) + \
        sum(1 for d in dlq if (d[0], d[1]) not in produced_coords)
    return Accounting(
        produced=len(by_fid),
        rows=sum(1 for r in rows if r[0] in produced_fids),
        dlq=sum(1 for d in dlq if (d[0], d[1]) in produced_coords),
        missing=len(missing), duplicated=len(dup), missing_ids=missing, duplicated_ids=dup,
        unexpected_rows=unexpected, by_fid_outcome=outcome,
    )


def recovery_times(events: list[dict[str, Any]], sent: list[Sent], rows: list[tuple]) -> list[float]:
    """Per fault at time t: the worst partition's wait, from t until a frame processed after t
    is stored in DuckDB (over the partitions that were given frames after t). End to end, so
    it includes the rebalance, the restart, the broker's return, whatever the fault broke."""
    out = []
    for ev in events:
        t_ms = ev["t"] * 1000
        parts = {s.partition for s in sent if s.t_send * 1000 >= t_ms}
        worst = 0.0
        for p in parts:
            stored = [r[5] for r in rows if r[1] == p and r[4] is not None and r[4] >= t_ms]
            if not stored:
                continue  # everything after t on p went to the DLQ (or nothing came): skip
            worst = max(worst, (min(stored) - t_ms) / 1000.0)
        out.append(round(worst, 2))
    return out


def write_report(name: str, title: str, acc: Accounting, ttr: str, extra: dict[str, Any]) -> dict[str, Any]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    row = {"scenario": name, "title": title, **acc.as_dict(), "time_to_recover": ttr, **extra,
           "written_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    (ARTIFACTS / f"{name}.json").write_text(json.dumps(row, indent=2, default=str))
    print(f"\n[faults] {name}: {json.dumps(row, default=str)}")
    return row


@pytest.fixture
def pipeline_factory(fault_broker, profile_bank, tmp_path):
    made: list[Pipeline] = []

    def make(name: str, broker=None, **kw) -> Pipeline:
        p = Pipeline(name, broker or fault_broker, tmp_path / name, profile_bank.registry_dir, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop_all()


# ---------------------------------------------------------------------------------------------
# fault injection helpers
def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return -1


def kill_when_busy(p: Pipeline, svc: Service, timeout: float = 20.0, what: str | None = None) -> dict[str, Any]:
    """SIGKILL ``svc`` at a moment it is burning CPU (i.e. inside a batch, not idle-polling):
    sampled from /proc every 20 ms; falls back to killing at the timeout."""
    deadline = time.monotonic() + timeout
    prev = cpu_ticks(svc.proc.pid)
    busy = False
    while time.monotonic() < deadline:
        time.sleep(0.02)
        cur = cpu_ticks(svc.proc.pid)
        if cur - prev >= 2:  # >= 2 clock ticks (20 ms) of CPU in 20 ms: working flat out
            busy = True
            break
        prev = cur
    t = p.kill(svc, signal.SIGKILL, what or f"SIGKILL {svc.name}")
    p.events[-1]["busy"] = busy
    return p.events[-1] | {"t": t}


def kill_while_writing(p: Pipeline, svc: Service, timeout: float = 30.0) -> dict[str, Any]:
    """SIGKILL the sink while it holds DuckDB's write lock (between its BEGIN and the end of
    its COMMIT/CHECKPOINT): detected by a read-only open failing on the lock."""
    import duckdb

    deadline = time.monotonic() + timeout
    caught = False
    while time.monotonic() < deadline:
        try:
            duckdb.connect(str(p.db), read_only=True).close()
        except duckdb.Error as exc:
            if "lock" in str(exc).lower():
                caught = True
                break
        time.sleep(0.003)
    p.kill(svc, signal.SIGKILL, f"SIGKILL {svc.name}" + (" holding the DuckDB write lock" if caught else ""))
    p.events[-1]["in_transaction"] = caught
    return p.events[-1]


def assigned_partitions(svc: Service) -> list[int]:
    m = re.findall(r"partitions assigned: \[([0-9, ]*)\]", svc.text())
    return [int(x) for x in m[-1].split(",") if x.strip()] if m else []
