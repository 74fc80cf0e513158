"""Kernel-lab fixtures: a real BPF LSM object loaded in a real kernel (QEMU guest).

These tests run only inside `aegis lab exec` (AEGIS_LAB=1).  Outside the lab they
skip with the reason; inside the lab a missing capability is a failure, never a skip.

Policies are applied the way the product applies them: through ``Lifecycle.apply`` (lock,
journal, signature check against the trust store, anti-rollback counter, generation record,
provenance log).  A per-session key (``kt``) is generated into the session's state
directory and trusted there; every policy is signed with it (leaving enforce needs a
signature: an unsigned audit policy is refused while the kernel enforces), except where a
test asks for ``signed=False``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from aegis_stream.kernel import abi, libbpf
from aegis_stream.kernel.events import RawDecision, decode_raw
from aegis_stream.kernel.loader import BpfObject
from aegis_stream.kernel.maps import FdMap
from aegis_stream.kernel.ringbuf import RingBuffer
from aegis_stream.lab.mounts import ensure_guest_mounts, mount_tmpfs, umount
from aegis_stream.policy import signing
from aegis_stream.policy.lifecycle import ApplyOutcome, Lifecycle
from aegis_stream.policy.store import PolicyStore

IN_LAB = os.environ.get("AEGIS_LAB") == "1"
PROBE_SRC = Path(__file__).with_name("probe.c")
PROBE = str(Path(__file__).parent / ".build" / "probe")  # built by scripts/setup
ROOT = Path("/tmp/aegis-kt")
CG_ROOT = Path("/sys/fs/cgroup")
EPERM = errno.EPERM
KEY_ID = "kt"  # the session's signing key, trusted in the session's state directory


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/kernel/" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)
            if not IN_LAB:
                item.add_marker(
                    pytest.mark.skip(reason="needs a lab kernel: aegis lab exec -- pytest -m kernel")
                )


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str

    @property
    def result(self) -> dict:
        lines = [ln for ln in self.stdout.splitlines() if ln.startswith("{")]
        return json.loads(lines[-1]) if lines else {}

    @property
    def errno(self) -> int | None:
        return self.result.get("errno")


@dataclass
class Lab:
    obj: BpfObject
    maps: dict[str, FdMap]
    lifecycle: Lifecycle
    key: Ed25519PrivateKey
    rings: dict[str, RingBuffer]
    cg_selected: Path
    cg_child: Path
    cg_other: Path
    files: Path
    applied: list[ApplyOutcome] = field(default_factory=list)
    apply_seconds: list[float] = field(default_factory=list)  # wall time of each apply

    @property
    def store(self) -> PolicyStore:
        return self.lifecycle.store

    # -- policy ---------------------------------------------------------------------
    def apply(
        self,
        rules: list[dict],
        *,
        mode: str = "enforce",
        scopes: list[Path] | None = None,
        name: str = "kt",
        drain: bool = True,
        signed: bool = True,
    ) -> ApplyOutcome:
        """Apply through ``Lifecycle.apply``, signed (audit too: an audit apply over an
        enforcing generation needs a signature).  The version counts up across the session,
        so the anti-rollback counter accepts every apply."""
        version = len(self.applied) + 1
        doc = f'apiVersion = "aegis/v1"\nname = "{name}"\nversion = {version}\nmode = "{mode}"\n'
        for sc in [self.cg_selected] if scopes is None else scopes:
            doc += f'[[scope]]\ncgroup = "{sc}"\n'
        for i, r in enumerate(rules):
            doc += f'[[rules]]\nid = "{r.get("id", f"rule-{i}")}"\n'
            if "inode" in r:
                doc += f'inode = "{r["inode"]}"\n'
            else:
                doc += f'path = "{r["path"]}"\n'
            acts = r.get("actions", ["open", "exec"])
            doc += "actions = [" + ", ".join(f'"{a}"' for a in acts) + "]\n"
        data = doc.encode()
        if signed:
            data = signing.sign_policy(data, self.key, KEY_ID)
        t0 = time.perf_counter()
        res = self.lifecycle.apply(data, f"kernel-test:{name}")
        self.apply_seconds.append(time.perf_counter() - t0)
        self.applied.append(res)
        if drain:  # False: keep what is on the rings (tests that collect under load)
            self.drain()
        return res

    # -- processes ------------------------------------------------------------------
    def run(self, argv: list[str], cgroup: Path | None = None, stdin: str | None = None,
            timeout: float = 60) -> Outcome:
        cg = self.cg_selected if cgroup is None else cgroup
        wrapped = ["/bin/sh", "-c", f'echo $$ > "{cg}/cgroup.procs" && exec "$@"', "sh", *argv]
        p = subprocess.run(wrapped, capture_output=True, text=True, input=stdin, timeout=timeout)
        return Outcome(p.returncode, p.stdout, p.stderr)

    def probe(self, op: str, path: str | Path, *extra: str, cgroup: Path | None = None) -> Outcome:
        return self.run([PROBE, op, str(path), *extra], cgroup=cgroup)

    def spawn(self, argv: list[str], cgroup: Path | None = None) -> subprocess.Popen:
        """Start argv in a cgroup without waiting (stdin/stdout pipes, text mode)."""
        cg = self.cg_selected if cgroup is None else cgroup
        wrapped = ["/bin/sh", "-c", f'echo $$ > "{cg}/cgroup.procs" && exec "$@"', "sh", *argv]
        return subprocess.Popen(wrapped, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def events_of(self, dev: int, ino: int) -> list[RawDecision]:
        """Drain both rings; the decisions on the inode (dev, ino) (kernel encoding)."""
        return [e for e in self.drain() if (e.dev, e.ino) == (dev, ino)]

    # -- events ---------------------------------------------------------------------
    def drain(self) -> list[RawDecision]:
        out = []
        for ring in self.rings.values():
            out += [decode_raw(r) for r in ring.drain(1 << 16)]
        return out

    def events_for(self, path: str | Path) -> list[RawDecision]:
        ino = os.stat(path).st_ino
        return [e for e in self.drain() if e.ino == ino]

    def file(self, name: str, content: str = "secret\n", mode: int = 0o644) -> Path:
        p = self.files / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
        p.chmod(mode)
        return p

    def binary(self, name: str, source: str = "/bin/true") -> Path:
        p = self.files / name
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, p)
        return p

    def clear_policy(self) -> None:
        """Apply an inert policy (a rule on a file no test touches)."""
        inert = self.file(".inert", "x")
        self.apply([{"id": "inert", "path": str(inert)}])


def cgroup_id(p: Path) -> int:
    return os.stat(p).st_ino


@contextlib.contextmanager
def bpftool_handle(lab: Lab, name: str) -> Iterator[FdMap]:
    """What bpftool does: the map by its bpffs pin, an fd of our own (not the agent's)."""
    pin = Path("/sys/fs/bpf") / f"aegis-kt-map-{os.getpid()}-{name}"
    ret = libbpf.lib().bpf_obj_pin(lab.maps[name].fd, str(pin).encode())
    assert ret == 0, f"bpf_obj_pin: errno {libbpf.errno_of(ret)}"
    m = FdMap(name, libbpf.obj_get(str(pin)), owns_fd=True)
    try:
        yield m
    finally:
        m.close()
        pin.unlink()


def assert_deny_event(lab: Lab, path, *, hook=abi.Hook.FILE_OPEN, decision=abi.Decision.DENY,
                      cgroup=None, rule_index=0, action=abi.ACTION_OPEN, ident=None,
                      events: list[RawDecision] | None = None) -> RawDecision:
    """The first decision event on ``path``'s inode (or ``ident``), checked field by field:
    inode (dev from mountinfo, kernel encoding), hook, decision, action, rule id, the last
    applied generation, ABI version and the task's cgroup.  Drains the rings unless
    ``events`` is given."""
    from aegis_stream.kernel.devnum import resolve_inode

    ident = ident or resolve_inode(str(path))
    evs = [e for e in (lab.drain() if events is None else events)
           if (e.dev, e.ino) == (ident.dev, ident.ino)]
    assert evs, f"no decision event for {path} ({ident})"
    e = evs[0]
    assert e.hook == hook and e.decision == decision and e.action == action, e
    assert e.rule_id == rule_index, e
    assert e.generation == lab.applied[-1].generation, e
    assert e.abi_version == abi.ABI_VERSION
    assert e.cgroup_id == cgroup_id(cgroup or lab.cg_selected), e
    assert e.mode == (abi.Mode.ENFORCE if decision == abi.Decision.DENY else abi.Mode.AUDIT)
    return e


@pytest.fixture
def cgroups(lab: Lab) -> Iterator[list[Path]]:
    """Extra cgroups a test creates (append them); removed deepest first afterwards."""
    made: list[Path] = []
    yield made
    for d in sorted(made, key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass


# --- loop-device filesystems (ext4, xfs, btrfs), made once per session ------------------

IMG_ROOT = Path("/tmp/aegis-img")
FS_MNT = ROOT / "fs"
_MKFS = {
    "ext4": (["mkfs.ext4", "-q", "-F"], "32M"),
    # xfsprogs >= 5.19 refuses < 300 MB unless told this is a test filesystem
    "xfs": (["mkfs.xfs", "-q", "-f"], "64M"),
    "btrfs": (["mkfs.btrfs", "-q", "-f"], "128M"),
    # ext4 without inode checksums: the file owner may rewrite i_generation (chattr -v)
    "ext4-nocsum": (["mkfs.ext4", "-q", "-F", "-O", "^metadata_csum"], "32M"),
}


@dataclass
class LoopFs:
    kind: str
    image: Path
    loopdev: str
    mnt: Path


def _sh(argv: list[str], **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


@pytest.fixture(scope="session")
def loopfs(lab_env: Lab):
    """``loopfs("ext4")`` -> a LoopFs mounted under /tmp/aegis-kt/fs/ext4 (sparse image on a
    tmpfs, loop device).  Made on first use, torn down at the end of the session."""
    made: dict[str, LoopFs] = {}

    def get(kind: str) -> LoopFs:
        if kind in made:
            return made[kind]
        if not made:
            mount_tmpfs(IMG_ROOT, "1g")
            subprocess.run(["modprobe", "loop"], capture_output=True)
        mkfs, size = _MKFS[kind]
        img = IMG_ROOT / f"{kind}.img"
        with open(img, "wb") as fh:
            fh.truncate(int(size[:-1]) << 20)
        env = dict(os.environ, TEST_DIR="1", TEST_DEV="1", QA_CHECK_FS="1")
        _sh([*mkfs, str(img)], env=env)
        dev = _sh(["losetup", "-f", "--show", str(img)]).stdout.strip()
        mnt = FS_MNT / kind
        mnt.mkdir(parents=True, exist_ok=True)
        _sh(["mount", "-t", kind.split("-")[0], dev, str(mnt)])
        made[kind] = LoopFs(kind, img, dev, mnt)
        return made[kind]

    yield get
    for fs in made.values():
        subprocess.run(["umount", "-l", str(fs.mnt)], capture_output=True)
        subprocess.run(["losetup", "-d", fs.loopdev], capture_output=True)
    if made:
        umount(IMG_ROOT)


@pytest.fixture(scope="session")
def lab_env(tmp_path_factory, record_testsuite_property) -> Iterator[Lab]:
    if not IN_LAB:
        pytest.skip("not in a lab kernel")
    if os.geteuid() != 0:
        pytest.fail("kernel tests must run as root inside the lab guest")
    if not os.access(PROBE, os.X_OK):
        pytest.fail(f"{PROBE} missing: build it with `make -C tests/kernel` (scripts/setup does)")
    ensure_guest_mounts()
    os.makedirs(ROOT, exist_ok=True)
    mount_tmpfs(ROOT)
    files = ROOT / "files"
    files.mkdir()
    state = tmp_path_factory.mktemp("state")
    os.environ["AEGIS_STATE_DIR"] = str(state)
    base = CG_ROOT / f"aegis-kt-{os.getpid()}"
    sel, child, other = base / "selected", base / "selected" / "child", base / "other"
    for d in (base, sel, child, other):
        d.mkdir()
    # btrfs's module BTF must be there when the programs load for btrfs inodes to be keyed
    # by subvolume (GAP-BTRFS-SUBVOL, bpf/core_fixes.bpf.h); a host with a btrfs mount has it
    subprocess.run(["modprobe", "btrfs"], capture_output=True)
    obj = BpfObject(pin_root_dir="/sys/fs/bpf/aegis-kt")
    obj.open()
    obj.load()
    report = obj.attach_all(pin=False)
    if not report.enforcing_capable:
        pytest.fail(f"lab kernel cannot attach: {report.summary()}")
    maps = obj.maps()
    rings = {
        "deny": RingBuffer(maps[abi.MAP_DENY_EVENTS].fd, maps[abi.MAP_DENY_EVENTS].max_entries),
        "audit": RingBuffer(maps[abi.MAP_AUDIT_EVENTS].fd, maps[abi.MAP_AUDIT_EVENTS].max_entries),
    }
    key = signing.generate_keypair(KEY_ID, state / "keys")
    lifecycle = Lifecycle(obj.policy_maps(), state)
    lifecycle.trust.add(key.public_path.read_bytes())
    private, _ = signing.load_private_key(key.private_path)
    lab = Lab(obj, maps, lifecycle, private, rings, sel, child, other, files)
    yield lab
    if lab.apply_seconds:  # the cost of the product's apply path in this guest (TCG)
        ms = sorted(1000 * t for t in lab.apply_seconds)
        record_testsuite_property("lifecycle_apply_ms", json.dumps({
            "n": len(ms), "p50": round(ms[len(ms) // 2], 1),
            "p95": round(ms[int(len(ms) * 0.95)], 1), "max": round(ms[-1], 1),
            "total_s": round(sum(ms) / 1000, 1)}))
    for r in rings.values():
        r.close()
    obj.close(keep_pins=False)
    for d in (child, sel, other, base):
        try:
            d.rmdir()
        except OSError:
            pass
    umount(ROOT)


@pytest.fixture
def lab(lab_env: Lab) -> Iterator[Lab]:
    lab_env.drain()
    yield lab_env
    lab_env.clear_policy()


@pytest.fixture
def agent_env(lab: Lab, tmp_path) -> Iterator[dict]:
    """Environment for `aegis` subprocesses: their own pin root and state directory (no
    fault injection); whatever they left pinned is unloaded afterwards."""
    from .agentlib import aegis

    env = dict(os.environ)
    env["AEGIS_PIN_ROOT"] = f"/sys/fs/bpf/aegis-agent-{os.getpid()}"
    env["AEGIS_STATE_DIR"] = str(tmp_path / "state")
    env.pop("AEGIS_FAULT_INJECT", None)
    yield env
    aegis(["unload"], env)
