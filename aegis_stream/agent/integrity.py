"""Is the kernel still running what the lifecycle put there?  The per-tick tamper check.

Anyone with ``CAP_BPF`` can write the pinned maps (``bpftool map update/delete``): remove a
rule, flip a slot to audit, point the control word at the other slot.  aegis cannot
prevent that (docs/BYPASS_CATALOG.md), but it must never be silent about it.  On every
tick the agent calls :meth:`IntegrityChecker.conditions`, which re-reads the control word,
the active slot's config and its rule and scope entries, and compares them with what the
signed generation record says the lifecycle wrote:

* **content**: the active slot's rule and scope entries must be exactly the entries
  :func:`aegis_stream.kernel.slots.stage` writes for the record's compiled policy (the
  record is what was verified and compiled at apply).  The expected entries are built
  from the record once per generation as sorted numpy records (:class:`SlotTable`); a tick
  reads each map in a few ``BPF_MAP_LOOKUP_BATCH`` calls (:func:`map_columns`), keeps the
  slot's rows, sorts them by key and compares the two tables column by column: no per-entry
  Python, no hashing.  ``python -m bench.integrity_bench``, 10,000 rules in each slot, on
  a 2-core host at load average 9-10: 17-19 ms a tick on the fake kernel's maps and 22-32 ms
  on real BPF hash maps of the product's size, where a sorted sha256 of the slot
  (``slots.slot_digest``, a ``get_next_key`` and a lookup syscall per entry on real maps)
  takes 158-292 ms and 461-617 ms.  Only a mismatch builds the
  full diff, to name the rules;
* **slot config**: its generation, rule and scope counts and host-scope flag;
* **mode**: the mode the last activation record in the provenance log gave this
  generation (audit after a ``break-glass`` record);
* **which generation**: the generation the last activation record (``apply`` /
  ``rollback`` / ``reconcile``) in the provenance log names;
* **cached scope answers** (the 5.10 build's ``aegis_cg_scopes``): each answer of the
  active generation against the cgroup tree (agent/scope_answers.py).

The provenance log is read only when the kernel's (generation, mode, valid) differs from
the last one verified, so a quiet tick reads no file.  A mismatch while the lifecycle lock
is held (an apply, rollback or break-glass between its kernel write and its record) is
given ``grace_s`` to settle; after that it is reported whoever holds the lock.

Entries the kernel adds by itself are not tampering: on a rename onto a path rule's path
the ``inode_rename`` program (bpf/continuity.bpf.h) gives the renamed inode the rule, flagged
``RULE_INHERITED``.  Such an entry is tolerated when its rule_id is a path rule of the
generation and its actions are that rule's (counted in :attr:`IntegrityReport.inherited`;
:attr:`IntegrityChecker.on_inherited` asks the path watcher to re-resolve, so the next
generation names the new inode itself); an inherited entry for an inode rule, an unknown
rule or with other actions is reported like any other write.

Findings are :class:`~aegis_stream.agent.health.Reason` s with the code
``policy_tampered`` (degraded); break-glass in effect is reported too, as ``break_glass``
(degraded: nothing, or nothing more, is denied, by the operator's recorded choice).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from aegis_stream.agent import reasons, scope_answers
from aegis_stream.agent.health import Reason, ReasonCode
from aegis_stream.errors import AegisError, KernelError, StateError
from aegis_stream.kernel import abi, libbpf, slots
from aegis_stream.kernel.maps import FakeMap, FdMap, MapHandle, PolicyMaps
from aegis_stream.policy.compiler import CompiledPolicy
from aegis_stream.policy.provenance import LOG_NAME
from aegis_stream.policy.store import GenerationRecord, PolicyStore, state_dir

GRACE_S = 5.0  # a lifecycle operation holding the lock may be mid-way for this long
TAIL_BYTES = 256 << 10  # provenance tail read when the kernel state changed
ACTIVATIONS = ("apply", "rollback", "restage")
LOCK_NAME = "lifecycle.lock"
CODES = (ReasonCode.POLICY_TAMPERED, ReasonCode.BREAK_GLASS)

_RULE_SLOT = abi.INODE_KEY.offsets()["slot"]
_SCOPE_SLOT = abi.SCOPE_KEY.offsets()["slot"]


BATCH = 4096  # entries per BPF_MAP_LOOKUP_BATCH call
_NO_BATCH = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, 524)  # 524: ENOTSUPP (kernel)
_batch_fn: Any = None


def _lookup_batch() -> Any:
    global _batch_fn
    if _batch_fn is None:
        fn = libbpf.lib().bpf_map_lookup_batch
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
        _batch_fn = fn
    return _batch_fn


def map_items(handle: MapHandle) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a map: batched on a real BPF map (one entry at a time on a
    kernel without batch lookups, and on the fake kernel's maps)."""
    if isinstance(handle, FdMap) and handle.fd >= 0:
        try:
            kb, vb = _batch_columns(handle.fd, handle.key_size, handle.value_size)
        except KernelError as exc:
            if exc.errno not in _NO_BATCH:
                raise
        else:
            ks, vs = handle.key_size, handle.value_size
            return [(kb[i * ks:(i + 1) * ks], vb[i * vs:(i + 1) * vs])
                    for i in range(len(kb) // ks)]
    out = []
    for k in handle.keys():
        v = handle.lookup(k)
        if v is not None:  # deleted between the two calls
            out.append((k, v))
    return out


_NP = {"Q": "<u8", "q": "<i8", "I": "<u4", "i": "<i4", "H": "<u2", "h": "<i2", "B": "u1"}


def np_dtype(layout: abi.Layout) -> np.dtype:
    """The packed numpy record of an ABI layout (the same bytes as ``layout.pack``)."""
    return np.dtype([(n, _NP[f]) for n, f in layout.fields])


def _batch_columns(fd: int, ks: int, vs: int) -> tuple[bytes, bytes]:
    """All keys and all values of a BPF hash map, concatenated in the same order,
    BATCH entries per BPF_MAP_LOOKUP_BATCH call."""
    fn = _lookup_batch()
    keys = ctypes.create_string_buffer(ks * BATCH)
    vals = ctypes.create_string_buffer(vs * BATCH)
    token = max(ks, 8)
    in_batch: Any = None
    kout: list[bytes] = []
    vout: list[bytes] = []
    while True:
        out_batch = ctypes.create_string_buffer(token)
        count = ctypes.c_uint32(BATCH)
        ret = fn(fd, in_batch, out_batch, keys, vals, ctypes.byref(count), None)
        err = libbpf.errno_of(ret) if ret < 0 else 0
        kout.append(keys.raw[:count.value * ks])
        vout.append(vals.raw[:count.value * vs])
        if err == errno.ENOENT:
            return b"".join(kout), b"".join(vout)
        if err:
            raise KernelError("bpf_map_lookup_batch", err=err)
        in_batch = out_batch


def map_columns(handle: MapHandle) -> tuple[bytes, bytes]:
    """Every key and every value of a map, each concatenated, in the same order: batched
    on a real BPF map, the dict itself on the fake kernel's, one entry at a time else."""
    if isinstance(handle, FdMap) and handle.fd >= 0:
        try:
            return _batch_columns(handle.fd, handle.key_size, handle.value_size)
        except KernelError as exc:
            if exc.errno not in _NO_BATCH:
                raise
    if isinstance(handle, FakeMap):
        return b"".join(handle.data.keys()), b"".join(handle.data.values())
    items = map_items(handle)
    return b"".join(k for k, _ in items), b"".join(v for _, v in items)


@dataclass(frozen=True)
class SlotTable:
    """One slot's entries of one map as sorted numpy records: what a tick compares."""
    keys: np.ndarray
    values: np.ndarray

    @classmethod
    def of(cls, kbytes: bytes, vbytes: bytes, kd: np.dtype, vd: np.dtype,
           slot: int) -> SlotTable:
        k = np.frombuffer(kbytes, dtype=kd)
        v = np.frombuffer(vbytes, dtype=vd)
        mask = k["slot"] == slot
        k, v = k[mask], v[mask]
        # keys are unique in a hash map: sorting by them orders both columns; lexsort
        # (one pass per field, last = primary) is ~10x faster than a structured argsort
        order = np.lexsort([k[n] for n in reversed(kd.names or ())])
        return cls(k[order], v[order])

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, SlotTable) and len(self.keys) == len(other.keys)
                and bool((self.keys == other.keys).all())
                and bool((self.values == other.values).all()))

    __hash__ = None  # type: ignore[assignment]


