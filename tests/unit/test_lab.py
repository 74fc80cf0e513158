"""Unit tests of the kernel lab that need no QEMU, network or root.

The real boots are exercised by `scripts/fetch-kernels` + `aegis lab exec` (and the
kernel-marked tests run inside them); here: apt output parsing, version choice, the
private apt configuration, the cache layout, the guest script and the vng command line,
and lab_exec's host-side plumbing against a fake vng.
"""

from __future__ import annotations

import argparse
import shutil
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from aegis_stream.errors import LabError
from aegis_stream.lab import apt, cli, kernels, vm

# ----------------------------------------------------------------------------- sources

DEB822 = textwrap.dedent(
    """\
    Types: deb
    # http://snapshot.debian.org/archive/debian/20250520T000000Z
    URIs: http://mirror.example/debian
    Suites: bookworm bookworm-updates
    Components: main
    Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

    Types: deb
    URIs: http://mirror.example/debian-security
    Suites: bookworm-security
    Components: main
    Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
    """
)


def test_host_sources_deb822() -> None:
    m = apt.parse_host_sources({"/etc/apt/sources.list.d/debian.sources": DEB822})
    assert m.debian == "http://mirror.example/debian"
    assert m.security == "http://mirror.example/debian-security"


def test_one_stanza_parser_reads_deb822_sources(tmp_path: Path) -> None:
    """The .sources reader and the apt-cache reader are one parser: comments skipped, field
    names case-insensitive for deb822, continuation lines kept, an inline key ignored."""
    key = tmp_path / "k.gpg"
    key.write_bytes(b"")
    text = textwrap.dedent(
        f"""\
        # the Debian archive
        types: deb
        URIS: http://a.example/debian
        Suites: bookworm
          bookworm-updates
        Signed-By:
         {key}

        Types: deb
        URIs: http://b.example/debian-security
        Suites: bookworm-security
        Signed-By:
         -----BEGIN PGP PUBLIC KEY BLOCK-----
         .
         mQINBF...
        """
    )
    st = apt.parse_stanzas(text)
    assert st[0]["Suites"] == "bookworm\nbookworm-updates" and st[0]["Signed-By"] == str(key)
    m = apt.parse_host_sources({"/etc/apt/sources.list.d/x.sources": text})
    assert (m.debian, m.security, m.keyring) == (
        "http://a.example/debian", "http://b.example/debian-security", str(key))


def test_host_sources_one_line_and_derived_security() -> None:
    text = textwrap.dedent(
        """\
        # a comment
        deb-src http://src.example/debian bookworm main
        deb [arch=amd64 signed-by=/nonexistent.gpg] http://ftp.example/debian/ bookworm main
        deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main
        """
    )
    m = apt.parse_host_sources({"/etc/apt/sources.list": text})
    assert m.debian == "http://ftp.example/debian"
    assert m.security == "http://ftp.example/debian-security"
    assert m.keyring == apt.DEBIAN_KEYRING  # the named keyring does not exist


def test_host_sources_ignores_non_debian_and_disabled() -> None:
    other = "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n"
    disabled = DEB822.replace("Types: deb\n", "Types: deb\nEnabled: no\n")
    with pytest.raises(LabError, match="no Debian mirror"):
        apt.parse_host_sources(
            {"/x/node.sources": other, "/x/debian.sources": disabled, "/x/a.list.disabled": ""}
        )


def test_sources_list_pockets() -> None:
    m = apt.Mirrors("http://m/debian", "http://m/debian-security", "/k.gpg")
    bookworm = apt.sources_list("bookworm", m).splitlines()
    assert bookworm == [
        "deb [signed-by=/k.gpg] http://m/debian bookworm main",
        "deb [signed-by=/k.gpg] http://m/debian bookworm-updates main",
        "deb [signed-by=/k.gpg] http://m/debian-security bookworm-security main",
    ]
    assert apt.sources_list("sid", m) == "deb [signed-by=/k.gpg] http://m/debian sid main\n"


