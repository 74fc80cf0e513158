"""The ticker: every ``tick_s`` it reads the kernel (counters, attached hooks, policy
state), the rings' fill and lag, attributes kernel drops to each class, feeds the SLO
and the degraded-state monitor, writes state/SLO events, and trims the heap once a
burst has drained.

``kernel_dropped`` per class = decisions counted by the kernel - records that reached
the ring (read + still waiting); the kernel's RINGBUF_FAIL counter is per hook, not per
ring, so the split comes from this difference (their sum equals RINGBUF_FAIL once the
rings are quiet: tested).  Counters are read before ring positions, so the value is a
lower bound while events flow, never an overstatement."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import msgspec
import trio

from aegis_stream.agent.health import ReasonCode
from aegis_stream.kernel import abi
from aegis_stream.kernel.counters import CounterSnapshot
from aegis_stream.kernel.events import RECORD_STRIDE
from aegis_stream.kernel.ringbuf import RingBuffer
from aegis_stream.pipeline.config import CLASSES, log
from aegis_stream.pipeline.context import StageContext
from aegis_stream.pipeline.kernel_view import KernelView
from aegis_stream.pipeline.memtrim import release_freed_memory
from aegis_stream.pipeline.schema import SloEvent, StateEvent
from aegis_stream.pipeline.sinks import SinkBatch
from aegis_stream.pipeline.storms import StormReporter
from aegis_stream.pipeline.writers import SinkWriter
from aegis_stream.processors.degraded import DegradedMonitor, HealthSample, Transition
from aegis_stream.processors.slo import AlertChange, DropRateSlo

_enc = msgspec.json.Encoder()


class Ticker:
    """Kernel counters, ring fill/lag, SLO, degraded state and heap trims, per tick."""

    def __init__(self, ctx: StageContext, rings: Mapping[str, RingBuffer], kernel: KernelView,
                 writer: SinkWriter, *, clock: Callable[[], float], wall_clock: Callable[[], float],
                 on_state: Callable[[StateEvent], None] | None) -> None:
        self.ctx = ctx
        self.rings = rings
        self.kernel = kernel
        self.writer = writer
        self.clock = clock
        self.wall_clock = wall_clock
        self.on_state = on_state
        self.monitor = DegradedMonitor(ctx.config.degraded)
        self.slo = DropRateSlo(ctx.config.slo)
        # the kernel side as of the last tick (what statistics() reports)
        self.snapshot = CounterSnapshot.zero()
        self.hooks: Mapping[str, bool] = {}
        self.mode, self.generation = abi.MODE_NONE, 0
        self.backlog: dict[str, int] = {}
        self.now = 0.0
        self.memory_trims = 0
        self.state_callback_failures = 0
        self.last_transition: Transition | None = None
        self.alert_changes: list[AlertChange] = []
        self._burst = False  # more than one batch in flight, or read in one tick, since the last trim
        self._read_last_tick = 0  # events read (all classes) at the previous trim check
        self._state_seq = 0
        self.last_sample: HealthSample | None = None
        self._last_state_write = 0.0  # clock() of the last state record written
        # conditions judged outside the sample, every tick, before the monitor observes it
        # (the agent's policy integrity check, aegis_stream/agent/integrity.py): each
        # returns the codes it owns with a text (set) or None (clear)
        self.checks: list[Callable[[], Mapping[ReasonCode, str | None]]] = []
        self.check_failures = 0
        #: called once per completed tick (the agent pets systemd's watchdog here: a ticker
        #: that stops ticking stops petting); must not raise
        self.on_tick: Callable[[], None] | None = None
        #: deny-storm summaries (aegis_stream/pipeline/storms.py); None: not reported.  A
        #: suppressed decision is no event: emitted() subtracts the kernel's per-class count
        self.storms: StormReporter | None = None
        self.suppressed: dict[str, int] = dict.fromkeys(CLASSES, 0)
        self.base_suppressed: dict[str, int] = dict.fromkeys(CLASSES, 0)

    def baseline(self) -> None:
        """Where the kernel side stands as the pipeline starts."""
        # ring positions first, counters after (the reverse of tick): the program counts a
        # decision before it reserves its record, so every record in the backlog is in the
        # counters read afterwards; reading the counters first would count a record that
        # lands in between as emitted-but-not-written, a phantom drop (seen in the soak: an
        # agent restarted under load reported "1 deny events lost", state blind)
        acct = self.ctx.acct
        for k in CLASSES:
            a = acct[k]
            ring = self.rings.get(k)
            a.base_backlog = ring.available_bytes() // RECORD_STRIDE if ring else 0
            a.base_ring_records = (ring.records + ring.discarded + ring.foreign) if ring else 0
        if self.storms is not None:
            # suppressed before the decisions: a decision counted in between must not make
            # the base too small (a phantom drop for ever after, as above)
            self.base_suppressed = dict(self.storms.counts().suppressed)
            self.suppressed = dict(self.base_suppressed)
        try:
            snap = self.kernel.counters()
        except Exception as exc:  # counters unreadable: start from zero, say so
            log(f"kernel counters unreadable at start: {exc}")
            snap = CounterSnapshot.zero()
        self.snapshot = snap
        for k in CLASSES:
            acct[k].base_decisions = snap.decisions(k)

    def emitted(self, klass: str, snap: CounterSnapshot) -> int:
        """Decisions of ``klass`` since the start (what was in the ring then included)."""
        a = self.ctx.acct[klass]
        folded = self.suppressed.get(klass, 0) - self.base_suppressed.get(klass, 0)
        return snap.decisions(klass) - a.base_decisions + a.base_backlog - folded

    def tick(self) -> tuple[Transition | None, list[AlertChange]]:
        """One reading: kernel drops per class, SLO windows, health sample."""
        now = self.now = self.clock()
        # counters first, ring positions after: decisions(t1) - written(t2) is a lower
        # bound of the drops at t1 (written only grows), so the monotone maximum of it
        # never overstates and is exact once the ring is quiet
        prev = self.generation
        try:
            snap = self.kernel.counters()
            self.hooks = dict(self.kernel.attach_state())
            self.mode, self.generation = self.kernel.policy_state()
        except Exception as exc:
            log(f"kernel state unreadable: {exc}")
            snap = self.snapshot
        if self.generation != prev:
            # events of the replaced generation may still be in the rings: keep both
            self.ctx.norm.retire_generations({self.generation, prev})
        self.snapshot = snap
        lag = {k: r.available_bytes() for k, r in self.rings.items()}
        ring_fill = {k: lag[k] / r.size for k, r in self.rings.items()}
        self.backlog = {k: v // RECORD_STRIDE for k, v in lag.items()}
        if self.storms is not None:
            # after the decisions and the ring: a decision counted before and folded since
            # is then subtracted (never an overstated drop)
            self.suppressed = dict(self.storms.counts().suppressed)
        acct = self.ctx.acct
        for k in CLASSES:
            a = acct[k]
            ring = self.rings.get(k)
            if ring is None:
                continue
            written = (ring.records + ring.discarded + ring.foreign - a.base_ring_records
                       + lag[k] // RECORD_STRIDE)
            a.kernel_dropped = max(a.kernel_dropped, self.emitted(k, snap) - written)
        for k in CLASSES:
            a = acct[k]
            self.slo.observe(now, k, self.emitted(k, snap), a.kernel_dropped + a.dropped_userspace)
        changes = self.slo.evaluate(now)
        short = self.ctx.config.slo_short_window_s
        drop_ratio = {k: self.slo.window(k, short, now).ratio for k in CLASSES}
        deny_lost = self.slo.window("deny", short, now).dropped
        spool = self.ctx.spool
        sample = HealthSample(
            now=now,
            hooks_expected=list(self.hooks),
            hooks_attached=[h for h, ok in self.hooks.items() if ok],
            mode=self.mode,
            generation=self.generation,
            ring_fill=ring_fill,
            consumer_lag_bytes=lag,
            consumed_records={k: r.records + r.discarded + r.foreign for k, r in self.rings.items()},
            drop_ratio=drop_ratio,
            deny_lost=deny_lost,
            sink_failing=sorted(self.writer.failing),
            spooled_denies=spool.pending_events if spool else 0,
        )
        self.last_sample = sample
        self._run_checks()
        transition = self.monitor.observe(sample)
        if transition is not None:
            self.last_transition = transition
        self.alert_changes.extend(changes)
        return transition, changes

    def _run_checks(self) -> None:
        for check in self.checks:
            try:
                conds = check()
            except Exception as exc:  # a broken check must not stop the ticker; counted
                self.check_failures += 1
                if self.check_failures == 1 or self.check_failures % 60 == 0:
                    log(f"tick check failed ({self.check_failures} times): {exc!r}")
                continue
            for code, why in conds.items():
                if why:
                    self.monitor.set_condition(code, why)
                else:
                    self.monitor.clear_condition(code)

    def _stamp(self) -> tuple[str, str]:
        ns = int(self.wall_clock() * 1e9)
        s, rem = divmod(ns, 1_000_000_000)
        t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{rem // 1000:06d}Z"
        self._state_seq += 1
        return f"{self.ctx.norm.boot8}-agent-{ns}-{self._state_seq}", t

    def totals(self) -> tuple[dict[str, int], dict[str, int]]:
        """Per class since the start: decisions emitted, and lost at any stage."""
        acct = self.ctx.acct
        emitted = {k: self.emitted(k, self.snapshot) for k in CLASSES}
        dropped = {k: acct[k].kernel_dropped + acct[k].dropped_userspace for k in CLASSES}
        return emitted, dropped

    def heartbeat_event(self) -> StateEvent | None:
        """The current state again (``heartbeat``), once the monitor has published one."""
        tr = self.last_transition
        if tr is None or self.last_sample is None:
            return None
        m = self.monitor
        beat = Transition(now=self.now, state=tr.state, previous=tr.state, reasons=list(m.reasons),
                          sample=self.last_sample, codes=list(m.codes))
        return self.state_event(beat, heartbeat=True)

    def state_event(self, tr: Transition, *, heartbeat: bool = False) -> StateEvent:
        eid, t = self._stamp()
        s = tr.sample
        emitted, dropped = self.totals()
        return StateEvent(
            event_id=eid, time=t, host=self.ctx.norm.host, state=tr.state,
            previous=tr.previous, reasons=list(tr.reasons), reason_codes=list(tr.codes),
            hooks_attached=list(s.hooks_attached),
            hooks_expected=list(s.hooks_expected), mode=s.mode, generation=s.generation,
            ring_fill=dict(s.ring_fill), consumer_lag_bytes=dict(s.consumer_lag_bytes),
            drop_ratio=dict(s.drop_ratio), heartbeat=heartbeat, emitted_total=emitted,
            dropped_total=dropped,
        )

    def slo_event(self, ch: AlertChange) -> SloEvent:
        eid, t = self._stamp()
        return SloEvent(
            event_id=eid, time=t, host=self.ctx.norm.host, event_class=ch.klass, alert=ch.rule.name,
            status="firing" if ch.firing else "resolved", objective=ch.objective,
            long_window_s=ch.rule.long_s, short_window_s=ch.rule.short_s,
            burn_threshold=ch.rule.burn, burn_long=ch.burn_long, burn_short=ch.burn_short,
            emitted_long=ch.long.emitted, dropped_long=ch.long.dropped,
        )

    def trim_after_burst(self) -> None:
        """Once a burst has drained back to a trickle, give the freed heap back
        (aegis_stream.pipeline.memtrim): floods must not set the steady-state RSS.

        A burst is more than one batch in flight *or* more than one batch read since the
        previous tick: an agent that keeps up with a flood (natively, at 5,000 events/s)
        never has a batch in flight when the tick looks, yet its heap grew with every batch
        it allocated and freed (``soak.memgrowth``: +10.7 MB anonymous left behind by one
        flood that no tick saw in flight, +1.5 MB once trimmed).  A trickle is a quarter of
        a batch or less, both in flight and read per tick: not "nothing in flight", which a
        host with a steady trickle rarely reaches (the 2-hour soak on 6.1 held a flood's
        92 MB for up to 60 s after the rings had drained, until a gap in the trickle).  The
        quarter-batch hysteresis keeps a load that hovers near one batch from trimming
        every tick."""
        batch = self.ctx.config.batch_max
        in_flight = sum(self.ctx.in_flight(k) for k in CLASSES)
        read = sum(self.ctx.acct[k].read for k in CLASSES)
        per_tick, self._read_last_tick = read - self._read_last_tick, read
        if in_flight > batch or per_tick > batch:
            self._burst = True
        elif self._burst and in_flight <= batch // 4 and per_tick <= batch // 4:
            self._burst = False
            self.memory_trims += 1
            release_freed_memory()

    def _notify_state(self, ev: StateEvent) -> None:
        """Hand a state change to ``on_state`` (the agent writes its status file there).
        A failing callback must not stop the ticker -- the state event is still written
        to the sinks below -- but it must not go unseen either: an OSError (the status
        file's disk) is the expected failure; anything else is a bug in the callback,
        logged with its type.  Both are counted (``state_callback_failures``)."""
        if self.on_state is None:
            return
        try:
            self.on_state(ev)
        except OSError as exc:
            self.state_callback_failures += 1
            log(f"state callback failed: {exc}")
        except Exception as exc:
            self.state_callback_failures += 1
            log(f"state callback raised (a bug): {exc!r}")

    async def run(self) -> None:
        while True:
            transition, changes = self.tick()
            self.trim_after_burst()
            beat_s = self.ctx.config.state_heartbeat_s
            ev: StateEvent | None = None
            if transition is not None:
                ev = self.state_event(transition)
                log(f"state: {ev.state}" + (f" ({'; '.join(ev.reasons)})" if ev.reasons else ""))
                self._notify_state(ev)
            elif beat_s > 0 and self.now - self._last_state_write >= beat_s:
                ev = self.heartbeat_event()
            if ev is not None:
                self._last_state_write = self.now
                await self.writer.write_derived(SinkBatch("state", _enc.encode(ev) + b"\n", 1))
            if changes:
                evs = [self.slo_event(c) for c in changes]
                await self.writer.write_derived(SinkBatch("slo", _enc.encode_lines(evs), len(evs)))
            if self.storms is not None:
                await self.storms.report(self.writer)
            if self.on_tick is not None:
                self.on_tick()
            await trio.sleep(self.ctx.config.tick_s)
