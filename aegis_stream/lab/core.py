"""The kernel lab: boot real Debian kernels under QEMU (virtme-ng) and run a command in them.

Three kernel series are supported, each taken from the Debian suite that ships it::

    6.1   bookworm (+ bookworm-updates, bookworm-security)
    6.12  trixie   (+ trixie-updates, trixie-security)
    7     sid

Fetching uses a *private* apt configuration under the cache folder (its own sources.list,
state, lists and archives), pointed at the Debian mirror the host's own apt sources already
use; the host's apt state is never touched.  The newest ``linux-image-amd64`` of the suite
is resolved, its ``linux-image-<release>`` dependency followed (sid splits that into
``linux-binary-<release>`` / ``linux-modules-<release>`` / ``linux-base-<release>``), the
packages are downloaded with ``apt-get download`` and extracted with ``dpkg-deb -x``::

    $AEGIS_KERNEL_CACHE (default ~/.cache/aegis/kernels)/
        apt/<suite>/...                   private apt config + lists
        <series>/<release>/               extracted packages (boot/, lib/modules/<release>/)
        <series>/<release>/.complete      written last: the tree is usable

Booting: ``vng --verbose --disable-kvm --run <vmlinuz> --rwdir=IODIR --exec "bash
IODIR/run.sh"`` (QEMU TCG: no KVM needed).  The guest's root is the host's ``/`` (read-only
9p), /etc /usr /var /tmp ... and the working directory are copy-on-write overlays, so the
venv, pyenv and the repo are visible at the same paths and guest writes never reach the
host.  The script mounts bpffs / cgroup2 if missing, sets PATH (venv bin first, then
/usr/sbin:/sbin...), cds into ``cwd`` and runs the command with stdout/stderr going to
files in IODIR, a host temp dir shared read-write; its exit status is written to
IODIR/rc.  vng's own exit status is NOT used: without udev on the host (the guest runs the
host's userspace), virtme-ng-init finds no /dev/virtio-ports/* links, falls back to the
serial console and vng exits 255 whatever the command returned.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from aegis_stream.errors import LabError

# series -> Debian suite that ships it
KERNELS: dict[str, str] = {"6.1": "bookworm", "6.12": "trixie", "7": "sid"}

DEFAULT_SERIES = "6.1"
DEFAULT_CACHE = "~/.cache/aegis/kernels"
DEFAULT_MEMORY = "1G"
DEFAULT_CPUS = 2
DEFAULT_TIMEOUT = 300.0

# Appended to the kernel command line when the kernel's built-in default LSM list lacks bpf.
# Debian's 6.1/6.12/7.x configs default to "landlock,lockdown,yama,loadpin,safesetid,
# integrity,apparmor,selinux,smack,tomoyo,bpf"-style lists; keep this as a safety net.
LSM_APPEND = "lsm=lockdown,capability,landlock,yama,apparmor,bpf"

DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
HOST_SOURCES = ("/etc/apt/sources.list", "/etc/apt/sources.list.d")

_EXTRA_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


@dataclass(frozen=True)
class LabKernel:
    series: str  # "6.1" | "6.12" | "7"
    version: str  # kernel release, e.g. "6.1.0-56-amd64" (= uname -r in the guest)
    vmlinuz: Path
    modules_dir: Path  # <tree>/lib/modules/<version>
    package_version: str = ""  # Debian version of linux-image-amd64, e.g. "6.1.192-2"

    @property
    def root(self) -> Path:
        """The extracted package tree (has boot/ and lib/modules/)."""
        return self.modules_dir.parent.parent.parent


@dataclass(frozen=True)
class LabResult:
    returncode: int  # the guest command's exit status
    stdout: str  # the command's stdout
    stderr: str  # the command's stderr (and the guest prologue's)
    seconds: float  # host wall time, boot to power-off
    boot_seconds: float | None = None  # guest uptime when the command started
    console: str = ""  # vng/qemu output: the guest's serial console (boot log)


class LabTimeout(LabError):
    def __init__(
        self, message: str, *, stdout: str = "", stderr: str = "", console: str = ""
    ) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.console = console
        super().__init__(message)


# --------------------------------------------------------------------------- cache


def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    if path is not None:
        return Path(path).expanduser()
    return Path(os.environ.get("AEGIS_KERNEL_CACHE") or DEFAULT_CACHE).expanduser()


def _check_series(series: str) -> str:
    if series not in KERNELS:
        raise LabError(f"unknown kernel series {series!r} (supported: {', '.join(KERNELS)})")
    return series


def _load_tree(series: str, tree: Path) -> LabKernel | None:
    """A LabKernel for an extracted tree, or None if incomplete."""
    if not (tree / ".complete").is_file():
        return None
    version = tree.name
    vmlinuz = tree / "boot" / f"vmlinuz-{version}"
    modules = tree / "lib" / "modules" / version
    if not vmlinuz.is_file() or not modules.is_dir():
        return None
    pkgver = (tree / ".complete").read_text().strip()
    return LabKernel(series, version, vmlinuz, modules, pkgver)


def list_kernels(cache: str | os.PathLike[str] | None = None) -> list[LabKernel]:
    """Kernels already fetched into the cache, newest first within each series."""
    base = cache_dir(cache)
    out: list[LabKernel] = []
    for series in KERNELS:
        found = [k for t in sorted((base / series).glob("*")) if (k := _load_tree(series, t))]
        found.sort(key=lambda k: _version_key(k.version), reverse=True)
        out.extend(found)
    return out


def find_kernel(series: str, cache: str | os.PathLike[str] | None = None) -> LabKernel:
    """The newest fetched kernel of a series; LabError if none is."""
    _check_series(series)
    for k in list_kernels(cache):
        if k.series == series:
            return k
    raise LabError(
        f"kernel {series} is not fetched (in {cache_dir(cache)}); "
        f"run scripts/fetch-kernels or `aegis lab kernels --fetch`"
    )


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural sort key: "6.1.0-56-amd64" > "6.1.0-9-amd64"."""
    return tuple((1, int(p)) if p.isdigit() else (0, p) for p in re.split(r"[.\-+~]", version) if p)


