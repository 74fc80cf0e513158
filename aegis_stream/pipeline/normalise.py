"""Raw decision -> DecisionEvent: rule/policy from the generation store, cgroup path,
process exe and cmdline (best effort, flagged in ``enrichment_missing`` when not).

Two paths, one answer (tests/unit/test_normalise.py proves them byte-identical):

* :meth:`Normaliser.normalise` -- one :class:`RawDecision` -> :class:`DecisionEvent`
  (the reference; denies and explanations use it).
* :meth:`Normaliser.encode_batch` -- a decoded batch (numpy records) -> JSON lines.
  Records are grouped by their *context* (every field but ktime, pid and tgid); each
  context is rendered once through msgspec with sentinels in the per-event fields and
  split into a format template, so each event costs one ``bytes %`` with its ktime,
  thread, process and time.  The telemetry (audit) class uses it.

Every lookup is cached in a bounded cache (LRU, capacity + optional TTL on an
injectable clock): generations (negative answers expire so a late record is found),
cgroup ids (one walk of cgroupfs fills the cache for every id it passes), processes
(a short TTL: pids are reused).
"""

from __future__ import annotations

import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Generic, TypeVar

import msgspec
import numpy as np

from aegis_stream.errors import StateError
from aegis_stream.kernel import abi
from aegis_stream.kernel.devnum import split_kernel_dev
from aegis_stream.kernel.events import ACTION_NAMES, DECISION_NAMES, MODE_NAMES, RawDecision, comm_str
from aegis_stream.pipeline.enrich import WorkloadResolver
from aegis_stream.pipeline.schema import DecisionEvent
from aegis_stream.policy.store import GenerationRecord, PolicyStore

K = TypeVar("K")
V = TypeVar("V")
Clock = Callable[[], float]

_enc = msgspec.json.Encoder()


@dataclass(frozen=True)
class CacheStatistics:
    """One :class:`BoundedCache`'s size, capacity and hit/miss/eviction/expiry totals (the cache metrics)."""
    name: str
    size: int
    capacity: int
    hits: int
    misses: int
    evictions: int
    expired: int


class BoundedCache(Generic[K, V]):
    """LRU with a capacity and, optionally, a time to live (on ``clock``)."""

    def __init__(
        self, capacity: int, *, ttl: float | None = None, clock: Clock = time.monotonic, name: str = ""
    ) -> None:
        if capacity < 1:
            raise ValueError("cache capacity must be >= 1")
        self.name = name
        self.capacity = capacity
        self.ttl = ttl
        self.clock = clock
        self._d: OrderedDict[K, tuple[V, float]] = OrderedDict()
        self.hits = self.misses = self.evictions = self.expired = 0

    def __len__(self) -> int:
        return len(self._d)

    def get_or(self, key: K, make: Callable[[K], V], *, ttl: float | None = None) -> V:
        """The cached value, or ``make(key)`` cached (for ``ttl``, default the cache's)."""
        hit = self._d.get(key)
        if hit is not None:
            val, expires = hit
            if expires and self.clock() >= expires:
                self.expired += 1
                del self._d[key]
            else:
                self.hits += 1
                self._d.move_to_end(key)
                return val
        self.misses += 1
        val = make(key)
        self.put(key, val, ttl=ttl)
        return val

    def get_fresh(self, key: K) -> tuple[V, float] | None:
        """The ``(value, expires_at)`` entry when present and unexpired (a hit), else None
        (a miss; the caller makes the value and :meth:`put` s it, choosing its ttl from the
        value, e.g. a shorter one for a negative answer).  Unlike :meth:`get_or` it neither
        moves the entry to the LRU end nor drops an expired one (the ``put`` replaces it):
        one dict lookup on the per-event path."""
        hit = self._d.get(key)
        if hit is not None and (not hit[1] or self.clock() < hit[1]):
            self.hits += 1
            return hit
        self.misses += 1
        return None

    def peek(self, key: K) -> tuple[V, float] | None:
        """The stored ``(value, expires_at)`` entry as it is: no expiry check, no statistics."""
        return self._d.get(key)

    def put(self, key: K, val: V, *, ttl: float | None = None) -> None:
        life = ttl if ttl is not None else self.ttl
        self._d[key] = (val, self.clock() + life if life else 0.0)
        self._d.move_to_end(key)
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)
            self.evictions += 1

    def drop_where(self, dead: Callable[[K], bool]) -> int:
        """Remove every entry whose key ``dead`` selects (counted as evictions)."""
        keys = [k for k in self._d if dead(k)]
        for k in keys:
            del self._d[k]
        self.evictions += len(keys)
        return len(keys)

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(self.name, len(self._d), self.capacity, self.hits, self.misses,
                               self.evictions, self.expired)


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip().replace("-", "")
    except OSError:
        return "0" * 32


