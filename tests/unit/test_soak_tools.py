"""The soak driver's host-side helpers (the driver itself runs in a lab guest)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


def test_kernel_view_reads_counters_and_active_slot_with_the_product_readers(tmp_path):
    """KernelView (what the driver samples every second) on the fake kernel's maps: the
    per-hook counters summed, per-hook decisions kept, the active generation and mode."""
    from aegis_stream import testing as t
    from aegis_stream.kernel import abi
    from aegis_stream.policy.store import PolicyStore

    k = t.FakeKernel()
    kv = driver.KernelView.__new__(driver.KernelView)  # the maps without pinned fds
    kv.maps, kv.ncpu, kv.policy_maps = k.maps(), k.ncpu, k.policy_maps
    assert kv.active() == (0, "none")
    app = t.FakeTask(pid=1, tgid=1, comm="x", cgroups=(t.CG_ROOT, t.CG_WORKLOADS, t.CG_APP))
    assert k.decide(abi.Hook.FILE_OPEN, t.DEV_SDA1, 1234, abi.ACTION_OPEN, app) == 0
    t.install(k, PolicyStore(tmp_path), t.sample_record(7, mode="enforce"))
    assert kv.active() == (7, "enforce")
    assert k.decide(abi.Hook.FILE_OPEN, t.DEV_SDA1, 1234, abi.ACTION_OPEN, app) < 0
    k.cpu = 1
    assert k.decide(abi.Hook.BPRM_CHECK, t.DEV_SDA1, 5678, abi.ACTION_EXEC, app) < 0
    c = kv.counters()
    assert c["denied"] == 2 and c["denied.file_open"] == 1 and c["denied.bprm_check_security"] == 1
    assert c["no_policy"] == 1 and c["evaluated"] == 2 and c["audited"] == 0
    t.install(k, PolicyStore(tmp_path), t.sample_record(8, mode="audit"))
    assert kv.active() == (8, "audit")


def test_parse_prom_reads_the_agents_exposition():
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

    reg = CollectorRegistry()
    dropped = Counter("aegis_events_dropped", "d", ["class", "stage", "reason"], registry=reg)
    dropped.labels("audit", "kernel", "ringbuf_full").inc(3)
    dropped.labels("audit", "queue", "full").inc(2)
    Gauge("aegis_events_in_flight", "f", ["class"], registry=reg).labels("deny").set(4)
    prom = driver.parse_prom(generate_latest(reg).decode())
    assert driver.agent_drops(prom) == {"audit/kernel/ringbuf_full": 3, "audit/queue/full": 2}
    assert driver.metric_sum(prom, "aegis_events_in_flight", **{"class": "deny"}) == 4
    assert driver.metric_sum(prom, "aegis_events_dropped_total", stage="queue") == 2
    with pytest.raises(ValueError):
        driver.parse_prom('aegis_x{class="deny" 1\n')


HARNESSES = ("soak/*.py", "soak/run", "stress/*.py", "stress/run", "bench/*.py", "bench/run-overhead")


def test_harnesses_import_without_sys_path_edits():
    """bench/, soak/ and stress/ run as modules from the repository root (``python -m
    soak.driver``); their wrappers (soak/run) exec ``python -m``; none edits sys.path."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    files = [p for pattern in HARNESSES for p in sorted(root.glob(pattern))]
    assert len(files) >= 12
    assert [str(p.relative_to(root)) for p in files if "sys.path" in p.read_text()] == []


def test_soak_run_wrapper_and_driver_module_start(tmp_path):
    """soak/run from another directory (the wrapper execs ``python -m soak.host``) and the
    guest's command line (``python -m soak.driver`` from the root) both get as far as --help."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "soak" / "run"), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("usage: soak/run"), out.stderr
    out = subprocess.run([sys.executable, "-m", "soak.driver", "--help"], cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--swap-every" in out.stdout, out.stderr


def test_rss_slope_per_hour_is_fitted_after_the_first_flood() -> None:
    """The soak states RSS slope per hour per agent (issue 15): a line through the steady
    samples after the first flood's recovery, so the flood's rise is not read as a leak."""
    from soak import driver

    mb = 2**20
    samples = []
    for t in range(0, 1800, 5):
        rss = 60 * mb + (t * 2 * mb // 3600 if t > 400 else 0)  # +2 MB/h once settled
        if 100 <= t <= 130:
            rss += 20 * mb  # the flood's high-water, inside its window: not steady
        samples.append({"t": float(t), "agent": 1, "rss": rss, "cpu_s": t / 100,
                        "delivered_audit": 0, "delivered_deny": 0})
    doc = {"samples": samples, "floods": [{"flood_start": 100.0, "drained": 130.0}],
           "incarnations": [{"n": 1, "ready": 0.0}],
           "accounting": {"deny": {"delivered": 0}, "audit": {"delivered": 0}}}
    row = driver.resources(doc)["incarnations"][0]
    assert 1.7 < row["rss_slope_mb_per_h"] < 2.3, row
    # before the flood 60 MB flat; after it the +2 MB/h line from 400 s (60.5 MB at the median)
    assert row["rss_median_before_floods_mb"] == 60.0
    assert 60.4 < row["rss_median_after_floods_mb"] < 60.7, row
    assert row["rss_slope_span_s"] >= 600
    short = {**doc, "samples": [s for s in samples if s["t"] < 600]}
    assert "rss_slope_mb_per_h" not in driver.resources(short)["incarnations"][0]
