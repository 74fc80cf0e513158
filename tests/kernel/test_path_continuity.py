"""Path continuity in the kernel (issue 12, part 1): PATH-001 onwards.

A rule written as ``path = ...`` keys the inode the path named at apply.  Tools replace
files instead of editing them (write a new file, rename it over the path); the
lsm/inode_rename program (bpf/continuity.bpf.h) passes a path rule to the file renamed over
its path before the rename returns, so the path is never unprotected.  Every scenario here
replaces the file the way a real tool does and then tries the path from the selected
cgroup; the events of those denies carry ``AEGIS_RULE_INHERITED``.  What the kernel cannot
see (delete + create, ``install``, a replaced parent directory) is the agent's watcher's
(aegis_stream/agent/pathwatch.py, its own scenarios).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from aegis_stream.kernel import abi
from aegis_stream.kernel.counters import read_continuity_counters
from aegis_stream.kernel.devnum import resolve_inode

from .conftest import EPERM, PROBE, Lab, assert_deny_event

RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def deny(lab: Lab, f: Path, actions=("open",), rid: str = "deny"):
    return lab.apply([{"id": rid, "path": str(f), "actions": list(actions)}])


def inherited(lab: Lab) -> int:
    return read_continuity_counters(lab.maps)["inherited"]


def diag(lab: Lab, f: Path) -> str:
    """What the kernel holds for ``f``'s device: for a failure message."""
    from aegis_stream.kernel.counters import read_hook_counters
    from aegis_stream.kernel.devnum import inode_generation

    ident = resolve_inode(str(f))
    rows = []
    for k in lab.maps[abi.MAP_RULES].keys():
        ino, dev, slot = abi.INODE_KEY.unpack(k)
        if dev == ident.dev:
            v = lab.maps[abi.MAP_RULES].lookup(k)
            rows.append((slot, ino, abi.RULE.unpack(v[: abi.RULE.size]) if v else None))
    ctl = read_hook_counters(lab.maps)["file_open"]
    return (f"{f}: ino {ident.ino} gen {inode_generation(str(f))}; entries (slot, ino, (id, act, "
            f"flags, gen)) {sorted(rows)}; continuity {read_continuity_counters(lab.maps)}; "
            f"file_open stale {ctl.get('stale')} matched {ctl.get('rule_matched')}")


def replace_by_rename(path: Path, content: str, suffix: str = "+") -> None:
    """passwd/shadow style (lckpwdf + putpwent): write path+suffix, fsync, rename over path."""
    tmp = path.with_name(path.name + suffix)
    with open(tmp, "w") as fh:
        fh.write(content)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)
    os.rename(tmp, path)


def assert_inherited_deny(lab: Lab, f: Path, *, hook=abi.Hook.FILE_OPEN, action=abi.ACTION_OPEN,
                          op: str = "read") -> None:
    """``f`` is denied from the selected cgroup, and the deny's event names the inode now at
    ``f`` with the rule's index and the INHERITED flag."""
    out = lab.probe(op, f)
    assert out.errno == EPERM, (f, out)
    e = assert_deny_event(lab, f, hook=hook, action=action)
    assert e.rule_flags & abi.RULE_INHERITED and e.rule_flags & abi.RULE_PATH, e


@pytest.fixture
def ext4_dir(lab: Lab, loopfs) -> Path:
    d = loopfs("ext4").mnt / f"cont-{os.urandom(3).hex()}"
    d.mkdir()
    return d


# --- replacement by the tools that do it ------------------------------------------------------

def test_path_001_passwd_style_replace_tmpfs(lab: Lab):
    """PATH-001: passwd-style replace on tmpfs (write shadow+, fsync, rename over shadow): the
    new file is denied at once (the event says INHERITED); the replaced inode, still alive
    under a hardlink, stays denied under its own entry."""
    f = lab.file("p001/shadow", "root:old:1::::::\n")
    keep = lab.files / "p001" / "shadow.old-inode"
    keep.unlink(missing_ok=True)
    os.link(f, keep)
    deny(lab, f)
    before = inherited(lab)
    replace_by_rename(f, "root:new:2::::::\n")
    assert inherited(lab) == before + 1  # one slot holds the rule
    assert_inherited_deny(lab, f)
    assert lab.probe("read", keep).errno == EPERM
    e = assert_deny_event(lab, keep)
    assert not e.rule_flags & abi.RULE_INHERITED, e


def test_path_002_sed_i_repeated_on_ext4(lab: Lab, ext4_dir: Path):
    """PATH-002: `sed -i` four times on ext4, which hands a replaced file's inode number back
    on alternate edits: after every edit the path is denied (no flicker between denied and
    allowed), and every deny is of the inode at the path."""
    f = ext4_dir / "config"
    f.write_text("value=0\n")
    deny(lab, f)
    seen = set()
    for i in range(4):
        subprocess.run(["sed", "-i", f"s/value=.*/value={i + 1}/", str(f)], check=True)
        assert f.read_text() == f"value={i + 1}\n"
        seen.add(os.stat(f).st_ino)
        assert lab.probe("read", f).errno == EPERM, f"edit {i + 1}: readable; {diag(lab, f)}"
        assert_deny_event(lab, f)
    assert len(seen) > 1  # sed -i did replace the inode


