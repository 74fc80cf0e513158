"""Edge-case compliance: mounts and filesystems (MNT-nnn).

Bind mounts (file, dir, read-only, recursive), mount namespaces, detached mount trees,
two tmpfs instances, overlayfs (lower, upper, copy-up, exec), ext4 / xfs / btrfs on loop
devices, btrfs subvolumes (st_dev != s_dev), raw block-device reads.  Device numbers as
measured here are recorded in docs/POLICY_SEMANTICS.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from aegis_stream.kernel import abi
from aegis_stream.kernel.btrfs_layout import LayoutSource
from aegis_stream.kernel.devnum import (
    btrfs_root_of_handle,
    file_handle,
    kernel_dev_from_st_dev,
    resolve_inode,
    split_kernel_dev,
)

from .conftest import EPERM, PROBE, ROOT, Lab, assert_deny_event

LDSO = "/lib64/ld-linux-x86-64.so.2"


def sh(*argv: str) -> None:
    p = subprocess.run(list(argv), capture_output=True, text=True)
    assert p.returncode == 0, f"{' '.join(argv)}: {p.stderr.strip()}"


def tok() -> str:
    return os.urandom(3).hex()


def deny(lab: Lab, f, actions=("open",)):
    return lab.apply([{"id": "deny", "path": str(f), "actions": list(actions)}])


EXEC = dict(hook=abi.Hook.BPRM_CHECK, action=abi.ACTION_EXEC)


# --- bind mounts, namespaces, detached trees ------------------------------------------------

def test_mnt_001_directory_bind_mount(lab: Lab):
    """MNT-001: the denied file through a bind mount of its directory."""
    f = lab.file("bdir/secret")
    alias = ROOT / f"bind-{tok()}"
    alias.mkdir()
    sh("mount", "--bind", str(f.parent), str(alias))
    try:
        deny(lab, f)
        assert lab.probe("open", alias / "secret").errno == EPERM
        assert_deny_event(lab, alias / "secret")
    finally:
        sh("umount", str(alias))


def test_mnt_002_read_only_bind_mount(lab: Lab):
    """MNT-002: through a read-only bind: reading is denied by Aegis (EPERM); writing fails
    EROFS in the VFS before any open, so no decision is taken for it."""
    f = lab.file("robind/secret")
    alias = ROOT / f"ro-{tok()}"
    alias.mkdir()
    sh("mount", "--bind", "-o", "ro", str(f.parent), str(alias))
    try:
        deny(lab, f)
        assert lab.probe("open", alias / "secret").errno == EPERM
        assert lab.probe("open", alias / "secret", "O_WRONLY").errno == 30  # EROFS
        evs = lab.events_for(f)
        assert len(evs) == 1 and evs[0].decision == abi.Decision.DENY
    finally:
        sh("umount", str(alias))


def test_mnt_003_recursive_bind_with_submount(lab: Lab):
    """MNT-003: the denied file lives on a submount (its own tmpfs); reached through an
    rbind of the parent tree: denied, and the event names the submount's device."""
    top = lab.files / f"rtop-{tok()}"
    sub = top / "sub"
    sub.mkdir(parents=True)
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(sub))
    alias = ROOT / f"rbind-{tok()}"
    alias.mkdir()
    try:
        f = sub / "secret"
        f.write_text("secret\n")
        sh("mount", "--rbind", str(top), str(alias))
        deny(lab, f)
        assert lab.probe("open", alias / "sub" / "secret").errno == EPERM
        e = assert_deny_event(lab, f)
        assert e.dev != resolve_inode(str(lab.files)).dev  # the submount's own s_dev
    finally:
        sh("umount", "-R", str(alias))
        sh("umount", str(sub))


