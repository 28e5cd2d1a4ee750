"""Dynamic load balancing on a local cluster whose nodes are CPU-limited with cgroups: real daemons,
real busy loops, real CRIU migrations decided by mosix_load_balancer."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import time
import uuid

import psutil
import pytest

from kerrighed import localcluster
from kerrighed.cgroups import cgroup_name, cgroup_of, find_cpu_hierarchy
from kerrighed.config import KdfsConfig
from kerrighed.errors import ConfigError

from conftest import BIN, LocalCluster, wait_for

pytestmark = [pytest.mark.root, pytest.mark.criu,
              pytest.mark.skipif(os.geteuid() != 0, reason="cgroups, PID namespaces and CRIU need root")]

NODES = 4
LIMIT = 0.25            # CPUs per node: four nodes fill half of this 2-core machine
BUSY = "while :; do :; done"


@pytest.fixture
def limited(make_home):
    """A 4-node local cluster, each node limited to LIMIT CPU, started with `--cpu-limit`; after
    the test, no node cgroup may be left."""
    c = LocalCluster(make_home("krg-b-"))
    port = localcluster.free_port([localcluster.local_address(n) for n in range(1, NODES + 1)], prefer_default=False)
    # No KDFS mount: not what these tests are about.
    localcluster.ensure_config(c.home, NODES, port=port, kdfs=KdfsConfig(enabled=False))
    session = c.home.load_config().session
    try:
        hierarchy = find_cpu_hierarchy()
    except ConfigError as e:
        pytest.skip(str(e))
    c.cgroups = {n: hierarchy.root / cgroup_name(c.home.path, session, n) for n in range(1, NODES + 1)}
    c.hierarchy = hierarchy
    try:
        c.krgadm("cluster", "start", "--local", str(NODES), "--port", str(port), "--cpu-limit", str(LIMIT))
        assert c.home.load_config().cpu_limit == LIMIT
        yield c
    finally:
        c.krgadm("cluster", "stop", check=False)
        c.stop_all()
        left = [str(path) for path in c.cgroups.values() if path.exists()]
        assert not left, f"cgroups left behind: {left}"


def ps(cluster) -> dict[int, dict]:
    return {j["gpid"]: j for j in json.loads(cluster.run("krg", "ps", "--json").stdout)}


def busy_job(cluster, node, tag, migratable=True) -> int:
    """A detached busy loop on `node`, its command line tagged; CAN_MIGRATE inherited from the
    launching shell (`krgcapset -d +CAN_MIGRATE`, as a user would) if `migratable`."""
    home = str(cluster.home.path)
    caps = f"{BIN / 'krgcapset'} --home {home} -d +CAN_MIGRATE && " if migratable else ""
    script = f"{caps}{BIN / 'krg'} --home {home} run -d -n {node} sh -c '{BUSY}' {tag}"
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"Running application (\d+)", out).group(1))


def job_processes(cluster, gpid: int, tag: str) -> list[int]:
    """The job's shepherd, init and program (whichever node of this cluster hosts it)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or ())
        if tag in line or re.search(rf"{re.escape(str(cluster.home.path))}/nodes/\d+/jobs/{gpid}/ctl\.sock", line):
            found.append(proc.pid)
    return found


def describe(pids, hierarchy) -> str:
    out = []
    for pid in pids:
        try:
            out.append(f"{pid} in {cgroup_of(pid, hierarchy)}: {' '.join(psutil.Process(pid).cmdline())[:120]}")
        except psutil.Error as e:
            out.append(f"{pid}: {e}")
    return "; ".join(out)


def nodes_of(cluster, gpids) -> collections.Counter:
    jobs = ps(cluster)
    return collections.Counter(jobs[g]["node"] for g in gpids if g in jobs)


