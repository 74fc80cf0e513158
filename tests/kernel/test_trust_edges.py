"""Trust edges in a lab kernel (issue 17, TRUST-nnn).

Cross-process theft of a denied file's content, catalogued as accepted in
docs/BYPASS_CATALOG.md (BYP-PTRACE-FD): a scoped, unprivileged process takes the fd
(``pidfd_getfd``) or reads the mapping (``/proc/PID/mem``) of a same-uid process outside the
scope.  Both need ptrace-attach rights over the victim, so the operator control is Yama:
measured here at ``kernel.yama.ptrace_scope`` 0 (taken) and 1 (refused).  Then the product
side of the issue on a real kernel: a real process name with a newline and an OSC escape
explained terminal-safe, an edited generation record refused, versions at the edge of the
range.

Everything runs in this process or in forked children (no ``aegis`` CLI start: each costs
seconds in a TCG guest).  Children hold the victim and the thief; they report over pipes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from aegis_stream.errors import PolicyError
from aegis_stream.kernel import slots
from aegis_stream.policy import model, signing

from .conftest import EPERM, KEY_ID, Lab, assert_deny_event

PTRACE_SCOPE = Path("/proc/sys/kernel/yama/ptrace_scope")
SYS_PIDFD_GETFD = 438  # the generic syscall table: x86_64 and arm64 alike
PR_SET_NAME, PR_SET_DUMPABLE = 15, 4
NOBODY = 65534
SECRET = "secret\n"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_uint]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


# --- helpers ---------------------------------------------------------------------------

@contextlib.contextmanager
def ptrace_scope(value: int) -> Iterator[None]:
    """Yama's scope for the block (0 or 1; never 3, which cannot be lowered again)."""
    if not PTRACE_SCOPE.exists():
        pytest.fail("Yama is not active in this lab kernel (the lab boots lsm=...,yama,...)")
    old = PTRACE_SCOPE.read_text().strip()
    PTRACE_SCOPE.write_text(str(value))
    try:
        yield
    finally:
        PTRACE_SCOPE.write_text(old)


def _drop_to_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)  # every capability goes with root: no CAP_SYS_PTRACE


