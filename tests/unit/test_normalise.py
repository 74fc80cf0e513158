"""The normaliser: both paths byte-identical, bounded caches, best-effort enrichment."""

from __future__ import annotations

import os

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegis_stream.kernel import abi
from aegis_stream.kernel.events import EVENT_SIZE, RawDecision, decode_batch, decode_raw, encode_raw
from aegis_stream.pipeline.normalise import (
    BoundedCache,
    CgroupResolver,
    GenerationIndex,
    Normaliser,
    ProcessInfo,
    ProcessResolver,
    StaticProcesses,
)
from aegis_stream.policy.store import PolicyStore
from aegis_stream.testing import (
    CG_APP,
    CG_WORKLOADS,
    DEV_SDA1,
    FakeKernel,
    fixed_normaliser,
    install,
    sample_record,
)

_enc = msgspec.json.Encoder()


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _store(tmp_path) -> PolicyStore:
    store = PolicyStore(tmp_path / "state")
    k = FakeKernel(deny_ring_size=4096, audit_ring_size=4096)
    install(k, store, sample_record(7))
    k.close()
    return store


raw_strategy = st.builds(
    RawDecision,
    abi_version=st.just(abi.ABI_VERSION),
    hook=st.integers(0, 4),
    decision=st.integers(0, 3),
    rule_id=st.integers(0, 5),
    generation=st.sampled_from([7, 8]),
    ktime_ns=st.integers(0, 2**63),
    cgroup_id=st.sampled_from([CG_APP, CG_WORKLOADS, 0, 77, 2**64 - 1]),
    scope_cgroup_id=st.sampled_from([CG_WORKLOADS, 0, 99]),
    ino=st.integers(0, 2**64 - 1),
    dev=st.sampled_from([DEV_SDA1, 0, 2**32 - 1]),
    action=st.integers(0, 3),
    pid=st.integers(0, 2**32 - 1),
    tgid=st.sampled_from([4242, 1, 2**32 - 1]),
    uid=st.integers(0, 2**32 - 1),
    gid=st.integers(0, 2**32 - 1),
    mode=st.integers(0, 2),
    slot=st.integers(0, 1),
    comm=st.text(alphabet=st.characters(blacklist_characters="\0", max_codepoint=0x2FF), max_size=5),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(raw_strategy, min_size=1, max_size=12))
def test_batch_encoder_is_byte_identical_to_the_reference(tmp_path_factory, batch):
    store = PolicyStore(tmp_path_factory.getbasetemp() / "golden-like")
    if not store.generations():
        store.record(sample_record(7))
    norm = fixed_normaliser(store)
    blob = b"".join(encode_raw(r)[:EVENT_SIZE] for r in batch)
    want = b"".join(_enc.encode(norm.normalise(decode_raw(blob[i * 96 : (i + 1) * 96]))) + b"\n"
                    for i in range(len(batch)))
    assert norm.encode_batch(decode_batch(blob, EVENT_SIZE)) == want


def test_sentinel_collision_falls_back_to_the_reference(tmp_path):
    store = _store(tmp_path)
    norm = fixed_normaliser(store)
    # an inode equal to the ktime sentinel cannot be templated: per-event path
    raw = RawDecision(abi.ABI_VERSION, 0, 1, 0, 7, 5, CG_APP, CG_WORKLOADS, 18446744073709551557, DEV_SDA1, 1,
                      4242, 4242, 0, 0, 1, 1, "cat")
    data = encode_raw(raw)
    assert norm.encode_batch(decode_batch(data, EVENT_SIZE)) == _enc.encode(norm.normalise(raw)) + b"\n"


