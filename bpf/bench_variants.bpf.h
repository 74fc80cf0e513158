/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * bench_variants.bpf.h - the out-of-scope path's parts, one -D knob each, so the icount
 * bench can measure what each costs in one boot (issue 15; docs/PERFORMANCE.md, "Where the
 * out-of-scope instructions go").  `make -C bench variant TAG=x DEFS=-DAEGIS_BENCH_...`
 * builds one; the shipped objects define none of them, and then every macro here is the
 * shipped code or nothing.
 *
 *   AEGIS_BENCH_SCOPE_NOCACHE   no cache: the ancestor walk on every decision
 *   AEGIS_BENCH_SCOPE_ID_ONLY   the cheapest conceivable scope test: the cgroup id compared
 *                               with one value (no lookup; wrong for nested cgroups)
 *   AEGIS_BENCH_DIRECT_CGROUP   the cgroup id by direct BTF loads (task->cgroups->dfl_cgrp
 *                               ->kn->id) instead of bpf_get_current_cgroup_id()
 *   AEGIS_BENCH_PERCPU_CACHE    a per-CPU entry (generation, slot, cgroup id -> scope) in
 *                               front of the task-storage cache, taken with an atomic busy
 *                               count so a preempting program on the same CPU falls through
 *                               to the task cache instead of reading a half-written entry
 *   AEGIS_BENCH_NO_EVAL_COUNT   no per-CPU "evaluated" increment (aegis.bpf.c, in_scope())
 *   AEGIS_BENCH_CG_SCOPES       the 5.10 build's per-cgroup answer (aegis_cg_scopes, keyed by
 *                               generation and cgroup id) instead of the task-storage cache
 */
#ifndef AEGIS_BENCH_VARIANTS_BPF_H
#define AEGIS_BENCH_VARIANTS_BPF_H

#ifdef AEGIS_BENCH_DIRECT_CGROUP
#define current_cgroup_id() (bpf_get_current_task_btf()->cgroups->dfl_cgrp->kn->id)
#else
#define current_cgroup_id() bpf_get_current_cgroup_id()
#endif

#ifdef AEGIS_BENCH_SCOPE_NOCACHE
#define BENCH_SCOPE_NOCACHE(sc, slot) return match_scope(sc, slot)
#else
#define BENCH_SCOPE_NOCACHE(sc, slot) do { } while (0)
#endif

#ifdef AEGIS_BENCH_SCOPE_ID_ONLY
#define BENCH_SCOPE_ID_ONLY(sc, cg) return (cg) == (sc)->generation ? (__s64)(cg) : -1
#else
#define BENCH_SCOPE_ID_ONLY(sc, cg) do { } while (0)
#endif

#ifdef AEGIS_BENCH_PERCPU_CACHE
struct aegis_cpu_scope {
	__u64 busy; /* > 0 while a program on this CPU reads or writes the entry */
	__u64 generation;
	__u64 cgroup_id;
	__s64 scope;
	__u32 slot;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct aegis_cpu_scope);
} aegis_cpu_scope SEC(".maps");

static __always_inline __s64 task_cached_scope(const struct aegis_slot_config *sc, __u32 slot,
					       __u64 cg);

static __always_inline int percpu_scope(const struct aegis_slot_config *sc, __u32 slot, __u64 cg,
					__s64 *out)
{
	struct aegis_cpu_scope *pc;
	__u32 zero = 0;
	int hit = 0;

	pc = bpf_map_lookup_elem(&aegis_cpu_scope, &zero);
	if (!pc)
		return 0;
	if (__sync_fetch_and_add(&pc->busy, 1) == 0) {
		if (pc->generation == sc->generation && pc->slot == slot && pc->cgroup_id == cg) {
			*out = pc->scope;
		} else {
			*out = task_cached_scope(sc, slot, cg);
			pc->generation = sc->generation;
			pc->slot = slot;
			pc->cgroup_id = cg;
			pc->scope = *out;
		}
		hit = 1;
	}
	__sync_fetch_and_add(&pc->busy, -1);
	return hit;
}

#define BENCH_PERCPU_CACHE(sc, slot, cg)                                                 \
	do {                                                                             \
		__s64 __s;                                                               \
		if (percpu_scope(sc, slot, cg, &__s))                                    \
			return __s;                                                      \
	} while (0)
#else
#define BENCH_PERCPU_CACHE(sc, slot, cg) do { } while (0)
#endif

#ifdef AEGIS_BENCH_CG_SCOPES
#define BENCH_CG_SCOPES(sc, slot, cg)                                                    \
	do {                                                                             \
		struct aegis_cg_scope_key __k = { .generation = (sc)->generation,        \
						  .cgroup_id = (cg) };                   \
		__s64 *__h = bpf_map_lookup_elem(&aegis_cg_scopes, &__k), __s;          \
		if (__h)                                                                 \
			return *__h;                                                     \
		__s = match_scope(sc, slot);                                             \
		bpf_map_update_elem(&aegis_cg_scopes, &__k, &__s, BPF_NOEXIST);         \
		return __s;                                                              \
	} while (0)
#else
#define BENCH_CG_SCOPES(sc, slot, cg) do { } while (0)
#endif

#endif /* AEGIS_BENCH_VARIANTS_BPF_H */
