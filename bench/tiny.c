/* The smallest static executable: exit(0) with no libc, so an execve benchmark
 * measures the kernel's exec path (and aegis's bprm_check/mmap_file hooks), not ld.so. */
void _start(void)
{
	__asm__ volatile("mov $60, %eax\n\txor %edi, %edi\n\tsyscall");
}
