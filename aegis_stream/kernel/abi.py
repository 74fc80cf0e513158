"""Python mirror of bpf/aegis_abi.h: constants and byte layouts.

Every layout here is compared field by field with the compiled object's BTF by
tests/unit/test_abi_btf.py (as tetragon's alignchecker does), so the two cannot drift.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

ABI_VERSION: Final = 2  # 2: the event's slot is a u16 followed by rule_flags
SLOTS: Final = 2
MAX_RULES: Final = 65536
MAX_SCOPES: Final = 1024
MAX_CGROUP_DEPTH: Final = 16
MAX_RULE_COUNTERS: Final = 16384  # (generation, rule, hook) exact counters
DENY_RING_BYTES: Final = 1 << 20
AUDIT_RING_BYTES: Final = 4 << 20
MAX_STORM_KEYS: Final = 16384  # deny-storm keys (bpf/storm.bpf.h)
MAX_CG_SCOPES: Final = 8192  # (generation, cgroup) scope answers (the no-task-storage build's cache)


class Hook(enum.IntEnum):
    """The LSM hooks the BPF programs attach to (``enum aegis_hook``); the value is the hook field of
    every decision record and the row of the per-hook counters."""
    FILE_OPEN = 0
    BPRM_CHECK = 1
    MMAP_FILE = 2
    FILE_MPROTECT = 3  # mprotect(PROT_EXEC) of a file mapping made without it


HOOK_NAMES: Final = {
    Hook.FILE_OPEN: "file_open",
    Hook.BPRM_CHECK: "bprm_check_security",
    Hook.MMAP_FILE: "mmap_file",
    Hook.FILE_MPROTECT: "file_mprotect",
}
#: the BPF program attached to each hook, as named in aegis.bpf.c
HOOK_PROGRAMS: Final = {
    Hook.FILE_OPEN: "aegis_file_open",
    Hook.BPRM_CHECK: "aegis_bprm_check",
    Hook.MMAP_FILE: "aegis_mmap_file",
    Hook.FILE_MPROTECT: "aegis_file_mprotect",
}

#: programs that are not decision hooks (no ``enum aegis_hook`` row, no per-hook counters):
#: loaded, attached, pinned and reported like the hooks, but enforcement works without them
#: (their absence is a degraded state with its own reason code, never a refusal)
PROGRAM_CONTINUITY: Final = "aegis_inode_rename"  # bpf/continuity.bpf.h: path rules follow renames
AUX_PROGRAMS: Final = {PROGRAM_CONTINUITY: "inode_rename"}  # program -> LSM hook


class Decision(enum.IntEnum):
    """What the kernel decided (``enum aegis_decision``): DENY returned -EPERM (enforce mode), AUDIT
    would have denied but allowed (audit mode)."""
    ALLOW = 0
    DENY = 1
    AUDIT = 2


class Mode(enum.IntEnum):
    """A generation's mode as the kernel stores it; :attr:`label` / :meth:`from_name` are
    the one mapping to the names policies, events and metrics use (``audit``/``enforce``)."""

    AUDIT = 0
    ENFORCE = 1

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_name(cls, name: str) -> Mode:
        """``"enforce"`` -> ENFORCE, ``"audit"`` -> AUDIT; ValueError for anything else."""
        for m in cls:
            if m.label == name:
                return m
        raise ValueError(f"unknown mode {name!r} (audit | enforce)")


#: the mode label where no valid generation is active (every hook allows)
MODE_NONE: Final = "none"


ACTION_OPEN: Final = 1 << 0
ACTION_EXEC: Final = 1 << 1
ACTION_BITS: Final = {"open": ACTION_OPEN, "exec": ACTION_EXEC}

SLOT_VALID: Final = 1 << 0
SLOT_SCOPE_HOST: Final = 1 << 1


class Counter(enum.IntEnum):
    """The per-hook, per-CPU counters (``enum aegis_counter``; index ``hook * len(Counter) + counter``).
    They count every decision, also those whose event could not be reserved (RINGBUF_FAIL), so they are
    the ground truth lost events are measured against."""
    EVALUATED = 0
    RULE_MATCHED = 1
    SCOPE_MATCHED = 2
    DENIED = 3
    AUDITED = 4
    RINGBUF_FAIL = 5
    NO_POLICY = 6
    STALE = 7  # (dev, ino) matched, i_generation differs: a miss (GAP-INO-REUSE)
    SUPPRESSED = 8  # event folded into a deny-storm summary; the decision was made


COUNTERS_PER_HOOK: Final = len(Counter)


@dataclass(frozen=True)
class Layout:
    """A C struct as (field, struct-format) pairs; native alignment is explicit."""

    c_name: str
    fields: tuple[tuple[str, str], ...]

    @property
    def fmt(self) -> str:
        return "<" + "".join(f for _, f in self.fields)

    @property
    def size(self) -> int:
        return struct.calcsize(self.fmt)

    def offsets(self) -> dict[str, int]:
        out: dict[str, int] = {}
        acc = "<"
        for name, f in self.fields:
            out[name] = struct.calcsize(acc)
            acc += f
        return out

    def pack(self, *values: object) -> bytes:
        return struct.pack(self.fmt, *values)

    def unpack(self, data: bytes) -> tuple:
        return struct.unpack(self.fmt, data)


INODE_KEY = Layout("aegis_inode_key", (("ino", "Q"), ("dev", "I"), ("slot", "I")))
RULE = Layout("aegis_rule", (("rule_id", "I"), ("actions", "I"), ("flags", "I"), ("i_generation", "I")))
RULE_CHECK_GEN: Final = 1 << 0  # i_generation must match (GAP-INO-REUSE)
RULE_INHERITED: Final = 1 << 1  # inherited by a rename onto a path rule's path
RULE_PATH: Final = 1 << 2  # compiled from a path: a rename onto the path passes the rule on


class ContinuityCounter(enum.IntEnum):
    """Indexes of ``aegis_continuity_counters`` (per-CPU u64, ``enum aegis_continuity_counter``): what the
    lsm/inode_rename program did when a file was renamed over a path rule's inode."""
    INHERITED = 0  # the source inode got the path rule (RULE_INHERITED)
    INHERIT_FAILED = 1  # the insert failed (rule map full): the path is unprotected until a restage
    KEPT = 2  # the source already had a rule in that slot: it wins
    STALE_TARGET = 3  # the target's entry was stale (i_generation): not passed on
    LAST_ERRNO = 4  # not a count: the errno of a CPU's last failed insert (the highest is read)