# --------------------------------------------------------------------------- apt


@dataclass(frozen=True)
class Mirrors:
    debian: str  # e.g. http://deb.debian.org/debian
    security: str  # e.g. http://deb.debian.org/debian-security
    keyring: str = DEBIAN_KEYRING


def _parse_one_line_sources(text: str) -> list[tuple[str, list[str], str]]:
    """(uri, suites, signed_by) of each ``deb`` line of a one-line-style sources.list."""
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        rest = line[4:].strip()
        signed_by = ""
        if rest.startswith("["):
            opts, _, rest = rest[1:].partition("]")
            for opt in opts.split():
                k, _, v = opt.partition("=")
                if k == "signed-by":
                    signed_by = v
        parts = rest.split()
        if len(parts) >= 2:
            out.append((parts[0], [parts[1]], signed_by))
    return out


def _parse_deb822_sources(text: str) -> list[tuple[str, list[str], str]]:
    """(uri, suites, signed_by) of each enabled ``Types: deb`` stanza of a .sources file."""
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for raw in stanza.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0] in " \t" and key:
                fields[key] += " " + raw.strip()
                continue
            key, _, val = raw.partition(":")
            key = key.strip().lower()
            fields[key] = val.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        suites = fields.get("suites", "").split()
        signed_by = fields.get("signed-by", "")
        if "\n" in signed_by or "BEGIN PGP" in signed_by:
            signed_by = ""  # inline key: use the default keyring instead
        for uri in fields.get("uris", "").split():
            out.append((uri, suites, signed_by))
    return out


def parse_host_sources(files: Mapping[str, str]) -> Mirrors:
    """Pick the Debian archive and security mirrors out of the host's apt sources.

    ``files`` maps a path (its suffix decides the format) to its text.  The Debian archive
    is the first URI ending in ``/debian`` (or serving a plain Debian suite), the security
    archive the first serving a ``*-security`` suite; if the host has none, it is derived
    from the archive's host (``<scheme>://<host>/debian-security``).
    """
    entries: list[tuple[str, list[str], str]] = []
    for path, text in files.items():
        if path.endswith(".sources"):
            entries += _parse_deb822_sources(text)
        elif path.endswith(".list"):
            entries += _parse_one_line_sources(text)
    debian = security = keyring = ""
    for uri, suites, signed_by in entries:
        uri = uri.rstrip("/")
        is_sec = uri.endswith("/debian-security") or any(s.endswith("-security") for s in suites)
        is_deb = uri.endswith("/debian") or (
            not is_sec and any(s.split("-")[0] in _DEBIAN_CODENAMES for s in suites)
        )
        if is_sec and not security:
            security = uri
        elif is_deb and not debian:
            debian = uri
            keyring = signed_by
    if not debian:
        raise LabError(
            "no Debian mirror found in the host's apt sources "
            f"({', '.join(HOST_SOURCES)}); set AEGIS_DEBIAN_MIRROR=http://HOST/debian"
        )
    if not security:
        security = re.sub(r"/debian$", "/debian-security", debian)
        if security == debian:
            security = debian.rsplit("/", 1)[0] + "/debian-security"
    if not keyring or not Path(keyring).exists():
        keyring = DEBIAN_KEYRING
    return Mirrors(debian, security, keyring)


_DEBIAN_CODENAMES = {"buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid"}