def _child(body: Callable[[], dict]) -> tuple[int, int]:
    """Fork; the child runs ``body`` and writes its JSON result to the pipe, then exits.
    Returns (pid, read end)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            res = body()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            res = {"error": repr(exc)}
        try:
            os.write(w, json.dumps(res).encode() + b"\n")
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def _result(pid: int, r: int) -> dict:
    with os.fdopen(r, "rb") as fh:
        line = fh.readline()
    os.waitpid(pid, 0)
    return json.loads(line) if line else {"error": "child wrote nothing"}


@contextlib.contextmanager
def victim(lab: Lab, f: Path) -> Iterator[dict]:
    """A process outside the scope (cg_other) that opened and mapped the denied file (allowed:
    it is not in scope), then runs as uid nobody, holding both until told to exit.  Yields
    {"pid", "fd", "addr"}."""
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()

    def body() -> dict:
        os.close(go_w)
        os.close(ready_r)
        (lab.cg_other / "cgroup.procs").write_text(str(os.getpid()))
        fd = os.open(f, os.O_RDONLY)
        m = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        maps = Path("/proc/self/maps").read_text().splitlines()
        addr = next(int(ln.split("-")[0], 16) for ln in maps if ln.endswith(str(f)))
        _drop_to_nobody()
        # setuid() cleared the dumpable flag; a process the user started normally has it
        _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
        # report, then hold the fd and the mapping until the parent says go
        os.write(ready_w, json.dumps({"pid": os.getpid(), "fd": fd, "addr": addr}).encode() + b"\n")
        os.read(go_r, 1)
        del m
        return {"ok": True}

    pid, done_r = _child(body)
    os.close(ready_w)
    os.close(go_r)
    with os.fdopen(ready_r, "rb") as fh:
        line = fh.readline()
    try:
        assert line, f"victim did not start: {_result(pid, done_r)}"
        yield json.loads(line)
    finally:
        os.close(go_w)  # EOF: the victim exits
        _result(pid, done_r)


def thief(lab: Lab, f: Path, v: dict, how: str) -> dict:
    """A process in the selected scope: its own open of ``f`` is denied (as root, before
    dropping to nobody), then, as nobody, it tries ``how`` = getfd | mem on the victim."""

    def body() -> dict:
        res: dict = {}
        (lab.cg_selected / "cgroup.procs").write_text(str(os.getpid()))
        try:
            os.close(os.open(f, os.O_RDONLY))
            res["own_open"] = 0
        except OSError as exc:
            res["own_open"] = exc.errno
        _drop_to_nobody()
        try:
            if how == "getfd":
                pidfd = os.pidfd_open(v["pid"])  # no permission check: the fd copy has one
                n = _libc.syscall(SYS_PIDFD_GETFD, pidfd, v["fd"], 0)
                if n < 0:
                    raise OSError(ctypes.get_errno(), "pidfd_getfd")
                res["data"] = os.pread(n, 64, 0).decode()
            else:
                mem = os.open(f"/proc/{v['pid']}/mem", os.O_RDONLY)
                res["data"] = os.pread(mem, len(SECRET), v["addr"]).decode()
        except OSError as exc:
            res["errno"] = exc.errno
        return res

    return _result(*_child(body))


def deny_open(lab: Lab) -> Path:
    f = lab.file("stolen", SECRET)
    lab.apply([{"id": "deny-stolen", "path": str(f), "actions": ["open"]}])
    return f


# --- BYP-PTRACE-FD: the accepted bypass, measured, and its operator control ----------

def test_trust_001_pidfd_getfd_takes_the_fd_at_ptrace_scope_0(lab: Lab):
    """TRUST-001 (accepted, BYP-PTRACE-FD): at ptrace_scope 0 a scoped unprivileged process
    whose own open is denied takes a same-uid out-of-scope process's fd with pidfd_getfd
    and reads the content; copying an fd is not an open, so there is no decision."""
    f = deny_open(lab)
    with ptrace_scope(0), victim(lab, f) as v:
        out = thief(lab, f, v, "getfd")
    assert out.get("own_open") == EPERM, out
    assert out.get("data") == SECRET, out
    # exactly one decision on the file: the thief's own open, denied (the victim is out of
    # scope; copying its fd is not an open)
    ino = os.stat(f).st_ino
    evs = [e for e in lab.drain() if e.ino == ino]
    assert len(evs) == 1, evs
    assert_deny_event(lab, f, events=evs)


def test_trust_002_pidfd_getfd_refused_at_ptrace_scope_1(lab: Lab):
    """TRUST-002 (BYP-PTRACE-FD control): at ptrace_scope 1 the same pidfd_getfd fails with
    EPERM (the thief is not the victim's ancestor): the content stays out of reach."""
    f = deny_open(lab)
    with ptrace_scope(1), victim(lab, f) as v:
        out = thief(lab, f, v, "getfd")
    assert out.get("own_open") == EPERM, out
    assert "data" not in out and out.get("errno") == errno.EPERM, out


def test_trust_003_proc_pid_mem_reads_the_mapping_at_ptrace_scope_0(lab: Lab):
    """TRUST-003 (accepted, BYP-PTRACE-FD): at ptrace_scope 0 a scoped unprivileged process
    reads a same-uid out-of-scope process's mapping of the denied file through
    /proc/PID/mem (an open of a proc inode, not of the denied one)."""
    f = deny_open(lab)
    with ptrace_scope(0), victim(lab, f) as v:
        out = thief(lab, f, v, "mem")
    assert out.get("own_open") == EPERM, out
    assert out.get("data") == SECRET, out


def test_trust_004_proc_pid_mem_refused_at_ptrace_scope_1(lab: Lab):
    """TRUST-004 (BYP-PTRACE-FD control): at ptrace_scope 1 opening /proc/PID/mem of the
    victim fails with EACCES (mm_access turns the ptrace refusal into EACCES)."""
    f = deny_open(lab)
    with ptrace_scope(1), victim(lab, f) as v:
        out = thief(lab, f, v, "mem")
    assert out.get("own_open") == EPERM, out
    assert "data" not in out and out.get("errno") == errno.EACCES, out


def test_trust_005_doctor_warns_at_ptrace_scope_0(lab: Lab):
    """TRUST-005: `aegis doctor`'s ptrace-scope check warns at scope 0, with the sysctl fix,
    and passes at scope 1 (called in-process)."""
    from aegis_stream.agent.doctor import Ctx, check_ptrace_scope

    with ptrace_scope(0):
        c = check_ptrace_scope(Ctx())
    assert c.status == "warn" and "pidfd_getfd" in c.reason, c
    assert "kernel.yama.ptrace_scope=1" in c.fix, c
    with ptrace_scope(1):
        assert check_ptrace_scope(Ctx()).status == "pass"


# --- the product side: output, records, versions ---------------------------------------

def test_trust_006_hostile_comm_is_explained_terminal_safe(lab: Lab):
    """TRUST-006: a real process named "x<LF><ESC>]0;pwn<BEL>" is denied; the kernel's event
    carries the name; `aegis explain`'s text escapes it (no forged line, no escape reaches
    the terminal) and its JSON keeps it exactly."""
    from aegis_stream.agent import explain
    from aegis_stream.pipeline.normalise import Normaliser

    evil = "x\n\x1b]0;pwn\x07"
    f = deny_open(lab)

    def body() -> dict:
        (lab.cg_selected / "cgroup.procs").write_text(str(os.getpid()))
        name = ctypes.create_string_buffer(evil.encode())
        _libc.prctl(PR_SET_NAME, ctypes.addressof(name), 0, 0, 0)
        try:
            os.close(os.open(f, os.O_RDONLY))
            return {"errno": 0}
        except OSError as exc:
            return {"errno": exc.errno}

    assert _result(*_child(body)) == {"errno": EPERM}
    raw = assert_deny_event(lab, f)
    assert raw.comm == evil
    x = explain.explain_event(Normaliser(lab.store).normalise(raw), lab.store)
    text = explain.render(x)
    assert "\x1b" not in text and "\x07" not in text
    assert "comm 'x\\x0a\\x1b]0;pwn\\x07'" in text
    assert sum(ln.lstrip().startswith("task") for ln in text.splitlines()) == 1
    assert msgspec.json.decode(msgspec.json.encode(x))["task"]["comm"] == evil


def test_trust_007_edited_generation_record_is_refused(lab: Lab):
    """TRUST-007: after an apply, editing generations/N.json (another inode for the rule) is
    caught: the checked store (policy show, explain) and rollback refuse it in one line; the
    kernel keeps enforcing what was applied."""
    from aegis_stream.policy.provenance import RecordMismatchError, checked_store

    f = deny_open(lab)
    gen = lab.applied[-1].generation
    path = lab.store.gen_dir / f"{gen}.json"
    good = path.read_bytes()
    doc = json.loads(good)
    doc["policy"]["rules"][0]["ino"] += 1
    try:
        path.write_bytes(msgspec.json.encode(doc))
        with pytest.raises(RecordMismatchError, match=f"generations/{gen}.json was changed"):
            checked_store(lab.store).load(gen)
        with pytest.raises(RecordMismatchError, match=f"generations/{gen}.json"):
            lab.lifecycle.rollback()
        assert lab.probe("open", f).errno == EPERM  # the kernel is untouched
        assert slots.read_state(lab.lifecycle.maps).active.generation == gen
    finally:
        path.write_bytes(good)
    checked_store(lab.store).load(gen)  # the record as applied is vouched for again


def _doc(lab: Lab, f: Path, name: str, version: int, mode: str) -> bytes:
    return (f'apiVersion = "aegis/v1"\nname = "{name}"\nversion = {version}\nmode = "{mode}"\n'
            f'[[scope]]\ncgroup = "{lab.cg_selected}"\n'
            f'[[rules]]\nid = "r"\npath = "{f}"\nactions = ["open"]\n').encode()


def test_trust_008_versions_out_of_range_and_audit_at_the_top(lab: Lab):
    """TRUST-008: version 2^64 is refused in one line (sign and apply) with nothing changed;
    a signed audit policy at 2^53-1 applies without moving the anti-rollback counter, so the
    next signed enforce version of that name still applies and denies."""
    f = lab.file("versions", SECRET)
    before = lab.applied[-1].generation
    with pytest.raises(PolicyError, match="version") as ei:
        signing.sign_policy(_doc(lab, f, "trust-max", 2**64, "enforce"), lab.key, KEY_ID)
    assert "\n" not in str(ei.value)
    with pytest.raises(PolicyError, match="version"):
        lab.lifecycle.apply(_doc(lab, f, "trust-max", 2**64, "audit"), "trust-008")
    assert slots.read_state(lab.lifecycle.maps).active.generation == before
    top = signing.sign_policy(_doc(lab, f, "trust-max", model.MAX_VERSION, "audit"),
                              lab.key, KEY_ID)
    lab.lifecycle.apply(top, "trust-008")
    assert lab.lifecycle.counter.get("trust-max") is None
    res = lab.lifecycle.apply(
        signing.sign_policy(_doc(lab, f, "trust-max", 2, "enforce"), lab.key, KEY_ID),
        "trust-008")
    assert res.mode == "enforce" and lab.lifecycle.counter.get("trust-max").high_water == 2
    lab.applied.append(res)
    assert lab.probe("open", f).errno == EPERM
