"""`aegis demo`: boot a lab kernel and show audit, then enforce, then a deny and its event.

Outside the guest it boots the lab kernel and re-runs itself inside
(`aegis demo --inside`), where it mounts a tmpfs, creates a workload cgroup, starts
the agent with the embedded default policy in audit mode, switches to enforce, and
prints what the workload saw and the events the agent emitted.

Then the fleet half, on the host (``--no-fleet`` skips it): the guest has no network, so
its events come back through a directory shared with the host; a local Kafka broker and
a fleet worker start, ``aegis fleet ship`` publishes the demo's decisions, ``aegis tail``
reads the denies back, and the worker's fleet table (its ``aegis.fleet.v1`` summary)
counts them.  Broker and worker are stopped at the end, whatever happened.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

AEGIS = [sys.executable, "-m", "aegis_stream.cli"]
WORKER = [*AEGIS, "fleet", "worker"]  # the faust fleet worker (pipelines/fleet.py)


def _say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def _policy(path: Path, **kw: object) -> Path:
    text = (resources.files("aegis_stream") / "defaults" / "demo-policy.toml").read_text()
    path.write_text(text.format(**kw))
    return path


def _in_cgroup(cg: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    wrapped = ["/bin/sh", "-c", f'echo $$ > "{cg}/cgroup.procs" && exec "$@"', "sh", *argv]
    return subprocess.run(wrapped, capture_output=True, text=True)


def inside() -> int:
    from aegis_stream.lab.mounts import ensure_guest_mounts, mount_tmpfs, umount

    ensure_guest_mounts()
    work = Path(tempfile.mkdtemp(prefix="aegis-demo-"))
    mount_tmpfs(work)
    cg = Path("/sys/fs/cgroup/aegis-demo-workload")
    cg.mkdir(exist_ok=True)
    env = dict(os.environ, AEGIS_PIN_ROOT="/sys/fs/bpf/aegis-demo", AEGIS_STATE_DIR=str(work / "state"))
    secret = work / "secret.txt"
    secret.write_text("db-password=hunter2\n")
    tool = work / "forbidden-tool"
    shutil.copy2("/bin/true", tool)
    events = work / "events.jsonl"
    status = work / "status.json"
    kw = {"secret": secret, "tool": tool, "scope": cg}
    rc = 1
    _say(f"kernel {os.uname().release}; workload cgroup {cg}")
    agent = subprocess.Popen(
        [*AEGIS, "run", "--policy", str(_policy(work / "p1.toml", version=1, mode="audit", **kw)),
         "--events", str(events), "--status-file", str(status)], env=env)
    try:
        for _ in range(600):
            if status.exists():
                break
            time.sleep(0.1)
        _say("agent state: " + json.loads(status.read_text())["state"])
        _say("audit mode: the workload reads the secret (allowed, audited)")
        r = _in_cgroup(cg, ["cat", str(secret)])
        print(f"$ cat {secret}  -> exit {r.returncode}: {r.stdout.strip() or r.stderr.strip()}")
        _say("enforce mode needs a signed policy: generate a key, trust it, sign")
        keys = work / "keys"
        for argv in (["keys", "generate", "--id", "demo-signer", "--out", str(keys)],
                     ["keys", "add", str(keys / "demo-signer.pub"), "--id", "demo-signer"],
                     ["policy", "sign", str(_policy(work / "p2.toml", version=2, mode="enforce",
                                                    **kw)),
                      "--key", str(keys / "demo-signer.key"), "--out", str(work / "p2.signed")]):
            out = subprocess.run([*AEGIS, *argv], env=env, capture_output=True, text=True)
            print(f"$ aegis {' '.join(argv[:2])} ... -> {out.stdout.strip().splitlines()[0]}"
                  if out.returncode == 0 else out.stderr.strip())
        _say("switching to enforce: aegis policy apply (gapless slot swap)")
        out = subprocess.run([*AEGIS, "policy", "apply", str(work / "p2.signed")],
                             env=env, capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr.strip())
        _say("enforce mode: the workload is denied")
        r = _in_cgroup(cg, ["cat", str(secret)])
        print(f"$ cat {secret}  -> exit {r.returncode}: {r.stderr.strip()}")
        r = _in_cgroup(cg, [str(tool)])
        print(f"$ {tool}  -> exit {r.returncode}: {r.stderr.strip()}")
        r = subprocess.run(["cat", str(secret)], capture_output=True, text=True)
        print(f"(outside the selected cgroup) $ cat {secret} -> exit {r.returncode}")
        time.sleep(1.0)
        _say(f"events ({events}):")
        lines = events.read_text().splitlines() if events.exists() else []
        for line in lines:
            print(line)
        denies = [json.loads(x) for x in lines if '"decision":"deny"' in x]
        if denies:
            d = denies[0]
            _say("why was it denied?")
            print(f"rule {d['rule_id']!r} of policy {d['policy_name']} v{d['policy_version']} "
                  f"(generation {d['generation']}, {d['policy_digest'][:19]}...) matched inode "
                  f"{d['dev']}:{d['ino']} compiled from {d['rule_source']}; scope "
                  f"{d['scope_cgroup_path']} contains {d['cgroup_path']}; hook {d['hook']}, "
                  f"mode {d['mode']} -> EPERM")
        stats = subprocess.run([*AEGIS, "stats"], env=env, capture_output=True, text=True)
        _say("kernel counters (aegis stats):")
        print(stats.stdout.strip())
        log = subprocess.run([*AEGIS, "policy", "log", "--verify"], env=env, capture_output=True,
                             text=True)
        _say("provenance (aegis policy log --verify):")
        print(log.stdout.strip() or log.stderr.strip())
        rc = 0 if len(denies) >= 2 else 1
    finally:
        agent.terminate()
        agent.wait(timeout=30)
        out_dir = os.environ.get("AEGIS_DEMO_OUT")  # shared with the host (the fleet half)
        if out_dir and events.exists():
            shutil.copyfile(events, Path(out_dir) / "events.jsonl")
        subprocess.run([*AEGIS, "unload"], env=env, capture_output=True)
        cg.rmdir()
        umount(work)
    _say("demo " + ("succeeded" if rc == 0 else "FAILED"))
    return rc


def run_demo(kernel: str, *, fleet: bool = True) -> int:
    from aegis_stream import lab

    k = lab.fetch_kernel(kernel)
    print(f"booting Debian kernel {k.version} under QEMU (TCG); this takes a minute...",
          flush=True)
    shared = Path(tempfile.mkdtemp(prefix="aegis-demo-host-"))
    try:
        res = lab.lab_exec(k, [sys.executable, "-m", "aegis_stream.cli.demo", "--inside"],
                           timeout=900, env={"AEGIS_DEMO_OUT": str(shared)}, rwdirs=[shared])
        print(res.stdout)
        if res.returncode != 0 or not fleet:
            return res.returncode
        return fleet_demo(shared / "events.jsonl", shared)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# ------------------------------------------------------------------ the fleet half
def _fleet_summary(bootstrap: str, denies: int, audits: int, timeout: float) -> dict | None:
    """The fleet worker's newest summary on aegis.fleet.v1 once it counts ``denies`` and
    ``audits`` (None if it does not within ``timeout``)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from aegis_stream.fleet.topics import FLEET_TOPIC

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"aegis-demo-{os.getpid()}",
                  "enable.auto.commit": False})
    try:
        parts = c.list_topics(FLEET_TOPIC, timeout=10).topics[FLEET_TOPIC].partitions
        c.assign([TopicPartition(FLEET_TOPIC, p, OFFSET_BEGINNING) for p in parts])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            doc = json.loads(msg.value() or b"{}")
            if (doc.get("kind") == "summary" and doc.get("denies") == denies
                    and doc.get("audits") == audits):
                return dict(doc)
        return None
    finally:
        c.close()


