/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * aegis_abi.h - the one place where the kernel programs and the agent agree on
 * event and map layouts.  Plain fixed-width types only; every struct here is
 * checked against the compiled object's BTF by tests/test_abi_btf.py, and the
 * Python mirror lives in aegis_stream/kernel/abi.py.
 *
 * Bump AEGIS_ABI_VERSION on any layout change.  Fields are only ever appended.
 */
#ifndef AEGIS_ABI_H
#define AEGIS_ABI_H

#define AEGIS_ABI_VERSION 2 /* 2: event slot is __u16 + rule_flags */

/* Two rule generations ("slots") live in the kernel at once; a decision reads
 * the active slot once and then only that slot's rules, scopes and config. */
#define AEGIS_SLOTS 2
#define AEGIS_MAX_RULES 65536     /* per slot */
#define AEGIS_MAX_SCOPES 1024     /* per slot */
#define AEGIS_MAX_CGROUP_DEPTH 16 /* ancestors walked for hierarchical scope */

/* map sizes the agent relies on (aegis_stream/kernel/abi.py MAP_MAX_ENTRIES mirrors
 * every map's max_entries; tests/test_abi_btf.py compares them with the object) */
#define AEGIS_MAX_RULE_COUNTERS 16384         /* (generation, rule, hook) exact counters */
#define AEGIS_DENY_RING_BYTES (1 << 20)       /* deny ring: small, drained first */
#define AEGIS_AUDIT_RING_BYTES (4 << 20)      /* audit ring: telemetry, may overflow */
#define AEGIS_MAX_STORM_KEYS 16384            /* deny-storm keys (bpf/storm.bpf.h) */
#define AEGIS_MAX_CG_SCOPES 8192              /* (generation, cgroup) scope answers (5.10 build) */

enum aegis_hook {
	AEGIS_HOOK_FILE_OPEN = 0,
	AEGIS_HOOK_BPRM_CHECK = 1,
	AEGIS_HOOK_MMAP_FILE = 2,
	AEGIS_HOOK_FILE_MPROTECT = 3, /* PROT_EXEC added to a file mapping (GAP-MPROTECT) */
	AEGIS_HOOK_COUNT = 4,
};

enum aegis_decision {
	AEGIS_DECISION_ALLOW = 0,
	AEGIS_DECISION_DENY = 1,  /* enforce mode: -EPERM returned */
	AEGIS_DECISION_AUDIT = 2, /* audit mode: would deny, allowed */
};

enum aegis_mode {
	AEGIS_MODE_AUDIT = 0,
	AEGIS_MODE_ENFORCE = 1,
};

/* rule actions (bits) */
#define AEGIS_ACTION_OPEN (1U << 0)
#define AEGIS_ACTION_EXEC (1U << 1)

/* slot config flags */
#define AEGIS_SLOT_VALID (1U << 0)      /* slot holds a complete generation */
#define AEGIS_SLOT_SCOPE_HOST (1U << 1) /* no scope: every cgroup */

/* per-hook counters (per-CPU array index = hook * AEGIS_CTR_COUNT + ctr) */
enum aegis_counter {
	AEGIS_CTR_EVALUATED = 0,    /* hook ran with a valid active slot */
	AEGIS_CTR_RULE_MATCHED = 1, /* in scope, and inode + action matched a rule */
	AEGIS_CTR_SCOPE_MATCHED = 2,/* the task was in scope (checked before the rule) */
	AEGIS_CTR_DENIED = 3,
	AEGIS_CTR_AUDITED = 4,
	AEGIS_CTR_RINGBUF_FAIL = 5, /* event reserve failed (decision still made) */
	AEGIS_CTR_NO_POLICY = 6,    /* no valid active slot: allowed */
	AEGIS_CTR_STALE = 7,        /* (dev, ino) matched but i_generation differs: a miss */
	AEGIS_CTR_SUPPRESSED = 8,   /* event folded into a deny-storm summary (decision made) */
	AEGIS_CTR_COUNT = 9,
};

struct aegis_inode_key {
	__u64 ino;
	__u32 dev;  /* kernel encoding: MAJOR << 20 | MINOR (sb->s_dev) */
	__u32 slot;
};

/* rule flags */
#define AEGIS_RULE_CHECK_GEN (1U << 0) /* i_generation must match (GAP-INO-REUSE) */
#define AEGIS_RULE_INHERITED (1U << 1) /* inherited by rename onto a path rule's path */
#define AEGIS_RULE_PATH (1U << 2)      /* compiled from a path: a rename onto it passes it on */

/* path continuity counters (aegis_continuity_counters, per-CPU array; bpf/continuity.bpf.h) */
enum aegis_continuity_counter {
	AEGIS_CONT_INHERITED = 0,      /* a renamed-over path rule passed to the new inode */
	AEGIS_CONT_INHERIT_FAILED = 1, /* insert failed (rule map full): the path is unprotected */
	AEGIS_CONT_KEPT = 2,           /* the source already had a rule in the slot: it wins */
	AEGIS_CONT_STALE_TARGET = 3,   /* the target's entry is stale (i_generation): not passed on */
	AEGIS_CONT_LAST_ERRNO = 4,     /* not a count: the errno of this CPU's last failed insert */
	AEGIS_CONT_COUNT = 5,
};