def stays(predicate, seconds: float, what: str, interval: float = 0.2) -> None:
    """Check that `predicate` holds all along `seconds` (what must NOT happen, given time to happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), f"{what} stopped holding"
        time.sleep(interval)


def test_a_nodes_jobs_run_in_its_cpu_limited_cgroup_before_and_after_migration(limited):
    c = limited
    for n, path in c.cgroups.items():
        if c.hierarchy.version == 2:
            assert (path / "cpu.max").read_text().split() == ["25000", "100000"]
        else:
            assert (path / "cpu.cfs_quota_us").read_text().strip() == "25000"
            assert (path / "cpu.cfs_period_us").read_text().strip() == "100000"
    info = json.loads(c.krgadm("cluster", "info", "--json").stdout)
    assert {n["id"]: n["capacity"] for n in info["nodes"]} == {n: LIMIT for n in range(1, NODES + 1)}

    tag = f"krgtest-{uuid.uuid4().hex[:8]}"
    gpid = busy_job(c, 2, tag)
    pids = wait_for(lambda: (lambda p: p if len(p) >= 3 else None)(job_processes(c, gpid, tag)),
                    what="the job's shepherd, init and program")
    assert {cgroup_of(pid, c.hierarchy) for pid in pids} == {"/" + c.cgroups[2].name}, describe(pids, c.hierarchy)
    assert set(pids) <= {int(x) for x in (c.cgroups[2] / "cgroup.procs").read_text().split()}

    # A `krg wait` begun on node 2 follows the job to node 3.
    waiting = subprocess.Popen([str(BIN / "krg"), "--home", str(c.home.path), "--node", "1", "wait", str(gpid)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        c.run("migrate", str(gpid), "3")
    except BaseException:
        waiting.kill()
        waiting.communicate()
        raise
    assert ps(c)[gpid]["node"] == 3
    pids = job_processes(c, gpid, tag)
    assert len(pids) >= 3
    assert {cgroup_of(pid, c.hierarchy) for pid in pids} == {"/" + c.cgroups[3].name}, describe(pids, c.hierarchy)
    assert not (c.cgroups[2] / "cgroup.procs").read_text().split()
    c.run("krg", "kill", "-s", "KILL", str(gpid))
    _, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 128 + 9, err


def test_the_balancer_spreads_busy_jobs_and_stops_when_switched_off(limited):
    c = limited
    tag = f"krgtest-{uuid.uuid4().hex[:8]}"
    pinned = busy_job(c, 1, tag, migratable=False)
    movable = [busy_job(c, 1, tag) for _ in range(4)]
    assert nodes_of(c, [pinned, *movable]) == {1: 5}

    out = c.krgadm("scheduler", "set", "--balancer", "mosix_load_balancer", "--balancer-param", "interval=1").stdout
    assert "balancer: mosix_load_balancer:interval=1.0,min_age=1.0,residency=5.0,stability=1.3" in out
    for n in range(1, NODES + 1):
        wait_for(lambda: (json.loads(c.krgadm("scheduler", "show", "--json", node=n).stdout)["balancer"] or {})
                 .get("params", {}).get("interval") == 1.0, what=f"node {n} to run the balancer")

    # Five busy jobs, one of them without CAN_MIGRATE: it stays on node 1 with one other, and each
    # other node gets one (2 x 4 per CPU on node 1 is within the stability factor of 1 x 4 + 4).
    wait_for(lambda: nodes_of(c, movable + [pinned]) == {1: 2, 2: 1, 3: 1, 4: 1}, timeout=90,
             what="the balancer to spread the jobs", interval=0.5)
    assert ps(c)[pinned]["node"] == 1
    log = c.log(1)
    moved = re.findall(r"balancer: moving job (\d+) from node 1 \(load [\d.]+ per CPU\) to node (\d) ", log)
    assert {int(g) for g, _ in moved} <= set(movable) and {int(t) for _, t in moved} == {2, 3, 4}
    assert re.search(r"INFO balancer: job \d+ moved from node 1 to node [234] \(down [\d.]+ s\)", log)

    out = c.krgadm("scheduler", "set", "--balancer", "none").stdout
    assert "balancer: none" in out
    for n in range(1, NODES + 1):
        wait_for(lambda: json.loads(c.krgadm("scheduler", "show", "--json", node=n).stdout)["balancer"] is None,
                 what=f"node {n} to drop the balancer")
    # Three more busy jobs on node 2: with a balancer they would move within a second or two.
    more = [busy_job(c, 2, tag) for _ in range(3)]
    placement = {g: j["node"] for g, j in ps(c).items() if g in movable + more + [pinned]}
    decisions = c.log(1).count("balancer: moving job")
    stays(lambda: {g: j["node"] for g, j in ps(c).items() if g in placement} == placement
          and c.log(1).count("balancer: moving job") == decisions, 6.0, "the placement without a balancer")
    c.run("krg", "kill", "-s", "KILL", *map(str, [pinned, *movable, *more]))


def test_scheduler_set_balancer_errors(limited):
    c = limited
    r = c.krgadm("scheduler", "set", "--balancer", "mosx", check=False)
    assert r.returncode == 2
    assert r.stderr == "krgadm: unknown balancer 'mosx' (known: mosix_load_balancer)\n"
    r = c.krgadm("scheduler", "set", "--balancer", "round_robin", check=False)
    assert r.returncode == 2 and "is a placement policy" in r.stderr and r.stderr.count("\n") == 1
    r = c.krgadm("scheduler", "set", "--balancer-param", "interval=1", check=False)
    assert r.returncode == 2 and "no balancer is set" in r.stderr
    r = c.krgadm("scheduler", "set", "--balancer", "mosix_load_balancer", "--balancer-param", "stability=0.5",
                 check=False)
    assert r.returncode == 2 and "'stability' must be 1 or more" in r.stderr
    r = c.krgadm("scheduler", "set", check=False)
    assert r.returncode == 2 and "nothing to set" in r.stderr
    # Parameters of the running balancer change on their own; the policy stays.
    c.krgadm("scheduler", "set", "least_loaded", "--balancer", "mosix_load_balancer:stability=1.5")
    c.krgadm("scheduler", "set", "--balancer-param", "interval=3")
    shown = wait_for(lambda: (lambda s: s if (s["balancer"] or {}).get("params", {}).get("interval") == 3.0 else None)(
        json.loads(c.krgadm("scheduler", "show", "--json", node=4).stdout)), what="node 4 to adopt the change")
    assert shown["policy"]["name"] == "least_loaded"
    assert shown["balancer"]["params"] == {"stability": 1.5, "interval": 3.0, "residency": 5.0, "min_age": 1.0}
    assert list(shown["known_balancers"]) == ["mosix_load_balancer"]
    text = c.krgadm("scheduler", "show").stdout
    assert "known balancers:\n  mosix_load_balancer  MOSIX-style" in text
