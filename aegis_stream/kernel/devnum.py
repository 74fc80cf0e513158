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
from dataclasses import dataclass, field

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
    """An inode as the kernel keys it: (device in kernel encoding, i_ino).  The device is the
    superblock's s_dev, except on btrfs: the subvolume's anonymous device (st_dev), so that
    subvolumes that number their inodes alike never share a key (GAP-BTRFS-SUBVOL);
    ``sb_dev`` is then the superblock's s_dev (0 elsewhere)."""

    dev: int
    ino: int
    fstype: str = ""
    sb_dev: int = field(default=0, compare=False)

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
    """One /proc/self/mountinfo line: ``major:minor`` is the superblock's device, which is what the
    kernel keys inodes by (unlike ``st_dev`` on btrfs)."""
    mount_id: int
    major: int
    minor: int
    mount_point: str
    fstype: str
    source: str = ""  # the mount source (a device node for block filesystems)


def read_mountinfo(path: str = "/proc/self/mountinfo") -> dict[int, MountInfo]:
    out: dict[int, MountInfo] = {}
    with open(path) as fh:
        for line in fh:
            fields = line.split()
            sep = fields.index("-")
            major, minor = fields[2].split(":")
            out[int(fields[0])] = MountInfo(
                int(fields[0]), int(major), int(minor), fields[4], fields[sep + 1],
                fields[sep + 2] if len(fields) > sep + 2 else "",
            )
    return out


