"""Workload enrichment: what a cgroup v2 path says about the task's workload.

The kernel record carries a cgroup id; the normaliser resolves it to a path, and
:func:`parse_cgroup_path` reads the workload from the path's shape, as systemd, the
container runtimes and the kubelet lay it out:

=============================================  ==========================================
``/system.slice/nginx.service``                systemd unit ``nginx.service``
``/user.slice/user-1000.slice/session-3.scope``  systemd unit ``session-3.scope``
``/system.slice/docker-<64hex>.scope``         docker container (systemd cgroup driver)
``/docker/<64hex>``                            docker container (cgroupfs driver)
``.../libpod-<64hex>.scope``                   podman container
``/kubepods.slice/kubepods-burstable.slice/``  pod UID (``_`` in the slice name is ``-``),
``kubepods-burstable-pod<uid>.slice/``         QoS class ``burstable``, containerd
``cri-containerd-<64hex>.scope``               container (kubelet's systemd driver)
``/kubepods/besteffort/pod<uid>/<64hex>``      pod UID, QoS ``besteffort``, container
                                               (kubelet's cgroupfs driver; runtime unknown)
``.../crio-<64hex>.scope``                     cri-o container
=============================================  ==========================================

A pod directly under ``kubepods`` (no ``burstable``/``besteffort`` level) is
``guaranteed``.  Nothing is read from the filesystem or a runtime socket: the path is the
whole input, so the result is exact for what the path shows and empty for what it does not.
:class:`WorkloadResolver` caches the result per cgroup id (bounded LRU).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from aegis_stream.pipeline.schema import Workload

if TYPE_CHECKING:
    from aegis_stream.pipeline.normalise import BoundedCache, CacheStatistics

_HEX64 = r"[0-9a-f]{64}"
# a container's own cgroup, by runtime: (regex on one path component, runtime name)
_CONTAINER_SCOPES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"^cri-containerd-({_HEX64})\.scope$"), "containerd"),
    (re.compile(rf"^crio-({_HEX64})\.scope$"), "cri-o"),
    (re.compile(rf"^docker-({_HEX64})\.scope$"), "docker"),
    (re.compile(rf"^libpod-({_HEX64})\.scope$"), "podman"),
)
_BARE_ID = re.compile(rf"^({_HEX64})$")  # cgroupfs driver: the directory is the id
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
# kind and other nested kubelets prefix the slices with "kubelet-"
_POD_SLICE = re.compile(rf"^(?:kubelet-)?kubepods(?:-(burstable|besteffort))?-pod({_UID})\.slice$")
_POD_DIR = re.compile(rf"^pod({_UID})$")
_QOS = ("burstable", "besteffort")
_UNIT = re.compile(r"^[A-Za-z0-9:_.\\@-]+\.(service|scope)$")  # systemd's unit-name characters


def parse_cgroup_path(path: str) -> Workload | None:
    """The workload a cgroup v2 path shows (any prefix, e.g. the ``/sys/fs/cgroup`` mount,
    is ignored), or None when it shows nothing (the root, a plain directory)."""
    parts = [p for p in path.split("/") if p]
    unit = runtime = container = pod = qos = ""
    in_kubepods = False
    for i, part in enumerate(parts):
        if part in ("kubepods", "kubepods.slice", "kubelet-kubepods.slice"):
            in_kubepods = True
            continue
        if _UNIT.match(part):
            unit = part  # the deepest unit: the one the task is in
        for pattern, name in _CONTAINER_SCOPES:
            m = pattern.match(part)
            if m:
                container, runtime = m.group(1), name
                break
        else:
            m = _BARE_ID.match(part)
            if m:
                container = m.group(1)
                # /docker/<id> is docker's cgroupfs layout; under kubepods the runtime is not in the path
                runtime = "docker" if i > 0 and parts[i - 1] == "docker" else ""
        if in_kubepods:
            m = _POD_SLICE.match(part)
            if m:
                pod, qos = m.group(2).replace("_", "-"), m.group(1) or "guaranteed"
                continue
            m = _POD_DIR.match(part)
            if m:
                pod = m.group(1).replace("_", "-")
                qos = parts[i - 1] if parts[i - 1] in _QOS else "guaranteed"
    if not (unit or container or pod):
        return None
    return Workload(systemd_unit=unit, container_id=container, container_runtime=runtime,
                    pod_uid=pod, pod_qos=qos)


def describe(w: Workload) -> str:
    """One line for people: ``pod <uid> (burstable), container <id12> (containerd), unit <unit>``."""
    parts = []
    if w.pod_uid:
        parts.append(f"pod {w.pod_uid}" + (f" ({w.pod_qos})" if w.pod_qos else ""))
    if w.container_id:
        runtime = f" ({w.container_runtime})" if w.container_runtime else ""
        parts.append(f"container {w.container_id[:12]}{runtime}")
    if w.systemd_unit:
        parts.append(f"unit {w.systemd_unit}")
    return ", ".join(parts)


class WorkloadResolver:
    """:func:`parse_cgroup_path` with a bounded cache per cgroup id (a cgroup's path can
    change only by a rename, so the cached path is compared and a different one re-parsed)."""

    def __init__(self, capacity: int = 4096, *, clock: Callable[[], float] = time.monotonic) -> None:
        from aegis_stream.pipeline.normalise import BoundedCache  # normalise imports this module

        self.cache: BoundedCache[int, tuple[str, Workload | None]] = BoundedCache(
            capacity, clock=clock, name="workload")

    def statistics(self) -> CacheStatistics:
        return self.cache.statistics()

    def lookup(self, cgroup_id: int, path: str) -> Workload | None:
        if not path:
            return None
        hit = self.cache.get_fresh(cgroup_id)
        if hit is not None and hit[0][0] == path:
            return hit[0][1]
        workload = parse_cgroup_path(path)
        self.cache.put(cgroup_id, (path, workload))
        return workload
