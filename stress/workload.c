/* workload: the rollback stress test's decision generator (static C: cheap under TCG).
 *
 *   workload run CGROUP OUT RATE EXEC_EVERY FILE... [-- BIN...]
 *   workload noop                      (the exec target: exits 0 at once)
 *
 * Joins CGROUP (cgroup v2 dir), then until SIGTERM/SIGINT opens FILEs round robin
 * (O_RDONLY, closed at once) and, every EXEC_EVERY opens (0 = never), vfork+execve's the
 * next BIN ("BIN noop").  RATE = operations per second (0 = as fast as possible).
 *
 * Every operation is one fixed 24-byte record appended to OUT (little endian):
 *   u64 t0_ns   CLOCK_MONOTONIC just before the syscall
 *   u64 t1_ns   CLOCK_MONOTONIC just after it returned (exec: after the child was reaped)
 *   u32 target  index: FILEs first, then BINs
 *   i32 result  0 = allowed; errno of open/execve (EPERM = denied); for an exec whose
 *               child died after execve's point of no return: -(signal number)
 * The kernel's bpf_ktime_get_ns() is CLOCK_MONOTONIC too, so the driver can put every
 * decision event inside exactly one operation's [t0, t1] window.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../bench/native.h"

struct rec {
	uint64_t t0, t1;
	uint32_t target;
	int32_t result;
};

static char *const g_envp[] = { NULL };

static int32_t do_exec(const char *bin)
{
	char *const argv[] = { (char *)bin, "noop", NULL };
	volatile int err = 0;
	int st;
	pid_t pid = vfork();

	if (pid == 0) {
		execve(bin, argv, g_envp);
		err = errno; /* vfork: shares our memory until _exit */
		_exit(127);
	}
	if (pid < 0)
		return errno;
	while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
		;
	if (err)
		return err;
	if (WIFSIGNALED(st))
		return -WTERMSIG(st);
	return WEXITSTATUS(st) == 0 ? 0 : 1000 + WEXITSTATUS(st);
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_signal };
	int nfiles = 0, nbins = 0, i, first_bin = -1;
	uint64_t interval, next, ops = 0;
	long rate, exec_every;
	FILE *out;

	if (argc >= 2 && !strcmp(argv[1], "noop"))
		return 0;
	if (argc < 7 || strcmp(argv[1], "run")) {
		fprintf(stderr, "usage: workload run CGROUP OUT RATE EXEC_EVERY FILE... [-- BIN...]\n");
		return 2;
	}
	rate = atol(argv[4]);
	exec_every = atol(argv[5]);
	for (i = 6; i < argc; i++) {
		if (!strcmp(argv[i], "--")) {
			first_bin = i + 1;
			break;
		}
		nfiles++;
	}
	if (first_bin > 0)
		nbins = argc - first_bin;
	if (!nfiles) {
		fprintf(stderr, "workload: no files\n");
		return 2;
	}
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	if (join_cgroup("workload", argv[2]))
		return 1;
	out = fopen(argv[3], "wb");
	if (!out) {
		fprintf(stderr, "workload: %s: %s\n", argv[3], strerror(errno));
		return 1;
	}
	setvbuf(out, NULL, _IOFBF, 1 << 20);
	printf("ready %d\n", getpid());
	fflush(stdout);
	interval = rate > 0 ? 1000000000ull / (uint64_t)rate : 0;
	next = now_ns();
	while (!g_stop) {
		struct rec r;

		if (exec_every > 0 && nbins && ops % (uint64_t)exec_every == (uint64_t)exec_every - 1) {
			uint32_t b = (uint32_t)((ops / (uint64_t)exec_every) % (uint64_t)nbins);

			r.target = (uint32_t)nfiles + b;
			r.t0 = now_ns();
			r.result = do_exec(argv[first_bin + b]);
			r.t1 = now_ns();
		} else {
			uint32_t f = (uint32_t)(ops % (uint64_t)nfiles);
			int fd;

			r.target = f;
			r.t0 = now_ns();
			fd = open(argv[6 + f], O_RDONLY | O_CLOEXEC);
			r.t1 = now_ns();
			r.result = fd < 0 ? errno : 0;
			if (fd >= 0)
				close(fd);
		}
		fwrite(&r, sizeof(r), 1, out);
		ops++;
		if (interval) {
			uint64_t now;

			next += interval;
			now = now_ns();
			if (next > now) {
				struct timespec ts = { (time_t)((next - now) / 1000000000ull),
						       (long)((next - now) % 1000000000ull) };
				nanosleep(&ts, NULL);
			} else {
				next = now;
			}
		}
	}
	if (fclose(out)) {
		fprintf(stderr, "workload: write %s: %s\n", argv[3], strerror(errno));
		return 1;
	}
	return 0;
}
