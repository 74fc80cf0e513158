"""Guest-side mounts for the lab (and for hosts that lack them): securityfs, bpffs,
cgroup2, and scratch tmpfs mounts (the guest's root is 9p read-only, /tmp an overlay)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)


def mount(src: str, target: str | Path, fstype: str, flags: int = 0, data: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    if _libc.mount(src.encode(), str(target).encode(), fstype.encode(), flags,
                   data.encode() if data else None):
        e = ctypes.get_errno()
        raise OSError(e, f"mount {fstype} on {target}: {os.strerror(e)}")


def umount(target: str | Path) -> None:
    _libc.umount2(str(target).encode(), 2)  # MNT_DETACH


def is_mounted(target: str, fstype: str) -> bool:
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            f = line.split()
            if f[4] == target and f[f.index("-") + 1] == fstype:
                return True
    return False


def ensure_guest_mounts() -> None:
    for target, fstype, src in (
        ("/sys/kernel/security", "securityfs", "securityfs"),
        ("/sys/fs/bpf", "bpf", "bpf"),
        ("/sys/fs/cgroup", "cgroup2", "cgroup2"),
    ):
        if not is_mounted(target, fstype):
            mount(src, target, fstype)


def mount_tmpfs(target: Path, size: str = "64m") -> None:
    mount("tmpfs", target, "tmpfs", 0, f"size={size},mode=0755")
