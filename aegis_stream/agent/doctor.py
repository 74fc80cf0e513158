"""`aegis doctor`: can this host enforce, and is enforcement a measured fact?

Each check is pass / warn / fail with a reason and a fix.  Exit codes:
0 ready, 1 degraded (enforcement possible with caveats), 2 cannot enforce.
"""

from __future__ import annotations

import ctypes
import enum
import errno as errno_mod
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import msgspec

from aegis_stream import textsafe
from aegis_stream.errors import AegisError
from aegis_stream.kernel import abi, btrfs_layout, builds, libbpf, slots
from aegis_stream.kernel.loader import (
    ALL_PROGRAMS,
    OPTIONAL_PROGRAMS,
    REQUIRED_PROGRAMS,
    BpfObject,
    core_uses_module_btf,
    effective_capabilities,
)
from aegis_stream.policy.compiler import CompiledPolicy, CompiledRule, CompiledScope, cgroup2_mounts

SCHEMA = "aegis.doctor.v1"
CAP_SYS_ADMIN, CAP_BPF, CAP_PERFMON, CAP_SYS_RESOURCE = 21, 39, 38, 24


class Check(msgspec.Struct, frozen=True):
    """One row of ``aegis doctor``: ``status`` is pass, warn or fail, ``reason`` says what was
    measured, and ``fix`` what the operator can do (empty when there is nothing to do)."""
    name: str
    status: str  # pass | warn | fail
    reason: str
    fix: str = ""


class Verdict(enum.StrEnum):
    """``aegis doctor``'s answer; :attr:`exit_code` is its exit status."""

    READY = "ready"
    DEGRADED = "degraded"
    CANNOT_ENFORCE = "cannot_enforce"

    @property
    def exit_code(self) -> int:
        return {Verdict.READY: 0, Verdict.DEGRADED: 1, Verdict.CANNOT_ENFORCE: 2}[self]


class DoctorReport(msgspec.Struct, frozen=True):
    """``aegis doctor --json``: can this host enforce, check by check."""

    schema: str
    kernel: str
    verdict: Verdict
    exit_code: int
    checks: list[Check]


@dataclass
class Ctx:
    """What the checks learned that later ones read: whether ``bpf`` is in the active LSM list
    decides how a program probe's load failure is explained.  Nothing sets ``loadable`` yet."""
    lsm_has_bpf: bool = False
    loadable: bool = False


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def check_kernel(ctx: Ctx) -> Check:
    rel = platform.release()
    try:
        major, minor = (int(x) for x in rel.split(".")[:2])
    except ValueError:
        return Check("kernel", "warn", f"cannot parse kernel release {rel!r}")
    if (major, minor) < (5, 10):
        return Check("kernel", "fail", f"kernel {rel} < 5.10 (no BPF LSM with ring buffers)",
                     "use a 5.10+ kernel (6.1+ recommended)")
    return Check("kernel", "pass", f"kernel {rel}")


def _kernel_config() -> tuple[str, dict[str, str]] | None:
    import gzip

    rel = platform.release()
    for path in (f"/boot/config-{rel}", "/proc/config.gz", f"/lib/modules/{rel}/config"):
        try:
            if path.endswith(".gz"):
                text = gzip.open(path, "rt").read()
            else:
                text = Path(path).read_text()
        except OSError:
            continue
        conf = {}
        for line in text.splitlines():
            if line.startswith("CONFIG_") and "=" in line:
                k, v = line.split("=", 1)
                conf[k] = v
        return path, conf
    return None


def check_config(ctx: Ctx) -> Check:
    found = _kernel_config()
    if found is None:
        return Check("kernel-config", "pass",
                     "kernel config not readable here; BPF LSM support is judged from the active "
                     "LSM list and the load probes below")
    path, conf = found
    missing = [k for k in ("CONFIG_BPF_LSM", "CONFIG_DEBUG_INFO_BTF", "CONFIG_BPF_SYSCALL")
               if conf.get(k) != "y"]
    if missing:
        return Check("kernel-config", "fail", f"{path}: {', '.join(missing)} not set",
                     "use a kernel built with CONFIG_BPF_LSM=y and CONFIG_DEBUG_INFO_BTF=y")
    return Check("kernel-config", "pass", f"{path}: CONFIG_BPF_LSM=y, CONFIG_DEBUG_INFO_BTF=y")


def check_btf(ctx: Ctx) -> Check:
    if os.path.exists("/sys/kernel/btf/vmlinux"):
        return Check("btf", "pass", "kernel BTF at /sys/kernel/btf/vmlinux (CO-RE relocations)")
    return Check("btf", "fail", "no /sys/kernel/btf/vmlinux: CO-RE cannot relocate",
                 "use a kernel built with CONFIG_DEBUG_INFO_BTF=y")


