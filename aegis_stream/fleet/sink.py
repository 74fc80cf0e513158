"""The agent's Kafka sink: decisions to ``aegis.decision.v1`` (key = host), explanations
and state next to them, denies never lost.

Client: confluent-kafka (librdkafka), chosen by measurement (``python -m
bench.kafka_sink_bench``, docs/FLEET.md).  ``produce()`` only appends to librdkafka's
queue (its own C threads talk to the broker), but it costs ~3-6 us of Python per record
(the headers more than the call), and in the agent's process that competes with the
ring readers and the normaliser for the GIL.  So by default the producer runs in a
separate process (:mod:`aegis_stream.fleet.producer`): the trio side hands each batch
over as one frame (queued for a sender thread, so ``write`` never blocks on the socket),
the child splits the lines and produces them with the class's pre-built topic and
headers, and one small DONE frame per batch comes back with its delivery counts.  The
sink's poll thread reads those frames (in-process mode, ``producer_process=False``: it
calls librdkafka's ``poll()``), and for the classes that must not be lost the trio side
awaits the batch's report through a ``trio.Event`` set from that thread (one cross-thread
wake per batch, not per event).  A producer process that dies (EOF on its socket, or
reaped) is counted (``producer_lost``) and replaced; the batches it had not reported are
failed: a deny batch's writer spools it (its replay goes through the next process),
best-effort records are counted ``sink/producer_lost`` (some may have been delivered
unreported: counted lost all the same).

Delivery per class::

    deny, explanation   durable: written = every record acked (idempotent producer,
                        acks=all).  While the broker is away or slow (no ack within
                        ``ack_timeout_s``) the batch goes to the sink's own bounded disk
                        spool instead, and every later batch follows it there, so a host's
                        order holds; the poll thread replays the spool head-first once the
                        broker answers.  A full spool raises SinkError: the pipeline's deny
                        retry path then holds the batch (the file sink is held back only
                        then).  At-least-once: a replay may repeat records that were acked
                        late (dedup key ``event_id``).
    audit, state, slo   best effort: produced without waiting; shed while the broker is
                        away (``sink/broker_unavailable``), when librdkafka's queue is full
                        (``sink/queue_full``), or when a delivery report fails (by reason).
                        Every shed or failed record is counted in ``dropped``.

The spool is the pipeline's spool file (:class:`~aegis_stream.pipeline.spool.FrameSpool`,
shared with its raw deny spool) with its own frames: encoded JSON lines, a frame per
batch, with its class and a CRC.

Errors::

    SinkError (aegis_stream.pipeline.sinks)
    └── KafkaSinkError   bad bootstrap / host key, a missing topic at start, a full spool
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import select
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import trio

from aegis_stream.fleet.producer import (  # noqa: F401  (re-exported: ship, tests, docs)
    _CODE_KLASS,
    _DONE,
    _F64,
    _HDR,
    _KLASS_CODE,
    _REASON,
    _U32,
    BATCH,
    BROKER_UNAVAILABLE,
    DELIVERY_FAILED,
    DONE,
    DURABLE,
    FATAL_EXIT,
    FLUSH,
    HEALTH,
    PROBE,
    PRODUCER_LOST,
    QUEUE_FULL,
    READY,
    REASONS,
    REPLY,
    ROUTES,
    SHORT,
    SHUTDOWN,
    TOO_LARGE,
    TOPICS_MISSING,
    TOPICS_OK,
    TOPICS_UNAVAILABLE,
    UNKNOWN_TOPIC,
    Producer,
    _confluent_producer,
    _health_of_error,
    _ProducerChild,
    _rdkafka_log,
    _topics_state,
    _words,
    latency_of,
    load_factory,
    producer_config,
    reason_of,
    spawn,
    tally,
)
from aegis_stream.fleet.topics import schema_headers
from aegis_stream.pipeline.sinks import SinkBatch, SinkError, SinkStatistics
from aegis_stream.pipeline.spool import Frame, FrameSpool, SpoolStatistics

_log = logging.getLogger("aegis.fleet.kafka")

#: round-trip histogram bucket bounds (seconds), Prometheus style (le)
RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class KafkaSinkError(SinkError):
    """Bad sink configuration or a broker that refuses it (one line); a full spool."""


# =========================================================================== addresses
_HOSTPORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>[0-9]{1,5})")


def parse_bootstrap(value: str) -> str:
    """``HOST:PORT[,HOST:PORT...]`` (IPv6 as ``[ADDR]:PORT``) -> the normalised list, or a
    one-line KafkaSinkError.  Nothing is resolved or connected here."""
    if not isinstance(value, str) or not value.strip():
        raise KafkaSinkError("kafka: empty bootstrap address (want HOST:PORT[,HOST:PORT...])")
    out = []
    for part in value.split(","):
        part = part.strip()
        m = _HOSTPORT.fullmatch(part)
        if not m:
            raise KafkaSinkError(f"kafka: bad bootstrap address {part!r} (want HOST:PORT, "
                                 f"IPv6 as [ADDR]:PORT)")
        port = int(m["port"])
        if not 1 <= port <= 65535:
            raise KafkaSinkError(f"kafka: bad port in bootstrap address {part!r} (want 1-65535)")
        out.append(part)
    return ",".join(out)


def check_host_key(value: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 255 or not value.isprintable():
        raise KafkaSinkError(f"kafka: bad host key {value!r} (want 1-255 printable characters)")
    return value


# =========================================================================== spool
_FRAME = struct.Struct("<IIII")  # class code, event count, byte length, crc32 of the bytes


class LineSpool(FrameSpool):
    """A bounded FIFO of encoded batches (JSON lines) in one append-only file: the
    pipeline's spool file (:class:`~aegis_stream.pipeline.spool.FrameSpool`: recovery,
    pending counts, pop, compaction at close) with frames of
    ``<u32 class code><u32 count><u32 length><u32 crc32> lines``.

    Thread-safe: the trio side appends, the sink's poll thread peeks and pops.  The file
    is truncated whenever it has been fully replayed; a file left by a previous run is
    replayed first (a torn or corrupt tail is cut off)."""

    HEADER = _FRAME

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int, name: str = "kafka") -> None:
        super().__init__(directory, max_bytes, name)

    def _pack(self, frame: Frame) -> bytes:
        return _FRAME.pack(frame.tag, frame.count, len(frame.body), zlib.crc32(frame.body))

    def _unpack(self, header: bytes, data: bytes, body_at: int) -> tuple[int, int, int] | None:
        code, count, length, crc = _FRAME.unpack(header)
        body = data[body_at: body_at + length]
        if code not in _CODE_KLASS or len(body) != length or zlib.crc32(body) != crc:
            return None
        return code, count, length

    def append(self, batch: SinkBatch) -> bool:
        """False (and ``full`` counted) when the batch does not fit."""
        return self._append(Frame(_KLASS_CODE[batch.klass], batch.count, batch.lines))

    def peek(self) -> SinkBatch | None:
        frames = self._peek()
        return SinkBatch(_CODE_KLASS[frames[0].tag], frames[0].body, frames[0].count) if frames else None

    def peek_many(self, max_batches: int, max_bytes: int) -> list[SinkBatch]:
        """The oldest batches (at least one if any), up to either limit, not removed."""
        return [SinkBatch(_CODE_KLASS[f.tag], f.body, f.count) for f in self._peek(max_batches, max_bytes)]


# =========================================================================== producer
# =========================================================================== statistics
@dataclass(frozen=True)
class KafkaSinkStatistics(SinkStatistics):
    """A snapshot of a :class:`KafkaSink`; ``batches``/``events`` count what ``write``
    accepted (acked, spooled, or produced best-effort)."""

    bootstrap: str = ""
    host_key: str = ""
    up: bool = False
    reason: str = ""  # why it is not up (a reason code and the broker's words)
    sent: int = 0  # records handed to librdkafka (replays included)
    acked: int = 0  # delivery reports OK
    retried: int = 0  # records produced again from the spool
    spooled: int = 0  # records written to the spool
    delivery_failed: int = 0  # failed delivery reports of durable records (spooled, not lost)
    dropped: Mapping[str, int] = field(default_factory=dict)  # best-effort records lost, by reason
    rtt_buckets: tuple[int, ...] = ()  # per RTT_BUCKETS (+Inf last), not cumulative
    rtt_sum: float = 0.0
    rtt_count: int = 0
    spool: SpoolStatistics | None = None
    producer_pid: int = 0  # the producer process (0: in-process mode, or being restarted)
    producer_lost: int = 0  # producer processes that died (each replaced by a new one)


class _Flight:
    """The delivery reports of one produced batch: called on the poll thread (in-process
    mode), or filled from the producer process's DONE frame (process mode)."""

    __slots__ = ("sink", "n", "count", "acked", "failed", "reasons", "durable", "sealed", "finished",
                 "whole", "t0", "last_latency", "event", "token", "ok_event", "seq", "gen", "replay",
                 "lost")

    def __init__(self, sink: KafkaSink, durable: bool, count: int = 0, replay: bool = False) -> None:
        self.sink = sink
        self.durable = durable
        self.count = count  # records in the batch
        self.replay = replay
        self.n = 0  # records produced (handed to librdkafka)
        self.acked = self.failed = 0
        self.reasons: dict[str, int] = {}
        self.sealed = self.finished = False
        self.whole = False  # every line of the batch was produced (no full queue)
        self.lost = False  # its producer process died before reporting it
        self.t0 = time.monotonic()
        self.last_latency: float | None = None
        self.event: trio.Event | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self.ok_event = threading.Event()
        self.seq = 0
        self.gen = 0

    def __call__(self, err: Any, msg: Any) -> None:
        if tally(self, err):
            if msg is not None:
                self.last_latency = latency_of(msg)
            self.sink._finish(self)

    @property
    def ok(self) -> bool:
        return self.whole and self.finished and self.failed == 0 and self.acked == self.n

    @property
    def short(self) -> bool:
        """Produced only in part: librdkafka's queue was full."""
        return self.sealed and not self.whole

    def wake(self) -> None:
        """Wake the trio task awaiting this flight (any thread)."""
        self.ok_event.set()
        if self.event is not None and self.token is not None:
            try:
                self.token.run_sync_soon(self.event.set)
            except trio.RunFinishedError:
                pass


