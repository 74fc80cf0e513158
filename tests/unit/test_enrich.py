"""Workload enrichment from cgroup paths (aegis_stream/pipeline/enrich.py), against the path
shapes systemd, docker, podman, containerd, cri-o and the kubelet (systemd and cgroupfs
drivers) really create, and its way into aegis.decision.v1 through both normalise paths."""

from __future__ import annotations

import msgspec
import pytest

from aegis_stream.kernel import abi
from aegis_stream.kernel.events import EVENT_SIZE, RawDecision, decode_batch, encode_raw
from aegis_stream.pipeline.enrich import WorkloadResolver, parse_cgroup_path
from aegis_stream.pipeline.schema import DecisionEvent, Workload
from aegis_stream.testing import CG_WORKLOADS, DEV_SDA1, fixed_normaliser, install, sample_record

C1 = "3e2c0b8c4a1f4d1a9b9e6a5c2d7f0e1b8a9c6d5e4f3a2b1c0d9e8f7a6b5c4d3e"  # 64 hex: a container id
UID = "5f0a3c1e-7b2d-4e8f-9a6b-1c2d3e4f5a6b"
UID_ = UID.replace("-", "_")  # as the kubelet's systemd driver writes it into slice names

CASES = [
    # systemd services, sessions, user units
    ("/system.slice/nginx.service", Workload(systemd_unit="nginx.service")),
    ("/sys/fs/cgroup/system.slice/nginx.service", Workload(systemd_unit="nginx.service")),
    ("/user.slice/user-1000.slice/session-3.scope", Workload(systemd_unit="session-3.scope")),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-firefox-4242.scope",
     Workload(systemd_unit="app-gnome-firefox-4242.scope")),
    ("/system.slice/sshd.service/sub", Workload(systemd_unit="sshd.service")),  # a unit's own sub-cgroup
    # docker: systemd driver and cgroupfs driver; podman
    (f"/system.slice/docker-{C1}.scope",
     Workload(systemd_unit=f"docker-{C1}.scope", container_id=C1, container_runtime="docker")),
    (f"/docker/{C1}", Workload(container_id=C1, container_runtime="docker")),
    (f"/machine.slice/libpod-{C1}.scope",
     Workload(systemd_unit=f"libpod-{C1}.scope", container_id=C1, container_runtime="podman")),
    # Kubernetes, kubelet systemd driver: containerd and cri-o, every QoS class
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{C1}.scope",
     Workload(systemd_unit=f"cri-containerd-{C1}.scope", container_id=C1, container_runtime="containerd",
              pod_uid=UID, pod_qos="burstable")),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{C1}.scope",
     Workload(systemd_unit=f"crio-{C1}.scope", container_id=C1, container_runtime="cri-o",
              pod_uid=UID, pod_qos="besteffort")),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{C1}.scope",
     Workload(systemd_unit=f"cri-containerd-{C1}.scope", container_id=C1, container_runtime="containerd",
              pod_uid=UID, pod_qos="guaranteed")),
    # the pod's own cgroup (a process not in a container, e.g. the sandbox's): pod, no container
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice",
     Workload(pod_uid=UID, pod_qos="burstable")),
    # kind / nested kubelets prefix the slices with kubelet-
    (f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
     f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{C1}.scope",
     Workload(systemd_unit=f"cri-containerd-{C1}.scope", container_id=C1, container_runtime="containerd",
              pod_uid=UID, pod_qos="besteffort")),
    # kubelet cgroupfs driver: the directory is the id, the runtime is not in the path
    (f"/kubepods/besteffort/pod{UID}/{C1}",
     Workload(container_id=C1, pod_uid=UID, pod_qos="besteffort")),
    (f"/kubepods/burstable/pod{UID}/{C1}", Workload(container_id=C1, pod_uid=UID, pod_qos="burstable")),
    (f"/kubepods/pod{UID}/{C1}", Workload(container_id=C1, pod_uid=UID, pod_qos="guaranteed")),
]

NOTHING = [
    "", "/", "/sys/fs/cgroup", "/sys/fs/cgroup/workloads/app", "/system.slice", "/user.slice/user-1000.slice",
    "/init.scope.d", f"/docker/{C1[:63]}",  # 63 hex is no container id
    f"/kubepods/besteffort/pod{UID[:-1]}",  # a malformed uid is no pod
    f"/other/pod{UID}",  # a pod directory outside kubepods is somebody's directory
    f"/system.slice/crio-conmon-{C1}.scope",  # cri-o's monitor, not the container
]