def check_lsm(ctx: Ctx) -> Check:
    lsm = _read("/sys/kernel/security/lsm")
    if lsm is None:
        return Check("lsm", "fail", "securityfs not mounted: active LSM list unknown",
                     "mount -t securityfs securityfs /sys/kernel/security")
    ctx.lsm_has_bpf = "bpf" in lsm.split(",")
    if ctx.lsm_has_bpf:
        return Check("lsm", "pass", f"bpf is an active LSM ({lsm})")
    return Check("lsm", "fail", f"bpf is not in the active LSM list ({lsm})",
                 f"add lsm={lsm},bpf to the kernel command line and reboot")


def check_bpffs(ctx: Ctx) -> Check:
    with open("/proc/self/mountinfo") as fh:
        if any(" /sys/fs/bpf " in line and " - bpf " in line for line in fh):
            return Check("bpffs", "pass", "bpffs mounted at /sys/fs/bpf (links and maps can be pinned)")
    return Check("bpffs", "warn", "bpffs not mounted: enforcement would stop with the agent",
                 "mount -t bpf bpf /sys/fs/bpf")


def check_cgroup2(ctx: Ctx) -> Check:
    mounts = cgroup2_mounts()
    if not mounts:
        return Check("cgroup2", "fail", "no cgroup v2 mount: scopes cannot be selected",
                     "mount -t cgroup2 none /sys/fs/cgroup")
    if "/sys/fs/cgroup" in mounts:
        return Check("cgroup2", "pass", "unified cgroup v2 at /sys/fs/cgroup")
    return Check("cgroup2", "warn", f"hybrid cgroup hierarchy: cgroup v2 at {', '.join(mounts)}",
                 "scope paths must name directories under that mount")


def check_caps(ctx: Ctx) -> Check:
    eff = effective_capabilities()
    have = {n for n, b in (("CAP_SYS_ADMIN", CAP_SYS_ADMIN), ("CAP_BPF", CAP_BPF),
                           ("CAP_PERFMON", CAP_PERFMON)) if eff & (1 << b)}
    if "CAP_SYS_ADMIN" in have or {"CAP_BPF", "CAP_PERFMON"} <= have:
        return Check("capabilities", "pass", f"effective: {', '.join(sorted(have))}")
    return Check("capabilities", "fail", "needs CAP_SYS_ADMIN (or CAP_BPF + CAP_PERFMON)",
                 "run as root")


def check_lockdown(ctx: Ctx) -> Check:
    ld = _read("/sys/kernel/security/lockdown")
    if ld is None:
        return Check("lockdown", "pass", "lockdown not reported (securityfs) or not built in")
    if "[confidentiality]" in ld:
        return Check("lockdown", "warn", f"lockdown={ld}: some BPF helpers are refused")
    return Check("lockdown", "pass", f"lockdown {ld}")


PTRACE_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"
_PTRACE_FIX = ("sysctl -w kernel.yama.ptrace_scope=1 and keep it: echo kernel.yama.ptrace_scope=1 "
               "> /etc/sysctl.d/10-ptrace.conf (or run readers of protected files under a uid "
               "that scoped tasks do not share)")


def check_ptrace_scope(ctx: Ctx, path: str = PTRACE_SCOPE) -> Check:
    """BYP-PTRACE-FD (docs/BYPASS_CATALOG.md): with Yama off or at scope 0, a scoped task may
    pidfd_getfd() an fd, or read /proc/PID/mem, of any same-uid process outside the scope."""
    scope = _read(path)
    if scope is None:
        return Check("ptrace-scope", "warn",
                     "Yama is not active (no kernel.yama.ptrace_scope): a scoped task can take "
                     "a denied file's fd (pidfd_getfd) or mapping (/proc/PID/mem) from any "
                     "same-uid process outside the scope",
                     "add yama to the kernel's lsm= list and set kernel.yama.ptrace_scope=1, "
                     "or run readers of protected files under a uid that scoped tasks do not "
                     "share")
    if scope == "0":
        return Check("ptrace-scope", "warn",
                     "kernel.yama.ptrace_scope=0: a scoped task can take a denied file's fd "
                     "(pidfd_getfd) or mapping (/proc/PID/mem) from any same-uid process "
                     "outside the scope", _PTRACE_FIX)
    return Check("ptrace-scope", "pass",
                 f"kernel.yama.ptrace_scope={scope}: only ancestors (1), CAP_SYS_PTRACE (2) or "
                 "no one (3) may take another process's fds or memory")


