"""Raw decision -> DecisionEvent: rule/policy from the generation store, cgroup path,
process exe (best effort, flagged when unavailable).  Caches are bounded."""

from __future__ import annotations

import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Generic, TypeVar

from aegis_stream import abi
from aegis_stream.devnum import split_kernel_dev
from aegis_stream.errors import StateError
from aegis_stream.events import ACTION_NAMES, DECISION_NAMES, MODE_NAMES, RawDecision
from aegis_stream.schema import DecisionEvent
from aegis_stream.store import GenerationRecord, PolicyStore

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._d: OrderedDict[K, V] = OrderedDict()
        self.hits = self.misses = self.evictions = 0

    def get_or(self, key: K, make: Callable[[K], V]) -> V:
        if key in self._d:
            self.hits += 1
            self._d.move_to_end(key)
            return self._d[key]
        self.misses += 1
        val = make(key)
        self._d[key] = val
        if len(self._d) > self.capacity:
            self._d.popitem(last=False)
            self.evictions += 1
        return val


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip().replace("-", "")
    except OSError:
        return "0" * 32


def _boot_time_ns() -> int:
    # wall clock at ktime 0 (CLOCK_MONOTONIC, which bpf_ktime_get_ns uses)
    return time.time_ns() - time.monotonic_ns()


class CgroupResolver:
    """cgroup id -> path, by walking the cgroup2 mount (ids are directory inodes)."""

    def __init__(self, roots: list[str] | None = None, capacity: int = 4096) -> None:
        from aegis_stream.policy.compiler import cgroup2_mounts

        self.roots = roots if roots is not None else cgroup2_mounts()
        self.cache: BoundedCache[int, str] = BoundedCache(capacity)

    def _find(self, cgid: int) -> str:
        for root in self.roots:
            try:
                if os.stat(root).st_ino == cgid:
                    return root
            except OSError:
                continue
            for dirpath, dirnames, _ in os.walk(root):
                for d in dirnames:
                    p = os.path.join(dirpath, d)
                    try:
                        if os.stat(p).st_ino == cgid:
                            return p
                    except OSError:
                        continue
        return ""

    def path(self, cgid: int) -> str:
        if cgid == 0:
            return ""
        return self.cache.get_or(cgid, self._find)


class Normaliser:
    def __init__(
        self, store: PolicyStore, *, cgroups: CgroupResolver | None = None, host: str | None = None
    ) -> None:
        self.store = store
        self.cgroups = cgroups or CgroupResolver()
        self.host = host or socket.gethostname()
        self.boot8 = boot_id()[:8]
        self.boot_ns = _boot_time_ns()
        self.generations: BoundedCache[int, GenerationRecord | None] = BoundedCache(64)

    def _generation(self, gen: int) -> GenerationRecord | None:
        try:
            return self.store.load(gen)
        except StateError:
            return None

    def normalise(self, raw: RawDecision) -> DecisionEvent:
        missing: list[str] = []
        rec = self.generations.get_or(raw.generation, self._generation)
        rule = None
        if rec is None:
            missing.append("generation")
        elif raw.rule_id < len(rec.policy.rules):
            rule = rec.policy.rules[raw.rule_id]
        else:
            missing.append("rule")
        exe = ""
        try:
            exe = os.readlink(f"/proc/{raw.tgid}/exe")
        except OSError:
            missing.append("exe")
        major, minor = split_kernel_dev(raw.dev)
        wall = datetime.fromtimestamp((self.boot_ns + raw.ktime_ns) / 1e9, UTC)
        return DecisionEvent(
            event_id=f"{self.boot8}-{raw.ktime_ns}-{raw.pid}",
            time=wall.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            ktime_ns=raw.ktime_ns,
            host=self.host,
            hook=abi.HOOK_NAMES.get(abi.Hook(raw.hook), str(raw.hook)),
            action=ACTION_NAMES.get(raw.action, str(raw.action)),
            decision=DECISION_NAMES.get(abi.Decision(raw.decision), str(raw.decision)),
            mode=MODE_NAMES.get(abi.Mode(raw.mode), str(raw.mode)),
            rule_id=rule.id if rule else "",
            rule_index=raw.rule_id,
            generation=raw.generation,
            policy_name=rec.policy.name if rec else "",
            policy_version=rec.policy.version if rec else 0,
            policy_digest=rec.policy.digest if rec else "",
            rule_source=rule.source if rule else "",
            dev=f"{major}:{minor}",
            ino=raw.ino,
            cgroup_id=raw.cgroup_id,
            cgroup_path=self.cgroups.path(raw.cgroup_id),
            scope_cgroup_id=raw.scope_cgroup_id,
            scope_cgroup_path=self.cgroups.path(raw.scope_cgroup_id) if raw.scope_cgroup_id else "",
            pid=raw.tgid,
            tid=raw.pid,
            uid=raw.uid,
            gid=raw.gid,
            comm=raw.comm,
            exe=exe,
            enrichment_missing=missing,
            abi_version=raw.abi_version,
            slot=raw.slot,
        )
