from pathlib import Path

from bench.hostinfo import cpu_model


def test_cpu_model_first_model_name(tmp_path: Path) -> None:
    p = tmp_path / "cpuinfo"
    p.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: QEMU TCG CPU version 2.5+\n"
                 "\nprocessor\t: 1\nmodel name\t: other\n")
    assert cpu_model(str(p)) == "QEMU TCG CPU version 2.5+"


def test_cpu_model_absent_or_unreadable(tmp_path: Path) -> None:
    p = tmp_path / "cpuinfo"
    p.write_text("processor\t: 0\nCPU implementer\t: 0x41\n")  # arm64: no model name
    assert cpu_model(str(p)) == ""
    assert cpu_model(str(tmp_path / "missing")) == ""


def test_bench_and_soak_share_it() -> None:
    root = Path(__file__).resolve().parents[2]
    for script in ("bench/overhead.py", "soak/driver.py"):
        text = (root / script).read_text()
        assert "from bench.hostinfo import cpu_model" in text and "/proc/cpuinfo" not in text
