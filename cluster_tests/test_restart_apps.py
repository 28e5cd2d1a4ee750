"""restart of whole applications: in the foreground with the command's stdio, on other nodes than
the ones that dumped them, all or nothing; and applications made with `krg run --app`, including
a shell script whose children are started through `krg run -d` on several nodes."""

import os
import re
import select
import shutil
import signal
import subprocess
import time

import pytest

from kerrighed.cli import krg

from conftest import BIN, NOBODY, counter, read_ints, run_as, wait_for

pytestmark = [pytest.mark.root, pytest.mark.criu,
              pytest.mark.skipif(os.geteuid() != 0, reason="jobs and CRIU need root")]


def wait_jobs(cluster, appid, n, what="the application's jobs"):
    return wait_for(lambda: (lambda js: js if len(js) == n else None)(cluster.app_jobs(appid)), what=what)


def command(cluster, name, *args):
    return [str(BIN / name), "--home", str(cluster.home.path), *args]


def popen(cluster, name, *args, stdin=subprocess.DEVNULL):
    return subprocess.Popen(command(cluster, name, *args), stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


class Reader:
    """Lines of a child's stdout, read with a bounded wait."""

    def __init__(self, stream):
        self.stream, self.buf = stream, b""

    def until(self, predicate, timeout=30.0, what="output"):
        deadline = time.monotonic() + timeout
        while not predicate(self.buf):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {what}: {self.buf[-300:]!r}"
            if select.select([self.stream], [], [], left)[0]:
                chunk = os.read(self.stream.fileno(), 65536)
                if not chunk:
                    assert predicate(self.buf), f"end of output before {what}: {self.buf[-300:]!r}"
                    break
                self.buf += chunk
        return self.buf

    def rest(self):
        self.buf += self.stream.read()
        return self.buf


def numbers(text: bytes) -> list[int]:
    return [int(x) for x in text.split() if x.isdigit()]


def stop(*procs):
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def test_restart_f_takes_the_applications_stdio_and_its_status(cluster):
    # The original run, attached: what it printed up to the checkpoint is on its stdout.
    first = popen(cluster, "krg", "run", "--app", "-n", "2", "sh", "-c", counter(upto=80, code=7))
    restarted = interrupted = None
    try:
        appid = int(re.search(rb"Running application (\d+)", Reader(first.stderr).until(
            lambda b: b"\n" in b, what="the application id")).group(1))
        out = Reader(first.stdout)
        out.until(lambda b: len(numbers(b)) > 10, what="the counter to count")
        r = cluster.run("checkpoint", "-a", "-k", str(appid))    # --app made it checkpointable
        assert "Version: 1" in r.stdout
        assert first.wait(timeout=30) == 128 + signal.SIGTERM
        before = numbers(out.rest())
        assert before == list(range(len(before)))

        restarted = popen(cluster, "restart", "-f", str(appid), "1")
        reader = Reader(restarted.stdout)
        reader.until(lambda b: b"\n79\n" in b, what="the counter's end")
        assert restarted.wait(timeout=30) == 7, restarted.stderr.read()
        text = reader.rest()
        head = (f"Restarting application {appid} (v1) ...\n"
                f"Application {appid} has been successfully restarted\n").encode()
        assert text.startswith(head)
        # Exactly where the snapshot stood: nothing the first run printed comes again, nothing is lost.
        assert numbers(text[len(head):]) == list(range(len(before), 80))
        assert not cluster.app_jobs(appid)

        # The same checkpoint again; Ctrl-C (SIGINT to restart) reaches the application.
        interrupted = popen(cluster, "restart", "-f", "-q", str(appid), "1")
        Reader(interrupted.stdout).until(lambda b: len(numbers(b)) > 3, what="the second restart to count")
        interrupted.send_signal(signal.SIGINT)
        assert interrupted.wait(timeout=30) == 128 + signal.SIGINT
        wait_for(lambda: not cluster.app_jobs(appid), what="the application to end")
    finally:
        stop(*(p for p in (first, restarted, interrupted) if p is not None))


def test_restart_f_feeds_its_stdin_to_the_root_job(cluster):
    out = cluster.run("krg", "run", "--app", "-d", "-n", "3", "sh", "-c",
                      "echo ready; read line; echo \"got $line\"; exit 3").stdout
    appid = int(out.split()[-1])
    wait_jobs(cluster, appid, 1)
    cluster.run("checkpoint", "-a", "-k", str(appid))
    wait_for(lambda: not cluster.app_jobs(appid), what="the application to end")
    r = subprocess.run(command(cluster, "restart", "-f", "-q", str(appid), "1"), input=b"hello\n",
                       capture_output=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (3, b"got hello\n", b"")


def two_counters(cluster, tmp_path):
    """An application of two counting jobs, on nodes 1 (writing a) and 3 (writing b)."""
    tmp_path.chmod(0o777)
    a, b = tmp_path / "a", tmp_path / "b"
    inner = f"{BIN / 'krg'} --home {cluster.home.path} run -d -n 3 sh -c '{counter(b)}'"
    appid = int(cluster.run("krg", "run", "--app", "-d", "-n", "1", "sh", "-c",
                            f"{inner}; {counter(a)}").stdout.split()[-1])
    return appid, a, b, wait_jobs(cluster, appid, 2)


def test_restart_places_jobs_whose_node_is_not_online_through_the_scheduler(cluster, tmp_path):
    appid, a, b, jobs = two_counters(cluster, tmp_path)
    assert sorted(j["node"] for j in jobs.values()) == [1, 3]
    wait_for(lambda: len(read_ints(a)) > 5 and len(read_ints(b)) > 5, what="the counters to count")
    cluster.run("checkpoint", "-a", "-k", str(appid))
    wait_for(lambda: not cluster.app_jobs(appid), what="the application to end")
    snapshot = {p: read_ints(p)[-1] for p in (a, b)}
    written = {p: len(read_ints(p)) for p in (a, b)}

    cluster.krgadm("nodes", "del", "-n", "3")
    r = cluster.run("restart", "-q", str(appid), "1")
    assert r.stdout == ""
    back = wait_jobs(cluster, appid, 2)
    assert back.keys() == jobs.keys()
    moved = next(g for g, j in jobs.items() if j["node"] == 3)
    assert back[moved]["node"] in (1, 2)                # not the node that dumped it: it left
    root = next(g for g in jobs if g != moved)
    assert back[root]["node"] == 1                      # the node that dumped it is online: there
    for p in (a, b):
        wait_for(lambda: len(read_ints(p)) > written[p] + 3, what=f"{p.name} to count again")
        assert read_ints(p)[written[p]] == snapshot[p] + 1      # from the snapshot, not from 0

    # -n puts every job on one node; a node that is not online is refused.
    cluster.run("krg", "kill", "-9", *map(str, jobs))
    wait_for(lambda: not cluster.app_jobs(appid), what="the application to end")
    r = cluster.run("restart", str(appid), "1", "-n", "3", check=False)
    assert r.returncode == 1 and "node 3 is not online" in r.stderr and r.stderr.count("\n") == 1
    cluster.krgadm("nodes", "add", "-n", "3")
    cluster.run("restart", "-q", "-n", "2", str(appid), "1")
    assert {j["node"] for j in wait_jobs(cluster, appid, 2).values()} == {2}
    cluster.run("krg", "kill", "-9", *map(str, jobs))


def test_a_shell_script_application_is_checkpointed_and_restarted_whole(cluster, tmp_path):
    """A script started as a new application launches three children on three nodes through
    `krg run -d`; they join its application and inherit CHECKPOINTABLE, so `checkpoint -a` takes
    them all, and `restart` brings them all back, each counter going on from the snapshot."""
    tmp_path.chmod(0o777)
    outs = [tmp_path / f"c{n}" for n in (1, 2, 3)]
    krg_cmd = f"{BIN / 'krg'} --home {cluster.home.path}"
    script = tmp_path / "app.sh"
    script.write_text("#!/bin/sh\n" + "".join(
        f"{krg_cmd} run -d -n {n} sh -c '{counter(out)}'\n" for n, out in zip((1, 2, 3), outs)))
    script.chmod(0o755)
    r = cluster.run("krg", "run", "--app", "-d", "-n", "1", str(script))
    appid = int(re.fullmatch(r"Running application (\d+)\n", r.stdout).group(1))
    # The script ends once it has started them; they stay in its application.
    children = wait_for(lambda: (lambda js: js if appid not in js and len(js) == 3 else None)(
        cluster.app_jobs(appid)), what="the script's three children, and the script's end")
    assert sorted(j["node"] for j in children.values()) == [1, 2, 3]
    wait_for(lambda: all(len(read_ints(p)) > 5 for p in outs), what="the counters to count")

    r = cluster.run("checkpoint", "-a", "-k", str(appid))
    assert f"Identifier: {appid}\nVersion: 1\n" in r.stdout
    version = cluster.checkpoint_store() / str(appid) / "v1"
    assert sorted(p.name for p in version.iterdir()) == ["description.txt", "node1", "node2", "node3"]
    wait_for(lambda: not cluster.app_jobs(appid), what="the application to end")
    snapshot = {p: read_ints(p)[-1] for p in outs}
    written = {p: len(read_ints(p)) for p in outs}

    r = cluster.run("restart", str(appid), "1")
    assert r.stdout.endswith(f"Application {appid} has been successfully restarted\n")
    back = wait_jobs(cluster, appid, 3)
    assert {g: j["node"] for g, j in back.items()} == {g: j["node"] for g, j in children.items()}
    for p in outs:
        wait_for(lambda: len(read_ints(p)) > written[p] + 3, what=f"{p.name} to count again")
        assert read_ints(p)[written[p]] == snapshot[p] + 1      # exactly where the snapshot stood
    cluster.run("krg", "kill", "-9", *map(str, back))


def test_a_restart_that_fails_on_one_node_leaves_nothing_behind(cluster, tmp_path):
    appid, a, b, jobs = two_counters(cluster, tmp_path)
    cluster.run("checkpoint", "-a", "-k", str(appid))
    wait_for(lambda: not cluster.app_jobs(appid), what="the application to end")
    on3 = next(g for g, j in jobs.items() if j["node"] == 3)
    images = cluster.checkpoint_store() / str(appid) / "v1" / "node3" / f"job{on3}" / "images"
    saved = tmp_path / "saved"
    shutil.copytree(images, saved)

    def gone():     # nothing of the application runs or waits stopped anywhere
        return not cluster.app_jobs(appid)

    # Node 3 cannot read the images (a store not shared with it): nothing is restored anywhere.
    shutil.rmtree(images)
    r = cluster.run("restart", str(appid), "1", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"node 3 cannot read the images of job {on3}" in r.stderr
    assert gone()

    # The images are there but CRIU cannot restore them: node 1's job, restored, is undone.
    shutil.copytree(saved, images)
    for page in images.glob("pages-*.img"):
        page.unlink()
    n = len(read_ints(a))
    r = cluster.run("restart", str(appid), "1", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    wait_for(gone, what="the job restored on node 1 to be undone")
    assert len(read_ints(a)) == n       # it never ran: jobs are thawed only once all are restored

    shutil.rmtree(images)
    shutil.copytree(saved, images)
    cluster.run("restart", "-q", str(appid), "1")       # and nothing stands in the way of a restart
    assert wait_jobs(cluster, appid, 2).keys() == jobs.keys()
    cluster.run("krg", "kill", "-9", *map(str, jobs))


@pytest.mark.parametrize("args, message", [
    (["-t", "1", "1"], "-t/--replace-tty needs -f"),
    (["-s", "3,4", "1", "1"], "-s/--substitute-file is not supported"),
    (["-n", "9", "1", "1"], "node 9 is not in the cluster configuration"),
])
def test_restart_flags_it_cannot_honour_are_one_line_errors(cluster, args, message):
    r = cluster.run("restart", *args, check=False)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_krg_run_app_names_an_application_only_of_ones_own(cluster):
    home = str(cluster.home.path)
    root_app = int(cluster.run("krg", "run", "--app", "-d", "-n", "2", "sleep", "300").stdout.split()[-1])
    # root's own: joined
    joined = int(cluster.run("krg", "run", "-d", "--app", str(root_app), "-n", "3", "sleep", "300")
                 .stdout.split()[-1])
    assert set(wait_jobs(cluster, root_app, 2)) == {root_app, joined}

    status, out = run_as(NOBODY, lambda: krg.main(["--home", home, "run", "-d", "--app", str(root_app),
                                                   "sleep", "300"]))
    assert status == 1
    assert out.decode() == (f"krg: application {root_app} is not one of yours "
                            f"(no running job of uid {NOBODY} in it)\n")
    assert set(cluster.app_jobs(root_app)) == {root_app, joined}

    # nobody's own application: nobody may join it
    status, out = run_as(NOBODY, lambda: krg.main(["--home", home, "run", "-d", "--app", "-n", "1",
                                                   "sleep", "300"]))
    assert status == 0, out
    mine = int(out.split()[-1])
    status, out = run_as(NOBODY, lambda: krg.main(["--home", home, "run", "-d", f"--app={mine}",
                                                   "sleep", "300"]))
    assert status == 0, out
    assert len(wait_jobs(cluster, mine, 2)) == 2
    cluster.run("krg", "kill", "-9", *map(str, cluster.app_jobs(mine)), *map(str, cluster.app_jobs(root_app)))