def test_path_003_perl_pi(lab: Lab):
    """PATH-003: `perl -pi -e` (rename of the original away, a new file at the path, the
    original unlinked): the edited file at the path is denied."""
    if shutil.which("perl") is None:
        pytest.fail("perl missing from the lab guest")
    f = lab.file("p003/hosts", "127.0.0.1 localhost\n")
    deny(lab, f)
    ino = os.stat(f).st_ino
    subprocess.run(["perl", "-pi", "-e", "s/localhost/evil/", str(f)], check=True)
    assert f.read_text() == "127.0.0.1 evil\n"
    if os.stat(f).st_ino == ino:
        pytest.fail("perl -pi edited in place: nothing was replaced")
    assert lab.probe("read", f).errno == EPERM


def test_path_004_install_over_the_path_is_the_watchers(lab: Lab):
    """PATH-004 (measured, kernel alone): `install -m 0644 src <path>` unlinks the
    destination and creates a new file: no rename, so the kernel's inheritance (the
    inode_rename program) never sees it, and with no agent running the new file at the path
    is readable.  That case belongs to the agent's path watcher, which restages the
    generation (PATHW-001 runs exactly this install(1) under `aegis run`: degraded with
    path_rule_moved until the restage, denied after).  The old inode stays denied while it
    exists (here: nowhere, it was unlinked)."""
    f = lab.file("p004/target", "old\n")
    src = lab.file("p004/src", "new\n")
    deny(lab, f)
    old_ino = os.stat(f).st_ino
    subprocess.run(["install", "-m", "0644", str(src), str(f)], check=True)
    assert os.stat(f).st_ino != old_ino  # a new inode, made without a rename
    assert lab.probe("read", f).result == {"ok": True}  # the kernel alone: the watcher's job


def test_path_005_dpkg_style_upgrade_under_a_scoped_loop(lab: Lab, ext4_dir: Path, record_testsuite_property):
    """PATH-005: a dpkg-style upgrade of a denied binary on ext4 (unpack to <path>.dpkg-new,
    fsync, rename over <path>), ten times, while scoped loops keep executing and opening
    the path: not one exec or open succeeds, and the last upgrade's file is denied too."""
    b = ext4_dir / "tool"
    shutil.copy2("/bin/true", b)
    deny(lab, b, actions=("open", "exec"))
    ex = lab.spawn([PROBE, "exec_for", str(b), "8"])
    op = lab.spawn([PROBE, "open_for", str(b), "8"])
    try:
        for p in (ex, op):
            assert "looping" in p.stdout.readline()
        upgrades = 0
        for i in range(10):
            new = b.with_name(b.name + ".dpkg-new")
            shutil.copyfile("/bin/true" if i % 2 else "/bin/echo", new)
            os.chmod(new, 0o755)
            with open(new, "rb") as fh:
                os.fsync(fh.fileno())
            os.rename(new, b)
            upgrades += 1
            time.sleep(0.2)
        res = [rest_of_output(p, 120) for p in (ex, op)]
    finally:
        for p in (ex, op):
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=30)
    import json

    r_exec, r_open = (json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
                      for out in res)
    record_testsuite_property("path_005", json.dumps({"exec": r_exec, "open": r_open, "upgrades": upgrades}))
    assert r_exec["succeeded"] == 0 and r_open["succeeded"] == 0, (r_exec, r_open)
    assert r_exec["eperm"] > 0 and r_open["eperm"] > 0, (r_exec, r_open)
    assert r_exec["other"] == 0 and r_open["other"] == 0, (r_exec, r_open)
    lab.drain()
    assert_inherited_deny(lab, b, hook=abi.Hook.BPRM_CHECK, action=abi.ACTION_EXEC, op="exec")


def test_path_006_mv_another_file_onto_the_path(lab: Lab):
    """PATH-006: `mv other <path>`: the moved-in file is denied at the path (INHERITED), and
    the rule id is the path rule's."""
    f = lab.file("p006/secret")
    other = lab.file("p006/other", "other\n")
    deny(lab, f)
    os.rename(other, f)
    assert_inherited_deny(lab, f)


def test_path_007_protected_file_renamed_away(lab: Lab):
    """PATH-007: `mv <path> elsewhere`: the protected file stays denied under its new name
    (its own entry, not inherited); nothing is inherited by a rename to a new name."""
    f = lab.file("p007/secret")
    deny(lab, f)
    before = inherited(lab)
    moved = lab.files / "p007" / "renamed"
    os.rename(f, moved)
    assert lab.probe("read", moved).errno == EPERM
    e = assert_deny_event(lab, moved)
    assert not e.rule_flags & abi.RULE_INHERITED
    assert inherited(lab) == before