def test_mnt_004_private_namespace_alias_original_hidden(lab: Lab):
    """MNT-004: unshare -m --propagation private; bind the directory elsewhere, then hide
    the original path under an empty tmpfs: the alias is still denied."""
    f = lab.file("nsdir/secret")
    alias = ROOT / f"nsalias-{tok()}"
    alias.mkdir()
    deny(lab, f)
    script = (f'mount --bind "{f.parent}" "{alias}" && mount -t tmpfs none "{f.parent}" && '
              f'test ! -e "{f}" && cat "{alias}/secret"')
    out = lab.run(["unshare", "-m", "--propagation", "private", "/bin/sh", "-c", script])
    assert out.returncode != 0 and "Operation not permitted" in out.stderr, out
    assert_deny_event(lab, f)


def test_mnt_005_proc_pid_root_into_another_mount_namespace(lab: Lab):
    """MNT-005: a path that exists only in another process's mount namespace, reached
    through /proc/PID/root: denied."""
    f = lab.file("nsonly-src/secret")
    nsonly = ROOT / f"nsonly-{tok()}"
    nsonly.mkdir()
    deny(lab, f)
    holder = lab.spawn(["unshare", "-m", "--propagation", "private", "/bin/sh", "-c",
                        f'mount --bind "{f.parent}" "{nsonly}" && exec "$0" hold "$1"',
                        PROBE, str(lab.file("nsonly-src/benign", "x"))], cgroup=lab.cg_other)
    try:
        info = json.loads(holder.stdout.readline())
        assert not (nsonly / "secret").exists()  # not in our namespace
        out = lab.probe("open", f"/proc/{info['pid']}/root{nsonly}/secret")
        assert out.errno == EPERM, out
        assert_deny_event(lab, f)
    finally:
        holder.communicate("go\n", timeout=30)


def test_mnt_006_detached_mount_tree_open_tree_clone(lab: Lab):
    """MNT-006: open_tree(OPEN_TREE_CLONE) makes a detached, unnamed bind mount; openat
    through its fd is denied."""
    f = lab.file("tree/secret")
    deny(lab, f)
    out = lab.probe("open_tree", f.parent, "secret")
    if out.result.get("stage") == "open_tree":
        pytest.skip(f"kernel-feature: no open_tree(2) (errno {out.errno})")
    assert out.errno == EPERM, out
    assert_deny_event(lab, f)


def test_mnt_007_same_inode_number_on_another_tmpfs_allowed(lab: Lab):
    """MNT-007: two tmpfs instances hand out the same inode numbers; the rule's device
    keeps them apart: the other instance's file with the same i_ino is allowed."""
    a, b = ROOT / f"tA-{tok()}", ROOT / f"tB-{tok()}"
    for d in (a, b):
        d.mkdir()
        sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d))
    try:
        secret = a / "secret"
        secret.write_text("secret\n")
        want = os.stat(secret).st_ino
        twin = None
        for i in range(64):
            c = b / f"f{i}"
            c.write_text("twin\n")
            if os.stat(c).st_ino == want:
                twin = c
                break
        assert twin is not None, "no inode number collision between two fresh tmpfs"
        deny(lab, secret)
        assert resolve_inode(str(twin)).dev != resolve_inode(str(secret)).dev
        assert lab.probe("read", twin).result == {"ok": True}
        assert lab.probe("read", secret).errno == EPERM
        assert_deny_event(lab, secret)
    finally:
        for d in (a, b):
            sh("umount", str(d))


# --- overlayfs ------------------------------------------------------------------------------

@pytest.fixture
def ovl(lab: Lab):
    base = ROOT / f"ovl-{tok()}"
    lower, upper, work, merged = (base / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir(parents=True)
    (lower / "lower-only").write_text("lower secret\n")
    (lower / "copyup").write_text("lower data\n")
    (upper / "upper-file").write_text("upper secret\n")
    shutil.copy2("/bin/true", lower / "tool")
    sh("mount", "-t", "overlay", "overlay", "-o",
       f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged))
    yield SimpleNamespace(lower=lower, upper=upper, merged=merged)
    sh("umount", "-l", str(merged))


