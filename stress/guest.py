"""The lab-guest set-up both rollback drivers share: a tmpfs work directory, a fresh
selected cgroup and the real BPF object loaded and attached (not pinned), torn down in
reverse whatever happened.  Guest only (root, a lab kernel: stress/run)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aegis_stream.kernel.loader import BpfObject


@dataclass(frozen=True)
class Guest:
    """What a driver gets: the attached object, its tmpfs work directory, its cgroup."""

    obj: BpfObject
    work: Path
    cgroup: Path


@contextlib.contextmanager
def attached(name: str, tmpfs_size: str = "512m") -> Iterator[Guest]:
    """Set up, yield, tear down; exits 2 with a one-line reason when the kernel cannot
    enforce (a partial attach)."""
    from aegis_stream.lab.mounts import ensure_guest_mounts, mount_tmpfs, umount

    ensure_guest_mounts()
    work = Path(tempfile.mkdtemp(prefix=f"aegis-{name}-"))
    mount_tmpfs(work, tmpfs_size)
    cg = Path("/sys/fs/cgroup") / f"aegis-{name}-{os.getpid()}"
    cg.mkdir()
    obj = BpfObject(pin_root_dir=f"/sys/fs/bpf/aegis-{name}")
    try:
        obj.open()
        obj.load()
        rep = obj.attach_all(pin=False)
        if not rep.enforcing_capable:
            print(f"{name}: cannot enforce: {rep.summary()}", file=sys.stderr)
            raise SystemExit(2)
        yield Guest(obj, work, cg)
    finally:
        # a driver that joined its cgroup leaves it, or the cgroup cannot be removed
        Path("/sys/fs/cgroup/cgroup.procs").write_text(str(os.getpid()))
        obj.close(keep_pins=False)
        with contextlib.suppress(OSError):
            cg.rmdir()
        umount(work)
