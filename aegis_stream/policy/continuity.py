"""Path continuity: re-resolve a generation's path rules after their paths moved.

A path rule is compiled to the inode its path names at apply (inode-first).  Tools replace
files instead of editing them (``sed -i``, ``passwd``, dpkg: a new file renamed over the old
one; or delete + create), so the path soon names another inode.  The kernel passes a rule on
by itself when a file is renamed onto a path rule's path (the ``inode_rename`` hook, entries
flagged ``RULE_INHERITED``); every other replacement is seen by the agent's watcher
(aegis_stream/agent/pathwatch.py), which calls :meth:`Lifecycle.restage_paths
<aegis_stream.policy.lifecycle.Lifecycle.restage_paths>`, which calls :func:`reresolve`
here: the same signed policy, the same digest and version, a new generation in which

* each path rule names the inode its path names now (``moves``);
* the inode it named before is kept under the rule's index (``carried``) as long as it
  exists: a file renamed away, or still open, stays protected (the semantics before);
* a carried inode that is gone (its file handle no longer opens: ESTALE) is dropped
  (``dropped``): a filesystem may hand its number to an unrelated file.

What cannot be re-resolved stays as it was and is reported (``problems``): a path that now
names another rule's inode, or a target the rule does not accept (a directory, a pseudo fs).
A path that names nothing (deleted, not yet created again) is ``missing``: the rule keeps
its inode, nothing at the path is exposed, and the create that follows is a move.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from aegis_stream.errors import PolicyError
from aegis_stream.kernel.devnum import (
    FILEID_INO32_GEN,
    FILEID_INO64_GEN,
    InodeId,
    inode_generation,
    kernel_dev,
    read_mountinfo,
    resolve_inode,
)
from aegis_stream.kernel.gentrust import generation_immutable
from aegis_stream.policy import compiler, model
from aegis_stream.policy.compiler import CarriedInode, CompiledPolicy, CompiledRule


class PathMove(msgspec.Struct, frozen=True, kw_only=True):
    """One path rule whose path names another inode than the generation compiled: ``old`` and
    ``new`` as ``MAJOR:MINOR:INO`` (with ``/gen`` when the i_generation is known)."""
    rule: str  # the rule's id
    index: int
    path: str
    old: str
    new: str
    why: str  # moved | reused (same number, another i_generation)


class PathProblem(msgspec.Struct, frozen=True, kw_only=True):
    """A path rule that could not follow its path: it keeps the inode it had."""
    rule: str
    path: str
    why: str


@dataclass(frozen=True)
class Reresolved:
    """What :func:`reresolve` found: the new compiled policy (None when nothing changes) and
    why; the lifecycle records it as a generation, the watcher reports the problems."""
    compiled: CompiledPolicy | None
    moves: list[PathMove] = field(default_factory=list)
    carried: list[CarriedInode] = field(default_factory=list)
    dropped: list[CarriedInode] = field(default_factory=list)
    problems: list[PathProblem] = field(default_factory=list)
    missing: list[PathProblem] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.compiled is not None


def ident(dev: int, ino: int, gen: int | None) -> str:
    return str(InodeId(dev, ino)) + (f"/{gen}" if gen is not None else "")


def path_rules(cp: CompiledPolicy) -> list[CompiledRule]:
    return [r for r in cp.rules if not r.source.startswith("inode:")]


# ------------------------------------------------------------------------ liveness
_libc: ctypes.CDLL | None = None


def _open_by_handle(mount_fd: int, htype: int, data: bytes) -> int:
    """open_by_handle_at(2) with O_PATH: the fd, or -errno."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(struct.pack("<Ii", len(data), htype) + data)
    fd = _libc.open_by_handle_at(mount_fd, buf, os.O_PATH | os.O_CLOEXEC)
    return fd if fd >= 0 else -ctypes.get_errno()


def handle_of(c: CarriedInode) -> tuple[int, bytes] | None:
    """The export file handle of a carried inode, rebuilt from (ino, i_generation) for the
    filesystems whose layout is known (devnum.generation_from_handle reads the same ones);
    None elsewhere (btrfs needs its subvolume root, others have no stable layout)."""
    if c.i_generation is None:
        return None
    fs = c.fstype
    if fs in ("ext2", "ext3", "ext4", "xfs") and c.ino < 1 << 32:
        return FILEID_INO32_GEN, struct.pack("<II", c.ino, c.i_generation)
    if fs == "xfs":
        return FILEID_INO64_GEN, struct.pack("<QI", c.ino, c.i_generation)
    if fs == "tmpfs":
        return FILEID_INO32_GEN, struct.pack("<III", c.i_generation, c.ino & 0xFFFFFFFF, c.ino >> 32)
    return None


def _mount_point(dev: int) -> str | None:
    try:
        mounts = read_mountinfo()
    except OSError:
        return None
    for m in mounts.values():
        try:
            if kernel_dev(m.major, m.minor) == dev:
                return m.mount_point
        except ValueError:
            continue
    return None


def inode_alive(c: CarriedInode) -> bool | None:
    """Does the carried inode still exist?  True / False (ESTALE: it is gone), None when it
    cannot be told (no known handle layout, no mount of its device, no CAP_DAC_READ_SEARCH):
    an unknown inode is kept, as before continuity existed."""
    h = handle_of(c)
    mnt = _mount_point(c.dev) if h is not None else None
    if h is None or mnt is None:
        return None
    try:
        mfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # O_PATH: EBADF
    except OSError:
        return None
    try:
        fd = _open_by_handle(mfd, *h)
    finally:
        os.close(mfd)
    if fd >= 0:
        os.close(fd)
        return True
    return False if -fd in (errno.ESTALE, errno.ENOENT) else None


