"""restart: Kerrighed's command: restart an application from one of its checkpoints.

    restart [-U|--no-unfreeze] [-q] APPID VERSION

The application restarts in the background, on the nodes that ran it (others where those are gone),
with the global PIDs it had; `krg ps`, `krg kill` and `krg wait` see it as any job.
"""

from __future__ import annotations

import argparse
import sys

from kerrighed import protocol as p
from kerrighed.cli._common import add_common_options, connect, run_main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="restart", description="Restart a checkpointed application.")
    add_common_options(ap)
    ap.add_argument("-U", "--no-unfreeze", action="store_true", help="leave it frozen (checkpoint -u resumes it)")
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument("appid", type=int, metavar="APPID")
    ap.add_argument("version", type=int, metavar="VERSION")
    return ap


def main(argv: list[str] | None = None) -> int:
    return run_main("restart", build_parser(), argv, dispatch)


def dispatch(args) -> int:
    say = (lambda *a: None) if args.quiet else print
    say(f"Restarting application {args.appid} (v{args.version}) ...")
    with connect(args, timeout=None) as c:
        c.call(p.RestartApp(appid=args.appid, version=args.version, frozen=args.no_unfreeze))
    if args.no_unfreeze:
        say(f"Application {args.appid} has been successfully restored in *FROZEN* state. "
            "You can unfreeze it using 'checkpoint -u'")
    else:
        say(f"Application {args.appid} has been successfully restarted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
