"""``aegis tail --kafka BOOTSTRAP``: follow the decision topic, one line per decision.

A consumer for people (and scripts, with ``--json``).  It never joins a consumer group:
the partitions of ``aegis.decision.v1`` are *assigned*, read from their end (or from the
beginning with ``--from-beginning``) and no offset is ever committed, so a tail can run
next to the fleet worker without stealing its partitions or moving its offsets.
(librdkafka insists on a ``group.id`` even for an assign-only consumer; the one set here
is unique per process and never used to join or commit.)

Human output is terminal-safe: every field an attacker controls (the process name, the
paths, the rule and host names) has its control characters escaped, so a process named
``"\\x1b]0;pwned\\x07"`` cannot retitle or repaint the operator's terminal.  ``--json``
prints the record's value byte for byte (JSON escapes control characters itself).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import msgspec

from aegis_stream.errors import AegisError
from aegis_stream.fleet.topics import DECISION_TOPIC
from aegis_stream.textsafe import escape as escape  # the one rule for every human output

_dec = msgspec.json.Decoder()


class TailError(AegisError):
    """The tail cannot start or go on (bad bootstrap, broker unreachable, topic missing)."""


# ------------------------------------------------------------------ formatting
def _where(ev: Mapping[str, Any]) -> str:
    """The object denied: the path the rule was compiled from, else ``dev:ino``."""
    src = ev.get("rule_source") or ""
    if isinstance(src, str) and src.startswith("/"):
        return src
    return f"{ev.get('dev', '?')}:{ev.get('ino', '?')}"


def format_human(ev: Mapping[str, Any]) -> str:
    """One terminal-safe line: time, host, decision, rule, action, comm[pid], path or
    dev:ino, policy generation."""
    rule = ev.get("rule_id") or f"#{ev.get('rule_index', '?')}"
    return " ".join((
        escape(ev.get("time", "?")),
        escape(ev.get("host", "?")),
        escape(str(ev.get("decision", "?")).upper()).ljust(5),
        escape(rule),
        escape(ev.get("action", "?")),
        f"{escape(ev.get('comm', '?'))}[{escape(ev.get('pid', '?'))}]",
        escape(_where(ev)),
        f"gen={escape(ev.get('generation', '?'))}",
    ))


@dataclass(frozen=True)
class TailFilter:
    """Which decisions to print (every given field must match; ``None`` = any)."""

    decision: str | None = None  # deny | audit
    rule: str | None = None  # the policy's rule id
    host: str | None = None

    def matches(self, ev: Mapping[str, Any]) -> bool:
        if ev.get("schema") != DECISION_TOPIC:
            return False
        return ((self.decision is None or ev.get("decision") == self.decision)
                and (self.rule is None or ev.get("rule_id") == self.rule)
                and (self.host is None or ev.get("host") == self.host))


def render(value: bytes, filt: TailFilter, *, as_json: bool) -> str | None:
    """The line to print for one record value, ``None`` when filtered out.  Raises
    ``msgspec.DecodeError`` for a value that is not a JSON object."""
    ev = _dec.decode(value)
    if not isinstance(ev, dict):
        raise msgspec.DecodeError("not a JSON object")
    if not filt.matches(ev):
        return None
    return value.decode("utf-8").rstrip("\n") if as_json else format_human(ev)


# ------------------------------------------------------------------ bootstrap
def parse_bootstrap(text: str) -> str:
    """Check ``HOST:PORT[,HOST:PORT...]`` (the agent's sink's rule); returns it normalised.
    Raises TailError naming the bad part."""
    from aegis_stream.fleet.sink import KafkaSinkError
    from aegis_stream.fleet.sink import parse_bootstrap as check

    try:
        return check(text)
    except KafkaSinkError as exc:
        raise TailError(str(exc).removeprefix("kafka: ")) from None


# ------------------------------------------------------------------ the consumer
def _records(bootstrap: str, topic: str, *, from_beginning: bool,
             connect_timeout: float) -> Iterator[Any]:
    """Messages of every partition of ``topic``, assigned (no group), until closed."""
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, TopicPartition

    errors: list[str] = []
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"aegis-tail-{os.getpid()}-{uuid.uuid4().hex[:8]}",  # never joined
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "socket.connection.setup.timeout.ms": int(connect_timeout * 1000),
        "error_cb": lambda err: errors.append(err.str()),
        "logger": _quiet_logger(),
    })
    try:
        try:
            md = consumer.list_topics(topic, timeout=connect_timeout)
        except KafkaException as exc:
            consumer.poll(0)  # runs error_cb: the connect error names the broker and why
            why = errors[-1] if errors else _kafka_error_text(exc)
            raise TailError(f"cannot reach Kafka at {bootstrap}: {why}") from None
        tmd = md.topics.get(topic)
        if tmd is None or tmd.error is not None or not tmd.partitions:
            raise TailError(f"topic {topic} does not exist on {bootstrap} "
                            "(no agent has published yet? 'aegis fleet broker start' creates it)")
        start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        consumer.assign([TopicPartition(topic, p, start) for p in sorted(tmd.partitions)])
        while True:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise TailError(f"Kafka consumer failed: {err.str()}")
                continue  # transient (partition EOF, broker reconnect): librdkafka retries
            yield msg
    finally:
        consumer.close()


def _kafka_error_text(exc: Exception) -> str:
    err = exc.args[0] if exc.args else None
    text = getattr(err, "str", None)
    return str(text()) if callable(text) else str(exc)


def _quiet_logger() -> Any:
    """librdkafka logs to stderr by default (a line per failed connect); errors reach us
    through error_cb instead, so its log goes to a logger that is not printed."""
    import logging

    log = logging.getLogger("aegis.tail.librdkafka")
    log.propagate = False
    log.addHandler(logging.NullHandler())
    return log


@dataclass(frozen=True)
class TailResult:
    """What one ``aegis tail`` run did: records printed, filtered out, and values that
    were not a decision record (counted and reported, never silently skipped)."""

    printed: int
    skipped: int  # filtered out
    undecodable: int  # values that were not a decision record (counted, reported)


def tail(bootstrap: str, filt: TailFilter, *, as_json: bool = False, from_beginning: bool = False,
         count: int | None = None, out: TextIO | None = None, topic: str = DECISION_TOPIC,
         connect_timeout: float = 10.0,
         records: Callable[..., Iterator[Any]] | None = None) -> TailResult:
    """Print the decisions of ``topic`` that pass ``filt`` (``count``: stop after that
    many).  Raises TailError; KeyboardInterrupt is the caller's."""
    out = out or sys.stdout
    bootstrap = parse_bootstrap(bootstrap)
    printed = skipped = bad = 0
    if count is not None and count <= 0:
        return TailResult(0, 0, 0)
    source = (records or _records)(bootstrap, topic, from_beginning=from_beginning,
                                   connect_timeout=connect_timeout)
    try:
        for msg in source:
            value = msg.value()
            try:
                line = render(value or b"", filt, as_json=as_json)
            except (msgspec.DecodeError, UnicodeDecodeError):
                bad += 1
                if bad == 1:
                    print(f"aegis tail: skipping a record that is not JSON (partition "
                          f"{msg.partition()} offset {msg.offset()}); further ones are counted",
                          file=sys.stderr)
                continue
            if line is None:
                skipped += 1
                continue
            out.write(line + "\n")
            out.flush()
            printed += 1
            if count is not None and printed >= count:
                break
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
    return TailResult(printed, skipped, bad)


