"""``aegis policy lint``: every problem in a policy file at once, each with its line.

Errors are what ``aegis policy apply`` would refuse (input limits, schema, unknown keys,
duplicate ids, missing paths, two rules on one inode, a target that cannot carry a stable
identity: a directory, a pseudo filesystem, 9p/FUSE/NFS, unless the rule accepts it with
``accept_target``); warnings are what it accepts but probably should not (rules on binaries
the host needs to boot or be recovered).  A rule on a boot-critical binary is reported and
kept: aegis never silently drops a rule.

``--fix`` only makes changes that cannot alter what is enforced: repeated actions within a
rule are deduplicated and exact duplicate rules are removed.  Rule order is left alone (it
is the kernel's rule index).  The rewrite is checked by re-parsing before it is written.
"""

from __future__ import annotations

import difflib
import glob
import json
import os
import re
import sys
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from aegis_stream import inputs
from aegis_stream.errors import PolicyError
from aegis_stream.kernel import abi
from aegis_stream.kernel.devnum import (
    InodeId,
    kernel_dev,
    parse_inode,
    read_mountinfo,
    resolve_inode,
)
from aegis_stream.policy import model
from aegis_stream.policy.compiler import accept_hint, target_problem

BOOT_CRITICAL_PATHS = (
    "/bin/sh", "/usr/bin/sh", "/bin/bash", "/usr/bin/bash", "/sbin/init", "/usr/sbin/init",
    "/lib/systemd/systemd", "/usr/lib/systemd/systemd", "/usr/bin/sudo", "/bin/su",
    "/usr/bin/su", "/bin/login", "/usr/bin/login", "/usr/sbin/sshd", "/sbin/sulogin",
    "/usr/sbin/sulogin",
)
BOOT_CRITICAL_GLOBS = (
    "/lib64/ld-linux*.so*", "/lib/ld-linux*.so*", "/lib/*/ld-linux*.so*",
    "/usr/lib/*/ld-linux*.so*", "/usr/lib64/ld-linux*.so*", "/lib/ld-musl-*.so*",
    "/lib/*/libc.so.6", "/usr/lib/*/libc.so.6", "/lib64/libc.so.6", "/usr/lib64/libc.so.6",
)

POLICY_KEYS = ("apiVersion", "name", "version", "rules", "mode", "scope", "description")
RULE_KEYS = ("id", "path", "inode", "actions", "description", "accept_target")
SCOPE_KEYS = ("cgroup",)


@dataclass(frozen=True)
class Issue:
    """One lint finding with its line: an error (apply would refuse), a warning or an info."""
    level: str  # error | warning | info
    line: int  # 1-based; 0 when unknown
    code: str
    message: str


@dataclass
class LintReport:
    """Every issue found in one policy file; the file fails lint when there is any error."""
    source: str
    issues: list[Issue] = field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "warning"]

    def render(self) -> list[str]:
        out = []
        for i in sorted(self.issues, key=lambda x: (x.line, x.level != "error")):
            loc = f"{self.source}:{i.line}" if i.line else self.source
            out.append(f"{loc}: {i.level}: {i.message} [{i.code}]")
        out.append(f"{self.source}: {len(self.errors)} errors, {len(self.warnings)} warnings")
        return out


# ------------------------------------------------------------------------ TOML line index
_AOT = re.compile(r"^\[\[\s*(.+?)\s*\]\]\s*(#.*)?$")
_TBL = re.compile(r"^\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_KEY = re.compile(
    r"""^((?:"(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_\-]+)"""
    r"""(?:\s*\.\s*(?:"(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_\-]+))*)\s*="""
)
_PART = re.compile(r""""((?:[^"\\]|\\.)*)"|'([^']*)'|([A-Za-z0-9_\-]+)""")


def _key_parts(s: str) -> tuple[str, ...]:
    return tuple(a or b or c for a, b, c in _PART.findall(s))


class LineIndex:
    """Maps document paths (("rules", 2, "actions")) to the TOML line that defines them."""

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple, int] = {}
        self.headers: list[int] = []
        self.count = len(text.splitlines())
        table: tuple = ()
        aot: dict[tuple, int] = {}
        in_ml = ""
        for n, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if in_ml:
                if line.count(in_ml) % 2 == 1:
                    in_ml = ""
                continue
            if not line or line.startswith("#"):
                continue
            if m := _AOT.match(line):
                name = _key_parts(m.group(1))
                i = aot.get(name, 0)
                aot[name] = i + 1
                table = (*name, i)
                self.lines.setdefault(table, n)
                self.headers.append(n)
            elif m := _TBL.match(line):
                table = _key_parts(m.group(1))
                self.lines.setdefault(table, n)
                self.headers.append(n)
            elif m := _KEY.match(line):
                self.lines.setdefault((*table, *_key_parts(m.group(1))), n)
                rest = line[m.end():]
                for q in ('"""', "'''"):
                    if rest.count(q) % 2 == 1:
                        in_ml = q

    def line_of(self, path: tuple) -> int:
        for k in range(len(path), 0, -1):
            if path[:k] in self.lines:
                return self.lines[path[:k]]
        return 0

    def block(self, path: tuple) -> tuple[int, int] | None:
        """(first, last) line of an array-of-tables element, e.g. ("rules", 3)."""
        start = self.lines.get(path)
        if start is None or start not in self.headers:
            return None
        later = [h for h in self.headers if h > start]
        return start, (later[0] - 1 if later else self.count)


