"""Bounded soak of the real agent in a lab kernel; report as JSON + markdown + PNG plots.

    soak/run --duration 600 [--kernel 6.1] [--out DIR] [-- DRIVER-ARGS...]
    soak/run --duration 21600 --kernel 6.12        # the documented 6-hour soak

(soak/run is ``python -m soak.host`` with the repository root importable.)  Builds
soak/.build/{loadgen,tiny}, boots the kernel (QEMU TCG, two vCPUs), runs ``python -m
soak.driver`` in it (cwd: the repository root, which the guest sees at the same path),
copies its output to --out (default results/soak/<series>-<time>/), then renders soak.md
and the plots (soak.report; PNGs need matplotlib: pip install -e '.[soak]').  Exit
status: 0 all gates passed, 1 a gate failed, 2 the soak could not run.  Driver options
(after --): --swap-every, --restart-every, --kill-every, --flood-every, --flood-first,
--flood-duration, --deny-rate, --allow-rate, ... (python -m soak.driver --help).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aegis_stream import lab
from soak.calib import calibrate

ROOT = Path(__file__).resolve().parents[1]


def driver_crash(stacks: Path) -> str | None:
    """The driver's own fatal-error traceback (faulthandler, all threads), if it died of one."""
    try:
        text = stacks.read_text(errors="replace")
    except OSError:
        return None
    at = text.rfind("Fatal Python error")
    return text[at:] if at >= 0 else None


def run_driver(args: argparse.Namespace, extra: list[str], k: lab.LabKernel,
               out: Path) -> tuple[int, bool, str | None]:
    """One boot running soak.driver: (driver rc, wrote soak.json, crash traceback)."""
    rw = Path(tempfile.mkdtemp(prefix="aegis-soak-"))
    argv = [sys.executable, "-m", "soak.driver", "--duration", str(args.duration), "--out", str(rw),
            *extra]
    print(f"== soak on {k.version}: {' '.join(argv[1:])}", flush=True)
    try:
        res = lab.lab_exec(k, argv, timeout=args.duration + 1200, rwdirs=[str(rw)], stream=True,
                           cwd=ROOT, memory=args.memory, cpus=args.cpus)
        rc = res.returncode
    except lab.LabError as exc:
        print(f"== soak: lab failed: {exc}", flush=True)
        rc = -1
    fresh = (rw / "soak.json").exists()  # written by this run's driver
    for f in rw.iterdir():
        shutil.copy2(f, out / f.name)
    shutil.rmtree(rw, ignore_errors=True)
    crash = None if fresh else driver_crash(out / "driver-stacks.txt")
    if crash:
        print("== soak: driver crash (faulthandler, all threads):\n" + crash[-6000:], flush=True)
    elif not fresh and rc not in (0, 1, 2, -1):
        crash = f"driver rc {rc}, no traceback"
    return rc, fresh, crash


def main() -> int:
    ap = argparse.ArgumentParser(prog="soak/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600, help="workload seconds (after setup)")
    ap.add_argument("--kernel", default="6.1", choices=list(lab.KERNELS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--memory", default="2G", help="guest memory")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--retry-crash", type=int, default=0,
                    help="run again (at most N times) when the driver itself dies of a signal; "
                         "each crash is kept in the report (meta.harness_crashes)")
    ap.add_argument("driver_args", nargs=argparse.REMAINDER, help="-- options for soak.driver")
    args = ap.parse_args()
    extra = args.driver_args[1:] if args.driver_args[:1] == ["--"] else args.driver_args
    out = Path(args.out or ROOT / "results" / "soak" / f"{args.kernel}-{time.strftime('%Y%m%dT%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    # a previous soak's files in --out must never pass for this one's
    for f in [*out.glob("soak.*"), *out.glob("*.png"), *out.glob("agent-*.stderr"),
              *(out / n for n in ("canary.log", "progress.json", "driver-stacks.txt"))]:
        f.unlink(missing_ok=True)
    subprocess.run(["make", "-s", "-C", str(ROOT / "soak")], check=True)
    host_cal = calibrate()
    k = lab.fetch_kernel(args.kernel)
    t0 = time.monotonic()
    crashes: list[dict] = []
    while True:
        rc, fresh, crash = run_driver(args, extra, k, out)
        if fresh or crash is None or len(crashes) >= args.retry_crash:
            break
        # the harness (not the agent) died of a signal: recorded in the report, run again
        crashes.append({"driver_rc": rc, "traceback": crash[-3000:]})
        print(f"== soak: the driver crashed (rc {rc}); running the soak again "
              f"({len(crashes)}/{args.retry_crash}); recorded as harness_crashes", flush=True)
        for f in [*out.glob("agent-*.stderr"), out / "driver-stacks.txt"]:
            if f.exists():
                f.rename(f.with_name(f"crash{len(crashes)}-{f.name}"))
    doc_path = out / "soak.json"
    if not fresh:
        print(f"== soak: no soak.json (driver rc {rc}); logs in {out}", flush=True)
        return 2
    doc = json.loads(doc_path.read_text())
    cal = doc["meta"].get("calibration", {})
    cal["host_python_work_s"] = host_cal
    if cal.get("python_work_s"):
        cal["slowdown"] = round(cal["python_work_s"] / host_cal, 2)
    doc["meta"]["calibration"] = cal
    doc["meta"]["wall_seconds"] = round(time.monotonic() - t0, 1)
    doc["meta"]["harness_crashes"] = crashes
    doc_path.write_text(json.dumps(doc, indent=1) + "\n")
    subprocess.run([sys.executable, "-m", "soak.report", str(doc_path.resolve())], cwd=ROOT, check=False)
    failed = [k for k, v in doc["gates"].items() if not v["pass"]]
    print(f"== soak {'FAILED: ' + ', '.join(failed) if failed else 'passed'}; report: {out / 'soak.md'}",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
