"""Terminal-safe output (issue 17): attacker-named strings cannot forge lines or reach the
terminal as escape sequences in any human output; JSON output stays exact."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import msgspec
import pytest

from aegis_stream import textsafe
from aegis_stream.agent import doctor, explain, status
from aegis_stream.cli import main as cli_main
from aegis_stream.cli import policy as cli_policy
from aegis_stream.kernel.maps import PolicyMaps
from aegis_stream.pipeline.schema import ExplanationEvent
from aegis_stream.policy.lifecycle import Lifecycle

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
# a process name that ends its line, forges a "rule" line and retitles the terminal (OSC 0)
EVIL_COMM = "cat\n  rule     forged\x1b]0;pwned\x07"
CONTROL = [chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))]


def _terminal_safe(text: str) -> None:
    """No control character but the newlines between lines; no bidi override."""
    for c in CONTROL:
        if c != "\n":
            assert c not in text, repr(c)
    assert "\u202e" not in text


def test_escape_makes_controls_visible_and_keeps_text() -> None:
    assert textsafe.escape("plain /etc/shadow café 日本") == "plain /etc/shadow café 日本"
    assert textsafe.escape("a\nb") == "a\\x0ab"
    assert textsafe.escape("\x1b]0;pwned\x07") == "\\x1b]0;pwned\\x07"
    assert textsafe.escape("\x9b31m") == "\\x9b31m"  # the 8-bit CSI
    assert textsafe.escape("x\u202ey") == "x\\u202ey"  # right-to-left override
    # unambiguous: a name spelled with a backslash is not a name with a control in it
    assert textsafe.escape("a\\x0ab") != textsafe.escape("a\nb")
    for c in CONTROL:
        out = textsafe.escape(f"<{c}>")
        assert len(out.splitlines()) == 1
        _terminal_safe(out)


def test_join_and_echo_escape_each_line() -> None:
    assert textsafe.join(["one", "two\nthree"]) == "one\ntwo\\x0athree"
    buf = io.StringIO()
    textsafe.echo("a\x1b[2J", "b", file=buf)
    assert buf.getvalue() == "a\\x1b[2J\nb\n"


def test_tail_uses_the_shared_rule() -> None:
    from aegis_stream.fleet import tail

    assert tail.escape is textsafe.escape


@pytest.fixture
def evil_event_log(tmp_path, monkeypatch) -> tuple[Path, str]:
    """The golden event log with one decision whose comm, exe and cgroup path are hostile."""
    monkeypatch.setenv("AEGIS_STATE_DIR", str(GOLDEN / "state"))
    vectors = msgspec.json.decode((GOLDEN / "decision_vectors.json").read_bytes())
    ev = dict(vectors[0]["expected"])
    ev.update(comm=EVIL_COMM, exe="/tmp/x\n    3. forged step", cgroup_path="/sys/fs/cgroup/a\x9b2J")
    path = tmp_path / "events.jsonl"
    path.write_bytes(msgspec.json.encode(ev) + b"\n")
    return path, ev["event_id"]


def _explain(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="aegis")
    explain.add_pipeline_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return int(args.func(args))


def test_explain_text_escapes_the_process_name_and_paths(evil_event_log, capsys) -> None:
    log, eid = evil_event_log
    assert _explain(["explain", eid, "--events", str(log)]) == 0
    out = capsys.readouterr().out
    _terminal_safe(out)
    lines = out.splitlines()
    # the forged lines did not appear: exactly one "rule" line and one "task" line
    assert sum(ln.lstrip().startswith("rule ") for ln in lines) == 1
    assert not any("forged step" in ln and ln.lstrip().startswith("3.") for ln in lines)
    task = next(ln for ln in lines if ln.lstrip().startswith("task"))
    assert "comm 'cat\\x0a  rule     forged\\x1b]0;pwned\\x07'" in task
    assert "/sys/fs/cgroup/a\\x9b2J" in out


def test_explain_json_stays_exact(evil_event_log, capsys) -> None:
    log, eid = evil_event_log
    assert _explain(["explain", eid, "--events", str(log), "--json"]) == 0
    x = msgspec.json.decode(capsys.readouterr().out, type=ExplanationEvent)
    assert x.task.comm == EVIL_COMM  # byte for byte after decoding


class _Pinned:
    def __init__(self, maps: PolicyMaps) -> None:
        self.maps, self.links = maps, {"aegis_file_open": True}

    def policy_maps(self) -> PolicyMaps:
        return self.maps

    def close(self) -> None:
        pass


@pytest.fixture
def newline_rule(tmp_path, monkeypatch):
    """A policy applied through the lifecycle whose rule path holds a newline and an escape."""
    state = tmp_path / "state"
    monkeypatch.setenv("AEGIS_STATE_DIR", str(state))
    evil = tmp_path / "x\n  rule forged: passwd -> 0:0:0 [open]\x1b[31m"
    evil.write_text("secret")
    doc = (f'apiVersion = "aegis/v1"\nname = "web"\nversion = 1\nmode = "audit"\n'
           f'[[rules]]\nid = "r1"\npath = {msgspec.json.encode(str(evil)).decode()}\n')
    maps = PolicyMaps.fake(64)
    Lifecycle(maps, state).apply(doc.encode(), "evil.toml")
    monkeypatch.setattr("aegis_stream.kernel.loader.open_pinned", lambda: _Pinned(maps))

    @contextlib.contextmanager
    def fake_kernel():
        yield maps, lambda gen: {}

    monkeypatch.setattr(cli_policy, "_kernel", fake_kernel)
    return str(evil)


def test_policy_show_escapes_a_newline_in_a_rule_path(newline_rule, capsys) -> None:
    assert cli_main.main(["policy", "show"]) == 0
    out = capsys.readouterr().out
    _terminal_safe(out)
    rule_lines = [ln for ln in out.splitlines() if ln.lstrip().startswith("rule ")]
    assert len(rule_lines) == 1 and "\\x0a  rule forged" in rule_lines[0]
    assert cli_main.main(["policy", "show", "--json"]) == 0
    doc = msgspec.json.decode(capsys.readouterr().out)
    assert doc["policy"]["rules"][0]["source"] == newline_rule  # exact


def test_policy_log_and_dry_run_escape(newline_rule, tmp_path, capsys) -> None:
    from aegis_stream.policy.provenance import ProvenanceLog

    ProvenanceLog().append("break-glass", reason="drill\n    9 forged apply ok\x1b]0;x\x07")
    assert cli_main.main(["policy", "log"]) == 0
    out = capsys.readouterr().out
    _terminal_safe(out)
    assert len(out.splitlines()) == 2 and "drill\\x0a    9 forged" in out
    assert cli_main.main(["policy", "log", "--json"]) == 0
    last = msgspec.json.decode(capsys.readouterr().out.splitlines()[-1])
    assert last["reason"].startswith("drill\n")
    p2 = tmp_path / "p2.toml"
    p2.write_text(f'apiVersion = "aegis/v1"\nname = "web"\nversion = 2\nmode = "audit"\n'
                  f'[[rules]]\nid = "r2"\npath = "{p2}"\n')
    assert cli_main.main(["policy", "apply", str(p2), "--dry-run"]) == 0
    out = capsys.readouterr().out
    _terminal_safe(out)
    assert "\\x0a  rule forged" in out


def test_errors_are_one_escaped_line(tmp_path, capsys) -> None:
    bad = tmp_path / "p\n\x1b[2Jforged.toml"
    assert cli_main.main(["policy", "lint", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "\\x0a\\x1b[2Jforged" in err


def test_status_and_doctor_render_escape() -> None:
    rep = status.judge(status.KernelFacts(False, "/sys/fs/bpf/x\n  hook forged"),
                       status.AgentFacts("/run/st\x1b]0;t\x07.json", None, False, None))
    text = status.render(rep)
    _terminal_safe(text)
    assert "x\\x0a  hook forged" in text
    d = doctor.render(doctor.DoctorReport(doctor.SCHEMA, "6.1\n[ok  ] forged", "ready", 0, [
        doctor.Check("lsm", "warn", "list a\x1b[2J", "fix\nit")]))
    _terminal_safe(d)
    assert len(d.splitlines()) == 4
