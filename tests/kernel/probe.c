/* A tiny static probe for the kernel suite: one access, outcome as JSON on stdout.
 * C rather than Python because each Python start costs seconds under QEMU TCG.
 * The last line starting with '{' is the result: {"ok": true, ...} or {"errno": N, ...}.
 *
 *   open PATH [FLAG|FLAG...]      openraw PATH HEXFLAGS        read PATH
 *   reopen_opath PATH [PREFIX]    (O_PATH, then open PREFIX/N; PREFIX /proc/self/fd)
 *   exec PATH [ARGS...]           hold PATH                    mmap_exec PATH
 *   openat DIR NAME [FLAGS]       (DIR opened O_PATH|O_DIRECTORY)
 *   openat2 DIR|- NAME RESOLVE    (RESOLVE: 0 or NO_XDEV|NO_MAGICLINKS|NO_SYMLINKS|
 *                                  BENEATH|IN_ROOT|CACHED)
 *   chdir_open DIR NAME           chroot_open ROOT NAME        opath_dir_open DIR NAME
 *   opath_linkat PATH NEWPATH     (O_PATH fd -> linkat AT_EMPTY_PATH -> open NEWPATH)
 *   handle PATH                   handle_save PATH OUT         handle_open IN MOUNTPATH
 *   uring_open PATH MODE          (MODE: inline | async | sqpoll | openat2)
 *   sendfd SOCK PATH              recvfd SOCK
 *   open_loop PATH N [DENIED_INO] (env PROBE_PAUSE_AT=K: reads a line after K opens)
 *   exchange A B N                (renameat2 RENAME_EXCHANGE; N 0 = forever)
 *   execveat PATH                 fexecve PATH                 exec_procfd PATH
 *   memfd_exec PATH               mprotect_exec PATH           mmap_read PATH
 *   threads PATH N                thread_exec PATH             fork_open PATH
 *   open_wait_open PATH           migrate PATH CGROUP_PROCS    open_tree DIR NAME
 *   truncate PATH                 hold_mmap PATH               hold_exec PATH SELF
 *   readfd FD                     find FILE NEEDLE
 *   open_for PATH SECONDS         exec_for PATH SECONDS        (loops: counts per outcome)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <linux/openat2.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef OPEN_TREE_CLONE
#define OPEN_TREE_CLONE 1
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif

extern char **environ;

static int fail(void)
{
	printf("{\"errno\": %d}\n", errno);
	return 0;
}

static int fail_at(const char *stage)
{
	printf("{\"errno\": %d, \"stage\": \"%s\"}\n", errno, stage);
	return 0;
}

static int ok(void)
{
	printf("{\"ok\": true}\n");
	return 0;
}

static int ok_ino(int fd)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return fail_at("fstat");
	printf("{\"ok\": true, \"ino\": %llu}\n", (unsigned long long)st.st_ino);
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
		else if (!strcmp(tok, "O_NONBLOCK")) flags |= O_NONBLOCK;
		else if (!strcmp(tok, "O_SYNC")) flags |= O_SYNC;
		else if (!strcmp(tok, "O_CLOEXEC")) flags |= O_CLOEXEC;
		else { fprintf(stderr, "unknown flag %s\n", tok); exit(2); }
	}
	return flags;
}

static unsigned long long parse_resolve(const char *s)
{
	unsigned long long r = 0;
	char buf[256], *tok, *save;

	snprintf(buf, sizeof(buf), "%s", s);
	for (tok = strtok_r(buf, "|", &save); tok; tok = strtok_r(NULL, "|", &save)) {
		if (!strcmp(tok, "0")) continue;
		else if (!strcmp(tok, "NO_XDEV")) r |= RESOLVE_NO_XDEV;
		else if (!strcmp(tok, "NO_MAGICLINKS")) r |= RESOLVE_NO_MAGICLINKS;
		else if (!strcmp(tok, "NO_SYMLINKS")) r |= RESOLVE_NO_SYMLINKS;
		else if (!strcmp(tok, "BENEATH")) r |= RESOLVE_BENEATH;
		else if (!strcmp(tok, "IN_ROOT")) r |= RESOLVE_IN_ROOT;
		else if (!strcmp(tok, "CACHED")) r |= RESOLVE_CACHED;
		else { fprintf(stderr, "unknown resolve flag %s\n", tok); exit(2); }
	}
	return r;
}

static int wait_go(void)
{
	char buf[64];

	return fgets(buf, sizeof(buf), stdin) != NULL;
}

/* ------------------------------------------------------------------ file handles */