_LOC = re.compile(r" - at `\$(.*)`$")
_TOK = re.compile(r"\.([A-Za-z_][\w\-]*)|\[(\d+)\]|\[([^\]]*)\]")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")


def _msgspec_issue(exc: Exception, prefix: tuple, idx: LineIndex) -> Issue:
    msg = str(exc).splitlines()[0]
    path: tuple = prefix
    m = _LOC.search(msg)
    if m:
        for a, b, c in _TOK.findall(m.group(1)):
            path = (*path, a if a else int(b) if b else c)
        msg = msg[: m.start()]
    if u := _UNKNOWN.search(msg):
        path = (*path, u.group(1))
    where = _fmt_path(path)
    return Issue("error", idx.line_of(path), "schema", f"{where}: {msg}" if where else msg)


def _fmt_path(path: tuple) -> str:
    s = ""
    for p in path:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s


# ------------------------------------------------------------------------ critical set
def critical_inodes(paths: Iterable[str] | None = None) -> dict[tuple[int, int], str]:
    if paths is None:
        cand = list(BOOT_CRITICAL_PATHS)
        for g in BOOT_CRITICAL_GLOBS:
            cand += sorted(glob.glob(g))
        cand += [sys.executable, os.path.realpath(sys.executable)]
    else:
        cand = list(paths)
    out: dict[tuple[int, int], str] = {}
    for p in cand:
        if not os.path.exists(p):
            continue
        try:
            ident = resolve_inode(p)
        except PolicyError:
            continue
        out.setdefault((ident.dev, ident.ino), p)
    return out


def _fstype_of_dev(dev: int, mounts: dict | None) -> str:
    if not mounts:
        return ""
    for mi in mounts.values():
        try:
            if kernel_dev(mi.major, mi.minor) == dev:
                return mi.fstype
        except ValueError:  # not a kernel 12:20 device number: cannot be this rule's dev
            continue
    return ""


# ------------------------------------------------------------------------------- lint
def _check_keys(obj: object, allowed: tuple[str, ...], prefix: tuple, idx: LineIndex,
                issues: list[Issue]) -> dict:
    if not isinstance(obj, dict):
        return {}
    for k in obj:
        if k not in allowed:
            near = difflib.get_close_matches(k, allowed, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            path = (*prefix, k)
            issues.append(Issue("error", idx.line_of(path), "unknown-key",
                                f"{_fmt_path(path)}: unknown key {k!r}{hint}"))
    return {k: v for k, v in obj.items() if k in allowed}


def lint_text(
    text: str,
    source: str = "policy",
    *,
    critical: dict[tuple[int, int], str] | None = None,
    check_fs: bool = True,
) -> LintReport:
    rep = LintReport(source)
    issues = rep.issues
    try:  # the input limits, then TOML, exactly as apply reads it
        doc = model.parse_toml(text, source)
    except PolicyError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+)", msg)
        code = "toml" if m else "limit"
        issues.append(Issue("error", int(m.group(1)) if m else 0, code,
                            msg.removeprefix(f"{source}: ") if m else msg))
        return rep
    idx = LineIndex(text)
    top = _check_keys(doc, POLICY_KEYS, (), idx, issues)
    probe = dict(top)
    if isinstance(top.get("rules"), list):
        probe["rules"] = []
    if isinstance(top.get("scope"), list):
        probe["scope"] = []
    try:
        msgspec.convert(probe, model.Policy)
    except msgspec.ValidationError as exc:
        issues.append(_msgspec_issue(exc, (), idx))
    rules: list[tuple[int, model.Rule]] = []
    raw_rules = top.get("rules")
    if isinstance(raw_rules, list):
        if not raw_rules:
            issues.append(Issue("error", idx.line_of(("rules",)), "schema",
                                "rules: a policy needs at least one rule"))
        if len(raw_rules) > abi.MAX_RULES:
            issues.append(Issue("error", idx.line_of(("rules",)), "limit",
                                f"rules: {len(raw_rules)} rules exceed {abi.MAX_RULES}"))
        for i, r in enumerate(raw_rules):
            clean = _check_keys(r, RULE_KEYS, ("rules", i), idx, issues)
            try:
                rules.append((i, msgspec.convert(clean if isinstance(r, dict) else r, model.Rule)))
            except msgspec.ValidationError as exc:
                issues.append(_msgspec_issue(exc, ("rules", i), idx))
    scopes: list[tuple[int, model.Scope]] = []
    raw_scopes = top.get("scope")
    if isinstance(raw_scopes, list):
        for i, s in enumerate(raw_scopes):
            clean = _check_keys(s, SCOPE_KEYS, ("scope", i), idx, issues)
            try:
                scopes.append((i, msgspec.convert(clean if isinstance(s, dict) else s,
                                                  model.Scope)))
            except msgspec.ValidationError as exc:
                issues.append(_msgspec_issue(exc, ("scope", i), idx))
    host_wide = not raw_scopes
    mode = top.get("mode", "audit")
    _check_rules(rules, idx, issues, critical, check_fs, host_wide, mode)
    _check_scopes(scopes, idx, issues, check_fs)
    if not rep.errors:  # lint must never pass what apply refuses
        try:
            model.loads(text, source)
        except PolicyError as exc:
            issues.append(Issue("error", 0, "model", str(exc)))
    return rep


