"""A fake kernel for the event pipeline: the BPF side of aegis without a kernel.

What it fakes, byte for byte where the agent reads bytes:

* :class:`FakeRing` -- a ``BPF_MAP_TYPE_RINGBUF``: a memfd laid out as the kernel maps
  one (consumer page, producer page, data area, data area again).  The kernel maps the
  data pages twice; here the producer writes every byte to both copies, so the consumer
  (the real :class:`~aegis_stream.ringbuf.RingBuffer`, mmapping the memfd at the same
  offsets it uses on a map fd) sees identical bytes.  Reserve/commit/discard follow
  ``kernel/bpf/ringbuf.c``: 8-byte headers with BUSY/DISCARD bits, 8-byte alignment,
  the producer position advanced at reserve time, a reserve refused when the new
  producer position would run more than ``size - 1`` bytes ahead of the consumer (or
  of the oldest record still BUSY), and the adaptive wakeup (only when the committed
  record is where the consumer is) through an eventfd, the consumer's ``wakeup_fd``.
* :class:`FakePercpuArray` / :class:`FakePercpuHash` -- per-CPU maps with
  ``lookup_percpu`` and ``keys``, so :func:`aegis_stream.counters.read_counters` reads
  them exactly as it reads the kernel's ``aegis_counters`` / ``aegis_rule_counters``.
* :class:`FakeKernel` -- those maps plus the policy maps (:meth:`PolicyMaps.fake`) and
  :meth:`FakeKernel.decide`, a line-for-line model of ``decide()`` in bpf/aegis.bpf.c
  (control word, slot, rule, action, scope by cgroup ancestry, counters, ring event).
  It also keeps the truth the agent cannot see (``truth``: events emitted and ring
  reserve failures per class) so tests can prove the agent's accounting.

Shipped in the package (like httpcore's mock backend) so the pipeline, the bench and
anyone's tests run end to end without root or BPF.
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from aegis_stream.errors import KernelError
from aegis_stream.kernel import abi, slots
from aegis_stream.kernel.events import EVENT_SIZE, RECORD_STRIDE, RING_HDR, RawDecision, encode_raw
from aegis_stream.kernel.maps import PolicyMaps
from aegis_stream.kernel.ringbuf import BUSY_BIT, DISCARD_BIT, HDR_SIZE, PAGE, RingBuffer

if TYPE_CHECKING:
    from aegis_stream.pipeline.core import MapsKernelView
    from aegis_stream.pipeline.normalise import Normaliser
    from aegis_stream.policy.store import GenerationRecord, PolicyStore

#: page offset of the data area inside struct bpf_ringbuf (waitq/work page, consumer
#: page, producer page, then data): what the kernel writes into each header's pg_off
RINGBUF_DATA_PGOFF = 3
BPF_RB_NO_WAKEUP = 1
BPF_RB_FORCE_WAKEUP = 2
EPERM = 1
PAGE_SHIFT = PAGE.bit_length() - 1
BPF_NOEXIST = 1

_u64 = struct.Struct("<Q")
_u32 = struct.Struct("<I")


class FakeRing:
    """A BPF ring buffer in a memfd; the producer side is this object's methods."""

    def __init__(self, name: str, size: int) -> None:
        if size < PAGE or size & (size - 1):
            raise ValueError(f"ring size {size} must be a power of two >= {PAGE}")
        self.name = name
        self.size = size
        self.mask = size - 1
        self.fd = os.memfd_create(f"aegis-fake-{name}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, 2 * PAGE + 2 * size)
        self.wakeup_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._m = mmap.mmap(self.fd, 2 * PAGE + 2 * size, mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE)
        # single 8-byte loads/stores, as the kernel's smp_load_acquire/smp_store_release
        # (struct's "<Q" is a byte-by-byte copy: torn across processes)
        self._cons_word = ctypes.c_uint64.from_buffer(self._m, 0)
        self._prod_word = ctypes.c_uint64.from_buffer(self._m, PAGE)
        self._busy: collections.deque[int] = collections.deque()  # positions still BUSY
        self._committed: set[int] = set()
        self.reserved = 0
        self.failed = 0  # reserve failures (what the BPF side counts as RINGBUF_FAIL)
        self.wakeups = 0
        self._consumers: list[RingBuffer] = []

    # ---------------------------------------------------------------- positions
    def consumer_pos(self) -> int:
        return int(self._cons_word.value)

    def producer_pos(self) -> int:
        return int(self._prod_word.value)

    def _set_producer(self, pos: int) -> None:
        self._prod_word.value = pos

    def available_bytes(self) -> int:
        return self.producer_pos() - self.consumer_pos()

    # ---------------------------------------------------------------- data area
    def _write(self, pos: int, data: bytes | memoryview) -> None:
        """Write at ring position ``pos`` into the data area and its second mapping."""
        base = 2 * PAGE
        off = pos & self.mask
        n = len(data)
        m = self._m
        m[base + off : base + off + n] = data
        if off + n <= self.size:
            m[base + self.size + off : base + self.size + off + n] = data
        else:
            first = self.size - off
            m[base + self.size + off : base + 2 * self.size] = data[:first]
            m[base : base + n - first] = data[first:]

    def _pg_off(self, pos: int) -> int:
        return RINGBUF_DATA_PGOFF + ((pos & self.mask) >> PAGE_SHIFT)

    # ---------------------------------------------------------------- producer API
    def reserve(self, size: int) -> int | None:
        """bpf_ringbuf_reserve: the record's position, or None when it does not fit."""
        length = (size + HDR_SIZE + 7) & ~7
        if length > self.size:
            self.failed += 1
            return None
        cons = self.consumer_pos()
        prod = self.producer_pos()
        while self._busy and self._busy[0] in self._committed:
            self._committed.discard(self._busy.popleft())
        pend = self._busy[0] if self._busy else prod
        new_prod = prod + length
        if new_prod - cons > self.mask or new_prod - pend > self.mask:
            self.failed += 1
            return None
        self._write(prod, RING_HDR.pack(size | BUSY_BIT, self._pg_off(prod)))
        self._busy.append(prod)
        self._set_producer(new_prod)
        self.reserved += 1
        return prod

    def commit(self, pos: int, data: bytes = b"", *, discard: bool = False, flags: int = 0) -> None:
        """Write the record body, then bpf_ringbuf_submit (or _discard) it."""
        size = _u32.unpack_from(self._m, 2 * PAGE + (pos & self.mask))[0] & ~(BUSY_BIT | DISCARD_BIT)
        if data:
            if len(data) > size:
                raise ValueError(f"record body of {len(data)} bytes in a {size}-byte reservation")
            self._write(pos + HDR_SIZE, data)
        self._write(pos, _u32.pack(size | (DISCARD_BIT if discard else 0)))
        self._committed.add(pos)
        self._maybe_wake(pos, flags)

    def _maybe_wake(self, rec_pos: int, flags: int = 0) -> None:
        if flags & BPF_RB_FORCE_WAKEUP or (
            not flags & BPF_RB_NO_WAKEUP and self.consumer_pos() == rec_pos
        ):
            os.eventfd_write(self.wakeup_fd, 1)
            self.wakeups += 1

    def output(self, data: bytes) -> bool:
        """bpf_ringbuf_output: reserve + copy + submit; False when the ring is full."""
        pos = self.reserve(len(data))
        if pos is None:
            return False
        self.commit(pos, data)
        return True

    def output_events(self, bodies: bytes | memoryview, count: int) -> int:
        """Bulk ``output`` of ``count`` 96-byte events (a contiguous run): writes as many as
        fit and returns that number; the rest are reserve failures.  Byte-identical to
        ``count`` calls of :meth:`output` (tested), one memcpy instead of ``count``."""
        if self._busy:  # keep the exact semantics while reservations are open
            return sum(self.output(bytes(bodies[i * EVENT_SIZE : (i + 1) * EVENT_SIZE]))
                       for i in range(count))
        cons = self.consumer_pos()
        prod = self.producer_pos()
        fit = max(0, (cons + self.mask - prod) // RECORD_STRIDE)
        n = min(count, fit)
        self.failed += count - n
        if n:
            recs = np.empty((n, RECORD_STRIDE), dtype=np.uint8)
            recs[:, HDR_SIZE:] = np.frombuffer(bodies, dtype=np.uint8, count=n * EVENT_SIZE).reshape(n, -1)
            pos = prod + np.arange(n, dtype=np.uint64) * np.uint64(RECORD_STRIDE)
            hdr = recs[:, :HDR_SIZE].view("<u4")
            hdr[:, 0] = EVENT_SIZE
            hdr[:, 1] = RINGBUF_DATA_PGOFF + ((pos & np.uint64(self.mask)) >> np.uint64(PAGE_SHIFT))
            self._write(prod, recs.tobytes())
            self._set_producer(prod + n * RECORD_STRIDE)
            self.reserved += n
            self._maybe_wake(prod)
        return n

    # ---------------------------------------------------------------- consumer side
    def consumer(self) -> RingBuffer:
        """The agent's reader over this ring: the real RingBuffer class on the memfd."""
        rb = RingBuffer(self.fd, self.size, self.name, wakeup_fd=self.wakeup_fd)
        self._consumers.append(rb)
        return rb

    def close(self) -> None:
        for rb in self._consumers:
            try:
                rb.close()
            except (ValueError, BufferError):
                pass
        del self._cons_word, self._prod_word  # exported buffers keep the mmap open
        self._m.close()
        os.close(self.wakeup_fd)
        os.close(self.fd)


class FakePercpuArray:
    """BPF_MAP_TYPE_PERCPU_ARRAY of u64."""

    def __init__(self, name: str, max_entries: int, ncpu: int) -> None:
        self.name = name
        self.key_size = 4
        self.value_size = 8
        self.max_entries = max_entries
        self.ncpu = ncpu
        self.values = [[0] * ncpu for _ in range(max_entries)]

    def add(self, idx: int, cpu: int, n: int = 1) -> None:
        self.values[idx][cpu % self.ncpu] += n

    def lookup_percpu(self, key: bytes, ncpus: int) -> list[bytes] | None:
        (idx,) = _u32.unpack(key)
        if idx >= self.max_entries:
            return None
        return [_u64.pack(v) for v in self.values[idx]][:ncpus]

    def lookup(self, key: bytes) -> bytes | None:
        per = self.lookup_percpu(key, self.ncpu)
        return per[0] if per else None

    def keys(self) -> list[bytes]:
        return [_u32.pack(i) for i in range(self.max_entries)]


class FakePercpuHash:
    """BPF_MAP_TYPE_PERCPU_HASH with aegis_rule_counter values."""

    def __init__(self, name: str, key_size: int, value_size: int, max_entries: int, ncpu: int) -> None:
        self.name = name
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.ncpu = ncpu
        self.data: dict[bytes, list[list[int]]] = {}

    def insert(self, key: bytes) -> bool:
        if key in self.data:
            return True
        if len(self.data) >= self.max_entries:
            return False
        self.data[key] = [[0, 0] for _ in range(self.ncpu)]
        return True

    def lookup_percpu(self, key: bytes, ncpus: int) -> list[bytes] | None:
        v = self.data.get(key)
        if v is None:
            return None
        return [abi.RULE_COUNTER.pack(*c) for c in v][:ncpus]

    def lookup(self, key: bytes) -> bytes | None:
        per = self.lookup_percpu(key, self.ncpu)
        return per[0] if per else None

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        """Userspace update: ``value`` holds one 8-byte-aligned value per CPU, as
        bpf_map_update_elem takes for a per-CPU map."""
        stride = (self.value_size + 7) & ~7
        if len(key) != self.key_size or len(value) != stride * self.ncpu:
            raise KernelError(f"map {self.name}: update", err=22)
        if key not in self.data and len(self.data) >= self.max_entries:
            raise KernelError(f"map {self.name}: update", err=7)
        self.data[key] = [list(abi.RULE_COUNTER.unpack(value[i * stride : i * stride + self.value_size]))
                          for i in range(self.ncpu)]

    def delete(self, key: bytes) -> bool:
        return self.data.pop(key, None) is not None

    def keys(self) -> list[bytes]:
        return list(self.data)


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
    ) -> None:
        self.ncpu = ncpu
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
        }

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

    def decide(self, hook: abi.Hook, dev: int, ino: int, action: int, task: FakeTask | None = None) -> int:
        """Model of decide() in aegis.bpf.c: 0 (allow) or -EPERM.  ``dev`` is the kernel
        encoding (MAJOR << 20 | MINOR)."""
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
        scope = self._match_scope(flags, slot, task)  # scope first, as the program does
        if scope < 0:
            return 0
        self._count(hook, abi.Counter.SCOPE_MATCHED)
        rule = self.policy_maps.rules.lookup(abi.INODE_KEY.pack(ino, dev, slot))
        if rule is None:
            return 0
        rule_id, actions, _f, _p = abi.RULE.unpack(rule)
        if not actions & action:
            return 0
        self._count(hook, abi.Counter.RULE_MATCHED)
        enforce = mode == abi.Mode.ENFORCE
        klass = "deny" if enforce else "audit"
        self._count(hook, abi.Counter.DENIED if enforce else abi.Counter.AUDITED)
        self._count_rule(generation, rule_id, hook, enforce)
        self.truth.decisions[klass] += 1
        ev = RawDecision(
            abi.ABI_VERSION, int(hook), int(abi.Decision.DENY if enforce else abi.Decision.AUDIT),
            rule_id, generation, self.ktime_ns(), task.cgroup_id, scope, ino, dev, action,
            task.pid, task.tgid, task.uid, task.gid, mode, slot, task.comm,
        )
        if self.rings[klass].output(encode_raw(ev)):
            self.truth.written[klass] += 1
        else:
            self._count(hook, abi.Counter.RINGBUF_FAIL)
            self.truth.ring_failed[klass] += 1
        self.cpu = (self.cpu + 1) % self.ncpu
        return -EPERM if enforce else 0

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
        from aegis_stream.pipeline.core import MapsKernelView

        return MapsKernelView(self.maps(), self.policy_maps, self.attach_state, self.ncpu)


