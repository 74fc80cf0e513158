"""Read the kernel's per-CPU counters (per hook) and exact per-rule counters.

:class:`MapCounterSource` is the interface the agent polls (``read()`` -> a frozen
:class:`CounterSnapshot`); it works on the real pinned maps and on the fake kernel's
per-CPU maps alike (both have ``lookup_percpu``/``keys``).

``aegis_rule_counters`` (per-CPU hash, key ``{generation, rule_id, hook}``) gets a new key
set with every generation, so :func:`prune_rule_counters` (called by ``slots.stage`` when
a slot is overwritten) deletes the keys of every generation that is in neither slot, after
folding their totals into one *retired* key per hook: ``{generation 0, rule_id
RETIRED_RULE_ID, hook}``.  Generation 0 is never a live generation (a cleared slot has
generation 0 and is not valid, so the BPF programs never count it), so the programs never
touch those keys and userspace is their only writer.  Per-rule rows of retired generations
are gone; ``retired`` + the live rows still add up to the per-hook DENIED/AUDITED totals
(minus increments lost to a full table, which the per-hook counters still have).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from aegis_stream.errors import KernelError
from aegis_stream.kernel import abi, libbpf

log = logging.getLogger(__name__)

#: the generation and rule id of the per-hook "retired generations" keys
RETIRED_GENERATION = 0
RETIRED_RULE_ID = 0xFFFFFFFF

_u32 = struct.Struct("<I")
_u64 = struct.Struct("<Q")


class PercpuMap(Protocol):
    """What reading a per-CPU map needs: the pinned FdMap and the fake kernel's maps both provide it."""

    def lookup_percpu(self, key: bytes, ncpus: int) -> list[bytes] | None: ...
    def keys(self) -> list[bytes]: ...


def _ncpu(ncpu: int | None) -> int:
    return ncpu if ncpu is not None else libbpf.num_possible_cpus()


def read_hook_counters(maps: Mapping[str, Any], ncpu: int | None = None) -> dict[str, dict[str, int]]:
    n = _ncpu(ncpu)
    ctr = maps[abi.MAP_COUNTERS]
    hooks: dict[str, dict[str, int]] = {}
    for hook in abi.Hook:
        vals: dict[str, int] = {}
        for c in abi.Counter:
            per = ctr.lookup_percpu(_u32.pack(hook * abi.COUNTERS_PER_HOOK + c), n) or []
            vals[c.name.lower()] = sum(_u64.unpack(v)[0] for v in per)
        hooks[abi.HOOK_NAMES[hook]] = vals
    return hooks


def read_continuity_counters(maps: Mapping[str, Any], ncpu: int | None = None) -> dict[str, int]:
    """``aegis_continuity_counters`` summed over CPUs: ``{"inherited": N, "inherit_failed": M, ...}``
    (abi.ContinuityCounter, bpf/continuity.bpf.h); empty when the maps have none (an older object,
    the fake kernel)."""
    m = maps.get(abi.MAP_CONTINUITY_COUNTERS)
    if m is None:
        return {}
    n = _ncpu(ncpu)
    out = {}
    for c in abi.ContinuityCounter:
        vals = [_u64.unpack(v)[0] for v in m.lookup_percpu(_u32.pack(c), n) or []]
        # LAST_ERRNO is no count: the errno of a CPU's last failed insert (0: none)
        out[c.name.lower()] = max(vals, default=0) if c is abi.ContinuityCounter.LAST_ERRNO else sum(vals)
    return out


def _is_retired_key(gen: int, rule_id: int) -> bool:
    return gen == RETIRED_GENERATION and rule_id == RETIRED_RULE_ID


def _map_ncpu(m: Any, ncpu: int | None) -> int:
    if ncpu is not None:
        return ncpu
    if not hasattr(m, "lookup_percpu"):
        return 1
    own = getattr(m, "ncpu", None)
    return int(own) if own else libbpf.num_possible_cpus()


def _sum_counter(m: Any, key: bytes, n: int) -> tuple[int, int] | None:
    """(denied, audited) of one key summed over CPUs; a plain (non per-CPU) map too."""
    if hasattr(m, "lookup_percpu"):
        per = m.lookup_percpu(key, n)
    else:
        one = m.lookup(key)
        per = None if one is None else [one]
    if per is None:
        return None
    vals = [abi.RULE_COUNTER.unpack(v[: abi.RULE_COUNTER.size]) for v in per]
    return sum(v[0] for v in vals), sum(v[1] for v in vals)


def read_rule_counters(maps: Mapping[str, Any], ncpu: int | None = None) -> list[dict]:
    """Per-rule rows of the live generations (the retired keys are in read_retired)."""
    rc = maps[abi.MAP_RULE_COUNTERS]
    n = _map_ncpu(rc, ncpu)
    rules = []
    for key in rc.keys():
        gen, rule_id, hook = abi.RULE_COUNTER_KEY.unpack(key)
        if _is_retired_key(gen, rule_id):
            continue
        denied, audited = _sum_counter(rc, key, n) or (0, 0)
        rules.append({"generation": gen, "rule_id": rule_id,
                      "hook": abi.HOOK_NAMES[abi.Hook(hook)], "denied": denied, "audited": audited})
    rules.sort(key=lambda r: (r["generation"], r["rule_id"], r["hook"]))
    return rules


def _retired_key(hook: int) -> bytes:
    return abi.RULE_COUNTER_KEY.pack(RETIRED_GENERATION, RETIRED_RULE_ID, hook)