def host_mirrors() -> Mirrors:
    override = os.environ.get("AEGIS_DEBIAN_MIRROR")
    if override:
        deb = override.rstrip("/")
        sec = os.environ.get("AEGIS_DEBIAN_SECURITY_MIRROR") or re.sub(
            r"/debian$", "/debian-security", deb
        )
        return Mirrors(deb, sec)
    files: dict[str, str] = {}
    main, parts = HOST_SOURCES
    if os.path.isfile(main):
        files[main] = Path(main).read_text(errors="replace")
    for p in sorted(glob.glob(os.path.join(parts, "*"))):
        if p.endswith((".list", ".sources")) and os.path.isfile(p):
            files[p] = Path(p).read_text(errors="replace")
    return parse_host_sources(files)


def suite_pockets(suite: str) -> list[tuple[str, str]]:
    """(archive, suite) pairs to use for a suite: "debian" or "security" archive."""
    if suite in ("sid", "unstable"):
        return [("debian", suite)]
    return [("debian", suite), ("debian", f"{suite}-updates"), ("security", f"{suite}-security")]


def sources_list(suite: str, mirrors: Mirrors) -> str:
    lines = []
    for archive, pocket in suite_pockets(suite):
        uri = mirrors.debian if archive == "debian" else mirrors.security
        lines.append(f"deb [signed-by={mirrors.keyring}] {uri} {pocket} main")
    return "\n".join(lines) + "\n"


class PrivateApt:
    """apt-get / apt-cache bound to a private config under ``root`` (never /etc/apt state)."""

    def __init__(self, root: Path, suite: str, mirrors: Mirrors) -> None:
        self.root = root
        self.suite = suite
        self.mirrors = mirrors

    def options(self) -> list[str]:
        r = self.root
        opts = {
            "Dir::Etc::SourceList": f"{r}/etc/sources.list",
            "Dir::Etc::SourceParts": f"{r}/etc/sources.list.d",
            "Dir::Etc::Preferences": f"{r}/etc/preferences",
            "Dir::Etc::PreferencesParts": f"{r}/etc/preferences.d",
            "Dir::State": f"{r}/state",
            "Dir::State::Lists": f"{r}/state/lists",
            "Dir::State::status": f"{r}/state/status",
            "Dir::Cache": f"{r}/cache",
            "Dir::Cache::Archives": f"{r}/cache/archives",
            "APT::Architecture": "amd64",
            "APT::Architectures": "amd64",
            "APT::Sandbox::User": "root",
            "Acquire::Languages": "none",
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled": "false",
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled": "false",
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled": "false",
            "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled": "false",
            "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled": "false",
        }
        out: list[str] = []
        for k, v in opts.items():
            out += ["-o", f"{k}={v}"]
        return out

    def setup(self) -> None:
        r = self.root
        for d in (
            "etc/sources.list.d",
            "etc/preferences.d",
            "state/lists/partial",
            "cache/archives/partial",
        ):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "state" / "status").touch()
        (r / "etc" / "sources.list").write_text(sources_list(self.suite, self.mirrors))

    def run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        exe = shutil.which(tool) or shutil.which(tool, path="/usr/bin:/bin")
        if exe is None:
            raise LabError(f"{tool} not found (the kernel lab needs a Debian host with apt)")
        cmd = [exe, *self.options(), *args]
        p = subprocess.run(
            cmd,
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"},
        )
        if p.returncode != 0:
            tail = (p.stderr.strip().splitlines() or ["?"])[-1]
            raise LabError(f"{tool} {' '.join(args[:2])} failed ({p.returncode}): {tail}")
        return p.stdout

    def update(self) -> None:
        self.setup()
        self.run("apt-get", "-q", "update")

    def lists_present(self) -> bool:
        return any((self.root / "state" / "lists").glob("*_Packages*"))


def parse_policy_candidate(text: str) -> str | None:
    """The ``Candidate:`` version of ``apt-cache policy PKG`` output (None if none)."""
    m = re.search(r"^\s*Candidate:\s*(\S+)", text, re.M)
    if not m or m.group(1) == "(none)":
        return None
    return m.group(1)


def parse_stanzas(text: str) -> list[dict[str, str]]:
    """``apt-cache show`` output -> one dict per package stanza (continuations joined)."""
    out = []
    for chunk in re.split(r"\n\s*\n", text.strip()):
        fields: dict[str, str] = {}
        key = None
        for line in chunk.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, val = line.partition(":")
                fields[key] = val.strip()
        if fields:
            out.append(fields)
    return out


def parse_depends(value: str) -> list[list[str]]:
    """``Depends:`` value -> alternatives groups of bare package names."""
    groups = []
    for clause in value.split(","):
        alts = []
        for alt in clause.split("|"):
            name = re.sub(r"\(.*?\)|\[.*?\]|<.*?>", "", alt).strip().split(":")[0]
            if name:
                alts.append(name)
        if alts:
            groups.append(alts)
    return groups


