"""docker/ without a Docker engine: the compose file parses and validates against the Compose
specification, every image runs a real ``linewatch`` subcommand, every LINEWATCH_* variable is
a field the settings read (pydantic-settings silently ignores a misspelt nested one, so only
this test catches it), the Dockerfiles are non-root, pinned and health-checked, and the
health-check script itself works against real sockets and processes.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from linewatch.cli import build_parser
from linewatch.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = {"Dockerfile": DOCKER / "Dockerfile", "Dockerfile.gpu": DOCKER / "Dockerfile.gpu"}
LINEWATCH_SERVICES = {"acl-init", "topic-init", "producer", "worker", "worker-cpu", "sink", "dashboard"}

sys.path.insert(0, str(DOCKER))
import healthcheck  # noqa: E402  (docker/healthcheck.py, stdlib only)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def dotenv_defaults() -> dict[str, str]:
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(DOCKER / ".env").items() if v is not None}


_VAR = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\})")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: ${VAR}, ${VAR:-default}, ${VAR-default}, $$ (a literal $)."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg") or ""
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return arg if value is None else value
        if op in (":?", "?"):
            assert value, f"compose requires ${name}: {arg}"
            return value
        return value or ""

    return _VAR.sub(sub, text)


@pytest.fixture(scope="module")
def compose_text() -> str:
    return interpolate(COMPOSE.read_text(), dotenv_defaults())


@pytest.fixture(scope="module")
def compose(compose_text) -> dict:
    return yaml.safe_load(compose_text)  # safe_load resolves the << merge keys, as compose does


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def settings_field_names() -> set[str]:
    """Every env var name Settings reads: LINEWATCH_<SECTION>__<FIELD> for each nested field."""
    names = set()
    prefix = Settings.model_config["env_prefix"]
    delim = Settings.model_config["env_nested_delimiter"]

    def walk(model, path):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, path + [name])
            else:
                names.add((prefix + delim.join(path + [name])).upper())

    walk(Settings, [])
    return names


def settings_module_env_vars() -> set[str]:
    """Top-level variables settings.py reads itself (LINEWATCH_HOME, LINEWATCH_CONFIG)."""
    import linewatch.settings as mod

    return set(re.findall(r"os\.environ\.get\(\s*[\"'](LINEWATCH_[A-Z_]+)[\"']", Path(mod.__file__).read_text()))


def dockerfile_stages(path: Path) -> dict[str, dict]:
    """Stages of a Dockerfile (parsed by BuildKit's own parser) with inherited settings resolved."""
    dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile (dev extra)")
    args: dict[str, str] = {}
    stages: dict[str, dict] = {}
    current: dict | None = None
    for cmd in dockerfile.parse_file(str(path)):
        if cmd.cmd == "ARG" and current is None:
            key, _, default = cmd.value[0].partition("=")
            args[key] = default
        elif cmd.cmd == "FROM":
            base = interpolate(cmd.value[0], args)
            name = cmd.value[2] if len(cmd.value) > 2 and cmd.value[1].upper() == "AS" else base
            parent = stages.get(base)
            current = {"name": name, "base": parent["base"] if parent else base, "env": {},
                       "user": None, "healthcheck": None, "entrypoint": None, "cmd": None}
            if parent:
                for key in ("user", "healthcheck", "entrypoint", "cmd"):
                    current[key] = parent[key]
                current["env"] = dict(parent["env"])
            stages[name] = current
        elif current is not None:
            if cmd.cmd == "ENV":
                current["env"].update(zip(cmd.value[::2], cmd.value[1::2]))
            elif cmd.cmd == "USER":
                current["user"] = cmd.value[0]
            elif cmd.cmd == "HEALTHCHECK":
                current["healthcheck"] = list(cmd.value)
            elif cmd.cmd == "ENTRYPOINT":
                current["entrypoint"] = list(cmd.value)
                current["cmd"] = None  # as Docker does: a new ENTRYPOINT resets an inherited CMD
            elif cmd.cmd == "CMD":
                current["cmd"] = list(cmd.value)
    return stages


def final_targets() -> dict[str, dict]:
    """The images compose builds: (dockerfile, target) -> resolved stage."""
    out = {}
    for name, path in DOCKERFILES.items():
        stages = dockerfile_stages(path)
        for stage in stages.values():
            if stage["healthcheck"] is not None or stage["name"] == list(stages)[-1]:
                out[f"{name}:{stage['name']}"] = stage
    return out


def assert_real_subcommand(argv: list[str]) -> None:
    assert argv, "no command"
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`linewatch {' '.join(argv)}` is not a valid command line (argparse exit {exc.code})")
    assert callable(getattr(args, "func", None)), f"`linewatch {' '.join(argv)}` selects no handler"


# ---------------------------------------------------------------------------------------------
# the compose file
# ---------------------------------------------------------------------------------------------
def test_compose_validates_against_the_compose_spec(compose_text):
    """Strict parse by the compose_spec crate (unknown keys, bad durations, bad conditions and
    undefined networks/volumes are errors); plus `docker compose config` where a client exists."""
    compose_spec = pytest.importorskip("compose_spec", reason="pip install compose-spec (dev extra)")
    parsed = compose_spec.PyOptions(apply_merge=True).from_yaml(compose_text)
    parsed.validate()
    assert set(parsed.service_names()) == LINEWATCH_SERVICES | {"kafka"}

    for cli in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cli[0]) and subprocess.run([*cli, "version"], capture_output=True).returncode == 0:
            proc = subprocess.run([*cli, "-f", str(COMPOSE), "--profile", "kafka", "--profile", "gpu",
                                   "--profile", "cpu", "config", "-q"], capture_output=True, text=True,
                                  cwd=DOCKER)
            assert proc.returncode == 0, proc.stderr