def test_private_apt_never_points_at_host_state(tmp_path: Path) -> None:
    papt = apt.PrivateApt(tmp_path / "apt", "trixie", apt.Mirrors("http://m/debian", "http://s"))
    papt.setup()
    opts = papt.options()
    values = dict(o.split("=", 1) for o in opts if o != "-o")
    for key in (
        "Dir::Etc::SourceList",
        "Dir::Etc::SourceParts",
        "Dir::State",
        "Dir::State::status",
        "Dir::Cache",
        "Dir::State::Lists",
    ):
        assert values[key].startswith(str(tmp_path)), key
    assert (tmp_path / "apt/etc/sources.list").read_text().startswith("deb ")
    assert (tmp_path / "apt/state/status").exists()


# ----------------------------------------------------------------------------- apt output

POLICY = """\
linux-image-amd64:
  Installed: (none)
  Candidate: 6.1.192-2
  Version table:
     6.1.192-2 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
     6.1.176-1 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
"""

SHOW_META = """\
Package: linux-image-amd64
Source: linux-signed-amd64 (6.1.192+2)
Version: 6.1.192-2
Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)
Description: Linux for 64-bit PCs (meta-package)
 This package depends on the latest Linux kernel.

Package: linux-image-amd64
Version: 6.1.176-1
Depends: linux-image-6.1.0-50-amd64 (= 6.1.176-1)
"""

SID_IMAGE_DEPENDS = (
    "dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, "
    "linux-base-7.2.13+deb14-amd64 (= 7.2.13-1), linux-binary-7.2.13+deb14-amd64 (= 7.2.13-1), "
    "linux-modules-7.2.13+deb14-amd64 (= 7.2.13-1)"
)


def test_policy_candidate() -> None:
    assert apt.parse_policy_candidate(POLICY) == "6.1.192-2"
    assert apt.parse_policy_candidate("x:\n  Candidate: (none)\n") is None
    assert apt.parse_policy_candidate("") is None


def test_stanzas_and_release() -> None:
    st = apt.parse_stanzas(SHOW_META)
    assert [s["Version"] for s in st] == ["6.1.192-2", "6.1.176-1"]
    assert "latest Linux kernel" in st[0]["Description"]
    assert kernels.image_release(st[0]["Depends"]) == "6.1.0-56-amd64"
    assert (
        kernels.image_release(
            "linux-base-amd64 (= 7.2.13-1), linux-image-7.2.13+deb14-amd64 (= 7.2.13-1)"
        )
        == "7.2.13+deb14-amd64"
    )
    with pytest.raises(LabError):
        kernels.image_release("linux-base-amd64")


def test_parse_depends() -> None:
    assert apt.parse_depends("a (>= 1) | b:any, c [amd64], d <!nocheck>") == [
        ["a", "b"],
        ["c"],
        ["d"],
    ]


def test_kernel_packages_bookworm_and_sid_split() -> None:
    assert kernels.kernel_packages(
        "6.1.0-56-amd64",
        "kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool",
    ) == ["linux-image-6.1.0-56-amd64"]
    assert kernels.kernel_packages("7.2.13+deb14-amd64", SID_IMAGE_DEPENDS) == [
        "linux-image-7.2.13+deb14-amd64",
        "linux-base-7.2.13+deb14-amd64",
        "linux-binary-7.2.13+deb14-amd64",
        "linux-modules-7.2.13+deb14-amd64",
    ]


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs dpkg --compare-versions")
def test_newest_version_uses_dpkg_order() -> None:
    assert apt.newest_version(["6.1.176-1", "6.1.192-2", "6.1.99-1"]) == "6.1.192-2"
    assert apt.newest_version(["7.2~rc3-1~exp1", "7.1.5-1"]) == "7.2~rc3-1~exp1"
    assert apt.newest_version(["6.12.117-1", "6.12.117-1+b1"]) == "6.12.117-1+b1"
    with pytest.raises(LabError):
        apt.newest_version([])


