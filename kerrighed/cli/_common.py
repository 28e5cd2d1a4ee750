"""What every command shares: the home and local node options, and turning errors into one line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from kerrighed.client import Client, find_socket
from kerrighed.config import Home
from kerrighed.errors import KrgError


def add_common_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--home", help="cluster home directory (default $KRG_HOME or /var/lib/kerrighed)")
    ap.add_argument("--node", type=int, help="talk to this node's daemon (default $KRG_NODE, else the first local node)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")


def connect(args, timeout: float | None = 60.0) -> Client:
    """The local daemon's socket; timeout None for commands that wait as long as the work takes."""
    return Client(find_socket(Home.resolve(args.home), args.node), timeout=timeout)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def run_main(prog: str, parser: argparse.ArgumentParser, argv: list[str] | None,
             dispatch: Callable[[argparse.Namespace], int | None]) -> int:
    """Parse, run, and turn a KrgError into `prog: message` on stderr with its exit code."""
    args = parser.parse_args(argv)
    try:
        return dispatch(args) or 0
    except KrgError as e:
        if args.debug:
            raise
        print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