struct handle_buf {
	struct file_handle fh;
	unsigned char bytes[MAX_HANDLE_SZ];
};

static int get_handle(const char *path, struct handle_buf *h)
{
	int mnt;

	memset(h, 0, sizeof(*h));
	h->fh.handle_bytes = MAX_HANDLE_SZ;
	return name_to_handle_at(AT_FDCWD, path, &h->fh, &mnt, 0);
}

static int open_handle(const char *mountpath, struct handle_buf *h)
{
	int mfd = open(mountpath, O_RDONLY | O_DIRECTORY), fd;

	if (mfd < 0)
		return fail_at("mount_fd");
	fd = open_by_handle_at(mfd, &h->fh, O_RDONLY);
	if (fd < 0)
		return fail_at("open_by_handle_at");
	return ok_ino(fd);
}

/* ------------------------------------------------------------------ io_uring */

static int uring_open(const char *path, const char *mode)
{
	struct io_uring_params p;
	struct io_uring_sqe *sqe, *sqes;
	struct io_uring_cqe *cqe;
	struct open_how how;
	unsigned char *sq, *cq;
	unsigned *tail, *array, mask, *cqhead, *cqtail, *sqflags, enter_flags;
	size_t sqsz, cqsz;
	int ring, res;

	memset(&p, 0, sizeof(p));
	if (!strcmp(mode, "sqpoll")) {
		p.flags = IORING_SETUP_SQPOLL;
		p.sq_thread_idle = 2000;
	}
	ring = syscall(__NR_io_uring_setup, 4, &p);
	if (ring < 0)
		return fail_at("io_uring_setup");
	sqsz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
	cqsz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
	if (p.features & IORING_FEAT_SINGLE_MMAP) {
		if (cqsz > sqsz)
			sqsz = cqsz;
		cqsz = sqsz;
	}
	sq = mmap(NULL, sqsz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring,
		  IORING_OFF_SQ_RING);
	if (sq == MAP_FAILED)
		return fail_at("mmap_sq");
	if (p.features & IORING_FEAT_SINGLE_MMAP)
		cq = sq;
	else {
		cq = mmap(NULL, cqsz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring,
			  IORING_OFF_CQ_RING);
		if (cq == MAP_FAILED)
			return fail_at("mmap_cq");
	}
	sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
		    MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES);
	if (sqes == MAP_FAILED)
		return fail_at("mmap_sqes");
	tail = (unsigned *)(sq + p.sq_off.tail);
	array = (unsigned *)(sq + p.sq_off.array);
	mask = *(unsigned *)(sq + p.sq_off.ring_mask);
	sqflags = (unsigned *)(sq + p.sq_off.flags);
	sqe = &sqes[0];
	memset(sqe, 0, sizeof(*sqe));
	sqe->fd = AT_FDCWD;
	sqe->addr = (uint64_t)(uintptr_t)path;
	if (!strcmp(mode, "openat2")) {
		memset(&how, 0, sizeof(how));
		how.flags = O_RDONLY;
		sqe->opcode = IORING_OP_OPENAT2;
		sqe->len = sizeof(how);
		sqe->off = (uint64_t)(uintptr_t)&how;
	} else {
		sqe->opcode = IORING_OP_OPENAT;
		sqe->open_flags = O_RDONLY;
	}
	if (!strcmp(mode, "async"))
		sqe->flags |= IOSQE_ASYNC; /* force the io-wq worker thread */
	array[*tail & mask] = 0;
	__atomic_store_n(tail, *tail + 1, __ATOMIC_RELEASE);
	enter_flags = IORING_ENTER_GETEVENTS;
	if (p.flags & IORING_SETUP_SQPOLL)
		enter_flags |= IORING_ENTER_SQ_WAKEUP;
	(void)sqflags;
	if (syscall(__NR_io_uring_enter, ring, 1, 1, enter_flags, NULL, 0) < 0)
		return fail_at("io_uring_enter");
	cqhead = (unsigned *)(cq + p.cq_off.head);
	cqtail = (unsigned *)(cq + p.cq_off.tail);
	while (__atomic_load_n(cqtail, __ATOMIC_ACQUIRE) == *cqhead) {
		if (syscall(__NR_io_uring_enter, ring, 0, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0)
			return fail_at("io_uring_wait");
	}
	cqe = (struct io_uring_cqe *)(cq + p.cq_off.cqes) +
	      (*cqhead & *(unsigned *)(cq + p.cq_off.ring_mask));
	res = cqe->res;
	if (res < 0) {
		errno = -res;
		return fail_at("cqe");
	}
	return ok_ino(res);
}

