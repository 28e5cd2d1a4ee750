"""Unmodified programs launched on the cluster with `krg run`, seen with `krg ps`, signalled with
`krg kill`: real daemons, real krg-init, real programs."""

import hashlib
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import fcntl
import time

import psutil
import pytest

from kerrighed.cli import krg
from kerrighed.ids import gpid_node

from conftest import BIN, NOBODY, run_as, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="jobs run in PID namespaces, which needs root")


def krg_run(cluster, *args, input=None, node=None, timeout=60):
    cmd = [str(BIN / "krg"), "--home", str(cluster.home.path)]
    if node is not None:
        cmd += ["--node", str(node)]
    return subprocess.run([*cmd, "run", *args], input=input, capture_output=True, timeout=timeout)


@pytest.fixture
def popen_krg(cluster):
    """Start `krg` commands in the background; each is killed (if still running) and its pipes
    closed when the test ends."""
    procs = []

    def start(*args, node=None, **kw):
        cmd = [str(BIN / "krg"), "--home", str(cluster.home.path)]
        if node is not None:
            cmd += ["--node", str(node)]
        procs.append(subprocess.Popen([*cmd, *args], stdin=kw.pop("stdin", subprocess.DEVNULL),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def read_until(stream, marker: bytes, timeout=20.0) -> bytes:
    """Read a pipe until `marker` shows up (bounded)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} in {buf!r}"
        if select.select([stream], [], [], left)[0]:
            chunk = os.read(stream.fileno(), 4096)
            assert chunk, f"end of output before {marker!r}: {buf!r}"
            buf += chunk
    return buf


def ps(cluster, *args, node=1):
    return json.loads(cluster.run("krg", "ps", "--json", *args, node=node).stdout)


@pytest.mark.parametrize("node", [1, 2, 3])
def test_output_and_exit_status_on_any_node(cluster, node):
    r = krg_run(cluster, "-n", str(node), "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")


def test_stdin_streams_through_to_a_remote_job(cluster):
    data = os.urandom(3 << 20)
    r = krg_run(cluster, "-n", "2", "sha256sum", input=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    r = krg_run(cluster, "-n", "3", "cat", input=b"line one\nline two\n")
    assert r.stdout == b"line one\nline two\n"


def test_a_large_stream_keeps_daemon_memory_bounded(cluster, popen_krg):
    """128 MiB through `cat` on another node: every byte back, in order, no daemon ballooning."""
    daemons = [psutil.Process(cluster.pid(n)) for n in (1, 2)]
    before = [d.memory_info().rss for d in daemons]
    size = 128 << 20
    proc = popen_krg("run", "-n", "2", "cat", stdin=subprocess.PIPE)
    block = bytes(range(256)) * 4096          # 1 MiB with a recognisable pattern
    peak = list(before)
    digest_in, digest_out = hashlib.sha256(), hashlib.sha256()
    sent = received = 0
    os.set_blocking(proc.stdin.fileno(), False)
    while received < size:
        want_w = [proc.stdin] if sent < size else []
        r, w, _ = select.select([proc.stdout], want_w, [], 30)
        assert r or w, "the stream stalled"
        if w:
            try:
                n = os.write(proc.stdin.fileno(), block[sent % len(block):][: size - sent])
            except BlockingIOError:
                n = 0
            digest_in.update(block[sent % len(block):][:n])
            sent += n
            if sent == size:
                proc.stdin.close()
        if r:
            chunk = os.read(proc.stdout.fileno(), 1 << 20)
            assert chunk
            digest_out.update(chunk)
            received += len(chunk)
        peak = [max(p, d.memory_info().rss) for p, d in zip(peak, daemons)]
    assert proc.wait(timeout=30) == 0
    assert digest_out.hexdigest() == digest_in.hexdigest()
    for b, m in zip(before, peak):
        assert m - b < 64 << 20, f"a daemon grew by {(m - b) >> 20} MiB while 128 MiB flowed"


def test_death_by_signal_gives_128_plus_n(cluster):
    r = krg_run(cluster, "-n", "2", "sh", "-c", "kill -USR1 $$")
    assert r.returncode == 128 + signal.SIGUSR1


@pytest.mark.parametrize("sig, expected", [(signal.SIGUSR1, 7), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_signals_sent_to_krg_run_reach_the_job(cluster, sig, expected, popen_krg):
    script = 'trap "echo got; exit 7" USR1; echo ready; while :; do sleep 0.05; done'
    proc = popen_krg("run", "-n", "3", "sh", "-c", script)
    read_until(proc.stdout, b"ready")
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == expected


def test_the_job_runs_as_the_caller_with_its_environment(cluster):
    home = str(cluster.home.path)
    script = "id -u; id -g; umask; pwd; echo $KRG_TEST_VAR"

    def as_nobody():
        os.chdir("/tmp")
        os.umask(0o027)
        os.environ["KRG_TEST_VAR"] = "from the caller"
        return krg.main(["--home", home, "run", "-T", "-n", "2", "sh", "-c", script])

    status, out = run_as(NOBODY, as_nobody)
    assert status == 0, out
    assert out.decode().splitlines() == ["65534", "65534", "0027", "/tmp", "from the caller"]


def test_programs_that_cannot_start_fail_like_in_a_shell(cluster, tmp_path):
    r = krg_run(cluster, "-n", "2", "no-such-program-here")
    assert r.returncode == 127
    assert r.stderr == b"krg: no-such-program-here: command not found\n"
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\necho hi\n")
    r = krg_run(cluster, "-n", "3", str(script))
    assert r.returncode == 126
    assert r.stderr == f"krg: {script}: Permission denied\n".encode()


def test_detached_jobs_show_in_ps_on_every_node_and_can_be_killed(cluster):
    r = krg_run(cluster, "-d", "-n", "2", "sleep", "300", node=1)
    m = re.fullmatch(rb"Running application (\d+)\n", r.stdout)
    assert m, r.stdout
    gpid = int(m.group(1))
    assert gpid_node(gpid) == 1                       # named after the node it was created from
    for n in (1, 2, 3):
        job = wait_for(lambda: next((j for j in ps(cluster, node=n) if j["gpid"] == gpid
                                     and j["state"] == "sleeping"), None), what=f"node {n} to list the job")
        assert job["node"] == 2 and job["argv"] == ["sleep", "300"] and job["user"] == "root"
    assert [j["gpid"] for j in ps(cluster, "-n", "2")] == [gpid]
    assert ps(cluster, "-n", "3") == []
    assert [j["gpid"] for j in ps(cluster, "-u", "root")] == [gpid]
    assert ps(cluster, "-u", "nobody") == []
    text = cluster.run("krg", "ps").stdout
    assert re.search(rf"^\s*{gpid}\s+2\s+root\s+sleeping\s.*sleep 300$", text, re.M)

    cluster.run("krg", "kill", str(gpid), node=3)    # from yet another node
    w = cluster.run("krg", "wait", str(gpid), check=False)
    assert w.returncode == 128 + signal.SIGTERM
    assert all(j["gpid"] != gpid for j in ps(cluster))


def test_kill_takes_signal_names_and_numbers(cluster):
    gpids = []
    for _ in range(2):
        out = krg_run(cluster, "-d", "-n", "3", "sleep", "300").stdout
        gpids.append(int(out.split()[-1]))
    cluster.run("krg", "kill", "-9", str(gpids[0]))
    cluster.run("krg", "kill", "-s", "USR2", str(gpids[1]))
    assert cluster.run("krg", "wait", str(gpids[0]), check=False).returncode == 128 + 9
    assert cluster.run("krg", "wait", str(gpids[1]), check=False).returncode == 128 + signal.SIGUSR2


def test_a_user_may_not_signal_another_users_job(cluster):
    gpid = int(krg_run(cluster, "-d", "-n", "2", "sleep", "300").stdout.split()[-1])
    home = str(cluster.home.path)
    status, out = run_as(NOBODY, lambda: krg.main(["--home", home, "kill", str(gpid)]))
    assert status == 1
    assert b"permission denied" in out
    assert any(j["gpid"] == gpid and j["state"] == "sleeping" for j in ps(cluster))
    cluster.run("krg", "kill", "-9", str(gpid))


@pytest.mark.parametrize("args, code, message", [
    (["run", "-n", "9", "true"], 2, "node 9 is not in the cluster configuration"),
    (["run"], 2, "needs a program"),
    (["kill", "-s", "NOPE", "123"], 2, "invalid signal 'NOPE'"),
    (["kill", "12ab"], 2, "invalid global PID '12ab'"),
    (["kill", "4194305"], 1, "no job 4194305"),
    (["wait", "4194305"], 1, "no job 4194305"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(cluster, args, code, message):
    r = cluster.run("krg", *args, check=False)
    assert r.returncode == code
    assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_job_on_a_node_that_is_not_online_is_refused(cluster):
    cluster.krgadm("nodes", "del", "-n", "3")
    r = krg_run(cluster, "-n", "3", "true")
    assert r.returncode == 1
    assert b"node 3 is not online" in r.stderr


def test_jobs_on_a_dead_node_are_lost_not_hanging(cluster, popen_krg):
    detached = int(krg_run(cluster, "-d", "-n", "3", "sleep", "300").stdout.split()[-1])
    wait_for(lambda: any(j["gpid"] == detached for j in ps(cluster)), what="the job to be listed")
    attached = popen_krg("run", "-n", "3", "sh", "-c", "echo ready; sleep 300")
    read_until(attached.stdout, b"ready")
    # The machine dies: its daemon and every process of its jobs.
    cluster.kill(3)

    def kill_node_3_jobs():
        shepherds = [p for p in psutil.process_iter(["cmdline"])
                     if any(f"{cluster.home.path}/nodes/3/" in a for a in p.info["cmdline"] or [])]
        for sh in shepherds:
            try:
                for child in sh.children(recursive=True):
                    child.kill()
                sh.kill()
            except psutil.NoSuchProcess:
                pass
        return not shepherds

    wait_for(kill_node_3_jobs, what="node 3's jobs to be gone")
    assert attached.wait(timeout=20) == 255
    err = attached.stderr.read()
    assert b"lost" in err and b"node 3 died" in err
    job = wait_for(lambda: next((j for j in ps(cluster, node=2) if j["gpid"] == detached), None),
                   what="node 2 to list the job")
    assert job["state"] == "lost" and job["node"] == 3


def test_jobs_survive_a_restart_of_their_daemon(cluster):
    gpid = int(krg_run(cluster, "-d", "-n", "2", "sleep", "300").stdout.split()[-1])
    wait_for(lambda: any(j["gpid"] == gpid for j in ps(cluster)), what="the job to be listed")
    cluster.kill(2)
    cluster.start(2)
    wait_for(lambda: cluster.online(1) == {1, 2, 3}, what="node 2 to rejoin by itself")
    job = wait_for(lambda: next((j for j in ps(cluster) if j["gpid"] == gpid and j["state"] != "lost"), None),
                   what="the restarted daemon to list its adopted job")
    assert job["node"] == 2 and job["state"] == "sleeping"
    cluster.run("krg", "kill", str(gpid))
    assert cluster.run("krg", "wait", str(gpid), check=False).returncode == 128 + signal.SIGTERM


def test_an_interactive_program_gets_a_terminal(cluster):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 31, 101, 0, 0))
    cmd = [str(BIN / "krg"), "--home", str(cluster.home.path), "run", "-n", "2", "sh"]
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    try:
        out = b""

        def read_for(marker):
            nonlocal out
            deadline = time.monotonic() + 20
            while marker not in out:
                assert time.monotonic() < deadline, out
                if select.select([master], [], [], 1)[0]:
                    out += os.read(master, 4096)

        read_for(b"# ")        # the prompt: the shell has set up its terminal (input typed before may be flushed)
        os.write(master, b"test -t 0 && echo IS-A-TTY; stty size\r")
        read_for(b"31 101")
        assert b"IS-A-TTY" in out
        # The terminal is resized: the job's terminal follows.
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 132, 0, 0))
        proc.send_signal(signal.SIGWINCH)       # what the kernel does for a controlling terminal
        # The signal reaches krg run at some point after we type: ask until the new size shows.
        deadline = time.monotonic() + 20
        while b"40 132" not in out:
            assert time.monotonic() < deadline, out
            os.write(master, b"stty size\r")
            t = time.monotonic() + 0.5
            while time.monotonic() < t and b"40 132" not in out:
                if select.select([master], [], [], 0.1)[0]:
                    out += os.read(master, 4096)
        os.write(master, b"exit 5\r")
        assert proc.wait(timeout=20) == 5
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


def test_stop_and_continue(cluster, popen_krg):
    proc = popen_krg("run", "-p", "-n", "2", "sh", "-c", "echo ready; while :; do sleep 0.05; done")
    gpid = int(read_until(proc.stderr, b"\n").strip())
    read_until(proc.stdout, b"ready")
    proc.send_signal(signal.SIGTSTP)
    wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED, what="krg run to stop")
    wait_for(lambda: next(j for j in ps(cluster) if j["gpid"] == gpid)["state"] == "stopped",
             what="the job to stop")
    proc.send_signal(signal.SIGCONT)
    wait_for(lambda: next(j for j in ps(cluster) if j["gpid"] == gpid)["state"] != "stopped",
             what="the job to continue")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 128 + signal.SIGINT


def test_top_shows_nodes_and_the_busiest_jobs(cluster):
    busy = int(krg_run(cluster, "-d", "-n", "2", "sh", "-c", "while :; do :; done").stdout.split()[-1])
    idle = int(krg_run(cluster, "-d", "-n", "3", "sleep", "300").stdout.split()[-1])
    out = cluster.run("krg", "top", "-b", "-n", "2", "-d", "0.5").stdout
    assert out.count("krg top - ") == 2
    last = out[out.rindex("krg top - "):]
    assert "3 nodes online" in last
    for n in (1, 2, 3):
        assert re.search(rf"^node\s+{n} online\s+\[", last, re.M)
    rows = [line.split() for line in last.splitlines() if line.strip().startswith((str(busy), str(idle)))]
    assert [int(r[0]) for r in rows] == [busy, idle]          # the busiest first
    assert float(rows[0][4]) > 50.0 > float(rows[1][4])
    cluster.run("krg", "kill", "-9", str(busy), str(idle))


def test_top_quits_on_q(cluster):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm"}
    proc = subprocess.Popen([str(BIN / "krg"), "--home", str(cluster.home.path), "top", "-d", "0.3"],
                            stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    try:
        out = b""
        deadline = time.monotonic() + 20
        while b"nodes online" not in out:
            assert time.monotonic() < deadline, out
            if select.select([master], [], [], 1)[0]:
                out += os.read(master, 65536)
        os.write(master, b"q")
        assert proc.wait(timeout=10) == 0
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_krg_run_carries_on_through_a_restart_of_its_own_daemon(cluster, popen_krg):
    """The daemon holding the command's session restarts: the job runs on, and krg run takes its
    stdio back and still exits with the job's status."""
    proc = popen_krg("run", "-n", "2", "sh", "-c", "echo ready; read line; echo got $line; exit 4",
                     node=1, stdin=subprocess.PIPE)
    read_until(proc.stdout, b"ready")
    cluster.kill(1)
    cluster.start(1)
    proc.stdin.write(b"hello\n")
    proc.stdin.flush()
    assert read_until(proc.stdout, b"got hello"), proc.stderr.read()
    assert proc.wait(timeout=30) == 4
