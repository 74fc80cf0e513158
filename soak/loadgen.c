/* loadgen: the soak's workload processes (static, no Python: cheap under QEMU TCG).
 *
 *   loadgen open   RATE DURATION_S CGROUP OUT FILE...   open+close FILEs round robin
 *   loadgen exec   RATE DURATION_S CGROUP OUT BIN...    vfork+execve+wait BINs round robin
 *   loadgen canary INTERVAL_MS DURATION_S CGROUP OUT FILE
 *
 * RATE is operations per second (0 = as fast as possible).  The process first joins
 * CGROUP (a cgroup v2 directory; "-" = stay).  It stops after DURATION_S seconds or on
 * SIGTERM/SIGINT, and then writes one JSON summary to OUT: attempts and outcomes
 * (ok, EPERM, other errno).  The canary instead appends one line per attempt to OUT,
 * flushed at once: "<CLOCK_MONOTONIC ns> <errno or 0>".
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

static char *const g_envp[] = { NULL };

/* one operation; returns 0 or the errno */
static int do_open(const char *path)
{
	int fd = open(path, O_RDONLY);

	if (fd < 0)
		return errno;
	close(fd);
	return 0;
}

static int do_exec(const char *path)
{
	char *argv[] = { (char *)path, NULL };
	int status = 0;
	pid_t pid = vfork();

	if (pid == 0) {
		execve(path, argv, g_envp);
		_exit(errno & 0x7f ? (errno & 0x7f) : 127);
	}
	if (pid < 0)
		return errno;
	if (waitpid(pid, &status, 0) < 0)
		return errno;
	if (WIFEXITED(status))
		return WEXITSTATUS(status);
	return 128;
}

int main(int argc, char **argv)
{
	const char *mode, *cg, *out;
	double rate;
	uint64_t t0, deadline, next, interval_ns = 0;
	long attempts = 0, ok = 0, eperm = 0, other = 0;
	int last_other = 0, nfiles, i = 0;
	char **files;
	FILE *f;

	if (argc < 7) {
		fprintf(stderr, "usage: loadgen open|exec|canary RATE|INTERVAL_MS DURATION_S CGROUP OUT FILE...\n");
		return 2;
	}
	mode = argv[1];
	rate = atof(argv[2]);
	t0 = now_ns();
	deadline = t0 + (uint64_t)(atof(argv[3]) * 1e9);
	cg = argv[4];
	out = argv[5];
	files = argv + 6;
	nfiles = argc - 6;
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	if (strcmp(cg, "-") && join_cgroup("loadgen", cg))
		return 2;

	if (!strcmp(mode, "canary")) {
		interval_ns = (uint64_t)(rate * 1e6);
		f = fopen(out, "a");
		if (!f)
			return 2;
		for (next = t0; !g_stop && now_ns() < deadline; next += interval_ns) {
			uint64_t t = now_ns();
			int err;

			if (t < next) {
				sleep_ns(next - t);
				if (g_stop)
					break;
			}
			t = now_ns();
			err = do_open(files[0]);
			fprintf(f, "%llu %d\n", (unsigned long long)t, err);
			fflush(f);
		}
		fclose(f);
		return 0;
	}

	if (strcmp(mode, "open") && strcmp(mode, "exec")) {
		fprintf(stderr, "loadgen: unknown mode %s\n", mode);
		return 2;
	}
	if (rate > 0)
		interval_ns = (uint64_t)(1e9 / rate);
	next = t0;
	while (!g_stop) {
		uint64_t t = now_ns();
		int err;

		if (t >= deadline)
			break;
		if (interval_ns) {
			if (t < next) {
				/* sleep in >= 1 ms steps; catch up in bursts (the rate is kept on average) */
				uint64_t gap = next - t;

				sleep_ns(gap < 1000000 ? 1000000 : gap);
				continue;
			}
			next += interval_ns;
			if (t > next + 1000000000ull)
				next = t; /* more than 1 s behind: do not burst forever */
		}
		err = !strcmp(mode, "open") ? do_open(files[i]) : do_exec(files[i]);
		i = (i + 1) % nfiles;
		attempts++;
		if (!err)
			ok++;
		else if (err == EPERM)
			eperm++;
		else {
			other++;
			last_other = err;
		}
	}
	f = fopen(out, "w");
	if (!f)
		return 2;
	fprintf(f, "{\"mode\": \"%s\", \"rate\": %g, \"seconds\": %.3f, \"attempts\": %ld, \"ok\": %ld, "
		   "\"eperm\": %ld, \"other\": %ld, \"last_other_errno\": %d}\n",
		mode, rate, (now_ns() - t0) / 1e9, attempts, ok, eperm, other, last_other);
	fclose(f);
	return 0;
}
