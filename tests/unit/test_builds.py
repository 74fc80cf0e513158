"""The build choice: the feature probe's answer picks the object; AEGIS_BPF_OBJECT wins."""

from __future__ import annotations

import subprocess

import pytest

from aegis_stream.agent import doctor
from aegis_stream.kernel import builds


def test_probe_false_picks_the_no_task_storage_build(monkeypatch) -> None:
    monkeypatch.delenv("AEGIS_BPF_OBJECT", raising=False)
    monkeypatch.setattr(builds, "probe_task_storage", lambda: False)
    c = builds.choose_build()
    assert c.build is builds.Build.NO_TASK_STORAGE
    assert c.path.name == "aegis-no-task-storage.bpf.o" and c.path.is_file()
    assert "before Linux 5.11" in c.reason


@pytest.mark.parametrize("probe", [True, None])
def test_probe_true_or_unknown_picks_the_task_storage_build(monkeypatch, probe) -> None:
    monkeypatch.delenv("AEGIS_BPF_OBJECT", raising=False)
    monkeypatch.setattr(builds, "probe_task_storage", lambda: probe)
    c = builds.choose_build()
    assert c.build is builds.Build.TASK_STORAGE and c.path.name == "aegis.bpf.o"
    assert ("could not run" in c.reason) is (probe is None)


def test_env_overrides_the_probe(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("AEGIS_BPF_OBJECT", str(tmp_path / "x.bpf.o"))
    monkeypatch.setattr(builds, "probe_task_storage", lambda: False)
    c = builds.choose_build()
    assert c.path == tmp_path / "x.bpf.o" and c.build is None
    assert doctor.check_build(c).reason.startswith("custom build (x.bpf.o)")


def _maps(path) -> set[str]:
    out = subprocess.run(["llvm-objdump", "-t", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if " .maps" in line}


def test_the_two_builds_differ_only_by_the_task_storage_cache() -> None:
    full = _maps(builds.packaged_object(builds.Build.TASK_STORAGE))
    compat = _maps(builds.packaged_object(builds.Build.NO_TASK_STORAGE))
    assert full - compat == {"aegis_scope_cache"} and compat <= full
