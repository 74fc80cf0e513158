"""Edge-case compliance: every access path to a denied inode (ACC-nnn).

Readers and tools, openat/openat2 with each RESOLVE_* flag, O_PATH reopen through the
/proc and /dev/fd magic links, /proc/PID/root and /proc/self/cwd, lexical path variants,
open_by_handle_at, io_uring, SCM_RIGHTS.  Each test asserts the real syscall outcome and,
where a decision is taken, the kernel's event.  Catalogue: docs/BYPASS_CATALOG.md.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from aegis_stream.kernel import abi

from .conftest import EPERM, PROBE, Lab, assert_deny_event, cgroup_id


def deny(lab: Lab, name: str = "secret", actions=("open",)) -> Path:
    f = lab.file(name)
    lab.apply([{"id": "deny", "path": str(f), "actions": list(actions)}])
    return f


def assert_no_event(lab: Lab, f) -> None:
    assert lab.events_for(f) == []


# --- readers -----------------------------------------------------------------------------

def test_acc_001_tail_denied(lab: Lab):
    """ACC-001: tail of a denied file fails with EPERM."""
    f = deny(lab)
    out = lab.run(["tail", "-c2", str(f)])
    assert out.returncode != 0 and "Operation not permitted" in out.stderr
    assert_deny_event(lab, f)


def test_acc_002_cp_source_denied(lab: Lab):
    """ACC-002: cp cannot read a denied source; no copy is created."""
    f = deny(lab)
    dst = lab.files / "cp-dst"
    dst.unlink(missing_ok=True)
    out = lab.run(["cp", str(f), str(dst)])
    assert out.returncode != 0 and "Operation not permitted" in out.stderr
    assert not dst.exists()
    assert_deny_event(lab, f)


def test_acc_003_shell_append_redirection_denied(lab: Lab):
    """ACC-003: `echo >> denied` (shell O_WRONLY|O_APPEND|O_CREAT) is denied; content kept."""
    f = deny(lab)
    out = lab.run(["/bin/sh", "-c", f'echo pwned >> "{f}"'])
    assert out.returncode != 0
    assert f.read_text() == "secret\n"
    assert_deny_event(lab, f)


def test_acc_004_mmap_read_needs_an_open(lab: Lab):
    """ACC-004: a read-only mapping needs an fd; the open is denied."""
    f = deny(lab)
    out = lab.probe("mmap_read", f)
    assert out.errno == EPERM and out.result["stage"] == "open"
    assert_deny_event(lab, f)


def test_acc_005_open_flag_variants_denied(lab: Lab):
    """ACC-005: O_NOATIME, O_NONBLOCK, O_SYNC, O_CREAT on an existing file: all denied."""
    f = deny(lab)
    for flags in ("O_RDONLY|O_NOATIME", "O_RDONLY|O_NONBLOCK", "O_WRONLY|O_SYNC",
                  "O_RDWR|O_CREAT", "O_RDONLY|O_CLOEXEC|O_LARGEFILE"):
        assert lab.probe("open", f, flags).errno == EPERM, flags
    assert len(lab.events_for(f)) == 5


def test_acc_006_openat_relative_to_dirfd(lab: Lab):
    """ACC-006: openat(dirfd, name) with an O_PATH directory fd."""
    f = deny(lab)
    assert lab.probe("openat", f.parent, f.name).errno == EPERM
    assert_deny_event(lab, f)


# --- openat2 and RESOLVE_* ---------------------------------------------------------------

@pytest.fixture
def openat2_ok(lab: Lab):
    probe = lab.probe("openat2", "-", "/", "0")
    if probe.errno == errno.ENOSYS:
        pytest.skip("kernel-feature: no openat2(2) (added in 5.6)")
    return lab


def _openat2(lab: Lab, resolve: str, *, dirfd: bool = False):
    f = deny(lab)
    if dirfd:
        out = lab.probe("openat2", f.parent, f.name, resolve)
    else:
        out = lab.probe("openat2", "-", f, resolve)
    assert out.errno == EPERM, out
    assert_deny_event(lab, f)


def test_acc_007_openat2_resolve_no_symlinks(openat2_ok: Lab):
    """ACC-007: openat2 RESOLVE_NO_SYMLINKS on the real path is denied."""
    _openat2(openat2_ok, "NO_SYMLINKS")


def test_acc_008_openat2_resolve_no_magiclinks(openat2_ok: Lab):
    """ACC-008: openat2 RESOLVE_NO_MAGICLINKS is denied."""
    _openat2(openat2_ok, "NO_MAGICLINKS")


def test_acc_009_openat2_resolve_beneath(openat2_ok: Lab):
    """ACC-009: openat2(dirfd, name, RESOLVE_BENEATH) is denied."""
    _openat2(openat2_ok, "BENEATH", dirfd=True)


def test_acc_010_openat2_resolve_in_root(openat2_ok: Lab):
    """ACC-010: openat2 RESOLVE_IN_ROOT ('/' is the dirfd) is denied."""
    lab = openat2_ok
    f = deny(lab)
    out = lab.probe("openat2", f.parent, "/" + f.name, "IN_ROOT")
    assert out.errno == EPERM, out
    assert_deny_event(lab, f)


def test_acc_011_openat2_resolve_no_xdev(openat2_ok: Lab):
    """ACC-011: openat2 RESOLVE_NO_XDEV is denied."""
    _openat2(openat2_ok, "NO_XDEV", dirfd=True)


def test_acc_012_openat2_resolve_cached(openat2_ok: Lab):
    """ACC-012: openat2 RESOLVE_CACHED (dcache-only lookup) is denied, not EAGAIN-bypassed."""
    lab = openat2_ok
    f = deny(lab)
    os.stat(f)  # the lookup is in the dcache
    out = lab.probe("openat2", "-", f, "CACHED")
    assert out.errno == EPERM, out
    assert_deny_event(lab, f)


def test_acc_013_openat2_all_resolve_flags(openat2_ok: Lab):
    """ACC-013: every restricting RESOLVE_* flag at once is still denied."""
    _openat2(openat2_ok, "NO_SYMLINKS|NO_MAGICLINKS|BENEATH|NO_XDEV", dirfd=True)


def test_acc_014_openat2_no_symlinks_through_a_symlink_refused_before_open(openat2_ok: Lab):
    """ACC-014: RESOLVE_NO_SYMLINKS through a symlink fails ELOOP in the lookup: no open,
    no decision (not a bypass: nothing is opened)."""
    lab = openat2_ok
    f = deny(lab)
    link = lab.files / "acc014-link"
    link.unlink(missing_ok=True)
    link.symlink_to(f)
    assert lab.probe("openat2", "-", link, "NO_SYMLINKS").errno == errno.ELOOP
    assert_no_event(lab, f)


# --- O_PATH reopen, magic links, /proc views ---------------------------------------------

def test_acc_015_reopen_opath_via_dev_fd(lab: Lab):
    """ACC-015: O_PATH fd reopened through /dev/fd/N is denied."""
    f = deny(lab)
    out = lab.probe("reopen_opath", f, "/dev/fd")
    assert '"stage": "opath_ok"' in out.stdout and out.errno == EPERM
    assert_deny_event(lab, f)


def test_acc_016_reopen_opath_via_proc_thread_self(lab: Lab):
    """ACC-016: O_PATH fd reopened through /proc/thread-self/fd/N is denied."""
    f = deny(lab)
    out = lab.probe("reopen_opath", f, "/proc/thread-self/fd")
    assert out.errno == EPERM
    assert_deny_event(lab, f)


def test_acc_017_opath_linkat_new_name(lab: Lab):
    """ACC-017: linkat(O_PATH fd, AT_EMPTY_PATH) makes a new name of the same inode: denied."""
    f = deny(lab)
    new = lab.files / "acc017-new-name"
    new.unlink(missing_ok=True)
    out = lab.probe("opath_linkat", f, new)
    assert '"stage": "linked"' in out.stdout and out.errno == EPERM
    assert_deny_event(lab, new)


def test_acc_018_proc_self_fd_of_opath_directory(lab: Lab):
    """ACC-018: /proc/self/fd/N/name where N is an O_PATH fd of the parent directory."""
    f = deny(lab)
    assert lab.probe("opath_dir_open", f.parent, f.name).errno == EPERM
    assert_deny_event(lab, f)


def test_acc_019_proc_pid_fd_of_an_out_of_scope_holder(lab: Lab):
    """ACC-019: an in-scope process reopens /proc/PID/fd/N of a process outside the scope
    that holds the file open: the reopen is a new open, decided for the in-scope caller."""
    f = deny(lab)
    holder = lab.spawn([PROBE, "hold", str(f)], cgroup=lab.cg_other)
    try:
        info = json.loads(holder.stdout.readline())
        assert info["stage"] == "opened"
        out = lab.probe("open", f"/proc/{info['pid']}/fd/{info['fd']}")
        assert out.errno == EPERM
        assert_deny_event(lab, f)
    finally:
        holder.communicate("go\n", timeout=30)


def test_acc_020_proc_self_root_path(lab: Lab):
    """ACC-020: /proc/self/root/<path> is denied."""
    f = deny(lab)
    assert lab.probe("open", f"/proc/self/root{f}").errno == EPERM
    assert_deny_event(lab, f)


def test_acc_021_proc_pid_root_of_another_process(lab: Lab):
    """ACC-021: /proc/PID/root/<path> through an out-of-scope process's root is denied."""
    f = deny(lab)
    holder = lab.spawn([PROBE, "hold", str(lab.file("acc021-other", "x"))], cgroup=lab.cg_other)
    try:
        pid = json.loads(holder.stdout.readline())["pid"]
        assert lab.probe("open", f"/proc/{pid}/root{f}").errno == EPERM
        assert_deny_event(lab, f)
    finally:
        holder.communicate("go\n", timeout=30)


