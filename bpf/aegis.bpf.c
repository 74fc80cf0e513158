// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * aegis.bpf.c - inode-first deny of file open and exec on selected cgroups.
 *
 * Decision order (cheapest first: a task outside every selected cgroup pays two array
 * lookups, one task-storage lookup and no rule lookup; docs/PERFORMANCE.md):
 *   1. read the control word -> active slot; no valid slot => allow (counted)
 *   2. scope: host-wide slot, or the task's cgroup / any ancestor in the scope map,
 *      answered from a per-task cache keyed by (generation, slot, cgroup id)
 *   3. (dev, ino, slot) lookup in the rule map; miss => allow
 *   4. action bit check (open vs exec)
 *   5. enforce => -EPERM, audit => 0; either way one event + exact rule counter.
 * A full ring buffer never changes a decision: the reserve failure is counted.
 * Kernel structs are read with direct (BTF, CO-RE relocated) loads: the LSM hook's
 * arguments are trusted pointers, and a bpf_probe_read_kernel call per field cost
 * ~60% of the in-program instructions on the allow path.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "aegis_abi.h"
#include "maps.bpf.h"
#include "core_fixes.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define EPERM 1
#define PROT_EXEC 0x4
#define VM_EXEC 0x4 /* include/linux/mm.h, the same on every kernel */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AEGIS_MAX_RULES * AEGIS_SLOTS);
	__type(key, struct aegis_inode_key);
	__type(value, struct aegis_rule);
} aegis_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AEGIS_MAX_SCOPES * AEGIS_SLOTS);
	__type(key, struct aegis_scope_key);
	__type(value, struct aegis_scope);
} aegis_scopes SEC(".maps");

/* index 0: struct aegis_control (padded to slot config size); 1 + slot: slot config */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1 + AEGIS_SLOTS);
	__type(key, __u32);
	__type(value, struct aegis_slot_config);
} aegis_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, AEGIS_HOOK_COUNT * AEGIS_CTR_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} aegis_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, AEGIS_MAX_RULE_COUNTERS);
	__type(key, struct aegis_rule_counter_key);
	__type(value, struct aegis_rule_counter);
} aegis_rule_counters SEC(".maps");

/* denies: small priority ring; audits: telemetry ring that may overflow */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, AEGIS_DENY_RING_BYTES);
} aegis_deny_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, AEGIS_AUDIT_RING_BYTES);
} aegis_audit_events SEC(".maps");

/* keep the shared types in BTF so the ABI check can compare them */
const struct aegis_event *unused_event __attribute__((unused));
const struct aegis_control *unused_control __attribute__((unused));

/* per-CPU atomic increments (bpf/maps.bpf.h percpu_inc: why not `+= 1`) */
static __always_inline void count(__u32 hook, __u32 ctr)
{
	bpf_map_percpu_inc(&aegis_counters, hook * AEGIS_CTR_COUNT + ctr);
}

static __always_inline void count_rule(__u64 gen, __u32 rule_id, __u32 hook, bool denied)
{
	struct aegis_rule_counter_key k = { .generation = gen, .rule_id = rule_id, .hook = hook };
	struct aegis_rule_counter *c;

	c = bpf_map_lookup_or_try_init_zero(&aegis_rule_counters, &k, struct aegis_rule_counter);
	if (!c)
		return; /* table full: the per-hook DENIED/AUDITED totals still count it */
	if (denied)
		percpu_inc(&c->denied);
	else
		percpu_inc(&c->audited);
}

/* returns the matching selected cgroup id, 0 for host scope, -1 when out of scope */
static __always_inline __s64 match_scope(const struct aegis_slot_config *sc, __u32 slot)
{
	struct aegis_scope_key k = { .slot = slot };
	int level;
#ifdef AEGIS_NO_TASK_STORAGE
	struct cgroup___v510 *cg;
	int own;
#endif

	if (sc->flags & AEGIS_SLOT_SCOPE_HOST)
		return 0;
#ifdef AEGIS_NO_TASK_STORAGE
	cg = current_dfl_cgroup();
	own = cg ? BPF_CORE_READ(cg, level) : 0;
#endif
	/* the task's cgroup or any ancestor; level 0 is the root cgroup */
	for (level = 1; level <= AEGIS_MAX_CGROUP_DEPTH; level++) {
#ifdef AEGIS_NO_TASK_STORAGE
		__u64 id = ancestor_cgroup_id_v510(cg, own, level);
#else
		__u64 id = bpf_get_current_ancestor_cgroup_id(level);
#endif

		if (!id)
			break;
		k.cgroup_id = id;
		if (bpf_map_lookup_elem(&aegis_scopes, &k))
			return (__s64)id;
	}
	return -1;
}

