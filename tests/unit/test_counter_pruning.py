"""aegis_rule_counters is pruned per generation: staging a new generation deletes the
per-rule counter keys of the generation it retires (folded into per-hook retired totals),
never those of the active or the kept (rollback) generation."""

from __future__ import annotations

import pytest

from aegis_stream.errors import KernelError
from aegis_stream.kernel import abi, counters, slots
from aegis_stream.kernel.maps import PolicyMaps
from aegis_stream.policy.compiler import CompiledPolicy, CompiledRule
from aegis_stream.testing import DEV_SDA1, FakeKernel

N_RULES = 100


def policy(n: int = N_RULES, base_ino: int = 10_000) -> CompiledPolicy:
    rules = [CompiledRule(i, f"r{i}", f"/f{i}", DEV_SDA1, base_ino + i,
                          abi.ACTION_OPEN | abi.ACTION_EXEC) for i in range(n)]
    return CompiledPolicy("prune", 1, "enforce", "sha256:" + "00" * 32, rules, [])


def hit_every_rule(k: FakeKernel, cp: CompiledPolicy) -> None:
    for r in cp.rules:
        k.decide(abi.Hook.FILE_OPEN, r.dev, r.ino, abi.ACTION_OPEN)
        k.decide(abi.Hook.BPRM_CHECK, r.dev, r.ino, abi.ACTION_EXEC)


def gens_in_map(k: FakeKernel) -> set[int]:
    return {abi.RULE_COUNTER_KEY.unpack(key)[0] for key in k.rule_counters.keys()}


def totals(k: FakeKernel) -> dict[str, tuple[int, int]]:
    """Per hook: live per-rule rows + retired == the per-hook DENIED/AUDITED counters."""
    doc = counters.read_counters(k.maps(), k.ncpu)
    out = {}
    for hook in doc["hooks"]:
        d = sum(r["denied"] for r in doc["rules"] if r["hook"] == hook) + doc["retired"][hook]["denied"]
        a = sum(r["audited"] for r in doc["rules"] if r["hook"] == hook) + doc["retired"][hook]["audited"]
        out[hook] = (d, a)
    return out


def hook_totals(k: FakeKernel) -> dict[str, tuple[int, int]]:
    hooks = counters.read_hook_counters(k.maps(), k.ncpu)
    return {h: (v["denied"], v["audited"]) for h, v in hooks.items()}


def test_many_swaps_keep_the_map_bounded_and_the_totals_exact():
    k = FakeKernel(ncpu=2)
    cp = policy()
    swaps = 300  # 300 generations x 100 rules x 2 hooks = 60,000 keys unpruned (max 16,384)
    for gen in range(1, swaps + 1):
        mode = abi.Mode.ENFORCE if gen % 3 else abi.Mode.AUDIT
        staged = slots.swap(k.policy_maps, cp, gen, int(mode))
        assert staged.pruned is not None and staged.pruned.ok
        k.cpu = gen  # spread over the CPUs
        hit_every_rule(k, cp)
        # at most the active and the kept generation, plus the 2 retired keys (one per hook)
        assert len(k.rule_counters.keys()) <= 2 * N_RULES * 2 + len(abi.Hook)
        assert gens_in_map(k) - {counters.RETIRED_GENERATION} <= {gen, gen - 1}
    # nothing was lost to a full table: live + retired == per-hook counters, per hook
    assert totals(k) == hook_totals(k)
    assert totals(k)["file_open"] == (sum(N_RULES for g in range(1, swaps + 1) if g % 3),
                                      sum(N_RULES for g in range(1, swaps + 1) if not g % 3))
    # the last two generations' per-rule rows are intact
    rows = counters.read_rule_counters(k.maps(), k.ncpu)
    assert {r["generation"] for r in rows} == {swaps, swaps - 1}
    assert all(r["denied"] + r["audited"] == 1 for r in rows)


def test_kept_generation_survives_and_rollback_flip_keeps_both():
    k = FakeKernel(ncpu=2)
    cp = policy(5)
    slots.swap(k.policy_maps, cp, 1, int(abi.Mode.ENFORCE))
    hit_every_rule(k, cp)
    slots.swap(k.policy_maps, cp, 2, int(abi.Mode.ENFORCE))
    hit_every_rule(k, cp)
    assert gens_in_map(k) == {1, 2}
    # a flip back to generation 1 (what a rollback does when the kept slot still holds it)
    st = slots.read_state(k.policy_maps)
    slots.activate(k.policy_maps, st.inactive_slot)
    hit_every_rule(k, cp)
    assert gens_in_map(k) == {1, 2}
    # the next stage overwrites generation 2's slot (inactive now): 2 goes, 1 (active) stays
    staged = slots.swap(k.policy_maps, cp, 3, int(abi.Mode.ENFORCE))
    assert staged.pruned is not None and staged.pruned.generations == [2]
    assert gens_in_map(k) == {1, counters.RETIRED_GENERATION}  # 3 has no decisions yet
    rows = {(r["generation"], r["rule_id"], r["hook"]): r["denied"]
            for r in counters.read_rule_counters(k.maps(), k.ncpu)}
    assert rows[(1, 0, "file_open")] == 2  # before and after the flip
    assert counters.read_retired(k.maps(), k.ncpu)["file_open"] == {"denied": 5, "audited": 0}


