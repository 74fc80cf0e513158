"""The sink writer: deny batches waiting behind a slow write are coalesced into one write
per class (order kept, each explanation after its deny), within the size limits; a stop
mid-write parks every deny batch it held (pytest-trio, MockClock with autojump)."""

from __future__ import annotations

import trio

from aegis_stream.pipeline import PipelineConfig, writers
from aegis_stream.pipeline.context import StageContext
from aegis_stream.pipeline.sinks import MemorySink, SinkBatch
from aegis_stream.testing import fixed_normaliser


class Recording(MemorySink):
    """A slow sink that remembers each write's class and count."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay=delay)
        self.writes: list[tuple[str, int]] = []

    async def write(self, batch: SinkBatch) -> None:
        await super().write(batch)
        self.writes.append((batch.klass, batch.count))


def deny(i: int, n: int = 3) -> SinkBatch:
    lines = b"".join(b'{"d":%d,"j":%d}\n' % (i, j) for j in range(n))
    return SinkBatch("deny", lines, n, raw=("raw", i))


def expl(i: int) -> SinkBatch:
    return SinkBatch("explanation", b'{"e":%d}\n' % i, 1)


def ctx_for(store, tmp_path) -> StageContext:
    return StageContext(PipelineConfig(spool_dir=None), fixed_normaliser(store))


async def test_waiting_deny_batches_go_as_one_write_per_class(store, tmp_path, autojump_clock):
    ctx = ctx_for(store, tmp_path)
    ctx.acct["deny"].read = 60
    sink = Recording(delay=0.05)
    w = writers.SinkWriter(ctx, [sink])
    send, recv = trio.open_memory_channel[SinkBatch](64)
    async with trio.open_nursery() as n:
        n.start_soon(w.run, "deny", recv)
        for i in range(20):  # all but the first queued while the first write is in progress
            await send.send(deny(i))
            await send.send(expl(i))
            if i == 0:
                await trio.sleep(0.01)
        await send.aclose()
    assert ctx.acct["deny"].delivered == 60 and ctx.acct["deny"].in_flight == 0
    assert w.derived == {"explanation": 20}
    # the first batch went alone (nothing waited yet), the rest in one write per class
    assert sink.writes[:2] == [("deny", 3), ("explanation", 1)]
    assert sink.writes[2:] == [("deny", 57), ("explanation", 19)]
    assert w.coalesced_writes == 2 and w.coalesced_batches == 40
    denies = [ln for ln in sink.lines if ln.startswith(b'{"d"')]
    assert denies == [b'{"d":%d,"j":%d}' % (i, j) for i in range(20) for j in range(3)]
    exps = [ln for ln in sink.lines if ln.startswith(b'{"e"')]
    assert exps == [b'{"e":%d}' % i for i in range(20)]


async def test_coalescing_respects_the_limits(store, tmp_path, autojump_clock, monkeypatch):
    monkeypatch.setattr(writers, "COALESCE_MAX_EVENTS", 7)
    ctx = ctx_for(store, tmp_path)
    ctx.acct["deny"].read = 30
    sink = Recording(delay=0.05)
    w = writers.SinkWriter(ctx, [sink])
    send, recv = trio.open_memory_channel[SinkBatch](64)
    async with trio.open_nursery() as n:
        n.start_soon(w.run, "deny", recv)
        for i in range(10):
            await send.send(deny(i))
            if i == 0:
                await trio.sleep(0.01)
        await send.aclose()
    # at most 7 events a write: 2 batches of 3 each time (the first alone)
    assert [c for _, c in sink.writes] == [3, 6, 6, 6, 6, 3]
    assert ctx.acct["deny"].delivered == 30
    assert b"".join(ln + b"\n" for ln in sink.lines) == b"".join(deny(i).lines for i in range(10))


async def test_a_stop_mid_write_parks_each_deny_batch_it_held(store, tmp_path, autojump_clock):
    ctx = ctx_for(store, tmp_path)
    ctx.acct["deny"].read = 30
    parked: list[object] = []
    ctx.park = lambda klass, count, raw, rank: parked.append(raw)  # type: ignore[method-assign]
    sink = Recording(delay=1.0)
    w = writers.SinkWriter(ctx, [sink])
    send, recv = trio.open_memory_channel[SinkBatch](64)
    async with trio.open_nursery() as n:
        n.start_soon(w.run, "deny", recv)
        for i in range(10):
            await send.send(deny(i))
            if i == 0:
                await trio.sleep(0.01)
        await trio.sleep(1.5)  # the first write is done, the coalesced second is not
        n.cancel_scope.cancel()
    assert sink.writes == [("deny", 3)] and ctx.acct["deny"].delivered == 3
    # the nine batches of the coalesced write are parked one by one, with their raw records
    assert parked == [("raw", i) for i in range(1, 10)]


def test_coalesce_puts_denies_first() -> None:
    # a limit can leave an explanation at the head of the next write: its deny was
    # written already, and the next deny must still come before its own explanation
    out = writers.coalesce([expl(5), deny(6), expl(6)], "deny")
    assert [(b.klass, b.count) for b in out] == [("deny", 3), ("explanation", 2)]
    assert out[1].lines == b'{"e":5}\n{"e":6}\n'
    assert writers.coalesce([deny(1)], "deny") == [deny(1)]
