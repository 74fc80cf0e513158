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
from pathlib import Path
from typing import Literal

from aegis_stream.errors import AttachError, KernelError, LoadError, NoAgentError
from aegis_stream.kernel import abi, btrfs_layout, builds, libbpf
from aegis_stream.kernel.maps import FdMap, PolicyMaps

DEFAULT_PIN_ROOT = "/sys/fs/bpf/aegis"
REQUIRED_PROGRAMS = tuple(abi.HOOK_PROGRAMS.values())
#: loaded, attached, pinned and reported like the hooks, but not needed to enforce
#: (abi.AUX_PROGRAMS; e.g. path continuity): their absence degrades, never refuses
OPTIONAL_PROGRAMS = tuple(abi.AUX_PROGRAMS)
ALL_PROGRAMS = REQUIRED_PROGRAMS + OPTIONAL_PROGRAMS
LOG_BUF_SIZE = 1 << 20
#: the read-only section with btrfs's offsets (bpf/core_fixes.bpf.h: aegis_btrfs_layout)
BTRFS_RODATA = ".rodata.btrfs"

ProgramPhase = Literal["not_loaded", "loaded", "attached", "failed"]


def pin_root() -> str:
    return os.environ.get("AEGIS_PIN_ROOT", DEFAULT_PIN_ROOT)


class _OpenOpts(ctypes.Structure):
    """The head of libbpf's ``struct bpf_object_open_opts`` (libbpf 1.x), up to
    ``btf_custom_path``; ``sz`` tells libbpf how much of it we pass."""

    _fields_ = [("sz", ctypes.c_size_t), ("object_name", ctypes.c_char_p),
                ("relaxed_maps", ctypes.c_bool), ("pin_root_path", ctypes.c_char_p),
                ("_removed_attach_prog_fd", ctypes.c_uint32), ("kconfig", ctypes.c_char_p),
                ("btf_custom_path", ctypes.c_char_p)]


VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
CAP_SYS_ADMIN = 21


