"""The degraded-mode signal: one protection state with reasons.

States, worst first (docs/EVENTS.md, aegis.state.v1):

``blind``
    The agent cannot account for what the kernel decides: no hook attached, deny events
    being lost (deny ring full), or a ring consumer that made no progress for
    ``stall_s`` while records wait.
``degraded``
    Protection or visibility is partial: some expected hooks not attached, no valid
    policy generation, a ring at or above ``fill_high``, consumer lag at or above
    ``lag_high_bytes``, audit drop ratio above ``audit_drop_max``, a failing sink,
    denies waiting in the disk spool.
``enforcing`` / ``auditing``
    Every expected hook attached, the active generation in enforce / audit mode, none
    of the above.

Every reason is emitted with its stable :class:`~aegis_stream.agent.health.ReasonCode`
(``hooks_missing``, ``deny_events_lost``, ...): :attr:`DegradedMonitor.codes`, the
``reason_codes`` of aegis.state.v1 and the ``aegis_state_reason`` metric.  Conditions
the agent knows about outside the sample (``reconcile_inconsistent``) are set with
:meth:`DegradedMonitor.set_condition` and count as degraded until cleared.

A worse state is taken at once; a better one only after it held for ``recover_s``
(hysteresis: no flapping on a ring that hovers at the threshold).  ``enforcing`` <->
``auditing`` (a mode change) is a fact, taken at once.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from aegis_stream.agent.health import (
    Reason,
    ReasonCode,
    Severity,
    State,
    continuity_reason,
    hooks_reason,
    unique_codes,
)
from aegis_stream.agent.reasons import BY_CODE, STATE_CODES, code_of
from aegis_stream.kernel import abi


class DegradedConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The thresholds of the degraded-mode judgement (ring fill and lag, audit drop ratio, consumer
    stall) and ``recover_s``, how long a better state must hold before it is taken."""
    fill_high: float = 0.8
    lag_high_bytes: int = 0  # 0 = judged by fill_high only
    audit_drop_max: float = 0.01
    stall_s: float = 10.0
    recover_s: float = 30.0


class HealthSample(msgspec.Struct, frozen=True, kw_only=True):
    """What the engine observed at ``now``."""

    now: float
    hooks_expected: list[str]
    hooks_attached: list[str]
    mode: str  # abi.Mode label (enforce | audit) or abi.MODE_NONE
    generation: int = 0
    ring_fill: dict[str, float] = {}
    consumer_lag_bytes: dict[str, int] = {}
    consumed_records: dict[str, int] = {}  # cumulative, per ring: progress
    drop_ratio: dict[str, float] = {}  # per class, short window
    deny_lost: int = 0  # deny events lost (kernel or userspace) in the short window
    sink_failing: list[str] = []
    spooled_denies: int = 0


class Transition(msgspec.Struct, frozen=True, kw_only=True):
    """A change of the protection state, with its reasons, their stable codes and the health sample that
    caused it; the ticker turns it into an aegis.state.v1 record."""
    now: float
    state: State
    previous: str  # the State before, "" for the first
    reasons: list[str]
    sample: HealthSample
    codes: list[ReasonCode] = []  # the codes of ``reasons``, in order, each once


