"""krgadm against real daemons: Kerrighed's commands, arguments and output."""

import json
import os

import pytest

from kerrighed import protocol as p
from kerrighed.cli.krgadm import ONE_OF
from kerrighed.client import Client
from kerrighed.errors import NotRunning

from conftest import LocalCluster, wait_for


def test_status_of_a_started_cluster(cluster):
    assert cluster.krgadm("cluster", "status").stdout == "status: up on 3 nodes\n"
    assert cluster.krgadm().stdout == "status: up on 3 nodes\n"          # no sub-command = status
    assert cluster.krgadm("nodes", "status").stdout == "1:online\n2:online\n3:online\n"
    assert cluster.krgadm("nodes").stdout == "1:online\n2:online\n3:online\n"
    assert cluster.krgadm("nodes", "status", "-n", "2-3").stdout == "2:online\n3:online\n"


def test_every_node_answers_with_the_same_view(cluster):
    views = [cluster.call(n, p.ClusterStatus()) for n in (1, 2, 3)]
    assert {v["epoch"] for v in views} == {views[0]["epoch"]}
    assert all(v["online"] == [1, 2, 3] for v in views)
    assert [v["local"] for v in views] == [1, 2, 3]


def test_json_outputs(cluster):
    st = json.loads(cluster.krgadm("cluster", "status", "--json").stdout)
    assert st["up"] is True and st["online"] == [1, 2, 3] and st["epoch"] >= 1
    nodes = json.loads(cluster.krgadm("nodes", "status", "--json").stdout)
    assert nodes == [{"id": 1, "state": "online"}, {"id": 2, "state": "online"}, {"id": 3, "state": "online"}]


def test_status_with_no_daemon(make_home):
    c = LocalCluster(make_home())
    assert c.krgadm("cluster", "status").stdout == "status: down\n"
    r = c.krgadm("nodes", "status", check=False)
    assert r.returncode == 1
    assert r.stderr.startswith("krgadm: Kerrighed is not running: ")
    assert r.stderr.count("\n") == 1


def test_del_then_add_back(cluster):
    r = cluster.krgadm("nodes", "del", "-n", "3")
    assert r.stdout == "Removing nodes [3]... done\n"
    for n in (1, 2, 3):      # the removed node knows it too, and stays present
        assert cluster.states(n) == {1: "online", 2: "online", 3: "present"}
    assert cluster.krgadm("cluster", "status").stdout == "status: up on 2 nodes\n"
    r = cluster.krgadm("nodes", "add", "-n", "3")
    assert r.stdout == "Waiting for 1 nodes to join...    1/1    done\nAdding nodes [3]... done\n"
    for n in (1, 2, 3):
        assert cluster.online(n) == {1, 2, 3}


def test_commands_may_go_through_any_node(cluster):
    cluster.krgadm("nodes", "del", "-n", "2", node=3)
    assert cluster.online(1) == {1, 3}
    cluster.krgadm("nodes", "add", "-n", "2", node=2)      # a node may ask to be added back
    assert cluster.online(3) == {1, 2, 3}


@pytest.mark.parametrize("args, message", [
    (["-n", "1"], "krgadm: Unable to suppress current node.\n"),
    (["-c", "3"], "krgadm: Not enough nodes to remove. Aborting.\n"),
    (["-n", "9"], "krgadm: Unable to suppress node 9 (must be 'online').\n"),
])
def test_del_refusals(cluster, args, message):
    r = cluster.krgadm("nodes", "del", *args, check=False)
    assert (r.returncode, r.stderr) == (1, message)
    assert cluster.online(1) == {1, 2, 3}


def test_del_of_a_node_that_is_only_present(cluster):
    cluster.krgadm("nodes", "del", "-n", "3")
    r = cluster.krgadm("nodes", "del", "-n", "3", check=False)
    assert (r.returncode, r.stderr) == (1, "krgadm: Unable to suppress node 3 (must be 'online').\n")


@pytest.mark.parametrize("args", [["-n", "2", "-a"], ["-c", "1", "-t", "2"], []])
def test_exactly_one_selector(cluster, args):
    for action in ("add", "del"):
        r = cluster.krgadm("nodes", action, *args, check=False)
        assert (r.returncode, r.stderr) == (2, f"krgadm: {ONE_OF}\n")


def test_count_total_and_all(cluster):
    assert cluster.krgadm("nodes", "del", "-a").stdout == "Removing nodes [2,3]... done\n"
    assert cluster.online(1) == {1}
    assert cluster.krgadm("nodes", "del", "-a").stdout == "No online node to remove.\n"
    r = cluster.krgadm("nodes", "add", "-c", "1")
    assert r.stdout.endswith("... done\n") and "Adding nodes [" in r.stdout
    assert len(cluster.online(1)) == 2
    cluster.krgadm("nodes", "add", "-t", "3")
    assert cluster.online(1) == {1, 2, 3}
    assert cluster.krgadm("nodes", "add", "-a").stdout == "No present node to add.\n"
    cluster.krgadm("nodes", "del", "-t", "1")
    assert cluster.online(1) == {1}
    assert cluster.krgadm("nodes", "add", "-a").stdout.endswith("Adding nodes [2,3]... done\n")