class FakeApt:
    suite = "bookworm"

    def __init__(self, outputs: dict[tuple[str, ...], str]) -> None:
        self.outputs = outputs
        self.calls: list[tuple[str, ...]] = []

    def run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        self.calls.append((tool, *args))
        return self.outputs[(tool, *args)]


def test_resolve_kernel_follows_candidate() -> None:
    apt = FakeApt(
        {
            ("apt-cache", "show", "linux-image-amd64"): SHOW_META,
            ("apt-cache", "policy", "linux-image-amd64"): POLICY,
            (
                "apt-cache",
                "show",
                "linux-image-6.1.0-56-amd64",
            ): "Package: linux-image-6.1.0-56-amd64\nVersion: 6.1.192-2\nDepends: kmod\n",
        }
    )
    release, pkgver, pkgs = kernels.resolve_kernel("6.1", apt)  # type: ignore[arg-type]
    assert (release, pkgver, pkgs) == (
        "6.1.0-56-amd64",
        "6.1.192-2",
        ["linux-image-6.1.0-56-amd64"],
    )


# ----------------------------------------------------------------------------- cache


def make_tree(base: Path, series: str, release: str, *, merged_usr: bool = False) -> Path:
    tree = base / series / release
    mods = tree / ("usr/lib/modules" if merged_usr else "lib/modules") / release
    (mods / "kernel").mkdir(parents=True)
    (mods / "modules.dep").write_text("")
    (mods / "config").write_text('CONFIG_BPF_LSM=y\nCONFIG_LSM="landlock,yama,bpf"\n')
    if merged_usr:
        (mods / "vmlinuz").write_bytes(b"MZ")
    else:
        (tree / "boot").mkdir()
        (tree / "boot" / f"vmlinuz-{release}").write_bytes(b"MZ")
    return tree


def test_normalize_merged_usr_tree(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, "7", "7.2.13+deb14-amd64", merged_usr=True)
    kernels._normalize_tree(tree, "7.2.13+deb14-amd64")
    assert (tree / "lib").is_symlink()
    assert (tree / "boot/vmlinuz-7.2.13+deb14-amd64").read_bytes() == b"MZ"
    (tree / ".complete").write_text("7.2.13-1\n")
    k = kernels.find_kernel("7", tmp_path)
    assert k.version == "7.2.13+deb14-amd64" and k.package_version == "7.2.13-1"
    assert k.root == tree
    assert kernels.kernel_config(k)["CONFIG_LSM"] == "landlock,yama,bpf"


def test_normalize_tree_without_vmlinuz(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "lib/modules/6.1.0-1-amd64").mkdir(parents=True)
    with pytest.raises(LabError, match="no vmlinuz"):
        kernels._normalize_tree(tree, "6.1.0-1-amd64")


def test_list_and_find_kernels(tmp_path: Path) -> None:
    for rel in ("6.1.0-9-amd64", "6.1.0-56-amd64", "6.1.0-57-amd64"):
        make_tree(tmp_path, "6.1", rel)
    for rel in ("6.1.0-9-amd64", "6.1.0-56-amd64"):  # -57 is incomplete (no marker)
        (tmp_path / "6.1" / rel / ".complete").write_text("x\n")
    ks = kernels.list_kernels(tmp_path)
    assert [k.version for k in ks] == ["6.1.0-56-amd64", "6.1.0-9-amd64"]
    assert kernels.find_kernel("6.1", tmp_path).version == "6.1.0-56-amd64"
    with pytest.raises(LabError, match="not fetched"):
        kernels.find_kernel("6.12", tmp_path)
    with pytest.raises(LabError, match="unknown kernel series"):
        kernels.find_kernel("4.19", tmp_path)


def test_fetch_kernel_reuses_cache_without_network(tmp_path: Path, monkeypatch) -> None:
    make_tree(tmp_path, "6.12", "6.12.118+deb13-amd64")
    (tmp_path / "6.12/6.12.118+deb13-amd64/.complete").write_text("6.12.118-1\n")

    def no_network(*a, **kw):
        raise AssertionError("fetch_kernel touched apt although the kernel is cached")

    monkeypatch.setattr(apt.PrivateApt, "run", no_network)
    monkeypatch.setattr(kernels, "host_mirrors", no_network)
    assert kernels.fetch_kernel("6.12", tmp_path).version == "6.12.118+deb13-amd64"


