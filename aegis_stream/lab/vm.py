"""Run a command as root in a lab kernel booted under QEMU (virtme-ng), and collect its
result.

Booting: ``vng --verbose --disable-kvm --run <vmlinuz> --rwdir=IODIR --exec "bash
IODIR/run.sh"`` (QEMU TCG: no KVM needed).  The guest's root is the host's ``/`` (read-only
9p), /etc /usr /var /tmp ... and the working directory are copy-on-write overlays, so the
venv, pyenv and the repo are visible at the same paths and guest writes never reach the
host.  The script mounts bpffs / cgroup2 if missing, sets PATH (venv bin first, then
/usr/sbin:/sbin...), cds into ``cwd`` and runs the command with stdout/stderr going to
files in IODIR, a host temp dir shared read-write; its exit status is written to
IODIR/rc.  vng's own exit status is NOT used: without udev on the host (the guest runs the
host's userspace), virtme-ng-init finds no /dev/virtio-ports/* links, falls back to the
serial console and vng exits 255 whatever the command returned.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from aegis_stream.errors import LabError
from aegis_stream.lab.bytecode import precompile, prewrite_pytest
from aegis_stream.lab.kernels import LabKernel, find_kernel, kernel_config

DEFAULT_MEMORY = "1G"
DEFAULT_CPUS = 2
DEFAULT_TIMEOUT = 300.0

# Appended to the kernel command line when the kernel's built-in default LSM list lacks bpf.
# Debian's 6.1/6.12/7.x configs default to "landlock,lockdown,yama,loadpin,safesetid,
# integrity,apparmor,selinux,smack,tomoyo,bpf"-style lists; keep this as a safety net.
LSM_APPEND = "lsm=lockdown,capability,landlock,yama,apparmor,bpf"

_EXTRA_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


@dataclass(frozen=True)
class LabResult:
    """The outcome of one guest command: its exit status and output (read from the
    shared rwdir, not from vng's own exit status), host wall time and guest boot time."""

    returncode: int  # the guest command's exit status
    stdout: str  # the command's stdout
    stderr: str  # the command's stderr (and the guest prologue's)
    seconds: float  # host wall time, boot to power-off
    boot_seconds: float | None = None  # guest uptime when the command started
    console: str = ""  # vng/qemu output: the guest's serial console (boot log)


class LabTimeout(LabError):
    """The guest command ran past its timeout; carries what it had printed so far."""

    def __init__(
        self, message: str, *, stdout: str = "", stderr: str = "", console: str = ""
    ) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.console = console
        super().__init__(message)


def check_host() -> dict[str, str]:
    """Paths of the host tools the lab needs; LabError naming the first one missing."""
    need = {
        "vng": ("vng", "pip install virtme-ng (or: pip install -e '.[lab]')"),
        "qemu": ("qemu-system-x86_64", "apt-get install qemu-system-x86"),
        "busybox": ("busybox", "apt-get install busybox-static"),
        "depmod": ("depmod", "apt-get install kmod"),
    }
    out = {}
    for key, (exe, fix) in need.items():
        path = shutil.which(exe) or shutil.which(exe, path=_host_path())
        if path is None:
            raise LabError(f"{exe} not found: {fix}")
        out[key] = path
    return out


def _host_path() -> str:
    """Host PATH for vng: it runs ``virtme-run`` by name, which lives next to the venv's python."""
    dirs = [
        os.path.dirname(sys.executable),
        *os.environ.get("PATH", "").split(os.pathsep),
        "/usr/sbin",
        "/sbin",
        "/usr/bin",
        "/bin",
    ]
    return os.pathsep.join(dict.fromkeys(d for d in dirs if d))


def lsm_append(config: Mapping[str, str]) -> list[str]:
    """Kernel cmdline additions so that bpf is an active LSM ([] if the default has it)."""
    if config.get("CONFIG_BPF_LSM") not in (None, "y"):
        raise LabError("kernel built without CONFIG_BPF_LSM: the BPF LSM cannot run on it")
    if "bpf" in config.get("CONFIG_LSM", "").split(","):
        return []
    return [LSM_APPEND]


_SAFE_PATH = re.compile(r"[A-Za-z0-9_@%+=:,./~-]+")


def _safe(path: str, what: str) -> str:
    # vng pastes paths into a shell command line unquoted (virtme-ng 1.42)
    if not _SAFE_PATH.fullmatch(path):
        raise LabError(f"{what} {path!r} has characters vng cannot pass through")
    return path


def qemu_args(qemu_opts: str | Sequence[str]) -> list[str]:
    """Extra QEMU arguments as a list: a string is split like a shell would
    (``"-icount shift=0"``), a sequence is taken as separate arguments."""
    args = shlex.split(qemu_opts) if isinstance(qemu_opts, str) else list(qemu_opts)
    for a in args:
        # vng joins them into the shell command line it runs virtme-run with, unquoted
        _safe(a, "QEMU option")
    return args


def guest_script(
    argv: Sequence[str],
    *,
    cwd: str,
    iodir: str,
    env: Mapping[str, str] | None = None,
    path_dirs: Sequence[str] = (),
) -> str:
    """The bash script the guest runs.

    Output goes to files in ``iodir`` (a host directory shared read-write into the guest):
    ``stdout``, ``stderr``, ``rc`` (the command's exit status, written last) and ``boot``
    (guest uptime when the command started).  Files, not vng's virtio-serial streams:
    without udev on the host (the guest runs the host's userspace) virtme-ng-init cannot
    find its /dev/virtio-ports/* links, falls back to the serial console and returns 255.
    """
    if not argv:
        raise LabError("lab exec: empty command")
    path = ":".join(dict.fromkeys([*path_dirs, *_EXTRA_PATH]))
    q = shlex.quote
    io = iodir.rstrip("/")
    lines = [
        f"exec </dev/null >{q(io + '/stdout')} 2>{q(io + '/stderr')}",
        f"cut -d' ' -f1 /proc/uptime >{q(io + '/boot')}",
        "grep -q '^[^ ]* /sys/fs/bpf bpf ' /proc/mounts || "
        "{ mkdir -p /sys/fs/bpf; mount -t bpf bpf /sys/fs/bpf; }",
        "grep -q '^[^ ]* [^ ]* cgroup2 ' /proc/mounts || "
        "{ mkdir -p /sys/fs/cgroup; mount -t cgroup2 cgroup2 /sys/fs/cgroup; }",
        f"export PATH={q(path)}",
        "export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1",
    ]
    for k, v in (env or {}).items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise LabError(f"lab exec: bad environment variable name {k!r}")
        lines.append(f"export {k}={q(v)}")
    lines += [
        f"cd {q(cwd)} || {{ echo 125 >{q(io + '/rc')}; exit 125; }}",
        shlex.join(argv),
        "rc=$?",
        f"echo $rc >{q(io + '/rc.tmp')} && mv {q(io + '/rc.tmp')} {q(io + '/rc')}",
        "sync",
        "exit $rc",
    ]
    return "\n".join(lines) + "\n"


def vng_command(
    kernel: LabKernel,
    script_path: str,
    *,
    vng: str = "vng",
    rwdirs: Sequence[str] = (),
    overlays: Sequence[str] = (),
    memory: str = DEFAULT_MEMORY,
    cpus: int = DEFAULT_CPUS,
    append: Sequence[str] = (),
    qemu_opts: str | Sequence[str] = (),
) -> list[str]:
    """The vng command line.  --verbose so the serial console (boot log) reaches stdout.
    ``qemu_opts``: extra QEMU arguments (see :func:`qemu_args`), passed as one
    ``--qemu-opts=...`` (vng appends them to QEMU's command line)."""
    cmd = [
        vng,
        "--verbose",
        "--disable-kvm",
        "--run",
        _safe(str(kernel.vmlinuz), "kernel path"),
        "--user",
        "root",
        "--memory",
        memory,
        "--cpus",
        str(cpus),
    ]
    for d in rwdirs:
        cmd.append(f"--rwdir={_safe(d, 'directory')}")
    for d in overlays:
        cmd.append(f"--overlay-rwdir={_safe(d, 'directory')}")
    for a in append:
        cmd += ["--append", a]
    extra = qemu_args(qemu_opts)
    if extra:
        # the "=" form: a value starting with "-" would otherwise read as a vng option
        cmd.append("--qemu-opts=" + " ".join(extra))
    cmd += ["--exec", f"bash {_safe(script_path, 'script path')}"]
    return cmd


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


# directories vng already overlays (writable in the guest, unchanged on the host)
_VNG_OVERLAYS = ("/etc", "/lib", "/home", "/opt", "/srv", "/usr", "/var", "/tmp")


def lab_exec(
    kernel: LabKernel | str,
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    memory: str = DEFAULT_MEMORY,
    cpus: int = DEFAULT_CPUS,
    append: Sequence[str] | None = None,
    qemu_opts: str | Sequence[str] = (),
    rwdirs: Sequence[str | os.PathLike[str]] = (),
    overlay_cwd: bool = True,
    cache: str | os.PathLike[str] | None = None,
    on_stdout: Callable[[str], object] | None = None,
    on_stderr: Callable[[str], object] | None = None,
    stream: bool = False,
) -> LabResult:
    """Boot ``kernel`` under QEMU (TCG) and run ``argv`` as root in it; return its exit status.

    ``kernel`` is a LabKernel or a series name (its fetched kernel).  The guest sees the
    host's / read-only at the same paths (so ``cwd``, default the current directory, the
    venv and pyenv are visible); /etc /usr /var /tmp ... are copy-on-write overlays, and so
    is ``cwd`` when ``overlay_cwd`` (guest writes there never reach the host).  ``rwdirs``
    are shared read-write with the host.  ``append`` adds kernel cmdline options (default:
    ``lsm=...,bpf`` only if the kernel's CONFIG_LSM lacks bpf).  ``qemu_opts`` adds QEMU
    arguments (a list, or one string split like a shell would: ``"-icount shift=0"``; only
    characters vng can paste into its shell line unquoted).  ``on_stdout``/``on_stderr``
    receive the command's output while it runs (polled from the shared files); ``stream``
    makes them default to writing to our own stdout/stderr.  The guest's environment has
    ``AEGIS_LAB=1`` and ``AEGIS_LAB_KERNEL=<series>`` besides ``env``.

    Raises LabError when the host lacks vng/qemu/busybox, the kernel is not fetched, or the
    guest never reports an exit status (boot failure: the message has the console tail);
    LabTimeout (a LabError) after ``timeout`` seconds.
    """
    if isinstance(kernel, str):
        kernel = find_kernel(kernel, cache)
    extra_qemu = qemu_args(qemu_opts)  # refuse bad options before booting anything
    if not kernel.vmlinuz.is_file():
        raise LabError(f"kernel {kernel.version} is not fetched: {kernel.vmlinuz} is missing")
    tools = check_host()
    if stream:
        on_stdout = on_stdout or stream_writer(sys.stdout)
        on_stderr = on_stderr or stream_writer(sys.stderr)
    guest_env = {"AEGIS_LAB": "1", "AEGIS_LAB_KERNEL": kernel.series, **(env or {})}
    wd = str(Path(cwd or os.getcwd()).resolve())
    if append is None:
        append = lsm_append(kernel_config(kernel))
    venv_bin = os.path.dirname(os.path.abspath(sys.executable))
    overlays = []
    if overlay_cwd and wd != "/" and not any(_under(wd, d) for d in _VNG_OVERLAYS):
        overlays.append(wd)
    # the guest reads the host's bytecode instead of compiling (and rewriting tests) under TCG
    precompile(wd)
    prewrite_pytest(argv, wd)
    with tempfile.TemporaryDirectory(prefix="aegis-lab-") as iodir:
        io = Path(iodir)
        script = io / "run.sh"
        script.write_text(
            guest_script(argv, cwd=wd, iodir=iodir, env=guest_env, path_dirs=[venv_bin])
        )
        for name in ("stdout", "stderr"):
            (io / name).touch()
        cmd = vng_command(
            kernel,
            str(script),
            vng=tools["vng"],
            rwdirs=[iodir, *(str(Path(d).resolve()) for d in rwdirs)],
            overlays=overlays,
            memory=memory,
            cpus=cpus,
            append=append,
            qemu_opts=extra_qemu,
        )
        console_path = io / "console"
        t0 = time.monotonic()
        with open(console_path, "wb") as console:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PATH": _host_path()},
                cwd=wd,
            )
            tails = [_Tail(io / "stdout", on_stdout), _Tail(io / "stderr", on_stderr)]
            timed_out = False
            try:
                while True:
                    try:
                        proc.wait(timeout=0.25)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    for t in tails:
                        t.poll()
                    if time.monotonic() - t0 > timeout:
                        timed_out = True
                        _killpg(proc)
                        break
            except BaseException:
                _killpg(proc)
                raise
        seconds = time.monotonic() - t0
        for t in tails:
            t.poll()
        stdout = _read(io / "stdout")
        stderr = _read(io / "stderr")
        console_text = _read(console_path)
        rc_text = _read(io / "rc").strip()
        boot_text = _read(io / "boot").strip()
    boot = float(boot_text) if re.fullmatch(r"\d+(\.\d+)?", boot_text) else None
    if timed_out:
        raise LabTimeout(
            f"lab exec on {kernel.version} timed out after {timeout:.0f}s",
            stdout=stdout,
            stderr=stderr,
            console=console_text,
        )
    if not rc_text.isdigit():
        tail = " | ".join(_console_tail(console_text, 6)) or "no console output"
        raise LabError(
            f"lab exec on {kernel.version}: the guest reported no exit status "
            f"(vng exit {proc.returncode}); console: {tail}"
        )
    return LabResult(int(rc_text), stdout, stderr, seconds, boot_seconds=boot, console=console_text)


def stream_writer(f: TextIO) -> Callable[[str], object]:
    def write(text: str) -> None:
        f.write(text)
        f.flush()

    return write


class _Tail:
    """Feed what was appended to a file since the last poll to a callback."""

    def __init__(self, path: Path, sink: Callable[[str], object] | None) -> None:
        self.path = path
        self.sink = sink
        self.pos = 0

    def poll(self) -> None:
        if self.sink is None:
            return
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return
        if data:
            self.pos += len(data)
            self.sink(data.decode(errors="replace"))


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _console_tail(text: str, n: int) -> list[str]:
    lines = [ln.strip() for ln in text.replace("\r", "").splitlines() if ln.strip()]
    return lines[-n:]


def _killpg(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
