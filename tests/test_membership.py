"""The membership state machine, driven by hand: no sockets, no clocks."""

import pytest

from kerrighed.membership import (
    ONLINE, POSSIBLE, PRESENT, Broadcast, Membership, PeerDown, PeerRestarted, View, ViewChanged,
)

T = 1.5     # failure timeout


def node(me, nodes=(1, 2, 3)):
    return Membership(me=me, incarnation=100 + me, possible=frozenset(nodes), timeout=T)


def hear(m, now, frm, view=None, inc=None):
    return m.on_heartbeat(now, frm, 100 + frm if inc is None else inc, view or View())


def test_nodes_start_present_or_possible_and_nothing_is_online():
    m = node(1)
    hear(m, 0.0, 2)
    assert m.states(0.0) == {1: PRESENT, 2: PRESENT, 3: POSSIBLE}
    assert m.online(0.0) == []


def test_first_add_on_an_empty_cluster_includes_the_proposer():
    m = node(1)
    hear(m, 0.0, 2)
    actions = m.propose(0.0, add={2})
    assert m.view.nodes == {1, 2}
    assert m.view.epoch == 1
    assert any(isinstance(a, ViewChanged) and a.joined == {1, 2} for a in actions)
    assert any(isinstance(a, Broadcast) for a in actions)
    assert m.states(0.0) == {1: ONLINE, 2: ONLINE, 3: POSSIBLE}


def test_adding_a_node_that_is_not_present_is_refused():
    m = node(1)
    with pytest.raises(ValueError, match="node 3 is not present"):
        m.propose(0.0, add={3})


def test_newer_views_are_adopted_and_older_ones_ignored():
    a, b = node(1), node(2)
    hear(a, 0.0, 2)
    a.propose(0.0, add={2})
    hear(b, 0.1, 1, view=a.view)
    assert b.view == a.view
    assert b.is_online(2, 0.1)
    hear(b, 0.2, 1, view=View())          # an old view changes nothing
    assert b.view == a.view


def test_same_epoch_proposals_are_ordered_by_proposer():
    low = View(5, 1, ((1, 101),))
    high = View(5, 2, ((1, 101), (2, 102)))
    assert high.newer_than(low) and not low.newer_than(high)


def run(m, start, end, hearing=(), view=None, step=0.25):
    """Tick every `step` seconds from start to end, hearing from `hearing` at each tick."""
    t, actions = start, []
    while t <= end + 1e-9:
        for n in hearing:
            hear(m, t, n, view=view)
        actions += m.tick(t)
        t += step
    return actions


def test_coordinator_removes_a_silent_member_after_the_timeout():
    m = node(1)
    hear(m, 0.0, 2)
    hear(m, 0.0, 3)
    m.propose(0.0, add={2, 3})
    assert run(m, 0.0, 1.0, hearing=[2]) == []      # node 3 silent for 1 s: within the timeout
    actions = run(m, 1.25, 2.0, hearing=[2])         # silent for longer than the timeout
    assert PeerDown(3) in actions
    assert m.view.nodes == {1, 2}
    assert m.states(2.0)[3] == POSSIBLE


def test_only_the_coordinator_removes_dead_members():
    m = Membership(me=2, incarnation=102, possible=frozenset({1, 2, 3, 4, 5}), timeout=T)
    v = View(1, 1, tuple((n, 100 + n) for n in (1, 2, 3, 4, 5)))
    run(m, 0.0, 0.0, hearing=[1, 3, 4, 5], view=v)
    run(m, 0.25, 2.0, hearing=[1, 4, 5], view=v)    # node 3 dead, but node 1 (lower id) coordinates
    assert m.view == v
    run(m, 2.25, 4.0, hearing=[4, 5], view=v)       # node 1 dead too: node 2 coordinates now
    assert m.view.nodes == {2, 4, 5}


def test_a_restarted_daemon_is_not_online_in_the_old_view():
    m = node(1)
    hear(m, 0.0, 2)
    m.propose(0.0, add={2})
    actions = hear(m, 0.5, 2, inc=999)     # node 2 came back with a new incarnation
    assert PeerRestarted(2) in actions and PeerDown(2) not in actions
    assert m.state(2, 0.5) == PRESENT
    m.tick(0.6)
    assert m.view.nodes == {1}             # the coordinator dropped the old incarnation
    m.propose(0.7, add={2})                # and it can be added again
    assert m.view.incarnation(2) == 999
    assert m.state(2, 0.7) == ONLINE