_RULE_DT = (np_dtype(abi.INODE_KEY), np_dtype(abi.RULE))
_SCOPE_DT = (np_dtype(abi.SCOPE_KEY), np_dtype(abi.SCOPE))


def slot_table(handle: MapHandle, dts: tuple[np.dtype, np.dtype], slot: int) -> SlotTable:
    """The kernel's entries of ``slot`` in one map, as a :class:`SlotTable`."""
    kb, vb = map_columns(handle)
    return SlotTable.of(kb, vb, dts[0], dts[1], slot)


def expected_table(entries: Mapping[bytes, bytes], dts: tuple[np.dtype, np.dtype],
                   slot: int) -> SlotTable:
    """The :class:`SlotTable` of entries ``slots.stage`` writes."""
    return SlotTable.of(b"".join(entries.keys()), b"".join(entries.values()),
                        dts[0], dts[1], slot)


def slot_entries(maps: PolicyMaps, slot: int) -> tuple[frozenset[bytes], frozenset[bytes]]:
    """The rule and scope entries (key + value bytes) the kernel holds for ``slot``."""
    tag = slot.to_bytes(4, "little")
    r = frozenset(k + v for k, v in map_items(maps.rules)
                  if k[_RULE_SLOT:_RULE_SLOT + 4] == tag)
    s = frozenset(k + v for k, v in map_items(maps.scopes)
                  if k[_SCOPE_SLOT:_SCOPE_SLOT + 4] == tag)
    return r, s


