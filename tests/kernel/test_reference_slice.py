"""The reference enforcement slice, proven in real kernels.

Each test names one scenario, asserts the real syscall outcome (errno / exit status)
and, where a decision is expected, the kernel's event (hook, decision, rule id,
generation, cgroup, inode).  IDs in docs/REFERENCE_ENFORCEMENT_SLICE.md.
"""

from __future__ import annotations

import os
import subprocess
import sys

from aegis_stream.kernel import abi
from aegis_stream.kernel.devnum import resolve_inode

from .conftest import EPERM, PROBE, Lab, assert_deny_event, cgroup_id

LDSO = "/lib64/ld-linux-x86-64.so.2"


# --- OPEN: direct and through tools --------------------------------------------------

def test_open_001_direct_open_denied(lab: Lab):
    f = lab.file("secret")
    lab.apply([{"id": "deny-secret", "path": str(f)}])
    out = lab.probe("open", f)
    assert out.errno == EPERM
    e = assert_deny_event(lab, f)
    assert e.scope_cgroup_id == cgroup_id(lab.cg_selected)
    assert e.mode == abi.Mode.ENFORCE and e.comm == "probe"


def test_open_002_cat_denied(lab: Lab):
    f = lab.file("secret")
    lab.apply([{"path": str(f)}])
    out = lab.run(["cat", str(f)])
    assert out.returncode != 0 and "Operation not permitted" in out.stderr
    assert_deny_event(lab, f)


def test_open_003_dd_denied(lab: Lab):
    f = lab.file("secret")
    lab.apply([{"path": str(f)}])
    out = lab.run(["dd", f"if={f}", "of=/dev/null"])
    assert out.returncode != 0 and "Operation not permitted" in out.stderr
    assert_deny_event(lab, f)


def test_open_004_python_read_denied(lab: Lab):
    f = lab.file("secret")
    lab.apply([{"path": str(f)}])
    out = lab.run([sys.executable, "-S", "-c", f"open({str(f)!r}).read()"])
    assert out.returncode != 0 and "PermissionError" in out.stderr
    assert_deny_event(lab, f)


def test_open_005_head_and_shell_redirect_denied(lab: Lab):
    f = lab.file("secret")
    lab.apply([{"path": str(f)}])
    assert lab.run(["head", "-c1", str(f)]).returncode != 0
    out = lab.run(["/bin/sh", "-c", f'read x < "{f}"'])
    assert out.returncode != 0
    assert len(lab.events_for(f)) == 2


def test_open_006_write_and_rdwr_denied(lab: Lab):
    f = lab.file("secret")
    lab.apply([{"path": str(f)}])
    assert lab.probe("open", f, "O_WRONLY").errno == EPERM
    assert lab.probe("open", f, "O_RDWR|O_APPEND").errno == EPERM
    assert lab.probe("open", f, "O_WRONLY|O_TRUNC").errno == EPERM
    assert f.read_text() == "secret\n"  # the truncating open never happened


def test_open_008_exec_intent_flag_from_userspace_is_masked(lab: Lab):
    """open(2) with the kernel-internal __FMODE_EXEC bit (0x20) set: the kernel strips it
    (VALID_OPEN_FLAGS), so it cannot pass for an exec open and skip the open decision."""
    f = lab.file("secret")
    lab.apply([{"path": str(f)}])
    assert lab.probe("openraw", f, "20").errno == EPERM
    assert_deny_event(lab, f)


def test_open_007_unrelated_file_in_same_dir_allowed(lab: Lab):
    f, g = lab.file("d/secret"), lab.file("d/public")
    lab.apply([{"path": str(f)}])
    assert lab.probe("read", g).result == {"ok": True}
    assert lab.events_for(g) == []


# --- names: symlinks, hardlinks, rename, bind mounts, mount namespaces ------------------

def test_link_001_symlink_to_denied_file(lab: Lab):
    f = lab.file("secret")
    link = lab.files / "alias"
    link.unlink(missing_ok=True)
    link.symlink_to(f)
    lab.apply([{"path": str(f)}])
    assert lab.probe("open", link).errno == EPERM
    assert_deny_event(lab, f)


def test_link_002_hardlink_same_dir(lab: Lab):
    f = lab.file("secret")
    hl = lab.files / "secret.hl"
    hl.unlink(missing_ok=True)
    os.link(f, hl)
    lab.apply([{"path": str(f)}])
    assert lab.probe("open", hl).errno == EPERM
    assert_deny_event(lab, f)


def test_link_003_hardlink_other_dir_created_after_apply(lab: Lab):
    f = lab.file("a/secret")
    lab.apply([{"path": str(f)}])
    (lab.files / "b").mkdir(exist_ok=True)
    hl = lab.files / "b" / "other-name"
    hl.unlink(missing_ok=True)
    os.link(f, hl)
    assert lab.probe("open", hl).errno == EPERM
    assert_deny_event(lab, hl)