def test_acc_022_proc_self_cwd_relative(lab: Lab):
    """ACC-022: chdir(dir) then open('/proc/self/cwd/name') is denied."""
    f = deny(lab)
    assert lab.probe("chdir_open", f.parent, f"/proc/self/cwd/{f.name}").errno == EPERM
    assert_deny_event(lab, f)


def test_acc_023_cwd_relative_name(lab: Lab):
    """ACC-023: chdir(dir) then open('name') is denied."""
    f = deny(lab)
    assert lab.probe("chdir_open", f.parent, f.name).errno == EPERM
    assert_deny_event(lab, f)


def test_acc_024_dotdot_traversal(lab: Lab):
    """ACC-024: dir/sub/../../dir/secret and ./ variants are denied."""
    f = deny(lab)
    (lab.files / "sub" / "deeper").mkdir(parents=True, exist_ok=True)
    p = f"{lab.files}/sub/deeper/../../{f.name}"
    assert lab.probe("open", p).errno == EPERM
    assert lab.probe("chdir_open", lab.files / "sub", f"../{f.name}").errno == EPERM
    assert len(lab.events_for(f)) == 2


def test_acc_025_double_slash_and_dot_variants(lab: Lab):
    """ACC-025: //tmp//aegis-kt/./files//secret is denied."""
    f = deny(lab)
    p = "/" + str(f).replace("/", "//").replace("//files", "/./files")
    assert lab.probe("open", p).errno == EPERM
    assert_deny_event(lab, f)


