"""Anti-rollback counter: monotonic per policy name, persisted atomically, fail closed."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis_stream.errors import SignatureError, StateError
from aegis_stream.policy import store
from aegis_stream.policy.antirollback import VersionCounter


@pytest.fixture
def vc(tmp_path):
    return VersionCounter(tmp_path)


def test_fresh_name_accepts_any_version(vc) -> None:
    vc.check("web", 1, "sha256:a")
    assert vc.get("web") is None


def test_newer_accepted_older_and_equal_refused(vc) -> None:
    vc.commit("web", 3, "sha256:c")
    vc.check("web", 4, "sha256:d")
    with pytest.raises(SignatureError, match="older than v3"):
        vc.check("web", 2, "sha256:b")
    with pytest.raises(SignatureError, match="differs from the v3"):
        vc.check("web", 3, "sha256:other")
    vc.check("web", 3, "sha256:c")  # the identical policy again: idempotent re-apply
    vc.check("db", 1, "sha256:x")  # counters are per policy name


def test_counter_survives_a_new_instance(vc, tmp_path) -> None:
    vc.commit("web", 7, "sha256:g")
    assert VersionCounter(tmp_path).get("web").high_water == 7


def test_commit_never_goes_backwards(vc) -> None:
    vc.commit("web", 5, "sha256:e")
    with pytest.raises(StateError, match="backwards"):
        vc.commit("web", 4, "sha256:d")


def test_crash_between_temp_write_and_rename_leaves_old_value(vc, monkeypatch) -> None:
    vc.commit("web", 1, "sha256:a")

    def crash(src, dst):
        raise KeyboardInterrupt("power cut")  # not an OSError: nothing in aegis handles it

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        vc.commit("web", 2, "sha256:b")
    monkeypatch.undo()
    leftovers = [p.name for p in vc.root.iterdir() if p.name.endswith(".tmp")]
    assert leftovers  # the temp file was written (and fsync'd) ...
    assert vc.get("web").high_water == 1  # ... but the counter still says the old value
    vc.commit("web", 2, "sha256:b")  # and a later commit works over the leftover
    assert vc.get("web").high_water == 2


def test_failure_to_persist_is_an_error(vc, monkeypatch) -> None:
    def enospc(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "atomic_write", enospc)
    with pytest.raises(StateError, match="cannot persist anti-rollback counter"):
        vc.commit("web", 1, "sha256:a")


def test_corrupt_counter_fails_closed(vc) -> None:
    vc.path.write_text("{garbage")
    with pytest.raises(StateError, match="corrupt"):
        vc.check("web", 99, "sha256:z")


@settings(deadline=None)  # fsync per commit: a loaded CI host takes > 200 ms
@given(st.lists(st.integers(1, 50), min_size=1, max_size=30))
def test_accepted_versions_strictly_increase(versions) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        c = VersionCounter(d)
        accepted = []
        for v in versions:
            try:
                c.check("p", v, f"sha256:{v}")
            except SignatureError:
                continue
            if accepted and accepted[-1] == v:
                continue  # idempotent re-apply of the same policy
            c.commit("p", v, f"sha256:{v}")
            accepted.append(v)
        assert accepted == sorted(set(accepted))
        assert c.get("p").high_water == max(accepted)
