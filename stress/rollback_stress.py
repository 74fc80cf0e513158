#!/usr/bin/env python3
"""Kernel-lab rollback stress: N apply/rollback iterations under a live workload.

Runs **inside a lab kernel** (root, BPF LSM), started by ``stress/run`` (host side: ``python
-m stress.rollback_stress`` from the repository root) or by
``tests/kernel/test_lifecycle_stress.py``.

Two signed, enforcing generations of one policy name, both scoped to one cgroup:

* **A** (version 1): denies *open* of ``x`` and *exec* of ``bin-x``
* **B** (version 2): denies *open* of ``y`` and *exec* of ``bin-y``
* ``z`` and ``bin-z`` are denied by neither.

Each iteration is ``Lifecycle.apply(B)`` (a new generation staged into the inactive slot,
read back, activated: the byte-identical v2 is admitted again) followed by
``Lifecycle.rollback()`` (the real rollback path: target picked, envelope re-verified
against the trust store, journal, **flip** back to A's kept slot, provenance record).
Meanwhile ``stress/workload.c`` (static C, in the selected cgroup) opens x, y, z (and
execs bin-*) round robin and logs every operation's [t0, t1] (CLOCK_MONOTONIC) and result;
the decision events of both rings (which carry generation and slot) are drained after
every iteration.  The control-word writes are timed by a thin proxy around the config
map, which gives the bare flip latency and the activation timeline.

Checks (``mixed`` = any of the first three; every one must be 0):

* ``event_wrong_generation``: an event whose generation does not deny its inode
  (e.g. generation A denying y), or whose generation is neither A nor a B generation;
* ``event_wrong_slot``: an event whose slot is not the slot that generation was staged in;
* ``op_unexplained``: an operation whose result no generation possibly active during its
  [t0, t1] window would produce (x denied while only B ran, z denied ever, ...);
* ``event_not_active``: an event whose generation was not possibly active between its
  operation's t0 and the event's ktime;
* ``event_orphan`` (no operation window contains it), ``event_result_mismatch`` (a deny
  event for an operation that succeeded), ``denied_without_event`` (only excusable by
  ring reserve failures, reported), ``no_policy_decisions`` (the kernel counted a decision
  with no valid slot: a gap), ``unexpected_errors`` (an errno other than EPERM);
* ``rollback_failures``: a rollback that raised, or did not flip back to A.

Writes a JSON result (``--out``) and prints a table.  Exit 0 when every gate holds.
"""

from __future__ import annotations

import argparse
import bisect
import errno
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aegis_stream.kernel import abi, slots
from aegis_stream.kernel.devnum import resolve_inode
from aegis_stream.kernel.events import decode_raw
from aegis_stream.kernel.maps import PolicyMaps
from aegis_stream.kernel.ringbuf import RingBuffer
from aegis_stream.policy import signing
from aegis_stream.policy.lifecycle import Lifecycle

WORKLOAD_SRC = Path(__file__).with_name("workload.c")
WORKLOAD_BIN = Path(__file__).parent / ".build" / "workload"
REC_SIZE = 24
SEED_P99_GATE_MS = 5000.0  # the seed's gate: p99 rollback <= 5 s
TARGET_FLIP_P99_MS = 10.0  # our target for the flip


