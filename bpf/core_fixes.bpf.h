/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * core_fixes.bpf.h - differences between kernel versions that the programs handle, one
 * shim each, naming the kernels it covers (after libbpf-tools' core_fixes.bpf.h).
 * The object is built once against bpf/vmlinux.h and loads on every lab kernel
 * (6.1, 6.12, 7.x); a shim here is how one program copes with all of them.
 */
#ifndef AEGIS_CORE_FIXES_BPF_H
#define AEGIS_CORE_FIXES_BPF_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

/* not in vmlinux.h: both are preprocessor defines in include/linux/fs.h and fcntl.h */
#define FMODE_EXEC 0x20   /* f_mode bit on kernels that set it at open */
#define __FMODE_EXEC 0x20 /* f_flags bit do_open_execat() passes (6.1 sets only this) */

/*
 * Is this open execve's (or uselib's) own open of the binary?
 *   v6.1 (lab 6.1.0-57): only __FMODE_EXEC, in file->f_flags (do_open_execat's open_flag);
 *   newer kernels: FMODE_EXEC in file->f_mode as well (docs/REFERENCE_ENFORCEMENT_SLICE.md).
 * Either marker is taken, so one object answers the same on every lab kernel.  The
 * upstream commit that started setting the f_mode bit is not pinned here; the kernel
 * suite's exec tests (test_exec_*, OPEN-008) check the behaviour on each lab kernel.
 */
static __always_inline bool exec_open(struct file *file)
{
	return (file->f_flags & __FMODE_EXEC) || (file->f_mode & FMODE_EXEC);
}

/*
 * Is this an in-kernel open of a *backing* file on behalf of a stacking filesystem
 * (overlayfs opening the lower/upper file behind the file the user opened; FUSE
 * passthrough on kernels that have it)?  GAP-OVL-EXEC: execve of /merged/bin opens the
 * overlay file (decided in bprm_check on the overlay inode), and the overlay opens the
 * real file with the same f_flags, so __FMODE_EXEC as well.  That open is the only hook
 * that sees the real inode during the exec, so aegis_file_open decides it as an exec.
 *   v6.1:  open_with_fake_path() -> alloc_empty_file_noaccount(): f_mode FMODE_NOACCOUNT;
 *   v6.6+: backing_file_open() -> alloc_empty_backing_file(): FMODE_BACKING | FMODE_NOACCOUNT
 *          ("fs: use backing_file container for internal files with fake f_path").
 * FMODE_BACKING moved (bit 25 until v6.13, bit 24 since v6.14's fsnotify HSM series:
 * "fsnotify: use accessor to set FMODE_NONOTIFY_*"); FMODE_NOACCOUNT is bit 29 on every
 * kernel from v4.19 to 7.x, so it is the one marker read here (no CO-RE choice needed).
 * The only other NOACCOUNT opens (cachefiles) never carry an exec intent.  The kernel
 * suite proves it per lab kernel: MNT-025, MNT-031..033.
 */
#define FMODE_NOACCOUNT 0x20000000

static __always_inline bool backing_open(struct file *file)
{
	return file->f_mode & FMODE_NOACCOUNT;
}

#define S_IFMT 00170000
#define S_IFREG 0100000
#define OVERLAYFS_SUPER_MAGIC 0x794c7630
#define BTRFS_SUPER_MAGIC 0x9123683E

/*
 * btrfs (GAP-BTRFS-SUBVOL): every subvolume and snapshot of one filesystem shares the
 * superblock (one s_dev) and numbers its inodes on its own (the first file of each is
 * 257), so (s_dev, ino) names one file per subvolume.  A btrfs inode is keyed by its
 * subvolume's anonymous device instead, BTRFS_I(inode)->root->anon_dev: what stat(2)
 * reports as st_dev (btrfs_getattr) and what the compiler keys btrfs rules by.
 * struct btrfs_inode / btrfs_root live in the btrfs module's BTF (6.1, 6.12, 7.x: same
 * member names); libbpf relocates against it when btrfs is loaded at program load.
 * Where libbpf cannot see that BTF (Linux 5.10 has no module BTF; the hardened unit
 * lacks the CAP_SYS_ADMIN libbpf needs to walk module BTF) the agent fills
 * aegis_btrfs_layout before load with the three offsets, read from /sys/kernel/btf/btrfs
 * or looked up by the running btrfs.ko's GNU build ID in the table that
 * scripts/btrfs-layout makes from Debian's -dbg package
 * (aegis_stream/kernel/btrfs_layout.py).  It is read-only data: the verifier knows it
 * and drops the branch not taken.  With neither (btrfs loaded after the programs, an
 * unknown build) btrfs inodes keep s_dev: the compiler also writes that key for every
 * btrfs rule (kernel/slots.py), so the rule still matches (the old, fail-closed
 * collision), and `aegis doctor` says so.
 */
const volatile struct aegis_btrfs_layout aegis_btrfs_layout SEC(".rodata.btrfs") = {};

struct btrfs_root___aegis {
	dev_t anon_dev;
} __attribute__((preserve_access_index));

struct btrfs_inode___aegis {
	struct btrfs_root___aegis *root;
	struct inode vfs_inode;
} __attribute__((preserve_access_index));

/* the subvolume's anon_dev of the btrfs inode at address inode; 0 when unknown */
static __always_inline __u32 btrfs_subvol_dev(const void *inode)
{
	unsigned long vfs_inode, root_off, anon_dev;
	void *root = 0;
	__u32 dev = 0;

	if (bpf_core_type_exists(struct btrfs_inode___aegis)) {
		vfs_inode = bpf_core_field_offset(struct btrfs_inode___aegis, vfs_inode);
		root_off = bpf_core_field_offset(struct btrfs_inode___aegis, root);
		anon_dev = bpf_core_field_offset(struct btrfs_root___aegis, anon_dev);
	} else if (aegis_btrfs_layout.known) {
		vfs_inode = aegis_btrfs_layout.vfs_inode;
		root_off = aegis_btrfs_layout.root;
		anon_dev = aegis_btrfs_layout.anon_dev;
	} else {
		return 0;
	}
	if (bpf_probe_read_kernel(&root, sizeof(root),
				  (void *)((unsigned long)inode - vfs_inode + root_off)))
		return 0;
	if (!root)
		return 0;
	bpf_probe_read_kernel(&dev, sizeof(dev), root + anon_dev);
	return dev;
}

/* the rule key's device of an inode a hook was handed (a trusted pointer): s_dev, or a
 * btrfs inode's subvolume device (every rule-map key is made with it: decide(), the
 * rename inheritance of bpf/continuity.bpf.h) */
static __always_inline __u32 inode_dev(struct inode *inode)
{
	struct super_block *sb = inode->i_sb;
	__u32 dev;

	if (sb->s_magic == BTRFS_SUPER_MAGIC) {
		dev = btrfs_subvol_dev(inode);
		if (dev)
			return dev;
	}
	return sb->s_dev;
}

/*
 * The file an overlayfs regular file maps (GAP-OVL-EXEC, ld.so /merged/bin): ovl_mmap()
 * swaps vma->vm_file for the real file and calls no LSM hook for it, so mmap_file only
 * ever sees the overlay file.  ovl_open() keeps the real file in file->private_data:
 *   v6.1 .. v6.12: private_data is the real struct file * itself;
 *   v6.13+: a struct ovl_file { struct file *realfile; struct file *upperfile; }
 *           ("ovl: allocate a container struct ovl_file for ovl private context").
 * struct ovl_file is in the overlay module's BTF, which need not be loaded when the
 * programs load (the first overlay mount loads it), so the layout is chosen by kernel
 * version (libbpf's LINUX_KERNEL_VERSION); MNT-033 checks it on 6.1, 6.12 and 7.x.
 * NULL: not an overlayfs regular file, or nothing readable.
 */
extern __u32 LINUX_KERNEL_VERSION __kconfig;

static __always_inline struct file *overlay_real_file(struct file *file)
{
	struct inode *inode = file->f_inode;
	struct file *real = 0;

	if (inode->i_sb->s_magic != OVERLAYFS_SUPER_MAGIC || (inode->i_mode & S_IFMT) != S_IFREG)
		return 0;
	if (LINUX_KERNEL_VERSION < KERNEL_VERSION(6, 13, 0))
		return (struct file *)file->private_data;
	if (!file->private_data ||
	    bpf_probe_read_kernel(&real, sizeof(real), file->private_data))
		return 0;
	return real;
}

#ifdef AEGIS_NO_TASK_STORAGE
/*
 * The no-task-storage build (Linux 5.10): LSM programs there may not call
 * bpf_get_current_ancestor_cgroup_id() (tracing and LSM programs got it in 2021 with
 * "bpf: Allow bpf_get_current_ancestor_cgroup_id for tracing"; the 5.10 verifier says
 * "unknown func bpf_get_current_ancestor_cgroup_id#123", measured in the lab), nor
 * bpf_get_current_task_btf() (v5.11).  So read what that helper reads: the task's default
 * cgroup and its ancestor_ids[level] (cgroup ids, level 0 = root), a flexible array that
 * v6.0 replaced by ancestors[] ("cgroup: Replace cgroup->ancestor_ids[] with
 * ->ancestors[]"); this build only runs where the probe found no task storage (< 5.11).
 */
struct cgroup___v510 {
	int level;
	__u64 ancestor_ids[];
} __attribute__((preserve_access_index));

static __always_inline struct cgroup___v510 *current_dfl_cgroup(void)
{
	struct task_struct *t = (struct task_struct *)bpf_get_current_task();

	return (struct cgroup___v510 *)BPF_CORE_READ(t, cgroups, dfl_cgrp);
}

/* the ancestor's id at `level`, 0 past the cgroup's own level (what the helper returns) */
static __always_inline __u64 ancestor_cgroup_id_v510(struct cgroup___v510 *cg, int own, int level)
{
	__u64 id = 0;

	if (!cg || level > own)
		return 0;
	bpf_core_read(&id, sizeof(id), &cg->ancestor_ids[level]);
	return id;
}
#endif /* AEGIS_NO_TASK_STORAGE */

#endif /* AEGIS_CORE_FIXES_BPF_H */
