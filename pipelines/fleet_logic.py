"""The fleet worker's aggregation logic, engine-free (no faust, no Kafka, no clock).

The faust app (:mod:`pipelines.fleet`) feeds it batches of source records and writes back
the rows it returns; these functions are the whole meaning of the fleet tables, so unit
tests (tests/test_fleet_worker.py) pin them without a broker.

Exactness by idempotence
    Every table row carries ``hw``: the highest source offset it has absorbed, and every
    row key starts with the source partition (``"3|host-a"``), so one row only ever
    absorbs records of one partition, in offset order.  Applying a record whose offset is
    ``<= hw`` is a no-op.  The row's counts and its ``hw`` travel in the same changelog
    record, so after a kill -9 whatever the changelog kept is consistent with itself: a
    replay from any earlier offset re-applies nothing twice and skips nothing.  (Keys
    are partition-local for a second reason: faust restores a key from the changelog
    partition it was written to; a key written from two partitions would restore to
    whichever partition was read last.)

Per-host judgement reuses the agent's processors: :class:`~aegis_stream.processors.
degraded.DegradedMonitor` (same thresholds and hysteresis, fed from the host's state
records) and :class:`~aegis_stream.processors.slo.DropRateSlo` (fed with the cumulative
per-class totals a state record carries).  A host whose last state record is older than
``silent_after_s`` is at least ``degraded`` (reason ``agent unresponsive: ...``).
"""

from __future__ import annotations

import calendar
import heapq
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from aegis_stream.agent.health import State
from aegis_stream.agent.reasons import codes_of
from aegis_stream.pipeline.schema import DecisionEvent, SloEvent, StateEvent
from aegis_stream.processors.degraded import DegradedConfig, DegradedMonitor, HealthSample
from aegis_stream.processors.slo import DropRateSlo, SloConfig, Window

CLASSES = ("deny", "audit")
PROGRESS_KEY = "@progress"


# ------------------------------------------------------------------ rows (table values)
class Counts(msgspec.Struct, kw_only=True):
    """Decisions absorbed by one row; ``hw`` = highest source offset absorbed (-1 none)."""

    deny: int = 0
    audit: int = 0
    hw: int = -1
    last_time: str = ""  # the newest decision time seen (RFC 3339)


class HostRow(msgspec.Struct, kw_only=True):
    """One host as the fleet judges it (state-topic partition local)."""

    host: str
    hw: int = -1
    state: str = ""  # the fleet's judgement: agent state, monitor, silence (worst wins)
    agent_state: str = ""  # what the agent itself published
    reasons: list[str] = []
    reason_codes: list[str] = []
    generation: int = 0
    mode: str = ""
    event_time: str = ""  # the last state record's own time
    seen_at: float = 0.0  # when the last state record was written (its Kafka timestamp)
    silent: bool = False
    drop_ratio: dict[str, float] = {}
    emitted: dict[str, int] = {}  # reset-corrected cumulative per class (fleet SLO input)
    dropped: dict[str, int] = {}
    monitor: dict[str, Any] = {}  # DegradedMonitor.snapshot()
    slo: dict[str, Any] = {}  # DropRateSlo.snapshot()
    agent_alerts: dict[str, str] = {}  # "class/alert" -> firing|resolved (its aegis.slo.v1)


_enc = msgspec.json.Encoder()
_counts_dec = msgspec.json.Decoder(Counts)
_host_dec = msgspec.json.Decoder(HostRow)
decision_decoder = msgspec.json.Decoder(DecisionEvent)
state_decoder = msgspec.json.Decoder(StateEvent)
# the state topic carries the agent's state changes and its own SLO alert changes
state_topic_decoder = msgspec.json.Decoder(StateEvent | SloEvent)


def encode_row(row: msgspec.Struct) -> bytes:
    return _enc.encode(row)


# faust hands a restored value back decoded (a dict) where a live one is the raw bytes
# written: both are accepted
def decode_counts(raw: bytes | dict[str, Any] | None) -> Counts:
    if raw is None:
        return Counts()
    return msgspec.convert(raw, Counts) if isinstance(raw, dict) else _counts_dec.decode(raw)


def decode_host(raw: bytes | dict[str, Any] | None, host: str) -> HostRow:
    if raw is None:
        return HostRow(host=host)
    return msgspec.convert(raw, HostRow) if isinstance(raw, dict) else _host_dec.decode(raw)


# ------------------------------------------------------------------ keys
def host_key(partition: int, host: str) -> str:
    return f"{partition}|{host}"


