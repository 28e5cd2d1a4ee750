"""Where restart puts an application's jobs, and how `krg run --app` reads its optional id: pure logic."""

import pytest

from kerrighed.appcheckpoint import restart_plan
from kerrighed.cli.krg import _app_option, build_parser

JOBS = [(2, 6291458), (3, 14680065), (3, 14680066), (1, 4194305)]


def placer(*nodes):
    """A stand-in for the scheduler: hands out `nodes` in turn, recording what it was asked."""
    asked = []

    def place(gpid):
        asked.append(gpid)
        return nodes[(len(asked) - 1) % len(nodes)]

    return place, asked


def test_jobs_go_back_to_the_nodes_that_dumped_them_when_those_are_online():
    place, asked = placer(9)
    assert restart_plan(JOBS, [1, 2, 3], place) == {(1, 4194305): 1, (2, 6291458): 2,
                                                    (3, 14680065): 3, (3, 14680066): 3}
    assert asked == []


def test_the_scheduler_places_the_jobs_of_a_node_that_is_not_online():
    place, asked = placer(1, 2)
    plan = restart_plan(JOBS, [1, 2], place)
    assert asked == [14680065, 14680066]          # in gpid order, one decision each
    assert plan == {(1, 4194305): 1, (2, 6291458): 2, (3, 14680065): 1, (3, 14680066): 2}


def test_spread_places_every_job_and_node_puts_them_all_on_one():
    place, asked = placer(3, 1)
    assert list(restart_plan(JOBS, [1, 2, 3], place, spread=True).values()) == [3, 1, 3, 1]
    assert len(asked) == 4
    place, asked = placer(9)
    assert set(restart_plan(JOBS, [1, 2, 3], place, node=2).values()) == {2}
    assert asked == []


@pytest.mark.parametrize("argv, app, program", [
    (["run", "--app", "sleep", "1"], "new", ["sleep", "1"]),
    (["run", "-a", "-d", "sleep", "1"], "new", ["sleep", "1"]),
    (["run", "--app", "42", "sleep", "1"], "42", ["sleep", "1"]),
    (["run", "-n", "3", "-a", "42", "true"], "42", ["true"]),
    (["run", "--app=7", "true"], "7", ["true"]),
    (["run", "-a7", "true"], "7", ["true"]),
    (["run", "true", "--app", "5"], None, ["true", "--app", "5"]),     # the program's own arguments
    (["run", "--", "--app", "5"], None, ["--", "--app", "5"]),
])
def test_krg_run_app_takes_an_id_only_when_one_follows(argv, app, program):
    argv = list(argv)
    _app_option(argv)
    args = build_parser().parse_args(argv)
    assert (args.app, args.argv) == (app, program)