def _mount_id_of_fd(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as fh:
        for line in fh:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError("no mnt_id in fdinfo")


_mounts: dict[int, MountInfo] = {}


def _mount_of(mount_id: int, st_kdev: int) -> MountInfo | None:
    """The mount ``mount_id`` from the last mountinfo read, read again unless it confirms itself.

    A compile resolves up to 65,536 paths: one mountinfo read per path was most of its time.
    Mount ids are reused after an unmount, so a cached entry is trusted only when its device
    equals the file's ``st_dev``, which holds on every filesystem but the few (btrfs) where
    ``st_dev`` is not ``s_dev``; those, a miss and a mismatch read the table again."""
    global _mounts
    mnt = _mounts.get(mount_id)
    if mnt is None or kernel_dev(mnt.major, mnt.minor) != st_kdev:
        _mounts = read_mountinfo()
        mnt = _mounts.get(mount_id)
    return mnt


def resolve_inode(path: str, *, follow_symlinks: bool = True) -> InodeId:
    """Resolve a path to the inode the kernel hooks will see.

    Symlinks are followed (a rule names the file, not the link).  The device comes
    from the superblock of the mount holding the file (mountinfo), which is not always
    st_dev.  btrfs is the exception: the kernel keys its inodes by the subvolume's
    anonymous device (bpf/core_fixes.bpf.h btrfs_subvol_dev), which is st_dev, and
    ``sb_dev`` carries the superblock's s_dev.
    """
    flags = os.O_PATH | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise PolicyError(f"path {path!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        try:
            mnt = _mount_of(_mount_id_of_fd(fd), kernel_dev_from_st_dev(st.st_dev))
        except OSError:
            mnt = None
    finally:
        os.close(fd)
    if mnt is not None and mnt.fstype == "btrfs":
        return InodeId(kernel_dev_from_st_dev(st.st_dev), st.st_ino, mnt.fstype,
                       kernel_dev(mnt.major, mnt.minor))
    if mnt is not None:
        return InodeId(kernel_dev(mnt.major, mnt.minor), st.st_ino, mnt.fstype)
    return InodeId(kernel_dev_from_st_dev(st.st_dev), st.st_ino)


# --------------------------------------------------------------------------- identity
# (dev, ino) names an inode only while it exists: a filesystem may hand the same number
# to a file created after the old one is gone (ext4 and xfs reuse freed inode numbers at
# once; tmpfs does not while it stays mounted).  The inode's i_generation tells the two
# apart.  Userspace reads it without opening the file: the export file handle carries it
# for the filesystems below; FS_IOC_GETVERSION is the fallback for regular files.

FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long)
FILEID_INO32_GEN = 0x01
FILEID_INO64_GEN = 0x81  # xfs with 64-bit inode numbers
FILEID_BTRFS_WITHOUT_PARENT = 0x4D
FILEID_BTRFS_WITH_PARENT = 0x4E
FILEID_BTRFS_WITH_PARENT_ROOT = 0x4F
MAX_HANDLE_SZ = 128


@dataclass(frozen=True)
class FileHandle:
    """A name_to_handle_at(2) result: the filesystem's handle type and opaque bytes, from which
    :func:`generation_from_handle` reads the inode generation for known layouts."""
    handle_type: int
    data: bytes
    mount_id: int


def file_handle(path: str, *, follow_symlinks: bool = True) -> FileHandle | None:
    """name_to_handle_at(2) of ``path``; None where the filesystem cannot export handles."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(8 + MAX_HANDLE_SZ)
    ctypes.c_uint.from_buffer(buf, 0).value = MAX_HANDLE_SZ
    mount_id = ctypes.c_int(0)
    at_fdcwd, at_symlink_follow = -100, 0x400
    flags = at_symlink_follow if follow_symlinks else 0
    if libc.name_to_handle_at(at_fdcwd, os.fsencode(path), buf, ctypes.byref(mount_id), flags):
        return None
    nbytes = ctypes.c_uint.from_buffer(buf, 0).value
    htype = ctypes.c_int.from_buffer(buf, 4).value
    return FileHandle(htype, bytes(buf.raw[8 : 8 + nbytes]), mount_id.value)


def generation_from_handle(h: FileHandle, ino: int) -> int | None:
    """i_generation out of a file handle of a known layout, cross-checked with ``ino``.

    Layouts (fs/exportfs, mm/shmem.c, fs/xfs/xfs_export.c, fs/btrfs/export.h):
    INO32_GEN 8 bytes ``[ino32, gen]`` (ext2/3/4, xfs); tmpfs 12 bytes ``[gen, ino_lo,
    ino_hi]``; xfs INO64_GEN ``[ino64, gen]``; btrfs ``{objectid u64, root u64, gen u32 ...}``.
    """
    import struct

    d, t = h.data, h.handle_type
    if t == FILEID_INO32_GEN and len(d) == 8:
        hino, gen = struct.unpack_from("<II", d)
        return gen if hino == ino & 0xFFFFFFFF else None
    if t == FILEID_INO32_GEN and len(d) == 12:
        gen, lo, hi = struct.unpack_from("<III", d)
        return gen if (hi << 32 | lo) == ino else None
    if t == FILEID_INO64_GEN and len(d) >= 12:
        hino, gen = struct.unpack_from("<QI", d)
        return gen if hino == ino else None
    if t in (FILEID_BTRFS_WITHOUT_PARENT, FILEID_BTRFS_WITH_PARENT,
             FILEID_BTRFS_WITH_PARENT_ROOT) and len(d) >= 20:
        objectid, _root, gen = struct.unpack_from("<QQI", d)
        return gen if objectid == ino else None
    return None


def btrfs_root_of_handle(h: FileHandle) -> int | None:
    """The btrfs subvolume (root objectid) a file handle names, None if not btrfs."""
    import struct

    if h.handle_type in (FILEID_BTRFS_WITHOUT_PARENT, FILEID_BTRFS_WITH_PARENT,
                         FILEID_BTRFS_WITH_PARENT_ROOT) and len(h.data) >= 16:
        return int(struct.unpack_from("<Q", h.data, 8)[0])
    return None


def inode_generation(path: str) -> int | None:
    """The i_generation of the inode ``path`` names (symlinks followed), or None when the
    filesystem exposes none (overlayfs, procfs ...).  Never opens the file for reading
    unless it is a regular file and the handle route failed."""
    import fcntl
    import stat
    import struct

    try:
        st = os.stat(path)
    except OSError:
        return None
    h = file_handle(path)
    if h is not None:
        gen = generation_from_handle(h, st.st_ino)
        if gen is not None:
            return gen
    if not stat.S_ISREG(st.st_mode):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        raw = fcntl.ioctl(fd, FS_IOC_GETVERSION, b"\0" * 8)
        return int(struct.unpack("<Q", raw)[0]) & 0xFFFFFFFF
    except OSError:
        return None
    finally:
        os.close(fd)
