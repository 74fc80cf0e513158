"""Loader logic that needs no kernel: fault-injection parsing, verifier statistics,
the partial-attach report (never "enforcing" unless every hook is attached)."""

import pytest

from aegis_stream.errors import LoadError
from aegis_stream.kernel.loader import (
    REQUIRED_PROGRAMS,
    AttachReport,
    ProgramStatus,
    fault_injection,
    parse_verifier_stats,
)


def test_fault_injection_parses_attach_faults():
    assert fault_injection("") == {}
    assert fault_injection("attach:aegis_file_open, attach:aegis_mmap_file") == {
        "attach": {"aegis_file_open", "aegis_mmap_file"}
    }


@pytest.mark.parametrize("bad", ["attach:nope", "load:aegis_file_open", "garbage"])
def test_fault_injection_rejects_unknown(bad):
    with pytest.raises(LoadError, match="unknown fault"):
        fault_injection(bad)


def test_verifier_stats_from_log_level_4():
    log = ("func#0 @0\nprocessed 412 insns (limit 1000000) max_states_per_insn 1 "
           "total_states 30 peak_states 30 mark_read 7\n")
    s = parse_verifier_stats(log)
    assert s is not None and s.insns_processed == 412 and s.peak_states == 30
    assert parse_verifier_stats("nothing here") is None


def _report(phases):
    return AttachReport({n: ProgramStatus(n, n.removeprefix("aegis_"), phase=p)
                         for n, p in zip(REQUIRED_PROGRAMS, phases, strict=True)})


def test_enforcing_capable_only_when_all_attached():
    n = len(REQUIRED_PROGRAMS)
    assert _report(["attached"] * n).enforcing_capable
    for i in range(n):
        phases = ["attached"] * n
        phases[i] = "failed"
        rep = _report(phases)
        assert not rep.enforcing_capable
        assert rep.summary().startswith(f"partial attach: {n - 1}/{n}")
        assert REQUIRED_PROGRAMS[i] in rep.summary()
    assert not AttachReport({}).enforcing_capable
