"""The Kafka sink's producer process: librdkafka's produce loop out of the agent's process.

The produce loop costs ~6 us of Python per record (the record headers more than the
call); in the agent's process it competes with the ring readers and the normaliser for
the GIL.  :class:`~aegis_stream.fleet.sink.KafkaSink` (process mode, the default) starts
this module as a separate interpreter (``python -m aegis_stream.fleet.producer SPEC``)
holding the other end of a Unix socket pair: one frame per batch goes down, one small
frame per batch comes back with its delivery counts.  Not a fork of the agent: a forked
copy of a process with librdkafka threads (an in-process sink, a consumer, preflight's
producer) died of SIGSEGV here, and a fresh interpreter also leaves the agent's rings,
caches and memory behind.  This module imports no pipeline code (the child starts in
~0.2 s); the sink's reason codes and routes live here so both sides share them.
"""

from __future__ import annotations

import importlib
import json
import logging
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

from aegis_stream.fleet.topics import (
    DECISION_TOPIC,
    EXPLANATION_TOPIC,
    STATE_TOPIC,
    schema_headers,
)
from aegis_stream.framing import recv_exact, socket_pair

_log = logging.getLogger("aegis.fleet.kafka")
_rdkafka_log = logging.getLogger("aegis.fleet.kafka.librdkafka")
_rdkafka_log.propagate = False
_rdkafka_log.addHandler(logging.NullHandler())

#: class -> (topic, schema name, schema version)
ROUTES: Mapping[str, tuple[str, str, int]] = {
    "deny": (DECISION_TOPIC, "aegis.decision.v1", 1),
    "audit": (DECISION_TOPIC, "aegis.decision.v1", 1),
    "explanation": (EXPLANATION_TOPIC, "aegis.explanation.v1", 1),
    "state": (STATE_TOPIC, "aegis.state.v1", 1),
    "slo": (STATE_TOPIC, "aegis.slo.v1", 1),
    # deny-storm summaries (counts, not decision records: the decision topic's consumers
    # read aegis.decision.v1 only); appended, so the spool's class codes stay as they were
    "storm": (STATE_TOPIC, "aegis.storm.v1", 1),
}
#: classes that are spooled, never shed (explanations ride with their denies)
DURABLE = frozenset({"deny", "explanation"})
_KLASS_CODE = {k: i for i, k in enumerate(ROUTES)}
_CODE_KLASS = dict(enumerate(ROUTES))

# reason codes of dropped records (aegis_sink_dropped_total{reason})
BROKER_UNAVAILABLE = "sink/broker_unavailable"
QUEUE_FULL = "sink/queue_full"
UNKNOWN_TOPIC = "sink/unknown_topic"
TOO_LARGE = "sink/too_large"
DELIVERY_FAILED = "sink/delivery_failed"
SHUTDOWN = "sink/shutdown"
PRODUCER_LOST = "sink/producer_lost"  # the producer process died before reporting them
#: the producer process's exit status after a fatal librdkafka error (the sink replaces it)
FATAL_EXIT = 3
REASONS = (BROKER_UNAVAILABLE, QUEUE_FULL, UNKNOWN_TOPIC, TOO_LARGE, DELIVERY_FAILED, SHUTDOWN,
           PRODUCER_LOST)


class Producer(Protocol):
    """The part of ``confluent_kafka.Producer`` the sink uses (a fake implements it)."""

    def produce(self, topic: str, value: bytes, key: bytes, *, headers: Any,
                on_delivery: Callable[[Any, Any], None]) -> None: ...
    def poll(self, timeout: float) -> int: ...
    def flush(self, timeout: float) -> int: ...
    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any: ...


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """librdkafka settings of the sink (overrides win; docs/FLEET.md explains each)."""
    cfg: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,  # no duplicates or reordering from librdkafka's retries
        "acks": "all",
        "linger.ms": 5,
        "batch.size": 1 << 20,
        "compression.type": "lz4",
        # bounded local queue: ~20k events of audit in flight; beyond it audit is shed
        "queue.buffering.max.messages": 100_000,
        "queue.buffering.max.kbytes": 32 << 10,
        # a record not acked in 60 s fails its delivery report (durable: it is already spooled;
        # best effort: counted).  Long enough to ride out a broker restart, after which a
        # timed-out record might still have been written ("possibly persisted")
        "message.timeout.ms": 60_000,
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 1000,
        "socket.connection.setup.timeout.ms": 5000,
        # librdkafka logs a line per failed connect; what matters reaches the sink through
        # error_cb and delivery reports (health, counted reasons), so its log is not printed
        "logger": _rdkafka_log,
    }
    cfg.update(overrides)
    return cfg


