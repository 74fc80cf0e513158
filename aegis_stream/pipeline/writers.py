"""The last stage: encoded channel -> every sink.

A deny batch is retried (backing off up to ``sink_retry_max_s``) until every sink has
it; a failed audit batch is dropped, counted ``sink/error``.  Derived records (state,
SLO, explanations) are written once and counted as derived, failed or not."""

from __future__ import annotations

import trio

from aegis_stream.pipeline.config import log
from aegis_stream.pipeline.context import ParkRank, StageContext, drain_nowait
from aegis_stream.pipeline.sinks import Sink, SinkBatch


class SinkWriter:
    """Writes batches to every sink, one write per sink at a time."""

    def __init__(self, ctx: StageContext, sinks: list[Sink]) -> None:
        self.ctx = ctx
        self.sinks = sinks
        self._locks = [trio.Lock() for _ in sinks]
        #: names of the sinks whose last write failed (the degraded signal reads it)
        self.failing: set[str] = set()
        self.derived: dict[str, int] = {}  # state/slo/explanation records written
        self.derived_failed = 0

    async def _write_one(self, i: int, batch: SinkBatch) -> bool:
        sink = self.sinks[i]
        async with self._locks[i]:
            try:
                await sink.write(batch)
            except Exception as exc:
                if sink.name not in self.failing:
                    log(f"sink {sink.name} failed: {exc}")
                self.failing.add(sink.name)
                return False
        self.failing.discard(sink.name)
        return True

    def _count_derived(self, batch: SinkBatch, failed: bool) -> None:
        self.derived[batch.klass] = self.derived.get(batch.klass, 0) + batch.count
        self.derived_failed += batch.count if failed else 0

    async def run(self, klass: str, recv: trio.MemoryReceiveChannel[SinkBatch]) -> None:
        async with recv:
            current: list[SinkBatch] = []
            try:
                await self._loop(klass, recv, current)
            except trio.Cancelled:
                for b in current + drain_nowait(recv):
                    if b.klass == klass:
                        self.ctx.park(klass, b.count, b.raw, ParkRank.WRITER)
                raise

    async def _loop(self, klass: str, recv: trio.MemoryReceiveChannel[SinkBatch],
                    current: list[SinkBatch]) -> None:
        cfg = self.ctx.config
        acct = self.ctx.acct[klass]
        async for batch in recv:
            current[:] = [batch]
            pending = list(range(len(self.sinks)))
            delay = cfg.sink_retry_initial_s
            while True:
                pending = [i for i in pending if not await self._write_one(i, batch)]
                if not pending or klass != "deny":
                    break
                await trio.sleep(delay)  # denies: retried until every sink has them
                delay = min(delay * 2, cfg.sink_retry_max_s)
            if batch.klass != klass:  # explanations riding the deny channel
                self._count_derived(batch, bool(pending))
            elif pending:
                acct.drop("sink", "error", batch.count)
            else:
                acct.delivered += batch.count
            current.clear()

    async def write_derived(self, batch: SinkBatch) -> None:
        """A derived record (state, SLO): once to every sink, counted either way."""
        failed = False
        for i in range(len(self.sinks)):
            failed |= not await self._write_one(i, batch)
        self._count_derived(batch, failed)
