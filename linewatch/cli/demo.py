"""`linewatch demo`: the synthetic production line end to end on one machine.

Every service runs as its own process through the same `linewatch` subcommands a plant
would run (broker, sink, workers, producers, dashboard), configured only through
``LINEWATCH_*`` environment variables, so the demo exercises the deployment path rather than
an in-process shortcut. The demo owns what it starts and stops all of it on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from linewatch.settings import Settings

log = logging.getLogger("linewatch.demo")

DEFAULT_PRODUCTS = ("cap", "brick")
# PaDiM options for the demo's profiles. Measured on a loaded 2-core box (128 px model,
# 256 px camera frames, 60 normal training images): ~30 s to fit and calibrate a product,
# 0 false alarms on 67 fresh normal frames, 10 of 13 fresh defects found. neighborhood=3 pools
# each position's 3x3 neighbours into its Gaussian (9x the samples): with the default
# (1, d=64) 60 images overfit and fresh normal frames score above the threshold.
DEMO_PADIM_OPTIONS: dict = {"neighborhood": 3, "d": 32}


@dataclass
class DemoConfig:
    home: Path
    products: tuple[str, ...] = DEFAULT_PRODUCTS
    cameras_per_product: int = 2
    fps: float = 2.0
    frame_size: int = 256
    defect_rate: float = 0.25
    workers: int = 1
    model_kind: str = "padim"
    input_size: int = 128
    n_train: int = 60
    n_test_good: int = 10
    n_test_per_category: int = 6
    model_options: dict | None = None  # None: DEMO_PADIM_OPTIONS for padim, the family's defaults otherwise
    report: bool = True
    seed: int = 0
    kafka_port: int = 9092
    controller_port: int = 9093
    dashboard_port: int = 8501
    duration_s: float | None = None
    status_every_s: float = 10.0
    drain_s: float = 20.0
    open_browser: bool = False

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def registry_dir(self) -> Path:
        return self.home / "profiles"

    @property
    def db_path(self) -> Path:
        return self.home / "linewatch.duckdb"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"


@dataclass
class DemoSummary:
    frames_stored: int = 0
    defects: int = 0
    dlq: int = 0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    frames_per_s: float | None = None
    dashboard_url: str = ""
    processes: dict[str, int] = field(default_factory=dict)


def _env(cfg: DemoConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "LINEWATCH_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{cfg.kafka_port}",
        "LINEWATCH_BROKER__HOME": str(cfg.home / "broker"),
        "LINEWATCH_BROKER__PORT": str(cfg.kafka_port),
        "LINEWATCH_BROKER__CONTROLLER_PORT": str(cfg.controller_port),
        "LINEWATCH_STORAGE__DB_PATH": str(cfg.db_path),
        "LINEWATCH_STORAGE__REGISTRY_DIR": str(cfg.registry_dir),
        "LINEWATCH_DASHBOARD__PORT": str(cfg.dashboard_port),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def settings_for(cfg: DemoConfig) -> Settings:
    return Settings(
        kafka={"bootstrap_servers": f"127.0.0.1:{cfg.kafka_port}"},
        broker={"home": cfg.home / "broker", "port": cfg.kafka_port, "controller_port": cfg.controller_port},
        storage={"db_path": cfg.db_path, "registry_dir": cfg.registry_dir},
        dashboard={"port": cfg.dashboard_port},
    )


def prepare_profiles(cfg: DemoConfig, progress: bool = True) -> dict[str, int]:
    """Generate the synthetic line and publish a calibrated profile per product (once).

    Calibration runs as ``linewatch calibrate run`` in its own process, like every other service
    of the demo: the demo is a composition of the subcommands a plant runs, not a second path.
    """
    import json

    from linewatch.errors import UserError
    from linewatch.profiles import Registry
    from linewatch.synth import generate_dataset

    missing = [p for p in cfg.products if not (cfg.data_dir / p / "train").is_dir()]
    if missing:
        print(f"demo: generating the synthetic line for {', '.join(missing)} in {cfg.data_dir}", flush=True)
        # at camera resolution: calibration then resizes to the model size as the worker does
        generate_dataset(cfg.data_dir, products=missing, size=cfg.frame_size, seed=cfg.seed,
                         n_train=cfg.n_train, n_test_good=cfg.n_test_good,
                         n_test_per_category=cfg.n_test_per_category, progress=progress)
    options = cfg.model_options
    if options is None and cfg.model_kind == "padim":
        options = DEMO_PADIM_OPTIONS
    registry = Registry(cfg.registry_dir)
    versions: dict[str, int] = {}
    for product in cfg.products:
        current = registry.current_version(product)
        if current is None:
            print(f"demo: fitting and calibrating {cfg.model_kind} for {product} "
                  "(normal images only; threshold from a few anomalous validation images)", flush=True)
            t0 = time.perf_counter()
            report_dir = cfg.home / "reports" / product if cfg.report else None
            cmd = [sys.executable, "-m", "linewatch.cli", "calibrate", "run", "--dataset", str(cfg.data_dir),
                   "--product", product, "--registry", str(cfg.registry_dir), "--model-kind", cfg.model_kind,
                   "--input-size", str(cfg.input_size), "--seed", str(cfg.seed),
                   *(a for k, v in (options or {}).items() for a in ("--option", f"{k}={json.dumps(v)}")),
                   *(("--report", str(report_dir)) if report_dir else ()), *(() if progress else ("-q",))]
            done = subprocess.run(cmd, env=_env(cfg), stdin=subprocess.DEVNULL, stdout=None if progress else subprocess.PIPE,
                                  stderr=None if progress else subprocess.PIPE, text=True)
            if done.returncode != 0:
                why = (done.stderr or done.stdout or "").strip().splitlines()[-1:] or ["see the output above"]
                raise UserError(f"demo: `linewatch calibrate run` for {product} failed (exit "
                                f"{done.returncode}): {why[0]}")
            profile = registry.read_profile(product)
            current = profile.version
            print(f"demo: {product} v{current}: threshold {profile.threshold:.4g} "
                  f"({profile.threshold_method}) in {time.perf_counter() - t0:.0f} s"
                  + (f"; report in {report_dir}" if report_dir else ""), flush=True)
        versions[product] = current
    return versions


class _Procs:
    """Child processes started by the demo, stopped in reverse order."""

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.env = _env(cfg)
        self.items: list[tuple[str, subprocess.Popen, object]] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        self.cfg.logs_dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.cfg.logs_dir / f"{name}.log", "ab")
        cmd = [sys.executable, "-m", "linewatch.cli", *args]
        proc = subprocess.Popen(cmd, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.items.append((name, proc, logf))
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(args))
        return proc

    def dead(self) -> list[tuple[str, int]]:
        return [(n, p.returncode) for n, p, _ in self.items if p.poll() is not None]

    def stop(self, names: tuple[str, ...] | None = None, timeout_s: float = 20.0) -> None:
        for name, proc, logf in reversed(self.items):
            if names is not None and not name.startswith(names):
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc, logf in reversed(self.items):
            if names is not None and not name.startswith(names):
                continue
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", name, timeout_s)
                proc.kill()
                proc.wait()
            logf.close()


def _wait_http(url: str, timeout_s: float, should_stop=lambda: False) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not should_stop():
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def summarize(db_path: Path, since_ms: int | None = None) -> DemoSummary:
    """Figures a person wants from the run, read back from DuckDB (read-only, retrying)."""
    from linewatch.store import reading

    summary = DemoSummary()
    if not db_path.exists():
        return summary
    since = int(since_ms or 0)  # 0 = the whole database
    with reading(db_path) as con:
        row = con.execute(
            """SELECT count(*), count(*) FILTER (WHERE verdict = 'defect'),
                      quantile_cont(stored_ts_ms - capture_ts_ms, 0.5),
                      quantile_cont(stored_ts_ms - capture_ts_ms, 0.99),
                      min(stored_ts_ms), max(stored_ts_ms)
               FROM inspections WHERE capture_ts_ms >= ?""", [since]).fetchone()
        try:
            dlq = (con.execute("SELECT count(*) FROM dlq_events WHERE stored_ts_ms >= ?", [since]) if since
                   else con.execute("SELECT count(*) FROM dlq_events"))
            summary.dlq = int(dlq.fetchone()[0])
        except Exception:  # older schema without DLQ table
            summary.dlq = 0
    n, defects, p50, p99, t0, t1 = row
    summary.frames_stored, summary.defects = int(n or 0), int(defects or 0)
    summary.latency_p50_ms = None if p50 is None else float(p50)
    summary.latency_p99_ms = None if p99 is None else float(p99)
    if n and t1 and t0 and t1 > t0:
        summary.frames_per_s = (n - 1) * 1000.0 / (t1 - t0)
    return summary


def _wait_group(settings: Settings, group_id: str, members: int, timeout_s: float,
                should_stop=lambda: False) -> bool:
    """Wait until the consumer group ``group_id`` is Stable with ``members`` members, so the
    cameras start once inspection is ready (the first frames would otherwise queue while the
    workers load their profiles, and the latency figures would measure start-up)."""
    from linewatch.kafka.io import make_admin

    deadline = time.monotonic() + timeout_s
    admin = None
    try:
        while time.monotonic() < deadline and not should_stop():
            try:
                admin = admin or make_admin(settings, timeout_s=10)
                info = admin.describe_groups([group_id]).get(group_id) or {}
                state = str(info.get("group_state") or info.get("state") or "")
                if "stable" in state.lower() and len(info.get("members") or ()) >= members:
                    return True
            except Exception as exc:  # not up yet: the group appears when the workers join
                log.debug("group %s not ready: %s", group_id, exc)
            time.sleep(1.0)
        return False
    finally:
        if admin is not None:
            try:
                admin.close()
            except Exception:  # pragma: no cover - best effort
                pass


def _drain(cfg: DemoConfig, since_ms: int) -> None:
    """Wait (bounded by ``cfg.drain_s``) until the stored row count stops growing."""
    deadline = time.monotonic() + cfg.drain_s
    last, still_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        try:
            n = summarize(cfg.db_path, since_ms).frames_stored
        except Exception:  # never let the drain wait stop the shutdown
            return
        if n != last:
            last, still_since = n, time.monotonic()
        elif time.monotonic() - still_since >= 3.0:
            return
        time.sleep(0.5)


def run_demo(cfg: DemoConfig, stop_event: threading.Event | None = None) -> DemoSummary:
    """Run the whole line until Ctrl-C/SIGTERM, ``stop_event`` or ``cfg.duration_s``."""
    from linewatch.kafka.broker import broker_from_settings, port_is_free
    from linewatch.errors import UserError
    from linewatch.kafka.io import ensure_topics

    stop_event = stop_event or threading.Event()
    if not port_is_free("127.0.0.1", cfg.dashboard_port):
        raise UserError(f"dashboard port 127.0.0.1:{cfg.dashboard_port} is already in use; choose another with --port")
    cfg.home.mkdir(parents=True, exist_ok=True)
    settings = settings_for(cfg)
    prepare_profiles(cfg)

    broker = broker_from_settings(settings)
    was_running = broker.status().running
    print(f"demo: starting Kafka {settings.broker.kafka_version} on 127.0.0.1:{cfg.kafka_port} "
          f"(log: {broker.log_file})", flush=True)
    # die_with_parent: a demo that is killed outright (not Ctrl-C) leaves no JVM behind
    broker.start(die_with_parent=not was_running)

    procs = _Procs(cfg)
    summary = DemoSummary(dashboard_url=f"http://127.0.0.1:{cfg.dashboard_port}")
    started_ms = int(time.time() * 1000)
    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.signal(sig, lambda *_: stop_event.set())
    try:
        ensure_topics(settings)
        procs.start("sink", ["sink"])
        for i in range(cfg.workers):
            procs.start(f"worker-{i + 1}", ["work", "--worker-id", f"demo-worker-{i + 1}"])
        procs.start("dashboard", ["dashboard"])

        def should_stop() -> bool:  # Ctrl-C, or a service died while we wait for it
            return stop_event.is_set() or bool(procs.dead())

        if not _wait_group(settings, settings.worker.group_id, cfg.workers, 120, should_stop):
            print(f"demo: the workers have not joined their consumer group yet; see {cfg.logs_dir}", flush=True)
        for product in cfg.products:
            cams = [f"{product}-cam-{j + 1}" for j in range(cfg.cameras_per_product)]
            args = ["produce", "--source", f"synthetic:{product}", "--fps", str(cfg.fps),
                    "--size", str(cfg.frame_size), "--defect-rate", str(cfg.defect_rate),
                    "--seed", str(cfg.seed + 100), "--line", "line-1"]
            for cam in cams:
                args += ["--camera", cam]
            procs.start(f"producer-{product}", args)
        if _wait_http(f"{summary.dashboard_url}/_stcore/health", 60, should_stop):
            print(f"demo: dashboard at {summary.dashboard_url}  (Ctrl-C stops everything)", flush=True)
        else:
            print(f"demo: the dashboard did not come up; see {cfg.logs_dir / 'dashboard.log'}", flush=True)
        print(f"demo: {len(cfg.products)} products x {cfg.cameras_per_product} cameras at {cfg.fps:g} fps, "
              f"{cfg.workers} worker(s); logs in {cfg.logs_dir}", flush=True)
        summary.processes = {name: p.pid for name, p, _ in procs.items}
        deadline = None if cfg.duration_s is None else time.monotonic() + cfg.duration_s
        next_status = time.monotonic() + cfg.status_every_s
        while not stop_event.wait(0.5):
            if deadline is not None and time.monotonic() >= deadline:
                break
            dead = procs.dead()
            if dead:
                name, rc = dead[0]
                print(f"demo: {name} exited with code {rc}; see {cfg.logs_dir / (name + '.log')}; stopping",
                      flush=True)
                break
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + cfg.status_every_s
                try:
                    s = summarize(cfg.db_path, started_ms)
                    print(f"demo: {s.frames_stored} frames stored, {s.defects} defects, {s.dlq} in DLQ, "
                          f"{s.frames_per_s or 0:.1f} frames/s, latency p50 {s.latency_p50_ms or 0:.0f} ms "
                          f"p99 {s.latency_p99_ms or 0:.0f} ms", flush=True)
                except Exception as exc:  # the status line must never stop the demo
                    log.debug("status read failed: %s", exc)
    finally:
        print("demo: stopping producers, workers, sink, dashboard ...", flush=True)
        procs.stop(("producer",))
        _drain(cfg, started_ms)  # let workers and sink store the frames already sent
        procs.stop()
        if not was_running:
            broker.stop()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    final = summarize(cfg.db_path, started_ms)
    final.dashboard_url, final.processes = summary.dashboard_url, summary.processes
    print(f"demo: stopped. {final.frames_stored} frames stored ({final.defects} defects, {final.dlq} DLQ); "
          f"sustained {final.frames_per_s or 0:.1f} frames/s; capture->DuckDB latency "
          f"p50 {final.latency_p50_ms or 0:.0f} ms, p99 {final.latency_p99_ms or 0:.0f} ms", flush=True)
    return final


# -- the `linewatch demo` subcommand ---------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the synthetic production line end to end (broker, producers, workers, sink, dashboard)",
        description="Generate the synthetic line, fit and calibrate a profile per product (first run "
        "only), start a real Kafka broker, the sink, workers, synthetic camera producers and the "
        "dashboard, print the dashboard URL, and stop everything on Ctrl-C. State lives in --home; "
        "a second run reuses the data and profiles.",
    )
    p.add_argument("--home", type=Path, default=Path.home() / ".linewatch" / "demo",
                   help="folder for data, profiles, DuckDB, broker and logs (default ~/.linewatch/demo)")
    p.add_argument("--products", default="cap,brick",
                   help="synthetic products, comma-separated (default cap,brick: one object on a backdrop, one texture)")
    p.add_argument("--cameras", type=int, default=2, help="cameras per product (default 2)")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second per camera (default 2)")
    p.add_argument("--frame-size", type=int, default=256, help="camera frame size in pixels (default 256)")
    p.add_argument("--input-size", type=int, default=128,
                   help="model input size for newly fitted profiles (default 128)")
    p.add_argument("--train-images", type=int, default=60,
                   help="defect-free training images per product for newly fitted profiles (default 60)")
    p.add_argument("--defect-rate", type=float, default=0.25, help="share of defective frames (default 0.25)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--model", default="padim", help="model family for new profiles (default padim)")
    p.add_argument("--port", type=int, default=8501, help="dashboard port on 127.0.0.1 (default 8501)")
    p.add_argument("--kafka-port", type=int, default=9092, help="Kafka client port (default 9092)")
    p.add_argument("--controller-port", type=int, default=9093, help="KRaft controller port (default 9093)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: run until Ctrl-C)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic line and cameras (default 0)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from linewatch.errors import UserError

    products = tuple(p.strip() for p in args.products.split(",") if p.strip())
    if not products:
        raise UserError("--products: give at least one product")
    checks = [("--cameras", args.cameras >= 1, "must be at least 1"),
              ("--workers", args.workers >= 1, "must be at least 1"),
              ("--fps", args.fps > 0, "must be greater than 0"),
              ("--defect-rate", 0.0 <= args.defect_rate <= 1.0, "must be within 0..1"),
              ("--frame-size", 64 <= args.frame_size <= 2048, "must be within 64..2048"),
              ("--input-size", 32 <= args.input_size <= 1024, "must be within 32..1024"),
              ("--train-images", args.train_images >= 2, "must be at least 2"),
              ("--duration", args.duration is None or args.duration > 0, "must be greater than 0"),
              ("--port", len({args.port, args.kafka_port, args.controller_port}) == 3,
               "--port, --kafka-port and --controller-port must differ")]
    for flag, ok, why in checks:
        if not ok:
            raise UserError(f"{flag}: {why}")
    cfg = DemoConfig(home=args.home.expanduser(), products=products, cameras_per_product=args.cameras,
                     fps=args.fps, frame_size=args.frame_size, defect_rate=args.defect_rate,
                     input_size=args.input_size, n_train=args.train_images,
                     workers=args.workers, model_kind=args.model, dashboard_port=args.port,
                     kafka_port=args.kafka_port, controller_port=args.controller_port,
                     duration_s=args.duration, seed=args.seed)
    run_demo(cfg)
    return 0
