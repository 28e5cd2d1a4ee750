import os
import subprocess
import sys
from importlib.metadata import EntryPoint

import msgpack
import pytest

import scheduler
from kerrighed.errors import ConfigError, UsageError
from scheduler import (Balancer, ClusterView, JobLoad, JobSpec, Migration, NodeLoad, NoNodeAvailable, Policy,
                       Scheduler, SchedulerConfig, _plugin, get_policy, known_policies, parse_assignment)
from scheduler.filters import get_filter, known_filters
from scheduler.policy import register

GiB = 1 << 30
JOB = JobSpec(argv=("sleep", "1"), uid=1000, origin=1)


def load(node, *, cpus=1, load=0.0, jobs=0, mem_free=GiB, cpu_share=1.0):
    return NodeLoad(node=node, cpus=cpus, load=load, cpu_percent=0.0, mem_total=4 * GiB,
                    mem_free=mem_free, jobs=jobs, cpu_share=cpu_share)


def view(*nodes, local=None):
    nodes = tuple(load(n) if isinstance(n, int) else n for n in nodes)
    return ClusterView(nodes=nodes, local=nodes[0].node if local is None and nodes else local)


# Plugins that tests publish through fake entry points.

class Fancy(Policy):
    name = "fancy"
    description = "always the highest node id"

    def place(self, job, view):
        return view.ids[-1]


class Nowhere(Policy):
    name = "nowhere"
    description = "a buggy plugin"

    def place(self, job, view):
        return 99


class MoveAll(Balancer):
    """Moves every job it is given to the highest node: lets tests check what Scheduler lets through."""

    name = "move_all"
    description = "moves everything"
    param_spec = {"target": _plugin.Param(int, 0)}

    def rebalance(self, view, jobs):
        target = self.params["target"] or view.ids[-1]
        return [Migration(job=j.gpid, source=j.node, target=target) for j in jobs]


def _ep(name, obj_name, group="kerrighed.policies"):
    return EntryPoint(name=name, value=f"{__name__}:{obj_name}", group=group)


@pytest.fixture
def plugins(monkeypatch):
    """Publish entry points: `plugins(group, [EntryPoint, ...])`; every other group is empty."""
    published = {}
    monkeypatch.setattr(_plugin, "entry_points", lambda group: published.get(group, []))
    return published.__setitem__


@pytest.fixture(autouse=True)
def no_installed_plugins(monkeypatch):
    # Plugins installed in the venv must not change what these tests see.
    monkeypatch.setattr(_plugin, "entry_points", lambda group: [])


# Registry

def test_unknown_policy_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown policy 'nope' \(known: least_loaded, local, round_robin\)"):
        get_policy("nope")


def test_unknown_filter_and_probe_name_the_known_ones():
    from scheduler.probes import get_probe
    with pytest.raises(ConfigError, match=r"unknown filter 'smooth' \(known: ewma, freq_limit, threshold\)"):
        get_filter("smooth")
    with pytest.raises(ConfigError, match=r"unknown probe 'disk' \(known: cpu, load, mem\)"):
        get_probe("disk")


def test_known_components_come_with_descriptions():
    policies = known_policies()
    assert list(policies) == ["least_loaded", "local", "round_robin"]
    assert "round" in policies["round_robin"]
    assert set(known_filters()) == {"ewma", "freq_limit", "threshold"}


