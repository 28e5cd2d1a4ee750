/*
 * krg-init: the shepherd and the PID-namespace init of one krgd job.
 *
 *   krgd --runs--> launcher --fork--> shepherd --unshare(PID)+fork--> C1 (pid 1) --fork--> C2: PROGRAM
 *
 * The launcher is a short subprocess of krgd: it sets up the job's stdio and control socket, forks
 * the shepherd and exits 0 once the job has started (1 with a reason if it could not). The
 * shepherd lives in its own session so that it survives krgd, holds the job's stdio and reports
 * the exit status over the control socket (Podman's conmon does the same). C1 reaps orphans and
 * forwards signals to PROGRAM's process group (as tini does). For CRIU, C1 is a session leader
 * inside its namespace and the job stays in the node's mount namespace.
 *
 * Control socket, '\n'-terminated lines:
 *   shepherd -> client  "hello PID N" with N fds (SCM_RIGHTS); PID is C1's host pid; the fds are
 *                       stdin's write end, stdout's and stderr's read ends (pipes) or the pty master
 *   shepherd -> client  "exit code X" or "exit signal N", once the job has ended
 *   client -> shepherd  "eof": close our copy of stdin's write end; "ack": exit status received
 *
 * --restore (krg-init --ctl PATH [--pty --rows R --cols C] --restore -- RESTORER [ARG...]): a job
 * dumped by CRIU elsewhere comes back under this shepherd, which then owns it as if it had started
 * it (same protocol, C1 = the restored init). Instead of unshare + fork C1, the shepherd becomes a
 * child subreaper and runs RESTORER (root, krg-init's own environment) with
 *   0 /dev/null, 1 a pipe for its one-line answer, 2 the shepherd's stderr,
 *   pipes: 3 stdin's read end, 4 stdout's and 5 stderr's write ends, 6 the status pipe's write
 *          end, 7 stdin's write end (for the bytes CRIU saved from the old stdin);
 *   pty:   3 the pty slave, 6 the status pipe's write end.
 * RESTORER answers "restored PID" (the restored init, its pid here) or "error MESSAGE", and exits.
 * The restored init must then be the shepherd's child (CRIU's sibling restore makes it the
 * restorer's child, and the restorer's exit hands it to us, the subreaper); any other orphan we
 * get is reaped and ignored. The launcher exits 0 once the job is ours, else 1 with
 * "krg-init: restore failed: MESSAGE". checkpoint/restorer.py is the RESTORER krgd uses.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define STATUS_FD 3 /* C1's end of the status pipe, moved here so one close_range() keeps it */

struct opts {
	const char *ctl, *cwd;
	bool pty, pidns;
	unsigned short rows, cols;
	bool set_uid, set_gid, set_groups, set_umask, env_stdin, restore;
	uid_t uid;
	gid_t gid;
	mode_t mask;
	gid_t *groups;
	size_t ngroups;
	char **argv; /* PROGRAM, or with --restore the RESTORER */
	char **env; /* --env-stdin: PROGRAM's environment; NULL: ours */
};

/* job[]: what PROGRAM gets as 0, 1, 2. ours[]: what hello hands out (the shepherd keeps them). */
struct stdio {
	int job[3];
	int ours[3];
	int nours;
};

/* Everything the shepherd's poll loop works on. */
struct shepherd {
	const struct opts *o;
	struct stdio *s;
	int lsock, client, sigfd, status_fd;
	pid_t c1;
	bool ended, have_status, told, stdin_closed;
	int status; /* PROGRAM's raw wait status, once have_status */
	char line[128];
	size_t len;
};

static const int fwd_signals[] = {
	SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2,
	SIGCONT, SIGTSTP, SIGTTIN, SIGTTOU, SIGWINCH, SIGALRM,
};
#define NFWD (sizeof fwd_signals / sizeof fwd_signals[0])

static const char *unlink_on_failure; /* the control socket, once the launcher has bound it */
static volatile sig_atomic_t program_pid; /* C1: PROGRAM's pid (and process group) */

/* One line on fd: the message, then ": strerror(err)" if err is set. */
__attribute__((format(printf, 3, 4))) static void say(int fd, int err, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (err)
		dprintf(fd, "%s: %s\n", msg, strerror(err));
	else
		dprintf(fd, "%s\n", msg);
}

#define warn_(f, ...) say(2, 0, "krg-init: " f, ##__VA_ARGS__)
#define usage_error(f, ...) (say(2, 0, "krg-init: " f, ##__VA_ARGS__), exit(2))
/* A launcher setup failure: one line and exit status 1 for krgd, and no stale socket left. */
#define die(f, ...) (say(2, errno, "krg-init: " f, ##__VA_ARGS__), launch_failed())
/* Before exec, fd 2 is already the job's stderr: the user sees these, as from a shell. */
#define job_fail(code, f, ...) (say(2, 0, f, ##__VA_ARGS__), _exit(code))

