"""GAP-INO-REUSE: where a rule carries AEGIS_RULE_CHECK_GEN (kernel/gentrust.py), the kernel
value it packs, and the fake kernel's stale miss (the lab proves the real one: LINK-027..029)."""

import struct

import pytest

from aegis_stream.kernel import abi, counters, gentrust, slots
from aegis_stream.policy.compiler import CompiledPolicy, CompiledRule
from aegis_stream.testing import FakeKernel


def _ext_image(path, ro_compat: int, magic: int = gentrust.EXT_MAGIC) -> str:
    sb = bytearray(2048)
    struct.pack_into("<H", sb, 1024 + 0x38, magic)
    struct.pack_into("<I", sb, 1024 + 0x64, ro_compat)
    path.write_bytes(bytes(sb))
    return str(path)


@pytest.mark.parametrize("fstype", ["tmpfs", "xfs", "btrfs"])
def test_no_setversion_filesystems_are_trusted(fstype):
    assert gentrust.generation_immutable(fstype, 7 << 20)


@pytest.mark.parametrize("fstype", ["nfs", "overlay", "9p", "vfat", ""])
def test_other_filesystems_are_not(fstype):
    assert not gentrust.generation_immutable(fstype, 7 << 20)


@pytest.mark.parametrize(("ro_compat", "magic", "want"), [
    (gentrust.EXT_RO_COMPAT_METADATA_CSUM | 0x1, gentrust.EXT_MAGIC, True),
    (0x1 | 0x2, gentrust.EXT_MAGIC, False),  # no metadata_csum: the owner may chattr -v
    (gentrust.EXT_RO_COMPAT_METADATA_CSUM, 0x1234, False),  # not an ext superblock: unknown
])
@pytest.mark.parametrize("fstype", ["ext2", "ext3", "ext4"])
def test_ext_trusted_only_with_metadata_csum(tmp_path, monkeypatch, fstype, ro_compat, magic, want):
    img = _ext_image(tmp_path / "sb", ro_compat, magic)
    monkeypatch.setattr(gentrust, "_block_device", lambda dev: img)
    assert gentrust.generation_immutable(fstype, 7 << 20) is want


def test_ext_unreadable_device_is_not_trusted(monkeypatch, tmp_path):
    monkeypatch.setattr(gentrust, "_block_device", lambda dev: str(tmp_path / "missing"))
    assert gentrust.ext_metadata_csum(7 << 20) is None
    assert not gentrust.generation_immutable("ext4", 7 << 20)
    monkeypatch.setattr(gentrust, "_block_device", lambda dev: None)
    assert not gentrust.generation_immutable("ext4", 7 << 20)


def _rule(check_gen: bool, sb_dev: int = 0) -> CompiledRule:
    return CompiledRule(3, "r", "/x", 8 << 20 | 1, 12, abi.ACTION_OPEN, "ext4", 77, check_gen, sb_dev)


def _entries(*rules: CompiledRule) -> dict[bytes, tuple]:
    cp = CompiledPolicy("t", 1, "enforce", "sha256:x", list(rules), [])
    return {k: abi.RULE.unpack(v) for k, v in slots._rule_entries(cp, 0).items()}


def test_rule_value_carries_flag_and_generation():
    (rid, acts, flags, gen), = _entries(_rule(True)).values()
    assert (rid, acts, gen) == (3, abi.ACTION_OPEN, 77) and flags & abi.RULE_CHECK_GEN
    (_, _, flags, _), = _entries(_rule(False)).values()
    assert not flags & abi.RULE_CHECK_GEN


def test_btrfs_rule_is_also_written_under_the_superblock_device():
    r = _rule(False, sb_dev=1 << 20 | 5)  # dev: the subvolume's anon dev; sb_dev: s_dev
    e = _entries(r)
    assert set(e) == {abi.INODE_KEY.pack(r.ino, r.dev, 0), abi.INODE_KEY.pack(r.ino, r.sb_dev, 0)}
    assert len(set(e.values())) == 1


def test_fake_kernel_counts_a_reused_inode_as_stale():
    k = FakeKernel()
    r = _rule(True)
    cp = CompiledPolicy("t", 1, "enforce", "sha256:x", [r], [])
    for key, val in slots._rule_entries(cp, 0).items():
        k.policy_maps.rules.update(key, val)
    k.policy_maps.config.update(slots.slot_key(0), abi.SLOT_CONFIG.pack(1, abi.Mode.ENFORCE,
                                abi.SLOT_VALID | abi.SLOT_SCOPE_HOST, 1, 0))
    slots.activate(k.policy_maps, 0)
    assert k.decide(abi.Hook.FILE_OPEN, r.dev, r.ino, abi.ACTION_OPEN, i_generation=77) < 0
    assert k.decide(abi.Hook.FILE_OPEN, r.dev, r.ino, abi.ACTION_OPEN, i_generation=78) == 0
    assert counters.read_hook_counters(k.maps())["file_open"]["stale"] == 1
