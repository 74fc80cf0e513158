"""The Kafka sink's producer process against a real broker: SIGKILLed mid-stream (three
times), it is noticed, counted and replaced; 0 denies lost, each host's order kept; audit
never duplicated and never lost uncounted."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import trio

from aegis_stream.fleet.broker import LocalBroker
from aegis_stream.fleet.sink import PRODUCER_LOST, open_kafka_sink

from .test_sink import read_back_after_producer_loss, stream_mixed


async def test_producer_process_killed_mid_stream(kafka_broker: LocalBroker, tmp_path: Path) -> None:
    host = f"host-{uuid.uuid4().hex[:8]}"
    sink = await open_kafka_sink(kafka_broker.bootstrap, host_key=host, spool_dir=tmp_path,
                                 ack_timeout_s=2.0, probe_max_s=1.0)
    written = {"deny": 0, "audit": 0}
    killed: list[int] = []
    stop = trio.Event()

    t0 = time.monotonic()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream_mixed, sink, host, written, stop)
            for _ in range(3):
                await trio.sleep(1.0)
                pid = sink.producer_pid
                assert pid not in (0, os.getpid())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                with trio.fail_after(10):  # noticed and replaced
                    while sink.producer_pid in (0, pid):
                        await trio.sleep(0.01)
            with trio.fail_after(30):  # the spool drains through the last one
                while not (sink.up and sink.spool.pending_batches == 0):
                    await trio.sleep(0.05)
            await trio.sleep(0.5)
            stop.set()
    finally:
        await sink.aclose()
    st = sink.statistics()
    print(f"{time.monotonic() - t0:.1f}s; written {written}; killed {killed}; {st}")
    assert st.producer_lost == 3 and len(set(killed)) == 3
    await read_back_after_producer_loss(kafka_broker.bootstrap, host, written,
                                        sum(st.dropped.values()))
    assert set(st.dropped) >= {PRODUCER_LOST}
    assert st.spool is not None and st.spool.replayed_events == st.spooled
