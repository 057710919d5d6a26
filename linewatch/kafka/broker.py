"""A real Apache Kafka broker (KRaft, single node) that linewatch runs from the Maven Central
jars, for development, the demo and the integration tests.

How it starts: Maven fetches the jars once (``pom.xml`` beside this file), the storage is
formatted with ``kafka.tools.StorageTool format --standalone``, then the JVM runs
``kafka.Kafka server.properties``. It is ready when its log says "Kafka Server started" and an
admin call answers; SIGTERM is a clean stop. Tests and benchmarks take a throwaway one on free
ports from ``temporary_broker()``.

Why not a fake: delivery guarantees, message size limits and consumer-group rebalancing are
what the pipeline relies on; only the real broker proves them.

Layout on disk::

    ~/.cache/linewatch/kafka-<version>/lib/*.jar   jars (BrokerSettings.jars_dir), shared
    <home>/server.properties, log4j2.xml            rendered from linewatch/kafka/
    <home>/data/                                   KRaft metadata + topic logs
    <home>/logs/server.log                         the broker's log (status prints it)
    <home>/broker.out                              JVM stdout/stderr (crashes land here)
    <home>/broker.pid                              pid of the running JVM
    <home>/security/                               secured mode only: CA, broker keystore, one
                                                   SCRAM user per role (linewatch.kafka.security)

Secured mode (``BrokerSettings.secured``, ``linewatch broker start --secured``): the client
listener speaks SASL_SSL only (SCRAM-SHA-512 users written into the storage at format time),
the controller listener takes only the broker's own certificate, and the StandardAuthorizer
denies whatever no ACL grants (``linewatch.kafka.acls``). docs/security.md.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from string import Template

from linewatch.errors import UserError
from linewatch.settings import MAX_MESSAGE_BYTES, BrokerSettings, KafkaSettings

log = logging.getLogger(__name__)

LOG4J_VERSION = {"4.1.1": "2.24.3", "4.1.0": "2.24.3"}
READY_LINE = "Kafka Server started"
_MARKER = ".linewatch-complete"
_MODE_FILE = ".linewatch-mode"  # in data/: "plaintext" or "secured", written at format time


class BrokerError(UserError):
    """The broker could not be installed, started or stopped (one-line reason)."""


def cache_root() -> Path:
    return Path(os.environ.get("LINEWATCH_CACHE", Path.home() / ".cache" / "linewatch"))


def _package_file(name: str) -> str:
    """A data file shipped beside this module in the linewatch.kafka package."""
    return resources.files("linewatch.kafka").joinpath(name).read_text(encoding="utf-8")


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (another process may still take it: callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _kafka_cluster_id() -> str:
    """What ``kafka-storage random-uuid`` prints: a random UUID, base64url, no padding,
    not starting with '-' (Kafka's Uuid.randomUuid), without paying a JVM start for it."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")
        if not cid.startswith("-"):
            return cid


def _parent_death_signal() -> None:  # pragma: no cover - runs in the child before exec
    """prctl(PR_SET_PDEATHSIG, SIGTERM): the kernel stops the broker when its parent dies."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


@dataclass
class BrokerStatus:
    running: bool
    answering: bool
    pid: int | None
    bootstrap_servers: str
    home: Path
    log_file: Path
    jars_installed: bool

    def as_dict(self) -> dict:
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


class Broker:
    """Install, start, stop and inspect the embedded broker described by BrokerSettings."""

    def __init__(self, settings: BrokerSettings, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.settings = settings
        self.max_message_bytes = max_message_bytes
        self.home = Path(settings.home).expanduser()
        self.jars_dir = (
            Path(settings.jars_dir).expanduser()
            if settings.jars_dir
            else cache_root() / f"kafka-{settings.kafka_version}"
        )
        self._proc: subprocess.Popen | None = None  # set when this process started the JVM
        self.secrets_made: list[str] = []  # what the last start made (secured mode: CA, certificate, users)

    # ---- paths ---------------------------------------------------------------------------
    @property
    def lib_dir(self) -> Path:
        return self.jars_dir / "lib"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "server.log"

    @property
    def out_file(self) -> Path:
        return self.home / "broker.out"

    @property
    def pid_file(self) -> Path:
        return self.home / "broker.pid"

    @property
    def properties_file(self) -> Path:
        return self.home / "server.properties"

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    @property
    def secrets(self):
        """This broker's CA, keystore and users (``linewatch.kafka.security.BrokerSecrets``)."""
        from linewatch.kafka.security import BrokerSecrets

        return BrokerSecrets(self.home / "security")

    @property
    def secured(self) -> bool:
        return self.settings.secured

    def kafka_settings(self, role: str | None = None, **kw) -> KafkaSettings:
        """Client settings pointing at this broker; on a secured broker as ``role``'s user
        (default: the broker's own super user), its password by file, the local CA trusted."""
        if self.secured:
            from linewatch.kafka.security import BROKER_ROLE, SCRAM_MECHANISM

            role = role or BROKER_ROLE
            users = self.secrets.users()
            if role not in users:
                raise BrokerError(f"no Kafka user for role {role!r} on this broker (roles: {', '.join(users)})")
            kw = {"security_protocol": "SASL_SSL", "sasl_mechanism": SCRAM_MECHANISM,
                  "sasl_plain_username": users[role], "sasl_password_file": self.secrets.password_file(role),
                  "ssl_cafile": self.secrets.ca_cert, **kw}
        return KafkaSettings(bootstrap_servers=self.bootstrap_servers, max_message_bytes=self.max_message_bytes, **kw)

    # ---- install -------------------------------------------------------------------------
    def installed(self) -> bool:
        return (self.lib_dir / _MARKER).is_file() and any(self.lib_dir.glob("kafka_2.13-*.jar"))

    def install(self, force: bool = False) -> Path:
        """Download the broker jars from Maven Central with Maven (cached: a second call
        returns at once). Safe when several processes install at the same time."""
        if self.installed() and not force:
            return self.lib_dir
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError("Maven (`mvn`) not found; install it (Debian: apt-get install maven) or run scripts/bootstrap.sh")
        if shutil.which("java") is None:
            raise BrokerError("Java not found; install a JRE 17+ (Debian: apt-get install default-jre-headless)")
        version = self.settings.kafka_version
        log4j = LOG4J_VERSION.get(version, "2.24.3")
        self.jars_dir.mkdir(parents=True, exist_ok=True)
        with open(self.jars_dir / ".install.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent installer finishes first
            if self.installed() and not force:
                return self.lib_dir
            with tempfile.TemporaryDirectory(dir=self.jars_dir, prefix=".install-") as tmp:
                pom = Path(tmp) / "pom.xml"
                pom.write_text(_package_file("pom.xml"), encoding="utf-8")
                out = Path(tmp) / "lib"
                cmd = [
                    mvn, "-B", "-q", "-f", str(pom),
                    f"-Dkafka.version={version}", f"-Dlog4j.version={log4j}",
                    f"-Dmaven.repo.local={cache_root() / 'm2'}",
                    "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={out}",
                ]
                log.info("downloading Kafka %s jars from Maven Central into %s", version, self.lib_dir)
                proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
                if proc.returncode != 0 or not any(out.glob("kafka_2.13-*.jar")):
                    detail = " ".join((proc.stdout + proc.stderr).split())[-400:]
                    raise BrokerError(f"Maven could not fetch Kafka {version} jars (exit {proc.returncode}): {detail}")
                (out / _MARKER).write_text(f"kafka {version}\nlog4j {log4j}\n")
                if self.lib_dir.exists():
                    shutil.rmtree(self.lib_dir)
                out.rename(self.lib_dir)
        return self.lib_dir

    # ---- status --------------------------------------------------------------------------
    def _read_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        # the pid must still be *our* JVM (pids are reused after a reboot or crash)
        if _pid_alive(pid) and "kafka.Kafka" in _cmdline(pid) and str(self.properties_file) in _cmdline(pid):
            return pid
        return None

    def _running_listener(self) -> tuple[str, int] | None:
        """host, port of the client listener (PLAINTEXT or SASL_SSL) the running broker was
        started with."""
        try:
            for line in self.properties_file.read_text().splitlines():
                if line.startswith("listeners="):
                    for item in line.split("=", 1)[1].split(","):
                        name, _, address = item.partition("://")
                        if name in ("PLAINTEXT", "SASL_SSL"):
                            host, port = address.rsplit(":", 1)
                            return host, int(port)
        except (OSError, ValueError):
            pass
        return None

    def status(self) -> BrokerStatus:
        """Running (our JVM by pid file) and answering (its port accepts connections); the
        address is the one the running broker was started with, whatever the settings say."""
        pid = self._read_pid()
        host, port = self.settings.host, self.settings.port
        if pid is not None:
            host, port = self._running_listener() or (host, port)
        answering = pid is not None and _port_answers(host, port)
        return BrokerStatus(
            running=pid is not None,
            answering=answering,
            pid=pid,
            bootstrap_servers=f"{host}:{port}",
            home=self.home,
            log_file=self.log_file,
            jars_installed=self.installed(),
        )

    # ---- start ---------------------------------------------------------------------------
    def _java_cmd(self, main: str, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise BrokerError("Java not found; install a JRE 17+ (Debian: apt-get install default-jre-headless)")
        return [
            java,
            f"-Xms128m", f"-Xmx{self.settings.heap_mb}m",
            "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.xml'}",
            f"-Dlinewatch.log.dir={self.log_dir}",
            f"-Dkafka.logs.dir={self.log_dir}",
            "-cp", f"{self.lib_dir}/*",
            main, *args,
        ]

    def _render_config(self) -> list[str]:
        """Write server.properties and log4j2.xml; in secured mode first make whatever secrets
        are missing (returns what was made) and keep the file to its owner (it holds the
        keystore and broker passwords)."""
        s = self.settings
        for d in (self.home, self.data_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        fields = {"host": s.host, "port": s.port, "controller_port": s.controller_port}
        made: list[str] = []
        if self.secured:
            from linewatch.kafka.security import BROKER_ROLE, SCRAM_MECHANISM, default_users

            made = self.secrets.ensure(s.host, default_users())
            self.secrets.write_env_files(self.bootstrap_servers)
            listeners = Template(_package_file("listeners-secured.properties")).substitute(
                **fields, mechanism=SCRAM_MECHANISM, mechanism_lower=SCRAM_MECHANISM.lower(),
                broker_user=self.secrets.users()[BROKER_ROLE], broker_password=self.secrets.password(BROKER_ROLE),
                keystore=self.secrets.keystore, keystore_password=self.secrets.keystore_password(),
                ca_file=self.secrets.ca_cert)
        else:
            listeners = Template(_package_file("listeners-plaintext.properties")).substitute(**fields)
        props = Template(_package_file("server.properties.template")).substitute(
            **fields,
            listeners=listeners.strip(),
            data_dir=self.data_dir,
            max_message_bytes=self.max_message_bytes,
            retention_bytes=1024**3,
        )
        fd = os.open(self.properties_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(props)
        os.chmod(self.properties_file, 0o600)
        (self.home / "log4j2.xml").write_text(_package_file("log4j2.xml"), encoding="utf-8")
        return made

    def _check_mode(self) -> bool:
        """True when the storage is formatted already, in the mode the settings ask for;
        BrokerError when it was formatted the other way (its users and listeners differ)."""
        if not (self.data_dir / "meta.properties").is_file():
            return False
        mode = "secured" if self.secured else "plaintext"
        try:
            formatted = (self.data_dir / _MODE_FILE).read_text().strip()
        except OSError:
            formatted = "plaintext"  # formatted before secured mode existed
        if formatted != mode:
            raise BrokerError(
                f"broker home {self.home} was formatted {formatted}, settings ask for {mode}; "
                f"use another --home or remove {self.data_dir}")
        return True

    def _format_storage(self) -> None:
        """Format the KRaft storage once; a secured broker's SCRAM users are written into its
        first metadata here (``--add-scram``, salted), so they exist before the broker starts."""
        if self._check_mode():
            return
        mode = "secured" if self.secured else "plaintext"
        scram: list[str] = []
        if self.secured:
            from linewatch.kafka.security import scram_format_arg

            for role, user in self.secrets.users().items():
                scram += ["--add-scram", scram_format_arg(user, self.secrets.password(role))]
        cmd = self._java_cmd(
            "kafka.tools.StorageTool", "format", "--standalone", "--ignore-formatted",
            "-t", _kafka_cluster_id(), "-c", str(self.properties_file), *scram,
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            detail = " ".join((proc.stdout + proc.stderr).split())[-400:]
            raise BrokerError(f"formatting {self.data_dir} failed (exit {proc.returncode}): {detail}")
        (self.data_dir / _MODE_FILE).write_text(mode + "\n")

    def start(self, timeout_s: float | None = None, die_with_parent: bool = False) -> BrokerStatus:
        """Start the broker and wait until it is ready (log line + an admin call answers).
        Idempotent: an already running broker for this home is left alone.

        ``die_with_parent`` (Linux): the JVM gets SIGTERM when this process dies, so a test
        run that is killed leaves no broker behind. The CLI leaves it False (a daemon)."""
        s = self.settings
        timeout_s = s.start_timeout_s if timeout_s is None else timeout_s
        current = self.status()
        if current.running:
            from linewatch.kafka.io import wait_for_broker

            wait_for_broker(self.kafka_settings().model_copy(update={"bootstrap_servers": current.bootstrap_servers}),
                            timeout_s)
            return self.status()
        if s.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("broker listens on %s, not loopback: anyone on that network can reach it", s.host)
        if not self.installed():
            self.install()
        for name, port in (("port", s.port), ("controller_port", s.controller_port)):
            if not port_is_free(s.host, port):
                raise BrokerError(
                    f"broker.{name} {s.host}:{port} is already in use by another process; "
                    f"choose another (LINEWATCH_BROKER__{name.upper()})"
                )
        if s.port == s.controller_port:
            raise BrokerError("broker.port and broker.controller_port must differ")
        self._check_mode()  # before anything in the home is rewritten
        self.secrets_made = self._render_config()
        self._format_storage()
        log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        cmd = self._java_cmd("kafka.Kafka", str(self.properties_file))
        with open(self.out_file, "ab") as out:
            self._proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.home, start_new_session=True,  # Ctrl-C in the shell does not kill it
                preexec_fn=_parent_death_signal if die_with_parent else None,
            )
        self.pid_file.write_text(f"{self._proc.pid}\n")
        try:
            self._wait_ready(timeout_s, log_offset)
        except BaseException:
            self.stop()
            raise
        return self.status()

    def _wait_ready(self, timeout_s: float, log_offset: int) -> None:
        from linewatch.kafka.io import wait_for_broker

        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"broker exited with code {self._proc.returncode} while starting; see {self.log_file} "
                    f"and {self.out_file}: {' | '.join(_tail(self.out_file, 5).splitlines()) or _tail(self.log_file, 3)}"
                )
            if self._log_has_ready_line(log_offset):
                break
            if time.monotonic() > deadline:
                raise BrokerError(f"broker not ready within {timeout_s:g}s; see {self.log_file}")
            time.sleep(0.2)
        wait_for_broker(self.kafka_settings(), max(1.0, deadline - time.monotonic()))

    def _log_has_ready_line(self, offset: int) -> bool:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(offset)
                return READY_LINE.encode() in f.read()
        except OSError:
            return False

    # ---- stop ----------------------------------------------------------------------------
    def stop(self, timeout_s: float = 30.0) -> bool:
        """SIGTERM the broker by pid (a clean shutdown), SIGKILL after ``timeout_s``.
        Returns False when no broker was running."""
        pid = self._read_pid()
        if pid is None and self._proc is not None and self._proc.poll() is None:
            pid = self._proc.pid
        if pid is None:
            with contextlib.suppress(OSError):
                self.pid_file.unlink()
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not self._wait_exit(pid, timeout_s):
            log.warning("broker pid %d did not stop within %.0fs; killing it", pid, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_exit(pid, 10.0)
        with contextlib.suppress(OSError):
            self.pid_file.unlink()
        return True

    def _wait_exit(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid:
                if self._proc.poll() is not None:
                    return True
            elif not _pid_alive(pid):
                return True
            time.sleep(0.1)
        return False


def broker_from_settings(settings=None) -> Broker:
    """The Broker for ``Settings().broker`` with the Kafka message limit of the same settings."""
    from linewatch.settings import load_settings

    settings = settings or load_settings()
    return Broker(settings.broker, max_message_bytes=settings.kafka.max_message_bytes)


def start_on_free_ports(home: Path, *, attempts: int = 3, die_with_parent: bool = True,
                        max_message_bytes: int = MAX_MESSAGE_BYTES, **settings) -> Broker:
    """Start a broker in ``home`` on ports the OS says are free; the caller stops it.

    Another process may take such a port before Kafka binds it, so a failed start is retried
    ``attempts`` times with new ports (``home`` emptied in between). ``settings`` go to
    BrokerSettings (e.g. ``heap_mb``, ``start_timeout_s``); ``die_with_parent`` as in
    ``Broker.start``."""
    from linewatch.settings import BrokerSettings

    home = Path(home)
    for attempt in range(1, max(1, attempts) + 1):
        broker = Broker(BrokerSettings(home=home, port=free_port(), controller_port=free_port(), **settings),
                        max_message_bytes=max_message_bytes)
        try:
            broker.start(die_with_parent=die_with_parent)
            return broker
        except Exception as exc:
            broker.stop()
            if attempt >= attempts:
                raise
            log.warning("broker in %s did not start (%s); retrying on other ports", home, exc)
            shutil.rmtree(home, ignore_errors=True)
            home.mkdir(parents=True, exist_ok=True)
    raise AssertionError("unreachable")  # pragma: no cover


def bench_topics(tag: str, frames_partitions: int) -> dict[str, object]:
    """``TopicSettings`` fields for one benchmark run: its own tagged topics, so runs against a
    shared broker never read each other's records."""
    return {"frames": f"bench-frames-{tag}", "results": f"bench-results-{tag}", "dlq": f"bench-dlq-{tag}",
            "alerts": f"bench-alerts-{tag}", "profiles": f"bench-profiles-{tag}",
            "frames_partitions": frames_partitions, "results_partitions": 1}


@contextlib.contextmanager
def temporary_broker(home: Path | None = None, *, stop_timeout_s: float = 30.0, **kw) -> Iterator[Broker]:
    """A throwaway broker on free ports, for tests and benchmarks: yields the started Broker
    (its address: ``broker.bootstrap_servers``) and stops it on exit.

    ``home`` None: a fresh temporary directory, removed on exit; a given ``home`` is left to
    its owner. ``kw`` as in ``start_on_free_ports`` (``attempts``, ``die_with_parent``,
    ``max_message_bytes`` and BrokerSettings fields such as ``heap_mb``)."""
    with contextlib.ExitStack() as stack:
        if home is None:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lw-broker-")))
        broker = start_on_free_ports(home, **kw)
        try:
            yield broker
        finally:
            broker.stop(timeout_s=stop_timeout_s)
