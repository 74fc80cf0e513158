"""alignchecker: every layout in aegis_stream/kernel/abi.py must match the compiled object's BTF."""

import json
import shutil
import subprocess

import pytest

from aegis_stream.kernel import abi, builds


@pytest.fixture(scope="module", params=list(builds.Build))
def bpf_object(request):
    """Both shipped builds (task-storage and no-task-storage) must match the mirror."""
    return builds.packaged_object(request.param)


@pytest.fixture(scope="module")
def btf_types(bpf_object):
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    out = subprocess.run(
        [bpftool, "-j", "btf", "dump", "file", str(bpf_object)],
        capture_output=True, text=True, check=True,
    )
    return {t["id"]: t for t in json.loads(out.stdout)["types"]}


@pytest.fixture(scope="module")
def btf_structs(btf_types):
    return {
        t["name"]: t
        for t in btf_types.values()
        if t.get("kind") == "STRUCT" and t.get("name")
    }


def _btf_map_max_entries(btf_types) -> dict[str, int]:
    """max_entries of every map in the object's .maps section.

    A libbpf BTF map definition is an anonymous struct whose ``__uint(max_entries, N)``
    member is a pointer to ``int[N]``: N is the array's nr_elems.  Maps declared without
    max_entries (task storage) are left out.
    """
    (maps_sec,) = [t for t in btf_types.values() if t["kind"] == "DATASEC" and t["name"] == ".maps"]
    out: dict[str, int] = {}
    for var_info in maps_sec["vars"]:
        var = btf_types[var_info["type_id"]]
        members = {m["name"]: m for m in btf_types[var["type_id"]]["members"]}
        if "max_entries" in members:
            ptr = btf_types[members["max_entries"]["type_id"]]
            assert ptr["kind"] == "PTR", var["name"]
            array = btf_types[ptr["type_id"]]
            assert array["kind"] == "ARRAY", var["name"]
            out[var["name"]] = array["nr_elems"]
    return out


def test_map_max_entries_match_btf(btf_types):
    """Every map size the agent and the fake kernel assume is the size the object declares."""
    assert _btf_map_max_entries(btf_types) == abi.MAP_MAX_ENTRIES
    assert set(abi.MAP_MAX_ENTRIES) == set(abi.ALL_MAPS)


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

    header = (Path(__file__).parents[2] / "bpf" / "aegis_abi.h").read_text()
    assert int(re.search(r"#define AEGIS_ABI_VERSION (\d+)", header).group(1)) == abi.ABI_VERSION
    for name in ("MAX_RULES", "MAX_SCOPES", "MAX_CGROUP_DEPTH", "SLOTS", "MAX_RULE_COUNTERS"):
        m = re.search(rf"#define AEGIS_{name} (\d+)", header)
        assert m and int(m.group(1)) == getattr(abi, name), name
    for name in ("DENY_RING_BYTES", "AUDIT_RING_BYTES"):
        m = re.search(rf"#define AEGIS_{name} \((\d+) << (\d+)\)", header)
        assert m and int(m.group(1)) << int(m.group(2)) == getattr(abi, name), name


def test_object_has_every_required_program_and_map(btf_structs, bpf_object):
    out = subprocess.run(
        ["llvm-objdump", "-h", str(bpf_object)], capture_output=True, text=True
    )
    if out.returncode != 0:
        pytest.fail("llvm-objdump missing: install llvm")
    for sec in ("lsm/file_open", "lsm/bprm_check_security", "lsm/mmap_file", "lsm/file_mprotect", ".maps", ".BTF"):
        assert sec in out.stdout, sec
