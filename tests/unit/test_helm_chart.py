"""The Helm chart (packaging/helm/aegis), proven by rendering: no cluster is reachable here.

`helm lint --strict` and `helm template` run the real helm (v3.22.0, built by scripts/setup
into ~/.cache/aegis/helm/bin; ``$AEGIS_HELM`` names another); the rendered manifests are
parsed with PyYAML and checked: the securityContext against the systemd unit's capability
set, the host mounts, the probes (their shell run against a stand-in ``aegis`` for each
exit code), the Service / ServiceMonitor, the policy and trust sources, and the agent's
config, decoded by the agent's own config decoder.  helm missing: skipped on a developer
machine, a failure under CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from aegis_stream.agent import config as agent_config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "packaging" / "helm" / "aegis"
UNIT = ROOT / "packaging" / "aegis.service"
KUBE_VERSION = "1.30.0"
CACHED_HELM = Path.home() / ".cache" / "aegis" / "helm" / "bin" / "helm"


def _helm() -> str:
    for cand in (os.environ.get("AEGIS_HELM"), str(CACHED_HELM), shutil.which("helm")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    if os.environ.get("CI"):
        pytest.fail(f"helm not found ({CACHED_HELM}; scripts/setup builds it): CI=true, a failure")
    pytest.skip("helm not installed (scripts/setup builds it)")


@pytest.fixture(scope="module")
def helm() -> str:
    return _helm()


def _render_raw(helm: str, tmp: Path, values: dict[str, Any] | None) -> subprocess.CompletedProcess[str]:
    vf = tmp / "values.yaml"
    vf.write_text(yaml.safe_dump(values or {}))
    # helm template assumes Kubernetes 1.20 without a cluster; the chart needs 1.30
    # (securityContext.appArmorProfile)
    return subprocess.run([helm, "template", "rel", str(CHART), "--namespace", "aegis-system",
                           "--kube-version", KUBE_VERSION, "-f", str(vf)], capture_output=True, text=True)


def render(helm: str, tmp: Path, values: dict[str, Any] | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    res = _render_raw(helm, tmp, values)
    assert res.returncode == 0, res.stderr
    assert not re.search(r"privileged:\s*true", res.stdout)
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    out = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(out) == len(docs), "two objects with one kind and name"
    return out


def one(objs: dict[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for (k, _), o in objs.items() if k == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def pod(objs: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "DaemonSet")["spec"]["template"]["spec"]


def agent(objs: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    (c,) = [c for c in pod(objs)["containers"] if c["name"] == "agent"]
    return c


def unit_capabilities() -> set[str]:
    """The systemd unit's CapabilityBoundingSet, without the CAP_ prefix (Kubernetes' spelling)."""
    (line,) = [ln for ln in UNIT.read_text().splitlines() if ln.startswith("CapabilityBoundingSet=")]
    return {c.removeprefix("CAP_") for c in line.split("=", 1)[1].split()}


def test_helm_lint_strict(helm: str) -> None:
    res = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in res.stdout


def test_security_context_is_the_units_capability_set_and_nothing_privileged(helm: str, tmp_path: Path) -> None:
    objs = render(helm, tmp_path, {"trust": {"publicKeys": {"ops.pub": "aegis-key-id: ops\nPEM\n"}}})
    spec = pod(objs)
    caps = unit_capabilities()
    assert caps and "SYS_ADMIN" not in caps
    containers = spec["containers"] + spec["initContainers"]
    assert {c["name"] for c in containers} == {"agent", "trust"}
    for c in containers:
        sc = c["securityContext"]
        assert sc.get("privileged", False) is False
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(agent(objs)["securityContext"]["capabilities"]["add"]) == caps
    assert len(agent(objs)["securityContext"]["capabilities"]["add"]) == len(caps)
    (trust,) = spec["initContainers"]
    assert "add" not in trust["securityContext"]["capabilities"]  # the trust store needs none
    assert spec["hostPID"] is True  # /proc/<tgid> of the kernel's (init namespace) pids
    assert spec["hostNetwork"] is False and spec["hostIPC"] is False
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False


def test_host_mounts_bpffs_cgroup_state_and_events(helm: str, tmp_path: Path) -> None:
    objs = render(helm, tmp_path)
    spec = pod(objs)
    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in agent(objs)["volumeMounts"]}
    want = {"/sys/fs/bpf": "/sys/fs/bpf", "/sys/fs/cgroup": "/sys/fs/cgroup",
            "/var/lib/aegis": "/var/lib/aegis", "/var/log/aegis": "/var/log/aegis"}
    for in_pod, on_node in want.items():
        m = mounts[in_pod]
        assert vols[m["name"]]["hostPath"]["path"] == on_node, in_pod
        assert not m.get("readOnly", False), in_pod
        # Bidirectional propagation needs a privileged container; nothing mounts from inside
        assert m.get("mountPropagation", "None") in ("None", "HostToContainer"), in_pod
    assert vols[mounts["/sys/fs/bpf"]["name"]]["hostPath"]["type"] == "Directory"
    assert mounts["/sys/kernel/security"]["readOnly"] is True
    assert "emptyDir" in vols[mounts["/tmp"]["name"]]  # the root filesystem is read-only
    # events in an emptyDir on request; a bad choice is one line from helm
    objs = render(helm, tmp_path, {"events": {"volume": "emptyDir"}})
    ev = next(v for v in pod(objs)["volumes"] if v["name"] == "events")
    assert "emptyDir" in ev and "hostPath" not in ev
    bad = _render_raw(helm, tmp_path, {"events": {"volume": "nfs"}})
    assert bad.returncode != 0 and 'events.volume: "nfs" is neither hostPath nor emptyDir' in bad.stderr


def _probe_exit(cmd: list[str], status_rc: int, tmp: Path) -> int:
    """Run a probe's command with a stand-in `aegis` whose `status` exits ``status_rc``."""
    bindir = tmp / f"bin{status_rc}"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "aegis"
    fake.write_text(f'#!/bin/sh\n[ "$1" = status ] || exit 99\necho state\nexit {status_rc}\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    return subprocess.run(cmd, env=env, capture_output=True).returncode


@pytest.mark.parametrize("status_rc", [0, 1, 2, 3])
def test_probes_call_aegis_status_ready_on_0_alive_unless_2(helm: str, tmp_path: Path, status_rc: int) -> None:
    c = agent(render(helm, tmp_path))
    ready = c["readinessProbe"]["exec"]["command"]
    alive = c["livenessProbe"]["exec"]["command"]
    assert ready == ["aegis", "status"]
    assert c["startupProbe"]["exec"]["command"] == alive
    assert any("aegis status" in part for part in alive)
    assert (_probe_exit(ready, status_rc, tmp_path) == 0) == (status_rc == 0)
    # docs/DEGRADED_MODE.md: 2 (blind) is the hard failure; 1 degraded and 3 unknown are not
    assert (_probe_exit(alive, status_rc, tmp_path) == 0) == (status_rc != 2)


def test_service_and_servicemonitor_toggle(helm: str, tmp_path: Path) -> None:
    objs = render(helm, tmp_path)
    assert not [k for k, _ in objs if k == "ServiceMonitor"]
    svc = one(objs, "Service")
    (port,) = svc["spec"]["ports"]
    (cport,) = agent(objs)["ports"]
    assert port["name"] == "metrics" and port["targetPort"] == "metrics" == cport["name"]
    tmpl_labels = one(objs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= tmpl_labels.items()
    objs = render(helm, tmp_path, {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}})
    sm = one(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["selector"]["matchLabels"].items() <= one(objs, "Service")["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["namespaceSelector"]["matchNames"] == ["aegis-system"]


def _config(objs: dict[tuple[str, str], dict[str, Any]]) -> agent_config.AgentFile:
    cm = next(o for (k, n), o in objs.items() if k == "ConfigMap" and n.endswith("-config"))
    text = cm["data"]["aegis.toml"]
    tomllib.loads(text)
    return agent_config.decode(text, "chart")  # the agent's own decoder: unknown keys refused


def test_agent_config_decodes_and_matches_the_pod(helm: str, tmp_path: Path) -> None:
    objs = render(helm, tmp_path)
    c = agent(objs)
    assert c["command"] == ["aegis"] and c["args"][:3] == ["run", "--config", "/etc/aegis/config/aegis.toml"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/etc/aegis/config" in mounts
    cfg = _config(objs)
    assert cfg.metrics_addr == f"0.0.0.0:{c['ports'][0]['containerPort']}"
    assert cfg.state_dir == "/var/lib/aegis" and cfg.pin_root == "/sys/fs/bpf/aegis"
    assert cfg.events.path.startswith("/var/log/aegis/")
    assert cfg.events.file_mode == 0o640 and cfg.log_format == "json"
    assert cfg.policy is None  # no policy configured: the node keeps what is pinned
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["AEGIS_STATE_DIR"] == cfg.state_dir and env["AEGIS_PIN_ROOT"] == cfg.pin_root
    assert c["resources"]["limits"]["memory"]
    assert pod(objs)["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert {"operator": "Exists"} in pod(objs)["tolerations"]
    objs = render(helm, tmp_path, {"agent": {"kafkaBootstrap": "k1:9092", "mode": "enforce"},
                                   "nodeSelector": {"aegis": "on"}, "image": {"digest": "sha256:" + "a" * 64}})
    cfg = _config(objs)
    assert cfg.fleet.kafka == "k1:9092" and cfg.mode == "enforce"
    assert agent(objs)["args"][3:5] == ["--kafka-host-key", "$(NODE_NAME)"]
    assert agent(objs)["image"] == "ghcr.io/aegis-stream/aegis@sha256:" + "a" * 64
    assert pod(objs)["nodeSelector"]["aegis"] == "on"  # merged over the default
    bad = _render_raw(helm, tmp_path, {"events": {"fileMode": "640"}})
    assert bad.returncode != 0 and "events.fileMode" in bad.stderr


def test_policy_from_a_secret_or_configmap(helm: str, tmp_path: Path) -> None:
    envelope = '{"format": "aegis.signed-policy.v1"}'
    objs = render(helm, tmp_path, {"policy": {"signed": envelope}})
    secret = one(objs, "Secret")
    assert secret["stringData"]["policy.signed"] == envelope
    vol = next(v for v in pod(objs)["volumes"] if v["name"] == "policy")
    assert vol["secret"]["secretName"] == secret["metadata"]["name"]
    mount = next(m for m in agent(objs)["volumeMounts"] if m["name"] == "policy")
    assert mount["readOnly"] is True
    assert _config(objs).policy == f"{mount['mountPath']}/policy.signed"
    objs = render(helm, tmp_path, {"policy": {"existingConfigMap": "fleet-policy", "key": "web.signed"}})
    assert not [k for k, _ in objs if k == "Secret"]
    vol = next(v for v in pod(objs)["volumes"] if v["name"] == "policy")
    assert vol["configMap"]["name"] == "fleet-policy"
    assert _config(objs).policy == "/etc/aegis/policy/web.signed"
    bad = _render_raw(helm, tmp_path, {"policy": {"signed": envelope, "existingSecret": "x"}})
    assert bad.returncode != 0 and "set only one of existingSecret, existingConfigMap and signed" in bad.stderr


def _init_script(objs: dict[tuple[str, str], dict[str, Any]], keydir: Path) -> list[str]:
    (init,) = pod(objs)["initContainers"]
    cmd = list(init["command"])
    mount = next(m for m in init["volumeMounts"] if m["name"] == "trust")["mountPath"]
    cmd[-1] = cmd[-1].replace(mount, str(keydir))
    return cmd


@pytest.mark.parametrize(("stderr", "ok"), [
    ("", True),                                                     # added
    ("aegis: error: key id 'ops' is already in the trust store", True),  # kept as the node has it
    ("aegis: error: key SHA256:x was revoked (stolen); a revoked key can never be trusted again", False),
])
def test_trust_init_adds_keys_and_keeps_the_nodes_own(helm: str, tmp_path: Path, stderr: str, ok: bool) -> None:
    objs = render(helm, tmp_path, {"trust": {"publicKeys": {"ops.pub": "aegis-key-id: ops\nPEM\n"}}})
    cm = next(o for (k, n), o in objs.items() if k == "ConfigMap" and n.endswith("-trust"))
    assert cm["data"]["ops.pub"].startswith("aegis-key-id: ops")
    keydir = tmp_path / "trust"
    keydir.mkdir()
    (keydir / "ops.pub").write_text(cm["data"]["ops.pub"])
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls"
    (bindir / "aegis").write_text(
        f'#!/bin/sh\necho "$@" >>{log}\n'
        + (f'echo "{stderr}" >&2\nexit 1\n' if stderr else 'echo "trusted key ops"\n'))
    (bindir / "aegis").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    res = subprocess.run(_init_script(objs, keydir), env=env, capture_output=True, text=True)
    assert (res.returncode == 0) == ok, res.stderr
    assert log.read_text().split() == ["keys", "add", str(keydir / "ops.pub")]
    if not ok:
        assert "revoked" in res.stderr
    bad = _render_raw(helm, tmp_path, {"trust": {"publicKeys": {"ops.pem": "x"}}})
    assert bad.returncode != 0 and "name each key ID.pub" in bad.stderr
