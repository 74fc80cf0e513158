"""The no-task-storage build's cached scope answers, checked against the cgroup tree.

On 5.10 the programs cache each scope answer in ``aegis_cg_scopes`` under (generation,
cgroup id) (bpf/aegis.bpf.c, ``cached_scope()``), and a hit is trusted.  A ``CAP_BPF``
holder who writes (active generation, a selected cgroup) -> -1 there before that cgroup's
first decision takes it out of scope while the rule and scope entries the tamper check
compares stay intact (BYP-MAP-TAMPER: not preventable, but never silent).  So every tick
also recomputes each cached answer of the active generation from the cgroup tree, the way
``match_scope()`` does: the outermost selected cgroup among the cgroup's ancestors at
levels 1..16 (level 0, the root cgroup, is never walked), else -1.

A cgroup id is never reused within a boot and a cgroup never changes parent (cgroup2
renames stay in the directory), so an id's ancestry is learnt once, by walking the cgroup2
mount when the cache names ids not seen before (at most every ``walk_every_s``).  An entry
read from the map names a cgroup that existed before the read (a task in it decided), so an
id the walk after the read does not find has been removed: no task is left in it to be
decided, and its answer is skipped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np

from aegis_stream.kernel import abi

CGROUP2_ROOT = "/sys/fs/cgroup"
WALK_EVERY_S = 2.0

_KEY_DT = np.dtype([("generation", "<u8"), ("cgroup_id", "<u8")])


class CgroupTree:
    """Cgroup id -> its ancestors' ids from level 1 down to its own (at most the 16 levels
    the programs walk), learnt by walking the cgroup2 mount; ``None``: not in the tree."""

    def __init__(self, root: str | os.PathLike[str] = CGROUP2_ROOT, *,
                 walk_every_s: float = WALK_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = os.fspath(root)
        self.walk_every_s = walk_every_s
        self.clock = clock
        self.walks = 0
        self._known: dict[int, tuple[int, ...] | None] = {}
        self._last_walk: float | None = None

    def ancestry(self, ids: Collection[int]) -> dict[int, tuple[int, ...] | None]:
        """The ancestry of every id in ``ids`` that is known by now (ids not seen yet wait
        for the next walk if one ran within ``walk_every_s``)."""
        missing = [i for i in ids if i not in self._known]
        now = self.clock()
        if missing and (self._last_walk is None or now - self._last_walk >= self.walk_every_s):
            self._last_walk = now
            tree = self.walk()
            for i in missing:
                self._known[i] = tree.get(i)
        return {i: self._known[i] for i in ids if i in self._known}

    def retain(self, ids: Collection[int]) -> None:
        """Forget every id but ``ids`` (the ones the cache still names): no growth with
        cgroups that came and went."""
        if len(self._known) > len(ids):
            keep = set(ids)
            self._known = {i: a for i, a in self._known.items() if i in keep}

    def walk(self) -> dict[int, tuple[int, ...]]:
        """Every cgroup under the mount: its id (the directory's inode) -> ancestors."""
        self.walks += 1
        try:
            out: dict[int, tuple[int, ...]] = {os.stat(self.root).st_ino: ()}
        except OSError:
            return {}
        stack: list[tuple[str, tuple[int, ...]]] = [(self.root, ())]
        while stack:
            path, above = stack.pop()
            try:
                entries = list(os.scandir(path))
            except OSError:
                continue  # removed while walked
            for e in entries:
                try:
                    if not e.is_dir(follow_symlinks=False):
                        continue
                    ino = e.inode()
                except OSError:
                    continue
                chain = above + (ino,) if len(above) < abi.MAX_CGROUP_DEPTH else above
                out[ino] = chain
                stack.append((e.path, chain))
        return out


def expected_answer(ancestors: tuple[int, ...], scopes: Collection[int]) -> int:
    """``match_scope()``'s answer: the outermost selected ancestor, else -1."""
    return next((a for a in ancestors if a in scopes), -1)


@dataclass(frozen=True)
class WrongAnswer:
    """A cached answer that is not what the policy gives for that cgroup."""
    cgroup_id: int
    cached: int
    expected: int


def cached_answers(kbytes: bytes, vbytes: bytes, generation: int) -> dict[int, int]:
    """cgroup id -> cached answer for one generation, from the map's key and value columns."""
    keys = np.frombuffer(kbytes, dtype=_KEY_DT)
    values = np.frombuffer(vbytes, dtype="<i8")
    mask = keys["generation"] == generation
    return dict(zip(keys["cgroup_id"][mask].tolist(), values[mask].tolist(), strict=True))


def wrong_answers(answers: Mapping[int, int], scopes: Collection[int],
                  tree: CgroupTree) -> tuple[list[WrongAnswer], dict[int, int]]:
    """The cached answers the cgroup tree contradicts, and the ones settled: confirmed, or
    of a removed cgroup (no task left to decide).  Ids a rate-limited walk has not seen yet
    are in neither: the next tick asks again."""
    if not answers:
        return [], {}
    wanted = set(scopes)
    bad, good = [], {}
    for cg, anc in sorted(tree.ancestry(list(answers)).items()):
        if anc is None:
            good[cg] = answers[cg]
            continue
        want = expected_answer(anc, wanted)
        if answers[cg] != want:
            bad.append(WrongAnswer(cg, answers[cg], want))
        else:
            good[cg] = want
    return bad, good


class AnswerAudit:
    """One generation's cached answers, checked once each: an entry is inserted once and
    never updated by the programs, so a tick re-checks only answers it has not confirmed
    yet or that changed (a delete and a forged insert), not the whole map."""

    def __init__(self, tree: CgroupTree) -> None:
        self.tree = tree
        self._policy: tuple[int, frozenset[int]] = (0, frozenset())
        self.confirmed: dict[int, int] = {}
        self._last: tuple[int, bytes, bytes, frozenset[int]] | None = None
        self._last_bad: list[WrongAnswer] = []

    def check_columns(self, kbytes: bytes, vbytes: bytes, generation: int,
                      scopes: Collection[int]) -> list[WrongAnswer]:
        """:meth:`check` on the map's key and value columns; a tick whose columns are the
        last fully settled tick's (nothing inserted, deleted or rewritten since) is a
        bytes comparison."""
        seen = (generation, kbytes, vbytes, frozenset(scopes))
        if seen == self._last:
            return list(self._last_bad)
        answers = cached_answers(kbytes, vbytes, generation)
        named = set(np.frombuffer(kbytes, dtype=_KEY_DT)["cgroup_id"].tolist())
        bad = self.check(answers, generation, scopes, named)
        settled = len(self.confirmed) + len(bad) == len(answers)
        self._last, self._last_bad = (seen, list(bad)) if settled else (None, [])
        return bad

    def check(self, answers: Mapping[int, int], generation: int, scopes: Collection[int],
              named: Collection[int] | None = None) -> list[WrongAnswer]:
        """The wrong answers among ``answers`` (one generation's); ``named``: every cgroup id
        the map names in any generation (the tree remembers those: the kept generation's
        cgroups are the next one's)."""
        policy = (generation, frozenset(scopes))  # one generation has one scope set
        if policy != self._policy:
            self._policy, self.confirmed = policy, {}
        fresh = {cg: a for cg, a in answers.items() if self.confirmed.get(cg) != a}
        bad, good = wrong_answers(fresh, scopes, self.tree)
        self.confirmed = {cg: a for cg, a in answers.items()
                          if self.confirmed.get(cg) == a or good.get(cg) == a}
        self.tree.retain(answers.keys() if named is None else named)
        return bad
