"""Compile a Policy into kernel entries: rules -> (dev, ino) keys, scopes -> cgroup ids.

Paths are resolved once, at apply time (inode-first): after that the kernel never
looks at a path again.  The compiled table is what the kernel's ``rule_id`` indexes,
and it is stored per generation so every event can be explained exactly.
"""

from __future__ import annotations

import os
import stat

import msgspec

from aegis_stream.errors import PolicyError
from aegis_stream.kernel import abi
from aegis_stream.kernel.devnum import (
    InodeId,
    inode_generation,
    kernel_dev,
    parse_inode,
    read_mountinfo,
    resolve_inode,
)
from aegis_stream.kernel.gentrust import generation_immutable
from aegis_stream.policy.model import Policy, policy_digest

# filesystems where (dev, ino) is not a stable identity for a file
UNSTABLE_INODE_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "9p", "fuse", "fuse.sshfs", "ceph"})
# pseudo filesystems: their inodes are made by the kernel on demand (procfs makes a new inode
# for /proc/self/status in every process; sysfs and debugfs recreate theirs when the object
# comes back), so a rule keyed by (dev, ino) at apply denies nothing stable.  tmpfs, devtmpfs
# and ramfs hold real files and are not here.
PSEUDO_FS = frozenset({
    "proc", "sysfs", "debugfs", "tracefs", "securityfs", "cgroup", "cgroup2", "bpf", "devpts",
    "configfs", "pstore", "efivarfs", "binfmt_misc", "fusectl", "mqueue", "hugetlbfs", "autofs",
    "nsfs", "pipefs", "sockfs", "anon_inodefs", "selinuxfs", "smackfs", "apparmorfs",
    "rpc_pipefs", "nfsd",
})


def target_problem(fstype: str, is_dir: bool) -> tuple[str, str] | None:
    """(kind, why) when a rule's target cannot carry a stable identity or would not mean what
    it says, None when it can.  ``kind`` is what the rule's ``accept_target`` names to opt in
    (model.TargetKind); lint reports the same kinds with the same words."""
    if is_dir:
        return ("directory", "is a directory: the rule would deny opening the directory itself "
                "(listing it), not the files in it")
    if fstype in PSEUDO_FS:
        return ("pseudo-fs", f"is on {fstype}, a pseudo filesystem whose inodes the kernel makes "
                "on demand (per process for /proc/self), so the inode resolved now may never be "
                "the one opened later")
    if fstype in UNSTABLE_INODE_FS or fstype.startswith("fuse."):
        return ("unstable-inode", f"is on {fstype}, where (dev, ino) is not a stable identity: "
                "the rule may miss the file or deny another one")
    return None


def accept_hint(kind: str) -> str:
    return f'if this is intended, opt in with accept_target = ["{kind}"] on the rule'


def _fstype_by_dev() -> dict[int, str]:
    out: dict[int, str] = {}
    try:
        mounts = read_mountinfo()
    except OSError:
        return out
    for m in mounts.values():
        try:
            out.setdefault(kernel_dev(m.major, m.minor), m.fstype)
        except ValueError:  # not a 12:20 device number: no rule can name it
            continue
    return out


class CompiledRule(msgspec.Struct, frozen=True):
    """One rule as the kernel holds it: ``index`` is the kernel's rule_id, (dev, ino) the inode the path
    resolved to at apply time, ``i_generation`` what tells a reused inode number apart."""
    index: int  # the kernel's rule_id
    id: str
    source: str  # the path it was resolved from, or "inode:MAJOR:MINOR:INO"
    dev: int  # kernel encoding
    ino: int
    actions: int  # abi.ACTION_* bits
    fstype: str = ""
    # the inode's i_generation at apply (None: unknown / inode literal).  (dev, ino) can be
    # handed to a new file once the old one is deleted (ext4, xfs); the generation tells
    # them apart -- see stale_rules() and docs/POLICY_SEMANTICS.md.
    i_generation: int | None = None
    # the kernel compares i_generation (AEGIS_RULE_CHECK_GEN): only where no user can
    # rewrite it (kernel/gentrust.py; GAP-INO-REUSE in docs/BYPASS_CATALOG.md)
    check_gen: bool = False
    # btrfs: the superblock's s_dev (``dev`` is the subvolume's device).  The rule is also
    # written under (sb_dev, ino): the kernel's key when it could not key by subvolume
    # (btrfs loaded after the programs; bpf/core_fixes.bpf.h), so it matches either way.
    sb_dev: int = 0