/* ------------------------------------------------------------------ SCM_RIGHTS */

static int unix_addr(const char *path, struct sockaddr_un *a)
{
	memset(a, 0, sizeof(*a));
	a->sun_family = AF_UNIX;
	snprintf(a->sun_path, sizeof(a->sun_path), "%s", path);
	return socket(AF_UNIX, SOCK_STREAM, 0);
}

static int sendfd(const char *sock, const char *path)
{
	struct sockaddr_un a;
	char cbuf[CMSG_SPACE(sizeof(int))], byte = 'x';
	struct iovec iov = { &byte, 1 };
	struct msghdr m = { 0 };
	struct cmsghdr *c;
	int fd, s, conn;

	fd = open(path, O_RDONLY);
	if (fd < 0)
		return fail_at("sender_open");
	s = unix_addr(sock, &a);
	unlink(sock);
	if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(s, 1) < 0)
		return fail_at("listen");
	printf("{\"stage\": \"listening\"}\n");
	conn = accept(s, NULL, NULL);
	if (conn < 0)
		return fail_at("accept");
	m.msg_iov = &iov;
	m.msg_iovlen = 1;
	m.msg_control = cbuf;
	m.msg_controllen = sizeof(cbuf);
	c = CMSG_FIRSTHDR(&m);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &fd, sizeof(int));
	if (sendmsg(conn, &m, 0) < 0)
		return fail_at("sendmsg");
	close(conn);
	unlink(sock);
	return ok();
}

static int recvfd(const char *sock)
{
	struct sockaddr_un a;
	char cbuf[CMSG_SPACE(sizeof(int))], byte, buf[64];
	struct iovec iov = { &byte, 1 };
	struct msghdr m = { 0 };
	struct cmsghdr *c;
	int s, fd;

	s = unix_addr(sock, &a);
	if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof(a)) < 0)
		return fail_at("connect");
	m.msg_iov = &iov;
	m.msg_iovlen = 1;
	m.msg_control = cbuf;
	m.msg_controllen = sizeof(cbuf);
	if (recvmsg(s, &m, 0) <= 0)
		return fail_at("recvmsg");
	c = CMSG_FIRSTHDR(&m);
	if (!c || c->cmsg_type != SCM_RIGHTS) {
		errno = EBADMSG;
		return fail_at("cmsg");
	}
	memcpy(&fd, CMSG_DATA(c), sizeof(int));
	if (pread(fd, buf, sizeof(buf), 0) < 0)
		return fail_at("read");
	return ok_ino(fd);
}

/* ------------------------------------------------------------------ threads */

struct thread_arg {
	const char *path;
	int err;
	pid_t tid;
	int exec;
};

