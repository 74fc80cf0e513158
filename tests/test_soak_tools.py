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


def test_events_tail_reads_files_rotated_away_between_two_polls(tmp_path) -> None:
    """The agent's sink may rotate several times between two polls (a flood while the
    tailer is slow): the files rotated past the one the tailer had open are read too,
    oldest first, so no delivered event goes uncounted (a 20-minute soak once reported
    786,432 audit events 'unexplained' that were in two files the tailer never opened)."""
    import trio

    from aegis_stream.pipeline.sinks import JsonLinesFileSink, SinkBatch

    path = tmp_path / "events.jsonl"
    sink = JsonLinesFileSink(path, max_bytes=4096, backups=5)
    tail = driver.EventsTail(path)
    line = b'{"schema":"aegis.decision.v1","decision":"audit","ktime_ns":1}\n'
    written = 0

    async def write(n: int) -> None:
        nonlocal written
        for _ in range(n):
            await sink.write(SinkBatch("audit", line * 10, 10))
            written += 10

    trio.run(write, 5)
    tail.poll(0.0)
    trio.run(write, 20)  # several rotations (fewer than the sink keeps) before the next poll
    assert 3 <= sink.rotations < 5
    tail.poll(1.0)
    tail.poll(2.0)
    trio.run(sink.aclose)
    if tail.fh is not None:
        tail.fh.close()
    assert tail.counts["audit"] == written
    assert tail.counts["bad_lines"] == 0 and tail.unread_files == 0
    # what was read is deleted (the guest's tmpfs is small); only the live file is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl"]
