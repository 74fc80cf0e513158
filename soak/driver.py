#!/usr/bin/env python3
"""Soak driver: runs INSIDE a lab guest (root) and drives the real agent as a black box.

    python -m soak.driver --duration 600 --out DIR [--swap-every 5] [--restart-every 90] ...

(from the repository root: soak/run starts it that way in the guest, with cwd = the root)

What it does (soak/run boots the guest and calls it; docs/PERFORMANCE.md "Soak"):

* starts ``aegis run --policy <signed> --events FILE --status-file FILE --metrics-addr``
  with its own pin root and state dir;
* workload (soak/loadgen.c, static): an open storm on protected files and an exec storm on
  a protected binary from the selected cgroup (deny events), allowed opens/execs from the
  selected cgroup and protected opens from an unselected cgroup (no events: hook cost
  only), and a canary that opens a protected file every second from the selected cgroup;
* policy swaps every ``--swap-every`` s through ``aegis policy apply`` (signed envelopes,
  increasing versions, the rule set alternating so every swap changes the kernel's slot);
* audit floods every ``--flood-every`` s: the next swap goes to audit mode, a flat-out
  open loop on an audited file overruns the 4 MiB telemetry ring for
  ``--flood-duration`` s, the harness waits for the rings to drain and swaps back to
  enforce.  (Mode is per generation, so during a flood window nothing is enforced: the
  canary must then be *allowed*; attempts made while an enforce<->audit apply is in
  progress are reported as transitions and excluded.)
* agent restarts every ``--restart-every`` s (SIGTERM; ``--kill-every N``: every Nth with
  SIGKILL), the next agent reusing the pinned maps without ``--policy``.

Measured once a second: kernel decision / ringbuf_fail counters and ring positions (read
from the pinned maps, what ``aegis stats --json`` reads; the CLI itself is run every 60 s
as a cross-check), the agent's metrics (Prometheus scrape), the events the agent
delivered (the events file, tailed; rotated files are read and deleted), agent RSS and
CPU (/proc/PID/status, stat).  Writes DIR/soak.json: the time series, the accounting per
event class, the gates.  soak/report.py renders markdown and plots from it.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import select
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from prometheus_client.parser import text_string_to_metric_families

from aegis_stream.errors import StateError
from aegis_stream.kernel import abi, counters, libbpf, slots
from aegis_stream.kernel.events import RECORD_STRIDE
from aegis_stream.kernel.maps import FdMap, PolicyMaps
from aegis_stream.kernel.ringbuf import PAGE
from aegis_stream.lab.mounts import ensure_guest_mounts, mount_tmpfs, umount
from aegis_stream.pipeline.config import PipelineConfig
from bench.hostinfo import cpu_model
from soak.calib import calibrate

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

LOADGEN = HERE / ".build" / "loadgen"
TINY = HERE / ".build" / "tiny"
WORK = Path("/tmp/aegis-soak")
CG = Path("/sys/fs/cgroup/aegis-soak")
PIN_ROOT = "/sys/fs/bpf/aegis-soak"
AEGIS = [sys.executable, "-m", "aegis_stream.cli"]
EPERM = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- kernel view
class RingPositions:
    """Producer/consumer positions of a pinned ring, mapped read-only."""

    def __init__(self, fd: int) -> None:
        self._cons = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ, offset=0)
        self._prod = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ, offset=PAGE)

    def read(self) -> tuple[int, int]:
        return struct.unpack_from("<Q", self._prod, 0)[0], struct.unpack_from("<Q", self._cons, 0)[0]


class KernelView:
    def __init__(self, root: str) -> None:
        self.maps = {n: FdMap(n, libbpf.obj_get(f"{root}/maps/{n}"), owns_fd=True) for n in abi.ALL_MAPS}
        self.ncpu = libbpf.num_possible_cpus()
        self.rings = {"deny": RingPositions(self.maps[abi.MAP_DENY_EVENTS].fd),
                      "audit": RingPositions(self.maps[abi.MAP_AUDIT_EVENTS].fd)}
        self.policy_maps = PolicyMaps(rules=self.maps[abi.MAP_RULES], scopes=self.maps[abi.MAP_SCOPES],
                                      config=self.maps[abi.MAP_CONFIG])

    def counters(self) -> dict[str, int]:
        """Kernel counters summed over hooks and CPUs (and per hook for decisions), from
        the product's reader (what ``aegis stats --json`` reports per hook)."""
        out: dict[str, int] = {}
        for hook, vals in counters.read_hook_counters(self.maps, self.ncpu).items():
            for name, v in vals.items():
                out[name] = out.get(name, 0) + v
                if name in ("denied", "audited", "ringbuf_fail"):
                    out[f"{name}.{hook}"] = v
        return out

    def active(self) -> tuple[int, str]:
        """(generation, mode) of the active slot; mode "none" when no valid generation."""
        try:
            sc = slots.read_state(self.policy_maps).active
        except StateError:  # the config array always has its entries; as "no policy" if not
            return 0, "none"
        if not sc.valid:
            return sc.generation, "none"
        return sc.generation, "enforce" if sc.mode == abi.Mode.ENFORCE else "audit"

    def rule_counter_entries(self) -> int:
        return len(self.maps[abi.MAP_RULE_COUNTERS].keys())

    def rings_pos(self) -> dict[str, tuple[int, int]]:
        return {k: r.read() for k, r in self.rings.items()}

    def memlock(self) -> dict[str, int]:
        out = {}
        for n, m in self.maps.items():
            with open(f"/proc/self/fdinfo/{m.fd}") as fh:
                for line in fh:
                    if line.startswith("memlock:"):
                        out[n] = int(line.split()[1])
        return out


# --------------------------------------------------------------------------- agent
_SUMMARY_CLASS = re.compile(r"(deny|audit): delivered=(\d+) kernel_dropped=(\d+)(?: dropped ([^;]*))?")