struct aegis_rule {
	__u32 rule_id;  /* index into the compiled policy's rule table */
	__u32 actions;  /* AEGIS_ACTION_* */
	__u32 flags;    /* AEGIS_RULE_* */
	__u32 i_generation; /* checked when AEGIS_RULE_CHECK_GEN */
};

struct aegis_scope_key {
	__u64 cgroup_id; /* cgroup v2 id (the cgroup directory's inode number) */
	__u32 slot;
	__u32 _pad;
};

/* aegis_cg_scopes (the no-task-storage build's scope cache): the scope answer of one
 * cgroup under one generation; the value is match_scope()'s __s64 (-1: out of scope) */
struct aegis_cg_scope_key {
	__u64 generation;
	__u64 cgroup_id;
};

struct aegis_scope {
	__u32 scope_id;
	__u32 _pad;
};

/* config map: index 0 = struct aegis_control, index 1 + slot = aegis_slot_config */
struct aegis_control {
	__u32 active_slot; /* the single word whose write activates a generation */
	__u32 _pad;
	__u64 storm_window_ns; /* deny-storm aggregation window (bpf/storm.bpf.h); 0 = off */
};

struct aegis_slot_config {
	__u64 generation; /* monotonic policy generation */
	__u32 mode;       /* enum aegis_mode */
	__u32 flags;      /* AEGIS_SLOT_* */
	__u32 rule_count;
	__u32 scope_count;
};

/* per-rule exact counters: kept apart from events so totals stay exact */
struct aegis_rule_counter_key {
	__u64 generation;
	__u32 rule_id;
	__u32 hook;
};

struct aegis_rule_counter {
	__u64 denied;
	__u64 audited;
};

/* one decision record on a ring buffer; 96 bytes */
struct aegis_event {
	__u16 abi_version;
	__u8 hook;      /* enum aegis_hook */
	__u8 decision;  /* enum aegis_decision */
	__u32 rule_id;
	__u64 generation;
	__u64 ktime_ns;
	__u64 cgroup_id;       /* the task's own cgroup */
	__u64 scope_cgroup_id; /* the selected cgroup that matched (0: host scope) */
	__u64 ino;
	__u32 dev;      /* kernel encoding */
	__u32 action;   /* AEGIS_ACTION_* that was evaluated */
	__u32 pid;      /* thread id */
	__u32 tgid;     /* process id */
	__u32 uid;
	__u32 gid;
	__u32 mode;     /* enum aegis_mode of the deciding slot */
	__u16 slot;
	__u16 rule_flags; /* the deciding rule's AEGIS_RULE_* (INHERITED: by rename) */
	char comm[16];
};

/*
 * Deny storms (bpf/storm.bpf.h): the first deny/audit of a key is an event; repeats
 * within storm_window_ns are counted in the key's value instead (the agent reports them
 * in aegis.storm.v1 summaries).  The kernel only adds to `suppressed`; the agent keeps
 * what it reported in aegis_storm_reported (pinned: survives agent restarts).
 */
struct aegis_storm_key {
	__u64 generation;
	__u64 cgroup_id; /* the task's own cgroup */
	__u32 rule_id;
	__u32 hook;
	__u32 tgid;
	__u32 decision;  /* enum aegis_decision: a generation's mode can be changed in place */
};

struct aegis_storm {
	__u64 first_ns;   /* when the kernel inserted the key (its identity across deletes) */
	__u64 window_ns;  /* start of the current window (its first decision was an event) */
	__u64 suppressed; /* decisions folded into summaries, cumulative (atomic add) */
};

struct aegis_storm_reported {
	__u64 first_ns;   /* the aegis_storm it belongs to (first_ns differs: a new key) */
	__u64 reported;   /* suppressed count already reported */
};

/* aegis_storm_stats (per-CPU array): suppressed and untracked decisions per class */
enum aegis_storm_stat {
	AEGIS_STORM_SUPPRESSED_DENY = 0,
	AEGIS_STORM_SUPPRESSED_AUDIT = 1,
	AEGIS_STORM_UNTRACKED_DENY = 2,  /* storm map full: an event, not aggregated */
	AEGIS_STORM_UNTRACKED_AUDIT = 3,
	AEGIS_STORM_STAT_COUNT = 4,
};

/* .rodata.btrfs, set by the loader before load where CO-RE cannot see btrfs's BTF
 * (bpf/core_fixes.bpf.h, aegis_stream/kernel/btrfs_layout.py) */
struct aegis_btrfs_layout {
	__u32 known;     /* 0: no offsets (btrfs inodes keep s_dev) */
	__u32 vfs_inode; /* offsetof(struct btrfs_inode, vfs_inode) */
	__u32 root;      /* offsetof(struct btrfs_inode, root) */
	__u32 anon_dev;  /* offsetof(struct btrfs_root, anon_dev) */
};

#endif /* AEGIS_ABI_H */
