"""Per-node CPU limits: finding a cpu controller on v1, v2 and hybrid machines, the cgroup's files,
the cpu_limit setting. Fake hierarchies in a temporary directory, and one real cgroup if root."""

import os
import subprocess
import time
import uuid

import pytest

from kerrighed.cgroups import Hierarchy, NodeCgroup, cgroup_name, cgroup_of, find_cpu_hierarchy
from kerrighed.config import ClusterConfig, Home
from kerrighed.errors import ConfigError


def fake_v2(tmp_path, controllers="cpu memory pids"):
    root = tmp_path / "unified"
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("memory\n")
    (root / "cgroup.procs").write_text("")
    return root


def mounts(*lines):
    return "".join(f"{line}\n" for line in lines)


def test_plain_v2_with_cpu_is_used(tmp_path):
    root = fake_v2(tmp_path)
    found = find_cpu_hierarchy(mounts("proc /proc proc rw 0 0", f"cgroup2 {root} cgroup2 rw,nosuid 0 0"))
    assert found == Hierarchy(2, root)


def test_hybrid_machine_uses_the_v1_cpu_hierarchy(tmp_path):
    # This project's machines: v1 hierarchies, and cgroup2 at .../unified with no cpu controller.
    unified = fake_v2(tmp_path, controllers="hugetlb")
    text = mounts(f"cgroup {tmp_path}/cpuset cgroup rw,cpuset 0 0", f"cgroup {tmp_path}/cpuacct cgroup rw,cpuacct 0 0",
                  f"cgroup {tmp_path}/cpu cgroup rw,relatime,cpu 0 0", f"cgroup2 {unified} cgroup2 rw 0 0")
    assert find_cpu_hierarchy(text) == Hierarchy(1, tmp_path / "cpu")
    comounted = mounts(f"cgroup {tmp_path}/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0")
    assert find_cpu_hierarchy(comounted) == Hierarchy(1, tmp_path / "cpu,cpuacct")


def test_no_cpu_controller_is_one_error_naming_what_is_missing(tmp_path):
    unified = fake_v2(tmp_path, controllers="hugetlb")
    with pytest.raises(ConfigError, match=r"^cannot limit the nodes' CPU \(cpu_limit\): no cgroup v1 hierarchy with "
                                          r"the 'cpu' controller is mounted, and the cgroup2 hierarchy at "
                                          rf"{unified} does not offer it \(its controllers: hugetlb\)$"):
        find_cpu_hierarchy(mounts(f"cgroup {tmp_path}/memory cgroup rw,memory 0 0", f"cgroup2 {unified} cgroup2 rw 0 0"))
    with pytest.raises(ConfigError, match=r"cpu' controller is mounted, and no cgroup2 hierarchy is mounted$"):
        find_cpu_hierarchy(mounts("proc /proc proc rw 0 0"))


def test_v2_cgroup_gets_cpu_max_and_the_controller_enabled(tmp_path):
    root = fake_v2(tmp_path)
    cg = NodeCgroup(Hierarchy(2, root), "krg-1-abc-node2", 0.5)
    (root / cg.name).mkdir()
    for name in ("cpu.max", "cgroup.procs"):        # what the kernel makes with the directory
        (root / cg.name / name).write_text("")
    cg.create()
    assert (root / "cgroup.subtree_control").read_text() == "+cpu"
    assert (root / cg.name / "cpu.max").read_text() == "50000 100000"
    assert cg.add(4242) and (root / cg.name / "cgroup.procs").read_text() == "4242"


def test_v1_cgroup_gets_quota_and_period(tmp_path):
    root = tmp_path / "cpu"
    (root / "krg-1-abc-node1").mkdir(parents=True)
    for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"):
        (root / "krg-1-abc-node1" / name).write_text("")
    cg = NodeCgroup(Hierarchy(1, root), "krg-1-abc-node1", 1.5)
    cg.create()
    assert (root / cg.name / "cpu.cfs_quota_us").read_text() == "150000"
    assert (root / cg.name / "cpu.cfs_period_us").read_text() == "100000"
    for f in (root / cg.name).iterdir():        # the kernel's files go with the directory; ours do not
        f.unlink()
    assert cg.remove(timeout=0) and not (root / cg.name).exists()