def _check_rules(
    rules: list[tuple[int, model.Rule]],
    idx: LineIndex,
    issues: list[Issue],
    critical: dict[tuple[int, int], str] | None,
    check_fs: bool,
    host_wide: bool,
    mode: object,
) -> None:
    ids: dict[str, int] = {}
    inodes: dict[tuple[int, int], tuple[int, str]] = {}
    crit = critical if critical is not None else (critical_inodes() if check_fs else {})
    try:
        mounts = read_mountinfo() if check_fs else None
    except OSError:
        mounts = None
    for i, r in rules:
        where = f"rules[{i}] ({r.id})"
        line = idx.line_of(("rules", i))
        if r.id in ids:
            issues.append(Issue("error", idx.line_of(("rules", i, "id")) or line, "duplicate-id",
                                f"{where}: duplicate rule id, first used by rules[{ids[r.id]}]"))
        else:
            ids[r.id] = i
        if (r.path is None) == (r.inode is None):
            issues.append(Issue("error", line, "path-or-inode",
                                f"{where}: give exactly one of 'path' or 'inode'"))
            continue
        if not r.actions:
            issues.append(Issue("error", idx.line_of(("rules", i, "actions")) or line, "actions",
                                f"{where}: actions must name at least one of open, exec"))
        elif len(set(r.actions)) != len(r.actions):
            issues.append(Issue("error", idx.line_of(("rules", i, "actions")) or line,
                                "repeated-action",
                                f"{where}: actions repeat an entry (fixable with --fix)"))
        ident: InodeId | None = None
        if r.path is not None:
            pline = idx.line_of(("rules", i, "path")) or line
            try:  # NUL byte, PATH_MAX, NAME_MAX: what apply refuses before resolving
                inputs.check_path(r.path, f"{where}: path", PolicyError)
            except PolicyError as exc:
                issues.append(Issue("error", pline, "bad-path", str(exc)))
                continue
            if not r.path.startswith("/"):
                issues.append(Issue("error", pline, "relative-path",
                                    f"{where}: path {r.path!r} must be absolute"))
                continue
            if not check_fs:
                continue
            if not os.path.lexists(r.path):
                issues.append(Issue("error", pline, "missing-path",
                                    f"{where}: path {r.path!r} does not exist"))
                continue
            try:
                ident = resolve_inode(r.path)
            except PolicyError as exc:
                issues.append(Issue("error", pline, "unresolvable", f"{where}: {exc}"))
                continue
            real = os.path.realpath(r.path)
            if real != os.path.normpath(r.path):
                issues.append(Issue("info", pline, "symlink",
                                    f"{where}: {r.path} is a symlink; the rule denies its target "
                                    f"{real}"))
            is_dir = os.path.isdir(real)
        else:
            assert r.inode is not None
            pline = idx.line_of(("rules", i, "inode")) or line
            try:
                ident = parse_inode(r.inode)
            except PolicyError as exc:
                issues.append(Issue("error", pline, "inode", f"{where}: {exc}"))
                continue
            ident = InodeId(ident.dev, ident.ino, _fstype_of_dev(ident.dev, mounts))
            is_dir = False
        key = (ident.dev, ident.ino)
        if key in inodes:
            j, jid = inodes[key]
            issues.append(Issue("error", pline, "shadowed",
                                f"{where}: names the same inode {ident} as rules[{j}] ({jid}) "
                                "(hardlink or duplicate path); one would shadow the other, "
                                "merge them"))
        else:
            inodes[key] = (i, r.id)
        problem = target_problem(ident.fstype, is_dir)
        if problem is not None:
            kind, why = problem
            target = r.path if r.path is not None else f"inode {r.inode}"
            if kind in r.accept_target:
                issues.append(Issue("info", pline, kind,
                                    f"{where}: {target} {why}; accepted (accept_target)"))
            else:
                issues.append(Issue("error", pline, kind,
                                    f"{where}: {target} {why}; apply refuses it: "
                                    f"{accept_hint(kind)}, or name a regular file"))
        if key in crit:
            scope = "host-wide" if host_wide else "in its scopes"
            sev = " in enforce mode" if mode == abi.Mode.ENFORCE.label else ""
            issues.append(Issue(
                "warning", pline, "boot-critical",
                f"{where}: denies {','.join(r.actions)} of {crit[key]}, which the host needs to "
                f"boot or be recovered ({scope}{sev}); the rule is kept as written, make sure "
                "this is intended",
            ))


