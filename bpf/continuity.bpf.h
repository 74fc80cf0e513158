/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * continuity.bpf.h - path rules that keep protecting the path (issue 12, part 1).
 *
 * A rule compiled from `path = "/etc/shadow"` (AEGIS_RULE_PATH) keys the inode the path
 * named at apply time.  Tools replace files instead of editing them (passwd, sed -i,
 * perl -pi, dpkg/rpm unpack: write a new file, rename it over the path), which would leave
 * the rule on an inode that no longer has the name.  On lsm/inode_rename, when the
 * rename's target inode holds a path rule in a slot, the source inode gets the same rule
 * in that slot (flags |= AEGIS_RULE_INHERITED) before the rename happens: there is no
 * instant where the path names an unprotected inode.  The replaced inode keeps its own
 * entry (protected while it exists: today's semantics).
 *
 * The hook runs for every rename on the host (every process: dpkg is not in any scope),
 * never denies (it returns the previous LSM's answer) and costs one hash lookup per slot
 * when the target has no rule.  RENAME_EXCHANGE calls the hook twice, the second time
 * with the two dentries swapped (security_inode_rename() on 6.1 .. 7.x), so each side
 * inherits the other's rule.  What the kernel cannot see (delete + create such as
 * install(1), a replaced parent directory) is the agent's path watcher's
 * (aegis_stream/agent/pathwatch.py, aegis_stream/policy/continuity.py).
 *
 * An existing entry of the source inode wins: a file that already has a rule in the slot
 * keeps it, unless that entry is stale (its recorded i_generation is not the file's: a
 * deleted file's inode number reused, as ext4 does on every other `sed -i`).  The check is
 * a lookup, then BPF_ANY: in the 6.1 lab a BPF_NOEXIST insert followed by a BPF_EXIST
 * replace of the stale entry failed (counted inherit_failed), the lookup + BPF_ANY did not.
 * Inherited entries are the kernel's, not the generation's: the agent's read-back digests
 * skip them, and staging clears them with the slot.
 */
#ifndef AEGIS_CONTINUITY_BPF_H
#define AEGIS_CONTINUITY_BPF_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "aegis_abi.h"
#include "core_fixes.bpf.h" /* inode_dev() */

/* -DAEGIS_CONT_DEBUG: trace every inheritance decision (bpf_printk; lab debugging only) */
#ifdef AEGIS_CONT_DEBUG
#define CONT_DEBUG(fmt, ...) bpf_printk(fmt, ##__VA_ARGS__)
#else
#define CONT_DEBUG(fmt, ...) do { } while (0)
#endif

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, AEGIS_CONT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} aegis_continuity_counters SEC(".maps");

static __always_inline void count_continuity(__u32 ctr)
{
	bpf_map_percpu_inc(&aegis_continuity_counters, ctr);
}

/* the rename of old_dentry onto new_dentry: pass new_dentry's path rules to old_dentry */
static __always_inline void inherit_path_rules(struct dentry *old_dentry, struct dentry *new_dentry)
{
	struct aegis_inode_key tkey = {}, skey = {};
	struct inode *target, *source;
	struct aegis_rule *rule, *cur;
	struct aegis_rule inherited;
	__u32 slot;
	long err;

	target = new_dentry->d_inode;
	if (!target) /* a new name: nothing is replaced */
		return;
	tkey.ino = target->i_ino;
	tkey.dev = inode_dev(target); /* btrfs: the subvolume's (core_fixes.bpf.h) */
	for (slot = 0; slot < AEGIS_SLOTS; slot++) {
		tkey.slot = slot;
		rule = bpf_map_lookup_elem(&aegis_rules, &tkey);
		if (!rule || !(rule->flags & AEGIS_RULE_PATH))
			continue;
		/* a stale entry (the number reused by an unrelated file) is not this path's rule */
		if ((rule->flags & AEGIS_RULE_CHECK_GEN) && rule->i_generation != target->i_generation) {
			count_continuity(AEGIS_CONT_STALE_TARGET);
			CONT_DEBUG("aegis cont: stale target ino %llu slot %u", tkey.ino, slot);
			continue;
		}
		source = old_dentry->d_inode;
		if (!source)
			return;
		skey.ino = source->i_ino;
		skey.dev = inode_dev(source);
		skey.slot = slot;
		inherited.rule_id = rule->rule_id;
		inherited.actions = rule->actions;
		inherited.flags = rule->flags | AEGIS_RULE_INHERITED;
		inherited.i_generation = source->i_generation;
		/* a live entry of the source wins; a stale one (a deleted file's number that
		 * ext4 handed to this new file: both generations known and different) would
		 * leave the path's new file to another rule's actions or, checked by
		 * i_generation, to none: it is replaced */
		cur = bpf_map_lookup_elem(&aegis_rules, &skey);
		if (cur && (!cur->i_generation || !inherited.i_generation ||
			    cur->i_generation == inherited.i_generation)) {
			count_continuity(AEGIS_CONT_KEPT);
			CONT_DEBUG("aegis cont: kept ino %llu slot %u", skey.ino, slot);
			continue;
		}
		err = bpf_map_update_elem(&aegis_rules, &skey, &inherited, BPF_ANY);
		CONT_DEBUG("aegis cont: ino %llu slot %u update %ld", skey.ino, slot, err);
		if (!err) {
			count_continuity(AEGIS_CONT_INHERITED);
		} else { /* -E2BIG: the rule map is full; the watcher's restage still covers it */
			__u32 idx = AEGIS_CONT_LAST_ERRNO;
			__u64 *v = bpf_map_lookup_elem(&aegis_continuity_counters, &idx);

			count_continuity(AEGIS_CONT_INHERIT_FAILED);
			if (v)
				*v = -err;
		}
	}
}

#endif /* AEGIS_CONTINUITY_BPF_H */
