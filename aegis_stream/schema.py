"""Versioned, normalised event schemas (msgspec Structs; JSON Schema in schemas/).

Evolution rules (msgspec's): new fields go last with defaults; a field's type never
changes; the schema tag changes (v2) on any incompatible change.
"""

from __future__ import annotations

import msgspec


class DecisionEvent(msgspec.Struct, frozen=True, kw_only=True, tag="aegis.decision.v1", tag_field="schema"):
    """One kernel decision (deny or audit), enriched for humans and consumers."""

    event_id: str  # "<boot_id8>-<ktime_ns>-<tid>": unique per host boot
    time: str  # RFC 3339 wall-clock time of the decision
    ktime_ns: int
    host: str
    hook: str  # file_open | bprm_check_security | mmap_file
    action: str  # open | exec
    decision: str  # deny | audit
    mode: str  # enforce | audit (of the deciding generation)
    rule_id: str  # the policy's rule id ("" when the generation record is missing)
    rule_index: int
    generation: int
    policy_name: str
    policy_version: int
    policy_digest: str
    rule_source: str  # the path (or inode literal) the rule was compiled from
    dev: str  # "MAJOR:MINOR" of the superblock (kernel s_dev)
    ino: int
    cgroup_id: int
    cgroup_path: str
    scope_cgroup_id: int  # 0 = host-wide scope
    scope_cgroup_path: str
    pid: int  # process id (tgid)
    tid: int
    uid: int
    gid: int
    comm: str
    exe: str = ""  # best effort: empty when the process was gone
    enrichment_missing: list[str] = msgspec.field(default_factory=list)
    abi_version: int = 1
    slot: int = 0
