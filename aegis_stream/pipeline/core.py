"""The event pipeline under trio: rings -> decode -> normalise -> sinks, with drop
accounting end to end and the stream processors of pipelines/ embedded.

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
``shutdown/drain_timeout`` (``shutdown/stopped`` when run() was cancelled without a stop).

``kernel_dropped`` per class = decisions counted by the kernel - records that reached the
ring (read + still waiting); the kernel's RINGBUF_FAIL counter is per hook, not per
ring, so the split comes from this difference (their sum equals RINGBUF_FAIL once the
rings are quiet: tested).  Counters are read before ring positions, so the value is a
lower bound while events flow, never an overstatement.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import trio

from aegis_stream.kernel.counters import CounterSnapshot
from aegis_stream.kernel.events import RECORD_STRIDE, rows
from aegis_stream.kernel.ringbuf import RawBatch, RingBuffer
from aegis_stream.pipeline.accounting import ClassAccount as _Acct
from aegis_stream.pipeline.accounting import ClassStatistics, PipelineStatistics, window_label
from aegis_stream.pipeline.config import CLASSES, PipelineConfig, log
from aegis_stream.pipeline.decoding import decode_valid, encode_audit_batch
from aegis_stream.pipeline.kernel_view import KernelView
from aegis_stream.pipeline.kernel_view import MapsKernelView as MapsKernelView  # re-exported
from aegis_stream.pipeline.memtrim import release_freed_memory
from aegis_stream.pipeline.normalise import Normaliser
from aegis_stream.pipeline.schema import SloEvent, StateEvent
from aegis_stream.pipeline.sinks import Sink, SinkBatch
from aegis_stream.pipeline.spool import DiskSpool, SpoolStatistics
from aegis_stream.pipeline.workers import AuditWorker as _Worker
from aegis_stream.pipeline.workers import EncodedBatch
from aegis_stream.processors.degraded import DegradedMonitor, HealthSample, Transition
from aegis_stream.processors.explain import Explainer
from aegis_stream.processors.sampling import Sampler
from aegis_stream.processors.slo import AlertChange, DropRateSlo

_enc = msgspec.json.Encoder()
_log = log


def _drain_nowait(recv: trio.MemoryReceiveChannel[Any]) -> list[Any]:
    out = []
    while True:
        try:
            out.append(recv.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return out


# ============================================================================ pipeline
class Pipeline:
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
    ) -> None:
        self.rings = dict(rings)
        self.norm = normaliser
        self.sinks = list(sinks)
        self.kernel = kernel
        self.config = config or PipelineConfig()
        self.clock = clock
        self.wall_clock = wall_clock
        self.on_state = on_state
        self.acct = {k: _Acct(k) for k in CLASSES}
        self.sampler = Sampler(self.config.audit_sample_n)
        self.monitor = DegradedMonitor(self.config.degraded)
        self.slo = DropRateSlo(self.config.slo)
        self.explainer = Explainer(self.norm.generations.get)
        self.spool: DiskSpool | None = None
        if self.config.spool_dir:
            try:
                self.spool = DiskSpool(self.config.spool_dir, self.config.spool_max_bytes)
            except OSError as exc:
                _log(f"deny spool disabled ({exc}); a full deny channel blocks the reader")
        self._spool_changed = trio.Event()
        self._sink_locks = [trio.Lock() for _ in self.sinks]
        self._sink_failing: set[str] = set()
        self._reader_scope: trio.CancelScope | None = None
        self._started = trio.Event()
        self._stopped = False
        self._kernel = CounterSnapshot.zero()
        self._hooks: Mapping[str, bool] = {}
        self._mode, self._generation = "none", 0
        self.base_ringbuf_failures = 0
        self._derived: dict[str, int] = {}
        self._derived_failed = 0
        self._state_seq = 0
        self._now = 0.0
        self._parked: dict[int, list[RawBatch]] = {0: [], 1: [], 2: []}
        #: why events still in hand at the end were not delivered: "stopped" (run() was
        #: cancelled from outside, no stop()) or "drain_timeout" (stop() was asked for:
        #: the drain, then the stages' flush, did not finish in time)
        self._shutdown_reason = "stopped"
        self._finished = trio.Event()
        self._backlog: dict[str, int] = {}
        self._burst = False  # more than one batch was in flight since the last trim
        self.memory_trims = 0
        self._workers: list[_Worker] = []
        self.last_transition: Transition | None = None
        self.alert_changes: list[AlertChange] = []
        if self.spool is not None and self.spool.recovered:
            self.acct["deny"].read += self.spool.recovered
            _log(f"replaying {self.spool.recovered} denies spooled by a previous run")

    # ---------------------------------------------------------------- lifecycle
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        self._baseline()
        raw: dict[str, tuple[trio.MemorySendChannel[RawBatch], trio.MemoryReceiveChannel[RawBatch]]] = {
            k: trio.open_memory_channel[RawBatch](cfg.raw_channel_batches[k]) for k in CLASSES
        }
        out: dict[str, tuple[trio.MemorySendChannel[SinkBatch], trio.MemoryReceiveChannel[SinkBatch]]] = {
            k: trio.open_memory_channel[SinkBatch](cfg.out_channel_batches[k]) for k in CLASSES
        }
        stages_scope = trio.CancelScope()
        stages_done = trio.Event()
        if cfg.audit_workers > 0 and "audit" in self.rings:
            self._workers = [_Worker.fork(self.norm, cfg.audit_worker_cpus)
                             for _ in range(cfg.audit_workers)]
        try:
            async with trio.open_nursery() as nursery:
                ticker_scope = trio.CancelScope()

                async def ticker() -> None:
                    with ticker_scope:
                        await self._ticker()

                async def stages() -> None:
                    with stages_scope:
                        async with trio.open_nursery() as st:
                            for k in CLASSES:
                                if k == "audit" and self._workers:
                                    order_send, order_recv = trio.open_memory_channel[
                                        tuple[_Worker | None, RawBatch]](2 * len(self._workers))
                                    st.start_soon(self._shard_dispatch, raw[k][1], order_send)
                                    st.start_soon(self._shard_collect, order_recv, out[k][0])
                                else:
                                    st.start_soon(self._normaliser, k, raw[k][1], out[k][0])
                                st.start_soon(self._writer, k, out[k][1])
                    stages_done.set()

                nursery.start_soon(ticker)
                nursery.start_soon(stages)
                async with trio.open_nursery() as readers:
                    self._reader_scope = readers.cancel_scope
                    for k in CLASSES:
                        if k in self.rings:
                            readers.start_soon(self._reader, k, self.rings[k], raw[k][0].clone())
                    readers.start_soon(self._spool_feeder, raw["deny"][0].clone())
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
            self._persist_parked()
            self._reconcile_stop()
            self._tick()  # final numbers for statistics()
            if self.spool is not None:
                self.spool.close()
            self._finished.set()

    def _reconcile_stop(self) -> None:
        """Every stage has ended: whatever was read and is neither delivered, nor counted
        dropped, nor (denies) kept in the spool is lost now -- count it, so that
        ``read = delivered + dropped (+ denies pending in the spool)`` holds exactly after
        a stop.  The stages count what they hold when cancelled; this is the backstop
        for any path that did not (logged: it means a stage lost track of a batch)."""
        for k in CLASSES:
            kept = self.spool.pending_events if (k == "deny" and self.spool is not None) else 0
            lost = self._in_flight(k) - kept
            if lost > 0:
                self.acct[k].drop("shutdown", self._shutdown_reason, lost)
                if k == "deny" or self._shutdown_reason == "stopped":
                    _log(f"{k}: {lost} events in hand at the stop were not accounted by a "
                         f"stage; counted shutdown/{self._shutdown_reason}")

    def stop(self) -> None:
        """Stop reading; what was read is still normalised and written (for up to
        ``shutdown_timeout_s``), then run() returns.  What is lost from here on is
        counted ``shutdown/drain_timeout``."""
        self._shutdown_reason = "drain_timeout"
        if self._reader_scope is not None:
            self._reader_scope.cancel()

    async def drain(self, timeout: float = 5.0) -> bool:
        """Wait until the rings are empty and nothing is in flight (or ``timeout``)."""
        await self._started.wait()
        with trio.move_on_after(timeout):
            while True:
                busy = any(r.available_bytes() for r in self.rings.values())
                busy = busy or any(self._in_flight(k) for k in CLASSES)
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

    # ---------------------------------------------------------------- readers
    async def _reader(self, klass: str, ring: RingBuffer, send: trio.MemorySendChannel[RawBatch]) -> None:
        cfg = self.config
        acct = self.acct[klass]
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
                        self._park("deny", batch.count, batch, 2)
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
                            self._park("audit", batch.count, None, 2)
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
        while ring.available_bytes() < self.config.audit_shed_fill * ring.size:
            with trio.move_on_after(self.config.poll_interval_s):
                await send.send(batch)
                return True
        return False

    async def _admit_deny(self, batch: RawBatch, send: trio.MemorySendChannel[RawBatch]) -> None:
        spool = self.spool
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
            await self._spool_event().wait()
        self.acct["deny"].spooled += batch.count
        self._signal_spool()

    def _park(self, klass: str, count: int, batch: RawBatch | None, rank: int) -> None:
        """Stopped (or cancelled) with events in hand.  Denies are kept for the spool,
        where run() puts them in stream order when it ends (``rank``: 0 writer, 1
        normaliser -- older than the spool's contents --, 2 reader -- newer); audit
        events are dropped, counted ``shutdown/<reason>`` (``drain_timeout`` after a
        stop whose flush ran out of time, ``stopped`` when run() was cancelled)."""
        if klass == "deny" and batch is not None and self.spool is not None:
            self._parked[rank].append(batch)
            self.acct["deny"].spooled += batch.count
            return
        self.acct[klass].drop("shutdown", self._shutdown_reason, count)

    def _persist_parked(self) -> None:
        if self.spool is None or not any(self._parked.values()):
            return
        n = sum(b.count for bs in self._parked.values() for b in bs)
        try:
            self.spool.rewrite(self._parked[0] + self._parked[1], self._parked[2])
        except OSError as exc:
            _log(f"stopped with {n} denies in hand and the spool failed ({exc}): counted lost")
            self.acct["deny"].drop("shutdown", "spool_error", n)
        else:
            _log(f"stopped with {n} denies in hand: kept in {self.spool.path} for the next run")
        self._parked = {0: [], 1: [], 2: []}

    def _spool_event(self) -> trio.Event:
        return self._spool_changed

    def _signal_spool(self) -> None:
        self._spool_changed.set()
        self._spool_changed = trio.Event()

    async def _spool_feeder(self, send: trio.MemorySendChannel[RawBatch]) -> None:
        async with send:
            spool = self.spool
            if spool is None:
                return
            while True:
                while not spool.pending_batches:
                    await self._spool_event().wait()
                batch = spool.peek()
                await send.send(batch)
                spool.pop()
                self._signal_spool()

    # ---------------------------------------------------------------- normaliser
    async def _normaliser(self, klass: str, recv: trio.MemoryReceiveChannel[RawBatch],
                          send: trio.MemorySendChannel[SinkBatch]) -> None:
        async with recv, send:
            try:
                await self._normalise_loop(klass, recv, send)
            except trio.Cancelled:
                for b in _drain_nowait(recv):
                    self._park(klass, b.count, b, 1)
                raise

    async def _normalise_loop(self, klass: str, recv: trio.MemoryReceiveChannel[RawBatch],
                              send: trio.MemorySendChannel[SinkBatch]) -> None:
        acct = self.acct[klass]
        async for batch in recv:
            arr, bad = decode_valid(batch.data, batch.stride)
            acct.drop("decode", "abi_mismatch", bad)
            extra: SinkBatch | None = None
            try:
                if klass == "deny":
                    evs = [self.norm.normalise(r) for r in rows(arr)]
                    lines = _enc.encode_lines(evs)
                    if self.config.explain_denies:
                        exps = [e for e in map(self.explainer.process, evs) if e is not None]
                        if exps:
                            extra = SinkBatch("explanation", _enc.encode_lines(exps), len(exps))
                else:
                    lines = self.norm.encode_batch(arr)
            except Exception as exc:  # a bug must not stop the agent: count it, go on
                _log(f"{klass}: normalise failed for a batch of {len(arr)}: {exc!r}")
                acct.drop("normalise", "error", len(arr))
                continue
            out = SinkBatch(klass, lines, len(arr), raw=batch if klass == "deny" else None)
            try:  # audit: blocks (the reader sheds, before decoding, if it must)
                await send.send(out)
            except trio.Cancelled:
                self._park(klass, out.count, batch, 1)
                raise
            if extra is not None:  # derived: lost (and counted) if stopped right here
                await send.send(extra)
            await trio.lowlevel.checkpoint()

    # ---------------------------------------------------------------- audit shards
    async def _shard_dispatch(self, recv: trio.MemoryReceiveChannel[RawBatch],
                              order: trio.MemorySendChannel[tuple[_Worker | None, RawBatch]]) -> None:
        """Raw audit batches to the workers, round robin; the order channel tells the
        collector which worker has which batch (None: encode it here, the worker died)."""
        async with recv, order:
            i = 0
            async for batch in recv:
                w: _Worker | None = self._workers[i % len(self._workers)]
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

    async def _shard_collect(self, order: trio.MemoryReceiveChannel[tuple[_Worker | None, RawBatch]],
                             send: trio.MemorySendChannel[SinkBatch]) -> None:
        acct = self.acct["audit"]
        async with order, send:
            async for w, batch in order:
                res: EncodedBatch | None = None
                if w is not None and not w.dead:
                    try:
                        res = await w.result()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, EOFError):
                        w.lost()
                if res is None:  # no worker for it: encode here (same bytes)
                    res = encode_audit_batch(self.norm, batch.data, batch.stride, _log)
                lines, n_ok, bad, failed = res
                acct.drop("decode", "abi_mismatch", bad)
                acct.drop("normalise", "error", failed)
                if not n_ok:
                    continue
                try:
                    await send.send(SinkBatch("audit", lines, n_ok))
                except trio.Cancelled:
                    self._park("audit", n_ok, None, 1)
                    raise
            # (cancelled with batches still at the workers: run() counts them at the end)

    # ---------------------------------------------------------------- writer
    async def _write_one(self, i: int, batch: SinkBatch) -> bool:
        sink = self.sinks[i]
        async with self._sink_locks[i]:
            try:
                await sink.write(batch)
            except Exception as exc:
                if sink.name not in self._sink_failing:
                    _log(f"sink {sink.name} failed: {exc}")
                self._sink_failing.add(sink.name)
                return False
        self._sink_failing.discard(sink.name)
        return True

    async def _writer(self, klass: str, recv: trio.MemoryReceiveChannel[SinkBatch]) -> None:
        async with recv:
            current: list[SinkBatch] = []
            try:
                await self._write_loop(klass, recv, current)
            except trio.Cancelled:
                for b in current + _drain_nowait(recv):
                    if b.klass == klass:
                        self._park(klass, b.count, b.raw, 0)
                raise

    async def _write_loop(self, klass: str, recv: trio.MemoryReceiveChannel[SinkBatch],
                          current: list[SinkBatch]) -> None:
        cfg = self.config
        acct = self.acct[klass]
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
                self._derived[batch.klass] = self._derived.get(batch.klass, 0) + batch.count
                self._derived_failed += batch.count if pending else 0
            elif pending:
                acct.drop("sink", "error", batch.count)
            else:
                acct.delivered += batch.count
            current.clear()

    async def _write_derived(self, batch: SinkBatch) -> None:
        failed = False
        for i in range(len(self.sinks)):
            failed |= not await self._write_one(i, batch)
        self._derived[batch.klass] = self._derived.get(batch.klass, 0) + batch.count
        self._derived_failed += batch.count if failed else 0

    # ---------------------------------------------------------------- ticker
    def _baseline(self) -> None:
        # ring positions first, counters after (the reverse of _tick): the program counts a
        # decision before it reserves its record, so every record in the backlog is in the
        # counters read afterwards; reading the counters first would count a record that
        # lands in between as emitted-but-not-written, a phantom drop (seen in the soak: an
        # agent restarted under load reported "1 deny events lost", state blind)
        for k in CLASSES:
            a = self.acct[k]
            ring = self.rings.get(k)
            a.base_backlog = ring.available_bytes() // RECORD_STRIDE if ring else 0
            a.base_ring_records = (ring.records + ring.discarded + ring.foreign) if ring else 0
        try:
            snap = self.kernel.counters()
        except Exception as exc:  # counters unreadable: start from zero, say so
            _log(f"kernel counters unreadable at start: {exc}")
            snap = CounterSnapshot.zero()
        self._kernel = snap
        self.base_ringbuf_failures = snap.ringbuf_failures
        for k in CLASSES:
            self.acct[k].base_decisions = snap.decisions(k)

    def _in_flight(self, klass: str) -> int:
        a = self.acct[klass]
        return a.read - a.delivered - a.dropped_userspace

    def _tick(self) -> tuple[Transition | None, list[AlertChange]]:
        now = self._now = self.clock()
        # counters first, ring positions after: decisions(t1) - written(t2) is a lower
        # bound of the drops at t1 (written only grows), so the monotone maximum of it
        # never overstates and is exact once the ring is quiet
        prev = self._generation
        try:
            snap = self.kernel.counters()
            self._hooks = dict(self.kernel.attach_state())
            self._mode, self._generation = self.kernel.policy_state()
        except Exception as exc:
            _log(f"kernel state unreadable: {exc}")
            snap = self._kernel
        if self._generation != prev:
            # events of the replaced generation may still be in the rings: keep both
            self.norm.retire_generations({self._generation, prev})
        self._kernel = snap
        lag = {k: r.available_bytes() for k, r in self.rings.items()}
        ring_fill = {k: lag[k] / r.size for k, r in self.rings.items()}
        self._backlog = {k: v // RECORD_STRIDE for k, v in lag.items()}
        for k in CLASSES:
            a = self.acct[k]
            ring = self.rings.get(k)
            if ring is None:
                continue
            written = (ring.records + ring.discarded + ring.foreign - a.base_ring_records
                       + lag[k] // RECORD_STRIDE)
            emitted = snap.decisions(k) - a.base_decisions + a.base_backlog
            a.kernel_dropped = max(a.kernel_dropped, emitted - written)
        for k in CLASSES:
            a = self.acct[k]
            emitted = snap.decisions(k) - a.base_decisions + a.base_backlog
            self.slo.observe(now, k, emitted, a.kernel_dropped + a.dropped_userspace)
        changes = self.slo.evaluate(now)
        short = self.config.slo_short_window_s
        drop_ratio = {k: self.slo.window(k, short, now).ratio for k in CLASSES}
        deny_lost = self.slo.window("deny", short, now).dropped
        spooled = self.spool.pending_events if self.spool else 0
        sample = HealthSample(
            now=now,
            hooks_expected=list(self._hooks),
            hooks_attached=[h for h, ok in self._hooks.items() if ok],
            mode=self._mode,
            generation=self._generation,
            ring_fill=ring_fill,
            consumer_lag_bytes=lag,
            consumed_records={k: r.records + r.discarded + r.foreign for k, r in self.rings.items()},
            drop_ratio=drop_ratio,
            deny_lost=deny_lost,
            sink_failing=sorted(self._sink_failing),
            spooled_denies=spooled,
        )
        transition = self.monitor.observe(sample)
        if transition is not None:
            self.last_transition = transition
        self.alert_changes.extend(changes)
        return transition, changes

    def _stamp(self) -> tuple[str, str]:
        ns = int(self.wall_clock() * 1e9)
        s, rem = divmod(ns, 1_000_000_000)
        t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{rem // 1000:06d}Z"
        self._state_seq += 1
        return f"{self.norm.boot8}-agent-{ns}-{self._state_seq}", t

    def state_event(self, tr: Transition) -> StateEvent:
        eid, t = self._stamp()
        s = tr.sample
        return StateEvent(
            event_id=eid, time=t, host=self.norm.host, state=tr.state,  # type: ignore[arg-type]
            previous=tr.previous, reasons=list(tr.reasons), hooks_attached=list(s.hooks_attached),
            hooks_expected=list(s.hooks_expected), mode=s.mode, generation=s.generation,
            ring_fill=dict(s.ring_fill), consumer_lag_bytes=dict(s.consumer_lag_bytes),
            drop_ratio=dict(s.drop_ratio),
        )

    def slo_event(self, ch: AlertChange) -> SloEvent:
        eid, t = self._stamp()
        return SloEvent(
            event_id=eid, time=t, host=self.norm.host, event_class=ch.klass, alert=ch.rule.name,
            status="firing" if ch.firing else "resolved", objective=ch.objective,
            long_window_s=ch.rule.long_s, short_window_s=ch.rule.short_s,
            burn_threshold=ch.rule.burn, burn_long=ch.burn_long, burn_short=ch.burn_short,
            emitted_long=ch.long.emitted, dropped_long=ch.long.dropped,
        )

    def _trim_after_burst(self) -> None:
        """Once a burst (more than one batch in flight) has fully drained, give the
        freed heap back (aegis_stream.memtrim): floods must not set the steady-state RSS."""
        in_flight = sum(self._in_flight(k) for k in CLASSES)
        if in_flight > self.config.batch_max:
            self._burst = True
        elif self._burst and in_flight == 0:
            self._burst = False
            self.memory_trims += 1
            release_freed_memory()

    async def _ticker(self) -> None:
        while True:
            transition, changes = self._tick()
            self._trim_after_burst()
            if transition is not None:
                ev = self.state_event(transition)
                _log(f"state: {ev.state}" + (f" ({'; '.join(ev.reasons)})" if ev.reasons else ""))
                if self.on_state is not None:
                    with contextlib.suppress(Exception):
                        self.on_state(ev)
                await self._write_derived(SinkBatch("state", _enc.encode(ev) + b"\n", 1))
            if changes:
                evs = [self.slo_event(c) for c in changes]
                await self._write_derived(SinkBatch("slo", _enc.encode_lines(evs), len(evs)))
            await trio.sleep(self.config.tick_s)

    # ---------------------------------------------------------------- statistics
    def statistics(self) -> PipelineStatistics:
        snap = self._kernel
        classes = {}
        for k in CLASSES:
            a = self.acct[k]
            ring = self.rings.get(k)
            classes[k] = ClassStatistics(
                klass=k, read=a.read, delivered=a.delivered, dropped=dict(a.dropped),
                in_flight=self._in_flight(k), spooled=a.spooled,
                kernel_emitted=snap.decisions(k) - a.base_decisions + a.base_backlog,
                kernel_dropped=a.kernel_dropped,
                # after a stop: as of the final tick, consistent with kernel_emitted
                backlog=(self._backlog.get(k, 0) if self._stopped
                         else ring.available_bytes() // RECORD_STRIDE if ring else 0),
            )
        now = self._now
        burn: dict[tuple[str, str], float] = {}
        ratios: dict[tuple[str, str], float] = {}
        windows = sorted({w for a in self.slo.config.alerts for w in (a.long_s, a.short_s)})
        for k in CLASSES:
            for w in windows:
                win = self.slo.window(k, w, now)
                ratios[(k, window_label(w))] = win.ratio
                burn[(k, window_label(w))] = win.ratio / self.slo.config.objective
        firing = {(k, a.name): self.slo.firing.get(f"{k}/{a.name}", False)
                  for k in CLASSES for a in self.slo.config.alerts}
        spool = (self.spool.statistics() if self.spool is not None
                 else SpoolStatistics.disabled())
        return PipelineStatistics(
            classes=classes,
            rings={k: r.statistics() for k, r in self.rings.items()},
            sinks=tuple(s.statistics() for s in self.sinks),
            spool=spool,
            kernel=snap,
            hooks=dict(self._hooks),
            mode=self._mode,
            generation=self._generation,
            state=self.monitor.state,
            reasons=tuple(self.monitor.reasons),
            state_changes=self.monitor.changes,
            burn_rates=burn,
            drop_ratios=ratios,
            alerts_firing=firing,
            derived_events=dict(self._derived),
            memory_trims=self.memory_trims,
            derived_failed=self._derived_failed,
            slo_objective=self.slo.config.objective,
        )
