"""Edge-case compliance: exec paths (EXEC-010 onwards; EXEC-001..009 in
test_reference_slice.py).  execveat(AT_EMPTY_PATH), fexecve, /proc/self/fd exec, shebang
chains, interpreters reading scripts, shared libraries, memfd copies, mprotect, threads.
"""

from __future__ import annotations

import os
import subprocess

from aegis_stream.kernel import abi

from .conftest import EPERM, PROBE, ROOT, Lab, assert_deny_event

EXEC = dict(hook=abi.Hook.BPRM_CHECK, action=abi.ACTION_EXEC)
MMAP = dict(hook=abi.Hook.MMAP_FILE, action=abi.ACTION_EXEC)
MPROTECT = dict(hook=abi.Hook.FILE_MPROTECT, action=abi.ACTION_EXEC)
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"


def deny(lab: Lab, f, actions=("exec",)):
    return lab.apply([{"id": "deny", "path": str(f), "actions": list(actions)}])


def test_exec_010_execveat_empty_path_on_opath_fd(lab: Lab):
    """EXEC-010: execveat(O_PATH fd, "", AT_EMPTY_PATH) is denied at bprm_check."""
    b = lab.binary("bin/denied-true")
    deny(lab, b)
    assert lab.probe("execveat", b).errno == EPERM
    assert_deny_event(lab, b, **EXEC)


def test_exec_011_fexecve(lab: Lab):
    """EXEC-011: fexecve of an fd opened for reading (exec-only rule lets the open pass)."""
    b = lab.binary("bin/denied-true")
    deny(lab, b)
    assert lab.probe("fexecve", b).errno == EPERM
    assert_deny_event(lab, b, **EXEC)


def test_exec_012_exec_via_proc_self_fd(lab: Lab):
    """EXEC-012: execve('/proc/self/fd/N') of an O_PATH fd is denied."""
    b = lab.binary("bin/denied-true")
    deny(lab, b)
    assert lab.probe("exec_procfd", b).errno == EPERM
    assert_deny_event(lab, b, **EXEC)


def test_exec_013_denied_shebang_script(lab: Lab):
    """EXEC-013: exec of a denied script: the script's own bprm stage is denied."""
    script = lab.file("bin/denied-script.sh", "#!/bin/sh\nexit 0\n", mode=0o755)
    deny(lab, script)
    assert lab.probe("exec", script).errno == EPERM
    assert_deny_event(lab, script, **EXEC)


def test_exec_014_shebang_interpreter_via_symlink(lab: Lab):
    """EXEC-014: the script names its interpreter through a symlink to a denied binary."""
    interp = lab.binary("bin/denied-sh", "/bin/sh")
    link = lab.files / "bin" / "sh-link"
    link.unlink(missing_ok=True)
    link.symlink_to(interp)
    script = lab.file("bin/s14.sh", f"#!{link}\nexit 0\n", mode=0o755)
    deny(lab, interp)
    assert lab.probe("exec", script).errno == EPERM
    assert_deny_event(lab, interp, **EXEC)


def test_exec_015_nested_shebang_chain(lab: Lab):
    """EXEC-015: script -> script-as-interpreter -> denied interpreter: the third binfmt
    stage is denied."""
    interp = lab.binary("bin/denied-sh", "/bin/sh")
    mid = lab.file("bin/mid.sh", f"#!{interp}\nexit 0\n", mode=0o755)
    top = lab.file("bin/top.sh", f"#!{mid}\nexit 0\n", mode=0o755)
    deny(lab, interp)
    assert lab.probe("exec", top).errno == EPERM
    assert_deny_event(lab, interp, **EXEC)


