"""The .deb end to end (marker ``package``, a scripts/test step; root): scripts/build-deb,
then real dpkg in a throwaway root: an overlay of this machine's / (so python3, libbpf1
and dpkg's database are the host's, and nothing the test does reaches the host) with
/proc, /dev and /sys bound in.  Install, the files and modes, ``aegis doctor`` from the
installed tree (this host cannot enforce: exit 2 is the honest answer, and its load
checks prove the packaged CO-RE object reached the kernel), a reinstall that keeps an
edited conffile, remove (state kept), purge (nothing left but dpkg's own records)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.package


def sh(*cmd: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    t0 = time.monotonic()
    p = sh(str(ROOT / "scripts" / "build-deb"), "--out", str(out), timeout=600)
    print(f"build-deb: {time.monotonic() - t0:.1f} s; {p.stderr.strip().splitlines()[-1]}")
    path = Path(p.stdout.strip().splitlines()[-1])
    assert path.exists() and path.parent == out, p.stdout
    return path


MDWE_SCRIPT = """
import ctypes, json, os, runpy, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    print(f"PR_SET_MDWE not supported here (errno {ctypes.get_errno()}): not checked")
    sys.exit(0)
import mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("W+X mapping allowed: MDWE not in force")
except OSError:
    pass
import numpy, cryptography.hazmat.primitives.asymmetric.ed25519, confluent_kafka, trio, msgspec, orjson
import aegis_stream.agent.run, aegis_stream.pipeline.pipeline, aegis_stream.fleet.sink
from aegis_stream.kernel import libbpf
lib = libbpf._Lib.get()  # installs the ctypes print callback (a libffi closure)
print("in force: imports, the libbpf callback and doctor ran")
sys.argv = ["aegis", "doctor", "--json"]
runpy.run_module("aegis_stream.cli", run_name="__main__")
"""


class Throwaway:
    """An overlay of / on a tmpfs upper layer, chroot-able; every write lands in ``upper``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.layer = base / "layer"
        self.upper = self.layer / "upper"
        self.root = base / "merged"
        self.mounts: list[Path] = []

    def __enter__(self) -> Throwaway:
        for d in (self.layer, self.root):
            d.mkdir(parents=True)
        self._mount(["-t", "tmpfs", "-o", "size=1g", "tmpfs"], self.layer)
        (self.upper).mkdir()
        (self.layer / "work").mkdir()
        self._mount(["-t", "overlay", "-o", f"lowerdir=/,upperdir={self.upper},workdir={self.layer}/work",
                     "overlay"], self.root)
        # /sys without its submounts: the host's bpffs and cgroupfs stay out of reach
        for src in ("/proc", "/dev", "/sys"):
            self._mount(["--bind", src], self.root / src.lstrip("/"))
        return self

    def _mount(self, args: list[str], target: Path) -> None:
        sh("mount", *args, str(target))
        self.mounts.append(target)

    def __exit__(self, *exc: object) -> None:
        for m in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(m)], capture_output=True)

    def run(self, *cmd: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        e = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", **(env or {})}
        p = subprocess.run(["chroot", str(self.root), *cmd], capture_output=True, text=True,
                           timeout=timeout, env=e)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def changed(self) -> set[str]:
        """Paths written in the throwaway root (files, links, whiteouts; not bare dirs)."""
        out = set()
        for dirpath, _dirs, files in os.walk(self.upper):
            for name in files:
                out.add(os.path.relpath(os.path.join(dirpath, name), self.upper))
        return out


@pytest.fixture
def throwaway(tmp_path) -> Iterator[Throwaway]:
    if os.geteuid() != 0:
        pytest.fail("the .deb test needs root (mount, chroot, dpkg)")
    if sh("dpkg-query", "-W", "-f=${Status}", "aegis", check=False).stdout.startswith("install ok"):
        pytest.fail("the aegis package is installed on this machine: the throwaway root would upgrade it")
    with Throwaway(tmp_path) as t:
        yield t


def test_deb_metadata_and_layout(deb):
    info = sh("dpkg-deb", "--field", str(deb)).stdout
    assert "Package: aegis" in info and "Depends: python3 (>= 3.11), python3 (<< 3.12), libbpf1" in info
    contents = sh("dpkg-deb", "--contents", str(deb)).stdout.splitlines()
    by_path = {line.split()[-1].lstrip("."): line.split() for line in contents}
    assert by_path["/var/lib/aegis/"][0] == "drwx------" and by_path["/var/lib/aegis/"][1] == "root/root"
    assert by_path["/var/log/aegis/"][0] == "drwxr-x---"
    assert by_path["/usr/bin/aegis"][0] == "-rwxr-xr-x"
    assert by_path["/lib/systemd/system/aegis.service"][0] == "-rw-r--r--"
    assert "/opt/aegis/lib/python3.11/site-packages/aegis_stream/bpf/aegis.bpf.o" in by_path
    assert not [p for p in by_path if p.endswith((".c", ".h")) and "aegis_stream" in p]
    assert all(parts[1] == "root/root" for parts in by_path.values())
    conffiles = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True,
                               text=True).stdout.split()
    assert conffiles == ["/etc/aegis/aegis.toml", "/etc/logrotate.d/aegis"]


