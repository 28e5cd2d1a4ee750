"""krgadm: administer the cluster and its nodes, with Kerrighed's arguments and output.

    krgadm cluster [status|info|start|stop|poweroff|reboot|init]
    krgadm nodes [status] [-n LIST]
    krgadm nodes {add|del} (-n LIST | -c COUNT | -t TOTAL | -a)
    krgadm scheduler [show] | set [POLICY[:KEY=VALUE,...]] [--balancer NAME[:...]|none] [--balancer-param KEY=VALUE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from kdfs import mount as kdfs_mount
from kerrighed import localcluster
from kerrighed import protocol as p
from kerrighed.cli._common import add_common_options, connect, print_json, run_main
from kerrighed.client import Client
from kerrighed.config import DEFAULT_PORT, Home
from kerrighed.errors import KrgError, NodeStateError, NotRunning, PermissionDenied, UsageError
from kerrighed.ids import format_node_list, parse_node_list

ONE_OF = "Only one of --all, --count, --total or --nodes option is supported. Aborting."
EPILOG = """\
examples:
  krgadm cluster start --local 3    start 3 node daemons on 127.0.0.11-13 and form a cluster
  krgadm cluster status             status: up on 3 nodes
  krgadm nodes status               one ID:STATE line per node (possible, present, online)
  krgadm nodes del -n 3             take node 3 out of the cluster (it stays present)
  krgadm nodes add -n 3             bring it back
  krgadm cluster stop               stop this machine's daemons