def effective_capabilities() -> int:
    """This process's effective capability mask (CapEff in /proc/self/status; 0 if unreadable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def _open_opts() -> _OpenOpts | None:
    """Without CAP_SYS_ADMIN (the hardened unit: CAP_BPF + CAP_PERFMON) libbpf cannot walk
    the kernel modules' BTF (BPF_BTF_GET_NEXT_ID needs CAP_SYS_ADMIN) and the whole load
    fails with EPERM as soon as a CO-RE type is not in vmlinux (btrfs_inode: the
    GAP-BTRFS-SUBVOL key, measured in the 6.1 lab under the unit's capability set).  Naming
    vmlinux's BTF as the target makes libbpf skip module BTF: the btrfs type is then
    absent to CO-RE, and the programs take btrfs's offsets from the read-only data the
    loader fills from /sys/kernel/btf/btrfs (btrfs_layout.py; docs/BYPASS_CATALOG.md
    GAP-BTRFS-SUBVOL)."""
    if effective_capabilities() & (1 << CAP_SYS_ADMIN) or not Path(VMLINUX_BTF).exists():
        return None
    o = _OpenOpts(sz=ctypes.sizeof(_OpenOpts))
    o.btf_custom_path = VMLINUX_BTF.encode()
    return o


def core_uses_module_btf() -> bool:
    """libbpf may relocate against module BTF at load (the loader does not pin CO-RE to
    vmlinux's BTF): the btrfs types then come from the btrfs module (btrfs_layout.py)."""
    return _open_opts() is None


def default_object_path() -> Path:
    """The object to load on this kernel: ``AEGIS_BPF_OBJECT``, else the build the feature
    probe picks (aegis_stream/kernel/builds.py)."""
    return builds.choose_build().path


@dataclass
class ProgramStatus:
    """How far one BPF program got (not_loaded, loaded, attached, failed), with the errno, error and
    verifier log tail of the step that failed; ``pinned`` is the link's pin path once attached."""
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
    """Every program's :class:`ProgramStatus` after ``attach_all``.  Enforcement may be claimed only when
    every program attached (:attr:`enforcing_capable`); a partial attach is reported, never hidden."""
    programs: dict[str, ProgramStatus] = field(default_factory=dict)

    @property
    def attached(self) -> list[str]:
        return [p.hook for p in self.programs.values() if p.phase == "attached"]

    @property
    def failed(self) -> list[ProgramStatus]:
        return [p for p in self.programs.values() if p.phase != "attached"]

    @property
    def enforcing_capable(self) -> bool:
        """Every decision hook attached (an optional program's absence is :attr:`degraded_optional`)."""
        return bool(self.programs) and not [p for p in self.failed if p.name not in OPTIONAL_PROGRAMS]

    @property
    def degraded_optional(self) -> list[ProgramStatus]:
        """Optional programs (abi.AUX_PROGRAMS) that are not attached: enforcement works, degraded."""
        return [p for p in self.failed if p.name in OPTIONAL_PROGRAMS]

    def summary(self) -> str:
        if self.enforcing_capable:
            opt = self.degraded_optional
            if opt:
                bad = ", ".join(f"{p.hook} ({p.name}): {p.phase}{' ' + p.error if p.error else ''}"
                                for p in opt)
                return (f"all {len(self.programs) - len(opt)} decision hooks attached; "
                        f"degraded, not attached: {bad}")
            return f"all {len(self.programs)} hooks attached"
        bad = ", ".join(
            f"{p.hook} ({p.name}): {p.phase}{' ' + p.error if p.error else ''}" for p in self.failed
        )
        hooks = [p for p in self.programs.values() if p.name not in OPTIONAL_PROGRAMS]
        up = sum(p.phase == "attached" for p in hooks)
        return f"partial attach: {up}/{len(hooks)} hooks; not attached: {bad}"


_FAILED_PROG = re.compile(
    r"prog '(\w+)': (?:BPF program load failed|failed to load|failed to prepare load attributes"
    r"|failed to find kernel BTF type ID)"
)
_CORE_FAIL = re.compile(r"failed to resolve CO-RE relocation (.*?)(?:\(\d+:\d+ @|$)", re.M)
_NO_HOOK = re.compile(r"failed to find kernel BTF type ID of '(\w+)'")
_VSTATS = re.compile(r"processed (\d+) insns \(limit (\d+)\) max_states_per_insn (\d+) "
                     r"total_states (\d+) peak_states (\d+)")
FAULTS_ENV = "AEGIS_FAULT_INJECT"


def fault_injection(text: str | None = None) -> dict[str, set[str]]:
    """Test-only fault injection: ``attach:aegis_file_open,attach:aegis_mmap_file``."""
    text = os.environ.get(FAULTS_ENV, "") if text is None else text
    out: dict[str, set[str]] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        kind, _, prog = item.partition(":")
        if kind != "attach" or prog not in ALL_PROGRAMS:
            raise LoadError(f"{FAULTS_ENV}: unknown fault {item!r} (use attach:<program>)")
        out.setdefault(kind, set()).add(prog)
    return out


@dataclass(frozen=True)
class VerifierStats:
    """The verifier's "processed N insns ..." summary of one program, checked against
    bpf/verifier-budget.json so a change that approaches the instruction limit is seen before it fails."""
    insns_processed: int
    insn_limit: int
    max_states_per_insn: int
    total_states: int
    peak_states: int


def parse_verifier_stats(log: str) -> VerifierStats | None:
    m = _VSTATS.search(log)
    return VerifierStats(*(int(g) for g in m.groups())) if m else None
_HOOK_OF = {prog: abi.HOOK_NAMES[h] for h, prog in abi.HOOK_PROGRAMS.items()} | abi.AUX_PROGRAMS


class BpfObject:
    """One loaded instance of aegis.bpf.o."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        pin_root_dir: str | None = None,
        log_level: int = 0,
        partial: bool = True,
    ) -> None:
        self.path = Path(path or default_object_path())
        self.pin_root = pin_root_dir or pin_root()
        self.report = AttachReport(
            {name: ProgramStatus(name, _HOOK_OF[name]) for name in ALL_PROGRAMS}
        )
        self.log_level = log_level  # 4 = BPF_LOG_STATS: verified insns per program
        self.partial = partial  # keep the hooks that load when one does not
        self._obj: int | None = None
        self._links: dict[str, int] = {}
        self._log_bufs: dict[str, ctypes.Array[ctypes.c_char]] = {}
        self._reuse = False
        self._disabled: set[str] = set()
        # test hook: programs whose attach is refused (AEGIS_FAULT_INJECT=attach:prog,...)
        self.fail_attach: set[str] = fault_injection().get("attach", set())
        self.verifier_stats: dict[str, VerifierStats] = {}
        self.btrfs_keying = btrfs_layout.BtrfsKeying(btrfs_layout.LayoutSource.NONE, None,
                                                     "not opened yet")

    # -- lifecycle --------------------------------------------------------------------
    def open(self) -> None:
        if not self.path.exists():
            raise LoadError(f"BPF object {self.path} not found; run `make -C bpf`")
        libbpf.clear_log()
        self._opts = _open_opts()
        self.btrfs_keying = btrfs_layout.choose(core_uses_module_btf=self._opts is None)
        self._open_obj()

    def _open_obj(self) -> None:
        """Open the object file (again after a partial load) with the options and btrfs
        layout that open() chose once."""
        lib = libbpf.lib()
        obj = lib.bpf_object__open_file(str(self.path).encode(),
                                        ctypes.byref(self._opts) if self._opts else None)
        if not obj:
            raise LoadError(f"bpf_object__open_file({self.path})", err=libbpf.errno_of())
        self._obj = obj
        self._set_btrfs_layout(obj)
        for name in ALL_PROGRAMS:
            prog = lib.bpf_object__find_program_by_name(obj, name.encode())
            if not prog and name in OPTIONAL_PROGRAMS:  # an older object: degraded, reported
                st = self.report.programs[name]
                st.phase, st.error = "failed", f"program {name} missing from {self.path.name}"
                self._disabled.add(name)
                continue
            if not prog:
                self.close()
                raise LoadError(f"program {name} missing from {self.path}")
            if name in self._disabled:
                lib.bpf_program__set_autoload(prog, False)
                continue
            buf = ctypes.create_string_buffer(LOG_BUF_SIZE)
            self._log_bufs[name] = buf
            lib.bpf_program__set_log_buf(prog, buf, LOG_BUF_SIZE)
            if self.log_level:
                lib.bpf_program__set_log_level(prog, self.log_level)
        if self._reuse:
            self._set_pin_paths()

    def _set_btrfs_layout(self, obj: int) -> None:
        """Hand the programs btrfs's offsets where CO-RE cannot find them
        (aegis_stream/kernel/btrfs_layout.py): read-only data, set before load."""
        layout = self.btrfs_keying.layout
        if layout is None:
            return
        lib = libbpf.lib()
        m = lib.bpf_object__find_map_by_name(obj, BTRFS_RODATA.encode())
        if not m:  # an object built before the layout existed: CO-RE, or s_dev keys
            if self.btrfs_keying.source is not btrfs_layout.LayoutSource.MODULE_BTF:
                self.btrfs_keying = btrfs_layout.BtrfsKeying(
                    btrfs_layout.LayoutSource.NONE, None,
                    f"{self.path.name} has no {BTRFS_RODATA}: btrfs inodes keyed by s_dev")
            return
        data = layout.rodata()
        ret = lib.bpf_map__set_initial_value(m, data, len(data))
        if ret < 0:
            raise LoadError(f"bpf_map__set_initial_value({BTRFS_RODATA})", err=libbpf.errno_of(ret))

    def reuse_pinned_maps(self) -> list[str]:
        """Point every map at its pin path: libbpf reuses an existing pin at load."""
        self._reuse = True
        return self._set_pin_paths()

    def _set_pin_paths(self) -> list[str]:
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

    def _classify(self, name: str, err: int, tail: str) -> tuple[str, str]:
        vlog = self._log_bufs[name].value.decode(errors="replace").strip() if name in self._log_bufs else ""
        mine = "\n".join(line for line in tail.splitlines() if f"prog '{name}'" in line)
        # libbpf rewrites the verifier log at a poisoned CO-RE instruction to name the field
        core = _CORE_FAIL.search(mine) or _CORE_FAIL.search(vlog)
        if core:
            return (f"CO-RE relocation failed: {core.group(1).strip()} does not exist in kernel "
                    f"{os.uname().release}", vlog)
        hook = _NO_HOOK.search(mine)
        if hook:
            return (f"LSM hook {hook.group(1)!r} not found in kernel {os.uname().release} "
                    "(load failed before the verifier)", vlog)
        if vlog:
            lines = [ln.strip() for ln in vlog.splitlines() if ln.strip()
                     and not ln.startswith(("processed ", "verification time", "stack depth"))]
            last = lines[-1] if lines else vlog.splitlines()[-1]
            return f"verifier rejected the program: {last}", vlog
        if err == 1:
            return "kernel refused the load before the verifier ran (empty verifier log)", vlog
        return f"load failed ({os.strerror(err)})", vlog

    def load(self) -> None:
        """Load the object.  When a program fails, record why and (partial mode) load the
        others without it, so the report shows exactly which hooks work."""
        assert self._obj is not None, "open() first"
        if self._reuse:
            os.makedirs(f"{self.pin_root}/maps", exist_ok=True)
        lib = libbpf.lib()
        while True:
            libbpf.clear_log()
            ret = lib.bpf_object__load(self._obj)
            if ret >= 0:
                break
            err = libbpf.errno_of(ret)
            tail = libbpf.log_tail(400)
            failed = sorted(set(_FAILED_PROG.findall(tail)) & set(ALL_PROGRAMS) - self._disabled)
            for name in failed:
                st = self.report.programs[name]
                st.phase, st.errno = "failed", err
                st.error, vlog = self._classify(name, err, tail)
                st.log_tail = "\n".join(vlog.splitlines()[-20:])
            self._disabled |= set(failed)
            remaining = set(REQUIRED_PROGRAMS) - self._disabled
            if not failed or not remaining or not self.partial:
                for name in set(ALL_PROGRAMS) - self._disabled:
                    st = self.report.programs[name]
                    st.phase, st.errno = "failed", err
                    st.error = st.error or "not loaded: the object load failed"
                where = ", ".join(failed) or "(object)"
                raise LoadError(f"loading {self.path.name} failed at {where}", err=err,
                                log_tail=tail)
            lib.bpf_object__close(self._obj)
            self._obj = None
            self._open_obj()
        for name, st in self.report.programs.items():
            if name in self._disabled:
                continue
            st.phase = "loaded"
            if self.log_level and name in self._log_bufs:
                stats = parse_verifier_stats(self._log_bufs[name].value.decode(errors="replace"))
                if stats:
                    self.verifier_stats[name] = stats

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
        return PolicyMaps(m[abi.MAP_RULES], m[abi.MAP_SCOPES], m[abi.MAP_CONFIG],
                          m[abi.MAP_RULE_COUNTERS], m[abi.MAP_CG_SCOPES])

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
    """The maps and links a loaded agent pinned under ``root``, opened without the agent process (for
    ``aegis status``/``policy``/``unload``); the caller owns the map fds and must :meth:`close`."""
    root: str
    maps: dict[str, FdMap]
    links: dict[str, bool]

    def policy_maps(self) -> PolicyMaps:
        return PolicyMaps(
            self.maps[abi.MAP_RULES], self.maps[abi.MAP_SCOPES], self.maps[abi.MAP_CONFIG],
            self.maps.get(abi.MAP_RULE_COUNTERS), self.maps.get(abi.MAP_CG_SCOPES),
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
    links = {p: os.path.exists(f"{root}/links/{p}") for p in ALL_PROGRAMS}
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