SCOPE_KEY = Layout("aegis_scope_key", (("cgroup_id", "Q"), ("slot", "I"), ("_pad", "I")))
SCOPE = Layout("aegis_scope", (("scope_id", "I"), ("_pad", "I")))
#: aegis_cg_scopes' key (the value: match_scope()'s answer, a signed 64-bit cgroup id, -1 out of scope)
CG_SCOPE_KEY = Layout("aegis_cg_scope_key", (("generation", "Q"), ("cgroup_id", "Q")))
CONTROL = Layout("aegis_control", (("active_slot", "I"), ("_pad", "I"), ("storm_window_ns", "Q")))
SLOT_CONFIG = Layout(
    "aegis_slot_config",
    (("generation", "Q"), ("mode", "I"), ("flags", "I"), ("rule_count", "I"), ("scope_count", "I")),
)
RULE_COUNTER_KEY = Layout(
    "aegis_rule_counter_key", (("generation", "Q"), ("rule_id", "I"), ("hook", "I"))
)
RULE_COUNTER = Layout("aegis_rule_counter", (("denied", "Q"), ("audited", "Q")))
EVENT = Layout(
    "aegis_event",
    (
        ("abi_version", "H"),
        ("hook", "B"),
        ("decision", "B"),
        ("rule_id", "I"),
        ("generation", "Q"),
        ("ktime_ns", "Q"),
        ("cgroup_id", "Q"),
        ("scope_cgroup_id", "Q"),
        ("ino", "Q"),
        ("dev", "I"),
        ("action", "I"),
        ("pid", "I"),
        ("tgid", "I"),
        ("uid", "I"),
        ("gid", "I"),
        ("mode", "I"),
        ("slot", "H"),
        ("rule_flags", "H"),  # the deciding rule's RULE_* flags (RULE_INHERITED: by rename)
        ("comm", "16s"),
    ),
)

