"""The last stage: encoded channel -> every sink.

A deny batch is retried (backing off up to ``sink_retry_max_s``) until every sink has
it; a failed audit batch is dropped, counted ``sink/error``.  Derived records (state,
SLO, explanations) are written once and counted as derived, failed or not.

Denies are coalesced: a sink that acknowledges each write (Kafka waits for ``acks=all``,
~10-30 ms) takes one write at a time, so at one write per ring read the deny path topped
out at ~40 batches/s (~270 denies/s) and a steady deny stream backed up into the disk
spool (docs/PERFORMANCE.md).  So the deny writer takes every batch already waiting in
its channel (up to :data:`COALESCE_MAX_EVENTS` / :data:`COALESCE_MAX_BYTES`) and writes
them as one batch per class: all denies, then all explanations (each explanation still
follows the deny it explains; the two go to different topics).  The batches it holds
stay listed one by one until their write is accounted, so a stop in the middle parks
each deny batch with its own raw records, exactly as before."""

from __future__ import annotations

import trio

from aegis_stream.pipeline.config import log
from aegis_stream.pipeline.context import ParkRank, StageContext, drain_nowait
from aegis_stream.pipeline.sinks import Sink, SinkBatch

#: at most this many events in one coalesced deny write (the first batch always goes)
COALESCE_MAX_EVENTS = 8192
#: ... and at most this many bytes of JSON lines (one Kafka spool frame, one file write)
COALESCE_MAX_BYTES = 4 << 20


def coalesce(batches: list[SinkBatch], first: str) -> list[SinkBatch]:
    """One batch per class, class ``first`` (the channel's own: deny) first, then the
    others in the order they appear; the lines keep their order within a class.  Denies
    first keeps every explanation after its deny, also when the previous write's limit
    left an explanation at the head.  ``raw`` is not carried (the writer parks the
    originals)."""
    by_class: dict[str, list[SinkBatch]] = {first: []}
    for b in batches:
        by_class.setdefault(b.klass, []).append(b)
    return [bs[0] if len(bs) == 1 else
            SinkBatch(k, b"".join(b.lines for b in bs), sum(b.count for b in bs))
            for k, bs in by_class.items() if bs]


class SinkWriter:
    """Writes batches to every sink, one write per sink at a time; the deny channel's
    waiting batches are coalesced into one write per class."""

    def __init__(self, ctx: StageContext, sinks: list[Sink]) -> None:
        self.ctx = ctx
        self.sinks = sinks
        self._locks = [trio.Lock() for _ in sinks]
        #: names of the sinks whose last write failed (the degraded signal reads it)
        self.failing: set[str] = set()
        self.derived: dict[str, int] = {}  # state/slo/explanation records written
        self.derived_failed = 0
        #: deny-channel writes, and the channel batches they carried (coalescing ratio)
        self.coalesced_writes = 0
        self.coalesced_batches = 0

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
            current: list[SinkBatch] = []  # received and not yet accounted, in order
            try:
                await self._loop(klass, recv, current)
            except trio.Cancelled:
                for b in current + drain_nowait(recv):
                    if b.klass == klass:
                        self.ctx.park(klass, b.count, b.raw, ParkRank.WRITER)
                raise

    @staticmethod
    def _take(recv: trio.MemoryReceiveChannel[SinkBatch], current: list[SinkBatch]) -> int:
        """Top ``current`` up with what is waiting in the channel (never blocks); return
        how many of its first batches fit one coalesced write (at least one).  A batch
        received past the limits stays in ``current`` for the next write."""
        events = sum(b.count for b in current)
        size = sum(len(b.lines) for b in current)
        while events < COALESCE_MAX_EVENTS and size < COALESCE_MAX_BYTES:
            try:
                b = recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            current.append(b)
            events += b.count
            size += len(b.lines)
        n = events = size = 0
        for b in current:
            events += b.count
            size += len(b.lines)
            if n and (events > COALESCE_MAX_EVENTS or size > COALESCE_MAX_BYTES):
                break
            n += 1
        return n

    async def _loop(self, klass: str, recv: trio.MemoryReceiveChannel[SinkBatch],
                    current: list[SinkBatch]) -> None:
        while True:
            if not current:
                try:
                    current.append(await recv.receive())
                except trio.EndOfChannel:
                    return
            n = self._take(recv, current) if klass == "deny" else 1
            taken = current[:n]
            if klass == "deny":
                self.coalesced_writes += 1
                self.coalesced_batches += n
            for batch in coalesce(taken, klass):
                members = [b for b in taken if b.klass == batch.klass]
                await self._write_all(klass, batch)
                # accounted: no longer the writer's to park if it is stopped now
                ids = {id(b) for b in members}
                current[:] = [b for b in current if id(b) not in ids]
            await trio.lowlevel.checkpoint()

    async def _write_all(self, klass: str, batch: SinkBatch) -> None:
        """One (possibly coalesced) batch to every sink, then counted."""
        cfg = self.ctx.config
        pending = list(range(len(self.sinks)))
        delay = cfg.sink_retry_initial_s
        while True:
            pending = [i for i in pending if not await self._write_one(i, batch)]
            if not pending or batch.klass != "deny":
                break
            await trio.sleep(delay)  # denies: retried until every sink has them
            delay = min(delay * 2, cfg.sink_retry_max_s)
        if batch.klass != klass:  # explanations riding the deny channel
            self._count_derived(batch, bool(pending))
        elif pending:
            self.ctx.acct[klass].drop("sink", "error", batch.count)
        else:
            self.ctx.acct[klass].delivered += batch.count

    async def write_derived(self, batch: SinkBatch) -> None:
        """A derived record (state, SLO): once to every sink, counted either way."""
        failed = False
        for i in range(len(self.sinks)):
            failed |= not await self._write_one(i, batch)
        self._count_derived(batch, failed)