def test_add_of_an_unknown_node(cluster):
    r = cluster.krgadm("nodes", "add", "-n", "7", check=False)
    assert r.returncode == 2
    assert r.stderr == "krgadm: nodes 7 are not in the cluster configuration (nodes: 1,2,3)\n"


def test_add_gives_up_on_a_node_that_never_comes(cluster):
    cluster.krgadm("nodes", "del", "-n", "3")
    cluster.kill(3)
    wait_for(lambda: cluster.states(1)[3] == "possible", what="node 3 to be seen gone")
    r = cluster.krgadm("nodes", "add", "-n", "3", "--wait", "0.5", check=False)
    assert r.returncode == 1
    assert r.stdout == "Waiting for 1 nodes to join...    0/1    fail (timeout)\n"


def test_python_api_and_command_agree(cluster):
    with Client(cluster.home.socket(2)) as c:
        api = c.call(p.ClusterStatus())
    cmd = json.loads(cluster.krgadm("cluster", "status", "--json", node=2).stdout)
    assert api["online"] == cmd["online"] == [1, 2, 3]
    assert api["epoch"] == cmd["epoch"]


def test_poweroff_stops_every_daemon(cluster):
    pids = [cluster.pid(n) for n in (1, 2, 3)]
    assert all(pids)
    assert cluster.krgadm("cluster", "poweroff").stdout == "Shutting down cluster... done\n"
    for n in (1, 2, 3):
        assert cluster.pid(n) is None
        assert not cluster.home.socket(n).exists()
    with pytest.raises(NotRunning):
        Client(cluster.home.socket(1))
    assert cluster.krgadm("cluster", "status").stdout == "status: down\n"


def test_reboot_restarts_every_daemon_and_reforms_the_cluster(cluster):
    before = {n: cluster.call(n, p.ClusterStatus())["incarnation"] for n in (1, 2, 3)}
    assert cluster.krgadm("cluster", "reboot").stdout == "Rebooting cluster... done\n"
    after = wait_for(lambda: _incarnations_if_all_online(cluster), what="all nodes back online")
    assert all(after[n] != before[n] for n in (1, 2, 3))


def _incarnations_if_all_online(cluster):
    try:
        sts = {n: cluster.call(n, p.ClusterStatus()) for n in (1, 2, 3)}
    except NotRunning:
        return None
    if all(st["online"] == [1, 2, 3] for st in sts.values()):
        return {n: st["incarnation"] for n, st in sts.items()}
    return None


def test_cluster_info_is_the_sum_of_the_nodes(cluster):
    info = json.loads(cluster.run("krg", "info", "--json").stdout)
    assert [n["id"] for n in info["nodes"]] == [1, 2, 3]
    for n in info["nodes"]:
        assert n["cpus"] == os.cpu_count()
        assert 0 < n["mem_free"] <= n["mem_total"]
    total = info["total"]
    assert total["nodes"] == 3
    assert total["cpus"] == 3 * os.cpu_count()
    assert total["mem_total"] == sum(n["mem_total"] for n in info["nodes"])
    text = cluster.run("krg", "info").stdout
    assert f"cluster: 3 online nodes, {3 * os.cpu_count()} CPUs" in text
    assert cluster.krgadm("cluster", "info", "--json").returncode == 0


def test_info_counts_only_online_nodes(cluster):
    cluster.krgadm("nodes", "del", "-n", "3")
    total = json.loads(cluster.run("krg", "info", "--json").stdout)["total"]
    assert total["nodes"] == 2 and total["cpus"] == 2 * os.cpu_count()


def test_ping_through_the_local_daemon(cluster):
    r = json.loads(cluster.run("krg", "ping", "3", "-c", "5", "--json").stdout)
    assert r["node"] == 3 and len(r["rtt_us"]) == 5
    bad = cluster.run("krg", "ping", "8", check=False)
    assert bad.returncode == 2 and "node 8 is not in the cluster configuration" in bad.stderr


def test_help_shows_the_commands(make_home):
    c = LocalCluster(make_home())
    out = c.krgadm("--help").stdout
    for word in ("cluster start --local 3", "nodes add -n 3", "{cluster,nodes,scheduler}"):
        assert word in out


def test_start_twice_is_harmless(cluster):
    r = cluster.krgadm("cluster", "start", "--local", "3")
    assert "No present node to add." in r.stdout or r.stdout.endswith("done\n")
    assert cluster.online(1) == {1, 2, 3}
