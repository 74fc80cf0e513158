import os
import struct

import pytest

from aegis_stream.errors import KernelError, PolicyError
from aegis_stream.kernel import abi, slots
from aegis_stream.kernel.maps import PolicyMaps
from aegis_stream.policy import compiler, model, signing
from aegis_stream.policy.lifecycle import ApplyOutcome, Lifecycle


def _toml(files, mode="enforce", version=1, extra=""):
    rules = "".join(
        f'[[rules]]\nid = "r{i}"\npath = "{f}"\nactions = ["open"]\n' for i, f in enumerate(files)
    )
    return f'apiVersion = "aegis/v1"\nname = "t"\nversion = {version}\nmode = "{mode}"\n{extra}{rules}'


def _policy(tmp_path, files, mode="enforce", version=1, extra=""):
    return model.loads(_toml(files, mode, version, extra))


def _lifecycle(tmp_path) -> Lifecycle:
    """The product's apply path on fake maps, with a trusted key for signed enforce."""
    lc = Lifecycle(PolicyMaps.fake(), tmp_path / "state")
    k = signing.generate_keypair("t", tmp_path / "keys")
    lc.trust.add(k.public_path.read_bytes())
    return lc


def _apply(lc: Lifecycle, files, version=1) -> ApplyOutcome:
    key, _ = signing.load_private_key(lc.root.parent / "keys" / "t.key")
    return lc.apply(signing.sign_policy(_toml(files, version=version).encode(), key, "t"))


def _files(tmp_path, n):
    out = []
    for i in range(n):
        p = tmp_path / f"f{i}"
        p.write_text(str(i))
        out.append(str(p))
    return out


def test_compile_resolves_inodes_and_action_bits(tmp_path):
    f = _files(tmp_path, 2)
    cp = compiler.compile_policy(_policy(tmp_path, f))
    assert [r.ino for r in cp.rules] == [os.stat(x).st_ino for x in f]
    assert all(r.actions == abi.ACTION_OPEN for r in cp.rules)
    assert cp.host_scope and cp.digest.startswith("sha256:")


def test_hardlinks_in_one_policy_are_refused(tmp_path):
    f = _files(tmp_path, 1)
    os.link(f[0], tmp_path / "hl")
    with pytest.raises(PolicyError, match="same inode"):
        compiler.compile_policy(_policy(tmp_path, [f[0], str(tmp_path / "hl")]))


def test_scope_must_be_cgroup_v2(tmp_path):
    f = _files(tmp_path, 1)
    p = _policy(tmp_path, f, extra=f'[[scope]]\ncgroup = "{tmp_path}"\n')
    with pytest.raises(PolicyError, match="not on cgroup v2"):
        compiler.compile_policy(p)


def test_swap_writes_inactive_slot_then_flips(tmp_path):
    lc = _lifecycle(tmp_path)
    maps, store = lc.maps, lc.store
    f = _files(tmp_path, 3)
    r1 = _apply(lc, f[:2])
    st = slots.read_state(maps)
    assert st.active_slot == r1.slot == 1 and st.active.generation == 1 and st.active.valid
    assert st.active.mode == abi.Mode.ENFORCE and st.active.rule_count == 2
    r2 = _apply(lc, f[1:], version=2)
    st = slots.read_state(maps)
    assert st.active_slot == r2.slot == 0 and st.active.generation == 2
    # the previous generation is still intact in the other slot (instant rollback)
    assert st.slots[1].generation == 1 and st.slots[1].valid
    assert store.load(2).policy.rules[0].source == f[1]


def test_a_failed_stage_leaves_the_active_generation_untouched(tmp_path):
    lc = _lifecycle(tmp_path)
    maps = lc.maps
    f = _files(tmp_path, 4)
    _apply(lc, f[:1])
    before = slots.read_state(maps)
    digest_before = slots.slot_digest(maps, before.active_slot)
    maps.rules.fail_update_after = 1  # type: ignore[attr-defined]
    with pytest.raises(KernelError, match="nothing applied"):
        _apply(lc, f, version=2)
    after = slots.read_state(maps)
    assert after.active_slot == before.active_slot
    assert after.active == before.active
    assert slots.slot_digest(maps, after.active_slot) == digest_before
    assert not after.slots[after.inactive_slot].valid


def test_no_decision_can_see_a_mix(tmp_path):
    """Every intermediate state of a swap exposes exactly one complete generation."""
    lc = _lifecycle(tmp_path)
    maps = lc.maps
    f = _files(tmp_path, 6)
    _apply(lc, f[:3])
    expected = {1: set(), 2: set()}
    for g, files in ((1, f[:3]), (2, f[3:])):
        expected[g] = {os.stat(x).st_ino for x in files}

    seen = []
    orig_update = maps.config.update

    def observe(key, value, flags=0):
        orig_update(key, value, flags)
        st = slots.read_state(maps)
        if st.active.valid:
            inos = {
                abi.INODE_KEY.unpack(k)[0]
                for k in maps.rules.keys()
                if abi.INODE_KEY.unpack(k)[2] == st.active_slot
            }
            seen.append((st.active.generation, inos))

    maps.config.update = observe  # type: ignore[method-assign]
    _apply(lc, f[3:], version=2)
    assert seen and all(inos == expected[g] for g, inos in seen)
    assert seen[-1][0] == 2


def test_control_word_is_the_first_u32_of_config_entry_0():
    maps = PolicyMaps.fake()
    slots.activate(maps, 1)
    raw = maps.config.lookup(struct.pack("<I", 0))
    assert raw is not None and struct.unpack_from("<I", raw)[0] == 1
