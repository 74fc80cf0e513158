"""The rollback stress harness's host-side pieces (the run itself needs a lab kernel:
tests/kernel/test_lifecycle_stress.py)."""

from __future__ import annotations

from aegis_stream.kernel import abi, slots
from aegis_stream.kernel.maps import PolicyMaps
from stress.rollback_stress import TimedConfig, percentiles, table


def test_timed_config_records_each_activation_with_its_generation() -> None:
    pm = PolicyMaps.fake(8)
    timed = TimedConfig(pm.config)
    maps = PolicyMaps(pm.rules, pm.scopes, timed)
    timed.update(slots.slot_key(1), abi.SLOT_CONFIG.pack(7, 1, abi.SLOT_VALID, 0, 0))
    slots.activate(maps, 1)
    timed.update(slots.slot_key(0), abi.SLOT_CONFIG.pack(8, 1, 0, 0, 0))  # not valid
    slots.activate(maps, 0)
    assert [(f[2], f[3]) for f in timed.flips] == [(1, 7), (0, 0)]
    assert all(f[0] <= f[1] for f in timed.flips)
    assert slots.read_state(maps).active_slot == 0  # reads pass through


def test_percentiles_nearest_rank_and_growth() -> None:
    v = [i * 1_000_000 for i in range(1, 101)]  # 1..100 ms
    p = percentiles(v)
    assert (p["p50_ms"], p["p99_ms"], p["max_ms"]) == (50.0, 99.0, 100.0)
    assert p["first_tenth_p50_ms"] == 5.5 and p["last_tenth_p50_ms"] == 95.5
    assert percentiles([]) == {"n": 0}


def test_table_says_fail_when_a_gate_fails() -> None:
    lat = percentiles([1_000_000, 2_000_000])
    res = {"kernel": "k", "iterations": 2, "elapsed_s": 1, "events": 3,
           "workload": {"operations": 10, "ops_per_s": 10, "decided_by": {"A": 1, "B": 1}},
           "latency": {"apply": lat, "rollback": lat, "flip": lat}, "rollbacks_ok": 1,
           "mixed_decisions": 1, "kernel_counters": {}, "checks": {"op_unexplained": 1},
           "gates": {"mixed_decisions_zero": False}, "targets": {"flip_p99_within_target": True},
           "pass": False}
    out = table(res)
    assert "gate mixed_decisions_zero" in out and out.endswith("RESULT: FAIL")


# ---------------------------------------------------------------- the rollback loop (issue 15)
def _loop(tmp_path, mode: str, n: int, **kw):
    from stress.rollback_loop import LoopConfig, run_loop

    maps = PolicyMaps.fake(8)
    return maps, run_loop(maps, tmp_path, None, LoopConfig(n, mode, **kw), log=lambda m: None)


def test_rollback_loop_flips_between_the_two_generations_every_iteration(tmp_path) -> None:
    maps, res = _loop(tmp_path, "flip", 7)
    assert res["pass"] and res["rollbacks_ok"] == 7 and res["success_rate"] == 1.0
    assert res["latency"]["rollback"]["n"] == 7 and res["latency"]["rollback"]["p99_ms"] > 0
    # 7 alternating rollbacks starting at A: the last one left A active; nothing new stored
    st = slots.read_state(maps)
    assert st.active.generation == res["generations"]["A"]
    assert st.slots[st.inactive_slot].generation == res["generations"]["B"]
    assert res["provenance_records"] >= 2 + 7 and res["gates"]["provenance_chain_verifies"]


def test_rollback_loop_apply_mode_stages_a_generation_per_iteration(tmp_path) -> None:
    _, res = _loop(tmp_path, "apply", 3)
    assert res["pass"] and res["rollbacks_ok"] == 3 and res["latency"]["apply"]["n"] == 3


def test_rollback_loop_counts_a_wrong_kernel_decision_and_a_failed_rollback(tmp_path) -> None:
    from stress.rollback_loop import LoopConfig, run_loop

    maps = PolicyMaps.fake(8)
    # a "kernel" that never denies: every probe is wrong
    res = run_loop(maps, tmp_path / "a", None, LoopConfig(4, "flip", probe_every=2),
                   log=lambda m: None, probe=lambda p: 0)
    assert res["probes"] == 2 and res["wrong_probes"] == 2 and not res["pass"]
    assert res["gates"]["rollbacks_all_succeed"] and not res["gates"]["probes_all_right"]

    # the kept slot lost its generation behind the lifecycle's back: the flip is refused
    # (rollback re-stages it instead), and that is a failed iteration, not a success
    calls = {"n": 0}

    def probe(_p):
        calls["n"] += 1
        if calls["n"] == 2:  # after iteration 0's probes: invalidate the kept slot
            st = slots.read_state(maps)
            s = st.inactive_slot
            maps.config.update(slots.slot_key(s), abi.SLOT_CONFIG.pack(0, 0, 0, 0, 0))
        return 0

    res = run_loop(maps, tmp_path / "b", None, LoopConfig(3, "flip", probe_every=1),
                   log=lambda m: None, probe=probe)
    assert res["failure_count"] >= 1 and not res["gates"]["rollbacks_all_succeed"]
    assert "wanted a flip" in res["failures"][0]
