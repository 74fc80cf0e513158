"""The Pipeline: the stages wired in one nursery; run, stop, drain and statistics."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import trio

from aegis_stream.kernel.events import RECORD_STRIDE
from aegis_stream.kernel.ringbuf import RawBatch, RingBuffer
from aegis_stream.pipeline.accounting import (
    ClassAccount,
    ClassStatistics,
    PipelineStatistics,
    window_label,
)
from aegis_stream.pipeline.config import CLASSES, PipelineConfig
from aegis_stream.pipeline.context import ShutdownReason, StageContext
from aegis_stream.pipeline.kernel_view import KernelView
from aegis_stream.pipeline.normalise import Normaliser
from aegis_stream.pipeline.normalising import AuditShards, Dispatched, NormaliserStage
from aegis_stream.pipeline.readers import RingReader, spool_feeder
from aegis_stream.pipeline.schema import StateEvent
from aegis_stream.pipeline.sinks import Sink, SinkBatch
from aegis_stream.pipeline.spool import DiskSpool, SpoolStatistics
from aegis_stream.pipeline.storms import StormReporter
from aegis_stream.pipeline.ticker import Ticker
from aegis_stream.pipeline.workers import AuditWorker
from aegis_stream.pipeline.writers import SinkWriter
from aegis_stream.processors.degraded import DegradedMonitor, Transition
from aegis_stream.processors.slo import AlertChange, DropRateSlo


class Pipeline:
    """The event pipeline under trio: rings -> decode -> normalise -> sinks, with drop
    accounting end to end and the stream processors embedded.

    Task tree (one nursery; cancellation is explicit)::

        Pipeline.run
        ├── reader(deny)    ring -> raw channel      (never sheds: spills to the disk spool,
        │                                             blocks when the spool is full)
        ├── spool feeder    spool -> raw channel     (in order; replays a previous run's spool)
        ├── reader(audit)   ring -> raw channel      (sample 1-in-N; when the channel is full,
        │                                             wait while the kernel ring is under
        │                                             audit_shed_fill, then shed, counted)
        ├── normaliser(c)   raw -> encoded channel   (batch decode; audit: columnar encoder;
        │                                             deny: Structs + explanations; with
        │                                             audit_workers: a dispatcher and an in-order
        │                                             collector around forked encoder processes)
        ├── writer(c)       encoded -> every sink    (deny: retried until written;
        │                                             audit: a failed batch is dropped, counted)
        └── ticker          every tick_s: kernel counters, ring fill/lag, SLO, degraded state

    The stages live in ``readers``, ``normalising`` (with ``workers``), ``writers`` and
    ``ticker``; they share a :class:`~aegis_stream.pipeline.context.StageContext`.

    Backpressure: every channel is bounded (in batches of at most ``batch_max`` records).
    Denies are never dropped in userspace: a full raw channel spills the batch to a bounded
    on-disk spool (raw 104-byte records, replayed in order), and a full spool blocks the
    reader, which leaves the records in the kernel ring (where a full ring is a counted
    kernel reserve failure).  Audit events may be sampled 1-in-N; when the raw channel is
    full the reader waits while the kernel ring absorbs the backlog (bursts are common, and
    the ring is the largest buffer), and sheds the batch, counted, once the ring is
    ``audit_shed_fill`` full.  Downstream stages block: a slow sink backs up into the
    reader, which sheds before decoding (the cheapest place).

    Accounting per class (``statistics().classes``)::

        read      = delivered + dropped (userspace, by stage/reason) + in_flight
        emitted   = read + kernel_dropped + backlog            (emitted: kernel counters)

    After a stop (``drain_and_stop``), ``in_flight`` is 0 for audit and the denies kept in
    the spool for deny: what the stages held when the flush timed out is counted
    ``shutdown/drain_timeout`` (``shutdown/stopped`` when run() was cancelled without a
    stop).  ``kernel_dropped`` is explained in :mod:`aegis_stream.pipeline.ticker`.
    """

    def __init__(
        self,
        rings: Mapping[str, RingBuffer],
        normaliser: Normaliser,
        sinks: list[Sink],
        kernel: KernelView,
        *,
        config: PipelineConfig | None = None,
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], float] = time.time,
        on_state: Callable[[StateEvent], None] | None = None,
        storms: StormReporter | None = None,
    ) -> None:
        self.rings = dict(rings)
        self.norm = normaliser
        self.sinks = list(sinks)
        self.kernel = kernel
        self.config = config or PipelineConfig()
        self.ctx = StageContext(self.config, normaliser)
        self.reader = RingReader(self.ctx)
        self.normalising = NormaliserStage(self.ctx)
        self.writer = SinkWriter(self.ctx, self.sinks)
        self.ticker = Ticker(self.ctx, self.rings, kernel, self.writer, clock=clock,
                             wall_clock=wall_clock, on_state=on_state)
        self.ticker.storms = storms  # deny-storm summaries (None: not reported)
        self._workers: list[AuditWorker] = []
        self._reader_scope: trio.CancelScope | None = None
        self._started = trio.Event()
        self._stopped = False
        self._finished = trio.Event()

    # ---------------------------------------------------------------- shared views
    @property
    def acct(self) -> dict[str, ClassAccount]:
        return self.ctx.acct

    @property
    def spool(self) -> DiskSpool | None:
        return self.ctx.spool

    @property
    def monitor(self) -> DegradedMonitor:
        return self.ticker.monitor

    @property
    def slo(self) -> DropRateSlo:
        return self.ticker.slo

    @property
    def memory_trims(self) -> int:
        return self.ticker.memory_trims

    @property
    def last_transition(self) -> Transition | None:
        return self.ticker.last_transition

    @property
    def alert_changes(self) -> list[AlertChange]:
        return self.ticker.alert_changes

    # ---------------------------------------------------------------- lifecycle
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run every stage until stopped (``stop``/``drain_and_stop``) or cancelled;
        ``task_status.started()`` once the readers are reading."""
        cfg = self.config
        self.ticker.baseline()
        raw: dict[str, tuple[trio.MemorySendChannel[RawBatch], trio.MemoryReceiveChannel[RawBatch]]] = {
            k: trio.open_memory_channel[RawBatch](cfg.raw_channel_batches[k]) for k in CLASSES
        }
        out: dict[str, tuple[trio.MemorySendChannel[SinkBatch], trio.MemoryReceiveChannel[SinkBatch]]] = {
            k: trio.open_memory_channel[SinkBatch](cfg.out_channel_batches[k]) for k in CLASSES
        }
        stages_scope = trio.CancelScope()
        stages_done = trio.Event()
        if cfg.audit_workers > 0 and "audit" in self.rings:
            self._workers = [AuditWorker.fork(self.norm, cfg.audit_worker_cpus)
                             for _ in range(cfg.audit_workers)]
        try:
            async with trio.open_nursery() as nursery:
                ticker_scope = trio.CancelScope()

                async def ticker() -> None:
                    with ticker_scope:
                        await self.ticker.run()

                async def stages() -> None:
                    with stages_scope:
                        async with trio.open_nursery() as st:
                            for k in CLASSES:
                                if k == "audit" and self._workers:
                                    shards = AuditShards(self.ctx, self._workers)
                                    order_send, order_recv = trio.open_memory_channel[Dispatched](
                                        2 * len(self._workers))
                                    st.start_soon(shards.dispatch, raw[k][1], order_send)
                                    st.start_soon(shards.collect, order_recv, out[k][0])
                                else:
                                    st.start_soon(self.normalising.run, k, raw[k][1], out[k][0])
                                st.start_soon(self.writer.run, k, out[k][1])
                    stages_done.set()

                nursery.start_soon(ticker)
                nursery.start_soon(stages)
                async with trio.open_nursery() as readers:
                    self._reader_scope = readers.cancel_scope
                    for k in CLASSES:
                        if k in self.rings:
                            readers.start_soon(self.reader.run, k, self.rings[k], raw[k][0].clone())
                    readers.start_soon(spool_feeder, self.ctx, raw["deny"][0].clone())
                    for k in CLASSES:
                        await raw[k][0].aclose()
                    self._started.set()
                    task_status.started()
                # readers stopped: what was read is normalised and written, within limits
                with trio.move_on_after(cfg.shutdown_timeout_s):
                    await stages_done.wait()
                stages_scope.cancel()  # forced: denies parked in the spool, audit counted
                ticker_scope.cancel()
        finally:
            self._stopped = True
            for w in self._workers:
                w.close()
            self.ctx.persist_parked()
            self.ctx.reconcile_stop()
            self.ticker.tick()  # final numbers for statistics()
            if self.ctx.spool is not None:
                self.ctx.spool.close()
            self._finished.set()

    def stop(self) -> None:
        """Stop reading; what was read is still normalised and written (for up to
        ``shutdown_timeout_s``), then run() returns.  What is lost from here on is
        counted ``shutdown/drain_timeout``."""
        self.ctx.shutdown_reason = ShutdownReason.DRAIN_TIMEOUT
        if self._reader_scope is not None:
            self._reader_scope.cancel()

    async def drain(self, timeout: float = 5.0) -> bool:
        """Wait until the rings are empty and nothing is in flight (or ``timeout``)."""
        await self._started.wait()
        with trio.move_on_after(timeout):
            while True:
                busy = any(r.available_bytes() for r in self.rings.values())
                busy = busy or any(self.ctx.in_flight(k) for k in CLASSES)
                if not busy:
                    return True
                await trio.sleep(0.01)
        return False

    async def drain_and_stop(self, timeout: float = 5.0) -> bool:
        """Drain (up to ``timeout``: the readers keep reading), stop reading, and wait
        until run() has finished: the stages flush what they hold for up to
        ``shutdown_timeout_s``, then they are cancelled and what they still hold is
        accounted (denies kept in the spool; audit events dropped, counted
        ``shutdown/drain_timeout``).  When this returns every record read from a ring
        is delivered, dropped (counted) or, for denies, in the spool; records the
        readers never reached stay in the ring (``backlog``: a pinned ring hands them to
        the next run).  True when everything was delivered within ``timeout``."""
        ok = await self.drain(timeout)
        self.stop()
        await self._finished.wait()
        return ok

    # ---------------------------------------------------------------- statistics
    def statistics(self) -> PipelineStatistics:
        """A frozen snapshot of every ledger (after a stop: as of the final tick)."""
        tk = self.ticker
        snap = tk.snapshot
        classes = {}
        for k in CLASSES:
            a = self.ctx.acct[k]
            ring = self.rings.get(k)
            classes[k] = ClassStatistics(
                klass=k, read=a.read, delivered=a.delivered, dropped=dict(a.dropped),
                in_flight=a.in_flight, spooled=a.spooled,
                kernel_emitted=tk.emitted(k, snap),
                kernel_dropped=a.kernel_dropped,
                # after a stop: as of the final tick, consistent with kernel_emitted
                backlog=(tk.backlog.get(k, 0) if self._stopped
                         else ring.available_bytes() // RECORD_STRIDE if ring else 0),
            )
        now = tk.now
        slo = tk.slo
        burn: dict[tuple[str, str], float] = {}
        ratios: dict[tuple[str, str], float] = {}
        windows = sorted({w for a in slo.config.alerts for w in (a.long_s, a.short_s)})
        for k in CLASSES:
            for w in windows:
                win = slo.window(k, w, now)
                ratios[(k, window_label(w))] = win.ratio
                burn[(k, window_label(w))] = win.ratio / slo.config.objective
        firing = {(k, a.name): slo.firing.get(f"{k}/{a.name}", False)
                  for k in CLASSES for a in slo.config.alerts}
        spool = self.ctx.spool
        return PipelineStatistics(
            classes=classes,
            rings={k: r.statistics() for k, r in self.rings.items()},
            sinks=tuple(s.statistics() for s in self.sinks),
            spool=spool.statistics() if spool is not None else SpoolStatistics.disabled(),
            kernel=snap,
            hooks=dict(tk.hooks),
            mode=tk.mode,
            generation=tk.generation,
            state=tk.monitor.state,
            reasons=tuple(tk.monitor.reasons),
            reason_codes=tuple(tk.monitor.codes),
            state_changes=tk.monitor.changes,
            burn_rates=burn,
            drop_ratios=ratios,
            alerts_firing=firing,
            derived_events=dict(self.writer.derived),
            memory_trims=tk.memory_trims,
            derived_failed=self.writer.derived_failed,
            slo_objective=slo.config.objective,
            state_callback_failures=tk.state_callback_failures,
            storms=tk.storms.statistics() if tk.storms is not None else None,
        )