def test_compose_rejects_what_it_should(compose_text):
    """The validator is not a rubber stamp: a misspelt key and a bad duration fail."""
    compose_spec = pytest.importorskip("compose_spec")
    for bad in (compose_text.replace("restart: unless-stopped", "restrat: unless-stopped", 1),
                compose_text.replace("interval: 10s", "interval: ten seconds", 1)):
        with pytest.raises(ValueError):
            compose_spec.PyOptions(apply_merge=True).from_yaml(bad).validate()


def test_kafka_service_is_official_4_1_kraft(compose):
    kafka = compose["services"]["kafka"]
    assert re.fullmatch(r"apache/kafka:4\.1\.\d+", kafka["image"]), kafka["image"]
    env = env_of(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not any("ZOOKEEPER" in k for k in env)
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"  # topics are created explicitly
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= 10 * 1024 * 1024
    assert int(env["KAFKA_REPLICA_FETCH_MAX_BYTES"]) >= 10 * 1024 * 1024
    assert any(v.endswith(":" + env["KAFKA_LOG_DIRS"]) for v in kafka["volumes"])
    assert "healthcheck" in kafka


def test_topic_init_is_one_shot_and_gates_the_pipeline(compose):
    services = compose["services"]
    init = services["topic-init"]
    assert init["command"][:2] == ["broker", "topics"]
    assert init["restart"] == "no"
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert init["depends_on"]["kafka"]["required"] is False  # an external cluster works too
    for name in ("producer", "worker", "worker-cpu", "sink"):
        assert services[name]["depends_on"]["topic-init"]["condition"] == "service_completed_successfully"


def test_secured_profile_runs_each_service_as_its_role(compose):
    """Profile "secured" (docs/security.md): acl-init grants the role ACLs before topic-init
    creates the topics; every Kafka client service reads kafka.env plus its own role's file."""
    services = compose["services"]
    acl = services["acl-init"]
    assert acl["profiles"] == ["secured"] and acl["command"] == ["broker", "acls"] and acl["restart"] == "no"
    gate = services["topic-init"]["depends_on"]["acl-init"]
    assert gate == {"condition": "service_completed_successfully", "required": False}
    roles = {"acl-init": "acl-admin", "topic-init": "admin", "producer": "producer", "worker": "worker",
             "worker-cpu": "worker", "sink": "sink"}
    for name, role in roles.items():
        files = [e["path"] for e in services[name]["env_file"]]
        assert files == ["./kafka.env", f"./kafka-{role}.env"], name
        assert all(e["required"] is False for e in services[name]["env_file"])
    ignored = (DOCKER / ".gitignore").read_text().split()
    assert {"kafka.env", "kafka-*.env", "secrets/"} <= set(ignored)


def test_gpu_reserved_for_the_worker_only(compose):
    services = compose["services"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    for name, svc in services.items():
        if name != "worker":
            assert "devices" not in str(svc.get("deploy", {})), f"{name} reserves a device"


@pytest.mark.parametrize("name", ["worker", "worker-cpu"])
def test_workers_scale(compose, name):
    """`--scale worker=N` needs no fixed container name and no fixed host port."""
    svc = compose["services"][name]
    assert "container_name" not in svc
    assert "ports" not in svc
    assert env_of(svc)["LINEWATCH_WORKER__METRICS_PORT"] in {p.split("/")[0] for p in svc["expose"]}


def test_volumes_for_duckdb_and_profile_registry(compose):
    services = compose["services"]
    env = env_of(services["sink"])
    db_dir = str(Path(env["LINEWATCH_STORAGE__DB_PATH"]).parent)
    registry = env["LINEWATCH_STORAGE__REGISTRY_DIR"]

    def mounts(svc):
        return {v.split(":")[1]: v.split(":")[0] for v in services[svc].get("volumes", [])}

    assert mounts("sink")[db_dir] == "duckdb" and mounts("dashboard")[db_dir] == "duckdb"
    for svc in ("worker", "worker-cpu"):
        assert mounts(svc)[registry] == "profiles"
        assert db_dir not in mounts(svc)  # DuckDB has one writer: the sink; workers never open it
    assert {"duckdb", "profiles"} <= set(compose["volumes"])


def test_services_bind_all_interfaces_inside_containers(compose):
    services = compose["services"]
    for name in ("worker", "worker-cpu"):
        assert env_of(services[name])["LINEWATCH_WORKER__METRICS_HOST"] == "0.0.0.0"
    assert env_of(services["dashboard"])["LINEWATCH_DASHBOARD__HOST"] == "0.0.0.0"
    # ... while the defaults outside containers stay on loopback
    assert Settings().worker.metrics_host == "127.0.0.1" and Settings().dashboard.host == "127.0.0.1"


def test_every_linewatch_env_var_is_a_settings_field(compose):
    known = settings_field_names() | settings_module_env_vars()
    assert {"LINEWATCH_KAFKA__BOOTSTRAP_SERVERS", "LINEWATCH_STORAGE__DB_PATH",
            "LINEWATCH_WORKER__METRICS_PORT"} <= known  # the walk itself works
    used: dict[str, str] = {}
    for name, svc in compose["services"].items():
        for key in env_of(svc):
            if key.startswith("LINEWATCH_"):
                used[key] = f"compose service {name}"
    for key in dotenv_defaults():
        if key.startswith("LINEWATCH_"):
            used[key] = "docker/.env"
    for fname, path in DOCKERFILES.items():
        for stage in dockerfile_stages(path).values():
            for key in stage["env"]:
                if key.startswith("LINEWATCH_"):
                    used[key] = f"{fname} stage {stage['name']}"
    for key in re.findall(r"^\s*(LINEWATCH_[A-Z0-9_]+)=", (DOCKER / "README.md").read_text(), re.M):
        used[key] = "docker/README.md"
    unknown = {k: where for k, where in used.items() if k not in known}
    assert not unknown, f"not read by linewatch.settings: {unknown}"
    assert len(used) >= 10


@pytest.mark.parametrize("name", sorted(LINEWATCH_SERVICES))
def test_service_env_loads_into_settings(compose, name, monkeypatch):
    """The values (not just the names) validate: ports are ints, paths are paths, ..."""
    svc = compose["services"][name]
    for key, value in env_of(svc).items():
        if key.startswith("LINEWATCH_"):
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.kafka.bootstrap_servers == env_of(svc)["LINEWATCH_KAFKA__BOOTSTRAP_SERVERS"]
    assert str(settings.storage.db_path) == "/data/linewatch.duckdb"
    assert str(settings.storage.registry_dir) == "/profiles"
    if name.startswith("worker"):
        assert settings.worker.metrics_port == 9400 and settings.worker.metrics_host == "0.0.0.0"


@pytest.mark.parametrize("name", sorted(LINEWATCH_SERVICES))
def test_service_command_is_a_real_subcommand(compose, name):
    svc = compose["services"][name]
    assert "entrypoint" not in svc  # the images' ENTRYPOINT is `linewatch`
    assert_real_subcommand(list(svc["command"]))


def test_services_use_the_dockerfile_targets(compose):
    targets = final_targets()
    for name in LINEWATCH_SERVICES:
        build = compose["services"][name]["build"]
        dockerfile = Path(build["dockerfile"]).name
        stages = dockerfile_stages(DOCKERFILES[dockerfile])
        target = build.get("target", list(stages)[-1])
        assert f"{dockerfile}:{target}" in targets, f"{name}: {dockerfile} has no final target {target}"
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKERFILES[dockerfile]


# ---------------------------------------------------------------------------------------------
# the Dockerfiles
# ---------------------------------------------------------------------------------------------
def test_final_images_cover_every_service():
    names = {key.split(":")[1] for key in final_targets()}
    assert names == {"producer", "worker-cpu", "sink", "dashboard", "worker-gpu"}


@pytest.mark.parametrize("target", ["Dockerfile:producer", "Dockerfile:worker-cpu", "Dockerfile:sink",
                                    "Dockerfile:dashboard", "Dockerfile.gpu:worker-gpu"])
def test_image_is_nonroot_pinned_healthchecked_and_runs_linewatch(target):
    stage = final_targets()[target]
    assert stage["user"] not in (None, "root", "0", "0:0"), f"{target} runs as root"
    base = stage["base"]
    image, _, tag = base.rpartition(":")
    assert image and re.search(r"\d", tag) and tag != "latest", f"{target}: base {base!r} is not pinned"
    if target.startswith("Dockerfile.gpu"):
        assert image == "nvcr.io/nvidia/tensorrt", base
    assert stage["healthcheck"] and stage["healthcheck"][0] == "CMD", f"{target}: no HEALTHCHECK"
    assert stage["entrypoint"] == ["linewatch"]
    assert_real_subcommand(stage["cmd"])


def test_gpu_image_installs_the_gpu_extra():
    text = DOCKERFILES["Dockerfile.gpu"].read_text()
    assert '".[gpu]"' in text
    assert "--system-site-packages" in text  # the base image's TensorRT satisfies tensorrt<11


def test_constraints_pin_every_runtime_dependency():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            spec = list(req.specifier)
            assert len(spec) == 1 and spec[0].operator == "==", f"constraints.txt: {line} is not pinned"
            pins[canonicalize_name(req.name)] = spec[0].version
    for dep in deps:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"docker/constraints.txt does not pin {req.name} (run docker/update-constraints.sh)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} violates {dep}"


def test_images_carry_no_model_assets():
    """Profiles (weights) come from the registry volume; nothing pickled is baked in."""
    for path in [*DOCKERFILES.values(), DOCKER / "Dockerfile.dockerignore"]:
        text = path.read_text()
        assert not re.search(r"\.(pt|pth|pkl|pickle|ckpt|safetensors|onnx|engine)\b", text), path
        assert "pickle" not in text.lower().replace("unpickled", ""), path
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[0].strip() == "**" or "**" in ignore  # allow-list: only the sources get in
    assert (DOCKER / "Dockerfile.gpu.dockerignore").read_text() == (DOCKER / "Dockerfile.dockerignore").read_text()


# ---------------------------------------------------------------------------------------------
# docker/healthcheck.py, against real sockets and processes
# ---------------------------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200 if self.path == "/ok" else 503)
        self.end_headers()
        self.wfile.write(b"x")

    def log_message(self, *args):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthcheck_http():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert healthcheck.main(["http", f"http://127.0.0.1:{port}/ok"]) == 0
        assert healthcheck.main(["http", f"http://127.0.0.1:{port}/bad"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    assert healthcheck.main(["http", f"http://127.0.0.1:{_free_port()}/ok"]) == 1


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_healthcheck_process_and_kafka(monkeypatch):
    import uuid

    sub = f"probe-{uuid.uuid4().hex[:8]}"  # unique: other sessions may run a real `linewatch sink` here
    assert healthcheck.find_process(sub) is None
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "linewatch", sub])
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        deadline = time.monotonic() + 10  # right after fork the child still shows the parent's cmdline
        while healthcheck.find_process(sub) != proc.pid and time.monotonic() < deadline:
            time.sleep(0.05)
        assert healthcheck.find_process(sub) == proc.pid
        monkeypatch.setenv("LINEWATCH_KAFKA__BOOTSTRAP_SERVERS",
                           f"127.0.0.1:{_free_port()},127.0.0.1:{listener.getsockname()[1]}")
        assert healthcheck.main(["process", sub, "--kafka"]) == 0
        monkeypatch.setenv("LINEWATCH_KAFKA__BOOTSTRAP_SERVERS", f"127.0.0.1:{_free_port()}")
        assert healthcheck.main(["process", sub, "--kafka"]) == 1
        assert healthcheck.main(["process", sub]) == 0
    finally:
        listener.close()
        proc.terminate()
        proc.wait(timeout=10)
    assert healthcheck.main(["process", sub]) == 1


def test_readme_linewatch_commands_parse():
    """The `docker compose run ... worker-cpu <linewatch args>` lines a plant engineer copies."""
    import shlex

    text = (DOCKER / "README.md").read_text().replace("\\\n", " ")
    commands = [line.split("worker-cpu", 1)[1] for line in text.splitlines()
                if line.startswith("docker compose run") and "worker-cpu" in line]
    assert len(commands) >= 2
    for cmd in commands:
        argv = [a for a in shlex.split(cmd.split("#")[0]) if a != "--help"]
        if argv[-1] in ("rollback",):  # shown with --help only
            argv = argv[:1]
        assert_real_subcommand(argv)


def test_linewatch_services_run_under_an_init(compose):
    """SIGTERM reaches linewatch (graceful worker/sink shutdown) and children are reaped."""
    for name in LINEWATCH_SERVICES:
        assert compose["services"][name].get("init") is True, name