def test_a_restarted_node_does_not_think_itself_online():
    old_view = View(3, 1, ((1, 101), (2, 55)))   # node 2's previous incarnation was 55
    m = node(2)
    hear(m, 0.0, 1, view=old_view)
    assert m.view == old_view
    assert m.state(2, 0.0) == PRESENT
    assert m.coordinator(0.0) is None     # not a member: it judges nobody


def test_removing_nodes():
    m = node(1)
    hear(m, 0.0, 2)
    hear(m, 0.0, 3)
    m.propose(0.0, add={2, 3})
    m.propose(0.1, remove={3})
    assert m.view.nodes == {1, 2}
    assert m.state(3, 0.1) == PRESENT


def test_heartbeats_from_unconfigured_nodes_are_ignored():
    m = node(1)
    assert hear(m, 0.0, 9) == []
    assert 9 not in m.states(0.0)


def test_view_wire_roundtrip_and_malformed_views():
    v = View(4, 2, ((1, 10), (2, 20)))
    assert View.from_wire(v.to_wire()) == v
    with pytest.raises(ValueError):
        View.from_wire({"epoch": 1})
    with pytest.raises(ValueError):
        View.from_wire({"epoch": 1, "proposer": 1, "members": [["x", 1]]})


def test_a_fresh_coordinator_does_not_drop_members_it_has_not_heard_yet():
    # Node 1 restarts and is added back by node 2; node 3's heartbeats have not reached it yet.
    m = Membership(me=1, incarnation=101, possible=frozenset({1, 2, 3}), timeout=T, started=10.0)
    v = View(5, 2, ((1, 101), (2, 102), (3, 103)))
    hear(m, 10.1, 2, view=v)
    assert m.coordinator(10.1) == 1
    run(m, 10.1, 11.4, hearing=[2], view=v)
    assert m.view == v
    run(m, 11.6, 12.0, hearing=[2], view=v)        # silent for longer than the timeout since we started
    assert m.view.nodes == {1, 2}


def test_a_stalled_coordinator_does_not_evict_the_cluster():
    # Node 1's loop froze for 3 s: it heard nobody meanwhile, but nobody died.
    m = node(1)
    hear(m, 0.0, 2)
    hear(m, 0.0, 3)
    m.propose(0.0, add={2, 3})
    run(m, 0.0, 0.5, hearing=[2, 3])
    m.tick(3.5)
    assert m.view.nodes == {1, 2, 3}
    run(m, 3.75, 5.0, hearing=[2, 3])
    assert m.view.nodes == {1, 2, 3}


def test_half_with_the_lowest_id_goes_on():
    m = Membership(me=1, incarnation=101, possible=frozenset({1, 2, 3, 4}), timeout=T)
    for n in (2, 3, 4):
        hear(m, 0.0, n)
    m.propose(0.0, add={2, 3, 4})
    run(m, 0.25, 2.5, hearing=[2])
    assert m.view.nodes == {1, 2}


def test_a_minority_never_drops_the_majority():
    m = Membership(me=1, incarnation=101, possible=frozenset({1, 2, 3, 4}), timeout=T)
    for n in (2, 3, 4):
        hear(m, 0.0, n)
    m.propose(0.0, add={2, 3, 4})
    run(m, 0.25, 3.0)              # node 1 hears nobody (cut off): 1 of 4 may not go on alone
    assert m.view.nodes == {1, 2, 3, 4}


def test_half_without_the_lowest_id_waits():
    m = Membership(me=3, incarnation=103, possible=frozenset({1, 2, 3, 4}), timeout=T)
    v = View(1, 1, ((1, 101), (2, 102), (3, 103), (4, 104)))
    run(m, 0.0, 0.0, hearing=[1, 2, 4], view=v)
    run(m, 0.25, 3.0, hearing=[4], view=v)
    assert m.view == v             # {3, 4} is half, without node 1: no eviction
