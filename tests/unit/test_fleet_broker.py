"""Pure parts of the local Kafka broker and the topic catalogue (no JVM, no broker)."""

from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path

import pytest

from aegis_stream.cli.main import main
from aegis_stream.fleet import broker as kb
from aegis_stream.fleet import topics


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines())


def test_server_properties_single_node_kraft_on_loopback(tmp_path: Path) -> None:
    p = _props(kb.render_server_properties(port=9092, controller_port=9093, log_dir=tmp_path))
    assert p["process.roles"] == "broker,controller"
    assert p["listeners"] == "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert p["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092"
    assert p["controller.quorum.bootstrap.servers"] == "127.0.0.1:9093"
    assert p["log.dirs"] == str(tmp_path)
    assert p["auto.create.topics.enable"] == "false"
    assert p["group.initial.rebalance.delay.ms"] == "0"
    for k in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor",
              "transaction.state.log.min.isr", "share.coordinator.state.topic.replication.factor",
              "share.coordinator.state.topic.min.isr"):
        assert p[k] == "1", k
    # nothing listens beyond loopback
    assert "0.0.0.0" not in str(p) and "://:" not in str(p)


def test_server_properties_extra_overrides(tmp_path: Path) -> None:
    text = kb.render_server_properties(port=1, controller_port=2, log_dir=tmp_path,
                                       extra={"log.retention.ms": "1000"})
    assert _props(text)["log.retention.ms"] == "1000"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"port": 0, "controller_port": 2}, "bad port 0"),
        ({"port": 70000, "controller_port": 2}, "bad port 70000"),
        ({"port": True, "controller_port": 2}, "bad port True"),
        ({"port": 5, "controller_port": 5}, "both 5"),
        ({"port": 5, "controller_port": 6, "log_dir": "rel/dir"}, "absolute"),
        ({"port": 5, "controller_port": 6, "log_dir": "/a,/b"}, "commas"),
        ({"port": 5, "controller_port": 6, "extra": {"Bad Key": "x"}}, "bad broker property"),
        ({"port": 5, "controller_port": 6, "extra": {"a.b": "x\ny=1"}}, "bad broker property"),
    ],
)
def test_server_properties_bad_args_are_one_line(kw: dict, match: str) -> None:
    kw = {"log_dir": "/tmp/x", **kw}
    with pytest.raises(kb.BrokerError, match=match) as ei:
        kb.render_server_properties(**kw)
    assert "\n" not in str(ei.value)


def test_pom_pins_kafka_and_the_slf4j_binding() -> None:
    pom = kb.render_pom()
    assert f"<artifactId>kafka_2.13</artifactId>\n      <version>{kb.KAFKA_VERSION}</version>" in pom
    assert f"<artifactId>log4j-slf4j-impl</artifactId>\n      <version>{kb.LOG4J_VERSION}</version>" in pom
    with pytest.raises(kb.BrokerError, match="bad kafka version"):
        kb.render_pom("4.1.1</version><x>")


def test_cache_needs_the_complete_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AEGIS_KAFKA_CACHE", str(tmp_path))
    assert kb.cache_dir() == tmp_path
    lib = tmp_path / kb.KAFKA_VERSION / "lib"
    lib.mkdir(parents=True)
    (lib / f"kafka_2.13-{kb.KAFKA_VERSION}.jar").write_bytes(b"")
    assert kb.kafka_lib() is None  # an interrupted fetch is not usable
    with pytest.raises(kb.BrokerError, match="scripts/kafka fetch"):
        kb.require_lib()
    (tmp_path / kb.KAFKA_VERSION / ".complete").write_text("x.jar\n")
    assert kb.kafka_lib() == lib
    assert kb.fetch_kafka() == lib  # complete: no Maven run at all


def test_local_broker_arg_checks(tmp_path: Path) -> None:
    with pytest.raises(kb.BrokerError, match="bad port"):
        kb.LocalBroker(tmp_path, port=-1)
    with pytest.raises(kb.BrokerError, match="bad controller port"):
        kb.LocalBroker(tmp_path, controller_port=65536)
    with pytest.raises(kb.BrokerError, match="bad heap"):
        kb.LocalBroker(tmp_path, heap="lots")
    with pytest.raises(kb.BrokerError, match="no broker yet"):
        _ = kb.LocalBroker(tmp_path).bootstrap