def image_release(meta_depends: str) -> str:
    """The kernel release ``linux-image-amd64`` depends on, e.g. "6.1.0-56-amd64"."""
    for group in parse_depends(meta_depends):
        for name in group:
            m = re.fullmatch(r"linux-image-(\d.*-amd64)", name)
            if m and not m.group(1).endswith("-unsigned"):
                return m.group(1)
    raise LabError(f"linux-image-amd64 depends on no linux-image-<release>: {meta_depends!r}")


def kernel_packages(release: str, image_depends: str) -> list[str]:
    """Packages to extract for ``release``: the image plus its same-release split parts.

    bookworm/trixie ship everything in ``linux-image-<release>``; sid (7.x) makes that a
    stub depending on ``linux-binary-<release>`` (vmlinuz), ``linux-modules-<release>`` and
    ``linux-base-<release>``.
    """
    pkgs = [f"linux-image-{release}"]
    for group in parse_depends(image_depends):
        if len(group) == 1 and group[0].endswith(f"-{release}") and group[0] not in pkgs:
            pkgs.append(group[0])
    return pkgs


def newest_version(versions: Sequence[str]) -> str:
    """The highest Debian version string (dpkg ordering via ``dpkg --compare-versions``)."""
    if not versions:
        raise LabError("no versions to choose from")
    best = versions[0]
    for v in versions[1:]:
        if _dpkg_gt(v, best):
            best = v
    return best


def _dpkg_gt(a: str, b: str) -> bool:
    return subprocess.run(["dpkg", "--compare-versions", a, "gt", b], check=False).returncode == 0


# --------------------------------------------------------------------------- fetch


def resolve_kernel(series: str, apt: PrivateApt) -> tuple[str, str, list[str]]:
    """(release, linux-image-amd64 version, packages) of the newest kernel in the suite."""
    meta = "linux-image-amd64"
    stanzas = parse_stanzas(apt.run("apt-cache", "show", meta))
    if not stanzas:
        raise LabError(f"{meta} not found in {apt.suite}")
    cand = parse_policy_candidate(apt.run("apt-cache", "policy", meta))
    if cand is None:
        cand = newest_version([s["Version"] for s in stanzas])
    st = next((s for s in stanzas if s.get("Version") == cand), stanzas[0])
    release = image_release(st.get("Depends", ""))
    img = parse_stanzas(apt.run("apt-cache", "show", f"linux-image-{release}"))
    if not img:
        raise LabError(f"linux-image-{release} not found in {apt.suite}")
    return release, cand, kernel_packages(release, img[0].get("Depends", ""))


def fetch_kernel(
    series: str,
    cache: str | os.PathLike[str] | None = None,
    *,
    refresh: bool = False,
    log=None,
) -> LabKernel:
    """Download and extract the newest kernel of ``series``; reuse the cache if present.

    Without ``refresh`` an already-extracted kernel of the series is returned without any
    network access.  With ``refresh`` the suite's lists are updated and a newer kernel (if
    any) is fetched next to the old one.
    """
    _check_series(series)
    base = cache_dir(cache)
    say = log or (lambda msg: None)
    if not refresh:
        have = [k for k in list_kernels(base) if k.series == series]
        if have:
            return have[0]
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not found (the kernel lab needs a Debian host with apt)")
    suite = KERNELS[series]
    apt = PrivateApt(base / "apt" / suite, suite, host_mirrors())
    say(f"[lab] {series}: apt update ({suite} from {apt.mirrors.debian})")
    apt.update()
    release, pkgver, pkgs = resolve_kernel(series, apt)
    tree = base / series / release
    if (k := _load_tree(series, tree)) is not None:
        say(f"[lab] {series}: {release} already fetched")
        return k
    say(f"[lab] {series}: fetching {release} ({pkgver}): {' '.join(pkgs)}")
    tree.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{release}.", dir=tree.parent) as tmp:
        dl = Path(tmp) / "debs"
        root = Path(tmp) / "root"
        dl.mkdir()
        root.mkdir()
        apt.run("apt-get", "-q", "download", *pkgs, cwd=dl)
        for deb in sorted(dl.glob("*.deb")):
            p = subprocess.run(
                ["dpkg-deb", "-x", str(deb), str(root)], capture_output=True, text=True, check=False
            )
            if p.returncode != 0:
                raise LabError(f"dpkg-deb -x {deb.name} failed: {p.stderr.strip()}")
        _normalize_tree(root, release)
        _depmod(root, release)
        (root / ".complete").write_text(pkgver + "\n")
        if tree.exists():
            shutil.rmtree(tree)
        root.rename(tree)
    k = _load_tree(series, tree)
    if k is None:
        raise LabError(f"extracted {release} into {tree} but found no vmlinuz/modules there")
    say(f"[lab] {series}: {k.version} -> {k.vmlinuz}")
    return k