def rule_key(partition: int, rule_id: str, generation: int) -> str:
    return f"{partition}|{rule_id}|{generation}"


def window_key(partition: int, rule_id: str, generation: int, start: int) -> str:
    return f"{partition}|{rule_id}|{generation}|{start}"


def key_partition(key: str) -> int:
    """The source partition a row key belongs to (its changelog partition)."""
    return int(key.split("|", 1)[0])


def split_rule_key(key: str) -> tuple[int, str, int]:
    p, rest = key.split("|", 1)
    rule_id, gen = rest.rsplit("|", 1)
    return int(p), rule_id, int(gen)


def split_window_key(key: str) -> tuple[int, str, int, int]:
    p, rest = key.split("|", 1)
    rest, start = rest.rsplit("|", 1)
    rule_id, gen = rest.rsplit("|", 1)
    return int(p), rule_id, int(gen), int(start)


# ------------------------------------------------------------------ time
_SECOND_CACHE: dict[str, int] = {}


def epoch_s(rfc3339: str) -> int:
    """Whole seconds of an RFC 3339 UTC time (``2026-12-01T08:00:00.123456Z``); the
    per-second prefix is cached (a batch holds few distinct seconds)."""
    prefix = rfc3339[:19]
    s = _SECOND_CACHE.get(prefix)
    if s is None:
        if len(_SECOND_CACHE) > 4096:
            _SECOND_CACHE.clear()
        try:
            s = calendar.timegm((int(prefix[0:4]), int(prefix[5:7]), int(prefix[8:10]),
                                 int(prefix[11:13]), int(prefix[14:16]), int(prefix[17:19]), 0, 0, 0))
        except ValueError:
            raise ValueError(f"bad decision time {rfc3339!r} (want RFC 3339 UTC)") from None
        _SECOND_CACHE[prefix] = s
    return s


# ------------------------------------------------------------------ decisions
class DecisionDelta(msgspec.Struct):
    """What one batch adds to one row: counts and the highest offset in it."""

    deny: int = 0
    audit: int = 0
    first: int = -1  # lowest offset contributing
    hw: int = -1
    last_time: str = ""


class FoldResult(msgspec.Struct):
    """Per table: key -> delta; plus how many records were skipped (already absorbed by
    the row they belong to) and how many were bad (undecodable, counted, never raised)."""

    hosts: dict[str, DecisionDelta]
    rules: dict[str, DecisionDelta]
    windows: dict[str, DecisionDelta]
    records: int = 0
    bad: int = 0
    bad_reasons: dict[str, int] = {}


def _add(d: dict[str, DecisionDelta], key: str, decision: str, offset: int, t: str) -> None:
    delta = d.get(key)
    if delta is None:
        delta = d[key] = DecisionDelta(first=offset)
    if decision == "deny":
        delta.deny += 1
    else:
        delta.audit += 1
    delta.hw = offset
    if t > delta.last_time:
        delta.last_time = t


def fold_decisions(records: Iterable[tuple[int, int, bytes]], window_s: int) -> FoldResult:
    """Group a batch of ``(partition, offset, value)`` decision records into per-row
    deltas (one table write per key per batch, not one per record).  Records of one
    partition must come in offset order (as a consumer returns them)."""
    hosts: dict[str, DecisionDelta] = {}
    rules: dict[str, DecisionDelta] = {}
    windows: dict[str, DecisionDelta] = {}
    n = bad = 0
    reasons: dict[str, int] = {}
    dec = decision_decoder.decode
    for partition, offset, value in records:
        n += 1
        try:
            ev = dec(value)
            if ev.decision not in CLASSES:
                raise ValueError(f"decision {ev.decision!r}")
            start = epoch_s(ev.time) // window_s * window_s
        except (msgspec.DecodeError, ValueError) as exc:
            bad += 1
            why = "undecodable" if isinstance(exc, msgspec.DecodeError) else "bad_field"
            reasons[why] = reasons.get(why, 0) + 1
            continue
        _add(hosts, host_key(partition, ev.host), ev.decision, offset, ev.time)
        _add(rules, rule_key(partition, ev.rule_id, ev.generation), ev.decision, offset, ev.time)
        _add(windows, window_key(partition, ev.rule_id, ev.generation, start), ev.decision, offset, ev.time)
    return FoldResult(hosts, rules, windows, records=n, bad=bad, bad_reasons=reasons)


