"""The first stage: kernel ring -> raw channel, and the deny spool -> raw channel.

Denies are never shed: when the raw channel is full they spill to the disk spool, and
a full spool blocks the reader (the records wait in the kernel ring).  Audit events
may be sampled 1-in-N; when the raw channel is full the reader waits while the kernel
ring absorbs the backlog, and sheds the batch, counted, once the ring is
``audit_shed_fill`` full (before decoding: the cheapest place)."""

from __future__ import annotations

import trio

from aegis_stream.kernel.ringbuf import RawBatch, RingBuffer
from aegis_stream.pipeline.context import ParkRank, StageContext
from aegis_stream.processors.sampling import Sampler


class RingReader:
    """Drains one ring per class into that class's raw channel, with admission."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.sampler = Sampler(ctx.config.audit_sample_n)

    async def run(self, klass: str, ring: RingBuffer, send: trio.MemorySendChannel[RawBatch]) -> None:
        cfg = self.ctx.config
        acct = self.ctx.acct[klass]
        async with send:
            while True:
                discarded, foreign = ring.discarded, ring.foreign
                batch = ring.drain_batch(cfg.batch_max)
                if ring.discarded != discarded or ring.foreign != foreign:
                    # records the ring held that are not events (the producer discarded
                    # them, or they have another layout): each is a decision whose event
                    # is lost -- counted, never skipped in silence
                    for reason, n in (("discarded", ring.discarded - discarded),
                                      ("foreign_record", ring.foreign - foreign)):
                        if n:
                            acct.read += n
                            acct.drop("reader", reason, n)
                if not batch.count:
                    with trio.move_on_after(cfg.poll_interval_s):
                        await trio.lowlevel.wait_readable(ring.poll_fd)
                    continue
                acct.read += batch.count
                if klass == "deny":
                    try:
                        await self._admit_deny(batch, send)
                    except trio.Cancelled:
                        self.ctx.park("deny", batch.count, batch, ParkRank.READER)
                        raise
                else:
                    if self.sampler.n > 1:
                        keep = self.sampler.select(batch.count)
                        acct.drop("reader", "sampled", batch.count - len(keep))
                        batch = batch.select(keep) if len(keep) < batch.count else batch
                    try:
                        admitted = not batch.count or await self._admit_audit(ring, batch, send)
                    except trio.Cancelled:
                        try:  # stopped with a batch in hand: the stages flush it if it fits
                            send.send_nowait(batch)
                        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                            self.ctx.park("audit", batch.count, None, ParkRank.READER)
                        raise
                    if not admitted:
                        acct.drop("reader", "channel_full", batch.count)
                await trio.lowlevel.checkpoint()

    async def _admit_audit(self, ring: RingBuffer, batch: RawBatch,
                           send: trio.MemorySendChannel[RawBatch]) -> bool:
        """Wait for room while the kernel ring can absorb the backlog (it is the largest
        buffer there is); shed once it is ``audit_shed_fill`` full."""
        try:
            send.send_nowait(batch)
            return True
        except trio.WouldBlock:
            pass
        cfg = self.ctx.config
        while ring.available_bytes() < cfg.audit_shed_fill * ring.size:
            with trio.move_on_after(cfg.poll_interval_s):
                await send.send(batch)
                return True
        return False

    async def _admit_deny(self, batch: RawBatch, send: trio.MemorySendChannel[RawBatch]) -> None:
        spool = self.ctx.spool
        if spool is None:
            await send.send(batch)  # backpressure: the records wait in the kernel ring
            return
        if not spool.pending_batches:
            try:
                send.send_nowait(batch)
                return
            except trio.WouldBlock:
                pass
        while not spool.append(batch):
            # spool full: block (order is kept: the feeder empties the spool first)
            if not spool.pending_batches:
                await send.send(batch)
                return
            await self.ctx.spool_event().wait()
        self.ctx.acct["deny"].spooled += batch.count
        self.ctx.signal_spool()


async def spool_feeder(ctx: StageContext, send: trio.MemorySendChannel[RawBatch]) -> None:
    """Replays the deny spool into the deny raw channel, in order (a previous run's
    spool first); a batch leaves the spool only once the channel has taken it."""
    async with send:
        spool = ctx.spool
        if spool is None:
            return
        while True:
            while not spool.pending_batches:
                await ctx.spool_event().wait()
            batch = spool.peek()
            await send.send(batch)
            spool.pop()
            ctx.signal_spool()