static void *thread_main(void *p)
{
	struct thread_arg *t = p;
	int fd;

	t->tid = gettid();
	if (t->exec) {
		char *argv[] = { (char *)t->path, NULL };

		execv(t->path, argv);
		t->err = errno;
		return NULL;
	}
	fd = open(t->path, O_RDONLY);
	t->err = fd < 0 ? errno : 0;
	if (fd >= 0)
		close(fd);
	return NULL;
}

static int threads(const char *path, int n, int exec)
{
	struct thread_arg args[64];
	pthread_t th[64];
	int i, eperm = 0, okc = 0;

	if (n > 64)
		n = 64;
	for (i = 0; i < n; i++) {
		args[i] = (struct thread_arg){ path, 0, 0, exec };
		if (pthread_create(&th[i], NULL, thread_main, &args[i]))
			return fail_at("pthread_create");
	}
	for (i = 0; i < n; i++) {
		pthread_join(th[i], NULL);
		if (args[i].err == EPERM)
			eperm++;
		else if (!args[i].err)
			okc++;
	}
	printf("{\"pid\": %d, \"eperm\": %d, \"opened\": %d, \"tids\": [", getpid(), eperm, okc);
	for (i = 0; i < n; i++)
		printf("%s%d", i ? ", " : "", args[i].tid);
	printf("]}\n");
	return 0;
}

/* ------------------------------------------------------------------ main */

static int open_result(const char *path)
{
	int fd = open(path, O_RDONLY);

	if (fd < 0)
		return errno;
	close(fd);
	return 0;
}

static int exec_fd(int fd, const char *path)
{
	char *argv[] = { (char *)path, NULL };

	syscall(SYS_execveat, fd, "", argv, environ, AT_EMPTY_PATH);
	return fail();
}

