"""Wire contracts between services: Kafka headers and message bodies.

Every service imports these; nothing re-declares them. Bodies are JSON (pydantic), with a
``schema_version`` so a consumer can refuse a message it does not understand instead of
mis-reading it. Binary payloads (mask PNG, thumbnail JPEG, heat map PNG) travel base64 in
the result body because they exist only for anomalous frames and are small.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RESULT_SCHEMA_VERSION = 1
VERDICT_SCHEMA_VERSION = 1
REVIEW_SCHEMA_VERSION = 1
CATEGORIES = ("structural", "surface", "contamination", "combined")
Category = Literal["structural", "surface", "contamination", "combined", "unknown"]
Encoding = Literal["jpeg", "png"]
_ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"


class HeaderError(ValueError):
    """A frame's Kafka headers are missing or malformed (the reason goes to the DLQ)."""


def _not_newer(version: int, known: int, what: str) -> int:
    """A record of a newer schema than this reader is refused, never misread."""
    if version > known:
        raise ValueError(f"{what} schema {version} is newer than this reader ({known})")
    return version


def now_ms() -> int:
    return int(time.time() * 1000)


class FrameHeaders(BaseModel):
    """Headers of a `frames` record; the value is the encoded image bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    frame_id: str = Field(pattern=_ID_PATTERN)
    product: str = Field(pattern=_ID_PATTERN)
    camera: str = Field(pattern=_ID_PATTERN)
    line: str = Field(pattern=_ID_PATTERN)
    seq: int = Field(ge=0)
    capture_ts_ms: int = Field(ge=0)
    encoding: Encoding = "jpeg"

    @staticmethod
    def new_frame_id(camera: str, seq: int) -> str:
        return f"{camera}-{seq}-{uuid.uuid4().hex[:12]}"

    def to_kafka(self) -> list[tuple[str, bytes]]:
        return [(k, str(v).encode("utf-8")) for k, v in self.model_dump().items()]

    @staticmethod
    def frame_id_of(headers: list[tuple[str, bytes]] | None) -> str | None:
        """The ``frame_id`` header when it is well formed, even if other headers are not, so a
        dead-lettered frame can still be traced by the id its camera gave it."""
        import re

        for key, value in headers or []:
            if key == "frame_id":
                try:
                    text = (value or b"").decode("utf-8")
                except (UnicodeDecodeError, AttributeError):
                    return None
                return text if re.fullmatch(_ID_PATTERN, text) else None
        return None

    @classmethod
    def from_kafka(cls, headers: list[tuple[str, bytes]] | None) -> "FrameHeaders":
        """Parse Kafka headers; raises HeaderError with a one-line reason."""
        if not headers:
            raise HeaderError("missing headers")
        raw: dict[str, str] = {}
        for key, value in headers:
            if not isinstance(key, str) or key in raw:
                raise HeaderError(f"duplicate or invalid header key {key!r}")
            try:
                raw[key] = (value or b"").decode("utf-8")
            except UnicodeDecodeError:
                raise HeaderError(f"header {key!r} is not UTF-8") from None
        try:
            return cls.model_validate(raw)
        except Exception as exc:  # pydantic.ValidationError -> one line
            errors = getattr(exc, "errors", lambda: [])()
            if errors:
                first = errors[0]
                where = ".".join(str(p) for p in first.get("loc", ())) or "headers"
                raise HeaderError(f"bad header {where}: {first.get('msg')}") from None
            raise HeaderError(f"bad headers: {exc}") from None


class Region(BaseModel):
    """One connected component of the defect mask, in original-frame pixel coordinates."""

    area_px: int = Field(ge=0)
    area_frac: float = Field(ge=0, le=1)
    bbox: tuple[int, int, int, int]  # x, y, w, h
    peak_score: float
    mean_score: float
    category: Category = "unknown"
    confidence: float = Field(0.0, ge=0, le=1)


class InspectionResult(BaseModel):
    """Value of a `results` record (key = camera, so one camera's results stay in order)."""

    schema_version: int = RESULT_SCHEMA_VERSION
    frame_id: str
    product: str
    camera: str
    line: str
    seq: int
    capture_ts_ms: int
    processed_ts_ms: int = Field(default_factory=now_ms)
    image_score: float
    threshold: float
    image_threshold: float
    verdict: Literal["ok", "defect"]
    defect_area_frac: float = Field(ge=0, le=1)
    regions: list[Region] = []
    category: Category = "unknown"
    category_confidence: float = Field(0.0, ge=0, le=1)
    background: bool | None = None
    profile_version: int
    model_kind: str
    engine: str
    worker_id: str
    latency_ms: float = Field(ge=0, description="capture -> result produced")
    inference_ms: float = Field(ge=0)
    kafka_partition: int
    kafka_offset: int
    width: int
    height: int
    mask_png_b64: str | None = None
    thumbnail_jpeg_b64: str | None = None
    heatmap_png_b64: str | None = None
    frame_b64: str | None = Field(None, description=(
        "the original frame bytes (as received on `frames`), only for frames kept as evidence: every "
        "defect frame and a hashed sample of normal ones (docs/review-loop.md)"))
    frame_encoding: Encoding | None = Field(None, description="encoding of frame_b64 (the frame's `encoding` header)")
    evidence: Literal["defect", "sample"] | None = Field(None, description="why frame_b64 is attached")

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        return _not_newer(v, RESULT_SCHEMA_VERSION, "result")

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> "InspectionResult":
        return cls.model_validate_json(data)


class DlqRecord(BaseModel):
    """Value of a `frames.dlq` record's JSON header ``dlq``; the record value keeps the
    original bytes and the original headers are kept alongside, so nothing is lost."""

    frame_id: str | None
    reason: str
    stage: Literal["headers", "decode", "profile", "inference", "publish", "other"]
    worker_id: str
    source_topic: str
    source_partition: int
    source_offset: int
    failed_ts_ms: int = Field(default_factory=now_ms)

    def to_header(self) -> tuple[str, bytes]:
        return ("dlq", self.model_dump_json().encode("utf-8"))


class Alert(BaseModel):
    """Value of an `alerts` record (key = product)."""

    alert_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    product: str
    kind: Literal["defect_rate", "consecutive_defects", "drift"]
    state: Literal["raised", "cleared"]
    value: float
    limit: float
    window_frames: int
    ts_ms: int = Field(default_factory=now_ms)
    message: str


ReviewVerdict = Literal["confirm", "false_call", "unsure"]


class Review(BaseModel):
    """Value of a `reviews` record (key = frame id): one operator's judgement of one frame.

    Published by the dashboard, written by the sink into the append-only ``reviews`` table;
    ``review_id`` is made once per submission, so a replay or a retried send is the same
    review and adds no row, while a later review of the same frame is a new one (the latest
    counts). ``confirm`` needs the category the operator sees (one of the four); ``false_call``
    and ``unsure`` carry none. A review never changes the inspection it judges."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = REVIEW_SCHEMA_VERSION
    review_id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=_ID_PATTERN)
    frame_id: str = Field(pattern=_ID_PATTERN)
    product: str = Field(pattern=_ID_PATTERN)
    verdict: ReviewVerdict
    category: Literal["structural", "surface", "contamination", "combined"] | None = Field(
        None, description="required with confirm, absent otherwise")
    reviewer: str = Field(min_length=1, max_length=128, description="who judged (required, not blank)")
    note: str | None = Field(None, max_length=1000)
    reviewed_ts_ms: int = Field(default_factory=now_ms, ge=0)

    @field_validator("reviewer")
    @classmethod
    def _named(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("a review needs the reviewer's name")
        return v

    @field_validator("note")
    @classmethod
    def _note(cls, v: str | None) -> str | None:
        return (v.strip() or None) if v is not None else None

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        return _not_newer(v, REVIEW_SCHEMA_VERSION, "review")

    @model_validator(mode="after")
    def _category_with_confirm(self) -> "Review":
        if self.verdict == "confirm" and self.category is None:
            raise ValueError("a confirmed defect needs its category (structural, surface, contamination, combined)")
        if self.verdict != "confirm" and self.category is not None:
            raise ValueError(f"a {self.verdict} review takes no category")
        return self

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


class Verdict(BaseModel):
    """What a bridge (``linewatch bridge mqtt|opcua``) presents to the line controller for one
    frame: the verdict and the timing a reject gate needs. ``late`` is set when the verdict left
    the bridge after the configured reject window (capture -> published), or after a newer
    verdict of the same camera had already gone out; a late verdict is never presented as on
    time, and what the line does with it (reject the part anyway, stop, ignore) is the line's
    decision."""

    schema_version: int = VERDICT_SCHEMA_VERSION
    frame_id: str
    product: str
    line: str
    camera: str
    seq: int = Field(ge=0)
    verdict: Literal["ok", "defect"]
    category: Category
    score: float = Field(description="image anomaly score of the frame")
    image_threshold: float = Field(description="the score above which the frame is a defect")
    capture_ts_ms: int = Field(ge=0)
    published_ts_ms: int = Field(ge=0, description="when the bridge handed the verdict to MQTT / OPC UA")
    latency_ms: float = Field(ge=0, description="capture -> published")
    reject_window_ms: int = Field(ge=0, description="the window the verdict was judged against")
    late: bool
    profile_version: int

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


# What ``linewatch bridge opcua`` writes under Objects/<root>/<camera>/ (variable -> OPC UA
# type): the Verdict's fields (schema_version and reject_window_ms aside), ``defect`` as a
# Boolean a PLC rung can use directly, and ``verdict_json``, the whole Verdict.
OPCUA_VARIABLES: dict[str, str] = {
    "frame_id": "String", "seq": "Int64", "verdict": "String", "defect": "Boolean", "category": "String",
    "score": "Double", "image_threshold": "Double", "capture_ts_ms": "Int64", "published_ts_ms": "Int64",
    "latency_ms": "Double", "late": "Boolean", "product": "String", "line": "String", "camera": "String",
    "profile_version": "Int64", "verdict_json": "String",
}


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def unb64(data: str | None) -> bytes | None:
    return None if data is None else base64.b64decode(data)