def test_enrichment_from_store_and_provenance(tmp_path):
    store = _store(tmp_path)
    norm = fixed_normaliser(store)
    ev = norm.normalise(RawDecision(abi.ABI_VERSION, 1, 1, 1, 7, 10, CG_APP, CG_WORKLOADS, 5678, DEV_SDA1,
                                    abi.ACTION_EXEC, 4242, 4242, 0, 0, 1, 0, "nc"))
    assert (ev.rule_id, ev.rule_source, ev.policy_name, ev.policy_version) == (
        "deny-nc", "/usr/bin/nc", "prod-baseline", 3)
    assert ev.policy_signer == "ops-2026" and ev.policy_source == "/etc/aegis/policy.toml"
    assert ev.cgroup_path == "/sys/fs/cgroup/workloads/app" and ev.hook == "bprm_check_security"
    assert ev.exe == "/usr/bin/cat" and ev.cmdline == ["cat", "/etc/shadow"]
    assert ev.enrichment_missing == []


def test_bounded_cache_lru_and_ttl():
    clock = Clock()
    c: BoundedCache[int, int] = BoundedCache(2, ttl=10, clock=clock)
    calls: list[int] = []

    def make(k: int) -> int:
        calls.append(k)
        return k * 10

    assert c.get_or(1, make) == 10 and c.get_or(2, make) == 20 and c.get_or(1, make) == 10
    c.get_or(3, make)  # evicts 2 (least recently used)
    assert len(c) == 2 and c.evictions == 1
    c.get_or(2, make)
    assert calls == [1, 2, 3, 2]
    clock.t = 11
    c.get_or(2, make)
    assert calls[-1] == 2 and c.expired == 1
    st_ = c.statistics()
    assert (st_.hits, st_.misses, st_.capacity) == (1, 5, 2)


def test_bounded_cache_get_fresh_counts_and_peek_does_not():
    clock = Clock()
    c: BoundedCache[int, str | None] = BoundedCache(2, clock=clock)
    assert c.get_fresh(1) is None and (c.hits, c.misses) == (0, 1)
    c.put(1, None, ttl=5)  # a negative answer with a short life
    c.put(2, "b")
    assert c.get_fresh(1) == (None, 5.0) and (c.hits, c.misses) == (1, 1)
    c.put(3, "c")  # get_fresh did not refresh 1's LRU position: 1 is evicted, not 2
    assert c.peek(1) is None and c.peek(2) == ("b", 0.0)
    clock.t = 6
    c.put(1, None, ttl=5)  # expires at 11
    clock.t = 11
    assert c.get_fresh(1) is None and (c.hits, c.misses) == (1, 2)
    assert c.peek(1) == (None, 11.0) and (c.hits, c.misses) == (1, 2)  # as stored, uncounted


def test_cgroup_resolver_walks_once_and_caches_negatives(tmp_path):
    root = tmp_path / "cg"
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    clock = Clock()
    r = CgroupResolver([str(root)], clock=clock, walk_interval=1.0, negative_ttl=5.0)
    ids = {p: os.stat(p).st_ino for p in (root / "a" / "b", root / "c")}
    assert r.path(ids[root / "a" / "b"]) == str(root / "a" / "b")
    assert r.path(ids[root / "c"]) == str(root / "c")  # found by the same walk
    assert r.walks == 1
    assert r.path(123456789) == "" and r.walks == 1  # walked less than 1 s ago
    (root / "new").mkdir()
    new = os.stat(root / "new").st_ino
    assert r.path(new) == ""  # not walked again yet
    clock.t = 6
    assert r.path(new) == str(root / "new") and r.walks == 2
    assert r.path(0) == ""


def test_process_resolver_reads_proc_and_flags_what_is_missing():
    clock = Clock()
    r = ProcessResolver(clock=clock, ttl=2)
    me = r.lookup(os.getpid())
    assert me.exe == os.readlink("/proc/self/exe") and me.missing == ()
    assert me.cmdline and me.exe_json == _enc.encode(me.exe)
    gone = r.lookup(2**22 + 12345)
    assert gone.missing == ("exe", "cmdline") and gone.exe == ""
    r.lookup(os.getpid())
    assert r.cache.hits == 1
    clock.t = 3
    r.lookup(os.getpid())
    assert r.cache.expired == 1


def test_generation_index_negative_answers_expire(tmp_path):
    clock = Clock()
    store = PolicyStore(tmp_path / "s")
    idx = GenerationIndex(store, clock=clock, negative_ttl=5)
    assert idx.get(7) is None
    store.record(sample_record(7))
    assert idx.get(7) is None  # cached miss
    clock.t = 6
    info = idx.get(7)
    assert info is not None and info.record.generation == 7 and info.source == ""