def test_link_004_rename_after_apply_still_denied(lab: Lab):
    f = lab.file("secret-before-rename")
    lab.apply([{"path": str(f)}])
    moved = lab.files / "moved" / "renamed"
    moved.parent.mkdir(exist_ok=True)
    os.rename(f, moved)
    assert lab.probe("open", moved).errno == EPERM
    assert_deny_event(lab, moved)


def test_link_005_bind_mount_alias_denied(lab: Lab):
    f = lab.file("secret")
    alias = lab.file("bind-target", "decoy\n")
    subprocess.run(["mount", "--bind", str(f), str(alias)], check=True)
    try:
        lab.apply([{"path": str(f)}])
        assert lab.probe("open", alias).errno == EPERM
        assert_deny_event(lab, alias)
    finally:
        subprocess.run(["umount", str(alias)], check=True)


def test_link_006_unshare_mount_namespace_view_denied(lab: Lab):
    f = lab.file("secret")
    lab.apply([{"path": str(f)}])
    other = lab.files / "nsview"
    other.mkdir(exist_ok=True)
    script = f'mount --bind "{lab.files}" "{other}" && cat "{other}/secret"'
    out = lab.run(["unshare", "-m", "--propagation", "private", "/bin/sh", "-c", script])
    assert out.returncode != 0 and "Operation not permitted" in out.stderr
    assert_deny_event(lab, f)


def test_link_007_reopen_via_proc_self_fd_of_opath(lab: Lab):
    f = lab.file("secret")
    lab.apply([{"path": str(f)}])
    out = lab.probe("reopen_opath", f)
    assert '"stage": "opath_ok"' in out.stdout  # O_PATH is not an open of the content
    assert out.errno == EPERM
    assert_deny_event(lab, f)


def test_link_008_copy_is_a_new_inode_and_allowed(lab: Lab):
    f = lab.file("secret")
    lab.apply([{"path": str(f)}])
    copy = lab.files / "copy"
    # the copy is made outside the scope (the original cannot be read inside it)
    subprocess.run(["cp", str(f), str(copy)], check=True)
    assert lab.probe("read", copy).result == {"ok": True}
    assert lab.events_for(copy) == []


def test_link_009_path_rule_resolved_at_apply_not_later(lab: Lab):
    """Replacing the file behind a path after apply leaves the rule on the old inode."""
    f = lab.file("replaced")
    lab.apply([{"path": str(f)}])
    old = lab.files / "replaced.old"
    os.rename(f, old)
    lab.file("replaced", "new content\n")
    assert lab.probe("read", f).result == {"ok": True}  # new inode: not covered
    assert lab.probe("read", old).errno == EPERM  # old inode: still denied


# --- EXEC ----------------------------------------------------------------------------

def test_exec_001_exec_denied(lab: Lab):
    b = lab.binary("bin/denied-true")
    lab.apply([{"path": str(b), "actions": ["exec"]}])
    assert lab.probe("exec", b).errno == EPERM
    assert_deny_event(lab, b, hook=abi.Hook.BPRM_CHECK, action=abi.ACTION_EXEC)


def test_exec_002_exec_via_symlink_denied(lab: Lab):
    b = lab.binary("bin/denied-true")
    link = lab.files / "bin" / "true-link"
    link.unlink(missing_ok=True)
    link.symlink_to(b)
    lab.apply([{"path": str(b), "actions": ["exec"]}])
    assert lab.probe("exec", link).errno == EPERM
    assert_deny_event(lab, b, hook=abi.Hook.BPRM_CHECK, action=abi.ACTION_EXEC)


def test_exec_003_exec_via_hardlink_denied(lab: Lab):
    b = lab.binary("bin/denied-true")
    hl = lab.files / "bin" / "true-hardlink"
    hl.unlink(missing_ok=True)
    os.link(b, hl)
    lab.apply([{"path": str(b), "actions": ["exec"]}])
    assert lab.probe("exec", hl).errno == EPERM
    assert_deny_event(lab, b, hook=abi.Hook.BPRM_CHECK, action=abi.ACTION_EXEC)


def test_exec_004_ldso_loading_denied_binary(lab: Lab):
    b = lab.binary("bin/denied-true")
    lab.apply([{"path": str(b), "actions": ["exec"]}])
    out = lab.run([LDSO, str(b)])
    assert out.returncode != 0
    assert_deny_event(lab, b, hook=abi.Hook.MMAP_FILE, action=abi.ACTION_EXEC)


def test_exec_005_mmap_prot_exec_of_denied_file(lab: Lab):
    b = lab.binary("bin/lib-like")
    lab.apply([{"path": str(b), "actions": ["exec"]}])
    assert lab.probe("mmap_exec", b).errno == EPERM
    assert_deny_event(lab, b, hook=abi.Hook.MMAP_FILE, action=abi.ACTION_EXEC)


def test_exec_006_exec_only_rule_still_allows_reading(lab: Lab):
    b = lab.binary("bin/denied-true")
    lab.apply([{"path": str(b), "actions": ["exec"]}])
    assert lab.probe("read", b).result == {"ok": True}
    assert lab.events_for(b) == []


