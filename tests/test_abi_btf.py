"""alignchecker: every layout in aegis_stream/kernel/abi.py must match the compiled object's BTF."""

import json
import shutil
import subprocess

import pytest

from aegis_stream.kernel import abi
from aegis_stream.kernel.loader import default_object_path


@pytest.fixture(scope="module")
def btf_structs():
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    out = subprocess.run(
        [bpftool, "-j", "btf", "dump", "file", str(default_object_path())],
        capture_output=True, text=True, check=True,
    )
    types = json.loads(out.stdout)["types"]
    return {t["name"]: t for t in types if t.get("kind") == "STRUCT" and t.get("name")}


@pytest.mark.parametrize("layout", abi.ALL_LAYOUTS, ids=lambda layout: layout.c_name)
def test_layout_matches_btf(btf_structs, layout):
    assert layout.c_name in btf_structs, f"{layout.c_name} missing from the object's BTF"
    t = btf_structs[layout.c_name]
    assert t["size"] == layout.size, f"{layout.c_name}: BTF size {t['size']} != {layout.size}"
    btf_fields = {m["name"]: m["bits_offset"] // 8 for m in t["members"]}
    assert btf_fields == layout.offsets()


def test_abi_version_matches_header():
    import re
    from pathlib import Path

    header = (Path(__file__).parents[1] / "bpf" / "aegis_abi.h").read_text()
    assert int(re.search(r"#define AEGIS_ABI_VERSION (\d+)", header).group(1)) == abi.ABI_VERSION
    for name in ("MAX_RULES", "MAX_SCOPES", "MAX_CGROUP_DEPTH", "SLOTS"):
        m = re.search(rf"#define AEGIS_{name} (\d+)", header)
        assert m and int(m.group(1)) == getattr(abi, name), name


def test_object_has_every_required_program_and_map(btf_structs):
    out = subprocess.run(
        ["llvm-objdump", "-h", str(default_object_path())], capture_output=True, text=True
    )
    if out.returncode != 0:
        pytest.fail("llvm-objdump missing: install llvm")
    for sec in ("lsm/file_open", "lsm/bprm_check_security", "lsm/mmap_file", ".maps", ".BTF"):
        assert sec in out.stdout, sec
