// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * floor.bpf.c - the cheapest possible BPF LSM programs: each only returns the verdict it
 * was handed.  bench/overhead.py attaches them as configuration "floor", in the same boot
 * as "no programs" and the real object, so that every overhead figure can be stated above
 * what attaching *any* program to these hooks costs (LSM dispatch + BPF trampoline).
 *
 * One program per hook the main object (bpf/aegis.bpf.c) may hook.  The bench loads only
 * the programs whose section the measured object also has, and refuses to run when the
 * object hooks something this file does not: add the hook here then (issue 15).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("lsm/file_open")
int BPF_PROG(floor_file_open, struct file *file, int ret)
{
	return ret;
}

SEC("lsm/bprm_check_security")
int BPF_PROG(floor_bprm_check, struct linux_binprm *bprm, int ret)
{
	return ret;
}

SEC("lsm/mmap_file")
int BPF_PROG(floor_mmap_file, struct file *file, unsigned long reqprot, unsigned long prot,
	     unsigned long flags, int ret)
{
	return ret;
}

SEC("lsm/file_mprotect")
int BPF_PROG(floor_file_mprotect, struct vm_area_struct *vma, unsigned long reqprot,
	     unsigned long prot, int ret)
{
	return ret;
}

/* path continuity (bpf/continuity.bpf.h): not a decision hook, but it runs on every
 * rename on the host, so its cost is measured above the same floor */
SEC("lsm/inode_rename")
int BPF_PROG(floor_inode_rename, struct inode *old_dir, struct dentry *old_dentry,
	     struct inode *new_dir, struct dentry *new_dentry, int ret)
{
	return ret;
}
