"""The MOSIX-style balancer, fed with hand-written snapshots and made-up times."""

from importlib.metadata import EntryPoint

import pytest

from kerrighed.errors import ConfigError
from scheduler import (Balancer, ClusterView, JobLoad, Migration, NodeLoad, Scheduler, SchedulerConfig, _plugin,
                       get_balancer, known_balancers)

GiB = 1 << 30


@pytest.fixture(autouse=True)
def no_installed_plugins(monkeypatch):
    monkeypatch.setattr(_plugin, "entry_points", lambda group: [])


def node(n, runnable=0.0, *, cpus=2, limit=None):
    """A node of `cpus` CPUs, limited to `limit` of them, whose jobs want `runnable` CPUs."""
    share = 1.0 if limit is None else limit / cpus
    return NodeLoad(node=n, cpus=cpus, load=0.0, cpu_percent=0.0, mem_total=4 * GiB, mem_free=GiB, jobs=0,
                    cpu_share=share, runnable=runnable)


def job(gpid, on, load=1.0, *, cpu_time=10.0, age=60.0, resident=None, can_migrate=True):
    return JobLoad(gpid=gpid, node=on, cpu_percent=100.0 * (load or 0), rss=1 << 20, can_migrate=can_migrate,
                   load=load, cpu_time=cpu_time, age=age, resident=resident)


def view(*nodes, now=100.0):
    return ClusterView(nodes=nodes, local=nodes[0].node, now=now)


def mosix(**params):
    return get_balancer("mosix_load_balancer")(**params)


def test_the_balancer_is_known_by_kerrighed_name_with_kerrighed_defaults():
    assert list(known_balancers()) == ["mosix_load_balancer"]
    assert mosix().params == {"stability": 1.3, "interval": 2.0, "residency": 5.0, "min_age": 1.0}


@pytest.mark.parametrize("params, message", [
    ({"stability": 0.9}, r"'stability' must be 1 or more"),
    ({"interval": -1}, r"'interval' must be 0 or more seconds"),
    ({"residency": -0.5}, r"'residency' must be 0 or more seconds"),
    ({"stability": "high"}, r"'stability' must be a number"),
    ({"speed": 2}, r"balancer 'mosix_load_balancer' has no parameter 'speed' \(valid: interval, min_age, residency, "
                   r"stability\)"),
])
def test_bad_parameters_are_config_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        mosix(**params)


def test_unknown_balancer_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"^unknown balancer 'mosx' \(known: mosix_load_balancer\)$"):
        get_balancer("mosx")


class Everything(Balancer):
    name = "everything"
    description = "moves every job to the last node"

    def rebalance(self, view, jobs):
        return [Migration(j.gpid, j.node, view.ids[-1]) for j in jobs if j.node != view.ids[-1]]


def test_third_party_balancers_come_from_their_own_entry_point_group(monkeypatch):
    ep = EntryPoint(name="everything", value=f"{__name__}:Everything", group="kerrighed.balancers")
    monkeypatch.setattr(_plugin, "entry_points", lambda group: [ep] if group == "kerrighed.balancers" else [])
    assert get_balancer("everything") is Everything
    assert list(known_balancers()) == ["everything", "mosix_load_balancer"]
    s = Scheduler(SchedulerConfig(balancer="everything"))
    assert s.rebalance(view(node(1, 1), node(2)), (job(5, 1),)) == [Migration(5, 1, 2)]


# The decision

def test_a_busy_node_gives_its_job_to_the_idle_one():
    moves = mosix().rebalance(view(node(1, 2.0), node(2, 0.0)), (job(5, 1), job(6, 1)))
    assert moves == [Migration(job=5, source=1, target=2)]


def test_no_move_unless_the_source_stays_busier_than_the_target_times_the_stability_factor():
    # Node 1 has 3 busy jobs, node 2 has 2: after a move node 2 would have 3 > 3 / 1.3.
    jobs = (job(5, 1), job(6, 1), job(7, 1), job(8, 2), job(9, 2))
    assert mosix().rebalance(view(node(1, 3.0), node(2, 2.0)), jobs) == []
    # 4 against 2: node 2 would have 3, and 4 > 1.3 x 3 holds.
    jobs += (job(10, 1),)
    assert mosix().rebalance(view(node(1, 4.0), node(2, 2.0)), jobs) == [Migration(5, 1, 2)]
    # ... but not with a stricter factor: 4 > 1.5 x 3 fails.
    assert mosix(stability=1.5).rebalance(view(node(1, 4.0), node(2, 2.0)), jobs) == []


