"""FakeKernel: the aegis BPF object without a kernel (maps, rings, hooks, decide()).

:meth:`FakeKernel.decide` is a line-for-line model of ``decide()`` in bpf/aegis.bpf.c
(control word, slot, rule, action, scope by cgroup ancestry, counters, ring event).  It
also keeps the truth the agent cannot see (:class:`Truth`: events emitted and ring
reserve failures per class) so tests can prove the agent's accounting.
:func:`make_events` builds bulk decision records for load tests and the bench.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from aegis_stream.errors import KernelError
from aegis_stream.kernel import abi, devnum, libbpf, slots
from aegis_stream.kernel.events import RawDecision, encode_raw
from aegis_stream.kernel.maps import FakeMap, PolicyMaps
from aegis_stream.kernel.ringbuf import RingBuffer
from aegis_stream.kernel.storms import StormTable
from aegis_stream.testing._maps import FakePercpuArray, FakePercpuHash
from aegis_stream.testing._ring import FakeRing

if TYPE_CHECKING:
    from aegis_stream.pipeline import MapsKernelView

EPERM = 1

_u32 = struct.Struct("<I")


@dataclass
class FakeTask:
    """The current task as the BPF helpers see it."""

    pid: int = 4242  # thread id
    tgid: int = 4242
    uid: int = 0
    gid: int = 0
    comm: str = "cat"
    #: cgroup ids from the root (level 0) down to the task's own cgroup
    cgroups: tuple[int, ...] = (1,)

    @property
    def cgroup_id(self) -> int:
        return self.cgroups[-1]

    def ancestor_cgroup_id(self, level: int) -> int:
        return self.cgroups[level] if level < len(self.cgroups) else 0


@dataclass
class Truth:
    """What the fake kernel really did, per class ("deny" / "audit")."""

    decisions: dict[str, int] = field(default_factory=lambda: {"deny": 0, "audit": 0})
    written: dict[str, int] = field(default_factory=lambda: {"deny": 0, "audit": 0})
    ring_failed: dict[str, int] = field(default_factory=lambda: {"deny": 0, "audit": 0})
    suppressed: dict[str, int] = field(default_factory=lambda: {"deny": 0, "audit": 0})  # storms


class FakeKernel:
    """The aegis BPF object without a kernel: maps, rings, hooks, decide()."""

    EXPECTED_HOOKS = tuple(abi.HOOK_NAMES[h] for h in abi.Hook)

    def __init__(
        self,
        *,
        deny_ring_size: int = abi.DENY_RING_BYTES,
        audit_ring_size: int = abi.AUDIT_RING_BYTES,
        ncpu: int = 2,
        ktime_ns: Callable[[], int] = time.monotonic_ns,
        attached: tuple[str, ...] | None = None,
        cgroup_scope_cache: bool = False,
    ) -> None:
        self.ncpu = ncpu
        #: the no-task-storage build: scope answers cached per (generation, cgroup) in
        #: aegis_cg_scopes, as its cached_scope() does (the task cache is not modelled)
        self.cgroup_scope_cache = cgroup_scope_cache
        self.ktime_ns = ktime_ns
        self.policy_maps = PolicyMaps.fake()
        self.counters = FakePercpuArray(
            abi.MAP_COUNTERS, abi.MAP_MAX_ENTRIES[abi.MAP_COUNTERS], ncpu
        )
        self.rule_counters = FakePercpuHash(
            abi.MAP_RULE_COUNTERS, abi.RULE_COUNTER_KEY.size, abi.RULE_COUNTER.size,
            abi.MAP_MAX_ENTRIES[abi.MAP_RULE_COUNTERS], ncpu,
        )
        self.policy_maps.rule_counters = self.rule_counters  # slots.stage prunes it
        # path continuity (bpf/continuity.bpf.h): what rename() did
        self.continuity_counters = FakePercpuArray(
            abi.MAP_CONTINUITY_COUNTERS, abi.MAP_MAX_ENTRIES[abi.MAP_CONTINUITY_COUNTERS], ncpu)
        # deny storms (bpf/storm.bpf.h)
        self.storms = FakeMap(abi.MAP_STORMS, abi.STORM_KEY.size, abi.STORM.size, abi.MAX_STORM_KEYS)
        self.storm_reported = FakeMap(abi.MAP_STORM_REPORTED, abi.STORM_KEY.size, abi.STORM_REPORTED.size,
                                      abi.MAX_STORM_KEYS)
        self.storm_stats = FakePercpuArray(abi.MAP_STORM_STATS, len(abi.StormStat), ncpu)
        self.rings = {
            "deny": FakeRing(abi.MAP_DENY_EVENTS, deny_ring_size),
            "audit": FakeRing(abi.MAP_AUDIT_EVENTS, audit_ring_size),
        }
        self.attached: set[str] = set(self.EXPECTED_HOOKS if attached is None else attached)
        self.cpu = 0
        self.truth = Truth()

    # ---------------------------------------------------------------- agent-facing
    def maps(self) -> dict[str, object]:
        """Map handles by their names in aegis.bpf.c (what counters.read_counters takes)."""
        return {
            abi.MAP_RULES: self.policy_maps.rules,
            abi.MAP_SCOPES: self.policy_maps.scopes,
            abi.MAP_CONFIG: self.policy_maps.config,
            abi.MAP_COUNTERS: self.counters,
            abi.MAP_RULE_COUNTERS: self.rule_counters,
            abi.MAP_CONTINUITY_COUNTERS: self.continuity_counters,
            abi.MAP_STORMS: self.storms,
            abi.MAP_STORM_REPORTED: self.storm_reported,
            abi.MAP_STORM_STATS: self.storm_stats,
            abi.MAP_CG_SCOPES: self.policy_maps.cg_scopes,
        }

    def storm_table(self, **kw: object) -> StormTable:
        """The agent's reader of this kernel's storm maps (aegis_stream/kernel/storms.py)."""
        return StormTable(self.storms, self.storm_reported, self.storm_stats, ncpu=self.ncpu,
                          clock_ns=self.ktime_ns, **kw)  # type: ignore[arg-type]

    def consumers(self) -> dict[str, RingBuffer]:
        return {klass: ring.consumer() for klass, ring in self.rings.items()}

    def close(self) -> None:
        for ring in self.rings.values():
            ring.close()

    # ---------------------------------------------------------------- the BPF program
    def _count(self, hook: int, ctr: abi.Counter, n: int = 1) -> None:
        self.counters.add(hook * abi.COUNTERS_PER_HOOK + ctr, self.cpu, n)

    def _count_rule(self, gen: int, rule_id: int, hook: int, denied: bool, n: int = 1) -> None:
        key = abi.RULE_COUNTER_KEY.pack(gen, rule_id, hook)
        if not self.rule_counters.insert(key):
            return
        self.rule_counters.data[key][self.cpu % self.ncpu][0 if denied else 1] += n

    def _storm_suppress(self, gen: int, rule_id: int, hook: int, enforce: bool, task: FakeTask) -> bool:
        """Model of storm_suppress() in bpf/storm.bpf.h: True = folded into the key's count."""
        window = slots.storm_window_ns(self.policy_maps)
        if not window:
            return False
        dec = abi.Decision.DENY if enforce else abi.Decision.AUDIT
        key = abi.STORM_KEY.pack(gen, task.cgroup_id, rule_id, hook, task.tgid, dec)
        now = self.ktime_ns()
        v = self.storms.lookup(key)
        if v is None:
            try:
                self.storms.update(key, abi.STORM.pack(now, now, 0), libbpf.BPF_NOEXIST)
            except KernelError:  # full: an event, counted
                st = abi.StormStat.UNTRACKED_DENY if enforce else abi.StormStat.UNTRACKED_AUDIT
                self.storm_stats.add(st, self.cpu)
            return False
        first, win, n = abi.STORM.unpack(v)
        if now - win >= window:
            self.storms.data[key] = abi.STORM.pack(first, now, n)  # a new window, opened by an event
            return False
        self.storms.data[key] = abi.STORM.pack(first, win, n + 1)
        self._count(hook, abi.Counter.SUPPRESSED)
        self.storm_stats.add(abi.StormStat.SUPPRESSED_DENY if enforce else abi.StormStat.SUPPRESSED_AUDIT,
                             self.cpu)
        self.truth.suppressed["deny" if enforce else "audit"] += 1
        return True

    def _slot_config(self) -> tuple[int, tuple[int, ...] | None]:
        ctl = self.policy_maps.config.lookup(_u32.pack(0))
        if ctl is None:
            return 0, None
        active = _u32.unpack_from(ctl, 0)[0] & 1
        sc = self.policy_maps.config.lookup(slots.slot_key(active))
        if sc is None:
            return active, None
        vals = abi.SLOT_CONFIG.unpack(sc)
        return active, (vals if vals[2] & abi.SLOT_VALID else None)

    def _match_scope(self, flags: int, slot: int, task: FakeTask) -> int:
        if flags & abi.SLOT_SCOPE_HOST:
            return 0
        for level in range(1, abi.MAX_CGROUP_DEPTH + 1):
            cg = task.ancestor_cgroup_id(level)
            if not cg:
                break
            if self.policy_maps.scopes.lookup(abi.SCOPE_KEY.pack(cg, slot, 0)) is not None:
                return cg
        return -1

    def _cached_scope(self, generation: int, flags: int, slot: int, task: FakeTask) -> int:
        cache = self.policy_maps.cg_scopes
        if not self.cgroup_scope_cache or flags & abi.SLOT_SCOPE_HOST or cache is None:
            return self._match_scope(flags, slot, task)
        key = abi.CG_SCOPE_KEY.pack(generation, task.cgroup_id)
        hit = cache.lookup(key)
        if hit is not None:
            return int.from_bytes(hit, "little", signed=True)
        scope = self._match_scope(flags, slot, task)
        try:
            cache.update(key, scope.to_bytes(8, "little", signed=True), libbpf.BPF_NOEXIST)
        except KernelError:
            pass  # full (or inserted meanwhile): the walk next time, as the program does
        return scope

    def decide(self, hook: abi.Hook, dev: int, ino: int, action: int, task: FakeTask | None = None,
               i_generation: int | None = None) -> int:
        """Model of decide() in aegis.bpf.c: 0 (allow) or -EPERM.  ``dev`` is the kernel
        encoding (MAJOR << 20 | MINOR); ``i_generation`` the inode's (None: the rule's own)."""
        task = task or FakeTask()
        hook_name = abi.HOOK_NAMES[hook]
        if hook_name not in self.attached:
            return 0  # program not attached: the hook never runs
        slot, sc = self._slot_config()
        if sc is None:
            self._count(hook, abi.Counter.NO_POLICY)
            return 0
        generation, mode, flags, _rules, _scopes = sc
        self._count(hook, abi.Counter.EVALUATED)
        scope = self._cached_scope(generation, flags, slot, task)  # scope first, as the program does
        if scope < 0:
            return 0
        self._count(hook, abi.Counter.SCOPE_MATCHED)
        rule = self.policy_maps.rules.lookup(abi.INODE_KEY.pack(ino, dev, slot))
        if rule is None:
            return 0
        rule_id, actions, rule_flags, rule_gen = abi.RULE.unpack(rule)
        if rule_flags & abi.RULE_CHECK_GEN and i_generation is not None and i_generation != rule_gen:
            self._count(hook, abi.Counter.STALE)  # a reused (dev, ino): not the rule's inode
            return 0
        if not actions & action:
            return 0
        self._count(hook, abi.Counter.RULE_MATCHED)
        enforce = mode == abi.Mode.ENFORCE
        klass = "deny" if enforce else "audit"
        self._count(hook, abi.Counter.DENIED if enforce else abi.Counter.AUDITED)
        self._count_rule(generation, rule_id, hook, enforce)
        self.truth.decisions[klass] += 1
        if self._storm_suppress(generation, rule_id, hook, enforce, task):
            self.cpu = (self.cpu + 1) % self.ncpu
            return -EPERM if enforce else 0
        ev = RawDecision(
            abi.ABI_VERSION, int(hook), int(abi.Decision.DENY if enforce else abi.Decision.AUDIT),
            rule_id, generation, self.ktime_ns(), task.cgroup_id, scope, ino, dev, action,
            task.pid, task.tgid, task.uid, task.gid, mode, slot, task.comm,
            rule_flags=rule_flags & 0xFFFF,  # the record's rule_flags is a u16
        )
        if self.rings[klass].output(encode_raw(ev)):
            self.truth.written[klass] += 1
        else:
            self._count(hook, abi.Counter.RINGBUF_FAIL)
            self.truth.ring_failed[klass] += 1
        self.cpu = (self.cpu + 1) % self.ncpu
        return -EPERM if enforce else 0

    def rename(self, dev: int, src_ino: int, src_gen: int, dst_ino: int | None,
               dst_gen: int = 0) -> None:
        """Model of the lsm/inode_rename program (bpf/continuity.bpf.h): the file (dev,
        src_ino) is renamed over (dev, dst_ino) (``None``: a new name).  In each slot where
        the target holds a path rule (a live one when it checks i_generation), the source
        inherits it (flags | RULE_INHERITED, i_generation = ``src_gen``); a live existing
        entry of the source wins, a stale one (both generations known, different) is
        replaced.  Never denies.  A RENAME_EXCHANGE is two calls, the second with the files
        swapped."""
        if dst_ino is None:
            return
        rules = self.policy_maps.rules
        c = abi.ContinuityCounter
        for slot in range(abi.SLOTS):
            raw = rules.lookup(abi.INODE_KEY.pack(dst_ino, dev, slot))
            if raw is None:
                continue
            rule_id, actions, flags, igen = abi.RULE.unpack(raw)
            if not flags & abi.RULE_PATH:
                continue
            if flags & abi.RULE_CHECK_GEN and igen != dst_gen:
                self.continuity_counters.add(c.STALE_TARGET, self.cpu)
                continue
            key = abi.INODE_KEY.pack(src_ino, dev, slot)
            value = abi.RULE.pack(rule_id, actions, flags | abi.RULE_INHERITED, src_gen)
            cur = rules.lookup(key)
            if cur is not None:
                _, _, _, cgen = abi.RULE.unpack(cur)
                if not cgen or not src_gen or cgen == src_gen:
                    self.continuity_counters.add(c.KEPT, self.cpu)
                    continue
            try:
                rules.update(key, value)
            except KernelError as exc:  # the map is full
                self.continuity_counters.add(c.INHERIT_FAILED, self.cpu)
                self.continuity_counters.values[c.LAST_ERRNO][self.cpu % self.ncpu] = exc.errno
                continue
            self.continuity_counters.add(c.INHERITED, self.cpu)

    def emit_bulk(self, klass: str, bodies: bytes, count: int, hook: abi.Hook = abi.Hook.FILE_OPEN) -> int:
        """Load generator: ``count`` pre-built 96-byte decision records of one class and
        hook, counted as ``decide()`` counts them (no rule evaluation).  Returns how many
        reached the ring; the rest are counted RINGBUF_FAIL."""
        written = self.rings[klass].output_events(bodies, count)
        for ctr in (abi.Counter.EVALUATED, abi.Counter.RULE_MATCHED, abi.Counter.SCOPE_MATCHED,
                    abi.Counter.DENIED if klass == "deny" else abi.Counter.AUDITED):
            self._count(hook, ctr, count)
        if count - written:
            self._count(hook, abi.Counter.RINGBUF_FAIL, count - written)
        self.truth.decisions[klass] += count
        self.truth.written[klass] += written
        self.truth.ring_failed[klass] += count - written
        return written

    # ---------------------------------------------------------------- loader-facing
    def attach_state(self) -> dict[str, bool]:
        return {h: h in self.attached for h in self.EXPECTED_HOOKS}

    def view(self) -> MapsKernelView:
        """The pipeline's KernelView: the same class the agent uses on pinned maps."""
        from aegis_stream.pipeline import MapsKernelView

        return MapsKernelView(self.maps(), self.policy_maps, self.attach_state, self.ncpu)


