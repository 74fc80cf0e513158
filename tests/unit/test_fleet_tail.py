"""aegis tail without a broker: line format, terminal-safe escaping, filters, bootstrap
checks, and the loop (count, filtered and undecodable records) over a fake source."""

from __future__ import annotations

import io

import msgspec
import pytest

from aegis_stream.fleet.tail import (
    TailError,
    TailFilter,
    escape,
    format_human,
    parse_bootstrap,
    render,
    tail,
)
from aegis_stream.pipeline.schema import DecisionEvent


def decision(**kw) -> DecisionEvent:
    base = dict(
        event_id="01234567-1000-4242", time="2026-12-01T08:00:00.000000Z", ktime_ns=1000,
        host="host-1", hook="file_open", action="open", decision="deny", mode="enforce",
        rule_id="deny-shadow", rule_index=0, generation=7, policy_name="p", policy_version=3,
        policy_digest="sha256:ab", rule_source="/etc/shadow", dev="8:1", ino=1234,
        cgroup_id=1001, cgroup_path="/sys/fs/cgroup/w/app", scope_cgroup_id=1000,
        scope_cgroup_path="/sys/fs/cgroup/w", pid=4242, tid=4242, uid=0, gid=0, comm="cat",
    )
    base.update(kw)
    return DecisionEvent(**base)


def value(ev) -> bytes:
    return msgspec.json.encode(ev)


def as_dict(ev) -> dict:
    return msgspec.json.decode(value(ev))


def test_human_line_has_every_field_in_order():
    line = format_human(as_dict(decision()))
    assert line == ("2026-12-01T08:00:00.000000Z host-1 DENY  deny-shadow open cat[4242] "
                    "/etc/shadow gen=7")


def test_human_line_falls_back_to_dev_ino_and_rule_index():
    line = format_human(as_dict(decision(rule_source="inode:8:1:99", rule_id="", rule_index=2,
                                         decision="audit", ino=99)))
    assert " AUDIT #2 " in line and line.endswith(" 8:1:99 gen=7")


@pytest.mark.parametrize("raw, shown", [
    ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),  # OSC: retitles the terminal
    ("a\nb\rc\td", "a\\x0ab\\x0dc\\x09d"),  # a forged second line
    ("\x9b2J", "\\x9b2J"),  # C1 CSI: clears the screen on some terminals
    ("x\u202eexe.txt", "x\\u202eexe.txt"),  # right-to-left override hides the real name
    ("zw\u200bj", "zw\\u200bj"),
    ("back\\x41", "back\\\\x41"),  # a literal backslash cannot fake an escape
    ("naïve-名前", "naïve-名前"),  # printable non-ASCII stays readable
    ("\x7f", "\\x7f"),
])
def test_escape(raw, shown):
    assert escape(raw) == shown


def test_attacker_controlled_fields_are_escaped_in_human_output_and_exact_in_json():
    evil = decision(comm="\x1b[2J\x1b[Hok", rule_source="/tmp/\nFAKE host-9 AUDIT",
                    host="h\x07")
    v = value(evil)
    line = render(v, TailFilter(), as_json=False)
    assert line is not None
    assert "\x1b" not in line and "\n" not in line and "\x07" not in line
    assert "\\x1b[2J\\x1b[Hok[4242]" in line and "/tmp/\\x0aFAKE host-9 AUDIT" in line
    assert all(c.isprintable() for c in line)
    exact = render(v, TailFilter(), as_json=True)
    assert exact == v.decode() and msgspec.json.decode(exact.encode())["comm"] == evil.comm


def test_filters():
    d = as_dict(decision())
    assert TailFilter().matches(d)
    assert TailFilter(decision="deny", rule="deny-shadow", host="host-1").matches(d)
    assert not TailFilter(decision="audit").matches(d)
    assert not TailFilter(rule="deny-nc").matches(d)
    assert not TailFilter(host="host-2").matches(d)
    assert not TailFilter().matches({**d, "schema": "aegis.state.v1"})  # not a decision


@pytest.mark.parametrize("good", ["127.0.0.1:9092", "a:1,b.example:65535", " k1:9092 , k2:9092 ",
                                  "[::1]:9092"])
def test_bootstrap_ok(good):
    assert " " not in parse_bootstrap(good)


@pytest.mark.parametrize("bad", ["", "nope", "host:", ":9092", "h:0", "h:70000", "h:9092,x",
                                 "h o:1"])
def test_bootstrap_bad_is_one_line(bad):
    with pytest.raises(TailError) as e:
        parse_bootstrap(bad)
    assert "\n" not in str(e.value)


class Msg:
    def __init__(self, v: bytes, offset: int) -> None:
        self._v, self._o = v, offset

    def value(self) -> bytes:
        return self._v

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._o


def test_loop_counts_filters_and_undecodable(capsys):
    vals = [value(decision(event_id=f"e{i}", decision="deny" if i % 2 else "audit"))
            for i in range(10)]
    vals.insert(3, b"\xff not json")
    closed = []

    def source(bootstrap, topic, **kw):
        assert bootstrap == "k:9092" and topic == "aegis.decision.v1"
        try:
            yield from (Msg(v, i) for i, v in enumerate(vals))
        finally:
            closed.append(True)

    out = io.StringIO()
    res = tail("k:9092", TailFilter(decision="deny"), as_json=True, count=3, out=out,
               records=source)
    lines = out.getvalue().splitlines()
    assert [msgspec.json.decode(x)["event_id"] for x in lines] == ["e1", "e3", "e5"]
    assert (res.printed, res.undecodable) == (3, 1) and res.skipped == 3
    assert closed == [True]  # the consumer is closed when --count is reached
    assert "not JSON" in capsys.readouterr().err
