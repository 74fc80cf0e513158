"""The fleet worker's aggregation logic, engine-free (no faust, no Kafka, no clock).

The faust app (:mod:`pipelines.fleet`) feeds it batches of source records and writes back
the rows it returns; these functions are the whole meaning of the fleet tables, so unit
tests (tests/unit/test_fleet_worker.py) pin them without a broker.

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

Each decision once per (host, ``event_id``)
    The agent's sink delivers denies at least once: a batch produced but not acked in
    time is spooled and produced again after the broker returns, at new offsets, behind
    newer records.  Offsets cannot see that; the host row can.  It keeps, per (boot,
    class), the newest ``ktime_ns`` absorbed and the ids absorbed within a reorder window
    (1 s) below it (:func:`seen_before`): an id in that set, or a ktime below the window,
    is a repeat -- refused, counted per class in the row (``duplicates``) and in the
    worker's dropped-records metric (``duplicate``).  The host row decides for every table
    (a rule or window row takes only what its host row accepted), and it is written after
    the batch's rule and window rows, into the same changelog partition: whatever prefix a
    crash leaves, a host row's dedup state is that of its ``hw`` and every row its batch
    touched survived with it, so a replay decides each record exactly as the first run
    did (tests/unit/test_fleet_worker.py cuts that changelog at every point).  Bounded: about a
    window of ids per (host, class), :data:`MAX_BOOTS` boots per host.

Per-host judgement reuses the agent's processors: :class:`~aegis_stream.processors.
degraded.DegradedMonitor` (same thresholds and hysteresis, fed from the host's state
records) and :class:`~aegis_stream.processors.slo.DropRateSlo` (fed with the cumulative
per-class totals a state record carries).  A host whose last state record is older than
``silent_after_s`` is at least ``degraded`` (reason ``agent unresponsive: ...``).
"""

from __future__ import annotations

