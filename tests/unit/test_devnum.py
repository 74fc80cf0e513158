import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aegis_stream.errors import PolicyError
from aegis_stream.kernel import devnum


def test_kernel_encoding_is_major_shl_20_or_minor():
    assert devnum.kernel_dev(8, 1) == (8 << 20) | 1
    assert devnum.kernel_dev(0, 0) == 0
    assert devnum.kernel_dev(259, 0x12345) == (259 << 20) | 0x12345


def test_userspace_st_dev_differs_from_kernel_for_large_minors():
    # glibc: minor's low byte, then major, then the rest of the minor
    st_dev = os.makedev(8, 300)
    assert st_dev != devnum.kernel_dev(8, 300)
    assert devnum.kernel_dev_from_st_dev(st_dev) == devnum.kernel_dev(8, 300)


@given(st.integers(0, (1 << 12) - 1), st.integers(0, (1 << 20) - 1))
def test_roundtrip_through_userspace_encoding(major, minor):
    kdev = devnum.kernel_dev_from_st_dev(os.makedev(major, minor))
    assert devnum.split_kernel_dev(kdev) == (major, minor)


def test_out_of_range_device_is_refused():
    with pytest.raises(ValueError):
        devnum.kernel_dev(1 << 12, 0)
    with pytest.raises(ValueError):
        devnum.kernel_dev(0, 1 << 20)


def test_parse_inode_literal():
    ident = devnum.parse_inode("8:1:131074")
    assert ident.dev == devnum.kernel_dev(8, 1) and ident.ino == 131074
    assert str(ident) == "8:1:131074"


@pytest.mark.parametrize("bad", ["8:1", "x:1:2", "8:1:2:3", "", "8388609:5", "9999:1:2"])
def test_parse_inode_rejects_bad_literals(bad):
    with pytest.raises(PolicyError):
        devnum.parse_inode(bad)


def test_resolve_inode_uses_the_mount_superblock_device(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    ident = devnum.resolve_inode(str(f))
    st = os.stat(f)
    assert ident.ino == st.st_ino
    # on ordinary filesystems the mount's device equals st_dev (btrfs is the exception)
    mounts = devnum.read_mountinfo()
    assert any(devnum.kernel_dev(m.major, m.minor) == ident.dev for m in mounts.values())
    if ident.fstype != "btrfs":
        assert ident.dev == devnum.kernel_dev_from_st_dev(st.st_dev)


def test_resolve_inode_follows_symlinks(tmp_path):
    f = tmp_path / "target"
    f.write_text("x")
    (tmp_path / "link").symlink_to(f)
    assert devnum.resolve_inode(str(tmp_path / "link")).ino == os.stat(f).st_ino


def test_resolve_missing_path_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError, match="No such file"):
        devnum.resolve_inode(str(tmp_path / "nope"))


def test_mountinfo_parser_handles_optional_fields(tmp_path):
    p = tmp_path / "mi"
    p.write_text(
        "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
        "37 35 0:52 / /sys/fs/cgroup rw shared:9 shared:10 - cgroup2 cgroup2 rw\n"
    )
    mi = devnum.read_mountinfo(str(p))
    assert mi[36].major == 98 and mi[36].fstype == "ext3" and mi[36].mount_point == "/mnt2"
    assert mi[37].fstype == "cgroup2"