def test_a_lone_job_stays_put_unless_the_other_node_is_much_bigger():
    jobs = (job(5, 1),)
    assert mosix().rebalance(view(node(1, 1.0), node(2, 0.0)), jobs) == []
    # Node 1 may use a quarter of a CPU, node 2 a whole one: 4.0 > 1.3 x 1.0.
    big = view(node(1, 1.0, limit=0.25), node(2, 0.0, limit=1.0))
    assert mosix().rebalance(big, jobs) == [Migration(5, 1, 2)]


def test_loads_are_compared_per_usable_cpu():
    # Two jobs on a node limited to 0.5 CPU (load 4) against three on a 2-CPU node (load 1.5).
    jobs = (job(5, 1), job(6, 1), job(7, 2), job(8, 2), job(9, 2))
    moves = mosix().rebalance(view(node(1, 2.0, limit=0.5), node(2, 3.0, cpus=2)), jobs)
    assert moves == [Migration(5, 1, 2)]
    # The target is the node least loaded *with* the job: the big one, though it runs more.
    three = view(node(1, 4.0, limit=0.5), node(2, 1.0, limit=0.5), node(3, 2.0, cpus=4))
    assert mosix().rebalance(three, tuple(job(g, 1) for g in (5, 6, 7, 8))) == [Migration(5, 1, 3)]


def test_only_jobs_with_can_migrate_move():
    jobs = (job(5, 1, can_migrate=False), job(6, 1, can_migrate=False))
    assert mosix().rebalance(view(node(1, 2.0), node(2)), jobs) == []
    jobs += (job(7, 1, cpu_time=0.5),)
    assert mosix().rebalance(view(node(1, 3.0), node(2)), jobs) == [Migration(7, 1, 2)]


def test_jobs_using_no_cpu_or_too_young_or_unmeasured_are_not_candidates():
    v = view(node(1, 4.0), node(2))
    assert mosix().rebalance(v, (job(5, 1, load=0.05), job(6, 1, age=0.5), job(7, 1, load=None))) == []
    assert mosix(min_age=0).rebalance(v, (job(6, 1, age=0.5),)) == [Migration(6, 1, 2)]


def test_the_job_that_has_used_the_most_cpu_goes_first():
    jobs = (job(5, 1, cpu_time=1.0), job(6, 1, cpu_time=30.0), job(7, 1, cpu_time=8.0))
    assert mosix().rebalance(view(node(1, 3.0), node(2)), jobs) == [Migration(6, 1, 2)]


def test_a_job_too_big_to_help_is_skipped_for_a_smaller_one():
    # A 4-thread job would leave node 2 busier than node 1: the single-threaded one goes.
    jobs = (job(5, 1, load=4.0, cpu_time=99.0), job(6, 1, load=1.0, cpu_time=1.0))
    assert mosix().rebalance(view(node(1, 5.0), node(2, 0.0)), jobs) == [Migration(6, 1, 2)]


def test_one_job_leaves_a_node_per_interval():
    b = mosix(interval=2.0)
    jobs = tuple(job(g, 1) for g in range(10, 18))
    cluster = (node(1, 8.0), node(2), node(3), node(4))
    assert b.rebalance(view(*cluster, now=100.0), jobs) == [Migration(10, 1, 2)]
    assert b.rebalance(view(*cluster, now=101.9), jobs) == []
    assert b.rebalance(view(*cluster, now=102.0), jobs) == [Migration(11, 1, 3)]


def test_every_loaded_node_may_give_one_job_in_the_same_round():
    jobs = tuple(job(g, 1) for g in (10, 11, 12)) + tuple(job(g, 2) for g in (20, 21, 22))
    moves = mosix().rebalance(view(node(1, 3.0), node(2, 3.0), node(3), node(4)), jobs)
    assert moves == [Migration(10, 1, 3), Migration(20, 2, 4)]


