"""checkpoint/: the versioned store, and real CRIU dumps and restores of krg-init jobs.

The CRIU tests start jobs the way krgd does (kerrighed/libexec/krg-init, the control socket's
hello giving the stdio fds), dump C1 (the PID namespace's init), then restore the tree as a new
shepherd would: new pipes (or a new pty) inherited in place of the old ones, the test process
being the restored root's parent. The test process is a child subreaper for this module, so the
shepherds (orphaned by their launcher) are its children and are reaped here. Every test checks
at the end, with pgrep and by PID namespace, that nothing it started is left.
docs/criu-notes.md explains the behaviours asserted here.
"""
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from checkpoint import criu
from checkpoint.store import (CheckpointCorrupted, CheckpointNotFound, JobMeta, Store,
                              format_description, parse_description)
from kerrighed.errors import KrgError
from krg_init_driver import (TICKER, Lab, children, drain, kill_all, mark, nspids, numbers,
                             proc_stat, read_to_eof, read_until)
# Fixtures: pytest finds them by name in this module (criu_ready requests as_root).
from krg_init_driver import as_root, criu_ready, krg_init, subreaper  # noqa: F401

COUNTER = "i=0; while :; do echo $i; i=$((i+1)); sleep 0.02; done"
criu_test = mark("criu", "real CRIU dumps and restores (root, CRIU 4)")


# ---- the store (no CRIU, no root) -----------------------------------------------------------


def test_store_versions(tmp_path):
    store = Store(tmp_path)
    assert store.versions(42) == []
    v1 = store.new_version(42)
    assert v1.path == tmp_path / "42" / "v1.partial" and v1.path.is_dir()
    job = v1.job(3, 14681298)
    assert job.path == v1.path / "node3" / "job14681298" and job.images.is_dir()
    meta = JobMeta(gpid=14681298, argv=["sh", "-c", "x"], uid=1000, gid=1000, cwd="/home/u",
                   node=3, app=42, caps={"effective": 18}, tty=False,
                   fds={0: "pipe:[11]", 1: "pipe:[12]", 2: "pipe:[13]", 3: "pipe:[14]"})
    job.write_meta(meta)
    assert store.versions(42) == []  # partial: not a checkpoint yet
    when = time.mktime((2026, 11, 5, 9, 3, 1, 0, 0, -1))
    m1 = v1.commit("before the upgrade", date=when)
    assert (m1.appid, m1.version, m1.description) == (42, 1, "before the upgrade")
    assert not (tmp_path / "42" / "v1.partial").exists()
    text = (tmp_path / "42" / "v1" / "description.txt").read_text()
    assert text == ("Identifier: 42\nVersion: 1\nDescription: before the upgrade\n"
                    "Date: Thu Nov  5 09:03:01 2026\n")  # ctime(3), day padded with a space
    assert text == format_description(42, 1, "before the upgrade", "Thu Nov  5 09:03:01 2026")

    v2 = store.new_version(42)
    v2.commit(None)
    assert (v2.path / "description.txt").read_text().splitlines()[2] == "Description: No description"
    assert [v.n for v in store.versions(42)] == [1, 2]
    got = store.get(42, 1)
    assert got.meta() == m1 and got.meta().when.day == 5
    [j] = got.jobs()
    assert (j.node, j.gpid) == (3, 14681298) and j.meta() == meta
    assert store.get(42, 2).meta().description is None
    assert store.latest(42).n == 2

    # A crash mid-checkpoint leaves a partial: ignored, never reused, then cleaned.
    crashed = store.new_version(42)
    (crashed.job(1, 2097153).images / "core-1.img").write_bytes(b"half")
    assert crashed.n == 3 and [v.n for v in store.versions(42)] == [1, 2]
    v4 = store.new_version(42)
    assert v4.n == 4
    v4.abort()  # a failed checkpoint removes its partial vN
    assert not v4.path.exists()
    assert [v.n for v in store.partials(42)] == [3]
    assert store.clean_partials(42) == [3]
    assert not (tmp_path / "42" / "v3.partial").exists()
    assert sorted(p.name for p in (tmp_path / "42").iterdir()) == ["v1", "v2"]
    assert store.new_version(42).n == 3

    with pytest.raises(CheckpointNotFound, match="no checkpoint v7 of application 42"):
        store.get(42, 7)
    with pytest.raises(KrgError, match="not being written"):
        got.commit("again")
    (store.get(42, 2).path / "description.txt").write_text("Identifier: 42\n")
    with pytest.raises(CheckpointCorrupted, match="invalid checkpoint files"):
        store.get(42, 2).meta()


