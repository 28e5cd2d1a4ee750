"""migrate: running jobs move between nodes with CRIU, keeping their gpid, memory and stdio."""

import json
import os
import re
import signal
import subprocess
import time

import pytest

from kerrighed.cli import migrate as migrate_cli

from conftest import BIN, NOBODY, run_as, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="jobs and CRIU need root")

COUNTER = "i=0; while :; do echo $i; i=$((i+1)); sleep 0.02; done"


def ps(cluster):
    return {j["gpid"]: j for j in json.loads(cluster.run("krg", "ps", "--json").stdout)}


class Counter:
    """A `krg run` of a shell counting on stdout, read as it goes."""

    def __init__(self, cluster, node):
        self.proc = subprocess.Popen([str(BIN / "krg"), "--home", str(cluster.home.path), "run", "-p", "-n",
                                      str(node), "sh", "-c", COUNTER], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.gpid = int(self.proc.stderr.readline())
        self.out = b""

    def numbers(self):
        return [int(x) for x in self.out.split(b"\n")[:-1]]

    def read_until(self, count, timeout=30):
        deadline = time.monotonic() + timeout
        os.set_blocking(self.proc.stdout.fileno(), False)
        while len(self.numbers()) < count:
            assert time.monotonic() < deadline, f"only {len(self.numbers())} numbers"
            try:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            assert chunk, f"output ended: {self.proc.stderr.read()!r}"
            self.out += chunk
        return self.numbers()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def counter(cluster):
    counters = []

    def start(node):
        counters.append(Counter(cluster, node))
        return counters[-1]

    yield start
    for c in counters:
        c.close()


def test_a_running_job_moves_with_its_output_and_status(cluster, counter):
    job = counter(2)
    job.read_until(10)
    cluster.run("krgcapset", "-k", str(job.gpid), "-e", "+CAN_MIGRATE")
    r = cluster.run("migrate", str(job.gpid), "3")
    assert (r.stdout, r.stderr) == ("", "")
    assert ps(cluster)[job.gpid]["node"] == 3
    seen = len(job.numbers())
    numbers = job.read_until(seen + 20)
    assert numbers == list(range(len(numbers)))       # nothing lost, nothing repeated
    # and back, through another node's daemon
    cluster.run("migrate", str(job.gpid), "1", node=3)
    numbers = job.read_until(len(numbers) + 20)
    assert numbers == list(range(len(numbers)))
    assert ps(cluster)[job.gpid]["node"] == 1
    job.proc.send_signal(signal.SIGINT)
    assert job.proc.wait(timeout=20) == 128 + signal.SIGINT


def test_refusals_leave_the_job_where_it_was(cluster, counter):
    job = counter(2)
    job.read_until(5)
    r = cluster.run("migrate", str(job.gpid), "3", check=False)
    assert r.returncode == 1 and "lacks CAN_MIGRATE" in r.stderr and r.stderr.startswith("migrate: ")
    cluster.run("krgcapset", "-k", str(job.gpid), "-e", "+CAN_MIGRATE")
    for args, message in ((["7"], "node 7 is not"), (["2"], "already runs on node 2"),
                          (["x"], "usage: migrate PID NODEID")):
        r = cluster.run("migrate", str(job.gpid), *args, check=False)
        assert r.returncode in (1, 2) and message in r.stderr, r.stderr
    r = cluster.run("migrate", "4194305", "3", check=False)
    assert r.returncode == 1 and "no job 4194305" in r.stderr
    home = str(cluster.home.path)
    status, out = run_as(NOBODY, lambda: migrate_cli.main(["--home", home, str(job.gpid), "3"]))
    assert status == 1 and b"permission denied" in out
    assert ps(cluster)[job.gpid]["node"] == 2
    numbers = job.read_until(len(job.numbers()) + 10)
    assert numbers == list(range(len(numbers)))


def test_a_job_of_another_user_migrates_and_keeps_its_ids(cluster):
    home = str(cluster.home.path)
    from kerrighed.cli import krg

    def launch():
        return krg.main(["--home", home, "run", "-d", "-n", "2", "sh", "-c", "sleep 300"])

    status, out = run_as(NOBODY, launch)
    assert status == 0, out
    gpid = int(re.search(rb"Running application (\d+)", out).group(1))
    cluster.run("krgcapset", "-k", str(gpid), "-e", "+CAN_MIGRATE")
    cluster.run("migrate", str(gpid), "3")
    job = wait_for(lambda: ps(cluster).get(gpid) if ps(cluster).get(gpid, {}).get("node") == 3 else None,
                   what="the job to show on node 3")
    assert job["uid"] == NOBODY and job["state"] == "sleeping"
    cluster.run("krg", "kill", str(gpid))
    assert cluster.run("krg", "wait", str(gpid), check=False).returncode == 128 + signal.SIGTERM


def test_a_multithreaded_job_keeps_its_memory(cluster):
    """Four threads each fill a buffer and count; after the move the counts go on from where
    they were (Kerrighed could only move single-threaded processes)."""
    script = ("import threading, time\n"
              "counts = [0] * 4\n"
              "def work(i):\n"
              "    buf = bytearray(8 << 20)\n"
              "    while True:\n"
              "        counts[i] += 1; buf[counts[i] % len(buf)] = 1; time.sleep(0.005)\n"
              "for i in range(4): threading.Thread(target=work, args=(i,), daemon=True).start()\n"
              "while True: print(min(counts), flush=True); time.sleep(0.05)\n")
    proc = subprocess.Popen([str(BIN / "krg"), "--home", str(cluster.home.path), "run", "-p", "-n", "2",
                             "python3", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        gpid = int(proc.stderr.readline())
        before = [int(proc.stdout.readline()) for _ in range(5)]
        assert len(ps(cluster)[gpid].get("argv")) == 3
        cluster.run("krgcapset", "-k", str(gpid), "-e", "+CAN_MIGRATE")
        cluster.run("migrate", str(gpid), "3")
        assert ps(cluster)[gpid]["node"] == 3 and ps(cluster)[gpid]["nprocs"] == 1
        after = [int(proc.stdout.readline()) for _ in range(20)]
        assert after == sorted(after) and after[0] >= before[-1] and after[-1] > after[0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_a_target_that_dies_mid_migration_leaves_the_job_on_its_source(cluster, counter):
    job = counter(2)
    job.read_until(5)
    cluster.run("krgcapset", "-k", str(job.gpid), "-e", "+CAN_MIGRATE")
    target = cluster.pid(3)
    os.kill(target, signal.SIGSTOP)         # node 3 stops answering: it will be seen dead
    try:
        r = cluster.run("migrate", str(job.gpid), "3", check=False)
    finally:
        os.kill(target, signal.SIGCONT)
    assert r.returncode == 1 and "goes on on node 2" in r.stderr, r.stderr
    assert ps(cluster)[job.gpid]["node"] == 2
    numbers = job.read_until(len(job.numbers()) + 20)
    assert numbers == list(range(len(numbers)))       # restored where it was: nothing lost or repeated


def test_a_job_criu_cannot_dump_keeps_running(cluster):
    """A job holding a connection to its node's daemon (an external Unix socket): CRIU refuses to
    dump it, and it goes on where it was."""
    home = str(cluster.home.path)
    outer = cluster.run("krg", "run", "-d", "-n", "2", str(BIN / "krg"), "--home", home, "--node", "2",
                        "run", "-n", "1", "sleep", "300").stdout
    gpid = int(outer.split()[-1])
    wait_for(lambda: sum(1 for j in ps(cluster).values() if j["argv"] == ["sleep", "300"]) == 1,
             what="the inner job to start")
    cluster.run("krgcapset", "-k", str(gpid), "-e", "+CAN_MIGRATE")
    r = cluster.run("migrate", str(gpid), "3", check=False)
    assert r.returncode == 1 and r.stderr.startswith(f"migrate: cannot checkpoint job {gpid}: "), r.stderr
    assert r.stderr.count("\n") == 1
    job = ps(cluster)[gpid]
    assert job["node"] == 2 and job["state"] != "exited"
    cluster.run("krg", "kill", str(gpid))
