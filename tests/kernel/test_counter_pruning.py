"""CTR-001: aegis_rule_counters stays bounded over many policy swaps in a real kernel.

Every generation gets its own per-rule counter keys; staging a new generation prunes the
keys of the one it retires (folding them into per-hook retired totals), so the map holds
at most the active and the kept generation's keys, and live rows + retired totals still
equal the per-hook DENIED/AUDITED counters the programs keep.
"""

from __future__ import annotations

from aegis_stream.kernel import abi
from aegis_stream.kernel.counters import RETIRED_GENERATION, read_counters

from .conftest import Lab

SWAPS = 50
RULES = 10


def _file_open_totals(lab: Lab) -> tuple[tuple[int, int], tuple[int, int]]:
    """((denied, audited) per-hook counters, (denied, audited) live rows + retired)."""
    doc = read_counters(lab.maps)
    h = doc["hooks"]["file_open"]
    rows = [r for r in doc["rules"] if r["hook"] == "file_open"]
    ret = doc["retired"]["file_open"]
    return ((h["denied"], h["audited"]),
            (sum(r["denied"] for r in rows) + ret["denied"],
             sum(r["audited"] for r in rows) + ret["audited"]))


def test_ctr_001_rule_counters_bounded_over_50_swaps(lab: Lab, record_testsuite_property):
    files = [lab.file(f"ctr/secret-{i}") for i in range(RULES)]
    rules = [{"id": f"r{i}", "path": str(f), "actions": ["open"]} for i, f in enumerate(files)]
    hooks0, rows0 = _file_open_totals(lab)
    rc = lab.maps[abi.MAP_RULE_COUNTERS]
    sizes, gens = [], []
    # one shell opens every file with a redirection (no exec per open; `read` is a regular
    # builtin, so a denied redirection does not end the shell)
    opener = ["/bin/sh", "-c", 'for f in "$@"; do read -r x < "$f" || :; done 2>/dev/null; exit 0',
              "sh",
              *map(str, files)]
    for i in range(SWAPS):
        res = lab.apply(rules, mode="enforce" if i % 2 else "audit")
        gens.append(res.generation)
        assert lab.run(opener).returncode == 0
        keys = [abi.RULE_COUNTER_KEY.unpack(k) for k in rc.keys()]
        sizes.append(len(keys))
        live = {g for g, _, _ in keys} - {RETIRED_GENERATION}
        assert live <= set(gens[-2:]), (i, live, gens[-2:])
        # the active and the kept generation: RULES file_open keys each, + 3 retired keys
        assert len(keys) <= 2 * RULES + len(abi.Hook), (i, len(keys))
    lab.drain()
    hooks1, rows1 = _file_open_totals(lab)
    # nothing lost: what the per-rule keys and the retired totals gained is what the
    # programs decided on file_open (audit and deny alike)
    assert (rows1[0] - rows0[0], rows1[1] - rows0[1]) == (hooks1[0] - hooks0[0], hooks1[1] - hooks0[1])
    assert hooks1[0] - hooks0[0] == RULES * (SWAPS // 2)
    assert hooks1[1] - hooks0[1] == RULES * (SWAPS - SWAPS // 2)
    # the active and the kept generation's rows are intact: one decision per rule each
    doc = read_counters(lab.maps)
    last = [r for r in doc["rules"] if r["generation"] in gens[-2:] and r["hook"] == "file_open"]
    assert len(last) == 2 * RULES and all(r["denied"] + r["audited"] == 1 for r in last)
    record_testsuite_property("ctr_001_rule_counter_entries_max", max(sizes))
    print(f"CTR-001: {SWAPS} swaps, aegis_rule_counters entries max {max(sizes)} (last {sizes[-1]})")