@pytest.mark.parametrize("make, message", [
    (lambda: get_policy("round_robin")(speed=3), r"policy 'round_robin' has no parameter 'speed' \(valid: none\)"),
    (lambda: get_filter("ewma")(beta=0.2), r"filter 'ewma' has no parameter 'beta' \(valid: alpha\)"),
    (lambda: get_filter("threshold")(), r"filter 'threshold' needs parameter 'threshold'"),
    (lambda: get_filter("threshold")(threshold="high"), r"'threshold' must be a number, not 'high'"),
    (lambda: get_filter("threshold")(threshold=True), r"'threshold' must be a number, not True"),
    (lambda: get_filter("threshold")(threshold=-1), r"'threshold' must be 0 or more, not -1.0"),
    (lambda: get_filter("freq_limit")(min_interval=-0.5), r"'min_interval' must be 0 or more seconds"),
    (lambda: get_filter("ewma")(alpha=0), r"'alpha' must be in \(0, 1\], not 0.0"),
    (lambda: get_filter("ewma")(alpha=1.5), r"'alpha' must be in \(0, 1\]"),
])
def test_bad_parameters_are_one_clear_config_error(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_integer_parameters_are_accepted_where_numbers_are_and_defaults_fill_in():
    assert get_filter("ewma")(alpha=1).params == {"alpha": 1.0}
    assert get_filter("ewma")().params == {"alpha": 0.5}


def test_register_refuses_a_second_class_with_the_same_name():
    class Again(Fancy):
        name = "round_robin"

    with pytest.raises(ValueError, match="registered twice"):
        register(Again)


# Entry points

def test_entry_point_policy_is_found_listed_and_named_in_errors(plugins):
    plugins("kerrighed.policies", [_ep("fancy", "Fancy")])
    assert get_policy("fancy") is Fancy
    assert known_policies()["fancy"] == "always the highest node id"
    with pytest.raises(ConfigError, match=r"\(known: fancy, least_loaded, local, round_robin\)"):
        get_policy("nope")
    assert Scheduler(SchedulerConfig(policy="fancy")).place(JOB, view(1, 2, 7)) == 7


def test_entry_points_are_looked_up_in_their_own_group(plugins):
    plugins("kerrighed.filters", [_ep("fancy", "Fancy", group="kerrighed.filters")])
    with pytest.raises(ConfigError, match="unknown policy 'fancy'"):
        get_policy("fancy")


def test_in_tree_policy_wins_over_an_entry_point_of_the_same_name(plugins):
    plugins("kerrighed.policies", [_ep("round_robin", "Fancy")])
    assert get_policy("round_robin").__name__ == "RoundRobin"


@pytest.mark.parametrize("entry_point, message", [
    (EntryPoint(name="gone", value="no_such_module_krg:Gone", group="kerrighed.policies"),
     r"policy 'gone' \(no_such_module_krg:Gone\) failed to load: No module named"),
    (_ep("job", "JOB"), r"policy 'job' .* is not a Policy subclass"),
    (_ep("other", "Fancy"), r"policy 'other' .* calls itself 'fancy'"),
])
def test_a_broken_entry_point_fails_with_its_reason(plugins, entry_point, message):
    plugins("kerrighed.policies", [entry_point])
    with pytest.raises(ConfigError, match=message):
        get_policy(entry_point.name)
    # ... and a listing still works, showing what is broken.
    assert known_policies()[entry_point.name].startswith("(cannot load: ")
    assert "round_robin" in known_policies()


# Views

def test_view_sorts_nodes_and_refuses_duplicates():
    v = ClusterView(nodes=(load(3), load(1), load(2)), local=1)
    assert v.ids == (1, 2, 3)
    assert v.node(2).node == 2
    with pytest.raises(KeyError, match=r"node 5 is not in the cluster view \(online: 1,2,3\)"):
        v.node(5)
    with pytest.raises(ValueError, match="node 1 appears twice"):
        ClusterView(nodes=(load(1), load(1)), local=1)


@pytest.mark.parametrize("kwargs", [{"cpus": 0}, {"cpu_share": 0.0}, {"cpu_share": 1.5}])
def test_node_load_refuses_impossible_capacity(kwargs):
    with pytest.raises(ValueError):
        load(1, **kwargs)


def test_job_spec_argv_from_msgpack_becomes_a_tuple():
    assert JobSpec(argv=["a", "b"], uid=0, origin=1).argv == ("a", "b")


# Round robin

@pytest.mark.parametrize("local, expected", [(0, [2, 3, 5, 0, 2]), (2, [3, 5, 0, 2, 3])])
def test_round_robin_starts_after_the_deciding_node(local, expected):
    # The example in Kerrighed's round_robin_balancer.c.
    rr = get_policy("round_robin")()
    v = view(0, 2, 3, 5, local=local)
    assert [rr.place(JOB, v) for _ in expected] == expected


def test_round_robin_continues_from_the_last_node_when_nodes_join_and_leave():
    rr = get_policy("round_robin")()
    assert [rr.place(JOB, view(1, 2, 3, local=1)) for _ in range(2)] == [2, 3]
    after = view(1, 2, 4, 5, local=1)        # node 3, the last target, left; 4 and 5 joined
    assert [rr.place(JOB, after) for _ in range(4)] == [4, 5, 1, 2]


def test_every_policy_refuses_an_empty_view():
    empty = ClusterView(nodes=(), local=1)
    for name in known_policies():
        with pytest.raises(NoNodeAvailable, match="no online node"):
            get_policy(name)().place(JOB, empty)


# Least loaded

def least_loaded(*nodes, job=JOB):
    return get_policy("least_loaded")().place(job, view(*nodes))


def test_least_loaded_counts_load_and_placed_jobs_per_cpu():
    # (load + jobs) / cpus: node 1 -> 2.0, node 2 -> 0.75, node 3 -> 1.0
    assert least_loaded(load(1, load=2.0), load(2, cpus=4, load=1.0, jobs=2), load(3, jobs=1)) == 2


def test_least_loaded_counts_only_the_cpu_share_a_node_may_use():
    busy_big = load(1, cpus=4, load=1.0)
    small = load(2, cpus=2, load=1.0)
    assert least_loaded(busy_big, small) == 1                          # 0.25 < 0.5
    assert least_loaded(load(1, cpus=4, load=1.0, cpu_share=0.25), small) == 2   # 1.0 > 0.5


def test_least_loaded_ties_go_to_most_free_memory_then_lowest_id():
    assert least_loaded(load(1, mem_free=GiB), load(2, mem_free=2 * GiB), load(3, mem_free=GiB)) == 2
    assert least_loaded(load(4), load(3), load(5)) == 3


def test_least_loaded_skips_nodes_without_room_for_the_memory_hint():
    job = JobSpec(argv=("big",), uid=0, origin=1, mem_hint=2 * GiB)
    assert least_loaded(load(1, mem_free=GiB), load(2, load=3.0, mem_free=3 * GiB), job=job) == 2


def test_least_loaded_says_how_much_memory_the_roomiest_node_has():
    job = JobSpec(argv=("big",), uid=0, origin=1, mem_hint=8 * GiB)
    with pytest.raises(NoNodeAvailable, match=r"8192 MiB free .*\(largest: 3072 MiB on node 2\)"):
        least_loaded(load(1, mem_free=GiB), load(2, mem_free=3 * GiB), job=job)


# Local

def test_local_keeps_the_job_on_its_origin_however_loaded():
    job = JobSpec(argv=("x",), uid=0, origin=2)
    assert get_policy("local")().place(job, view(1, load(2, load=50.0), 3)) == 2


def test_local_falls_back_to_least_loaded_when_the_origin_left():
    job = JobSpec(argv=("x",), uid=0, origin=9)
    assert get_policy("local")().place(job, view(load(1, load=2.0), 3, load(4, load=1.0))) == 3


# Filters, fed with made-up times

def test_threshold_passes_changes_larger_than_the_threshold_from_the_last_passed_value():
    f = get_filter("threshold")(threshold=10)
    fed = [(50, 0.0), (55, 1.0), (60, 2.0), (61, 3.0), (52, 4.0), (50, 5.0), (72, 6.0)]
    assert [f.feed(v, t) for v, t in fed] == [50, None, None, 61, None, 50, 72]


def test_freq_limit_passes_at_most_one_value_per_interval():
    f = get_filter("freq_limit")(min_interval=2)
    fed = [(1, 10.0), (2, 11.0), (3, 11.99), (4, 12.0), (5, 13.5), (6, 14.5)]
    assert [f.feed(v, t) for v, t in fed] == [1, None, None, 4, None, 6]


def test_ewma_smooths_and_always_passes():
    f = get_filter("ewma")(alpha=0.5)
    assert [f.feed(v, float(t)) for t, v in enumerate([10, 20, 20, 0])] == [10, 15, 17.5, 8.75]
    assert get_filter("ewma")(alpha=1).feed(3.0, 0.0) == 3.0


# Configuration

def test_parse_assignment_reads_names_and_typed_parameters():
    assert parse_assignment("least_loaded") == ("least_loaded", {})
    assert parse_assignment("p:a=1, b=2.5,c=-3,d=1e3,e=true,f=False,g=fast") == (
        "p", {"a": 1, "b": 2.5, "c": -3, "d": 1000.0, "e": True, "f": False, "g": "fast"})


@pytest.mark.parametrize("text, message", [
    ("", "expected NAME"),
    (":a=1", "expected NAME"),
    ("least loaded", "expected NAME"),
    ("p:", r"invalid parameter '' in 'p:'"),
    ("p:a", r"invalid parameter 'a'"),
    ("p:=1", r"invalid parameter '=1'"),
    ("p:a=", r"invalid parameter 'a='"),
    ("p:a=1,,b=2", r"invalid parameter ''"),
    ("p:a=1,a=2", r"parameter 'a' given twice"),
])
def test_parse_assignment_errors_are_usage_errors(text, message):
    with pytest.raises(UsageError, match=message):
        parse_assignment(text)


def test_config_round_trips_through_msgpack():
    cfg = SchedulerConfig(policy="fancy", params={"a": 1.5}, balancer="move_all", balancer_params={"target": 2})
    again = SchedulerConfig.from_dict(msgpack.unpackb(msgpack.packb(cfg.to_dict())))
    assert again == cfg
    assert SchedulerConfig.from_dict({}) == SchedulerConfig() == SchedulerConfig(policy="round_robin")


@pytest.mark.parametrize("data, message", [
    ({"policy": "round_robin", "balance": "x"}, r"unknown scheduler setting 'balance' \(valid: policy, params,"),
    ({"policy": 3}, "policy must be a name, not 3"),
    ({"balancer": ["a"]}, "balancer must be a name"),
    ({"params": [1, 2]}, "params must be a table"),
    ({"balancer_params": {1: 2}}, "balancer_params must be a table"),
    ([("policy", "local")], "must be a table"),
])
def test_malformed_config_dict_is_a_config_error(data, message):
    with pytest.raises(ConfigError, match=message):
        SchedulerConfig.from_dict(data)


@pytest.mark.parametrize("cfg, message", [
    (SchedulerConfig(policy="nope"), "unknown policy 'nope'"),
    (SchedulerConfig(policy="least_loaded", params={"x": 1}), "policy 'least_loaded' has no parameter 'x'"),
    (SchedulerConfig(balancer="round_robin"), r"unknown balancer 'round_robin' \(known: mosix_load_balancer\); "
                                              r"'round_robin' is a placement policy"),
    (SchedulerConfig(balancer="mosix"), r"^unknown balancer 'mosix' \(known: mosix_load_balancer\)$"),
    (SchedulerConfig(balancer_params={"target": 1}), "no balancer is"),
])
def test_validate_fails_on_bad_names_and_params(cfg, message):
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_validate_names_installed_balancers(plugins):
    plugins("kerrighed.policies", [_ep("fancy", "Fancy")])
    plugins("kerrighed.balancers", [_ep("move_all", "MoveAll", group="kerrighed.balancers")])
    with pytest.raises(ConfigError, match=r"unknown balancer 'fancy' \(known: mosix_load_balancer, move_all\)"):
        SchedulerConfig(balancer="fancy").validate()
    SchedulerConfig(balancer="move_all", balancer_params={"target": 3}).validate()


# The Scheduler

def test_scheduler_defaults_to_round_robin_and_describes_itself():
    s = Scheduler()
    assert [s.place(JOB, view(1, 2, 3, local=1)) for _ in range(3)] == [2, 3, 1]
    assert s.describe() == {
        "policy": {"name": "round_robin", "params": {}, "description": known_policies()["round_robin"]},
        "balancer": None,
    }


def test_scheduler_refuses_a_policy_choice_that_is_not_online(plugins):
    plugins("kerrighed.policies", [_ep("nowhere", "Nowhere")])
    with pytest.raises(ConfigError, match=r"policy 'nowhere' chose node 99, which is not online \(online: 1,2\)"):
        Scheduler(SchedulerConfig(policy="nowhere")).place(JOB, view(1, 2))


def test_reconfigure_keeps_round_robin_position_when_the_policy_is_unchanged():
    s = Scheduler()
    v = view(1, 2, 3, 4, local=1)
    assert s.place(JOB, v) == 2
    s.reconfigure(SchedulerConfig())
    assert s.place(JOB, v) == 3
    s.reconfigure(SchedulerConfig(policy="least_loaded"))
    assert s.describe()["policy"]["name"] == "least_loaded"
    s.reconfigure(SchedulerConfig())
    assert s.place(JOB, v) == 2          # a new round robin starts again after the local node


def test_reconfigure_to_a_bad_config_changes_nothing():
    s = Scheduler(SchedulerConfig(policy="local"))
    with pytest.raises(ConfigError):
        s.reconfigure(SchedulerConfig(policy="local", balancer="nope"))
    assert s.config == SchedulerConfig(policy="local")
    assert s.describe()["policy"]["name"] == "local"


def test_rebalance_without_a_balancer_moves_nothing():
    jobs = (JobLoad(gpid=1, node=1, cpu_percent=100.0, rss=1, can_migrate=True),)
    assert Scheduler().rebalance(view(1, 2), jobs) == []


def test_rebalance_passes_valid_migrations_and_describes_the_balancer(plugins):
    plugins("kerrighed.balancers", [_ep("move_all", "MoveAll", group="kerrighed.balancers")])
    s = Scheduler(SchedulerConfig(balancer="move_all"))
    jobs = (JobLoad(gpid=11, node=1, cpu_percent=90.0, rss=1, can_migrate=True),)
    assert s.rebalance(view(1, 2, local=1), jobs) == [Migration(job=11, source=1, target=2)]
    assert s.describe()["balancer"] == {"name": "move_all", "params": {"target": 0},
                                        "description": "moves everything"}


@pytest.mark.parametrize("job, target, why", [
    (JobLoad(gpid=11, node=1, cpu_percent=90.0, rss=1, can_migrate=False), 2, "lacks the CAN_MIGRATE"),
    (JobLoad(gpid=11, node=1, cpu_percent=90.0, rss=1, can_migrate=True), 7, "node 7 is not another online"),
    (JobLoad(gpid=11, node=1, cpu_percent=90.0, rss=1, can_migrate=True), 1, "node 1 is not another online"),
])
def test_rebalance_refuses_migrations_no_balancer_may_ask_for(plugins, job, target, why):
    plugins("kerrighed.balancers", [_ep("move_all", "MoveAll", group="kerrighed.balancers")])
    s = Scheduler(SchedulerConfig(balancer="move_all", balancer_params={"target": target}))
    with pytest.raises(ConfigError, match=f"balancer 'move_all' asked to move job 11 to node {target}, but .*{why}"):
        s.rebalance(view(1, 2, local=1), (job,))


# Probes measure this machine

def test_probes_return_plausible_values_under_their_declared_names():
    from scheduler.probes import get_probe, known_probes
    for name in known_probes():
        probe = get_probe(name)()
        assert probe.period_ms == 1000
        assert set(probe.measure()) == set(probe.values)

    cpu = get_probe("cpu")()
    sum(i * i for i in range(200_000))      # some CPU time between the two samples
    usage = cpu.measure()["cpu_usage"]
    assert 0 <= usage <= 100 * os.cpu_count()

    mem = get_probe("mem")().measure()
    assert 0 < mem["ram_free"] <= mem["ram_total"]

    figures = get_probe("load")().measure()
    assert figures["active_tasks"] >= 1      # this test is running
    assert figures["mean_load"] == pytest.approx(os.getloadavg()[0], abs=1.0)


def test_probe_period_is_a_validated_parameter():
    from scheduler.probes import get_probe
    assert get_probe("mem")(period_ms=250).period_ms == 250
    with pytest.raises(ConfigError, match="'period_ms' must be a positive number of milliseconds"):
        get_probe("mem")(period_ms=0)
    with pytest.raises(ConfigError, match="'period_ms' must be an integer, not 0.5"):
        get_probe("mem")(period_ms=0.5)


def test_importing_the_scheduler_does_not_import_psutil():
    code = "import sys, scheduler; assert 'psutil' not in sys.modules, 'psutil imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(scheduler.__path__[0]))