def test_install_doctor_upgrade_remove_purge(deb, throwaway):
    t = throwaway
    before = t.changed()
    shutil.copy(deb, t.root / "tmp" / deb.name)
    pkg = f"/tmp/{deb.name}"
    t0 = time.monotonic()
    p = t.run("dpkg", "-i", pkg)  # postinst where systemd is not running: no systemctl
    assert "systemctl" not in p.stderr, p.stderr
    # the files, with their modes
    st = (t.root / "var/lib/aegis").stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 0
    assert stat.S_IMODE((t.root / "var/log/aegis").stat().st_mode) == 0o750
    assert (t.root / "etc/aegis/aegis.toml").read_text() == (ROOT / "packaging/aegis.toml").read_text()
    assert (t.root / "lib/systemd/system/aegis.service").read_text() == (ROOT / "packaging/aegis.service").read_text()
    # the agent runs from /opt/aegis, on the system python3, not from this checkout
    where = t.run("/opt/aegis/bin/python", "-I", "-c",
                  "import aegis_stream, sys; print(aegis_stream.__file__); print(sys.executable)").stdout.split()
    assert where[0] == "/opt/aegis/lib/python3.11/site-packages/aegis_stream/__init__.py", where
    assert t.run("aegis", "--version").stdout.strip() == "aegis 0.1.0"
    # the installed config is valid for the installed agent (a refusal would exit 2 with
    # "config ..." before any doctor-like output)
    t.run("/opt/aegis/bin/python", "-I", "-c",
          "from aegis_stream.agent import config; config.load('/etc/aegis/aegis.toml')")
    # doctor from the package: exit 2 here (no securityfs, programs refused), a JSON report,
    # and its load checks show the packaged object was opened and sent to the kernel
    d = t.run("aegis", "doctor", "--json", check=False, timeout=120)
    assert d.returncode in (0, 2), d.stdout + d.stderr
    report = json.loads(d.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["exit_code"] == d.returncode and "capabilities" in checks
    loads = [c for n, c in checks.items() if n.startswith("load:")]
    assert loads and all("not found" not in c["reason"] for c in loads), loads
    print(f"doctor from the package: exit {d.returncode} ({report['verdict']})")
    # the unit's MemoryDenyWriteExecute=yes: the packaged agent's native parts (the ctypes
    # callback libbpf logs through, numpy, cryptography, confluent-kafka) and doctor's BPF
    # load under the kernel's own W^X (PR_SET_MDWE), where this kernel has it (>= 6.3)
    m = t.run("/opt/aegis/bin/python", "-I", "-c", MDWE_SCRIPT, check=False, timeout=120)
    assert m.returncode in (0, 2) and "Traceback" not in m.stderr, m.stdout + m.stderr
    print(f"under PR_SET_MDWE: {m.stdout.splitlines()[0]}")
    # the unit as installed verifies against the installed /usr/bin/aegis
    if shutil.which("systemd-analyze"):
        v = t.run("systemd-analyze", "verify", "/lib/systemd/system/aegis.service", check=False)
        assert v.returncode == 0 and not v.stderr.strip(), v.stderr
    # no bytecode written at run time (the package's .pyc are valid; /opt stays as shipped)
    listed = set(t.run("dpkg", "-L", "aegis").stdout.split())
    extra = [os.path.join(dp, f)[len(str(t.root)):] for dp, _, fs in os.walk(t.root / "opt/aegis") for f in fs]
    assert not [x for x in extra if x not in listed], [x for x in extra if x not in listed][:5]

    # upgrade path (a reinstall runs prerm upgrade / postinst configure <version>): an
    # edited conffile is kept, state is kept
    toml = t.root / "etc/aegis/aegis.toml"
    toml.write_text(toml.read_text().replace('log_format = "text"', 'log_format = "json"'))
    (t.root / "var/lib/aegis/status.json").write_text("{}")
    t.run("dpkg", "-i", "--force-confold", pkg)
    assert 'log_format = "json"' in toml.read_text()
    assert (t.root / "var/lib/aegis/status.json").exists()

    # remove: the program goes, config and state stay
    t.run("dpkg", "--remove", "aegis")
    assert not (t.root / "opt/aegis").exists() and not (t.root / "usr/bin/aegis").exists()
    assert toml.exists() and (t.root / "var/lib/aegis/status.json").exists()
    # purge: nothing of the package is left
    (t.root / "etc/aegis/policy.toml.signed").write_text("x")  # put there by the operator
    t.run("dpkg", "--purge", "aegis")
    # dpkg's own records, the .deb copied in, and the marker systemd-analyze verify leaves
    left = sorted(p for p in t.changed() - before
                  if not p.startswith(("var/lib/dpkg/", "var/log/dpkg.log", "tmp/aegis_"))
                  and p != "run/systemd/systemd-units-load")
    assert left == [], left
    for p in ("opt/aegis", "etc/aegis", "var/lib/aegis", "var/log/aegis", "etc/logrotate.d/aegis",
              "lib/systemd/system/aegis.service", "usr/share/doc/aegis"):
        assert not (t.root / p).exists(), p
    print(f"install + doctor + reinstall + remove + purge: {time.monotonic() - t0:.1f} s")
