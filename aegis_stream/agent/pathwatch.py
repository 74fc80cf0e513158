"""The path watcher: path rules follow their paths through delete + create and every other
replacement the kernel's rename hook cannot see.

A path rule is compiled to an inode (policy/compiler.py).  When a file is renamed onto a
path rule's path the kernel passes the rule on by itself (``RULE_INHERITED`` entries); a
delete followed by a create, a hard link made after an unlink, a parent directory replaced,
or anything done while the agent was down, leaves the rule on the old inode.  This task
watches (inotify) the parent directory of every path rule of the active generation -- the
nearest existing ancestor when the parent is gone -- and on a change that touches a rule's
path re-resolves it and restages the generation through the one apply path
(:meth:`Lifecycle.restage_paths <aegis_stream.policy.lifecycle.Lifecycle.restage_paths>`):
the same signed policy, a new generation whose provenance record says which paths moved,
from which inode to which.

Until that restage is done the agent is degraded with ``path_rule_moved`` naming the rules
(:meth:`PathWatcher.conditions`, the ticker's hook); a move restaged between two ticks is
still reported once, so no move goes unseen.  Changes are debounced (``debounce_s`` quiet,
at most ``max_delay_s`` after the first): a dpkg unpack storm is one restage.  At start the
whole generation is checked once (what moved while the agent was down), and carried inodes
(a path rule's earlier inodes, kept while they exist) are re-checked every ``sweep_s``, so
one that is gone is dropped before its number can be handed to another file.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import trio

from aegis_stream.agent.health import ReasonCode
from aegis_stream.errors import AegisError
from aegis_stream.kernel import slots
from aegis_stream.policy import compiler, continuity
from aegis_stream.policy.compiler import CompiledPolicy
from aegis_stream.policy.lifecycle import Lifecycle, RestageOutcome

CODE = ReasonCode.PATH_RULE_MOVED
PREFIX = "path rule moved: "  # reason_codes.toml's pattern for the code

# <sys/inotify.h>
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
DIR_MASK = (IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
            | IN_MOVE_SELF | IN_ONLYDIR)
SELF_EVENTS = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name
READ_BYTES = 64 << 10

_NAMES = ((IN_MOVED_TO, "moved_to"), (IN_CREATE, "create"), (IN_DELETE, "delete"),
          (IN_MOVED_FROM, "moved_from"), (IN_DELETE_SELF, "parent deleted"),
          (IN_MOVE_SELF, "parent moved"), (IN_IGNORED, "parent gone"))


def mask_name(mask: int) -> str:
    return next((n for bit, n in _NAMES if mask & bit), hex(mask))


class Inotify:
    """A minimal inotify(7) binding: a non-blocking fd, add/remove watches, parsed reads."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_init1: {os.strerror(e)}")
        self.fd = fd

    def add_watch(self, path: str, mask: int) -> int:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
        return int(wd)

    def rm_watch(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self.fd, wd)  # EINVAL when the kernel dropped it already

    def read(self) -> list[tuple[int, int, str]]:
        """The queued events as (wd, mask, name); [] when none."""
        try:
            data = os.read(self.fd, READ_BYTES)
        except BlockingIOError:
            return []
        out = []
        off = 0
        while off + _EVENT.size <= len(data):
            wd, mask, _cookie, n = _EVENT.unpack_from(data, off)
            name = data[off + _EVENT.size: off + _EVENT.size + n].split(b"\0", 1)[0]
            out.append((wd, mask, os.fsdecode(name)))
            off += _EVENT.size + n
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class WatchStats:
    """Counters of the watcher (tests, the log): events read, relevant ones, restages made,
    restages that failed, queue overflows, directories that could not be watched."""
    events: int = 0
    relevant: int = 0
    restages: int = 0
    restage_failures: int = 0
    overflows: int = 0
    errors: int = 0  # unexpected errors of a watch pass (logged; a full re-resolve follows)
    unwatchable: dict[str, str] = field(default_factory=dict)


def _log(msg: str) -> None:
    print(f"aegis: path watch: {msg}", file=sys.stderr, flush=True)


def _ancestors(path: str) -> list[str]:
    out = []
    d = os.path.dirname(path)
    while True:
        out.append(d)
        up = os.path.dirname(d)
        if up == d:
            return out
        d = up