def expected_entries(cp: CompiledPolicy, slot: int) -> tuple[frozenset[bytes], frozenset[bytes]]:
    """The entries :func:`aegis_stream.kernel.slots.stage` writes for ``cp`` in ``slot``."""
    return (frozenset(k + v for k, v in slots._rule_entries(cp, slot).items()),
            frozenset(k + v for k, v in slots._scope_entries(cp, slot).items()))


def _describe_rules(cp: CompiledPolicy, slot: int, want: frozenset[bytes],
                    got: frozenset[bytes]) -> str:
    keylen = abi.INODE_KEY.size
    missing_keys = {e[:keylen] for e in want - got}
    extra_keys = {e[:keylen] for e in got - want}
    changed = missing_keys & extra_keys
    gone = missing_keys - changed
    added = extra_keys - changed
    parts = []
    by_key = {abi.INODE_KEY.pack(r.ino, r.dev, slot): r.id for r in cp.rules}
    if gone:
        parts.append("missing " + ", ".join(sorted(by_key.get(k, "?") for k in gone)[:5]))
    if changed:
        parts.append("changed " + ", ".join(sorted(by_key.get(k, "?") for k in changed)[:5]))
    if added:
        inodes = []
        for k in sorted(added)[:5]:
            ino, dev, _ = abi.INODE_KEY.unpack(k)
            inodes.append(f"{dev >> 20}:{dev & 0xFFFFF}:{ino}")
        parts.append(f"{len(added)} not in the policy (" + ", ".join(inodes) + ")")
    return "; ".join(parts)


@dataclass(frozen=True)
class Expectation:
    """What the provenance log says the kernel should run: the generation of the last
    activation, its mode, and break-glass (``audit`` / ``deactivate``) recorded since."""
    generation: int
    mode: str  # enforce | audit | "" (unknown: the record's)
    break_glass: str = ""
    found: bool = True  # False: no activation record at all (nothing to compare with)


@dataclass
class IntegrityReport:
    """One check: what the kernel runs and what is wrong with it (empty: nothing)."""
    generation: int
    slot: int
    mode: str
    findings: list[Reason] = field(default_factory=list)
    deferred: bool = False  # a mismatch seen while the lifecycle lock is held, within grace
    inherited: int = 0  # entries the kernel's rename hook added (tolerated, see the module)
    seconds: float = 0.0  # how long the check took

    @property
    def tampered(self) -> bool:
        return any(f.code is ReasonCode.POLICY_TAMPERED for f in self.findings)


