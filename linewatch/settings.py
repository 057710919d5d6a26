"""One settings model for every service: env vars (``LINEWATCH_…``, nested with ``__``)
over a TOML file (``LINEWATCH_CONFIG`` or ``./linewatch.toml``) over defaults.

Kept in one place so the producer, worker, sink, dashboard and docker compose file all
agree on names; ``tests/test_docker.py`` checks the compose file against this model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from linewatch.errors import UserError

DEFAULT_HOME = Path(os.environ.get("LINEWATCH_HOME", Path.home() / ".linewatch"))
MAX_MESSAGE_BYTES = 10 * 1024 * 1024


class KafkaSettings(BaseModel):
    """Client-side Kafka settings; security fields pass straight through to kafka-python."""

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "linewatch"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    sasl_password_file: Path | None = Field(None, description=(
        "file whose first line is the SASL password, read when sasl_plain_password is unset: the "
        "password stays out of the environment and process listings"))
    ssl_cafile: Path | None = Field(None, description=(
        "CA bundle (PEM) the broker certificate must chain to; unset: the system CAs"))
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_password: SecretStr | None = None
    ssl_check_hostname: bool = True
    max_message_bytes: int = Field(MAX_MESSAGE_BYTES, ge=1024)
    request_timeout_ms: int = Field(30_000, ge=1000)
    connect_timeout_s: float = Field(15.0, gt=0, description="bound on waiting for an unreachable broker")

    def client_config(self) -> dict:
        """kwargs common to KafkaProducer, KafkaConsumer and KafkaAdminClient."""
        cfg: dict = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()],
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.security_protocol.startswith("SASL"):
            cfg["sasl_mechanism"] = self.sasl_mechanism or "PLAIN"
            if self.sasl_plain_username is not None:
                cfg["sasl_plain_username"] = self.sasl_plain_username
            password = self.sasl_password()
            if password is not None:
                cfg["sasl_plain_password"] = password.get_secret_value()
        if self.security_protocol.endswith("SSL"):
            cfg["ssl_check_hostname"] = self.ssl_check_hostname
            for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                value = getattr(self, key)
                if value is not None:
                    cfg[key] = str(value)
            if self.ssl_password is not None:
                cfg["ssl_password"] = self.ssl_password.get_secret_value()
        return cfg


    def sasl_password(self) -> SecretStr | None:
        """The SASL password: sasl_plain_password, else the first line of sasl_password_file
        (UserError naming the file, never its content, when it cannot be read)."""
        if self.sasl_plain_password is not None or self.sasl_password_file is None:
            return self.sasl_plain_password
        path = Path(self.sasl_password_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").strip().splitlines()
        except OSError as exc:
            raise UserError(f"kafka.sasl_password_file {path}: cannot read it ({exc.strerror or exc})") from None
        if not lines or not lines[0].strip():
            raise UserError(f"kafka.sasl_password_file {path}: the file is empty")
        return SecretStr(lines[0].strip())


class TopicSettings(BaseModel):
    frames: str = "frames"
    results: str = "results"
    dlq: str = "frames.dlq"
    alerts: str = "alerts"
    profiles: str = "profiles"
    reviews: str = "reviews"
    frames_partitions: int = Field(8, ge=1)
    results_partitions: int = Field(4, ge=1)
    retention_ms: int = Field(24 * 3600 * 1000, ge=60_000)


class BrokerSettings(BaseModel):
    """The embedded single-node KRaft broker that ``linewatch broker`` runs."""

    kafka_version: str = "4.1.1"
    home: Path = DEFAULT_HOME / "broker"
    jars_dir: Path | None = None  # default: ~/.cache/linewatch/kafka-<version>
    host: str = "127.0.0.1"
    port: int = Field(9092, ge=1, le=65535)
    controller_port: int = Field(9093, ge=1, le=65535)
    heap_mb: int = Field(512, ge=128)
    start_timeout_s: float = Field(90.0, gt=0)
    secured: bool = Field(False, description=(
        "SASL_SSL listener (SCRAM-SHA-512 users, a certificate from a local CA), deny-by-default "
        "ACLs; docs/security.md"))


class StorageSettings(BaseModel):
    db_path: Path = DEFAULT_HOME / "linewatch.duckdb"
    registry_dir: Path = DEFAULT_HOME / "profiles"


class WorkerSettings(BaseModel):
    group_id: str = "linewatch-workers"
    max_batch: int = Field(16, ge=1, le=1024)
    max_wait_ms: int = Field(50, ge=0, description="a batch closes at most this long after its first frame")
    quiet_ms: int = Field(5, ge=0, description=(
        "a batch also closes once no frame arrived for this long: a slow line is served at once, a "
        "busy one still fills its batches (docs/results/latency.md)"))
    profile_cache_size: int = Field(32, ge=1)
    engine: Literal["auto", "tensorrt", "onnxruntime", "torch"] = "auto"
    threads: int = Field(0, ge=0, description="0 = all cores")
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(0, ge=0, le=65535, description="0 = no metrics endpoint")
    max_poll_interval_ms: int = Field(300_000, ge=10_000)
    session_timeout_ms: int = Field(10_000, ge=6_000, description="a dead worker's partitions move after this")
    join_timeout_s: float = Field(45.0, ge=5, description=(
        "a consumer whose first group join has not completed after this long is closed and a new "
        "one joins (kafka-python 3 can stall in a join under load: docs/architecture.md)"))
    reload_interval_s: float = Field(2.0, gt=0)
    preload: bool = Field(True, description=(
        "load and warm every published profile before consuming (ready on /ready), so the first "
        "frames pay no load; False: load each product on its first frame"))
    thumbnail_size: int = Field(256, ge=32)
    max_frame_pixels: int = Field(64_000_000, ge=1, description="refuse decompression bombs")
    camera_roi: dict[str, str] = Field(default_factory=dict, description=(
        "per-camera ROI override, 'camera' or 'camera/product' -> 'X,Y,W,H' in frame pixels, for a product "
        "mounted elsewhere in one camera's frame; the profile's view size and tiles stay (docs/geometry.md)"))

    @field_validator("camera_roi")
    @classmethod
    def _rois(cls, v: dict[str, str]) -> dict[str, str]:
        from linewatch.inspection.geometry import GeometryError, Roi

        for key, text in v.items():
            try:
                Roi.parse(text)
            except GeometryError as exc:
                raise ValueError(f"worker.camera_roi[{key!r}]: {exc}") from None
        return v


class SinkSettings(BaseModel):
    group_id: str = "linewatch-sink"
    max_batch: int = Field(500, ge=1)
    max_wait_ms: int = Field(500, ge=0, description="a batch is written at most this long after its first record")
    quiet_ms: int = Field(20, ge=0, description=(
        "a batch is also written once no record arrived for this long (docs/results/latency.md)"))


class EvidenceSettings(BaseModel):
    """The original frames the sink keeps (docs/review-loop.md): every defect frame and a
    sample of normal ones, as files beside the database, under a retention policy."""

    normal_sample_rate: float = Field(0.01, ge=0, le=1, description=(
        "share of normal frames whose original bytes the worker attaches and the sink keeps "
        "(chosen by a hash of the frame id, so a replay keeps the same frames)"))
    dir: Path | None = Field(None, description="where the files live; None = '<db_path>.evidence' beside the database")
    max_age_days: float = Field(30.0, gt=0, description="frames older than this are deleted (pending reviews excepted)")
    max_bytes: int = Field(2 * 1024**3, ge=1024, description=(
        "total size cap; over it the oldest frames go first (pending reviews excepted)"))
    sweep_interval_s: float = Field(60.0, gt=0, description="age sweep at most this often (the size cap is checked every batch)")


class DashboardSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8501, ge=1, le=65535)
    refresh_s: int = Field(5, ge=1)
    review_timeout_s: float = Field(8.0, gt=0, description=(
        "how long the page waits for the broker to acknowledge a review before saying it was not sent"))
    reviewer_header: str | None = Field(None, description=(
        "HTTP header an authenticating reverse proxy sets to the signed-in user (e.g. X-Forwarded-User); "
        "when set and present, it is the reviewer's name (docs/review-loop.md)"))


class AlertSettings(BaseModel):
    window_frames: int = Field(200, ge=10, description="sliding window per product")
    max_defect_rate: float = Field(0.25, gt=0, le=1)
    max_consecutive_defects: int = Field(10, ge=2)
    clear_fraction: float = Field(0.8, gt=0, le=1, description="rate alert clears below max_defect_rate x this (hysteresis)")
    drift_window: int = Field(200, ge=20, description=(
        "recent frames judged normal, per product, compared with the calibration's normal validation scores"))
    drift_raise: float = Field(0.25, gt=0, le=1, description=(
        "KS distance at or above which the drift alert is raised (docs/results/review-loop.md: about the "
        "two-sample KS critical value at p = 0.005 for 200 frames against a 60-image reference)"))
    drift_clear: float = Field(0.15, ge=0, le=1, description="KS distance at or below which it clears (hysteresis)")


class MqttSettings(BaseModel):
    """Where ``linewatch bridge mqtt`` publishes verdicts (QoS 1, one topic per camera)."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    topic_template: str = Field("linewatch/{line}/{camera}/verdict", description=(
        "MQTT topic per verdict; {line}, {camera} and {product} are filled in"))
    client_id: str = "linewatch-bridge-mqtt"
    username: str | None = None
    password: SecretStr | None = None
    tls_cafile: Path | None = Field(None, description="CA bundle; setting it (or tls) turns TLS on")
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    tls: bool = Field(False, description="TLS with the system CAs when no tls_cafile is given")
    retain: bool = Field(False, description="retain the last verdict per camera on the broker")
    keepalive_s: int = Field(30, ge=5)
    group_id: str = "linewatch-bridge-mqtt"