def test_a_formatted_dir_keeps_its_ports(tmp_path: Path) -> None:
    (tmp_path / "broker.json").write_text(
        '{"port":40001,"controller_port":40002,"version":"4.1.1","cluster_id":"x"}')
    b = kb.LocalBroker(tmp_path)
    assert b.bootstrap == "127.0.0.1:40001"
    assert kb.LocalBroker(tmp_path, port=40001).port == 40001
    with pytest.raises(kb.BrokerError, match="formatted for port 40001, not 40003"):
        kb.LocalBroker(tmp_path, port=40003)
    with pytest.raises(kb.BrokerError, match="controller port 40002, not 40004"):
        kb.LocalBroker(tmp_path, controller_port=40004)
    (tmp_path / "broker.json").write_text("{not json")
    with pytest.raises(kb.BrokerError, match="unreadable"):
        kb.LocalBroker(tmp_path)


def test_pid_file_of_another_program_is_never_signalled(tmp_path: Path) -> None:
    b = kb.LocalBroker(tmp_path)
    (tmp_path / "broker.pid").write_text(f"{os.getpid()}\n")  # alive, but not our broker
    assert b.pid() is None
    assert b.stop() is False  # nothing signalled (we are still here), stale file removed
    assert not (tmp_path / "broker.pid").exists()
    (tmp_path / "broker.pid").write_text("garbage\n")
    assert b.pid() is None
    st = b.status()
    assert not st.running and st.pid is None and st.port is None


def _fake_kafka(answer: bytes) -> tuple[int, threading.Thread]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            (size,) = struct.unpack(">i", conn.recv(4))
            req = conn.recv(size)
            assert struct.unpack(">hh", req[:4]) == (18, 0)  # ApiVersions v0
            conn.sendall(struct.pack(">i", len(answer)) + answer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv.getsockname()[1], t


def test_api_versions_parses_a_real_shaped_answer() -> None:
    apis = struct.pack(">ihi", 7, 0, 2) + struct.pack(">hhh", 0, 3, 12) + struct.pack(">hhh", 18, 0, 4)
    port, t = _fake_kafka(apis)
    assert kb.api_versions("127.0.0.1", port) == 2
    t.join(5)


def test_api_versions_error_code_and_closed_port() -> None:
    port, t = _fake_kafka(struct.pack(">ihi", 7, 35, 0))
    with pytest.raises(kb.BrokerError, match="error code 35"):
        kb.api_versions("127.0.0.1", port)
    t.join(5)
    with pytest.raises(OSError):
        kb.api_versions("127.0.0.1", kb.free_port(), timeout=1.0)


def test_log_tail_is_one_line(tmp_path: Path) -> None:
    log = tmp_path / "broker.log"
    log.write_text("a\n\nb\nc\nd\n")
    assert kb.log_tail(log) == "b | c | d"
    assert "no log" in kb.log_tail(tmp_path / "missing.log")


def test_topic_catalogue() -> None:
    names = [t.name for t in topics.TOPICS]
    assert names == [topics.DECISION_TOPIC, topics.EXPLANATION_TOPIC, topics.STATE_TOPIC,
                     topics.FLEET_TOPIC]
    assert all(topics.check_topic_name(n) == n for n in names)
    assert dict((t.name, t.partitions) for t in topics.TOPICS)[topics.DECISION_TOPIC] == 6
    assert topics.schema_headers("aegis.decision.v1", 1) == [
        ("aegis-schema", b"aegis.decision.v1"), ("aegis-schema-version", b"1")]


@pytest.mark.parametrize("bad", ["", ".", "..", "a b", "x" * 250, "t/../x", "ü"])
def test_bad_topic_names(bad: str) -> None:
    with pytest.raises(topics.TopicError, match="bad topic name"):
        topics.check_topic_name(bad)


def test_create_topics_checks_before_connecting() -> None:
    with pytest.raises(topics.TopicError, match="bad partition count 0"):
        topics.create_topics("127.0.0.1:1", [topics.TopicSpec("ok", 0, "k")])
    with pytest.raises(topics.TopicError, match="bad replication factor"):
        topics.create_topics("127.0.0.1:1", replication_factor=0)
    with pytest.raises(topics.TopicError, match="bad schema version"):
        topics.schema_headers("x", 0)


def test_cli_broker_status_and_bad_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", "broker", "status", "--dir", str(tmp_path)]) == 1
    assert "not running" in capsys.readouterr().out
    assert main(["fleet", "broker", "stop", "--dir", str(tmp_path)]) == 0
    assert main(["fleet", "broker", "start", "--dir", str(tmp_path), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("aegis: error: bad port 0") and err.count("\n") == 1
    with pytest.raises(SystemExit) as ei:
        main(["fleet", "broker", "start", "--port", "x"])
    assert ei.value.code == 2