def cmd_tail(args: Any) -> int:
    """``aegis tail``: 0 after --count decisions, 130 on Ctrl-C; errors are one line."""
    if args.count is not None and args.count < 1:
        raise TailError(f"--count must be at least 1 (got {args.count})")
    filt = TailFilter(args.decision, args.rule, args.host)
    result: TailResult | None = None
    try:
        result = tail(args.kafka, filt, as_json=args.json, from_beginning=args.from_beginning,
                      count=args.count)
    except KeyboardInterrupt:
        return 130
    finally:
        if result is not None and result.undecodable:
            print(f"aegis tail: {result.undecodable} record(s) were not JSON and were skipped",
                  file=sys.stderr)
    return 0


def add_tail_arguments(p: Any) -> None:
    """The arguments of ``aegis tail`` on parser ``p``."""
    p.add_argument("--kafka", required=True, metavar="BOOTSTRAP",
                   help="Kafka bootstrap servers, HOST:PORT[,HOST:PORT...]")
    p.add_argument("--decision", choices=["deny", "audit"], help="only this decision")
    p.add_argument("--rule", metavar="ID", help="only this rule id")
    p.add_argument("--host", metavar="H", help="only this host")
    p.add_argument("--json", action="store_true", help="print each record's JSON exactly")
    p.add_argument("--from-beginning", action="store_true",
                   help="start at the oldest retained record (default: only new ones)")
    p.add_argument("--count", type=int, metavar="N", help="exit after N decisions")
    p.set_defaults(func=cmd_tail)