def _normalize_tree(root: Path, release: str) -> None:
    """Give every tree the bookworm layout: boot/vmlinuz-R and lib/modules/R.

    trixie/sid packages are merged-/usr (usr/lib/modules/R, vmlinuz maybe only as
    usr/lib/modules/R/vmlinuz); virtme-ng and kmod (v30) look under lib/modules.
    """
    lib = root / "lib"
    if not lib.exists() and (root / "usr" / "lib").is_dir():
        lib.symlink_to("usr/lib")
    boot = root / "boot"
    vmlinuz = boot / f"vmlinuz-{release}"
    if not vmlinuz.exists():
        for cand in (
            root / "usr/lib/modules" / release / "vmlinuz",
            root / "lib/modules" / release / "vmlinuz",
            root / "usr/lib/linux" / f"vmlinuz-{release}",
        ):
            if cand.is_file():
                boot.mkdir(exist_ok=True)
                vmlinuz.symlink_to(os.path.relpath(cand, boot))
                break
    if not vmlinuz.exists():
        found = [str(p.relative_to(root)) for p in root.rglob("vmlinuz*")]
        raise LabError(f"no vmlinuz for {release} in the packages (found: {found or 'none'})")
    if not (root / "lib" / "modules" / release).is_dir():
        raise LabError(f"no lib/modules/{release} in the packages")


def _depmod(root: Path, release: str) -> None:
    depmod = shutil.which("depmod") or shutil.which("depmod", path="/usr/sbin:/sbin")
    if depmod is None:
        raise LabError("depmod not found: apt-get install kmod")
    p = subprocess.run(
        [depmod, "-a", "-b", str(root), release], capture_output=True, text=True, check=False
    )
    if p.returncode != 0:
        raise LabError(f"depmod {release} failed: {p.stderr.strip()}")


def fetch_all(
    cache: str | os.PathLike[str] | None = None, *, refresh: bool = False, log=None
) -> list[LabKernel]:
    return [fetch_kernel(s, cache, refresh=refresh, log=log) for s in KERNELS]


# --------------------------------------------------------------------------- exec


def check_host() -> dict[str, str]:
    """Paths of the host tools the lab needs; LabError naming the first one missing."""
    need = {
        "vng": ("vng", "pip install virtme-ng (or: pip install -e '.[lab]')"),
        "qemu": ("qemu-system-x86_64", "apt-get install qemu-system-x86"),
        "busybox": ("busybox", "apt-get install busybox-static"),
        "depmod": ("depmod", "apt-get install kmod"),
    }
    out = {}
    for key, (exe, fix) in need.items():
        path = shutil.which(exe) or shutil.which(exe, path=_host_path())
        if path is None:
            raise LabError(f"{exe} not found: {fix}")
        out[key] = path
    return out


def _host_path() -> str:
    """Host PATH for vng: it runs ``virtme-run`` by name, which lives next to the venv's python."""
    dirs = [
        os.path.dirname(sys.executable),
        *os.environ.get("PATH", "").split(os.pathsep),
        "/usr/sbin",
        "/sbin",
        "/usr/bin",
        "/bin",
    ]
    return os.pathsep.join(dict.fromkeys(d for d in dirs if d))


def kernel_config(kernel: LabKernel) -> dict[str, str]:
    """The kernel's build config (boot/config-R or lib/modules/R/config); {} if absent."""
    for p in (kernel.root / "boot" / f"config-{kernel.version}", kernel.modules_dir / "config"):
        if p.is_file():
            return parse_kconfig(p.read_text(errors="replace"))
    return {}


