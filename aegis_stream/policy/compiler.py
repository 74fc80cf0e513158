"""Compile a Policy into kernel entries: rules -> (dev, ino) keys, scopes -> cgroup ids.

Paths are resolved once, at apply time (inode-first): after that the kernel never
looks at a path again.  The compiled table is what the kernel's ``rule_id`` indexes,
and it is stored per generation so every event can be explained exactly.
"""

from __future__ import annotations

import os

import msgspec

from aegis_stream import abi
from aegis_stream.devnum import InodeId, parse_inode, read_mountinfo, resolve_inode
from aegis_stream.errors import PolicyError
from aegis_stream.policy.model import Policy, policy_digest

# filesystems where (dev, ino) is not a stable identity for a file
UNSTABLE_INODE_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "9p", "fuse", "fuse.sshfs", "ceph"})


class CompiledRule(msgspec.Struct, frozen=True):
    index: int  # the kernel's rule_id
    id: str
    source: str  # the path it was resolved from, or "inode:MAJOR:MINOR:INO"
    dev: int  # kernel encoding
    ino: int
    actions: int  # abi.ACTION_* bits
    fstype: str = ""


class CompiledScope(msgspec.Struct, frozen=True):
    index: int
    cgroup: str
    cgroup_id: int


class CompiledPolicy(msgspec.Struct, frozen=True):
    name: str
    version: int
    mode: str
    digest: str
    rules: list[CompiledRule]
    scopes: list[CompiledScope]

    @property
    def host_scope(self) -> bool:
        return not self.scopes


def cgroup2_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    return [m.mount_point for m in read_mountinfo(mountinfo).values() if m.fstype == "cgroup2"]


def resolve_cgroup(path: str) -> int:
    """A cgroup v2 directory's id is its inode number in cgroupfs (kernfs node id)."""
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise PolicyError(f"scope cgroup {path!r} does not exist or is not a directory")
    roots = cgroup2_mounts()
    if not any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots):
        where = ", ".join(roots) or "nowhere"
        raise PolicyError(f"scope cgroup {path!r} is not on cgroup v2 (mounted at {where})")
    return os.stat(real).st_ino


def compile_policy(policy: Policy) -> CompiledPolicy:
    if len(policy.rules) > abi.MAX_RULES:
        raise PolicyError(f"rules: {len(policy.rules)} rules exceed the limit of {abi.MAX_RULES}")
    if len(policy.scope) > abi.MAX_SCOPES:
        raise PolicyError(f"scope: {len(policy.scope)} scopes exceed the limit {abi.MAX_SCOPES}")
    rules: list[CompiledRule] = []
    by_inode: dict[tuple[int, int], str] = {}
    for i, rule in enumerate(policy.rules):
        try:
            if rule.path is not None:
                ident: InodeId = resolve_inode(rule.path)
                source = rule.path
            else:
                assert rule.inode is not None
                ident = parse_inode(rule.inode)
                source = f"inode:{rule.inode}"
        except PolicyError as exc:
            raise PolicyError(f"rules[{i}] ({rule.id}): {exc}") from None
        key = (ident.dev, ident.ino)
        if key in by_inode:
            raise PolicyError(
                f"rules[{i}] ({rule.id}): names the same inode {ident} as rule "
                f"{by_inode[key]!r} (a hardlink or duplicate path); merge the two rules"
            )
        by_inode[key] = rule.id
        bits = 0
        for a in rule.actions:
            bits |= abi.ACTION_BITS[a]
        rules.append(CompiledRule(i, rule.id, source, ident.dev, ident.ino, bits, ident.fstype))
    scopes: list[CompiledScope] = []
    seen_ids: set[int] = set()
    for i, sc in enumerate(policy.scope):
        try:
            cgid = resolve_cgroup(sc.cgroup)
        except PolicyError as exc:
            raise PolicyError(f"scope[{i}]: {exc}") from None
        if cgid in seen_ids:
            raise PolicyError(f"scope[{i}]: cgroup {sc.cgroup!r} is already selected")
        seen_ids.add(cgid)
        scopes.append(CompiledScope(i, sc.cgroup, cgid))
    return CompiledPolicy(
        policy.name, policy.version, policy.mode, policy_digest(policy), rules, scopes
    )


def actions_names(bits: int) -> list[str]:
    return [name for name, bit in abi.ACTION_BITS.items() if bits & bit]