# ------------------------------------------------------------------------ the flip proxy
class TimedConfig:
    """Wraps the config map: times every control-word write (the activation) and tracks
    which generation each slot holds, so the driver knows the activation timeline."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.slot_gen = [0, 0]
        # (t_before_ns, t_after_ns, slot, generation) of every control-word write
        self.flips: list[tuple[int, int, int, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        if key == slots.CONTROL_KEY:
            slot = abi.CONTROL.unpack(value[: abi.CONTROL.size])[0] & 1
            t0 = time.monotonic_ns()
            self.inner.update(key, value, flags)
            t1 = time.monotonic_ns()
            self.flips.append((t0, t1, slot, self.slot_gen[slot]))
            return
        self.inner.update(key, value, flags)
        for s in range(abi.SLOTS):
            if key == slots.slot_key(s):
                gen, _mode, fl = abi.SLOT_CONFIG.unpack(value[: abi.SLOT_CONFIG.size])[:3]
                self.slot_gen[s] = gen if fl & abi.SLOT_VALID else 0


# ------------------------------------------------------------------------------- config
@dataclass
class StressConfig:
    iterations: int = 1000
    rate: int = 0  # workload operations per second; 0 = as fast as it goes
    exec_every: int = 16  # one exec per this many operations; 0 = opens only
    rollback: str = "auto"  # auto: rollback() as `aegis policy rollback`; version; generation
    dwell_ms: float = 0.0  # pause after each apply and each rollback
    drain_every: int = 1
    workload: str = ""  # path of the built workload binary ("" = stress/.build or build)


@dataclass
class Env:
    """What the driver needs from the lab: the loaded object's maps and a scratch area."""

    maps: dict[str, Any]  # name -> FdMap (abi.ALL_MAPS)
    rings: list[RingBuffer]
    cgroup: Path  # the selected cgroup the workload joins
    work: Path  # a scratch directory on a local filesystem (tmpfs)
    log: Callable[[str], None] = field(default=lambda m: print(m, file=sys.stderr, flush=True))