STORM_KEY = Layout(
    "aegis_storm_key",
    (("generation", "Q"), ("cgroup_id", "Q"), ("rule_id", "I"), ("hook", "I"), ("tgid", "I"),
     ("decision", "I")),
)
STORM = Layout("aegis_storm", (("first_ns", "Q"), ("window_ns", "Q"), ("suppressed", "Q")))
STORM_REPORTED = Layout("aegis_storm_reported", (("first_ns", "Q"), ("reported", "Q")))
#: btrfs's offsets where CO-RE cannot see btrfs's BTF (.rodata.btrfs; kernel/btrfs_layout.py)
BTRFS_LAYOUT = Layout("aegis_btrfs_layout", (("known", "I"), ("vfs_inode", "I"), ("root", "I"),
                                             ("anon_dev", "I")))


class StormStat(enum.IntEnum):
    """Indexes of ``aegis_storm_stats`` (per-CPU u64, ``enum aegis_storm_stat``): decisions folded into
    storm summaries, and decisions not aggregated because the storm map was full (an event each)."""
    SUPPRESSED_DENY = 0
    SUPPRESSED_AUDIT = 1
    UNTRACKED_DENY = 2
    UNTRACKED_AUDIT = 3


ALL_LAYOUTS: Final = (
    INODE_KEY,
    RULE,
    SCOPE_KEY,
    SCOPE,
    CG_SCOPE_KEY,
    CONTROL,
    SLOT_CONFIG,
    RULE_COUNTER_KEY,
    RULE_COUNTER,
    EVENT,
    STORM_KEY,
    STORM,
    STORM_REPORTED,
    BTRFS_LAYOUT,
)

#: map names in aegis.bpf.c
MAP_RULES: Final = "aegis_rules"
MAP_SCOPES: Final = "aegis_scopes"
MAP_CONFIG: Final = "aegis_config"
MAP_COUNTERS: Final = "aegis_counters"
MAP_RULE_COUNTERS: Final = "aegis_rule_counters"
MAP_DENY_EVENTS: Final = "aegis_deny_events"
MAP_AUDIT_EVENTS: Final = "aegis_audit_events"
MAP_CONTINUITY_COUNTERS: Final = "aegis_continuity_counters"
MAP_STORMS: Final = "aegis_storms"
MAP_STORM_REPORTED: Final = "aegis_storm_reported"
MAP_STORM_STATS: Final = "aegis_storm_stats"
MAP_CG_SCOPES: Final = "aegis_cg_scopes"
ALL_MAPS: Final = (
    MAP_RULES,
    MAP_SCOPES,
    MAP_CONFIG,
    MAP_COUNTERS,
    MAP_RULE_COUNTERS,
    MAP_DENY_EVENTS,
    MAP_AUDIT_EVENTS,
    MAP_CONTINUITY_COUNTERS,
    MAP_STORMS,
    MAP_STORM_REPORTED,
    MAP_STORM_STATS,
    MAP_CG_SCOPES,
)
#: every map's max_entries as aegis.bpf.c declares it (ring buffers: bytes); compared
#: with the object's BTF map definitions by tests/unit/test_abi_btf.py
MAP_MAX_ENTRIES: Final = {
    MAP_RULES: MAX_RULES * SLOTS,
    MAP_SCOPES: MAX_SCOPES * SLOTS,
    MAP_CONFIG: 1 + SLOTS,  # index 0: control word, 1 + slot: slot config
    MAP_COUNTERS: len(Hook) * COUNTERS_PER_HOOK,
    MAP_RULE_COUNTERS: MAX_RULE_COUNTERS,
    MAP_DENY_EVENTS: DENY_RING_BYTES,
    MAP_AUDIT_EVENTS: AUDIT_RING_BYTES,
    MAP_CONTINUITY_COUNTERS: len(ContinuityCounter),
    MAP_STORMS: MAX_STORM_KEYS,
    MAP_STORM_REPORTED: MAX_STORM_KEYS,
    MAP_STORM_STATS: len(StormStat),
    MAP_CG_SCOPES: MAX_CG_SCOPES,
}