def test_a_cgroup_that_cannot_be_made_says_so(tmp_path):
    cg = NodeCgroup(Hierarchy(1, tmp_path / "missing"), "krg-1-abc-node1", 0.5)
    with pytest.raises(ConfigError, match=r"cannot limit this node to 0.5 CPU with cgroup v1 at .*missing"):
        cg.create()
    with pytest.raises(ConfigError, match="positive number of CPUs"):
        NodeCgroup(Hierarchy(1, tmp_path), "x", 0)


def test_names_differ_per_cluster_home_and_node(tmp_path):
    a = cgroup_name(tmp_path / "a", 12, 1)
    assert a.startswith("krg-12-") and a.endswith("-node1")
    assert len({a, cgroup_name(tmp_path / "b", 12, 1), cgroup_name(tmp_path / "a", 12, 2)}) == 3
    assert cgroup_name(tmp_path / "a", 12, 1) == a


# cluster.toml

def test_cpu_limit_in_cluster_toml_with_a_per_node_override(tmp_path):
    home = Home(tmp_path)
    cfg = home.init_cluster({1: "127.0.0.11", 2: "127.0.0.12"}, session=7, cpu_limit=0.5)
    assert "cpu_limit = 0.5" in home.cluster_file.read_text()
    text = home.cluster_file.read_text().replace('address = "127.0.0.12"', 'address = "127.0.0.12"\ncpu_limit = 2')
    home.cluster_file.write_text(text)
    cfg = ClusterConfig.load(home.cluster_file)
    assert (cfg.cpu_limit_of(1), cfg.cpu_limit_of(2)) == (0.5, 2.0)
    cfg.save(home.cluster_file)
    assert ClusterConfig.load(home.cluster_file) == cfg
    plain = home.init_cluster({1: "127.0.0.11"}, session=7)
    assert plain.cpu_limit_of(1) is None and "cpu_limit" not in home.cluster_file.read_text()


@pytest.mark.parametrize("value", ["0", "-1", '"half"', "true"])
def test_a_bad_cpu_limit_is_refused(tmp_path, value):
    home = Home(tmp_path)
    home.init_cluster({1: "127.0.0.11"}, session=7)
    home.cluster_file.write_text(home.cluster_file.read_text().replace("[cluster]\n", f"[cluster]\ncpu_limit = {value}\n"))
    with pytest.raises(ConfigError, match=r"\[cluster\]: cpu_limit = .*must be a positive number of CPUs"):
        ClusterConfig.load(home.cluster_file)


# This machine's own hierarchy

@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="making cgroups needs root")
def test_a_real_cgroup_limits_a_process_and_goes_away():
    try:
        hierarchy = find_cpu_hierarchy()
    except ConfigError as e:
        pytest.skip(str(e))
    cg = NodeCgroup(hierarchy, f"krg-test-{uuid.uuid4().hex[:8]}-node1", 0.2)
    cg.create()
    busy = subprocess.Popen(["sh", "-c", "while :; do :; done"])
    try:
        assert cg.add(busy.pid) and cg.holds(busy.pid)
        assert cgroup_of(busy.pid, hierarchy) == "/" + cg.name
        if hierarchy.version == 2:
            assert (cg.path / "cpu.max").read_text().split() == ["20000", "100000"]
        else:
            assert (cg.path / "cpu.cfs_quota_us").read_text().strip() == "20000"
        t0, cpu0 = time.monotonic(), _cpu_seconds(busy.pid)
        time.sleep(1.0)         # measuring a rate: an interval of time is the point here
        share = (_cpu_seconds(busy.pid) - cpu0) / (time.monotonic() - t0)
        assert share < 0.3, f"the busy loop got {share:.2f} CPU under a 0.2 CPU quota"
    finally:
        busy.kill()
        busy.wait()
    assert cg.remove() and not cg.path.exists()


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