def parse_kconfig(text: str) -> dict[str, str]:
    out = {}
    for m in re.finditer(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$", text, re.M):
        v = m.group(2).strip()
        out[m.group(1)] = v[1:-1] if len(v) >= 2 and v[0] == v[-1] == '"' else v
    return out


def lsm_append(config: Mapping[str, str]) -> list[str]:
    """Kernel cmdline additions so that bpf is an active LSM ([] if the default has it)."""
    if config.get("CONFIG_BPF_LSM") not in (None, "y"):
        raise LabError("kernel built without CONFIG_BPF_LSM: the BPF LSM cannot run on it")
    if "bpf" in config.get("CONFIG_LSM", "").split(","):
        return []
    return [LSM_APPEND]


_SAFE_PATH = re.compile(r"[A-Za-z0-9_@%+=:,./~-]+")


def _safe(path: str, what: str) -> str:
    # vng pastes paths into a shell command line unquoted (virtme-ng 1.42)
    if not _SAFE_PATH.fullmatch(path):
        raise LabError(f"{what} {path!r} has characters vng cannot pass through")
    return path


def qemu_args(qemu_opts: str | Sequence[str]) -> list[str]:
    """Extra QEMU arguments as a list: a string is split like a shell would
    (``"-icount shift=0"``), a sequence is taken as separate arguments."""
    args = shlex.split(qemu_opts) if isinstance(qemu_opts, str) else list(qemu_opts)
    for a in args:
        # vng joins them into the shell command line it runs virtme-run with, unquoted
        _safe(a, "QEMU option")
    return args


def guest_script(
    argv: Sequence[str],
    *,
    cwd: str,
    iodir: str,
    env: Mapping[str, str] | None = None,
    path_dirs: Sequence[str] = (),
) -> str:
    """The bash script the guest runs.

    Output goes to files in ``iodir`` (a host directory shared read-write into the guest):
    ``stdout``, ``stderr``, ``rc`` (the command's exit status, written last) and ``boot``
    (guest uptime when the command started).  Files, not vng's virtio-serial streams:
    without udev on the host (the guest runs the host's userspace) virtme-ng-init cannot
    find its /dev/virtio-ports/* links, falls back to the serial console and returns 255.
    """
    if not argv:
        raise LabError("lab exec: empty command")
    path = ":".join(dict.fromkeys([*path_dirs, *_EXTRA_PATH]))
    q = shlex.quote
    io = iodir.rstrip("/")
    lines = [
        f"exec </dev/null >{q(io + '/stdout')} 2>{q(io + '/stderr')}",
        f"cut -d' ' -f1 /proc/uptime >{q(io + '/boot')}",
        "grep -q '^[^ ]* /sys/fs/bpf bpf ' /proc/mounts || "
        "{ mkdir -p /sys/fs/bpf; mount -t bpf bpf /sys/fs/bpf; }",
        "grep -q '^[^ ]* [^ ]* cgroup2 ' /proc/mounts || "
        "{ mkdir -p /sys/fs/cgroup; mount -t cgroup2 cgroup2 /sys/fs/cgroup; }",
        f"export PATH={q(path)}",
        "export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1",
    ]
    for k, v in (env or {}).items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise LabError(f"lab exec: bad environment variable name {k!r}")
        lines.append(f"export {k}={q(v)}")
    lines += [
        f"cd {q(cwd)} || {{ echo 125 >{q(io + '/rc')}; exit 125; }}",
        shlex.join(argv),
        "rc=$?",
        f"echo $rc >{q(io + '/rc.tmp')} && mv {q(io + '/rc.tmp')} {q(io + '/rc')}",
        "sync",
        "exit $rc",
    ]
    return "\n".join(lines) + "\n"


def vng_command(
    kernel: LabKernel,
    script_path: str,
    *,
    vng: str = "vng",
    rwdirs: Sequence[str] = (),
    overlays: Sequence[str] = (),
    memory: str = DEFAULT_MEMORY,
    cpus: int = DEFAULT_CPUS,
    append: Sequence[str] = (),
    qemu_opts: str | Sequence[str] = (),
) -> list[str]:
    """The vng command line.  --verbose so the serial console (boot log) reaches stdout.
    ``qemu_opts``: extra QEMU arguments (see :func:`qemu_args`), passed as one
    ``--qemu-opts=...`` (vng appends them to QEMU's command line)."""
    cmd = [
        vng,
        "--verbose",
        "--disable-kvm",
        "--run",
        _safe(str(kernel.vmlinuz), "kernel path"),
        "--user",
        "root",
        "--memory",
        memory,
        "--cpus",
        str(cpus),
    ]
    for d in rwdirs:
        cmd.append(f"--rwdir={_safe(d, 'directory')}")
    for d in overlays:
        cmd.append(f"--overlay-rwdir={_safe(d, 'directory')}")
    for a in append:
        cmd += ["--append", a]
    extra = qemu_args(qemu_opts)
    if extra:
        # the "=" form: a value starting with "-" would otherwise read as a vng option
        cmd.append("--qemu-opts=" + " ".join(extra))
    cmd += ["--exec", f"bash {_safe(script_path, 'script path')}"]
    return cmd


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


# directories vng already overlays (writable in the guest, unchanged on the host)
_VNG_OVERLAYS = ("/etc", "/lib", "/home", "/opt", "/srv", "/usr", "/var", "/tmp")


def lab_exec(
    kernel: LabKernel | str,
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    memory: str = DEFAULT_MEMORY,
    cpus: int = DEFAULT_CPUS,
    append: Sequence[str] | None = None,
    qemu_opts: str | Sequence[str] = (),
    rwdirs: Sequence[str | os.PathLike[str]] = (),
    overlay_cwd: bool = True,
    cache: str | os.PathLike[str] | None = None,
    on_stdout: Callable[[str], object] | None = None,
    on_stderr: Callable[[str], object] | None = None,
    stream: bool = False,
) -> LabResult:
    """Boot ``kernel`` under QEMU (TCG) and run ``argv`` as root in it; return its exit status.

    ``kernel`` is a LabKernel or a series name (its fetched kernel).  The guest sees the
    host's / read-only at the same paths (so ``cwd``, default the current directory, the
    venv and pyenv are visible); /etc /usr /var /tmp ... are copy-on-write overlays, and so
    is ``cwd`` when ``overlay_cwd`` (guest writes there never reach the host).  ``rwdirs``
    are shared read-write with the host.  ``append`` adds kernel cmdline options (default:
    ``lsm=...,bpf`` only if the kernel's CONFIG_LSM lacks bpf).  ``qemu_opts`` adds QEMU
    arguments (a list, or one string split like a shell would: ``"-icount shift=0"``; only
    characters vng can paste into its shell line unquoted).  ``on_stdout``/``on_stderr``
    receive the command's output while it runs (polled from the shared files); ``stream``
    makes them default to writing to our own stdout/stderr.  The guest's environment has
    ``AEGIS_LAB=1`` and ``AEGIS_LAB_KERNEL=<series>`` besides ``env``.

    Raises LabError when the host lacks vng/qemu/busybox, the kernel is not fetched, or the
    guest never reports an exit status (boot failure: the message has the console tail);
    LabTimeout (a LabError) after ``timeout`` seconds.
    """
    if isinstance(kernel, str):
        kernel = find_kernel(kernel, cache)
    extra_qemu = qemu_args(qemu_opts)  # refuse bad options before booting anything
    if not kernel.vmlinuz.is_file():
        raise LabError(f"kernel {kernel.version} is not fetched: {kernel.vmlinuz} is missing")
    tools = check_host()
    if stream:
        on_stdout = on_stdout or _writer(sys.stdout)
        on_stderr = on_stderr or _writer(sys.stderr)
    guest_env = {"AEGIS_LAB": "1", "AEGIS_LAB_KERNEL": kernel.series, **(env or {})}
    wd = str(Path(cwd or os.getcwd()).resolve())
    if append is None:
        append = lsm_append(kernel_config(kernel))
    venv_bin = os.path.dirname(os.path.abspath(sys.executable))
    overlays = []
    if overlay_cwd and wd != "/" and not any(_under(wd, d) for d in _VNG_OVERLAYS):
        overlays.append(wd)
    with tempfile.TemporaryDirectory(prefix="aegis-lab-") as iodir:
        io = Path(iodir)
        script = io / "run.sh"
        script.write_text(
            guest_script(argv, cwd=wd, iodir=iodir, env=guest_env, path_dirs=[venv_bin])
        )
        for name in ("stdout", "stderr"):
            (io / name).touch()
        cmd = vng_command(
            kernel,
            str(script),
            vng=tools["vng"],
            rwdirs=[iodir, *(str(Path(d).resolve()) for d in rwdirs)],
            overlays=overlays,
            memory=memory,
            cpus=cpus,
            append=append,
            qemu_opts=extra_qemu,
        )
        console_path = io / "console"
        t0 = time.monotonic()
        with open(console_path, "wb") as console:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PATH": _host_path()},
                cwd=wd,
            )
            tails = [_Tail(io / "stdout", on_stdout), _Tail(io / "stderr", on_stderr)]
            timed_out = False
            try:
                while True:
                    try:
                        proc.wait(timeout=0.25)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    for t in tails:
                        t.poll()
                    if time.monotonic() - t0 > timeout:
                        timed_out = True
                        _killpg(proc)
                        break
            except BaseException:
                _killpg(proc)
                raise
        seconds = time.monotonic() - t0
        for t in tails:
            t.poll()
        stdout = _read(io / "stdout")
        stderr = _read(io / "stderr")
        console_text = _read(console_path)
        rc_text = _read(io / "rc").strip()
        boot_text = _read(io / "boot").strip()
    boot = float(boot_text) if re.fullmatch(r"\d+(\.\d+)?", boot_text) else None
    if timed_out:
        raise LabTimeout(
            f"lab exec on {kernel.version} timed out after {timeout:.0f}s",
            stdout=stdout,
            stderr=stderr,
            console=console_text,
        )
    if not rc_text.isdigit():
        tail = " | ".join(_console_tail(console_text, 6)) or "no console output"
        raise LabError(
            f"lab exec on {kernel.version}: the guest reported no exit status "
            f"(vng exit {proc.returncode}); console: {tail}"
        )
    return LabResult(int(rc_text), stdout, stderr, seconds, boot_seconds=boot, console=console_text)


