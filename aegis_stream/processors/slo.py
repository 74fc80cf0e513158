"""Drop-ratio SLO per event class, with multi-window burn-rate alerts.

The SLO: at most ``objective`` (default 0.1%) of the events the kernel emits in a class
are lost anywhere (kernel ring full, sampled, shed, undecodable, sink failure).
``burn rate`` over a window = drop ratio in that window / objective: 1 spends the
error budget exactly over the SLO period, 14.4 spends 2% of a 30-day budget in an hour.

An alert rule fires when the burn rate over *both* its long and its short window is at
or above its threshold (Google SRE workbook, "multiwindow, multi-burn-rate alerts"):
the long window makes it significant, the short one makes it stop soon after the
problem does.  Default: ``page`` = 1 h and 5 min at 14.4.

Counts are kept in fixed buckets (``bucket_s``) of the engine's clock; a window sums
the buckets that start inside it.  Inputs are cumulative totals, so a missed sample
loses nothing; a total that goes down is taken as a counter reset.
"""

from __future__ import annotations

from typing import Any

import msgspec


class AlertRule(msgspec.Struct, frozen=True, kw_only=True):
    """One burn-rate alert: it fires while the burn rate over both ``long_s`` and ``short_s`` is at or
    above ``burn``."""
    name: str = "page"
    long_s: float = 3600.0
    short_s: float = 300.0
    burn: float = 14.4


class SloConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The drop-ratio objective per event class, the bucket width, and the burn-rate alerts."""
    objective: float = 0.001
    bucket_s: float = 10.0
    alerts: list[AlertRule] = msgspec.field(default_factory=lambda: [AlertRule()])


class Window(msgspec.Struct, frozen=True):
    """Emitted and dropped events summed over one window; :attr:`ratio` is the drop ratio (over the
    larger of the two, so drops counted after their emission never give a ratio above 1)."""
    emitted: int
    dropped: int

    @property
    def ratio(self) -> float:
        total = max(self.emitted, self.dropped)
        return self.dropped / total if total else 0.0


class AlertChange(msgspec.Struct, frozen=True, kw_only=True):
    """An alert that started or stopped firing, with both windows' counts and burn rates as evidence (the
    aegis.slo.v1 record)."""
    now: float
    klass: str
    rule: AlertRule
    firing: bool
    objective: float
    burn_long: float
    burn_short: float
    long: Window
    short: Window


class DropRateSlo:
    """The multi-window burn-rate drop SLO per event class (see the module).  It is fed cumulative
    emitted/dropped totals, so a missed sample loses nothing and a total that goes down counts
    as a reset.  Engine-independent: the agent's ticker runs it, and the faust fleet worker runs
    the same code per host, keeping its :meth:`snapshot` in a table row and :meth:`restore`-ing
    it, so agent and fleet judge the same numbers the same way."""

    def __init__(self, config: SloConfig | None = None) -> None:
        self.config = config or SloConfig()
        if self.config.objective <= 0:
            raise ValueError("SLO objective must be > 0")
        self.horizon = max([a.long_s for a in self.config.alerts] + [self.config.bucket_s])
        # class -> [[bucket_start, emitted, dropped], ...] oldest first
        self.buckets: dict[str, list[list[float]]] = {}
        self.last: dict[str, tuple[int, int]] = {}  # class -> last cumulative totals
        self.firing: dict[str, bool] = {}  # "class/alert" -> firing

    def observe(self, now: float, klass: str, emitted_total: int, dropped_total: int) -> None:
        prev_e, prev_d = self.last.get(klass, (0, 0))
        de = emitted_total - prev_e if emitted_total >= prev_e else emitted_total
        dd = dropped_total - prev_d if dropped_total >= prev_d else dropped_total
        self.last[klass] = (emitted_total, dropped_total)
        b = self.config.bucket_s
        start = (now // b) * b
        bs = self.buckets.setdefault(klass, [])
        if bs and bs[-1][0] == start:
            bs[-1][1] += de
            bs[-1][2] += dd
        elif de or dd or not bs:
            bs.append([start, de, dd])
        cutoff = now - self.horizon - b
        while bs and bs[0][0] < cutoff:
            bs.pop(0)

    def window(self, klass: str, seconds: float, now: float) -> Window:
        lo = now - seconds
        e = d = 0
        for start, be, bd in reversed(self.buckets.get(klass, [])):
            if start < lo:
                break
            e += int(be)
            d += int(bd)
        return Window(e, d)

    def burn(self, klass: str, seconds: float, now: float) -> float:
        return self.window(klass, seconds, now).ratio / self.config.objective

    def evaluate(self, now: float) -> list[AlertChange]:
        out = []
        for klass in sorted(self.buckets):
            for rule in self.config.alerts:
                lw = self.window(klass, rule.long_s, now)
                sw = self.window(klass, rule.short_s, now)
                bl, bs = lw.ratio / self.config.objective, sw.ratio / self.config.objective
                firing = bl >= rule.burn and bs >= rule.burn
                key = f"{klass}/{rule.name}"
                if firing != self.firing.get(key, False):
                    self.firing[key] = firing
                    out.append(AlertChange(now=now, klass=klass, rule=rule, firing=firing,
                                           objective=self.config.objective, burn_long=bl,
                                           burn_short=bs, long=lw, short=sw))
        return out

    def snapshot(self) -> dict[str, Any]:
        return {"config": msgspec.to_builtins(self.config), "buckets": self.buckets,
                "last": {k: list(v) for k, v in self.last.items()}, "firing": dict(self.firing)}

    @classmethod
    def restore(cls, state: dict[str, Any]) -> DropRateSlo:
        s = cls(msgspec.convert(state["config"], SloConfig))
        s.buckets = {k: [list(b) for b in v] for k, v in state["buckets"].items()}
        s.last = {k: (int(v[0]), int(v[1])) for k, v in state["last"].items()}
        s.firing = dict(state["firing"])
        return s
