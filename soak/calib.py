"""A fixed pure-Python workload, timed in the lab guest and on the host: the ratio is the
emulation slowdown that turns the guest's agent CPU numbers into a native estimate."""

from __future__ import annotations

import json
import time


def calibration_work() -> None:
    rec = {"schema": "aegis.decision.v1", "event_id": "x" * 30, "ktime_ns": 1, "host": "h",
           "hook": "file_open", "rule_id": "rule", "generation": 3, "ino": 1234, "pid": 1}
    for i in range(20_000):
        rec["ktime_ns"] = i
        json.loads(json.dumps(rec))


def calibrate(repeat: int = 3) -> float:
    """Best-of-``repeat`` CPU seconds of calibration_work()."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        calibration_work()
        best = min(best, time.process_time() - t0)
    return round(best, 4)
