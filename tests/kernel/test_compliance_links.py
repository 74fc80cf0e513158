"""Edge-case compliance: links and names of a denied inode (LINK-010 onwards).

LINK-001..009 are in test_reference_slice.py.  A rule is an inode, resolved once at apply:
every name of that inode is denied (symlink chains, hardlinks, renames, races between
names), a new inode behind an old name is not.  Inode-number reuse (ext4) is measured and
detected (compiler.stale_rules); the kernel-side fix is proposed in docs/POLICY_SEMANTICS.md.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
from pathlib import Path

import pytest

from aegis_stream.kernel.counters import read_counters
from aegis_stream.kernel.devnum import inode_generation, resolve_inode
from aegis_stream.policy import compiler

from .conftest import EPERM, PROBE, Lab, assert_deny_event

RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> None:
    if _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), RENAME_EXCHANGE):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def fresh_symlink(link: Path, target) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    return link


def deny(lab: Lab, f: Path, actions=("open",)):
    return lab.apply([{"id": "deny", "path": str(f), "actions": list(actions)}])


# --- symlinks ------------------------------------------------------------------------------

def test_link_010_absolute_symlink_chain(lab: Lab):
    """LINK-010: a chain of three absolute symlinks ending at the denied file."""
    f = lab.file("secret")
    l1 = fresh_symlink(lab.files / "chain" / "l1", f)
    l2 = fresh_symlink(lab.files / "chain" / "l2", l1)
    l3 = fresh_symlink(lab.files / "chain" / "l3", l2)
    deny(lab, f)
    assert lab.probe("open", l3).errno == EPERM
    assert_deny_event(lab, f)


def test_link_011_relative_symlink_chain_with_dotdot(lab: Lab):
    """LINK-011: relative symlinks hopping through '..' to the denied file."""
    f = lab.file("rel/target/secret")
    (lab.files / "rel" / "a" / "b").mkdir(parents=True, exist_ok=True)
    hop = fresh_symlink(lab.files / "rel" / "a" / "b" / "hop", "../../target/secret")
    top = fresh_symlink(lab.files / "rel" / "top", "a/b/hop")
    deny(lab, f)
    assert lab.probe("open", top).errno == EPERM
    assert lab.probe("open", hop).errno == EPERM
    assert len(lab.events_for(f)) == 2


def test_link_012_symlinked_parent_directory(lab: Lab):
    """LINK-012: the denied file reached through a symlink to its directory."""
    f = lab.file("realdir/secret")
    d = fresh_symlink(lab.files / "dirlink", lab.files / "realdir")
    deny(lab, f)
    assert lab.probe("open", d / "secret").errno == EPERM
    assert_deny_event(lab, f)


def test_link_013_symlink_created_after_apply(lab: Lab):
    """LINK-013: a symlink made after the policy is just another name: denied."""
    f = lab.file("secret")
    deny(lab, f)
    link = fresh_symlink(lab.files / "late-link", f)
    assert lab.probe("open", link).errno == EPERM
    assert_deny_event(lab, f)


def test_link_014_rule_written_against_a_symlink_names_its_target(lab: Lab):
    """LINK-014: a rule whose path is a symlink names the target at apply; retargeting the
    link afterwards does not move the rule."""
    f, benign = lab.file("t014/secret"), lab.file("t014/benign", "benign\n")
    link = fresh_symlink(lab.files / "t014" / "link", f)
    deny(lab, link)
    fresh_symlink(link, benign)
    assert lab.probe("read", link).result == {"ok": True}
    assert lab.probe("read", f).errno == EPERM
    assert_deny_event(lab, f)


def test_link_015_o_nofollow_on_symlink_refused_before_open(lab: Lab):
    """LINK-015: O_NOFOLLOW on a symlink fails ELOOP in the lookup: no open, no decision."""
    f = lab.file("secret")
    link = fresh_symlink(lab.files / "nofollow-link", f)
    deny(lab, f)
    assert lab.probe("open", link, "O_RDONLY|O_NOFOLLOW").errno == errno.ELOOP
    assert lab.events_for(f) == []


# --- races between names -------------------------------------------------------------------

def _race(lab: Lab, a: Path, b: Path, opened: Path, secret: Path):
    ino = os.stat(secret).st_ino
    swapper = lab.spawn([PROBE, "exchange", str(a), str(b), "0"], cgroup=lab.cg_other)
    try:
        assert "swapping" in swapper.stdout.readline()
        out = lab.probe("open_loop", opened, "3000", str(ino))
    finally:
        swapper.kill()
        swapper.communicate(timeout=30)
    r = out.result
    assert r["opened_denied"] == 0, r  # the denied inode was never opened
    assert r["other"] == 0 and r["opened"] + r["eperm"] == 3000, r
    assert r["eperm"] > 0 and r["opened"] > 0, f"no interleaving happened: {r}"
    evs = [e for e in lab.drain() if e.ino == ino]
    assert len(evs) == r["eperm"]  # one event per denied open, all on the denied inode


def test_link_016_symlink_swap_race(lab: Lab):
    """LINK-016: a symlink flipping between a benign target and the denied one
    (RENAME_EXCHANGE of two links, 3000 opens racing): every open that reached the denied
    inode was denied, every success was the benign file."""
    d = lab.files / "swap"
    secret, benign = lab.file("swap/secret"), lab.file("swap/benign", "benign\n")
    link = fresh_symlink(d / "link", benign)
    alt = fresh_symlink(d / "link.alt", secret)
    deny(lab, secret)
    _race(lab, link, alt, link, secret)


def test_link_017_rename_race_between_names(lab: Lab):
    """LINK-017: the denied file and a benign one exchange names 'a'/'b' while a process
    opens 'a' 3000 times: the decision follows the inode, never the name.  The rule is given
    by inode (a path rule would pass itself to the benign file at the first exchange:
    PATH-008)."""
    a, b = lab.file("rr/a"), lab.file("rr/b", "benign\n")
    ident = resolve_inode(str(a))
    lab.apply([{"id": "deny", "inode": f"{ident.dev >> 20}:{ident.dev & 0xFFFFF}:{ident.ino}",
                "actions": ["open"]}])
    secret = a
    ino = os.stat(a).st_ino
    _race(lab, a, b, a, secret)
    assert os.stat(a).st_ino == ino or os.stat(b).st_ino == ino


# --- hardlinks ------------------------------------------------------------------------------

def test_link_018_rule_via_hardlink_name_denies_original(lab: Lab):
    """LINK-018: the rule names a hardlink made before apply in another directory; the
    original name is denied."""
    f = lab.file("hl18/orig/secret")
    (lab.files / "hl18" / "other").mkdir(parents=True, exist_ok=True)
    hl = lab.files / "hl18" / "other" / "alias"
    hl.unlink(missing_ok=True)
    os.link(f, hl)
    deny(lab, hl)
    assert lab.probe("open", f).errno == EPERM
    assert_deny_event(lab, f)


def test_link_019_rule_survives_unlink_of_its_source_name(lab: Lab):
    """LINK-019: the name the rule was resolved from is unlinked; the inode lives on under
    its other hardlink and stays denied."""
    f = lab.file("hl19/secret")
    hl = lab.files / "hl19" / "survivor"
    hl.unlink(missing_ok=True)
    os.link(f, hl)
    deny(lab, f)
    f.unlink()
    assert lab.probe("open", hl).errno == EPERM
    assert_deny_event(lab, hl)


# --- renames ---------------------------------------------------------------------------------

def test_link_020_rename_parent_directory(lab: Lab):
    """LINK-020: renaming the directory above the denied file changes no decision."""
    f = lab.file("pdir/secret")
    deny(lab, f)
    moved = lab.files / "pdir-moved"
    if moved.exists():
        for p in moved.iterdir():
            p.unlink()
        moved.rmdir()
    os.rename(lab.files / "pdir", moved)
    assert lab.probe("open", moved / "secret").errno == EPERM
    assert_deny_event(lab, moved / "secret")


def test_link_021_rename_over_the_rule_path(lab: Lab):
    """LINK-021 (defined): `mv benign <rule path>` replaces the inode behind the path.  The
    new file at the path inherits the path rule in the kernel before the rename returns
    (bpf/continuity.bpf.h; PATH-006); the old inode keeps its rule (denied through its
    remaining hardlink).  The compiled generation still names the old inode: stale_rules()
    reports it, and the agent's watcher restages."""
    f = lab.file("ro21/target")
    keep = lab.files / "ro21" / "old-inode"
    keep.unlink(missing_ok=True)
    os.link(f, keep)
    res = deny(lab, f)
    repl = lab.file("ro21/replacement", "replacement\n")
    os.rename(repl, f)
    assert lab.probe("read", f).errno == EPERM
    assert_deny_event(lab, f)
    assert lab.probe("read", keep).errno == EPERM
    assert_deny_event(lab, keep)
    stale = compiler.stale_rules(res.policy)
    assert [s.reason for s in stale] == ["moved"]  # detected: re-apply to re-resolve