def test_mnt_017_overlay_rule_on_merged_path_lower_file(lab: Lab, ovl):
    """MNT-017: rule on the merged path of a lower-only file: the open through the overlay
    is denied on the overlay inode (overlay s_dev, i_ino = the real inode's number)."""
    m = ovl.merged / "lower-only"
    ident = resolve_inode(str(m))
    low = resolve_inode(str(ovl.lower / "lower-only"))
    assert ident.fstype == "overlay" and ident.ino == low.ino and ident.dev != low.dev
    deny(lab, m)
    assert lab.probe("open", m).errno == EPERM
    assert_deny_event(lab, m)


def test_mnt_018_overlay_rule_on_merged_path_upper_file(lab: Lab, ovl):
    """MNT-018: rule on the merged path of an upper-layer file: denied."""
    m = ovl.merged / "upper-file"
    deny(lab, m)
    assert lab.probe("open", m).errno == EPERM
    assert_deny_event(lab, m)


def test_mnt_019_overlay_rule_on_lower_path_open_via_merged(lab: Lab, ovl):
    """MNT-019: rule on the lower layer's path; opening the merged path is denied by the
    overlay's own open of the backing (lower) file, which is decided on the lower inode."""
    low = ovl.lower / "lower-only"
    deny(lab, low)
    assert lab.probe("open", ovl.merged / "lower-only").errno == EPERM
    assert_deny_event(lab, low)


def test_mnt_020_overlay_merged_rule_survives_copy_up(lab: Lab, ovl):
    """MNT-020: rule on the merged path; a process outside the scope writes the file
    (copy-up to a new upper inode): the overlay inode is unchanged and still denied."""
    m = ovl.merged / "copyup"
    deny(lab, m)
    assert lab.probe("open", m, "O_WRONLY|O_APPEND", cgroup=lab.cg_other).result == {"ok": True}
    assert (ovl.upper / "copyup").exists()  # copied up
    assert lab.probe("open", m).errno == EPERM
    assert_deny_event(lab, m)


def test_mnt_021_overlay_in_scope_write_cannot_copy_up_a_denied_lower(lab: Lab, ovl):
    """MNT-021: rule on the lower path; an in-scope write through the overlay needs a
    copy-up, whose read of the lower file is decided for the writer: EPERM, no copy."""
    low = ovl.lower / "copyup"
    deny(lab, low)
    assert lab.probe("open", ovl.merged / "copyup", "O_WRONLY|O_APPEND").errno == EPERM
    assert not (ovl.upper / "copyup").exists()
    assert_deny_event(lab, low)


def test_mnt_022_overlay_lower_rule_and_out_of_scope_copy_up(lab: Lab, ovl):
    """MNT-022 (accepted, BYP-OVL-COPYUP): rule on the lower path; after a copy-up made
    outside the scope the merged file is a new upper inode the rule never named: allowed.
    Rules for overlay workloads belong on the merged path (MNT-020)."""
    low, m = ovl.lower / "copyup", ovl.merged / "copyup"
    deny(lab, low)
    assert lab.probe("open", m, "O_WRONLY|O_APPEND", cgroup=lab.cg_other).result == {"ok": True}
    assert lab.probe("read", m).result == {"ok": True}
    assert lab.probe("read", low).errno == EPERM  # the lower inode itself stays denied


def test_mnt_023_overlay_exec_rule_on_merged_path(lab: Lab, ovl):
    """MNT-023: exec from an overlay, rule on the merged path: denied at bprm_check."""
    m = ovl.merged / "tool"
    deny(lab, m, ("exec",))
    assert lab.probe("exec", m).errno == EPERM
    assert_deny_event(lab, m, **EXEC)


def test_mnt_024_overlay_ldso_rule_on_merged_path(lab: Lab, ovl):
    """MNT-024: ld.so mapping an overlay binary, rule on the merged path: mmap denied."""
    m = ovl.merged / "tool"
    deny(lab, m, ("exec",))
    assert lab.run([LDSO, str(m)]).returncode != 0
    assert_deny_event(lab, m, hook=abi.Hook.MMAP_FILE, action=abi.ACTION_EXEC)