static _Noreturn void launch_failed(void)
{
	if (unlink_on_failure)
		unlink(unlink_on_failure);
	exit(1);
}

/* ---- arguments ---------------------------------------------------------------------------- */

static unsigned long parse_num(const char *opt, const char *s, int base, unsigned long max)
{
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, base);
	/* strtoul would accept " -1" and wrap it: insist on plain digits. */
	if (*s < '0' || *s > '9' || errno || *end || v > max)
		usage_error("--%s: invalid value '%s'", opt, s);
	return v;
}

static void parse_groups(struct opts *o, const char *list)
{
	char *copy = strdup(list), *rest = copy, *g;
	/* A bound on the count: every gid but the last takes at least two characters. */
	o->groups = calloc(strlen(list) / 2 + 1, sizeof *o->groups);
	if (!copy || !o->groups)
		die("out of memory");
	o->set_groups = true;
	while (*list && (g = strsep(&rest, ",")))
		o->groups[o->ngroups++] = (gid_t)parse_num("groups", g, 10, (gid_t)-2);
	free(copy);
}

/* --env-stdin: NUL-terminated NAME=VALUE entries until EOF. krgd runs us as root with an empty
 * environment, so that nothing of the user's (LD_PRELOAD...) applies to krg-init itself. */
static char **read_env(void)
{
	size_t len = 0, cap = 0, n = 0;
	char *buf = NULL;
	for (ssize_t r = -1; r != 0;) {
		/* One spare byte: the last entry may come without its NUL. */
		if (len == cap && !(buf = realloc(buf, (cap = cap ? 2 * cap : 4096) + 1)))
			die("out of memory");
		if ((r = read(0, buf + len, cap - len)) < 0 && errno != EINTR)
			die("--env-stdin: cannot read stdin");
		len += r > 0 ? (size_t)r : 0;
	}
	buf[len] = '\0';
	char **env = calloc(len / 2 + 2, sizeof *env); /* an entry takes two bytes at least */
	if (!env)
		die("out of memory");
	for (size_t i = 0; i < len; i += strlen(buf + i) + 1)
		if (buf[i])
			env[n++] = buf + i;
	return env;
}

enum {
	O_CTL = 256, O_PTY, O_ROWS, O_COLS, O_UID, O_GID, O_GROUPS, O_UMASK, O_CWD, O_NOPIDNS, O_ENV,
	O_RESTORE,
};

static void parse_args(struct opts *o, int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "ctl", required_argument, 0, O_CTL },       { "pty", no_argument, 0, O_PTY },
		{ "rows", required_argument, 0, O_ROWS },     { "cols", required_argument, 0, O_COLS },
		{ "uid", required_argument, 0, O_UID },       { "gid", required_argument, 0, O_GID },
		{ "groups", required_argument, 0, O_GROUPS }, { "umask", required_argument, 0, O_UMASK },
		{ "cwd", required_argument, 0, O_CWD },       { "no-pidns", no_argument, 0, O_NOPIDNS },
		{ "env-stdin", no_argument, 0, O_ENV },       { "restore", no_argument, 0, O_RESTORE },
		{ 0, 0, 0, 0 },
	};
	*o = (struct opts){ .pidns = true, .rows = 24, .cols = 80 };
	opterr = 0; /* getopt would name argv[0], which may be a long path */
	int c;
	/* "+": stop at PROGRAM, whose own options are not ours even without "--". */
	while ((c = getopt_long(argc, argv, "+", longopts, NULL)) != -1) {
		switch (c) {
		case O_CTL: o->ctl = optarg; break;
		case O_PTY: o->pty = true; break;
		case O_ROWS: o->rows = (unsigned short)parse_num("rows", optarg, 10, 65535); break;
		case O_COLS: o->cols = (unsigned short)parse_num("cols", optarg, 10, 65535); break;
		case O_UID: o->uid = (uid_t)parse_num("uid", optarg, 10, (uid_t)-2); o->set_uid = true; break;
		case O_GID: o->gid = (gid_t)parse_num("gid", optarg, 10, (gid_t)-2); o->set_gid = true; break;
		case O_GROUPS: parse_groups(o, optarg); break;
		case O_UMASK: o->mask = (mode_t)parse_num("umask", optarg, 8, 0777); o->set_umask = true; break;
		case O_CWD: o->cwd = optarg; break;
		case O_NOPIDNS: o->pidns = false; break;
		case O_ENV: o->env_stdin = true; break;
		case O_RESTORE: o->restore = true; break;
		default: usage_error("bad option '%s' (unknown, or missing its value)", argv[optind - 1]);
		}
	}
	if (!o->ctl)
		usage_error("--ctl PATH is required (usage: krg-init --ctl PATH [options] -- PROGRAM [ARG...])");
	if (strlen(o->ctl) >= sizeof(((struct sockaddr_un *)0)->sun_path))
		usage_error("--ctl: path too long for a Unix socket: %s", o->ctl);
	if (optind >= argc)
		usage_error("no PROGRAM given (usage: krg-init --ctl PATH [options] -- PROGRAM [ARG...])");
	o->argv = argv + optind;
	/* A restored job keeps the credentials, cwd, environment and namespace it was dumped with.
	 * And the restorer runs as root: it must never get a user's environment (LD_PRELOAD...). */
	const char *moot = !o->restore ? NULL
			   : o->set_uid ? "--uid" : o->set_gid ? "--gid" : o->set_groups ? "--groups"
			   : o->set_umask ? "--umask" : o->cwd ? "--cwd" : !o->pidns ? "--no-pidns"
			   : o->env_stdin ? "--env-stdin" : NULL;
	if (moot)
		usage_error("%s cannot be used with --restore (the restored job keeps what was dumped)", moot);
	if (o->env_stdin) /* only once the arguments are known good */
		o->env = read_env();
}

