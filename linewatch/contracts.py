"""The published wire contract: JSON Schemas of every Kafka record linewatch reads or writes,
generated from the pydantic models in ``linewatch/messages.py``.

Why generated: the models are the one definition the services use, so the schemas an
integrator gets (``docs/contracts/``, explained in ``docs/contracts.md``) can only drift from
them if nobody regenerates, and ``tests/test_contracts.py`` fails when that happens. Plant
software (camera SDKs, MES, PLC gateways) is not written in Python; a JSON Schema is what it
can validate against.

Two adjustments the models cannot express by themselves, both made here:

* Kafka header values are bytes. The header schemas therefore describe the header map after
  UTF-8 decoding: every value is a string, integers are written in decimal.
* Records linewatch writes always carry every field (``model_dump_json`` writes defaults and
  nulls), so their schemas list every property as required; ``schema_version`` is bounded by
  the version this build writes (a reader refuses a newer one, ``InspectionResult``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from linewatch.errors import UserError
from linewatch.messages import (
    OPCUA_VARIABLES,
    RESULT_SCHEMA_VERSION,
    REVIEW_SCHEMA_VERSION,
    VERDICT_SCHEMA_VERSION,
    Alert,
    DlqRecord,
    FrameHeaders,
    InspectionResult,
    Review,
    Verdict,
)
from linewatch.settings import BridgeSettings, TopicSettings

# Bumped when a change to any schema is not additive (a field removed, renamed, retyped or
# newly required on input). RESULT_SCHEMA_VERSION is the per-record version of `results`.
CONTRACT_VERSION = 1
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
INDEX_FILE = "index.json"
REGENERATE = "linewatch contracts --out docs/contracts"
_DECIMAL = r"^[0-9]+$"


@dataclass(frozen=True)
class Part:
    """One schema file: which record part it describes and where it comes from."""

    file: str
    model: type[BaseModel]
    what: str  # "headers" (the decoded header map), "value" or "headers.dlq" (a JSON document)
    written_by_linewatch: bool
    fields: tuple[str, ...] | None = None  # headers: the model fields sent as headers


@dataclass(frozen=True)
class Topic:
    name: str  # the settings field under [topics]
    key: str
    value: str
    headers: str
    parts: tuple[Part, ...]


def topics() -> list[Topic]:
    """The published topics, in data-flow order. A new record type joins here and in
    docs/contracts.md; tests/test_contracts.py checks every model of messages.py is covered."""
    return [
        Topic("frames", key="camera id (UTF-8); keeps one camera's frames in order on one partition",
              value="the encoded image: JPEG or PNG bytes, as the `encoding` header says",
              headers="frame_id, product, camera, line, seq, capture_ts_ms, encoding (optional, default jpeg)",
              parts=(Part("frames.headers.schema.json", FrameHeaders, "headers", False),)),
        Topic("results", key="camera id (UTF-8); keeps one camera's results in order on one partition",
              value="one InspectionResult as UTF-8 JSON",
              headers="schema_version, product, frame_id, camera (copies of the value's fields, for routing "
                      "without parsing)",
              parts=(Part("results.value.schema.json", InspectionResult, "value", True),
                     Part("results.headers.schema.json", InspectionResult, "headers", True,
                          fields=("schema_version", "product", "frame_id", "camera")))),
        Topic("dlq", key="the original record's key",
              value="the original record's bytes (empty when they were over the size limit)",
              headers="the original headers, plus `dlq`: one DlqRecord as UTF-8 JSON",
              parts=(Part("frames.dlq.dlq-header.schema.json", DlqRecord, "headers.dlq", True),)),
        Topic("alerts", key="product (UTF-8)",
              value="one Alert as UTF-8 JSON",
              headers="none",
              parts=(Part("alerts.value.schema.json", Alert, "value", True),)),
        Topic("reviews", key="frame id (UTF-8)",
              value="one Review as UTF-8 JSON (an operator's confirm / false_call / unsure of one frame)",
              headers="none",
              parts=(Part("reviews.value.schema.json", Review, "value", True),)),
    ]


VERDICT = Part("verdict.schema.json", Verdict, "value", True)


def bridges() -> dict[str, Any]:
    """What the bridges present to the line (not Kafka): the MQTT topic and payload, the OPC
    UA node layout. Defaults come from the settings model, where they are written once."""
    d = BridgeSettings()
    return {
        "verdict_schema_version": VERDICT_SCHEMA_VERSION,
        "mqtt": {"command": "linewatch bridge mqtt", "topic": d.mqtt.topic_template,
                 "setting": "bridge.mqtt.topic_template", "qos": 1, "retain": d.mqtt.retain,
                 "payload": "one Verdict as UTF-8 JSON", "schema": VERDICT.file},
        "opcua": {"command": "linewatch bridge opcua", "namespace_uri": d.opcua.namespace_uri,
                  "nodes": f"Objects/{d.opcua.root}/<camera>/<variable>", "setting": "bridge.opcua.root",
                  "variables": dict(OPCUA_VARIABLES),
                  "write": "all variables of one verdict in one Write request, one request per verdict"},
    }


def _document(part: Part) -> dict[str, Any]:
    schema = part.model.model_json_schema(mode="validation" if not part.written_by_linewatch else "serialization")
    if part.written_by_linewatch:
        schema["required"] = list(schema["properties"])
    version = schema["properties"].get("schema_version")
    if version is not None:
        top = {Verdict: VERDICT_SCHEMA_VERSION, Review: REVIEW_SCHEMA_VERSION}.get(part.model, RESULT_SCHEMA_VERSION)
        version.update(minimum=1, maximum=top)
    if part.what == "headers":
        schema = _as_headers(schema, part.fields)
    return {"$schema": JSON_SCHEMA_DIALECT, "$id": part.file, **schema}


def _as_headers(schema: dict[str, Any], fields: tuple[str, ...] | None) -> dict[str, Any]:
    """The header map after UTF-8 decoding: string values, integers in decimal."""
    props: dict[str, Any] = {}
    for name, prop in schema["properties"].items():
        if fields is not None and name not in fields:
            continue
        out = {k: v for k, v in prop.items() if k in ("title", "description", "default", "enum", "pattern")}
        if prop.get("type") == "integer":
            out["pattern"] = _DECIMAL
            bounds = [f"{k} {prop[k]}" for k in ("minimum", "maximum") if k in prop]
            if bounds:
                out["description"] = "decimal integer, " + ", ".join(bounds)
        elif "default" in out:
            out["default"] = str(out["default"])
        out["type"] = "string"
        props[name] = out
    required = [n for n in schema.get("required", []) if n in props]
    doc = {k: v for k, v in schema.items() if k in ("title", "description")}
    doc["description"] = (doc.get("description", "") + " Header values are UTF-8 strings.").strip()
    doc.update(type="object", properties=props, required=required)
    if fields is None:
        doc["additionalProperties"] = False
    return doc


def _index() -> dict[str, Any]:
    defaults = TopicSettings()
    return {
        "contract_version": CONTRACT_VERSION,
        "result_schema_version": RESULT_SCHEMA_VERSION,
        "json_schema": JSON_SCHEMA_DIALECT,
        "generated_by": REGENERATE,
        "explained_in": "docs/contracts.md",
        "topics": {
            getattr(defaults, t.name): {
                "setting": f"topics.{t.name}",
                "key": t.key,
                "headers": t.headers,
                "value": t.value,
                "schemas": {p.what: p.file for p in t.parts},
            }
            for t in topics()
        },
        "bridges": bridges(),
    }


def render() -> dict[str, str]:
    """File name -> exact text of every published file (schemas and the index)."""
    docs = {p.file: _document(p) for t in topics() for p in t.parts}
    docs[VERDICT.file] = _document(VERDICT)
    docs[INDEX_FILE] = _index()
    return {name: json.dumps(doc, indent=2, ensure_ascii=False) + "\n" for name, doc in docs.items()}


def stale(out_dir: Path) -> list[str]:
    """Published files in ``out_dir`` that differ from what the models generate now (or are
    missing); empty when the directory is up to date."""
    out_dir = Path(out_dir)
    diff = []
    for name, text in render().items():
        path = out_dir / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            diff.append(name)
    return diff


def write_contracts(out_dir: Path) -> list[Path]:
    """Write every schema and the index into ``out_dir`` (created if needed). Each file is
    written to a temporary name and renamed, so a reader never sees half a schema."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory")
    files = render()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    written = []
    for name, text in files.items():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; these are published files
            os.replace(tmp, out_dir / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written.append(out_dir / name)
    return written