def test_deactivated_active_generation_is_kept():
    k = FakeKernel(ncpu=1)
    cp = policy(3)
    slots.swap(k.policy_maps, cp, 1, int(abi.Mode.ENFORCE))
    slots.swap(k.policy_maps, cp, 2, int(abi.Mode.ENFORCE))
    hit_every_rule(k, cp)
    slots.deactivate_all(k.policy_maps)  # break-glass: generation 2 stays in its slot
    slots.stage(k.policy_maps, cp, 3, int(abi.Mode.AUDIT))
    assert 2 in gens_in_map(k)


def test_stale_keys_of_unknown_generations_are_pruned_too():
    """A key left behind (restart, a late increment, a failed earlier prune) is pruned at
    the next stage whatever generation it has, except the two the slots hold."""
    k = FakeKernel(ncpu=2)
    cp = policy(2)
    slots.swap(k.policy_maps, cp, 10, int(abi.Mode.ENFORCE))
    k._count_rule(4, 0, abi.Hook.FILE_OPEN, True, n=7)  # a generation no slot holds
    k._count_rule(11, 0, abi.Hook.FILE_OPEN, True, n=1)  # the one about to be staged
    staged = slots.swap(k.policy_maps, cp, 11, int(abi.Mode.ENFORCE))
    assert staged.pruned is not None and staged.pruned.generations == [4, 11]
    assert counters.read_retired(k.maps(), k.ncpu)["file_open"]["denied"] == 8
    assert gens_in_map(k) == {counters.RETIRED_GENERATION}


def test_delete_failure_is_counted_and_retried(monkeypatch, caplog):
    k = FakeKernel(ncpu=2)
    cp = policy(4)
    for gen in (1, 2):
        slots.swap(k.policy_maps, cp, gen, int(abi.Mode.ENFORCE))
        hit_every_rule(k, cp)
    real_delete = k.rule_counters.delete
    calls = {"n": 0}

    def flaky(key: bytes) -> bool:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise KernelError("map aegis_rule_counters: delete (injected)", err=16)
        return real_delete(key)

    monkeypatch.setattr(k.rule_counters, "delete", flaky)
    before = counters.PRUNE_FAILURES
    staged = slots.swap(k.policy_maps, cp, 3, int(abi.Mode.ENFORCE))  # retires generation 1
    assert staged.pruned is not None
    assert staged.pruned.failed == 3 and not staged.pruned.ok
    assert staged.pruned.deleted == 2 * 4 - 3
    assert counters.PRUNE_FAILURES == before + 3
    assert "prune failure" in caplog.text
    assert staged.generation == 3  # the apply itself went through
    assert 1 in gens_in_map(k)  # left for the next prune, not folded yet
    staged = slots.swap(k.policy_maps, cp, 4, int(abi.Mode.ENFORCE))
    assert staged.pruned is not None and staged.pruned.ok
    assert staged.pruned.generations == [1, 2]
    assert totals(k) == hook_totals(k)  # nothing counted twice, nothing lost


def test_policy_maps_fake_prunes_plain_counter_map():
    maps = PolicyMaps.fake(64)
    rc = maps.rule_counters
    assert rc is not None
    cp = policy(3)
    for gen in range(1, 50):
        slots.swap(maps, cp, gen, int(abi.Mode.ENFORCE))
        for r in cp.rules:
            rc.update(abi.RULE_COUNTER_KEY.pack(gen, r.index, abi.Hook.FILE_OPEN),
                      abi.RULE_COUNTER.pack(1, 0))
        assert len(rc.keys()) <= 2 * 3 + 1
    assert counters.read_retired({abi.MAP_RULE_COUNTERS: rc})["file_open"]["denied"] == 3 * 47


def test_no_counter_map_means_no_pruning():
    maps = PolicyMaps.fake(64)
    maps.rule_counters = None
    assert slots.swap(maps, policy(1), 1, int(abi.Mode.ENFORCE)).pruned is None


@pytest.mark.parametrize("ncpu", [1, 3])
def test_retired_key_round_trips_through_percpu_update(ncpu):
    k = FakeKernel(ncpu=ncpu)
    res = counters.prune_rule_counters(k.rule_counters, keep=())
    assert res.ok and res.deleted == 0
    k._count_rule(5, 1, abi.Hook.MMAP_FILE, False, n=9)
    res = counters.prune_rule_counters(k.rule_counters, keep=())
    assert res.folded == {int(abi.Hook.MMAP_FILE): (0, 9)}
    assert counters.read_retired(k.maps())["mmap_file"] == {"denied": 0, "audited": 9}
    assert counters.read_rule_counters(k.maps()) == []