def test_description_lines():
    meta = parse_description("Identifier: 7\nVersion: 3\nDescription: No description\n"
                             "Date: Fri Nov 27 01:55:32 2026\n")
    assert (meta.appid, meta.version, meta.description) == (7, 3, None)
    assert meta.text().endswith("Description: No description\nDate: Fri Nov 27 01:55:32 2026\n")
    # One line each: a description typed with newlines still reads back.
    assert format_description(7, 1, "a\nb", "D").splitlines()[2] == "Description: a b"
    with pytest.raises(ValueError, match="Date"):
        parse_description("Identifier: 7\nVersion: 3\nDescription: x\n")


def test_criu_binary_and_missing_criu(monkeypatch, tmp_path):
    monkeypatch.setenv("KRG_CRIU", "/nonexistent/criu")
    assert criu.criu_binary() == "/nonexistent/criu"
    assert criu.check() is False
    with pytest.raises(criu.CriuError, match=r"^criu not found or not executable: /nonexistent/criu"):
        criu.dump(1, tmp_path)
    monkeypatch.delenv("KRG_CRIU")
    assert criu.criu_binary() == (shutil.which("criu") or criu.DEFAULT_BINARY)


# ---- CRIU: fixtures and helpers -------------------------------------------------------------


class Jobs(Lab):
    """Starts jobs (shell() and python()) and restores trees with CRIU alone for one test;
    cleans up everything after it."""

    def __init__(self, binary):
        super().__init__(binary, "krgck-")
        self.restored = []

    def restore(self, images, **kw):
        pid = criu.restore(images, **kw)
        self.restored.append(pid)
        return pid

    def close(self):
        kill_all(self.restored)  # our children: no shepherd of theirs to end them
        super().close()


@pytest.fixture
def jobs(criu_ready, krg_init, subreaper):
    j = Jobs(krg_init)
    yield j
    j.close()


def new_stdio():
    """New pipes for a restored job: {fd: (ours, the job's)} for 0, 1, 2 and the status pipe."""
    i_r, i_w = os.pipe()
    o_r, o_w = os.pipe()
    e_r, e_w = os.pipe()
    s_r, s_w = os.pipe()
    return {0: (i_w, i_r), 1: (o_r, o_w), 2: (e_r, e_w), 3: (s_r, s_w)}


def restore_job(jobs, images, keys, **kw):
    """Restore onto new pipes; returns (root pid, {fd: our end}). The job's ends are closed
    here once CRIU has given them to the tree, as a shepherd would."""
    stdio = new_stdio()
    try:
        pid = jobs.restore(images, inherit_fds={keys[fd]: theirs for fd, (_, theirs) in stdio.items()},
                           **kw)
    finally:
        for _, theirs in stdio.values():
            os.close(theirs)
    return pid, {fd: ours for fd, (ours, _) in stdio.items()}


# ---- CRIU tests -----------------------------------------------------------------------------


@criu_test
def test_dump_bad_pid_is_one_line_error(criu_ready, tmp_path):
    with pytest.raises(criu.CriuError) as info:
        criu.dump(4194303, tmp_path)  # above pid_max's ceiling: never a process
    err = info.value
    assert isinstance(err, KrgError) and "\n" not in str(err)
    assert str(err).startswith("criu dump of pid 4194303 failed: ")
    assert "No such process" in str(err) and "rlimit" not in str(err)
    assert "Dumping FAILED" in err.log
    assert KrgError.from_wire("CriuError", str(err)).__class__ is criu.CriuError


