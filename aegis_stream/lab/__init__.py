"""The kernel lab: real Debian kernels fetched with a private apt configuration and
booted under QEMU (virtme-ng) to prove enforcement.  Development tooling, behind the
``[lab]`` extra; nothing in the agent imports it.

    apt      private apt configuration, Debian sources and package stanzas
    kernels  the kernel cache: series -> suite, resolve, fetch, find
    vm       boot a kernel under QEMU, run a command as root in it, collect the result
    mounts   guest-side mount helpers (bpffs, cgroup2, tmpfs)
    cli      ``aegis lab kernels|exec`` and ``python -m aegis_stream.lab``
"""

from aegis_stream.errors import LabError
from aegis_stream.lab.cli import add_lab_subparsers, main
from aegis_stream.lab.kernels import (
    DEFAULT_SERIES,
    KERNELS,
    LabKernel,
    fetch_all,
    fetch_kernel,
    find_kernel,
    kernel_config,
    list_kernels,
)
from aegis_stream.lab.vm import DEFAULT_TIMEOUT, LabResult, LabTimeout, lab_exec, lsm_append

__all__ = [
    "DEFAULT_SERIES",
    "DEFAULT_TIMEOUT",
    "KERNELS",
    "LabError",
    "LabKernel",
    "LabResult",
    "LabTimeout",
    "add_lab_subparsers",
    "fetch_all",
    "fetch_kernel",
    "find_kernel",
    "kernel_config",
    "lab_exec",
    "list_kernels",
    "lsm_append",
    "main",
]