/*
 * Per cgroup: the scope answer of (generation, cgroup id), for the no-task-storage build.
 * Declared in both builds so that every build pins the same maps (the task-storage build
 * never touches it: an empty BPF_F_NO_PREALLOC hash holds no memory).  An entry is
 * inserted once (BPF_NOEXIST) and never updated, and BPF_F_NO_PREALLOC frees a deleted
 * element only after an RCU grace period, so a program (which runs under rcu_read_lock)
 * always reads a whole value; a preallocated or LRU hash would recycle an element at once,
 * under a reader on another CPU.  Userspace deletes the keys of retired generations when it
 * stages (aegis_stream/kernel/slots.py); a full map only means the walk, as before.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, AEGIS_MAX_CG_SCOPES);
	__type(key, struct aegis_cg_scope_key);
	__type(value, __s64);
} aegis_cg_scopes SEC(".maps");

#ifdef AEGIS_NO_TASK_STORAGE
/*
 * The no-task-storage build (Linux 5.10, e.g. Debian 11, Amazon Linux 2): task local
 * storage (BPF_MAP_TYPE_TASK_STORAGE) and bpf_get_current_task_btf() both arrived in
 * v5.11 ("bpf: Implement task local storage", "bpf: Add bpf_get_current_task_btf
 * helper").  Without them the ancestor walk cost ~1,300 instructions per decision at
 * cgroup depth 4 (docs/PERFORMANCE.md), so the answer is cached per cgroup instead: a
 * generation's scope set never changes once it is active and a cgroup id is never reused
 * within a boot, so a hit is exactly what match_scope() would return (the task cache's
 * argument).  Keyed by cgroup, not by CPU: tasks of different cgroups interleaving on a
 * CPU do not thrash it, and no per-CPU entry can be torn by a preempted writer.  The agent
 * picks this build by a feature probe at load (aegis_stream/kernel/builds.py); `aegis
 * doctor` says which build runs.
 */
static __always_inline __s64 cached_scope(const struct aegis_slot_config *sc, __u32 slot)
{
	struct aegis_cg_scope_key k = { .generation = sc->generation };
	struct cgroup___v510 *cg;
	__s64 *hit, s;
	int own;

	if (sc->flags & AEGIS_SLOT_SCOPE_HOST)
		return 0;
	cg = current_dfl_cgroup();
	own = cg ? BPF_CORE_READ(cg, level) : 0;
	k.cgroup_id = ancestor_cgroup_id_v510(cg, own, own); /* the cgroup's own id; 0: none */
	hit = k.cgroup_id ? bpf_map_lookup_elem(&aegis_cg_scopes, &k) : 0;
	if (hit)
		return *hit;
	s = match_scope(sc, slot); /* one inlined walk: the verifier sees it once */
	if (k.cgroup_id)
		bpf_map_update_elem(&aegis_cg_scopes, &k, &s, BPF_NOEXIST);
	return s;
}
#else
/*
 * Per task: the scope answer for (generation, slot, cgroup id), recomputed when any of
 * them changes.  A generation's scope set never changes once it is active (staging only
 * writes the inactive slot, and a restaged slot gets a new generation), and a cgroup id
 * is never reused within a boot, so a hit is exactly what match_scope() would return.
 * An allocation failure (GFP_ATOMIC) just means no cache: match_scope() every time.
 */
struct aegis_scope_cache {
	__u64 generation;
	__u64 cgroup_id;
	__s64 scope; /* match_scope() result: -1 out of scope */
	__u32 slot;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct aegis_scope_cache);
} aegis_scope_cache SEC(".maps");

#include "bench_variants.bpf.h" /* bench-only -D knobs (issue 15); the shipped build: none */