def test_path_008_rename_exchange(lab: Lab):
    """PATH-008: renameat2(RENAME_EXCHANGE) of the protected file and another: both names are
    denied (the hook runs once per direction): the file now at the path inherited the rule,
    the protected file keeps its own under the other name."""
    a, b = lab.file("p008/a"), lab.file("p008/b", "benign\n")
    deny(lab, a)
    if _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), RENAME_EXCHANGE):
        raise OSError(ctypes.get_errno(), "renameat2")
    assert_inherited_deny(lab, a)
    assert lab.probe("read", b).errno == EPERM
    e = assert_deny_event(lab, b)
    assert not e.rule_flags & abi.RULE_INHERITED


def test_path_009_inode_rule_does_not_follow_the_path(lab: Lab):
    """PATH-009: a rule given by inode names that inode only: `mv other <its path>` leaves the
    new file at the path allowed, the inode denied under its other name."""
    f = lab.file("p009/by-inode")
    keep = lab.files / "p009" / "keep"
    keep.unlink(missing_ok=True)
    os.link(f, keep)
    ident = resolve_inode(str(f))
    lab.apply([{"id": "ino", "inode": f"{ident.dev >> 20}:{ident.dev & 0xFFFFF}:{ident.ino}",
                "actions": ["open"]}])
    os.rename(lab.file("p009/other", "other\n"), f)
    assert lab.probe("read", f).result == {"ok": True}
    assert lab.probe("read", keep).errno == EPERM


def test_path_010_passwd_style_replace_ext4(lab: Lab, ext4_dir: Path):
    """PATH-010: PATH-001 on ext4: three passwd-style replaces in a row, each denied."""
    f = ext4_dir / "shadow"
    f.write_text("root:0::::::\n")
    deny(lab, f)
    for i in range(3):
        replace_by_rename(f, f"root:{i + 1}::::::\n")
        assert lab.probe("read", f).errno == EPERM, f"replace {i + 1}: readable; {diag(lab, f)}"
        e = assert_deny_event(lab, f)
        assert e.rule_flags & abi.RULE_INHERITED, e


def rest_of_output(p, timeout: float) -> str:
    """What an opener wrote after the "looping" line read with readline(): waits for its
    exit, then reads through the buffered file object.  communicate() reads the raw pipe and
    misses what readline() already buffered: an opener that finished before its "looping"
    line was read (50 spawns under TCG outlast 30 s) had its result line lost that way (7.2)."""
    p.wait(timeout)
    out = p.stdout.read()
    for pipe in (p.stdin, p.stdout, p.stderr):  # what communicate() would have closed
        if pipe is not None:
            pipe.close()
    return out


def test_path_011_replace_race_50_scoped_openers(lab: Lab, record_testsuite_property):
    """PATH-011: replace-by-rename in a loop (host side, out of scope) against 50 scoped
    processes opening the path for 15 s: not one open succeeds, whichever file was at the
    path."""
    import json

    f = lab.file("p011/shadow", "v0\n")
    deny(lab, f)
    stop = threading.Event()
    replaced = [0]

    def replacer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            replace_by_rename(f, f"v{i}\n", suffix=f".{i % 2}")
        replaced[0] = i

    # the replacer runs before the first opener starts: spawning 50 processes under TCG can
    # take longer than an opener's 15 s, and every opener must race it for its whole loop
    t = threading.Thread(target=replacer)
    t.start()
    procs: list = []
    try:
        procs += [lab.spawn([PROBE, "open_for", str(f), "15"]) for _ in range(50)]
        for p in procs:
            assert "looping" in p.stdout.readline()
        outs = [rest_of_output(p, 300) for p in procs]
    finally:
        stop.set()
        if t.is_alive():
            t.join(timeout=60)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=30)
    rs = []
    for p, o in zip(procs, outs, strict=True):
        lines = [ln for ln in o.splitlines() if ln.startswith("{")]
        # an opener without its result line is a failure with its own account (7.2 once)
        assert lines, f"opener pid {p.pid} exited {p.returncode} without a result: {o[-500:]!r}"
        rs.append(json.loads(lines[-1]))
    total = {k: sum(r[k] for r in rs) for k in ("n", "succeeded", "eperm", "other")}
    record_testsuite_property("path_011", json.dumps({**total, "replaced": replaced[0]}))
    assert total["succeeded"] == 0, total
    assert total["other"] == 0 and total["eperm"] == total["n"] > 0, total
    assert replaced[0] > 10, f"the replacer hardly ran: {replaced[0]}"
    lab.drain()  # the race's events: many; the next scenarios drain their own