def apply_delta(row: Counts, delta: DecisionDelta, offsets: list[int] | None = None) -> bool:
    """Absorb ``delta`` into ``row`` unless the row already holds it; True if changed.

    A delta lies wholly above or wholly at/below ``row.hw`` when the batch starts where the
    consumer's position says (everything below was absorbed, everything above was not);
    a batch that straddles ``hw`` (a replay that started earlier than needed) is refused
    with ``ValueError`` rather than guessed at: the caller re-folds it per record."""
    if delta.hw <= row.hw:
        return False  # a replay of what this row already absorbed
    if delta.first <= row.hw:
        raise ValueError(f"batch straddles the row's high-water offset {row.hw} "
                         f"(offsets {delta.first}..{delta.hw})")
    row.deny += delta.deny
    row.audit += delta.audit
    row.hw = delta.hw
    if delta.last_time > row.last_time:
        row.last_time = delta.last_time
    return True


def fold_exact(
    records: list[tuple[int, int, bytes]],
    window_s: int,
    get: Callable[[str, str], Counts],
) -> tuple[dict[tuple[str, str], Counts], FoldResult]:
    """Fold a batch and apply it to the current rows (``get(table, key)``); returns the
    rows that changed, keyed by (table, key), and the fold's accounting.

    Records a row already absorbed (offset <= its hw) are dropped before folding, per row,
    so a batch that straddles a row's high-water offset is still exact."""
    result = fold_decisions(records, window_s)
    changed: dict[tuple[str, str], Counts] = {}
    straddling = False
    for table, deltas in (("hosts", result.hosts), ("rules", result.rules), ("windows", result.windows)):
        for key, delta in deltas.items():
            row = get(table, key)
            if delta.first <= row.hw < delta.hw:
                straddling = True
                break
            if apply_delta(row, delta):
                changed[(table, key)] = row
        if straddling:
            break
    if not straddling:
        return changed, result
    # slow path (only right after a restart that replays from before some rows' hw):
    # one record at a time against fresh rows
    changed = {}
    rows: dict[tuple[str, str], Counts] = {}
    for rec in records:
        one = fold_decisions([rec], window_s)
        for table, deltas in (("hosts", one.hosts), ("rules", one.rules), ("windows", one.windows)):
            for key, delta in deltas.items():
                cur = rows.get((table, key))
                if cur is None:
                    cur = rows[(table, key)] = get(table, key)
                if apply_delta(cur, delta):
                    changed[(table, key)] = cur
    return changed, result


def fold_naive(
    records: list[tuple[int, int, bytes]],
    window_s: int,
    get: Callable[[str, str], Counts],
) -> tuple[dict[tuple[str, str], Counts], FoldResult]:
    """faust's default semantics, for the demonstration (``--naive``): every record
    delivered is counted, replays included (at-least-once over-counts after a crash)."""
    result = fold_decisions(records, window_s)
    changed: dict[tuple[str, str], Counts] = {}
    for table, deltas in (("hosts", result.hosts), ("rules", result.rules), ("windows", result.windows)):
        for key, delta in deltas.items():
            row = get(table, key)
            row.deny += delta.deny
            row.audit += delta.audit
            row.hw = max(row.hw, delta.hw)
            row.last_time = max(row.last_time, delta.last_time)
            changed[(table, key)] = row
    return changed, result


# ------------------------------------------------------------------ fleet views
class RuleCount(msgspec.Struct, frozen=True, kw_only=True):
    rule_id: str
    generation: int
    denies: int
    audits: int = 0


def merge_rules(items: Iterable[tuple[str, Counts]]) -> dict[tuple[str, int], Counts]:
    """Partition-local rule rows -> fleet rule counts keyed (rule_id, generation)."""
    out: dict[tuple[str, int], Counts] = {}
    for key, row in items:
        _, rule_id, gen = split_rule_key(key)
        c = out.setdefault((rule_id, gen), Counts())
        c.deny += row.deny
        c.audit += row.audit
    return out


def top_rules(merged: dict[tuple[str, int], Counts], n: int = 10) -> list[RuleCount]:
    """The ``n`` most denied (rule, generation) pairs, most denies first (ties by rule id)."""
    best = heapq.nsmallest(n, merged.items(), key=lambda kv: (-kv[1].deny, kv[0][0], kv[0][1]))
    return [RuleCount(rule_id=r, generation=g, denies=c.deny, audits=c.audit)
            for (r, g), c in best if c.deny]


