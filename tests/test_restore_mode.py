"""krg-init --restore with checkpoint/restorer.py: a job dumped by CRIU comes back under a NEW
shepherd that owns it as if it had started it (hello with fds, exit line, eof, ack).

All on this one machine with the real binaries: a job is started by a normal krg-init, dumped with
checkpoint.criu.dump() (which kills it: its shepherd reports "exit signal 9"), then restored by
`krg-init --ctl NEW --restore -- python -m checkpoint.restorer --images DIR`. As in
tests/test_checkpoint.py, the test process is a child subreaper, so both shepherds (orphaned by
their launchers) are its children and are reaped here, and every test ends by checking with
pgrep that nothing under its unique temp dir is left (the dir is in every krg-init's argv, the
control sockets, and in every program's: `sh -c SCRIPT DIR`; restored processes keep theirs).
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoint import criu
from krg_init_driver import (TICKER, TIMEOUT, Lab, Shepherd, alive, children, mark, nspids,
                             numbers, proc_stat, read_to_eof, read_until, wait_for)
# Fixtures: pytest finds them by name in this module (criu_ready requests as_root).
from krg_init_driver import as_root, criu_ready, krg_init, subreaper  # noqa: F401

RESTORER = [sys.executable, "-m", "checkpoint.restorer"]  # .venv/bin/python under `make test`
COUNTER = "i=0; while :; do echo $i; i=$((i+1)); sleep 0.05; done"

criu_test = mark("criu", "real CRIU dumps and restores (root, CRIU 4)")
root_test = mark("root", "needs root (setuid to other users, privileged operations)")


class RestoreLab(Lab):
    """Starts, dumps and restores jobs for one test under one temp dir; cleans up after it."""

    def __init__(self, binary):
        super().__init__(binary, "krgrs-")

    def start(self, script, *opts):
        """A job under a normal krg-init, `sh -c SCRIPT DIR`."""
        return self.shell(script, *opts)

    def _restoring(self):
        """The job a `krg-init --restore` makes: a new socket, and a log that the shepherd keeps
        for its (and the restorer's) stderr."""
        return Shepherd(self.path("ctl"), self.path("restore-log"))

    def run_restore(self, *opts, restorer, stderr=subprocess.PIPE, env=None):
        """`krg-init --ctl NEW [opts] --restore -- RESTORER...`: (CompletedProcess, ctl)."""
        job = self._restoring()
        r = job.run_launcher(self.binary, restorer, [*opts, "--restore"], stderr=stderr, env=env,
                             timeout=TIMEOUT + 30, cwd=self.tmp)
        return r, job.ctl

    def restore(self, images, *opts, restorer_args=(), restorer=None, env=None):
        """A successful restore under a new shepherd, connected: the new job."""
        job = self._restoring()
        self.jobs.append(job)
        return job.launch(self.binary, restorer or [*RESTORER, "--images", images, *restorer_args],
                          [*opts, "--restore"], env=env, timeout=TIMEOUT + 30, cwd=self.tmp)

    def move(self, job, **dump_opts):
        """Dump job (CRIU kills it): its shepherd reports signal 9 and is acked. Returns the
        images and everything the job wrote on stdout up to the dump (old pipe read to EOF)."""
        images = self.images()
        criu.dump(job.c1, images, **dump_opts)
        assert job.finish() == "exit signal 9"
        return images, read_to_eof(job.fds[1] if len(job.fds) > 1 else job.fds[0])


@pytest.fixture
def lab(criu_ready, krg_init, subreaper):
    lab = RestoreLab(krg_init)
    yield lab
    lab.close()


@pytest.fixture
def bare_lab(as_root, krg_init, subreaper):
    """For restores that fail before CRIU is ever asked."""
    lab = RestoreLab(krg_init)
    yield lab
    lab.close()


def assert_owned(job, before=None):
    """The restored init: PID 1 of its namespace, the new shepherd's child, the program (pid 2)
    in its session."""
    assert nspids(job.c1)[-1] == 1
    assert proc_stat(job.c1)[1] == job.shepherd and proc_stat(job.c1)[3] == job.c1
    [c2] = children(job.c1)
    assert nspids(c2)[-1] == 2 and proc_stat(c2)[3] == job.c1
    if before is not None:
        assert job.c1 != before
    return c2


def assert_failed(r, ctl, lab, reason):
    """krg-init --restore refused: status 1, one line, no socket, nothing left running."""
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert err.startswith("krg-init: restore failed: ") and err.count("\n") == 1, err
    assert re.search(reason, err), err
    assert r.stdout == b""
    assert not os.path.exists(ctl)
    assert not lab.leftovers()
    return err


# ---- tests ---------------------------------------------------------------------------------


@criu_test
def test_counter_moves_to_a_new_shepherd(lab):
    job = lab.start(COUNTER)
    first = read_until(job.fds[1], lambda out: len(numbers(out)) >= 5, "the counter to start")
    time.sleep(0.2)  # output left unread in the old pipe: it must reach us from there
    images, rest = lab.move(job)
    before = numbers(first + rest)

    new = lab.restore(images)
    assert len(new.fds) == 3
    c2 = assert_owned(new, before=job.c1)
    after = numbers(read_until(new.fds[1], lambda out: len(numbers(out)) >= 10, "the counter to go on"))
    assert before + after == list(range(len(before) + len(after))), (before[-3:], after[:3])

    os.kill(new.c1, signal.SIGTERM)  # C1 forwards it to the program's group
    assert new.finish() == "exit signal 15"
    assert not alive(c2)
    # Nobody else held the job's ends: the shepherd closed its copies, the restorer and criu
    # have exited. So the new stdout and stderr end with the job.
    read_to_eof(new.fds[1])
    assert read_to_eof(new.fds[2]) == b""
    assert new.log() == ""  # no diagnostics from the shepherd or the restorer


@criu_test
def test_unread_stdin_then_new_input_then_eof(lab):
    # The bytes sit unread in the old stdin pipe when the job is dumped (sh is still sleeping):
    # CRIU saves them, the restorer writes them into the new pipe before anything new.
    job = lab.start("sleep 1; cat")
    os.write(job.fds[0], b"written before the move\n")
    time.sleep(0.1)
    images, rest = lab.move(job)
    assert rest == b""  # cat had not started: the bytes were still in the pipe
    assert list(criu.pipe_data(images).values()) == [b"written before the move\n"]

    new = lab.restore(images)
    assert_owned(new, before=job.c1)
    assert read_until(new.fds[1], lambda out: out.endswith(b"\n"), "the saved bytes") == \
        b"written before the move\n"
    os.write(new.fds[0], b"and after it\n")
    assert read_until(new.fds[1], lambda out: out.endswith(b"\n"), "new input") == b"and after it\n"
    new.close_fd(0)
    assert alive(new.c1)  # the shepherd still holds stdin's write end
    new.send("eof")
    assert read_to_eof(new.fds[1]) == b""
    assert new.finish() == "exit code 0"


@criu_test
def test_job_of_another_user_with_an_empty_environment(lab):
    """uid/gid 65534 (the CRIU here is patched to dump such jobs, docs/criu-notes.md), restored
    the way krgd runs krg-init: an empty environment. CRIU's log goes to --work-dir."""
    job = lab.start("ulimit -n 777; " + COUNTER, "--uid", "65534", "--gid", "65534", "--cwd", "/")
    first = read_until(job.fds[1], lambda out: len(numbers(out)) >= 3, "the counter to start")
    [c2] = children(job.c1)
    limits = Path(f"/proc/{c2}/limits").read_text()
    images, rest = lab.move(job)
    before = numbers(first + rest)

    work = lab.path("work")
    os.mkdir(work)
    new = lab.restore(images, restorer_args=["--work-dir", work], env={})
    c2 = assert_owned(new)
    status = Path(f"/proc/{c2}/status").read_text()
    assert re.search(r"^Uid:\s+65534\s+65534\s+65534\s+65534$", status, re.M)
    assert re.search(r"^Gid:\s+65534\s+65534\s+65534\s+65534$", status, re.M)
    assert Path(f"/proc/{c2}/limits").read_text() == limits
    assert os.path.exists(os.path.join(work, "restore.log"))
    after = numbers(read_until(new.fds[1], lambda out: len(numbers(out)) >= 5, "the counter"))
    assert before + after == list(range(len(before) + len(after)))
    os.kill(new.c1, signal.SIGTERM)
    assert new.finish() == "exit signal 15"


@criu_test
def test_pty_job(lab):
    job = lab.start(f"exec {sys.executable} -c '{TICKER}' {lab.tmp}", "--pty")
    read_until(job.fds[0], lambda out: b"tick 3" in out, "ticks")
    slave = criu.fd_key(job.c1, 0)
    images, _ = lab.move(job, external=[slave])  # the master is the shepherd's: external

    new = lab.restore(images, "--pty", restorer_args=["--pty"])
    assert len(new.fds) == 1
    master = new.fds[0]
    assert_owned(new)
    read_until(master, lambda out: b"tick" in out, "ticks on the new pty")
    assert proc_stat(new.c1)[4] != 0  # C1 has the new pty as its controlling terminal
    os.write(master, b"hello\n")
    read_until(master, lambda out: b"got hello" in out, "input through the new pty")
    os.write(master, b"\x03")  # ^C: SIGINT to the terminal's foreground group, the program
    assert new.finish() == "exit signal 2"


@criu_test
def test_orphans_of_the_restorer_are_reaped_and_ignored(lab):
    """The shepherd is a child subreaper: an orphan the restorer leaves becomes its child. It
    must be reaped (no zombie) and must not count as the job's end."""
    job = lab.start(COUNTER)
    read_until(job.fds[1], lambda out: len(numbers(out)) >= 3, "the counter to start")
    images, _ = lab.move(job)
    marker = f"1.{os.getpid()}"
    restorer = ["/bin/sh", "-c", f'(exec sleep {marker} >/dev/null 2>&1 &); exec "$@"', lab.tmp,
                *RESTORER, "--images", images]
    new = lab.restore(images, restorer=restorer)

    def orphan():
        r = subprocess.run(["pgrep", "-f", f"^sleep {marker}$"], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()]
    [sleep] = wait_for(orphan, "the orphaned sleep")
    assert proc_stat(sleep)[1] == new.shepherd
    wait_for(lambda: proc_stat(sleep) is None, "the shepherd to reap the orphan")
    assert alive(new.c1)
    read_until(new.fds[1], lambda out: len(numbers(out)) >= 3, "the counter to go on")
    os.kill(new.c1, signal.SIGKILL)
    assert new.finish() == "exit signal 9"


@criu_test
def test_images_that_cannot_be_restored(lab):
    job = lab.start(COUNTER)
    read_until(job.fds[1], lambda out: len(numbers(out)) >= 3, "the counter to start")
    images, _ = lab.move(job)
    # Pipes images, restored as a pty job: refused before CRIU is asked.
    r, ctl = lab.run_restore("--pty", restorer=[*RESTORER, "--images", images, "--pty"])
    assert_failed(r, ctl, lab, r"restore failed: the images are of a pipes job: drop --pty\n$")
    # CRIU itself fails: the job's cwd is gone. Its tree is killed, its log named.
    cwd = os.path.dirname(job.ctl)
    os.rename(cwd, cwd + ".gone")
    work = lab.path("work")
    os.mkdir(work)
    r, ctl = lab.run_restore(restorer=[*RESTORER, "--images", images, "--work-dir", work])
    assert_failed(r, ctl, lab, rf"restore failed: criu restore from {images} failed: .*"
                               rf"\(log: {work}/restore.log\)\n$")


@root_test
@pytest.mark.parametrize("kind", ["empty", "missing", "garbage"])
def test_bogus_images_fail_in_one_line(bare_lab, kind):
    images = bare_lab.images()
    if kind == "missing":
        os.rmdir(images)
    elif kind == "garbage":
        Path(images, "pstree.img").write_bytes(b"\x01\x02\x03\x04" * 3)
    scratch = bare_lab.path("tmp")
    os.mkdir(scratch)
    r, ctl = bare_lab.run_restore(restorer=[*RESTORER, "--images", images],
                                  env={**os.environ, "TMPDIR": scratch})
    reason = (r"error|Error|not a CRIU image" if kind == "garbage"
              else rf"no pstree.img in {images}: not a CRIU dump\n$")
    assert_failed(r, ctl, bare_lab, reason)
    assert os.listdir(scratch) == []  # the restorer's empty work dir is not left behind


@root_test
@pytest.mark.parametrize("script, reason", [
    ("exit 3", r"the restorer exited with status 3\n$"),
    ("echo error it broke; exit 1", r"restore failed: it broke\n$"),
    ("echo error; exit 1", r"the restorer gave no reason\n$"),
    ("kill -9 $$", r"the restorer was killed by signal 9\n$"),
    ("echo hi", r"unexpected answer from the restorer: 'hi'\n$"),
    ("true", r"the restorer gave no answer\n$"),
    # A pid that is not ours (the shepherd itself): refused, and never killed.
    ("echo restored $PPID", r"pid \d+ is not the shepherd's child\n$"),
    ("echo restored 99999999999", r"unexpected answer from the restorer"),
])
def test_restorer_failures(bare_lab, script, reason):
    r, ctl = bare_lab.run_restore(restorer=["/bin/sh", "-c", script, bare_lab.tmp])
    assert_failed(r, ctl, bare_lab, reason)


@root_test
def test_restorer_not_found(bare_lab):
    r, ctl = bare_lab.run_restore(restorer=["/nonexistent/krg-restorer"])
    assert_failed(r, ctl, bare_lab,
                  r"restore failed: cannot run /nonexistent/krg-restorer: No such file or directory\n$")


@root_test
def test_restorer_gets_exactly_the_job_fds(bare_lab):
    """Pipes: 0 /dev/null, 1 the result pipe, 2 the shepherd's stderr, 3-7 the job's ends;
    pty: 3 the slave and 6 the status pipe. Nothing else. (It then answers with an error.)"""
    script = ('for fd in 0 1 2 3 4 5 6 7 8 9 10 11 12; do [ -e /proc/$$/fd/$fd ] && '
              'printf "%s=%s " $fd "$(readlink /proc/$$/fd/$fd)" >&2; done; echo >&2; echo error done')
    for opts, expect in [((), r"0=/dev/null 1=pipe:\[(\d+)\] 2=\S+ 3=pipe:\[(\d+)\] "
                               r"4=pipe:\[(\d+)\] 5=pipe:\[(\d+)\] 6=pipe:\[(\d+)\] "
                               r"7=pipe:\[(\d+)\] $"),
                         (("--pty",), r"0=/dev/null 1=pipe:\[(\d+)\] 2=\S+ 3=/dev/pts/\d+ "
                                      r"6=pipe:\[(\d+)\] $")]:
        log = bare_lab.path("log")
        with open(log, "w") as err:
            r, ctl = bare_lab.run_restore(*opts, restorer=["/bin/sh", "-c", script, bare_lab.tmp],
                                          stderr=err)
        assert r.returncode == 1
        seen = Path(log).read_text()
        assert seen.endswith("\nkrg-init: restore failed: done\n")
        m = re.fullmatch(expect, seen.splitlines()[0])
        assert m, seen
        if not opts:  # stdin's two ends are one pipe; the rest are all different
            inodes = m.groups()
            assert inodes[1] == inodes[5] and len(set(inodes)) == 5


@pytest.mark.parametrize("opt", [["--uid", "1"], ["--gid", "1"], ["--groups", "1"],
                                 ["--umask", "22"], ["--cwd", "/"], ["--no-pidns"],
                                 ["--env-stdin"]])
def test_restore_refuses_job_options(krg_init, opt):
    r = subprocess.run([krg_init, "--ctl", "/tmp/krg-unused.sock", *opt, "--restore", "--", "true"],
                       capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    assert r.stderr == f"krg-init: {opt[0]} cannot be used with --restore (the restored job keeps what was dumped)\n"
    assert not os.path.exists("/tmp/krg-unused.sock")