def test_cache_dir_default(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AEGIS_KERNEL_CACHE", str(tmp_path))
    assert kernels.cache_dir() == tmp_path
    monkeypatch.delenv("AEGIS_KERNEL_CACHE")
    assert kernels.cache_dir() == Path("~/.cache/aegis/kernels").expanduser()
    assert kernels.cache_dir("/x") == Path("/x")


def test_version_key_is_natural() -> None:
    vs = ["6.1.0-9-amd64", "6.1.0-56-amd64", "6.1.0-10-amd64"]
    assert sorted(vs, key=kernels._version_key)[-1] == "6.1.0-56-amd64"


# ----------------------------------------------------------------------------- guest / vng


def test_lsm_append() -> None:
    assert vm.lsm_append({"CONFIG_BPF_LSM": "y", "CONFIG_LSM": "landlock,yama,bpf"}) == []
    assert vm.lsm_append({"CONFIG_BPF_LSM": "y", "CONFIG_LSM": "landlock,yama"}) == [
        vm.LSM_APPEND
    ]
    assert vm.lsm_append({}) == [vm.LSM_APPEND]
    with pytest.raises(LabError, match="CONFIG_BPF_LSM"):
        vm.lsm_append({"CONFIG_BPF_LSM": "n"})
    assert "bpf" in vm.LSM_APPEND.split("=")[1].split(",")


def test_parse_kconfig() -> None:
    cfg = kernels.parse_kconfig('# CONFIG_X is not set\nCONFIG_A=y\nCONFIG_LSM="a,b"\nCONFIG_N=3\n')
    assert cfg == {"CONFIG_A": "y", "CONFIG_LSM": "a,b", "CONFIG_N": "3"}


def test_guest_script() -> None:
    s = vm.guest_script(
        ["python", "-c", "print('a b')"],
        cwd="/work/main",
        iodir="/tmp/aegis-lab-x",
        env={"FOO": "it's", "AEGIS_LAB": "1"},
        path_dirs=["/work/main/.venv/bin"],
    )
    lines = s.splitlines()
    assert lines[0] == "exec </dev/null >/tmp/aegis-lab-x/stdout 2>/tmp/aegis-lab-x/stderr"
    assert "mount -t bpf bpf /sys/fs/bpf" in s
    assert "mount -t cgroup2" in s
    path = next(ln for ln in lines if ln.startswith("export PATH="))
    dirs = path.split("=", 1)[1].strip("'").split(":")
    assert dirs[0] == "/work/main/.venv/bin" and "/usr/sbin" in dirs and "/sbin" in dirs
    assert "export FOO='it'\"'\"'s'" in lines
    assert "cd /work/main || { echo 125 >/tmp/aegis-lab-x/rc; exit 125; }" in lines
    assert "python -c 'print('\"'\"'a b'\"'\"')'" in lines
    assert lines[-1] == "exit $rc"
    assert "mv /tmp/aegis-lab-x/rc.tmp /tmp/aegis-lab-x/rc" in s
    with pytest.raises(LabError, match="empty"):
        vm.guest_script([], cwd="/", iodir="/tmp/x")
    with pytest.raises(LabError, match="variable name"):
        vm.guest_script(["true"], cwd="/", iodir="/tmp/x", env={"A B": "1"})


def fake_kernel(tmp_path: Path) -> kernels.LabKernel:
    tree = make_tree(tmp_path, "6.1", "6.1.0-56-amd64")
    (tree / ".complete").write_text("6.1.192-2\n")
    return kernels.find_kernel("6.1", tmp_path)


def test_vng_command(tmp_path: Path) -> None:
    k = fake_kernel(tmp_path)
    cmd = vm.vng_command(
        k,
        "/tmp/aegis-lab-x/run.sh",
        vng="vng",
        rwdirs=["/tmp/aegis-lab-x"],
        overlays=["/work/main"],
        memory="2G",
        cpus=1,
        append=["lsm=bpf"],
    )
    assert cmd[:3] == ["vng", "--verbose", "--disable-kvm"]
    assert cmd[cmd.index("--run") + 1] == str(k.vmlinuz)
    assert cmd[cmd.index("--memory") + 1] == "2G"
    assert cmd[cmd.index("--cpus") + 1] == "1"
    assert cmd[cmd.index("--user") + 1] == "root"
    assert "--rwdir=/tmp/aegis-lab-x" in cmd
    assert "--overlay-rwdir=/work/main" in cmd
    assert cmd[cmd.index("--append") + 1] == "lsm=bpf"
    assert cmd[-2:] == ["--exec", "bash /tmp/aegis-lab-x/run.sh"]
    with pytest.raises(LabError, match="cannot pass"):
        vm.vng_command(k, "/tmp/x/run.sh", rwdirs=["/tmp/a dir"])
    assert not any(a.startswith("--qemu-opts") for a in cmd)


def test_vng_command_qemu_opts(tmp_path: Path) -> None:
    k = fake_kernel(tmp_path)
    for opts in ("-icount shift=0", ["-icount", "shift=0"], ("-icount", "shift=0")):
        cmd = vm.vng_command(k, "/tmp/x/run.sh", qemu_opts=opts)
        # one "=" argument (a value starting with "-" would read as a vng option), before --exec
        assert cmd[-3:] == ["--qemu-opts=-icount shift=0", "--exec", "bash /tmp/x/run.sh"]
    with pytest.raises(LabError, match="QEMU option"):
        vm.vng_command(k, "/tmp/x/run.sh", qemu_opts=["-name", "a b"])
    with pytest.raises(LabError, match="QEMU option"):
        vm.vng_command(k, "/tmp/x/run.sh", qemu_opts="-d 'in_asm;x'")


def test_lab_exec_unfetched_kernel(tmp_path: Path) -> None:
    k = kernels.LabKernel("6.1", "6.1.0-1-amd64", tmp_path / "nope", tmp_path / "mods")
    with pytest.raises(LabError, match="not fetched"):
        vm.lab_exec(k, ["true"])
    with pytest.raises(LabError, match="not fetched"):
        vm.lab_exec("6.12", ["true"], cache=tmp_path)


def test_check_host_names_missing_tool(monkeypatch) -> None:
    monkeypatch.setattr(
        vm.shutil,
        "which",
        lambda exe, path=None: None if exe == "qemu-system-x86_64" else f"/usr/bin/{exe}",
    )
    with pytest.raises(LabError, match="qemu-system-x86_64 not found: apt-get install"):
        vm.check_host()


FAKE_VNG = """\
#!{python}
# Stands in for vng: finds the shared io dir and the script, plays the guest's part.
import os, re, sys, time
args = sys.argv[1:]
io = next(a.split("=", 1)[1] for a in args if a.startswith("--rwdir=") and "aegis-lab-" in a)
script = args[args.index("--exec") + 1].split(" ", 1)[1]
text = open(script).read()
mode = os.environ["FAKE_VNG_MODE"]
print("[    0.000000] Linux version 6.1.0-56-amd64")
if mode == "ok":
    assert "export AEGIS_LAB=1" in text and "export AEGIS_LAB_KERNEL=6.1" in text
    open(io + "/stdout", "w").write("hello\\n")
    open(io + "/stderr", "w").write("warn\\n")
    open(io + "/boot", "w").write("9.25\\n")
    open(io + "/rc", "w").write("3\\n")
    sys.exit(255)  # what vng returns without udev: must not matter
if mode == "panic":
    print("[    1.000000] Kernel panic - not syncing: VFS: Unable to mount root fs")
    sys.exit(0)
if mode == "hang":
    time.sleep(60)
"""


@pytest.fixture
def fake_vng(tmp_path: Path, monkeypatch) -> Path:
    exe = tmp_path / "bin" / "vng"
    exe.parent.mkdir()
    exe.write_text(FAKE_VNG.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(vm, "check_host", lambda: {"vng": str(exe)})
    return exe


def test_lab_exec_reads_exit_status_from_guest(tmp_path: Path, fake_vng, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_VNG_MODE", "ok")
    k = fake_kernel(tmp_path)
    seen: list[str] = []
    r = vm.lab_exec(k, ["true"], cwd=tmp_path, on_stdout=seen.append)
    assert r.returncode == 3
    assert (r.stdout, r.stderr, r.boot_seconds) == ("hello\n", "warn\n", 9.25)
    assert "Linux version" in r.console
    assert "".join(seen) == "hello\n"


def test_lab_exec_passes_qemu_opts(tmp_path: Path, fake_vng, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_VNG_MODE", "ok")
    seen: list[list[str]] = []
    plain = vm.vng_command
    monkeypatch.setattr(vm, "vng_command", lambda *a, **kw: seen.append(plain(*a, **kw)) or seen[-1])
    k = fake_kernel(tmp_path)
    r = vm.lab_exec(k, ["true"], cwd=tmp_path, cpus=1, qemu_opts=["-icount", "shift=0"])
    assert r.returncode == 3
    assert "--qemu-opts=-icount shift=0" in seen[0]
    assert seen[0][seen[0].index("--cpus") + 1] == "1"
    with pytest.raises(LabError, match="QEMU option"):  # refused before anything boots
        vm.lab_exec(k, ["true"], cwd=tmp_path, qemu_opts=["a;b"])
    assert len(seen) == 1


def test_lab_exec_boot_failure(tmp_path: Path, fake_vng, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_VNG_MODE", "panic")
    with pytest.raises(LabError, match="no exit status.*Kernel panic"):
        vm.lab_exec(fake_kernel(tmp_path), ["true"], cwd=tmp_path)


def test_lab_exec_timeout(tmp_path: Path, fake_vng, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_VNG_MODE", "hang")
    with pytest.raises(vm.LabTimeout, match="timed out") as ei:
        vm.lab_exec(fake_kernel(tmp_path), ["true"], cwd=tmp_path, timeout=1)
    assert "Linux version" in ei.value.console


def test_cmd_lab_exec_returns_command_status(tmp_path, fake_vng, monkeypatch, capsys) -> None:
    monkeypatch.setenv("FAKE_VNG_MODE", "ok")
    fake_kernel(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli.cmd_lab_exec("6.1", ["--", "true"], cache=tmp_path) == 3
    out, err = capsys.readouterr()
    assert out == "hello\n"
    assert "warn" in err and "exit 3" in err
    assert cli.cmd_lab_exec("6.12", ["true"], cache=tmp_path) == 2
    assert "not fetched" in capsys.readouterr().err


# ----------------------------------------------------------------------------- CLI


def test_subparsers() -> None:
    ap = argparse.ArgumentParser()
    cli.add_lab_subparsers(ap.add_subparsers(dest="lab_command", required=True))
    a = ap.parse_args(["exec", "--kernel", "7", "--", "uname", "-r"])
    assert (a.kernel, a.argv) == ("7", ["--", "uname", "-r"])
    a = ap.parse_args(["exec", "--", "pytest", "-m", "kernel"])
    assert a.kernel == "6.1" and a.argv[1:] == ["pytest", "-m", "kernel"]
    a = ap.parse_args(["exec", "--qemu-opts=-icount shift=0", "--", "true"])
    assert a.qemu_opts == "-icount shift=0"
    a = ap.parse_args(["kernels", "--fetch"])
    assert a.fetch and a.func is cli.cmd_lab_kernels


def test_cmd_lab_kernels(tmp_path: Path, capsys) -> None:
    fake_kernel(tmp_path)
    assert cli.cmd_lab_kernels(argparse.Namespace(cache=str(tmp_path))) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["SERIES", "SUITE", "VERSION"]
    rows = {ln.split()[0]: ln.split() for ln in out[1:]}
    assert rows["6.1"][2] == "6.1.0-56-amd64"
    assert rows["6.12"][2] == "(not" and rows["7"][1] == "sid"


def test_precompile_writes_bytecode_the_guest_can_use_and_skips_the_rest(tmp_path: Path) -> None:
    """lab/bytecode.py: the project's packages get timestamp pycs Python accepts (so the
    guest, which never writes bytecode, reads them); venvs, results and build trees are
    never walked; a directory that is not a project is left alone; a stale pyc is
    replaced, a file that does not compile is reported."""
    import importlib.util
    import os

    from aegis_stream.lab.bytecode import precompile

    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    for rel in ("pkg/mod.py", "pkg/sub/deep.py", "top.py", ".venv/lib/v.py", "results/r.py",
                "build/b.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("X = 1\n")

    def pyc(rel: str) -> Path:
        return Path(importlib.util.cache_from_source(str(tmp_path / rel)))

    assert precompile(tmp_path)
    for rel in ("pkg/mod.py", "pkg/sub/deep.py", "top.py"):
        assert pyc(rel).is_file(), rel
    for rel in (".venv/lib/v.py", "results/r.py", "build/b.py"):
        assert not pyc(rel).exists(), rel
    # the header Python checks: timestamp mode, the source's mtime and size
    src = tmp_path / "pkg/mod.py"
    head = pyc("pkg/mod.py").read_bytes()[:16]
    assert head[:4] == importlib.util.MAGIC_NUMBER and head[4:8] == b"\0\0\0\0"
    assert int.from_bytes(head[8:12], "little") == int(src.stat().st_mtime) & 0xFFFFFFFF
    assert int.from_bytes(head[12:16], "little") == src.stat().st_size
    # edited source: the pyc is rewritten for it
    src.write_text("X = 22\n")
    os.utime(src, (src.stat().st_atime, src.stat().st_mtime + 5))
    assert precompile(tmp_path)
    assert int.from_bytes(pyc("pkg/mod.py").read_bytes()[12:16], "little") == 7
    # a syntax error is reported, not raised
    (tmp_path / "pkg/bad.py").write_text("def (:\n")
    assert precompile(tmp_path) is False
    # not a project (no pyproject.toml): nothing is written
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "m.py").write_text("Y = 2\n")
    assert precompile(other)
    assert not (other / "__pycache__").exists()


def test_prewrite_pytest_leaves_the_rewritten_test_bytecode_the_guest_reads(tmp_path: Path) -> None:
    """A guest pytest may not write bytecode but reads pytest's cache of rewritten test
    modules: the host collects the command's test paths first, so the cache is there."""
    from aegis_stream.lab.bytecode import prewrite_pytest, pytest_paths

    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("def test_a():\n    assert 1 + 1 == 2\n")
    (tmp_path / "tests" / "conftest.py").write_text("X = 1\n")
    argv = ["pytest", "-q", "-p", "no:cacheprovider", "--junitxml=/tmp/j.xml", "-k", "nothing_here",
            "tests/test_a.py::test_a", "tests/conftest.py"]
    assert pytest_paths(argv, tmp_path) == ["tests/test_a.py", "tests/conftest.py"]
    assert pytest_paths(["/v/bin/python", "-m", "pytest", "tests"], tmp_path) == ["tests"]
    assert pytest_paths(["aegis", "run"], tmp_path) is None
    assert pytest_paths(["pytest", "-q"], tmp_path) == []
    assert prewrite_pytest(["pytest", "-q"], tmp_path) is False  # no paths: nothing collected
    assert prewrite_pytest(["aegis", "run", "tests"], tmp_path) is False
    assert prewrite_pytest(["pytest", "tests"], tmp_path) is True
    cached = sorted(p.name for p in (tmp_path / "tests" / "__pycache__").glob("*-pytest-*.pyc"))
    assert [n.split(".")[0] for n in cached] == ["conftest", "test_a"]
    # a collection error: reported as False, nothing raised
    (tmp_path / "tests" / "test_b.py").write_text("def (:\n")
    assert prewrite_pytest(["pytest", "tests"], tmp_path) is False