def parse_prom(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """{sample name: [(labels, value)]} of a Prometheus text exposition (prometheus_client's
    parser; ValueError on a malformed scrape)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def metric_sum(prom: dict, name: str, **want: str) -> float:
    return sum(v for lab, v in prom.get(name, []) if all(lab.get(k) == x for k, x in want.items()))


def agent_drops(prom: dict) -> dict[str, int]:
    """{"class/stage/reason": n} from aegis_events_dropped_total (userspace + kernel)."""
    out: dict[str, int] = {}
    for lab, v in prom.get("aegis_events_dropped_total", []):
        out[f"{lab.get('class')}/{lab.get('stage')}/{lab.get('reason')}"] = int(v)
    return out


@dataclass
class Incarnation:
    n: int
    proc: subprocess.Popen
    started: float
    stderr_path: Path
    stop_signal: str = ""
    stop_sent: float = 0.0
    exited: float = 0.0
    returncode: int | None = None
    ready: float = 0.0  # status file written with a state
    last_metrics: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    # /proc/PID/smaps breakdowns: at the highest RSS seen, and the latest periodic one
    smaps_peak: dict = field(default_factory=dict)
    smaps_last: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"n": self.n, "pid": self.proc.pid, "started": round(self.started, 2),
                "ready": round(self.ready, 2), "stop_signal": self.stop_signal,
                "stop_sent": round(self.stop_sent, 2), "exited": round(self.exited, 2),
                "returncode": self.returncode, "final": self.final_accounting(),
                "summary_line": self.summary.get("line", ""),
                "smaps_peak": self.smaps_peak, "smaps_last": self.smaps_last}

    def final_accounting(self) -> dict:
        """Per class: delivered and drops (stage/reason) as the agent reported them: its
        stop summary when it printed one, else its last metrics scrape."""
        if self.summary.get("classes"):
            return {"source": "stop-summary", **self.summary["classes"]}
        prom = self.last_metrics
        if not prom:
            return {"source": "none"}
        out: dict = {"source": "last-scrape"}
        for klass in ("deny", "audit"):
            out[klass] = {
                "delivered": int(metric_sum(prom, "aegis_events_delivered_total", **{"class": klass})),
                "dropped": {k.split("/", 1)[1]: v for k, v in agent_drops(prom).items()
                            if k.startswith(klass + "/")},
                "in_flight": int(metric_sum(prom, "aegis_events_in_flight", **{"class": klass})),
            }
        return out


def parse_stop_summary(text: str) -> dict:
    line = next((ln for ln in reversed(text.splitlines()) if "stopped;" in ln), "")
    classes: dict[str, dict] = {}
    for m in _SUMMARY_CLASS.finditer(line):
        drops = {}
        for part in (m.group(4) or "").split(","):
            k, _, v = part.strip().partition("=")
            if k and v.isdigit():
                drops[k] = int(v)
        classes[m.group(1)] = {"delivered": int(m.group(2)), "kernel_dropped": int(m.group(3)),
                               "dropped": drops}
    return {"line": line.strip(), "classes": classes}


def smaps_breakdown(pid: int, top: int = 12) -> dict:
    """Where a process's RSS is, from /proc/PID/smaps: kB of Rss (and of Anonymous) per
    mapping kind: ``[heap]``, ``[anon]`` (unnamed: Python's arenas and large allocations,
    numpy buffers), ``[stack]``, the BPF ring buffers (``anon_inode:bpf-ringbuf``...),
    and file-backed mappings by file name (code and data of the interpreter and the
    extension modules).  The largest ``top`` kinds, the rest summed as ``other``."""
    by: dict[str, list[int]] = {}
    name = "[anon]"
    try:
        with open(f"/proc/{pid}/smaps") as fh:
            for line in fh:
                head = line.split(None, 5)
                if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
                    path = head[5].strip() if len(head) > 5 else ""
                    name = path.rsplit("/", 1)[-1] if path.startswith("/") else (path or "[anon]")
                    by.setdefault(name, [0, 0])
                elif line.startswith("Rss:"):
                    by[name][0] += int(line.split()[1])
                elif line.startswith("Anonymous:"):
                    by[name][1] += int(line.split()[1])
    except (OSError, ValueError, IndexError, KeyError):
        return {}
    rows = sorted(by.items(), key=lambda kv: -kv[1][0])
    out = {k: {"rss_kb": v[0], "anon_kb": v[1]} for k, v in rows[:top] if v[0]}
    rest = rows[top:]
    if rest:
        out["other"] = {"rss_kb": sum(v[0] for _, v in rest), "anon_kb": sum(v[1] for _, v in rest)}
    total = sum(v[0] for _, v in rows)
    file_kb = sum(v[0] - v[1] for _, v in rows)
    return {"rss_kb": total, "anon_kb": total - file_kb, "file_kb": file_kb, "by": out}


def children_rss(pid: int) -> int:
    """RSS bytes of the process's descendants (e.g. the pipeline's audit worker processes,
    when enabled): they belong to the agent's memory budget too."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as fh:
                kids = [int(x) for x in fh.read().split()]
        except (OSError, ValueError):
            continue
        for k in kids:
            u = proc_usage(k)
            if u:
                total += u[0]
            todo.append(k)
    return total