/* ---- launcher ----------------------------------------------------------------------------- */

/* With 0, 1 or 2 closed, a pipe could land there and be clobbered by C1's dup2()s. */
static void ensure_std_fds(void)
{
	for (int fd = 0; fd < 3; fd++) {
		if (fcntl(fd, F_GETFD) >= 0 || errno != EBADF)
			continue;
		int n = open("/dev/null", O_RDWR);
		if (n != fd)
			die("cannot open /dev/null on fd %d", fd);
	}
}

static void make_pty(struct stdio *s, const struct opts *o)
{
	int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (m < 0)
		die("posix_openpt");
	if (grantpt(m) < 0 || unlockpt(m) < 0)
		die("cannot unlock the pty");
	const char *name = ptsname(m);
	if (!name)
		die("ptsname");
	/* O_NOCTTY: the slave must become C1's controlling terminal, never the launcher's. */
	int slave = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (slave < 0)
		die("cannot open %s", name);
	struct winsize ws = { .ws_row = o->rows, .ws_col = o->cols };
	if (ioctl(m, TIOCSWINSZ, &ws) < 0)
		die("cannot set the window size");
	s->job[0] = s->job[1] = s->job[2] = slave;
	s->ours[0] = m;
	s->nours = 1;
}

static void make_pipes(struct stdio *s)
{
	int p[3][2];
	for (int i = 0; i < 3; i++)
		if (pipe2(p[i], O_CLOEXEC) < 0)
			die("pipe");
	s->job[0] = p[0][0], s->ours[0] = p[0][1];
	s->job[1] = p[1][1], s->ours[1] = p[1][0];
	s->job[2] = p[2][1], s->ours[2] = p[2][0];
	s->nours = 3;
}

static int make_ctl(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	memcpy(sa.sun_path, path, strlen(path) + 1);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		die("socket");
	if (unlink(path) < 0 && errno != ENOENT)
		die("cannot remove %s", path);
	/* Created 0600 by bind() itself: a chmod() afterwards would leave a window. */
	mode_t old = umask(0177);
	int r = bind(fd, (struct sockaddr *)&sa, sizeof sa);
	int err = errno;
	umask(old);
	errno = err;
	if (r < 0)
		die("cannot bind %s", path);
	unlink_on_failure = path;
	if (listen(fd, 8) < 0)
		die("listen on %s", path);
	return fd;
}