def test_link_022_rename_denied_file_over_a_benign_name(lab: Lab):
    """LINK-022: `mv secret public`: the public name now leads to the denied inode."""
    f, public = lab.file("ro22/secret"), lab.file("ro22/public", "public\n")
    deny(lab, f)
    os.rename(f, public)
    assert lab.probe("open", public).errno == EPERM
    assert_deny_event(lab, public)


def test_link_023_rename_exchange_follows_the_inode(lab: Lab):
    """LINK-023: renameat2(RENAME_EXCHANGE) of the denied file and a benign one: the
    decision moves with the inode to the other name.  The rule is given by inode (a path
    rule also passes itself to the file exchanged onto its path: PATH-008)."""
    a, b = lab.file("ex23/a"), lab.file("ex23/b", "benign\n")
    ident = resolve_inode(str(a))
    lab.apply([{"id": "deny", "inode": f"{ident.dev >> 20}:{ident.dev & 0xFFFFF}:{ident.ino}",
                "actions": ["open"]}])
    exchange(a, b)
    assert lab.probe("read", a).result == {"ok": True}
    assert lab.probe("read", b).errno == EPERM
    assert_deny_event(lab, b)


# --- delete and recreate: inode number reuse ------------------------------------------------

def test_link_024_tmpfs_recreate_gets_a_new_inode(lab: Lab):
    """LINK-024 (measured): on tmpfs a deleted + recreated file gets a new inode number
    (tmpfs does not reuse numbers while mounted): the rule does not follow the name."""
    f = lab.file("rc24/victim")
    old = resolve_inode(str(f))
    deny(lab, f)
    f.unlink()
    lab.file("rc24/victim", "new\n")
    new = resolve_inode(str(f))
    assert new.ino != old.ino and new.dev == old.dev
    assert lab.probe("read", f).result == {"ok": True}
    assert lab.events_for(f) == []


