"""Fixtures for tests against a real Kafka broker (marker ``fleet``; docs/FLEET.md).

``kafka_broker`` is one single-node KRaft broker for the whole session (a JVM start costs
~5-10 s), on a free port with a temp data dir and the aegis topics created.  Tests may
``kill()``/``stop()``/``restart()`` it; a broker left down by a test is restarted on the
same data dir and port before the next test that uses it.

Without the jars (``scripts/kafka fetch``) or confluent-kafka the tests are skipped
locally but FAIL under CI (``CI`` set): the fleet suite must run there, not vanish.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aegis_stream.fleet.broker import FETCH_HINT, KAFKA_VERSION, LocalBroker, cache_dir, kafka_lib

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # everything under tests/fleet needs the broker: `-m "not fleet"` keeps it out of the
    # unit run, `-m fleet tests/fleet` selects all of it
    for item in items:
        if _HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.fleet)


def _missing(msg: str) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"fleet tests cannot run under CI: {msg}", pytrace=False)
    pytest.skip(msg)


def started_broker(directory: Path) -> Iterator[LocalBroker]:
    """A broker on ``directory`` with the aegis topics, stopped (killed if it must be) at
    the end; missing jars or client skip locally and fail under CI.  For fixtures."""
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        _missing("confluent-kafka is not installed (pip install -e '.[fleet]')")
    if kafka_lib() is None:
        _missing(f"Kafka {KAFKA_VERSION} jars are not in {cache_dir()}; run {FETCH_HINT}")
    from aegis_stream.fleet.topics import create_topics

    broker = LocalBroker(directory)
    broker.start()
    try:
        create_topics(broker.bootstrap)
        yield broker
    finally:
        if not broker.stop():
            broker.kill()  # never leave a JVM behind


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """The session's broker: ``.bootstrap``, ``.kill()``, ``.restart()``, ``.stop()``."""
    yield from started_broker(tmp_path_factory.mktemp("kafka"))


@pytest.fixture(autouse=True)
def _kafka_broker_up(request: pytest.FixtureRequest) -> None:
    """Bring the session broker back if an earlier test left it killed or stopped."""
    if "kafka_broker" in request.fixturenames:
        broker: LocalBroker = request.getfixturevalue("kafka_broker")
        if broker.pid() is None:
            broker.restart()


@pytest.fixture
def kafka_topic_factory(
    kafka_broker: LocalBroker, request: pytest.FixtureRequest
) -> Callable[..., str]:
    """``make(partitions=1, **config) -> name``: a fresh topic unique to this test."""
    from aegis_stream.fleet.topics import TopicSpec, create_topics

    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:80]

    def make(partitions: int = 1, **config: str) -> str:
        name = f"test.{stem}.{uuid.uuid4().hex[:8]}"
        create_topics(kafka_broker.bootstrap, [TopicSpec(name, partitions, "test", dict(config))])
        return name

    return make


@pytest.fixture
def kafka_topic(kafka_topic_factory: Callable[..., str]) -> str:
    """A fresh 3-partition topic unique to this test."""
    return kafka_topic_factory(3)
