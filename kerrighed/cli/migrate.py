"""migrate: move a running job to another node, as Kerrighed's `migrate PID NODEID`.

Prints nothing on success; on failure `migrate: <reason>` and exit status 1. The job keeps its
global PID, its memory, its open files and its stdio: the `krg run` attached to it goes on.
"""

from __future__ import annotations

import argparse
import sys

from kerrighed import protocol as p
from kerrighed.cli._common import add_common_options, connect, run_main
from kerrighed.errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="migrate", description="Move a running job to another node.")
    add_common_options(ap)
    ap.add_argument("gpid", metavar="PID", help="the job's global PID")
    ap.add_argument("target", metavar="NODEID", help="the node to move it to")
    return ap


def main(argv: list[str] | None = None) -> int:
    return run_main("migrate", build_parser(), argv, dispatch)


def dispatch(args) -> int:
    if not args.gpid.isdigit() or not args.target.isdigit():
        raise UsageError(f"usage: migrate PID NODEID (numbers), not {args.gpid!r} {args.target!r}")
    with connect(args, timeout=None) as c:  # a large job takes a while to move
        c.call(p.MigrateJob(gpid=int(args.gpid), node=int(args.target)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