def test_no_ping_pong_a_moved_job_stays_for_its_residency():
    b = mosix(interval=0.0, residency=5.0)
    assert b.rebalance(view(node(1, 2.0), node(2), now=10.0), (job(5, 1), job(6, 1, cpu_time=1))) \
        == [Migration(5, 1, 2)]
    # Job 5 arrived on node 2, which is now the busy one: job 5 may not go back, job 7 may.
    later = view(node(1, 0.0), node(2, 3.0), now=12.0)
    on_2 = (job(5, 2, cpu_time=50, resident=1.0), job(7, 2, cpu_time=2))
    assert b.rebalance(later, on_2) == [Migration(7, 2, 1)]
    # What the snapshot says counts too: another decider (its memory empty) keeps job 5 where it is.
    assert mosix(interval=0.0).rebalance(later, on_2[:1]) == []
    assert mosix(interval=0.0).rebalance(later, (job(5, 2, resident=5.0),)) == [Migration(5, 2, 1)]


def test_a_move_in_flight_counts_on_its_target_until_the_target_reports_the_job():
    b = mosix(interval=0.0)
    jobs = tuple(job(g, 1) for g in (10, 11, 12, 13))
    stale = (node(1, 4.0), node(2), node(3))
    assert b.rebalance(view(*stale, now=1.0), jobs) == [Migration(10, 1, 2)]
    # Half a second later nothing has been reported yet: the next job goes to node 3, not 2 again.
    assert b.rebalance(view(*stale, now=1.5), jobs) == [Migration(11, 1, 3)]
    # Once node 2 reports job 10, its own figures count it; after a while an unreported move is forgotten.
    arrived = (node(1, 2.0), node(2, 1.0), node(3, 1.0))
    jobs = (job(10, 2, resident=0.2), job(11, 3, resident=0.1), job(12, 1), job(13, 1))
    assert b.rebalance(view(*arrived, now=2.0), jobs) == []


def test_sixteen_jobs_on_one_node_spread_over_four():
    """Each round the decider sees what the previous rounds did (moves take effect at once)."""
    b = mosix(interval=1.0)
    where = {g: 1 for g in range(100, 116)}
    for t in range(40):
        nodes = tuple(node(n, float(sum(1 for w in where.values() if w == n)), limit=0.5) for n in (1, 2, 3, 4))
        jobs = tuple(job(g, w, resident=None) for g, w in where.items())
        for m in b.rebalance(view(*nodes, now=float(t)), jobs):
            assert where[m.job] == m.source
            where[m.job] = m.target
    counts = sorted(sum(1 for w in where.values() if w == n) for n in (1, 2, 3, 4))
    assert counts[-1] / counts[0] <= 1.3 * (counts[0] + 1) / counts[0]     # as even as the factor allows
    assert sum(counts) == 16 and counts[0] >= 3


def test_a_move_counts_on_its_target_while_its_migration_lasts_and_a_failed_one_stops_counting():
    b = mosix(interval=0.0)
    jobs = tuple(job(g, 1) for g in (10, 11, 12, 13))
    stale = (node(1, 4.0), node(2), node(3), node(4))

    def at(now, moving=frozenset()):
        return ClusterView(nodes=stale, local=1, now=now, moving=moving)

    assert b.rebalance(at(1.0), jobs) == [Migration(10, 1, 2)]
    # A slow migration (a big job): ten seconds on, job 10 still counts on node 2, and is no candidate.
    assert b.rebalance(at(11.0, moving={10}), jobs) == [Migration(11, 1, 3)]
    assert b.rebalance(at(11.5, moving={10, 11}), jobs) == [Migration(12, 1, 4)]
    # Job 10's migration failed (no longer under way, still reported on node 1): two seconds later
    # node 2 counts as empty again, and job 10 (its residency over) is tried again.
    assert b.rebalance(at(12.0, moving={11, 12}), jobs) == []
    assert b.rebalance(at(14.5, moving={11, 12}), jobs) == [Migration(10, 1, 2)]
