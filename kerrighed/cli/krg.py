"""krg: the cluster seen as one machine, for every user.

    krg run [-n NODE] [-d] [-p] [-t|-T] [-a [APPID]] [--] PROGRAM ARGS...   run a program on the cluster
    krg ps [-u USER] [-n NODE] [--json]      every job of the cluster
    krg kill [-SIG|-s SIG] GPID...           signal jobs wherever they run
    krg wait GPID                            wait for a job; its exit status
    krg top [-d SECONDS] [-b [-n N]]         a live view of the cluster and its busiest jobs
    krg info [--json]                        all CPUs, memory and load, per node and in total
    krg ping NODE [-c COUNT]                 round trip through the local daemon to NODE and back
"""

from __future__ import annotations

import argparse
import pwd
import signal
import sys
import time

from kerrighed import protocol as p
from kerrighed.cli import krg_run
from kerrighed.cli._common import add_common_options, connect, print_json, run_main
from kerrighed.client import find_socket
from kerrighed.config import Home
from kerrighed.errors import NotRunning, UsageError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="krg", description="Use the cluster as one machine.")
    add_common_options(ap)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    s = sub.add_parser("run", help="run a program on the cluster, as if it ran here")
    s.add_argument("-n", "--on", type=int, metavar="NODE", dest="target", help="run it on this node")
    s.add_argument("-d", "--detach", action="store_true", help="print 'Running application GPID' and return")
    s.add_argument("-p", "--print-pid", action="store_true", help="print the job's global PID on stderr first")
    s.add_argument("-t", dest="tty", action="store_const", const=True, help="force a pseudo-terminal")
    s.add_argument("-T", dest="tty", action="store_const", const=False, help="never a pseudo-terminal")
    s.add_argument("-a", "--app", metavar="APPID", nargs="?", const="new",
                   help="the root of a new checkpointable application (prints its id); "
                        "with APPID, join that application of yours")
    s.add_argument("argv", nargs=argparse.REMAINDER, metavar="PROGRAM ARGS")
    s = sub.add_parser("ps", help="every job of the cluster")
    s.add_argument("-u", "--user", help="only this user's jobs (name or uid)")
    s.add_argument("-n", "--on", type=int, metavar="NODE", dest="target", help="only jobs on this node")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("kill", help="send a signal to jobs, wherever they run")
    s.add_argument("-s", "--signal", dest="sig", help="signal name or number (default TERM)")
    s.add_argument("gpids", nargs="+", metavar="GPID")
    s = sub.add_parser("wait", help="wait for a job to end; exit with its status")
    s.add_argument("gpid", type=int, metavar="GPID")
    s = sub.add_parser("top", help="a live view of the whole cluster (q quits)")
    s.add_argument("-d", "--delay", type=float, default=2.0, help="seconds between refreshes (default 2)")
    s.add_argument("-b", "--batch", action="store_true", help="print snapshots instead of a live screen")
    s.add_argument("-n", "--iterations", type=int, default=1, help="snapshots to print with -b (default 1)")
    s = sub.add_parser("info", help="CPUs, memory and load of the whole cluster, per node and in total")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("ping", help="round trip to a node's daemon through the local one")
    s.add_argument("target", type=int, metavar="NODE")
    s.add_argument("-c", "--count", type=int, default=4)
    s.add_argument("--json", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _app_option(argv)
    # `krg kill -9 GPID` / `krg kill -TERM GPID`, as kill(1) takes them.
    if "kill" in argv:
        i = argv.index("kill") + 1
        if i < len(argv) and argv[i].startswith("-") and argv[i][1:] and argv[i][1] not in "s-h":
            argv[i:i + 1] = ["-s", argv[i][1:]]
    return run_main("krg", build_parser(), argv, dispatch)


def _app_option(argv: list[str]) -> None:
    """`krg run --app` takes an application id only when one follows (`--app 42`, `-a42`,
    `--app=42`): a bare `--app PROGRAM` starts a new application, whatever PROGRAM is called."""
    if "run" not in argv:
        return
    i = argv.index("run") + 1
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":
        arg = argv[i]
        if arg in ("-n", "--on"):
            i += 2
            continue
        if arg in ("-a", "--app"):
            if i + 1 < len(argv) and argv[i + 1].isdigit():
                argv[i:i + 2] = [f"--app={argv[i + 1]}"]
            else:
                argv[i] = "--app=new"
        i += 1


def dispatch(args) -> int:
    return {"info": info, "ping": ping, "run": run, "ps": ps, "kill": kill, "wait": wait,
            "top": top}[args.command](args)


def top(args) -> int:
    from kerrighed.cli import krg_top      # curses only for this command

    if args.delay <= 0 or args.iterations < 1:
        raise UsageError("--delay must be positive and --iterations at least 1")
    return krg_top.batch(args) if args.batch or not sys.stdout.isatty() else krg_top.interactive(args)


def run(args) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise UsageError("krg run needs a program to run")
    use_tty = (sys.stdin.isatty() and sys.stdout.isatty()) if args.tty is None else args.tty
    if args.detach:
        use_tty = False
    new_app, join_app = args.app == "new", None
    if args.app is not None and not new_app:
        if not args.app.isdigit() or int(args.app) < 1:
            raise UsageError(f"invalid application id {args.app!r}")
        join_app = int(args.app)
    path = find_socket(Home.resolve(args.home), args.node)
    conn, started = krg_run.launch(path, argv, args.target, args.detach, use_tty, new_app=new_app,
                                   join_app=join_app)
    if args.detach:
        # Kerrighed's krgcr-run line; a job's global PID is the id of the application it starts.
        print(f"Running application {started.get('app') if new_app else started['gpid']}")
        return 0
    if new_app:
        print(f"Running application {started.get('app')}", file=sys.stderr, flush=True)
    if args.print_pid:
        print(started["gpid"], file=sys.stderr, flush=True)
    while True:
        try:
            return krg_run.stream(conn, use_tty)
        except NotRunning as e:
            # Our daemon went away (a restart): the job runs on; take its stdio back.
            conn = krg_run.reattach(Home.resolve(args.home), args.node, started["gpid"], e)


def parse_signal(text: str | None) -> int:
    if text is None:
        return signal.SIGTERM
    if text.isdigit():
        n = int(text)
        if 0 < n < signal.NSIG:
            return n
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if hasattr(signal.Signals, name):
            return int(signal.Signals[name])
    raise UsageError(f"invalid signal {text!r} (a name like TERM or a number 1..{signal.NSIG - 1})")


def parse_gpid(text: str) -> int:
    if not text.isdigit():
        raise UsageError(f"invalid global PID {text!r}")
    return int(text)


def kill(args) -> int:
    sig = parse_signal(args.sig)
    gpids = [parse_gpid(g) for g in args.gpids]
    with connect(args) as c:
        c.call(p.KillJobs(gpids=gpids, signal=sig))
    return 0


def wait(args) -> int:
    with connect(args, timeout=None) as c:  # a job may run for days
        status = c.call(p.WaitJob(gpid=args.gpid))["status"]
    return status["code"] if status.get("code") is not None else 128 + status["signal"]


def user_id(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise UsageError(f"no such user {text!r}") from None


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def ps(args) -> int:
    uid = user_id(args.user) if args.user else None
    with connect(args) as c:
        jobs = c.call(p.ListJobs(uid=uid, node=args.target))["jobs"]
    now = time.time()
    for j in jobs:
        elapsed = max(0.0, now - j["start_time"])
        j["elapsed"] = elapsed
        j["cpu_percent"] = 100.0 * j["cpu_time"] / elapsed if elapsed > 0 else 0.0
        j["user"] = user_name(j["uid"])
    if args.json:
        print_json(jobs)
        return 0
    print(f"{'GPID':>10} {'NODE':>4} {'USER':<10} {'STATE':<9} {'%CPU':>5} {'RSS':>8} {'ELAPSED':>9}  COMMAND")
    for j in jobs:
        print(f"{j['gpid']:>10} {j['node']:>4} {j['user'][:10]:<10} {j['state'][:9]:<9} {j['cpu_percent']:>5.1f} "
              f"{j['rss'] // 1024:>7}K {_duration(j['elapsed']):>9}  {' '.join(j['argv'])}")
    return 0


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}-{h:02d}:{m:02d}:{s:02d}" if d else f"{h:02d}:{m:02d}:{s:02d}"


def info(args) -> int:
    from kerrighed.cli.krgadm import info_total, print_info

    with connect(args) as c:
        nodes = c.call(p.ClusterInfo())["nodes"]
    if args.json:
        print_json({"nodes": nodes, "total": info_total(nodes)})
    else:
        print_info(nodes)
    return 0


def ping(args) -> int:
    import statistics

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
