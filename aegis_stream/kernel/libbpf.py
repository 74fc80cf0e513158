"""A thin ctypes binding of the system libbpf (libbpf1, CO-RE capable).

Only the calls the loader needs.  Every failing call raises a KernelError naming the
call, the object and the errno; libbpf's own log lines are captured (libbpf_set_print)
so verifier output can be attached to LoadError.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections import deque

from aegis_stream.errors import KernelError

c_void_p = ctypes.c_void_p
c_char_p = ctypes.c_char_p
c_int = ctypes.c_int
c_size_t = ctypes.c_size_t
c_uint32 = ctypes.c_uint32
c_uint64 = ctypes.c_uint64

_PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)

LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2


class _Lib:
    _instance: _Lib | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        name = os.environ.get("AEGIS_LIBBPF") or ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            self.lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise KernelError(
                f"cannot load libbpf ({name}): {exc}; install Debian's libbpf1"
            ) from None
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.log: deque[str] = deque(maxlen=4000)
        self._declare()
        self._printer = _PRINT_FN(self._print)
        self.lib.libbpf_set_print(self._printer)

    @classmethod
    def get(cls) -> _Lib:
        with cls._lock:
            if cls._instance is None:
                cls._instance = _Lib()
            return cls._instance

    def _print(self, level: int, fmt: bytes, args: int) -> int:
        buf = ctypes.create_string_buffer(4096)
        self.libc.vsnprintf(buf, 4096, fmt, c_void_p(args))
        text = buf.value.decode(errors="replace")
        for line in text.splitlines():
            self.log.append(line)
        return 0

    def _declare(self) -> None:
        sig = {
            "libbpf_set_print": (c_void_p, [_PRINT_FN]),
            "bpf_object__open_file": (c_void_p, [c_char_p, c_void_p]),
            "bpf_object__load": (c_int, [c_void_p]),
            "bpf_object__close": (None, [c_void_p]),
            "bpf_object__next_program": (c_void_p, [c_void_p, c_void_p]),
            "bpf_object__next_map": (c_void_p, [c_void_p, c_void_p]),
            "bpf_object__find_program_by_name": (c_void_p, [c_void_p, c_char_p]),
            "bpf_object__find_map_by_name": (c_void_p, [c_void_p, c_char_p]),
            "bpf_program__name": (c_char_p, [c_void_p]),
            "bpf_program__section_name": (c_char_p, [c_void_p]),
            "bpf_program__fd": (c_int, [c_void_p]),
            "bpf_program__set_autoload": (c_int, [c_void_p, ctypes.c_bool]),
            "bpf_program__set_log_level": (c_int, [c_void_p, c_uint32]),
            "bpf_program__set_log_buf": (c_int, [c_void_p, c_char_p, c_size_t]),
            "bpf_program__attach": (c_void_p, [c_void_p]),
            "bpf_map__name": (c_char_p, [c_void_p]),
            "bpf_map__fd": (c_int, [c_void_p]),
            "bpf_map__set_pin_path": (c_int, [c_void_p, c_char_p]),
            "bpf_map__pin": (c_int, [c_void_p, c_char_p]),
            "bpf_map__reuse_fd": (c_int, [c_void_p, c_int]),
            "bpf_map__max_entries": (c_uint32, [c_void_p]),
            "bpf_map__value_size": (c_uint32, [c_void_p]),
            "bpf_map__key_size": (c_uint32, [c_void_p]),
            "bpf_link__pin": (c_int, [c_void_p, c_char_p]),
            "bpf_link__fd": (c_int, [c_void_p]),
            "bpf_link__destroy": (c_int, [c_void_p]),
            "bpf_link__disconnect": (None, [c_void_p]),
            "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, c_uint64]),
            "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
            "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
            "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
            "bpf_map_lookup_batch": (c_int, [c_int, c_void_p, c_void_p, c_void_p, c_void_p,
                                             ctypes.POINTER(c_uint32), c_void_p]),
            "bpf_obj_get": (c_int, [c_char_p]),
            "bpf_obj_pin": (c_int, [c_int, c_char_p]),
            "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, ctypes.POINTER(c_uint32)]),
            "libbpf_num_possible_cpus": (c_int, []),
            "libbpf_probe_bpf_map_type": (c_int, [c_int, c_void_p]),
            "bpf_map__set_initial_value": (c_int, [c_void_p, c_void_p, c_size_t]),
            "btf__parse": (c_void_p, [c_char_p, c_void_p]),
            "btf__parse_split": (c_void_p, [c_char_p, c_void_p]),
            "btf__free": (None, [c_void_p]),
            "btf__find_by_name_kind": (ctypes.c_int32, [c_void_p, c_char_p, c_uint32]),
            "btf__type_by_id": (c_void_p, [c_void_p, c_uint32]),
            "btf__name_by_offset": (c_char_p, [c_void_p, c_uint32]),
        }
        for name, (res, args) in sig.items():
            fn = getattr(self.lib, name)
            fn.restype = res
            fn.argtypes = args


def lib() -> ctypes.CDLL:
    return _Lib.get().lib


def log_tail(lines: int = 40) -> str:
    log = _Lib.get().log
    return "\n".join(list(log)[-lines:])


def clear_log() -> None:
    _Lib.get().log.clear()


def errno_of(ret: int | None = None) -> int:
    """libbpf 1.x returns -errno and also sets errno; prefer the return value."""
    if ret is not None and ret < 0:
        return -ret
    return ctypes.get_errno() or 0


def num_possible_cpus() -> int:
    n = lib().libbpf_num_possible_cpus()
    if n <= 0:
        raise KernelError("libbpf_num_possible_cpus", err=-n)
    return int(n)


# ---- raw map access by fd (works on pinned maps, no object needed) ----------------


def obj_get(path: str) -> int:
    ctypes.set_errno(0)
    fd = lib().bpf_obj_get(path.encode())
    if fd < 0:
        raise KernelError(f"bpf_obj_get({path})", err=errno_of(fd))
    return int(fd)


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    ret = lib().bpf_map_update_elem(fd, key, value, flags)
    if ret < 0:
        raise KernelError("bpf_map_update_elem", err=errno_of(ret))


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    buf = ctypes.create_string_buffer(value_size)
    ret = lib().bpf_map_lookup_elem(fd, key, buf)
    if ret < 0:
        err = errno_of(ret)
        if err == 2:  # ENOENT
            return None
        raise KernelError("bpf_map_lookup_elem", err=err)
    return buf.raw


def map_delete(fd: int, key: bytes) -> bool:
    ret = lib().bpf_map_delete_elem(fd, key)
    if ret < 0:
        err = errno_of(ret)
        if err == 2:
            return False
        raise KernelError("bpf_map_delete_elem", err=err)
    return True


def map_keys(fd: int, key_size: int) -> list[bytes]:
    keys: list[bytes] = []
    cur: bytes | None = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        ret = lib().bpf_map_get_next_key(fd, cur, nxt)
        if ret < 0:
            err = errno_of(ret)
            if err == 2:
                return keys
            raise KernelError("bpf_map_get_next_key", err=err)
        cur = nxt.raw
        keys.append(cur)


def map_lookup_batch(fd: int, key_size: int, value_size: int, max_entries: int) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a hash map in as few BPF_MAP_LOOKUP_BATCH calls as its size
    allows (one, when the buffers hold ``max_entries``), instead of one get_next_key and
    one lookup syscall per key.  A key deleted or added meanwhile may be missed or seen:
    the same as a get_next_key walk.  Raises KernelError (EINVAL on kernels or map types
    without batch ops: the caller falls back to :func:`map_keys` + :func:`map_lookup`)."""
    count = max(1, max_entries)
    keys = ctypes.create_string_buffer(key_size * count)
    vals = ctypes.create_string_buffer(value_size * count)
    token_in = ctypes.create_string_buffer(max(8, key_size))
    token_out = ctypes.create_string_buffer(max(8, key_size))
    out: list[tuple[bytes, bytes]] = []
    first = True
    while True:
        n = c_uint32(count)
        ret = lib().bpf_map_lookup_batch(fd, None if first else token_in, token_out, keys, vals,
                                         ctypes.byref(n), None)
        err = errno_of(ret) if ret < 0 else 0
        if err and err != 2:  # ENOENT: this was the last batch
            raise KernelError("bpf_map_lookup_batch", err=err)
        kr, vr = keys.raw, vals.raw
        out.extend((kr[i * key_size:(i + 1) * key_size], vr[i * value_size:(i + 1) * value_size])
                   for i in range(n.value))
        if err == 2:
            return out
        ctypes.memmove(token_in, token_out, len(token_out))
        first = False


class BpfMapInfo(ctypes.Structure):
    """The leading fields of the kernel's ``struct bpf_map_info``; the kernel fills only the size we
    pass, so this prefix is enough to learn a map's type, id and sizes from its fd."""
    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("key_size", c_uint32),
        ("value_size", c_uint32),
        ("max_entries", c_uint32),
        ("map_flags", c_uint32),
        ("name", ctypes.c_char * 16),
    ]


def map_info(fd: int) -> BpfMapInfo:
    info = BpfMapInfo()
    size = c_uint32(ctypes.sizeof(info))
    ret = lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    if ret < 0:
        raise KernelError("bpf_obj_get_info_by_fd", err=errno_of(ret))
    return info