def _reuse_ino(d: Path, victim: Path, want: int) -> Path:
    """Create files in d until one gets inode number ``want``; rename it to victim."""
    for i in range(64):
        cand = d / f"cand-{i}"
        cand.write_text(f"new {i}\n")
        if os.stat(cand).st_ino == want:
            os.rename(cand, victim)
            return victim
    raise AssertionError(f"ext4 never reused inode {want} in 64 creations")


@pytest.fixture
def ext4_victim(lab: Lab, loopfs):
    fs = loopfs("ext4")
    d = fs.mnt / f"reuse-{os.urandom(3).hex()}"
    d.mkdir()
    victim = d / "victim"
    victim.write_text("old\n")
    return d, victim


def test_link_025_ext4_reuses_dev_ino_with_a_new_generation(lab: Lab, ext4_victim):
    """LINK-025 (measured): ext4 hands a deleted file's inode number to the next new file
    at once: same (s_dev, i_ino), different i_generation.  (dev, ino) alone is therefore
    not an identity across delete + create; i_generation is."""
    d, victim = ext4_victim
    old, old_gen = resolve_inode(str(victim)), inode_generation(str(victim))
    victim.unlink()
    _reuse_ino(d, victim, old.ino)
    new, new_gen = resolve_inode(str(victim)), inode_generation(str(victim))
    assert (new.dev, new.ino) == (old.dev, old.ino)
    assert old_gen is not None and new_gen is not None and new_gen != old_gen