@criu_test
def test_dump_restore_counter_with_pipes(jobs):
    job = jobs.shell(COUNTER)
    first = read_until(job.fds[1], lambda out: len(numbers(out)) >= 5, "the counter to start")
    time.sleep(0.2)  # unread output piles up in the stdout pipe: it must survive the move
    keys = job.keys()
    assert all(re.fullmatch(r"pipe:\[\d+\]", k) for k in keys.values()), keys
    images = jobs.images()

    stats = criu.dump(job.c1, images)
    assert stats.frozen_time > 0 and stats.pages_written > 0
    assert job.finish() == "exit signal 9"  # the dump killed the tree; the shepherd saw it
    assert criu.root_fd_keys(images) == keys
    # Only pipes whose read end was in the tree have their data saved: stdin here (empty).
    assert criu.pipe_data(images) == {keys[0]: b""}
    before = numbers(first + read_to_eof(job.fds[1]))  # all it wrote up to the dump, then EOF

    pid, ours = restore_job(jobs, images, keys, sibling=True)
    assert proc_stat(pid)[1] == os.getpid()  # sibling: the restorer is the parent
    assert nspids(pid)[-1] == 1  # C1 is PID 1 of a new namespace
    [c2] = children(pid)
    assert nspids(c2)[-1] == 2 and proc_stat(c2)[3] == pid  # in C1's session
    after = numbers(read_until(ours[1], lambda out: len(numbers(out)) >= 10, "the counter to go on"))
    assert before + after == list(range(len(before) + len(after))), (before[-3:], after[:3])

    # The status pipe was re-inherited too: C1 reports the program's end on the new one.
    os.kill(c2, signal.SIGTERM)
    status = int.from_bytes(read_until(ours[3], lambda out: len(out) >= 4, "the status"), "little")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0
    jobs.restored.remove(pid)
    for fd in ours.values():
        os.close(fd)


@criu_test
def test_restore_detached_goes_to_the_subreaper(jobs):
    """Without sibling, the root's parent is criu swrk, which exits: the root is reparented to
    the nearest child subreaper, the caller here. A dump that leaves the job running lets the
    original and the restored copy run side by side (checkpoint, not migration)."""
    job = jobs.shell(COUNTER)
    first = read_until(job.fds[1], lambda out: len(numbers(out)) >= 3, "the counter to start")
    keys = job.keys()
    images = jobs.images()
    criu.dump(job.c1, images, leave_running=True)
    upto = numbers(first + drain(job.fds[1]))  # everything written before the freeze, and more
    still = numbers(read_until(job.fds[1], lambda out: len(numbers(out)) >= 3, "the original to go on"))
    assert upto + still == list(range(len(upto) + len(still)))  # undisturbed

    pid, ours = restore_job(jobs, images, keys, sibling=False)
    assert proc_stat(pid)[1] == os.getpid()
    assert nspids(pid)[-1] == 1 and pid != job.c1
    copy = numbers(read_until(ours[1], lambda out: len(numbers(out)) >= 3, "the copy to run"))
    assert copy == list(range(copy[0], copy[0] + len(copy)))
    assert 0 < copy[0] <= upto[-1] + 1  # the copy resumes at the dump point
    for fd in ours.values():
        os.close(fd)


@criu_test
def test_unread_stdin_must_be_written_again(jobs):
    """CRIU saves what a job had not read from stdin (the read end is in the tree) but does not
    put it into an inherited pipe: the restorer writes criu.pipe_data() into the new pipe."""
    job = jobs.shell("while read l; do echo got $l; sleep 0.05; done")
    os.write(job.fds[0], b"".join(b"%d\n" % i for i in range(20)))
    first = read_until(job.fds[1], lambda out: out.count(b"got") >= 3, "some lines to be read")
    keys = job.keys()
    images = jobs.images()
    criu.dump(job.c1, images)
    assert job.finish() == "exit signal 9"
    before = (first + read_to_eof(job.fds[1])).split(b"\n")[:-1]
    unread = criu.pipe_data(images)[keys[0]]
    # What was left in the pipe: the last lines (one more may have been read but not echoed).
    n = len(unread.split())
    assert unread == b"".join(b"%d\n" % i for i in range(20 - n, 20))
    assert len(before) <= 20 - n <= len(before) + 1

    stdio = new_stdio()
    os.write(stdio[0][0], unread)  # first: it was in the pipe before anything new
    os.close(stdio[0][0])  # then EOF: the loop ends and the job exits 0
    try:
        pid = jobs.restore(images, inherit_fds={keys[fd]: t for fd, (_, t) in stdio.items()},
                           sibling=True)
    finally:
        for _, theirs in stdio.values():
            os.close(theirs)
    after = read_to_eof(stdio[1][0]).split(b"\n")[:-1]
    assert before + after == [b"got %d" % i for i in range(20)]
    _, st = os.waitpid(pid, 0)
    jobs.restored.remove(pid)
    assert os.waitstatus_to_exitcode(st) == 0
    assert read_to_eof(stdio[3][0]) == (0).to_bytes(4, "little")  # the program's exit 0
    for fd in (stdio[1][0], stdio[2][0], stdio[3][0]):
        os.close(fd)


