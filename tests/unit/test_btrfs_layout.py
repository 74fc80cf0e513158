"""btrfs offsets where CO-RE cannot see btrfs's BTF (GAP-BTRFS-SUBVOL on 5.10 and under the
hardened unit): build-ID notes, the shipped build table, the module's BTF file, the choice,
and what doctor says of each."""

from __future__ import annotations

import ctypes
import struct
import subprocess
from pathlib import Path

import pytest

from aegis_stream.agent import doctor
from aegis_stream.kernel import btrfs_layout as bl
from aegis_stream.kernel import builds, libbpf

# Debian bullseye's 5.10.0-46-amd64 btrfs.ko (the lab's 5.10), read by scripts/btrfs-layout
BULLSEYE_46 = "10f0da685aefb33d881b566f2faf675beb47fe36"


def note(build_id: str, *, ntype: int = bl.NT_GNU_BUILD_ID, name: bytes = b"GNU\0") -> bytes:
    desc = bytes.fromhex(build_id)
    pad = (-len(name)) % 4
    return struct.pack("<3I", len(name), len(desc), ntype) + name + b"\0" * pad + desc


def test_build_id_note_parses_and_skips_other_notes() -> None:
    other = note("00112233", ntype=1, name=b"Linux\0")
    assert bl.parse_build_id_note(other + note(BULLSEYE_46)) == BULLSEYE_46
    assert bl.parse_build_id_note(other) is None
    assert bl.parse_build_id_note(b"\xff" * 40) is None  # sizes past the end: no ID, no crash
    assert bl.parse_build_id_note(b"") is None


def test_the_shipped_table_has_the_lab_5_10_build() -> None:
    assert bl.from_table(BULLSEYE_46) == bl.BtrfsLayout(vfs_inode=560, root=0, anon_dev=992)
    assert bl.from_table("00" * 20) is None


def test_rodata_matches_the_objects_section() -> None:
    data = bl.BtrfsLayout(560, 0, 992).rodata()
    assert struct.unpack("<4I", data) == (1, 560, 0, 992)
    for build in builds.Build:
        out = subprocess.run(["llvm-objdump", "-h", str(builds.packaged_object(build))],
                             capture_output=True, text=True, check=True).stdout
        sizes = [int(line.split()[2], 16) for line in out.splitlines() if ".rodata.btrfs" in line]
        assert sizes == [len(data)], build


def _write_btf(tmp: Path, offsets: dict[str, int]) -> None:
    """A vmlinux BTF (int, struct inode) and a split btrfs BTF on it with btrfs_inode and
    btrfs_root at the given byte offsets, written the way the kernel exposes them."""
    lib = libbpf.lib()
    sig = {"btf__new_empty": (ctypes.c_void_p, []), "btf__new_empty_split": (ctypes.c_void_p, [ctypes.c_void_p]),
           "btf__add_int": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]),
           "btf__add_ptr": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
           "btf__add_struct": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]),
           "btf__add_field": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                             ctypes.c_uint32, ctypes.c_uint32]),
           "btf__raw_data": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)])}
    for name, (res, args) in sig.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = res, args

    def dump(btf: int, path: Path) -> None:
        size = ctypes.c_uint32()
        raw = lib.btf__raw_data(btf, ctypes.byref(size))
        path.write_bytes(ctypes.string_at(raw, size.value))

    base = lib.btf__new_empty()
    u32 = lib.btf__add_int(base, b"unsigned int", 4, 0)
    inode = lib.btf__add_struct(base, b"inode", 600)
    lib.btf__add_field(base, b"i_ino", u32, 0, 0)
    dump(base, tmp / "vmlinux")
    split = lib.btf__new_empty_split(base)
    root_t = lib.btf__add_struct(split, b"btrfs_root", 1456)
    lib.btf__add_field(split, b"anon_dev", u32, offsets["anon_dev"] * 8, 0)
    ptr = lib.btf__add_ptr(split, root_t)
    lib.btf__add_struct(split, b"btrfs_inode", 1160)
    lib.btf__add_field(split, b"root", ptr, offsets["root"] * 8, 0)
    lib.btf__add_field(split, b"vfs_inode", inode, offsets["vfs_inode"] * 8, 0)
    dump(split, tmp / "btrfs")
    lib.btf__free(split)
    lib.btf__free(base)


