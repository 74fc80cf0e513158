"""Deny storms, the agent's half: read ``aegis_storms`` (bpf/storm.bpf.h), report each
key's new suppressed count exactly once, and delete keys that can no longer grow.

The kernel only ever adds to a key's cumulative ``suppressed``; the agent never writes an
``aegis_storms`` value (a userspace update replaces the element, and an increment made
through a pointer to the old one would be lost).  What has been reported is kept per key
in ``aegis_storm_reported`` (a pinned map only the agent writes, with the ``first_ns`` of
the kernel element it belongs to), so a restarted agent reports from where the last one
stopped, never twice.  The order per tick is: :meth:`StormTable.scan` (deltas), the
caller writes the summaries, :meth:`StormTable.commit` (reported := total), then
:meth:`StormTable.prune`.  A crash between the write and the commit reports that delta
again on the next start; the summary's ``event_id`` (key, first_ns, total) is then the
same, so a consumer can drop the duplicate.

Deleting a key must not lose an increment.  A program adds to a key only while the key's
window is open, and only the decision that opens a window (an event, never suppressed)
moves ``window_ns``.  A key is deleted only when it is fully reported and its value is
unchanged between the scan and a re-read just before the delete, and when either

* its generation is in neither slot (retired: no program decides with it any more), or
* its window closed more than two windows ago and its process is gone, or the map is
  over :data:`PRESSURE` full (then live processes' idle keys go too), or aggregation is
  off (window 0: the programs do not touch the map).

An idle key of a live process (the pressure case) or a dead one whose pid was reused can
still be reopened by an event between the re-read and the delete (microseconds); the
increments made after that event, through the deleted element, are then missing from the
summaries but not from the kernel's exact counters (``AEGIS_CTR_SUPPRESSED`` per hook and
``aegis_storm_stats`` per class, which the pipeline's ledger uses).  Elements are not
preallocated, so such an increment can never land on another key.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from aegis_stream.errors import KernelError
from aegis_stream.kernel import abi

log = logging.getLogger(__name__)

#: map fill above which idle keys of live processes are deleted too
PRESSURE = 0.75
_u32 = struct.Struct("<I")
_u64 = struct.Struct("<Q")


@dataclass(frozen=True)
class StormKey:
    """One ``struct aegis_storm_key``: (generation, cgroup, rule, hook, process, decision)."""

    generation: int
    cgroup_id: int
    rule_id: int
    hook: int
    tgid: int
    decision: int

    @classmethod
    def unpack(cls, raw: bytes) -> StormKey:
        return cls(*abi.STORM_KEY.unpack(raw[: abi.STORM_KEY.size]))

    def pack(self) -> bytes:
        return abi.STORM_KEY.pack(self.generation, self.cgroup_id, self.rule_id, self.hook,
                                  self.tgid, self.decision)

    @property
    def klass(self) -> str:
        return "audit" if self.decision == abi.Decision.AUDIT else "deny"


@dataclass(frozen=True)
class StormDelta:
    """What one key suppressed since it was last reported."""

    key: StormKey
    suppressed: int  # new since the last report
    total: int  # cumulative for this kernel element (reported before + suppressed)
    first_ns: int  # ktime the kernel inserted the key (the element's identity)
    window_ns: int  # ktime of the current window's start


@dataclass
class PruneStats:
    """What one :meth:`StormTable.prune` did."""

    deleted: int = 0
    retired: int = 0  # of them: keys of retired generations
    skipped: int = 0  # eligible but changed (or not yet reported): kept for the next tick
    failed: int = 0


@dataclass(frozen=True)
class StormCounts:
    """``aegis_storm_stats`` summed over CPUs, per class."""

    suppressed: dict[str, int] = field(default_factory=lambda: {"deny": 0, "audit": 0})
    untracked: dict[str, int] = field(default_factory=lambda: {"deny": 0, "audit": 0})


def read_storm_counts(stats: Any, ncpu: int) -> StormCounts:
    vals = {}
    for s in abi.StormStat:
        per = stats.lookup_percpu(_u32.pack(s), ncpu) or []
        vals[s] = sum(_u64.unpack(v[:8])[0] for v in per)
    st = abi.StormStat
    return StormCounts(
        suppressed={"deny": vals[st.SUPPRESSED_DENY], "audit": vals[st.SUPPRESSED_AUDIT]},
        untracked={"deny": vals[st.UNTRACKED_DENY], "audit": vals[st.UNTRACKED_AUDIT]},
    )


def process_alive(tgid: int) -> bool:
    return os.path.exists(f"/proc/{tgid}")


class StormTable:
    """The storm maps (real or fake): scan for deltas, commit what was reported, prune."""

    def __init__(self, storms: Any, reported: Any, stats: Any, *, ncpu: int,
                 alive: Callable[[int], bool] = process_alive,
                 clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.storms = storms
        self.reported = reported
        self.stats = stats
        self.ncpu = ncpu
        self.alive = alive
        self.clock_ns = clock_ns
        self._rep: dict[bytes, tuple[int, int]] | None = None  # key -> (first_ns, reported)
        self._seen: dict[bytes, bytes] = {}  # key -> value as of the last scan
        self.reported_total = 0  # suppressed decisions reported by this process
        self.commit_failures = 0
        self.deleted = 0
        self.prune_failures = 0

    @property
    def capacity(self) -> int:
        return int(self.storms.max_entries)

    @property
    def keys_tracked(self) -> int:
        return len(self._seen)

    def counts(self) -> StormCounts:
        return read_storm_counts(self.stats, self.ncpu)

    def _load_reported(self, live: Collection[bytes]) -> dict[bytes, tuple[int, int]]:
        rep: dict[bytes, tuple[int, int]] = {}
        for k, v in self.reported.items():
            if k not in live:  # its element is gone (a crash between two deletes): stale
                try:
                    self.reported.delete(k)
                except KernelError as exc:
                    log.warning("aegis_storm_reported: stale key not deleted: %s", exc)
                continue
            first, n = abi.STORM_REPORTED.unpack(v[: abi.STORM_REPORTED.size])
            rep[k] = (first, n)
        return rep

    def _reported(self, k: bytes, first: int) -> int:
        assert self._rep is not None
        rfirst, rep = self._rep.get(k, (first, 0))
        return rep if rfirst == first else 0  # another first_ns: a new element, from 0

    def scan(self) -> list[StormDelta]:
        """Every key whose count grew since it was last reported (none is reported here)."""
        items = dict(self.storms.items())
        if self._rep is None:
            self._rep = self._load_reported(items)
        self._seen = items
        out = []
        for k, v in items.items():
            first, window, total = abi.STORM.unpack(v[: abi.STORM.size])
            rep = self._reported(k, first)
            if total > rep:
                out.append(StormDelta(StormKey.unpack(k), total - rep, total, first, window))
        return out

    def commit(self, deltas: Collection[StormDelta]) -> None:
        """``deltas`` were written: remember (pinned) that they are reported."""
        assert self._rep is not None, "scan() first"
        for d in deltas:
            k = d.key.pack()
            self._rep[k] = (d.first_ns, d.total)
            self.reported_total += d.suppressed
            try:
                self.reported.update(k, abi.STORM_REPORTED.pack(d.first_ns, d.total))
            except KernelError as exc:  # this process still knows; a restart would repeat it
                self.commit_failures += 1
                log.warning("aegis_storm_reported: update failed: %s", exc)

    def prune(self, keep_generations: Collection[int], window_ns: int) -> PruneStats:
        """Delete the keys that can no longer grow (see the module docstring)."""
        assert self._rep is not None, "scan() first"
        res = PruneStats()
        now = self.clock_ns()
        pressure = len(self._seen) > PRESSURE * self.capacity
        for k, v in list(self._seen.items()):
            first, win, total = abi.STORM.unpack(v[: abi.STORM.size])
            key = StormKey.unpack(k)
            retired = key.generation not in keep_generations
            idle = window_ns == 0 or now - win > 2 * window_ns
            if not (retired or (idle and (pressure or window_ns == 0 or not self.alive(key.tgid)))):
                continue
            if self._reported(k, first) != total:
                res.skipped += 1  # not reported yet: next tick
                continue
            try:
                if self.storms.lookup(k) != v:
                    res.skipped += 1  # it moved since the scan: not idle
                    continue
                self.storms.delete(k)
                self.reported.delete(k)
            except KernelError as exc:
                res.failed += 1
                self.prune_failures += 1
                log.warning("aegis_storms: key not deleted: %s", exc)
                continue
            self._rep.pop(k, None)
            del self._seen[k]
            res.deleted += 1
            res.retired += retired
        self.deleted += res.deleted
        return res
