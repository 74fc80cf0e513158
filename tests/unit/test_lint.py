"""`aegis policy lint`: every problem with its line; `--fix` only makes safe edits."""

from __future__ import annotations

import argparse
import os
import sys
import tomllib

import pytest

from aegis_stream.cli import policy as cli_policy
from aegis_stream.errors import PolicyError
from aegis_stream.kernel.devnum import InodeId
from aegis_stream.policy import lint, model


def _doc(tmp_path, body: str, head: str = "") -> str:
    return (f'apiVersion = "aegis/v1"\nname = "web"\nversion = 1\n{head}\n' + body).replace(
        "TMP", str(tmp_path))


def _codes(rep):
    return [(i.code, i.line) for i in rep.issues]


@pytest.fixture
def files(tmp_path):
    for n in ("a", "b"):
        (tmp_path / n).write_text(n)
    return tmp_path


def test_clean_policy(files) -> None:
    text = _doc(files, '[[rules]]\nid = "a"\npath = "TMP/a"\n')
    rep = lint.lint_text(text, critical={})
    assert rep.issues == []
    assert rep.render()[-1].endswith("0 errors, 0 warnings")


def test_schema_errors_carry_toml_line_numbers(files) -> None:
    text = _doc(files, (
        '[[rules]]\n'                    # 5
        'id = "a"\n'                     # 6
        'path = "TMP/a"\n'               # 7
        '\n'                             # 8
        '[[rules]]\n'                    # 9
        'id = "b"\n'                     # 10
        'path = "TMP/b"\n'               # 11
        'actions = ["open", "write"]\n'  # 12
    ))
    rep = lint.lint_text(text, "p.toml", critical={})
    assert [(i.code, i.line) for i in rep.errors] == [("schema", 12)]
    assert "rules[1].actions[1]" in rep.errors[0].message
    assert rep.render()[0].startswith("p.toml:12: error:")


def test_top_level_type_error_line(files) -> None:
    text = _doc(files, '[[rules]]\nid = "a"\npath = "TMP/a"\n').replace(
        "version = 1", 'version = "one"')
    rep = lint.lint_text(text, critical={})
    assert _codes(rep) == [("schema", 3)]


def test_all_unknown_keys_reported_with_suggestions(files) -> None:
    text = _doc(files, (
        '[[rules]]\n'             # 5
        'id = "a"\n'              # 6
        'pth = "TMP/a"\n'         # 7
        '[[rules]]\n'             # 8
        'id = "b"\n'              # 9
        'path = "TMP/b"\n'        # 10
        'action = ["open"]\n'     # 11
    ), head='modes = "enforce"')  # 4
    rep = lint.lint_text(text, critical={})
    unknown = [(i.line, i.message) for i in rep.issues if i.code == "unknown-key"]
    assert [u[0] for u in unknown] == [4, 7, 11]
    assert "did you mean 'mode'" in unknown[0][1]
    assert "did you mean 'path'" in unknown[1][1]
    assert "did you mean 'actions'" in unknown[2][1]


def test_toml_syntax_error_line(files) -> None:
    rep = lint.lint_text('apiVersion = "aegis/v1"\nname = \n', critical={})
    assert rep.errors[0].code == "toml" and rep.errors[0].line == 2


def test_duplicate_ids_missing_paths_and_shadowing(files) -> None:
    os.link(files / "a", files / "a-hardlink")
    text = _doc(files, (
        '[[rules]]\nid = "a"\npath = "TMP/a"\n'              # 5-7
        '[[rules]]\nid = "a"\npath = "TMP/b"\n'              # 8-10
        '[[rules]]\nid = "gone"\npath = "TMP/nope"\n'        # 11-13
        '[[rules]]\nid = "hl"\npath = "TMP/a-hardlink"\n'    # 14-16
    ))
    rep = lint.lint_text(text, critical={})
    assert sorted(_codes(rep)) == [("duplicate-id", 9), ("missing-path", 13), ("shadowed", 16)]
    shadow = next(i for i in rep.issues if i.code == "shadowed")
    assert "rules[0] (a)" in shadow.message


def test_unstable_inode_filesystem_is_an_error_unless_accepted(files, monkeypatch) -> None:
    # apply refuses it (compiler.target_problem); lint says so, with the opt-in as its fix
    monkeypatch.setattr(lint, "resolve_inode", lambda p: InodeId(99, 7, "nfs4"))
    text = _doc(files, '[[rules]]\nid = "a"\npath = "TMP/a"\n')
    rep = lint.lint_text(text, critical={})
    assert _codes(rep) == [("unstable-inode", 7)]
    assert rep.issues[0].level == "error" and "nfs4" in rep.issues[0].message
    assert 'accept_target = ["unstable-inode"]' in rep.issues[0].message
    ok = lint.lint_text(text + 'accept_target = ["unstable-inode"]\n', critical={})
    assert not ok.errors and [i.level for i in ok.issues] == ["info"]