def percentiles(values_ns: list[int]) -> dict[str, float]:
    if not values_ns:
        return {"n": 0}
    v = sorted(values_ns)
    ms = [x / 1e6 for x in v]

    def pct(p: float) -> float:
        # nearest-rank
        k = max(0, min(len(ms) - 1, int(-(-p * len(ms) // 100)) - 1))
        return round(ms[k], 4)

    tenth = max(1, len(values_ns) // 10)
    return {
        "n": len(ms),
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": round(ms[-1], 4),
        "mean_ms": round(statistics.fmean(ms), 4),
        # growth check: median of the first and of the last tenth (in run order)
        "first_tenth_p50_ms": round(statistics.median(values_ns[:tenth]) / 1e6, 4),
        "last_tenth_p50_ms": round(statistics.median(values_ns[-tenth:]) / 1e6, 4),
    }


def build_workload(dest_dir: Path) -> Path:
    if WORKLOAD_BIN.is_file() and os.access(WORKLOAD_BIN, os.X_OK):
        return WORKLOAD_BIN
    out = dest_dir / "workload"
    cc = shutil.which("cc") or shutil.which("gcc") or "cc"
    subprocess.run([cc, "-O2", "-static", "-Wall", "-o", str(out), str(WORKLOAD_SRC)], check=True)
    return out


def _policy(name: str, version: int, cgroup: Path, opens: list[Path], execs: list[Path]) -> bytes:
    doc = (f'apiVersion = "aegis/v1"\nname = "{name}"\nversion = {version}\n'
           f'mode = "enforce"\n\n[[scope]]\ncgroup = "{cgroup}"\n\n')
    for p in opens:
        doc += f'[[rules]]\nid = "open-{p.name}"\npath = "{p}"\nactions = ["open"]\n\n'
    for p in execs:
        doc += f'[[rules]]\nid = "exec-{p.name}"\npath = "{p}"\nactions = ["exec"]\n\n'
    return doc.encode()


# ------------------------------------------------------------------------------- the run
def run_stress(env: Env, cfg: StressConfig) -> dict[str, Any]:
    log = env.log
    work = env.work
    work.mkdir(parents=True, exist_ok=True)
    files = work / "files"
    files.mkdir(exist_ok=True)
    workload = Path(cfg.workload) if cfg.workload else build_workload(work)
    targets: list[Path] = []
    for n in ("x", "y", "z"):
        p = files / n
        p.write_text(f"{n}\n")
        targets.append(p)
    bins: list[Path] = []
    if cfg.exec_every > 0:
        for n in ("bin-x", "bin-y", "bin-z"):
            p = files / n
            shutil.copy2(workload, p)
            bins.append(p)
    all_targets = targets + bins
    idents = [resolve_inode(str(p)) for p in all_targets]
    key_of = {(i.dev, i.ino): k for k, i in enumerate(idents)}
    # target index sets each policy denies
    deny_a = {0} | ({3} if bins else set())
    deny_b = {1} | ({4} if bins else set())

    keys = signing.generate_keypair("stress", work / "keys")
    key, _ = signing.load_private_key(keys.private_path)
    src_a = _policy("stress", 1, env.cgroup, [targets[0]], bins[:1])
    src_b = _policy("stress", 2, env.cgroup, [targets[1]], bins[1:2])
    env_a = signing.sign_policy(src_a, key, "stress")
    env_b = signing.sign_policy(src_b, key, "stress")

    timed = TimedConfig(env.maps[abi.MAP_CONFIG])
    pmaps = PolicyMaps(env.maps[abi.MAP_RULES], env.maps[abi.MAP_SCOPES], timed)
    st0 = slots.read_state(pmaps)
    timed.slot_gen = [s.generation if s.valid else 0 for s in st0.slots]
    g_init = st0.active.generation if st0.active.valid else 0
    state = work / "state"
    lc = Lifecycle(pmaps, state)
    lc.trust.add(keys.public_path.read_bytes())

    ra = lc.apply(env_a, "A")
    rb0 = lc.apply(env_b, "B")
    gen_a = ra.generation
    kind: dict[int, str] = {gen_a: "A", rb0.generation: "B"}
    gen_slot: dict[int, int] = {gen_a: ra.slot, rb0.generation: rb0.slot}
    lc.rollback()  # A active again: the loop starts from A
    for r in env.rings:
        r.drain(1 << 20)

    def hook_counters() -> dict[str, int]:
        from aegis_stream.kernel.counters import read_hook_counters

        h = read_hook_counters(env.maps)
        return {c.name.lower(): sum(v[c.name.lower()] for v in h.values()) for c in abi.Counter}

    ctr0 = hook_counters()
    ops_path = work / "ops.bin"
    argv = [str(workload), "run", str(env.cgroup), str(ops_path), str(cfg.rate),
            str(cfg.exec_every if bins else 0), *map(str, targets)]
    if bins:
        argv += ["--", *map(str, bins)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready = proc.stdout.readline()
    if not ready.startswith("ready"):
        proc.kill()
        raise RuntimeError(f"workload did not start: {ready!r} {proc.stderr.read() if proc.stderr else ''}")
    wl_pid = int(ready.split()[1])
    time.sleep(0.05)

    events: list[tuple[int, int, int, int, int, int, int, int, int]] = []

    def drain() -> None:
        for r in env.rings:
            while True:
                batch = r.drain(1 << 14)
                if not batch:
                    break
                for raw in batch:
                    e = decode_raw(raw)
                    events.append((e.ktime_ns, e.generation, e.slot, e.dev, e.ino, e.decision,
                                   e.mode, e.cgroup_id, e.hook))

    apply_ns: list[int] = []
    rollback_ns: list[int] = []
    flip_ns: list[int] = []
    rollback_fail: list[str] = []
    apply_fail: list[str] = []
    methods: dict[str, int] = {}
    dwell = cfg.dwell_ms / 1000.0
    t_start = time.monotonic()
    progress_every = max(1, cfg.iterations // 10)
    for i in range(cfg.iterations):
        t0 = time.perf_counter_ns()
        try:
            res = lc.apply(env_b, "B")
        except Exception as exc:  # noqa: BLE001 - counted and reported
            apply_fail.append(f"{i}: {type(exc).__name__}: {exc}")
            continue
        apply_ns.append(time.perf_counter_ns() - t0)
        kind[res.generation] = "B"
        gen_slot[res.generation] = res.slot
        if dwell:
            time.sleep(dwell)
        nflips = len(timed.flips)
        t0 = time.perf_counter_ns()
        try:
            if cfg.rollback == "generation":
                rb = lc.rollback(to_generation=gen_a)
            elif cfg.rollback == "version":
                rb = lc.rollback(to_version=1)
            else:
                rb = lc.rollback()
            dt = time.perf_counter_ns() - t0
            methods[rb.method] = methods.get(rb.method, 0) + 1
            if rb.method != "flip" or rb.generation != gen_a:
                rollback_fail.append(f"{i}: {rb.method} to generation {rb.generation}")
            else:
                rollback_ns.append(dt)
                f = timed.flips[nflips:]
                if len(f) == 1:
                    flip_ns.append(f[0][1] - f[0][0])
                else:
                    rollback_fail.append(f"{i}: {len(f)} control-word writes in one rollback")
        except Exception as exc:  # noqa: BLE001 - counted and reported
            rollback_fail.append(f"{i}: {type(exc).__name__}: {exc}")
        if dwell:
            time.sleep(dwell)
        if (i + 1) % cfg.drain_every == 0:
            drain()
        if (i + 1) % progress_every == 0:
            log(f"[stress] {i + 1}/{cfg.iterations} iterations, {len(events)} events, "
                f"{time.monotonic() - t_start:.1f}s")
    elapsed = time.monotonic() - t_start
    time.sleep(0.05)
    proc.terminate()
    _, wl_err = proc.communicate(timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"workload exited {proc.returncode}: {wl_err}")
    drain()
    ctr1 = hook_counters()
    ctr = {k: ctr1[k] - ctr0[k] for k in ctr0}

    # ------------------------------------------------------------------ the checks
    raw_ops = ops_path.read_bytes()
    import struct

    rec = struct.Struct("<QQIi")
    ops = [rec.unpack_from(raw_ops, o) for o in range(0, len(raw_ops) - REC_SIZE + 1, REC_SIZE)]
    ops.sort()
    op_t0 = [o[0] for o in ops]
    # activation timeline: gen_seq[k] is active after the k-th control-word write
    flips = timed.flips
    wb = [f[0] for f in flips]
    wa = [f[1] for f in flips]
    gen_seq = [g_init] + [f[3] for f in flips]

    def possible(t0: int, t1: int) -> list[int]:
        lo = bisect.bisect_right(wa, t0)  # writes certainly done by t0
        hi = bisect.bisect_right(wb, t1)  # writes started by t1
        return gen_seq[lo: hi + 1]

    def denies(gen: int, target: int) -> bool:
        k = kind.get(gen)
        return (k == "A" and target in deny_a) or (k == "B" and target in deny_b)

    def is_denied(result: int) -> bool:
        return result == errno.EPERM or result < 0  # < 0: exec killed after no-return

    counts = dict.fromkeys((
        "event_wrong_generation", "event_wrong_slot", "op_unexplained", "event_not_active",
        "event_orphan", "event_result_mismatch", "event_foreign", "denied_without_event",
        "unexpected_errors", "events_checked"), 0)
    examples: dict[str, list] = {}

    def bad(kind_: str, detail: Any) -> None:
        counts[kind_] += 1
        ex = examples.setdefault(kind_, [])
        if len(ex) < 5:
            ex.append(detail)

    per_target = [{"ok": 0, "denied": 0, "other": 0} for _ in all_targets]
    decided_by = {"A": 0, "B": 0, "none": 0}
    for t0, t1, tgt, res in ops:
        pt = per_target[tgt]
        if res == 0:
            pt["ok"] += 1
        elif is_denied(res):
            pt["denied"] += 1
        else:
            pt["other"] += 1
            bad("unexpected_errors", {"target": tgt, "result": res})
            continue
        cands = possible(t0, t1)
        expl = [g for g in cands if denies(g, tgt) == is_denied(res)]
        if not expl:
            bad("op_unexplained", {"target": all_targets[tgt].name, "result": res,
                                   "t0": t0, "t1": t1, "possible": cands})
        else:
            ks = {kind.get(g, "none") for g in expl}
            if is_denied(res):
                decided_by[kind.get(expl[0], "none")] += 1
            elif len(ks) == 1 and tgt not in (2, 5):
                decided_by[ks.pop()] += 1
    events.sort()
    matched_ops: set[int] = set()
    for ev in events:
        kt, gen, slot, dev, ino, decision, mode, cg, hook = ev
        tgt = key_of.get((dev, ino))
        if tgt is None:
            bad("event_foreign", {"gen": gen, "dev": dev, "ino": ino})
            continue
        counts["events_checked"] += 1
        if not denies(gen, tgt) or decision != abi.Decision.DENY or mode != abi.Mode.ENFORCE:
            bad("event_wrong_generation", {"gen": gen, "kind": kind.get(gen), "target":
                                           all_targets[tgt].name, "decision": decision})
        if gen_slot.get(gen) != slot:
            bad("event_wrong_slot", {"gen": gen, "slot": slot, "staged_in": gen_slot.get(gen)})
        j = bisect.bisect_right(op_t0, kt) - 1
        if j < 0 or not (ops[j][0] <= kt <= ops[j][1]) or ops[j][2] != tgt:
            bad("event_orphan", {"gen": gen, "target": all_targets[tgt].name, "ktime": kt})
            continue
        o = ops[j]
        matched_ops.add(j)
        if not is_denied(o[3]):
            bad("event_result_mismatch", {"gen": gen, "target": all_targets[tgt].name,
                                          "result": o[3]})
        if gen not in possible(o[0], kt):
            bad("event_not_active", {"gen": gen, "t0": o[0], "ktime": kt,
                                     "possible": possible(o[0], kt)})
    for j, o in enumerate(ops):
        if is_denied(o[3]) and j not in matched_ops:
            counts["denied_without_event"] += 1
    mixed = (counts["event_wrong_generation"] + counts["event_wrong_slot"]
             + counts["op_unexplained"])
    rb_ok = len(rollback_ns)
    lat = {"apply": percentiles(apply_ns), "rollback": percentiles(rollback_ns),
           "flip": percentiles(flip_ns)}
    ring_fail = ctr.get("ringbuf_fail", 0)
    gates = {
        "mixed_decisions_zero": mixed == 0,
        "rollbacks_all_succeed": not rollback_fail and rb_ok == cfg.iterations,
        "applies_all_succeed": not apply_fail,
        "rollback_p99_le_5s": bool(rollback_ns) and lat["rollback"]["p99_ms"] <= SEED_P99_GATE_MS,
        "flip_p99_le_5s": bool(flip_ns) and lat["flip"]["p99_ms"] <= SEED_P99_GATE_MS,
        "no_gap_decisions": ctr.get("no_policy", 0) == 0,
        "events_consistent": all(counts[k] == 0 for k in (
            "event_not_active", "event_orphan", "event_result_mismatch", "event_foreign",
            "unexpected_errors")),
        "every_deny_has_event": counts["denied_without_event"] <= ring_fail,
        "workload_saw_both_generations": decided_by["A"] > 0 and decided_by["B"] > 0,
    }
    prov_ok = lc.log.verify().ok
    gates["provenance_chain_verifies"] = prov_ok
    return {
        "format": "aegis.rollback-stress.v1",
        "kernel": os.uname().release,
        "lab_series": os.environ.get("AEGIS_LAB_KERNEL", ""),
        "config": vars(cfg) | {"workload": str(workload)},
        "elapsed_s": round(elapsed, 2),
        "iterations": cfg.iterations,
        "generations": {"A": gen_a, "B_first": rb0.generation, "B_last": max(kind)},
        "rollback_methods": methods,
        "rollbacks_ok": rb_ok,
        "rollback_failures": rollback_fail[:20],
        "rollback_failure_count": len(rollback_fail),
        "apply_failures": apply_fail[:20],
        "latency": lat,
        "targets": {"seed_p99_ms": SEED_P99_GATE_MS, "flip_p99_ms": TARGET_FLIP_P99_MS,
                    "flip_p99_within_target": bool(flip_ns)
                    and lat["flip"]["p99_ms"] <= TARGET_FLIP_P99_MS},
        "workload": {"pid": wl_pid, "operations": len(ops),
                     "ops_per_s": round(len(ops) / elapsed, 1) if elapsed else 0,
                     "per_target": {all_targets[k].name: v for k, v in enumerate(per_target)},
                     "decided_by": decided_by},
        "events": len(events),
        "kernel_counters": ctr,
        "checks": counts,
        "mixed_decisions": mixed,
        "examples": examples,
        "provenance_records": len(lc.log.lines()),
        "gates": gates,
        "pass": all(gates.values()),
    }


def table(res: dict[str, Any]) -> str:
    lat = res["latency"]
    rows = [f"rollback stress: kernel {res['kernel']}, N={res['iterations']}, "
            f"{res['elapsed_s']}s, {res['workload']['operations']} workload ops "
            f"({res['workload']['ops_per_s']}/s), {res['events']} decision events",
            f"{'':10} {'n':>6} {'p50 ms':>10} {'p90 ms':>10} {'p99 ms':>10} {'max ms':>10} "
            f"{'1st10% p50':>11} {'last10% p50':>11}"]
    for k in ("apply", "rollback", "flip"):
        v = lat[k]
        if not v.get("n"):
            rows.append(f"{k:10} {0:>6}")
            continue
        rows.append(f"{k:10} {v['n']:>6} {v['p50_ms']:>10.3f} {v['p90_ms']:>10.3f} "
                    f"{v['p99_ms']:>10.3f} {v['max_ms']:>10.3f} {v['first_tenth_p50_ms']:>11.3f} "
                    f"{v['last_tenth_p50_ms']:>11.3f}")
    rows.append(f"rollbacks ok {res['rollbacks_ok']}/{res['iterations']}  "
                f"mixed decisions {res['mixed_decisions']}  decided by A/B "
                f"{res['workload']['decided_by']['A']}/{res['workload']['decided_by']['B']}  "
                f"no-policy decisions {res['kernel_counters'].get('no_policy', 0)}  "
                f"ring fails {res['kernel_counters'].get('ringbuf_fail', 0)}")
    rows.append("checks: " + ", ".join(f"{k}={v}" for k, v in res["checks"].items()))
    rows += [f"gate {k:32} {'PASS' if v else 'FAIL'}" for k, v in res["gates"].items()]
    rows.append(f"flip p99 <= {TARGET_FLIP_P99_MS:g} ms target: "
                f"{'met' if res['targets']['flip_p99_within_target'] else 'NOT met'}")
    rows.append("RESULT: " + ("PASS" if res["pass"] else "FAIL"))
    return "\n".join(rows)


# ------------------------------------------------------------------ standalone (in the lab)
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--iterations", type=int, default=1000)
    ap.add_argument("--rate", type=int, default=0, help="workload ops/s (0 = flat out)")
    ap.add_argument("--exec-every", type=int, default=16, help="one exec per K ops; 0 = none")
    ap.add_argument("--rollback", choices=["auto", "version", "generation"], default="auto")
    ap.add_argument("--dwell-ms", type=float, default=0.0)
    ap.add_argument("--out", help="write the JSON result here")
    ap.add_argument("--workload", default="")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("rollback_stress: run as root inside a lab kernel (stress/run)", file=sys.stderr)
        return 2
    from stress.guest import attached

    rings: list[RingBuffer] = []
    with attached("stress") as g:
        try:
            maps = g.obj.maps()
            rings = [RingBuffer(maps[n].fd, maps[n].max_entries, n)
                     for n in (abi.MAP_DENY_EVENTS, abi.MAP_AUDIT_EVENTS)]
            cfg = StressConfig(args.iterations, args.rate, args.exec_every, args.rollback,
                               args.dwell_ms, workload=args.workload)
            res = run_stress(Env(maps, rings, g.cgroup, g.work), cfg)
        finally:
            for r in rings:
                r.close()
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    print(table(res))
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
