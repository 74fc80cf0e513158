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

Every reason text belongs to one stable code of :mod:`aegis_stream.reasons`
(``hooks_missing``, ``deny_events_lost``, ...): :attr:`DegradedMonitor.codes`, the
``reason_codes`` of aegis.state.v1 and the ``aegis_state_reason`` metric.  Conditions
the agent knows about outside the sample (``reconcile_inconsistent``) are set with
:meth:`DegradedMonitor.set_condition` and count as degraded until cleared.

A worse state is taken at once; a better one only after it held for ``recover_s``
(hysteresis: no flapping on a ring that hovers at the threshold).  ``enforcing`` <->
``auditing`` (a mode change) is a fact, taken at once.
"""

from __future__ import annotations

from typing import Any

import msgspec

from aegis_stream.agent.reasons import BY_CODE, codes_of

SEVERITY = {"enforcing": 0, "auditing": 0, "degraded": 1, "blind": 2}


class DegradedConfig(msgspec.Struct, frozen=True, kw_only=True):
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
    mode: str  # enforce | audit | none
    generation: int = 0
    ring_fill: dict[str, float] = {}
    consumer_lag_bytes: dict[str, int] = {}
    consumed_records: dict[str, int] = {}  # cumulative, per ring: progress
    drop_ratio: dict[str, float] = {}  # per class, short window
    deny_lost: int = 0  # deny events lost (kernel or userspace) in the short window
    sink_failing: list[str] = []
    spooled_denies: int = 0


class Transition(msgspec.Struct, frozen=True, kw_only=True):
    now: float
    state: str
    previous: str
    reasons: list[str]
    sample: HealthSample
    codes: list[str] = []  # aegis_stream.reasons codes of ``reasons``, in order


class DegradedMonitor:
    def __init__(self, config: DegradedConfig | None = None) -> None:
        self.config = config or DegradedConfig()
        self.state = ""
        self.reasons: list[str] = []
        self.candidate = ""  # a better state waiting out recover_s
        self.candidate_since = 0.0
        self.progress: dict[str, tuple[int, float]] = {}  # ring -> (consumed, since)
        self.changes = 0
        self.conditions: dict[str, str] = {}  # code -> reason text, set by the agent

    @property
    def codes(self) -> list[str]:
        """Reason codes of the published state (aegis_stream.reasons)."""
        return codes_of(self.reasons)

    def set_condition(self, code: str, reason: str) -> None:
        """A condition only the agent knows (e.g. ``reconcile_inconsistent``); it holds
        (as degraded, or blind if the code says so) until :meth:`clear_condition`."""
        rc = BY_CODE[code]
        if rc.kind != "state":
            raise ValueError(f"{code} is a {rc.kind} code, not a state condition")
        self.conditions[code] = reason

    def clear_condition(self, code: str) -> None:
        self.conditions.pop(code, None)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, s: HealthSample) -> tuple[str, list[str]]:
        c = self.config
        blind: list[str] = []
        degraded: list[str] = []
        expected = list(s.hooks_expected)
        attached = [h for h in expected if h in s.hooks_attached]
        if not attached:
            blind.append(f"no hooks attached (0/{len(expected)})")
        elif len(attached) < len(expected):
            missing = ", ".join(h for h in expected if h not in attached)
            degraded.append(f"hooks {len(attached)}/{len(expected)} attached (missing {missing})")
        if s.deny_lost:
            blind.append(f"{s.deny_lost} deny events lost in the short window")
        for ring in sorted(s.consumer_lag_bytes):
            lag = s.consumer_lag_bytes[ring]
            consumed = s.consumed_records.get(ring, 0)
            last, since = self.progress.get(ring, (consumed, s.now))
            if consumed != last or lag == 0:
                since = s.now
            self.progress[ring] = (consumed, since)
            if lag and s.now - since >= c.stall_s:
                blind.append(f"{ring} ring consumer stalled for {s.now - since:.0f}s "
                             f"with {lag} bytes waiting")
        if s.mode == "none":
            degraded.append("no valid policy generation active (every hook allows)")
        for ring in sorted(s.ring_fill):
            fill = s.ring_fill[ring]
            if fill >= c.fill_high:
                degraded.append(f"{ring} ring {fill:.0%} full (>= {c.fill_high:.0%})")
        if c.lag_high_bytes:
            for ring in sorted(s.consumer_lag_bytes):
                if s.consumer_lag_bytes[ring] >= c.lag_high_bytes:
                    degraded.append(f"{ring} consumer {s.consumer_lag_bytes[ring]} bytes behind "
                                    f"(>= {c.lag_high_bytes})")
        audit_drop = s.drop_ratio.get("audit", 0.0)
        if audit_drop > c.audit_drop_max:
            degraded.append(f"audit drop ratio {audit_drop:.2%} > {c.audit_drop_max:.2%}")
        for sink in s.sink_failing:
            degraded.append(f"sink failing: {sink}")
        if s.spooled_denies:
            degraded.append(f"{s.spooled_denies} denies waiting in the disk spool")
        for code, why in sorted(self.conditions.items()):
            (blind if BY_CODE[code].state == "blind" else degraded).append(why)
        if blind:
            return "blind", blind + degraded
        if degraded:
            return "degraded", degraded
        return ("enforcing" if s.mode == "enforce" else "auditing"), []

    def observe(self, s: HealthSample) -> Transition | None:
        """Feed one sample; a Transition when the published state changes."""
        new, reasons = self.evaluate(s)
        old = self.state
        if not old or SEVERITY[new] >= SEVERITY[old]:
            take = new != old
            self.candidate = ""
        else:  # better: only after it held for recover_s
            if self.candidate != new:
                self.candidate, self.candidate_since = new, s.now
            take = s.now - self.candidate_since >= self.config.recover_s
            if not take:
                reasons = self.reasons if self.reasons else reasons
        if take:
            self.state = new
            self.reasons = reasons
            self.candidate = ""
            self.changes += 1
            return Transition(now=s.now, state=new, previous=old, reasons=reasons, sample=s,
                              codes=codes_of(reasons))
        if new == old:
            self.reasons = reasons
        return None

    # ---------------------------------------------------------------- state
    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state, "reasons": list(self.reasons), "codes": self.codes,
                "conditions": dict(self.conditions), "candidate": self.candidate,
                "candidate_since": self.candidate_since, "changes": self.changes,
                "progress": {k: list(v) for k, v in self.progress.items()},
                "config": msgspec.to_builtins(self.config)}

    @classmethod
    def restore(cls, state: dict[str, Any]) -> DegradedMonitor:
        m = cls(msgspec.convert(state.get("config", {}), DegradedConfig))
        m.state = state["state"]
        m.reasons = list(state["reasons"])
        m.candidate = state.get("candidate", "")
        m.candidate_since = float(state.get("candidate_since", 0.0))
        m.changes = int(state.get("changes", 0))
        m.progress = {k: (int(v[0]), float(v[1])) for k, v in state.get("progress", {}).items()}
        m.conditions = {str(k): str(v) for k, v in state.get("conditions", {}).items()}
        return m