def _kafka_error_codes() -> dict[int, str]:
    try:
        from confluent_kafka import KafkaError
    except ImportError:  # pragma: no cover - the [fleet] extra is missing
        return {}
    ke: Any = KafkaError
    codes = {
        ke._MSG_TIMED_OUT: BROKER_UNAVAILABLE, ke._TRANSPORT: BROKER_UNAVAILABLE,
        ke._ALL_BROKERS_DOWN: BROKER_UNAVAILABLE, ke._PURGE_QUEUE: BROKER_UNAVAILABLE,
        ke._PURGE_INFLIGHT: BROKER_UNAVAILABLE, ke._TIMED_OUT: BROKER_UNAVAILABLE,
        ke.NOT_ENOUGH_REPLICAS: BROKER_UNAVAILABLE, ke.REQUEST_TIMED_OUT: BROKER_UNAVAILABLE,
        ke._QUEUE_FULL: QUEUE_FULL,
        ke._UNKNOWN_TOPIC: UNKNOWN_TOPIC, ke.UNKNOWN_TOPIC_OR_PART: UNKNOWN_TOPIC,
        ke.MSG_SIZE_TOO_LARGE: TOO_LARGE,
    }
    return codes


_CODES: dict[int, str] | None = None  # built on first use: no librdkafka import without --kafka


def reason_of(err: Any) -> str:
    """A delivery error -> the reason code it is counted under."""
    global _CODES
    if _CODES is None:
        _CODES = _kafka_error_codes()
    try:
        return _CODES.get(err.code(), DELIVERY_FAILED)
    except Exception:
        return DELIVERY_FAILED