OVL_EXEC = dict(hook=abi.Hook.FILE_OPEN, action=abi.ACTION_EXEC)  # the backing open


def test_mnt_025_overlay_exec_rule_on_lower_path(lab: Lab, ovl):
    """MNT-025: exec through the overlay of a binary whose lower-layer path is denied: the
    overlay's exec-intent open of the backing (lower) file is decided as an exec on the
    lower inode (GAP-OVL-EXEC, mitigated); the event names file_open / exec."""
    low = ovl.lower / "tool"
    deny(lab, low, ("exec",))
    assert lab.probe("exec", ovl.merged / "tool").errno == EPERM
    assert_deny_event(lab, low, **OVL_EXEC)
    assert lab.probe("read", ovl.merged / "tool").result == {"ok": True}  # exec-only rule


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _userns_overlay_or_skip(out) -> None:
    """The unprivileged overlay mount worked; where the kernel refuses it (overlayfs may be
    mounted in a user namespace since Linux 5.11, "ovl: allow unprivileged mounts"), the
    route does not exist: a kernel-feature skip, not a pass."""
    release = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    if out.returncode == 3 and release < (5, 11):
        pytest.skip("kernel-feature: overlayfs cannot be mounted in a user namespace before "
                    f"5.11 (mount: {' '.join(out.stderr.split())[:80]})")
    assert out.returncode != 3, out  # the unprivileged overlay mount itself worked


def test_mnt_031_unprivileged_userns_overlay_exec_of_lower_denied_binary(lab: Lab):
    """MNT-031: the unprivileged route of GAP-OVL-EXEC: a non-root user in the selected
    cgroup creates a user and mount namespace (unshare -Urm), mounts an overlay whose lower
    layer is the directory of an exec-denied binary and executes it through the merged path:
    EPERM, event on the real (lower) inode with the user's uid."""
    base = ROOT / f"uovl-{tok()}"
    low, empty, merged = base / "low", base / "empty", base / "merged"
    for d in (low, empty, merged):
        d.mkdir(parents=True)
    shutil.copy2("/bin/true", low / "tool")
    os.chown(merged, 65534, 65534)
    deny(lab, low / "tool", ("exec",))
    script = (f'mount -t overlay overlay -o lowerdir={low}:{empty} {merged} || exit 3; '
              f'{PROBE} exec {merged}/tool')
    out = lab.run([*NOBODY, "unshare", "-Urm", "/bin/sh", "-c", script])
    _userns_overlay_or_skip(out)
    assert out.errno == EPERM, out
    e = assert_deny_event(lab, low / "tool", **OVL_EXEC)
    assert e.uid == 65534


def test_mnt_032_unprivileged_userns_overlay_denied_interpreter(lab: Lab):
    """MNT-032: the same user namespace overlay; the exec-denied binary is a shell used as
    an interpreter: run through the merged path, and named by a script's #! line through
    the merged path: both EPERM, events on the lower inode."""
    base = ROOT / f"uovl-{tok()}"
    low, empty, merged = base / "low", base / "empty", base / "merged"
    for d in (low, empty, merged):
        d.mkdir(parents=True)
    shutil.copy2("/bin/sh", low / "denied-sh")
    script_file = base / "s.sh"
    script_file.write_text(f"#!{merged}/denied-sh\nexit 0\n")
    script_file.chmod(0o755)
    os.chown(merged, 65534, 65534)
    deny(lab, low / "denied-sh", ("exec",))
    script = (f'mount -t overlay overlay -o lowerdir={low}:{empty} {merged} || exit 3; '
              f'{PROBE} exec {merged}/denied-sh; {PROBE} exec {script_file}')
    out = lab.run([*NOBODY, "unshare", "-Urm", "/bin/sh", "-c", script])
    _userns_overlay_or_skip(out)
    results = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert [r.get("errno") for r in results] == [EPERM, EPERM], out
    ident = resolve_inode(str(low / "denied-sh"))
    evs = [e for e in lab.drain() if (e.dev, e.ino) == (ident.dev, ident.ino)]
    assert len(evs) == 2 and all(e.uid == 65534 for e in evs), evs
    assert_deny_event(lab, low / "denied-sh", **OVL_EXEC, events=evs)


