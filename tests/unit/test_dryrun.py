"""`policy apply --dry-run`: diff against the active generation and event replay."""

from __future__ import annotations

import argparse
import contextlib
import json

import pytest

from aegis_stream.cli import policy as cli_policy
from aegis_stream.kernel.devnum import resolve_inode
from aegis_stream.kernel.maps import PolicyMaps
from aegis_stream.policy import compiler, dryrun, model
from aegis_stream.policy.lifecycle import Lifecycle


def _pol(tmp_path, version, rules, mode="audit"):
    body = "".join(
        f'[[rules]]\nid = "{rid}"\npath = "{tmp_path / name}"\nactions = {json.dumps(acts)}\n'
        for rid, name, acts in rules
    )
    return (f'apiVersion = "aegis/v1"\nname = "web"\nversion = {version}\nmode = "{mode}"\n\n'
            + body).encode()


@pytest.fixture
def files(tmp_path):
    for n in ("a", "b", "c", "d"):
        (tmp_path / n).write_text(n)
    return tmp_path


def _compile(src):
    return compiler.compile_policy(model.loads(src))


def test_diff_added_removed_changed(files) -> None:
    old = _compile(_pol(files, 1, [("a", "a", ["open"]), ("b", "b", ["exec"]),
                                   ("c", "c", ["exec"])]))
    new = _compile(_pol(files, 2, [("a", "a", ["open"]), ("b", "b", ["open", "exec"]),
                                   ("c", "d", ["exec"]), ("n", "c", ["open"])], mode="enforce"))
    d = dryrun.diff_policies(old, new)
    assert [x.split(":")[0] for x in d.added] == ["n"]
    assert d.removed == []
    assert [x.split(":")[0] for x in d.changed] == ["b", "c"]
    assert "(actions)" in d.changed[0] and "(source, target)" in d.changed[1]
    ino = resolve_inode(str(files / "d"))
    assert str(ino) in d.changed[1]
    assert d.unchanged == 1 and d.mode_change == "audit -> enforce"
    text = "\n".join(dryrun.render_diff(d))
    assert "+ rule n" in text and "1 added, 0 removed, 2 changed, 1 unchanged" in text


def test_diff_against_nothing(files) -> None:
    d = dryrun.diff_policies(None, _compile(_pol(files, 1, [("a", "a", ["open"])])))
    assert d.old_label == "(no active policy)" and len(d.added) == 1


def _event(path, action="open", cgroup_id=1, cgroup_path="", comm="cat"):
    ident = resolve_inode(str(path))
    ma, mi = ident.dev >> 20, ident.dev & ((1 << 20) - 1)
    return json.dumps({"dev": f"{ma}:{mi}", "ino": ident.ino, "action": action,
                       "cgroup_id": cgroup_id, "cgroup_path": cgroup_path, "comm": comm}).encode()


def test_replay_reports_events_the_new_policy_would_deny(files) -> None:
    old = _compile(_pol(files, 1, [("a", "a", ["open"])]))
    new = _compile(_pol(files, 2, [("a", "a", ["open"]), ("b", "b", ["exec"])], "enforce"))
    lines = [
        _event(files / "a"),                      # matched before and now
        _event(files / "b", "exec", comm="sh"),   # newly denied
        _event(files / "b", "open"),              # b only denies exec
        _event(files / "c"),                      # no rule
        b"not json",
        b'{"dev": "8", "ino": 1}',
        b"",
    ]
    rep = dryrun.replay_events(lines, new, old)
    assert rep.events == 4 and rep.still_matched == 1 and rep.bad_lines == [5, 6]
    assert len(rep.newly_matched) == 1 and "line 2: exec" in rep.newly_matched[0]
    assert "by sh" in rep.newly_matched[0] and "rule b" in rep.newly_matched[0]
    text = "\n".join(dryrun.render_replay(rep, "ev.jsonl"))
    assert "1 would now be denied" in text and "skipped 2 unreadable lines" in text


def test_replay_respects_scopes(files) -> None:
    cp = _compile(_pol(files, 1, [("a", "a", ["open"])]))
    scoped = compiler.CompiledPolicy(
        cp.name, cp.version, "enforce", cp.digest, cp.rules,
        [compiler.CompiledScope(0, "/sys/fs/cgroup/app.slice", 4242)],
    )
    lines = [
        _event(files / "a", cgroup_id=4242),
        _event(files / "a", cgroup_id=7, cgroup_path="/sys/fs/cgroup/app.slice/x.service"),
        _event(files / "a", cgroup_id=7, cgroup_path="/sys/fs/cgroup/other.slice"),
        _event(files / "a", cgroup_id=99),
    ]
    rep = dryrun.replay_events(lines, scoped, covered=lambda c: {4242})
    assert len(rep.newly_matched) == 2


def test_cli_dry_run_changes_nothing(files, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("AEGIS_STATE_DIR", str(tmp_path / "state"))
    maps = PolicyMaps.fake(64)
    Lifecycle(maps).apply(_pol(files, 1, [("a", "a", ["open"])]))
    before = {k: dict(m.data) for k, m in vars(maps).items()}

    @contextlib.contextmanager
    def fake_kernel():
        yield maps, lambda gen: {}

    monkeypatch.setattr(cli_policy, "_kernel", fake_kernel)
    p = files / "v2.toml"
    p.write_bytes(_pol(files, 2, [("a", "a", ["open"]), ("b", "b", ["exec"])]))
    ev = files / "ev.jsonl"
    ev.write_bytes(_event(files / "b", "exec") + b"\n")
    log_before = (tmp_path / "state" / "provenance.jsonl").read_bytes()
    args = argparse.Namespace(file=str(p), mode=None, dry_run=True, events=str(ev))
    assert cli_policy.cmd_policy_apply(args) == 0
    out = capsys.readouterr().out
    assert "active: generation 1" in out and "+ rule b" in out
    assert "1 would now be audited" in out and "nothing was changed" in out
    assert {k: dict(m.data) for k, m in vars(maps).items()} == before
    assert (tmp_path / "state" / "provenance.jsonl").read_bytes() == log_before

    # an enforce-mode unsigned policy: the dry run says it would be refused (exit 1)
    args = argparse.Namespace(file=str(p), mode="enforce", dry_run=True, events=None)
    assert cli_policy.cmd_policy_apply(args) == 1
    assert "WOULD BE REFUSED" in capsys.readouterr().out