def test_acc_026_trailing_slash_refused_before_open(lab: Lab):
    """ACC-026: 'secret/' fails ENOTDIR in the lookup: nothing opened, no decision."""
    f = deny(lab)
    assert lab.probe("open", f"{f}/").errno == errno.ENOTDIR
    assert_no_event(lab, f)


def test_acc_027_chroot_relative_name(lab: Lab):
    """ACC-027: chroot(dir) then open('/secret') is denied."""
    f = deny(lab)
    assert lab.probe("chroot_open", f.parent, "/" + f.name).errno == EPERM
    assert_deny_event(lab, f)


# --- file handles -------------------------------------------------------------------------

def test_acc_028_open_by_handle_at(lab: Lab):
    """ACC-028: name_to_handle_at + open_by_handle_at is an open: denied."""
    f = deny(lab)
    out = lab.probe("handle", f, f.parent)
    assert out.errno == EPERM and out.result["stage"] == "open_by_handle_at"
    assert_deny_event(lab, f)


def test_acc_029_handle_saved_before_apply_replayed_in_scope(lab: Lab):
    """ACC-029: a handle taken before the policy (out of scope) and replayed in scope."""
    f = lab.file("secret")
    saved = lab.files / "acc029.handle"
    assert lab.probe("handle_save", f, saved, cgroup=lab.cg_other).result == {"ok": True}
    lab.apply([{"id": "deny", "path": str(f), "actions": ["open"]}])
    assert lab.probe("handle_open", saved, f.parent).errno == EPERM
    assert_deny_event(lab, f)


# --- io_uring -----------------------------------------------------------------------------

def _uring(lab: Lab, mode: str):
    f = deny(lab)
    out = lab.probe("uring_open", f, mode)
    if out.result.get("stage") == "io_uring_setup":
        disabled = Path("/proc/sys/kernel/io_uring_disabled")
        why = disabled.read_text().strip() if disabled.exists() else "n/a"
        pytest.skip(f"kernel-feature: io_uring unavailable (setup errno {out.errno}, "
                    f"kernel.io_uring_disabled={why})")
    assert out.errno == EPERM and out.result["stage"] == "cqe", out
    e = assert_deny_event(lab, f)
    return e


def test_acc_030_io_uring_openat_inline(lab: Lab):
    """ACC-030: IORING_OP_OPENAT (inline issue) is denied: the CQE carries -EPERM."""
    _uring(lab, "inline")