def test_mnt_033_overlay_ldso_rule_on_lower_path(lab: Lab, ovl):
    """MNT-033: ld.so maps an overlay binary whose lower-layer path is exec-denied: the
    overlay file's mapping is decided on its real (lower) file too (GAP-OVL-EXEC): the
    mapping fails, the event names mmap_file and the lower inode."""
    low = ovl.lower / "tool"
    deny(lab, low, ("exec",))
    assert lab.run([LDSO, str(ovl.merged / "tool")]).returncode != 0
    assert_deny_event(lab, low, hook=abi.Hook.MMAP_FILE, action=abi.ACTION_EXEC)


# --- loop-device filesystems ----------------------------------------------------------------

def _fs_file(loopfs, kind: str, name: str, content: str = "secret\n") -> Path:
    fs = loopfs(kind)
    d = fs.mnt / f"t-{tok()}"
    d.mkdir()
    f = d / name
    f.write_text(content)
    return f


def _fs_binary(loopfs, kind: str) -> Path:
    fs = loopfs(kind)
    d = fs.mnt / f"b-{tok()}"
    d.mkdir()
    shutil.copy2("/bin/true", d / "tool")
    return d / "tool"


def test_mnt_008_ext4_loop_open_denied(lab: Lab, loopfs):
    """MNT-008: ext4 on a loop device: denied; s_dev is the loop device (major 7)."""
    f = _fs_file(loopfs, "ext4", "secret")
    deny(lab, f)
    assert lab.probe("open", f).errno == EPERM
    e = assert_deny_event(lab, f)
    assert split_kernel_dev(e.dev)[0] == 7
    assert e.dev == kernel_dev_from_st_dev(os.stat(f).st_dev)  # ext4: st_dev == s_dev


def test_mnt_009_ext4_loop_exec_denied(lab: Lab, loopfs):
    """MNT-009: exec of a denied binary on ext4."""
    b = _fs_binary(loopfs, "ext4")
    deny(lab, b, ("exec",))
    assert lab.probe("exec", b).errno == EPERM
    assert_deny_event(lab, b, **EXEC)


def test_mnt_010_xfs_loop_open_denied(lab: Lab, loopfs):
    """MNT-010: xfs on a loop device: denied."""
    f = _fs_file(loopfs, "xfs", "secret")
    deny(lab, f)
    assert lab.probe("open", f).errno == EPERM
    e = assert_deny_event(lab, f)
    assert split_kernel_dev(e.dev)[0] == 7


def test_mnt_011_xfs_loop_exec_denied(lab: Lab, loopfs):
    """MNT-011: exec of a denied binary on xfs."""
    b = _fs_binary(loopfs, "xfs")
    deny(lab, b, ("exec",))
    assert lab.probe("exec", b).errno == EPERM
    assert_deny_event(lab, b, **EXEC)


def _subvolume_keys(lab: Lab, loopfs) -> None:
    """The kernel keys a btrfs inode by its subvolume's device where the programs can find
    BTRFS_I(inode)->root->anon_dev (bpf/core_fixes.bpf.h): through the btrfs module's BTF
    (CO-RE, 5.11+), or, on 5.10 (no module BTF), through the offsets the loader hands them
    from the build table for this exact btrfs.ko (aegis_stream/kernel/btrfs_layout.py).
    Every lab kernel has one of the two: a kernel with neither is a failure that names the
    script filing its build (scripts/btrfs-layout), never a silent s_dev collision."""
    loopfs("btrfs")  # loaded before the programs (conftest); the filesystem is made here
    k = lab.obj.btrfs_keying
    assert k.source is not LayoutSource.NONE, f"btrfs keyed by s_dev here: {k.reason}"


