"""aegis fleet ship against the real broker: an agent's events file (the real pipeline on
the fake kernel) and its Kafka spool are published once, with the sink's topics, keys and
headers; a re-ship publishes nothing; what cannot be shipped is said and counted."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import msgspec
import pytest
import trio

from aegis_stream.fleet.ship import ShipError, _item, _Ledger, ship
from aegis_stream.kernel import abi
from aegis_stream.pipeline import Pipeline, PipelineConfig
from aegis_stream.pipeline.sinks import JsonLinesFileSink, SinkBatch
from aegis_stream.policy.store import PolicyStore
from aegis_stream.testing import (
    CG_APP,
    CG_ROOT,
    CG_WORKLOADS,
    DEV_SDA1,
    FakeKernel,
    FakeTask,
    fixed_normaliser,
    install,
    make_events,
    sample_record,
)

from .readback import read_topic

AEGIS = [sys.executable, "-m", "aegis_stream.cli"]
APP = FakeTask(pid=4242, tgid=4242, comm="cat", cgroups=(CG_ROOT, CG_WORKLOADS, CG_APP))
TOPICS = ("aegis.decision.v1", "aegis.explanation.v1", "aegis.state.v1")


def run_agent(out: Path, host: str, *, denies: int = 7, audits: int = 40) -> Path:
    """The real pipeline on the fake kernel writing its events file (as `aegis run
    --events` does); returns the file."""
    out.mkdir(parents=True, exist_ok=True)
    events = out / "events.jsonl"

    async def main() -> None:
        k = FakeKernel(deny_ring_size=1 << 16, audit_ring_size=1 << 16)
        try:
            store = PolicyStore(out / "state")
            install(k, store, sample_record(7, mode="enforce"))
            sink = JsonLinesFileSink(events)
            norm = fixed_normaliser(store)
            norm.host = host
            p = Pipeline(k.consumers(), norm, [sink], k.view(),
                         config=PipelineConfig(spool_dir=str(out / "spool"), tick_s=0.2))
            async with trio.open_nursery() as n:
                await n.start(p.run)
                for _ in range(denies):
                    assert k.decide(abi.Hook.FILE_OPEN, DEV_SDA1, 1234, abi.ACTION_OPEN, APP) == -1
                    await trio.sleep(0.001)
                k.emit_bulk("audit", make_events(audits, generation=7), audits)
                await trio.sleep(0.3)
                assert await p.drain_and_stop()
            await sink.aclose()
        finally:
            k.close()

    trio.run(main)
    return events


def mine(bootstrap: str, host: str) -> dict[str, list]:
    return {t: [r for r in read_topic(bootstrap, t) if r.key == host.encode()] for t in TOPICS}


def lines_by_schema(events: Path) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for line in events.read_bytes().splitlines():
        out.setdefault(msgspec.json.decode(line)["schema"], []).append(line)
    return out


def test_ship_events_file_once_with_sink_keys_and_headers(kafka_broker, tmp_path):
    host = f"ship-{uuid.uuid4().hex[:8]}"
    events = run_agent(tmp_path / "agent", host)
    want = lines_by_schema(events)
    res = ship(kafka_broker.bootstrap, events=[events])
    assert res.failed == 0 and res.already == 0 and res.duplicates == 0
    assert res.shipped == {"deny": 7, "audit": 40, "explanation": 7, "state": len(want["aegis.state.v1"])}
    got = mine(kafka_broker.bootstrap, host)
    # every event exactly once, byte for byte, in the file's order (one host = one partition)
    assert [r.value for r in got["aegis.decision.v1"]] == want["aegis.decision.v1"]
    assert [r.value for r in got["aegis.explanation.v1"]] == want["aegis.explanation.v1"]
    assert [r.value for r in got["aegis.state.v1"]] == want["aegis.state.v1"]
    assert len({r.partition for r in got["aegis.decision.v1"]}) == 1
    r = got["aegis.decision.v1"][0]
    assert r.headers == {"aegis-schema": b"aegis.decision.v1", "aegis-schema-version": b"1"}
    # every deny has its explanation
    deny_ids = {x.doc["event_id"] for x in got["aegis.decision.v1"] if x.doc["decision"] == "deny"}
    assert deny_ids == {x.doc["event_id"] for x in got["aegis.explanation.v1"]} and len(deny_ids) == 7

    # a re-ship publishes nothing: the ledger (per cluster) has every acknowledged event
    again = ship(kafka_broker.bootstrap, events=[events])
    assert sum(again.shipped.values()) == 0 and again.already == sum(res.shipped.values())
    assert {t: len(v) for t, v in mine(kafka_broker.bootstrap, host).items()} == \
        {t: len(v) for t, v in got.items()}


def test_ship_cli_spool_and_events_dedup_torn_line_and_raw_spool(kafka_broker, tmp_path):
    """The sink's Kafka spool holds denies the file also has: each is published once.  A
    torn last line is counted, not shipped.  Raw denies in deny.spool: exit 3, said."""
    from aegis_stream.fleet.sink import LineSpool
    from aegis_stream.kernel.ringbuf import RawBatch
    from aegis_stream.pipeline.spool import DiskSpool

    host = f"spool-{uuid.uuid4().hex[:8]}"
    agent = tmp_path / "agent"
    events = run_agent(agent, host, denies=4, audits=5)
    by = lines_by_schema(events)
    denies = [x for x in by["aegis.decision.v1"] if b'"decision":"deny"' in x]
    spool_dir = agent / "spool"
    sp = LineSpool(spool_dir, 1 << 20)
    sp.append(SinkBatch("deny", b"".join(x + b"\n" for x in denies[:3]), 3))
    sp.append(SinkBatch("explanation", b"".join(x + b"\n" for x in by["aegis.explanation.v1"][:3]), 3))
    sp.close()
    with open(events, "ab") as fh:
        fh.write(b'{"schema":"aegis.decision.v1","event_id":"torn')  # a killed writer
    raw = DiskSpool(spool_dir, 1 << 20)
    raw.append(RawBatch(b"\0" * 104 * 2, 2))
    raw.close()

    out = subprocess.run([*AEGIS, "fleet", "ship", "--kafka", kafka_broker.bootstrap,
                          "--spool", str(spool_dir), "--events", str(events)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr
    summary = out.stdout.strip()
    assert summary.count("\n") == 0
    assert "deny 4, audit 5, explanation 4" in summary
    assert "6 duplicate(s)" in summary and "1 line(s) not aegis events" in summary
    assert "2 raw denies in deny.spool NOT shipped" in summary
    got = mine(kafka_broker.bootstrap, host)
    ids = [r.doc["event_id"] for r in got["aegis.decision.v1"] if r.doc["decision"] == "deny"]
    assert len(ids) == 4 == len(set(ids))
    assert (spool_dir / "kafka.spool").stat().st_size > 0  # left for the agent, not consumed


def test_ship_errors_are_one_line(kafka_broker, tmp_path):
    with pytest.raises(ShipError, match="nothing to ship"):
        ship(kafka_broker.bootstrap)
    with pytest.raises(ShipError, match="does not exist"):
        ship(kafka_broker.bootstrap, events=[tmp_path / "missing.jsonl"])
    events = tmp_path / "e.jsonl"
    events.write_text("")
    for bootstrap, words in (("nope", "bad bootstrap"), ("127.0.0.1:1", "cannot reach Kafka")):
        out = subprocess.run([*AEGIS, "fleet", "ship", "--kafka", bootstrap, "--events", str(events)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and words in out.stderr and out.stderr.count("\n") == 1, out.stderr
        assert "Traceback" not in out.stderr


def test_interrupted_ship_is_resolved_by_reading_back_never_duplicated(kafka_broker, tmp_path):
    """A ship killed after the broker took a chunk but before the ledger said so: the next
    ship finds those records on the topics and skips them; records intended but never
    produced are shipped."""
    host = f"doubt-{uuid.uuid4().hex[:8]}"
    events = run_agent(tmp_path / "agent", host, denies=5, audits=10)
    ledger = tmp_path / "ledger"
    first = ship(kafka_broker.bootstrap, events=[events], ledger=ledger)
    n = sum(first.shipped.values())
    assert first.failed == 0 and n == len(events.read_bytes().splitlines())
    # the crash: every acknowledgement lost from the ledger (only the intents remain) ...
    ledger.write_text("".join(x + "\n" for x in ledger.read_text().splitlines()
                              if x.startswith("?")))
    # ... and a second file whose chunk was intended but never reached the broker
    other = run_agent(tmp_path / "agent2", host + "-b", denies=2, audits=0)
    _Ledger(ledger).intend([_item(x).key for x in other.read_bytes().splitlines()])
    again = ship(kafka_broker.bootstrap, events=[events, other], ledger=ledger)
    m = len(other.read_bytes().splitlines())
    assert again.in_doubt == n + m and again.already == n
    assert sum(again.shipped.values()) == m and again.failed == 0
    got = mine(kafka_broker.bootstrap, host)
    ids = [r.doc["event_id"] for r in got["aegis.decision.v1"]]
    assert len(ids) == len(set(ids)) == 15  # nothing published twice
    assert len(mine(kafka_broker.bootstrap, host + "-b")["aegis.decision.v1"]) == 2
    # and now everything is acked: a third ship has nothing in doubt and ships nothing
    third = ship(kafka_broker.bootstrap, events=[events, other], ledger=ledger)
    assert third.in_doubt == 0 and sum(third.shipped.values()) == 0
