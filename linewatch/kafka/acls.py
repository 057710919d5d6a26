"""Least-privilege ACLs: one Kafka principal per linewatch role, each allowed only its own job.

Why: whoever can write ``frames`` puts images in front of the models, whoever can write
``results`` forges verdicts, whoever can read ``results`` sees every defect image. On a broker
that denies what no ACL grants (the local secured broker, docs/security.md) each service runs
as its role's user and gets exactly the rows of ``ROLE_GRANTS``; ``linewatch broker acls``
applies them (idempotently: only missing bindings are created, nothing is deleted) and prints
them. tests/test_secured_broker.py proves the whole role x topic x read/write matrix.

A grant names topics by their ``TopicSettings`` field and consumer groups by their settings
path, so renamed topics and groups follow the settings. A topic field that settings do not
have is skipped: adding a topic or a role's right is one line here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from linewatch.settings import Settings

READ, WRITE, CREATE = "read", "write", "create"


@dataclass(frozen=True)
class RoleGrant:
    """What one role may do: ``read`` topics (as a consumer, with ``groups``), ``write``
    topics (as a producer), ``create`` topics (and see and change their configs)."""

    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()  # settings paths, e.g. "worker.group_id"
    create: tuple[str, ...] = ()


# which topic (TopicSettings field) each role may read / write; the sink consumes results, the
# DLQ and the operators' reviews and publishes alerts (workers/sink.py); the dashboard publishes
# reviews (dashboard/reviews.py); the MQTT / OPC UA bridges consume results in their
# own groups (bridges/loop.py); "*" = every topic linewatch creates (io.topic_specs)
ROLE_GRANTS: dict[str, RoleGrant] = {
    "producer": RoleGrant(write=("frames",)),
    "worker": RoleGrant(read=("frames",), write=("results", "dlq"), groups=("worker.group_id",)),
    "sink": RoleGrant(read=("results", "dlq", "reviews"), write=("alerts",), groups=("sink.group_id",)),
    "dashboard": RoleGrant(write=("reviews",)),
    "bridge": RoleGrant(read=("results",), groups=("bridge.mqtt.group_id", "bridge.opcua.group_id")),
    "admin": RoleGrant(create=("*",)),
}


@dataclass(frozen=True, order=True)
class Binding:
    """One ALLOW ACL: ``principal`` may ``operation`` on ``resource_type`` ``name`` (literal)."""

    role: str
    principal: str
    resource_type: str  # "TOPIC" or "GROUP"
    name: str
    operation: str  # kafka ACLOperation name: READ, WRITE, DESCRIBE, CREATE, ...

    def line(self) -> str:
        return f"{self.role:<10} {self.principal:<28} {self.resource_type.lower():<6} {self.name:<28} {self.operation}"


def _topic(settings: Settings, field: str) -> str | None:
    return getattr(settings.topics, field, None) if field != "*" else None


def group_id(settings: Settings, path: str) -> str:
    """The consumer group at settings ``path`` (e.g. "bridge.mqtt.group_id")."""
    value = settings
    for part in path.split("."):
        value = getattr(value, part)
    return str(value)


def role_topics(settings: Settings, role: str) -> dict[str, set[str]]:
    """``{"read": {...}, "write": {...}, "create": {...}}`` topic names ``role`` is granted
    under these settings (fields settings lack are left out)."""
    from linewatch.kafka.io import topic_specs

    grant = ROLE_GRANTS[role]
    every = [s.name for s in topic_specs(settings)]
    out: dict[str, set[str]] = {}
    for kind, fields in ((READ, grant.read), (WRITE, grant.write), (CREATE, grant.create)):
        names: set[str] = set()
        for f in fields:
            names |= set(every) if f == "*" else ({n} if (n := _topic(settings, f)) else set())
        out[kind] = names
    return out


def bindings(settings: Settings, users: Mapping[str, str]) -> list[Binding]:
    """The ALLOW bindings of every role in ``users`` (``{role: Kafka user name}``; roles without
    a grant, such as the broker's own super user, get none). Read implies group READ; create
    comes with DESCRIBE, DESCRIBE_CONFIGS and ALTER_CONFIGS (``ensure_topics`` raises the size
    limit of an existing topic)."""
    out: set[Binding] = set()
    for role, user in users.items():
        if role not in ROLE_GRANTS:
            continue
        principal = f"User:{user}"
        topics = role_topics(settings, role)
        for kind, ops in ((READ, ("READ",)), (WRITE, ("WRITE",)),
                          (CREATE, ("CREATE", "DESCRIBE", "DESCRIBE_CONFIGS", "ALTER_CONFIGS"))):
            for name in topics[kind]:
                out |= {Binding(role, principal, "TOPIC", name, op) for op in ops}
        if topics[READ]:
            out |= {Binding(role, principal, "GROUP", group_id(settings, g), "READ") for g in ROLE_GRANTS[role].groups}
    return sorted(out)


def _acl(b: Binding):
    from kafka.admin import ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePattern, ResourceType

    return ACL(principal=b.principal, host="*", operation=ACLOperation[b.operation],
               permission_type=ACLPermissionType.ALLOW,
               resource_pattern=ResourcePattern(ResourceType[b.resource_type], b.name, ACLResourcePatternType.LITERAL))


def existing_acls(admin) -> set[tuple[str, str, str, str, str]]:
    """Every ALLOW ACL on the cluster as (principal, resource type, name, operation, host)."""
    from kafka.admin import ACLFilter, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePatternFilter, \
        ResourceType

    found, _ = admin.describe_acls(ACLFilter(
        principal=None, host=None, operation=ACLOperation.ANY, permission_type=ACLPermissionType.ALLOW,
        resource_pattern=ResourcePatternFilter(ResourceType.ANY, None, ACLResourcePatternType.ANY)))
    return {(a.principal, a.resource_pattern.resource_type.name, a.resource_pattern.resource_name, a.operation.name,
             a.host) for a in found if a.resource_pattern.pattern_type == ACLResourcePatternType.LITERAL}


def apply_acls(admin, wanted: Iterable[Binding]) -> list[Binding]:
    """Create the bindings the cluster lacks; returns them (empty on a second run). Existing
    ACLs, linewatch's or anyone's, are never deleted. KafkaIOError naming the first refusal."""
    from linewatch.kafka.io import KafkaIOError

    have = existing_acls(admin)
    missing = [b for b in wanted if (b.principal, b.resource_type, b.name, b.operation, "*") not in have]
    if missing:
        result = admin.create_acls([_acl(b) for b in missing])
        if result["failed"]:
            err = result["failed"][0]
            name = err.__name__ if isinstance(err, type) else type(err).__name__
            raise KafkaIOError(f"could not create {len(result['failed'])} of {len(missing)} ACLs ({name}); the "
                               "client must be allowed to alter the cluster's ACLs (a super user)")
    return missing
