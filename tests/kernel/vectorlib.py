"""Golden policy vectors (tests/kernel/vectors/*.toml): loading and validation.

A vector is a policy, a filesystem fixture and an ordered list of steps; each probe step
names the exact outcome (errno / ok / exit status) and the exact list of decision events.
tests/kernel/test_compliance_vectors.py replays each vector in a lab kernel and compares
the transcript field for field; tests/unit/test_vectors_schema.py validates them on any host.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

VECTOR_DIR = Path(__file__).with_name("vectors")
PROBE_OPS = {"open", "read", "exec", "execveat", "fexecve", "mmap_exec", "mmap_read",
             "reopen_opath", "handle", "uring_open"}
HOST_OPS = {"rename", "unlink", "write", "link", "symlink"}
CGROUPS = {"selected", "child", "other"}
HOOKS = {"file_open", "bprm_check_security", "mmap_file", "file_mprotect"}
DECISIONS = {"deny", "audit"}
ACTIONS = {"open", "exec"}
EVENT_KEYS = {"hook", "decision", "action", "rule", "inode", "cgroup", "scope", "comm"}


class VectorError(ValueError):
    pass


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise VectorError(f"{where}: {msg}")


def default_scope(scopes: list[str], cgroup: str) -> str:
    if not scopes:
        return "host"
    if cgroup in scopes:
        return cgroup
    if cgroup == "child" and "selected" in scopes:
        return "selected"
    return "none"


def load(path: Path) -> dict:
    spec = tomllib.loads(path.read_text())
    w = path.name
    for k in ("id", "title", "mode", "scopes", "fixture", "rules", "steps"):
        _need(k in spec, w, f"missing key {k!r}")
    _need(spec["id"].startswith("VEC-") and spec["id"][4:].isdigit(), w, "id must be VEC-nnn")
    _need(spec["mode"] in ("audit", "enforce"), w, "mode must be audit or enforce")
    _need(all(s in CGROUPS for s in spec["scopes"]), w, f"scopes must be within {CGROUPS}")
    names = set()
    for i, fx in enumerate(spec["fixture"]):
        kinds = [k for k in ("file", "binary", "symlink", "hardlink", "dir") if k in fx]
        _need(len(kinds) == 1, f"{w} fixture[{i}]", "exactly one of file/binary/symlink/...")
        if kinds[0] in ("symlink", "hardlink"):
            _need("target" in fx, f"{w} fixture[{i}]", "needs a target")
        names.add(fx[kinds[0]])
    rule_ids = set()
    for i, r in enumerate(spec["rules"]):
        _need(("path" in r) != ("inode_of" in r), f"{w} rules[{i}]", "path or inode_of")
        _need(set(r.get("actions", ["open", "exec"])) <= ACTIONS, f"{w} rules[{i}]", "actions")
        rule_ids.add(r["id"])
    for i, st in enumerate(spec["steps"]):
        where = f"{w} steps[{i}]"
        if "host" in st:
            _need(st["host"] in HOST_OPS, where, f"host op must be one of {HOST_OPS}")
            continue
        _need(st.get("op") in PROBE_OPS, where, f"op must be one of {PROBE_OPS}")
        _need(st.get("cgroup", "selected") in CGROUPS, where, "cgroup")
        exp = st.get("expect", {})
        _need(len(exp) == 1 and next(iter(exp)) in ("errno", "ok", "exit"), where,
              "expect is exactly one of {errno = N}, {ok = true}, {exit = N}")
        _need("events" in st, where, "events must be listed (use [] for none)")
        for ev in st["events"]:
            _need(set(ev) <= EVENT_KEYS, where, f"event keys must be within {EVENT_KEYS}")
            _need(ev.get("hook") in HOOKS and ev.get("decision") in DECISIONS
                  and ev.get("action") in ACTIONS, where, "event hook/decision/action")
            _need(ev.get("rule") in rule_ids, where, f"unknown rule {ev.get('rule')!r}")
            _need(ev.get("inode") in names, where, f"unknown inode {ev.get('inode')!r}")
    return spec


def all_vectors() -> list[Path]:
    return sorted(VECTOR_DIR.glob("*.toml"))


def expected_transcript(spec: dict) -> list[dict]:
    """What the replay must produce, step by step (probe steps only), defaults filled."""
    out = []
    for i, st in enumerate(spec["steps"]):
        if "host" in st:
            continue
        cg = st.get("cgroup", "selected")
        evs = []
        for ev in st["events"]:
            full = {"cgroup": cg, "scope": default_scope(spec["scopes"], cg), "comm": "probe",
                    **ev}
            full["mode"] = spec["mode"]
            full["generation"] = "applied"
            evs.append(dict(sorted(full.items())))
        out.append({"step": i, "op": st["op"], "path": st["path"], "outcome": st["expect"],
                    "events": evs})
    return out
