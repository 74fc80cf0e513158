"""Workload enrichment in a real kernel: cgroups named as the kubelet (systemd driver,
containerd) and systemd name them, the cgroup ids the BPF program records, the agent's
cgroup walk and both normalise paths (audit events: the columnar batch encoder; the deny:
the per-event path) give each event the workload its path shows."""

from __future__ import annotations

import json
import signal
import time

from .agentlib import aegis, policy_toml, signed, spawn_aegis, wait_for_json
from .conftest import EPERM, Lab

UID = "5f0a3c1e-7b2d-4e8f-9a6b-1c2d3e4f5a6b"
CID = "3e2c0b8c4a1f4d1a9b9e6a5c2d7f0e1b8a9c6d5e4f3a2b1c0d9e8f7a6b5c4d3e"


def test_enrich_001_pod_and_unit_workloads_on_events(lab: Lab, agent_env, cgroups, tmp_path):
    pod = lab.cg_selected / "kubepods.slice" / "kubepods-burstable.slice"
    pod = pod / f"kubepods-burstable-pod{UID.replace('-', '_')}.slice" / f"cri-containerd-{CID}.scope"
    unit = lab.cg_selected / "system.slice" / "nginx.service"
    for leaf in (pod, unit):
        leaf.mkdir(parents=True)
        p = leaf
        while p != lab.cg_selected:
            cgroups.append(p)
            p = p.parent
    target = lab.file("enrich-secret")
    events = tmp_path / "events.jsonl"
    status = tmp_path / "status.json"
    agent = spawn_aegis(["run", "--policy", str(policy_toml(tmp_path, lab, target, "audit")),
                         "--events", str(events), "--status-file", str(status)], agent_env)
    try:
        assert wait_for_json(status)["state"] == "auditing"
        assert lab.probe("read", target, cgroup=pod).result == {"ok": True}  # audited
        out = aegis(["policy", "apply", str(signed(agent_env, tmp_path,
                                                   policy_toml(tmp_path, lab, target, "enforce", 2)))],
                    agent_env)
        assert out.returncode == 0, out.stderr
        assert lab.probe("read", target, cgroup=unit).errno == EPERM
        deadline = time.monotonic() + 20
        recs: list[dict] = []
        while time.monotonic() < deadline and len(recs) < 2:
            lines = events.read_text().splitlines() if events.exists() else []
            recs = [r for r in map(json.loads, lines) if r.get("schema") == "aegis.decision.v1"]
            time.sleep(0.2)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
    audit, deny = recs
    assert (audit["decision"], audit["cgroup_path"]) == ("audit", str(pod))
    assert audit["workload"] == {"systemd_unit": f"cri-containerd-{CID}.scope", "container_id": CID,
                                 "container_runtime": "containerd", "pod_uid": UID, "pod_qos": "burstable"}
    assert (deny["decision"], deny["cgroup_path"]) == ("deny", str(unit))
    assert deny["workload"] == {"systemd_unit": "nginx.service"}
    expl = [r for r in map(json.loads, events.read_text().splitlines())
            if r.get("schema") == "aegis.explanation.v1"]
    assert expl and expl[0]["task"]["workload"] == {"systemd_unit": "nginx.service"}