def check_memlock(ctx: Ctx) -> Check:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    try:
        memcg = tuple(int(x) for x in platform.release().split(".")[:2]) >= (5, 11)
    except ValueError:
        memcg = False
    if memcg:
        return Check("memlock", "pass", "kernel >= 5.11 charges BPF memory to memcg, not memlock")
    enough = 64 << 20
    if soft == resource.RLIM_INFINITY or soft >= enough:
        return Check("memlock", "pass", "memlock limit sufficient")
    # libbpf >= 1.0 raises RLIMIT_MEMLOCK to infinity itself at load when the kernel does
    # not charge BPF memory to memcg (5.10: measured in the lab, every map created with a
    # 64 KiB soft limit); it can when the hard limit allows or CAP_SYS_RESOURCE lets it
    raisable = effective_capabilities() & (1 << CAP_SYS_RESOURCE)
    if hard == resource.RLIM_INFINITY or hard >= enough or raisable:
        return Check("memlock", "pass",
                     f"RLIMIT_MEMLOCK {soft} bytes, raised by libbpf at load (kernel < 5.11 "
                     "charges BPF memory to memlock)")
    return Check("memlock", "warn", f"RLIMIT_MEMLOCK {soft} bytes (hard {hard}): kernels < 5.11 "
                 "need more and this process cannot raise it",
                 "LimitMEMLOCK=infinity in the unit, or ulimit -l unlimited")


def probe_program(name: str, lsm_has_bpf: bool = True) -> Check:
    """Load exactly one program (others not autoloaded): a real verifier pass."""
    obj = BpfObject(pin_root_dir="/nonexistent-doctor-probe")
    try:
        obj.open()
        lib = libbpf.lib()
        assert obj._obj is not None
        for other in ALL_PROGRAMS:
            p = lib.bpf_object__find_program_by_name(obj._obj, other.encode())
            if not p:  # an optional program an older object lacks
                continue
            lib.bpf_program__set_autoload(p, other == name)
        ret = lib.bpf_object__load(obj._obj)
        if ret < 0:
            err = libbpf.errno_of(ret)
            vlog = obj._log_bufs[name].value.decode(errors="replace").strip()
            ename = errno_mod.errorcode.get(err, str(err))
            if err == errno_mod.EPERM and not vlog:
                return Check(f"load:{name}", "fail",
                             "kernel refused to load the LSM program with EPERM before the "
                             "verifier ran (empty verifier log)"
                             + (", although bpf is in the active LSM list: this kernel does "
                                "not allow BPF LSM programs here" if lsm_has_bpf else ""),
                             "this host cannot enforce; run enforcement in the lab: "
                             "aegis lab exec -- aegis doctor")
            tail = " | ".join(vlog.splitlines()[-3:])
            return Check(f"load:{name}", "fail", f"load failed: {ename}; verifier: {tail}",
                         "see the verifier log with --json")
        return Check(f"load:{name}", "pass", "loaded and verified")
    except AegisError as exc:
        return Check(f"load:{name}", "fail", str(exc))
    finally:
        obj.close(keep_pins=False)


_PROOF_CHILD = (
    "import os,sys\n"
    "open(sys.argv[1]+'/cgroup.procs','w').write(str(os.getpid()))\n"
    "try:\n"
    "    os.close(os.open(sys.argv[2], os.O_RDONLY)); print('opened')\n"
    "except OSError as e:\n"
    "    print('errno', e.errno)\n"
)


def synthetic_deny_proof() -> Check:
    """Deny a fresh file for a throwaway cgroup and watch the kernel refuse the open."""
    roots = cgroup2_mounts()
    if not roots:
        return Check("deny-proof", "fail", "no cgroup v2 mount to build a throwaway scope")
    libc = ctypes.CDLL(None, use_errno=True)
    mnt = tempfile.mkdtemp(prefix="aegis-doctor-")
    cg = os.path.join(roots[0], f"aegis-doctor-{os.getpid()}")
    obj = BpfObject(pin_root_dir="/nonexistent-doctor-probe")
    mounted = False
    try:
        if libc.mount(b"tmpfs", mnt.encode(), b"tmpfs", 0, b"size=1m") != 0:
            return Check("deny-proof", "fail", f"mount tmpfs: {os.strerror(ctypes.get_errno())}")
        mounted = True
        target = os.path.join(mnt, "canary")
        Path(target).write_text("canary\n")
        os.mkdir(cg)
        obj.open()
        obj.load()
        report = obj.attach_all(pin=False)
        if not report.enforcing_capable:
            return Check("deny-proof", "fail", report.summary())
        from aegis_stream.kernel.devnum import resolve_inode

        ident = resolve_inode(target)
        cp = CompiledPolicy(
            "doctor-proof", 1, abi.Mode.ENFORCE.label, "sha256:doctor",
            [CompiledRule(0, "doctor-canary", target, ident.dev, ident.ino, abi.ACTION_OPEN)],
            [CompiledScope(0, cg, os.stat(cg).st_ino)],
        )
        slots.swap(obj.policy_maps(), cp, 1, int(abi.Mode.ENFORCE))
        out = subprocess.run([sys.executable, "-c", _PROOF_CHILD, cg, target],
                             capture_output=True, text=True, timeout=30)
        inside = out.stdout.strip()
        outside_ok = True
        try:
            os.close(os.open(target, os.O_RDONLY))
        except OSError:
            outside_ok = False
        if inside == f"errno {errno_mod.EPERM}" and outside_ok:
            return Check("deny-proof", "pass",
                         "open of a denied inode from a selected cgroup got EPERM; "
                         "the same open outside the scope succeeded")
        return Check("deny-proof", "fail",
                     f"expected EPERM in scope and success outside; got {inside or out.stderr!r}"
                     f" in scope, {'success' if outside_ok else 'failure'} outside")
    except (AegisError, OSError, subprocess.SubprocessError) as exc:
        return Check("deny-proof", "fail", f"proof could not run: {exc}")
    finally:
        obj.close(keep_pins=False)
        if os.path.isdir(cg):
            try:
                os.rmdir(cg)
            except OSError:
                pass
        if mounted:
            libc.umount2(mnt.encode(), 0)
        shutil.rmtree(mnt, ignore_errors=True)


