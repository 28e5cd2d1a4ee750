"""kdfs: the cluster file system's administration.

    kdfs df [--json]                 space per node and in total
    kdfs stat FILE... [--json]       a file's chunks: where each copy is
    kdfs fsck [--repair] [--json]    verify every chunk copy, replica counts and chunk maps
    kdfs rebalance [--json]          trim extra copies and even out the nodes

`stat` takes paths in the mount (or, with --path, paths from the file system's root, no mount
needed); a user may stat their own files, root anyone's. fsck and rebalance are root's. fsck exits 1
when it finds problems.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from kdfs.client import KdfsClient
from kerrighed.cli._common import add_common_options, print_json, run_main
from kerrighed.config import Home
from kerrighed.errors import FsError, UsageError

ROOT = 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kdfs", description="KDFS, the cluster file system: space, placement, checks.")
    add_common_options(ap)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("df", help="space per node and in total")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("stat", help="chunk placement and replicas of files")
    s.add_argument("files", nargs="+", metavar="FILE")
    s.add_argument("--path", action="store_true", help="FILEs are paths from KDFS's root, not in the mount")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("fsck", help="verify every checksum and replica count")
    s.add_argument("--repair", action="store_true", help="rewrite bad copies, re-create missing ones, drop orphans")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("rebalance", help="trim extra copies, move copies to the emptiest nodes")
    s.add_argument("--json", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    return run_main("kdfs", build_parser(), argv, dispatch)


def dispatch(args) -> int:
    home = Home.resolve(args.home)
    with KdfsClient(home, args.node, timeout=None) as c:
        return {"df": df, "stat": stat_files, "fsck": fsck, "rebalance": rebalance}[args.command](c, home, args)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def df(c: KdfsClient, home: Home, args) -> int:
    st = c.status()
    if args.json:
        print_json(st)
        return 0
    print(f"{'NODE':<6}{'SIZE':>12}{'USED':>12}{'AVAIL':>12}{'KDFS DATA':>12}{'CHUNKS':>9}")
    rows = sorted(st["nodes"].items(), key=lambda kv: int(kv[0]))
    for name, u in [*rows, ("total", st["total"])]:
        print(f"{name:<6}{_size(u['total']):>12}{_size(u['total'] - u['free']):>12}{_size(u['avail']):>12}"
              f"{_size(u['stored']):>12}{u['chunks']:>9}")
    f = st["files"]
    print(f"{f['files']} files, {f['dirs']} directories, {_size(f['bytes'])} in files; "
          f"{st['replicas']} copies of every {_size(st['chunk_size'])} chunk; leader node {st['leader']}")
    return 0


def _resolve(c: KdfsClient, home: Home, name: str, from_root: bool) -> dict:
    if not from_root:
        mp = home.kdfs_mountpoint(home.load_config())
        path = Path(os.path.abspath(name))
        try:
            rel = path.relative_to(mp)
        except ValueError:
            raise UsageError(f"{name} is not in KDFS (mounted on {mp}); use --path for a path from its root") from None
        if not path.exists() and not path.is_symlink():
            raise FsError.of(errno.ENOENT, f"{name}: no such file")
        return c.query("getattr", ino=path.lstat().st_ino) | {"path": "/" + str(rel).lstrip(".")}
    attr = c.query("getattr", ino=ROOT)
    for part in [p for p in name.split("/") if p]:
        attr = c.query("lookup", parent=attr["ino"], name=os.fsencode(part))
    return attr | {"path": "/" + name.strip("/")}


def stat_files(c: KdfsClient, home: Home, args) -> int:
    out = []
    for name in args.files:
        attr = _resolve(c, home, name, args.path)
        chunks = c.query("chunks", ino=attr["ino"])
        out.append({"file": name, "path": attr["path"], "ino": attr["ino"], "size": attr["size"], "chunks": chunks})
    if args.json:
        print_json(out if len(out) > 1 else out[0])
        return 0
    for f in out:
        print(f"{f['file']}: inode {f['ino']}, {f['size']} bytes, {len(f['chunks'])} chunks")
        for ch in f["chunks"]:
            print(f"  chunk {ch['idx']:>5}  {ch['id']}  {ch['length']:>9} bytes  on nodes "
                  f"{','.join(map(str, ch['nodes']))}")
    return 0


def fsck(c: KdfsClient, home: Home, args) -> int:
    r = c.fsck(repair=args.repair)
    if args.json:
        print_json(r)
    else:
        for p in r["problems"]:
            where = f"chunk {p['chunk']}" if "chunk" in p else f"node {p['node']}"
            on = f" on node {p['node']}" if "chunk" in p and "node" in p else ""
            print(f"{p['kind']}: {where}{on}: {p['detail']}")
        state = "clean" if r["ok"] else f"{len(r['problems'])} problems"
        print(f"kdfs fsck: {r['chunks']} chunks on nodes {','.join(map(str, r['nodes']))}: {state}"
              + (f"; repair: {r['repaired']}" if args.repair else ""))
    return 0 if r["ok"] else 1


def rebalance(c: KdfsClient, home: Home, args) -> int:
    r = c.rebalance()
    if args.json:
        print_json(r)
    else:
        print(f"kdfs rebalance: {r['trimmed']} chunks trimmed to their replica count, {r['moved']} copies moved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