def make_events(
    n: int,
    *,
    decision: abi.Decision = abi.Decision.AUDIT,
    generation: int = 1,
    rule_ids: int = 1,
    start_ktime: int = 1_000_000_000,
    step_ns: int = 1000,
    dev: int = devnum.kernel_dev(8, 1),
    ino: int = 1234,
    cgroup_id: int = 1000,
    scope_cgroup_id: int = 1000,
    pids: int = 16,
    comm: str = "cat",
) -> bytes:
    """``n`` contiguous 96-byte decision records (for load tests and the bench)."""
    mode = abi.Mode.ENFORCE if decision == abi.Decision.DENY else abi.Mode.AUDIT
    one = np.frombuffer(
        encode_raw(RawDecision(abi.ABI_VERSION, 0, int(decision), 0, generation, 0, cgroup_id,
                               scope_cgroup_id, ino, dev, abi.ACTION_OPEN, 0, 0, 0, 0, int(mode), 0,
                               comm)),
        dtype=np.uint8,
    )
    from aegis_stream.kernel.events import EVENT_DTYPE

    arr = np.frombuffer(np.tile(one, n).tobytes(), dtype=EVENT_DTYPE).copy()
    idx = np.arange(n, dtype=np.uint64)
    arr["ktime_ns"] = np.uint64(start_ktime) + idx * np.uint64(step_ns)
    arr["rule_id"] = (idx % np.uint64(max(1, rule_ids))).astype(np.uint32)
    arr["ino"] = np.uint64(ino) + (idx % np.uint64(max(1, rule_ids)))
    arr["pid"] = (np.uint64(1000) + idx % np.uint64(max(1, pids))).astype(np.uint32)
    arr["tgid"] = arr["pid"]
    return arr.tobytes()