def check_build(choice: builds.BuildChoice) -> Check:
    """Which build of the programs loads here and why (the feature probe's answer)."""
    name = choice.build.value if choice.build else "custom"
    return Check("build", "pass", f"{name} build ({choice.path.name}): {choice.reason}")


def check_btrfs(keying: btrfs_layout.BtrfsKeying) -> Check:
    """How btrfs inodes will be keyed (GAP-BTRFS-SUBVOL): by subvolume (module BTF, its
    file, or the build table), or by s_dev, which a loaded but unknown btrfs makes a warning:
    a rule still denies, and so does a same-numbered file of another subvolume."""
    if keying.source is not btrfs_layout.LayoutSource.NONE:
        return Check("btrfs-keys", "pass", f"by subvolume ({keying.source}): {keying.reason}")
    if btrfs_layout.module_build_id() is None:
        return Check("btrfs-keys", "pass", keying.reason)
    return Check("btrfs-keys", "warn", keying.reason,
                 f"scripts/btrfs-layout --release {platform.release()} (needs the kernel's -dbg "
                 "package), or a kernel with module BTF (5.11+)")


def optional_probe(c: Check) -> Check:
    """An optional program (path continuity) that does not load is a warning: enforcement works
    without it, degraded (path rules protect the inode named at apply until the agent restages)."""
    if c.status != "fail":
        return c
    return Check(c.name, "warn", "path continuity unavailable (enforcement works; a file renamed "
                 f"over a path rule's path is protected only once the agent restages): {c.reason}",
                 c.fix)


def run_doctor() -> DoctorReport:
    ctx = Ctx()
    checks = [f(ctx) for f in (check_kernel, check_config, check_btf, check_lsm, check_bpffs, check_cgroup2,
                              check_caps, check_lockdown, check_ptrace_scope, check_memlock)]
    choice = builds.choose_build()
    if not choice.path.exists():
        checks.append(Check("object", "fail", f"{choice.path} missing", "make -C bpf"))
    else:
        checks.append(check_build(choice))
        checks.append(check_btrfs(btrfs_layout.choose(core_uses_module_btf=core_uses_module_btf())))
        probes = [probe_program(p, ctx.lsm_has_bpf) for p in REQUIRED_PROGRAMS]
        checks += probes
        checks += [optional_probe(probe_program(p, ctx.lsm_has_bpf)) for p in OPTIONAL_PROGRAMS]
        if all(c.status == "pass" for c in probes):
            checks.append(synthetic_deny_proof())
        else:
            checks.append(Check("deny-proof", "fail", "skipped: programs do not load here"))
    fails = [c for c in checks if c.status == "fail"]
    warns = [c for c in checks if c.status == "warn"]
    verdict = Verdict.CANNOT_ENFORCE if fails else Verdict.DEGRADED if warns else Verdict.READY
    return DoctorReport(SCHEMA, platform.release(), verdict, verdict.exit_code, checks)


def render(report: DoctorReport) -> str:
    mark = {"pass": "ok  ", "warn": "WARN", "fail": "FAIL"}
    lines = [f"aegis doctor — kernel {report.kernel}"]
    for c in report.checks:
        lines.append(f"  [{mark[c.status]}] {c.name}: {c.reason}")
        if c.fix and c.status != "pass":
            lines.append(f"         fix: {c.fix}")
    lines.append(f"verdict: {report.verdict} (exit {report.exit_code})")
    return textsafe.join(lines)


