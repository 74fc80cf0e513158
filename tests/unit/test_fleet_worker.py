"""The fleet worker's aggregation logic without Kafka (pipelines/fleet_logic.py), and the
aegis.fleet.v1 golden vectors.  The worker on a real broker: tests/fleet/test_worker*.py."""

from __future__ import annotations

import calendar
import os
import random
from pathlib import Path

import msgspec
import pytest

from aegis_stream.pipeline.schema import FleetEvent, FleetHost, FleetRule
from aegis_stream.processors.degraded import DegradedConfig
from aegis_stream.processors.slo import SloConfig
from pipelines import fleet_gen as g
from pipelines import fleet_logic as fl

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "fleet_vectors.json"
_enc = msgspec.json.Encoder()


class Tables:
    """A dict standing in for the faust table: rows by (kind, key)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], fl.Counts] = {}

    def get(self, kind: str, key: str) -> fl.Counts:
        row = self.rows.get((kind, key))
        return fl.Counts() if row is None else msgspec.structs.replace(row)

    def write(self, changed: dict[tuple[str, str], fl.Counts]) -> None:
        self.rows.update(changed)

    def totals(self) -> tuple[int, int]:
        hosts = [r for (k, _), r in self.rows.items() if k == "hosts"]
        return sum(r.deny for r in hosts), sum(r.audit for r in hosts)

    def by_host(self) -> dict[str, list[int]]:
        return {key.split("|", 1)[1]: [r.deny, r.audit] for (k, key), r in self.rows.items() if k == "hosts"}


def _records(n: int, partitions: int = 3) -> list[tuple[int, int, bytes]]:
    """Decisions spread over partitions by host, offsets per partition in order."""
    out = []
    offsets = [0] * partitions
    for ev in g.decisions(n, hosts=7, rules=5):
        p = int(ev.host[-3:]) % partitions
        out.append((p, offsets[p], _enc.encode(ev)))
        offsets[p] += 1
    return out


def _by_partition(recs):
    per: dict[int, list] = {}
    for r in recs:
        per.setdefault(r[0], []).append(r)
    return per


def test_fold_counts_exact_and_one_write_per_key():
    recs = _records(3000)
    t = Tables()
    changed, result = fl.fold_exact(recs, 60, t.get)
    t.write(changed)
    want = g.expected(list(g.decisions(3000, hosts=7, rules=5)))
    assert t.totals() == (want.denies, want.audits)
    assert t.by_host() == want.by_host
    assert result.records == 3000 and result.bad == 0
    # one row per key: 7 hosts, 5 rules x 2 generations x partitions, no more
    assert len([k for k in changed if k[0] == "hosts"]) == 7
    rules = fl.merge_rules((key, r) for (k, key), r in t.rows.items() if k == "rules")
    assert {f"{r}|{gen}": c.deny for (r, gen), c in rules.items() if c.deny} == want.by_rule


def test_replay_after_restart_counts_nothing_twice():
    """A restart replays from the progress offset, which may be before what some rows
    absorbed (rows written, progress not yet): the rows' hw makes it exact; the naive
    fold (faust's default at-least-once) over-counts the same replay."""
    recs = _records(4000)
    want = g.expected(list(g.decisions(4000, hosts=7, rules=5)))
    for fold, exact in ((fl.fold_exact, True), (fl.fold_naive, False)):
        t = Tables()
        per = _by_partition(recs)
        first = [r for p in per for r in per[p][: len(per[p]) // 2]]
        t.write(fold(first, 60, t.get)[0])
        # the crash lost some rows' last write: partition 0's host rows roll back
        lost = {k: v for k, v in t.rows.items() if k[0] == "hosts" and k[1].startswith("0|")}
        for k in lost:
            del t.rows[k]
        # replay from a progress offset a quarter in: straddles the surviving rows' hw
        replay = [r for p in per for r in per[p][len(per[p]) // 4:]]
        random.Random(1).shuffle(replay)
        replay.sort(key=lambda r: (r[0], r[1]))
        for i in range(0, len(replay), 700):
            t.write(fold(replay[i:i + 700], 60, t.get)[0])
        # partition 0's host rows restart from nothing: what replay covers only
        got = t.totals()
        if exact:
            part0 = [r for r in recs if r[0] == 0]
            missing = g.expected([fl.decision_decoder.decode(v) for _, _, v in part0[: len(part0) // 4]])
            assert got == (want.denies - missing.denies, want.audits - missing.audits)
            # and the rule rows, which kept their writes, are exactly complete
            rules = fl.merge_rules((key, r) for (k, key), r in t.rows.items() if k == "rules")
            assert sum(c.deny for c in rules.values()) == want.denies
        else:
            rules = fl.merge_rules((key, r) for (k, key), r in t.rows.items() if k == "rules")
            assert sum(c.deny for c in rules.values()) > want.denies


def test_same_batch_twice_is_a_no_op():
    recs = _records(500)
    t = Tables()
    t.write(fl.fold_exact(recs, 60, t.get)[0])
    before = t.totals()
    changed, _ = fl.fold_exact(recs, 60, t.get)
    assert changed == {} and t.totals() == before


def test_bad_records_counted_not_raised():
    recs = [(0, 0, b"{not json"), (0, 1, _enc.encode(g.decision(1, hosts=1, rules=1, t0=0, rate=1))),
            (0, 2, _enc.encode(msgspec.structs.replace(g.decision(2, hosts=1, rules=1, t0=0, rate=1),
                                                       time="yesterday"))),
            (0, 3, _enc.encode(msgspec.structs.replace(g.decision(3, hosts=1, rules=1, t0=0, rate=1),
                                                       decision="maybe")))]
    t = Tables()
    changed, result = fl.fold_exact(recs, 60, t.get)
    assert result.records == 4 and result.bad == 3
    assert result.bad_reasons == {"undecodable": 1, "bad_field": 2}
    assert sum(r.deny + r.audit for (k, _), r in changed.items() if k == "hosts") == 1


def test_windows_are_tumbling_by_decision_time():
    evs = [msgspec.structs.replace(g.decision(i, hosts=1, rules=1, t0=0, rate=1), decision="deny",
                                   time=t) for i, t in enumerate(
        ["2026-12-01T08:00:59.999999Z", "2026-12-01T08:01:00.000000Z", "2026-12-01T08:01:59.000000Z"])]
    result = fl.fold_decisions([(0, i, _enc.encode(e)) for i, e in enumerate(evs)], 60)
    starts = {fl.split_window_key(k)[3]: d.deny for k, d in result.windows.items()}
    base = calendar.timegm((2026, 12, 1, 8, 0, 0))
    assert starts == {base: 1, base + 60: 2}


def test_epoch_s_matches_calendar():
    assert fl.epoch_s("1970-01-01T00:00:00.000000Z") == 0
    assert fl.epoch_s("2026-12-01T08:39:07.123456Z") == calendar.timegm((2026, 12, 1, 8, 39, 7))
    with pytest.raises(ValueError, match="bad decision time"):
        fl.epoch_s("not a time at all")


def test_top_rules_order_and_ties():
    merged = {("b", 1): fl.Counts(deny=5), ("a", 2): fl.Counts(deny=5), ("a", 1): fl.Counts(deny=5),
              ("c", 1): fl.Counts(deny=9), ("z", 1): fl.Counts(deny=0, audit=4)}
    top = fl.top_rules(merged, 3)
    assert [(t.rule_id, t.generation, t.denies) for t in top] == [("c", 1, 9), ("a", 1, 5), ("a", 2, 5)]
    assert all(t.denies for t in fl.top_rules(merged, 10))  # audits-only rules are not "denied"


def _state(host: str, state: str = "enforcing", **kw):
    return fl.state_decoder.decode(g.state(host, state, **kw))


def test_host_state_worst_of_agent_and_monitor_and_dedup():
    row = fl.HostRow(host="h")
    ev = _state("h", "degraded", reasons=["sink failing: kafka"])
    assert fl.apply_state(row, 5, ev, 100.0, DegradedConfig(), SloConfig())
    assert row.state == "degraded" and row.agent_state == "degraded"
    assert "sink_failing" in row.reason_codes
    assert not fl.apply_state(row, 5, ev, 101.0, DegradedConfig(), SloConfig())  # replay
    # the agent says enforcing but its record shows a ring 90% full: the monitor (the
    # agent's own DegradedMonitor, same thresholds) judges degraded
    ev2 = _state("h")
    ev2 = msgspec.structs.replace(ev2, ring_fill={"deny": 0.9})
    assert fl.apply_state(row, 6, ev2, 102.0, DegradedConfig(), SloConfig())
    assert row.agent_state == "enforcing" and row.state == "degraded"
    assert "ring_high" in row.reason_codes


def test_silence_degrades_and_a_new_record_clears_it():
    row = fl.HostRow(host="h")
    ev = _state("h")
    fl.apply_state(row, 0, ev, 1000.0, DegradedConfig(), SloConfig())
    assert row.state == "enforcing"
    assert not fl.check_silence(row, 1029.0, 30.0)
    assert fl.check_silence(row, 1031.0, 30.0)
    assert row.silent and row.state == "degraded" and "agent_unresponsive" in row.reason_codes
    assert not fl.check_silence(row, 1040.0, 30.0)  # already silent: no second change
    fl.apply_state(row, 1, ev, 1041.0, DegradedConfig(), SloConfig())
    assert not row.silent and row.state == "enforcing" and row.reason_codes == []


def test_fleet_slo_window_sums_hosts_and_survives_counter_reset():
    cfg = SloConfig()
    rows = []
    for host, (e1, d1, e2, d2) in {"a": (1000, 0, 2000, 10), "b": (500, 0, 100, 5)}.items():
        row = fl.HostRow(host=host)
        ev = _state(host, emitted={"audit": e1}, dropped={"audit": d1})
        fl.apply_state(row, 0, ev, 100.0, DegradedConfig(), cfg)
        ev = _state(host, emitted={"audit": e2}, dropped={"audit": d2})  # b: agent restarted
        fl.apply_state(row, 1, ev, 110.0, DegradedConfig(), cfg)
        rows.append(row)
    w = fl.fleet_window(rows, "audit", 3600, 110.0)
    assert (w.emitted, w.dropped) == (2000 + 600, 15)
    assert rows[1].emitted == {"audit": 600} and rows[1].dropped == {"audit": 5}


def _golden_events() -> list[tuple[str, FleetEvent]]:
    base = dict(event_id="fleet-1:42-1796000000000000000-1", time="2026-12-01T08:00:00.000000Z",
                worker="fleet-1:42", partitions=[0, 1, 2, 3, 4, 5], hosts=3,
                hosts_by_state={"enforcing": 2, "degraded": 1}, silent_hosts=["host-002"],
                denies=80000, audits=20000, window_s=60, window_start="2026-12-01T07:59:00.000000Z",
                window_denies=1234,
                top_rules=[FleetRule(rule_id="rule-7", generation=3, denies=900, audits=12)])
    return [
        ("summary", FleetEvent(kind="summary", **base)),
        ("host-silent", FleetEvent(kind="host_state", previous="enforcing", host=FleetHost(
            host="host-002", state="degraded", agent_state="enforcing", silent=True,
            reason_codes=["agent_unresponsive"]), **base)),
        ("slo-firing", FleetEvent(kind="slo_alert", event_class="audit", alert="page", status="firing",
                                  objective=0.001, burn_long=20.5, burn_short=31.25, emitted_long=100000,
                                  dropped_long=2050, **base)),
    ]


def test_fleet_event_golden_vectors():
    """The exact aegis.fleet.v1 bytes; a deliberate change regenerates them:
    ``AEGIS_REGEN_GOLDEN=1 pytest tests/unit/test_fleet_worker.py`` (and review the diff)."""
    current = [{"name": n, "expected": msgspec.to_builtins(e)} for n, e in _golden_events()]
    if os.environ.get("AEGIS_REGEN_GOLDEN"):
        GOLDEN.write_bytes(msgspec.json.format(_enc.encode(current), indent=2) + b"\n")
    vectors = msgspec.json.decode(GOLDEN.read_bytes())
    assert [v["name"] for v in vectors] == [n for n, _ in _golden_events()], "vector set changed: regenerate"
    dec = msgspec.json.Decoder(FleetEvent)
    for v, (name, ev) in zip(vectors, _golden_events(), strict=True):
        want = _enc.encode(v["expected"])
        assert _enc.encode(ev) == want, name
        assert dec.decode(want) == ev, name
        assert v["expected"]["schema"] == "aegis.fleet.v1"


def test_aegis_fleet_worker_finds_pipelines_or_says_why(monkeypatch, capsys):
    from aegis_stream.cli import fleet as cli_fleet
    from aegis_stream.cli.main import main

    assert cli_fleet.find_pipelines() == Path(fl.__file__).parent  # the checkout's
    monkeypatch.setenv("AEGIS_PIPELINES", "/nonexistent/pipelines")
    assert main(["fleet", "worker", "--kafka", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "AEGIS_PIPELINES" in err[0], err


def test_worker_settings_refuse_bad_values():
    from pipelines import fleet

    p = fleet.parser()
    with pytest.raises(ValueError, match="metrics-addr"):
        fleet.settings_from(p.parse_args(["worker", "--kafka", "k:1", "--metrics-addr", "nope"]))
    with pytest.raises(ValueError, match="must be > 0"):
        fleet.settings_from(p.parse_args(["worker", "--kafka", "k:1", "--window", "0"]))
    s = fleet.settings_from(p.parse_args(["worker", "--kafka", "k:1"]))
    assert not s.web and not s.metrics_addr and not s.naive  # no server unless asked


def test_state_topic_carries_slo_alerts_too():
    """The agent's sink puts aegis.slo.v1 on the state topic: recorded, not 'bad'."""
    from aegis_stream.pipeline.schema import SloEvent

    slo = SloEvent(event_id="e", time="2026-12-01T08:00:00.000000Z", host="h", event_class="audit",
                   alert="page", status="firing", objective=0.001, long_window_s=3600.0,
                   short_window_s=300.0, burn_threshold=14.4, burn_long=20.0, burn_short=30.0,
                   emitted_long=1000, dropped_long=20)
    ev = fl.state_topic_decoder.decode(_enc.encode(slo))
    assert isinstance(ev, SloEvent)
    row = fl.HostRow(host="h")
    assert fl.apply_slo(row, 3, ev) and row.agent_alerts == {"audit/page": "firing"}
    assert not fl.apply_slo(row, 3, ev)
    st = _state("h")
    assert not fl.apply_state(row, 2, st, 1.0, DegradedConfig(), SloConfig())  # older


# ------------------------------------------------------------------ dedup by event_id
def _ev(i: int, *, host: str = "h", boot: str = "b00t0001", kt: int | None = None,
        decision: str = "deny", tid: int = 7):
    """A decision with its event_id built from (boot, ktime, tid) as the agent builds it."""
    kt = 10**9 + i * 10**6 if kt is None else kt  # 1 ms apart by default
    base = g.decision(i, hosts=1, rules=3, t0=1_796_000_000, rate=1000)
    return msgspec.structs.replace(base, host=host, decision=decision, ktime_ns=kt,
                                   event_id=f"{boot}-{kt}-{tid}")


def _log(evs, partition: int = 0, start: int = 0) -> list[tuple[int, int, bytes]]:
    return [(partition, start + i, _enc.encode(e)) for i, e in enumerate(evs)]


def _fold_all(t: Tables, recs, batch: int = 100, window_ns: int = fl.DEDUP_WINDOW_NS):
    dups: dict[str, int] = {}
    for i in range(0, len(recs), batch):
        changed, acct = fl.fold_exact(recs[i:i + batch], 60, t.get, window_ns)
        t.write(changed)
        for k, n in acct.duplicates.items():
            dups[k] = dups.get(k, 0) + n
    return dups


def _rule_denies(t: Tables) -> int:
    return sum(c.deny for c in fl.merge_rules((key, r) for (k, key), r in t.rows.items()
                                              if k == "rules").values())


def test_a_replayed_deny_batch_is_counted_once():
    """The sink's spool replay: batches produced (not acked in time) and produced again
    later, at new offsets, behind newer records; each event_id counts once, the repeats
    are counted as duplicates, per host row, in every table."""
    evs = [_ev(i, decision="audit" if i % 4 == 0 else "deny") for i in range(600)]
    denies = [e for e in evs if e.decision == "deny"]
    stream = evs[:300] + denies[100:180] + evs[300:] + denies[200:230]
    t = Tables()
    dups = _fold_all(t, _log(stream), batch=64)
    assert t.totals() == (len(denies), 150)
    assert _rule_denies(t) == len(denies)
    wins = sum(r.deny for (k, _), r in t.rows.items() if k == "windows")
    assert wins == len(denies)
    assert dups == {"deny": 110}
    assert t.rows[("hosts", "0|h")].duplicates == {"deny": 110}
    # the naive fold (faust's defaults) counts them all
    n = Tables()
    _fold_all_naive = [n.write(fl.fold_naive(_log(stream)[i:i + 64], 60, n.get)[0])
                       for i in range(0, len(stream), 64)]
    assert _fold_all_naive and n.totals()[0] == len(denies) + 110


def test_out_of_order_within_the_window_is_kept_and_older_is_a_repeat():
    w = fl.DEDUP_WINDOW_NS
    base = 50 * 10**9
    evs = [_ev(0, kt=base), _ev(1, kt=base - w // 2, tid=8),  # another CPU, half a window late
           _ev(2, kt=base - w + 1, tid=9),  # just inside
           _ev(3, kt=base + 10), _ev(4, kt=base - w // 2, tid=8),  # a repeat of #1
           _ev(5, kt=base + 10 - w - 1, tid=3)]  # below the window: older than any kept id
    t = Tables()
    dups = _fold_all(t, _log(evs))
    assert t.totals() == (4, 0) and dups == {"deny": 2}
    # what the window below the newest ktime must keep (older ids may linger until pruned
    # from the oldest end: the ktime test decides them)
    ids = t.rows[("hosts", "0|h")].seen["deny|b00t0001"].ids.values()
    assert sorted(v for v in ids if v >= base + 10 - w) == [base - w // 2, base, base + 10]
    assert len(ids) <= 4


def test_two_boots_of_one_host_never_collide_and_an_old_boot_still_dedups():
    """After a reboot ktime restarts low: a new boot id, its own window; the old boot's
    spool replayed after the new boot's records is still recognised."""
    boot1 = [_ev(i, boot="aaaaaaaa", kt=10**9 * 100 + i * 10**6) for i in range(200)]
    boot2 = [_ev(i, boot="bbbbbbbb", kt=10**9 + i * 10**6) for i in range(200)]  # low ktimes
    stream = boot1 + boot2[:50] + boot1[150:] + boot2[50:]  # boot1's tail replayed
    t = Tables()
    dups = _fold_all(t, _log(stream), batch=33)
    assert t.totals() == (400, 0) and dups == {"deny": 50}
    # the same ktime and tid on another boot is another decision
    t2 = Tables()
    same = [_ev(0, boot="aaaaaaaa", kt=5), _ev(0, boot="bbbbbbbb", kt=5)]
    assert _fold_all(t2, _log(same)) == {} and t2.totals() == (2, 0)


def test_boots_kept_per_host_are_bounded():
    evs = [_ev(i, boot=f"{i:08x}", kt=10**9) for i in range(fl.MAX_BOOTS + 5)]
    t = Tables()
    _fold_all(t, _log(evs))
    row = t.rows[("hosts", "0|h")]
    assert len(row.seen) == fl.MAX_BOOTS
    assert "deny|00000000" not in row.seen and f"deny|{fl.MAX_BOOTS + 4:08x}" in row.seen


def test_dedup_state_restored_from_the_changelog_and_exact_across_any_crash_point():
    """The worker's life on a changelog: every batch writes its changed rows (in the
    fold's order) then the progress row; a kill -9 keeps any prefix of those writes; the
    restart restores each key's last surviving value (as bytes or, as faust hands a
    restored value back, decoded to a dict) and re-reads from progress + 1 with other
    batch sizes.  At every crash point the counts are exact per host and per rule and
    the duplicates counted once."""
    rnd = random.Random(7)
    stream = []
    for h in ("h1", "h2", "h3"):
        evs = [_ev(i, host=h, decision="audit" if i % 5 == 0 else "deny", tid=i % 13) for i in range(240)]
        stream.append(evs[:120] + [e for e in evs[60:110] if e.decision == "deny"] + evs[120:]
                      + [e for e in evs[200:215] if e.decision == "deny"])
    # interleave the hosts in one partition, keeping each host's order
    merged = []
    while any(stream):
        s = rnd.choice([s for s in stream if s])
        merged.append(s.pop(0))
    recs = _log(merged, partition=2)
    unique = {(e.host, e.event_id): e for e in merged}
    want_deny = sum(1 for e in unique.values() if e.decision == "deny")
    want_audit = len(unique) - want_deny
    want_dups = len(merged) - len(unique)

    def run_batches(table, log, start, size):
        i = start
        while i < len(recs):
            changed, _ = fl.fold_exact(recs[i:i + size], 60, table.get)
            for (kind, key), row in changed.items():
                table.rows[(kind, key)] = row
                log.append(((kind, key), fl.encode_row(row)))
            end = recs[min(i + size, len(recs)) - 1][1]
            log.append((("@", "2"), fl.encode_row(fl.Counts(hw=end))))
            i += size

    full: list = []
    run_batches(Tables(), full, 0, 50)
    for cut in sorted(rnd.sample(range(len(full)), 40)) + [0, len(full)]:
        t = Tables()
        progress = -1
        for (kind, key), raw in full[:cut]:
            if kind == "@":
                progress = fl.decode_counts(raw).hw
            else:  # restored: bytes, or decoded as faust hands some back
                t.rows[(kind, key)] = fl.decode_counts(msgspec.json.decode(raw) if cut % 2 else raw)
        run_batches(t, [], progress + 1, 37)
        assert t.totals() == (want_deny, want_audit), cut
        assert _rule_denies(t) == want_deny, cut
        got_dups = sum(sum(r.duplicates.values()) for (k, _), r in t.rows.items() if k == "hosts")
        assert got_dups == want_dups, cut


def test_metrics_report_duplicates_and_the_fleet_slo():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from pipelines.fleet_metrics import FleetCollector

    cfg = SloConfig()
    rows = []
    for i, (host, e, d) in enumerate((("a", 10_000, 300), ("b", 30_000, 0))):
        row = fl.HostRow(host=host)
        fl.apply_state(row, 0, _state(host, emitted={"audit": e, "deny": 50}, dropped={"audit": d, "deny": 0}),
                       1000.0 + i, DegradedConfig(), cfg)
        rows.append(row)
    h = fl.Counts(deny=7, audit=1, duplicates={"deny": 3})
    reg = CollectorRegistry()
    reg.register(FleetCollector(lambda: rows, lambda kind: [("0|a", h)] if kind == "h" else [],
                                {"lag": {}, "bad_reasons": {"duplicate": 3}, "records": 11, "state_records": 2,
                                 "slo_firing": {"audit/page": True}}, cfg, clock=lambda: 1010.0))
    m = {(s.name, tuple(sorted(s.labels.items()))): s.value
         for fam in text_string_to_metric_families(generate_latest(reg).decode()) for s in fam.samples}
    assert m[("aegis_fleet_duplicates_total", (("decision", "deny"),))] == 3
    assert m[("aegis_fleet_host_duplicates", (("decision", "deny"), ("host", "a")))] == 3
    assert m[("aegis_fleet_records_dropped_total", (("reason", "duplicate"),))] == 3
    assert m[("aegis_fleet_host_slo_events", (("class", "audit"), ("host", "a"), ("kind", "dropped")))] == 300
    assert m[("aegis_fleet_slo_events_total", (("class", "audit"), ("kind", "emitted")))] == 40_000
    assert m[("aegis_fleet_drop_ratio", (("class", "audit"),))] == pytest.approx(300 / 40_000)
    assert m[("aegis_fleet_slo_window_events", (("class", "audit"), ("kind", "dropped"), ("window", "1h")))] == 300
    assert m[("aegis_fleet_slo_burn_rate", (("class", "audit"), ("window", "5m")))] == pytest.approx(7.5)
    assert m[("aegis_fleet_slo_alert_firing", (("alert", "page"), ("class", "audit")))] == 1
    assert m[("aegis_fleet_slo_alert_firing", (("alert", "page"), ("class", "deny")))] == 0
