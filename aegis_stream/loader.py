"""The libbpf loader: open -> load -> attach each program -> pin, each step checked.

Per-program state is explicit (loaded / attached / failed with errno and the
verifier's log tail).  ``AttachReport.enforcing_capable`` is true only when every
required hook is attached: there is no silent partial attach.

Pins live under ``<pin_root>/maps/<map>`` and ``<pin_root>/links/<program>``; the
pinned links keep enforcing when the agent dies, and the next start reuses the
pinned maps (libbpf's pin-path reuse) so policy state survives restarts.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from aegis_stream import abi, libbpf
from aegis_stream.errors import AttachError, KernelError, LoadError, NoAgentError
from aegis_stream.maps import FdMap, PolicyMaps

DEFAULT_PIN_ROOT = "/sys/fs/bpf/aegis"
REQUIRED_PROGRAMS = tuple(abi.HOOK_PROGRAMS.values())
LOG_BUF_SIZE = 1 << 20

ProgramPhase = Literal["not_loaded", "loaded", "attached", "failed"]


def pin_root() -> str:
    return os.environ.get("AEGIS_PIN_ROOT", DEFAULT_PIN_ROOT)


def default_object_path() -> Path:
    env = os.environ.get("AEGIS_BPF_OBJECT")
    if env:
        return Path(env)
    return Path(str(resources.files("aegis_stream") / "bpf" / "aegis.bpf.o"))


@dataclass
class ProgramStatus:
    name: str
    hook: str
    phase: ProgramPhase = "not_loaded"
    errno: int = 0
    error: str = ""
    log_tail: str = ""
    pinned: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "hook": self.hook,
            "phase": self.phase,
            "errno": self.errno,
            "error": self.error,
            "pinned": self.pinned,
        }


@dataclass
class AttachReport:
    programs: dict[str, ProgramStatus] = field(default_factory=dict)

    @property
    def attached(self) -> list[str]:
        return [p.hook for p in self.programs.values() if p.phase == "attached"]

    @property
    def failed(self) -> list[ProgramStatus]:
        return [p for p in self.programs.values() if p.phase != "attached"]

    @property
    def enforcing_capable(self) -> bool:
        return bool(self.programs) and not self.failed

    def summary(self) -> str:
        if self.enforcing_capable:
            return f"all {len(self.programs)} hooks attached"
        bad = ", ".join(
            f"{p.hook} ({p.name}): {p.phase}{' ' + p.error if p.error else ''}" for p in self.failed
        )
        return f"partial attach: {len(self.attached)}/{len(self.programs)} hooks; not attached: {bad}"


_FAILED_PROG = re.compile(r"prog '(\w+)': (?:BPF program load failed|failed to load)")
_HOOK_OF = {prog: abi.HOOK_NAMES[h] for h, prog in abi.HOOK_PROGRAMS.items()}


class BpfObject:
    """One loaded instance of aegis.bpf.o."""

    def __init__(self, path: Path | None = None, *, pin_root_dir: str | None = None) -> None:
        self.path = Path(path or default_object_path())
        self.pin_root = pin_root_dir or pin_root()
        self.report = AttachReport(
            {name: ProgramStatus(name, _HOOK_OF[name]) for name in REQUIRED_PROGRAMS}
        )
        self._obj: int | None = None
        self._links: dict[str, int] = {}
        self._log_bufs: dict[str, ctypes.Array[ctypes.c_char]] = {}
        self.fail_attach: set[str] = set()  # test hook: programs whose attach is refused

    # -- lifecycle --------------------------------------------------------------------
    def open(self) -> None:
        if not self.path.exists():
            raise LoadError(f"BPF object {self.path} not found; run `make -C bpf`")
        lib = libbpf.lib()
        libbpf.clear_log()
        obj = lib.bpf_object__open_file(str(self.path).encode(), None)
        if not obj:
            raise LoadError(f"bpf_object__open_file({self.path})", err=libbpf.errno_of())
        self._obj = obj
        for name in REQUIRED_PROGRAMS:
            prog = lib.bpf_object__find_program_by_name(obj, name.encode())
            if not prog:
                self.close()
                raise LoadError(f"program {name} missing from {self.path}")
            buf = ctypes.create_string_buffer(LOG_BUF_SIZE)
            self._log_bufs[name] = buf
            lib.bpf_program__set_log_buf(prog, buf, LOG_BUF_SIZE)

    def reuse_pinned_maps(self) -> list[str]:
        """Point every map at its pin path: libbpf reuses an existing pin at load."""
        assert self._obj is not None
        lib = libbpf.lib()
        reused = []
        for name in abi.ALL_MAPS:
            m = lib.bpf_object__find_map_by_name(self._obj, name.encode())
            if not m:
                raise LoadError(f"map {name} missing from {self.path}")
            path = f"{self.pin_root}/maps/{name}"
            ret = lib.bpf_map__set_pin_path(m, path.encode())
            if ret < 0:
                raise LoadError(f"bpf_map__set_pin_path({name})", err=libbpf.errno_of(ret))
            if os.path.exists(path):
                reused.append(name)
        return reused

    def load(self) -> None:
        assert self._obj is not None, "open() first"
        os.makedirs(f"{self.pin_root}/maps", exist_ok=True)
        ret = libbpf.lib().bpf_object__load(self._obj)
        if ret < 0:
            err = libbpf.errno_of(ret)
            tail = libbpf.log_tail()
            failed = sorted(set(_FAILED_PROG.findall(tail)) & set(REQUIRED_PROGRAMS))
            for name in REQUIRED_PROGRAMS:
                st = self.report.programs[name]
                st.phase = "failed"
                st.errno = err
                if name in failed:
                    vlog = self._log_bufs[name].value.decode(errors="replace").strip()
                    st.log_tail = "\n".join(vlog.splitlines()[-20:])
                    st.error = (
                        "verifier rejected the program"
                        if vlog
                        else "kernel refused the load before the verifier ran (empty verifier log)"
                    )
                else:
                    st.error = "not loaded: the object load stopped at an earlier program"
            where = ", ".join(failed) or "(object)"
            raise LoadError(
                f"loading {self.path.name} failed at {where}", err=err, log_tail=tail
            )
        for st in self.report.programs.values():
            st.phase = "loaded"

    def attach_all(self, *, pin: bool = True) -> AttachReport:
        """Attach every program; a failure is recorded per program, never hidden."""
        assert self._obj is not None
        lib = libbpf.lib()
        if pin:
            os.makedirs(f"{self.pin_root}/links", exist_ok=True)
        for name, st in self.report.programs.items():
            if st.phase != "loaded":
                continue
            prog = lib.bpf_object__find_program_by_name(self._obj, name.encode())
            if name in self.fail_attach:
                st.phase, st.errno, st.error = "failed", 95, "attach refused (injected)"
                continue
            ctypes.set_errno(0)
            link = lib.bpf_program__attach(prog)
            if not link:
                err = libbpf.errno_of()
                st.phase, st.errno = "failed", err
                st.error = str(AttachError(f"attach {name} to lsm/{st.hook}", err=err))
                continue
            self._links[name] = link
            st.phase = "attached"
            if pin:
                path = f"{self.pin_root}/links/{name}"
                # replace an older agent's pin only after ours is attached: no gap
                if os.path.exists(path):
                    os.unlink(path)
                ret = lib.bpf_link__pin(link, path.encode())
                if ret < 0:
                    st.error = str(KernelError(f"pin link {name}", err=libbpf.errno_of(ret)))
                else:
                    st.pinned = path
        return self.report

    def map_fd(self, name: str) -> int:
        assert self._obj is not None
        lib = libbpf.lib()
        m = lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not m:
            raise KernelError(f"map {name} not in object")
        fd = lib.bpf_map__fd(m)
        if fd < 0:
            raise KernelError(f"map {name} has no fd (not loaded)")
        return int(fd)

    def maps(self) -> dict[str, FdMap]:
        return {n: FdMap(n, self.map_fd(n)) for n in abi.ALL_MAPS}

    def policy_maps(self) -> PolicyMaps:
        m = self.maps()
        return PolicyMaps(m[abi.MAP_RULES], m[abi.MAP_SCOPES], m[abi.MAP_CONFIG])

    def close(self, *, keep_pins: bool = True) -> None:
        """Release our references.  Pinned links keep enforcing unless keep_pins=False."""
        lib = libbpf.lib()
        for name, link in self._links.items():
            if not keep_pins:
                path = self.report.programs[name].pinned
                if path and os.path.exists(path):
                    os.unlink(path)
            lib.bpf_link__destroy(link)  # drops our fd; a pin keeps the link alive
        self._links.clear()
        if self._obj is not None:
            lib.bpf_object__close(self._obj)
            self._obj = None


@dataclass(frozen=True)
class PinnedState:
    root: str
    maps: dict[str, FdMap]
    links: dict[str, bool]

    def policy_maps(self) -> PolicyMaps:
        return PolicyMaps(
            self.maps[abi.MAP_RULES], self.maps[abi.MAP_SCOPES], self.maps[abi.MAP_CONFIG]
        )

    def close(self) -> None:
        for m in self.maps.values():
            m.close()


def open_pinned(root: str | None = None) -> PinnedState:
    """Open the pinned maps of a loaded agent (no running agent process needed)."""
    root = root or pin_root()
    missing = [n for n in abi.ALL_MAPS if not os.path.exists(f"{root}/maps/{n}")]
    if missing:
        raise NoAgentError(
            f"no aegis state pinned under {root} (missing {', '.join(missing)}); "
            "start the agent with `aegis run`"
        )
    maps = {n: FdMap(n, libbpf.obj_get(f"{root}/maps/{n}"), owns_fd=True) for n in abi.ALL_MAPS}
    links = {p: os.path.exists(f"{root}/links/{p}") for p in REQUIRED_PROGRAMS}
    return PinnedState(root, maps, links)


def remove_pins(root: str | None = None) -> list[str]:
    """Unpin links and maps: enforcement stops once no process holds them."""
    root = root or pin_root()
    removed = []
    for sub in ("links", "maps"):
        d = Path(root) / sub
        if d.is_dir():
            for p in sorted(d.iterdir()):
                p.unlink()
                removed.append(str(p))
            d.rmdir()
    if Path(root).is_dir():
        os.rmdir(root)
    return removed