def make_events(
    n: int,
    *,
    decision: abi.Decision = abi.Decision.AUDIT,
    generation: int = 1,
    rule_ids: int = 1,
    start_ktime: int = 1_000_000_000,
    step_ns: int = 1000,
    dev: int = (8 << 20) | 1,
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


def check_ring_failures(kernel: FakeKernel) -> None:
    """Sanity: the RINGBUF_FAIL counters equal the rings' reserve failures."""
    total = sum(
        sum(kernel.counters.values[h * abi.COUNTERS_PER_HOOK + abi.Counter.RINGBUF_FAIL])
        for h in abi.Hook
    )
    failed = sum(r.failed for r in kernel.rings.values())
    if total != failed:
        raise KernelError(f"fake kernel: RINGBUF_FAIL {total} != ring reserve failures {failed}")


# ------------------------------------------------------------------ a small fixed world
#: cgroup ids of the fixed world: root, /workloads (selected), /workloads/app, /other
CG_ROOT, CG_WORKLOADS, CG_APP, CG_OTHER = 1, 1000, 1001, 2000
CGROUP_PATHS = {
    CG_ROOT: "/sys/fs/cgroup",
    CG_WORKLOADS: "/sys/fs/cgroup/workloads",
    CG_APP: "/sys/fs/cgroup/workloads/app",
    CG_OTHER: "/sys/fs/cgroup/other",
}
DEV_SDA1 = (8 << 20) | 1


def sample_record(generation: int = 7, *, mode: str = "enforce", signer: str = "ops-2026",
                  host_scope: bool = False) -> GenerationRecord:
    """A fixed compiled policy: three rules on 8:1, scoped to /sys/fs/cgroup/workloads."""
    from aegis_stream.policy.compiler import CompiledPolicy, CompiledRule, CompiledScope
    from aegis_stream.policy.store import GenerationRecord

    rules = [
        CompiledRule(0, "deny-shadow", "/etc/shadow", DEV_SDA1, 1234,
                     abi.ACTION_OPEN | abi.ACTION_EXEC, "ext4"),
        CompiledRule(1, "deny-nc", "/usr/bin/nc", DEV_SDA1, 5678, abi.ACTION_EXEC, "ext4"),
        CompiledRule(2, "deny-100%\"odd\"", "/srv/odd path/100%\"q\".txt", DEV_SDA1, 9012,
                     abi.ACTION_OPEN, "ext4"),
    ]
    scopes = [] if host_scope else [CompiledScope(0, "/sys/fs/cgroup/workloads", CG_WORKLOADS)]
    pol = CompiledPolicy("prod-baseline", 3, mode, "sha256:" + "ab" * 32, rules, scopes)
    return GenerationRecord(generation, 1_780_000_000.0, pol, signer, mode)


def install(kernel: FakeKernel, store: PolicyStore, record: GenerationRecord, *,
            origin: str = "/etc/aegis/policy.toml") -> None:
    """Record a generation in the store (and its apply in the provenance log) and make it
    the active slot of the fake kernel, as Lifecycle.apply does."""
    from aegis_stream.policy.provenance import ProvenanceLog

    store.record(record)
    ProvenanceLog(store.root, host="fake").append(
        "apply", origin=origin, generation=record.generation, policy=record.policy.name,
        version=record.policy.version, digest=record.policy.digest, mode=record.mode,
    )
    mode = abi.Mode.ENFORCE if (record.mode or record.policy.mode) == "enforce" else abi.Mode.AUDIT
    slots.swap(kernel.policy_maps, record.policy, record.generation, int(mode))


def fixed_normaliser(store: PolicyStore, *, processes: dict[int, tuple[str, list[str]]] | None = None,
                     **kw: object) -> Normaliser:
    """A deterministic normaliser: fixed host, boot id, boot time, cgroups and processes."""
    from aegis_stream.pipeline.normalise import CgroupResolver, Normaliser, ProcessInfo, StaticProcesses

    procs = processes if processes is not None else {4242: ("/usr/bin/cat", ["cat", "/etc/shadow"])}
    return Normaliser(
        store,
        cgroups=CgroupResolver(static=CGROUP_PATHS),
        host="host-1",
        processes=StaticProcesses({t: ProcessInfo(e, tuple(c), ()) for t, (e, c) in procs.items()}),
        boot_id_hex="0123456789abcdef0123456789abcdef",
        boot_ns=1_780_000_000_000_000_000,
        **kw,  # type: ignore[arg-type]
    )
