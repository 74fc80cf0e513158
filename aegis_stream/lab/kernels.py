"""The lab's kernel cache: which Debian suite ships each series, resolving and fetching the
newest kernel of a suite, and finding what is already fetched.

Three kernel series are supported, each taken from the Debian suite that ships it::

    6.1   bookworm (+ bookworm-updates, bookworm-security)
    6.12  trixie   (+ trixie-updates, trixie-security)
    7     sid

The newest ``linux-image-amd64`` of the suite is resolved through a private apt
(:mod:`aegis_stream.lab.apt`), its ``linux-image-<release>`` dependency followed (sid splits
that into ``linux-binary-<release>`` / ``linux-modules-<release>`` /
``linux-base-<release>``), the packages are downloaded with ``apt-get download`` and
extracted with ``dpkg-deb -x``::

    $AEGIS_KERNEL_CACHE (default ~/.cache/aegis/kernels)/
        apt/<suite>/...                   private apt config + lists
        <series>/<release>/               extracted packages (boot/, lib/modules/<release>/)
        <series>/<release>/.complete      written last: the tree is usable
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aegis_stream.errors import LabError
from aegis_stream.lab.apt import (
    PrivateApt,
    host_mirrors,
    newest_version,
    parse_depends,
    parse_policy_candidate,
    parse_stanzas,
)

# series -> Debian suite that ships it
KERNELS: dict[str, str] = {"5.10": "bullseye", "6.1": "bookworm", "6.12": "trixie", "7": "sid"}

DEFAULT_SERIES = "6.1"
DEFAULT_CACHE = "~/.cache/aegis/kernels"


@dataclass(frozen=True)
class LabKernel:
    """A fetched, complete lab kernel in the cache: its series, release, vmlinuz and
    modules tree (what ``lab_exec`` boots)."""

    series: str  # "6.1" | "6.12" | "7"
    version: str  # kernel release, e.g. "6.1.0-56-amd64" (= uname -r in the guest)
    vmlinuz: Path
    modules_dir: Path  # <tree>/lib/modules/<version>
    package_version: str = ""  # Debian version of linux-image-amd64, e.g. "6.1.192-2"

    @property
    def root(self) -> Path:
        """The extracted package tree (has boot/ and lib/modules/)."""
        return self.modules_dir.parent.parent.parent


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
