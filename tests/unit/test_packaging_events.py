"""The events file as operators run it: SIGHUP reopen for logrotate, gzip of rotated
files, the file mode; the agent's own log as JSON lines."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from aegis_stream.agent import logjson
from aegis_stream.agent import run as agent
from aegis_stream.pipeline.sinks import JsonLinesFileSink, SinkBatch
from aegis_stream.testing import FakeKernel, FakeTask
from aegis_stream.testing._world import CG_APP, CG_ROOT, CG_WORKLOADS
from tests.unit._agent_fake import use_fake_kernel

ROOT = Path(__file__).resolve().parents[2]


def batch(i: int, n: int = 10) -> SinkBatch:
    lines = b"".join(json.dumps({"n": i * n + j}).encode() + b"\n" for j in range(n))
    return SinkBatch("audit", lines, n)


def numbers(*paths) -> list[int]:
    out: list[int] = []
    for p in paths:
        data = gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()
        out += [json.loads(line)["n"] for line in data.splitlines()]
    return out


async def test_reopen_after_rename_nothing_lost_or_doubled(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = JsonLinesFileSink(path)
    for i in range(3):
        await sink.write(batch(i))
    os.rename(path, tmp_path / "events.jsonl-20261201")  # logrotate's rename
    await sink.write(batch(3))  # before the SIGHUP: still the renamed file (same inode)
    sink.reopen()
    for i in range(4, 6):
        await sink.write(batch(i))
    await sink.aclose()
    old, new = numbers(tmp_path / "events.jsonl-20261201"), numbers(path)
    assert old == list(range(40)) and new == list(range(40, 60))
    assert sink.statistics().reopens == 1 and sink.statistics().events == 60


async def test_file_mode_exact_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        sink = JsonLinesFileSink(tmp_path / "a.jsonl", file_mode=0o644)
        await sink.write(batch(0))
        await sink.aclose()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.jsonl").stat().st_mode) == 0o644
    # an existing file keeps the mode the operator gave it
    os.chmod(tmp_path / "a.jsonl", 0o600)
    JsonLinesFileSink(tmp_path / "a.jsonl", file_mode=0o644).reopen()
    assert stat.S_IMODE((tmp_path / "a.jsonl").stat().st_mode) == 0o600


async def test_rotation_with_gzip_keeps_order_and_every_event(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = JsonLinesFileSink(path, max_bytes=120, backups=3, compress=True, file_mode=0o600)
    for i in range(12):  # 5 lines of ~ 10 bytes a batch: two batches a file, 5 rotations
        await sink.write(batch(i, 5))
    sink.wait_compressed()
    files = sink.files()
    await sink.aclose()
    assert [p.name for p in files] == ["events.jsonl", "events.jsonl.1.gz", "events.jsonl.2.gz",
                                       "events.jsonl.3.gz"]
    assert not list(tmp_path.glob("*.rotating-*")) and not list(tmp_path.glob("*.tmp"))
    kept = numbers(*reversed(files))  # oldest first
    assert kept == list(range(60 - len(kept), 60))  # the newest, contiguous, in order
    assert sink.rotations >= 4 and sink.compressed == sink.rotations
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)


async def test_a_rotation_left_by_a_crash_is_compressed_at_start(tmp_path):
    path = tmp_path / "events.jsonl"
    (tmp_path / "events.jsonl.rotating-1-1").write_bytes(batch(0).lines)
    sink = JsonLinesFileSink(path, compress=True)
    sink.wait_compressed()
    await sink.aclose()
    assert numbers(tmp_path / "events.jsonl.1.gz") == list(range(10))
    assert not (tmp_path / "events.jsonl.rotating-1-1").exists()


async def test_agent_on_fake_kernel_reopens_on_sighup(monkeypatch, tmp_path):
    """A real SIGHUP to the agent (fake kernel): denies before it land in the renamed
    file, denies after it in the new one; each exactly once."""
    k = FakeKernel(deny_ring_size=1 << 14, audit_ring_size=1 << 14)
    use_fake_kernel(monkeypatch, k, str(tmp_path / "state"))
    path = tmp_path / "events.jsonl"
    # storm window 0: each repeat of the one task's deny is an event (aggregation: test_deny_storm)
    cfg = agent.AgentConfig(events=str(path), tick_s=0.2, spool_dir=str(tmp_path / "spool"),
                            storm_window_s=0)
    from aegis_stream.testing._world import DEV_SDA1, sample_record

    rule = sample_record(7).policy.rules[0]
    task = FakeTask(cgroups=(CG_ROOT, CG_WORKLOADS, CG_APP))

    def deny(n: int) -> None:
        from aegis_stream.kernel import abi

        for _ in range(n):
            assert k.decide(abi.Hook.FILE_OPEN, DEV_SDA1, rule.ino, 1, task) != 0

    def denies_in(p) -> int:
        return sum(1 for line in p.read_text().splitlines()
                   if json.loads(line)["schema"] == "aegis.decision.v1" and json.loads(line)["decision"] == "deny")

    try:
        async with trio.open_nursery() as n:
            n.start_soon(agent.run_agent, cfg)
            await trio.sleep(0.5)
            deny(5)
            for _ in range(50):
                await trio.sleep(0.1)
                if path.exists() and denies_in(path) == 5:
                    break
            os.rename(path, tmp_path / "events.jsonl.old")
            os.kill(os.getpid(), signal.SIGHUP)
            await trio.sleep(0.3)
            deny(7)
            for _ in range(50):
                await trio.sleep(0.1)
                if path.exists() and denies_in(path) == 7:
                    break
            n.cancel_scope.cancel()
    finally:
        k.close()
    assert denies_in(tmp_path / "events.jsonl.old") == 5
    assert denies_in(path) == 7


def test_log_format_json_lines():
    class Raw:
        def __init__(self) -> None:
            self.out: list[str] = []

        def write(self, s: str) -> int:
            self.out.append(s)
            return len(s)

        def flush(self) -> None:
            pass

    raw = Raw()
    s = logjson.JsonLogStream(raw, clock=lambda: 1_800_000_000.25)  # type: ignore[arg-type]
    print("aegis: state: enforcing", file=s)
    print("aegis: error: policy unreadable; not started", file=s, end="")
    assert len(raw.out) == 1  # the partial line waits for its newline
    s.write("\nTraceback (most recent call last):\n")
    recs = [json.loads(line) for line in "".join(raw.out).splitlines()]
    assert [r["level"] for r in recs] == ["info", "error", "error"]
    assert recs[0]["message"] == "state: enforcing" and recs[0]["time"] == "2027-01-15T08:00:00.250Z"
    assert recs[1]["message"] == "policy unreadable; not started"
    assert recs[0]["pid"] == os.getpid() and recs[0]["logger"] == "aegis"


def test_cli_log_format_json_refusal_is_one_json_line(tmp_path):
    env = dict(os.environ, AEGIS_STATE_DIR=str(tmp_path / "s"), AEGIS_PIN_ROOT=str(tmp_path / "pins"),
               AEGIS_CONFIG="")
    out = subprocess.run([sys.executable, "-m", "aegis_stream.cli", "run", "--log-format", "json",
                          "--policy", str(tmp_path / "missing.toml"), "--events", os.devnull],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    rec = json.loads(lines[0])
    assert rec["level"] == "error" and "policy unreadable" in rec["message"]




@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate not installed (scripts/setup)")
def test_packaged_logrotate_config_rotates_by_date_without_creating(tmp_path):
    """packaging/logrotate run by a real logrotate (forced) on a copy aimed at tmp_path:
    the file moves to a date-stamped name, the agent's SIGHUP (postrotate: a no-op where
    systemd does not run) creates the next one; twice: the older one is gzipped."""
    conf = (ROOT / "packaging" / "logrotate").read_text()
    assert "/var/log/aegis/events.jsonl {" in conf and "copytruncate" not in conf.split("{", 1)[1]
    log = tmp_path / "events.jsonl"
    (tmp_path / "lr.conf").write_text(conf.replace("/var/log/aegis/events.jsonl", str(log)))
    state = tmp_path / "lr.state"

    def rotate() -> None:
        p = subprocess.run([shutil.which("logrotate") or "", "--force", "--state", str(state),
                            "--verbose", str(tmp_path / "lr.conf")], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "error" not in p.stderr.lower(), p.stderr

    log.write_text('{"n": 1}\n')
    rotate()
    rotated = sorted(tmp_path.glob("events.jsonl-*"))
    assert len(rotated) == 1 and re.fullmatch(r"events\.jsonl-\d{8}", rotated[0].name), rotated
    assert not log.exists()  # nocreate: the agent opens the next file itself, with its mode
    log.write_text('{"n": 2}\n')
    rotated[0].rename(tmp_path / "events.jsonl-20000101")  # dateext names by day: yesterday's
    rotate()
    names = sorted(p.name for p in tmp_path.glob("events.jsonl-*"))
    assert names[0] == "events.jsonl-20000101.gz" and re.fullmatch(r"events\.jsonl-\d{8}", names[1]), names
    assert numbers(tmp_path / "events.jsonl-20000101.gz") == [1]