def _stop(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fleet_demo(events: Path, work: Path) -> int:
    """Ship ``events`` (the demo's decisions) into a local broker watched by a fleet
    worker; show them read back by ``aegis tail`` and counted in the fleet table."""
    from aegis_stream.fleet import broker as kb
    from aegis_stream.fleet.topics import create_topics

    if not events.exists():
        print(f"fleet: no events came back from the guest ({events})")
        return 1
    docs = [json.loads(x) for x in events.read_text().splitlines() if x.strip()]
    decisions = [d for d in docs if d.get("schema") == "aegis.decision.v1"]
    n_deny = sum(d["decision"] == "deny" for d in decisions)
    n_audit = len(decisions) - n_deny
    _say("fleet: the guest has no network; its events came back through a shared directory")
    kb.fetch_kafka(log=print)
    work.mkdir(parents=True, exist_ok=True)
    broker = kb.LocalBroker(work / "kafka")
    worker: subprocess.Popen[bytes] | None = None
    ok = False
    worker_log = open(work / "worker.log", "wb")  # noqa: SIM115 - closed in finally
    try:
        t0 = time.monotonic()
        broker.start()
        create_topics(broker.bootstrap)
        print(f"local Kafka {kb.KAFKA_VERSION} broker (KRaft) up at {broker.bootstrap} "
              f"in {time.monotonic() - t0:.1f}s")
        _say("fleet worker (faust-streaming): aegis fleet worker")
        worker = subprocess.Popen(
            [*WORKER, "--kafka", broker.bootstrap, "--summary-every", "1",
             "--data-dir", str(work / "worker")],
            stdout=subprocess.DEVNULL, stderr=worker_log, start_new_session=True)
        _say(f"$ aegis fleet ship --kafka {broker.bootstrap} --events events.jsonl")
        out = subprocess.run([*AEGIS, "fleet", "ship", "--kafka", broker.bootstrap,
                              "--events", str(events)], capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr.strip())
        if out.returncode != 0:
            return 1
        _say(f"$ aegis tail --kafka {broker.bootstrap} --from-beginning --decision deny")
        out = subprocess.run([*AEGIS, "tail", "--kafka", broker.bootstrap, "--from-beginning",
                              "--decision", "deny", "--count", str(n_deny)],
                             capture_output=True, text=True, timeout=120)
        print(out.stdout.rstrip() or out.stderr.strip())
        tailed = len(out.stdout.splitlines())
        _say("fleet table (the worker's latest aegis.fleet.v1 summary):")
        summary = _fleet_summary(broker.bootstrap, n_deny, n_audit, timeout=120)
        if summary is None:
            print(f"the worker did not count {n_deny} denies and {n_audit} audits within 120s "
                  f"(its log: {work / 'worker.log'})")
            tail_log = (work / "worker.log").read_text(errors="replace").splitlines()[-5:]
            print("\n".join(tail_log))
            return 1
        print(f"hosts {summary['hosts']} {summary['hosts_by_state']}; "
              f"denies {summary['denies']}, audits {summary['audits']}")
        print(f"{'rule':<24} {'generation':>10} {'denies':>7} {'audits':>7}")
        for r in summary["top_rules"]:
            print(f"{r['rule_id']:<24} {r['generation']:>10} {r['denies']:>7} {r['audits']:>7}")
        ok = tailed == n_deny
        return 0 if ok else 1
    finally:
        if worker is not None:
            _stop(worker)
        worker_log.close()
        broker.stop()  # SIGTERM, SIGKILL after its grace period
        _say("fleet demo " + ("succeeded" if ok else "FAILED") + "; broker and worker stopped")


if __name__ == "__main__":
    if "--inside" in sys.argv:
        sys.exit(inside())
    args = [a for a in sys.argv[1:] if a != "--no-fleet"]
    sys.exit(run_demo(args[0] if args else "6.1", fleet="--no-fleet" not in sys.argv))