def proc_usage(pid: int) -> tuple[int, float] | None:
    """(RSS bytes, CPU seconds) of a process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        cpu = (int(f[11]) + int(f[12])) / CLK_TCK
        rss = 0
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        return rss, cpu
    except (OSError, IndexError, ValueError):
        return None


# --------------------------------------------------------------------------- events tail
class EventsTail:
    """Tail the agent's JSON-lines file across rotations (path -> path.1); rotated files
    are read to the end and deleted (the guest's tmpfs is small)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = None
        self.ino = 0
        self.buf = b""
        self.counts = {"deny": 0, "audit": 0, "deny_duplicates": 0, "other_records": 0,
                       "bad_lines": 0}
        self.deny_ids: set[str] = set()
        self.storm_ids: set[str] = set()
        self.storm_suppressed = {"deny": 0, "audit": 0}  # from aegis.storm.v1 summaries
        self.latency_ms: list[tuple[float, float]] = []  # (t, ms) samples
        self.rotations = 0
        self.unread_files = 0  # rotated past the sink's backups before they were read

    def _open(self) -> None:
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            return
        self.fh = fh
        self.ino = os.fstat(fh.fileno()).st_ino

    def poll(self, t: float) -> None:
        if self.fh is None:
            self._open()
            if self.fh is None:
                return
        self._consume(self.fh.read(), t)
        try:
            st = os.stat(self.path)
            rotated = st.st_ino != self.ino
        except FileNotFoundError:
            rotated = True
        if rotated:
            self._consume(self.fh.read(), t)
            self.fh.close()
            self.fh = None
            self.rotations += 1
            # the sink renames path -> path.1 -> path.2 ...: the one we had open is now
            # path.K; path.K-1 .. path.1 were rotated away before we ever opened them
            # (several rotations between two polls): read those too, oldest first
            backups: list[tuple[int, Path]] = []
            for p in self.path.parent.glob(self.path.name + ".*"):
                suffix = p.name[len(self.path.name) + 1:]
                if suffix.isdigit():
                    backups.append((int(suffix), p))
            mine = None
            for n, p in backups:
                try:
                    if os.stat(p).st_ino == self.ino:
                        mine = n
                        p.unlink()
                except FileNotFoundError:
                    pass
            if mine is None and self.ino:
                # ours went past the sink's last backup and was deleted: the files
                # between it and the oldest backup left are gone unread (counted)
                self.unread_files += 1
            for n, p in sorted(backups, reverse=True):
                if mine is not None and n >= mine:
                    continue  # ours, or older than ours (read and deleted before)
                try:
                    data = p.read_bytes()
                    p.unlink()
                except FileNotFoundError:
                    continue
                self._consume(data, t)
                self.rotations += 1
            self._open()
            if self.fh is not None:
                self._consume(self.fh.read(), t)

    def _storm(self, line: bytes) -> None:
        """A deny-storm summary: its ``suppressed`` decisions were made by the kernel and
        counted there instead of an event each (once per summary id: a summary repeated
        after an agent crash has the same id)."""
        try:
            doc = json.loads(line)
        except ValueError:
            self.counts["bad_lines"] += 1
            return
        if doc.get("event_id") in self.storm_ids:
            return
        self.storm_ids.add(doc.get("event_id"))
        klass = "deny" if doc.get("decision") == "deny" else "audit"
        self.storm_suppressed[klass] += int(doc.get("suppressed", 0))

    def _consume(self, data: bytes, t: float) -> None:
        if not data:
            return
        data = self.buf + data
        lines = data.split(b"\n")
        self.buf = lines.pop()
        now_ns = time.monotonic_ns()
        for i, line in enumerate(lines):
            if line.startswith(b'{"schema":"aegis.storm.v1"'):
                self._storm(line)
                continue
            if not line.startswith(b'{"schema":"aegis.decision.v1"'):
                if line.startswith(b'{"schema"'):
                    self.counts["other_records"] += 1
                elif line.strip():
                    self.counts["bad_lines"] += 1
                continue
            if b'"decision":"deny"' in line:
                try:
                    doc = json.loads(line)
                except ValueError:
                    self.counts["bad_lines"] += 1
                    continue
                eid = doc.get("event_id", "")
                if eid in self.deny_ids:
                    self.counts["deny_duplicates"] += 1
                    continue
                self.deny_ids.add(eid)
                self.counts["deny"] += 1
                if len(self.deny_ids) % 20 == 0:
                    self.latency_ms.append((t, (now_ns - int(doc.get("ktime_ns", now_ns))) / 1e6))
            else:
                self.counts["audit"] += 1
                if i % 500 == 0:
                    m = re.search(rb'"ktime_ns":(\d+)', line)
                    if m:
                        self.latency_ms.append((t, (now_ns - int(m.group(1))) / 1e6))


# --------------------------------------------------------------------------- the soak
@dataclass
class Apply:
    version: int
    mode: str
    variant: int
    started: float
    old_mode: str
    kind: str  # "cli": an `aegis policy apply` process; "library": soak/applier.py
    proc: subprocess.Popen | None = None
    ended: float = 0.0
    rc: int | None = None
    output: str = ""


class Applier:
    """soak/applier.py: Lifecycle.apply in a long-lived process (one Python start)."""

    def __init__(self, env: dict) -> None:
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-m", "soak.applier"], env=self.env,
                                         cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True, bufsize=1)
            self.starts += 1

    def submit(self, path: Path) -> None:
        self.start()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"{PIN_ROOT}\t{WORK / 'state'}\t{path}\n")
        self.proc.stdin.flush()

    def result(self) -> dict | None:
        """The answer if there is one; {"rc": ..} with an error when the applier died."""
        p = self.proc
        if p is None:
            return {"rc": 1, "output": "applier not running"}
        assert p.stdout is not None
        if select.select([p.stdout], [], [], 0)[0]:
            line = p.stdout.readline()
            if line:
                return json.loads(line)
        if p.poll() is not None:
            return {"rc": 1, "output": f"applier exited {p.returncode}"}
        return None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.t0 = time.monotonic()
        self.heartbeat = self.t0  # tick_light() moves it; stall_watchdog() reads it
        self.out = Path(args.out)
        self.env = dict(os.environ, AEGIS_PIN_ROOT=PIN_ROOT, AEGIS_STATE_DIR=str(WORK / "state"))
        self.samples: list[dict] = []
        self.applies: list[dict] = []
        self.incarnations: list[Incarnation] = []
        self.loadgens: dict[str, subprocess.Popen] = {}
        self.loadgen_results: dict[str, list[dict]] = {}
        self.version = 0
        self.swaps = 0
        self.applier = Applier(self.env)
        self.variant = 0
        self.pending_apply: Apply | None = None
        self.mode_timeline: list[tuple[float, str]] = []
        self.phase = "enforce"  # enforce | flood-arming | flooding | flood-draining
        self.phase_since = 0.0
        self.floods: list[dict] = []
        self.next_swap = 0.0
        self.next_flood = args.flood_first
        self.next_restart = args.restart_every
        self.restarts = 0
        self.kv: KernelView | None = None
        self.tail = EventsTail(WORK / "events" / "events.jsonl")
        self.t0_mono_ns = time.monotonic_ns() - int((time.monotonic() - self.t0) * 1e9)
        self.next_sample = float("inf")  # armed once the agent is up
        self.cli_checks: list[dict] = []
        self.errors: list[str] = []
        self.metrics_ok = 0
        self.metrics_fail = 0
        self._scrape: tuple[float, int, dict] = (0.0, 0, {})
        self._scrape_lock = threading.Lock()
        self._stop_scraper = threading.Event()
        self.cli_proc: tuple[float, dict, subprocess.Popen] | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        ensure_guest_mounts()
        if os.path.exists(PIN_ROOT):
            raise SystemExit(f"{PIN_ROOT} exists: a previous soak's pins; refusing to start")
        WORK.mkdir(parents=True, exist_ok=True)
        mount_tmpfs(WORK, self.a.tmpfs_size)
        for d in ("state", "files/protected", "files/unprotected", "files/rotating", "events", "logs",
                  "keys", "policies", "loadgen"):
            (WORK / d).mkdir(parents=True, exist_ok=True)
        data = b"soak\n" * 100
        (WORK / "files" / "canary.dat").write_bytes(data)
        (WORK / "files" / "flood.dat").write_bytes(data)
        for i in range(self.a.protected_files):
            (WORK / "files" / "protected" / f"p{i:03d}").write_bytes(data)
        for i in range(50):
            (WORK / "files" / "unprotected" / f"u{i:03d}").write_bytes(data)
        for i in range(2 * self.a.rotating_rules):
            (WORK / "files" / "rotating" / f"r{i:04d}").write_bytes(data)
        for name in ("tiny", "tiny_denied"):
            dst = WORK / "files" / name
            dst.write_bytes(TINY.read_bytes())
            dst.chmod(0o755)
        self.cg_sel = CG / "selected" / "ctr"
        self.cg_other = CG / "other" / "ctr"
        for d in (CG, CG / "selected", self.cg_sel, CG / "other", self.cg_other):
            d.mkdir(exist_ok=True)
        from aegis_stream.policy import signing
        from aegis_stream.policy.trust import TrustStore

        # what `aegis keys generate` / `aegis keys add` do (not the subject of the soak)
        signing.generate_keypair("soak", WORK / "keys")
        TrustStore(WORK / "state").add((WORK / "keys" / "soak.pub").read_bytes(), "soak",
                                       source="soak.pub")

        self._key, self._key_id = signing.load_private_key(WORK / "keys" / "soak.key")

    def policy(self, mode: str) -> Path:
        """A signed policy: canary + protected files + tiny_denied + flood target + one of
        two rotating rule sets (so consecutive generations differ)."""
        from aegis_stream.policy import signing

        self.version += 1
        self.variant ^= 1
        f = WORK / "files"
        rules = [("canary", f / "canary.dat", "open"), ("flood", f / "flood.dat", "open"),
                 ("tiny-denied", f / "tiny_denied", "exec")]
        rules += [(f"protected-{i:03d}", f / "protected" / f"p{i:03d}", "open")
                  for i in range(self.a.protected_files)]
        base = self.variant * self.a.rotating_rules
        rules += [(f"rot-{i:04d}", f / "rotating" / f"r{i:04d}", "open")
                  for i in range(base, base + self.a.rotating_rules)]
        doc = (f'apiVersion = "aegis/v1"\nname = "soak"\nversion = {self.version}\n'
               f'mode = "{mode}"\n[[scope]]\ncgroup = "{CG / "selected"}"\n')
        for rid, path, act in rules:
            doc += f'[[rules]]\nid = "{rid}"\npath = "{path}"\nactions = ["{act}"]\n'
        env = signing.sign_policy(doc.encode(), self._key, self._key_id, source_name="soak")
        p = WORK / "policies" / f"v{self.version:05d}.signed"
        p.write_bytes(env)
        return p

    # ---------------------------------------------------------------- agent
    def start_agent(self, policy: Path | None) -> Incarnation:
        n = len(self.incarnations) + 1
        status = WORK / "status.json"
        status.unlink(missing_ok=True)
        argv = [*AEGIS, "run", "--events", str(WORK / "events" / "events.jsonl"),
                "--status-file", str(status)]
        if policy is not None:
            argv += ["--policy", str(policy)]
        if self.a.metrics_port:
            argv += ["--metrics-addr", f"127.0.0.1:{self.a.metrics_port}"]
        argv += ["--storm-window", f"{self.a.storm_window:g}"]
        errp = WORK / "logs" / f"agent-{n}.stderr"
        # PYTHONFAULTHANDLER: a SIGABRT (sent when it never gets ready) leaves its stacks
        proc = subprocess.Popen(argv, env={**self.env, "PYTHONFAULTHANDLER": "1"},
                                stdout=subprocess.DEVNULL, stderr=open(errp, "wb"),
                                start_new_session=True)
        inc = Incarnation(n, proc, self.now(), errp)
        self.incarnations.append(inc)
        deadline = time.monotonic() + self.a.agent_start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"agent {n} exited {proc.returncode} at start: "
                                 f"{errp.read_text(errors='replace')[-2000:]}")
            if status.exists():
                try:
                    st = json.loads(status.read_text())
                except ValueError:
                    st = {}
                if st.get("state"):
                    inc.ready = self.now()
                    log(f"agent {n} (pid {proc.pid}) ready in {inc.ready - inc.started:.1f}s: "
                        f"state {st['state']}")
                    return inc
            self.tick_light()
            time.sleep(0.1)
        proc.send_signal(signal.SIGABRT)  # Python's faulthandler writes every thread's stack
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        raise SystemExit(f"agent {n} not ready after {self.a.agent_start_timeout}s (load "
                         f"{os.getloadavg()[0]:.1f}); its stderr (stacks at SIGABRT): "
                         f"{errp.read_text(errors='replace')[-4000:]}")

    @property
    def agent(self) -> Incarnation:
        return self.incarnations[-1]

    def stop_agent(self, sig: int) -> None:
        inc = self.agent
        inc.last_metrics = self.scrape() or inc.last_metrics
        inc.stop_signal = signal.Signals(sig).name
        inc.stop_sent = self.now()
        inc.proc.send_signal(sig)
        deadline = time.monotonic() + self.a.agent_stop_timeout
        while inc.proc.poll() is None and time.monotonic() < deadline:
            self.tick_light()
            time.sleep(0.1)
        if inc.proc.poll() is None:
            self.errors.append(f"agent {inc.n} did not stop within {self.a.agent_stop_timeout}s "
                               "of SIGTERM; killed")
            inc.proc.kill()
            inc.proc.wait()
            inc.stop_signal += "+SIGKILL"
        inc.exited = self.now()
        inc.returncode = inc.proc.returncode
        inc.summary = parse_stop_summary(inc.stderr_path.read_text(errors="replace"))
        log(f"agent {inc.n} stopped ({inc.stop_signal}, rc {inc.returncode}) in "
            f"{inc.exited - inc.stop_sent:.1f}s: {inc.summary.get('line', '')[:200]}")

    def scrape(self) -> dict:
        """The newest scrape of the running agent's metrics (a thread scrapes, so a slow
        agent never stalls the harness); {} when there is none from the last 10 s."""
        with self._scrape_lock:
            t, n, prom = self._scrape
        if not prom or n != (self.agent.n if self.incarnations else 0) or time.monotonic() - t > 10:
            return {}
        return prom

    def _scraper(self) -> None:
        url = f"http://127.0.0.1:{self.a.metrics_port}/metrics"
        while not self._stop_scraper.is_set():
            n = self.agent.n if self.incarnations else 0
            t = time.monotonic()
            try:
                with urllib.request.urlopen(url, timeout=10) as r:
                    prom = parse_prom(r.read().decode())
                self.metrics_ok += 1
                with self._scrape_lock:
                    self._scrape = (t, n, prom)
            except (OSError, ValueError):  # no answer, or a malformed (e.g. cut-off) scrape
                self.metrics_fail += 1
            self._stop_scraper.wait(max(0.1, self.a.sample_every - (time.monotonic() - t)))

    # ---------------------------------------------------------------- workload
    def loadgen(self, name: str, mode: str, rate: float, duration: float, cgroup: Path,
                files: list[Path]) -> None:
        out = WORK / "loadgen" / f"{name}-{len(self.loadgen_results.get(name, []))}.json"
        if mode == "canary":
            out = self.out / "canary.log"
        argv = [str(LOADGEN), mode, str(rate), str(duration), str(cgroup), str(out),
                *map(str, files)]
        self.loadgens[name] = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.PIPE)
        self.loadgens[name].out = out  # type: ignore[attr-defined]
        self.loadgens[name].started = self.now()  # type: ignore[attr-defined]

    def reap_loadgens(self, *, stop: bool = False) -> None:
        for name, p in list(self.loadgens.items()):
            if stop and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if p.poll() is None:
                continue
            out: Path = p.out  # type: ignore[attr-defined]
            res: dict = {"name": name, "rc": p.returncode, "started": round(p.started, 2),  # type: ignore
                         "ended": round(self.now(), 2)}
            if name != "canary":
                try:
                    res.update(json.loads(out.read_text()))
                except (OSError, ValueError):
                    res["error"] = (p.stderr.read().decode(errors="replace") if p.stderr else "")[-500:]
            self.loadgen_results.setdefault(name, []).append(res)
            del self.loadgens[name]

    def start_workload(self) -> None:
        d, f = self.a.duration + 3600, WORK / "files"
        prot = sorted((f / "protected").iterdir())
        unprot = sorted((f / "unprotected").iterdir())
        self.loadgen("canary", "canary", 1000, d, self.cg_sel, [f / "canary.dat"])
        self.loadgen("deny-open", "open", self.a.deny_rate, d, self.cg_sel, prot)
        self.loadgen("deny-exec", "exec", self.a.exec_deny_rate, d, self.cg_sel, [f / "tiny_denied"])
        self.loadgen("allow-open", "open", self.a.allow_rate, d, self.cg_sel, unprot)
        self.loadgen("allow-exec", "exec", self.a.exec_rate, d, self.cg_sel, [f / "tiny"])
        self.loadgen("outside-open", "open", self.a.outside_rate, d, self.cg_other, prot)

    # ---------------------------------------------------------------- policy swaps
    def desired_mode(self) -> str:
        return "enforce" if self.phase in ("enforce", "flood-draining-done") else "audit"

    def start_apply(self) -> None:
        mode = self.desired_mode()
        path = self.policy(mode)
        old = self.mode_timeline[-1][1] if self.mode_timeline else "none"
        self.swaps += 1
        use_cli = bool(self.a.cli_apply_every) and self.swaps % self.a.cli_apply_every == 0
        ap = Apply(self.version, mode, self.variant, self.now(), old, "cli" if use_cli else "library")
        if use_cli:
            ap.proc = subprocess.Popen([*AEGIS, "policy", "apply", str(path)],
                                       env={**self.env, "PYTHONFAULTHANDLER": "1"},
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        else:
            self.applier.submit(path)
        self.pending_apply = ap

    def poll_apply(self) -> None:
        ap = self.pending_apply
        if ap is None:
            return
        res = None
        if ap.proc is None:
            res = self.applier.result()
            if res is None:
                return
        elif ap.proc.poll() is None:
            if self.now() - ap.started > self.a.apply_timeout and not ap.output:
                ap.proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: its traceback, then exit
                ap.output = "aborted"
                self.errors.append(f"policy apply v{ap.version} ran over {self.a.apply_timeout:.0f}s: "
                                   "aborted (traceback in soak.json applies)")
            return
        ap.ended = self.now()
        if ap.proc is not None:
            ap.rc = ap.proc.returncode
            ap.output = (ap.proc.stdout.read() if ap.proc.stdout else "").strip()
        else:
            assert res is not None
            ap.rc = res.get("rc", 1)
            ap.output = res.get("output", "")
        self.pending_apply = None
        self.applies.append({"version": ap.version, "mode": ap.mode, "old_mode": ap.old_mode,
                             "kind": ap.kind, "started": round(ap.started, 3),
                             "ended": round(ap.ended, 3), "seconds": round(ap.ended - ap.started, 3),
                             "rc": ap.rc, "output": ap.output[-2000:]})
        if ap.rc == 0:
            self.mode_timeline.append((ap.ended, ap.mode))
        else:
            self.errors.append(f"policy apply v{ap.version} ({ap.mode}) failed: {ap.output[-300:]}")
            self.mode_timeline.append((ap.ended, ap.old_mode))

    # ---------------------------------------------------------------- sampling
    def sample(self) -> None:
        t = self.now()
        kv = self.kv
        assert kv is not None
        c = kv.counters()
        gen, mode = kv.active()
        pos = kv.rings_pos()
        s: dict = {"t": round(t, 2), "phase": self.phase, "generation": gen, "mode": mode,
                   "agent": self.agent.n if self.incarnations else 0,
                   "denied": c["denied"], "audited": c["audited"], "ringbuf_fail": c["ringbuf_fail"],
                   "evaluated": c["evaluated"],
                   "deny_prod": pos["deny"][0], "deny_cons": pos["deny"][1],
                   "audit_prod": pos["audit"][0], "audit_cons": pos["audit"][1],
                   "delivered_deny": self.tail.counts["deny"], "delivered_audit": self.tail.counts["audit"],
                   "deny_duplicates": self.tail.counts["deny_duplicates"]}
        inc = self.agent if self.incarnations else None
        if inc is not None and inc.proc.poll() is None:
            u = proc_usage(inc.proc.pid)
            if u:
                s["rss"] = u[0]
                s["cpu_s"] = u[1]
                kids = children_rss(inc.proc.pid)
                if kids:
                    s["rss_children"] = kids
                # where the memory is: at each new high (>= 1 MiB above the last one kept)
                # and every 60 s (cheap enough: one read of smaps)
                peak_kb = inc.smaps_peak.get("rss_kb", 0)
                if u[0] // 1024 >= peak_kb + 1024 or int(t) % 60 == 0:
                    br = smaps_breakdown(inc.proc.pid)
                    if br:
                        br["t"] = round(t, 1)
                        br["phase"] = self.phase
                        if br["rss_kb"] > peak_kb:
                            inc.smaps_peak = br
                        if int(t) % 60 == 0:
                            inc.smaps_last = br
            prom = self.scrape()
            if prom:
                inc.last_metrics = prom
                s["m_drops"] = agent_drops(prom)
                for klass in ("deny", "audit"):
                    for key, name in (("emitted", "aegis_events_emitted_total"),
                                      ("delivered", "aegis_events_delivered_total"),
                                      ("in_flight", "aegis_events_in_flight")):
                        s[f"m_{key}_{klass}"] = metric_sum(prom, name, **{"class": klass})
                s["m_spool"] = metric_sum(prom, "aegis_spool_pending_events")
                st = [lab.get("state") for lab, v in prom.get("aegis_state", []) if v == 1]
                s["m_state"] = st[0] if st else ""
                if int(t) % 30 == 0:  # the normaliser's caches: what an RSS creep would be made of
                    s["m_cache_entries"] = {lab.get("cache", ""): int(v)
                                            for lab, v in prom.get("aegis_cache_entries", [])}
        if int(t) % 30 == 0:
            s["rule_counter_entries"] = kv.rule_counter_entries()
        self.samples.append(s)
        if len(self.samples) % 10 == 0:  # a heartbeat the host can read while the soak runs
            ap = self.pending_apply
            prog = {"t": s["t"], "phase": self.phase, "agent": s["agent"], "mode": mode,
                    "applies": len(self.applies), "restarts": self.restarts,
                    "pending_apply": None if ap is None else
                    {"version": ap.version, "kind": ap.kind, "running_s": round(t - ap.started, 1)},
                    "delivered": [s["delivered_deny"], s["delivered_audit"]],
                    "emitted": [s["denied"], s["audited"]], "errors": self.errors[-3:]}
            (self.out / "progress.json").write_text(json.dumps(prog) + "\n")

    def tick_light(self) -> None:
        """What must keep happening while we wait on something: tail events, reap, sample."""
        self.heartbeat = time.monotonic()
        self.tail.poll(self.now())
        self.poll_apply()
        self.poll_cli()
        self.reap_loadgens()
        if self.kv is not None and self.now() >= self.next_sample:
            self.sample()
            self.next_sample += self.a.sample_every

    # ---------------------------------------------------------------- main loop
    def run(self) -> dict:
        self.setup()
        self.calibration = {"python_work_s": calibrate()}
        first = self.policy("enforce")
        self.mode_timeline.append((0.0, "none"))
        inc = self.start_agent(first)
        self.mode_timeline.append((inc.ready, "enforce"))
        self.applies.append({"version": self.version, "mode": "enforce", "old_mode": "none",
                             "kind": "agent",
                             "started": round(inc.started, 3), "ended": round(inc.ready, 3),
                             "seconds": round(inc.ready - inc.started, 3), "rc": 0,
                             "output": "applied by aegis run --policy"})
        self.kv = KernelView(PIN_ROOT)
        self.memlock = self.kv.memlock()
        if self.a.metrics_port:
            threading.Thread(target=self._scraper, daemon=True).start()
        self.applier.start()  # pays its Python start now, not in the first swap
        self.start_workload()
        self.t_workload = self.now()
        end = self.t_workload + self.a.duration
        self.next_swap = self.t_workload + self.a.swap_every
        self.next_flood = self.t_workload + self.a.flood_first
        self.next_restart = self.t_workload + self.a.restart_every
        self.next_sample = self.now()
        next_cli = self.now() + self.a.cli_every
        log(f"workload running for {self.a.duration:.0f}s")
        while self.now() < end:
            t = self.now()
            self.tick_light()
            if t >= next_cli:
                self.cli_check()
                next_cli += self.a.cli_every
            self.flood_step(t)
            if self.pending_apply is None and (t >= self.next_swap or self.mode_mismatch()):
                self.start_apply()
                self.next_swap = t + self.a.swap_every
            if (self.a.restart_every and t >= self.next_restart
                    and (self.a.restart_in_flood or self.phase == "enforce")):
                self.restarts += 1
                sig = (signal.SIGKILL if self.a.kill_every and self.restarts % self.a.kill_every == 0
                       else signal.SIGTERM)
                self.stop_agent(sig)
                self.start_agent(None)
                self.next_restart = self.now() + self.a.restart_every
            time.sleep(0.1)
        return self.finish()

    def mode_mismatch(self) -> bool:
        return bool(self.mode_timeline) and self.mode_timeline[-1][1] != self.desired_mode()

    def flood_step(self, t: float) -> None:
        if self.phase == "enforce" and self.a.flood_every and t >= self.next_flood:
            self.phase, self.phase_since = "flood-arming", t
            self.floods.append({"armed": round(t, 2)})
            log("flood: switching to audit mode")
        elif self.phase == "flood-arming":
            if self.mode_timeline[-1][1] == "audit" and self.pending_apply is None:
                self.phase, self.phase_since = "flooding", t
                self.floods[-1]["flood_start"] = round(t, 2)
                for i in range(self.a.flood_procs):
                    self.loadgen(f"flood{i}", "open", 0, self.a.flood_duration, self.cg_sel,
                                 [WORK / "files" / "flood.dat"])
                log(f"flood: {self.a.flood_duration:.0f}s flat-out audited opens "
                    f"({self.a.flood_procs} processes)")
        elif self.phase == "flooding":
            if not any(n.startswith("flood") for n in self.loadgens):
                self.phase, self.phase_since = "flood-draining", t
                self.floods[-1]["flood_end"] = round(t, 2)
        elif self.phase == "flood-draining":
            assert self.kv is not None
            pos = self.kv.rings_pos()
            lag = sum(p - c for p, c in pos.values())
            # drained means drained for the agent too: empty rings with a backlog still in
            # the agent's channels are the flood's memory, not the steady state's
            backlog = self.agent_backlog()
            timed_out = t - self.phase_since > self.a.drain_timeout
            if (lag == 0 and backlog <= TRICKLE) or timed_out:
                self.floods[-1]["drained"] = round(t, 2)
                self.floods[-1]["lag_left_bytes"] = lag
                self.floods[-1]["agent_backlog_left"] = backlog
                if timed_out:
                    self.floods[-1]["drain_timed_out"] = True
                self.phase, self.phase_since = "flood-draining-done", t
                log(f"flood: drained (lag {lag} bytes, {backlog} events in the agent"
                    f"{', timed out' if timed_out else ''}); back to enforce")
        elif self.phase == "flood-draining-done":
            if self.mode_timeline[-1][1] == "enforce" and self.pending_apply is None:
                self.phase, self.phase_since = "enforce", t
                self.floods[-1]["enforce_again"] = round(t, 2)
                self.next_flood = t + self.a.flood_every

    def agent_backlog(self) -> int:
        """Audit events in the running agent's hands at its last scrape (0: no agent)."""
        if not self.incarnations:
            return 0
        return int(metric_sum(self.agent.last_metrics, "aegis_events_in_flight", **{"class": "audit"}))

    def cli_check(self) -> None:
        """Start `aegis stats --json` (non-blocking); poll_cli compares it with our own read
        of the same maps taken before and after it ran."""
        if self.cli_proc is not None:
            return
        assert self.kv is not None
        p = subprocess.Popen([*AEGIS, "stats", "--json"], env=self.env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        self.cli_proc = (self.now(), self.kv.counters(), p)

    def poll_cli(self) -> None:
        if self.cli_proc is None or self.cli_proc[2].poll() is None:
            return
        t, before, p = self.cli_proc
        self.cli_proc = None
        assert self.kv is not None
        after = self.kv.counters()
        out, err = p.communicate()
        rec: dict = {"t": round(t, 1), "seconds": round(self.now() - t, 1), "rc": p.returncode}
        if p.returncode == 0:
            try:
                doc = json.loads(out)
                cli_denied = sum(h["denied"] for h in doc["hooks"].values())
                rec["consistent"] = before["denied"] <= cli_denied <= after["denied"]
            except (ValueError, KeyError, TypeError) as exc:
                rec["error"] = f"unreadable: {exc}"
        else:
            rec["error"] = err.strip()[-300:]
        self.cli_checks.append(rec)

    # ---------------------------------------------------------------- end and accounting
    def finish(self) -> dict:
        log("stopping the workload")
        canary = self.loadgens.pop("canary", None)
        self.reap_loadgens(stop=True)
        while self.pending_apply is not None:
            self.tick_light()
            time.sleep(0.1)
        assert self.kv is not None
        self.quiesce_log: list[dict] = []
        self.quiesce("end of workload")
        self.stop_agent(signal.SIGTERM)
        # denies an agent stops with go to its spool and are replayed by the next run: when
        # the accounting does not close, run one more agent (no policy) to replay them
        if self.accounting(self.kv.counters(), self.kv.rings_pos())["deny"]["unexplained"] > 0:
            log("deny records unaccounted after the stop: starting an agent to replay its spool")
            self.start_agent(None)
            self.quiesce("spool replay")
            self.stop_agent(signal.SIGTERM)
        self._stop_scraper.set()
        if canary is not None:
            canary.send_signal(signal.SIGTERM)
            canary.wait(30)
        self.tail.poll(self.now())
        self.sample()
        if self.tail.unread_files:
            # not the agent's loss: the harness could not count what it delivered there
            self.errors.append(f"events tail: {self.tail.unread_files} rotated events file(s) were "
                               "deleted by the sink before the harness read them; "
                               "'unexplained' includes their events")
        final_c = self.kv.counters()
        final_pos = self.kv.rings_pos()
        cli_final = subprocess.run([*AEGIS, "stats", "--json"], env=self.env, capture_output=True,
                                   text=True, timeout=120)
        doc = {
            "schema": "aegis.soak.v1",
            "meta": self.meta(),
            "samples": self.samples,
            "applies": self.applies,
            "floods": self.floods,
            "incarnations": [i.as_dict() for i in self.incarnations],
            "loadgen": self.loadgen_results,
            "canary": self.canary_report(),
            "accounting": self.accounting(final_c, final_pos),
            "kernel_final": final_c,
            "stats_cli_final": cli_final.stdout[-4000:] if cli_final.returncode == 0 else cli_final.stderr,
            "cli_checks": self.cli_checks,
            "latency_ms": self.tail.latency_ms,
            "events_tail": {**self.tail.counts, "rotations": self.tail.rotations,
                            "unread_files": self.tail.unread_files},
            "maps_memlock": self.memlock,
            "errors": self.errors,
            "metrics_scrapes": {"ok": self.metrics_ok, "failed": self.metrics_fail},
            "quiesce": self.quiesce_log,
            "applier_starts": self.applier.starts,
        }
        doc["resources"] = resources(doc)
        doc["gates"] = gates(doc, self.a)
        return doc

    def quiesce(self, why: str) -> None:
        """Wait until the agent has delivered what the kernel produced: rings empty, nothing
        in flight or spooled (its metrics), delivered counts unchanged for 3 s."""
        assert self.kv is not None
        t0 = self.now()
        idle_since: float | None = None
        rec: dict = {"why": why, "start": round(t0, 1)}
        while True:
            self.tick_light()
            lag = sum(p - c for p, c in self.kv.rings_pos().values())
            prom = self.scrape()
            in_flight = sum(metric_sum(prom, "aegis_events_in_flight", **{"class": k})
                            for k in ("deny", "audit"))
            spool = metric_sum(prom, "aegis_spool_pending_events")
            acc = self.accounting(self.kv.counters(), self.kv.rings_pos())
            closed = all(acc[k]["unexplained"] <= 0 for k in ("deny", "audit"))
            rec.update(lag_bytes=lag, in_flight=in_flight, spool=spool, metrics=bool(prom),
                       unexplained={k: acc[k]["unexplained"] for k in ("deny", "audit")})
            # the canary may keep adding events: "nothing waiting anywhere" held for 5 s, not
            # silence, is the criterion (losses from earlier never close the accounting)
            idle = lag == 0 and in_flight == 0 and spool == 0 and (bool(prom) or closed)
            if not idle:
                idle_since = None
            elif idle_since is None:
                idle_since = self.now()
            if idle_since is not None and (closed or self.now() - idle_since >= 5):
                rec["result"] = "drained"
                break
            if self.now() - t0 > self.a.final_drain_timeout:
                rec["result"] = "timeout"
                break
            time.sleep(0.2)
        rec["seconds"] = round(self.now() - t0, 1)
        self.quiesce_log.append(rec)
        log(f"quiesce ({why}): {rec['result']} after {rec['seconds']}s (lag {lag} B, in flight "
            f"{in_flight:.0f}, spool {spool:.0f})")

    def meta(self) -> dict:
        return {"kernel": os.uname().release, "series": os.environ.get("AEGIS_LAB_KERNEL", ""),
                "cpu_model": cpu_model(), "nproc": os.cpu_count(), "duration": self.a.duration,
                "workload_started": round(self.t_workload, 2), "args": vars(self.a),
                "calibration": self.calibration, "mem_total_kb": _meminfo("MemTotal")}

    def canary_report(self) -> dict:
        """Each attempt against the mode the kernel was in: enforce -> must be EPERM, audit
        -> must be allowed; attempts while an apply that changes the mode runs: excluded."""
        path = self.out / "canary.log"
        attempts = []
        if path.exists():
            for line in path.read_text().splitlines():
                ns, _, err = line.partition(" ")
                if ns.isdigit():
                    attempts.append(((int(ns) - self.t0_mono_ns) / 1e9, int(err)))
        windows = [(a["started"], a["ended"]) for a in self.applies
                   if a["mode"] != a["old_mode"] and a["rc"] == 0]
        out = {"attempts": len(attempts), "enforce_checked": 0, "audit_checked": 0,
               "transition_excluded": 0, "misses": []}
        for t, err in attempts:
            if any(s - 0.05 <= t <= e + 0.05 for s, e in windows):
                out["transition_excluded"] += 1
                continue
            mode = "none"
            for tt, m in self.mode_timeline:
                if tt <= t:
                    mode = m
            if mode == "enforce":
                out["enforce_checked"] += 1
                if err != EPERM:
                    out["misses"].append({"t": round(t, 3), "errno": err, "expected": "EPERM"})
            elif mode == "audit":
                out["audit_checked"] += 1
                if err != 0:
                    out["misses"].append({"t": round(t, 3), "errno": err, "expected": "allowed"})
            else:
                out["transition_excluded"] += 1
        out["miss_count"] = len(out["misses"])
        # first attempt's time, to show the canary started with the workload
        out["first_t"] = round(attempts[0][0], 2) if attempts else None
        return out

    def accounting(self, c: dict, pos: dict) -> dict:
        """Per class: emitted (kernel decisions), reached the ring (producer position /
        record size), kernel-dropped (the difference: reserve failed), delivered (unique
        decision records in the events file), dropped in userspace as the agent reported
        it (stop summary or last scrape of each incarnation), and the rest: unexplained."""
        acc: dict = {}
        for klass, ctr in (("deny", "denied"), ("audit", "audited")):
            emitted = c[ctr]
            reached = pos[klass][0] // RECORD_STRIDE
            waiting = (pos[klass][0] - pos[klass][1]) // RECORD_STRIDE
            delivered = self.tail.counts[klass]
            reported: dict[str, int] = {}
            in_flight_lost = 0
            for inc in self.incarnations:
                fa = inc.final_accounting()
                for k, v in fa.get(klass, {}).get("dropped", {}).items():
                    if k.startswith("kernel/"):
                        continue  # the kernel's own losses are counted once, below
                    reported[k] = reported.get(k, 0) + int(v)
                if inc.stop_signal and fa.get("source") == "last-scrape":
                    # no stop summary: what it held at its last scrape may have been lost at
                    # the stop without being reported anywhere (an upper bound)
                    in_flight_lost += int(fa.get(klass, {}).get("in_flight", 0) or 0)
            # decisions folded into storm summaries never reached the ring by design
            suppressed = self.tail.storm_suppressed[klass]
            kernel_dropped = max(0, emitted - suppressed - reached)
            userspace = sum(reported.values())
            unexplained = reached - waiting - delivered - userspace
            acc[klass] = {
                "emitted": emitted, "reached_ring": reached, "waiting_in_ring": waiting,
                "delivered": delivered, "kernel_dropped": kernel_dropped,
                "storm_suppressed": suppressed,
                "dropped_by_stage_reason": {"kernel/ringbuf_full": kernel_dropped, **reported},
                "in_flight_at_unreported_stops": in_flight_lost,
                "unexplained": unexplained,
                "drop_rate": (kernel_dropped + userspace + max(0, unexplained)) / emitted if emitted else 0.0,
                "unexplained_rate": max(0, unexplained) / emitted if emitted else 0.0,
                "duplicates": self.tail.counts["deny_duplicates"] if klass == "deny" else 0,
            }
        acc["storm_suppressed_counter"] = c.get("suppressed", 0)
        acc["storm_summaries_match_counter"] = (
            acc["deny"]["storm_suppressed"] + acc["audit"]["storm_suppressed"] == c.get("suppressed", 0))
        acc["ringbuf_fail_counter"] = c["ringbuf_fail"]
        acc["kernel_dropped_matches_counter"] = (
            acc["deny"]["kernel_dropped"] + acc["audit"]["kernel_dropped"] == c["ringbuf_fail"])
        return acc

RECOVERY_S = 30  # after a flood drained, the agent is back to steady state this much later
# audit events in flight the agent counts as a trickle, not a backlog: a quarter of its batch,
# the ticker's heap-trim condition (pipeline/ticker.py)
TRICKLE = PipelineConfig().batch_max // 4


def resources(doc: dict) -> dict:
    """RSS and CPU per agent incarnation, from the samples.

    Steady state excludes the agent's first 30 s and every flood window (flood start to
    drained + 30 s): during a flood the agent holds a backlog, which is its peak, reported
    apart.  Growth compares the first and last quarter of the steady samples taken after
    the incarnation's last flood recovery (the allocator keeps its flood high-water), so it
    measures whether memory keeps rising once the workload is back to normal."""
    samples, floods = doc["samples"], doc["floods"]
    windows = [(f["flood_start"], f.get("drained", f.get("flood_end", f["flood_start"] + 1e9))
                + RECOVERY_S) for f in floods if "flood_start" in f]
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    per: list[dict] = []
    for inc in doc["incarnations"]:
        pts = [(s["t"], s["rss"], s["cpu_s"]) for s in samples if s.get("agent") == inc["n"] and "rss" in s]
        if not pts:
            continue
        steady = [p for p in pts if p[0] - inc["ready"] >= 30
                  and not any(a <= p[0] <= b for a, b in windows)]
        last_recovery = max((b for a, b in windows if a <= pts[-1][0] and b >= pts[0][0]), default=None)
        tail = [p for p in steady if last_recovery is None or p[0] > last_recovery]
        row = {"n": inc["n"], "seconds": round(pts[-1][0] - pts[0][0], 1),
               "rss_peak_mb": round(max(p[1] for p in pts) / 2**20, 1),
               "rss_steady_max_mb": round(max(p[1] for p in steady) / 2**20, 1) if steady else None,
               "cpu_s": round(pts[-1][2] - pts[0][2], 2)}
        # RSS slope per hour: a least-squares line through the steady samples once the first
        # flood has set the allocator's high-water (before that, the rise is the flood's);
        # over >= 10 minutes only, a shorter line says little about hours
        settled = [p for p in steady if not windows or p[0] > windows[0][1]]
        # what floods leave behind: the steady RSS before this agent's first flood against
        # the steady RSS after it (medians: one lingering sample does not move them)
        first = min((a for a, b in windows if a >= pts[0][0]), default=None)
        before = [p[1] for p in steady if first is None or p[0] < first]
        after = [p[1] for p in steady if first is not None and p[0] > first]
        if before:
            row["rss_median_before_floods_mb"] = round(med(before) / 2**20, 1)
        if after:
            row["rss_median_after_floods_mb"] = round(med(after) / 2**20, 1)
        if len(settled) >= 8 and settled[-1][0] - settled[0][0] >= 600:
            fit = statistics.linear_regression([p[0] for p in settled], [p[1] for p in settled])
            row["rss_slope_mb_per_h"] = round(fit.slope * 3600 / 2**20, 2)
            row["rss_slope_span_s"] = round(settled[-1][0] - settled[0][0], 1)
        if len(tail) >= 8:
            q = len(tail) // 4
            row["rss_growth_from_mb"] = round(med([p[1] for p in tail[:q]]) / 2**20, 1)
            row["rss_growth_to_mb"] = round(med([p[1] for p in tail[-q:]]) / 2**20, 1)
            row["rss_growth_span_s"] = round(tail[-1][0] - tail[0][0], 1)
        per.append(row)
    cpu_total = sum(p["cpu_s"] for p in per)
    delivered = doc["accounting"]["deny"]["delivered"] + doc["accounting"]["audit"]["delivered"]
    flood_cpu = flood_ev = flood_s = 0.0
    for fl in floods:
        s0, s1 = fl.get("flood_start"), fl.get("drained")
        if s0 is None or s1 is None:
            continue
        win = [s for s in samples if s0 <= s["t"] <= s1 and "cpu_s" in s]
        if len(win) >= 2 and win[0].get("agent") == win[-1].get("agent"):
            flood_cpu += win[-1]["cpu_s"] - win[0]["cpu_s"]
            flood_ev += (win[-1]["delivered_audit"] - win[0]["delivered_audit"]
                         + win[-1]["delivered_deny"] - win[0]["delivered_deny"])
            flood_s += win[-1]["t"] - win[0]["t"]
    out: dict = {"incarnations": per, "cpu_seconds_total": round(cpu_total, 2),
                 "events_delivered": delivered}
    if delivered:
        out["cpu_cores_per_10k_events_per_s_overall"] = round(cpu_total / delivered * 10_000, 3)
    if flood_ev:
        out["cpu_cores_per_10k_events_per_s_flood"] = round(flood_cpu / flood_ev * 10_000, 3)
        out["flood_delivery_rate_per_s"] = round(flood_ev / max(1e-9, flood_s), 1)
    return out


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def gates(doc: dict, a: argparse.Namespace) -> dict:
    acc, res, can = doc["accounting"], doc["resources"], doc["canary"]
    g: dict[str, dict] = {}
    worst_unexpl = max(acc[k]["unexplained_rate"] for k in ("deny", "audit"))
    g["unexplained_drop_rate"] = {
        "pass": worst_unexpl < a.max_unexplained,
        "value": worst_unexpl, "limit": a.max_unexplained,
        "detail": {k: acc[k]["unexplained"] for k in ("deny", "audit")}}
    deny = acc["deny"]
    deny_lost = deny["kernel_dropped"] + sum(v for k, v in deny["dropped_by_stage_reason"].items()
                                            if not k.startswith("kernel/")) + max(0, deny["unexplained"])
    g["deny_class_drops"] = {"pass": deny_lost == 0, "value": deny_lost, "limit": 0,
                             "detail": deny["dropped_by_stage_reason"]}
    g["canary_misses"] = {"pass": can["miss_count"] == 0 and can["enforce_checked"] > 0,
                          "value": can["miss_count"], "limit": 0,
                          "detail": {"enforce_checked": can["enforce_checked"],
                                     "audit_checked": can["audit_checked"],
                                     "transition_excluded": can["transition_excluded"]}}
    steady = [i["rss_steady_max_mb"] for i in res["incarnations"] if i.get("rss_steady_max_mb")]
    peaks = [i["rss_peak_mb"] for i in res["incarnations"]]
    g["rss_budget"] = {"pass": bool(steady) and max(steady) < a.rss_budget_mb,
                       "value": max(steady) if steady else None, "limit": a.rss_budget_mb,
                       "detail": f"steady state (outside floods); peak including floods "
                                 f"{max(peaks) if peaks else None} MB"}
    growth = [i["rss_growth_to_mb"] - i["rss_growth_from_mb"] for i in res["incarnations"]
              if "rss_growth_to_mb" in i and i["rss_growth_span_s"] >= 60]
    limit = a.rss_growth_mb
    g["rss_growth"] = {"pass": all(x <= limit for x in growth),
                       "value": round(max(growth), 1) if growth else 0.0, "limit": limit,
                       "detail": f"{len(growth)} incarnation(s) with >= 60 s of steady state after "
                                 "their last flood: last vs first quarter"}
    if "storm_summaries_match_counter" in acc:  # older soak.json: before storm aggregation
        g["storm_accounting"] = {
            "pass": acc["storm_summaries_match_counter"],
            "value": acc["deny"]["storm_suppressed"] + acc["audit"]["storm_suppressed"],
            "limit": acc["storm_suppressed_counter"],
            "detail": "decisions in aegis.storm.v1 summaries = the kernel's suppressed counter "
                      f"(window {a.storm_window:g} s; 0: aggregation off, both must be 0)"}
    failed_applies = [x for x in doc["applies"] if x["rc"] != 0]
    g["policy_applies"] = {"pass": not failed_applies, "value": len(failed_applies), "limit": 0}
    g["harness_errors"] = {"pass": not doc["errors"], "value": len(doc["errors"]), "limit": 0,
                           "detail": doc["errors"][:10]}
    return g


def stall_watchdog(soak: Soak, out: IO[str], stale_s: float = 120, every_s: float = 30) -> None:
    """Write every thread's stack once per stall of the main loop (no tick_light() for
    ``stale_s``): where a hung soak is stuck, without the unsafe faulthandler timer."""
    reported = 0.0
    while True:
        time.sleep(every_s)
        beat = soak.heartbeat
        if time.monotonic() - beat < stale_s or beat == reported:
            continue
        reported = beat
        frames = sys._current_frames()
        out.write(f"main loop stalled for {time.monotonic() - beat:.0f}s; stacks:\n")
        for tid, frame in frames.items():
            out.write(f"Thread {tid:#x}:\n{''.join(traceback.format_stack(frame))}\n")
        out.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--out", required=True)
    ap.add_argument("--swap-every", type=float, default=5.0)
    ap.add_argument("--restart-every", type=float, default=90.0, help="0: never")
    ap.add_argument("--no-restart-in-flood", dest="restart_in_flood", action="store_false",
                    help="restart the agent only outside audit floods (by default a restart may "
                         "land mid-flood, with the agent holding a large in-flight backlog)")
    ap.add_argument("--kill-every", type=int, default=0, help="every Nth restart uses SIGKILL (0: never)")
    ap.add_argument("--flood-every", type=float, default=150.0, help="0: no audit floods")
    ap.add_argument("--flood-first", type=float, default=45.0)
    ap.add_argument("--flood-duration", type=float, default=20.0)
    ap.add_argument("--flood-procs", type=int, default=4,
                    help="flat-out open loops during a flood (enough to outrun the agent)")
    ap.add_argument("--drain-timeout", type=float, default=120.0,
                    help="after a flood: how long to wait for the rings and the agent's "
                         "backlog to drain")
    ap.add_argument("--final-drain-timeout", type=float, default=300.0,
                    help="at the end: how long to wait for the agent to deliver everything")
    ap.add_argument("--cli-apply-every", type=int, default=10,
                    help="every Nth swap goes through the `aegis policy apply` CLI (0: never); the "
                         "others call the same Lifecycle.apply in-process")
    ap.add_argument("--apply-timeout", type=float, default=600.0,
                    help="a CLI apply running longer is aborted (SIGABRT: traceback) and counted")
    ap.add_argument("--cli-every", type=float, default=120.0,
                    help="cross-check with `aegis stats --json` this often")
    # defaults sized for QEMU TCG, where Python runs ~50-70x slower than natively
    ap.add_argument("--deny-rate", type=float, default=10.0, help="denied opens/s (selected cgroup)")
    ap.add_argument("--exec-deny-rate", type=float, default=1.0)
    ap.add_argument("--allow-rate", type=float, default=200.0, help="allowed opens/s (selected cgroup)")
    ap.add_argument("--exec-rate", type=float, default=2.0, help="allowed execs/s (selected cgroup)")
    ap.add_argument("--outside-rate", type=float, default=200.0,
                    help="opens/s of protected files from an unselected cgroup")
    ap.add_argument("--protected-files", type=int, default=20)
    ap.add_argument("--rotating-rules", type=int, default=200)
    ap.add_argument("--storm-window", type=float, default=0.0,
                    help="the agent's deny-storm window (default 0: off).  The soak measures the "
                         "per-event pipeline under floods; with aggregation on, a flood from four "
                         "processes is a handful of summaries (STORM-001..003 prove those); the "
                         "accounting counts the summaries' decisions either way")
    ap.add_argument("--sample-every", type=float, default=1.0)
    ap.add_argument("--metrics-port", type=int, default=9464, help="0: do not scrape")
    ap.add_argument("--agent-start-timeout", type=float, default=300,
                    help="seconds an agent may take to get ready (Python under TCG on a busy host: "
                         "30-170 s seen)")
    ap.add_argument("--agent-stop-timeout", type=float, default=60)
    ap.add_argument("--tmpfs-size", default="1200m")
    ap.add_argument("--max-unexplained", type=float, default=0.001)
    ap.add_argument("--rss-budget-mb", type=float, default=80)
    ap.add_argument("--rss-growth-mb", type=float, default=8)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("soak.driver runs as root in a lab guest (soak/run)", file=sys.stderr)
        return 2
    for b in (LOADGEN, TINY):
        if not b.exists():
            print(f"{b} missing: run `make -C soak`", file=sys.stderr)
            return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "canary.log").unlink(missing_ok=True)
    import faulthandler

    stacks = open(Path(args.out) / "driver-stacks.txt", "w")  # noqa: SIM115 (lives to the end)
    faulthandler.enable(file=stacks, all_threads=True)  # a crash leaves its tracebacks
    # Not faulthandler.dump_traceback_later: its watchdog walks the other threads' frames
    # without the GIL, and CPython 3.11 segfaults when one of them is running (it killed a
    # CI soak).  The stall watchdog below takes the GIL and reads sys._current_frames().
    soak = Soak(args)
    threading.Thread(target=stall_watchdog, args=(soak, stacks), daemon=True).start()
    try:
        doc = soak.run()
    finally:
        for p in soak.loadgens.values():
            if p.poll() is None:
                p.kill()
        for inc in soak.incarnations:
            if inc.proc.poll() is None:
                inc.proc.kill()
        soak.applier.close()
        subprocess.run([*AEGIS, "unload"], env=soak.env, capture_output=True)
        for d in ("other/ctr", "other", "selected/ctr", "selected", ""):
            try:
                (CG / d).rmdir()
            except OSError:
                pass
        for f in sorted((WORK / "logs").glob("*")) if (WORK / "logs").exists() else []:
            try:
                (Path(args.out) / f.name).write_bytes(f.read_bytes()[-200_000:])
            except OSError:
                pass
        umount(WORK)
    (Path(args.out) / "soak.json").write_text(json.dumps(doc, indent=1) + "\n")
    failed = [k for k, v in doc["gates"].items() if not v["pass"]]
    log("gates: " + ", ".join(f"{k}={'PASS' if v['pass'] else 'FAIL'}" for k, v in doc["gates"].items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