def test_boot_critical_binary_warns_and_the_rule_is_kept(files) -> None:
    crit = lint.critical_inodes([sys.executable])
    assert crit  # the agent's own python is always there
    text = _doc(files, f'[[rules]]\nid = "py"\npath = "{sys.executable}"\nactions = ["exec"]\n',
                head='mode = "enforce"')
    rep = lint.lint_text(text, critical=crit)
    warn = [i for i in rep.issues if i.code == "boot-critical"]
    assert len(warn) == 1 and warn[0].level == "warning" and warn[0].line == 7
    assert "host-wide in enforce mode" in warn[0].message and "kept" in warn[0].message
    assert not rep.errors
    assert [r.id for r in model.loads(text).rules] == ["py"]  # not dropped


def test_default_critical_set_includes_shell_and_own_python() -> None:
    crit = set(lint.critical_inodes().values())
    assert sys.executable in crit or os.path.realpath(sys.executable) in crit
    if os.path.exists("/bin/sh"):
        assert any(p in crit for p in ("/bin/sh", "/usr/bin/sh")) or os.path.islink("/bin/sh")


def test_directory_and_symlink_notes(files) -> None:
    (files / "d").mkdir()
    os.symlink(files / "b", files / "link")
    text = _doc(files, ('[[rules]]\nid = "d"\npath = "TMP/d"\n'
                        '[[rules]]\nid = "l"\npath = "TMP/link"\n'))
    rep = lint.lint_text(text, critical={})
    assert sorted(_codes(rep)) == [("directory", 7), ("symlink", 10)]


def test_semantic_checks_without_filesystem(files) -> None:
    text = _doc(files, ('[[rules]]\nid = "a"\npath = "rel/x"\n'
                        '[[rules]]\nid = "b"\npath = "/x"\ninode = "8:1:2"\n'
                        '[[rules]]\nid = "c"\ninode = "8:1:3"\nactions = []\n'))
    rep = lint.lint_text(text, critical={}, check_fs=False)
    assert sorted(_codes(rep)) == [("actions", 15), ("path-or-inode", 8), ("relative-path", 7)]


def test_lint_never_passes_what_apply_refuses(files) -> None:
    text = _doc(files, '')  # no rules at all
    rep = lint.lint_text(text, critical={})
    assert rep.errors


# ------------------------------------------------------------------------------ --fix
FIXME = '''apiVersion = "aegis/v1"
name = "web"
version = 1

# the shell
[[rules]]
id = "a"
path = "TMP/a"
actions = ["exec", "open", "exec"]  # twice

[[rules]]
id = "b"
path = "TMP/b"

[[rules]]
id = "b"
path = "TMP/b"

[[scope]]
cgroup = "/sys/fs/cgroup"
'''


def test_fix_dedupes_actions_and_removes_exact_duplicates(files) -> None:
    text = FIXME.replace("TMP", str(files))
    before = lint.lint_text(text, critical={}, check_fs=False)
    assert {i.code for i in before.errors} == {"repeated-action", "duplicate-id"}
    new, changes = lint.fix_text(text)
    assert len(changes) == 2
    assert changes[0].startswith("line 9: rules[0] (a): actions")
    assert changes[1].startswith("lines 15-18: removed rules[2] (b)")
    assert 'actions = ["exec", "open"]  # twice' in new
    assert "# the shell" in new
    doc = tomllib.loads(new)
    assert [r["id"] for r in doc["rules"]] == ["a", "b"]
    assert doc["scope"] == [{"cgroup": "/sys/fs/cgroup"}]
    assert not lint.lint_text(new, critical={}, check_fs=False).errors
    assert lint.fix_text(new) == (new, [])


def test_fix_leaves_semantic_problems_alone(files) -> None:
    text = _doc(files, ('[[rules]]\nid = "a"\npath = "TMP/a"\n'
                        '[[rules]]\nid = "a"\npath = "TMP/b"\n'))
    assert lint.fix_text(text) == (text, [])


def test_fix_refuses_invalid_toml() -> None:
    with pytest.raises(PolicyError, match="not valid TOML"):
        lint.fix_text("name = ")


def _lint_args(path, fix=False):
    return argparse.Namespace(file=str(path), fix=fix, no_fs=False)


def test_cli_lint_fix_rewrites_file(files, capsys) -> None:
    p = files / "p.toml"
    p.write_text(FIXME.replace("TMP", str(files)).replace(
        '[[scope]]\ncgroup = "/sys/fs/cgroup"\n', ""))
    os.chmod(p, 0o640)
    assert cli_policy.cmd_policy_lint(_lint_args(p)) == 1
    assert cli_policy.cmd_policy_lint(_lint_args(p, fix=True)) == 0
    out = capsys.readouterr().out
    assert "fix: line 9" in out and "fix: rewrote" in out and "0 errors" in out
    assert oct(os.stat(p).st_mode & 0o777) == oct(0o640)
    assert model.load(p).rules[0].actions == ["exec", "open"]
