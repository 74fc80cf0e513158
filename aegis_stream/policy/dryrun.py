"""``aegis policy apply --dry-run``: what would change, and what past events it would deny.

Nothing here touches the kernel or the state dir.  The diff is by rule id against the
active generation's compiled record (so it shows the inodes each side resolved to); the
replay reads a recorded JSON-lines event log (``aegis run --events`` output: "dev" as
"MAJOR:MINOR", "ino", "action", "cgroup_id", optionally "cgroup_path") and evaluates each
event against the new compiled policy exactly as the kernel would: same (dev, ino), an
action bit the rule carries, and a cgroup inside a scope (or a host-wide policy).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from aegis_stream.kernel import abi
from aegis_stream.kernel.devnum import kernel_dev, split_kernel_dev
from aegis_stream.policy.compiler import CompiledPolicy, CompiledRule, actions_names


def _inode(r: CompiledRule) -> str:
    ma, mi = split_kernel_dev(r.dev)
    return f"{ma}:{mi}:{r.ino}"


def _describe(r: CompiledRule) -> str:
    return f"{r.source} -> {_inode(r)} [{','.join(actions_names(r.actions))}]"


@dataclass
class PolicyDiff:
    """What applying a policy would change against the active generation, by rule id (rules and scopes
    added, removed or changed, and a mode change), for ``aegis policy apply --dry-run``."""
    old_label: str
    new_label: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0
    scopes_added: list[str] = field(default_factory=list)
    scopes_removed: list[str] = field(default_factory=list)
    mode_change: str = ""

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.scopes_added
                    or self.scopes_removed or self.mode_change)


def diff_policies(
    old: CompiledPolicy | None, new: CompiledPolicy, *, old_mode: str = "", new_mode: str = ""
) -> PolicyDiff:
    d = PolicyDiff(
        f"{old.name} v{old.version} ({old.digest[:19]})" if old else "(no active policy)",
        f"{new.name} v{new.version} ({new.digest[:19]})",
    )
    old_rules = {r.id: r for r in old.rules} if old else {}
    new_rules = {r.id: r for r in new.rules}
    for rid, r in new_rules.items():
        o = old_rules.get(rid)
        if o is None:
            d.added.append(f"{rid}: {_describe(r)}")
        elif (o.source, o.dev, o.ino, o.actions) != (r.source, r.dev, r.ino, r.actions):
            why = []
            if o.source != r.source:
                why.append("source")
            if (o.dev, o.ino) != (r.dev, r.ino):
                why.append("inode" if o.source == r.source else "target")
            if o.actions != r.actions:
                why.append("actions")
            d.changed.append(f"{rid}: {_describe(o)}  =>  {_describe(r)} ({', '.join(why)})")
        else:
            d.unchanged += 1
    for rid, o in old_rules.items():
        if rid not in new_rules:
            d.removed.append(f"{rid}: {_describe(o)}")
    old_sc = {s.cgroup for s in old.scopes} if old else set()
    new_sc = {s.cgroup for s in new.scopes}
    d.scopes_added = sorted(new_sc - old_sc)
    d.scopes_removed = sorted(old_sc - new_sc)
    om, nm = old_mode or (old.mode if old else ""), new_mode or new.mode
    if om != nm:
        d.mode_change = f"{om or '(none)'} -> {nm}"
    return d


def render_diff(d: PolicyDiff) -> list[str]:
    out = [f"diff {d.old_label} -> {d.new_label}"]
    if d.mode_change:
        out.append(f"  mode: {d.mode_change}")
    out += [f"  + rule {x}" for x in d.added]
    out += [f"  - rule {x}" for x in d.removed]
    out += [f"  ~ rule {x}" for x in d.changed]
    out += [f"  + scope {x}" for x in d.scopes_added]
    out += [f"  - scope {x}" for x in d.scopes_removed]
    out.append(f"  {len(d.added)} added, {len(d.removed)} removed, {len(d.changed)} changed, "
               f"{d.unchanged} unchanged")
    return out


# ------------------------------------------------------------------------------- replay
def scope_cgroup_ids(cp: CompiledPolicy) -> set[int]:
    """Every cgroup id inside the policy's scopes (the scope dirs and all descendants)."""
    ids: set[int] = set()
    for sc in cp.scopes:
        ids.add(sc.cgroup_id)
        for dirpath, dirnames, _ in os.walk(sc.cgroup):
            for d in dirnames:
                try:
                    ids.add(os.stat(os.path.join(dirpath, d)).st_ino)
                except OSError:
                    continue
    return ids


