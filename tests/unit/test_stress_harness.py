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
