"""Driving the real krg-init (csrc/krg-init.c) as krgd drives it, for the tests that run it:
tests/test_krg_init.py, tests/test_checkpoint.py and tests/test_restore_mode.py.

One place for what those tests share: building the binary and becoming a child subreaper
(fixtures), running the launcher, the control protocol (`hello PID N` with N fds by SCM_RIGHTS,
then the `exit ...` line, `eof`, `ack`), reading the job's pipes or pty with a deadline, looking
at processes in /proc, and the cleanup that fails a test which leaves a process behind.

A plain module, not a conftest: the test files import what they use, fixtures included (pytest
finds a fixture by its name in the test module, so a fixture another one requests must be
imported too).
"""
import ctypes
import errno
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from checkpoint import criu

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "krg-init.c"
BINARY = ROOT / "kerrighed" / "libexec" / "krg-init"
TIMEOUT = 10.0
PR_SET_CHILD_SUBREAPER = 36
# krgd runs krg-init with an empty environment and hands the job's own on stdin (--env-stdin).
JOB_ENV = b"PATH=/usr/bin:/bin\0"

# A program for pty jobs: ticks, and says what it reads from the terminal.
TICKER = r"""
import os, select, sys
n = 0
while True:
    if select.select([0], [], [], 0.02)[0]:
        print("got", os.read(0, 100).decode().strip(), flush=True)
    print("tick", n, flush=True)
    n += 1
"""


def mark(name, text):
    """pytest.mark.NAME, registered here too: pyproject.toml registers the project's markers, but a
    run from elsewhere may not read it (pytest runs with warnings as errors, and an unknown mark is
    a warning)."""
    config = getattr(pytest.mark, "_config", None)
    if config is not None and not any(m.split(":")[0] == name for m in config.getini("markers")):
        config.addinivalue_line("markers", f"{name}: {text}")
    return getattr(pytest.mark, name)


# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def krg_init():
    """The binary's path, built first if it is missing or older than its source."""
    if not BINARY.exists() or BINARY.stat().st_mtime < SOURCE.stat().st_mtime:
        if shutil.which("cc") is None or shutil.which("make") is None:
            pytest.skip("no C compiler or make to build csrc/krg-init.c")
        r = subprocess.run(["make", "-C", str(ROOT), "native"], capture_output=True, text=True)
        assert r.returncode == 0, f"make native failed:\n{r.stdout}{r.stderr}"
    return str(BINARY)


@pytest.fixture(scope="module")
def subreaper():
    """The test process as a child subreaper: the shepherds, orphaned when their launcher exits,
    become its children, so that tests can reap them and check how they exited."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip(f"cannot become a child subreaper: {os.strerror(ctypes.get_errno())}")
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture(scope="module")
def as_root():
    if os.geteuid() != 0:
        pytest.skip("krg-init jobs and CRIU dumps and restores need root")


@pytest.fixture(scope="module")
def criu_ready(as_root):
    if not os.access(criu.criu_binary(), os.X_OK):
        pytest.skip(f"no CRIU binary at {criu.criu_binary()} (make install builds CRIU 4)")
    if not criu.check():
        pytest.skip(f"CRIU's check failed here ({criu.criu_binary()}): kernel or CRIU too old")


# ---- waiting and reading -------------------------------------------------------------------


def wait_for(cond, what, timeout=TIMEOUT):
    """cond()'s first true value, polled; a timeout fails the test."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
    return value


def read_some(fd, size=65536, timeout=TIMEOUT):
    """os.read that fails the test instead of hanging it; b"" at EOF (and at a pty's EIO)."""
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, f"nothing to read on fd {fd} for {timeout} s"
    try:
        return os.read(fd, size)
    except OSError as e:
        if e.errno != errno.EIO:  # a pty master once the job is gone
            raise
        return b""


def read_to_eof(fd, timeout=TIMEOUT):
    """Everything fd gives until EOF (or a pty's EIO)."""
    out = b""
    while data := read_some(fd, timeout=timeout):
        out += data
    return out


def read_until(fd, pred, what, timeout=TIMEOUT):
    """Read fd until pred(everything read) holds; EOF (or a pty's EIO) before that fails."""
    out, deadline = b"", time.monotonic() + timeout
    while not pred(out):
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], f"timeout waiting for {what}: {out!r}"
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        assert data, f"EOF waiting for {what}: {out!r}"
        out += data
    return out


def drain(fd):
    """What fd has right now, without waiting."""
    out = b""
    while select.select([fd], [], [], 0)[0]:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        out += data
    return out