def test_acc_031_io_uring_openat_async_worker(lab: Lab):
    """ACC-031: IOSQE_ASYNC forces the open onto an io-wq worker thread of the process:
    same cgroup, denied; the event names the worker (tid != tgid, comm iou-wrk-*)."""
    e = _uring(lab, "async")
    assert e.pid != e.tgid and e.comm.startswith("iou-wrk"), e


def test_acc_032_io_uring_openat_sqpoll(lab: Lab):
    """ACC-032: IORING_SETUP_SQPOLL: the kernel SQ thread issues the open: denied
    (the SQ thread is a thread of the submitting process, in its cgroup)."""
    e = _uring(lab, "sqpoll")
    assert e.pid != e.tgid and e.comm.startswith("iou-sqp"), e


def test_acc_033_io_uring_openat2(lab: Lab):
    """ACC-033: IORING_OP_OPENAT2 is denied."""
    _uring(lab, "openat2")


# --- SCM_RIGHTS ---------------------------------------------------------------------------

def _sender(lab: Lab, f: Path, cgroup: Path):
    sock = lab.files / "fdpass.sock"
    sender = lab.spawn([PROBE, "sendfd", str(sock), str(f)], cgroup=cgroup)
    return sock, sender


def test_acc_034_scm_rights_fd_opened_before_policy_survives(lab: Lab):
    """ACC-034 (accepted, BYP pre-opened-fd): an fd opened before the policy and passed
    over a unix socket stays usable; passing it is not an open, so no decision."""
    f = lab.file("secret")
    sock, sender = _sender(lab, f, lab.cg_selected)
    try:
        assert "listening" in sender.stdout.readline()
        lab.apply([{"id": "deny", "path": str(f), "actions": ["open"]}])
        out = lab.probe("recvfd", sock)
        assert out.result.get("ok") is True, out
        assert out.result["ino"] == os.stat(f).st_ino
    finally:
        sender.communicate(timeout=30)
    assert_no_event(lab, f)
    assert lab.probe("read", f).errno == EPERM  # a fresh open is still denied


def test_acc_035_scm_rights_from_out_of_scope_opener(lab: Lab):
    """ACC-035 (accepted, BYP fd-passing): a process outside the scope opens after the
    policy (allowed: not in scope) and passes the fd in; the receiver reads it."""
    f = deny(lab)
    sock, sender = _sender(lab, f, lab.cg_other)
    try:
        assert "listening" in sender.stdout.readline()
        out = lab.probe("recvfd", sock)
        assert out.result.get("ok") is True, out
    finally:
        sender.communicate(timeout=30)
    assert_no_event(lab, f)


def test_acc_036_scm_rights_in_scope_sender_denied(lab: Lab):
    """ACC-036: an in-scope sender cannot open the file after the policy: nothing to pass."""
    f = deny(lab)
    sock, sender = _sender(lab, f, lab.cg_selected)
    out, _ = sender.communicate(timeout=30)
    assert '"stage": "sender_open"' in out and f'"errno": {EPERM}' in out
    assert_deny_event(lab, f)


# --- outside the open surface -------------------------------------------------------------

def test_acc_037_truncate_by_path_is_accepted(lab: Lab):
    """ACC-037 (accepted, BYP-TRUNCATE): truncate(2) by path opens nothing, so an open rule
    does not stop a process with write permission from truncating the file (v1 scope
    freeze: enforcement is open and exec; truncate is a write surface).  Measured: the
    truncate succeeds, the content is gone, no event; an open of the file stays denied and
    O_TRUNC through open is denied (OPEN-006)."""
    f = deny(lab)
    out = lab.probe("truncate", f)
    assert out.returncode == 0 and out.errno is None, out
    assert f.read_text() == ""
    assert lab.events_for(f) == []
    assert lab.probe("open", f).errno == EPERM
    assert_deny_event(lab, f)


def test_acc_038_scope_of_the_event_is_the_caller(lab: Lab):
    """ACC-038: the same denied open from the selected cgroup and its child: each event
    carries the caller's own cgroup and the selected scope."""
    f = deny(lab)
    assert lab.probe("open", f).errno == EPERM
    assert lab.probe("open", f, cgroup=lab.cg_child).errno == EPERM
    evs = lab.events_for(f)
    assert [e.cgroup_id for e in evs] == [cgroup_id(lab.cg_selected), cgroup_id(lab.cg_child)]
    assert {e.scope_cgroup_id for e in evs} == {cgroup_id(lab.cg_selected)}
    assert all(e.hook == abi.Hook.FILE_OPEN for e in evs)