# ------------------------------------------------------------------------ re-resolve
def _carry(r: CompiledRule) -> CarriedInode:
    return CarriedInode(r.index, r.id, r.source, r.dev, r.ino, r.actions, r.fstype, r.i_generation,
                        r.check_gen)


def reresolve(
    cp: CompiledPolicy,
    policy: model.Policy,
    *,
    paths: Iterable[str] | None = None,
    alive: Callable[[CarriedInode], bool | None] = inode_alive,
) -> Reresolved:
    """Re-resolve the path rules of ``cp`` (those whose path is in ``paths``; all when None)
    against the filesystem now, and check that its carried inodes still exist.  ``policy``
    is the source ``cp`` was compiled from (its ``accept_target`` s).  Nothing is written.

    A path that now names the inode another rule holds may mean that rule moved too (ext4
    hands a freed number straight to the next new file): that rule is re-resolved as well
    before the conflict is believed."""
    wanted = None if paths is None else {os.path.normpath(p) for p in paths}
    while True:
        out, also = _reresolve(cp, policy, wanted, alive)
        if wanted is None or not also - wanted:
            return out
        wanted |= also


def _reresolve(
    cp: CompiledPolicy, policy: model.Policy, wanted: set[str] | None,
    alive: Callable[[CarriedInode], bool | None],
) -> tuple[Reresolved, set[str]]:
    rules = list(cp.rules)
    problems: list[PathProblem] = []
    missing: list[PathProblem] = []
    # pass 1: where each wanted path rule's path points now
    cand: dict[int, tuple[InodeId, int | None, bool]] = {}
    for i, r in enumerate(rules):
        if r.source.startswith("inode:") or (
                wanted is not None and os.path.normpath(r.source) not in wanted):
            continue
        try:
            now = resolve_inode(r.source)
        except PolicyError as exc:
            missing.append(PathProblem(rule=r.id, path=r.source, why=str(exc)))
            continue
        gen = inode_generation(r.source)
        same = (now.dev, now.ino) == (r.dev, r.ino)
        if same and (r.i_generation is None or gen is None or gen == r.i_generation):
            continue
        try:
            is_dir = os.path.isdir(r.source)
        except OSError:
            is_dir = False
        problem = compiler.target_problem(now.fstype, is_dir)
        src = policy.rules[r.index] if r.index < len(policy.rules) else None
        if problem is not None and (src is None or problem[0] not in src.accept_target):
            problems.append(PathProblem(rule=r.id, path=r.source, why=(
                f"now names {now}, which {problem[1]}; refused ({compiler.accept_hint(problem[0])})")))
            continue
        cand[i] = (now, gen, same)
    # pass 2: two rules on one inode cannot be (one key in the kernel's map); the files may
    # have swapped numbers (ext4 reuses a freed one at once), so judge the final assignment
    final = {i: (r.dev, r.ino) for i, r in enumerate(rules)}
    for i, (now, _gen, _same) in cand.items():
        final[i] = (now.dev, now.ino)
    also: set[str] = set()  # paths of unwanted rules whose inode a wanted path now names
    while True:
        owners: dict[tuple[int, int], list[int]] = {}
        for i, k in final.items():
            owners.setdefault(k, []).append(i)
        bad = [i for i in cand if len(owners[final[i]]) > 1]
        if not bad:
            break
        for i in bad:
            r = rules[i]
            other = rules[next(j for j in owners[final[i]] if j != i)]
            if wanted is not None and not other.source.startswith("inode:") \
                    and os.path.normpath(other.source) not in wanted:
                also.add(os.path.normpath(other.source))
            problems.append(PathProblem(rule=r.id, path=r.source, why=(
                f"now names {cand[i][0]}, the inode of rule {other.id!r}; it keeps "
                f"{ident(r.dev, r.ino, r.i_generation)} until the policy is applied again")))
            final[i] = (r.dev, r.ino)
            del cand[i]
    moves: list[PathMove] = []
    newly_carried: list[CarriedInode] = []
    for i, (now, gen, same) in sorted(cand.items()):
        r = rules[i]
        moves.append(PathMove(rule=r.id, index=r.index, path=r.source,
                              old=ident(r.dev, r.ino, r.i_generation), new=ident(now.dev, now.ino, gen),
                              why="moved" if not same else "reused"))
        if not same:
            newly_carried.append(_carry(r))  # the inode it named: kept while it exists
        # the new inode's identity as compile_policy records it (GAP-INO-REUSE's check only
        # where the filesystem's generation cannot be rewritten; btrfs's superblock device)
        rules[i] = msgspec.structs.replace(
            r, dev=now.dev, ino=now.ino, fstype=now.fstype, i_generation=gen,
            check_gen=gen is not None and generation_immutable(now.fstype, now.dev),
            sb_dev=now.sb_dev)
    current = {(r.dev, r.ino) for r in rules}
    carried: list[CarriedInode] = []
    dropped: list[CarriedInode] = []
    seen: set[tuple[int, int]] = set()
    for c in [*cp.carried, *newly_carried]:
        key = (c.dev, c.ino)
        if key in current or key in seen:
            continue  # a rule names it again (moved back), or carried twice
        if alive(c) is False:
            dropped.append(c)
            continue
        seen.add(key)
        carried.append(c)
    changed = bool(moves) or carried != list(cp.carried)
    new = msgspec.structs.replace(cp, rules=rules, carried=carried) if changed else None
    return Reresolved(new, moves, carried, dropped, problems, missing), also
