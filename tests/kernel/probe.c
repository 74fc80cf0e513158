/* A tiny static probe for the kernel suite: one access, outcome as JSON on stdout.
 * C rather than Python because each Python start costs seconds under QEMU TCG.
 *   probe open PATH [FLAG|FLAG...]   probe read PATH    probe reopen_opath PATH
 *   probe exec PATH [ARGS...]        probe hold PATH    probe mmap_exec PATH
 *   probe openraw PATH HEXFLAGS
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static int fail(void)
{
	printf("{\"errno\": %d}\n", errno);
	return 0;
}

static int ok(void)
{
	printf("{\"ok\": true}\n");
	return 0;
}

static int parse_flags(const char *s)
{
	int flags = 0;
	char buf[256], *tok, *save;

	snprintf(buf, sizeof(buf), "%s", s);
	for (tok = strtok_r(buf, "|", &save); tok; tok = strtok_r(NULL, "|", &save)) {
		if (!strcmp(tok, "O_RDONLY")) flags |= O_RDONLY;
		else if (!strcmp(tok, "O_WRONLY")) flags |= O_WRONLY;
		else if (!strcmp(tok, "O_RDWR")) flags |= O_RDWR;
		else if (!strcmp(tok, "O_APPEND")) flags |= O_APPEND;
		else if (!strcmp(tok, "O_TRUNC")) flags |= O_TRUNC;
		else if (!strcmp(tok, "O_CREAT")) flags |= O_CREAT;
		else if (!strcmp(tok, "O_NOFOLLOW")) flags |= O_NOFOLLOW;
		else if (!strcmp(tok, "O_PATH")) flags |= O_PATH;
		else if (!strcmp(tok, "O_DIRECT")) flags |= O_DIRECT;
		else if (!strcmp(tok, "O_NOATIME")) flags |= O_NOATIME;
		else if (!strcmp(tok, "O_LARGEFILE")) flags |= O_LARGEFILE;
		else { fprintf(stderr, "unknown flag %s\n", tok); exit(2); }
	}
	return flags;
}

int main(int argc, char **argv)
{
	const char *op, *path;
	char buf[64];
	int fd;

	if (argc < 3) {
		fprintf(stderr, "usage: probe OP PATH ...\n");
		return 2;
	}
	op = argv[1];
	path = argv[2];
	setvbuf(stdout, NULL, _IONBF, 0);
	if (!strcmp(op, "open") || !strcmp(op, "openraw")) {
		int flags = argc > 3 ? (!strcmp(op, "open") ? parse_flags(argv[3])
							   : (int)strtol(argv[3], NULL, 16))
				     : O_RDONLY;
		fd = open(path, flags, 0644);
		if (fd < 0)
			return fail();
		close(fd);
		return ok();
	}
	if (!strcmp(op, "read")) {
		fd = open(path, O_RDONLY);
		if (fd < 0)
			return fail();
		if (read(fd, buf, sizeof(buf)) < 0)
			return fail();
		close(fd);
		return ok();
	}
	if (!strcmp(op, "reopen_opath")) {
		char proc[64];

		fd = open(path, O_PATH);
		if (fd < 0)
			return fail();
		printf("{\"stage\": \"opath_ok\"}\n");
		snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
		if ((fd = open(proc, O_RDONLY)) < 0)
			return fail();
		close(fd);
		return ok();
	}
	if (!strcmp(op, "exec")) {
		execv(path, argv + 2);
		return fail();
	}
	if (!strcmp(op, "hold")) {
		/* open before the policy, wait for the go on stdin, then read the old fd */
		fd = open(path, O_RDONLY);
		if (fd < 0)
			return fail();
		printf("{\"stage\": \"opened\"}\n");
		if (!fgets(buf, sizeof(buf), stdin))
			return 3;
		if (pread(fd, buf, sizeof(buf), 0) < 0)
			return fail();
		printf("{\"ok\": true, \"read\": 1}\n");
		return 0;
	}
	if (!strcmp(op, "mmap_exec")) {
		struct stat st;
		void *p;

		fd = open(path, O_RDONLY);
		if (fd < 0 || fstat(fd, &st) < 0)
			return fail();
		p = mmap(NULL, st.st_size, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
		if (p == MAP_FAILED)
			return fail();
		munmap(p, st.st_size);
		return ok();
	}
	fprintf(stderr, "unknown op %s\n", op);
	return 2;
}