/* The shepherd writes "started\n" or its reason for failing; EOF alone means it died. */
static int await_shepherd(int fd, pid_t shepherd)
{
	char buf[512];
	size_t n = 0;
	while (n < sizeof buf - 1 && !memchr(buf, '\n', n)) {
		ssize_t r = read(fd, buf + n, sizeof buf - 1 - n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		n += (size_t)r;
	}
	buf[n] = '\0';
	if (strcmp(buf, "started\n") == 0)
		return 0;
	while (waitpid(shepherd, NULL, 0) < 0 && errno == EINTR)
		;
	buf[strcspn(buf, "\n")] = '\0';
	say(2, 0, "krg-init: %s", n ? buf : "the shepherd died during start-up");
	launch_failed();
}

/* ---- C2: becomes PROGRAM ------------------------------------------------------------------ */

/* Signals ignored by the shepherd (SIGHUP, SIGPIPE) would otherwise stay ignored across exec. */
static void reset_signals(void)
{
	struct sigaction dfl = { .sa_handler = SIG_DFL };
	for (int sig = 1; sig < NSIG; sig++) {
		if (sig == SIGKILL || sig == SIGSTOP)
			continue;
		/* EINVAL: the signals glibc reserves for itself; there is nothing to reset. */
		if (sigaction(sig, &dfl, NULL) < 0 && errno != EINVAL)
			job_fail(126, "krg-init: cannot reset signal %d: %s", sig, strerror(errno));
	}
	sigset_t none;
	sigemptyset(&none);
	if (sigprocmask(SIG_SETMASK, &none, NULL) < 0)
		job_fail(126, "krg-init: cannot unblock signals: %s", strerror(errno));
}

/* Groups and gid first: after setuid() we would no longer be allowed to change them. */
static void switch_ids(const struct opts *o)
{
	if (o->set_groups || o->set_uid) {
		size_t n = o->set_groups ? o->ngroups : 0;
		if (setgroups(n, o->groups) < 0)
			job_fail(126, "krg-init: cannot set supplementary groups: %s", strerror(errno));
	}
	if (o->set_gid && setgid(o->gid) < 0)
		job_fail(126, "krg-init: cannot switch to gid %u: %s", (unsigned)o->gid, strerror(errno));
	if (o->set_uid && setuid(o->uid) < 0)
		job_fail(126, "krg-init: cannot switch to uid %u: %s", (unsigned)o->uid, strerror(errno));
}

/* Messages and exit statuses as bash gives them, so that jobs fail like shell commands. */
static _Noreturn void exec_failed(const char *cmd, int err)
{
	const char *why = strerror(err);
	int code = 126;
	if (err == ENOENT) {
		code = 127;
		why = strchr(cmd, '/') ? "No such file or directory" : "command not found";
	} else if (err == EACCES) {
		why = "Permission denied";
	} else if (err == ENOEXEC) {
		why = "cannot execute binary file: Exec format error";
	}
	job_fail(code, "krg: %s: %s", cmd, why);
}

static _Noreturn void run_program(const struct opts *o)
{
	if (setpgid(0, 0) < 0)
		job_fail(126, "krg-init: setpgid: %s", strerror(errno));
	/* From the background, tcsetpgrp() raises SIGTTOU: C1 forked us with it still blocked,
	 * and reset_signals() unblocks it only once we are the terminal's foreground group. */
	if (o->pty && tcsetpgrp(0, getpid()) < 0)
		job_fail(126, "krg-init: cannot take the terminal: %s", strerror(errno));
	reset_signals();
	if (close(STATUS_FD) < 0)
		job_fail(126, "krg-init: close: %s", strerror(errno));
	switch_ids(o);
	if (o->set_umask)
		umask(o->mask);
	if (o->cwd && chdir(o->cwd) < 0)
		job_fail(1, "krg: cd: %s: %s", o->cwd, strerror(errno));
	if (o->env)
		environ = o->env; /* before execvp(): its PATH lookup must use the job's PATH */
	execvp(o->argv[0], o->argv);
	exec_failed(o->argv[0], errno);
}

/* ---- C1: the namespace's init ------------------------------------------------------------- */

/* C1 has no status to give when it fails itself: the shepherd then reports "exit code 255". */
static _Noreturn void init_fail(const char *what)
{
	say(2, errno, "krg-init: init: %s", what);
	_exit(1);
}

static void forward(int sig)
{
	int saved = errno;
	pid_t pid = program_pid;
	/* The group may not exist yet (C2 not past setpgid) or may be gone: then the pid alone. */
	if (pid > 0 && kill(-pid, sig) < 0)
		kill(pid, sig);
	errno = saved;
}

static void close_fds_from(int first)
{
	if (close_range((unsigned)first, ~0U, 0) == 0)
		return;
	long max = sysconf(_SC_OPEN_MAX); /* kernels before 5.9 */
	for (long fd = first; fd < (max > 0 ? max : 1024); fd++)
		close((int)fd);
}

static void close_other_fds(void)
{
	close_fds_from(STATUS_FD + 1);
}

static void take_stdio(const struct opts *o, const struct stdio *s, int status_fd)
{
	if (setsid() < 0)
		init_fail("setsid");
	if (o->pty && ioctl(s->job[0], TIOCSCTTY, 0) < 0)
		init_fail("cannot make the pty our controlling terminal");
	for (int i = 0; i < 3; i++)
		if (dup2(s->job[i], i) < 0)
			init_fail("dup2");
	if (dup2(status_fd, STATUS_FD) < 0 || fcntl(STATUS_FD, F_SETFD, FD_CLOEXEC) < 0)
		init_fail("status pipe");
	/* Nothing of krgd's or the shepherd's may leak into the job (nor into a CRIU dump). */
	close_other_fds();
}

static _Noreturn void init_main(const struct opts *o, const struct stdio *s, int status_fd)
{
	take_stdio(o, s, status_fd);
	/* Without a PID namespace C1 is no init: be the orphans' reaper all the same. */
	if (!o->pidns && prctl(PR_SET_CHILD_SUBREAPER, 1) < 0)
		init_fail("PR_SET_CHILD_SUBREAPER");
	/* The forwarded signals are still blocked (the shepherd did it before fork): an init
	 * without a handler would drop them, blocked they wait until program_pid is known. */
	struct sigaction sa = { .sa_handler = forward, .sa_flags = SA_RESTART };
	sigemptyset(&sa.sa_mask);
	for (size_t i = 0; i < NFWD; i++)
		sigaddset(&sa.sa_mask, fwd_signals[i]);
	for (size_t i = 0; i < NFWD; i++)
		if (sigaction(fwd_signals[i], &sa, NULL) < 0)
			init_fail("sigaction");
	pid_t pid = fork();
	if (pid < 0)
		init_fail("fork");
	if (pid == 0)
		run_program(o);
	program_pid = pid;
	setpgid(pid, pid); /* also done by C2; whoever is first closes the race, errors are moot */
	sigset_t none;
	sigemptyset(&none);
	if (sigprocmask(SIG_SETMASK, &none, NULL) < 0)
		init_fail("sigprocmask");

	int st;
	for (;;) {
		pid_t p = waitpid(-1, &st, 0);
		if (p == pid)
			break;
		if (p < 0 && errno != EINTR)
			init_fail("waitpid");
	}
	if (write(STATUS_FD, &st, sizeof st) != (ssize_t)sizeof st)
		init_fail("cannot report the exit status");
	_exit(0); /* as pid 1, this makes the kernel kill whatever is left in the namespace */
}

/* ---- shepherd: control socket ------------------------------------------------------------- */

static void drop_client(struct shepherd *sh)
{
	if (close(sh->client) < 0)
		warn_("close client: %s", strerror(errno));
	sh->client = -1;
	sh->len = 0;
	sh->told = false;
}

/* Lines are tiny and the socket buffer is empty when we send: EAGAIN means a client that does
 * not read, and dropping it beats blocking the shepherd on it. */
static bool send_msg(struct shepherd *sh, const char *line, const int *fds, int nfds)
{
	union {
		char buf[CMSG_SPACE(3 * sizeof(int))];
		struct cmsghdr align;
	} u = { 0 };
	struct iovec iov = { .iov_base = (void *)line, .iov_len = strlen(line) };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (nfds) {
		msg.msg_control = u.buf;
		msg.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
		struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
		memcpy(CMSG_DATA(c), fds, (size_t)nfds * sizeof(int));
	}
	if (sendmsg(sh->client, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) == (ssize_t)iov.iov_len)
		return true;
	warn_("cannot send to the client (%s): dropping it", strerror(errno));
	drop_client(sh);
	return false;
}

static void tell_exit(struct shepherd *sh)
{
	if (!sh->ended || sh->client < 0 || sh->told)
		return;
	char line[64];
	if (WIFSIGNALED(sh->status))
		snprintf(line, sizeof line, "exit signal %d\n", WTERMSIG(sh->status));
	else
		snprintf(line, sizeof line, "exit code %d\n", WEXITSTATUS(sh->status));
	sh->told = send_msg(sh, line, NULL, 0);
}

static void accept_client(struct shepherd *sh)
{
	int fd = accept4(sh->lsock, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
	if (fd < 0) {
		if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
			warn_("accept: %s", strerror(errno));
		return;
	}
	sh->client = fd;
	char hello[64];
	snprintf(hello, sizeof hello, "hello %d %d\n", (int)sh->c1, sh->s->nours);
	if (send_msg(sh, hello, sh->s->ours, sh->s->nours))
		tell_exit(sh);
}

/* Later clients still get three fds in hello: stdin's slot becomes a pipe with no reader, so
 * their writes fail with EPIPE instead of reaching a closed stdin. */
static void close_stdin(struct shepherd *sh)
{
	if (sh->o->pty || sh->stdin_closed)
		return;
	int p[2];
	if (pipe2(p, O_CLOEXEC) < 0) {
		warn_("eof: cannot make a placeholder pipe: %s", strerror(errno));
		return;
	}
	if (close(p[0]) < 0 || close(sh->s->ours[0]) < 0)
		warn_("eof: close: %s", strerror(errno));
	sh->s->ours[0] = p[1];
	sh->stdin_closed = true;
}

static void handle_line(struct shepherd *sh, const char *line)
{
	if (strcmp(line, "eof") == 0)
		close_stdin(sh);
	else if (strcmp(line, "ack") == 0 && sh->told) {
		if (unlink(sh->o->ctl) < 0)
			warn_("cannot remove %s: %s", sh->o->ctl, strerror(errno));
		exit(0); /* closes the socket, the client and the stdio we kept */
	} else if (strcmp(line, "ack") == 0)
		warn_("ack before the exit status was sent: ignored");
	else
		warn_("unknown control line '%.60s': ignored", line);
}

static void read_client(struct shepherd *sh)
{
	ssize_t r = recv(sh->client, sh->line + sh->len, sizeof sh->line - sh->len, 0);
	if (r < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (r <= 0) {
		drop_client(sh); /* gone without ack: keep running for the next one */
		return;
	}
	sh->len += (size_t)r;
	char *nl;
	while (sh->client >= 0 && (nl = memchr(sh->line, '\n', sh->len))) {
		*nl = '\0';
		if (nl > sh->line && nl[-1] == '\r')
			nl[-1] = '\0';
		handle_line(sh, sh->line);
		sh->len -= (size_t)(nl + 1 - sh->line);
		memmove(sh->line, nl + 1, sh->len);
	}
	if (sh->len == sizeof sh->line) {
		warn_("control line too long: dropping the client");
		drop_client(sh);
	}
}

/* ---- shepherd: job status ----------------------------------------------------------------- */

static void read_status(struct shepherd *sh)
{
	int st;
	ssize_t r = read(sh->status_fd, &st, sizeof st);
	if (r < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (r == (ssize_t)sizeof st) { /* a write of 4 bytes to a pipe is atomic: never split */
		sh->status = st;
		sh->have_status = true;
		return;
	}
	if (r < 0)
		warn_("status pipe: %s", strerror(errno));
	close(sh->status_fd);
	sh->status_fd = -1;
}

static void reap_children(struct shepherd *sh)
{
	struct signalfd_siginfo si;
	while (read(sh->sigfd, &si, sizeof si) > 0)
		; /* only a wake-up: waitpid() below says who exited */
	int st;
	pid_t p;
	while ((p = waitpid(-1, &st, WNOHANG)) > 0) {
		if (p != sh->c1)
			continue;
		/* C1 wrote the status before exiting, so it is in the pipe already if it exists. */
		if (sh->status_fd >= 0 && !sh->have_status)
			read_status(sh);
		if (!sh->have_status)
			sh->status = WIFSIGNALED(st) ? WTERMSIG(st) : 255 << 8; /* raw wait statuses */
		sh->ended = true;
		tell_exit(sh);
	}
	if (p < 0 && errno != ECHILD && errno != EINTR)
		warn_("waitpid: %s", strerror(errno));
}

static _Noreturn void serve(struct shepherd *sh)
{
	for (;;) {
		bool has_client = sh->client >= 0;
		struct pollfd p[3] = {
			{ .fd = sh->sigfd, .events = POLLIN },
			{ .fd = sh->status_fd, .events = POLLIN }, /* -1 once closed: poll skips it */
			{ .fd = has_client ? sh->client : sh->lsock, .events = POLLIN },
		};
		if (poll(p, 3, -1) < 0) {
			if (errno != EINTR) {
				warn_("poll: %s", strerror(errno));
				poll(NULL, 0, 100); /* ENOMEM: try again rather than lose the job */
			}
			continue;
		}
		if (p[1].revents && sh->status_fd >= 0)
			read_status(sh);
		if (p[0].revents)
			reap_children(sh);
		if (p[2].revents && has_client && sh->client == p[2].fd)
			read_client(sh);
		else if (p[2].revents && !has_client)
			accept_client(sh);
	}
}

/* A shepherd start-up failure goes to the launcher, which prints it and exits 1. */
static _Noreturn void shepherd_fail(int ready, const char *what)
{
	say(ready, errno, "%s", what);
	_exit(1);
}

/* ---- shepherd: --restore ------------------------------------------------------------------ */

/* The restorer's fds (see the header); R_NFDS and above are closed. */
enum { R_RESULT = 1, R_STDIN = 3, R_STDOUT, R_STDERR, R_STATUS, R_STDIN_W, R_NFDS };

/* In the restorer before exec: its failures are its answer, on the result pipe. */
static _Noreturn void restorer_fail(int fd, const char *what, int err)
{
	dprintf(fd, "error %s: %s\n", what, strerror(err));
	_exit(127);
}

static _Noreturn void run_restorer(const struct opts *o, const struct stdio *s, int status_w,
				   int result_w)
{
	int src[R_NFDS];
	for (int i = 0; i < R_NFDS; i++)
		src[i] = -1;
	src[0] = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (src[0] < 0)
		restorer_fail(result_w, "cannot open /dev/null", errno);
	src[R_RESULT] = result_w;
	src[2] = 2;
	src[R_STDIN] = s->job[0]; /* the pty slave with --pty */
	src[R_STATUS] = status_w;
	if (!o->pty) {
		src[R_STDOUT] = s->job[1];
		src[R_STDERR] = s->job[2];
		src[R_STDIN_W] = s->ours[0];
	}
	/* First every source above the targets, so that no dup2() clobbers one still needed. */
	for (int i = 0; i < R_NFDS; i++)
		if (src[i] >= 0 && (src[i] = fcntl(src[i], F_DUPFD_CLOEXEC, R_NFDS)) < 0)
			restorer_fail(result_w, "dup", errno);
	/* result_w itself may be overwritten now: its dup (>= R_NFDS) is not. */
	for (int i = 0; i < R_NFDS; i++) {
		if (src[i] >= 0 ? dup2(src[i], i) < 0 : close(i) < 0 && errno != EBADF)
			restorer_fail(src[R_RESULT], "dup2", errno);
	}
	close_fds_from(R_NFDS); /* the dups, the originals, the control socket, ... */
	reset_signals();
	execvp(o->argv[0], o->argv);
	char what[300];
	snprintf(what, sizeof what, "cannot run %s", o->argv[0]);
	restorer_fail(R_RESULT, what, errno);
}

/* Printable and short: it becomes one line of the launcher's stderr. */
static void clean_line(char *dst, size_t size, const char *src)
{
	size_t n = 0;
	for (; *src && *src != '\n' && n + 1 < size; src++)
		dst[n++] = ((unsigned char)*src < 0x20 || *src == 0x7f) ? '?' : *src;
	dst[n] = '\0';
}

/* The restored init's parent, from /proc/PID/stat (0 if it is gone). */
static pid_t parent_of(pid_t pid)
{
	char path[64], buf[512];
	snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = '\0';
	char *p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
	int ppid;
	return p && sscanf(p + 1, " %*c %d", &ppid) == 1 ? (pid_t)ppid : 0;
}

/* Runs the restorer and returns the restored init, our child now; or fails the start-up with
 * "restore failed: ..." (after killing the restored tree if it is ours). */
static pid_t restore_job(const struct opts *o, const struct stdio *s, int status_w, int ready)
{
	if (prctl(PR_SET_CHILD_SUBREAPER, 1) < 0)
		shepherd_fail(ready, "PR_SET_CHILD_SUBREAPER");
	int res[2];
	if (pipe2(res, O_CLOEXEC) < 0)
		shepherd_fail(ready, "pipe");
	pid_t r = fork();
	if (r < 0)
		shepherd_fail(ready, "fork");
	if (r == 0)
		run_restorer(o, s, status_w, res[1]);
	close(res[1]);

	char out[1024], junk[256];
	size_t n = 0;
	for (;;) { /* to EOF: whatever does not fit is read and dropped */
		ssize_t got = n < sizeof out - 1 ? read(res[0], out + n, sizeof out - 1 - n)
						  : read(res[0], junk, sizeof junk);
		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0)
			break;
		if (n < sizeof out - 1)
			n += (size_t)got;
	}
	out[n] = '\0';
	close(res[0]);
	int st;
	while (waitpid(r, &st, 0) < 0)
		if (errno != EINTR)
			shepherd_fail(ready, "waitpid for the restorer");

	char why[400], line[300];
	clean_line(line, sizeof line, out);
	pid_t pid = 0;
	if (strncmp(line, "restored ", 9) == 0 && line[9] >= '1' && line[9] <= '9') {
		char *end;
		errno = 0;
		long v = strtol(line + 9, &end, 10);
		if (!errno && !*end && v <= 0x7fffffff)
			pid = (pid_t)v;
	}
	if (strncmp(line, "error", 5) == 0 && (!line[5] || line[5] == ' '))
		snprintf(why, sizeof why, "%s", line[5] && line[6] ? line + 6 : "the restorer gave no reason");
	else if (WIFSIGNALED(st))
		snprintf(why, sizeof why, "the restorer was killed by signal %d", WTERMSIG(st));
	else if (WEXITSTATUS(st))
		snprintf(why, sizeof why, "the restorer exited with status %d", WEXITSTATUS(st));
	else if (!pid)
		snprintf(why, sizeof why, *line ? "unexpected answer from the restorer: '%.200s'"
						: "the restorer gave no answer", line);
	else if (parent_of(pid) != getpid())
		snprintf(why, sizeof why, "pid %d is not the shepherd's child", (int)pid);
	else
		return pid;

	/* Ours only: never kill a pid that a faulty restorer named but that we do not own. */
	if (pid && parent_of(pid) == getpid() && kill(pid, SIGKILL) == 0)
		while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
			;
	say(ready, 0, "restore failed: %s", why);
	_exit(1);
}

static _Noreturn void shepherd_main(const struct opts *o, struct stdio *s, int lsock, int ready)
{
	/* Own session and no SIGHUP: krgd's death or its terminal's hang-up must not take us down. */
	if (setsid() < 0)
		shepherd_fail(ready, "setsid");
	struct sigaction ign = { .sa_handler = SIG_IGN }, dfl = { .sa_handler = SIG_DFL };
	/* SIGCHLD may be inherited as ignored, which would make the kernel reap C1 for us. */
	if (sigaction(SIGHUP, &ign, NULL) < 0 || sigaction(SIGPIPE, &ign, NULL) < 0 ||
	    sigaction(SIGCHLD, &dfl, NULL) < 0)
		shepherd_fail(ready, "sigaction");
	/* stderr stays for our diagnostics, unless it is a pipe: that is a caller reading the
	 * launcher's error to EOF, which must not wait for the whole life of the job. */
	struct stat err;
	bool err_pipe = fstat(2, &err) == 0 && S_ISFIFO(err.st_mode);
	int null = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0 || (err_pipe && dup2(null, 2) < 0) ||
	    close(null) < 0)
		shepherd_fail(ready, "cannot redirect to /dev/null");

	sigset_t chld, startup;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	startup = chld;
	for (size_t i = 0; i < NFWD; i++)
		sigaddset(&startup, fwd_signals[i]);
	if (sigprocmask(SIG_SETMASK, &startup, NULL) < 0)
		shepherd_fail(ready, "sigprocmask");
	int sigfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
	if (sigfd < 0)
		shepherd_fail(ready, "signalfd");
	/* --restore: CRIU makes the restored init's PID namespace. */
	if (o->pidns && !o->restore && unshare(CLONE_NEWPID) < 0)
		shepherd_fail(ready, "cannot create a PID namespace (unshare; try --no-pidns)");
	int st[2];
	if (pipe2(st, O_CLOEXEC | O_NONBLOCK) < 0)
		shepherd_fail(ready, "pipe");
	pid_t c1 = o->restore ? restore_job(o, s, st[1], ready) : fork();
	if (c1 < 0)
		shepherd_fail(ready, "fork");
	if (c1 == 0)
		init_main(o, s, st[1]);

	/* Only the job may hold its ends, or the client would never see EOF on stdout/stderr. */
	int theirs[] = { st[1], s->job[0], o->pty ? -1 : s->job[1], o->pty ? -1 : s->job[2] };
	for (size_t i = 0; i < sizeof theirs / sizeof theirs[0]; i++)
		if (theirs[i] >= 0 && close(theirs[i]) < 0)
			warn_("close: %s", strerror(errno));
	if (sigprocmask(SIG_SETMASK, &chld, NULL) < 0)
		warn_("sigprocmask: %s", strerror(errno));
	if (write(ready, "started\n", 8) != 8 || close(ready) < 0)
		warn_("cannot tell the launcher we started: %s", strerror(errno));

	struct shepherd sh = {
		.o = o, .s = s, .lsock = lsock, .client = -1, .sigfd = sigfd, .status_fd = st[0], .c1 = c1,
	};
	serve(&sh);
}

int main(int argc, char **argv)
{
	struct opts o;
	struct stdio s;
	parse_args(&o, argc, argv);
	ensure_std_fds();
	if (o.pty)
		make_pty(&s, &o);
	else
		make_pipes(&s);
	int lsock = make_ctl(o.ctl);
	int ready[2];
	if (pipe2(ready, O_CLOEXEC) < 0)
		die("pipe");
	pid_t pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0) {
		close(ready[0]); /* the shepherd only writes */
		shepherd_main(&o, &s, lsock, ready[1]);
	}
	if (close(ready[1]) < 0)
		die("close");
	return await_shepherd(ready[0], pid);
}