def _check_scopes(scopes: list[tuple[int, model.Scope]], idx: LineIndex, issues: list[Issue],
                  check_fs: bool) -> None:
    seen: dict[str, int] = {}
    for i, s in scopes:
        line = idx.line_of(("scope", i, "cgroup")) or idx.line_of(("scope", i))
        try:
            inputs.check_path(s.cgroup, f"scope[{i}].cgroup", PolicyError)
        except PolicyError as exc:
            issues.append(Issue("error", line, "bad-path", str(exc)))
            continue
        if not s.cgroup.startswith("/"):
            issues.append(Issue("error", line, "relative-path",
                                f"scope[{i}].cgroup {s.cgroup!r} must be absolute"))
            continue
        if s.cgroup in seen:
            issues.append(Issue("error", line, "duplicate-scope",
                                f"scope[{i}].cgroup {s.cgroup!r} is listed twice"))
        seen.setdefault(s.cgroup, i)
        if check_fs and not os.path.isdir(s.cgroup):
            issues.append(Issue("error", line, "missing-cgroup",
                                f"scope[{i}].cgroup {s.cgroup!r} does not exist"))


# ------------------------------------------------------------------------------- fix
_ACTIONS_LINE = re.compile(r"^(\s*actions\s*=\s*)(\[[^\]]*\])(\s*(?:#.*)?)$")


def fix_text(text: str) -> tuple[str, list[str]]:
    """Safe rewrites; returns (new text, what changed).  Raises PolicyError if unsafe."""
    try:
        doc = model.parse_toml(text, "policy")
    except PolicyError as exc:
        raise PolicyError(f"cannot fix a file that is not valid TOML: {exc}") from None
    rules = doc.get("rules")
    if not isinstance(rules, list):
        return text, []
    idx = LineIndex(text)
    lines = text.splitlines(keepends=True)
    changes: list[str] = []
    expected: list = []
    for i, r in enumerate(rules):
        if not isinstance(r, dict):
            expected.append(r)
            continue
        acts = r.get("actions")
        if isinstance(acts, list) and all(isinstance(a, str) for a in acts) \
                and len(set(acts)) != len(acts):
            dedup = list(dict.fromkeys(acts))
            ln = idx.lines.get(("rules", i, "actions"))
            m = _ACTIONS_LINE.match(lines[ln - 1].rstrip("\r\n")) if ln else None
            if m and ln:
                eol = lines[ln - 1][len(lines[ln - 1].rstrip("\r\n")):]
                lines[ln - 1] = (f"{m.group(1)}[{', '.join(json.dumps(a) for a in dedup)}]"
                                 f"{m.group(3)}{eol}")
                changes.append(f"line {ln}: rules[{i}] ({r.get('id')}): actions {acts} -> {dedup}")
                r = {**r, "actions": dedup}
            else:
                changes.append(f"rules[{i}] ({r.get('id')}): repeated actions not fixed "
                               "(actions is not a one-line array)")
        expected.append(r)
    seen: dict[bytes, int] = {}
    drop: list[tuple[int, int]] = []
    final: list = []
    for i, r in enumerate(expected):
        key = msgspec.json.encode(r, order="sorted")
        if key in seen:
            blk = idx.block(("rules", i))
            if blk is not None:
                drop.append(blk)
                changes.append(f"lines {blk[0]}-{blk[1]}: removed rules[{i}] ({r.get('id')}), an "
                               f"exact duplicate of rules[{seen[key]}]")
                continue
            changes.append(f"rules[{i}]: exact duplicate of rules[{seen[key]}] not removed "
                           "(not a [[rules]] table)")
        else:
            seen[key] = i
        final.append(r)
    for start, end in sorted(drop, reverse=True):
        del lines[start - 1 : end]
    new = "".join(lines)
    if new == text:
        return text, changes
    try:
        check = tomllib.loads(new)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"--fix produced invalid TOML ({exc}); nothing written") from None
    want = {**doc, "rules": final}
    if check != want:
        raise PolicyError("--fix would change the policy beyond the safe edits; nothing written")
    return new, changes
