/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * maps.bpf.h - map helpers shared by the programs (after libbpf-tools' maps.bpf.h).
 */
#ifndef AEGIS_MAPS_BPF_H
#define AEGIS_MAPS_BPF_H

#include <bpf/bpf_helpers.h>

/*
 * The value for key, inserting a zeroed value_type first when there is none; NULL when
 * there is still none (the table is full: the caller counts the loss elsewhere).
 *
 * libbpf-tools' bpf_map_lookup_or_try_init() takes a pointer to an initial value; here
 * the zero value is built only on the miss path, inside the macro, so a hit costs one
 * lookup and no stack stores (a caller-side initialiser is hoisted above the first
 * lookup by clang, which adds instructions to every hit).  The insert's error is
 * deliberately not checked: a racing CPU's insert (-EEXIST) makes the second lookup
 * hit, a full table (-E2BIG) makes it miss, so the second lookup alone decides.
 */
#define bpf_map_lookup_or_try_init_zero(map, key, value_type)                     \
	({                                                                        \
		void *__val = bpf_map_lookup_elem(map, key);                      \
		if (!__val) {                                                     \
			value_type __zero = {};                                   \
			bpf_map_update_elem(map, key, &__zero, BPF_NOEXIST);      \
			__val = bpf_map_lookup_elem(map, key);                    \
		}                                                                 \
		__val;                                                            \
	})

/*
 * Per-CPU counters are incremented with an atomic add, not `*v += 1`: a program runs with
 * migration disabled but, on a preemptible kernel, not with preemption disabled (Debian's
 * 7.x builds are CONFIG_PREEMPT_LAZY), so a program preempted between the load and the
 * store of `+= 1` writes back a stale value over every increment the programs that ran on
 * its CPU meanwhile made (7.2 lab, STORM-001: the suppressed counter lost 29,004 of
 * 399,553).  The locked add is one instruction that preemption cannot split.
 */
#define percpu_inc(p) __sync_fetch_and_add((p), 1)

/* one per-CPU __u64 counter of an array map, by index (a miss: nothing to count into) */
#define bpf_map_percpu_inc(map, idx)                                              \
	({                                                                        \
		__u32 __idx = (idx);                                              \
		__u64 *__v = bpf_map_lookup_elem(map, &__idx);                    \
		if (__v)                                                          \
			percpu_inc(__v);                                          \
	})

#endif /* AEGIS_MAPS_BPF_H */
