"""Per-tick cost of the agent's policy integrity check (aegis_stream/agent/integrity.py).

Two signed generations of N inode rules (both slots full) applied through Lifecycle.apply,
then the median of 21 checks, on the fake kernel's maps and on real BPF hash maps (created
here; needs CAP_BPF, no LSM), beside the sorted-sha256 slot digest (slots.slot_digest)
for comparison; then the 5.10 build's part of the tick (agent/scope_answers.py): N cached
scope answers (``aegis_cg_scopes`` full: 8,192) checked against a directory tree standing in
for the cgroup2 mount (a cgroup's id is its directory's inode there too), the first check
(every answer fresh: one walk of the tree, every answer computed) and a steady tick (every
answer confirmed)::

    python -m bench.integrity_bench [--rules 10000] [--answers 8192]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from aegis_stream.agent import scope_answers
from aegis_stream.agent.integrity import IntegrityChecker, map_columns
from aegis_stream.kernel import abi, libbpf, slots
from aegis_stream.kernel.maps import FdMap, PolicyMaps
from aegis_stream.policy import signing
from aegis_stream.policy.lifecycle import Lifecycle


def _map(kind: int, name: str, ks: int, vs: int, n: int) -> FdMap | None:
    fn = libbpf.lib().bpf_map_create
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                   ctypes.c_uint32, ctypes.c_void_p]
    fd = fn(kind, name.encode(), ks, vs, n, None)
    return FdMap(name, fd, owns_fd=True) if fd >= 0 else None


def real_maps() -> PolicyMaps | None:
    """The three policy maps as real BPF maps of the product's sizes, or None."""
    rules = _map(1, "b_rules", abi.INODE_KEY.size, abi.RULE.size,
                 abi.MAP_MAX_ENTRIES[abi.MAP_RULES])
    scopes = _map(1, "b_scopes", abi.SCOPE_KEY.size, abi.SCOPE.size,
                  abi.MAP_MAX_ENTRIES[abi.MAP_SCOPES])
    config = _map(2, "b_config", 4, abi.SLOT_CONFIG.size, abi.MAP_MAX_ENTRIES[abi.MAP_CONFIG])
    if rules is None or scopes is None or config is None:
        return None
    return PolicyMaps(rules=rules, scopes=scopes, config=config)


def median_ms(f: Callable[[], object], n: int = 21) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[n // 2] * 1e3


def run(maps: PolicyMaps, n: int) -> tuple[float, float]:
    tmp = Path(tempfile.mkdtemp(prefix="aegis-integrity-bench-"))
    k = signing.generate_keypair("bench", tmp / "keys")
    key, _ = signing.load_private_key(k.private_path)
    lc = Lifecycle(maps, tmp / "state")
    lc.trust.add(k.public_path.read_bytes())
    rules = "".join(f'[[rules]]\nid = "r{i}"\ninode = "8:1:{1000 + i}"\n\n' for i in range(n))
    for v in (1, 2):
        doc = f'apiVersion = "aegis/v1"\nname = "big"\nversion = {v}\nmode = "enforce"\n\n{rules}'
        lc.apply(signing.sign_policy(doc.encode(), key, "bench"), f"v{v}")
    check = IntegrityChecker(maps, tmp / "state")
    if check.check().findings:
        raise SystemExit("the check found a difference on an untouched generation")
    slot = slots.read_state(maps).active_slot
    return median_ms(check.check), median_ms(lambda: slots.slot_digest(maps, slot), 5)


def answers_run(n: int) -> tuple[float, float]:
    """(first check ms, steady tick ms) of n cached answers over a tree of n cgroups."""
    root = Path(tempfile.mkdtemp(prefix="aegis-cgtree-"))
    ids = []
    for i in range(n):  # 64 "slices" of n/64 leaves: two levels, like system.slice/x.scope
        d = root / f"s{i % 64}" / f"c{i}"
        d.mkdir(parents=True, exist_ok=True)
        ids.append(d.stat().st_ino)
    scope = (root / "s0").stat().st_ino
    maps = PolicyMaps.fake(8)
    assert maps.cg_scopes is not None
    for i, cg in enumerate(ids):
        ans = scope if i % 64 == 0 else -1
        maps.cg_scopes.update(abi.CG_SCOPE_KEY.pack(9, cg), ans.to_bytes(8, "little", signed=True))
    audit = scope_answers.AnswerAudit(scope_answers.CgroupTree(root, walk_every_s=0))

    def tick() -> None:
        kb, vb = map_columns(maps.cg_scopes)  # type: ignore[arg-type]
        if audit.check_columns(kb, vb, 9, {scope}):
            raise SystemExit("a right answer was reported")

    t0 = time.perf_counter()
    tick()
    first = (time.perf_counter() - t0) * 1e3
    return first, median_ms(tick)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", type=int, default=10_000)
    ap.add_argument("--answers", type=int, default=abi.MAX_CG_SCOPES)
    args = ap.parse_args()
    if args.answers:
        first, steady = answers_run(args.answers)
        print(f"cached scope answers (5.10 build): {args.answers:,} over {args.answers:,} cgroups: "
              f"first check {first:.1f} ms (one walk), then {steady:.2f} ms/tick")
    for label, maps in (("fake maps", PolicyMaps.fake()), ("real BPF maps", real_maps())):
        if maps is None:
            print(f"{label}: cannot create BPF maps here (needs CAP_BPF); skipped")
            continue
        tick, digest = run(maps, args.rules)
        print(f"{label}: {args.rules:,} rules x 2 slots: check {tick:.1f} ms/tick, "
              f"sorted-sha256 slot digest {digest:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
