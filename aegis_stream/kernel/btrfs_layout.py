"""Where a btrfs inode's subvolume device is, for kernels whose btrfs BTF libbpf cannot use.

The kernel keys a btrfs inode by ``BTRFS_I(inode)->root->anon_dev`` (GAP-BTRFS-SUBVOL,
bpf/core_fixes.bpf.h).  CO-RE finds those members in the btrfs module's BTF, which libbpf
uses only when the kernel has module BTF (Linux 5.11+) and the loader may walk it
(CAP_SYS_ADMIN).  Otherwise the agent hands the programs the three offsets as read-only
data (``.rodata.btrfs``) before load, taken from, in order:

* ``/sys/kernel/btf/btrfs``: the module's BTF, a file any root process can read (the
  hardened unit has CAP_BPF but not CAP_SYS_ADMIN);
* the build table (``aegis_stream/bpf/btrfs-layouts.json``): offsets per btrfs.ko GNU
  build ID, read from the DWARF of Debian's ``linux-image-*-dbg`` package by
  ``scripts/btrfs-layout`` (the way BTFHub serves kernels without BTF).  The running
  module's build ID (``/sys/module/btrfs/notes/.note.gnu.build-id``) must match
  exactly: a layout is never guessed.

Neither (btrfs loaded after the programs, an unknown build): btrfs inodes keep the
superblock's ``s_dev``, the compiler's second key for every btrfs rule, so a rule still
denies, with the fail-closed collision across subvolumes; ``aegis doctor`` says which.
"""

from __future__ import annotations

import ctypes
import enum
import json
import os
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from aegis_stream.kernel import abi, libbpf

BTF_DIR = "/sys/kernel/btf"
BUILD_ID_NOTE = "/sys/module/btrfs/notes/.note.gnu.build-id"
NT_GNU_BUILD_ID = 3
BTF_KIND_STRUCT = 4
#: the members the programs read, as (struct, member) in .rodata.btrfs order
MEMBERS = (("btrfs_inode", "vfs_inode"), ("btrfs_inode", "root"), ("btrfs_root", "anon_dev"))


class LayoutSource(enum.StrEnum):
    """Where the programs get the btrfs offsets from on this host."""

    MODULE_BTF = "module-btf"  # libbpf relocates against btrfs's BTF (CO-RE)
    BTF_FILE = "btf-file"  # offsets read from /sys/kernel/btf/btrfs by the agent
    BUILD_TABLE = "build-table"  # offsets for this btrfs.ko build ID (btrfs-layouts.json)
    NONE = "none"  # s_dev keys: the fail-closed collision across subvolumes


@dataclass(frozen=True)
class BtrfsLayout:
    """Byte offsets of btrfs_inode.vfs_inode, btrfs_inode.root and btrfs_root.anon_dev."""

    vfs_inode: int
    root: int
    anon_dev: int

    def rodata(self) -> bytes:
        """The value of ``struct aegis_btrfs_layout`` (bpf/core_fixes.bpf.h)."""
        return abi.BTRFS_LAYOUT.pack(1, self.vfs_inode, self.root, self.anon_dev)


@dataclass(frozen=True)
class BtrfsKeying:
    """How btrfs inodes are keyed on this host, and why (``aegis doctor``, the load report)."""

    source: LayoutSource
    layout: BtrfsLayout | None
    reason: str


def parse_build_id_note(data: bytes) -> str | None:
    """The hex GNU build ID in an ELF note section (sysfs ``notes/`` files are raw notes)."""
    off = 0
    while off + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<3I", data, off)
        name_at = off + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        end = desc_at + (descsz + 3) // 4 * 4
        if end > len(data) or namesz > 64:
            return None
        if ntype == NT_GNU_BUILD_ID and data[name_at:name_at + namesz].rstrip(b"\0") == b"GNU":
            return data[desc_at:desc_at + descsz].hex()
        off = end
    return None


def module_build_id(note: str = BUILD_ID_NOTE) -> str | None:
    """The running btrfs module's GNU build ID; None if btrfs is not loaded (or built in)."""
    try:
        return parse_build_id_note(Path(note).read_bytes())
    except OSError:
        return None


