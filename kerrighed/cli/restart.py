"""restart: Kerrighed's command: restart an application from one of its checkpoints.

    restart [-U|--no-unfreeze] [-f|--foreground] [-t|--replace-tty] [-p|--pids]
            [-n|--on NODE | --spread] [-q] APPID VERSION

Every job comes back with the global PID it had, each on the node that dumped it when that node
is online, else where the scheduler places it (`-n NODE`: all on NODE; `--spread`: every job
where the scheduler places it). Either all jobs are restored or none is.

By default the application runs on in the background and `restart` returns; the output of its
jobs goes to each job's log on its node (`nodes/N/jobs/GPID/output.log` in the cluster's home),
as for `krg run -d`, and `krg ps`, `krg kill` and `krg wait` see it as any job. With `-f` the
command takes the application's stdio, as `krg run` does a job's: every job's output comes to its
stdout and stderr, its stdin goes to the application's root job (the one whose global PID is the
application id, else the lowest), the signals it receives (Ctrl-C, kill) go to every job, and it
exits with the root job's status (128+n for signal n) once that job ends, letting go of the
others, which run on in the background.
"""

from __future__ import annotations

import argparse
import sys

from kerrighed import protocol as p
from kerrighed.cli._common import add_common_options, connect, run_main
from kerrighed.errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="restart", description="Restart a checkpointed application.")
    add_common_options(ap)
    ap.add_argument("-U", "--no-unfreeze", action="store_true", help="leave it frozen (checkpoint -u resumes it)")
    ap.add_argument("-f", "--foreground", action="store_true",
                    help="take the application's stdio and wait for its root job; forward signals (implies -t)")
    ap.add_argument("-t", "--replace-tty", action="store_true",
                    help="the current terminal becomes the application's (with -f)")
    ap.add_argument("-p", "--pids", action="store_true",
                    help="accepted for Kerrighed's scripts: a job's sessions and groups live in its own PID "
                         "namespace and come back with it, so no id is ever an orphan to replace")
    ap.add_argument("-s", "--substitute-file", metavar="FILE_ID,FD", action="append",
                    help="not supported (see the error)")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("-n", "--on", type=int, metavar="NODE", dest="target", help="restart every job on this node")
    where.add_argument("--spread", action="store_true",
                       help="place every job through the scheduler, not on the node that dumped it")
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument("appid", type=int, metavar="APPID")
    ap.add_argument("version", type=int, metavar="VERSION")
    return ap


def main(argv: list[str] | None = None) -> int:
    return run_main("restart", build_parser(), argv, dispatch)


def dispatch(args) -> int:
    if args.substitute_file:
        raise UsageError("-s/--substitute-file is not supported: restored jobs reopen their files by path on "
                         "the node they restart on (use -f to give them this command's stdio)")
    if args.replace_tty and not args.foreground:
        raise UsageError("-t/--replace-tty needs -f: a job's terminal is relayed by the command that holds it, "
                         "so it can only be this one while restart runs")
    if args.appid < 1 or args.version < 1:
        raise UsageError(f"invalid application id or version: {args.appid} {args.version}")
    say = (lambda *a: None) if args.quiet else print
    say(f"Restarting application {args.appid} (v{args.version}) ...")
    with connect(args, timeout=None) as c:
        # restart -f attaches to the jobs before they run: not a byte of their output is missed.
        r = c.call(p.RestartApp(appid=args.appid, version=args.version,
                                frozen=args.no_unfreeze or args.foreground, node=args.target, spread=args.spread))
    if not args.foreground:
        _say_done(say, args)
        return 0
    return _foreground(args, r, say)


def _say_done(say, args) -> None:
    if args.no_unfreeze:
        say(f"Application {args.appid} has been successfully restored in *FROZEN* state. "
            "You can unfreeze it using 'checkpoint -u'")
    else:
        say(f"Application {args.appid} has been successfully restarted")


def _foreground(args, r: dict, say) -> int:
    from kerrighed.cli import krg_run
    from kerrighed.client import find_socket
    from kerrighed.config import Home

    root = r["root"]
    path = find_socket(Home.resolve(args.home), args.node)
    conns = []
    try:
        for gpid in [root, *(g for g in r["gpids"] if g != root)]:
            conns.append(krg_run.attach(path, gpid))
    finally:
        # Attached or not, the application must not stay frozen because this command failed.
        if not args.no_unfreeze:
            with connect(args, timeout=None) as c:
                c.call(p.CheckpointApp(id=args.appid, app=True, mode="unfreeze"))
        if len(conns) < len(r["gpids"]):
            for conn in conns:
                conn.send(p.Detach())
                conn.sock.close()
    _say_done(say, args)
    sys.stdout.flush()
    use_tty = bool(r["tty"].get(str(root))) and sys.stdin.isatty() and sys.stdout.isatty()
    return krg_run.stream(conns[0], use_tty, conns[1:])


if __name__ == "__main__":
    sys.exit(main())
