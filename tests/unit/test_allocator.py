"""The agent re-executes itself once on the C allocator (aegis_stream/agent/allocator.py)."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

from aegis_stream.agent import allocator

ROOT = Path(__file__).resolve().parents[2]
PROBE = ("import os; from aegis_stream.agent import allocator as a; "
         "a.reexec_on_c_malloc(); print(os.getpid(), a.allocator())")


def _run(code: str, **env: str | None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"}
    e.update({k: v for k, v in env.items() if v is not None})
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                          timeout=60, check=True)


def test_a_process_started_on_pymalloc_reexecutes_itself_on_malloc_keeping_its_pid() -> None:
    # the probe prints once, from the re-executed interpreter: the first never returns
    out = _run(PROBE + "; import sys; print(sys.orig_argv[1])").stdout.split()
    assert out[1] == "malloc" and out[2] == "-c"
    pid = _run("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
               f"{PROBE!r}], stdout=subprocess.PIPE, text=True); print(p.pid, p.communicate()[0])")
    child, reported, alloc = pid.stdout.split()
    assert child == reported and alloc == "malloc"  # same pid across the exec


def test_an_operators_own_choice_is_left_alone() -> None:
    assert _run(PROBE, PYTHONMALLOC="pymalloc").stdout.split()[1] == "pymalloc"
    assert _run(PROBE, PYTHONMALLOC="malloc").stdout.split()[1] == "malloc"


def test_a_failed_exec_leaves_the_process_as_it_was(monkeypatch) -> None:
    monkeypatch.setattr(allocator, "STARTED_WITH", None)
    monkeypatch.delenv("PYTHONMALLOC", raising=False)

    def refuse(path: str, argv: object) -> None:
        raise PermissionError("seccomp")

    assert allocator.reexec_on_c_malloc(["python", "-m", "aegis_stream.cli", "run"], refuse) is False
    assert "PYTHONMALLOC" not in os.environ


def test_the_exec_gets_the_interpreters_whole_command_line(monkeypatch) -> None:
    monkeypatch.setattr(allocator, "STARTED_WITH", None)
    monkeypatch.delenv("PYTHONMALLOC", raising=False)
    seen: list[tuple[str, list[str], str | None]] = []
    argv = ["/usr/bin/python3", "-X", "faulthandler", "/usr/bin/aegis", "run", "--config", "x"]
    assert allocator.reexec_on_c_malloc(
        argv, lambda p, a: seen.append((p, list(a), os.environ.get("PYTHONMALLOC")))) is True
    assert seen == [(sys.executable, argv, "malloc")]


def test_the_cli_reexecutes_only_the_agent_and_only_from_a_real_command_line(monkeypatch) -> None:
    from aegis_stream.cli import main as cli

    calls: list[int] = []
    monkeypatch.setattr(allocator, "reexec_on_c_malloc", lambda: calls.append(1) or False)
    monkeypatch.setattr(cli, "cmd_run", lambda args: 0)
    monkeypatch.setattr(sys, "argv", ["aegis", "run"])
    parser = cli.build_parser  # cmd_run is bound at parse time: rebuild with the stub
    monkeypatch.setattr(cli, "build_parser", lambda: _with_run(parser(), cli.cmd_run))
    assert cli.main() == 0 and calls == [1]
    assert cli.main(["run"]) == 0 and calls == [1]  # an in-process call (tests) is not exec'd


def _with_run(parser, func):
    for action in parser._subparsers._group_actions:  # the `run` subcommand's handler
        action.choices["run"].set_defaults(func=func)
    return parser


def test_the_unit_sets_the_allocator_so_systemd_starts_need_no_reexec() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((ROOT / "packaging" / "aegis.service").read_text())
    assert unit["Service"]["Environment"] == "PYTHONMALLOC=malloc"