def test_link_026_stale_rule_on_reused_inode_is_detected(lab: Lab, ext4_victim):
    """LINK-026 (mitigated, detection): the compiler records i_generation; after delete +
    recreate with a reused number, stale_rules() reports the rule as 'reused'."""
    d, victim = ext4_victim
    res = deny(lab, victim)
    assert res.policy.rules[0].i_generation is not None
    old = res.policy.rules[0].ino
    victim.unlink()
    _reuse_ino(d, victim, old)
    stale = compiler.stale_rules(res.policy)
    assert [(s.rule_id, s.reason) for s in stale] == [("deny", "reused")]


def _stale(lab: Lab) -> int:
    return read_counters(lab.maps)["hooks"]["file_open"]["stale"]


def test_link_027_recreated_file_with_reused_inode_not_denied(lab: Lab, ext4_victim):
    """LINK-027: a file the policy never named is not denied because it reuses the inode
    number of a deleted, denied file (GAP-INO-REUSE, mitigated): the rule carries the
    file's i_generation (ext4 with metadata_csum: CHECK_GEN), the kernel counts the
    match as stale and allows it, with no event."""
    d, victim = ext4_victim
    res = deny(lab, victim)
    r = res.policy.rules[0]
    assert r.check_gen and r.i_generation == inode_generation(str(victim))
    assert lab.probe("read", victim).errno == EPERM  # the named file: denied
    assert_deny_event(lab, victim)
    victim.unlink()
    _reuse_ino(d, victim, r.ino)
    before = _stale(lab)
    assert lab.probe("read", victim).result == {"ok": True}
    assert _stale(lab) == before + 1
    assert lab.events_for(victim) == []


def test_link_028_chattr_v_refused_on_a_check_gen_ext4_rule(lab: Lab, ext4_victim):
    """LINK-028: the generation check cannot be turned into a bypass on ext4 with
    metadata_csum: the owner's `chattr -v` (FS_IOC_SETVERSION) of a denied file fails, its
    generation is unchanged and it stays denied."""
    _d, victim = ext4_victim
    res = deny(lab, victim)
    assert res.policy.rules[0].check_gen
    gen = inode_generation(str(victim))
    out = subprocess.run(["chattr", "-v", str((gen or 0) + 1), str(victim)],
                         capture_output=True, text=True)
    assert out.returncode != 0, out
    assert inode_generation(str(victim)) == gen
    assert lab.probe("read", victim).errno == EPERM
    assert_deny_event(lab, victim)


def test_link_029_no_generation_check_where_the_owner_can_rewrite_it(lab: Lab, loopfs):
    """LINK-029: on ext4 without metadata_csum the owner may rewrite i_generation, so the
    compiler leaves CHECK_GEN off: after `chattr -v` (which succeeds there) the file is
    still denied (fail-closed, never a stale miss)."""
    fs = loopfs("ext4-nocsum")
    victim = fs.mnt / f"nocsum-{os.urandom(3).hex()}"
    victim.write_text("old\n")
    res = deny(lab, victim)
    assert not res.policy.rules[0].check_gen
    gen = inode_generation(str(victim))
    out = subprocess.run(["chattr", "-v", str((gen or 0) + 1), str(victim)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out
    assert inode_generation(str(victim)) == (gen or 0) + 1
    before = _stale(lab)
    assert lab.probe("read", victim).errno == EPERM
    assert _stale(lab) == before
    assert_deny_event(lab, victim)
