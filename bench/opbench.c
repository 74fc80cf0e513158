/* opbench: a tight native loop over one syscall path, per-sample timings -> percentiles.
 *
 *   opbench OP PATH ITERS [--batch B] [--warmup W] [--cpu N] [--cgroup DIR]
 *                         [--expect-errno E]
 *
 * OP:  open   open(PATH, O_RDONLY) + close        (lsm/file_open)
 *      stat   stat(PATH)                          (no aegis hook: a control)
 *      exec   vfork + execve(PATH) + waitpid      (lsm/bprm_check_security, mmap_file)
 *      mmap   mmap(fd, 4 KiB, PROT_READ|PROT_EXEC, MAP_PRIVATE) + munmap
 *             (lsm/mmap_file; PATH opened once, before the loop)
 *      null   two back-to-back clock reads        (the timer's own cost)
 *
 * One sample = one batch of B operations timed with clock_gettime(CLOCK_MONOTONIC),
 * divided by B (B = 1: every operation is timed on its own).  --cgroup moves this
 * process into a cgroup v2 directory first; --cpu pins it to one CPU.  --expect-errno
 * E: the operation must fail with E every time (a deny path); otherwise it must succeed.
 * Any other outcome is counted in "unexpected" (and the run exits 3).
 *
 * Prints one JSON object: ns per operation at p50/p90/p95/p99/p99.9, mean, min, max.
 * Built static (gcc -O2 -static) so a run costs no dynamic loading and no Python.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "native.h"

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static const char *g_path;
static int g_fd = -1;
static int g_expect;  /* 0 = must succeed, else the errno every call must fail with */
static long g_unexpected, g_failed;
static int g_last_errno;
static char *const g_argv[] = { "tiny", NULL };
static char *const g_envp[] = { NULL };

static void outcome(int ok, int err)
{
	if (!ok) {
		g_failed++;
		g_last_errno = err;
	}
	if (g_expect ? (ok || err != g_expect) : !ok)
		g_unexpected++;
}

static void op_open(void)
{
	int fd = open(g_path, O_RDONLY);

	outcome(fd >= 0, errno);
	if (fd >= 0)
		close(fd);
}

static void op_stat(void)
{
	struct stat st;

	outcome(stat(g_path, &st) == 0, errno);
}

static void op_exec(void)
{
	int status = 0;
	pid_t pid = vfork();

	if (pid == 0) {
		execve(g_path, g_argv, g_envp);
		_exit(errno & 0x7f ? (errno & 0x7f) : 127);
	}
	if (pid < 0) {
		outcome(0, errno);
		return;
	}
	waitpid(pid, &status, 0);
	if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
		outcome(1, 0);
	else
		outcome(0, WIFEXITED(status) ? WEXITSTATUS(status) : 128);
}

static void op_mmap(void)
{
	void *p = mmap(NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, g_fd, 0);

	outcome(p != MAP_FAILED, errno);
	if (p != MAP_FAILED)
		munmap(p, 4096);
}

static void op_null(void)
{
}

static void usage(void)
{
	fprintf(stderr, "usage: opbench open|stat|exec|mmap|null PATH ITERS [--batch B] "
			"[--warmup W] [--cpu N] [--cgroup DIR] [--expect-errno E]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	long iters, batch = 1, warmup = -1, nsamples, i, j;
	int cpu = -1;
	const char *cgroup = NULL, *op;
	void (*fn)(void);
	uint64_t *s, t0, t1, sum = 0;

	if (argc < 4)
		usage();
	op = argv[1];
	g_path = argv[2];
	iters = atol(argv[3]);
	for (i = 4; i < argc; i++) {
		if (i + 1 >= argc)
			usage();
		if (!strcmp(argv[i], "--batch"))
			batch = atol(argv[++i]);
		else if (!strcmp(argv[i], "--warmup"))
			warmup = atol(argv[++i]);
		else if (!strcmp(argv[i], "--cpu"))
			cpu = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--cgroup"))
			cgroup = argv[++i];
		else if (!strcmp(argv[i], "--expect-errno"))
			g_expect = atoi(argv[++i]);
		else
			usage();
	}
	if (!strcmp(op, "open"))
		fn = op_open;
	else if (!strcmp(op, "stat"))
		fn = op_stat;
	else if (!strcmp(op, "exec"))
		fn = op_exec;
	else if (!strcmp(op, "mmap"))
		fn = op_mmap;
	else if (!strcmp(op, "null"))
		fn = op_null;
	else
		usage();
	if (iters < 1 || batch < 1)
		usage();
	if (cgroup && join_cgroup("opbench", cgroup))
		return 2;
	if (cpu >= 0) {
		cpu_set_t set;

		CPU_ZERO(&set);
		CPU_SET(cpu, &set);
		if (sched_setaffinity(0, sizeof(set), &set)) {
			fprintf(stderr, "opbench: cpu %d: %s\n", cpu, strerror(errno));
			return 2;
		}
	}
	if (fn == op_mmap) {
		g_fd = open(g_path, O_RDONLY);
		if (g_fd < 0) {
			fprintf(stderr, "opbench: open %s: %s\n", g_path, strerror(errno));
			return 2;
		}
	}
	nsamples = iters / batch;
	if (nsamples < 1)
		nsamples = 1;
	s = calloc(nsamples, sizeof(*s));
	if (!s)
		return 2;
	if (warmup < 0)
		warmup = iters / 10 < 1000 ? iters / 10 : 1000;
	for (i = 0; i < warmup; i++)
		fn();
	g_unexpected = g_failed = 0;
	for (i = 0; i < nsamples; i++) {
		t0 = now_ns();
		for (j = 0; j < batch; j++)
			fn();
		t1 = now_ns();
		s[i] = t1 - t0;
	}
	for (i = 0; i < nsamples; i++)
		sum += s[i];
	qsort(s, nsamples, sizeof(*s), cmp_u64);
#define PCT(q) ((double)s[(long)((q) * (nsamples - 1) + 0.5)] / batch)
	printf("{\"op\": \"%s\", \"iters\": %ld, \"batch\": %ld, \"samples\": %ld, "
	       "\"p50\": %.1f, \"p90\": %.1f, \"p95\": %.1f, \"p99\": %.1f, \"p999\": %.1f, "
	       "\"mean\": %.1f, \"min\": %.1f, \"max\": %.1f, \"failed\": %ld, \"errno\": %d, "
	       "\"unexpected\": %ld}\n",
	       op, nsamples * batch, batch, nsamples, PCT(0.50), PCT(0.90), PCT(0.95), PCT(0.99),
	       PCT(0.999), (double)sum / (nsamples * batch), (double)s[0] / batch,
	       (double)s[nsamples - 1] / batch, g_failed, g_last_errno, g_unexpected);
	return g_unexpected ? 3 : 0;
}
