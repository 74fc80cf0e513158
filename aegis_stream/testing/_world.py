"""The sample world: cgroups, a device, a compiled generation and a fixed normaliser.

One shared fixture for the unit tests, the bench and the soak: a policy with three rules
on 8:1 scoped to /sys/fs/cgroup/workloads, :func:`install` to make it the fake kernel's
active generation as Lifecycle.apply does, and a deterministic :class:`Normaliser`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aegis_stream.kernel import abi, devnum, slots

if TYPE_CHECKING:
    from aegis_stream.pipeline.normalise import Normaliser
    from aegis_stream.policy.store import GenerationRecord, PolicyStore
    from aegis_stream.testing._kernel import FakeKernel

#: cgroup ids of the fixed world: root, /workloads (selected), /workloads/app, /other
CG_ROOT, CG_WORKLOADS, CG_APP, CG_OTHER = 1, 1000, 1001, 2000
CGROUP_PATHS = {
    CG_ROOT: "/sys/fs/cgroup",
    CG_WORKLOADS: "/sys/fs/cgroup/workloads",
    CG_APP: "/sys/fs/cgroup/workloads/app",
    CG_OTHER: "/sys/fs/cgroup/other",
}
DEV_SDA1 = devnum.kernel_dev(8, 1)  # /dev/sda1 as the kernel keys it (sb->s_dev)


def sample_record(generation: int = 7, *, mode: str = "enforce", signer: str = "ops-2026",
                  host_scope: bool = False) -> GenerationRecord:
    """A fixed compiled policy: three rules on 8:1, scoped to /sys/fs/cgroup/workloads."""
    from aegis_stream.policy.compiler import CompiledPolicy, CompiledRule, CompiledScope
    from aegis_stream.policy.store import GenerationRecord

    rules = [
        CompiledRule(0, "deny-shadow", "/etc/shadow", DEV_SDA1, 1234,
                     abi.ACTION_OPEN | abi.ACTION_EXEC, "ext4"),
        CompiledRule(1, "deny-nc", "/usr/bin/nc", DEV_SDA1, 5678, abi.ACTION_EXEC, "ext4"),
        CompiledRule(2, "deny-100%\"odd\"", "/srv/odd path/100%\"q\".txt", DEV_SDA1, 9012,
                     abi.ACTION_OPEN, "ext4"),
    ]
    scopes = [] if host_scope else [CompiledScope(0, "/sys/fs/cgroup/workloads", CG_WORKLOADS)]
    pol = CompiledPolicy("prod-baseline", 3, mode, "sha256:" + "ab" * 32, rules, scopes)
    return GenerationRecord(generation, 1_780_000_000.0, pol, signer, mode)


def install(kernel: FakeKernel, store: PolicyStore, record: GenerationRecord, *,
            origin: str = "/etc/aegis/policy.toml") -> None:
    """Record a generation in the store (and its apply in the provenance log) and make it
    the active slot of the fake kernel, as Lifecycle.apply does."""
    from aegis_stream.policy.provenance import ProvenanceLog

    store.record(record)
    ProvenanceLog(store.root, host="fake").append(
        "apply", origin=origin, generation=record.generation, policy=record.policy.name,
        version=record.policy.version, digest=record.policy.digest, mode=record.mode,
    )
    mode = abi.Mode.from_name(record.mode or record.policy.mode)
    slots.swap(kernel.policy_maps, record.policy, record.generation, int(mode))


def fixed_normaliser(store: PolicyStore, *, processes: dict[int, tuple[str, list[str]]] | None = None,
                     **kw: object) -> Normaliser:
    """A deterministic normaliser: fixed host, boot id, boot time, cgroups and processes."""
    from aegis_stream.pipeline.normalise import CgroupResolver, Normaliser, ProcessInfo, StaticProcesses

    procs = processes if processes is not None else {4242: ("/usr/bin/cat", ["cat", "/etc/shadow"])}
    return Normaliser(
        store,
        cgroups=CgroupResolver(static=CGROUP_PATHS),
        host="host-1",
        processes=StaticProcesses({t: ProcessInfo(e, tuple(c), ()) for t, (e, c) in procs.items()}),
        boot_id_hex="0123456789abcdef0123456789abcdef",
        boot_ns=1_780_000_000_000_000_000,
        **kw,  # type: ignore[arg-type]
    )
