"""Device numbers: the kernel's encoding versus userspace's, and (dev, ino) resolution.

The kernel keys inodes by ``sb->s_dev`` = ``MAJOR << 20 | MINOR`` (include/linux/kdev_t.h,
MINORBITS = 20).  ``stat().st_dev`` is glibc's "new" encoding, where the minor number is
split around the major.  The two agree only for tiny numbers, so every rule goes through
:func:`kernel_dev` exactly once.

``st_dev`` is not always the superblock's device either: btrfs reports a per-subvolume
anonymous device.  /proc/self/mountinfo prints ``MAJOR(sb->s_dev):MINOR(sb->s_dev)`` for
the mount, so :func:`resolve_inode` takes the device from the mount the file lives on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from aegis_stream.errors import PolicyError

MINORBITS = 20
MINORMASK = (1 << MINORBITS) - 1


def kernel_dev(major: int, minor: int) -> int:
    """Encode (major, minor) the way the kernel's ``MKDEV`` does."""
    if not 0 <= major < (1 << 12) or not 0 <= minor <= MINORMASK:
        raise ValueError(f"device {major}:{minor} does not fit the kernel's 12:20 encoding")
    return (major << MINORBITS) | minor


def kernel_dev_from_st_dev(st_dev: int) -> int:
    """Userspace ``st_dev`` (glibc encoding) -> kernel ``s_dev``."""
    return kernel_dev(os.major(st_dev), os.minor(st_dev))


def split_kernel_dev(kdev: int) -> tuple[int, int]:
    return kdev >> MINORBITS, kdev & MINORMASK


@dataclass(frozen=True)
class InodeId:
    """An inode as the kernel sees it: (s_dev in kernel encoding, i_ino)."""

    dev: int
    ino: int
    fstype: str = ""

    def __str__(self) -> str:
        major, minor = split_kernel_dev(self.dev)
        return f"{major}:{minor}:{self.ino}"


def parse_inode(text: str) -> InodeId:
    """Parse ``MAJOR:MINOR:INO`` (device in major:minor form, never a raw number)."""
    parts = text.split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise PolicyError(f"inode {text!r} must be MAJOR:MINOR:INO, e.g. 8:1:131074")
    major, minor, ino = (int(p) for p in parts)
    try:
        return InodeId(kernel_dev(major, minor), ino)
    except ValueError as exc:
        raise PolicyError(f"inode {text!r}: {exc}") from None


@dataclass(frozen=True)
class MountInfo:
    mount_id: int
    major: int
    minor: int
    mount_point: str
    fstype: str


def read_mountinfo(path: str = "/proc/self/mountinfo") -> dict[int, MountInfo]:
    out: dict[int, MountInfo] = {}
    with open(path) as fh:
        for line in fh:
            fields = line.split()
            sep = fields.index("-")
            major, minor = fields[2].split(":")
            out[int(fields[0])] = MountInfo(
                int(fields[0]), int(major), int(minor), fields[4], fields[sep + 1]
            )
    return out


def _mount_id_of_fd(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as fh:
        for line in fh:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError("no mnt_id in fdinfo")


def resolve_inode(path: str, *, follow_symlinks: bool = True) -> InodeId:
    """Resolve a path to the inode the kernel hooks will see.

    Symlinks are followed (a rule names the file, not the link).  The device comes
    from the superblock of the mount holding the file (mountinfo), so btrfs
    subvolumes and other filesystems whose st_dev differs from s_dev still match.
    """
    flags = os.O_PATH | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise PolicyError(f"path {path!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        try:
            mnt = read_mountinfo().get(_mount_id_of_fd(fd))
        except OSError:
            mnt = None
    finally:
        os.close(fd)
    if mnt is not None:
        return InodeId(kernel_dev(mnt.major, mnt.minor), st.st_ino, mnt.fstype)
    return InodeId(kernel_dev_from_st_dev(st.st_dev), st.st_ino)
