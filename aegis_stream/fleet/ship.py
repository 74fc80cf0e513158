"""``aegis fleet ship``: publish what an agent left on disk to Kafka, afterwards.

For hosts that could not reach the broker while the agent ran (the lab's guests have no
network; an air-gapped host; a broker outage longer than the spool's patience), the
agent's output is shipped later from wherever its directory ends up:

* ``--events FILE``: the file sink's JSON lines (decisions, explanations, state, SLO
  alerts), with the sink's rotated ``FILE.1`` ... ``FILE.N`` shipped first, oldest first;
* ``--spool DIR``: the Kafka sink's spool ``DIR/kafka.spool`` (deny and explanation
  batches the broker never acknowledged), in order.  A pipeline deny spool
  (``DIR/deny.spool``: raw kernel records not yet normalised) is not shipped -- it needs
  that host's kernel context (boot id, cgroups, processes) to become events, so the
  agent replays it at its next start; ship refuses (exit 3) rather than pretend.

Records are exactly what the agent's Kafka sink produces (:mod:`aegis_stream.fleet.sink`
``ROUTES``, its producer settings, key = host), so a consumer cannot tell the paths apart.

Idempotent by ``event_id``: a ledger kept next to the input, one per Kafka cluster
(``.aegis-ship.<cluster id>``), records each chunk's dedup keys ``(schema, host,
event_id)`` as *intended* before producing it and as *acked* once the broker has
acknowledged every record (idempotent producer, ``acks=all``).  A second ship to the same
cluster skips what is acked, so it publishes nothing twice and downstream counts (the
fleet worker counts each record offset once) do not move.  Keys intended but not acked
are what a ship killed mid-chunk left in doubt: the next ship reads the topics back once
and skips those already there, so even an interrupted ship never duplicates.  Within one
ship, an event present in both the events file and the spool is published once.
Shipping to a different cluster ships everything again (it has none of it).  Inputs are
never modified (the spool stays for the agent, whose own replay is at-least-once).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from aegis_stream.errors import AegisError

CHUNK = 2000  # records per acknowledged chunk (the ledger is written per chunk)


class ShipError(AegisError):
    """Nothing to ship, an unreadable input, or a broker that refuses (one line)."""


class _Head(msgspec.Struct, frozen=True):
    schema: str
    event_id: str
    host: str = ""
    decision: str = ""


_head = msgspec.json.Decoder(_Head)
_KLASS_OF_SCHEMA = {"aegis.explanation.v1": "explanation", "aegis.state.v1": "state",
                    "aegis.slo.v1": "slo", "aegis.storm.v1": "storm"}


@dataclass
class ShipResult:
    """What one ship did, by event class (deny, audit, explanation, state, slo)."""

    bootstrap: str = ""
    cluster_id: str = ""
    shipped: dict[str, int] = field(default_factory=dict)
    already: int = 0  # in the ledger: shipped to this cluster before
    duplicates: int = 0  # the same event twice in the inputs (events file and spool)
    failed: int = 0  # not acknowledged (not in the ledger: the next ship retries them)
    bad_lines: int = 0  # not an aegis event (counted, skipped)
    raw_spooled: int = 0  # raw denies in deny.spool, not shippable (see the module doc)
    in_doubt: int = 0  # in flight when a previous ship died: resolved by reading back

    def summary(self) -> str:
        parts = ", ".join(f"{k} {self.shipped.get(k, 0)}"
                          for k in ("deny", "audit", "explanation", "state", "slo", "storm"))
        total = sum(self.shipped.values())
        line = (f"shipped {total} records to {self.bootstrap} (cluster {self.cluster_id}): "
                f"{parts}; skipped {self.already} already shipped, {self.duplicates} duplicate(s); "
                f"{self.failed} failed")
        if self.in_doubt:
            line += f"; {self.in_doubt} in doubt from an interrupted ship, checked on the topics"
        if self.bad_lines:
            line += f"; {self.bad_lines} line(s) not aegis events"
        if self.raw_spooled:
            line += (f"; {self.raw_spooled} raw denies in deny.spool NOT shipped (the agent "
                     f"replays them at its next start)")
        return line


@dataclass(frozen=True)
class _Item:
    klass: str
    host: str
    key: tuple[str, str, str]  # (schema, host, event_id)
    value: bytes


def _item(line: bytes, klass: str | None = None) -> _Item:
    value = line.rstrip(b"\n")
    h = _head.decode(value)
    if klass is None:
        if h.schema == "aegis.decision.v1":
            klass = h.decision if h.decision in ("deny", "audit") else ""
        else:
            klass = _KLASS_OF_SCHEMA.get(h.schema, "")
        if not klass:
            raise msgspec.ValidationError(f"no Kafka route for schema {h.schema!r}")
    return _Item(klass, h.host, (h.schema, h.host, h.event_id), value)


def event_files(path: Path) -> list[Path]:
    """``path`` and the sink's rotated backups, oldest first (``path.N`` ... ``path``)."""
    backups = []
    i = 1
    while path.with_name(f"{path.name}.{i}").exists():
        backups.append(path.with_name(f"{path.name}.{i}"))
        i += 1
    return [*reversed(backups), *([path] if path.exists() else [])]