def test_mnt_012_btrfs_top_level_denied_st_dev_is_not_s_dev(lab: Lab, loopfs):
    """MNT-012: btrfs: st_dev is the subvolume's anonymous device, never the superblock's
    s_dev; the kernel keys btrfs inodes by the subvolume's device (GAP-BTRFS-SUBVOL), so
    the rule and the event carry st_dev (the compiler also writes the s_dev key)."""
    _subvolume_keys(lab, loopfs)
    f = _fs_file(loopfs, "btrfs", "secret")
    ident = resolve_inode(str(f))
    assert ident.dev == kernel_dev_from_st_dev(os.stat(f).st_dev) != ident.sb_dev
    res = deny(lab, f)
    assert res.policy.rules[0].sb_dev == ident.sb_dev
    assert lab.probe("open", f).errno == EPERM
    e = assert_deny_event(lab, f)
    assert e.dev == ident.dev


def _subvol(loopfs, name: str) -> Path:
    fs = loopfs("btrfs")
    sv = fs.mnt / f"{name}-{tok()}"
    sh("btrfs", "subvolume", "create", str(sv))
    return sv


def test_mnt_013_btrfs_subvolume_rule_matches(lab: Lab, loopfs):
    """MNT-013: a file in a btrfs subvolume (st_dev differs from the top level and from
    s_dev): denied, event dev = the subvolume's device (its st_dev)."""
    _subvolume_keys(lab, loopfs)
    sv = _subvol(loopfs, "svA")
    f = sv / "secret"
    f.write_text("secret\n")
    top = loopfs("btrfs").mnt
    assert os.stat(f).st_dev != os.stat(top).st_dev
    deny(lab, f)
    assert lab.probe("open", f).errno == EPERM
    e = assert_deny_event(lab, f)
    assert e.dev == kernel_dev_from_st_dev(os.stat(f).st_dev) != resolve_inode(str(top)).dev


def test_mnt_014_btrfs_subvolume_exec_denied(lab: Lab, loopfs):
    """MNT-014: exec of a denied binary inside a btrfs subvolume."""
    _subvolume_keys(lab, loopfs)
    sv = _subvol(loopfs, "svX")
    shutil.copy2("/bin/true", sv / "tool")
    deny(lab, sv / "tool", ("exec",))
    assert lab.probe("exec", sv / "tool").errno == EPERM
    assert_deny_event(lab, sv / "tool", **EXEC)


def test_mnt_015_btrfs_inode_numbers_collide_across_subvolumes(lab: Lab, loopfs):
    """MNT-015 (measured): two subvolumes share one superblock (s_dev) and number their
    inodes independently: the first file of each has the same (s_dev, i_ino); only the
    subvolume id (file handle root objectid, or st_dev) tells them apart."""
    a, b = _subvol(loopfs, "svA"), _subvol(loopfs, "svB")
    (a / "secret").write_text("secret\n")
    (b / "other").write_text("other\n")
    ia, ib = resolve_inode(str(a / "secret")), resolve_inode(str(b / "other"))
    assert (ia.sb_dev, ia.ino) == (ib.sb_dev, ib.ino) and ia.dev != ib.dev
    ha, hb = file_handle(str(a / "secret")), file_handle(str(b / "other"))
    assert ha and hb and btrfs_root_of_handle(ha) != btrfs_root_of_handle(hb)
    assert os.stat(a / "secret").st_dev != os.stat(b / "other").st_dev


