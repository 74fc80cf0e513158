"""The second stage: raw channel -> encoded channel.

Deny batches become :class:`~aegis_stream.pipeline.schema.DecisionEvent` Structs (and,
with ``explain_denies``, explanations riding the same channel); audit batches go
through the columnar encoder, in the agent or, with ``audit_workers``, in forked
workers behind a round-robin dispatcher and an in-order collector."""

from __future__ import annotations

import msgspec
import trio

from aegis_stream.kernel.events import rows
from aegis_stream.kernel.ringbuf import RawBatch
from aegis_stream.pipeline.config import log
from aegis_stream.pipeline.context import ParkRank, StageContext, drain_nowait
from aegis_stream.pipeline.decoding import decode_valid, encode_audit_batch
from aegis_stream.pipeline.sinks import SinkBatch
from aegis_stream.pipeline.workers import AuditWorker, EncodedBatch
from aegis_stream.processors.explain import Explainer

_enc = msgspec.json.Encoder()

#: the collector's queue: which worker has which batch (None: encode it in the agent)
Dispatched = tuple[AuditWorker | None, RawBatch]


class NormaliserStage:
    """Decodes, normalises and encodes one class's raw batches in the agent."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.explainer = Explainer(ctx.norm.generations.get)

    async def run(self, klass: str, recv: trio.MemoryReceiveChannel[RawBatch],
                  send: trio.MemorySendChannel[SinkBatch]) -> None:
        async with recv, send:
            try:
                await self._loop(klass, recv, send)
            except trio.Cancelled:
                for b in drain_nowait(recv):
                    self.ctx.park(klass, b.count, b, ParkRank.NORMALISER)
                raise

    async def _loop(self, klass: str, recv: trio.MemoryReceiveChannel[RawBatch],
                    send: trio.MemorySendChannel[SinkBatch]) -> None:
        acct = self.ctx.acct[klass]
        norm = self.ctx.norm
        async for batch in recv:
            arr, bad = decode_valid(batch.data, batch.stride)
            acct.drop("decode", "abi_mismatch", bad)
            extra: SinkBatch | None = None
            try:
                if klass == "deny":
                    evs = [norm.normalise(r) for r in rows(arr)]
                    lines = _enc.encode_lines(evs)
                    if self.ctx.config.explain_denies:
                        exps = [e for e in map(self.explainer.process, evs) if e is not None]
                        if exps:
                            extra = SinkBatch("explanation", _enc.encode_lines(exps), len(exps))
                else:
                    lines = norm.encode_batch(arr)
            except Exception as exc:  # a bug must not stop the agent: count it, go on
                log(f"{klass}: normalise failed for a batch of {len(arr)}: {exc!r}")
                acct.drop("normalise", "error", len(arr))
                continue
            out = SinkBatch(klass, lines, len(arr), raw=batch if klass == "deny" else None)
            try:  # audit: blocks (the reader sheds, before decoding, if it must)
                await send.send(out)
            except trio.Cancelled:
                self.ctx.park(klass, out.count, batch, ParkRank.NORMALISER)
                raise
            if extra is not None:  # derived: lost (and counted) if stopped right here
                await send.send(extra)
            await trio.lowlevel.checkpoint()


class AuditShards:
    """Audit normalise+encode in forked workers, results taken in dispatch order."""

    def __init__(self, ctx: StageContext, workers: list[AuditWorker]) -> None:
        self.ctx = ctx
        self.workers = workers

    async def dispatch(self, recv: trio.MemoryReceiveChannel[RawBatch],
                       order: trio.MemorySendChannel[Dispatched]) -> None:
        """Raw audit batches to the workers, round robin; the order channel tells the
        collector which worker has which batch (None: encode it here, the worker died)."""
        async with recv, order:
            i = 0
            async for batch in recv:
                w: AuditWorker | None = self.workers[i % len(self.workers)]
                i += 1
                if w is not None and not w.dead:
                    try:
                        await w.submit(batch)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        w.lost()
                        w = None
                else:
                    w = None
                await order.send((w, batch))

    async def collect(self, order: trio.MemoryReceiveChannel[Dispatched],
                      send: trio.MemorySendChannel[SinkBatch]) -> None:
        """Results in dispatch order into the audit encoded channel."""
        acct = self.ctx.acct["audit"]
        async with order, send:
            async for w, batch in order:
                res: EncodedBatch | None = None
                if w is not None and not w.dead:
                    try:
                        res = await w.result()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, EOFError):
                        w.lost()
                if res is None:  # no worker for it: encode here (same bytes)
                    res = encode_audit_batch(self.ctx.norm, batch.data, batch.stride, log)
                lines, n_ok, bad, failed = res
                acct.drop("decode", "abi_mismatch", bad)
                acct.drop("normalise", "error", failed)
                if not n_ok:
                    continue
                try:
                    await send.send(SinkBatch("audit", lines, n_ok))
                except trio.Cancelled:
                    self.ctx.park("audit", n_ok, None, ParkRank.NORMALISER)
                    raise
            # (cancelled with batches still at the workers: run() counts them at the end)
