"""Read the kernel's per-CPU counters (per hook) and exact per-rule counters."""

from __future__ import annotations

import struct

from aegis_stream import abi, libbpf
from aegis_stream.maps import FdMap


def read_counters(maps: dict[str, FdMap]) -> dict:
    ncpu = libbpf.num_possible_cpus()
    ctr = maps[abi.MAP_COUNTERS]
    hooks: dict[str, dict[str, int]] = {}
    for hook in abi.Hook:
        vals: dict[str, int] = {}
        for c in abi.Counter:
            key = struct.pack("<I", hook * abi.COUNTERS_PER_HOOK + c)
            per = ctr.lookup_percpu(key, ncpu) or []
            vals[c.name.lower()] = sum(struct.unpack("<Q", v)[0] for v in per)
        hooks[abi.HOOK_NAMES[hook]] = vals
    rules = []
    rc = maps[abi.MAP_RULE_COUNTERS]
    for key in rc.keys():
        gen, rule_id, hook = abi.RULE_COUNTER_KEY.unpack(key)
        per = rc.lookup_percpu(key, ncpu) or []
        denied = sum(abi.RULE_COUNTER.unpack(v)[0] for v in per)
        audited = sum(abi.RULE_COUNTER.unpack(v)[1] for v in per)
        rules.append({"generation": gen, "rule_id": rule_id,
                      "hook": abi.HOOK_NAMES[abi.Hook(hook)], "denied": denied, "audited": audited})
    rules.sort(key=lambda r: (r["generation"], r["rule_id"], r["hook"]))
    return {"hooks": hooks, "rules": rules}