def test_mnt_016_btrfs_rule_does_not_deny_another_subvolumes_file(lab: Lab, loopfs):
    """MNT-016: a rule on a file in subvolume A does not deny an unrelated file of
    subvolume B that has the same inode number (GAP-BTRFS-SUBVOL, mitigated: btrfs inodes
    are keyed by their subvolume's device); A's file stays denied."""
    _subvolume_keys(lab, loopfs)
    a, b = _subvol(loopfs, "svA"), _subvol(loopfs, "svB")
    (a / "secret").write_text("secret\n")
    (b / "other").write_text("other\n")
    assert os.stat(a / "secret").st_ino == os.stat(b / "other").st_ino
    deny(lab, a / "secret")
    assert lab.probe("read", b / "other").result == {"ok": True}
    assert lab.probe("read", a / "secret").errno == EPERM
    assert_deny_event(lab, a / "secret")


def test_mnt_034_btrfs_snapshot_is_its_own_subvolume(lab: Lab, loopfs):
    """MNT-034: a snapshot is a subvolume with its own device: a rule on the snapshot's copy
    denies that copy and not the original (same inode number); a rule on the original
    denies the original and not a snapshot's copy (a new inode, like a reflink copy; see
    BYP-BTRFS-SNAPSHOT in docs/BYPASS_CATALOG.md)."""
    _subvolume_keys(lab, loopfs)
    a = _subvol(loopfs, "svS")
    (a / "secret").write_text("secret\n")
    snap = a.parent / f"snap-{tok()}"
    sh("btrfs", "subvolume", "snapshot", str(a), str(snap))
    assert os.stat(snap / "secret").st_ino == os.stat(a / "secret").st_ino
    assert os.stat(snap / "secret").st_dev != os.stat(a / "secret").st_dev
    deny(lab, snap / "secret")
    assert lab.probe("read", snap / "secret").errno == EPERM
    assert_deny_event(lab, snap / "secret")
    assert lab.probe("read", a / "secret").result == {"ok": True}
    deny(lab, a / "secret")
    assert lab.probe("read", a / "secret").errno == EPERM
    assert_deny_event(lab, a / "secret")
    assert lab.probe("read", snap / "secret").result == {"ok": True}



LOAD_AND_SAY = """
import json, sys
from aegis_stream.kernel.loader import BpfObject
o = BpfObject(pin_root_dir=sys.argv[1])
o.open()
o.load()
print(json.dumps({"source": o.btrfs_keying.source.value, "reason": o.btrfs_keying.reason}))
o.close(keep_pins=False)
"""


