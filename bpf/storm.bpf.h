/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * storm.bpf.h - deny-storm aggregation (docs/OPERATIONS.md "Deny storms").
 *
 * A flood of identical denies filled the 1 MiB deny ring in the lab (91 % of the events
 * lost, counted ringbuf_fail) and hid every other deny made during it.  Here the first
 * decision of a key (generation, rule, hook, cgroup, process, deny|audit) is an event
 * at once; its repeats within the window (aegis_control.storm_window_ns) are only counted: in the
 * key's value (cumulative; the agent reports the delta per tick in one aegis.storm.v1
 * summary per key), in the per-hook AEGIS_CTR_SUPPRESSED counter and per class in
 * aegis_storm_stats.  The first decision after the window expired is an event again and
 * starts a new window.  Runs only after a rule matched: the allow and out-of-scope paths
 * pay nothing.
 *
 * Nothing is dropped silently: a full map (or a failed insert) means no aggregation for
 * that key (an event, as without this file), counted UNTRACKED.  Not an LRU: an eviction
 * would lose counts not yet reported.  The kernel never deletes a key; the agent deletes
 * those of retired generations and of processes that are gone
 * (aegis_stream/kernel/storms.py, which also explains why that loses no increment).
 * No prealloc: an element deleted under a program that still holds it is freed after an
 * RCU grace period, never recycled for another key (which would misattribute a count).
 */
#ifndef AEGIS_STORM_BPF_H
#define AEGIS_STORM_BPF_H

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, AEGIS_MAX_STORM_KEYS);
	__type(key, struct aegis_storm_key);
	__type(value, struct aegis_storm);
} aegis_storms SEC(".maps");

/* written by the agent only (what it reported per key); pinned with the other maps */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, AEGIS_MAX_STORM_KEYS);
	__type(key, struct aegis_storm_key);
	__type(value, struct aegis_storm_reported);
} aegis_storm_reported SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, AEGIS_STORM_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} aegis_storm_stats SEC(".maps");

static __always_inline void storm_stat(__u32 idx)
{
	bpf_map_percpu_inc(&aegis_storm_stats, idx);
}

/* true: this decision is folded into its key's storm count (no event) */
static __always_inline bool storm_suppress(__u64 gen, __u32 rule_id, __u32 hook, bool enforce)
#ifdef AEGIS_NO_STORM /* a bench variant only: the deny path as it was before aggregation */
{
	return false;
}
#else
{
	struct aegis_storm_key k = {
		.generation = gen, .rule_id = rule_id, .hook = hook,
		.decision = enforce ? AEGIS_DECISION_DENY : AEGIS_DECISION_AUDIT,
	};
	struct aegis_control *ctl;
	struct aegis_storm *s;
	__u32 zero = 0;
	__u64 now, window;

	ctl = bpf_map_lookup_elem(&aegis_config, &zero);
	if (!ctl || !ctl->storm_window_ns)
		return false; /* aggregation off */
	window = ctl->storm_window_ns;
	k.cgroup_id = bpf_get_current_cgroup_id();
	k.tgid = bpf_get_current_pid_tgid() >> 32;
	now = bpf_ktime_get_ns();
	s = bpf_map_lookup_elem(&aegis_storms, &k);
	if (!s) {
		struct aegis_storm init = { .first_ns = now, .window_ns = now };

		if (!bpf_map_update_elem(&aegis_storms, &k, &init, BPF_NOEXIST))
			return false; /* the key's first decision: an event */
		s = bpf_map_lookup_elem(&aegis_storms, &k); /* another CPU inserted it first */
		if (!s) {
			storm_stat(enforce ? AEGIS_STORM_UNTRACKED_DENY : AEGIS_STORM_UNTRACKED_AUDIT);
			return false; /* map full: an event, counted */
		}
	}
	/* signed: another CPU may have just set a window start later than our now */
	if ((__s64)(now - s->window_ns) >= (__s64)window) {
		s->window_ns = now; /* a new window, opened by this event */
		return false;
	}
	__sync_fetch_and_add(&s->suppressed, 1);
	count(hook, AEGIS_CTR_SUPPRESSED);
	storm_stat(enforce ? AEGIS_STORM_SUPPRESSED_DENY : AEGIS_STORM_SUPPRESSED_AUDIT);
	return true;
}
#endif /* AEGIS_NO_STORM */

#endif /* AEGIS_STORM_BPF_H */
