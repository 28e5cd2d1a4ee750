"""checkpoint: Kerrighed's command, for an application spread over any nodes.

    checkpoint [options] ID          ID: a job's global PID, or with -a an application id
      (default) freeze, checkpoint, unfreeze      -f/--freeze    -u/--unfreeze[=SIG]
      -c/--ckpt-only (already frozen)             -k/--kill[=SIG] (default 15) after the checkpoint
      -a/--from-appid   -d/--description TEXT     -q/--quiet
"""

from __future__ import annotations

import argparse
import signal
import sys

from kerrighed import protocol as p
from kerrighed.cli._common import add_common_options, connect, run_main
from kerrighed.errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="checkpoint", description="Checkpoint a running application.")
    add_common_options(ap)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("-f", "--freeze", action="store_true", help="only freeze the application")
    mode.add_argument("-u", "--unfreeze", metavar="SIG", help="only unfreeze it (-u, or -uSIG / --unfreeze=SIG to signal it)")
    mode.add_argument("-c", "--ckpt-only", action="store_true", help="checkpoint an application already frozen")
    mode.add_argument("-k", "--kill", metavar="SIG", help="end it after the checkpoint (-k: SIGTERM; -kSIG, --kill=SIG)")
    ap.add_argument("-a", "--from-appid", action="store_true", help="ID is an application id")
    ap.add_argument("-d", "--description", help="a description stored with the checkpoint")
    ap.add_argument("-i", "--ignore-unsupported-files", action="store_true", help="accepted for Kerrighed's scripts")
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument("id", type=int, metavar="ID")
    return ap


def main(argv: list[str] | None = None) -> int:
    # Kerrighed's optional arguments are attached only (-u, -u9, --unfreeze=9): a bare -u must not
    # take the ID that follows as its signal.
    argv = list(sys.argv[1:] if argv is None else argv)
    bare = {"-u": "--unfreeze=0", "--unfreeze": "--unfreeze=0",
            "-k": f"--kill={int(signal.SIGTERM)}", "--kill": f"--kill={int(signal.SIGTERM)}"}
    return run_main("checkpoint", build_parser(), [bare.get(a, a) for a in argv], dispatch)


def dispatch(args) -> int:
    from kerrighed.cli.krg import parse_signal

    mode, sig = "checkpoint", 0
    if args.freeze:
        mode = "freeze"
    elif args.unfreeze is not None:
        mode, sig = "unfreeze", 0 if args.unfreeze == "0" else parse_signal(args.unfreeze)
    elif args.ckpt_only:
        mode = "ckpt-only"
    elif args.kill is not None:
        mode, sig = "kill", parse_signal(args.kill)
    if args.id < 1:
        raise UsageError(f"invalid id {args.id}")
    say = (lambda *a: None) if args.quiet else print
    what = f"application {args.id}" if args.from_appid else f"application in which process {args.id} is involved"
    if mode == "freeze":
        say(f"Freezing {what}...")
    elif mode == "unfreeze":
        say(f"Unfreezing {what}...")
    else:
        say(f"Checkpointing application {args.id}..." if args.from_appid
            else f"Checkpointing application in which process {args.id} is involved...")
    with connect(args, timeout=None) as c:  # a large application takes a while
        r = c.call(p.CheckpointApp(id=args.id, app=args.from_appid, description=args.description,
                                   mode=mode, signal=sig))
    if "version" in r:
        say(f"Identifier: {r['appid']}\nVersion: {r['version']}\n"
            f"Description: {r['description'] or 'No description'}\nDate: {r['date']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