static __always_inline __s64 task_cached_scope(const struct aegis_slot_config *sc, __u32 slot,
					       __u64 cg)
{
	struct aegis_scope_cache *c;
	__s64 s;

	c = bpf_task_storage_get(&aegis_scope_cache, bpf_get_current_task_btf(), 0,
				 BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (c && c->generation == sc->generation && c->slot == slot && c->cgroup_id == cg)
		return c->scope;
	s = match_scope(sc, slot);
	if (c) {
		c->generation = sc->generation;
		c->slot = slot;
		c->cgroup_id = cg;
		c->scope = s;
	}
	return s;
}

static __always_inline __s64 cached_scope(const struct aegis_slot_config *sc, __u32 slot)
{
	__u64 cg;

	if (sc->flags & AEGIS_SLOT_SCOPE_HOST)
		return 0;
	BENCH_SCOPE_NOCACHE(sc, slot);
	cg = current_cgroup_id();
	BENCH_SCOPE_ID_ONLY(sc, cg);
	BENCH_CG_SCOPES(sc, slot, cg);
	BENCH_PERCPU_CACHE(sc, slot, cg);
	return task_cached_scope(sc, slot, cg);
}
#endif /* AEGIS_NO_TASK_STORAGE */

#include "continuity.bpf.h" /* after aegis_rules: it inserts into it */

/* the active slot's config, or NULL (no valid slot: counted, allow) */
static __always_inline struct aegis_slot_config *active(__u32 hook, __u32 *slot)
{
	struct aegis_slot_config *ctl, *sc;
	__u32 zero = 0, idx;

	ctl = bpf_map_lookup_elem(&aegis_config, &zero);
	if (!ctl)
		return 0;
	/* control word lives in the first 4 bytes of entry 0 (struct aegis_control) */
	*slot = ((struct aegis_control *)ctl)->active_slot & 1;
	idx = *slot + 1;
	sc = bpf_map_lookup_elem(&aegis_config, &idx);
	if (!sc || !(sc->flags & AEGIS_SLOT_VALID)) {
		count(hook, AEGIS_CTR_NO_POLICY);
		return 0;
	}
	return sc;
}

#include "storm.bpf.h" /* after aegis_config and count(): it uses both */

/* the scope answer, counted: < 0 outside every selected cgroup.  Asked before anything is
 * read from the inode: most tasks on a host are outside every selected cgroup, and their
 * path should not pay for the key's loads (the btrfs check, i_generation) */
static __always_inline __s64 in_scope(__u32 hook, const struct aegis_slot_config *sc, __u32 slot)
{
	__s64 scope;

#ifndef AEGIS_BENCH_NO_EVAL_COUNT /* bench variant only: what the per-CPU increment costs */
	count(hook, AEGIS_CTR_EVALUATED);
#endif
	scope = cached_scope(sc, slot);
	if (scope >= 0)
		count(hook, AEGIS_CTR_SCOPE_MATCHED);
	return scope;
}

/* the decision on the inode (ino, dev, i_generation) for a task in scope: dev is the key's
 * device (the superblock's s_dev; a btrfs inode's subvolume device: inode_dev()) */
static __always_inline int decide_id(__u64 ino, __u32 dev, __u32 igen, __u32 hook, __u32 action,
				     const struct aegis_slot_config *sc, __u32 slot, __s64 scope)
{
	struct aegis_inode_key key = {};
	struct aegis_rule *rule;
	struct aegis_event *e;
	bool enforce;

	key.slot = slot;
	key.ino = ino;
	key.dev = dev;
	rule = bpf_map_lookup_elem(&aegis_rules, &key);
	if (!rule)
		return 0;
	/* (dev, ino) reused by a new file since apply (GAP-INO-REUSE): not the rule's inode */
	if ((rule->flags & AEGIS_RULE_CHECK_GEN) && rule->i_generation != igen) {
		count(hook, AEGIS_CTR_STALE);
		return 0;
	}
	if (!(rule->actions & action))
		return 0;
	count(hook, AEGIS_CTR_RULE_MATCHED);

	enforce = sc->mode == AEGIS_MODE_ENFORCE;
	count(hook, enforce ? AEGIS_CTR_DENIED : AEGIS_CTR_AUDITED);
	count_rule(sc->generation, rule->rule_id, hook, enforce);
	/* a repeat within its key's storm window: counted, no event (bpf/storm.bpf.h) */
	if (storm_suppress(sc->generation, rule->rule_id, hook, enforce))
		return enforce ? -EPERM : 0;

	if (enforce)
		e = bpf_ringbuf_reserve(&aegis_deny_events, sizeof(*e), 0);
	else
		e = bpf_ringbuf_reserve(&aegis_audit_events, sizeof(*e), 0);
	if (!e) {
		count(hook, AEGIS_CTR_RINGBUF_FAIL);
	} else {
		__u64 pid_tgid = bpf_get_current_pid_tgid();
		__u64 uid_gid = bpf_get_current_uid_gid();

		e->abi_version = AEGIS_ABI_VERSION;
		e->hook = hook;
		e->decision = enforce ? AEGIS_DECISION_DENY : AEGIS_DECISION_AUDIT;
		e->rule_id = rule->rule_id;
		e->generation = sc->generation;
		e->ktime_ns = bpf_ktime_get_ns();
		e->cgroup_id = bpf_get_current_cgroup_id();
		e->scope_cgroup_id = (__u64)scope;
		e->ino = key.ino;
		e->dev = key.dev;
		e->action = action;
		e->pid = (__u32)pid_tgid;
		e->tgid = pid_tgid >> 32;
		e->uid = (__u32)uid_gid;
		e->gid = uid_gid >> 32;
		e->mode = sc->mode;
		e->slot = key.slot;
		e->rule_flags = rule->flags;
		bpf_get_current_comm(e->comm, sizeof(e->comm));
		bpf_ringbuf_submit(e, 0);
	}
	return enforce ? -EPERM : 0;
}

static __always_inline int decide(struct inode *inode, __u32 hook, __u32 action,
				  const struct aegis_slot_config *sc, __u32 slot)
{
	__s64 scope;

	if (!inode)
		return 0;
	scope = in_scope(hook, sc, slot);
	if (scope < 0)
		return 0;
	return decide_id(inode->i_ino, inode_dev(inode), inode->i_generation, hook, action, sc,
			 slot, scope);
}

/* the same for an inode reached through a plain (untrusted) pointer: probe reads */
static __always_inline int decide_untrusted(struct inode *inode, __u32 hook, __u32 action,
					    const struct aegis_slot_config *sc, __u32 slot)
{
	__u32 dev = 0;
	__s64 scope;

	if (!inode)
		return 0;
	scope = in_scope(hook, sc, slot);
	if (scope < 0)
		return 0;
	if (BPF_CORE_READ(inode, i_sb, s_magic) == BTRFS_SUPER_MAGIC)
		dev = btrfs_subvol_dev(inode);
	if (!dev)
		dev = BPF_CORE_READ(inode, i_sb, s_dev);
	return decide_id(BPF_CORE_READ(inode, i_ino), dev, BPF_CORE_READ(inode, i_generation), hook,
			 action, sc, slot, scope);
}

/*
 * Test fixtures (tests/kernel/Makefile builds them; the shipped object has none):
 *   -DAEGIS_SEC_<PROG>='"lsm/no_such_hook"'  hook missing in the kernel: load fails
 *   -DAEGIS_BREAK_VERIFIER=<hook>            unchecked map value: the verifier rejects
 *   -DAEGIS_BREAK_CORE=<hook>                a field no kernel has: CO-RE relocation fails
 */
#ifndef AEGIS_SEC_FILE_OPEN
#define AEGIS_SEC_FILE_OPEN "lsm/file_open"
#endif
#ifndef AEGIS_SEC_BPRM_CHECK
#define AEGIS_SEC_BPRM_CHECK "lsm/bprm_check_security"
#endif
#ifndef AEGIS_SEC_MMAP_FILE
#define AEGIS_SEC_MMAP_FILE "lsm/mmap_file"
#endif
#ifndef AEGIS_SEC_FILE_MPROTECT
#define AEGIS_SEC_FILE_MPROTECT "lsm/file_mprotect"
#endif
#ifndef AEGIS_SEC_INODE_RENAME
#define AEGIS_SEC_INODE_RENAME "lsm/inode_rename"
#endif
#if defined(AEGIS_BREAK_VERIFIER) || defined(AEGIS_BREAK_CORE)
struct inode___aegis_fixture {
	long aegis_no_such_field;
} __attribute__((preserve_access_index));

static __always_inline int broken(__u32 hook, struct inode *inode)
{
#ifdef AEGIS_BREAK_VERIFIER
	if (hook == AEGIS_BREAK_VERIFIER) {
		__u32 idx = 0;
		__u64 *v = bpf_map_lookup_elem(&aegis_counters, &idx);

		return (int)*v; /* no NULL check: "invalid mem access 'map_value_or_null'" */
	}
#endif
#ifdef AEGIS_BREAK_CORE
	if (hook == AEGIS_BREAK_CORE)
		return (int)BPF_CORE_READ((struct inode___aegis_fixture *)inode, aegis_no_such_field);
#endif
	return 0;
}
#define FIXTURE(hook, inode) do { int __b = broken(hook, inode); if (__b) return __b; } while (0)
#else
#define FIXTURE(hook, inode) do { } while (0)
#endif

SEC(AEGIS_SEC_FILE_OPEN)
int BPF_PROG(aegis_file_open, struct file *file, int ret)
{
	struct aegis_slot_config *sc;
	__u32 slot, action;

	FIXTURE(AEGIS_HOOK_FILE_OPEN, file->f_inode);
	if (ret)
		return ret;
	sc = active(AEGIS_HOOK_FILE_OPEN, &slot);
	if (!sc)
		return 0;
	/* opens made by execve/uselib (FMODE_EXEC) are exec decisions, taken in
	 * bprm_check_security (and, in audit mode, also in mmap_file for the loader's
	 * mapping: docs/POLICY_SEMANTICS.md), not open decisions */
	action = AEGIS_ACTION_OPEN;
	if (exec_open(file)) {
		/* ... except a stacking filesystem's open of the backing file behind the exec'd
		 * one: the only decision on the real inode of an exec through an overlay
		 * (GAP-OVL-EXEC; bpf/core_fixes.bpf.h backing_open) */
		if (!backing_open(file))
			return 0;
		action = AEGIS_ACTION_EXEC;
	}
	/* one decide() call site: the verifier walks it once */
	return decide(file->f_inode, AEGIS_HOOK_FILE_OPEN, action, sc, slot);
}

SEC(AEGIS_SEC_BPRM_CHECK)
int BPF_PROG(aegis_bprm_check, struct linux_binprm *bprm, int ret)
{
	struct aegis_slot_config *sc;
	__u32 slot;

	FIXTURE(AEGIS_HOOK_BPRM_CHECK, bprm->file->f_inode);
	if (ret)
		return ret;
	sc = active(AEGIS_HOOK_BPRM_CHECK, &slot);
	if (!sc)
		return 0;
	/* called once per binfmt stage: the script, then its interpreter */
	return decide(bprm->file->f_inode, AEGIS_HOOK_BPRM_CHECK, AEGIS_ACTION_EXEC, sc, slot);
}

SEC(AEGIS_SEC_MMAP_FILE)
int BPF_PROG(aegis_mmap_file, struct file *file, unsigned long reqprot, unsigned long prot,
	     unsigned long flags, int ret)
{
	struct aegis_slot_config *sc;
	struct file *real;
	__u32 slot;
	int err;

	FIXTURE(AEGIS_HOOK_MMAP_FILE, file ? file->f_inode : 0);
	if (ret)
		return ret;
	/* PROT_EXEC file mappings: ld.so ./binary, dlopen of a denied library */
	if (!file || !(prot & PROT_EXEC))
		return 0;
	sc = active(AEGIS_HOOK_MMAP_FILE, &slot);
	if (!sc)
		return 0;
	/* an overlayfs file maps its real file, which no hook sees (GAP-OVL-EXEC: ld.so
	 * /merged/bin): decide on the real inode too; a rule on either denies */
	real = overlay_real_file(file);
	if (real) {
		err = decide_untrusted(BPF_CORE_READ(real, f_inode), AEGIS_HOOK_MMAP_FILE,
				       AEGIS_ACTION_EXEC, sc, slot);
		if (err)
			return err;
	}
	return decide(file->f_inode, AEGIS_HOOK_MMAP_FILE, AEGIS_ACTION_EXEC, sc, slot);
}

SEC(AEGIS_SEC_FILE_MPROTECT)
int BPF_PROG(aegis_file_mprotect, struct vm_area_struct *vma, unsigned long reqprot,
	     unsigned long prot, int ret)
{
	struct aegis_slot_config *sc;
	struct file *file;
	__u32 slot;

	file = vma->vm_file;
	FIXTURE(AEGIS_HOOK_FILE_MPROTECT, file ? file->f_inode : 0);
	if (ret)
		return ret;
	/* mmap(PROT_READ) then mprotect(PROT_EXEC) of a file mapping never reaches mmap_file
	 * (GAP-MPROTECT); a mapping already executable was decided when it became so */
	if (!file || !(prot & PROT_EXEC) || (vma->vm_flags & VM_EXEC))
		return 0;
	sc = active(AEGIS_HOOK_FILE_MPROTECT, &slot);
	if (!sc)
		return 0;
	return decide(file->f_inode, AEGIS_HOOK_FILE_MPROTECT, AEGIS_ACTION_EXEC, sc, slot);
}

/* path continuity (bpf/continuity.bpf.h): not a decision hook, never denies */
SEC(AEGIS_SEC_INODE_RENAME)
int BPF_PROG(aegis_inode_rename, struct inode *old_dir, struct dentry *old_dentry,
	     struct inode *new_dir, struct dentry *new_dentry, int ret)
{
	if (ret) /* another LSM refused the rename: nothing moves */
		return ret;
	inherit_path_rules(old_dentry, new_dentry);
	return 0;
}