class _ProducerProcess:
    """A producer process (:mod:`aegis_stream.fleet.producer`) and the agent's end of its
    socket."""

    def __init__(self, popen: subprocess.Popen[bytes], sock: socket.socket, gen: int) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.sock = sock
        self.gen = gen
        self.buf = bytearray()
        self.started = time.monotonic()
        self.ready = False  # its READY frame came: the producer exists

    @classmethod
    def start(cls, config: Mapping[str, Any], key: bytes, factory: str | None,
              factory_kwargs: Mapping[str, Any] | None, gen: int) -> _ProducerProcess:
        popen, sock = spawn(config, key, factory, factory_kwargs)
        return cls(popen, sock, gen)

    def exited(self) -> bool:
        """Exited (and reaped)?"""
        return self.popen.poll() is not None

    def end(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` for it to exit, then SIGKILL it; reap it."""
        try:
            self.popen.wait(wait_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def how(self) -> str:
        rc = self.popen.returncode
        if rc is None:
            return "stopped answering"
        if rc < 0:
            return f"killed by {signal.Signals(-rc).name}"
        if rc == FATAL_EXIT:
            return "ended after a fatal librdkafka error"
        return f"exited with status {rc}"


class _Call:
    """A PROBE or FLUSH awaiting its REPLY."""

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: tuple[int, str] | None = None


class KafkaSink:
    """A :class:`~aegis_stream.pipeline.sinks.Sink` producing to Kafka (see the module
    docstring for the delivery semantics per class).

    ``producer_process`` (default: True unless a ``producer`` instance is given) runs the
    librdkafka producer in a separate process (:mod:`aegis_stream.fleet.producer`).
    ``producer_factory`` (``"module:attr"``, called with the librdkafka config and
    ``producer_factory_kwargs``; a callable too in-process) replaces confluent-kafka's
    Producer: fakes for tests."""

    def __init__(
        self,
        bootstrap: str,
        *,
        host_key: str | None = None,
        spool_dir: str | os.PathLike[str],
        spool_max_bytes: int = 64 << 20,
        ack_timeout_s: float = 2.0,
        probe_min_s: float = 0.2,
        probe_max_s: float = 5.0,
        close_timeout_s: float = 5.0,
        replay_window_batches: int = 64,
        replay_window_bytes: int = 8 << 20,
        producer: Producer | None = None,
        producer_factory: str | Callable[..., Producer] | None = None,
        producer_factory_kwargs: Mapping[str, Any] | None = None,
        producer_process: bool | None = None,
        max_queued_bytes: int = 64 << 20,
        start_timeout_s: float = 10.0,
        on_health: Callable[[bool, str], None] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.bootstrap = parse_bootstrap(bootstrap)
        self.host_key = check_host_key(host_key if host_key is not None else socket.gethostname())
        self.name = f"kafka:{self.bootstrap}"
        self._key = self.host_key.encode()
        self.ack_timeout_s = ack_timeout_s
        self.probe_min_s = probe_min_s
        self.probe_max_s = probe_max_s
        self.close_timeout_s = close_timeout_s
        self.replay_window_batches = replay_window_batches
        self.replay_window_bytes = replay_window_bytes
        self.max_queued_bytes = max_queued_bytes
        self.start_timeout_s = start_timeout_s
        self.on_health = on_health
        self._headers = {k: schema_headers(s, v) for k, (_, s, v) in ROUTES.items()}
        self._lock = threading.Lock()
        self._up = True  # optimistic until a delivery or a probe says otherwise
        self._reason = ""
        self._token: trio.lowlevel.TrioToken | None = None
        self._flights: dict[int, _Flight] = {}
        self._calls: dict[int, _Call] = {}
        self._seq = 0
        # statistics (ints written under self._lock or by one side only)
        self.batches = self.events = self.bytes = self.failures = self.failed_events = 0
        self.sent = self.acked = self.retried = self.spooled = self.delivery_failed = 0
        self.producer_lost = 0
        self.dropped: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.rtt = [0] * (len(RTT_BUCKETS) + 1)
        self.rtt_sum = 0.0
        self.rtt_count = 0
        self.spool = LineSpool(spool_dir, spool_max_bytes)
        if producer_process is None:
            producer_process = producer is None
        if producer_process and producer is not None:
            raise KafkaSinkError(f"{self.name}: a producer instance cannot run in a producer process "
                                 f"(pass producer_factory)")
        self.producer: Producer | None = None
        self._proc: _ProducerProcess | None = None
        self._gen = 0
        self._restart_at = 0.0
        self._restart_backoff = 0.0
        self._probe_now = False
        self._dead: list[_ProducerProcess] = []  # sockets closed one death later (the sender may hold one)
        self._stop = threading.Event()
        if producer_process:
            if producer_factory is None:
                import confluent_kafka  # noqa: F401  (a missing [fleet] extra fails here, not in the child)
            elif not isinstance(producer_factory, str):
                raise KafkaSinkError(f"{self.name}: a producer process needs producer_factory as "
                                     f"'module:attr', not {producer_factory!r}")
            self._factory = producer_factory
            self._factory_kwargs = dict(producer_factory_kwargs or {})
            self._child_config = {k: v for k, v in producer_config(self.bootstrap, **(config or {})).items()
                                  if k != "logger"}  # the child logs through its own
            try:
                json.dumps([self._child_config, self._factory_kwargs])
            except (TypeError, ValueError) as exc:
                raise KafkaSinkError(f"{self.name}: a producer process takes plain settings only "
                                     f"({exc})") from None
            self._send_q: queue.SimpleQueue[tuple[int, _Flight | None, bytes, bytes] | None] = \
                queue.SimpleQueue()
            self._queued_bytes = 0
            self._start_process()  # before this sink's threads exist
            self._sender: threading.Thread | None = threading.Thread(
                target=self._send_loop, name=f"aegis-kafka-send-{self.bootstrap}", daemon=True)
            self._sender.start()
        else:
            self._sender = None
            if producer is None:
                make = (load_factory(producer_factory) if isinstance(producer_factory, str)
                        else producer_factory or _confluent_producer)
                producer = make(producer_config(self.bootstrap, error_cb=self._error_cb, **(config or {})),
                                **(producer_factory_kwargs or {}))
            self.producer = producer
        self._thread = threading.Thread(target=self._poll_loop, name=f"aegis-kafka-{self.bootstrap}",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ health
    def _set_health(self, up: bool, reason: str = "") -> None:
        with self._lock:
            if (self._up, self._reason) == (up, reason):
                return
            was = self._up
            self._up, self._reason = up, reason
        if was != up:
            if up:
                _log.warning("kafka %s: broker answers again", self.bootstrap)
            else:
                _log.warning("kafka %s: %s", self.bootstrap, reason)
        if self.on_health is not None:
            self._notify(up, reason)

    def _notify(self, up: bool, reason: str) -> None:
        # on_health runs on the trio thread (it may touch the pipeline's monitor); the
        # poll thread hands it over through the token captured by the first async call
        cb = self.on_health
        assert cb is not None

        def call() -> None:
            try:
                cb(up, reason)
            except Exception:  # a status callback must not break delivery
                _log.exception("kafka sink health callback failed")

        token = self._token
        if token is None:
            call()
            return
        try:
            token.run_sync_soon(call)
        except trio.RunFinishedError:
            pass

    def _error_cb(self, err: Any) -> None:  # librdkafka, on the poll thread
        try:
            why = _health_of_error(err)
            if why:
                self._set_health(False, why)
        except Exception:
            _log.exception("kafka error callback")

    @property
    def up(self) -> bool:
        return self._up

    @property
    def producer_pid(self) -> int:
        """The producer process's pid (0: in-process mode, or being restarted)."""
        proc = self._proc
        return proc.pid if proc is not None else 0

    def bind_monitor(self, monitor: Any) -> None:
        """Report the broker's absence to the agent's degraded monitor as the state
        condition ``sink_failing`` (``sink failing: kafka:...: sink/<reason>: ...``),
        cleared when it answers again.  Call on the trio thread."""
        def on_health(up: bool, reason: str) -> None:
            if up:
                monitor.clear_condition("sink_failing")
            else:
                monitor.set_condition("sink_failing", f"sink failing: {self.name}: {reason}")

        self.on_health = on_health
        if self._token is None:
            self._token = trio.lowlevel.current_trio_token()
        with self._lock:
            up, reason = self._up, self._reason
        if not up:
            on_health(up, reason)

    # ------------------------------------------------------------------ producing
    def _produce(self, batch: SinkBatch, flight: _Flight) -> None:
        """Hand a batch to the producer.  In-process: produce every line now (a full
        local queue stops it early; the flight is sealed with the count taken).  Process
        mode: queue the batch's frame for the sender thread; the DONE frame seals it."""
        with self._lock:
            self._seq += 1
            flight.seq = self._seq
            self._flights[flight.seq] = flight
        if self.producer is None:
            self._submit(flight, BATCH, _KLASS_CODE[batch.klass], batch.lines)
            return
        topic = ROUTES[batch.klass][0]
        headers = self._headers[batch.klass]
        produce = self.producer.produce
        key = self._key
        n = 0
        try:
            for line in batch.lines.splitlines():
                if line:
                    produce(topic, line, key, headers=headers, on_delivery=flight)
                    n += 1
            flight.whole = True
        except BufferError:
            pass
        with self._lock:
            self.sent += n
            if flight.replay:
                self.retried += n
        if not flight.durable and n < batch.count:
            self._drop(QUEUE_FULL, batch.count - n)
        flight.n = n
        flight.sealed = True
        if flight.acked + flight.failed >= n:
            self._finish(flight)

    def _submit(self, flight: _Flight | None, kind: int, arg: int, body: bytes, seq: int = 0) -> None:
        with self._lock:
            proc = self._proc
            full = self._queued_bytes + len(body) > self.max_queued_bytes
            if proc is not None and not full:
                self._queued_bytes += len(body)
                if flight is not None:
                    flight.gen = proc.gen
                seq = flight.seq if flight is not None else seq
        if proc is None or full:
            if flight is not None:
                if full:  # the producer process is not keeping up: like librdkafka's full queue
                    flight.n, flight.whole, flight.sealed = 0, False, True
                    if not flight.durable:
                        self._drop(QUEUE_FULL, flight.count)
                    with self._lock:
                        self._flights.pop(flight.seq, None)
                    flight.finished = True
                    flight.wake()
                else:
                    self._fail_lost(flight)
            return
        self._send_q.put((proc.gen, flight, _HDR.pack(kind, arg, 0, len(body), seq), body))

    def _send_loop(self) -> None:
        """The sender thread: request frames to the producer process, in order."""
        while True:
            item = self._send_q.get()
            if item is None:
                return
            gen, flight, hdr, body = item
            with self._lock:
                self._queued_bytes -= len(body)
                proc = self._proc
                if proc is None or proc.gen != gen or (flight is not None and flight.finished):
                    continue  # its process died: the flight was failed (and spooled or counted)
                sock = proc.sock
            try:
                sock.sendall(hdr)
                if body:
                    sock.sendall(body)
            except OSError:
                pass  # the poll thread sees the EOF and counts the loss

    def _fail_lost(self, flight: _Flight) -> None:
        """Its producer process died before reporting it: durable records stay spooled
        (or are spooled by their writer), best-effort ones are counted lost."""
        with self._lock:
            self._flights.pop(flight.seq, None)
        flight.lost = True
        flight.n, flight.whole, flight.acked, flight.failed = flight.count, True, 0, flight.count
        flight.reasons = {PRODUCER_LOST: flight.count} if flight.count else {}
        flight.sealed = True
        self._finish(flight)

    def _finish(self, flight: _Flight) -> None:
        """All delivery reports of a flight are in (either thread may get here first)."""
        with self._lock:
            if flight.finished:
                return
            flight.finished = True
            self._flights.pop(flight.seq, None)
            self.acked += flight.acked
            if flight.durable:
                self.delivery_failed += flight.failed
            else:
                for r, c in flight.reasons.items():
                    self.dropped[r] = self.dropped.get(r, 0) + c
            if flight.n and not flight.lost:
                rtt = flight.last_latency if flight.last_latency is not None else time.monotonic() - flight.t0
                i = 0
                while i < len(RTT_BUCKETS) and rtt > RTT_BUCKETS[i]:
                    i += 1
                self.rtt[i] += 1
                self.rtt_sum += rtt
                self.rtt_count += 1
        if flight.lost:
            pass  # _lost has said why (the process, not the broker)
        elif flight.failed:
            reason = max(flight.reasons, key=lambda r: flight.reasons[r])
            self._set_health(False, f"{reason}: {flight.failed} of {flight.n} records not acked")
        elif flight.acked:
            self._set_health(True)
        flight.wake()

    def _drop(self, reason: str, n: int) -> None:
        with self._lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    async def write(self, batch: SinkBatch) -> None:
        if self._token is None:
            self._token = trio.lowlevel.current_trio_token()
        if not batch.count:
            return
        if batch.klass not in ROUTES:
            raise KafkaSinkError(f"{self.name}: no topic for event class {batch.klass!r}")
        if batch.klass in DURABLE:
            await self._write_durable(batch)
        else:
            self._write_best_effort(batch)
        self.batches += 1
        self.events += batch.count
        self.bytes += len(batch.lines)

    def _write_best_effort(self, batch: SinkBatch) -> None:
        if not self._up:
            self._drop(PRODUCER_LOST if self._reason.startswith(PRODUCER_LOST) else BROKER_UNAVAILABLE,
                       batch.count)
            return
        self._produce(batch, _Flight(self, durable=False, count=batch.count))

    async def _write_durable(self, batch: SinkBatch) -> None:
        # once anything waits in the spool, every durable batch queues behind it (order)
        await self._until_ready()
        if self._up and not self.spool.pending_batches:
            flight = _Flight(self, durable=True, count=batch.count)
            flight.event = trio.Event()
            flight.token = self._token
            self._produce(batch, flight)
            if not flight.short:
                with trio.move_on_after(self.ack_timeout_s):
                    await flight.event.wait()
                if flight.ok:
                    return
            if flight.short:
                self._set_health(False, f"{QUEUE_FULL}: librdkafka's queue is full")
            elif not flight.finished:
                self._set_health(False, f"{BROKER_UNAVAILABLE}: no ack within "
                                        f"{self.ack_timeout_s:g}s")
        if not self.spool.append(batch):
            self.failures += 1
            self.failed_events += batch.count
            st = self.spool.statistics()
            raise KafkaSinkError(f"{self.name}: broker away and spool full "
                                 f"({st.file_bytes}/{st.max_bytes} bytes)")
        with self._lock:
            self.spooled += batch.count

    async def _until_ready(self) -> None:
        """A producer process just started (~0.2 s; more on a busy host): wait for it
        (bounded by ``start_timeout_s``) before a durable batch's ack timeout starts, so
        that its start is not mistaken for a broker that does not ack."""
        proc = self._proc
        if proc is None or proc.ready or not self._up:
            return  # (down: the batch is spooled without waiting)
        with trio.move_on_after(self.start_timeout_s):
            while not proc.ready and proc is self._proc and self._up:
                await trio.sleep(0.005)

    # ------------------------------------------------------------------ poll thread
    def _poll_loop(self) -> None:
        """Delivery reports, then the spool: replay its head while the broker acks, probe
        with backoff while it does not."""
        backoff = self.probe_min_s
        next_try = 0.0
        while not self._stop.is_set():
            try:
                self._pump(0.05)
                if self._probe_now:  # a new producer process: ask the broker at once
                    self._probe_now = False
                    backoff, next_try = self.probe_min_s, 0.0
                if time.monotonic() < next_try:
                    continue
                if not self._up:
                    # metadata first: a replay while it is away would only pile copies of
                    # the spool head into librdkafka's queue
                    ok = self._probe() and (not self.spool.pending_batches or self._replay_one())
                elif self.spool.pending_batches:
                    ok = self._replay_one()
                else:
                    continue
                if ok:
                    backoff, next_try = self.probe_min_s, 0.0
                else:
                    next_try = time.monotonic() + backoff
                    backoff = min(backoff * 2, self.probe_max_s)
            except Exception:  # never let the thread die: it is the only poller
                _log.exception("kafka sink poll thread")
                time.sleep(0.1)

    def _pump(self, timeout: float) -> None:
        """Serve delivery reports for up to ``timeout``: librdkafka's poll() in-process;
        the producer process's frames otherwise (its death is noticed, counted, and a new
        one started here)."""
        if self.producer is not None:
            self.producer.poll(timeout)
            return
        proc = self._proc
        if proc is None:
            if not self._stop.is_set() and time.monotonic() >= self._restart_at:
                self._start_process()
            else:
                time.sleep(min(timeout, 0.02))
            return
        try:
            ready = select.select([proc.sock], [], [], timeout)[0]
            data = proc.sock.recv(1 << 16) if ready else None
        except (OSError, ValueError):
            data = b""
        if data is None:
            if proc.exited():
                self._lost(proc)
            return
        if not data:
            self._lost(proc)
            return
        buf = proc.buf
        buf += data
        off = 0
        while len(buf) - off >= _HDR.size:
            kind, arg, _, length, seq = _HDR.unpack_from(buf, off)
            if len(buf) - off - _HDR.size < length:
                break
            body = bytes(buf[off + _HDR.size: off + _HDR.size + length])
            off += _HDR.size + length
            if kind == READY:
                proc.ready = True
            else:
                self._dispatch(kind, arg, seq, body)
        del buf[:off]

    def _dispatch(self, kind: int, arg: int, seq: int, body: bytes) -> None:
        if kind == DONE:
            with self._lock:
                f = self._flights.get(seq)
            if f is None:
                return  # already failed as lost, or left at close
            produced, acked, failed, lat = _DONE.unpack_from(body)
            reasons: dict[str, int] = {}
            for off in range(_DONE.size, len(body), _REASON.size):
                i, c = _REASON.unpack_from(body, off)
                r = REASONS[i] if i < len(REASONS) else DELIVERY_FAILED
                reasons[r] = reasons.get(r, 0) + c
            shorted = f.sealed  # a SHORT frame came first (and counted the queue-full part)
            f.n, f.whole, f.acked, f.failed, f.reasons = produced, bool(arg & 1), acked, failed, reasons
            f.last_latency = lat if lat >= 0 else None
            with self._lock:
                self.sent += produced
                if f.replay:
                    self.retried += produced
            if not f.durable and produced < f.count and not shorted:
                self._drop(QUEUE_FULL, f.count - produced)
            f.sealed = True
            self._finish(f)
        elif kind == SHORT:
            with self._lock:
                f = self._flights.get(seq)
            if f is not None and not f.sealed:
                f.n, f.whole, f.sealed = _U32.unpack(body)[0], False, True
                if not f.durable:
                    self._drop(QUEUE_FULL, f.count - f.n)
                f.wake()  # a durable writer spools it now (its DONE comes later)
        elif kind == HEALTH:
            self._set_health(bool(arg), body.decode(errors="replace"))
        elif kind == REPLY:
            with self._lock:
                call = self._calls.get(seq)
            if call is not None:
                call.result = (arg, body.decode(errors="replace"))
                call.done.set()

    def _call(self, kind: int, arg: int, timeout: float, wait_s: float, pump: bool) -> tuple[int, str] | None:
        """A PROBE or FLUSH to the producer process and its REPLY (None: no answer).
        ``pump``: this thread serves the frames while it waits (the poll thread, or the
        closing one after it stopped)."""
        call = _Call()
        with self._lock:
            self._seq += 1
            seq = self._seq
            self._calls[seq] = call
        try:
            self._submit(None, kind, arg, _F64.pack(timeout), seq)
            if self._proc is None:
                return None
            deadline = time.monotonic() + wait_s
            while not call.done.is_set() and time.monotonic() < deadline:
                if pump:
                    self._pump(0.05)
                else:
                    call.done.wait(0.05)
            return call.result
        finally:
            with self._lock:
                self._calls.pop(seq, None)

    def _start_process(self) -> None:
        with self._lock:
            self._gen += 1
            gen = self._gen
        try:
            proc = _ProducerProcess.start(self._child_config, self._key, self._factory,
                                          self._factory_kwargs, gen)
        except OSError as exc:
            self._restart_backoff = min(max(self._restart_backoff * 2, 0.1), self.probe_max_s)
            self._restart_at = time.monotonic() + self._restart_backoff
            self._set_health(False, f"{PRODUCER_LOST}: cannot start a producer process ({exc})")
            return
        with self._lock:
            self._proc = proc
        self._probe_now = True

    def _lost(self, proc: _ProducerProcess) -> None:
        """The producer process died (EOF, or reaped): fail its un-reported flights (a
        durable writer spools its batch; a replay stays in the spool; best-effort records
        are counted ``sink/producer_lost``), count it, and start another (backoff when
        they keep dying)."""
        with self._lock:
            if self._proc is not proc:
                return
            self._proc = None
            flights = [f for f in self._flights.values() if f.gen == proc.gen]
            calls = list(self._calls.values())
            self.producer_lost += 1
        with contextlib.suppress(OSError):
            proc.sock.shutdown(socket.SHUT_RDWR)
        proc.end(0.5)
        for old in self._dead:
            old.sock.close()
        self._dead = [proc]
        self._set_health(False, f"{PRODUCER_LOST}: producer process {proc.pid} {proc.how()}"
                                + ("" if self._stop.is_set() else "; restarting"))
        for c in calls:
            c.done.set()
        for f in flights:
            self._fail_lost(f)
        quick = time.monotonic() - proc.started < 10.0
        self._restart_backoff = min(max(self._restart_backoff * 2, 0.1), self.probe_max_s) if quick else 0.0
        self._restart_at = time.monotonic() + self._restart_backoff
        if not self._stop.is_set():
            _log.warning("kafka %s: producer process %d %s: %d flights failed, starting another",
                         self.bootstrap, proc.pid, proc.how(), len(flights))

    def _probe(self) -> bool:
        """Broker away, nothing spooled: does it answer metadata for our topics?"""
        timeout = min(2.0, self.probe_max_s)
        if self.producer is not None:
            status, topic, words = _topics_state(self.producer, False, timeout)
        else:
            res = self._call(PROBE, 0, timeout, timeout + 2.0, pump=True)
            proc = self._proc
            if res is None and proc is not None and (
                    proc.ready or time.monotonic() - proc.started > self.start_timeout_s):
                # hung (its probe has its own bound): kill it; the EOF replaces it
                _log.warning("kafka %s: producer process %d does not answer: killing it",
                             self.bootstrap, proc.pid)
                with contextlib.suppress(OSError):
                    proc.popen.kill()
            if res is None:
                status, topic, words = TOPICS_UNAVAILABLE, "", "the producer process does not answer"
            else:
                status, (topic, _, words) = res[0], res[1].partition("\n")
        if status == TOPICS_UNAVAILABLE:
            if self._proc is not None or self.producer is not None:
                self._set_health(False, f"{BROKER_UNAVAILABLE}: {words}")
            return False
        if status == TOPICS_MISSING:
            self._set_health(False, f"{UNKNOWN_TOPIC}: {topic} ({words})")
            return False
        self._set_health(True)
        return True

    def _check_topics(self, timeout: float) -> str | None:
        """:func:`check_topics` through this sink's producer (or producer process)."""
        if self.producer is not None:
            return check_topics(self.producer, self.bootstrap, timeout)
        res = self._call(PROBE, 1, timeout, timeout + 5.0, pump=False)
        if res is None:
            return f"{BROKER_UNAVAILABLE}: {self.bootstrap} does not answer (the producer process does not)"
        status, (topic, _, words) = res[0], res[1].partition("\n")
        return _topics_verdict(status, topic, words, self.bootstrap)

    def _replay_one(self) -> bool:
        """Replay from the spool head: a window of batches in flight at once (one round
        trip per batch would fall behind a host that keeps denying), popped in order as
        each is fully acked; the first one that is not stops the round."""
        batches = self.spool.peek_many(self.replay_window_batches, self.replay_window_bytes)
        if not batches:
            return True
        flights: list[_Flight] = []
        for batch in batches:
            flight = _Flight(self, durable=True, count=batch.count, replay=True)
            self._produce(batch, flight)
            flights.append(flight)
            if flight.short:
                self._set_health(False, f"{QUEUE_FULL}: librdkafka's queue is full")
                break
        deadline = time.monotonic() + max(self.ack_timeout_s, 5.0)
        for flight in flights:
            while (not flight.finished and not flight.short and time.monotonic() < deadline
                   and not self._stop.is_set()):
                self._pump(0.05)
            if not flight.ok:
                if flight.short:
                    self._set_health(False, f"{QUEUE_FULL}: librdkafka's queue is full")
                elif not flight.finished:
                    self._set_health(False, f"{BROKER_UNAVAILABLE}: spool replay not acked in time")
                return False
            self.spool.pop()
        return True

    # ------------------------------------------------------------------ close
    async def aclose(self) -> None:
        """Flush what librdkafka holds (up to ``close_timeout_s``), stop the poll thread
        (and the producer process), close the spool (what it holds stays on disk for the
        next run or ``aegis fleet ship``).  Best-effort records still unacknowledged are
        counted ``sink/shutdown``."""
        if self._stop.is_set():
            return
        self._stop.set()
        await trio.to_thread.run_sync(self._thread.join)
        if self.producer is not None:
            await trio.to_thread.run_sync(self.producer.flush, self.close_timeout_s)
        else:
            await trio.to_thread.run_sync(self._close_process)
        with self._lock:
            left = list(self._flights.values())
            self._flights.clear()
        for f in left:
            f.finished = True
            if not f.durable:
                self._drop(SHUTDOWN, (f.n if f.sealed else f.count) - f.acked - f.failed)
        self.spool.close()

    def _close_process(self) -> None:
        """FLUSH (bounded), then EOF; the process is reaped (SIGKILL if it lingers)."""
        if self._proc is not None:
            self._call(FLUSH, 0, self.close_timeout_s, self.close_timeout_s + 2.0, pump=True)
        self._send_q.put(None)
        if self._sender is not None:
            self._sender.join(2.0)
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.sock.shutdown(socket.SHUT_WR)  # EOF: it flushes what is left and exits
            proc.end(2.0)
            self._dead.append(proc)
        for old in self._dead:
            old.sock.close()
        self._dead = []

    def statistics(self) -> KafkaSinkStatistics:
        with self._lock:
            return KafkaSinkStatistics(
                self.name, self.batches, self.events, self.bytes, self.failures, self.failed_events,
                bootstrap=self.bootstrap, host_key=self.host_key, up=self._up, reason=self._reason,
                sent=self.sent, acked=self.acked, retried=self.retried, spooled=self.spooled,
                delivery_failed=self.delivery_failed,
                dropped=dict(self.dropped), rtt_buckets=tuple(self.rtt), rtt_sum=self.rtt_sum,
                rtt_count=self.rtt_count, spool=self.spool.statistics(),
                producer_pid=self.producer_pid, producer_lost=self.producer_lost,
            )


def _topics_verdict(status: int, topic: str, words: str, bootstrap: str) -> str | None:
    if status == TOPICS_UNAVAILABLE:
        return f"{BROKER_UNAVAILABLE}: {bootstrap} does not answer ({words})"
    if status == TOPICS_MISSING:
        raise KafkaSinkError(f"kafka: topic {topic} does not exist on {bootstrap} "
                             f"(create the fleet topics first: aegis fleet topics create)")
    return None


def check_topics(producer: Producer, bootstrap: str, timeout: float = 5.0) -> str | None:
    """At start: None when every sink topic exists; a reason when the broker does not
    answer (the sink starts degraded and spools); KafkaSinkError when it answers without
    one of the topics (a one-line refusal to start)."""
    return _topics_verdict(*_topics_state(producer, True, timeout), bootstrap)


async def open_kafka_sink(bootstrap: str, *, host_key: str | None = None,
                          spool_dir: str | os.PathLike[str], check_timeout_s: float = 5.0,
                          strict: bool = True, **kwargs: Any) -> KafkaSink:
    """A KafkaSink whose topics were checked.  A broker that does not answer yet gives a
    sink that starts down (denies spool); a broker without the topics refuses the start
    (one-line KafkaSinkError) when ``strict``, else the sink starts down with reason
    ``sink/unknown_topic`` and probes until they exist."""
    sink = KafkaSink(bootstrap, host_key=host_key, spool_dir=spool_dir, **kwargs)
    sink._token = trio.lowlevel.current_trio_token()
    try:
        why = await trio.to_thread.run_sync(sink._check_topics, check_timeout_s)
    except KafkaSinkError as exc:
        if strict:
            await sink.aclose()
            raise
        why = f"{UNKNOWN_TOPIC}: {exc}".replace("kafka: ", "", 1)
    except BaseException:
        await sink.aclose()
        raise
    if why:
        sink._set_health(False, why)
    return sink


def preflight(bootstrap: str, host_key: str | None = None, *, timeout: float = 3.0) -> str:
    """The CLI's check before the agent starts: the address parses, the host key is sane,
    and a broker that answers has the topics.  Returns the normalised bootstrap; raises a
    one-line KafkaSinkError.  A broker that does not answer is not an error here: the
    agent starts with the sink down (degraded, denies spooled)."""
    boot = parse_bootstrap(bootstrap)
    if host_key is not None:
        check_host_key(host_key)
    try:
        from confluent_kafka import Producer as _Producer
    except ImportError:
        raise KafkaSinkError("kafka: confluent-kafka is not installed (pip install 'aegis-stream[fleet]')") \
            from None
    producer = cast(Producer, _Producer({"bootstrap.servers": boot, "logger": _rdkafka_log,
                                         "socket.connection.setup.timeout.ms": int(timeout * 1000)}))
    check_topics(producer, boot, timeout)
    return boot