int main(int argc, char **argv)
{
	const char *op, *path;
	char buf[4096];
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
		if (read(fd, buf, 64) < 0)
			return fail();
		close(fd);
		return ok();
	}
	if (!strcmp(op, "reopen_opath")) {
		char proc[128];

		fd = open(path, O_PATH);
		if (fd < 0)
			return fail();
		printf("{\"stage\": \"opath_ok\"}\n");
		snprintf(proc, sizeof(proc), "%s/%d", argc > 3 ? argv[3] : "/proc/self/fd", fd);
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
		printf("{\"stage\": \"opened\", \"pid\": %d, \"fd\": %d}\n", getpid(), fd);
		if (!wait_go())
			return 3;
		if (pread(fd, buf, 64, 0) < 0)
			return fail();
		printf("{\"ok\": true, \"read\": 1}\n");
		return 0;
	}
	if (!strcmp(op, "mmap_exec") || !strcmp(op, "mmap_read") || !strcmp(op, "mprotect_exec")) {
		struct stat st;
		int prot = !strcmp(op, "mmap_exec") ? PROT_READ | PROT_EXEC : PROT_READ;
		void *p;

		fd = open(path, O_RDONLY);
		if (fd < 0 || fstat(fd, &st) < 0)
			return fail_at("open");
		p = mmap(NULL, st.st_size, prot, MAP_PRIVATE, fd, 0);
		if (p == MAP_FAILED)
			return fail_at("mmap");
		if (!strcmp(op, "mprotect_exec")) {
			printf("{\"stage\": \"mapped_read\"}\n");
			if (mprotect(p, st.st_size, PROT_READ | PROT_EXEC) < 0)
				return fail_at("mprotect");
		}
		munmap(p, st.st_size);
		return ok();
	}
	if (!strcmp(op, "openat") && argc > 3) {
		int dfd = open(path, O_PATH | O_DIRECTORY);

		if (dfd < 0)
			return fail_at("dirfd");
		fd = openat(dfd, argv[3], argc > 4 ? parse_flags(argv[4]) : O_RDONLY);
		if (fd < 0)
			return fail();
		return ok_ino(fd);
	}
	if (!strcmp(op, "openat2") && argc > 4) {
		struct open_how how = { .flags = O_RDONLY, .resolve = parse_resolve(argv[4]) };
		int dfd = AT_FDCWD;

		if (strcmp(path, "-") && (dfd = open(path, O_PATH | O_DIRECTORY)) < 0)
			return fail_at("dirfd");
		fd = syscall(SYS_openat2, dfd, argv[3], &how, sizeof(how));
		if (fd < 0)
			return fail();
		return ok_ino(fd);
	}
	if (!strcmp(op, "chdir_open") && argc > 3) {
		if (chdir(path) < 0)
			return fail_at("chdir");
		fd = open(argv[3], O_RDONLY);
		if (fd < 0)
			return fail();
		return ok_ino(fd);
	}
	if (!strcmp(op, "chroot_open") && argc > 3) {
		if (chroot(path) < 0 || chdir("/") < 0)
			return fail_at("chroot");
		fd = open(argv[3], O_RDONLY);
		if (fd < 0)
			return fail();
		return ok_ino(fd);
	}
	if (!strcmp(op, "opath_dir_open") && argc > 3) {
		char p2[512];
		int dfd = open(path, O_PATH | O_DIRECTORY);

		if (dfd < 0)
			return fail_at("dirfd");
		snprintf(p2, sizeof(p2), "/proc/self/fd/%d/%s", dfd, argv[3]);
		fd = open(p2, O_RDONLY);
		if (fd < 0)
			return fail();
		return ok_ino(fd);
	}
	if (!strcmp(op, "opath_linkat") && argc > 3) {
		fd = open(path, O_PATH);
		if (fd < 0)
			return fail_at("opath");
		if (linkat(fd, "", AT_FDCWD, argv[3], AT_EMPTY_PATH) < 0)
			return fail_at("linkat");
		printf("{\"stage\": \"linked\"}\n");
		fd = open(argv[3], O_RDONLY);
		if (fd < 0)
			return fail();
		return ok_ino(fd);
	}
	if (!strcmp(op, "handle") && argc > 3) {
		struct handle_buf h;

		if (get_handle(path, &h) < 0)
			return fail_at("name_to_handle_at");
		printf("{\"stage\": \"handle\", \"type\": %d, \"bytes\": %u}\n", h.fh.handle_type,
		       h.fh.handle_bytes);
		return open_handle(argv[3], &h);
	}
	if (!strcmp(op, "handle_save") && argc > 3) {
		struct handle_buf h;
		FILE *f;

		if (get_handle(path, &h) < 0)
			return fail_at("name_to_handle_at");
		f = fopen(argv[3], "wb");
		if (!f || fwrite(&h, sizeof(h), 1, f) != 1 || fclose(f))
			return fail_at("save");
		return ok();
	}
	if (!strcmp(op, "handle_open") && argc > 3) {
		struct handle_buf h;
		FILE *f = fopen(path, "rb");

		if (!f || fread(&h, sizeof(h), 1, f) != 1)
			return fail_at("load");
		fclose(f);
		return open_handle(argv[3], &h);
	}
	if (!strcmp(op, "uring_open"))
		return uring_open(path, argc > 3 ? argv[3] : "inline");
	if (!strcmp(op, "sendfd") && argc > 3)
		return sendfd(path, argv[3]);
	if (!strcmp(op, "recvfd"))
		return recvfd(path);
	if (!strcmp(op, "open_loop") && argc > 3) {
		long n = atol(argv[3]), i, opened = 0, opened_denied = 0, eperm = 0, other = 0;
		unsigned long long denied = argc > 4 ? strtoull(argv[4], NULL, 10) : 0;
		/* PROBE_PAUSE_AT=K: after K opens, wait for a line on stdin (a barrier the
		 * test releases, so that a step it takes lands inside the loop, not after it) */
		const char *pause = getenv("PROBE_PAUSE_AT");
		long pause_at = pause ? atol(pause) : -1;
		char line[16];
		struct stat st;

		for (i = 0; i < n; i++) {
			if (i == pause_at && !fgets(line, sizeof(line), stdin))
				return 3;
			fd = open(path, O_RDONLY);
			if (fd >= 0) {
				if (denied && !fstat(fd, &st) && st.st_ino == denied)
					opened_denied++;
				else
					opened++;
				close(fd);
			} else if (errno == EPERM)
				eperm++;
			else
				other++;
		}
		printf("{\"n\": %ld, \"opened\": %ld, \"opened_denied\": %ld, \"eperm\": %ld, "
		       "\"other\": %ld}\n", n, opened, opened_denied, eperm, other);
		return 0;
	}
	if (!strcmp(op, "exchange") && argc > 4) {
		long n = atol(argv[4]), i;

		printf("{\"stage\": \"swapping\"}\n");
		for (i = 0; n == 0 || i < n; i++)
			if (renameat2(AT_FDCWD, path, AT_FDCWD, argv[3], RENAME_EXCHANGE) < 0)
				return fail();
		return ok();
	}
	if (!strcmp(op, "execveat")) {
		fd = open(path, O_PATH);
		if (fd < 0)
			return fail_at("opath");
		return exec_fd(fd, path);
	}
	if (!strcmp(op, "fexecve")) {
		char *av[] = { (char *)path, NULL };

		fd = open(path, O_RDONLY);
		if (fd < 0)
			return fail_at("open");
		fexecve(fd, av, environ);
		return fail();
	}
	if (!strcmp(op, "exec_procfd")) {
		char proc[64];
		char *av[] = { (char *)path, NULL };

		fd = open(path, O_PATH);
		if (fd < 0)
			return fail_at("opath");
		snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
		execv(proc, av);
		return fail();
	}
	if (!strcmp(op, "memfd_exec")) {
		int mfd = memfd_create("aegis-copy", 0);
		ssize_t n;

		fd = open(path, O_RDONLY);
		if (fd < 0)
			return fail_at("open");
		if (mfd < 0)
			return fail_at("memfd_create");
		while ((n = read(fd, buf, sizeof(buf))) > 0)
			if (write(mfd, buf, n) != n)
				return fail_at("write");
		if (n < 0)
			return fail_at("read");
		printf("{\"stage\": \"copied\"}\n");
		return exec_fd(mfd, path);
	}
	if (!strcmp(op, "threads") && argc > 3)
		return threads(path, atoi(argv[3]), 0);
	if (!strcmp(op, "thread_exec"))
		return threads(path, 1, 1);
	if (!strcmp(op, "fork_open")) {
		int status;
		pid_t child = fork();

		if (child < 0)
			return fail_at("fork");
		if (!child)
			_exit(open_result(path));
		waitpid(child, &status, 0);
		printf("{\"errno\": %d, \"child\": %d}\n", WEXITSTATUS(status), child);
		return 0;
	}
	if (!strcmp(op, "open_wait_open")) {
		int first = open_result(path), second;

		printf("{\"stage\": \"first\", \"pid\": %d, \"first\": %d}\n", getpid(), first);
		if (!wait_go())
			return 3;
		second = open_result(path);
		printf("{\"first\": %d, \"second\": %d}\n", first, second);
		return 0;
	}
	if (!strcmp(op, "migrate") && argc > 3) {
		int first = open_result(path), second;
		FILE *f = fopen(argv[3], "w");

		if (!f || fprintf(f, "0\n") < 0 || fclose(f))
			return fail_at("migrate");
		second = open_result(path);
		printf("{\"first\": %d, \"second\": %d}\n", first, second);
		return 0;
	}
	if (!strcmp(op, "open_tree") && argc > 3) {
		int tfd = syscall(SYS_open_tree, AT_FDCWD, path, OPEN_TREE_CLONE | AT_RECURSIVE);

		if (tfd < 0)
			return fail_at("open_tree");
		fd = openat(tfd, argv[3], O_RDONLY);
		if (fd < 0)
			return fail();
		return ok_ino(fd);
	}
	if (!strcmp(op, "truncate")) {
		if (truncate(path, 0) < 0)
			return fail();
		return ok();
	}
	if (!strcmp(op, "hold_mmap")) {
		struct stat st;
		char *p;

		fd = open(path, O_RDONLY);
		if (fd < 0 || fstat(fd, &st) < 0)
			return fail();
		p = mmap(NULL, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
		if (p == MAP_FAILED)
			return fail_at("mmap");
		close(fd);
		printf("{\"stage\": \"opened\"}\n");
		if (!wait_go())
			return 3;
		printf("{\"ok\": true, \"first_byte\": %d}\n", p[0]);
		return 0;
	}
	if (!strcmp(op, "hold_exec") && argc > 3) {
		char fdstr[16];

		fd = open(path, O_RDONLY); /* no O_CLOEXEC: inherited by the new image */
		if (fd < 0)
			return fail();
		printf("{\"stage\": \"opened\"}\n");
		if (!wait_go())
			return 3;
		snprintf(fdstr, sizeof(fdstr), "%d", fd);
		execl(argv[3], argv[3], "readfd", fdstr, (char *)NULL);
		return fail_at("exec");
	}
	if (!strcmp(op, "readfd")) {
		fd = atoi(path);
		if (pread(fd, buf, 64, 0) < 0)
			return fail();
		return ok_ino(fd);
	}
	if (!strcmp(op, "find") && argc > 3) {
		size_t nl = strlen(argv[3]), keep = 0;
		static char big[(1 << 20) + 256];
		ssize_t n;

		fd = open(path, O_RDONLY);
		if (fd < 0)
			return fail();
		while ((n = read(fd, big + keep, 1 << 20)) > 0) {
			size_t len = keep + n;

			if (memmem(big, len, argv[3], nl)) {
				printf("{\"ok\": true, \"found\": true}\n");
				return 0;
			}
			keep = nl < len ? nl : len;
			memmove(big, big + len - keep, keep);
		}
		if (n < 0)
			return fail_at("read");
		printf("{\"ok\": true, \"found\": false}\n");
		return 0;
	}
	if ((!strcmp(op, "open_for") || !strcmp(op, "exec_for")) && argc > 3) {
		/* path continuity races (tests/kernel/test_path_continuity.py): open or exec the
		 * path for SECONDS while it is replaced; every success is a protection gap */
		struct timespec t0, t;
		long n = 0, ok_n = 0, eperm = 0, other = 0;
		double secs = atof(argv[3]);
		int exec = !strcmp(op, "exec_for");

		clock_gettime(CLOCK_MONOTONIC, &t0);
		printf("{\"stage\": \"looping\"}\n");
		fflush(stdout);
		do {
			if (exec) {
				pid_t pid = fork();
				int wst = 0;

				if (pid == 0) {
					char *xargv[] = { (char *)path, NULL };

					execve(path, xargv, environ);
					_exit(errno == EPERM ? 100 : 101);
				}
				if (pid < 0 || waitpid(pid, &wst, 0) < 0)
					other++;
				else if (WIFEXITED(wst) && WEXITSTATUS(wst) == 0)
					ok_n++;
				else if (WIFEXITED(wst) && WEXITSTATUS(wst) == 100)
					eperm++;
				else
					other++;
			} else {
				fd = open(path, O_RDONLY);
				if (fd >= 0) {
					ok_n++;
					close(fd);
				} else if (errno == EPERM)
					eperm++;
				else
					other++;
			}
			n++;
			clock_gettime(CLOCK_MONOTONIC, &t);
		} while ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 < secs);
		printf("{\"n\": %ld, \"succeeded\": %ld, \"eperm\": %ld, \"other\": %ld}\n",
		       n, ok_n, eperm, other);
		return 0;
	}
	fprintf(stderr, "unknown op %s\n", op);
	return 2;
}