class OpcuaSettings(BaseModel):
    """The OPC UA server ``linewatch bridge opcua`` writes verdicts to (as a client)."""

    endpoint: str = "opc.tcp://127.0.0.1:4840"
    namespace_uri: str = Field("urn:linewatch:verdicts", description="namespace of the nodes the bridge creates")
    root: str = Field("linewatch", description="object under Objects holding one object per camera")
    username: str | None = None
    password: SecretStr | None = None
    security_string: str | None = Field(None, description=(
        "asyncua security string, e.g. Basic256Sha256,SignAndEncrypt,client-cert.pem,client-key.pem"))
    group_id: str = "linewatch-bridge-opcua"


class BridgeSettings(BaseModel):
    """What both bridges share: the reject window, retries, the metrics endpoint."""

    reject_window_ms: int = Field(1000, ge=1, description=(
        "a verdict published later than this after capture is marked late"))
    publish_timeout_s: float = Field(5.0, gt=0, description="wait for one publish to be acknowledged")
    retry_backoff_max_s: float = Field(5.0, gt=0, description="retry delay grows to this while the target is down")
    outage_limit_s: float = Field(300.0, ge=0, description=(
        "exit (non-zero) when the target stays unreachable this long; 0 = retry forever"))
    max_batch: int = Field(100, ge=1)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(0, ge=0, le=65535, description="0 = no metrics endpoint")
    mqtt: MqttSettings = MqttSettings()
    opcua: OpcuaSettings = OpcuaSettings()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LINEWATCH_",
        env_nested_delimiter="__",
        extra="forbid",
        toml_file=None,
    )

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    broker: BrokerSettings = BrokerSettings()
    storage: StorageSettings = StorageSettings()
    worker: WorkerSettings = WorkerSettings()
    sink: SinkSettings = SinkSettings()
    dashboard: DashboardSettings = DashboardSettings()
    alerts: AlertSettings = AlertSettings()
    evidence: EvidenceSettings = EvidenceSettings()
    bridge: BridgeSettings = BridgeSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = os.environ.get("LINEWATCH_CONFIG") or "linewatch.toml"
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if Path(toml_path).is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        elif os.environ.get("LINEWATCH_CONFIG"):
            raise FileNotFoundError(f"LINEWATCH_CONFIG={toml_path}: no such file")
        return tuple(sources)


def load_settings(**overrides) -> Settings:
    """Settings from env + TOML, with keyword overrides (nested dicts) on top."""
    return Settings(**overrides)
