"""Inode identity (i_generation, stale rules) and scope depth checks -- no kernel needed.
The kernel-side proof is tests/kernel/test_compliance_links.py (LINK-023..025) and
test_compliance_scope.py (SCOPE-022..024)."""

import os
import struct

import pytest

from aegis_stream.errors import PolicyError
from aegis_stream.kernel import abi, devnum
from aegis_stream.policy import compiler, model


def _h(t: int, data: bytes) -> devnum.FileHandle:
    return devnum.FileHandle(t, data, 1)


def test_generation_from_ext4_style_handle():
    h = _h(devnum.FILEID_INO32_GEN, struct.pack("<II", 12, 0xDEADBEEF))
    assert devnum.generation_from_handle(h, 12) == 0xDEADBEEF
    assert devnum.generation_from_handle(h, 13) is None  # cross-checked with the inode


def test_generation_from_tmpfs_handle():
    ino = (5 << 32) | 7
    h = _h(devnum.FILEID_INO32_GEN, struct.pack("<III", 42, 7, 5))
    assert devnum.generation_from_handle(h, ino) == 42


def test_generation_from_xfs64_and_btrfs_handles():
    h = _h(devnum.FILEID_INO64_GEN, struct.pack("<QI", 1 << 40, 9))
    assert devnum.generation_from_handle(h, 1 << 40) == 9
    b = _h(devnum.FILEID_BTRFS_WITHOUT_PARENT, struct.pack("<QQI", 257, 256, 3))
    assert devnum.generation_from_handle(b, 257) == 3
    assert devnum.btrfs_root_of_handle(b) == 256
    assert devnum.btrfs_root_of_handle(h) is None


def test_unknown_handle_layout_gives_none():
    assert devnum.generation_from_handle(_h(0xF8, b"\0" * 20), 1) is None


def test_inode_generation_of_a_real_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    gen = devnum.inode_generation(str(f))
    # every local filesystem the suite runs on exposes it (handle or FS_IOC_GETVERSION)
    assert gen is None or isinstance(gen, int)
    assert devnum.inode_generation(str(tmp_path / "missing")) is None


def _policy(path: str) -> model.Policy:
    return model.loads(
        f'apiVersion = "aegis/v1"\nname = "t"\nversion = 1\nmode = "enforce"\n'
        f'[[rules]]\nid = "r"\npath = "{path}"\nactions = ["open"]\n'
    )


def test_compiled_rule_records_the_generation(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    cp = compiler.compile_policy(_policy(str(f)))
    assert cp.rules[0].i_generation == devnum.inode_generation(str(f))
    assert compiler.stale_rules(cp) == []


def test_stale_rule_moved_and_missing(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    cp = compiler.compile_policy(_policy(str(f)))
    os.rename(f, tmp_path / "old")
    assert [s.reason for s in compiler.stale_rules(cp)] == ["missing"]
    f.write_text("new")
    (s,) = compiler.stale_rules(cp)
    assert s.reason == "moved" and s.rule_id == "r"


def test_stale_rule_reused_inode_number(tmp_path, monkeypatch):
    f = tmp_path / "f"
    f.write_text("x")
    cp = compiler.compile_policy(_policy(str(f)))
    real = devnum.inode_generation(str(f))
    if real is None:
        pytest.skip("this filesystem exposes no i_generation")
    # same (dev, ino), another generation: what ext4 does on delete + recreate
    monkeypatch.setattr(compiler, "inode_generation", lambda p: (real + 1) & 0xFFFFFFFF)
    (s,) = compiler.stale_rules(cp)
    assert s.reason == "reused" and "i_generation" in s.detail


def test_cgroup_level():
    assert compiler.cgroup_level("/sys/fs/cgroup", "/sys/fs/cgroup") == 0
    assert compiler.cgroup_level("/sys/fs/cgroup/a/b", "/sys/fs/cgroup") == 2


def _scoped(tmp_path, cg) -> model.Policy:
    f = tmp_path / "target"
    f.write_text("x")
    return model.loads(
        f'apiVersion = "aegis/v1"\nname = "t"\nversion = 1\nmode = "enforce"\n'
        f'[[scope]]\ncgroup = "{cg}"\n'
        f'[[rules]]\nid = "r"\npath = "{f}"\nactions = ["open"]\n'
    )


def test_root_cgroup_scope_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "cg"
    root.mkdir()
    monkeypatch.setattr(compiler, "cgroup2_mounts", lambda: [str(root)])
    with pytest.raises(PolicyError, match="root cgroup"):
        compiler.compile_policy(_scoped(tmp_path, root))


def test_scope_deeper_than_the_kernel_walk_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "cg"
    deepest = root.joinpath(*[f"l{i}" for i in range(1, abi.MAX_CGROUP_DEPTH + 2)])
    deepest.mkdir(parents=True)
    monkeypatch.setattr(compiler, "cgroup2_mounts", lambda: [str(root)])
    ok = compiler.compile_policy(_scoped(tmp_path, deepest.parent))  # level 16
    assert ok.scopes[0].cgroup_id == os.stat(deepest.parent).st_ino
    with pytest.raises(PolicyError, match="17 levels deep"):
        compiler.compile_policy(_scoped(tmp_path, deepest))
