#!/usr/bin/env python3
"""Syscall overhead of the aegis LSM programs, measured INSIDE a lab guest (root).

    python -m bench.overhead --out FILE ...   (bench/run-overhead starts it in the guest,
                                               from the repository root)

Configurations, measured side by side in one boot, alternating (ABAB...) so slow drift
of the (shared, emulated) machine lands on every configuration alike:

    a      no programs attached (baseline)
    a2     the baseline again: its ratio to (a) is the noise floor of this run
    floor  the floor object (bench/floor.bpf.c) attached instead: programs on the same
           hooks that only `return ret`, i.e. what attaching any BPF LSM program costs;
           every other config is also stated in instructions and points above it
    b      programs attached, no valid policy slot
    c      N rules + S scopes, process outside every selected cgroup, unrelated file
    c_hit  same, but the file IS in the rules (rule hit, scope miss: the worst outside case)
    d      N rules, process inside a selected cgroup, unrelated file (allow path)
    e      N rules, inside, the file is denied (enforce: the failing call is measured)
    f      N rules, inside, audit mode: the call is allowed and an event is emitted,
           while a reader thread drains both rings

Operations (bench/opbench.c, static, pinned to one CPU): open+close, stat (no aegis hook:
a control), execve of a tiny static binary (vfork+execve+wait), mmap PROT_EXEC.

The object is loaded once (BpfObject(log_level=4): verifier stats), and the configs are
switched by attaching/detaching the links and by single writes of the active slot's
config (valid flag, mode): no reload between runs.  The policy is a CompiledPolicy built
in code over N real files on a tmpfs, staged with aegis_stream.slots.

Output: one JSON document (raw per-round percentiles, per-round ratios vs (a) and their
median) written to --out.  bench/report.py turns it into the docs table.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from aegis_stream.kernel import abi, libbpf, slots
from aegis_stream.kernel.counters import read_counters
from aegis_stream.kernel.devnum import resolve_inode
from aegis_stream.kernel.loader import BpfObject, default_object_path
from aegis_stream.kernel.ringbuf import RingBuffer
from aegis_stream.lab.mounts import ensure_guest_mounts, mount_tmpfs, umount
from aegis_stream.policy.compiler import CompiledPolicy, CompiledRule, CompiledScope
from bench.hostinfo import cpu_model

HERE = Path(__file__).resolve().parent
OPBENCH = HERE / ".build" / "opbench"
TINY = HERE / ".build" / "tiny"
FLOOR = HERE / ".build" / "floor.bpf.o"
ROOT = Path("/tmp/aegis-bench")
CG = Path("/sys/fs/cgroup/aegis-bench")
PIN_ROOT = "/sys/fs/bpf/aegis-bench"
EPERM = 1

CONFIGS = ("a", "a2", "floor", "b", "c", "c_hit", "d", "e", "f")
OPS = ("open", "stat", "mmap", "exec")
CONFIG_DOC = {
    "a": "no programs attached",
    "a2": "no programs attached (repeat: noise floor)",
    "floor": "floor object attached (same hooks, programs that only return ret)",
    "b": "attached, no valid policy",
    "c": "rules loaded, outside selected cgroups, unrelated file",
    "c_hit": "rules loaded, outside selected cgroups, file in the rules",
    "d": "rules loaded, inside a selected cgroup, unrelated file (allow)",
    "e": "rules loaded, inside, denied file (enforce, failing call)",
    "f": "rules loaded, inside, audit mode, events drained",
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- fixture
@dataclasses.dataclass
class Fixture:
    allowed: dict[str, Path]  # op -> target not in the rules
    ruled: dict[str, Path]  # op -> target in the rules
    cg_in: Path  # a container cgroup under a selected pod
    cg_out: Path  # a container cgroup under an unselected pod
    policy: CompiledPolicy
    cgroups: list[Path]


def make_fixture(n_rules: int, n_scopes: int) -> Fixture:
    os.makedirs(ROOT, exist_ok=True)
    mount_tmpfs(ROOT, "512m")
    files = ROOT / "rules"
    files.mkdir()
    page = b"\0" * 4096
    for name in ("allowed.dat", "denied.dat", "mmap_denied.dat"):
        (ROOT / name).write_bytes(page)
    for name in ("tiny", "tiny_denied"):
        shutil.copy2(TINY, ROOT / name)
    # kubernetes-like depth: /aegis-bench/burstable/pod-X/ctr (the task at level 4,
    # the selected scope is the pod, level 3)
    pods = CG / "burstable"
    cg_in = pods / "pod-sel" / "ctr"
    cg_out = pods / "pod-other" / "ctr"
    extra = [pods / f"pod-s{i}" for i in range(1, n_scopes)]
    made = [CG, pods, cg_in.parent, cg_in, cg_out.parent, cg_out, *extra]
    for d in made:
        d.mkdir(exist_ok=True)
    dev = resolve_inode(str(ROOT / "allowed.dat")).dev
    rules: list[CompiledRule] = []

    def rule(path: Path, actions: int) -> None:
        rules.append(CompiledRule(len(rules), f"r{len(rules)}", str(path), dev,
                                  os.stat(path).st_ino, actions, "tmpfs"))

    rule(ROOT / "denied.dat", abi.ACTION_OPEN | abi.ACTION_EXEC)
    rule(ROOT / "mmap_denied.dat", abi.ACTION_EXEC)  # open allowed, PROT_EXEC map denied
    rule(ROOT / "tiny_denied", abi.ACTION_EXEC)
    for i in range(n_rules - len(rules)):
        p = files / f"f{i:06d}"
        fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)
        rule(p, abi.ACTION_OPEN | abi.ACTION_EXEC)
    scopes = [CompiledScope(0, str(cg_in.parent), os.stat(cg_in.parent).st_ino)]
    scopes += [CompiledScope(i + 1, str(p), os.stat(p).st_ino) for i, p in enumerate(extra)]
    policy = CompiledPolicy("bench", 1, "enforce", "sha256:bench", rules, scopes)
    return Fixture(
        allowed={"open": ROOT / "allowed.dat", "stat": ROOT / "allowed.dat",
                 "mmap": ROOT / "allowed.dat", "exec": ROOT / "tiny"},
        ruled={"open": ROOT / "denied.dat", "stat": ROOT / "denied.dat",
               "mmap": ROOT / "mmap_denied.dat", "exec": ROOT / "tiny_denied"},
        cg_in=cg_in, cg_out=cg_out, policy=policy, cgroups=made,
    )


def memcg_setup() -> Path | None:
    """Put this process in its own memory cgroup, so that what loading the object charges
    to the kernel (maps, programs: memcg-accounted since 5.11) can be read back exactly."""
    try:
        Path("/sys/fs/cgroup/cgroup.subtree_control").write_text("+memory")
        CG.mkdir(exist_ok=True)
        (CG / "cgroup.subtree_control").write_text("+memory")
        loader = CG / "loader"
        loader.mkdir(exist_ok=True)
        (loader / "cgroup.procs").write_text(str(os.getpid()))
        return loader
    except OSError as exc:
        log(f"memcg accounting unavailable: {exc}")
        return None


def memcg_stat(cg: Path | None) -> dict[str, int]:
    if cg is None:
        return {}
    out = {"current": int((cg / "memory.current").read_text())}
    for line in (cg / "memory.stat").read_text().splitlines():
        k, _, v = line.partition(" ")
        if k in ("kernel", "percpu", "slab", "vmalloc", "anon"):
            out[k] = int(v)
    return out


def remove_cgroups(paths: list[Path]) -> None:
    for d in sorted(paths, key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass


# ----------------------------------------------------------------------------- kernel side
class Kernel:
    """The loaded object plus the knobs the configurations turn."""

    def __init__(self, path: Path | None = None, storm_window_s: float = 0.0) -> None:
        self.storm_window_s = storm_window_s
        remove_map_pins()  # a fresh policy: never an earlier run's pinned maps
        self.obj = BpfObject(path, pin_root_dir=PIN_ROOT, log_level=4)
        self.obj.open()
        self.obj.reuse_pinned_maps()  # pinned: a reload of the programs shares the maps
        self.obj.load()
        self.progs = self.obj  # the object whose programs attach (see attach())
        self.reloads: list[BpfObject] = []
        self.attached = False
        self.attached_once = False
        self.maps = self.obj.maps()
        self.pm = self.obj.policy_maps()
        self.slot = -1
        self.generation = 0

    def attach(self) -> None:
        if self.attached:
            return
        rep = self.progs.attach_all(pin=False)
        if not rep.enforcing_capable and self.attached_once and reattach_refused(rep):
            self.progs = self._reload()
            rep = self.progs.attach_all(pin=False)
        if not rep.enforcing_capable:
            raise SystemExit(f"cannot attach: {rep.summary()}")
        self.attached = self.attached_once = True

    def _reload(self) -> BpfObject:
        """The same programs loaded again over the pinned maps (policy, counters and rings
        stay): what a kernel that attaches a program once per load needs."""
        obj = BpfObject(self.obj.path, pin_root_dir=PIN_ROOT)
        obj.open()
        obj.reuse_pinned_maps()
        obj.load()
        self.reloads.append(obj)
        return obj

    def detach(self) -> None:
        if not self.attached:
            return
        detach_links(self.progs)
        self.attached = False

    def stage(self, cp: CompiledPolicy) -> float:
        t0 = time.monotonic()
        staged = slots.swap(self.pm, cp, 1, int(abi.Mode.ENFORCE))
        self.slot, self.generation = staged.slot, staged.generation
        if self.storm_window_s:  # deny storms (bpf/storm.bpf.h): (e)/(f) repeat one key
            slots.set_storm_window(self.pm, int(self.storm_window_s * 1e9))
        return time.monotonic() - t0

    def set_slot(self, *, valid: bool, mode: int = int(abi.Mode.ENFORCE)) -> None:
        v = self.pm.config.lookup(slots.slot_key(self.slot))
        assert v is not None
        gen, _, flags, rc, sc = abi.SLOT_CONFIG.unpack(v)
        flags = (flags | abi.SLOT_VALID) if valid else (flags & ~abi.SLOT_VALID)
        self.pm.config.update(slots.slot_key(self.slot), abi.SLOT_CONFIG.pack(gen, mode, flags, rc, sc))

    def memlock(self) -> dict[str, dict]:
        out = {}
        for name, m in self.maps.items():
            info: dict[str, int | str] = {"max_entries": m.max_entries, "key_size": m.key_size,
                                          "value_size": m.value_size, "map_type": m.map_type}
            with open(f"/proc/self/fdinfo/{m.fd}") as fh:
                for line in fh:
                    k, _, v = line.partition(":")
                    if k in ("memlock", "map_flags"):
                        info[k] = int(v.strip(), 0)
            out[name] = info
        return out

    def prog_stats(self) -> dict[str, dict[str, int]]:
        lib = libbpf.lib()
        out = {}
        for name in abi.HOOK_PROGRAMS.values():
            prog = lib.bpf_object__find_program_by_name(self.progs._obj, name.encode())
            fd = lib.bpf_program__fd(prog)
            d: dict[str, int] = {}
            with open(f"/proc/self/fdinfo/{fd}") as fh:
                for line in fh:
                    k, _, v = line.partition(":")
                    if k in ("run_time_ns", "run_cnt", "verified_insns", "recursion_misses"):
                        d[k] = int(v.strip())
            out[name] = d
        return out

    def counters(self) -> dict:
        return read_counters(self.maps)["hooks"]

    def close(self) -> None:
        self.detach()
        for obj in self.reloads:
            obj.close(keep_pins=True)
        self.obj.close(keep_pins=False)
        remove_map_pins()


def remove_map_pins() -> None:
    for pin in Path(PIN_ROOT, "maps").glob("*"):
        pin.unlink()


def reattach_refused(rep) -> bool:
    """Every hook refused with ENOENT: Linux before 5.13 attaches a tracing or LSM program
    once per load; after its first link is gone the program has no saved target and
    bpf_tracing_prog_attach returns -ENOENT (kernel/bpf/syscall.c, 5.10.262; re-attach came
    with "bpf: Allow trampoline re-attach for tracing and lsm programs")."""
    failed = [p for p in rep.failed if p.name in abi.HOOK_PROGRAMS.values()]
    return bool(failed) and all(p.errno == errno.ENOENT for p in failed)


def detach_links(obj: BpfObject) -> None:
    lib = libbpf.lib()
    for link in obj._links.values():  # the loader has no detach; links are ours
        lib.bpf_link__destroy(link)
    obj._links.clear()
    for st in obj.report.programs.values():
        if st.phase in ("attached", "failed") and st.errno in (0, errno.ENOENT):
            st.phase, st.errno, st.error = "loaded", 0, ""


def lsm_sections(obj: int) -> dict[str, str]:
    """section -> program name of every LSM program in an opened libbpf object."""
    lib = libbpf.lib()
    out: dict[str, str] = {}
    prog = lib.bpf_object__next_program(obj, None)
    while prog:
        sec = lib.bpf_program__section_name(prog).decode()
        if sec.startswith("lsm/"):
            out[sec] = lib.bpf_program__name(prog).decode()
        prog = lib.bpf_object__next_program(obj, prog)
    return out


def floor_plan(main: dict[str, str], floor: dict[str, str]) -> list[str]:
    """The floor programs to load: exactly one per hook of the measured object.  A hook the
    floor object lacks would make "above the floor" silently cover a different hook set,
    so it is refused."""
    missing = sorted(set(main) - set(floor))
    if missing:
        raise SystemExit(f"floor object lacks {', '.join(missing)} (hooked by the measured "
                         "object): add a `return ret` program for it to bench/floor.bpf.c")
    return [floor[sec] for sec in sorted(main)]


class Floor:
    """bench/floor.bpf.c loaded with the programs for the measured object's hooks; attached
    only in config "floor" (never together with the real programs)."""

    def __init__(self, path: Path, main_sections: dict[str, str]) -> None:
        lib = libbpf.lib()
        self.path = path
        self.obj = lib.bpf_object__open_file(str(path).encode(), None)
        if not self.obj:
            raise SystemExit(f"cannot open {path}: errno {libbpf.errno_of()}")
        self.sections = lsm_sections(self.obj)
        self.programs = floor_plan(main_sections, self.sections)
        self._load()
        self.links: list[int] = []
        self.attached_once = False

    def _load(self) -> None:
        lib = libbpf.lib()
        for name in self.sections.values():
            if name not in self.programs:
                prog = lib.bpf_object__find_program_by_name(self.obj, name.encode())
                lib.bpf_program__set_autoload(prog, False)
        if lib.bpf_object__load(self.obj) < 0:
            raise SystemExit(f"cannot load {self.path}: {libbpf.log_tail(20)}")

    def attach(self) -> None:
        if self.links:
            return
        lib = libbpf.lib()
        for name in self.programs:
            prog = lib.bpf_object__find_program_by_name(self.obj, name.encode())
            link = lib.bpf_program__attach(prog)
            if not link and libbpf.errno_of() == errno.ENOENT and self.attached_once and not self.links:
                self._reload()  # attached once per load before 5.13 (reattach_refused)
                return self.attach()
            if not link:
                self.detach()
                raise SystemExit(f"cannot attach floor program {name}: errno {libbpf.errno_of()}")
            self.links.append(link)
        self.attached_once = True

    def _reload(self) -> None:
        lib = libbpf.lib()
        lib.bpf_object__close(self.obj)
        self.obj = lib.bpf_object__open_file(str(self.path).encode(), None)
        self._load()
        self.attached_once = False

    def detach(self) -> None:
        lib = libbpf.lib()
        for link in self.links:
            lib.bpf_link__destroy(link)
        self.links.clear()

    def close(self) -> None:
        self.detach()
        libbpf.lib().bpf_object__close(self.obj)


class Drainer(threading.Thread):
    """Drain both rings while the benchmark runs (the agent's role, minus normalising)."""

    def __init__(self, maps) -> None:
        super().__init__(daemon=True)
        self.rings = [RingBuffer(maps[n].fd, maps[n].max_entries, n)
                      for n in (abi.MAP_DENY_EVENTS, abi.MAP_AUDIT_EVENTS)]
        self.stop = threading.Event()
        self.records = 0

    def run(self) -> None:
        poller = select.poll()
        for r in self.rings:
            poller.register(r.fd, select.POLLIN)
        while not self.stop.is_set():
            got = 0
            for r in self.rings:
                got += len(r.drain(1 << 14))
            self.records += got
            if not got:
                poller.poll(50)

    def close(self) -> None:
        self.stop.set()
        self.join(5)
        for r in self.rings:
            r.close()


# ----------------------------------------------------------------------------- runs
def run_op(op: str, path: Path, iters: int, *, batch: int, cgroup: Path, cpu: int,
           expect: int = 0) -> dict:
    cmd = [str(OPBENCH), op, str(path), str(iters), "--batch", str(batch), "--cpu", str(cpu),
           "--cgroup", str(cgroup)]
    if expect:
        cmd += ["--expect-errno", str(expect)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"opbench {op} {path} failed ({p.returncode}): {p.stderr.strip()}")
    res = json.loads(lines[-1])
    if p.returncode != 0 or res["unexpected"]:
        raise SystemExit(f"opbench {op} {path}: {res['unexpected']} unexpected outcomes "
                         f"(errno {res['errno']}, expected {expect or 'success'}): the config is wrong")
    return res


def apply_config(k: Kernel, fl: Floor | None, fx: Fixture, cfg: str) -> tuple[Path, dict[str, Path], int]:
    """Turn the knobs for ``cfg``; return (cgroup, targets, expected errno)."""
    if cfg in ("a", "a2", "floor"):
        k.detach()
        if cfg == "floor":
            assert fl is not None
            fl.attach()
        elif fl is not None:
            fl.detach()
        # the floor runs the in-scope task and file of (d): its programs never look at either
        return fx.cg_in, fx.allowed, 0
    if fl is not None:
        fl.detach()
    k.attach()
    if cfg == "b":
        k.set_slot(valid=False)
        return fx.cg_in, fx.allowed, 0
    if cfg == "f":
        k.set_slot(valid=True, mode=int(abi.Mode.AUDIT))
        return fx.cg_in, fx.ruled, 0
    k.set_slot(valid=True, mode=int(abi.Mode.ENFORCE))
    return {
        "c": (fx.cg_out, fx.allowed, 0),
        "c_hit": (fx.cg_out, fx.ruled, 0),
        "d": (fx.cg_in, fx.allowed, 0),
        "e": (fx.cg_in, fx.ruled, EPERM),
    }[cfg]


def pct_keys() -> tuple[str, ...]:
    return ("p50", "p90", "p95", "p99", "p999", "mean")


def above_floor(runs: list[dict], floor: list[dict], base: list[dict]) -> dict[str, dict]:
    """Per percentile: instructions (icount) above the floor config of the same round, and
    the same in points of (a): (cfg - floor) / a * 100; median, min and max over rounds."""
    out: dict[str, dict] = {}
    for k in ("p50", "p95", "p99", "mean"):
        d = [(r[k] - f[k], (r[k] - f[k]) / b[k] * 100)
             for r, f, b in zip(runs, floor, base, strict=True) if b[k] > 0]
        if not d:
            continue
        ins, pts = [x[0] for x in d], [x[1] for x in d]
        out[k] = {"insns": statistics.median(ins), "insns_min": min(ins), "insns_max": max(ins),
                  "points": statistics.median(pts), "points_min": min(pts), "points_max": max(pts)}
    return out


def summarise(raw: dict[str, dict[str, list[dict]]], null: list[dict]) -> dict:
    """Per op and config: median over rounds of each percentile, and the per-round ratio to
    (a) of the same round (paired), its median, min and max."""
    out: dict[str, dict] = {}
    timer = statistics.median(r["p50"] for r in null) if null else 0.0
    for op, by_cfg in raw.items():
        base = by_cfg.get("a", [])
        floor = by_cfg.get("floor", [])
        out[op] = {}
        for cfg, runs in by_cfg.items():
            s: dict[str, object] = {k: statistics.median(r[k] for r in runs) for k in pct_keys()}
            ratios: dict[str, dict[str, float]] = {}
            for k in ("p50", "p95", "p99", "mean"):
                per = [r[k] / b[k] for r, b in zip(runs, base, strict=True) if b[k] > 0]
                if per:
                    ratios[k] = {"median": statistics.median(per), "min": min(per), "max": max(per)}
            # p50 with the timer's own cost taken out of both sides (matters only for batch 1)
            net = [(r["p50"] - timer) / (b["p50"] - timer)
                   for r, b in zip(runs, base, strict=True) if b["p50"] > timer]
            if net:
                ratios["p50_net_of_timer"] = {"median": statistics.median(net), "min": min(net),
                                              "max": max(net)}
            s["ratio_vs_a"] = ratios
            if floor and cfg not in ("a", "a2", "floor"):
                s["above_floor"] = above_floor(runs, floor, base)
            s["rounds"] = len(runs)
            out[op][cfg] = s
    return out


def bpf_run_stats(k: Kernel, fl: Floor | None, fx: Fixture, iters: int, cpu: int,
                  configs: list[str]) -> dict:
    """Average in-program time per invocation (kernel.bpf_stats_enabled), per config.
    Separate from the timed rounds: the stats themselves cost two clock reads a run."""
    path = Path("/proc/sys/kernel/bpf_stats_enabled")
    try:
        path.write_text("1")
    except OSError as exc:
        return {"error": str(exc)}
    out: dict[str, dict] = {}
    try:
        for cfg in configs:
            if cfg in ("a", "a2", "floor"):
                continue
            cg, targets, expect = apply_config(k, fl, fx, cfg)
            out[cfg] = {}
            for op, n in (("open", iters), ("mmap", iters), ("exec", max(50, iters // 100))):
                before = k.prog_stats()
                run_op(op, targets[op], n, batch=1, cgroup=cg, cpu=cpu,
                       expect=expect if op != "stat" else 0)
                after = k.prog_stats()
                progs = {}
                for name in after:
                    cnt = after[name]["run_cnt"] - before[name]["run_cnt"]
                    ns = after[name]["run_time_ns"] - before[name]["run_time_ns"]
                    if cnt:
                        progs[name] = {"runs": cnt, "ns_per_run": round(ns / cnt, 1)}
                out[cfg][op] = progs
    finally:
        path.write_text("0")
    return out


def host_facts(obj: Path) -> dict:
    cs = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
    return {
        "kernel": platform.release(),
        "series": os.environ.get("AEGIS_LAB_KERNEL", ""),
        "cpu_model": cpu_model(),
        "nproc": os.cpu_count(),
        "clocksource": cs.read_text().strip() if cs.exists() else "",
        "virtualisation": "QEMU TCG (no KVM)" if os.environ.get("AEGIS_LAB") == "1" else "",
        "object": str(obj.relative_to(HERE.parent) if obj.is_relative_to(HERE.parent) else obj),
        "object_sha256": hashlib.sha256(obj.read_bytes()).hexdigest(),
        "filesystem": "tmpfs",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=200_000, help="open/stat/mmap iterations per run")
    ap.add_argument("--exec-iters", type=int, default=2_000, help="execve iterations per run")
    ap.add_argument("--rounds", type=int, default=3, help="ABAB rounds (each runs every config)")
    ap.add_argument("--batch", type=int, default=1, help="operations per timed sample")
    ap.add_argument("--rules", type=int, default=10_000)
    ap.add_argument("--scopes", type=int, default=8)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--cpu", type=int, default=1, help="CPU the benchmark loop is pinned to")
    ap.add_argument("--bpf-stats-iters", type=int, default=20_000,
                    help="iterations per config for the in-program time pass (0: skip)")
    ap.add_argument("--timing", choices=("icount", "wall"), default="wall",
                    help="how the guest was booted (recorded in the output; run-overhead sets it)")
    ap.add_argument("--object", default=None, help="BPF object (default: the shipped one)")
    ap.add_argument("--tag", default="", help="names a variant object in the output")
    ap.add_argument("--storm-window-s", type=float, default=0.0,
                    help="deny-storm window (0: off): (e)/(f) then measure the aggregated path")
    ap.add_argument("--floor", default=str(FLOOR), help="the floor object (make -C bench)")
    ap.add_argument("--out", required=True, help="JSON output file")
    args = ap.parse_args()
    configs = args.configs.split(",")
    ops = args.ops.split(",")
    if os.geteuid() != 0:
        print("bench.overhead runs as root inside a lab guest (bench/run-overhead)", file=sys.stderr)
        return 2
    if not OPBENCH.exists() or not TINY.exists() or ("floor" in configs and not Path(args.floor).exists()):
        print(f"{OPBENCH} missing: run `make -C bench`", file=sys.stderr)
        return 2
    ncpu = os.cpu_count() or 1
    cpu = args.cpu if args.cpu < ncpu else ncpu - 1
    # keep this driver (and the drainer thread) off the benchmark's CPU
    others = {c for c in range(ncpu) if c != cpu} or {cpu}
    os.sched_setaffinity(0, others)
    ensure_guest_mounts()
    t_start = time.monotonic()
    log(f"fixture: {args.rules} rules, {args.scopes} scopes on tmpfs")
    loader_cg = memcg_setup()
    fx = make_fixture(args.rules, args.scopes)
    mc0 = memcg_stat(loader_cg)
    obj_path = Path(args.object).resolve() if args.object else default_object_path()
    k = Kernel(obj_path, args.storm_window_s)
    mc1 = memcg_stat(loader_cg)
    vstats = {n: dataclasses.asdict(s) for n, s in k.obj.verifier_stats.items()}
    assert k.obj._obj is not None
    # the hooks the loader attaches (a program it does not know is not measured either)
    main_sections = {sec: n for sec, n in lsm_sections(k.obj._obj).items()
                     if n in k.obj.report.programs}
    fl = Floor(Path(args.floor), main_sections) if "floor" in configs else None
    if fl is not None:
        log(f"floor {args.floor}: {', '.join(fl.programs)}")
    mem_empty = k.memlock()
    k.attach()
    stage_s = k.stage(fx.policy)
    log(f"staged {len(fx.policy.rules)} rules in {stage_s:.1f}s; verifier: "
        + ", ".join(f"{n}={s['insns_processed']}" for n, s in vstats.items()))
    mem_loaded = k.memlock()
    mc2 = memcg_stat(loader_cg)
    memcg = {"before_load": mc0, "after_load": mc1, "after_stage": mc2,
             "note": "memory.stat of the loader's cgroup: 'kernel' grows by what the maps and "
                     "programs charge at load; staging adds Python heap (anon) and any map growth"}
    drainer = Drainer(k.maps)
    drainer.start()
    raw: dict[str, dict[str, list[dict]]] = {op: {c: [] for c in configs} for op in ops}
    null: list[dict] = []
    events: dict[str, list[dict]] = {}
    try:
        for rnd in range(args.rounds):
            order = configs[rnd % len(configs):] + configs[: rnd % len(configs)]
            null.append(run_op("null", fx.allowed["open"], args.iters, batch=args.batch,
                               cgroup=fx.cg_in, cpu=cpu))
            for op in ops:
                n = args.exec_iters if op == "exec" else args.iters
                for cfg in order:
                    cg, targets, expect = apply_config(k, fl, fx, cfg)
                    before_c = k.counters() if k.attached else None
                    before_r = drainer.records
                    res = run_op(op, targets[op], n, batch=args.batch, cgroup=cg, cpu=cpu,
                                 expect=expect if op != "stat" else 0)
                    if before_c is not None and cfg in ("e", "f"):
                        time.sleep(0.2)  # let the drainer catch up before counting
                        after_c = k.counters()
                        res["events"] = {
                            "drained": drainer.records - before_r,
                            "decided": sum(after_c[h]["denied"] + after_c[h]["audited"]
                                           - before_c[h]["denied"] - before_c[h]["audited"]
                                           for h in after_c),
                            "ringbuf_fail": sum(after_c[h]["ringbuf_fail"] - before_c[h]["ringbuf_fail"]
                                                for h in after_c),
                        }
                        events.setdefault(f"{op}/{cfg}", []).append(res["events"])
                    raw[op][cfg].append(res)
                    log(f"round {rnd + 1}/{args.rounds} {op:<4} {cfg:<5} p50={res['p50']:.0f}ns "
                        f"p99={res['p99']:.0f}ns")
        prog_runtime = (bpf_run_stats(k, fl, fx, args.bpf_stats_iters, cpu, configs)
                        if args.bpf_stats_iters else {})
    finally:
        drainer.close()
        if fl is not None:
            fl.close()
        k.close()
        umount(ROOT)
        if loader_cg is not None:
            Path("/sys/fs/cgroup/cgroup.procs").write_text(str(os.getpid()))
            fx.cgroups.append(loader_cg)
        remove_cgroups(fx.cgroups)
    doc = {
        "schema": "aegis.bench.overhead.v1",
        "meta": {
            **host_facts(obj_path), "tag": args.tag, "storm_window_s": args.storm_window_s,
            "iters": args.iters, "exec_iters": args.exec_iters, "rounds": args.rounds,
            "batch": args.batch, "timing": args.timing,
            "rules": len(fx.policy.rules), "scopes": len(fx.policy.scopes),
            "cgroup_depth": len(fx.cg_in.relative_to("/sys/fs/cgroup").parts),
            "scope_depth": len(fx.cg_in.parent.relative_to("/sys/fs/cgroup").parts),
            "bench_cpu": cpu, "configs": {c: CONFIG_DOC[c] for c in configs}, "ops": ops,
            "stage_seconds": round(stage_s, 2), "seconds": round(time.monotonic() - t_start, 1),
            "timer_p50_ns": statistics.median(r["p50"] for r in null) if null else None,
        },
        "verifier": vstats,
        "hooks": main_sections,
        "floor": {"object": str(fl.path), "programs": fl.programs,
                  "object_sha256": hashlib.sha256(fl.path.read_bytes()).hexdigest()} if fl else None,
        "maps_memlock_empty": mem_empty,
        "maps_memlock_loaded": mem_loaded,
        "memcg": memcg,
        "events": events,
        "prog_runtime": prog_runtime,
        "summary": summarise(raw, null),
        "raw": raw,
        "null": null,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    log(f"wrote {args.out} in {doc['meta']['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