def test_exec_007_open_only_rule_does_not_deny_exec(lab: Lab):
    """Documented: 'open' covers data access; executing needs the 'exec' action."""
    b = lab.binary("bin/open-only")
    lab.apply([{"path": str(b), "actions": ["open"]}])
    assert lab.run([str(b)]).returncode == 0
    assert lab.probe("read", b).errno == EPERM


def test_exec_008_shebang_interpreter_denied(lab: Lab):
    interp = lab.binary("bin/denied-sh", "/bin/sh")
    script = lab.file("bin/script.sh", f"#!{interp}\nexit 0\n", mode=0o755)
    lab.apply([{"path": str(interp), "actions": ["exec"]}])
    assert lab.probe("exec", script).errno == EPERM
    assert_deny_event(lab, interp, hook=abi.Hook.BPRM_CHECK, action=abi.ACTION_EXEC)


def test_exec_009_copied_binary_allowed(lab: Lab):
    b = lab.binary("bin/denied-true")
    lab.apply([{"path": str(b), "actions": ["exec"]}])
    copy = lab.binary("bin/copied-true", str(b))
    assert lab.run([str(copy)]).returncode == 0


# --- modes, scope, lifecycle ----------------------------------------------------------

def test_mode_001_audit_allows_and_emits(lab: Lab):
    f = lab.file("secret")
    lab.apply([{"path": str(f)}], mode="audit")
    assert lab.probe("read", f).result == {"ok": True}
    e = assert_deny_event(lab, f, decision=abi.Decision.AUDIT)
    assert e.mode == abi.Mode.AUDIT


def test_scope_001_non_selected_cgroup_allowed(lab: Lab):
    f = lab.file("secret")
    lab.apply([{"path": str(f)}])
    assert lab.probe("read", f, cgroup=lab.cg_other).result == {"ok": True}
    assert lab.events_for(f) == []


def test_scope_002_descendant_of_selected_cgroup_denied(lab: Lab):
    f = lab.file("secret")
    lab.apply([{"path": str(f)}])
    assert lab.probe("read", f, cgroup=lab.cg_child).errno == EPERM
    e = assert_deny_event(lab, f, cgroup=lab.cg_child)
    assert e.scope_cgroup_id == cgroup_id(lab.cg_selected)  # matched through the ancestor


def test_scope_003_host_wide_policy_applies_everywhere(lab: Lab):
    f = lab.file("secret")
    lab.apply([{"path": str(f)}], scopes=[])
    assert lab.probe("read", f, cgroup=lab.cg_other).errno == EPERM
    e = assert_deny_event(lab, f, cgroup=lab.cg_other)
    assert e.scope_cgroup_id == 0


def test_life_001_fd_opened_before_policy_keeps_working(lab: Lab):
    """Documented TOCTOU stance: decisions are taken at open/exec, not per read."""
    f = lab.file("secret")
    lab.clear_policy()
    cmd = ["/bin/sh", "-c", f'echo $$ > "{lab.cg_selected}/cgroup.procs" && exec "$@"', "sh",
           PROBE, "hold", str(f)]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdin is not None
    assert "opened" in p.stdout.readline()
    lab.apply([{"path": str(f)}])
    p.stdin.write("go\n")
    p.stdin.flush()
    out, _ = p.communicate(timeout=30)
    assert '"ok": true' in out, out
    assert lab.probe("read", f).errno == EPERM  # a new open is denied


def test_life_002_swap_replaces_rules_atomically(lab: Lab):
    a, b = lab.file("gen-a"), lab.file("gen-b")
    r1 = lab.apply([{"path": str(a)}])
    assert lab.probe("read", a).errno == EPERM
    assert lab.probe("read", b).result == {"ok": True}
    r2 = lab.apply([{"path": str(b)}])
    assert r2.generation == r1.generation + 1 and r2.slot != r1.slot
    assert lab.probe("read", a).result == {"ok": True}
    assert lab.probe("read", b).errno == EPERM
    e = assert_deny_event(lab, b)
    assert e.generation == r2.generation and e.slot == r2.slot


def test_life_003_rule_id_maps_to_the_policy_rule(lab: Lab):
    f1, f2 = lab.file("one"), lab.file("two")
    res = lab.apply([{"id": "first", "path": str(f1)}, {"id": "second", "path": str(f2)}])
    assert lab.probe("read", f2).errno == EPERM
    e = assert_deny_event(lab, f2, rule_index=1)
    rec = lab.store.load(e.generation)
    assert rec.policy.rules[e.rule_id].id == "second"
    assert rec.policy.digest == res.policy.digest


def test_life_004_inode_literal_rule(lab: Lab):
    f = lab.file("by-inode")
    ident = resolve_inode(str(f))
    ma, mi = ident.dev >> 20, ident.dev & 0xFFFFF
    lab.apply([{"inode": f"{ma}:{mi}:{ident.ino}"}])
    assert lab.probe("read", f).errno == EPERM
    assert_deny_event(lab, f)
