"""krg: the cluster seen as one machine, for every user.

    krg info [--json]           all CPUs, memory and load of the cluster, per node and in total
    krg ping NODE [-c COUNT]    round trip through the local daemon to NODE's daemon and back
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from kerrighed import protocol as p
from kerrighed.cli._common import add_common_options, connect, print_json, run_main
from kerrighed.cli.krgadm import info_total, print_info
from kerrighed.errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="krg", description="Use the cluster as one machine.")
    add_common_options(ap)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    s = sub.add_parser("info", help="CPUs, memory and load of the whole cluster, per node and in total")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("ping", help="round trip to a node's daemon through the local one")
    s.add_argument("target", type=int, metavar="NODE")
    s.add_argument("-c", "--count", type=int, default=4)
    s.add_argument("--json", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    return run_main("krg", build_parser(), argv, dispatch)


def dispatch(args) -> int:
    return {"info": info, "ping": ping}[args.command](args)


def info(args) -> int:
    with connect(args) as c:
        nodes = c.call(p.ClusterInfo())["nodes"]
    if args.json:
        print_json({"nodes": nodes, "total": info_total(nodes)})
    else:
        print_info(nodes)
    return 0


def ping(args) -> int:
    if args.count < 1:
        raise UsageError(f"--count must be at least 1, not {args.count}")
    rtts = []
    with connect(args) as c:
        for _ in range(args.count):
            t0 = time.perf_counter()
            c.call(p.NodePing(node=args.target))
            rtts.append((time.perf_counter() - t0) * 1e6)
    if args.json:
        print_json({"node": args.target, "rtt_us": rtts})
    else:
        print(f"node {args.target}: {len(rtts)} round trips, median {statistics.median(rtts):.0f} us, "
              f"max {max(rtts):.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
