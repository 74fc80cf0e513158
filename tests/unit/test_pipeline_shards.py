"""Audit normalise+encode sharded across forked worker processes: the same bytes in the
same (ring) order as the in-process encoder, exact accounting, and a worker that dies
loses nothing (real clock: the workers are real processes)."""

from __future__ import annotations

import os
import signal

import msgspec
import pytest
import trio

from aegis_stream.pipeline import Pipeline, PipelineConfig
from aegis_stream.pipeline.sinks import MemorySink
from aegis_stream.policy.store import PolicyStore
from aegis_stream.testing import FakeKernel, fixed_normaliser, make_events, sample_record

PROCS = {1000 + i: ("/usr/bin/cat", ["cat", "/etc/shadow"]) for i in range(16)}


@pytest.fixture
def ring_sizes():
    return 1 << 16, 1 << 23  # the audit ring never sheds


def pipeline(kernel, tmp_path, sink, workers: int) -> Pipeline:
    store = PolicyStore(tmp_path / "state")
    store.record(sample_record(7))
    return Pipeline(kernel.consumers(), fixed_normaliser(store, processes=PROCS), [sink], kernel.view(),
                    config=PipelineConfig(spool_dir=str(tmp_path / "spool"), tick_s=0.2, batch_max=256,
                                          audit_workers=workers))


async def run_bursts(kernel, p: Pipeline, bursts: int, *, kill_one: bool = False) -> None:
    async with trio.open_nursery() as n:
        await n.start(p.run)
        for i in range(bursts):
            kernel.emit_bulk("audit", make_events(500, generation=7, rule_ids=3, pids=16,
                                                  start_ktime=(i + 1) * 10**7), 500)
            if kill_one and i == bursts // 2:
                os.kill(p._workers[0].pid, signal.SIGKILL)
            await trio.sleep(0.01)
        assert await p.drain_and_stop(timeout=30)


@pytest.mark.parametrize("kill_one", [False, True])
async def test_sharded_audit_same_bytes_same_order_exact_accounting(kernel, tmp_path, kill_one):
    sink = MemorySink()
    p = pipeline(kernel, tmp_path, sink, workers=2)
    await run_bursts(kernel, p, 12, kill_one=kill_one)
    st = p.statistics()
    a = st.classes["audit"]
    assert a.kernel_emitted == kernel.truth.decisions["audit"] == 6_000
    assert a.kernel_dropped == kernel.truth.ring_failed["audit"] == 0
    assert a.delivered == 6_000 and a.dropped == {} and a.in_flight == 0
    lines = [x for x in sink.lines if b'"aegis.decision.v1"' in x]
    kts = [msgspec.json.decode(x)["ktime_ns"] for x in lines]
    assert kts == sorted(kts) and len(set(kts)) == 6_000  # ring order, no duplicate
    # byte-identical to the in-process encoder
    ref_kernel = FakeKernel(deny_ring_size=1 << 16, audit_ring_size=1 << 23)
    try:
        ref_sink = MemorySink()
        ref = pipeline(ref_kernel, tmp_path / "ref", ref_sink, workers=0)
        await run_bursts(ref_kernel, ref, 12)
    finally:
        ref_kernel.close()
    assert [x for x in ref_sink.lines if b'"aegis.decision.v1"' in x] == lines
    # the workers are gone
    for w in p._workers:
        with pytest.raises(ChildProcessError):
            os.waitpid(w.pid, os.WNOHANG)