def read_retired(maps: Mapping[str, Any], ncpu: int | None = None) -> dict[str, dict[str, int]]:
    """Totals folded in from pruned generations: ``{hook: {"denied": N, "audited": M}}``."""
    rc = maps[abi.MAP_RULE_COUNTERS]
    n = _map_ncpu(rc, ncpu)
    out = {}
    for hook in abi.Hook:
        d, a = _sum_counter(rc, _retired_key(hook), n) or (0, 0)
        out[abi.HOOK_NAMES[hook]] = {"denied": d, "audited": a}
    return out


def read_counters(maps: Mapping[str, Any], ncpu: int | None = None) -> dict:
    return {"hooks": read_hook_counters(maps, ncpu), "rules": read_rule_counters(maps, ncpu),
            "retired": read_retired(maps, ncpu)}


@dataclass
class PruneResult:
    """What one :func:`prune_rule_counters` did."""

    generations: list[int] = field(default_factory=list)  # retired (pruned) generations
    deleted: int = 0  # keys deleted
    failed: int = 0  # keys that could not be deleted (or folded); retried next time
    errors: list[str] = field(default_factory=list)
    folded: dict[int, tuple[int, int]] = field(default_factory=dict)  # hook -> (denied, audited)

    @property
    def ok(self) -> bool:
        return self.failed == 0


#: failures to delete/fold since this process started (every prune also returns its own)
PRUNE_FAILURES = 0


def _write_retired(m: Any, hook: int, denied: int, audited: int, n: int) -> None:
    """Set the retired key of ``hook`` to (denied, audited): all on CPU 0, zero elsewhere."""
    val = abi.RULE_COUNTER.pack(denied, audited)
    if hasattr(m, "lookup_percpu"):
        stride = (len(val) + 7) & ~7
        zero = bytes(stride)
        val = val.ljust(stride, b"\0") + zero * (n - 1)
    m.update(_retired_key(hook), val)


def prune_rule_counters(
    m: Any, keep: Iterable[int], ncpu: int | None = None
) -> PruneResult:
    """Delete the keys of every generation not in ``keep`` (the generations the two slots
    hold), folding their totals into the retired key of their hook first.  Keys of a
    generation in ``keep`` are never touched.  A key that cannot be deleted is counted in
    ``failed`` (and ``PRUNE_FAILURES``) and logged; it is not folded, so the next prune
    (which sees it again) folds and deletes it without counting anything twice."""
    global PRUNE_FAILURES
    keep_set = set(keep) | {RETIRED_GENERATION}
    res = PruneResult()
    try:
        keys = m.keys()
    except KernelError as exc:
        res.failed += 1
        res.errors.append(f"list keys: {exc}")
        keys = []
    n = _map_ncpu(m, ncpu)
    fold: dict[int, list[int]] = {}
    gens: set[int] = set()
    for key in keys:
        gen, rule_id, hook = abi.RULE_COUNTER_KEY.unpack(key)
        if gen in keep_set:
            continue
        try:
            got = _sum_counter(m, key, n)
            if not m.delete(key) or got is None:
                continue  # already gone (another pruner): nothing to fold
        except KernelError as exc:
            res.failed += 1
            if len(res.errors) < 5:
                res.errors.append(f"generation {gen} rule {rule_id} hook {hook}: {exc}")
            continue
        res.deleted += 1
        gens.add(gen)
        f = fold.setdefault(hook, [0, 0])
        f[0] += got[0]
        f[1] += got[1]
    for hook, (d, a) in sorted(fold.items()):
        if not d and not a:
            continue
        try:
            old = _sum_counter(m, _retired_key(hook), n) or (0, 0)
            _write_retired(m, hook, old[0] + d, old[1] + a, n)
            res.folded[hook] = (d, a)
        except KernelError as exc:  # totals of deleted keys lost (the per-hook counters keep them)
            res.failed += 1
            res.errors.append(f"retired total of hook {hook}: {exc}")
    res.generations = sorted(gens)
    if res.failed:
        PRUNE_FAILURES += res.failed
        log.warning("aegis_rule_counters: %d prune failure(s): %s", res.failed, "; ".join(res.errors))
    return res


@dataclass(frozen=True)
class CounterSnapshot:
    """Per-hook kernel counters summed over CPUs: ``hooks[hook_name][counter_name]``; ``continuity``: the
    path-continuity program's counters (:func:`read_continuity_counters`; empty when not read)."""

    hooks: Mapping[str, Mapping[str, int]]
    continuity: Mapping[str, int] = field(default_factory=dict)

    def total(self, counter: abi.Counter) -> int:
        return sum(h[counter.name.lower()] for h in self.hooks.values())

    def decisions(self, klass: str) -> int:
        """Decisions made for an event class: 'deny' (enforce) or 'audit'."""
        return self.total(abi.Counter.DENIED if klass == "deny" else abi.Counter.AUDITED)

    @property
    def ringbuf_failures(self) -> int:
        return self.total(abi.Counter.RINGBUF_FAIL)

    @classmethod
    def zero(cls) -> CounterSnapshot:
        return cls({abi.HOOK_NAMES[h]: {c.name.lower(): 0 for c in abi.Counter} for h in abi.Hook})


class CounterSource(Protocol):
    """Anything that returns a :class:`CounterSnapshot` of the per-hook kernel counters (the pipeline
    polls it each tick; :class:`MapCounterSource` is the implementation over real or fake maps)."""

    def read(self) -> CounterSnapshot: ...


class MapCounterSource:
    """Reads ``aegis_counters`` (per-hook, per-CPU) from a map dict: pinned or fake."""

    def __init__(self, maps: Mapping[str, Any], ncpu: int | None = None) -> None:
        self.maps = maps
        self.ncpu = _ncpu(ncpu)

    def read(self) -> CounterSnapshot:
        return CounterSnapshot(read_hook_counters(self.maps, self.ncpu),
                               read_continuity_counters(self.maps, self.ncpu))