def numbers(data: bytes) -> list[int]:
    return [int(x) for x in data.split()]


# ---- processes -----------------------------------------------------------------------------


def proc_stat(pid):
    """(state, ppid, pgrp, session, tty_nr, tpgid) of pid, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return (fields[0],) + tuple(int(f) for f in fields[1:6])


def alive(pid) -> bool:
    st = proc_stat(pid)
    return st is not None and st[0] != "Z"


def nspids(pid) -> list[int]:
    """pid in each PID namespace it is in, outermost first."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no NSpid for {pid}")


def children(pid) -> list[int]:
    return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def live_pids_with(marker: bytes):
    """{pid: ppid} of the live processes whose command line holds marker. The shepherd and C1
    keep the launcher's argv (they never exec), so a job's unique control socket path finds
    them all."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        st = proc_stat(entry)
        if marker in cmdline and st and st[0] != "Z":
            found[int(entry)] = st[1]
    return found


def kill_all(pids):
    """The last resort after a failure: SIGKILL pids and reap those that are ours. Our children
    (shepherds) go first."""
    for pid in sorted(pids, key=lambda p: (proc_stat(p) or ("", 0))[1] != os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def sweep(find):
    """Give a test's processes (find() -> their pids) 5 s to go; then SIGKILL what is left and
    fail, naming it."""
    try:
        wait_for(lambda: not find(), "no process of ours left", 5)
    except AssertionError:
        desc = {}
        for pid in (left := find()):
            try:
                desc[pid] = (proc_stat(pid), Path(f"/proc/{pid}/cmdline").read_bytes()[:120])
            except OSError as e:
                desc[pid] = str(e)
        kill_all(left)
        raise AssertionError(f"processes left behind: {desc}") from None


def end_jobs(jobs, find):
    """A test's end: every job's teardown, then sweep(find). What went wrong, as text (a test
    must not stop at the first failure: the rest would be left running)."""
    errors = []
    for job in jobs:
        try:
            job.teardown()
        except Exception as e:
            errors.append(f"{job.ctl}: {e}")
    try:
        sweep(find)
    except AssertionError as e:
        errors.append(str(e))
    return errors


# ---- one job: the launcher, its shepherd, the control protocol -------------------------------


class Conn:
    """One connection to a shepherd's control socket: hello's pid (C1) and fds, then lines."""

    def __init__(self, ctl):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(ctl)
        data, self.fds, flags, _ = socket.recv_fds(self.sock, 4096, 3)
        assert not flags & socket.MSG_CTRUNC
        hello, _, self.buf = data.partition(b"\n")
        word, pid, n = hello.split()
        assert word == b"hello" and int(n) == len(self.fds), hello
        self.pid = int(pid)

    def line(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(4096)
            assert data, "the shepherd closed the control connection"
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def send(self, line):
        self.sock.sendall(line.encode() + b"\n")

    def close_fd(self, i):
        if self.fds[i] >= 0:
            os.close(self.fds[i])
            self.fds[i] = -1

    def close(self):
        for i in range(len(self.fds)):
            self.close_fd(i)
        self.sock.close()


class Shepherd:
    """One krg-init job, started (or restored, with --restore) as krgd does it: the launcher as a
    short subprocess, whose orphan the shepherd is then our child; conn is the first control
    connection, and fds, c1, send and close_fd speak of it."""

    def __init__(self, ctl, log_path):
        self.ctl, self.log_path = ctl, log_path
        self.shepherd = None
        self.conn = None
        self.conns = []

    def run_launcher(self, binary, argv, opts, stderr=None, **kw):
        """`BINARY --ctl CTL OPTS -- ARGV`, to its end: the CompletedProcess."""
        if "input" not in kw:
            kw["stdin"] = subprocess.DEVNULL
        kw.setdefault("timeout", TIMEOUT)
        with open(self.log_path, "w") as log:
            # stderr to a file by default: the shepherd keeps it for its diagnostics.
            return subprocess.run([binary, "--ctl", self.ctl, *opts, "--", *argv],
                                  stdout=subprocess.PIPE, stderr=stderr or log, **kw)

    def launch(self, binary, argv, opts, **kw):
        """Run the launcher, which must succeed; then find the shepherd and connect: self."""
        r = self.run_launcher(binary, argv, opts, **kw)
        assert r.returncode == 0, self.log()
        assert r.stdout == b""  # the shepherd must not hold the launcher's stdout either
        # The launcher is gone, so its orphan the shepherd is now our child (we are a subreaper).
        # The socket path with its NUL is a whole argument: .../ctl1 must not find .../ctl12.
        mine = [p for p, ppid in live_pids_with(self.ctl.encode() + b"\0").items()
                if ppid == os.getpid()]
        assert len(mine) == 1, mine
        self.shepherd = mine[0]
        self.conn = self.connect()
        return self

    def log(self):
        return Path(self.log_path).read_text()

    def connect(self):
        conn = Conn(self.ctl)
        self.conns.append(conn)
        return conn

    @property
    def fds(self):
        return self.conn.fds

    @property
    def c1(self):
        return self.conn.pid

    def send(self, line):
        self.conn.send(line)

    def close_fd(self, i):
        self.conn.close_fd(i)

    def keys(self, fds=range(4)):
        """The CRIU inherit-fd keys of C1's fds, taken before a dump."""
        return {fd: criu.fd_key(self.c1, fd) for fd in fds}

    def finish(self, conn=None):
        """The exit line, then ack; the shepherd must exit 0 and remove its socket."""
        conn = conn or self.conn
        line = conn.line()
        conn.send("ack")
        self.reap()
        assert not os.path.exists(self.ctl)
        return line

    def reap(self, timeout=TIMEOUT):
        def exited():
            pid, status = os.waitpid(self.shepherd, os.WNOHANG)
            return [status] if pid else None  # a list: status 0 must count as done
        [status] = wait_for(exited, "the shepherd to exit", timeout)
        self.shepherd = None
        assert os.waitstatus_to_exitcode(status) == 0, self.log()

    def teardown(self):
        """After a test, whatever state it left the job in: a new connection (the test's may be
        mid-line, or closed), C1 killed if it still runs, the exit line, ack, the shepherd reaped
        with exit 0. A shepherd that fails that is killed and reaped, and the failure raised."""
        for conn in self.conns:
            conn.close()
        if self.shepherd is None:
            return
        try:
            conn = self.connect()
            # Only while it is our shepherd's child: a pid that is gone may be someone else's.
            if alive(conn.pid) and proc_stat(conn.pid)[1] == self.shepherd:
                try:
                    os.kill(conn.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.finish(conn)
        except BaseException:
            if self.shepherd is not None:
                kill_all([self.shepherd])
                self.shepherd = None
            raise
        finally:
            for conn in self.conns:
                conn.close()


class Lab:
    """One test's jobs under one fresh temp dir, the marker that pgrep finds them by: every
    krg-init's argv names its control socket under it, and every program gets it as an argument
    (`sh -c SCRIPT DIR`; restored processes keep theirs). close() ends the jobs and fails the
    test if any process of theirs is left. (PID namespace inodes cannot be used to find them:
    the kernel reuses them.)"""

    def __init__(self, binary, prefix):
        self.binary = binary
        self.tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        self.jobs = []
        self.n = 0

    def path(self, name):
        """A new name under the marker dir."""
        self.n += 1
        return os.path.join(self.tmp, f"{name}{self.n}")

    def launch(self, argv, *opts):
        """A job under a normal krg-init, in its own cwd: C1 keeps the launcher's, and CRIU's
        parasite makes a directory `proc.crtools` there during a dump (docs/criu-notes.md), so
        jobs dumped at the same time need different ones."""
        cwd = self.path("j")
        os.mkdir(cwd)
        job = Shepherd(os.path.join(cwd, "ctl"), os.path.join(self.tmp, f"log{self.n}"))
        self.jobs.append(job)
        return job.launch(self.binary, argv, ["--env-stdin", *opts], input=JOB_ENV, cwd=cwd)

    def shell(self, script, *opts):
        # sh -c SCRIPT NAME: NAME ($0) puts the marker in the program's command line too.
        return self.launch(["/bin/sh", "-c", script, self.tmp], *opts)

    def python(self, program, *opts):
        return self.launch([sys.executable, "-c", program, self.tmp], *opts)

    def images(self, name=None):
        """A new directory for CRIU images: tmp/NAME, or a numbered one."""
        path = os.path.join(self.tmp, name) if name else self.path("img")
        os.mkdir(path)
        return path

    def leftovers(self):
        """Live processes of ours, by command line (pgrep -f the marker). Every C1 and shepherd
        and every program is found; the rest of a job lives in C1's PID namespace and dies
        with it."""
        r = subprocess.run(["pgrep", "-f", self.tmp], capture_output=True, text=True)
        return {pid for pid in map(int, r.stdout.split()) if alive(pid)}

    def close(self):
        try:
            errors = end_jobs(self.jobs, self.leftovers)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        assert not errors, "; ".join(errors)