def test_exec_016_env_lookup_of_denied_interpreter(lab: Lab):
    """EXEC-016: '#!/usr/bin/env NAME' finds the denied interpreter on PATH: env's exec of
    it is denied."""
    interp = lab.binary("envbin/denied-interp", "/bin/sh")
    script = lab.file("bin/s16.sh", "#!/usr/bin/env denied-interp\nexit 0\n", mode=0o755)
    deny(lab, interp)
    out = lab.run(["env", f"PATH={interp.parent}:/usr/bin:/bin", str(script)])
    assert out.returncode == 126 and "Operation not permitted" in out.stderr, out
    e = assert_deny_event(lab, interp, **EXEC)
    assert e.comm == "s16.sh"  # comm is the script's name after its exec


def test_exec_017_interpreter_reading_a_script_with_open_rule(lab: Lab):
    """EXEC-017: `sh script` reads the script as data: an open+exec rule denies it at
    file_open."""
    script = lab.file("bin/s17.sh", "exit 0\n", mode=0o755)
    deny(lab, script, ("open", "exec"))
    out = lab.run(["/bin/sh", str(script)])
    assert out.returncode != 0
    assert_deny_event(lab, script)


def test_exec_018_interpreter_reading_a_script_with_exec_only_rule(lab: Lab):
    """EXEC-018 (accepted, BYP-SCRIPT-AS-DATA): `sh script` with an exec-only rule on the
    script runs it: the kernel never executes the script, sh reads it.  Deny 'open' too."""
    script = lab.file("bin/s18.sh", "exit 7\n", mode=0o755)
    deny(lab, script)
    assert lab.probe("exec", script).errno == EPERM  # bprm_check runs before binfmt lookup
    assert_deny_event(lab, script, **EXEC)
    assert lab.run(["/bin/sh", str(script)]).returncode == 7
    assert lab.events_for(script) == []


def test_exec_019_denied_shared_library_via_ld_library_path(lab: Lab):
    """EXEC-019: an allowed program loading a denied shared library: ld.so's PROT_EXEC
    mapping of the library is denied and the program does not start."""
    lib = lab.binary("lib/libc.so.6", LIBC)
    deny(lab, lib)
    out = lab.run(["env", f"LD_LIBRARY_PATH={lib.parent}", "/bin/true"])
    assert out.returncode != 0 and "libc.so.6" in out.stderr, out
    assert_deny_event(lab, lib, **MMAP)


def test_exec_020_memfd_exec_of_a_copy(lab: Lab):
    """EXEC-020 (accepted, BYP-MEMFD): with an exec-only rule the binary can be read,
    copied into a memfd and executed from there: a new inode, allowed (like EXEC-009)."""
    b = lab.binary("bin/denied-true")
    deny(lab, b)
    out = lab.probe("memfd_exec", b)
    assert out.returncode == 0 and '"stage": "copied"' in out.stdout and "errno" not in out.stdout
    assert lab.events_for(b) == []
    assert lab.probe("exec", b).errno == EPERM  # the original stays denied


def test_exec_021_memfd_copy_blocked_by_open_rule(lab: Lab):
    """EXEC-021 (mitigation of BYP-MEMFD): an open+exec rule denies the read the copy needs."""
    b = lab.binary("bin/denied-true")
    deny(lab, b, ("open", "exec"))
    out = lab.probe("memfd_exec", b)
    assert out.errno == EPERM and out.result["stage"] == "open"
    assert_deny_event(lab, b)


def test_exec_022_mprotect_exec_of_read_mapping(lab: Lab):
    """EXEC-022: mmap(PROT_READ) then mprotect(PROT_EXEC) of a file mapping of an exec-denied
    file is denied at file_mprotect (GAP-MPROTECT, mitigated); the read mapping was allowed."""
    b = lab.binary("bin/lib-like")
    deny(lab, b)
    out = lab.probe("mprotect_exec", b)
    assert out.errno == EPERM and out.result.get("stage") == "mprotect", out
    assert '"stage": "mapped_read"' in out.stdout, out  # the exec-only rule let the read map
    assert_deny_event(lab, b, **MPROTECT)


