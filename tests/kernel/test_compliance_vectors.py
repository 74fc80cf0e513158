"""Golden policy vectors, replayed exactly (VEC-nnn).

Each tests/kernel/vectors/*.toml becomes one test, test_vec_<nnn>_<file>: build the
fixture, apply the policy, run every step, and compare the transcript (outcome + every
decision event, field for field) with the vector.  Adding a vector adds a scenario.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from aegis_stream.kernel import abi
from aegis_stream.kernel.devnum import resolve_inode
from aegis_stream.kernel.events import DECISION_NAMES, MODE_NAMES

from . import vectorlib
from .conftest import Lab, cgroup_id

ACTION_NAMES = {abi.ACTION_OPEN: "open", abi.ACTION_EXEC: "exec"}


def _build(d: Path, fixture: list[dict]) -> None:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for fx in fixture:
        if "file" in fx:
            p = d / fx["file"]
            p.write_text(fx.get("content", "secret\n"))
            p.chmod(fx.get("mode", 0o644))
        elif "binary" in fx:
            shutil.copy2(fx.get("source", "/bin/true"), d / fx["binary"])
        elif "dir" in fx:
            (d / fx["dir"]).mkdir(parents=True, exist_ok=True)
        elif "symlink" in fx:
            (d / fx["symlink"]).symlink_to(fx["target"])  # relative to the vector dir
        elif "hardlink" in fx:
            os.link(d / fx["target"], d / fx["hardlink"])


def _host(d: Path, st: dict) -> None:
    p = d / st["path"]
    if st["host"] == "rename":
        os.rename(p, d / st["to"])
    elif st["host"] == "unlink":
        p.unlink()
    elif st["host"] == "write":
        p.write_text(st.get("content", "x\n"))
    elif st["host"] == "link":
        os.link(p, d / st["to"])
    elif st["host"] == "symlink":
        (d / st["to"]).symlink_to(st["path"])


def _outcome(out) -> dict:
    r = out.result
    if "errno" in r:
        return {"errno": r["errno"]}
    if r.get("ok") is True:
        return {"ok": True}
    return {"exit": out.returncode}


def replay(lab: Lab, spec: dict) -> list[dict]:
    d = lab.files / "vec" / spec["id"]
    _build(d, spec["fixture"])
    cgs = {"selected": lab.cg_selected, "child": lab.cg_child, "other": lab.cg_other}
    cg_name = {cgroup_id(p): n for n, p in cgs.items()}
    rules = []
    for r in spec["rules"]:
        entry = {"id": r["id"], "actions": r.get("actions", ["open", "exec"])}
        if "path" in r:
            entry["path"] = str(d / r["path"])
        else:
            ident = resolve_inode(str(d / r["inode_of"]))
            entry["inode"] = f"{ident.dev >> 20}:{ident.dev & 0xFFFFF}:{ident.ino}"
        rules.append(entry)
    res = lab.apply(rules, mode=spec["mode"], scopes=[cgs[s] for s in spec["scopes"]])
    # inode names as at apply time: files and binaries (links are other names of those)
    names: dict[tuple[int, int], str] = {}
    for fx in spec["fixture"]:
        for kind in ("file", "binary", "dir"):
            if kind in fx:
                i = resolve_inode(str(d / fx[kind]))
                names.setdefault((i.dev, i.ino), fx[kind])
    rule_ids = [r.id for r in res.policy.rules]
    transcript = []
    for n, st in enumerate(spec["steps"]):
        if "host" in st:
            _host(d, st)
            continue
        cg = st.get("cgroup", "selected")
        out = lab.probe(st["op"], d / st["path"], *st.get("args", []), cgroup=cgs[cg])
        evs = []
        for e in lab.drain():
            evs.append(dict(sorted({
                "hook": abi.HOOK_NAMES[abi.Hook(e.hook)],
                "decision": DECISION_NAMES[abi.Decision(e.decision)],
                "action": ACTION_NAMES.get(e.action, str(e.action)),
                "rule": rule_ids[e.rule_id],
                "inode": names.get((e.dev, e.ino), f"{e.dev}:{e.ino}"),
                "cgroup": cg_name.get(e.cgroup_id, str(e.cgroup_id)),
                "scope": "host" if e.scope_cgroup_id == 0 else cg_name.get(
                    e.scope_cgroup_id, str(e.scope_cgroup_id)),
                "mode": MODE_NAMES[abi.Mode(e.mode)],
                "comm": e.comm,
                "generation": "applied" if e.generation == res.generation else e.generation,
            }.items())))
        transcript.append({"step": n, "op": st["op"], "path": st["path"],
                           "outcome": _outcome(out), "events": evs})
    return transcript


def _make(path: Path):
    spec = vectorlib.load(path)

    def test(lab: Lab) -> None:
        got = replay(lab, spec)
        want = vectorlib.expected_transcript(spec)
        for g, w in zip(got, want, strict=True):
            assert g == w, f"{spec['id']} step {w['step']}: got {g}, want {w}"

    num = spec["id"].split("-")[1]
    test.__name__ = f"test_vec_{num}_{path.stem.replace('-', '_')}"
    test.__doc__ = f"{spec['id']}: {spec['title']}"
    return test


for _p in vectorlib.all_vectors():
    _t = _make(_p)
    globals()[_t.__name__] = _t