def _describe(rules: dict[str, str], limit: int = 3) -> str:
    items = sorted(rules.items())
    text = ", ".join(f"rule {rid} ({path})" for rid, path in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


class PathWatcher:
    """Watches the active generation's path rules and restages it when their paths move
    (see the module).  :meth:`run` is the nursery task; :meth:`conditions` the ticker's
    check; :meth:`trigger` is how others (the integrity check, on a kernel-inherited entry)
    ask for a full re-resolve."""

    def __init__(self, lifecycle: Lifecycle, *, debounce_s: float = 0.15, max_delay_s: float = 2.0,
                 poll_s: float = 1.0, sweep_s: float = 10.0, retry_s: float = 2.0,
                 lock_wait_s: float = 2.0, log: Callable[[str], None] = _log,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lifecycle = lifecycle
        self.debounce_s, self.max_delay_s = debounce_s, max_delay_s
        self.poll_s, self.sweep_s, self.retry_s = poll_s, sweep_s, retry_s
        self.lock_wait_s = lock_wait_s
        self.log = log
        self.clock = clock
        self.stats = WatchStats()
        self.inotify: Inotify | None = None
        self.generation = 0
        self.policy: CompiledPolicy | None = None
        self.targets: dict[str, set[str]] = {}  # watched name (path or its realpath) -> rule paths
        self.rule_of: dict[str, str] = {}  # rule path -> rule id
        self.ancestors: set[str] = set()  # every directory above a watched name
        self.wds: dict[int, str] = {}  # watch descriptor -> directory
        self.dirs: dict[str, int] = {}  # directory -> watch descriptor
        # changes not yet restaged: rule path -> what was seen; None = everything
        self.pending: dict[str, str] = {}
        self.pending_all = False
        self.first_seen = 0.0
        self.last_seen = 0.0
        self.retry_at = 0.0
        self.next_sweep = 0.0
        self.failure = ""  # the last restage's error, while it is pending
        self.problems: dict[str, continuity.PathProblem] = {}  # rule path -> why it cannot follow
        self.reported: list[str] = []  # restaged since the last conditions() call
        self.last: RestageOutcome | None = None

    # ------------------------------------------------------------------ health
    def conditions(self) -> Mapping[ReasonCode, str | None]:
        """``path_rule_moved`` while a change waits for its restage, while a rule cannot
        follow its path, and once for every restage made since the last call."""
        parts: list[str] = []
        if self.pending_all:
            parts.append("path rules changed on disk (full re-resolve); not protected until "
                         "restaged" + (f" ({self.failure})" if self.failure else ""))
        elif self.pending:
            parts.append(_describe({self.rule_of.get(p, "?"): f"{p}: {why}"
                                    for p, why in self.pending.items()})
                         + " changed on disk; the file at the path is not protected until "
                         "restaged" + (f" ({self.failure})" if self.failure else ""))
        parts += [f"rule {p.rule} ({p.path}) {p.why}" for _, p in sorted(self.problems.items())]
        if self.stats.unwatchable:
            parts.append("not watched (replacements there are not followed): " + ", ".join(
                f"{d}: {e}" for d, e in sorted(self.stats.unwatchable.items())[:3]))
        parts += self.reported
        self.reported = []
        return {CODE: PREFIX + "; ".join(parts) if parts else None}

    def trigger(self, why: str = "kernel-inherited rule entry") -> None:
        """Ask for a full re-resolve (soon, debounced)."""
        self._mark(None, why)

    # ------------------------------------------------------------------ watches
    def _load(self) -> bool:
        """Follow the kernel's active generation; True when it changed."""
        try:
            st = slots.read_state(self.lifecycle.maps)
        except (AegisError, OSError):
            return False
        gen = st.active.generation if st.active.valid else 0
        if gen == self.generation:
            return False
        self.generation = gen
        self.policy = None
        if gen:
            try:
                self.policy = self.lifecycle.store.load(gen).policy
            except (AegisError, OSError) as exc:
                self.log(f"generation {gen}: record unreadable, not watched: {exc}")
        self._index()
        self._rewatch()
        return True

    def _index(self) -> None:
        self.targets, self.rule_of, self.ancestors = {}, {}, set()
        for r in continuity.path_rules(self.policy) if self.policy else []:
            p = os.path.normpath(r.source)
            self.rule_of[p] = r.id
            self.targets.setdefault(p, set()).add(p)
            real = os.path.realpath(p)
            if real != p:  # a symlink: its target's replacement moves the rule too
                self.targets.setdefault(real, set()).add(p)
        for name in self.targets:
            self.ancestors.update(_ancestors(name))

    def _wanted_dirs(self) -> set[str]:
        out = set()
        for parent in {os.path.dirname(name) for name in self.targets}:
            for d in (parent, *_ancestors(parent)):
                if os.path.isdir(d):
                    out.add(d)  # the parent, or the nearest ancestor that exists
                    break
        return out

    def _rewatch(self) -> None:
        ino = self.inotify
        if ino is None:
            return
        want = self._wanted_dirs()
        for d in [d for d in self.dirs if d not in want]:
            wd = self.dirs.pop(d)
            self.wds.pop(wd, None)
            ino.rm_watch(wd)
        self.stats.unwatchable = {}
        for d in sorted(want):
            prev = self.dirs.get(d)
            try:
                wd = ino.add_watch(d, DIR_MASK)
            except OSError as exc:
                self.stats.unwatchable[d] = exc.strerror or str(exc)
                continue
            if prev is not None and prev != wd:  # the old watch followed the directory away
                self.wds.pop(prev, None)
                ino.rm_watch(prev)
            old = self.wds.get(wd)
            if old is not None and old != d:  # the same directory under another name
                self.dirs.pop(old, None)
            self.wds[wd] = d
            self.dirs[d] = wd
        if self.stats.unwatchable:
            self.log("cannot watch " + ", ".join(f"{d} ({e})" for d, e in
                                                 sorted(self.stats.unwatchable.items())))

    def _under(self, d: str) -> list[str]:
        pre = d.rstrip("/") + "/"
        return [p for name, ps in self.targets.items() if name.startswith(pre) for p in ps]

    def _mark(self, paths: list[str] | None, why: str) -> None:
        now = self.clock()
        if not self.pending and not self.pending_all:
            self.first_seen = now
        self.last_seen = now
        if paths is None:
            self.pending_all = True
        else:
            for p in paths:
                self.pending.setdefault(p, why)

    def handle(self, events: list[tuple[int, int, str]]) -> None:
        """Mark the rule paths a batch of inotify events touches."""
        rewatch = False
        for wd, mask, name in events:
            self.stats.events += 1
            if mask & IN_Q_OVERFLOW:
                self.stats.overflows += 1
                self.stats.relevant += 1
                self._mark(None, "inotify queue overflow")
                rewatch = True
                continue
            d = self.wds.get(wd)
            if d is None:
                continue
            if mask & SELF_EVENTS:
                hit = self._under(d)
                rewatch = True
                if mask & IN_IGNORED:  # the kernel removed the watch (directory gone)
                    self.wds.pop(wd, None)
                    if self.dirs.get(d) == wd:
                        del self.dirs[d]
            else:
                full = os.path.join(d, name)
                hit = sorted(self.targets.get(full, ()))
                if full in self.ancestors:  # a directory above rule paths came or went
                    hit += self._under(full)
                    rewatch = True
            if hit:
                self.stats.relevant += 1
                self._mark(hit, mask_name(mask))
        if rewatch:
            self._rewatch()

    # ------------------------------------------------------------------ restage
    def _due(self, now: float) -> bool:
        if not (self.pending or self.pending_all) or now < self.retry_at:
            return False
        return (now - self.last_seen >= self.debounce_s
                or now - self.first_seen >= self.max_delay_s)

    def _restage_sync(self, paths: list[str] | None, origin: str) -> RestageOutcome:
        return self.lifecycle.restage_paths(paths, origin=origin, generation=self.generation or None,
                                            lock_wait_s=self.lock_wait_s)

    async def restage(self, origin: str = "path-watch") -> None:
        """Restage what is pending (in a worker thread: file and map I/O, the lifecycle
        lock); on failure keep it pending and retry after ``retry_s``."""
        paths = None if self.pending_all else sorted(self.pending)
        seen = dict(self.pending)
        was_all = self.pending_all
        self.pending, self.pending_all = {}, False
        try:
            out = await trio.to_thread.run_sync(self._restage_sync, paths, origin)
        except (AegisError, OSError) as exc:
            self.stats.restage_failures += 1
            self.failure = f"restage failed: {exc}"
            self.log(self.failure)
            for p, why in seen.items():
                self.pending.setdefault(p, why)
            self.pending_all = self.pending_all or was_all
            self.retry_at = self.clock() + self.retry_s
            if not self.first_seen:
                self.first_seen = self.clock()
            return
        self.failure = ""
        self._done(out, paths, origin)

    def _done(self, out: RestageOutcome, paths: list[str] | None, origin: str) -> None:
        self.last = out
        found = out.found
        if out.checked_generation == self.generation:
            for p in list(self.problems) if paths is None else paths:
                self.problems.pop(p, None)  # re-resolved now: what is still wrong is below
            for pr in found.problems:
                self.problems[os.path.normpath(pr.path)] = pr
        for m in found.missing:
            self.log(f"rule {m.rule}: {m.path} is missing; it keeps its inode until a file "
                     "is there again")
        if out.applied is None:
            return
        self.stats.restages += 1
        a = out.applied
        moved = "; ".join(f"rule {m.rule} ({m.path}) {m.old} -> {m.new}" for m in found.moves[:3])
        more = f" and {len(found.moves) - 3} more" if len(found.moves) > 3 else ""
        dropped = f", {len(found.dropped)} carried inode(s) gone" if found.dropped else ""
        text = (f"{moved}{more}{dropped} restaged as generation {a.generation} "
                f"(was {a.previous_generation}, {origin})").lstrip(", ")
        self.log(text)
        if found.moves:
            self.reported.append(text)
        self._load()

    async def check_all(self, origin: str) -> None:
        """Re-resolve every path rule now (start: what moved while the agent was down)."""
        if self.policy is None:
            return
        stale = await trio.to_thread.run_sync(compiler.stale_rules, self.policy)
        if stale or self.policy.carried:
            for s in stale:
                self._mark([os.path.normpath(s.source)], f"{s.reason} while the agent was down")
            if not stale:
                self._mark([], "carried inodes")
            await self.restage(origin)

    # ------------------------------------------------------------------ the task
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch until cancelled: the watches first, then the start check (before it reports
        started), then events."""
        try:
            self.inotify = Inotify()
        except OSError as exc:
            self.stats.unwatchable["*"] = f"inotify unavailable: {exc.strerror}"
            self.log(self.stats.unwatchable["*"])
            task_status.started()
            return
        try:
            self._load()
            # what moved while the agent was down is restaged before the agent says it runs
            # (bounded: the lifecycle lock is waited for lock_wait_s, then retried later)
            await self.check_all("agent-start")
            task_status.started()
            self.next_sweep = self.clock() + self.sweep_s
            while True:
                try:
                    await self._step()
                except (AegisError, OSError, ValueError) as exc:
                    # a watcher that stops would leave the paths unfollowed without a word:
                    # say so (degraded) and go on; the next pass re-resolves everything
                    self.stats.errors += 1
                    self.failure = f"path watch error: {exc}"
                    self.log(self.failure)
                    self._mark(None, "path watch error")
                    self.retry_at = self.clock() + self.retry_s
        finally:
            self.inotify.close()

    async def _step(self) -> None:
        ino = self.inotify
        assert ino is not None
        now = self.clock()
        if self.pending or self.pending_all:
            due = min(self.last_seen + self.debounce_s, self.first_seen + self.max_delay_s)
            wait = max(due - now, self.retry_at - now, 0.0)
        else:
            wait = self.poll_s
        with trio.move_on_after(wait):
            await trio.lowlevel.wait_readable(ino.fd)
        self.handle(ino.read())
        now = self.clock()
        if self._due(now):
            await self.restage()
        if self._load():  # another apply: its rules now; anything pending was for the old one
            self.pending, self.pending_all, self.problems = {}, False, {}
            await self.check_all("path-watch")
        if now >= self.next_sweep:
            self.next_sweep = now + self.sweep_s
            if self.policy is not None and self.policy.carried and not self.pending:
                self._mark([], "carried inodes")
                await self.restage("path-watch sweep")