class _Matcher:
    def __init__(self, cp: CompiledPolicy, covered: Callable[[CompiledPolicy], set[int]]):
        self.cp = cp
        self.rules = {(r.dev, r.ino): r for r in cp.rules}
        self.ids = covered(cp) if cp.scopes else set()
        self.paths = [s.cgroup.rstrip("/") for s in cp.scopes]

    def in_scope(self, cgroup_id: int, cgroup_path: str) -> bool:
        if self.cp.host_scope:
            return True
        if cgroup_id in self.ids:
            return True
        return bool(cgroup_path) and any(
            cgroup_path == p or cgroup_path.startswith(p + "/") for p in self.paths
        )

    def match(self, dev: int, ino: int, action_bit: int, cgid: int, cgpath: str):
        r = self.rules.get((dev, ino))
        if r is None or not (r.actions & action_bit) or not self.in_scope(cgid, cgpath):
            return None
        return r


@dataclass
class ReplayReport:
    """A recorded event log replayed against the new policy (and the active one): which past events it
    would newly match, which it still or no longer matches, and the lines that could not be read."""
    events: int = 0
    bad_lines: list[int] = field(default_factory=list)
    newly_matched: list[str] = field(default_factory=list)  # matched now, not before
    still_matched: int = 0
    no_longer_matched: int = 0
    decision: str = "deny"  # what a match means under the new mode


def replay_events(
    lines: Iterable[bytes],
    new: CompiledPolicy,
    old: CompiledPolicy | None = None,
    *,
    new_mode: str = "",
    covered: Callable[[CompiledPolicy], set[int]] = scope_cgroup_ids,
    limit: int = 50,
) -> ReplayReport:
    rep = ReplayReport(decision="deny" if (new_mode or new.mode) == abi.Mode.ENFORCE.label else "audit")
    nm = _Matcher(new, covered)
    om = _Matcher(old, covered) if old else None
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            ev = msgspec.json.decode(raw)
            ma, mi = (int(x) for x in str(ev["dev"]).split(":"))
            dev, ino = kernel_dev(ma, mi), int(ev["ino"])
            action = ev.get("action", "open")
            bit = abi.ACTION_BITS[action] if isinstance(action, str) else int(action)
            cgid = int(ev.get("cgroup_id", 0))
            cgpath = str(ev.get("cgroup_path", "") or "")
        except (msgspec.DecodeError, KeyError, ValueError, TypeError, AttributeError):
            rep.bad_lines.append(i)
            continue
        rep.events += 1
        now = nm.match(dev, ino, bit, cgid, cgpath)
        before = om.match(dev, ino, bit, cgid, cgpath) if om else None
        if now and before:
            rep.still_matched += 1
        elif now:
            if len(rep.newly_matched) < limit:
                who = ev.get("exe") or ev.get("comm") or "?"
                rep.newly_matched.append(
                    f"line {i}: {action} {ma}:{mi}:{ino} by {who} in "
                    f"{cgpath or f'cgroup {cgid}'} -> rule {now.id} ({now.source})"
                )
            else:
                rep.newly_matched.append("")
        elif before:
            rep.no_longer_matched += 1
    return rep


def render_replay(rep: ReplayReport, source: str) -> list[str]:
    shown = [x for x in rep.newly_matched if x]
    n = len(rep.newly_matched)
    out = [f"replay of {rep.events} events from {source}: {n} would now be "
           f"{'denied' if rep.decision == 'deny' else 'audited'} that were not before, "
           f"{rep.still_matched} still match, {rep.no_longer_matched} no longer match"]
    out += [f"  {x}" for x in shown]
    if n > len(shown):
        out.append(f"  ... and {n - len(shown)} more")
    if rep.bad_lines:
        head = ", ".join(str(x) for x in rep.bad_lines[:10])
        out.append(f"  skipped {len(rep.bad_lines)} unreadable lines ({head}"
                   f"{', ...' if len(rep.bad_lines) > 10 else ''})")
    return out