def has_cap(bit: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


CAP_SYS_RESOURCE = 24


@criu_test
def test_job_of_another_user(jobs):
    """A job whose program runs as another uid: CRIU reads every task's rlimits with prlimit(),
    which needs CAP_SYS_RESOURCE for another uid's task. Where it is missing (these machines'
    root lacks it) stock CRIU 4.1.1 cannot dump such a job; scripts/criu-patches/dump-rlimits-from-proc.patch
    makes it read /proc/PID/limits instead."""
    job = jobs.shell("ulimit -n 777; " + COUNTER, "--uid", "65534", "--gid", "65534", "--cwd", "/")
    first = read_until(job.fds[1], lambda out: len(numbers(out)) >= 3, "the counter to start")
    [c2] = children(job.c1)
    limits = Path(f"/proc/{c2}/limits").read_text()
    keys = job.keys()
    images = jobs.images()
    criu.dump(job.c1, images)       # the install builds CRIU with that patch where it is needed
    assert job.finish() == "exit signal 9"
    before = numbers(first + read_to_eof(job.fds[1]))
    pid, ours = restore_job(jobs, images, keys, sibling=True)
    [c2] = children(pid)
    assert Path(f"/proc/{c2}/status").read_text().count("\t65534") >= 8  # Uid and Gid lines
    assert Path(f"/proc/{c2}/limits").read_text() == limits
    after = numbers(read_until(ours[1], lambda out: len(numbers(out)) >= 3, "the counter"))
    assert before + after == list(range(len(before) + len(after)))
    for fd in ours.values():
        os.close(fd)


@criu_test
def test_pty_job(jobs):
    job = jobs.python(TICKER, "--pty")
    master = job.fds[0]
    read_until(master, lambda out: b"tick 3" in out, "ticks")
    keys = job.keys()
    slave = keys[0]
    assert re.fullmatch(r"tty\[[0-9a-f]+:[0-9a-f]+\]", slave) and keys[1] == keys[2] == slave
    images = jobs.images()

    # The pty's master is outside the tree (the shepherd holds it): CRIU refuses by default,
    # and a refused dump leaves the job running.
    with pytest.raises(criu.CriuError, match="without correspond master peer"):
        criu.dump(job.c1, images)
    drain(master)
    read_until(master, lambda out: b"tick" in out, "ticks after the failed dump")

    for f in os.listdir(images):
        os.unlink(os.path.join(images, f))
    criu.dump(job.c1, images, external=[slave])  # or shell_job=True: both work
    assert job.finish() == "exit signal 9"
    assert criu.root_fd_keys(images) == keys

    new_master, new_slave = os.openpty()
    rdev = os.fstat(new_slave).st_rdev
    s_r, s_w = os.pipe()
    try:
        pid = jobs.restore(images, inherit_fds={slave: new_slave, keys[3]: s_w}, sibling=True)
    finally:
        os.close(new_slave)
        os.close(s_w)
    read_until(new_master, lambda out: b"tick" in out, "ticks on the new pty")
    _, ppid, _, session, tty_nr, _ = proc_stat(pid)
    # C1: our child, a session leader, with the new pty as its controlling terminal.
    assert (ppid, session, tty_nr) == (os.getpid(), pid, rdev)
    os.write(new_master, b"hello\n")
    read_until(new_master, lambda out: b"got hello" in out, "input through the new pty")
    [c2] = children(pid)
    # CRIU gives the controlling terminal back to the session leader (C1) only: the program
    # has none after the restore (see docs/criu-notes.md), yet it still holds the foreground.
    assert proc_stat(c2)[4] == 0
    os.write(new_master, b"\x03")  # ^C: SIGINT to the terminal's foreground group
    status = int.from_bytes(read_until(s_r, lambda out: len(out) >= 4, "the status"), "little")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGINT
    os.waitpid(pid, 0)
    jobs.restored.remove(pid)
    os.close(new_master)
    os.close(s_r)


THREADS = r"""
import os, threading, time
lock = threading.Lock()
def count(k):
    n = 0
    while True:
        with lock:
            os.write(1, b"t%d %d\n" % (k, n))
        n += 1
        time.sleep(0.01)
ts = [threading.Thread(target=count, args=(k,)) for k in range(4)]
for t in ts:
    t.start()
for t in ts:
    t.join()
"""


@criu_test
def test_multithreaded_program(jobs):
    job = jobs.python(THREADS)
    first = read_until(job.fds[1], lambda out: out.count(b"t3 ") >= 5, "all threads to count")
    [c2] = children(job.c1)
    assert len(os.listdir(f"/proc/{c2}/task")) == 5
    keys = job.keys()
    images = jobs.images()
    criu.dump(job.c1, images)
    assert job.finish() == "exit signal 9"
    before = first + read_to_eof(job.fds[1])
    pid, ours = restore_job(jobs, images, keys, sibling=True)
    [c2] = children(pid)
    assert len(os.listdir(f"/proc/{c2}/task")) == 5
    after = read_until(ours[1], lambda out: all(out.count(b"t%d " % k) >= 5 for k in range(4)),
                       "all threads to go on")
    seqs = {}
    for line in (before + after).splitlines()[:-1]:  # the last line may be cut
        k, n = line.split()
        seqs.setdefault(k, []).append(int(n))
    assert sorted(seqs) == [b"t0", b"t1", b"t2", b"t3"]
    for k, seq in seqs.items():
        assert seq == list(range(len(seq))), (k, seq)
    assert drain(ours[2]) == b""  # no traceback
    for fd in ours.values():
        os.close(fd)


BIG = r"""
import time
b = bytearray(64 << 20)
for i in range(0, len(b), 4096):
    b[i] = 1
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""
PAGES_64M = (64 << 20) // 4096


@criu_test
def test_dump_stats_of_64mib(jobs):
    job = jobs.python(BIG)
    read_until(job.fds[1], lambda out: b"ready" in out, "the 64 MiB to be touched")
    stats = criu.dump(job.c1, jobs.images(), leave_running=True)
    assert stats.pages_written >= PAGES_64M and stats.pages_scanned >= stats.pages_written
    assert 0 < stats.frozen_time < 10_000_000 and stats.memdump_time > 0
    assert os.path.exists(f"/proc/{job.c1}")


@criu_test
def test_pre_dump_needs_soft_dirty(jobs):
    if criu.can_track_memory():
        pytest.skip("this kernel tracks memory: pre-dumps work (test_pre_dump_then_dump)")
    job = jobs.shell(COUNTER)
    with pytest.raises(criu.CriuError, match="Tracking memory is not available") as info:
        criu.pre_dump(job.c1, jobs.images())
    assert "\n" not in str(info.value)
    read_until(job.fds[1], lambda out: len(numbers(out)) >= 2, "the job to go on")


@criu_test
def test_pre_dump_then_dump(jobs):
    if not criu.can_track_memory():
        pytest.skip("criu: no memory tracking on this kernel (built without CONFIG_MEM_SOFT_DIRTY): "
                    "pre-dumps are impossible")
    job = jobs.python(BIG)
    read_until(job.fds[1], lambda out: b"ready" in out, "the 64 MiB to be touched")
    keys = job.keys()
    pre = jobs.images("pre1")
    final = jobs.images("final")
    s1 = criu.pre_dump(job.c1, pre)
    assert s1.pages_written >= PAGES_64M
    s2 = criu.dump(job.c1, final, parent_dir=pre, track_mem=True)
    assert os.readlink(os.path.join(final, "parent")) == "../pre1"
    assert s2.pages_written < s1.pages_written // 10
    assert s2.pages_skipped_parent >= PAGES_64M - 100
    assert job.finish() == "exit signal 9"
    pid, ours = restore_job(jobs, final, keys, sibling=True)
    assert nspids(pid)[-1] == 1
    for fd in ours.values():
        os.close(fd)