def _lines_of_events(path: Path, res: ShipResult) -> Iterator[_Item]:
    files = event_files(path)
    if not files:
        raise ShipError(f"events file {path} does not exist")
    for f in files:
        with open(f, "rb") as fh:
            for line in fh:
                if not line.strip():
                    continue
                if not line.endswith(b"\n"):
                    res.bad_lines += 1  # torn last line of a killed writer: not an event
                    continue
                try:
                    yield _item(line)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    res.bad_lines += 1


def _lines_of_spool(spool_dir: Path, res: ShipResult) -> Iterator[_Item]:
    from aegis_stream.fleet.sink import LineSpool

    path = spool_dir / "kafka.spool"
    if not path.exists() or path.stat().st_size == 0:
        return
    # LineSpool recovers (cuts a torn tail) on open; its batches are peeked, never
    # popped, so its close() rewrites nothing: the file stays for the agent
    spool = LineSpool(spool_dir, max_bytes=1 << 62)
    try:
        batches = spool.peek_many(spool.pending_batches, 1 << 62)
    finally:
        spool.close()
    for batch in batches:
        for line in batch.lines.splitlines():
            if line.strip():
                try:
                    yield _item(line, batch.klass)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    res.bad_lines += 1


def raw_spooled(spool_dir: Path) -> int:
    """Raw deny records waiting in the pipeline's deny spool (``deny.spool``)."""
    path = spool_dir / "deny.spool"
    if not path.exists() or path.stat().st_size == 0:
        return 0
    from aegis_stream.pipeline.spool import DiskSpool

    # a fresh DiskSpool only reads (its close() rewrites nothing when no frame was popped)
    spool = DiskSpool(spool_dir, max_bytes=1 << 62)
    try:
        return spool.pending_events
    finally:
        spool.close()


Key = tuple[str, str, str]  # (schema, host, event_id)


