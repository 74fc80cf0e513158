"""Rollback stress in a real kernel: apply/rollback iterations under a live workload.

Drives ``stress/rollback_stress.py`` (the same driver ``stress/run`` boots a lab kernel
for) on the lab's loaded object: generation A denies x (open) and bin-x (exec), every B
generation denies y and bin-y; a static workload in the selected cgroup opens x, y, z and
execs bin-* continuously.  Each iteration applies B (staged, verified, activated) and
rolls back to A through ``Lifecycle.rollback()`` (target picked, signature re-verified,
flip).  Every operation's result and every decision event (generation, slot) must be
explained by exactly one generation that was active at that moment.

CI size: AEGIS_STRESS_N (default 60) iterations.  Under QEMU TCG one iteration costs
about 1-2 s (Python apply + rollback, with the workload competing for the guest's 2
vCPUs), so 60 iterations keep the test near 2 minutes; the 1,000/10,000-iteration runs
are ``stress/run -n N`` (docs/POLICY_LIFECYCLE.md, "Rollback stress").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from stress.rollback_stress import SEED_P99_GATE_MS, Env, StressConfig, run_stress, table

from .conftest import ROOT, Lab

N = int(os.environ.get("AEGIS_STRESS_N", "60"))


def test_stress_apply_rollback_under_load(lab: Lab, record_testsuite_property):
    cfg = StressConfig(iterations=N, rate=int(os.environ.get("AEGIS_STRESS_RATE", "250")),
                       exec_every=16, rollback=os.environ.get("AEGIS_STRESS_ROLLBACK", "auto"))
    env = Env(lab.maps, list(lab.rings.values()), lab.cg_selected, ROOT / "stress")
    res = run_stress(env, cfg)
    print(table(res))
    out = os.environ.get("AEGIS_STRESS_OUT")
    if out:
        Path(out).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    lat = res["latency"]
    for k in ("apply", "rollback", "flip"):
        record_testsuite_property(f"stress_{k}_p50_ms", lat[k]["p50_ms"])
        record_testsuite_property(f"stress_{k}_p99_ms", lat[k]["p99_ms"])
    record_testsuite_property("stress_iterations", N)
    record_testsuite_property("stress_mixed_decisions", res["mixed_decisions"])
    assert res["mixed_decisions"] == 0, (res["checks"], res["examples"])
    assert res["rollbacks_ok"] == N and res["rollback_failure_count"] == 0, res["rollback_failures"]
    assert res["rollback_methods"] == {"flip": N}
    assert lat["flip"]["p99_ms"] <= SEED_P99_GATE_MS
    assert lat["rollback"]["p99_ms"] <= SEED_P99_GATE_MS
    assert res["events"] > 0 and res["checks"]["events_checked"] == res["events"]
    assert res["workload"]["decided_by"]["A"] > 0 and res["workload"]["decided_by"]["B"] > 0
    failed = [k for k, v in res["gates"].items() if not v]
    assert not failed, (failed, res["checks"], res["examples"], res["kernel_counters"])