class IntegrityChecker:
    """Compares the kernel's active policy with the signed generation record and the
    provenance log (see the module docstring); :meth:`conditions` is the ticker's hook."""

    def __init__(self, maps: PolicyMaps, root: Path | str | None = None, *,
                 clock: Callable[[], float] = time.monotonic, grace_s: float = GRACE_S,
                 cgroup_root: str | os.PathLike[str] = scope_answers.CGROUP2_ROOT) -> None:
        self.maps = maps
        #: the cgroup tree the 5.10 build's cached scope answers are checked against
        self.cgroups = scope_answers.CgroupTree(cgroup_root, clock=clock)
        self._answers = scope_answers.AnswerAudit(self.cgroups)
        self.root = Path(root) if root else state_dir()
        self.store = PolicyStore(self.root)
        self.clock = clock
        self.grace_s = grace_s
        self._records: dict[int, GenerationRecord] = {}
        self._expected: dict[tuple[int, int], tuple[SlotTable, SlotTable]] = {}
        self._verified: tuple[int, int, int, bool] | None = None  # (gen, slot, mode, valid)
        self._verified_bg = ""
        self._expectation: Expectation | None = None
        self._mismatch_since: float | None = None
        self.checks = 0
        self.last: IntegrityReport | None = None
        #: called when the set of tolerated kernel-inherited entries changes (non-empty):
        #: the agent's path watcher re-resolves the path rules
        self.on_inherited: Callable[[], None] | None = None
        self._inherited_seen = b""

    # ------------------------------------------------------------------ sources
    def _record(self, gen: int) -> GenerationRecord | None:
        rec = self._records.get(gen)
        if rec is None:
            try:
                rec = self.store.load(gen)
            except (StateError, OSError, msgspec.ValidationError):
                return None  # not cached: the record may yet be written (or restored)
            if len(self._records) >= 8:  # the active and the kept generation, and a few more
                self._records.pop(next(iter(self._records)))
            self._records[gen] = rec
        return rec

    def _entries(self, rec: GenerationRecord, slot: int) -> tuple[SlotTable, SlotTable]:
        key = (rec.generation, slot)
        if key not in self._expected:
            if len(self._expected) >= 4:
                self._expected.pop(next(iter(self._expected)))
            self._expected[key] = (
                expected_table(slots._rule_entries(rec.policy, slot), _RULE_DT, slot),
                expected_table(slots._scope_entries(rec.policy, slot), _SCOPE_DT, slot))
        return self._expected[key]

    def break_glass(self) -> dict | None:
        return reasons.break_glass_marker(self.root)

    def expectation(self) -> Expectation:
        """The last activation in the provenance log (tail first, the whole log if the
        tail has none) and any break-glass recorded after it."""
        path = self.root / LOG_NAME
        try:
            with open(path, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                start = max(0, size - TAIL_BYTES)
                fh.seek(start)
                data = fh.read()
                exp = _expectation_of(data.split(b"\n")[1 if start else 0:])
                if exp is None and start:
                    fh.seek(0)
                    exp = _expectation_of(fh.read().split(b"\n"))
        except FileNotFoundError:
            exp = None
        return exp or Expectation(0, "", found=False)

    def _lock_held(self) -> bool:
        try:
            fd = os.open(self.root / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops the shared lock we may have taken
        return False

    # ------------------------------------------------------------------ the check
    def check(self) -> IntegrityReport:
        t0 = time.perf_counter()
        self.checks += 1
        rep = self._check()
        rep.seconds = time.perf_counter() - t0
        self.last = rep
        return rep

    def _check(self) -> IntegrityReport:
        try:
            st = slots.read_state(self.maps)
        except (AegisError, OSError) as exc:
            return IntegrityReport(0, 0, abi.MODE_NONE, [Reason(
                ReasonCode.POLICY_TAMPERED, f"policy tampered: kernel policy state unreadable: {exc}")])
        a, slot = st.active, st.active_slot
        mode_label = abi.Mode(a.mode).label if a.valid and a.mode in (0, 1) else (
            f"mode {a.mode}" if a.valid else abi.MODE_NONE)
        rep = IntegrityReport(a.generation if a.valid else 0, slot, mode_label)
        bg = self.break_glass()
        bg_method = str(bg.get("method", "audit")) if bg is not None else ""
        if bg is not None:
            rep.findings.append(reasons.break_glass_reason(bg))
        key = (a.generation, slot, a.mode, a.valid)
        if key != self._verified or bg_method != self._verified_bg:
            self._expectation = self.expectation()
        exp = self._expectation
        assert exp is not None
        problems = self._compare(st, exp, bg_method, rep)
        if not problems:
            self._verified, self._verified_bg = key, bg_method
            self._mismatch_since = None
            return rep
        self._verified = None  # re-read the log next tick: an operation may just be logging
        now = self.clock()
        if self._mismatch_since is None:
            self._mismatch_since = now
        if now - self._mismatch_since < self.grace_s and (
                self._lock_held() or (self.root / "lifecycle.pending.json").exists()):
            rep.deferred = True
            return rep
        rep.findings.extend(Reason(ReasonCode.POLICY_TAMPERED, f"policy tampered: {p}")
                            for p in problems)
        return rep

    def _compare(self, st: slots.KernelPolicyState, exp: Expectation, bg_method: str,
                 rep: IntegrityReport | None = None) -> list[str]:
        a, slot = st.active, st.active_slot
        out: list[str] = []
        if not a.valid:
            # a slot config of all zeros is freshly loaded maps (a reboot, `aegis unload`
            # then `aegis run`), not an invalidation: no_policy already reports it
            if a.generation and exp.found and exp.generation \
                    and exp.break_glass != "deactivate" and bg_method != "deactivate":
                out.append(f"slot {slot} was invalidated outside aegis (generation "
                           f"{exp.generation} is the last one activated; every hook allows)")
            return out
        gen = a.generation
        if exp.found and gen != exp.generation:
            out.append(f"the control word selects slot {slot} (generation {gen}), but the last "
                       f"activation recorded is generation {exp.generation}")
        rec = self._record(gen)
        if rec is None:
            out.append(f"generation {gen} in slot {slot} has no readable record in "
                       f"{self.store.gen_dir} (not written by aegis)")
            return out
        cp = rec.policy
        want_mode = exp.mode if (exp.found and exp.generation == gen and exp.mode) else (
            rec.mode or cp.mode)
        if bg_method or (exp.found and exp.generation == gen and exp.break_glass):
            want_mode = abi.Mode.AUDIT.label
        got_mode = abi.Mode(a.mode).label if a.mode in (0, 1) else f"mode {a.mode}"
        if got_mode != want_mode:
            out.append(f"slot {slot} (generation {gen}) is in {got_mode} mode, but it was "
                       f"activated in {want_mode} mode (changed outside aegis)")
        host = bool(a.flags & abi.SLOT_SCOPE_HOST)
        if (a.rule_count, a.scope_count, host) != (len(cp.rules), len(cp.scopes), cp.host_scope):
            out.append(f"slot {slot} config says {a.rule_count} rules, {a.scope_count} scopes"
                       f"{', host-wide' if host else ''}; generation {gen} has {len(cp.rules)}, "
                       f"{len(cp.scopes)}{', host-wide' if cp.host_scope else ''}")
        want_r, want_s = self._entries(rec, slot)
        got_rules = slot_table(self.maps.rules, _RULE_DT, slot)
        rules_ok = got_rules == want_r
        if rules_ok:
            self._inherited_seen = b""
        else:
            got_rules, inherited = _without_inherited(got_rules, cp)
            if len(inherited):
                if rep is not None:
                    rep.inherited = len(inherited)
                seen = inherited.tobytes()
                if seen != self._inherited_seen and self.on_inherited is not None:
                    self.on_inherited()
                self._inherited_seen = seen
                rules_ok = got_rules == want_r
            else:
                self._inherited_seen = b""
        scopes_ok = slot_table(self.maps.scopes, _SCOPE_DT, slot) == want_s
        out += self._scope_answer_problems(cp, gen)
        if rules_ok and scopes_ok:
            return out
        exp_r, exp_s = expected_entries(cp, slot)  # a mismatch: the full diff, to name it
        got_r, got_s = slot_entries(self.maps, slot)
        got_r = frozenset(e for e in got_r if not _legit_inherited(cp, e[abi.INODE_KEY.size:]))
        if not rules_ok:
            out.append(f"rule map, slot {slot} (generation {gen}): "
                       + (_describe_rules(cp, slot, exp_r, got_r) or "changed while read"))
        if not scopes_ok:
            out.append(f"scope map, slot {slot} (generation {gen}): {len(exp_s - got_s)} "
                       f"scope entries missing or changed, {len(got_s - exp_s)} not in the policy")
        return out

    def _scope_answer_problems(self, cp: CompiledPolicy, gen: int) -> list[str]:
        """The 5.10 build's cached scope answers of the active generation that the cgroup
        tree contradicts (agent/scope_answers.py); a host-wide slot never caches."""
        m = self.maps.cg_scopes
        if m is None or cp.host_scope:
            return []
        kbytes, vbytes = map_columns(m)
        if not kbytes:
            return []
        bad = self._answers.check_columns(kbytes, vbytes, gen, {s.cgroup_id for s in cp.scopes})
        if not bad:
            return []

        def said(v: int) -> str:
            return "out of scope" if v < 0 else f"in scope of cgroup {v}"

        shown = "; ".join(f"cgroup {w.cgroup_id} cached {said(w.cached)}, the policy gives "
                          f"{said(w.expected)}" for w in bad[:3])
        return [f"scope cache, generation {gen}: {len(bad)} cached answer(s) differ from the "
                f"policy ({shown}{'; ...' if len(bad) > 3 else ''})"]

    def conditions(self) -> Mapping[ReasonCode, str | None]:
        """The ticker's hook: each code this check owns, with its text (set) or None
        (clear).  Several findings of one code are joined into one condition."""
        rep = self.check()
        out: dict[ReasonCode, str | None] = {c: None for c in CODES}
        for c in CODES:
            texts = [f.text for f in rep.findings if f.code is c]
            if texts:
                prefix = "policy tampered: "
                out[c] = texts[0] + "".join(
                    "; " + (t[len(prefix):] if t.startswith(prefix) else t) for t in texts[1:])
        return out


def _path_actions(cp: CompiledPolicy) -> np.ndarray:
    """rule_id -> the actions of a path rule (-1: not a path rule)."""
    out = np.full(len(cp.rules), -1, dtype=np.int64)
    for r in cp.rules:
        if not r.source.startswith("inode:") and 0 <= r.index < len(out):
            out[r.index] = r.actions
    return out


def _without_inherited(t: SlotTable, cp: CompiledPolicy) -> tuple[SlotTable, np.ndarray]:
    """``t`` less the entries the kernel's rename hook added legitimately (flag
    RULE_INHERITED, a path rule's rule_id and its actions), and the keys of those."""
    v = t.values
    inh = (v["flags"] & abi.RULE_INHERITED) != 0
    if not inh.any() or not cp.rules:
        return t, t.keys[:0]
    rid = v["rule_id"].astype(np.int64)
    known = rid < len(cp.rules)
    acts = _path_actions(cp)[np.where(known, rid, 0)]
    legit = inh & known & (acts >= 0) & (acts == v["actions"].astype(np.int64))
    return SlotTable(t.keys[~legit], v[~legit]), t.keys[legit]


def _legit_inherited(cp: CompiledPolicy, value: bytes) -> bool:
    rule_id, actions, flags, _gen = abi.RULE.unpack(value)
    if not flags & abi.RULE_INHERITED or rule_id >= len(cp.rules):
        return False
    r = cp.rules[rule_id]
    return r.index == rule_id and not r.source.startswith("inode:") and r.actions == actions


def _expectation_of(lines: list[bytes]) -> Expectation | None:
    bg = ""
    for raw in reversed(lines):
        if not raw.strip():
            continue
        with contextlib.suppress(msgspec.DecodeError):
            rec = msgspec.json.decode(raw)
            if not isinstance(rec, dict):
                continue
            action = rec.get("action")
            if action == "break-glass" and not bg:
                bg = str(rec.get("method", "audit"))
                continue
            gen = rec.get("generation")
            if not isinstance(gen, int):
                continue
            if action in ACTIVATIONS and rec.get("result") == "ok":
                mode = "" if rec.get("method") == "deactivate" else str(rec.get("mode", ""))
                return Expectation(gen, mode, bg)
            if action == "reconcile" and rec.get("effective") in ("old", "new"):
                return Expectation(gen, "", bg)
    return None
