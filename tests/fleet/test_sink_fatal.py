"""A fatal librdkafka error in the sink's producer process (a real one: librdkafka's
``rd_kafka_test_fatal_error`` with the idempotent producer's OUT_OF_ORDER_SEQUENCE_NUMBER,
on a real broker) does not leave the sink dead: the process ends, is counted and
replaced, the denies it had not acknowledged are re-sent from the spool (0 lost, order
kept), best-effort losses are counted."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import trio

from aegis_stream.fleet.broker import LocalBroker
from aegis_stream.fleet.sink import PRODUCER_LOST, open_kafka_sink

from .test_sink import read_back_after_producer_loss, stream_mixed


async def test_fatal_librdkafka_error_restarts_the_producer(kafka_broker: LocalBroker,
                                                            tmp_path: Path) -> None:
    host = f"host-{uuid.uuid4().hex[:8]}"
    flag = tmp_path / "fatal-fired"
    reasons: list[str] = []
    sink = await open_kafka_sink(kafka_broker.bootstrap, host_key=host, spool_dir=tmp_path / "spool",
                                 ack_timeout_s=2.0, probe_max_s=1.0,
                                 producer_factory="tests.fleet._fatal_producer:make",
                                 producer_factory_kwargs={"after": 400, "flag": str(flag)},
                                 on_health=lambda up, why: reasons.append(why) if not up else None)
    written = {"deny": 0, "audit": 0}
    first_pid = sink.producer_pid
    stop = trio.Event()

    t0 = time.monotonic()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream_mixed, sink, host, written, stop)
            with trio.fail_after(30):  # fired, noticed, replaced
                while not (flag.exists() and sink.producer_pid not in (0, first_pid)):
                    await trio.sleep(0.01)
            await trio.sleep(1.0)  # the new process carries the stream
            with trio.fail_after(30):  # the spool drains through it
                while not (sink.up and sink.spool.pending_batches == 0):
                    await trio.sleep(0.05)
            stop.set()
    finally:
        await sink.aclose()
    st = sink.statistics()
    print(f"{time.monotonic() - t0:.1f}s; written {written}; {st}; reasons {reasons}")
    assert st.producer_lost == 1, st
    assert any("fatal librdkafka error" in r for r in reasons), reasons
    assert st.up and st.acked > 0

    # 0 denies lost; audit never duplicated, every missing record counted (purged by the
    # fatal error or lost with the process)
    await read_back_after_producer_loss(kafka_broker.bootstrap, host, written,
                                        sum(st.dropped.values()))
    assert sum(st.dropped.values()) > 0
    assert set(k for k, v in st.dropped.items() if v) <= {PRODUCER_LOST, "sink/broker_unavailable"}