@pytest.mark.parametrize(("path", "want"), CASES, ids=[c[0][-48:] for c in CASES])
def test_real_path_shapes(path, want):
    assert parse_cgroup_path(path) == want


@pytest.mark.parametrize("path", NOTHING)
def test_paths_that_show_no_workload(path):
    got = parse_cgroup_path(path)
    assert got is None or got == Workload(systemd_unit=got.systemd_unit) and got.systemd_unit


def test_conmon_is_only_a_unit():
    assert parse_cgroup_path(f"/system.slice/crio-conmon-{C1}.scope") == \
        Workload(systemd_unit=f"crio-conmon-{C1}.scope")


def test_absent_fields_are_left_out_of_the_json():
    assert msgspec.json.decode(msgspec.json.encode(Workload(systemd_unit="nginx.service"))) == \
        {"systemd_unit": "nginx.service"}


def test_resolver_caches_per_cgroup_id_and_is_bounded():
    r = WorkloadResolver(capacity=2)
    a = r.lookup(10, "/system.slice/nginx.service")
    assert r.lookup(10, "/system.slice/nginx.service") is a  # a hit: parsed once
    st = r.statistics()
    assert (st.hits, st.misses, st.size) == (1, 1, 1)
    assert r.lookup(10, "/system.slice/renamed.service") == Workload(systemd_unit="renamed.service")
    r.lookup(11, "/a.service")
    r.lookup(12, "/b.service")
    st = r.statistics()
    assert st.size == 2 and st.evictions == 1
    assert r.lookup(13, "") is None  # unresolved path: nothing, not cached
    assert r.statistics().size == 2


def _raw(cgroup_id: int, ktime: int) -> RawDecision:
    return RawDecision(abi.ABI_VERSION, 0, int(abi.Decision.DENY), 0, 7, ktime, cgroup_id, CG_WORKLOADS,
                       1234, DEV_SDA1, abi.ACTION_OPEN, 4242, 4242, 0, 0, int(abi.Mode.ENFORCE), 0, "cat")


def test_decision_events_carry_the_workload_on_both_paths(kernel, store):
    install(kernel, store, sample_record(7))
    norm = fixed_normaliser(store)
    paths = {5001: f"/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/"
                   f"kubepods-burstable-pod{UID_}.slice/cri-containerd-{C1}.scope",
             5002: "/sys/fs/cgroup/system.slice/nginx.service",
             5003: "/sys/fs/cgroup/workloads/app"}
    norm.cgroups.static.update(paths)
    raws = [_raw(cg, 1000 + i) for i, cg in enumerate(paths)]
    one = [norm.normalise(r) for r in raws]
    assert one[0].workload == Workload(systemd_unit=f"cri-containerd-{C1}.scope", container_id=C1,
                                       container_runtime="containerd", pod_uid=UID, pod_qos="burstable")
    assert one[1].workload == Workload(systemd_unit="nginx.service")
    assert one[2].workload is None
    enc = msgspec.json.Encoder()
    batch = norm.encode_batch(decode_batch(b"".join(encode_raw(r) for r in raws), EVENT_SIZE))
    assert batch == b"".join(enc.encode(e) + b"\n" for e in one)
    back = [msgspec.json.decode(line, type=DecisionEvent) for line in batch.splitlines()]
    assert [e.workload for e in back] == [e.workload for e in one]
    assert b'"workload":null' in batch.splitlines()[2]


def test_the_explanation_shows_the_workload(kernel, store):
    from aegis_stream.agent.explain import render
    from aegis_stream.pipeline.enrich import describe
    from aegis_stream.processors.explain import explain

    install(kernel, store, sample_record(7))
    norm = fixed_normaliser(store)
    norm.cgroups.static[5001] = f"/sys/fs/cgroup/kubepods/burstable/pod{UID}/{C1}"
    ev = norm.normalise(_raw(5001, 1000))
    x = explain(ev, norm.generations.get(7))
    assert x.task.workload == ev.workload
    assert describe(ev.workload) == f"pod {UID} (burstable), container {C1[:12]}"
    assert f"  workload pod {UID} (burstable), container {C1[:12]}" in render(x).splitlines()
    assert describe(Workload(systemd_unit="nginx.service")) == "unit nginx.service"
