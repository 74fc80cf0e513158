/* native.h: the few helpers the static load generators share (bench/opbench.c,
 * soak/loadgen.c, stress/workload.c): a monotonic clock, a stop flag set by signals,
 * and joining a cgroup v2 directory.  Header-only so each stays one static binary. */
#ifndef AEGIS_NATIVE_H
#define AEGIS_NATIVE_H

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t g_stop __attribute__((unused));

static inline void on_signal(int sig)
{
	(void)sig;
	g_stop = 1;
}

/* CLOCK_MONOTONIC, the clock bpf_ktime_get_ns() reads too */
static inline uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void sleep_ns(uint64_t ns)
{
	struct timespec ts = { (time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull) };

	nanosleep(&ts, NULL);
}

/* move this process into cgroup v2 directory CG; on failure says why (as PROG) */
static inline int join_cgroup(const char *prog, const char *cg)
{
	char p[4096];
	FILE *f;

	snprintf(p, sizeof(p), "%s/cgroup.procs", cg);
	f = fopen(p, "w");
	if (!f || fprintf(f, "%d\n", getpid()) < 0 || fclose(f)) {
		fprintf(stderr, "%s: cannot join %s: %s\n", prog, cg, strerror(errno));
		return -1;
	}
	return 0;
}

#endif