def test_mnt_035_btrfs_subvolume_keys_under_the_units_capabilities(lab: Lab, loopfs, tmp_path):
    """MNT-035: under the systemd unit's capability set (no CAP_SYS_ADMIN, so libbpf may not
    walk module BTF and CO-RE sees vmlinux only) the programs still load and still get
    btrfs's offsets: from /sys/kernel/btf/btrfs (5.11+) or the build table (5.10).  Before,
    the hardened unit keyed btrfs inodes by s_dev on every kernel, silently."""
    from .test_service_caps import bounded, unit_caps

    loopfs("btrfs")
    out = subprocess.run([*bounded(unit_caps()), sys.executable, "-c", LOAD_AND_SAY,
                          str(tmp_path / "pins")], capture_output=True, text=True, timeout=240,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = "btf-file" if Path("/sys/kernel/btf/btrfs").exists() else "build-table"
    assert got["source"] == want, got

def test_mnt_026_raw_block_device_read_bypasses_inode_rules(lab: Lab, loopfs):
    """MNT-026 (accepted, BYP-RAW-BLOCK): a process that may read the block device reads a
    denied file's blocks without opening the file; see MNT-027 for the mitigation."""
    needle = f"AEGIS-NEEDLE-{tok()}"
    f = _fs_file(loopfs, "ext4", "raw-secret", needle + "\n")
    deny(lab, f)
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    assert lab.probe("read", f).errno == EPERM
    out = lab.probe("find", loopfs("ext4").loopdev, needle)
    assert out.result == {"ok": True, "found": True}, out


def test_mnt_027_rule_on_the_block_device_node(lab: Lab, loopfs):
    """MNT-027 (mitigation of BYP-RAW-BLOCK): a rule on the device node denies raw reads."""
    dev = loopfs("ext4").loopdev
    deny(lab, dev)
    assert lab.probe("find", dev, "x").errno == EPERM
    assert_deny_event(lab, dev)


def test_mnt_028_rule_survives_remount_of_the_same_device(lab: Lab, loopfs):
    """MNT-028: a persistent filesystem unmounted and mounted again from the same device
    keeps s_dev and inode numbers: the rule still matches."""
    fs = loopfs("ext4")
    f = _fs_file(loopfs, "ext4", "secret")
    deny(lab, f)
    sh("umount", str(fs.mnt))
    sh("mount", "-t", "ext4", fs.loopdev, str(fs.mnt))
    assert lab.probe("open", f).errno == EPERM
    assert_deny_event(lab, f)


def test_mnt_029_ext4_directory_bound_into_tmpfs(lab: Lab, loopfs):
    """MNT-029: an ext4 directory bind-mounted into the tmpfs tree: the alias is denied and
    the event carries the ext4 device, not the tmpfs one."""
    f = _fs_file(loopfs, "ext4", "secret")
    alias = lab.files / f"x-{tok()}"
    alias.mkdir()
    sh("mount", "--bind", str(f.parent), str(alias))
    try:
        deny(lab, f)
        assert lab.probe("open", alias / "secret").errno == EPERM
        e = assert_deny_event(lab, f)
        assert split_kernel_dev(e.dev)[0] == 7
    finally:
        sh("umount", str(alias))


def test_mnt_030_device_numbers_and_generations_per_filesystem(lab: Lab, loopfs, ovl,
                                                                record_testsuite_property):
    """MNT-030 (measured): per filesystem, userspace st_dev vs the superblock's s_dev (what
    the kernel keys rules by; mountinfo) and whether i_generation is readable.  Recorded in
    the kernel matrix and docs/POLICY_SEMANTICS.md.  tmpfs, ext4, xfs, overlay (one
    underlying fs): st_dev == s_dev; btrfs: never (per-subvolume anonymous devices)."""
    from aegis_stream.kernel.devnum import inode_generation

    paths = {"tmpfs": lab.file("devnum-probe")}
    for kind in ("ext4", "xfs", "btrfs"):
        paths[kind] = _fs_file(loopfs, kind, "devnum-probe")
    sv = _subvol(loopfs, "svM")
    (sv / "f").write_text("x")
    paths["btrfs-subvolume"] = sv / "f"
    paths["overlay-lower"] = ovl.merged / "lower-only"
    paths["overlay-upper"] = ovl.merged / "upper-file"
    rows = {}
    for name, p in paths.items():
        ident, st = resolve_inode(str(p)), os.stat(p)
        s_dev = ident.sb_dev or ident.dev  # btrfs: resolve_inode's dev is the subvolume's
        rows[name] = {
            "fstype": ident.fstype,
            "s_dev": "{}:{}".format(*split_kernel_dev(s_dev)),
            "st_dev": f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}",
            "st_dev_is_s_dev": kernel_dev_from_st_dev(st.st_dev) == s_dev,
            "i_generation": inode_generation(str(p)) is not None,
        }
    record_testsuite_property("devnums", json.dumps(rows, sort_keys=True))
    for name in ("tmpfs", "ext4", "xfs", "overlay-lower", "overlay-upper"):
        assert rows[name]["st_dev_is_s_dev"], (name, rows[name])
    for name in ("btrfs", "btrfs-subvolume"):
        assert not rows[name]["st_dev_is_s_dev"], (name, rows[name])
    for name in ("tmpfs", "ext4", "xfs", "btrfs", "btrfs-subvolume"):
        assert rows[name]["i_generation"], (name, rows[name])
    assert rows["ext4"]["s_dev"].startswith("7:") and rows["xfs"]["s_dev"].startswith("7:")
