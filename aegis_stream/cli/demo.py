"""`aegis demo`: boot a lab kernel and show audit, then enforce, then a deny and its event.

Outside the guest it boots the lab kernel and re-runs itself inside
(`aegis demo --inside`), where it mounts a tmpfs, creates a workload cgroup, starts
the agent with the embedded default policy in audit mode, switches to enforce, and
prints what the workload saw and the events the agent emitted.
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
        subprocess.run([*AEGIS, "unload"], env=env, capture_output=True)
        cg.rmdir()
        umount(work)
    _say("demo " + ("succeeded" if rc == 0 else "FAILED"))
    return rc


def run_demo(kernel: str) -> int:
    from aegis_stream import lab

    k = lab.fetch_kernel(kernel)
    print(f"booting Debian kernel {k.version} under QEMU (TCG); this takes a minute...",
          flush=True)
    res = lab.lab_exec(k, [sys.executable, "-m", "aegis_stream.cli.demo", "--inside"], timeout=900)
    print(res.stdout)
    return res.returncode


if __name__ == "__main__":
    if "--inside" in sys.argv:
        sys.exit(inside())
    sys.exit(run_demo(sys.argv[1] if len(sys.argv) > 1 else "6.1"))
