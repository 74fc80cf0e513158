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

#endif /* AEGIS_MAPS_BPF_H */
