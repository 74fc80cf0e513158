"""Which build of the BPF programs this kernel runs, chosen by a feature probe at load.

Two builds of ``bpf/aegis.bpf.c`` ship in the package:

* ``task-storage`` (``aegis.bpf.o``): the scope answer is cached per task in task local
  storage (``BPF_MAP_TYPE_TASK_STORAGE`` with ``bpf_get_current_task_btf()``, both Linux
  5.11+), so a task outside every selected cgroup pays one storage lookup per decision.
* ``no-task-storage`` (``aegis-no-task-storage.bpf.o``, ``-DAEGIS_NO_TASK_STORAGE``): for
  Linux 5.10 (Debian 11, Amazon Linux 2), which has neither; the scope is walked on every
  decision.  Same decisions, same maps otherwise, more instructions in deep cgroups.

The probe is libbpf's own (``libbpf_probe_bpf_map_type``: create a tiny map of the type),
the way bpftool's ``feature probe`` answers it; ``AEGIS_BPF_OBJECT`` overrides the choice.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from aegis_stream.kernel import libbpf

# enum bpf_map_type (include/uapi/linux/bpf.h): stable UAPI numbers
BPF_MAP_TYPE_TASK_STORAGE = 29


class Build(enum.StrEnum):
    """A build of the BPF programs (the object file the agent loads)."""

    TASK_STORAGE = "task-storage"
    NO_TASK_STORAGE = "no-task-storage"

    @property
    def object_name(self) -> str:
        return "aegis.bpf.o" if self is Build.TASK_STORAGE else "aegis-no-task-storage.bpf.o"


@dataclass(frozen=True)
class BuildChoice:
    """The object to load and why: ``build`` is None when ``AEGIS_BPF_OBJECT`` named a file."""

    path: Path
    build: Build | None
    reason: str


def packaged_object(build: Build) -> Path:
    return Path(str(resources.files("aegis_stream") / "bpf" / build.object_name))


def probe_task_storage() -> bool | None:
    """True/False: the kernel has (not) task local storage; None: the probe itself failed
    (no libbpf, or no privilege to create a map), i.e. unknown."""
    try:
        ret = libbpf.lib().libbpf_probe_bpf_map_type(BPF_MAP_TYPE_TASK_STORAGE, None)
    except OSError:
        return None
    if ret < 0:
        return None
    return ret == 1


def choose_build() -> BuildChoice:
    """The object for this kernel.  Unknown (the probe could not run, e.g. unprivileged
    ``aegis doctor``) means the task-storage build: loading needs the privilege the probe
    lacked, and a load failure is then reported against the real object."""
    env = os.environ.get("AEGIS_BPF_OBJECT")
    if env:
        return BuildChoice(Path(env), None, "AEGIS_BPF_OBJECT names the object")
    has = probe_task_storage()
    if has is False:
        return BuildChoice(packaged_object(Build.NO_TASK_STORAGE), Build.NO_TASK_STORAGE,
                           "no task local storage in this kernel (before Linux 5.11): "
                           "the scope is walked per decision")
    why = ("task local storage present: per-task scope cache" if has else
           "task-storage probe could not run (needs CAP_BPF/CAP_SYS_ADMIN): default build")
    return BuildChoice(packaged_object(Build.TASK_STORAGE), Build.TASK_STORAGE, why)
