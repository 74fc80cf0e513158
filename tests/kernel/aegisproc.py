"""`aegis` commands as child processes forked from a preloaded server, for the lab guests.

Why: a fresh Python start in a TCG guest reads hundreds of files over the 9p root, one
emulated round trip each: `python -c pass` takes 10-20 s there and `aegis --help` 25-50 s,
so the dozens of `aegis` starts in the agent and degraded-mode scenarios were over half of
each kernel's suite time.  Here one forkserver (multiprocessing's, started once per pytest
session) imports the CLI and the agent's dependencies; every command is then a fork of it
that runs the real ``aegis_stream.cli.main.main`` with its own argv, environment, working
directory and stdout/stderr files: a separate process with its own pid, signals, exit status
and kernel state, as `aegis` would be, without the interpreter start.  The console entry
itself (``python -m aegis_stream.cli``) stays covered by CLI-003 and the unit suite's
import test.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# what `aegis run`, `policy`, `status`, `stats`, `keys` and `unload` import; a name that
# fails to import is skipped by the forkserver (and then imported by the child that needs it)
PRELOAD = [
    "tests.kernel.aegisproc",
    "aegis_stream.cli.main",
    "aegis_stream.cli.policy",
    "aegis_stream.agent.run",
    "aegis_stream.agent.status",
    "aegis_stream.agent.doctor",
    "aegis_stream.policy.lifecycle",
    "aegis_stream.pipeline.pipeline",
    "aegis_stream.pipeline.metrics",
    "trio",
    "numpy",
    "prometheus_client",
]

_ctx: multiprocessing.context.ForkServerContext | None = None


def _context() -> multiprocessing.context.ForkServerContext:
    global _ctx
    if _ctx is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _ctx = ctx
    return _ctx


def _child(argv: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """Runs in the forked child: the environment, cwd and std streams `aegis` would have."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    # multiprocessing's child bootstrap ignores SIGINT handling of the parent; the agent
    # installs its own handlers; start from the defaults a fresh process has
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = ["aegis", *argv]
    from aegis_stream.cli.main import main

    rc = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(rc)


class AegisProcess:
    """A running `aegis` command (Popen's interface, as far as the lab tests use it)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None) -> None:
        self.args = ["aegis", *argv]
        self._dir = tempfile.mkdtemp(prefix="aegis-proc-")
        self._out = os.path.join(self._dir, "stdout")
        self._err = os.path.join(self._dir, "stderr")
        env = dict(os.environ if env is None else env)
        self._proc = _context().Process(
            target=_child, args=(list(argv), env, str(cwd or os.getcwd()), self._out, self._err),
            daemon=False)
        self._proc.start()
        self.pid = self._proc.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not self._proc.is_alive():
            self._proc.join()
            self.returncode = self._proc.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        self.returncode = self._proc.exitcode
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def output(self) -> tuple[str, str]:
        """(stdout, stderr) as written so far."""
        return (Path(self._out).read_text(errors="replace") if os.path.exists(self._out) else "",
                Path(self._err).read_text(errors="replace") if os.path.exists(self._err) else "")

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        return self.output()


def run(argv: list[str], env: dict[str, str] | None = None, *, timeout: float = 180,
        check: bool = False, cwd: str | os.PathLike[str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """`aegis ARGV` to completion, like ``subprocess.run(..., capture_output=True, text=True)``."""
    t0 = time.monotonic()
    p = AegisProcess(argv, env, cwd)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise subprocess.TimeoutExpired(p.args, time.monotonic() - t0) from None
    done = subprocess.CompletedProcess(p.args, p.returncode or 0, out, err)
    if check and done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, p.args, out, err)
    return done