def _words(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else exc
    s = getattr(arg, "str", None)
    return s() if callable(s) else str(arg)



# The produce loop costs ~6 us of Python per record (the headers more than the call); in the
# agent's process it competes with the ring readers and the normaliser for the GIL.  In
# process mode (the default) a forked child (pipeline.workers.fork_with_socket, like the
# audit encoders) owns the librdkafka producer: one frame per batch goes down the socket
# pair, one small frame per batch comes back with its delivery counts.
#
#   agent -> child   <B kind><B arg><H 0><I body length><Q seq> body
#       BATCH  arg = class code, body = the batch's JSON lines
#       PROBE  arg = 1: all sink topics, 0: the decision topic; body = <d timeout>
#       FLUSH  body = <d timeout>
#   child -> agent   the same header
#       DONE   arg bit 0 = whole; body = <I produced><I acked><I failed><d latency, <0 none>
#              then <B reason index><I count> per failure reason (REASONS order)
#       SHORT  librdkafka's queue was full; body = <I produced> (a DONE follows)
#       HEALTH arg = 1 up / 0 down; body = the reason (utf-8)
#       REPLY  to PROBE/FLUSH (seq = the request's): arg = status; body = utf-8 text
#       READY  first, once its producer exists
_HDR = struct.Struct("<BBHIQ")
_DONE = struct.Struct("<IIId")
_REASON = struct.Struct("<BI")
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")
BATCH, PROBE, FLUSH = 1, 2, 3
DONE, SHORT, HEALTH, REPLY, READY = 1, 2, 3, 4, 5
#: PROBE reply status
TOPICS_OK, TOPICS_UNAVAILABLE, TOPICS_MISSING = 0, 1, 2
_REASON_INDEX = {r: i for i, r in enumerate(REASONS)}


def _topics_state(producer: Producer, all_topics: bool, timeout: float) -> tuple[int, str, str]:
    """(status, topic, words) of a metadata request: every sink topic, or the decision
    topic only (the probe while the broker is away)."""
    try:
        md = (producer.list_topics(timeout=timeout) if all_topics
              else producer.list_topics(DECISION_TOPIC, timeout=timeout))
    except Exception as exc:
        return TOPICS_UNAVAILABLE, "", _words(exc)
    for topic in (sorted({r[0] for r in ROUTES.values()}) if all_topics else [DECISION_TOPIC]):
        t = md.topics.get(topic)
        if t is None or t.error is not None:
            return TOPICS_MISSING, topic, t.error.str() if t is not None and t.error else "missing"
    return TOPICS_OK, "", ""


def _kafka_error(exc: BaseException) -> Any:
    """The KafkaError inside a KafkaException (None for any other exception)."""
    err = exc.args[0] if exc.args else None
    return err if callable(getattr(err, "fatal", None)) and callable(getattr(err, "code", None)) else None


def _is_fatal_code(err: Any) -> bool:
    """librdkafka's ``_FATAL``: refused because the producer is in a fatal state."""
    try:
        from confluent_kafka import KafkaError
    except ImportError:  # pragma: no cover
        return False
    return bool(err.code() == cast(Any, KafkaError)._FATAL)


def _health_of_error(err: Any) -> str | None:
    """librdkafka's error_cb -> a 'broker away' reason, or None when it is not one."""
    from confluent_kafka import KafkaError

    if err.code() == KafkaError._ALL_BROKERS_DOWN:
        return f"{BROKER_UNAVAILABLE}: {err.str()}"
    if err.fatal():
        return f"{DELIVERY_FAILED}: fatal producer error: {err.str()}"
    return None


def tally(report: Any, err: Any) -> bool:
    """Count one librdkafka delivery report into a batch's ``report`` (``acked``, or
    ``failed`` with ``reasons`` by :func:`reason_of`); True when it was the batch's last
    (``sealed``: every record produced, and ``n`` of them reported)."""
    if err is None:
        report.acked += 1
    else:
        report.failed += 1
        r = reason_of(err)
        report.reasons[r] = report.reasons.get(r, 0) + 1
    return bool(report.sealed and report.acked + report.failed >= report.n)


def latency_of(msg: Any) -> float | None:
    """The broker round trip librdkafka measured for ``msg`` (None when it has none)."""
    try:
        lat = msg.latency()
    except Exception:  # a stand-in message (tests) or a report without timing
        return None
    return None if lat is None else float(lat)


def _confluent_producer(cfg: dict[str, Any]) -> Producer:
    from confluent_kafka import Producer as _Producer

    return cast(Producer, _Producer(cfg))


class _ChildBatch:
    """One batch's delivery reports inside the producer process."""

    __slots__ = ("child", "seq", "n", "acked", "failed", "reasons", "sealed", "finished", "whole",
                 "latency")

    def __init__(self, child: _ProducerChild, seq: int) -> None:
        self.child = child
        self.seq = seq
        self.n = self.acked = self.failed = 0
        self.reasons: dict[str, int] = {}
        self.sealed = self.finished = self.whole = False
        self.latency = -1.0

    def __call__(self, err: Any, msg: Any) -> None:
        if tally(self, err):
            if msg is not None:
                lat = latency_of(msg)
                self.latency = -1.0 if lat is None else lat
            self.child.done(self)


class _ProducerChild:
    """The producer process: batches in, produce() per line with the class's pre-built
    topic and headers, one DONE frame per batch out.  Its main thread reads requests and
    produces; a poll thread serves delivery reports and sends the finished batches' frames
    (several per send).  No trio here."""

    def __init__(self, sock: socket.socket, factory: Callable[[dict[str, Any]], Producer],
                 config: Mapping[str, Any], key: bytes, eof_flush_s: float = 5.0) -> None:
        self.sock = sock
        self.key = key
        self.eof_flush_s = eof_flush_s
        self.lock = threading.Lock()  # the out list and the socket's send side
        self.out: list[bytes] = []
        self.stop = threading.Event()
        self.fatal: str | None = None  # librdkafka's words once it raised a fatal error
        # per class code: (topic, headers), built once
        self.routes = {_KLASS_CODE[k]: (t, schema_headers(s, v)) for k, (t, s, v) in ROUTES.items()}
        self.producer = factory({**config, "error_cb": self.error_cb})

    def send(self, frame: bytes = b"") -> None:
        """Send the finished batches' frames, then ``frame`` (order: a REPLY to FLUSH
        comes after the DONE frames of what the flush delivered)."""
        with self.lock:
            data = b"".join(self.out) + frame
            self.out.clear()
            if data:
                try:
                    self.sock.sendall(data)
                except OSError:
                    pass  # the agent is gone: the main thread sees EOF

    def done(self, b: _ChildBatch) -> None:
        reasons = b"".join(_REASON.pack(_REASON_INDEX.get(r, _REASON_INDEX[DELIVERY_FAILED]), c)
                           for r, c in b.reasons.items())
        body = _DONE.pack(b.n, b.acked, b.failed, b.latency) + reasons
        with self.lock:
            if b.finished:
                return
            b.finished = True
            self.out.append(_HDR.pack(DONE, 1 if b.whole else 0, 0, len(body), b.seq) + body)

    def error_cb(self, err: Any) -> None:
        try:
            if err.fatal():
                self.fatal_error(err.str())
                return
            why = _health_of_error(err)
        except Exception:
            return
        if why:
            body = why.encode()
            self.send(_HDR.pack(HEALTH, 0, 0, len(body), 0) + body)

    def fatal_error(self, words: str) -> None:
        """librdkafka raised a fatal error (e.g. the idempotent producer's sequence
        state is broken): this producer will not produce again.  Say so (HEALTH down)
        and end the process (EOF on the request side wakes the main thread; it exits
        with FATAL_EXIT without a flush).  The sink sees the EOF, fails what this process
        had not reported (a deny batch's writer spools it; the spool keeps a replay) and
        starts a fresh process, whose producer gets a new producer id."""
        with self.lock:
            if self.fatal is not None:
                return
            self.fatal = words
        _log.warning("kafka producer process: fatal librdkafka error: %s", words)
        body = f"{PRODUCER_LOST}: fatal librdkafka error: {words}".encode()
        self.send(_HDR.pack(HEALTH, 0, 0, len(body), 0) + body)
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def produce(self, seq: int, code: int, lines: bytes) -> None:
        b = _ChildBatch(self, seq)
        topic, headers = self.routes[code]
        produce = self.producer.produce
        key = self.key
        n = 0
        try:
            for line in lines.splitlines():
                if line:
                    try:
                        produce(topic, line, key, headers=headers, on_delivery=b)
                    except BufferError:
                        raise
                    except Exception as exc:  # refused at once (too large; fatal state)
                        err = _kafka_error(exc)
                        if err is None or err.fatal() or _is_fatal_code(err):
                            self.fatal_error(_words(exc))
                            return  # no DONE: the sink fails it with the process
                        tally(b, err)  # counted failed under its reason, like a report
                    n += 1
            b.whole = True
        except BufferError:
            self.send(_HDR.pack(SHORT, 0, 0, _U32.size, seq) + _U32.pack(n))
        b.n = n
        b.sealed = True
        if b.acked + b.failed >= n:
            b.latency = -1.0
            self.done(b)

    def reply(self, seq: int, status: int, text: str) -> None:
        body = text.encode()
        self.send(_HDR.pack(REPLY, status, 0, len(body), seq) + body)

    def poll_loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.producer.poll(0.05)
                self.send()
            except Exception as exc:
                # confluent-kafka raises a fatal error from poll() (error_cb may not see it)
                err = _kafka_error(exc)
                if err is not None and (err.fatal() or _is_fatal_code(err)):
                    self.fatal_error(_words(exc))
                    self.send()
                    continue
                _log.exception("kafka producer process: poll")
                time.sleep(0.1)

    def run(self) -> None:
        poller = threading.Thread(target=self.poll_loop, name="aegis-kafka-poll", daemon=True)
        poller.start()
        self.send(_HDR.pack(READY, 0, 0, 0, 0))
        try:
            while True:
                try:
                    kind, arg, _, length, seq = _HDR.unpack(recv_exact(self.sock, _HDR.size))
                    body = recv_exact(self.sock, length) if length else b""
                except (EOFError, OSError):
                    break  # the agent closed its end (after a FLUSH) or died
                if kind == BATCH:
                    self.produce(seq, arg, body)
                    self.send()
                elif kind == PROBE:
                    status, topic, words = _topics_state(self.producer, bool(arg), _F64.unpack(body)[0])
                    self.reply(seq, status, f"{topic}\n{words}")
                elif kind == FLUSH:
                    left = self.producer.flush(_F64.unpack(body)[0])
                    self.eof_flush_s = 0.0  # the agent's bound is spent: EOF exits at once
                    self.reply(seq, 0, str(left))
        finally:
            # deliver what is queued (bounded) before the process exits; a producer in a
            # fatal state delivers nothing more (its queue was purged)
            try:
                self.producer.flush(0.0 if self.fatal is not None else self.eof_flush_s)
            except Exception as exc:
                _log.warning("kafka producer process: final flush: %s", _words(exc))
            self.send()
            self.stop.set()
            poller.join(1.0)






def load_factory(spec: str) -> Callable[..., Producer]:
    """``module:attr`` -> the callable (a producer factory for tests and benches)."""
    mod, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return cast(Callable[..., Producer], obj)


def spawn(config: Mapping[str, Any], key: bytes, factory: str | None = None,
          factory_kwargs: Mapping[str, Any] | None = None) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start a producer process; returns it and the agent's end of its socket pair.
    ``config``: librdkafka settings (JSON values; the child adds its logger and error_cb).
    Raises TypeError/ValueError for a setting that is not JSON, OSError if it cannot start."""
    spec = json.dumps({"config": dict(config), "key": key.decode(), "factory": factory,
                       "factory_kwargs": dict(factory_kwargs or {}), "sys_path": sys.path})
    parent, child = socket_pair()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aegis_stream.fleet.producer", str(child.fileno())],
            stdin=subprocess.PIPE, pass_fds=(child.fileno(),), close_fds=True)
        assert proc.stdin is not None
        try:
            proc.stdin.write(spec.encode())
            proc.stdin.close()
        except OSError:
            pass  # it died at once: the sink sees the EOF
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return proc, parent


def main(argv: list[str] | None = None) -> int:
    """The producer process: ``python -m aegis_stream.fleet.producer FD`` with the spec (JSON)
    on stdin; runs until EOF on FD."""
    args = sys.argv[1:] if argv is None else argv
    # a terminal's ^C and a service manager's SIGTERM reach the whole group: the agent
    # drains, then FLUSHes and closes this process (EOF ends it; the agent's death too)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    spec = json.loads(sys.stdin.buffer.read())
    for path in reversed(spec.get("sys_path") or []):
        if path not in sys.path:
            sys.path.insert(0, path)
    sock = socket.socket(fileno=int(args[0]))
    kwargs = spec.get("factory_kwargs") or {}
    make = load_factory(spec["factory"]) if spec.get("factory") else _confluent_producer
    config = {**spec["config"], "logger": _rdkafka_log}
    child = _ProducerChild(sock, lambda cfg: make(cfg, **kwargs), config, spec["key"].encode())
    child.run()
    return FATAL_EXIT if child.fatal is not None else 0


if __name__ == "__main__":
    raise SystemExit(main())
