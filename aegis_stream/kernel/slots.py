"""Gapless generation swap over the two kernel slots.

A new generation is written into the inactive slot (rules, scopes, slot config),
verified by reading it back, and only then activated by a single write of the
control word.  A decision reads the control word once and then only that slot, so
no decision ever sees a mix of generations, and there is no instant without a policy.

Staging overwrites the inactive slot, which retires the generation it held; the exact
per-rule counters of retired generations (``aegis_rule_counters``, keyed by generation)
are then pruned (folded into per-hook retired totals, see
:func:`aegis_stream.counters.prune_rule_counters`), so the map holds at most the active
and the kept (rollback) generation's keys however many swaps there are.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from dataclasses import dataclass, field

from aegis_stream.errors import KernelError, StateError
from aegis_stream.kernel import abi, counters
from aegis_stream.kernel.maps import PolicyMaps
from aegis_stream.policy.compiler import CompiledPolicy, CompiledRule

log = logging.getLogger(__name__)

CONTROL_KEY = struct.pack("<I", 0)
# in-flight decisions that read the old control word finish within microseconds
# (LSM programs run under RCU); we never rewrite a slot sooner than this after it
# was deactivated.
SLOT_REUSE_GRACE_S = 0.05


def slot_key(slot: int) -> bytes:
    return struct.pack("<I", 1 + slot)


@dataclass(frozen=True)
class SlotConfig:
    """One slot's config entry: the generation, mode and rule/scope counts it holds; a decision uses the
    slot only when :attr:`valid` (the VALID flag is written last, after the slot's contents)."""
    generation: int
    mode: int
    flags: int
    rule_count: int
    scope_count: int

    @property
    def valid(self) -> bool:
        return bool(self.flags & abi.SLOT_VALID)


@dataclass(frozen=True)
class KernelPolicyState:
    """Both slots and the control word's active slot, read back from the kernel: the truth reconcile and
    ``aegis status`` start from, not what the state dir says."""
    active_slot: int
    slots: tuple[SlotConfig, SlotConfig]

    @property
    def active(self) -> SlotConfig:
        return self.slots[self.active_slot]

    @property
    def inactive_slot(self) -> int:
        return 1 - self.active_slot


def read_state(maps: PolicyMaps) -> KernelPolicyState:
    raw = maps.config.lookup(CONTROL_KEY)
    if raw is None:
        raise StateError("config map has no control entry")
    active = abi.CONTROL.unpack(raw[: abi.CONTROL.size])[0] & 1
    slots = []
    for s in range(abi.SLOTS):
        v = maps.config.lookup(slot_key(s))
        if v is None:
            raise StateError(f"config map has no entry for slot {s}")
        slots.append(SlotConfig(*abi.SLOT_CONFIG.unpack(v)[:5]))
    return KernelPolicyState(active, (slots[0], slots[1]))


def rule_value(r: CompiledRule) -> bytes:
    """A rule's kernel entry: RULE_PATH for a rule compiled from a path, so that a file renamed
    over the path inherits it before the rename returns (bpf/continuity.bpf.h); a rule given
    by inode names that inode only.  i_generation as the compiler recorded it (0: unknown)."""
    flags = 0 if r.source.startswith("inode:") else abi.RULE_PATH
    if r.check_gen:  # a reused (dev, ino) with another i_generation is a miss (GAP-INO-REUSE)
        flags |= abi.RULE_CHECK_GEN
    return abi.RULE.pack(r.index, r.actions, flags, r.i_generation or 0)


def _rule_entries(cp: CompiledPolicy, slot: int) -> dict[bytes, bytes]:
    out = {
        abi.INODE_KEY.pack(r.ino, r.dev, slot): rule_value(r)
        for r in cp.rules
    }
    # btrfs: also the superblock key, for a kernel that could not key by subvolume
    for r in cp.rules:
        if r.sb_dev and r.sb_dev != r.dev:
            out.setdefault(abi.INODE_KEY.pack(r.ino, r.sb_dev, slot), rule_value(r))
    # a path rule's earlier inodes (policy/continuity.py), under the rule's index; never a
    # key a rule holds (the restage drops such a carried inode)
    # (no RULE_PATH: a carried inode is no longer at the path, a rename onto it inherits nothing)
    for c in cp.carried:
        flags = abi.RULE_CHECK_GEN if c.check_gen and c.i_generation is not None else 0
        out.setdefault(abi.INODE_KEY.pack(c.ino, c.dev, slot),
                       abi.RULE.pack(c.index, c.actions, flags, c.i_generation or 0))
    return out


def _scope_entries(cp: CompiledPolicy, slot: int) -> dict[bytes, bytes]:
    return {
        abi.SCOPE_KEY.pack(s.cgroup_id, slot, 0): abi.SCOPE.pack(s.index, 0) for s in cp.scopes
    }


def _slot_of_rule_key(key: bytes) -> int:
    return abi.INODE_KEY.unpack(key)[2]


def _slot_of_scope_key(key: bytes) -> int:
    return abi.SCOPE_KEY.unpack(key)[1]


def _inherited(value: bytes) -> bool:
    """An entry the kernel added when a file was renamed over a path rule's path (not the
    generation's own: bpf/continuity.bpf.h)."""
    return len(value) >= abi.RULE.size and bool(abi.RULE.unpack(value[: abi.RULE.size])[2]
                                                 & abi.RULE_INHERITED)


def slot_digest(maps: PolicyMaps, slot: int) -> str:
    """Digest of what the agent wrote for one slot, read back from the maps.  Entries the
    kernel inherited on a rename onto a path rule's path are left out: they may appear in
    either slot at any time (also while this one is staged) and are not the generation's."""
    h = hashlib.sha256()
    rules = sorted(
        kv for kv in ((k, maps.rules.lookup(k) or b"") for k in maps.rules.keys()
                      if _slot_of_rule_key(k) == slot)
        if not _inherited(kv[1])
    )
    scopes = sorted(
        (k, maps.scopes.lookup(k) or b"")
        for k in maps.scopes.keys()
        if _slot_of_scope_key(k) == slot
    )
    for k, v in rules + scopes:
        h.update(k + v)
    return h.hexdigest()


def expected_digest(cp: CompiledPolicy, slot: int) -> str:
    h = hashlib.sha256()
    for k, v in sorted(_rule_entries(cp, slot).items()) + sorted(_scope_entries(cp, slot).items()):
        h.update(k + v)
    return h.hexdigest()


def clear_slot(maps: PolicyMaps, slot: int) -> None:
    maps.config.update(slot_key(slot), abi.SLOT_CONFIG.pack(0, 0, 0, 0, 0))
    for k in maps.rules.keys():
        if _slot_of_rule_key(k) == slot:
            maps.rules.delete(k)
    for k in maps.scopes.keys():
        if _slot_of_scope_key(k) == slot:
            maps.scopes.delete(k)


@dataclass(frozen=True)
class StagedSlot:
    """A generation written into the inactive slot and verified by its read-back ``digest``, not yet
    active: :func:`activate` makes it so."""
    slot: int
    generation: int
    digest: str
    #: what pruning the retired generations' per-rule counters did (None: no counters map)
    pruned: counters.PruneResult | None = field(default=None, compare=False)


def held_generations(maps: PolicyMaps) -> set[int] | None:
    """The generations the two slots hold (valid or not: break-glass/unload keep theirs),
    or None when the state cannot be read; what the prunes below keep."""
    try:
        return {s.generation for s in read_state(maps).slots}
    except StateError:
        return None


def prune_retired_counters(maps: PolicyMaps, keep: set[int]) -> counters.PruneResult | None:
    """Delete the per-rule counter keys of every generation not in ``keep`` (the
    generations the slots hold: :func:`held_generations`).

    The active generation and the other slot's (the kept, rollback) generation are never
    touched, nor is a slot whose VALID flag was cleared (break-glass/unload keep its
    generation).  A failure is counted and logged, never raised: counters must not stop a
    policy apply, and the next stage retries whatever is left."""
    if maps.rule_counters is None:
        return None
    return counters.prune_rule_counters(maps.rule_counters, keep)


def prune_retired_scope_answers(maps: PolicyMaps, keep: set[int]) -> int:
    """Delete the cached scope answers (``aegis_cg_scopes``) of every generation not in
    ``keep`` (as above); returns how many.  No program asks for a retired generation
    again, so its keys are dead weight that would fill the map (a full map only costs the
    ancestor walk).  An answer a program still inserts for a generation retired under it is
    deleted by the next stage.  A failure is logged, never raised: the cache must not stop
    a policy apply."""
    if maps.cg_scopes is None:
        return 0
    try:
        keys = maps.cg_scopes.keys()
    except KernelError:
        return 0
    deleted = 0
    for key in keys:
        if abi.CG_SCOPE_KEY.unpack(key)[0] in keep:
            continue
        try:
            deleted += bool(maps.cg_scopes.delete(key))
        except KernelError as exc:
            log.warning("scope cache: deleting a retired generation's answer failed: %s", exc)
            break  # the next stage tries again
    return deleted


def stage(maps: PolicyMaps, cp: CompiledPolicy, generation: int, mode: int) -> StagedSlot:
    """Write a generation into the inactive slot and verify it.  Nothing is activated."""
    state = read_state(maps)
    slot = state.inactive_slot
    clear_slot(maps, slot)  # retires the generation the slot held ...
    keep = held_generations(maps)  # one read of the slots for both prunes
    pruned = None
    if keep is not None:
        pruned = prune_retired_counters(maps, keep)  # ... so its per-rule counters go
        prune_retired_scope_answers(maps, keep)  # ... and its cached scope answers
    try:
        for k, v in _rule_entries(cp, slot).items():
            maps.rules.update(k, v)
        for k, v in _scope_entries(cp, slot).items():
            maps.scopes.update(k, v)
    except KernelError as exc:
        clear_slot(maps, slot)
        raise KernelError.wrapping(
            exc, f"staging generation {generation} failed, nothing applied: {exc}") from None
    got = slot_digest(maps, slot)
    want = expected_digest(cp, slot)
    if got != want:
        clear_slot(maps, slot)
        raise StateError(f"slot {slot} read-back digest mismatch; nothing applied")
    flags = abi.SLOT_VALID | (abi.SLOT_SCOPE_HOST if cp.host_scope else 0)
    maps.config.update(
        slot_key(slot),
        abi.SLOT_CONFIG.pack(generation, mode, flags, len(cp.rules), len(cp.scopes)),
    )
    return StagedSlot(slot, generation, got, pruned)


def _control(maps: PolicyMaps) -> tuple[int, int]:
    """(active slot, deny-storm window ns) of the control entry."""
    raw = maps.config.lookup(CONTROL_KEY)
    if raw is None:
        return 0, 0
    active, _pad, window = abi.CONTROL.unpack(raw[: abi.CONTROL.size])
    return active, window


def _write_control(maps: PolicyMaps, slot: int, window_ns: int) -> None:
    maps.config.update(CONTROL_KEY, abi.CONTROL.pack(slot, 0, window_ns).ljust(maps.config.value_size, b"\0"))


def activate(maps: PolicyMaps, slot: int) -> None:
    """The single write that switches every hook to ``slot`` (the storm window is kept)."""
    _write_control(maps, slot, _control(maps)[1])


def storm_window_ns(maps: PolicyMaps) -> int:
    """The deny-storm aggregation window the programs use (bpf/storm.bpf.h); 0 = off."""
    return _control(maps)[1]


def set_storm_window(maps: PolicyMaps, window_ns: int) -> None:
    """Set the deny-storm window (0: off) in the control entry, keeping the active slot.
    The caller holds the lifecycle lock (an activation rewrites the same entry)."""
    if not 0 <= window_ns < 1 << 63:
        raise ValueError(f"storm window {window_ns} ns out of range")
    _write_control(maps, _control(maps)[0] & 1, window_ns)


def set_slot_mode(maps: PolicyMaps, slot: int, mode: int) -> None:
    v = maps.config.lookup(slot_key(slot))
    if v is None:
        raise StateError(f"no config for slot {slot}")
    gen, _, flags, rc, sc = abi.SLOT_CONFIG.unpack(v)
    maps.config.update(slot_key(slot), abi.SLOT_CONFIG.pack(gen, mode, flags, rc, sc))


def swap(maps: PolicyMaps, cp: CompiledPolicy, generation: int, mode: int) -> StagedSlot:
    staged = stage(maps, cp, generation, mode)
    activate(maps, staged.slot)
    return staged


def deactivate_all(maps: PolicyMaps) -> None:
    """Make the active slot invalid: every hook allows (used by unload/break-glass)."""
    state = read_state(maps)
    a = state.active
    maps.config.update(
        slot_key(state.active_slot),
        abi.SLOT_CONFIG.pack(a.generation, a.mode, a.flags & ~abi.SLOT_VALID, a.rule_count, a.scope_count),
    )


def wait_grace(last_switch_monotonic: float) -> None:
    left = SLOT_REUSE_GRACE_S - (time.monotonic() - last_switch_monotonic)
    if left > 0:
        time.sleep(left)