# ------------------------------------------------------------------ host state
def _worst(*states: str) -> str:
    known = [State(s) for s in states if s in State.__members__.values()]
    return str(State.worst(*known)) if known else ""


def sample_of(ev: StateEvent, now: float) -> HealthSample:
    """The agent's state record as a health sample for the fleet's DegradedMonitor.

    Consumer lag is left out: the record has no consumed-record progress, and lag without
    progress would read as a stall; the agent judges its own rings (its state is kept)."""
    return HealthSample(
        now=now, hooks_expected=list(ev.hooks_expected), hooks_attached=list(ev.hooks_attached),
        mode=ev.mode, generation=ev.generation, ring_fill=dict(ev.ring_fill),
        drop_ratio=dict(ev.drop_ratio),
    )


def apply_state(
    row: HostRow,
    offset: int,
    ev: StateEvent,
    now: float,
    degraded: DegradedConfig,
    slo: SloConfig,
) -> bool:
    """Absorb one state record into its host row (no-op if already absorbed)."""
    if offset <= row.hw:
        return False
    row.hw = offset
    monitor = DegradedMonitor.restore(row.monitor) if row.monitor else DegradedMonitor(degraded)
    monitor.observe(sample_of(ev, now))
    row.monitor = monitor.snapshot()
    tracker = DropRateSlo.restore(row.slo) if row.slo else DropRateSlo(slo)
    for klass in sorted(ev.emitted_total):  # empty in records of agents before the field
        e = ev.emitted_total[klass]
        d = ev.dropped_total.get(klass, 0)
        prev_e, prev_d = tracker.last.get(klass, (0, 0))
        # reset-corrected cumulative, the same rule DropRateSlo.observe applies
        row.emitted[klass] = row.emitted.get(klass, 0) + (e - prev_e if e >= prev_e else e)
        row.dropped[klass] = row.dropped.get(klass, 0) + (d - prev_d if d >= prev_d else d)
        tracker.observe(now, klass, e, d)
    tracker.evaluate(now)
    row.slo = tracker.snapshot()
    row.agent_state = ev.state
    row.generation = ev.generation
    row.mode = ev.mode
    row.event_time = ev.time
    row.seen_at = now
    row.drop_ratio = dict(ev.drop_ratio)
    row.silent = False
    judge(row, monitor.state, list(ev.reasons), monitor.reasons)
    return True


def apply_slo(row: HostRow, offset: int, ev: SloEvent) -> bool:
    """Absorb the agent's own SLO alert change (same partition and hw as its states)."""
    if offset <= row.hw:
        return False
    row.hw = offset
    row.agent_alerts[f"{ev.event_class}/{ev.alert}"] = ev.status
    return True


def judge(row: HostRow, monitor_state: str, agent_reasons: list[str], monitor_reasons: list[str],
          silence: str = "") -> None:
    """The fleet's state of a host: the worst of the agent's own state, the monitor's
    judgement of the same record, and silence; reasons of all that apply, deduplicated."""
    state = _worst(row.agent_state, monitor_state, "degraded" if silence else "")
    reasons: list[str] = []
    for r in ([silence] if silence else []) + agent_reasons + monitor_reasons:
        if r and r not in reasons:
            reasons.append(r)
    row.state = state
    row.reasons = reasons
    row.reason_codes = codes_of(reasons)


def check_silence(row: HostRow, now: float, silent_after_s: float) -> bool:
    """Mark a host silent (at least degraded) when its last state record is older than
    ``silent_after_s`` (by the worker's clock); True when the row changed."""
    quiet = now - row.seen_at
    if quiet < silent_after_s or row.silent:
        return False
    row.silent = True
    monitor = DegradedMonitor.restore(row.monitor) if row.monitor else DegradedMonitor()
    agent_reasons = [r for r in row.reasons if r not in monitor.reasons
                     and not r.startswith("agent unresponsive")]
    judge(row, monitor.state, agent_reasons, monitor.reasons,
          silence=f"agent unresponsive: no state record for {quiet:.0f}s "
                  f"(> {silent_after_s:g}s)")
    return True


def fleet_window(rows: Iterable[HostRow], klass: str, seconds: float, now: float) -> Window:
    """The fleet's drop window: the hosts' DropRateSlo windows summed."""
    e = d = 0
    for row in rows:
        if row.slo:
            w = DropRateSlo.restore(row.slo).window(klass, seconds, now)
            e += w.emitted
            d += w.dropped
    return Window(e, d)
