"""scripts/release and scripts/verify-release.

Fast tests build small packs with the release script's own signer and manifest writer and
a real minisign, then break them one way each; ``test_release_of_head_verifies_and_a_flipped_byte_fails``
(marker ``release``, ~1-2 min: a wheel build, the .deb once scripts/build-deb is in the commit,
and a pip install of the runtime dependencies)
releases HEAD for real.  minisign missing: skipped on a developer machine, a failure under
CI=true.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str) -> ModuleType:
    path = ROOT / "scripts" / name
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


release = _load("release")


def _need(tool: str) -> None:
    if shutil.which(tool):
        return
    if os.environ.get("CI"):
        pytest.fail(f"{tool} is not installed (scripts/setup installs it); CI=true: a failure")
    pytest.skip(f"{tool} not installed")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    _need("minisign")
    d = tmp_path_factory.mktemp("keys")
    subprocess.run(["minisign", "-G", "-W", "-p", str(d / "k.pub"), "-s", str(d / "k.key")],
                   check=True, capture_output=True, input=b"")
    return d / "k.key", d / "k.pub"


def _verify(pack: Path, pub: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "verify-release"), str(pack),
                           "--pubkey", str(pub)], capture_output=True, text=True)


WHEEL_METADATA = """\
Metadata-Version: 2.1
Name: aegis-stream
Version: 0.1.0
Requires-Dist: trio>=0.25
Requires-Dist: msgspec>=0.18
Provides-Extra: test
Requires-Dist: pytest>=8; extra == "test"
Provides-Extra: release
Requires-Dist: cyclonedx-bom>=7; extra == "release"
Provides-Extra: soak
Requires-Dist: matplotlib>=3.8; extra == "soak"
"""


def _sbom(components: dict[str, list[str]], root_deps: list[str]) -> dict[str, object]:
    return {
        "bomFormat": "CycloneDX", "specVersion": "1.6", "version": 1,
        "metadata": {"component": {"bom-ref": "root-component", "name": "aegis-stream",
                                   "version": "0.1.0", "type": "application"}},
        "components": [{"bom-ref": f"{n}==1.0", "name": n, "version": "1.0", "type": "library"}
                       for n in components],
        "dependencies": [{"ref": "root-component", "dependsOn": [f"{n}==1.0" for n in root_deps]}]
        + [{"ref": f"{n}==1.0", "dependsOn": [f"{d}==1.0" for d in deps]}
           for n, deps in components.items()],
    }


GOOD_SBOM = _sbom({"trio": ["attrs"], "attrs": [], "msgspec": []}, ["trio", "msgspec"])


def _pack(tmp_path: Path, key: Path, sbom: dict[str, object] = GOOD_SBOM,
          deb: tuple[dict[str, object], list[str]] | None = None) -> Path:
    """A small release directory written by the release script's signer and manifest writer;
    ``deb``: (the .deb's SBOM, the manifest's deb_adds)."""
    out = tmp_path / "pack"
    (out / "artifacts").mkdir(parents=True)
    with zipfile.ZipFile(out / "artifacts" / "aegis_stream-0.1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("aegis_stream/__init__.py", "__version__ = '0.1.0'\n")
        zf.writestr("aegis_stream-0.1.0.dist-info/METADATA", WHEEL_METADATA)
    (out / "sbom").mkdir()
    (out / "sbom" / "aegis-stream-0.1.0.cdx.json").write_text(json.dumps(sbom))
    (out / "evidence" / "soak").mkdir(parents=True)
    (out / "evidence" / "kernel-matrix.json").write_text('{"kernels": {}}\n')
    # two files with the same bytes: only the signed trusted comment tells their signatures apart
    (out / "evidence" / "soak" / "soak.md").write_text("same\n")
    (out / "evidence" / "soak" / "notes.md").write_text("same\n")
    meta: dict[str, object] = {"deb": "skipped (--no-deb)", "deb_sbom": None, "deb_adds": []}
    if deb is not None:
        (out / "artifacts" / "aegis_0.1.0_amd64.deb").write_bytes(b"!<arch>\ndebian-binary\n")
        (out / "sbom" / "aegis_0.1.0_amd64.cdx.json").write_text(json.dumps(deb[0]))
        meta = {"deb": "built", "deb_sbom": "sbom/aegis_0.1.0_amd64.cdx.json", "deb_adds": deb[1]}
    release.sign_and_list(out, release.Signer(key, None), {
        "package": "aegis-stream", "version": "0.1.0", "commit": "0" * 40, "commit_time": 0,
        "sbom": "sbom/aegis-stream-0.1.0.cdx.json", "evidence": [], "evidence_missing": [], **meta,
    })
    return out


def test_intact_pack_verifies(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    pack = _pack(tmp_path, keys[0])
    res = _verify(pack, keys[1])
    assert res.returncode == 0, res.stderr
    assert "ok: aegis-stream 0.1.0" in res.stdout
    manifest = json.loads((pack / "MANIFEST.json").read_text())
    listed = {f["path"] for f in manifest["files"]}
    on_disk = {str(p.relative_to(pack)) for p in pack.rglob("*") if p.is_file()}
    assert on_disk - listed == {"MANIFEST.json", "MANIFEST.json.minisig"}
    for f in manifest["files"]:
        assert hashlib.sha256((pack / f["path"]).read_bytes()).hexdigest() == f["sha256"]
        if not f["path"].endswith(".minisig"):
            assert f["path"] + ".minisig" in listed


@pytest.mark.parametrize("rel", [
    "artifacts/aegis_stream-0.1.0-py3-none-any.whl",
    "sbom/aegis-stream-0.1.0.cdx.json",
    "evidence/kernel-matrix.json",
    "evidence/soak/soak.md.minisig",
    "MANIFEST.json",
])
def test_one_flipped_byte_fails_with_the_file_named(tmp_path: Path, keys: tuple[Path, Path], rel: str) -> None:
    pack = _pack(tmp_path, keys[0])
    data = bytearray((pack / rel).read_bytes())
    data[len(data) // 2] ^= 0x01
    (pack / rel).write_bytes(bytes(data))
    res = _verify(pack, keys[1])
    assert res.returncode == 1
    problems = [ln for ln in res.stderr.splitlines() if not ln.startswith("verify-release: FAILED")]
    assert any(f"{pack / rel}: " in ln for ln in problems), res.stderr
    # nothing else is blamed (a broken signature also fails the file it signs)
    assert all(str(pack / rel.removesuffix(".minisig")) in ln for ln in problems), res.stderr


def test_signature_moved_to_a_file_with_the_same_bytes_fails(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    pack = _pack(tmp_path, keys[0])
    ev = pack / "evidence" / "soak"
    shutil.copyfile(ev / "soak.md.minisig", ev / "notes.md.minisig")
    res = _verify(pack, keys[1])
    assert res.returncode == 1
    assert f"{ev / 'notes.md'}: signature was made for evidence/soak/soak.md" in res.stderr
    # the signature file itself no longer matches the manifest either
    assert f"{ev / 'notes.md.minisig'}: sha256" in res.stderr


def test_another_key_fails_every_signature(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    pack = _pack(tmp_path, keys[0])
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["minisign", "-G", "-W", "-p", str(other / "k.pub"), "-s", str(other / "k.key")],
                   check=True, capture_output=True, input=b"")
    res = _verify(pack, other / "k.pub")
    assert res.returncode == 1
    assert "MANIFEST.json: signature does not verify" in res.stderr


def test_extra_and_missing_files_fail(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    pack = _pack(tmp_path, keys[0])
    (pack / "evidence" / "planted.sh").write_text("#!/bin/sh\n")
    (pack / "evidence" / "kernel-matrix.json").unlink()
    res = _verify(pack, keys[1])
    assert res.returncode == 1
    assert f"{pack / 'evidence/planted.sh'}: not in the manifest" in res.stderr
    assert f"{pack / 'evidence/kernel-matrix.json'}: listed in the manifest but missing" in res.stderr


@pytest.mark.parametrize(("sbom", "expected"), [
    # a package the wheel names only under an extra, wired in as if it were runtime
    (_sbom({"trio": ["attrs"], "attrs": [], "msgspec": [], "matplotlib": []}, ["trio", "msgspec", "matplotlib"]),
     "component matplotlib is required only by an extra"),
    # a package nothing at run time depends on (left in the scanned venv)
    (_sbom({"trio": ["attrs"], "attrs": [], "msgspec": [], "requests": []}, ["trio", "msgspec"]),
     "component requests 1.0 is not a dependency of aegis-stream"),
    # a packaging tool, even when something claims to need it
    (_sbom({"trio": ["attrs", "setuptools"], "attrs": [], "msgspec": [], "setuptools": []}, ["trio", "msgspec"]),
     "component setuptools is a build/test tool"),
    # a runtime dependency left out
    (_sbom({"trio": ["attrs"], "attrs": []}, ["trio"]),
     "runtime dependency msgspec (Requires-Dist of"),
])
def test_sbom_must_list_the_runtime_dependencies_only(
    tmp_path: Path, keys: tuple[Path, Path], sbom: dict[str, object], expected: str,
) -> None:
    pack = _pack(tmp_path, keys[0], sbom)
    res = _verify(pack, keys[1])
    assert res.returncode == 1
    assert expected in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 2  # that one problem and the FAILED line


# the .deb's environment: the wheel's closure plus a package of one of its extras (as the Kafka client)
DEB_SBOM = _sbom({"trio": ["attrs"], "attrs": [], "msgspec": [], "matplotlib": []},
                 ["trio", "msgspec", "matplotlib"])


@pytest.mark.parametrize(("deb", "expected"), [
    ((DEB_SBOM, ["matplotlib"]), None),  # named in deb_adds: accepted and shown
    ((DEB_SBOM, []), "component matplotlib is required only by an extra"),
    ((_sbom({"trio": ["attrs"], "attrs": [], "msgspec": [], "pip": []}, ["trio", "msgspec", "pip"]), ["pip"]),
     "the .deb adds build/test tools: pip"),
    ((_sbom({"trio": ["attrs"], "attrs": [], "msgspec": [], "numpy": []}, ["trio", "msgspec", "numpy"]), []),
     "component numpy is neither in the wheel's runtime closure nor in the manifest's deb_adds"),
])
def test_deb_sbom_is_the_wheel_closure_plus_the_named_additions(
    tmp_path: Path, keys: tuple[Path, Path], deb: tuple[dict[str, object], list[str]], expected: str | None,
) -> None:
    pack = _pack(tmp_path, keys[0], deb=deb)
    res = _verify(pack, keys[1])
    if expected is None:
        assert res.returncode == 0, res.stderr
        assert "the .deb ships beyond the wheel's runtime closure: matplotlib" in res.stdout
    else:
        assert res.returncode == 1
        assert expected in res.stderr, res.stderr


def test_manifest_path_outside_the_pack_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    pack = _pack(tmp_path, keys[0])
    manifest = json.loads((pack / "MANIFEST.json").read_text())
    manifest["files"].append({"path": "../outside", "sha256": "0" * 64, "size": 0})
    (pack / "MANIFEST.json").write_text(json.dumps(manifest))
    release.Signer(keys[0], None).sign(pack, "MANIFEST.json")  # signed by the right key
    res = _verify(pack, keys[1])
    assert res.returncode == 1
    assert "bad file entry {'path': '../outside'" in res.stderr


def test_release_refuses_without_a_key_and_into_a_used_directory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AEGIS_RELEASE_KEY"}
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "release"), "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 1
    assert res.stderr.strip() == "release: error: no signing key: --key SECKEY or AEGIS_RELEASE_KEY=SECKEY (minisign -G)"
    assert not (tmp_path / "r").exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("x")
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "release"), "--out", str(used),
                          "--key", "/nonexistent"], capture_output=True, text=True)
    assert res.returncode == 1 and "exists and is not empty" in res.stderr
    assert (used / "x").read_text() == "x"


def test_release_refuses_missing_evidence_and_leaves_nothing(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    out = tmp_path / "r"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "release"), "--out", str(out),
                          "--key", str(keys[0]), "--results", str(tmp_path / "no-results"), "--no-deb"],
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert "evidence missing" in res.stderr and "kernel-matrix.json" in res.stderr
    assert not out.exists()


def _ci_results(d: Path) -> Path:
    (d / "soak" / "ci-6.1").mkdir(parents=True)
    (d / "kernel-matrix.json").write_text('{"kernels": {"6.1": {"passed": 1}}}\n')
    (d / "soak" / "ci-6.1" / "soak.json").write_text('{"gates": "ok"}\n')
    (d / "soak" / "ci-6.1" / "soak.md").write_text("# soak\n")
    return d


@pytest.mark.release
def test_release_of_head_verifies_and_a_flipped_byte_fails(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    for mod in ("build",):
        if importlib.util.find_spec(mod) is None:
            if os.environ.get("CI"):
                pytest.fail(f"python module {mod} missing (pip install -e '.[release]'); CI=true: a failure")
            pytest.skip(f"{mod} not installed")
    if not (Path(sys.executable).parent / "cyclonedx-py").exists():
        if os.environ.get("CI"):
            pytest.fail("cyclonedx-py missing (pip install -e '.[release]'); CI=true: a failure")
        pytest.skip("cyclonedx-py not installed")
    has_deb = subprocess.run(["git", "cat-file", "-e", "HEAD:scripts/build-deb"], cwd=ROOT).returncode == 0
    out = tmp_path / "rel"
    cmd = [sys.executable, str(ROOT / "scripts" / "release"), "--out", str(out), "--key", str(keys[0]),
           "--results", str(_ci_results(tmp_path / "results"))]
    res = subprocess.run(cmd + ([] if has_deb else ["--no-deb"]), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    ok = _verify(out, keys[1])
    assert ok.returncode == 0, ok.stderr
    manifest = json.loads((out / "MANIFEST.json").read_text())
    listed = {f["path"] for f in manifest["files"]}
    assert {"evidence/kernel-matrix.json", "evidence/soak/soak.json", "evidence/soak/soak.md",
            "evidence/EDGE_CASE_COMPLIANCE_SUITE.md", "evidence/PERFORMANCE.md"} <= listed
    assert manifest["evidence_missing"] == []
    assert (manifest["deb"] == "built") == has_deb
    assert len([p for p in listed if p.endswith(".deb")]) == (1 if has_deb else 0)
    assert (manifest["deb_sbom"] in listed) if has_deb else manifest["deb_sbom"] is None
    # the SBOM: the runtime closure, without pip, setuptools or any test tool
    bom = json.loads((out / manifest["sbom"]).read_text())
    names = {c["name"].lower().replace("_", "-") for c in bom["components"]}
    assert {"trio", "msgspec", "orjson", "prometheus-client", "numpy", "cryptography"} <= names
    assert not names & {"pip", "setuptools", "wheel", "pytest", "mypy", "ruff", "hypothesis",
                        "cyclonedx-bom", "build", "pyyaml", "matplotlib", "faust-streaming"}
    wheel = next(p for p in listed if p.endswith(".whl"))
    data = bytearray((out / wheel).read_bytes())
    data[len(data) // 3] ^= 0x01
    (out / wheel).write_bytes(bytes(data))
    bad = _verify(out, keys[1])
    assert bad.returncode == 1
    assert f"{out / wheel}: sha256" in bad.stderr
    assert f"{out / wheel}: signature does not verify" in bad.stderr