def _writer(f: TextIO) -> Callable[[str], object]:
    def write(text: str) -> None:
        f.write(text)
        f.flush()

    return write


class _Tail:
    """Feed what was appended to a file since the last poll to a callback."""

    def __init__(self, path: Path, sink: Callable[[str], object] | None) -> None:
        self.path = path
        self.sink = sink
        self.pos = 0

    def poll(self) -> None:
        if self.sink is None:
            return
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return
        if data:
            self.pos += len(data)
            self.sink(data.decode(errors="replace"))


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _console_tail(text: str, n: int) -> list[str]:
    lines = [ln.strip() for ln in text.replace("\r", "").splitlines() if ln.strip()]
    return lines[-n:]


def _killpg(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


# --------------------------------------------------------------------------- CLI


def cmd_lab_kernels(args: argparse.Namespace) -> int:
    """``aegis lab kernels [--fetch] [--refresh]``: list the series, fetched or not."""
    cache = getattr(args, "cache", None)
    if getattr(args, "fetch", False) or getattr(args, "refresh", False):
        fetch_all(
            cache,
            refresh=getattr(args, "refresh", False),
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    have: dict[str, LabKernel] = {}
    for k in list_kernels(cache):
        have.setdefault(k.series, k)
    print(f"{'SERIES':<7} {'SUITE':<9} {'VERSION':<26} VMLINUZ")
    for series, suite in KERNELS.items():
        got = have.get(series)
        if got:
            print(f"{series:<7} {suite:<9} {got.version:<26} {got.vmlinuz}")
        else:
            print(f"{series:<7} {suite:<9} {'(not fetched)':<26} -")
    return 0


def cmd_lab_exec(
    kernel_series: str,
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    cache: str | os.PathLike[str] | None = None,
    fetch: bool = False,
    verbose: bool = False,
    qemu_opts: str | Sequence[str] = (),
) -> int:
    """``aegis lab exec [--kernel SERIES] -- CMD...``: run CMD in the guest, return its rc.

    The command's stdout/stderr stream to ours while it runs; a one-line summary (kernel,
    exit status, boot and total time) goes to stderr.  2 = the lab could not run, 124 =
    timeout, else the command's own exit status.  ``verbose`` also prints the guest's
    serial console (boot log) afterwards.
    """
    argv = list(argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]

    err = _writer(sys.stderr)
    try:
        k = fetch_kernel(kernel_series, cache) if fetch else find_kernel(kernel_series, cache)
        res = lab_exec(k, argv, timeout=timeout, stream=True, qemu_opts=qemu_opts)
    except LabTimeout as e:
        if verbose:
            err(e.console)
        print(f"aegis lab: {e}", file=sys.stderr)
        return 124
    except LabError as e:
        print(f"aegis lab: {e}", file=sys.stderr)
        return 2
    if verbose:
        err(res.console)
    boot = f"command started {res.boot_seconds:.1f}s after boot, " if res.boot_seconds else ""
    print(
        f"[lab] {k.version}: exit {res.returncode} ({boot}{res.seconds:.1f}s in all)",
        file=sys.stderr,
    )
    return res.returncode


def add_lab_subparsers(subparsers) -> None:
    """Register ``kernels`` and ``exec`` on ``subparsers`` (of the ``aegis lab`` parser).

    Each sets ``func`` to a callable taking the parsed Namespace and returning an exit code.
    """
    p = subparsers.add_parser("kernels", help="list lab kernels (fetched or not)")
    p.add_argument("--fetch", action="store_true", help="download all missing series")
    p.add_argument(
        "--refresh", action="store_true", help="update apt lists and fetch newer kernels if any"
    )
    p.add_argument(
        "--cache",
        default=None,
        help=f"kernel cache (default $AEGIS_KERNEL_CACHE or {DEFAULT_CACHE})",
    )
    p.set_defaults(func=cmd_lab_kernels)

    e = subparsers.add_parser("exec", help="boot a lab kernel and run a command as root in it")
    e.add_argument("--kernel", default=DEFAULT_SERIES, choices=list(KERNELS))
    e.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    e.add_argument("--fetch", action="store_true", help="fetch the kernel if missing")
    e.add_argument("--cache", default=None)
    e.add_argument("-v", "--verbose", action="store_true", help="show the guest's boot log")
    e.add_argument("--qemu-opts", default="", metavar="OPTS",
                   help='extra QEMU arguments, e.g. --qemu-opts="-icount shift=0"')
    e.add_argument("argv", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    e.set_defaults(
        func=lambda a: cmd_lab_exec(
            a.kernel, a.argv, timeout=a.timeout, cache=a.cache, fetch=a.fetch, verbose=a.verbose,
            qemu_opts=a.qemu_opts,
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aegis_stream.lab")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_lab_subparsers(sub)
    f = sub.add_parser("fetch", help="fetch kernels into the cache")
    f.add_argument("series", nargs="*", help=f"series to fetch ({', '.join(KERNELS)})")
    f.add_argument("--all", action="store_true")
    f.add_argument("--refresh", action="store_true")
    f.add_argument("--cache", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "fetch":
        series = list(KERNELS) if args.all or not args.series else args.series
        try:
            for s in series:
                k = fetch_kernel(
                    s,
                    args.cache,
                    refresh=args.refresh,
                    log=lambda m: print(m, file=sys.stderr, flush=True),
                )
                print(f"{k.series}\t{k.version}\t{k.vmlinuz}")
        except LabError as e:
            print(f"aegis lab: {e}", file=sys.stderr)
            return 2
        return 0
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