A real cluster: 'krgadm cluster init --node 1=ADDR --node 2=ADDR ...' writes cluster.toml and one key
pair per node; copy cluster.toml to every machine and keys/nodeN.key_secret to node N only, run
'krgd --node N' on each, then 'krgadm cluster start' on any of them.
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="krgadm", description="Administer a Kerrighed cluster.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(ap)
    ap.set_defaults(json=False, nodes=None)     # what the default sub-commands read
    top = ap.add_subparsers(dest="area", metavar="{cluster,nodes,scheduler}")

    cl = top.add_parser("cluster", help="the cluster as a whole")
    cl.set_defaults(json=False)
    clsub = cl.add_subparsers(dest="action", metavar="ACTION")
    s = clsub.add_parser("status", help="print 'status: up on N nodes' or 'status: down' (the default)")
    s.add_argument("--json", action="store_true")
    s = clsub.add_parser("info", help="the cluster as one machine: CPUs, memory, load, per node and in total")
    s.add_argument("--json", action="store_true")
    s = clsub.add_parser("start", help="form the cluster from the present nodes; --local N also starts N daemons here")
    s.add_argument("--local", type=int, metavar="N", help="start N node daemons on 127.0.0.11, 127.0.0.12, ...")
    s.add_argument("--port", type=int, help="with --local: the TCP port of every node (default 7531 if free)")
    s.add_argument("--cpu-limit", type=float, metavar="CPUS",
                   help="with --local: each node's jobs may use CPUS CPUs (a cgroup quota, e.g. 0.5; 0: no limit); "
                        "kept in cluster.toml as cpu_limit")
    s.add_argument("-w", "--wait", type=float, default=60.0, metavar="SECONDS", help="how long to wait (default 60)")
    clsub.add_parser("stop", help="stop the node daemons of this machine (this home)")
    clsub.add_parser("poweroff", help="stop every node's daemon")
    s = clsub.add_parser("reboot", help="restart every node's daemon and form the cluster again")
    s.add_argument("-w", "--wait", type=float, default=60.0, metavar="SECONDS")
    s = clsub.add_parser("init", help="write cluster.toml and a key pair per node, for a multi-machine cluster")
    s.add_argument("--node", dest="nodes", action="append", required=True, metavar="ID=ADDRESS")
    s.add_argument("--session", type=int, help="session id 1..9999 (default random)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)

    nd = top.add_parser("nodes", help="the nodes: status, add, del")
    nd.set_defaults(json=False, nodes=None)
    ndsub = nd.add_subparsers(dest="action", metavar="ACTION")
    s = ndsub.add_parser("status", help="one ID:STATE line per node (the default)")
    s.add_argument("-n", "--nodes", metavar="LIST")
    s.add_argument("--json", action="store_true")
    for name, what in (("add", "bring present nodes into the cluster"), ("del", "take online nodes out")):
        s = ndsub.add_parser(name, help=what)
        s.add_argument("-n", "--nodes", metavar="LIST", help="these nodes, e.g. 2,3,6-10")
        s.add_argument("-c", "--count", type=int, metavar="N", help="N nodes")
        s.add_argument("-t", "--total", type=int, metavar="N", help="until N nodes are online")
        s.add_argument("-a", "--all", action="store_true", help="every node that can be")
        if name == "add":
            s.add_argument("-w", "--wait", type=float, default=60.0, metavar="SECONDS",
                           help="how long to wait for nodes to be present (default 60)")

    sc = top.add_parser("scheduler", help="the cluster-wide placement policy and balancer")
    sc.set_defaults(json=False)
    scsub = sc.add_subparsers(dest="action", metavar="ACTION")
    s = scsub.add_parser("show", help="the active policy and balancer, and the known ones (the default)")
    s.add_argument("--json", action="store_true")
    s = scsub.add_parser("set", help="choose the placement policy and the balancer, on every node")
    s.add_argument("policy", nargs="?", metavar="POLICY[:KEY=VALUE,...]",
                   help="where new jobs go (default: keep the current policy)")
    b = s.add_mutually_exclusive_group()
    b.add_argument("--balancer", metavar="NAME[:KEY=VALUE,...]",
                   help="move running jobs with this balancer (e.g. mosix_load_balancer); 'none' stops it")
    b.add_argument("--no-balancer", action="store_true", help="stop moving running jobs (= --balancer none)")
    s.add_argument("--balancer-param", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the balancer (repeatable), e.g. stability=1.3 or interval=2; "
                        "without --balancer, changes the running balancer's")
    return ap


def main(argv: list[str] | None = None) -> int:
    return run_main("krgadm", build_parser(), argv, dispatch)


CHANGES_THE_CLUSTER = {("nodes", "add"), ("nodes", "del"), ("cluster", "poweroff"), ("cluster", "reboot"),
                       ("scheduler", "set")}


def dispatch(args) -> int:
    area, action = args.area or "cluster", getattr(args, "action", None) or "status"
    # The daemon enforces this (peer credentials); asking first gives a clean one-line refusal.
    if (area, action) in CHANGES_THE_CLUSTER and os.geteuid() != 0:
        raise PermissionDenied(f"{area} {action}: permission denied (only root may change the cluster)")
    if area == "nodes":
        return {"status": nodes_status, "add": nodes_add, "del": nodes_del}[action](args)
    if area == "scheduler":
        return {"show": scheduler_show, "set": scheduler_set}[action](args)
    return {"status": cluster_status, "info": cluster_info, "start": cluster_start, "stop": cluster_stop,
            "poweroff": cluster_poweroff, "reboot": cluster_reboot, "init": cluster_init}[action](args)


# -- cluster --------------------------------------------------------------------------------------


def cluster_status(args) -> int:
    try:
        with connect(args) as c:
            st = c.call(p.ClusterStatus())
    except NotRunning:
        if args.json:
            print_json({"up": False, "online": []})
        else:
            print("status: down")
        return 0
    if args.json:
        print_json(st)
    elif st["up"]:
        print(f"status: up on {len(st['online'])} nodes")
    else:
        print("status: down")
    return 0


def cluster_info(args) -> int:
    with connect(args) as c:
        info = c.call(p.ClusterInfo())
    if args.json:
        print_json({**info, "total": info_total(info["nodes"])})
        return 0
    print_info(info["nodes"])
    return 0


def info_total(nodes: list[dict]) -> dict:
    """The cluster as one machine: the sum over its online nodes."""
    online = [n for n in nodes if n["state"] == "online" and "cpus" in n]
    return {
        "nodes": len(online),
        "cpus": sum(n["cpus"] for n in online),
        "load": round(sum(n["load"][0] for n in online), 2),
        "mem_total": sum(n["mem_total"] for n in online),
        "mem_free": sum(n["mem_free"] for n in online),
    }


def print_info(nodes: list[dict]) -> None:
    print(f"{'NODE':>4}  {'STATE':<8} {'ADDRESS':<15} {'CPUS':>4} {'LOAD':>6} {'CPU%':>6} {'MEM TOTAL':>10} {'MEM FREE':>10}")
    for n in nodes:
        if "cpus" in n:
            print(f"{n['id']:>4}  {n['state']:<8} {n['address']:<15} {n['cpus']:>4} {n['load'][0]:>6.2f} "
                  f"{n['cpu_percent']:>6.1f} {gib(n['mem_total']):>10} {gib(n['mem_free']):>10}")
        else:
            print(f"{n['id']:>4}  {n['state']:<8} {n['address']:<15} {'-':>4} {'-':>6} {'-':>6} {'-':>10} {'-':>10}")
    t = info_total(nodes)
    print(f"cluster: {t['nodes']} online nodes, {t['cpus']} CPUs, load {t['load']:.2f}, "
          f"memory {gib(t['mem_total'])} total, {gib(t['mem_free'])} free")


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def cluster_start(args) -> int:
    home = Home.resolve(args.home)
    if args.local is not None:
        settings = {}
        if args.cpu_limit is not None:
            if args.cpu_limit < 0:
                raise UsageError(f"--cpu-limit takes a number of CPUs (e.g. 0.5, or 0 for none), not {args.cpu_limit:g}")
            settings["cpu_limit"] = args.cpu_limit or None
        cfg = localcluster.ensure_config(home, args.local, port=args.port, **settings)
        nodes = sorted(cfg.nodes)
        print(f"Starting nodes [{format_node_list(nodes)}] on {cfg.nodes[nodes[0]].address}-"
              f"{cfg.nodes[nodes[-1]].address}... ", end="", flush=True)
        localcluster.start_daemons(home, nodes)
        print("done")
        args.node = args.node or nodes[0]
        with connect(args) as c:
            status = add_nodes(c, nodes, args.wait)
        if status == 0 and cfg.kdfs.enabled:
            try:
                mp = home.kdfs_mountpoint(cfg)
                print(f"Mounting KDFS on {mp}... ", end="", flush=True)
                kdfs_mount.wait_mounted(home, args.wait)
                print("done")
            except TimeoutError as e:
                print("fail")
                raise KrgError(f"{e}; see {home.state_dir(nodes[0]) / 'kdfs-mount.log'}") from None
        return status
    with connect(args) as c:
        nodes = [n["id"] for n in c.call(p.NodesStatus())["nodes"] if n["state"] != "possible"]
        return add_nodes(c, nodes, args.wait)


def cluster_stop(args) -> int:
    home = Home.resolve(args.home)
    running = localcluster.running_nodes(home)
    if running:
        print(f"Stopping nodes [{format_node_list(running)}]... ", end="", flush=True)
    kdfs_mount.stop(home)                     # flushes through the daemons, so before them
    for n in home.local_nodes():
        localcluster.stop_daemon(home, n)     # also clears what a killed daemon left behind
    print("done" if running else "No node daemon running.")
    return 0


def cluster_poweroff(args) -> int:
    home = Home.resolve(args.home)
    print("Shutting down cluster... ", end="", flush=True)
    with connect(args) as c:
        c.call(p.ClusterPoweroff())
    # Every daemon of this machine must be gone before we say so.
    deadline = time.monotonic() + 15
    while localcluster.running_nodes(home):
        if time.monotonic() > deadline:
            print("fail (daemons still running)")
            return 1
        time.sleep(0.05)
    kdfs_mount.stop(home)
    print("done")
    return 0


def cluster_reboot(args) -> int:
    print("Rebooting cluster... ", end="", flush=True)
    with connect(args) as c:
        before = c.call(p.ClusterStatus())
        nodes = c.call(p.ClusterReboot())["nodes"]
    args.node = before["local"]     # come back to the same daemon, not whichever answers first
    # Wait for the local daemon's new incarnation, then form the same cluster again.
    deadline = time.monotonic() + args.wait
    while True:
        try:
            with connect(args) as c:
                if c.call(p.ClusterStatus())["incarnation"] != before["incarnation"]:
                    break
        except NotRunning:
            pass
        if time.monotonic() > deadline:
            print("fail (the local daemon did not come back)")
            return 1
        time.sleep(0.05)
    with connect(args) as c:
        if not wait_present(c, nodes, len(nodes), max(1.0, deadline - time.monotonic()), quiet=True):
            print("fail (not every node came back)")
            return 1
        c.call(p.NodesAdd(nodes=nodes))
    print("done")
    return 0


def cluster_init(args) -> int:
    addresses = {}
    for item in args.nodes:
        ident, sep, address = item.partition("=")
        if not sep or not ident.isdigit():
            raise UsageError(f"--node takes ID=ADDRESS, not {item!r}")
        addresses[int(ident)] = address
    home = Home.resolve(args.home)
    cfg = home.init_cluster(addresses, session=args.session, port=args.port)
    print(f"Wrote {home.cluster_file} (session {cfg.session}) and key pairs in {home.path / 'keys'}")
    return 0


# -- nodes ----------------------------------------------------------------------------------------


def states(c: Client) -> dict[int, str]:
    return {n["id"]: n["state"] for n in c.call(p.NodesStatus())["nodes"]}


def nodes_status(args) -> int:
    with connect(args) as c:
        st = states(c)
    if args.nodes:
        wanted = parse_node_list(args.nodes)
        unknown = [n for n in wanted if n not in st]
        if unknown:
            raise UsageError(f"nodes {format_node_list(unknown)} are not in the cluster configuration "
                             f"(nodes: {format_node_list(st)})")
        st = {n: st[n] for n in wanted}
    if args.json:
        print_json([{"id": n, "state": s} for n, s in st.items()])
    else:
        for n, s in st.items():
            print(f"{n}:{s}")
    return 0


def one_selector(args) -> None:
    given = [x for x in (args.nodes, args.count, args.total, args.all or None) if x is not None]
    if len(given) != 1:
        raise UsageError(ONE_OF)
    for name in ("count", "total"):
        v = getattr(args, name)
        if v is not None and v < 0:
            raise UsageError(f"--{name} must be a positive number, not {v}")


def nodes_add(args) -> int:
    one_selector(args)
    with connect(args) as c:
        st = states(c)
        online = [n for n, s in st.items() if s == "online"]
        if args.nodes:
            wanted = parse_node_list(args.nodes)
            unknown = [n for n in wanted if n not in st]
            if unknown:
                raise UsageError(f"nodes {format_node_list(unknown)} are not in the cluster configuration "
                                 f"(nodes: {format_node_list(st)})")
            wanted = [n for n in wanted if st[n] != "online"]
            if not wanted:
                print("No present node to add.")
                return 0
            return add_nodes(c, wanted, args.wait)
        if args.all:
            wanted = [n for n, s in st.items() if s == "present"]
            if not wanted:
                print("No present node to add.")
                return 0
            return add_nodes(c, wanted, args.wait)
        count = args.count if args.count is not None else args.total - len(online)
        if count <= 0:
            print("No present node to add.")
            return 0
        return add_nodes(c, None, args.wait, count=count)


def wait_present(c: Client, wanted: list[int] | None, count: int, timeout: float, quiet: bool = False) -> list[int] | None:
    """Kerrighed's `Waiting for N nodes to join...` with its counter; the nodes, or None on timeout."""
    tty = sys.stdout.isatty() and not quiet
    if not quiet:
        print(f"Waiting for {count} nodes to join... ", end="", flush=True)
    deadline = time.monotonic() + timeout
    while True:
        st = states(c)
        ready = [n for n, s in st.items() if s != "possible" and (wanted is None or n in wanted)]
        if wanted is None:
            ready = [n for n in ready if st[n] == "present"]
        ready = ready[:count]
        if tty:
            print(f"{len(ready):4d}/{count:<4d}" + "\b" * 9, end="", flush=True)
        if len(ready) >= count:
            if not quiet:
                print(f"{len(ready):4d}/{count:<4d} done")
            return ready
        if time.monotonic() > deadline:
            if not quiet:
                print(f"{len(ready):4d}/{count:<4d} fail (timeout)")
            return None
        time.sleep(0.1)


def add_nodes(c: Client, wanted: list[int] | None, wait: float, count: int | None = None) -> int:
    count = len(wanted) if wanted is not None else count
    ready = wait_present(c, wanted, count, wait)
    if ready is None:
        return 1
    print(f"Adding nodes [{format_node_list(ready)}]... ", end="", flush=True)
    try:
        c.call(p.NodesAdd(nodes=ready))
    except KrgError as e:
        print(f"fail ({e})")
        return 1
    print("done")
    return 0


def nodes_del(args) -> int:
    one_selector(args)
    with connect(args) as c:
        local = c.call(p.ClusterStatus())["local"]
        st = states(c)
        removable = sorted((n for n, s in st.items() if s == "online" and n != local), reverse=True)
        if args.nodes:
            victims = parse_node_list(args.nodes)
            for n in victims:
                if n == local:
                    raise NodeStateError("Unable to suppress current node.")
                if st.get(n) != "online":
                    raise NodeStateError(f"Unable to suppress node {n} (must be 'online').")
        elif args.all:
            victims = removable
            if not victims:
                print("No online node to remove.")
                return 0
        else:
            online = sum(1 for s in st.values() if s == "online")
            count = args.count if args.count is not None else online - args.total
            if count <= 0:
                print("No online node to remove.")
                return 0
            if count > len(removable):
                raise NodeStateError("Not enough nodes to remove. Aborting.")
            victims = removable[:count]
        print(f"Removing nodes [{format_node_list(victims)}]... ", end="", flush=True)
        try:
            c.call(p.NodesDel(nodes=victims))
        except KrgError as e:
            print(f"fail ({e})")
            return 1
        print("done")
        return 0


# -- scheduler --------------------------------------------------------------------------------------


def scheduler_show(args) -> int:
    with connect(args) as c:
        shown = c.call(p.SchedulerShow())
    if args.json:
        print_json(shown)
        return 0
    print_scheduler(shown)
    return 0


def print_scheduler(shown: dict) -> None:
    def named(part):
        if part is None:
            return "none"
        params = ",".join(f"{k}={v}" for k, v in sorted(part["params"].items()))
        return part["name"] + (f":{params}" if params else "")

    print(f"policy: {named(shown['policy'])}")
    print(f"balancer: {named(shown['balancer'])}")
    print("known policies:")
    for name, description in sorted(shown["known"].items()):
        print(f"  {name:<20} {description}")
    print("known balancers:")
    for name, description in sorted(shown.get("known_balancers", {}).items()):
        print(f"  {name:<20} {description}")


def scheduler_set(args) -> int:
    from scheduler.config import SchedulerConfig, parse_assignment     # only this command needs it

    if args.policy is None and args.balancer is None and not args.no_balancer and not args.balancer_param:
        raise UsageError("scheduler set: nothing to set; give a POLICY, --balancer NAME or --balancer-param KEY=VALUE")
    no_balancer = args.no_balancer or (args.balancer or "").strip() == "none"
    if no_balancer and args.balancer_param:
        raise UsageError("--balancer-param cannot go with --balancer none: no balancer takes it")
    extra = {}
    for item in args.balancer_param:
        extra.update(parse_assignment(f"param:{item}")[1])
    with connect(args) as c:
        current = c.call(p.SchedulerShow())["config"]
        policy, params = (parse_assignment(args.policy) if args.policy is not None
                          else (current["policy"], current["params"]))
        if no_balancer:
            balancer, balancer_params = None, {}
        elif args.balancer:
            balancer, balancer_params = parse_assignment(args.balancer)
        else:
            balancer, balancer_params = current["balancer"], dict(current["balancer_params"])
        if extra and balancer is None:
            raise UsageError("--balancer-param: no balancer is set; choose one with --balancer NAME")
        config = SchedulerConfig(policy, params, balancer, {**balancer_params, **extra})
        shown = c.call(p.SchedulerSet(config=config.to_dict()))
    print_scheduler(shown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