def boot_time_ns() -> int:
    """Wall clock at ktime 0 (CLOCK_MONOTONIC, which bpf_ktime_get_ns uses)."""
    return time.time_ns() - time.monotonic_ns()


# --------------------------------------------------------------------------- cgroups
class CgroupResolver:
    """cgroup id -> path.  Ids are cgroup2 directory inode numbers; a miss walks the
    cgroup2 mounts once (at most every ``walk_interval`` seconds) and caches every id
    it passes.  Unknown ids resolve to "" (cached for ``negative_ttl``)."""

    def __init__(
        self,
        roots: list[str] | None = None,
        capacity: int = 4096,
        *,
        static: Mapping[int, str] | None = None,
        walk_interval: float = 1.0,
        negative_ttl: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if roots is None and static is None:
            from aegis_stream.policy.compiler import cgroup2_mounts

            roots = cgroup2_mounts()
        self.roots = roots or []
        self.static = dict(static or {})
        self.cache: BoundedCache[int, str] = BoundedCache(capacity, clock=clock, name="cgroup")
        self.walk_interval = walk_interval
        self.negative_ttl = negative_ttl
        self.clock = clock
        self._last_walk = float("-inf")
        self.walks = 0

    def _walk(self) -> None:
        self._last_walk = self.clock()
        self.walks += 1
        for root in self.roots:
            for dirpath, _dirs, _files in os.walk(root):
                try:
                    ino = os.stat(dirpath).st_ino
                except OSError:
                    continue
                self.cache.put(ino, dirpath)

    def _find(self, cgid: int) -> str:
        if cgid in self.static:
            return self.static[cgid]
        if self.roots and self.clock() - self._last_walk >= self.walk_interval:
            self._walk()
            hit = self.cache.peek(cgid)
            if hit is not None:
                return hit[0]
        return ""

    def path(self, cgid: int) -> str:
        if cgid == 0:
            return ""
        hit = self.cache.get_fresh(cgid)
        if hit is not None:
            return hit[0]
        found = self._find(cgid)
        self.cache.put(cgid, found, ttl=None if found else self.negative_ttl)
        return found


# --------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class ProcessInfo:
    """A process's exe and cmdline as /proc said at lookup time; ``missing`` names what /proc could not
    give (the process exited, or a kernel thread has no cmdline), so an event says unknown rather than
    empty.  The JSON encodings are cached because one process is in many events."""
    exe: str
    cmdline: tuple[str, ...]
    missing: tuple[str, ...]  # "exe" / "cmdline" when /proc could not say

    @cached_property
    def exe_json(self) -> bytes:
        return _enc.encode(self.exe)

    @cached_property
    def cmdline_json(self) -> bytes:
        return _enc.encode(list(self.cmdline))


class ProcessResolver:
    """tgid -> exe and cmdline from /proc, best effort (the process may be gone).  A
    short TTL because pids are reused."""

    def __init__(
        self, *, capacity: int = 4096, ttl: float = 2.0, clock: Clock = time.monotonic,
        proc: str = "/proc", max_cmdline: int = 4096,
    ) -> None:
        self.cache: BoundedCache[int, ProcessInfo] = BoundedCache(capacity, ttl=ttl, clock=clock,
                                                                  name="process")
        self.proc = proc
        self.max_cmdline = max_cmdline

    def _read(self, tgid: int) -> ProcessInfo:
        missing = []
        exe = ""
        cmd: tuple[str, ...] = ()
        try:
            exe = os.readlink(f"{self.proc}/{tgid}/exe")
        except OSError:
            missing.append("exe")
        try:
            with open(f"{self.proc}/{tgid}/cmdline", "rb") as fh:
                raw = fh.read(self.max_cmdline)
            cmd = tuple(a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")) if raw else ()
            if not raw:
                missing.append("cmdline")  # kernel threads and zombies have none
        except OSError:
            missing.append("cmdline")
        return ProcessInfo(exe, cmd, tuple(missing))

    def lookup(self, tgid: int) -> ProcessInfo:
        return self.cache.get_or(tgid, self._read)


class StaticProcesses:
    """A fixed tgid -> ProcessInfo table (tests, golden vectors); unknown = missing."""

    def __init__(self, table: Mapping[int, ProcessInfo]) -> None:
        self.table = dict(table)
        self._gone = ProcessInfo("", (), ("exe", "cmdline"))

    def lookup(self, tgid: int) -> ProcessInfo:
        return self.table.get(tgid, self._gone)


# --------------------------------------------------------------------------- generations
@dataclass(frozen=True)
class GenerationInfo:
    """A generation's stored record (its compiled rule table), the file it was applied from and the
    record's path: what an event and its explanation cite for ``generation``."""
    record: GenerationRecord
    source: str  # the file it was applied from, per the provenance log ("" if unknown)
    record_path: str


class GenerationIndex:
    """generation -> its record in the store (+ where it was applied from).

    A record holds its whole rule table (3.8 MB decoded for 10,000 rules), so the cache is
    small: the pipeline needs the active generation and the one it replaced
    (``Normaliser.retire_generations``); older ones are read again on a miss."""

    def __init__(
        self, store: PolicyStore, *, capacity: int = 8, negative_ttl: float = 5.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.store = store
        self.negative_ttl = negative_ttl
        self.cache: BoundedCache[int, GenerationInfo | None] = BoundedCache(capacity, clock=clock,
                                                                            name="generation")

    def _origin(self, gen: int) -> str:
        from aegis_stream.policy.provenance import ProvenanceLog

        origin = ""
        try:
            for rec in ProvenanceLog(self.store.root).records():
                if (rec.get("generation") == gen and rec.get("result", "ok") == "ok"
                        and rec.get("action") in ("apply", "rollback", "restage")):
                    origin = str(rec.get("origin", "") or origin)
        except StateError:
            return ""
        return origin

    def _load(self, gen: int) -> GenerationInfo | None:
        try:
            rec = self.store.load(gen)
        except StateError:
            return None
        return GenerationInfo(rec, self._origin(gen), str(self.store.gen_dir / f"{gen}.json"))

    def get(self, gen: int) -> GenerationInfo | None:
        hit = self.cache.get_fresh(gen)
        if hit is not None:
            return hit[0]
        info = self._load(gen)
        self.cache.put(gen, info, ttl=None if info else self.negative_ttl)
        return info


# --------------------------------------------------------------------------- normaliser
#: sentinels for the per-event fields in a context template (see encode_batch)
_S_EID, _S_TIME, _S_EXE = "\x00aegis-eid", "\x00aegis-time", "\x00aegis-exe"
_S_MISS, _S_CMD = "\x00aegis-miss", "\x00aegis-cmd"
_S_KT, _S_PID, _S_TID = 18446744073709551557, 18446744073709551533, 18446744073709551521


@dataclass
class _Context:
    """What one (generation, rule, hook, ..., cgroup, comm) context renders to."""

    fields: dict
    missing: tuple[str, ...]
    segs: list[bytes] | None = None  # the rendered JSON around the per-event fields
    missing_json: dict[tuple[str, ...], bytes] = field(default_factory=dict)


class Normaliser:
    """Turns raw kernel records into versioned :class:`DecisionEvent` Structs.

    Adds what the 104-byte record does not carry, from bounded caches keyed by what the
    record does carry: the process (comm, exe, argv by pid + start time), the cgroup
    path (by cgroup id), and the rule and policy of the generation the kernel decided
    with (by generation, from the :class:`PolicyStore`).  Caches are LRU with TTLs and
    retired per generation (:meth:`retire_generations`), and report hits and misses in
    :meth:`cache_statistics`.  Audit batches go through the columnar encoder
    (numpy rows -> JSON lines without a Struct per event)."""

    def __init__(
        self,
        store: PolicyStore,
        *,
        cgroups: CgroupResolver | None = None,
        host: str | None = None,
        processes: ProcessResolver | StaticProcesses | None = None,
        boot_id_hex: str | None = None,
        boot_ns: int | None = None,
        clock: Clock = time.monotonic,
        context_capacity: int = 4096,
        retry_missing_s: float = 5.0,
    ) -> None:
        self.store = store
        self.retry_missing_s = retry_missing_s
        self.cgroups = cgroups or CgroupResolver(clock=clock)
        self.workloads = WorkloadResolver(clock=clock)  # systemd unit, container, pod from the path
        self.host = host or socket.gethostname()
        self.boot8 = (boot_id_hex or boot_id())[:8]
        self.boot_ns = boot_time_ns() if boot_ns is None else boot_ns
        self.processes = processes or ProcessResolver(clock=clock)
        self.generations = GenerationIndex(store, clock=clock)
        self.contexts: BoundedCache[bytes, _Context] = BoundedCache(context_capacity, clock=clock,
                                                                    name="context")
        self._ref_contexts: BoundedCache[tuple, tuple[DecisionEvent, tuple[str, ...]]] = BoundedCache(
            context_capacity, clock=clock, name="context_ref")
        self._sec = -1
        self._sec_str = ""
        self._comms: dict[bytes, str] = {}

    # ---------------------------------------------------------------- helpers
    def wall_time(self, ktime_ns: int) -> str:
        s, ns = divmod(self.boot_ns + ktime_ns, 1_000_000_000)
        if s != self._sec:
            self._sec = s
            self._sec_str = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s))
        return f"{self._sec_str}.{ns // 1000:06d}Z"

    def _context_fields(
        self, abi_version: int, hook: int, decision: int, rule_index: int, generation: int,
        cgroup_id: int, scope_cgroup_id: int, ino: int, dev: int, action: int, uid: int, gid: int,
        mode: int, slot: int, comm: str, rule_flags: int = 0,
    ) -> tuple[dict, tuple[str, ...]]:
        missing: list[str] = []
        info = self.generations.get(generation)
        rule = None
        rec = info.record if info else None
        if rec is None:
            missing.append("generation")
        elif rule_index < len(rec.policy.rules):
            rule = rec.policy.rules[rule_index]
        else:
            missing.append("rule")
        cg_path = self.cgroups.path(cgroup_id)
        if not cg_path:
            missing.append("cgroup_path")
        scope_path = self.cgroups.path(scope_cgroup_id) if scope_cgroup_id else ""
        if scope_cgroup_id and not scope_path:
            missing.append("scope_cgroup_path")
        major, minor = split_kernel_dev(dev)
        fields = dict(
            host=self.host,
            hook=_HOOKS.get(hook) or str(hook),
            action=ACTION_NAMES.get(action, str(action)),
            decision=_DECISIONS.get(decision) or str(decision),
            mode=_MODES.get(mode) or str(mode),
            rule_id=rule.id if rule else "",
            rule_index=rule_index,
            generation=generation,
            policy_name=rec.policy.name if rec else "",
            policy_version=rec.policy.version if rec else 0,
            policy_digest=rec.policy.digest if rec else "",
            rule_source=rule.source if rule else "",
            dev=f"{major}:{minor}",
            ino=ino,
            cgroup_id=cgroup_id,
            cgroup_path=cg_path,
            scope_cgroup_id=scope_cgroup_id,
            scope_cgroup_path=scope_path,
            uid=uid,
            gid=gid,
            comm=comm,
            abi_version=abi_version,
            slot=slot,
            policy_signer=rec.signer if rec else "",
            policy_source=info.source if info else "",
            workload=self.workloads.lookup(cgroup_id, cg_path),
            inherited=bool(rule_flags & abi.RULE_INHERITED),
        )
        return fields, tuple(missing)

    def normalise(self, raw: RawDecision) -> DecisionEvent:
        key = (raw.abi_version, raw.hook, raw.decision, raw.rule_id, raw.generation, raw.cgroup_id,
               raw.scope_cgroup_id, raw.ino, raw.dev, raw.action, raw.uid, raw.gid, raw.mode,
               raw.slot, raw.comm, raw.rule_flags)
        cache = self._ref_contexts
        hit = cache.get_fresh(key)
        if hit is not None:
            template, missing = hit[0]
        else:
            fields, missing = self._context_fields(*key)
            template = DecisionEvent(event_id="", time="", ktime_ns=0, pid=0, tid=0, **fields)
            cache.put(key, (template, missing), ttl=self.retry_missing_s if missing else None)
        proc = self.processes.lookup(raw.tgid)
        # copy the context's template, set the per-event fields (cheaper than 35 kwargs)
        return msgspec.structs.replace(
            template,
            event_id=f"{self.boot8}-{raw.ktime_ns}-{raw.pid}",
            time=self.wall_time(raw.ktime_ns),
            ktime_ns=raw.ktime_ns,
            pid=raw.tgid,
            tid=raw.pid,
            exe=proc.exe,
            cmdline=list(proc.cmdline),
            enrichment_missing=[*missing, *proc.missing],
        )

    # ---------------------------------------------------------------- batch path
    def _render(self, ctx: _Context) -> list[bytes] | None:
        """The context's JSON with the per-event fields cut out: 9 segments around
        event_id, time, ktime_ns, pid, tid, exe, enrichment_missing, cmdline (in order)."""
        tmpl = _enc.encode(DecisionEvent(
            event_id=_S_EID, time=_S_TIME, ktime_ns=_S_KT, pid=_S_PID, tid=_S_TID, exe=_S_EXE,
            cmdline=[_S_CMD], enrichment_missing=[_S_MISS], **ctx.fields,
        ))
        marks = [
            _enc.encode(_S_EID), _enc.encode(_S_TIME), str(_S_KT).encode(), str(_S_PID).encode(),
            str(_S_TID).encode(), _enc.encode(_S_EXE), _enc.encode([_S_MISS]), _enc.encode([_S_CMD]),
        ]
        if any(tmpl.count(m) != 1 for m in marks):
            return None  # a real value collides with a sentinel: use the per-event path
        pos = [tmpl.index(m) for m in marks]
        if pos != sorted(pos):
            return None
        segs, start = [], 0
        for m, p in zip(marks, pos, strict=True):
            segs.append(tmpl[start:p])
            start = p + len(m)
        segs.append(tmpl[start:] + b"\n")
        return segs

    def _pair_parts(self, ctx: _Context, tgid: int, proc: ProcessInfo) -> tuple[bytes, ...]:
        """One (context, process) rendered around the per-event values: (head, %-format
        for ktime/tid/time, middle, tail); an event is head + fmt % (...) + middle +
        tid + tail."""
        s = ctx.segs
        assert s is not None
        pm = proc.missing
        if not ctx.missing and not pm:
            miss = b"[]"
        else:
            miss = ctx.missing_json.get(pm)  # type: ignore[assignment]
            if miss is None:
                miss = ctx.missing_json[pm] = _enc.encode([*ctx.missing, *pm])
        head = s[0] + b'"' + self.boot8.encode() + b"-"
        fmt = (b'%d-%d"' + s[1].replace(b"%", b"%%") + b'"%s.%06dZ"' + s[2].replace(b"%", b"%%")
               + b"%d")
        middle = s[3] + str(tgid).encode() + s[4]
        tail = b"".join((s[5], proc.exe_json, s[6], miss, s[7], proc.cmdline_json, s[8]))
        return head, fmt, middle, tail

    def _context_for(self, key: bytes, rec: np.void) -> _Context:
        comm_raw = bytes(rec["comm"])
        comm = self._comms.get(comm_raw)
        if comm is None:
            comm = comm_str(comm_raw)
            if len(self._comms) < 65536:
                self._comms[comm_raw] = comm
        fields, missing = self._context_fields(
            int(rec["abi_version"]), int(rec["hook"]), int(rec["decision"]), int(rec["rule_id"]),
            int(rec["generation"]), int(rec["cgroup_id"]), int(rec["scope_cgroup_id"]),
            int(rec["ino"]), int(rec["dev"]), int(rec["action"]), int(rec["uid"]), int(rec["gid"]),
            int(rec["mode"]), int(rec["slot"]), comm, int(rec["rule_flags"]),
        )
        ctx = _Context(fields, missing)
        ctx.segs = self._render(ctx)
        return ctx

    def _context(self, key: bytes, rec: np.void) -> _Context:
        cache = self.contexts
        hit = cache.get_fresh(key)
        if hit is not None:
            return hit[0]
        ctx = self._context_for(key, rec)
        # a context with a gap is looked up again soon: the record or cgroup may appear
        cache.put(key, ctx, ttl=self.retry_missing_s if ctx.missing else None)
        return ctx

    def encode_batch(self, arr: np.ndarray) -> bytes:
        """Decoded records (RECORD_DTYPE or EVENT_DTYPE) -> JSON lines, exactly what
        ``encode(normalise(r)) + b"\\n"`` gives for each record, in order."""
        n = len(arr)
        if not n:
            return b""
        keys, ctx_idx = _context_keys(arr)
        ctxs = [self._context(k, arr[i]) for k, i in keys]
        tgid_arr = arr["tgid"]
        tgids, proc_idx = np.unique(tgid_arr, return_inverse=True)
        lookup = self.processes.lookup
        procs = [lookup(t) for t in tgids.tolist()]
        # (context, process) pairs: one format template each
        pair_key = ctx_idx.astype(np.int64) * len(procs) + proc_idx.ravel()
        pairs, pair_idx = np.unique(pair_key, return_inverse=True)
        parts: list[tuple[bytes, ...] | None] = []
        for pk in pairs.tolist():
            ctx = ctxs[pk // len(procs)]
            pi = pk % len(procs)
            parts.append(None if ctx.segs is None else self._pair_parts(ctx, tgids[pi].item(), procs[pi]))
        # time: seconds (few distinct) and microseconds, vectorised
        kt_arr = arr["ktime_ns"]
        wall = kt_arr + np.uint64(self.boot_ns)
        secs, sec_idx = np.unique(wall // np.uint64(1_000_000_000), return_inverse=True)
        sec_strs = [time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(x)).encode() for x in secs.tolist()]
        micros = ((wall % np.uint64(1_000_000_000)) // np.uint64(1000)).tolist()
        # one %-template per pair: an event is one ``bytes %`` of six values
        fmts = [None if pp is None else b"".join((pp[0].replace(b"%", b"%%"), pp[1],
                                                  pp[2].replace(b"%", b"%%"), b"%d",
                                                  pp[3].replace(b"%", b"%%")))
                for pp in parts]
        out: list[bytes] = []
        ap = out.append
        for kt, tid, si, us, pj in zip(kt_arr.tolist(), arr["pid"].tolist(), sec_idx.ravel().tolist(),
                                       micros, pair_idx.ravel().tolist(), strict=True):
            f = fmts[pj]
            if f is None:
                pk = int(pairs[pj])
                ctx, pi = ctxs[pk // len(procs)], pk % len(procs)
                ap(_enc.encode(self._event_from(ctx, kt, tid, tgids[pi].item(), procs[pi])) + b"\n")
            else:
                ap(f % (kt, tid, sec_strs[si], us, kt, tid))
        return b"".join(out)

    def _event_from(self, ctx: _Context, kt: int, tid: int, tgid: int, proc: ProcessInfo) -> DecisionEvent:
        return DecisionEvent(
            event_id=f"{self.boot8}-{kt}-{tid}", time=self.wall_time(kt), ktime_ns=kt, pid=tgid,
            tid=tid, exe=proc.exe, cmdline=list(proc.cmdline),
            enrichment_missing=[*ctx.missing, *proc.missing], **ctx.fields,
        )

    def retire_generations(self, keep: Collection[int]) -> int:
        """Drop what is cached for generations other than ``keep`` (the active one and the
        one it replaced, whose events may still be in the rings): contexts are keyed by
        generation, so after every policy swap the old generation's contexts and its whole
        rule table would otherwise sit in the LRUs until evicted at capacity.  With swaps
        every few seconds (the soak) that filled 4,096 contexts and 64 rule tables, a slow
        RSS climb (docs/PERFORMANCE.md, "Memory over time").  A late event of a retired
        generation is still normalised exactly: it is a cache miss, read from the store.
        Returns the number of entries dropped."""
        keep = frozenset(keep)
        return (self.contexts.drop_where(lambda k: _ctx_generation(k) not in keep)
                + self._ref_contexts.drop_where(lambda k: k[4] not in keep)
                + self.generations.cache.drop_where(lambda g: g not in keep))

    def cache_statistics(self) -> list[CacheStatistics]:
        caches: list[BoundedCache] = [self.contexts, self._ref_contexts, self.generations.cache,
                                      self.cgroups.cache, self.workloads.cache]
        if isinstance(self.processes, ProcessResolver):
            caches.append(self.processes.cache)
        return [c.statistics() for c in caches]


_HOOKS = {int(k): v for k, v in abi.HOOK_NAMES.items()}
_DECISIONS = {int(k): v for k, v in DECISION_NAMES.items()}
_MODES = {int(k): v for k, v in MODE_NAMES.items()}


# event-relative byte ranges that make up a record's context: all but ktime, pid, tgid
_OFF = abi.EVENT.offsets()
_CTX_RANGES = ((0, _OFF["ktime_ns"]), (_OFF["ktime_ns"] + 8, _OFF["pid"]), (_OFF["tgid"] + 4, 96))
assert _OFF["tgid"] == _OFF["pid"] + 4
_CTX_SIZE = sum(b - a for a, b in _CTX_RANGES)  # 80
assert _CTX_RANGES[0][1] >= _OFF["generation"] + 8  # the generation is in the first range


def _ctx_generation(key: bytes) -> int:
    """The generation a context key (``_CTX_RANGES`` bytes of a record) belongs to."""
    return int.from_bytes(key[_OFF["generation"] : _OFF["generation"] + 8], "little")

_MIX = np.array([0x9E3779B97F4A7C15 * (2 * i + 1) % (1 << 64) for i in range(_CTX_SIZE // 8)],
                dtype=np.uint64)


def _context_keys(arr: np.ndarray) -> tuple[list[tuple[bytes, int]], np.ndarray]:
    """Group records by context: ([(context bytes, index of a first record)], inverse)."""
    stride = arr.dtype.itemsize
    h = stride - 96
    raw = np.frombuffer(arr.data if arr.flags.c_contiguous else arr.tobytes(), dtype=np.uint8)
    raw = raw.reshape(len(arr), stride)
    packed = np.empty((len(arr), _CTX_SIZE), dtype=np.uint8)
    o = 0
    for a, b in _CTX_RANGES:
        packed[:, o : o + b - a] = raw[:, h + a : h + b]
        o += b - a
    words = packed.view(np.uint64)
    with np.errstate(over="ignore"):
        hashes = (words * _MIX).sum(axis=1, dtype=np.uint64)
    uniq, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    # a hash collision would merge two contexts: verify, fall back to exact grouping
    if not np.array_equal(packed, packed[first[inverse]]):
        v = np.ascontiguousarray(packed).view(f"V{_CTX_SIZE}").ravel()
        _, first, inverse = np.unique(v, return_index=True, return_inverse=True)
    return [(packed[i].tobytes(), int(i)) for i in first], inverse.ravel()
