"""krgcapset: show or change Kerrighed capabilities, with Kerrighed's arguments and output.

    krgcapset [-k|--pid PID] [-s|--show]
    krgcapset [-f|--force] [-k|--pid PID] {-e|--effective | -p|--permitted |
              -d|--inheritable-effective | -i|--inheritable-permitted} {[+|-]NAME[,...] | OCTAL} ...

Without -k it acts on the calling shell, so `krgcapset -d +CAN_MIGRATE` makes the shell's later
jobs migratable. PID is a job's global PID (at least 2^22), or a process of this node.
"""

from __future__ import annotations

import os
import sys

from kerrighed import protocol as p
from kerrighed.caps import Capabilities
from kerrighed.client import Client, find_socket
from kerrighed.config import Home
from kerrighed.errors import KrgError, UsageError

SETS = {"-e": "effective", "--effective": "effective", "-p": "permitted", "--permitted": "permitted",
        "-d": "inheritable_effective", "--inheritable-effective": "inheritable_effective",
        "-i": "inheritable_permitted", "--inheritable-permitted": "inheritable_permitted"}
USAGE = __doc__.split("\n\n")[1]
GPID_MIN = 1 << 22


def parse(argv: list[str]) -> dict:
    """getopt-like, as Kerrighed's: a set option takes the next word even if it starts with '-'."""
    opts = {"pid": None, "show": False, "force": False, "changes": [], "home": None, "node": None, "debug": False}
    it = iter(argv)
    for word in it:
        if word in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if word in ("-s", "--show"):
            opts["show"] = True
        elif word in ("-f", "--force"):
            opts["force"] = True
        elif word == "--debug":
            opts["debug"] = True
        elif word in ("-k", "--pid", "--home", "--node") or word in SETS:
            value = next(it, None)
            if value is None:
                raise UsageError(f"option {word} needs a value")
            if word in SETS:
                opts["changes"].append([SETS[word], value])
            elif word == "--home":
                opts["home"] = value
            else:
                if not value.isdigit():
                    raise UsageError(f"invalid {'node' if word == '--node' else 'process id'} {value!r}")
                opts["pid" if word != "--node" else "node"] = int(value)
        else:
            raise UsageError(f"unknown argument {word!r}\n{USAGE}")
    if opts["show"] and opts["changes"]:
        raise UsageError("--show cannot be combined with changes")
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        opts = parse(argv)
        target = {"pid": os.getppid()} if opts["pid"] is None else (
            {"gpid": opts["pid"]} if opts["pid"] >= GPID_MIN else {"pid": opts["pid"]})
        with Client(find_socket(Home.resolve(opts["home"]), opts["node"])) as c:
            current = Capabilities.from_dict(c.call(p.CapsGet(**target)))
            if not opts["changes"]:
                print(current.show(), end="")
                return 0
            after = current.apply([tuple(ch) for ch in opts["changes"]], force_root=os.geteuid() == 0)
            if current.can_change and not after.can_change and not opts["force"] and not _confirm():
                print("krgcapset: nothing changed", file=sys.stderr)
                return 1
            c.call(p.CapsSet(changes=opts["changes"], **target))
        return 0
    except KrgError as e:
        if debug:
            raise
        print(f"krgcapset: {e}", file=sys.stderr)
        return e.exit_code


def _confirm() -> bool:
    sys.stderr.write("Dropping CHANGE_KERRIGHED_CAP means no further change of capabilities. Continue? [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline() if sys.stdin and not sys.stdin.closed else ""
    return answer.strip().lower() in ("y", "yes")


if __name__ == "__main__":
    sys.exit(main())