import calendar
import heapq
import itertools
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
class Seen(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Dedup state of one (host, boot, class): the highest ``ktime_ns`` absorbed and the
    event ids absorbed within the reorder window below it (id -> its ktime)."""

    hw: int = 0
    since: int = -1  # source offset of the boot's first record (the eviction order)
    ids: dict[str, int] = {}


class Counts(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Decisions absorbed by one row; ``hw`` = highest source offset absorbed (-1 none).

    Host rows also carry the dedup state of their host (``seen``, keyed ``class|boot``)
    and the duplicates it refused per class: in the same changelog record as the counts
    and ``hw``, so a restored row's dedup state is exactly the one its counts came from."""

    deny: int = 0
    audit: int = 0
    hw: int = -1
    last_time: str = ""  # the newest decision time seen (RFC 3339)
    duplicates: dict[str, int] = {}
    seen: dict[str, Seen] = {}


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


def decode_decision(value: bytes, window_s: int) -> tuple[DecisionEvent, int] | str:
    """A decision record and the start of its tumbling window, or why it is unusable
    (``undecodable``: not a decision record; ``bad_field``: a decision or time that is
    not one)."""
    try:
        ev = decision_decoder.decode(value)
        if ev.decision not in CLASSES:
            raise ValueError(f"decision {ev.decision!r}")
        return ev, epoch_s(ev.time) // window_s * window_s
    except msgspec.DecodeError:
        return "undecodable"
    except ValueError:
        return "bad_field"


def fold_decisions(records: Iterable[tuple[int, int, bytes]], window_s: int) -> FoldResult:
    """Group a batch of ``(partition, offset, value)`` decision records into per-row
    deltas (one table write per key per batch, not one per record).  Records of one
    partition must come in offset order (as a consumer returns them)."""
    hosts: dict[str, DecisionDelta] = {}
    rules: dict[str, DecisionDelta] = {}
    windows: dict[str, DecisionDelta] = {}
    n = bad = 0
    reasons: dict[str, int] = {}
    for partition, offset, value in records:
        n += 1
        decoded = decode_decision(value, window_s)
        if isinstance(decoded, str):
            bad += 1
            reasons[decoded] = reasons.get(decoded, 0) + 1
            continue
        ev, start = decoded
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


DEDUP_WINDOW_NS = 1_000_000_000  # reorder window below a (host, boot, class)'s newest ktime
MAX_BOOTS = 16  # per host and class: a spool replayed across a few reboots still dedups


def _evict_boots(row: Counts, klass: str) -> None:
    mine = [k for k in row.seen if k.startswith(klass + "|")]
    if len(mine) > MAX_BOOTS:  # the boot first seen longest ago goes
        del row.seen[min(mine, key=lambda k: row.seen[k].since)]


def seen_before(row: Counts, ev: DecisionEvent, offset: int, window_ns: int = DEDUP_WINDOW_NS) -> bool:
    """Whether the host row already absorbed this decision (same ``event_id``, at an
    earlier offset); records it as absorbed otherwise.

    ``event_id`` is ``<boot>-<ktime_ns>-<tid>`` and a host's records come in produce order,
    so a repeat (the sink's spool replay) comes after its original with a ktime at or
    below the boot's newest: within ``window_ns`` of it the id itself decides, below that
    the record is older than anything the window keeps and is a repeat.  Rings are only
    nearly ktime-ordered across CPUs: the window must exceed that disorder (1 s is far
    above it), or an original that late would be refused (and counted as a duplicate)."""
    boot, _, rest = ev.event_id.partition("-")
    key = f"{ev.decision}|{boot}"
    kt = ev.ktime_ns
    s = row.seen.get(key)
    if s is None:
        row.seen[key] = Seen(hw=kt, since=offset, ids={rest: kt})
        _evict_boots(row, ev.decision)
        return False
    if kt > s.hw:
        s.hw = kt
    elif kt < s.hw - window_ns or rest in s.ids:
        return True
    s.ids[rest] = kt
    return False


def prune_seen(row: Counts, window_ns: int = DEDUP_WINDOW_NS) -> None:
    """Forget ids that fell below their window (the ktime test alone decides them now)."""
    for s in row.seen.values():
        floor = s.hw - window_ns
        # ids are inserted in (nearly) ktime order and a JSON round trip keeps that order:
        # drop from the oldest end; an id inserted late behind a newer one goes when the
        # ones before it have gone (until then the ktime test decides for it anyway)
        n = 0
        for v in s.ids.values():
            if v >= floor:
                break
            n += 1
        if n:
            s.ids = dict(itertools.islice(s.ids.items(), n, None))


class ExactFold(msgspec.Struct):
    """:func:`fold_exact`'s accounting: records read, undecodable/bad ones (by reason),
    repeats of an absorbed ``event_id`` refused (``duplicates``, by class), and records
    some earlier run already absorbed (``replayed``: a restart's re-read)."""

    records: int = 0
    bad: int = 0
    bad_reasons: dict[str, int] = {}
    duplicates: dict[str, int] = {}
    replayed: int = 0


def fold_exact(
    records: list[tuple[int, int, bytes]],
    window_s: int,
    get: Callable[[str, str], Counts],
    window_ns: int = DEDUP_WINDOW_NS,
) -> tuple[dict[tuple[str, str], Counts], ExactFold]:
    """Fold a batch into the current rows (``get(table, key)``), each record once per
    (host, ``event_id``): returns the rows that changed, keyed by (table, key), host rows
    LAST, and the accounting.  Records of one partition must come in offset order.

    The host row decides (dedup state and ``hw`` together); the rule and window rows take
    what it accepted, each above its own ``hw``.  The caller writes the changed rows in the
    order returned, all into the partition's changelog partition, so a host row that
    survived a crash implies every rule/window row of its batch did: a record at or below
    the host row's ``hw`` is absorbed everywhere, one above it is decided afresh by a dedup
    state that is exactly the one of that offset."""
    acct = ExactFold(bad_reasons={}, duplicates={})
    host_rows: dict[str, Counts] = {}
    touched: set[str] = set()
    rules: dict[str, DecisionDelta] = {}
    windows: dict[str, DecisionDelta] = {}
    accepted: list[tuple[int, str, str, str, str]] = []  # offset, decision, rule, window, time
    keys: dict[tuple[int, str, int, int], tuple[str, str]] = {}
    for partition, offset, value in records:
        acct.records += 1
        decoded = decode_decision(value, window_s)
        if isinstance(decoded, str):
            acct.bad += 1
            acct.bad_reasons[decoded] = acct.bad_reasons.get(decoded, 0) + 1
            continue
        ev, start = decoded
        hk = host_key(partition, ev.host)
        row = host_rows.get(hk)
        if row is None:
            row = host_rows[hk] = get("hosts", hk)
        if offset <= row.hw:
            acct.replayed += 1
            continue
        row.hw = offset
        touched.add(hk)
        if seen_before(row, ev, offset, window_ns):
            row.duplicates[ev.decision] = row.duplicates.get(ev.decision, 0) + 1
            acct.duplicates[ev.decision] = acct.duplicates.get(ev.decision, 0) + 1
            continue
        if ev.decision == "deny":
            row.deny += 1
        else:
            row.audit += 1
        if ev.time > row.last_time:
            row.last_time = ev.time
        rw = keys.get((partition, ev.rule_id, ev.generation, start))
        if rw is None:
            rw = keys[(partition, ev.rule_id, ev.generation, start)] = (
                rule_key(partition, ev.rule_id, ev.generation),
                window_key(partition, ev.rule_id, ev.generation, start))
        rk, wk = rw
        _add(rules, rk, ev.decision, offset, ev.time)
        _add(windows, wk, ev.decision, offset, ev.time)
        accepted.append((offset, ev.decision, rk, wk, ev.time))
    changed: dict[tuple[str, str], Counts] = {}
    for table, deltas, which in (("rules", rules, 2), ("windows", windows, 3)):
        for key, delta in deltas.items():
            row = get(table, key)
            if delta.hw <= row.hw:
                continue  # absorbed before the crash
            if delta.first <= row.hw:  # straddles (a restart): only the records above hw
                redo: dict[str, DecisionDelta] = {}
                for acc in accepted:
                    if acc[which] == key and acc[0] > row.hw:
                        _add(redo, key, acc[1], acc[0], acc[4])
                delta = redo[key]
            apply_delta(row, delta)
            changed[(table, key)] = row
    for hk in touched:  # last: see above
        row = host_rows[hk]
        prune_seen(row, window_ns)
        changed[("hosts", hk)] = row
    return changed, acct


def fold_naive(
    records: list[tuple[int, int, bytes]],
    window_s: int,
    get: Callable[[str, str], Counts],
    window_ns: int = DEDUP_WINDOW_NS,
) -> tuple[dict[tuple[str, str], Counts], ExactFold]:
    """faust's default semantics, for the demonstration (``--naive``): every record
    delivered is counted, replays and repeated event ids included (at-least-once
    over-counts after a crash); ``window_ns`` is ignored."""
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
    return changed, ExactFold(records=result.records, bad=result.bad, bad_reasons=result.bad_reasons)


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
