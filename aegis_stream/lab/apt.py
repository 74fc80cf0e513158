"""Debian apt, privately: mirrors from the host's sources, a private apt configuration,
package stanzas and dependency fields.

Fetching uses a *private* apt configuration under the kernel cache (its own sources.list,
state, lists and archives), pointed at the Debian mirror the host's own apt sources already
use; the host's apt state is never touched.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from aegis_stream.errors import LabError

DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
HOST_SOURCES = ("/etc/apt/sources.list", "/etc/apt/sources.list.d")
_DEBIAN_CODENAMES = {"buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid"}


@dataclass(frozen=True)
class Mirrors:
    """The Debian mirrors the private apt configuration points at (taken from the
    host's own apt sources) and the archive keyring that verifies them."""

    debian: str  # e.g. http://deb.debian.org/debian
    security: str  # e.g. http://deb.debian.org/debian-security
    keyring: str = DEBIAN_KEYRING


def parse_stanzas(text: str) -> list[dict[str, str]]:
    """Debian control-style text (``apt-cache show`` output, a deb822 ``.sources`` file)
    -> one dict per stanza.  Field names as written; ``#`` comment lines skipped;
    continuation lines joined to their field with newlines; values stripped."""
    out = []
    for chunk in re.split(r"\n\s*\n", text.strip()):
        fields: dict[str, str] = {}
        key = None
        for line in chunk.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t":
                if key is not None:
                    fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, val = line.partition(":")
                key = key.strip()
                fields[key] = val.strip()
        if fields:
            out.append({k: v.strip() for k, v in fields.items()})
    return out


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
    for stanza in parse_stanzas(text):
        fields = {k.lower(): v for k, v in stanza.items()}  # deb822 names are case-insensitive
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


def parse_policy_candidate(text: str) -> str | None:
    """The ``Candidate:`` version of ``apt-cache policy PKG`` output (None if none)."""
    m = re.search(r"^\s*Candidate:\s*(\S+)", text, re.M)
    if not m or m.group(1) == "(none)":
        return None
    return m.group(1)


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
