"""The overhead bench's floor (bench/floor.bpf.c) and the budget gate on instructions above
it (bench/report.py --check).  The measurement itself runs in a lab guest
(bench/run-overhead); here: the floor covers the shipped object's hooks and does nothing
else, the arithmetic, the pass/fail columns and the gate."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest

from aegis_stream.kernel import abi, libbpf
from aegis_stream.kernel.loader import default_object_path
from bench import overhead, report

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def floor_obj() -> Path:
    subprocess.run(["make", "-s", "-C", str(ROOT / "bench"), ".build/floor.bpf.o"], check=True)
    return overhead.FLOOR


def _sections(path: Path) -> tuple[dict[str, str], dict[str, int]]:
    lib = libbpf.lib()
    lib.bpf_program__insn_cnt.restype = libbpf.c_size_t
    lib.bpf_program__insn_cnt.argtypes = [libbpf.c_void_p]
    obj = lib.bpf_object__open_file(str(path).encode(), None)
    assert obj, path
    try:
        secs = overhead.lsm_sections(obj)
        insns = {}
        for name in secs.values():
            prog = lib.bpf_object__find_program_by_name(obj, name.encode())
            insns[name] = lib.bpf_program__insn_cnt(prog)
        return secs, insns
    finally:
        lib.bpf_object__close(obj)


def test_floor_covers_every_hook_of_the_shipped_object_and_only_returns_ret(floor_obj: Path) -> None:
    main, _ = _sections(default_object_path())
    floor, insns = _sections(floor_obj)
    # every hook the agent knows (abi.HOOK_NAMES), shipped in the object yet or not
    assert set(floor) >= {f"lsm/{h}" for h in abi.HOOK_NAMES.values()}
    plan = overhead.floor_plan(main, floor)
    assert len(plan) == len(main)
    assert {floor[s] for s in main} == set(plan)
    # `r0 = ctx[ret]; exit`: nothing else may run in the floor
    assert all(n == 2 for n in insns.values()), insns


def test_floor_refuses_a_hook_it_lacks() -> None:
    with pytest.raises(SystemExit, match="lsm/inode_rename"):
        overhead.floor_plan({"lsm/file_open": "aegis_file_open", "lsm/inode_rename": "x"},
                            {"lsm/file_open": "floor_file_open", "lsm/mmap_file": "floor_mmap_file"})
    # a floor hook the object does not have is simply not loaded
    assert overhead.floor_plan({"lsm/file_open": "a"},
                               {"lsm/file_open": "f", "lsm/mmap_file": "g"}) == ["f"]


def _run(p50: float, p99: float) -> dict:
    return {"p50": p50, "p90": p50, "p95": p50, "p99": p99, "p999": p99, "mean": p50}


def _doc(series: str = "6.1", c_open: float = 10_450, d_open: float = 10_640) -> dict:
    """Two rounds; (a) 10,000 instructions per open, the floor +170."""
    raw = {
        "open": {"a": [_run(10_000, 16_000)] * 2, "floor": [_run(10_170, 16_170)] * 2,
                 "b": [_run(10_240, 16_240)] * 2, "c": [_run(c_open, c_open + 6_000)] * 2,
                 "c_hit": [_run(c_open, c_open + 6_000)] * 2, "d": [_run(d_open, d_open + 6_000)] * 2,
                 "f": [_run(11_800, 40_000)] * 2},
        "mmap": {"a": [_run(18_000, 24_000)] * 2, "floor": [_run(18_170, 24_170)] * 2,
                 "c": [_run(18_250, 24_250)] * 2, "c_hit": [_run(18_250, 24_250)] * 2,
                 "d": [_run(18_400, 24_400)] * 2},
        "exec": {"a": [_run(279_000, 400_000)] * 2, "floor": [_run(279_300, 400_300)] * 2,
                 "c": [_run(279_600, 400_600)] * 2, "c_hit": [_run(279_600, 400_600)] * 2,
                 "d": [_run(279_900, 400_900)] * 2},
    }
    return {"meta": {"series": series, "tag": ""}, "summary": overhead.summarise(raw, [])}


def test_above_floor_is_instructions_and_points_of_a() -> None:
    s = _doc()["summary"]
    c = s["open"]["c"]["above_floor"]["p50"]
    assert (c["insns"], c["points"]) == (280, pytest.approx(2.8))
    assert "above_floor" not in s["open"]["a"] and "above_floor" not in s["open"]["floor"]
    assert s["open"]["floor"]["ratio_vs_a"]["p50"]["median"] == pytest.approx(1.017)


def test_targets_pass_and_fail_per_configuration() -> None:
    s = _doc(c_open=10_260, d_open=10_640)["summary"]  # c: +0.9 pt (open p50), d: +4.7 pt
    ok, worst, where = report.target_check(s, "c")  # type: ignore[misc]
    assert ok and where == "open p50" and worst == pytest.approx(0.9)
    assert report.target_check(s, "d")[0] is False  # type: ignore[index]
    table = "\n".join(report.floor_table(s))
    assert "| (c) 10k rules, outside, unrelated file |" in table
    row_c = next(ln for ln in table.splitlines() if ln.startswith("| (c) "))
    row_d = next(ln for ln in table.splitlines() if ln.startswith("| (d) "))
    assert "**pass**" in row_c and "≤ 1.0 pt" in row_c
    assert "**FAIL**" in row_d and "≤ 2.0 pt" in row_d and "+470 / +4.70" in row_d
    assert "audit (f)" in table  # the per-event cost is stated


def test_budget_gate_fails_on_added_instructions_and_when_nothing_is_checked() -> None:
    docs = [_doc()]
    budget = {"tolerance_insns": 10, "kernels": {}}
    budget = report.update_budget(docs, copy.deepcopy(budget))
    assert budget["kernels"]["6.1"]["open"] == {"b": 70, "c": 280, "c_hit": 280, "d": 470}
    assert report.check(docs, budget) == []
    assert report.check([_doc(c_open=10_460)], budget) == []  # within the tolerance
    errs = report.check([_doc(c_open=10_461)], budget)
    assert len(errs) == 2 and "6.1 open (c): +291" in errs[0]  # c and c_hit
    # a result for another kernel only: nothing checked is a failure, not a pass
    errs = report.check([_doc(series="6.12")], budget)
    assert len(errs) == 1 and "nothing was checked" in errs[0]


def test_committed_budget_has_the_shape_the_gate_reads() -> None:
    budget = json.loads(report.BUDGET.read_text())
    assert budget["tolerance_insns"] >= 0
    assert budget["kernels"], "a budget with no kernel can never fail"
    for ops in budget["kernels"].values():
        assert set(ops) <= set(report.BUDGET_OPS)
        for cfgs in ops.values():
            assert set(cfgs) <= set(report.BUDGET_CONFIGS)
