"""Nodes dying, restarting and coming back, with real daemons killed by real signals."""

import re

from kerrighed import protocol as p

from conftest import wait_for


def view_history(cluster, node):
    """(epoch, online nodes) of every view a node adopted, from its log."""
    return [(int(e), m) for e, m in re.findall(r"view epoch (\d+) by node \d+: online (\[[\d, ]*\]|none)",
                                                cluster.log(node))]


def test_a_killed_node_leaves_the_cluster_and_comes_back(cluster):
    epoch = cluster.call(1, p.ClusterStatus())["epoch"]
    cluster.kill(3)
    for n in (1, 2):
        wait_for(lambda: cluster.call(n, p.ClusterStatus())["epoch"] == epoch + 1,
                 what=f"node {n} to adopt the view without node 3")
        assert cluster.states(n) == {1: "online", 2: "online", 3: "possible"}
    # The survivors never left: one view change, which removed node 3 only.
    assert view_history(cluster, 1)[-1] == (epoch + 1, "[1, 2]")
    assert "no longer present" not in cluster.log(2).replace("node 3 is no longer present", "")

    cluster.start(3)
    # It crashed out of the cluster, so it asks to come back by itself; an administrator's
    # add may race that request, and both must end in the same view.
    cluster.krgadm("nodes", "add", "-n", "3")
    for n in (1, 2, 3):
        wait_for(lambda: cluster.online(n) == {1, 2, 3}, what=f"node {n} to see node 3 back")
    assert cluster.call(3, p.ClusterStatus())["epoch"] >= epoch + 2


def test_a_daemon_restarted_before_anyone_noticed_is_not_taken_for_its_old_self(cluster):
    old = cluster.call(3, p.ClusterStatus())["incarnation"]
    cluster.kill(3)
    cluster.start(3)           # faster than the failure timeout
    assert cluster.call(3, p.ClusterStatus())["incarnation"] != old
    # The old incarnation is dropped from the view, and the new daemon, which crashed out of a
    # running cluster, asks to be added back by itself.
    wait_for(lambda: "node 3 rejoined the cluster after a restart" in cluster.log(3), what="node 3 to rejoin")
    new = cluster.call(3, p.ClusterStatus())["incarnation"]
    for n in (1, 2, 3):
        wait_for(lambda: cluster.online(n) == {1, 2, 3}, what=f"node {n} to see node 3 back")
        members = dict(cluster.call(n, p.ClusterStatus())["view"]["members"])
        assert members[3] == new


def test_a_deleted_node_does_not_rejoin_by_itself(cluster):
    cluster.krgadm("nodes", "del", "-n", "3")
    cluster.kill(3)
    cluster.start(3)
    wait_for(lambda: cluster.states(1)[3] == "present", what="node 3 to be present again")
    assert "rejoined" not in cluster.log(3)
    assert cluster.online(1) == {1, 2}


def test_the_coordinator_dying_is_handled_by_the_next_node(cluster):
    cluster.kill(1)
    wait_for(lambda: cluster.online(2) == {2, 3}, what="node 2 to take over and drop node 1")
    assert cluster.online(3) == {2, 3}
    cluster.start(1)
    cluster.krgadm("nodes", "add", "-n", "1", node=2)     # (racing node 1's own request to rejoin)
    wait_for(lambda: cluster.online(1) == {1, 2, 3}, what="node 1 to see itself back")


def test_a_stopped_node_is_seen_leaving_too(cluster):
    cluster.kill(2, sig=15)                      # a clean stop (SIGTERM)
    wait_for(lambda: cluster.online(1) == {1, 3}, what="node 1 to drop the stopped node 2")
    assert not cluster.home.socket(2).exists()
