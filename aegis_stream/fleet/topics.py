"""The fleet's Kafka topics, their keys and record headers (docs/FLEET.md).

==========================  ==========  ====================================================
topic                       key         records
==========================  ==========  ====================================================
``aegis.decision.v1``       host        deny and audit decisions (one host's stay in order)
``aegis.explanation.v1``    host        explanations of denies (same key: same partition
                                        order as the decisions they explain)
``aegis.state.v1``          host        agent state snapshots (degraded mode, drop SLO)
``aegis.fleet.v1``          fleet key   fleet SLO and alerts from the faust worker
==========================  ==========  ====================================================

Every record carries its schema in two headers, ``aegis-schema`` (e.g.
``aegis.decision.v1``) and ``aegis-schema-version`` (e.g. ``1``), so a consumer can route
or reject a record without decoding it.  The ``.v1`` in a topic name changes only with an
incompatible schema; compatible additions bump the header version alone.

Topics are created explicitly (:func:`create_topics`): brokers run with
``auto.create.topics.enable=false`` so a typo never creates a topic, and a faust worker
must find its source topics in place when it starts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from aegis_stream.errors import AegisError

DECISION_TOPIC = "aegis.decision.v1"
EXPLANATION_TOPIC = "aegis.explanation.v1"
STATE_TOPIC = "aegis.state.v1"
FLEET_TOPIC = "aegis.fleet.v1"

HEADER_SCHEMA = "aegis-schema"
HEADER_SCHEMA_VERSION = "aegis-schema-version"

WEEK_MS = 7 * 24 * 3600 * 1000

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient

_log = logging.getLogger("aegis.fleet.kafka")


class TopicError(AegisError):
    """A topic cannot be created or checked (one line, names the topic)."""


class TopicSpec(msgspec.Struct, frozen=True):
    """One topic: name, partitions, what its key is, and topic-level configs."""

    name: str
    partitions: int
    key: str
    config: dict[str, str] = {}


# Decisions get the most partitions: the fleet's volume is there and the faust worker
# scales by partition.  Key = host keeps one host's decisions in order on one partition.
TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(DECISION_TOPIC, 6, "host", {"retention.ms": str(WEEK_MS)}),
    TopicSpec(EXPLANATION_TOPIC, 3, "host", {"retention.ms": str(WEEK_MS)}),
    TopicSpec(STATE_TOPIC, 3, "host", {"retention.ms": str(WEEK_MS)}),
    TopicSpec(FLEET_TOPIC, 1, "fleet key", {"retention.ms": str(WEEK_MS)}),
)

_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def check_topic_name(name: str) -> str:
    """Kafka's own rule: 1-249 of ``[A-Za-z0-9._-]``, and not ``.`` or ``..``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise TopicError(f"bad topic name {name!r} (want 1-249 of A-Z a-z 0-9 . _ -)")
    return name


def schema_headers(schema: str, version: int) -> list[tuple[str, bytes]]:
    """The two record headers naming a record's schema and its version."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise TopicError(f"bad schema version {version!r} (want an integer >= 1)")
    return [(HEADER_SCHEMA, schema.encode()), (HEADER_SCHEMA_VERSION, str(version).encode())]


def admin_client(bootstrap: str, timeout: float = 10.0) -> AdminClient:
    """A confluent-kafka AdminClient whose librdkafka logs go to ``logging`` (not stderr)."""
    from confluent_kafka.admin import AdminClient

    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "socket.timeout.ms": max(10, int(timeout * 1000)),
        "logger": _log,
    }
    return AdminClient(conf)


def create_topics(
    bootstrap: str,
    specs: Iterable[TopicSpec] = TOPICS,
    *,
    replication_factor: int = 1,
    timeout: float = 30.0,
) -> list[str]:
    """Create the topics that do not exist yet; return the names created.

    Idempotent: a topic that exists already is fine (its partition count is left alone;
    Kafka can only grow it, and growing it would move keys between partitions).  Any
    other failure (broker unreachable, refused, bad config) is a TopicError naming the
    topic and Kafka's reason.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic

    specs = list(specs)
    for s in specs:
        check_topic_name(s.name)
        if s.partitions < 1:
            raise TopicError(f"topic {s.name}: bad partition count {s.partitions} (want >= 1)")
    if replication_factor < 1:
        raise TopicError(f"bad replication factor {replication_factor} (want >= 1)")
    if not specs:
        return []
    admin = admin_client(bootstrap, timeout)
    futures = admin.create_topics(
        [
            NewTopic(s.name, num_partitions=s.partitions, replication_factor=replication_factor,
                     config=dict(s.config))
            for s in specs
        ],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    created: list[str] = []
    for name, fut in futures.items():
        try:
            fut.result()
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            reason = err.str() if isinstance(err, KafkaError) else str(exc)
            raise TopicError(f"cannot create topic {name} on {bootstrap}: {reason}") from None
        created.append(name)
    return sorted(created)


def list_topics(bootstrap: str, *, timeout: float = 10.0) -> dict[str, int]:
    """Topic name -> partition count (internal topics included)."""
    from confluent_kafka import KafkaException

    admin = admin_client(bootstrap, timeout)
    try:
        md = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise TopicError(f"cannot list topics on {bootstrap}: {exc.args[0] if exc.args else exc}") from None
    return {name: len(t.partitions) for name, t in md.topics.items()}
