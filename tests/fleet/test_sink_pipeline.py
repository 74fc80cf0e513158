"""The real Pipeline on the fake kernel writing to a file-like MemorySink and a KafkaSink
side by side: the topics get exactly the records the other sink got, each on its topic."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import trio

from aegis_stream.fleet.broker import LocalBroker
from aegis_stream.fleet.sink import open_kafka_sink
from aegis_stream.fleet.topics import DECISION_TOPIC, EXPLANATION_TOPIC, STATE_TOPIC
from aegis_stream.kernel import abi
from aegis_stream.pipeline.schema import DecisionEvent, ExplanationEvent, StateEvent, event_decoder
from aegis_stream.pipeline.sinks import MemorySink
from aegis_stream.testing import CG_APP, CG_ROOT, CG_WORKLOADS, DEV_SDA1, FakeTask, install, sample_record

from .test_sink import consume

APP = FakeTask(pid=4242, tgid=4242, comm="cat", cgroups=(CG_ROOT, CG_WORKLOADS, CG_APP))


async def test_pipeline_to_kafka_and_memory(make_pipeline: Any, kernel: Any, store: Any,
                                            kafka_broker: LocalBroker, tmp_path: Path) -> None:
    host = f"host-{uuid.uuid4().hex[:8]}"
    install(kernel, store, sample_record(7, mode="enforce"))
    mem = MemorySink()
    kafka = await open_kafka_sink(kafka_broker.bootstrap, host_key=host, spool_dir=tmp_path / "kspool")
    p = make_pipeline(kernel, store, [mem, kafka], tmp_path)
    try:
        async with trio.open_nursery() as n:
            await n.start(p.run)
            for _ in range(25):
                assert kernel.decide(abi.Hook.FILE_OPEN, DEV_SDA1, 1234, abi.ACTION_OPEN, APP) == -1
                assert kernel.decide(abi.Hook.BPRM_CHECK, DEV_SDA1, 5678, abi.ACTION_EXEC, APP) == -1
            await trio.sleep(1.2)  # a tick or two: state records
            assert await p.drain_and_stop()
    finally:
        await kafka.aclose()
    evs = [event_decoder.decode(x) for x in mem.lines]
    want_dec = [e.event_id for e in evs if isinstance(e, DecisionEvent)]
    want_exp = [e.event_id for e in evs if isinstance(e, ExplanationEvent)]
    n_state = sum(isinstance(e, StateEvent) for e in evs)
    assert len(want_dec) == 50 and len(want_exp) == 50 and n_state >= 1
    key = {host.encode()}
    dec = await trio.to_thread.run_sync(consume, kafka_broker.bootstrap, DECISION_TOPIC, key,
                                        lambda r: len(r) >= 50)
    exp = await trio.to_thread.run_sync(consume, kafka_broker.bootstrap, EXPLANATION_TOPIC, key,
                                        lambda r: len(r) >= 50)
    st = await trio.to_thread.run_sync(consume, kafka_broker.bootstrap, STATE_TOPIC, key,
                                       lambda r: len(r) >= n_state)
    assert [v["event_id"] for _, v, _, _ in dec] == want_dec  # same records, same order
    assert [v["event_id"] for _, v, _, _ in exp] == want_exp
    assert {h["aegis-schema"] for _, _, h, _ in st} <= {b"aegis.state.v1", b"aegis.slo.v1"}
    assert sum(h["aegis-schema"] == b"aegis.state.v1" for _, _, h, _ in st) == n_state
    s = kafka.statistics()
    assert s.spooled == 0 and sum(s.dropped.values()) == 0 and s.acked == s.sent