class _Ledger:
    """What one cluster acknowledged, as an append-only, fsynced log of dedup keys.

    Before a chunk is produced its keys are written as *intended* (``?``), after the
    broker's acknowledgement as *acked* (``+``).  Keys intended but never acked were in
    flight when a previous ship died: they may or may not be on the topics (``in_doubt``),
    and :func:`_resolve` reads the topics back to tell."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.acked: set[Key] = set()
        intended: set[Key] = set()
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split("\t")
                if len(parts) == 4 and parts[0] in ("?", "+"):
                    (intended if parts[0] == "?" else self.acked).add((parts[1], parts[2], parts[3]))
        self.in_doubt = intended - self.acked

    def _append(self, tag: str, keys: list[Key]) -> None:
        if not keys:
            return
        text = "".join(f"{tag}\t{s}\t{h}\t{e}\n" for s, h, e in keys)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def intend(self, keys: list[Key]) -> None:
        self._append("?", keys)

    def ack(self, keys: list[Key]) -> None:
        self._append("+", keys)
        self.acked.update(keys)
        self.in_doubt.difference_update(keys)


def _resolve(bootstrap: str, topics: set[str], in_doubt: set[Key], timeout: float) -> set[Key]:
    """The in-doubt keys that are on ``topics`` (read from the start to their current end,
    assigned partitions, no group).  Costs one read of those topics: only after a ship
    died between producing and recording the acknowledgement."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"aegis-ship-{os.getpid()}",
                  "enable.auto.commit": False, "logger": _quiet()})
    found: set[Key] = set()
    try:
        ends: dict[tuple[str, int], int] = {}
        for t in sorted(topics):
            md = c.list_topics(t, timeout=timeout)
            for p in md.topics[t].partitions:
                lo, hi = c.get_watermark_offsets(TopicPartition(t, p), timeout=timeout)
                if hi > lo:
                    ends[(t, p)] = hi
        c.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in ends])
        left = set(ends)
        while left and found != in_doubt:
            msg = c.poll(1.0)
            if msg is None or msg.error() is not None:
                for tp in c.position([TopicPartition(t, p) for t, p in left]):
                    if tp.offset >= ends[(tp.topic, tp.partition)]:
                        left.discard((tp.topic, tp.partition))
                continue
            try:
                h = _head.decode(msg.value() or b"")
            except msgspec.DecodeError:
                continue
            k = (h.schema, h.host, h.event_id)
            if k in in_doubt:
                found.add(k)
            where = (str(msg.topic()), int(msg.partition() or 0))
            if int(msg.offset() or 0) + 1 >= ends[where]:
                left.discard(where)
    finally:
        c.close()
    return found


def _quiet() -> Any:
    import logging

    log = logging.getLogger("aegis.fleet.ship.librdkafka")
    log.propagate = False
    log.addHandler(logging.NullHandler())
    return log


def _cluster_id(producer: Any, bootstrap: str, timeout: float) -> str:
    from aegis_stream.fleet.sink import ROUTES, _words

    try:
        md = producer.list_topics(timeout=timeout)
    except Exception as exc:
        raise ShipError(f"cannot reach Kafka at {bootstrap}: {_words(exc)}") from None
    for topic in sorted({r[0] for r in ROUTES.values()}):
        t = md.topics.get(topic)
        if t is None or t.error is not None:
            raise ShipError(f"topic {topic} does not exist on {bootstrap} "
                            "('aegis fleet broker start' or create_topics makes it)")
    return str(md.cluster_id or "unknown")