def test_exec_029_mprotect_exec_of_allowed_file(lab: Lab):
    """EXEC-029: with an exec rule on another file, mprotect(PROT_EXEC) of a read mapping of
    an allowed file still works, with no event (file_mprotect decides only rule inodes)."""
    denied = lab.binary("bin/lib-like")
    allowed = lab.binary("bin/allowed-lib-like")
    deny(lab, denied)
    out = lab.probe("mprotect_exec", allowed)
    assert out.returncode == 0 and out.result == {"ok": True}, out
    assert lab.events_for(allowed) == [] and lab.events_for(denied) == []


def test_exec_023_hardlink_made_after_apply(lab: Lab):
    """EXEC-023: exec through a hardlink created after the policy."""
    b = lab.binary("bin/denied-true")
    deny(lab, b)
    hl = lab.files / "bin" / f"late-hl-{os.getpid()}"
    hl.unlink(missing_ok=True)
    os.link(b, hl)
    assert lab.probe("exec", hl).errno == EPERM
    assert_deny_event(lab, b, **EXEC)


def test_exec_024_renamed_binary(lab: Lab):
    """EXEC-024: the denied binary renamed to another directory after apply."""
    b = lab.binary("bin/denied-true")
    deny(lab, b)
    dst = lab.files / "moved-bin" / "renamed-true"
    dst.parent.mkdir(exist_ok=True)
    os.rename(b, dst)
    assert lab.probe("exec", dst).errno == EPERM
    assert_deny_event(lab, dst, **EXEC)


def test_exec_025_exec_through_bind_mount(lab: Lab):
    """EXEC-025: exec of the denied binary through a file bind mount."""
    b = lab.binary("bin/denied-true")
    alias = ROOT / f"bind-exec-{os.urandom(3).hex()}"
    alias.write_text("")
    subprocess.run(["mount", "--bind", str(b), str(alias)], check=True)
    try:
        deny(lab, b)
        assert lab.probe("exec", alias).errno == EPERM
        assert_deny_event(lab, b, **EXEC)
    finally:
        subprocess.run(["umount", str(alias)], check=True)


def test_exec_026_exec_from_a_non_main_thread(lab: Lab):
    """EXEC-026: a secondary thread calls execve: denied in that thread's context; the
    event's pid is the thread id, tgid the process."""
    b = lab.binary("bin/denied-true")
    deny(lab, b)
    out = lab.probe("thread_exec", b)
    r = out.result
    assert r["eperm"] == 1, out
    e = assert_deny_event(lab, b, **EXEC)
    assert e.tgid == r["pid"] and e.pid == r["tids"][0] and e.pid != e.tgid


def test_exec_027_exec_rule_denies_ldso_direct_run_and_exec_together(lab: Lab):
    """EXEC-027: one exec rule, three routes in a row (execve, execveat, ld.so): three
    decisions, on the right hooks, all with the same rule id."""
    b = lab.binary("bin/denied-true")
    deny(lab, b)
    assert lab.probe("exec", b).errno == EPERM
    assert lab.probe("execveat", b).errno == EPERM
    assert lab.run(["/lib64/ld-linux-x86-64.so.2", str(b)]).returncode != 0
    evs = lab.events_for(b)
    assert [e.hook for e in evs] == [abi.Hook.BPRM_CHECK, abi.Hook.BPRM_CHECK,
                                     abi.Hook.MMAP_FILE]
    assert {e.rule_id for e in evs} == {0}


def test_exec_028_probe_is_not_denied_by_unrelated_exec_rule(lab: Lab):
    """EXEC-028: an exec rule on one binary does not touch other binaries (the probe, sh)."""
    b = lab.binary("bin/denied-true")
    deny(lab, b)
    assert lab.run(["/bin/sh", "-c", "exit 0"]).returncode == 0
    assert lab.probe("read", PROBE).result == {"ok": True}
    assert lab.events_for(b) == []