class DegradedMonitor:
    """Judges :class:`HealthSample` s into a published :class:`State` with reasons, with
    hysteresis on the way back to health (see the module docstring)."""

    def __init__(self, config: DegradedConfig | None = None) -> None:
        self.config = config or DegradedConfig()
        self.state: State | Literal[""] = ""  # "" until the first sample
        self.judged: list[Reason] = []  # the reasons of the published state
        self.candidate: State | Literal[""] = ""  # a better state waiting out recover_s
        self.candidate_since = 0.0
        self.progress: dict[str, tuple[int, float]] = {}  # ring -> (consumed, since)
        self.changes = 0
        self.conditions: dict[ReasonCode, str] = {}  # code -> reason text, set by the agent

    @property
    def reasons(self) -> list[str]:
        """The texts of the published state's reasons."""
        return [r.text for r in self.judged]

    @property
    def codes(self) -> list[ReasonCode]:
        """Reason codes of the published state, in order, each once."""
        return unique_codes(self.judged)

    def set_condition(self, code: str, reason: str) -> None:
        """A condition only the agent knows (e.g. ``reconcile_inconsistent``); it holds
        (as degraded, or blind if the code says so) until :meth:`clear_condition`."""
        rc = BY_CODE[code]
        if rc.code not in STATE_CODES:
            raise ValueError(f"{code} is a {rc.kind} code, not a state condition")
        self.conditions[rc.code] = reason

    def clear_condition(self, code: str) -> None:
        self.conditions.pop(ReasonCode(code), None)

    # ---------------------------------------------------------------- evaluation
    def judge(self, s: HealthSample) -> tuple[State, list[Reason]]:
        """The state ``s`` implies and why (no hysteresis: :meth:`observe` adds it)."""
        c = self.config
        blind: list[Reason] = []
        degraded: list[Reason] = []
        hooks = hooks_reason(s.hooks_expected, s.hooks_attached)
        if hooks is not None:
            (blind if hooks.code is ReasonCode.HOOKS_NONE else degraded).append(hooks)
        cont = continuity_reason(s.hooks_expected, s.hooks_attached)
        if cont is not None:
            degraded.append(cont)
        if s.deny_lost:
            blind.append(Reason(ReasonCode.DENY_EVENTS_LOST,
                                f"{s.deny_lost} deny events lost in the short window"))
        for ring in sorted(s.consumer_lag_bytes):
            lag = s.consumer_lag_bytes[ring]
            consumed = s.consumed_records.get(ring, 0)
            last, since = self.progress.get(ring, (consumed, s.now))
            if consumed != last or lag == 0:
                since = s.now
            self.progress[ring] = (consumed, since)
            if lag and s.now - since >= c.stall_s:
                blind.append(Reason(ReasonCode.CONSUMER_STALLED,
                                    f"{ring} ring consumer stalled for {s.now - since:.0f}s "
                                    f"with {lag} bytes waiting"))
        if s.mode == abi.MODE_NONE:
            degraded.append(Reason(ReasonCode.NO_POLICY,
                                   "no valid policy generation active (every hook allows)"))
        for ring in sorted(s.ring_fill):
            fill = s.ring_fill[ring]
            if fill >= c.fill_high:
                degraded.append(Reason(ReasonCode.RING_HIGH,
                                       f"{ring} ring {fill:.0%} full (>= {c.fill_high:.0%})"))
        if c.lag_high_bytes:
            for ring in sorted(s.consumer_lag_bytes):
                if s.consumer_lag_bytes[ring] >= c.lag_high_bytes:
                    degraded.append(Reason(ReasonCode.CONSUMER_LAG,
                                           f"{ring} consumer {s.consumer_lag_bytes[ring]} bytes "
                                           f"behind (>= {c.lag_high_bytes})"))
        audit_drop = s.drop_ratio.get("audit", 0.0)
        if audit_drop > c.audit_drop_max:
            degraded.append(Reason(ReasonCode.AUDIT_DROPS,
                                   f"audit drop ratio {audit_drop:.2%} > {c.audit_drop_max:.2%}"))
        for sink in s.sink_failing:
            degraded.append(Reason(ReasonCode.SINK_FAILING, f"sink failing: {sink}"))
        if s.spooled_denies:
            degraded.append(Reason(ReasonCode.DENIES_SPOOLED,
                                   f"{s.spooled_denies} denies waiting in the disk spool"))
        for code, why in sorted(self.conditions.items()):
            (blind if BY_CODE[code].state is Severity.BLIND else degraded).append(Reason(code, why))
        if blind:
            return State.BLIND, blind + degraded
        if degraded:
            return State.DEGRADED, degraded
        return State.healthy(s.mode), []

    def evaluate(self, s: HealthSample) -> tuple[State, list[str]]:
        """:meth:`judge` with the reasons as texts."""
        state, why = self.judge(s)
        return state, [r.text for r in why]

    def observe(self, s: HealthSample) -> Transition | None:
        """Feed one sample; a Transition when the published state changes."""
        new, judged = self.judge(s)
        old = self.state
        if not old or new.severity >= old.severity:
            take = new != old
            self.candidate = ""
        else:  # better: only after it held for recover_s
            if self.candidate != new:
                self.candidate, self.candidate_since = new, s.now
            take = s.now - self.candidate_since >= self.config.recover_s
            if not take:
                judged = self.judged if self.judged else judged
        if take:
            self.state = new
            self.judged = judged
            self.candidate = ""
            self.changes += 1
            return Transition(now=s.now, state=new, previous=old, reasons=[r.text for r in judged],
                              sample=s, codes=unique_codes(judged))
        if new == old:
            self.judged = judged
        return None

    # ---------------------------------------------------------------- state
    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state, "reasons": self.reasons, "codes": self.codes,
                "conditions": dict(self.conditions), "candidate": self.candidate,
                "candidate_since": self.candidate_since, "changes": self.changes,
                "progress": {k: list(v) for k, v in self.progress.items()},
                "config": msgspec.to_builtins(self.config),
                "reason_codes": [r.code for r in self.judged]}  # one per reason

    @classmethod
    def restore(cls, state: dict[str, Any]) -> DegradedMonitor:
        m = cls(msgspec.convert(state.get("config", {}), DegradedConfig))
        m.state = State(state["state"]) if state["state"] else ""
        texts = [str(t) for t in state["reasons"]]
        # a snapshot taken before reasons carried codes: read its texts (reasons.code_of)
        per_reason = state.get("reason_codes") or [code_of(t) for t in texts]
        m.judged = [Reason(ReasonCode(c), t) for c, t in zip(per_reason, texts, strict=True)]
        cand = state.get("candidate", "")
        m.candidate = State(cand) if cand else ""
        m.candidate_since = float(state.get("candidate_since", 0.0))
        m.changes = int(state.get("changes", 0))
        m.progress = {k: (int(v[0]), float(v[1])) for k, v in state.get("progress", {}).items()}
        m.conditions = {ReasonCode(k): str(v) for k, v in state.get("conditions", {}).items()}
        return m
