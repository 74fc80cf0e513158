"""Deny-storm summaries in the pipeline: each tick, one ``aegis.storm.v1`` record per key
whose suppressed count grew (aegis_stream/kernel/storms.py reads the kernel side), then
the reported counts are committed (pinned) and keys that can no longer grow are pruned.

The ledger: a suppressed decision is no event, so the ticker counts a class's emitted
events as the kernel's decisions minus its suppressed decisions (``aegis_storm_stats``),
and ``decision events + summaries' suppressed == decisions`` per class once the rings are
drained and the last summary written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from aegis_stream.kernel import abi, slots
from aegis_stream.kernel.maps import PolicyMaps
from aegis_stream.kernel.storms import StormCounts, StormDelta, StormTable
from aegis_stream.pipeline.config import log
from aegis_stream.pipeline.normalise import Normaliser
from aegis_stream.pipeline.schema import StormEvent
from aegis_stream.pipeline.sinks import SinkBatch
from aegis_stream.pipeline.writers import SinkWriter

_enc = msgspec.json.Encoder()
_HOOKS = {int(k): v for k, v in abi.HOOK_NAMES.items()}


@dataclass(frozen=True)
class StormStatistics:
    """The deny-storm side of ``Pipeline.statistics()`` (the ``aegis_deny_storm_*`` metrics)."""

    window_s: float  # in force in the kernel (0: off)
    keys: int  # keys in the kernel's storm map at the last tick
    capacity: int
    suppressed: Mapping[str, int] = field(default_factory=dict)  # kernel, per class, since load
    untracked: Mapping[str, int] = field(default_factory=dict)  # map full: an event, not aggregated
    reported: int = 0  # suppressed decisions in the summaries this agent wrote
    summaries: int = 0  # summary records written
    pruned: int = 0  # keys deleted (retired generation, process gone, pressure)
    errors: int = 0  # map reads, commits and deletes that failed (logged)


class StormReporter:
    """Turns :class:`StormTable` deltas into :class:`StormEvent` records, once each."""

    def __init__(self, table: StormTable, norm: Normaliser, *, window_ns: Callable[[], int],
                 keep_generations: Callable[[], Collection[int]],
                 clock: Callable[[], float] = time.time) -> None:
        self.table = table
        self.norm = norm
        self.window_ns = window_ns
        self.keep_generations = keep_generations
        self.clock = clock
        self.window = 0
        self.summaries = 0
        self.errors = 0
        self.last_counts = StormCounts()

    def counts(self) -> StormCounts:
        """The kernel's per-class suppressed/untracked totals (the ticker's ledger input)."""
        try:
            self.last_counts = self.table.counts()
        except Exception as exc:  # keep the last reading: the ledger stays a lower bound
            self._error(f"storm counters unreadable: {exc}")
        return self.last_counts

    def _error(self, msg: str) -> None:
        self.errors += 1
        if self.errors == 1 or self.errors % 60 == 0:
            log(f"{msg} ({self.errors} storm errors)")

    def event(self, d: StormDelta, now: str) -> StormEvent:
        k = d.key
        info = self.norm.generations.get(k.generation)
        rec = info.record if info else None
        rules = rec.policy.rules if rec else []
        rule = rules[k.rule_id] if k.rule_id < len(rules) else None
        cg_path = self.norm.cgroups.path(k.cgroup_id)
        klass = k.klass
        return StormEvent(
            event_id=(f"{self.norm.boot8}-storm-{k.generation}-{k.rule_id}-{k.hook}-{k.cgroup_id}-"
                      f"{k.tgid}-{klass}-{d.first_ns}-{d.total}"),
            time=now, host=self.norm.host, hook=_HOOKS.get(k.hook, str(k.hook)), decision=klass,
            rule_id=rule.id if rule else "", rule_index=k.rule_id, generation=k.generation,
            policy_name=rec.policy.name if rec else "", policy_digest=rec.policy.digest if rec else "",
            rule_source=rule.source if rule else "", cgroup_id=k.cgroup_id, cgroup_path=cg_path,
            pid=k.tgid, suppressed=d.suppressed, suppressed_total=d.total,
            first_time=self.norm.wall_time(d.first_ns), window_start=self.norm.wall_time(d.window_ns),
            window_s=self.window / 1e9, exe=self.norm.processes.lookup(k.tgid).exe,
            workload=self.norm.workloads.lookup(k.cgroup_id, cg_path),
        )

    def _now(self) -> str:
        ns = int(self.clock() * 1e9)
        s, rem = divmod(ns, 1_000_000_000)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{rem // 1000:06d}Z"

    async def report(self, writer: SinkWriter) -> int:
        """One tick: write the summaries of every key that grew, commit, prune.  Returns how
        many summaries were written."""
        try:
            self.window = self.window_ns()
            deltas = self.table.scan()
        except Exception as exc:
            self._error(f"storm map unreadable: {exc}")
            return 0
        if deltas:
            now = self._now()
            evs = [self.event(d, now) for d in deltas]
            # written once to every sink (a failing sink is counted in derived_failed); then
            # committed, so neither a later tick nor a restarted agent reports them again
            await writer.write_derived(SinkBatch("storm", _enc.encode_lines(evs), len(evs)))
            self.table.commit(deltas)
            self.summaries += len(evs)
        try:
            self.table.prune(self.keep_generations(), self.window)
        except Exception as exc:
            self._error(f"storm prune failed: {exc}")
        return len(deltas)

    def statistics(self) -> StormStatistics:
        t = self.table
        c = self.last_counts
        return StormStatistics(
            window_s=self.window / 1e9, keys=t.keys_tracked, capacity=t.capacity,
            suppressed=dict(c.suppressed), untracked=dict(c.untracked), reported=t.reported_total,
            summaries=self.summaries, pruned=t.deleted,
            errors=self.errors + t.commit_failures + t.prune_failures,
        )


def reporter_for(maps: Mapping[str, Any], policy_maps: PolicyMaps, norm: Normaliser, ncpu: int,
                 **table_kw: Any) -> StormReporter | None:
    """A reporter over the object's storm maps (pinned or a FakeKernel's); None when the
    maps are not there (an object without bpf/storm.bpf.h)."""
    names = (abi.MAP_STORMS, abi.MAP_STORM_REPORTED, abi.MAP_STORM_STATS)
    if not all(n in maps for n in names):
        return None
    table = StormTable(*(maps[n] for n in names), ncpu=ncpu, **table_kw)

    def keep() -> set[int]:
        return {s.generation for s in slots.read_state(policy_maps).slots}

    return StormReporter(table, norm, window_ns=lambda: slots.storm_window_ns(policy_maps),
                         keep_generations=keep)