def test_offsets_come_from_the_modules_btf_file(tmp_path) -> None:
    _write_btf(tmp_path, {"vfs_inode": 568, "root": 8, "anon_dev": 1000})
    assert bl.from_btf(str(tmp_path)) == bl.BtrfsLayout(vfs_inode=568, root=8, anon_dev=1000)
    # libbpf may walk module BTF (root): CO-RE relocates, the file's offsets ride along unused
    k = bl.choose(core_uses_module_btf=True, btf_dir=str(tmp_path), note=str(tmp_path / "none"))
    assert k.source is bl.LayoutSource.MODULE_BTF
    # the hardened unit (no CAP_SYS_ADMIN): the agent reads the file itself
    k = bl.choose(core_uses_module_btf=False, btf_dir=str(tmp_path), note=str(tmp_path / "none"))
    assert k.source is bl.LayoutSource.BTF_FILE and k.layout == bl.BtrfsLayout(568, 8, 1000)
    assert doctor.check_btrfs(k).status == "pass"


def test_a_btf_file_without_the_members_is_not_a_layout(tmp_path) -> None:
    (tmp_path / "vmlinux").write_bytes(b"not btf")
    (tmp_path / "btrfs").write_bytes(b"not btf")
    assert bl.from_btf(str(tmp_path)) is None


def test_no_module_btf_uses_the_build_table_by_exact_build_id(tmp_path, monkeypatch) -> None:
    (tmp_path / "note").write_bytes(note(BULLSEYE_46))
    k = bl.choose(core_uses_module_btf=True, btf_dir=str(tmp_path), note=str(tmp_path / "note"))
    assert k.source is bl.LayoutSource.BUILD_TABLE and k.layout == bl.BtrfsLayout(560, 0, 992)
    assert BULLSEYE_46[:12] in k.reason

    # one bit off is another build: never a guessed layout; doctor warns while btrfs is loaded
    (tmp_path / "note").write_bytes(note("11" + BULLSEYE_46[2:]))
    k = bl.choose(core_uses_module_btf=True, btf_dir=str(tmp_path), note=str(tmp_path / "note"))
    assert k.source is bl.LayoutSource.NONE and k.layout is None
    assert "scripts/btrfs-layout" in k.reason and "s_dev" in k.reason
    monkeypatch.setattr(bl, "module_build_id", lambda note=bl.BUILD_ID_NOTE: "11" + BULLSEYE_46[2:])
    c = doctor.check_btrfs(k)
    assert c.status == "warn" and "scripts/btrfs-layout --release" in c.fix


def test_btrfs_not_loaded_keys_by_s_dev_and_says_so(tmp_path, monkeypatch) -> None:
    k = bl.choose(core_uses_module_btf=True, btf_dir=str(tmp_path), note=str(tmp_path / "none"))
    assert k.source is bl.LayoutSource.NONE and "not loaded" in k.reason
    monkeypatch.setattr(bl, "module_build_id", lambda note=bl.BUILD_ID_NOTE: None)
    assert doctor.check_btrfs(k).status == "pass"  # no btrfs here: nothing to collide


@pytest.mark.parametrize("bad", ['{"layouts": {"x": {"vfs_inode": 1}}}', "[]", "{", ""])
def test_a_damaged_table_is_no_layout_not_a_crash(tmp_path, bad) -> None:
    (tmp_path / "t.json").write_text(bad)
    assert bl.from_table("x", tmp_path / "t.json") is None
