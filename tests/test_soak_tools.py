"""The soak driver's host-side helpers (the driver itself runs in a lab guest)."""

from __future__ import annotations

import os
import subprocess
import sys

from soak import driver


def test_smaps_breakdown_of_this_process() -> None:
    br = driver.smaps_breakdown(os.getpid(), top=5)
    assert br["rss_kb"] > 0 and br["rss_kb"] == br["anon_kb"] + br["file_kb"]
    assert len(br["by"]) <= 6  # top 5 + "other"
    assert sum(v["rss_kb"] for v in br["by"].values()) == br["rss_kb"]
    assert any(k.startswith("libpython") or k == "python3" or k.startswith("python")
               for k in br["by"]) or "other" in br["by"]
    assert driver.smaps_breakdown(2**22 + 12345) == {}  # no such process


def test_children_rss_counts_descendants() -> None:
    assert driver.children_rss(2**22 + 12345) == 0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for _ in range(100):  # until the child has its own RSS
            if driver.children_rss(os.getpid()) > 1 << 20:
                break
            subprocess.run(["sleep", "0.05"])
        assert driver.children_rss(os.getpid()) > 1 << 20
    finally:
        child.kill()
        child.wait()


def test_stop_summary_with_shutdown_reasons() -> None:
    line = ("aegis: stopped; deny: delivered=12 kernel_dropped=0; audit: delivered=900 "
            "kernel_dropped=40 dropped reader/channel_full=30, shutdown/drain_timeout=7; "
            "pinned links keep enforcing")
    s = driver.parse_stop_summary("aegis: state: auditing\n" + line + "\n")
    assert s["classes"]["deny"] == {"delivered": 12, "kernel_dropped": 0, "dropped": {}}
    assert s["classes"]["audit"]["dropped"] == {"reader/channel_full": 30, "shutdown/drain_timeout": 7}
