"""``aegis`` as a whole never prints a Python traceback (issue 16): every subcommand is fed
hostile arguments and must answer with exactly one stderr line and a non-zero exit, in a
(generous) time bound.

Each case runs ``main(argv)`` in a forked child (the parent has imported everything, so a case
costs milliseconds, not an interpreter start): the child's stdout and stderr go to files, the
parent kills it past the bound (a hang fails the test instead of the suite), and the real
process boundary proves the exit code.  The subcommands are read from the parser itself, so a
new one is covered without editing this file.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aegis_stream.cli import main as cli

BOUND_S = 10.0  # generous: a refusal takes milliseconds; a regression that hangs is caught


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [prefix]
    out: list[tuple[str, ...]] = []
    for name, p in subs[0].choices.items():
        out += leaf_commands(p, (*prefix, name))
    return out


LEAVES = leaf_commands(cli.build_parser())


class Result:
    def __init__(self, rc: int, out: str, err: str, seconds: float) -> None:
        self.rc, self.out, self.err, self.seconds = rc, out, err, seconds


def run_cli(argv: list[str], tmp: Path, *, rlimit_as: int | None = None) -> Result:
    out_p, err_p = tmp / f"out.{os.getpid()}", tmp / f"err.{os.getpid()}"
    t = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setsid()
            fd0 = os.open(os.devnull, os.O_RDONLY)
            fd1 = os.open(out_p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            fd2 = os.open(err_p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            for fd, target in ((fd0, 0), (fd1, 1), (fd2, 2)):
                os.dup2(fd, target)
            sys.stdin = open(0, closefd=False)  # noqa: SIM115
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", errors="backslashreplace", closefd=False)  # noqa: SIM115
            if rlimit_as:
                import resource

                resource.setrlimit(resource.RLIMIT_AS, (rlimit_as, rlimit_as))
            try:
                rc = cli.main(argv)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        except BaseException:  # the guard let something through: show it as the harness would
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            os._exit(99)
    deadline = t + BOUND_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"aegis {argv!r} did not answer within {BOUND_S} s")
        time.sleep(0.005)
    seconds = time.monotonic() - t
    rc = os.waitstatus_to_exitcode(status)
    return Result(rc, out_p.read_text(errors="replace"), err_p.read_text(errors="replace"), seconds)


def assert_refused(r: Result, argv: list[str]) -> None:
    assert "Traceback" not in r.err + r.out, f"aegis {argv!r}: traceback\n{r.err}"
    assert r.rc not in (0, 99), f"aegis {argv!r}: exit {r.rc}\n{r.err}"
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("aegis: "), f"aegis {argv!r}: stderr {r.err!r}"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AEGIS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("AEGIS_PIN_ROOT", str(tmp_path / "pins"))
    monkeypatch.setenv("AEGIS_CONFIG", "")
    monkeypatch.delenv("AEGIS_EVENTS", raising=False)
    monkeypatch.delenv("AEGIS_DEBUG", raising=False)
    return tmp_path


HOSTILE_ARGS = {
    "nul": "a\x00b",
    "non-utf8": "a\udcffb",
    "overlong": "/" + "x" * 5000,
    "unknown-flag": "--no-such-flag",
}


def test_every_subcommand_is_covered() -> None:
    names = {" ".join(leaf) for leaf in LEAVES}
    assert {"run", "policy apply", "policy lint", "explain", "status", "keys add"} <= names
    assert len(LEAVES) >= 20


@pytest.mark.parametrize("kind", list(HOSTILE_ARGS))
def test_every_subcommand_refuses_hostile_arguments_in_one_line(env: Path, kind: str) -> None:
    slow = []
    for leaf in LEAVES:
        argv = [*leaf, HOSTILE_ARGS[kind]]
        r = run_cli(argv, env)
        assert_refused(r, argv)
        assert r.rc == 2, f"aegis {argv!r}: a usage refusal exits 2, got {r.rc}"
        # wall clock on a shared host: milliseconds normally, 1 s seen under a load of 15
        slow += [(argv[:2], round(r.seconds, 2))] if r.seconds > 3.0 else []
    assert not slow, f"refusals slower than 3 s: {slow}"


@pytest.mark.parametrize("argv", [
    ["policy", "apply", "--canary-seconds", "inf", "--max-deny-rate", "1", "p.toml"],
    ["policy", "apply", "--canary-seconds", "nan", "--max-deny-rate", "1", "p.toml"],
    ["policy", "log", "--tail", "-1"],
    ["policy", "sign", "p.toml", "--key", "k", "--expires-in", "1e400"],
    ["keys", "add", "k.pub", "--expires-in", "-5"],
])
def test_numbers_that_are_not_finite_or_negative_are_refused(env: Path, argv: list[str]) -> None:
    r = run_cli(argv, env)
    assert_refused(r, argv)
    assert r.rc == 2


def _hostile_files(tmp: Path) -> dict[str, str]:
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    deep = tmp / "deep.toml"
    deep.write_text('apiVersion = "aegis/v1"\nname = "x"\nversion = 1\nx = ' + "[" * 100_000)
    garbage = tmp / "garbage"
    garbage.write_bytes(bytes(range(256)) * 64)
    big = tmp / "big"
    with open(big, "wb") as fh:
        fh.truncate(40 << 20)  # sparse
    d = tmp / "dir"
    d.mkdir()
    return {"dev-zero": "/dev/zero", "fifo": str(fifo), "deep": str(deep), "garbage": str(garbage),
            "big": str(big), "dir": str(d), "missing": str(tmp / "missing")}


# every argument that names a file aegis reads, per subcommand
FILE_ARGS = [
    ["policy", "apply", "{f}"],
    ["policy", "apply", "--dry-run", "{f}"],
    ["policy", "lint", "{f}"],
    ["policy", "lint", "--no-fs", "{f}"],
    ["policy", "verify", "{f}"],
    ["policy", "sign", "{f}", "--key", "{f}", "--key-id", "k", "--out", "{tmp}/out.signed"],
    ["keys", "add", "{f}", "--id", "k"],
    ["explain", "e1", "--events", "{f}"],
    ["run", "--policy", "{f}", "--events", "{tmp}/ev.jsonl", "--exit-after", "0.1"],
    ["run", "--config", "{f}"],
]


@pytest.mark.parametrize("template", FILE_ARGS, ids=lambda t: " ".join(t[:2]))
def test_hostile_files_are_refused_in_one_line(env: Path, template: list[str]) -> None:
    files = _hostile_files(env)
    for kind, f in files.items():
        argv = [a.replace("{f}", f).replace("{tmp}", str(env)) for a in template]
        r = run_cli(argv, env)
        if argv[:2] == ["policy", "lint"] and not r.err:  # lint's findings are its report (stdout)
            assert r.rc == 1 and "Traceback" not in r.out, (argv, r.rc, r.out)
            assert r.out.splitlines()[-1].endswith("1 errors, 0 warnings"), r.out
        else:
            assert_refused(r, argv)
        assert r.seconds < 5, f"aegis {argv!r} took {r.seconds:.2f} s ({kind})"


def test_dev_zero_under_a_400mb_address_space_limit(env: Path) -> None:
    # the lab case: MemoryError traceback after 37 s; now refused at open, nothing read
    argv = ["policy", "apply", "/dev/zero"]
    r = run_cli(argv, env, rlimit_as=400 << 20)
    assert_refused(r, argv)
    assert "character device, not a regular file" in r.err and r.seconds < 2


def test_status_with_a_hostile_status_file_reports_without_a_traceback(env: Path) -> None:
    for f in _hostile_files(env).values():
        r = run_cli(["status", "--status-file", f], env)
        assert "Traceback" not in r.err + r.out and r.rc in (1, 2, 3), (f, r.rc, r.err)


def test_explain_stdin_hostile(env: Path, tmp_path: Path) -> None:
    r = run_cli(["explain", "-"], env)  # stdin is /dev/null: empty
    assert_refused(r, ["explain", "-"])


def test_an_unexpected_exception_is_one_line_with_a_bug_hint(env: Path, monkeypatch) -> None:
    def boom(args: argparse.Namespace) -> int:
        raise KeyError("surprise\nsecond line")

    monkeypatch.setattr(cli, "cmd_doctor", boom)
    r = run_cli(["doctor"], env)
    assert_refused(r, ["doctor"])
    assert r.rc == cli.EXIT_BUG and "internal error: KeyError" in r.err and "bug" in r.err


@pytest.mark.parametrize("exc, code, text", [
    (KeyboardInterrupt, 130, "interrupted"),
    (MemoryError, 70, "out of memory"),
    (RecursionError, 70, "nested too deeply"),
])
def test_interrupt_and_resource_errors_are_one_line(env: Path, monkeypatch, exc, code, text) -> None:
    def boom(args: argparse.Namespace) -> int:
        raise exc()

    monkeypatch.setattr(cli, "cmd_doctor", boom)
    r = run_cli(["doctor"], env)
    assert_refused(r, ["doctor"])
    assert r.rc == code and text in r.err


def test_the_real_entry_point_has_no_traceback(tmp_path: Path) -> None:
    # one real interpreter start: the console script's path, not just main()
    env = dict(os.environ, AEGIS_STATE_DIR=str(tmp_path), AEGIS_CONFIG="")
    p = subprocess.run([sys.executable, "-m", "aegis_stream.cli", "policy", "lint", "/dev/zero"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_pinned_state_that_is_not_bpf_is_one_line(env: Path) -> None:
    # regular files where the pins should be (a pin root that is not bpffs): show and stats
    # refuse in one line, status reports "nothing loaded"
    pins = env / "pins"
    pins.mkdir()
    from aegis_stream.kernel import abi

    for name in (*abi.MAP_MAX_ENTRIES, "aegis_policy_slots"):
        (pins / name).write_bytes(b"\x00" * 64)
    for argv in (["policy", "show"], ["stats"], ["stats", "--json"]):
        assert_refused(run_cli(argv, env), argv)
    r = run_cli(["status", "--json"], env)
    assert "Traceback" not in r.err and r.rc in (2, 3) and not r.err