class CarriedInode(msgspec.Struct, frozen=True):
    """An inode a path rule named before its path moved (policy/continuity.py): kept in the
    kernel under the rule's ``index`` while it exists, so a file renamed away or still open
    stays protected; dropped once it is gone (its file handle no longer opens)."""
    index: int  # the rule's kernel rule_id
    id: str
    source: str  # the rule's path
    dev: int
    ino: int
    actions: int
    fstype: str = ""
    i_generation: int | None = None
    check_gen: bool = False  # as the rule had it: a reused number is a miss, not a deny


class CompiledScope(msgspec.Struct, frozen=True):
    """One scope resolved to its cgroup v2 id (the id the kernel compares against) at apply time."""
    index: int
    cgroup: str
    cgroup_id: int


class CompiledPolicy(msgspec.Struct, frozen=True, omit_defaults=True):
    """A policy resolved for the kernel: rules as (dev, ino) keys in kernel rule_id order, scopes as
    cgroup ids (none: host-wide).  It is stored with every generation, so an event's rule_id and
    generation always name exactly the entry that decided; the ``digest`` is the source policy's.
    ``carried``: the earlier inodes of path rules whose path moved, still protected under the
    rule's index (a restage, policy/continuity.py; empty after a plain compile)."""
    name: str
    version: int
    mode: str
    digest: str
    rules: list[CompiledRule]
    scopes: list[CompiledScope]
    carried: list[CarriedInode] = []

    @property
    def host_scope(self) -> bool:
        return not self.scopes


def cgroup2_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    return [m.mount_point for m in read_mountinfo(mountinfo).values() if m.fstype == "cgroup2"]


def cgroup_level(real: str, root: str) -> int:
    """Depth of cgroup directory ``real`` below the cgroup2 mount ``root`` (root = 0), the
    kernel's ``cgrp->level`` when the mount shows the whole hierarchy."""
    rel = os.path.relpath(real, root)
    return 0 if rel == "." else len(rel.split(os.sep))


def resolve_cgroup(path: str) -> int:
    """A cgroup v2 directory's id is its inode number in cgroupfs (kernfs node id).

    The kernel matches a scope by walking the task's ancestors at levels
    1..AEGIS_MAX_CGROUP_DEPTH (bpf_get_current_ancestor_cgroup_id), so a scope it could
    never see -- the root cgroup (level 0) or one deeper than the walk -- is refused here
    rather than compiled into a policy that silently enforces nothing.
    """
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise PolicyError(f"scope cgroup {path!r} does not exist or is not a directory")
    roots = cgroup2_mounts()
    root = next((r for r in roots if real == r or real.startswith(r.rstrip("/") + "/")), None)
    if root is None:
        where = ", ".join(roots) or "nowhere"
        raise PolicyError(f"scope cgroup {path!r} is not on cgroup v2 (mounted at {where})")
    level = cgroup_level(real, root)
    if level == 0:
        raise PolicyError(
            f"scope cgroup {path!r} is the root cgroup, which the kernel never matches "
            "(it walks ancestors from level 1); omit [[scope]] for a host-wide policy"
        )
    if level > abi.MAX_CGROUP_DEPTH:
        raise PolicyError(
            f"scope cgroup {path!r} is {level} levels deep; the kernel walks ancestors at "
            f"levels 1..{abi.MAX_CGROUP_DEPTH} only, so it could never match"
        )
    return os.stat(real).st_ino