def table(path: Path | None = None) -> dict[str, object]:
    """build ID -> {"release": ..., "vfs_inode": N, "root": N, "anon_dev": N}."""
    src = path or Path(str(resources.files("aegis_stream") / "bpf" / "btrfs-layouts.json"))
    try:
        doc = json.loads(src.read_text())
    except (OSError, ValueError):
        return {}
    layouts = doc.get("layouts") if isinstance(doc, dict) else None
    return dict(layouts) if isinstance(layouts, dict) else {}


def from_table(build_id: str, path: Path | None = None) -> BtrfsLayout | None:
    """The layout filed under exactly this build ID; a damaged row is no layout."""
    row = table(path).get(build_id)
    if not isinstance(row, dict):
        return None
    try:
        return BtrfsLayout(*(int(row[k]) for k in ("vfs_inode", "root", "anon_dev")))
    except (KeyError, TypeError, ValueError):
        return None


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size", ctypes.c_uint32)]


class _BtfMember(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32), ("offset", ctypes.c_uint32)]


def _member_offset(lib: ctypes.CDLL, btf: int, struct_name: str, member: str) -> int | None:
    tid = lib.btf__find_by_name_kind(btf, struct_name.encode(), BTF_KIND_STRUCT)
    if tid <= 0:
        return None
    t = ctypes.cast(lib.btf__type_by_id(btf, tid), ctypes.POINTER(_BtfType)).contents
    kflag, vlen = t.info >> 31, t.info & 0xFFFF
    members = ctypes.cast(ctypes.addressof(t) + ctypes.sizeof(_BtfType),
                          ctypes.POINTER(_BtfMember * vlen)).contents
    for m in members:
        if lib.btf__name_by_offset(btf, m.name_off) == member.encode():
            bits = m.offset & 0xFFFFFF if kflag else m.offset
            return bits // 8 if bits % 8 == 0 else None
    return None


def from_btf(btf_dir: str = BTF_DIR) -> BtrfsLayout | None:
    """The offsets from the module's BTF file (split BTF over vmlinux's)."""
    if not (Path(btf_dir) / "btrfs").exists() or not (Path(btf_dir) / "vmlinux").exists():
        return None
    lib = libbpf.lib()
    base = lib.btf__parse((Path(btf_dir) / "vmlinux").as_posix().encode(), None)
    if not base:
        return None
    btf = lib.btf__parse_split((Path(btf_dir) / "btrfs").as_posix().encode(), base)
    try:
        if not btf:
            return None
        offs = [_member_offset(lib, btf, s, m) for s, m in MEMBERS]
    finally:
        if btf:
            lib.btf__free(btf)
        lib.btf__free(base)
    if any(o is None for o in offs):
        return None
    return BtrfsLayout(*offs)  # type: ignore[arg-type]


def choose(*, core_uses_module_btf: bool, btf_dir: str = BTF_DIR, note: str = BUILD_ID_NOTE,
           table_path: Path | None = None) -> BtrfsKeying:
    """How the programs about to load will key btrfs inodes.  ``core_uses_module_btf``:
    libbpf may read module BTF (the loader does not pin CO-RE to vmlinux's BTF)."""
    has_file = (Path(btf_dir) / "btrfs").exists()
    if has_file and core_uses_module_btf:  # CO-RE finds the members: no offsets to hand over
        return BtrfsKeying(LayoutSource.MODULE_BTF, None,
                           "btrfs module BTF: CO-RE relocates btrfs_inode/btrfs_root")
    layout = from_btf(btf_dir) if has_file else None
    if layout:
        return BtrfsKeying(LayoutSource.BTF_FILE, layout,
                           f"offsets read from {btf_dir}/btrfs (libbpf may not walk module BTF "
                           "without CAP_SYS_ADMIN)")
    bid = module_build_id(note)
    if bid is None:
        return BtrfsKeying(LayoutSource.NONE, None,
                           "btrfs is not loaded: btrfs inodes are keyed by s_dev (fail-closed "
                           "across subvolumes) until the programs are loaded again")
    layout = from_table(bid, table_path)
    if layout:
        return BtrfsKeying(LayoutSource.BUILD_TABLE, layout,
                           f"no btrfs module BTF; offsets for btrfs.ko build {bid[:12]} from "
                           "the build table")
    return BtrfsKeying(LayoutSource.NONE, None,
                       f"no btrfs module BTF and btrfs.ko build {bid[:12]} is not in the build "
                       f"table (scripts/btrfs-layout {os.uname().release}): btrfs inodes are "
                       "keyed by s_dev (fail-closed across subvolumes)")