def ship(bootstrap: str, *, events: list[Path] = (), spool: Path | None = None,  # type: ignore[assignment]
         host: str | None = None, ledger: Path | None = None, connect_timeout: float = 10.0,
         ack_timeout: float = 30.0, producer: Any = None) -> ShipResult:
    """Publish ``events`` files and the Kafka spool in ``spool`` (see the module doc).
    ``host`` overrides each record's key (default: the event's own host).  Raises
    ShipError; failed records are counted in the result, never silently dropped."""
    from aegis_stream.fleet.sink import ROUTES, KafkaSinkError, parse_bootstrap, producer_config

    try:
        bootstrap = parse_bootstrap(bootstrap)
    except KafkaSinkError as exc:
        raise ShipError(str(exc)) from None
    if not events and spool is None:
        raise ShipError("nothing to ship: give --events FILE and/or --spool DIR")
    if spool is not None and not spool.is_dir():
        raise ShipError(f"spool directory {spool} does not exist")
    res = ShipResult(bootstrap)
    if spool is not None:
        res.raw_spooled = raw_spooled(spool)
    if producer is None:
        from confluent_kafka import Producer

        errors: list[str] = []
        producer = Producer(producer_config(
            bootstrap, error_cb=lambda e: errors.append(e.str()),
            **{"message.timeout.ms": int(ack_timeout * 1000)}))
    res.cluster_id = _cluster_id(producer, bootstrap, connect_timeout)
    if ledger is None:
        ledger_dir = spool if spool is not None else events[0].resolve().parent
        ledger = ledger_dir / f".aegis-ship.{res.cluster_id}"
    book = _Ledger(ledger)
    if book.in_doubt:  # a previous ship died mid-chunk: which of those reached the broker?
        res.in_doubt = len(book.in_doubt)
        found = _resolve(bootstrap, {r[0] for r in ROUTES.values()}, set(book.in_doubt),
                         connect_timeout)
        book.ack(sorted(found))
    headers = {k: _schema_headers(k, ROUTES) for k in ROUTES}
    seen: set[tuple[str, str, str]] = set()

    def items() -> Iterator[_Item]:
        for e in events:
            yield from _lines_of_events(e, res)
        if spool is not None:
            yield from _lines_of_spool(spool, res)

    chunk: list[_Item] = []

    def flush_chunk() -> None:
        acked: list[tuple[str, str, str]] = []
        failed = [0]

        def report(item: _Item) -> Any:
            def cb(err: Any, _msg: Any) -> None:
                if err is None:
                    acked.append(item.key)
                    res.shipped[item.klass] = res.shipped.get(item.klass, 0) + 1
                else:
                    failed[0] += 1
            return cb

        book.intend([it.key for it in chunk])
        for it in chunk:
            key = (host or it.host).encode()
            while True:
                try:
                    producer.produce(ROUTES[it.klass][0], it.value, key,
                                     headers=headers[it.klass], on_delivery=report(it))
                    break
                except BufferError:  # librdkafka's queue is full: let it drain
                    producer.poll(0.1)
        left = producer.flush(ack_timeout + 5)
        res.failed += failed[0] + left
        book.ack(acked)
        chunk.clear()

    for it in items():
        if it.key in book.acked:
            res.already += 1
            continue
        if it.key in seen:
            res.duplicates += 1
            continue
        seen.add(it.key)
        chunk.append(it)
        if len(chunk) >= CHUNK:
            flush_chunk()
    if chunk:
        flush_chunk()
    return res


def _schema_headers(klass: str, routes: Any) -> list[tuple[str, bytes]]:
    from aegis_stream.fleet.topics import schema_headers

    _, schema, version = routes[klass]
    return schema_headers(schema, version)


def cmd_ship(args: Any) -> int:
    """``aegis fleet ship``: 0 all shipped, 1 some records not acknowledged, 3 raw denies
    left in deny.spool (shipped what it could); errors are one line (exit 1 via main)."""
    res = ship(args.kafka, events=[Path(e) for e in args.events or []],
               spool=Path(args.spool) if args.spool else None, host=args.host,
               ledger=Path(args.ledger) if args.ledger else None)
    print(res.summary())
    if res.failed:
        return 1
    return 3 if res.raw_spooled else 0


def add_ship_arguments(p: Any) -> None:
    """The arguments of ``aegis fleet ship`` on parser ``p``."""
    p.add_argument("--kafka", required=True, metavar="BOOTSTRAP",
                   help="Kafka bootstrap servers, HOST:PORT[,HOST:PORT...]")
    p.add_argument("--spool", metavar="DIR",
                   help="the agent's spool directory (ships DIR/kafka.spool)")
    p.add_argument("--events", metavar="FILE", action="append",
                   help="the agent's JSON-lines events file (and its rotated FILE.N); repeatable")
    p.add_argument("--ledger", metavar="FILE",
                   help="the ship ledger (default: .aegis-ship.<cluster id> in the spool "
                        "directory, else next to the first events file)")
    p.add_argument("--host", metavar="NAME",
                   help="record key for every record (default: each event's own host)")
    p.set_defaults(func=cmd_ship)
