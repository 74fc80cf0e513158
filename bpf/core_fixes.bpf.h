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

#endif /* AEGIS_CORE_FIXES_BPF_H */