def compile_policy(policy: Policy) -> CompiledPolicy:
    """Resolve every rule and scope now (inode-first).  Refused, naming the rule: a path that
    does not resolve, two rules on one inode, and a target that cannot carry a stable identity
    (:func:`target_problem`) unless the rule accepts its kind."""
    if len(policy.rules) > abi.MAX_RULES:
        raise PolicyError(f"rules: {len(policy.rules)} rules exceed the limit of {abi.MAX_RULES}")
    if len(policy.scope) > abi.MAX_SCOPES:
        raise PolicyError(f"scope: {len(policy.scope)} scopes exceed the limit {abi.MAX_SCOPES}")
    rules: list[CompiledRule] = []
    by_inode: dict[tuple[int, int], str] = {}
    fs_of_dev: dict[int, str] | None = None
    for i, rule in enumerate(policy.rules):
        is_dir = False
        try:
            if rule.path is not None:
                ident: InodeId = resolve_inode(rule.path)
                source = rule.path
                try:
                    is_dir = stat.S_ISDIR(os.stat(rule.path).st_mode)
                except OSError:  # gone since it resolved: stale_rules reports it later
                    is_dir = False
            else:
                assert rule.inode is not None
                ident = parse_inode(rule.inode)
                source = f"inode:{rule.inode}"
                if fs_of_dev is None:
                    fs_of_dev = _fstype_by_dev()
                ident = InodeId(ident.dev, ident.ino, fs_of_dev.get(ident.dev, ""))
        except PolicyError as exc:
            raise PolicyError(f"rules[{i}] ({rule.id}): {exc}") from None
        problem = target_problem(ident.fstype, is_dir)
        if problem is not None and problem[0] not in rule.accept_target:
            raise PolicyError(f"rules[{i}] ({rule.id}): {source} {problem[1]}; refused "
                              f"({accept_hint(problem[0])})")
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
        igen = inode_generation(rule.path) if rule.path is not None else None
        check_gen = igen is not None and generation_immutable(ident.fstype, ident.dev)
        rules.append(
            CompiledRule(i, rule.id, source, ident.dev, ident.ino, bits, ident.fstype, igen,
                         check_gen, ident.sb_dev)
        )
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


class StaleRule(msgspec.Struct, frozen=True):
    """A path rule whose compiled inode is no longer the file at its path (moved, reused or missing): the
    kernel still guards the old inode until the policy is re-applied."""
    rule_id: str
    source: str
    reason: str  # "moved" | "reused" | "missing"
    detail: str


def stale_rules(cp: CompiledPolicy) -> list[StaleRule]:
    """Path rules whose compiled inode no longer is the file at the path.

    ``moved``: the path now names another inode (renamed over, deleted and recreated with a
    new number) -- the kernel rule still guards the old inode, the new file is not covered.
    ``reused``: the path names the *same* (dev, ino) but a different i_generation -- the old
    file was deleted and the filesystem handed its number to a new one, which the kernel
    rule (keyed by dev, ino only) now denies although the policy never named it.
    ``missing``: nothing at the path.  Re-apply the policy to re-resolve.
    """
    out: list[StaleRule] = []
    for r in cp.rules:
        if r.source.startswith("inode:"):
            continue
        try:
            now = resolve_inode(r.source)
        except PolicyError as exc:
            out.append(StaleRule(r.id, r.source, "missing", str(exc)))
            continue
        if (now.dev, now.ino) != (r.dev, r.ino):
            out.append(StaleRule(r.id, r.source, "moved",
                                 f"compiled {InodeId(r.dev, r.ino)}, path now names {now}"))
            continue
        gen = inode_generation(r.source)
        if r.i_generation is not None and gen is not None and gen != r.i_generation:
            out.append(StaleRule(r.id, r.source, "reused",
                                 f"{now} was reused: i_generation {r.i_generation} -> {gen}"))
    return out
