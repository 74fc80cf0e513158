#!/usr/bin/env python3
"""Rollback, many times, in one process: N ``Lifecycle.rollback`` calls with no process
start, no workload and no event analysis per iteration (issue 15: 10,000 in one lab run).

    python -m stress.rollback_loop --fake -n 1000 [--out FILE]     host, the fake kernel
    stress/run --loop --kernel 6.1 -n 10000 [--out FILE]           lab: real maps, real LSM

Two signed, enforcing generations of one policy, scoped to one cgroup: **A** (v1) denies
*open* of ``x``, **B** (v2) denies *open* of ``y``.  Both are applied once, so each sits in
one of the two slots; then:

* ``--mode flip`` (default): iteration *i* is one ``Lifecycle.rollback(to_generation=T)``
  with T = A, B, A, B, ...: the whole rollback path (lock, reconcile, target record loaded
  and checked against its logged sha256, Ed25519 re-verification of the stored envelope,
  read-back digest of the kept slot, journal, the one control-word write, provenance
  append), each time to the generation the previous one left.  No new generation is
  stored, so iteration 10,000 costs what iteration 1 did.
* ``--mode apply``: iteration *i* is ``apply(B)`` (a new generation staged) then
  ``rollback()`` (to A by version), the seed's iteration (stress/rollback_stress does the
  same under a workload); the store grows by one generation per iteration.

After every rollback: its outcome must be a flip to T, and the kernel's control word must
name T's slot holding T as a valid generation.  In the lab (``--probe-every K``, default
1) the driver itself runs in the selected cgroup and opens ``x`` and ``y``: exactly T's
file must fail with EPERM, the other open succeed (a real LSM decision per iteration).

Output: JSON (``aegis.rollback-loop.v1``): success count and rate, rollback (and apply)
latency p50/p90/p99/max, first- and last-tenth medians (growth), wrong probes, the
provenance chain verified at the end, gates.  Exit 0 when every gate holds.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aegis_stream.kernel import slots
from aegis_stream.kernel.maps import PolicyMaps
from aegis_stream.policy import signing
from aegis_stream.policy.lifecycle import Lifecycle
from stress.rollback_stress import SEED_P99_GATE_MS, percentiles

FORMAT = "aegis.rollback-loop.v1"


@dataclass
class LoopConfig:
    iterations: int = 10_000
    mode: str = "flip"  # flip | apply
    probe_every: int = 0  # 0: no kernel probe (the fake kernel decides nothing)


def _policy(version: int, cgroup: str | None, deny: Path) -> bytes:
    # no cgroup (the fake kernel): host-wide, as nothing decides there anyway
    scope = f'[[scope]]\ncgroup = "{cgroup}"\n\n' if cgroup else ""
    return (f'apiVersion = "aegis/v1"\nname = "loop"\nversion = {version}\nmode = "enforce"\n\n'
            f'{scope}[[rules]]\nid = "open-{deny.name}"\npath = "{deny}"\nactions = ["open"]\n').encode()


def probe_open(path: Path) -> int:
    """0 when the open succeeds, else its errno."""
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as exc:
        return exc.errno or -1
    return 0


def run_loop(maps: PolicyMaps, work: Path, cgroup: str | None, cfg: LoopConfig,
             log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
             probe: Callable[[Path], int] = probe_open) -> dict[str, Any]:
    files = work / "files"
    files.mkdir(parents=True, exist_ok=True)
    x, y = files / "x", files / "y"
    x.write_text("x\n")
    y.write_text("y\n")
    keys = signing.generate_keypair("loop", work / "keys")
    key, _ = signing.load_private_key(keys.private_path)
    env_a = signing.sign_policy(_policy(1, cgroup, x), key, "loop")
    env_b = signing.sign_policy(_policy(2, cgroup, y), key, "loop")
    lc = Lifecycle(maps, work / "state")
    lc.trust.add(keys.public_path.read_bytes())
    gen_a = lc.apply(env_a, "A").generation
    gen_b = lc.apply(env_b, "B").generation
    denied = {gen_a: x, gen_b: y}
    if cfg.mode == "apply":
        lc.rollback(to_generation=gen_a)  # A active, B kept: each apply(B) reuses B's slot

    rollback_ns: list[int] = []
    apply_ns: list[int] = []
    failures: list[str] = []
    wrong_probes: list[str] = []
    probes = 0
    ok = 0
    every = max(1, cfg.iterations // 10)
    t_start = time.monotonic()
    for i in range(cfg.iterations):
        target = gen_a if (cfg.mode == "apply" or i % 2 == 0) else gen_b
        try:
            if cfg.mode == "apply":
                t0 = time.perf_counter_ns()
                res = lc.apply(env_b, "B")
                apply_ns.append(time.perf_counter_ns() - t0)
                denied[res.generation] = y
                t0 = time.perf_counter_ns()
                rb = lc.rollback()
            else:
                t0 = time.perf_counter_ns()
                rb = lc.rollback(to_generation=target)
            dt = time.perf_counter_ns() - t0
        except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
            failures.append(f"{i}: {type(exc).__name__}: {exc}")
            continue
        st = slots.read_state(maps)
        if rb.method != "flip" or rb.generation != target:
            failures.append(f"{i}: {rb.method} to generation {rb.generation}, wanted a flip to {target}")
        elif not (st.active.valid and st.active.generation == target):
            failures.append(f"{i}: kernel's active slot {st.active_slot} holds generation "
                            f"{st.active.generation} (valid {st.active.valid}), wanted {target}")
        else:
            ok += 1
            rollback_ns.append(dt)
        if cfg.probe_every and i % cfg.probe_every == 0:
            probes += 1
            got = (probe(x), probe(y))
            want = tuple(errno.EPERM if denied[target] == p else 0 for p in (x, y))
            if got != want:
                wrong_probes.append(f"{i}: generation {target}: open x, y -> {got}, wanted {want}")
        if (i + 1) % every == 0:
            log(f"[loop] {i + 1}/{cfg.iterations}, {ok} ok, {time.monotonic() - t_start:.1f}s")
    elapsed = time.monotonic() - t_start
    t0 = time.monotonic()
    prov_ok = lc.log.verify().ok
    verify_s = time.monotonic() - t0
    lat = percentiles(rollback_ns)
    gates = {
        "rollbacks_all_succeed": ok == cfg.iterations and not failures,
        "rollback_p99_le_5s": bool(rollback_ns) and lat["p99_ms"] <= SEED_P99_GATE_MS,
        "probes_all_right": not wrong_probes,
        "provenance_chain_verifies": prov_ok,
    }
    return {
        "format": FORMAT,
        "kernel": os.uname().release if cfg.probe_every else "fake",
        "lab_series": os.environ.get("AEGIS_LAB_KERNEL", ""),
        "mode": cfg.mode,
        "iterations": cfg.iterations,
        "rollbacks_ok": ok,
        "success_rate": ok / cfg.iterations if cfg.iterations else 0.0,
        "failure_count": len(failures),
        "failures": failures[:20],
        "latency": {"rollback": lat, "apply": percentiles(apply_ns)},
        "elapsed_s": round(elapsed, 2),
        "per_iteration_ms": round(elapsed / cfg.iterations * 1000, 3) if cfg.iterations else 0.0,
        "probes": probes,
        "wrong_probes": len(wrong_probes),
        "wrong_probe_examples": wrong_probes[:5],
        "generations": {"A": gen_a, "B": gen_b},
        "provenance_records": len(lc.log.lines()),
        "provenance_verify_s": round(verify_s, 2),
        "gates": gates,
        "pass": all(gates.values()),
    }


def summary(res: dict[str, Any]) -> str:
    lat = res["latency"]["rollback"]
    rows = [f"rollback loop ({res['mode']}): kernel {res['kernel']}, {res['rollbacks_ok']}/"
            f"{res['iterations']} ok ({res['success_rate'] * 100:.2f} %), {res['elapsed_s']} s "
            f"({res['per_iteration_ms']} ms per iteration), {res['probes']} probes, "
            f"{res['wrong_probes']} wrong"]
    if lat.get("n"):
        rows.append(f"rollback p50 {lat['p50_ms']:.2f} ms, p90 {lat['p90_ms']:.2f}, p99 "
                    f"{lat['p99_ms']:.2f}, max {lat['max_ms']:.2f}; first/last tenth p50 "
                    f"{lat['first_tenth_p50_ms']:.2f} / {lat['last_tenth_p50_ms']:.2f} ms")
    rows += [f"gate {k:28} {'PASS' if v else 'FAIL'}" for k, v in res["gates"].items()]
    rows.append("RESULT: " + ("PASS" if res["pass"] else "FAIL"))
    return "\n".join(rows)


def _lab(args: argparse.Namespace, cfg: LoopConfig) -> dict[str, Any]:
    """Real maps, programs attached, the driver in the selected cgroup (its opens are probed)."""
    from stress.guest import attached

    with attached("loop") as g:
        (g.cgroup / "cgroup.procs").write_text(str(os.getpid()))
        return run_loop(g.obj.policy_maps(), g.work, str(g.cgroup), cfg)

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--iterations", type=int, default=10_000)
    ap.add_argument("--mode", choices=("flip", "apply"), default="flip")
    ap.add_argument("--fake", action="store_true", help="the fake kernel's maps (host, no root)")
    ap.add_argument("--probe-every", type=int, default=1,
                    help="lab: probe the kernel's decision every K iterations (0: never)")
    ap.add_argument("--out", help="write the JSON result here")
    args = ap.parse_args(argv)
    if args.iterations < 1:
        ap.error("-n must be at least 1")
    if args.fake:
        cfg = LoopConfig(args.iterations, args.mode, 0)
        with tempfile.TemporaryDirectory(prefix="aegis-loop-") as tmp:
            res = run_loop(PolicyMaps.fake(64), Path(tmp), None, cfg)
    else:
        if os.geteuid() != 0:
            print("rollback_loop: run as root inside a lab kernel (stress/run --loop), or --fake",
                  file=sys.stderr)
            return 2
        res = _lab(args, LoopConfig(args.iterations, args.mode, args.probe_every))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    print(summary(res))
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
