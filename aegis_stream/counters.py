"""Read the kernel's per-CPU counters (per hook) and exact per-rule counters.

:class:`MapCounterSource` is the interface the agent polls (``read()`` -> a frozen
:class:`CounterSnapshot`); it works on the real pinned maps and on the fake kernel's
per-CPU maps alike (both have ``lookup_percpu``/``keys``).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aegis_stream import abi, libbpf

_u32 = struct.Struct("<I")
_u64 = struct.Struct("<Q")


class PercpuMap(Protocol):
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


def read_rule_counters(maps: Mapping[str, Any], ncpu: int | None = None) -> list[dict]:
    n = _ncpu(ncpu)
    rules = []
    rc = maps[abi.MAP_RULE_COUNTERS]
    for key in rc.keys():
        gen, rule_id, hook = abi.RULE_COUNTER_KEY.unpack(key)
        per = rc.lookup_percpu(key, n) or []
        denied = sum(abi.RULE_COUNTER.unpack(v)[0] for v in per)
        audited = sum(abi.RULE_COUNTER.unpack(v)[1] for v in per)
        rules.append({"generation": gen, "rule_id": rule_id,
                      "hook": abi.HOOK_NAMES[abi.Hook(hook)], "denied": denied, "audited": audited})
    rules.sort(key=lambda r: (r["generation"], r["rule_id"], r["hook"]))
    return rules


def read_counters(maps: Mapping[str, Any], ncpu: int | None = None) -> dict:
    return {"hooks": read_hook_counters(maps, ncpu), "rules": read_rule_counters(maps, ncpu)}


@dataclass(frozen=True)
class CounterSnapshot:
    """Per-hook kernel counters summed over CPUs: ``hooks[hook_name][counter_name]``."""

    hooks: Mapping[str, Mapping[str, int]]

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
    def read(self) -> CounterSnapshot: ...


class MapCounterSource:
    """Reads ``aegis_counters`` (per-hook, per-CPU) from a map dict: pinned or fake."""

    def __init__(self, maps: Mapping[str, Any], ncpu: int | None = None) -> None:
        self.maps = maps
        self.ncpu = _ncpu(ncpu)

    def read(self) -> CounterSnapshot:
        return CounterSnapshot(read_hook_counters(self.maps, self.ncpu))