def test_context_with_gaps_is_rendered_again_later(tmp_path):
    clock = Clock()
    store = PolicyStore(tmp_path / "s")
    norm = Normaliser(store, cgroups=CgroupResolver(static={}), host="h",
                      processes=StaticProcesses({4242: ProcessInfo("/x", (), ())}),
                      boot_id_hex="00" * 16, boot_ns=0, clock=clock, retry_missing_s=5)
    data = encode_raw(RawDecision(abi.ABI_VERSION, 0, 1, 0, 7, 1, 5, 0, 1234, DEV_SDA1, 1, 4242, 4242, 0, 0, 1, 0, "c"))
    arr = decode_batch(data, EVENT_SIZE)
    first = msgspec.json.decode(norm.encode_batch(arr))
    assert first["enrichment_missing"] == ["generation", "cgroup_path"]
    store.record(sample_record(7))
    clock.t = 10
    second = msgspec.json.decode(norm.encode_batch(arr))
    assert second["rule_id"] == "deny-shadow" and second["enrichment_missing"] == ["cgroup_path"]


def test_every_context_field_separates_contexts(tmp_path):
    """Records that differ in any field but ktime/pid/tgid never share a rendered context."""
    store = _store(tmp_path)
    norm = fixed_normaliser(store)
    base = RawDecision(abi.ABI_VERSION, 0, 1, 0, 7, 5, CG_APP, CG_WORKLOADS, 1234, DEV_SDA1, 1, 4242, 4242, 10, 20, 1, 1, "cat")
    variants = [base]
    for field, val in [("hook", 1), ("decision", 2), ("rule_id", 1), ("generation", 8),
                       ("cgroup_id", CG_WORKLOADS), ("scope_cgroup_id", 0), ("ino", 99), ("dev", 7),
                       ("action", 2), ("uid", 11), ("gid", 21), ("mode", 0), ("slot", 0), ("comm", "dog")]:
        variants.append(msgspec.structs.replace(base, **{field: val}))
    blob = b"".join(encode_raw(v) for v in variants)
    want = b"".join(_enc.encode(norm.normalise(v)) + b"\n" for v in variants)
    assert norm.encode_batch(decode_batch(blob, EVENT_SIZE)) == want


def _sizes(norm: Normaliser) -> dict[str, int]:
    return {c.name: c.size for c in norm.cache_statistics()}


def test_retired_generations_leave_the_caches_and_late_events_stay_exact(tmp_path):
    """After a swap, contexts and rule tables of generations other than the kept ones are
    dropped; a late event of a retired generation renders exactly as before (a miss)."""
    store = _store(tmp_path)
    store.record(sample_record(8))
    norm = fixed_normaliser(store)
    raws = {g: RawDecision(abi.ABI_VERSION, 0, 1, 0, g, 5, CG_APP, CG_WORKLOADS, 1234, DEV_SDA1, 1, 4242, 4242,
                           0, 0, 1, 1, "cat") for g in (7, 8)}
    blob = {g: encode_raw(r) for g, r in raws.items()}
    before = {g: (norm.encode_batch(decode_batch(blob[g], EVENT_SIZE)),
                  _enc.encode(norm.normalise(raws[g]))) for g in (7, 8)}
    sizes = _sizes(norm)
    assert (sizes["context"], sizes["context_ref"], sizes["generation"]) == (2, 2, 2)
    assert norm.retire_generations({8, 9}) == 3  # generation 7: one context of each kind + its rules
    sizes = _sizes(norm)
    assert (sizes["context"], sizes["context_ref"], sizes["generation"]) == (1, 1, 1)
    after = {g: (norm.encode_batch(decode_batch(blob[g], EVENT_SIZE)),
                 _enc.encode(norm.normalise(raws[g]))) for g in (7, 8)}
    assert after == before
    assert msgspec.json.decode(after[7][1])["rule_id"] == "deny-shadow"
    assert norm.retire_generations({7, 8}) == 0
