"""The scheduler's placement and Kerrighed capabilities, through the real commands and daemons."""

import collections
import json
import os
import re
import subprocess

import pytest

from kerrighed.caps import Capabilities

from conftest import BIN, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="jobs run in PID namespaces, which needs root")


def launch_detached(cluster, *argv, node=None):
    out = cluster.run("krg", "run", "-d", *argv, node=node).stdout
    return int(re.fullmatch(r"Running application (\d+)\n", out).group(1))


def job_node(cluster, gpid):
    return next(j["node"] for j in json.loads(cluster.run("krg", "ps", "--json").stdout) if j["gpid"] == gpid)


def test_round_robin_spreads_jobs_over_the_nodes(cluster):
    assert "policy: round_robin" in cluster.krgadm("scheduler", "show").stdout
    nodes = [job_node(cluster, launch_detached(cluster, "sleep", "300")) for _ in range(6)]
    assert collections.Counter(nodes) == {1: 2, 2: 2, 3: 2}
    assert all(a != b for a, b in zip(nodes, nodes[1:]))


def test_setting_a_policy_reaches_every_node(cluster):
    out = cluster.krgadm("scheduler", "set", "least_loaded").stdout
    assert "policy: least_loaded" in out
    for n in (1, 2, 3):
        wait_for(lambda: json.loads(cluster.krgadm("scheduler", "show", "--json", node=n).stdout)
                 ["policy"]["name"] == "least_loaded", what=f"node {n} to adopt the policy")
    # Three launches in a row from node 3 fill the three nodes: each counts what it placed.
    nodes = {job_node(cluster, launch_detached(cluster, "sleep", "300", node=3)) for _ in range(3)}
    assert nodes == {1, 2, 3}


def test_unknown_policy_names_the_known_ones(cluster):
    r = cluster.krgadm("scheduler", "set", "fastest", check=False)
    assert r.returncode == 2
    assert "unknown policy 'fastest' (known: " in r.stderr and "round_robin" in r.stderr
    r = cluster.krgadm("scheduler", "set", "round_robin:speed=3", check=False)
    assert r.returncode == 2 and "has no parameter 'speed'" in r.stderr


def test_a_job_inherits_the_capabilities_its_shell_set(cluster):
    home = str(cluster.home.path)
    krgcapset, krg = str(BIN / "krgcapset"), str(BIN / "krg")
    # One shell: krgcapset without -k changes the shell, and the shell's later jobs inherit.
    script = (f"{krgcapset} --home {home} -d +CAN_MIGRATE,CHECKPOINTABLE && "
              f"{krgcapset} --home {home} -s && "
              f"{krg} --home {home} run -d -n 2 sleep 300")
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    shown, launched = r.stdout.rsplit("Running application ", 1)
    assert "Inheritable Effective Capabilities: 023\n\tCHANGE_KERRIGHED_CAP, CAN_MIGRATE, CHECKPOINTABLE\n" in shown
    gpid = int(launched)
    job = cluster.run("krgcapset", "-k", str(gpid), "-s").stdout
    expected = Capabilities.DEFAULT.apply([("inheritable_effective", "+CAN_MIGRATE,CHECKPOINTABLE")]).child()
    assert job == expected.show()
    assert "Effective Capabilities: 023" in job


def test_changing_a_jobs_capabilities(cluster):
    gpid = launch_detached(cluster, "sleep", "300")
    cluster.run("krgcapset", "-k", str(gpid), "-e", "+CAN_MIGRATE")
    assert "Effective Capabilities: 03\n" in cluster.run("krgcapset", "-k", str(gpid), "-s").stdout
    r = cluster.run("krgcapset", "-k", str(gpid), "-e", "+NO_SUCH_CAP", check=False)
    assert r.returncode == 2 and "NO_SUCH_CAP" in r.stderr
    r = cluster.run("krgcapset", "-k", "4194305", "-s", check=False)
    assert r.returncode == 1 and "no job 4194305" in r.stderr
