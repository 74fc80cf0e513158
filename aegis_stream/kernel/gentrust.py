"""Where a rule may check the inode's i_generation (GAP-INO-REUSE, docs/BYPASS_CATALOG.md).

A rule keyed by (dev, ino) also matches an unrelated file that reuses the number after the
rule's file is deleted (ext4 hands freed numbers out at once: LINK-025).  With
``AEGIS_RULE_CHECK_GEN`` the kernel counts such a match as ``stale`` and lets it pass.  That
is only sound where the file's owner cannot rewrite i_generation: otherwise the owner of a
denied file could turn its deny into a miss with ``chattr -v`` (FS_IOC_SETVERSION), a
fail-open bypass traded for a fail-closed over-deny.

* tmpfs, xfs, btrfs: no FS_IOC_SETVERSION at all (mm/shmem.c, fs/xfs/xfs_ioctl.c,
  fs/btrfs/ioctl.c implement only GETVERSION).
* ext2/ext3/ext4 (one driver, fs/ext4/ioctl.c ``EXT4_IOC_SETVERSION``): the owner may set
  it, except when the filesystem has ``metadata_csum`` (the inode checksums are seeded with
  the generation, so ext4 answers ENOTTY).  The feature is read from the on-disk superblock
  of the mounted device; when that cannot be read the answer is "no" (no check: the rule
  stays fail-closed, today's semantics).
"""

from __future__ import annotations

import os
import struct
from typing import Final

from .devnum import read_mountinfo

#: filesystems that have no way to change an inode's i_generation
NO_SETVERSION_FS: Final = frozenset({"tmpfs", "xfs", "btrfs"})
EXT_FS: Final = frozenset({"ext2", "ext3", "ext4"})
EXT_SUPER_OFFSET: Final = 1024
EXT_MAGIC: Final = 0xEF53
EXT_RO_COMPAT_METADATA_CSUM: Final = 0x400  # EXT4_FEATURE_RO_COMPAT_METADATA_CSUM


def _block_device(dev: int) -> str | None:
    """The device node of the block device ``dev`` (kernel encoding MAJOR << 20 | MINOR)."""
    major, minor = dev >> 20, dev & 0xFFFFF
    try:
        with open(f"/sys/dev/block/{major}:{minor}/uevent") as fh:
            for line in fh:
                if line.startswith("DEVNAME="):
                    return "/dev/" + line.strip().split("=", 1)[1]
    except OSError:
        pass
    for m in read_mountinfo().values():  # no sysfs entry: the mount's source
        if (m.major, m.minor) == (major, minor) and m.source.startswith("/dev/"):
            return m.source
    return None


def ext_metadata_csum(dev: int) -> bool | None:
    """Whether the ext2/3/4 filesystem on block device ``dev`` has metadata_csum; None when
    its superblock cannot be read (no device node, not root, not an ext superblock)."""
    node = _block_device(dev)
    if node is None:
        return None
    try:
        fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        sb = os.pread(fd, 0x68, EXT_SUPER_OFFSET)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(sb) < 0x68 or struct.unpack_from("<H", sb, 0x38)[0] != EXT_MAGIC:
        return None
    return bool(struct.unpack_from("<I", sb, 0x64)[0] & EXT_RO_COMPAT_METADATA_CSUM)


def generation_immutable(fstype: str, dev: int) -> bool:
    """True where no user can rewrite an inode's i_generation on the filesystem ``dev`` of
    type ``fstype``: the rule may then carry ``AEGIS_RULE_CHECK_GEN``."""
    if fstype in NO_SETVERSION_FS:
        return True
    if fstype in EXT_FS:
        return ext_metadata_csum(dev) is True
    return False
