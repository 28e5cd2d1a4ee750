"""checkpoint and restart of a whole application spread over nodes (Kerrighed's commands)."""

import json
import os
import re
import signal

import pytest

from conftest import BIN, counter, read_ints, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="jobs and CRIU need root")


def test_an_application_on_two_nodes_is_checkpointed_and_restarted(cluster, tmp_path):
    tmp_path.chmod(0o777)
    a, b = tmp_path / "a", tmp_path / "b"
    inner = f"{BIN / 'krg'} --home {cluster.home.path} run -d -n 3 sh -c '{counter(b)}'"
    out = cluster.run("krg", "run", "-d", "-n", "2", "sh", "-c", f"{inner}; {counter(a)}").stdout
    appid = int(out.split()[-1])
    jobs = wait_for(lambda: (lambda js: js if len(js) == 2 else None)(cluster.app_jobs(appid)),
                    what="both jobs of the application")
    assert sorted(j["node"] for j in jobs.values()) == [2, 3]     # one application over two nodes
    r = cluster.run("checkpoint", "-a", str(appid), check=False)
    assert r.returncode == 1 and "not checkpointable" in r.stderr
    for gpid in jobs:
        cluster.run("krgcapset", "-k", str(gpid), "-e", "+CHECKPOINTABLE")
    wait_for(lambda: len(read_ints(a)) > 5 and len(read_ints(b)) > 5, what="the counters to count")
    r = cluster.run("checkpoint", "-a", "-d", "two counters", str(appid))
    m = re.fullmatch(rf"Checkpointing application {appid}...\nIdentifier: {appid}\nVersion: 1\n"
                     r"Description: two counters\nDate: \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\n", r.stdout)
    assert m, r.stdout
    version = cluster.checkpoint_store() / str(appid) / "v1"
    assert (version / "description.txt").read_text().startswith(f"Identifier: {appid}\nVersion: 1\n")
    assert sorted(p.name for p in version.iterdir()) == ["description.txt", "node2", "node3"]
    at_checkpoint = {p: len(read_ints(p)) for p in (a, b)}
    wait_for(lambda: all(len(read_ints(p)) > n + 10 for p, n in at_checkpoint.items()), what="the counters to go on")
    cluster.run("krg", "kill", "-9", *map(str, jobs))
    wait_for(lambda: not cluster.app_jobs(appid), what="the application to end")
    before_restart = {p: len(read_ints(p)) for p in (a, b)}

    r = cluster.run("restart", str(appid), "1")
    assert r.stdout == (f"Restarting application {appid} (v1) ...\n"
                        f"Application {appid} has been successfully restarted\n")
    back = wait_for(lambda: (lambda js: js if len(js) == 2 else None)(cluster.app_jobs(appid)),
                    what="both jobs back")
    assert back.keys() == jobs.keys()                               # the same global PIDs
    assert {j["node"] for j in back.values()} == {2, 3}
    for p, n in before_restart.items():
        wait_for(lambda: len(read_ints(p)) > n + 3, what=f"{p.name} to count again")
        resumed = read_ints(p)[n]
        # It goes on from the snapshot: not from 0, and from before where it was killed.
        assert 0 < resumed <= at_checkpoint[p] + 2 < read_ints(p)[n - 1]

    r = cluster.run("restart", str(appid), "1", check=False)
    assert r.returncode == 1 and f"an application using appid {appid} is already running" in r.stderr
    r = cluster.run("restart", str(appid), "7", check=False)
    assert r.returncode == 1 and "restart:" in r.stderr
    cluster.run("krg", "kill", *map(str, jobs))


def test_freeze_and_unfreeze(cluster):
    gpid = int(cluster.run("krg", "run", "-d", "-n", "2", "sleep", "300").stdout.split()[-1])
    cluster.run("krgcapset", "-k", str(gpid), "-e", "+CHECKPOINTABLE")
    r = cluster.run("checkpoint", "-f", str(gpid))
    assert r.stdout == f"Freezing application in which process {gpid} is involved...\n"
    wait_for(lambda: json.loads(cluster.run("krg", "ps", "--json").stdout)[0]["state"] == "stopped",
             what="the job to be frozen")
    cluster.run("checkpoint", "-u", str(gpid))
    wait_for(lambda: json.loads(cluster.run("krg", "ps", "--json").stdout)[0]["state"] == "sleeping",
             what="the job to be thawed")
    r = cluster.run("checkpoint", "-k", str(gpid))
    assert "Version: 1" in r.stdout
    assert cluster.run("krg", "wait", str(gpid), check=False).returncode == 128 + signal.SIGTERM
