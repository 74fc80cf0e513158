"""The no-task-storage build's scope cache (aegis_cg_scopes, bpf/aegis.bpf.c cached_scope()):
the scope answer per (generation, cgroup id), inserted once and never updated.  Modelled
by the fake kernel exactly as the program does it; what is tested here is the argument
that makes a hit exact (a generation's scopes never change; a new policy is a new
generation) and the userspace half: staging deletes the answers of retired generations,
so the map holds the active and the kept generation's only, and a full map costs the walk,
never a wrong answer."""

from __future__ import annotations

from aegis_stream.errors import KernelError
from aegis_stream.kernel import abi, slots
from aegis_stream.kernel.maps import FakeMap, PolicyMaps
from aegis_stream.policy.compiler import CompiledPolicy, CompiledRule, CompiledScope
from aegis_stream.testing import DEV_SDA1, FakeKernel, FakeTask

INO = 4711
ROOT, A, B, A_CHILD = 1, 100, 200, 101
IN_A = FakeTask(cgroups=(ROOT, A))
IN_A_CHILD = FakeTask(pid=7, tgid=7, cgroups=(ROOT, A, A_CHILD))
IN_B = FakeTask(pid=8, tgid=8, cgroups=(ROOT, B))
AT_ROOT = FakeTask(pid=9, tgid=9, cgroups=(ROOT,))


def policy(*scope_ids: int) -> CompiledPolicy:
    rules = [CompiledRule(0, "r0", "/secret", DEV_SDA1, INO, abi.ACTION_OPEN)]
    scopes = [CompiledScope(i, f"/sys/fs/cgroup/s{c}", c) for i, c in enumerate(scope_ids)]
    return CompiledPolicy("cg-cache", 1, "enforce", "sha256:" + "00" * 32, rules, scopes)


def denied(k: FakeKernel, task: FakeTask) -> bool:
    return k.decide(abi.Hook.FILE_OPEN, DEV_SDA1, INO, abi.ACTION_OPEN, task) != 0


def cached(k: FakeKernel) -> dict[tuple[int, int], int]:
    assert k.policy_maps.cg_scopes is not None
    return {abi.CG_SCOPE_KEY.unpack(key): int.from_bytes(v, "little", signed=True)
            for key, v in k.policy_maps.cg_scopes.items()}


def test_answers_are_cached_per_generation_and_cgroup_and_stay_exact_across_policies():
    k = FakeKernel(cgroup_scope_cache=True)
    slots.swap(k.policy_maps, policy(A), 1, int(abi.Mode.ENFORCE))
    assert [denied(k, t) for t in (IN_A, IN_A_CHILD, IN_B, AT_ROOT)] == [True, True, False, False]
    assert cached(k) == {(1, A): A, (1, A_CHILD): A, (1, B): -1, (1, ROOT): -1}
    # hits answer the same (twice more each)
    for _ in range(2):
        assert [denied(k, t) for t in (IN_A, IN_A_CHILD, IN_B, AT_ROOT)] == [True, True, False, False]
    # a new policy selecting B instead: a new generation, new answers; gen 1's stay (kept slot)
    slots.swap(k.policy_maps, policy(B), 2, int(abi.Mode.ENFORCE))
    assert [denied(k, t) for t in (IN_A, IN_A_CHILD, IN_B, AT_ROOT)] == [False, False, True, False]
    assert {g for g, _ in cached(k)} == {1, 2}
    assert cached(k)[(2, A)] == -1 and cached(k)[(2, B)] == B
    # rollback to the kept generation: its cached answers are still exactly right
    slots.activate(k.policy_maps, slots.read_state(k.policy_maps).inactive_slot)
    assert [denied(k, t) for t in (IN_A, IN_A_CHILD, IN_B, AT_ROOT)] == [True, True, False, False]
    # the next stage overwrites the slot that held generation 2 (the inactive one): its
    # answers go, generation 1's (active) stay
    slots.swap(k.policy_maps, policy(A_CHILD), 3, int(abi.Mode.ENFORCE))
    assert {g for g, _ in cached(k)} == {1}
    assert [denied(k, t) for t in (IN_A, IN_A_CHILD, IN_B, AT_ROOT)] == [False, True, False, False]
    assert {g for g, _ in cached(k)} == {1, 3}


def test_many_swaps_keep_the_map_to_two_generations():
    k = FakeKernel(cgroup_scope_cache=True)
    tasks = [FakeTask(pid=p, tgid=p, cgroups=(ROOT, 1000 + p)) for p in range(50)]
    for gen in range(1, 201):
        slots.swap(k.policy_maps, policy(1000 + gen % 50), gen, int(abi.Mode.ENFORCE))
        assert [denied(k, t) for t in tasks] == [t.cgroup_id == 1000 + gen % 50 for t in tasks]
        assert {g for g, _ in cached(k)} <= {gen, gen - 1}
    assert len(cached(k)) <= 2 * len(tasks)


def test_host_scope_is_never_cached():
    k = FakeKernel(cgroup_scope_cache=True)
    slots.swap(k.policy_maps, policy(), 1, int(abi.Mode.ENFORCE))
    assert denied(k, IN_A) and denied(k, AT_ROOT)
    assert cached(k) == {}


def test_a_full_map_costs_the_walk_not_the_answer():
    k = FakeKernel(cgroup_scope_cache=True)
    small = FakeMap(abi.MAP_CG_SCOPES, abi.CG_SCOPE_KEY.size, 8, 1)
    k.policy_maps.cg_scopes = small
    slots.swap(k.policy_maps, policy(A), 1, int(abi.Mode.ENFORCE))
    assert denied(k, IN_A)  # the one entry
    assert not denied(k, IN_B) and denied(k, IN_A_CHILD)  # full: walked, not cached
    assert len(small.keys()) == 1


def test_a_failing_delete_never_stops_a_stage():
    maps = PolicyMaps.fake()
    assert maps.cg_scopes is not None
    for gen in (1, 2):
        slots.swap(maps, policy(A), gen, int(abi.Mode.ENFORCE))
    maps.cg_scopes.update(abi.CG_SCOPE_KEY.pack(1, A), (A).to_bytes(8, "little"))
    maps.cg_scopes.update(abi.CG_SCOPE_KEY.pack(99, A), (A).to_bytes(8, "little"))  # a stray

    def refuse(key: bytes) -> bool:
        raise KernelError("delete (injected)", err=1)

    maps.cg_scopes.delete = refuse  # type: ignore[method-assign]
    staged = slots.stage(maps, policy(B), 3, int(abi.Mode.ENFORCE))  # retires generation 1
    assert staged.generation == 3
    assert len(maps.cg_scopes.keys()) == 2  # left for the next stage
    del maps.cg_scopes.delete
    slots.activate(maps, staged.slot)
    keep = slots.held_generations(maps)
    assert keep is not None
    assert slots.prune_retired_scope_answers(maps, keep) == 2  # 1 and the stray 99: neither slot holds them
    assert maps.cg_scopes.keys() == []
