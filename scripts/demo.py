"""The demo: a 3-node Kerrighed cluster on this machine's loopback addresses, shown working:
programs launched on it, listed, migrated; files shared through KDFS; a node leaving, dying and
coming back, its files still there.

It runs the real commands as a user would type them, prints each one and its output, and stops
the cluster at the end (--keep leaves it running, in the home it prints).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    r = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], text=True, capture_output=True)
    sys.stdout.write(r.stdout)
    sys.stdout.write(r.stderr)
    if check and r.returncode != 0:
        raise SystemExit(f"demo: '{' '.join(cmd)}' failed with status {r.returncode}")
    return r


def wait(what: str, predicate, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def node_state(node: int, of: int) -> str:
    r = subprocess.run([str(BIN / "krgadm"), "--node", str(of), "nodes", "status", "-n", str(node)],
                       text=True, capture_output=True)
    return r.stdout.strip().partition(":")[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--home", default="/tmp/krg-demo", help="where the demo cluster lives (default /tmp/krg-demo)")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = ap.parse_args()
    os.environ["KRG_HOME"] = args.home
    os.environ.pop("KRG_NODE", None)
    os.environ.pop("KRG_SOCKET", None)
    subprocess.run([str(BIN / "krgadm"), "cluster", "stop"], capture_output=True)
    shutil.rmtree(args.home, ignore_errors=True)
    Path(args.home).mkdir(mode=0o755, parents=True)

    last = args.nodes
    try:
        print(f"== A {args.nodes}-node cluster on 127.0.0.11-{10 + args.nodes}, home {args.home}")
        sh("krgadm", "cluster", "start", "--local", str(args.nodes))
        sh("krgadm", "cluster", "status")
        sh("krgadm", "nodes", "status")
        print("\n== The cluster as one machine")
        sh("krg", "info")
        sh("krg", "ping", str(last), "-c", "20")

        print("\n== Unmodified programs run where the scheduler puts them, as if here")
        sh("krg", "run", "--", "sh", "-c", "echo hello from a job: pid $$ in its own namespace, uid $(id -u)")
        data = os.urandom(8 << 20)
        r = subprocess.run([str(BIN / "krg"), "run", "-n", "2", "sha256sum"], input=data, capture_output=True)
        print(f"\n$ head -c 8M /dev/urandom | krg run -n 2 sha256sum\n{r.stdout.decode().strip()}"
              f"   (locally: {hashlib.sha256(data).hexdigest()[:16]}...)")
        counter = "i=0; while :; do i=$((i+1)); sleep 0.5; done"
        gpid = sh("krg", "run", "-d", "-n", "2", "sh", "-c", counter).stdout.split()[-1]
        sh("krg", "run", "-d", "sleep", "600")
        sh("krg", "ps")

        mnt = f"{args.home}/kdfs"
        print(f"\n== One file system over the nodes' disks (KDFS), mounted at {mnt}")
        sh("krg", "run", "-n", "2", "--", "sh", "-c", f"seq 1 200000 > {mnt}/numbers && mkdir -p {mnt}/src "
           f"&& printf 'int main(void){{return 42;}}\\n' > {mnt}/src/a.c")
        sh("krg", "run", "-n", str(last), "--", "sh", "-c", f"wc -l {mnt}/numbers; sha256sum {mnt}/numbers")
        sh("krg", "run", "-n", "1", "--", "sh", "-c", f"cd {mnt}/src && cc -o a a.c && ./a; echo built on node 1, exit $?")
        sh("kdfs", "stat", f"{mnt}/numbers")
        sh("kdfs", "df")

        print(f"\n== A running job moves to node {last} (CRIU), keeping its global PID")
        sh("krgcapset", "-k", gpid, "-e", "+CAN_MIGRATE")
        sh("migrate", gpid, str(last))
        sh("krg", "ps", "-n", str(last))
        sh("krg", "kill", gpid)

        print(f"\n== Node {last} leaves the cluster, stays present, and comes back")
        sh("krgadm", "nodes", "del", "-n", str(last))
        sh("krgadm", "nodes", "status")
        sh("krgadm", "nodes", "add", "-n", str(last))

        print(f"\n== Node {last}'s daemon is killed (kill -9)")
        pid = int((Path(args.home) / "nodes" / str(last) / "krgd.pid").read_text())
        os.kill(pid, 9)
        took = wait(f"node {last} to be seen gone", lambda: node_state(last, 1) == "possible")
        print(f"node 1 saw node {last} gone after {took:.1f} s")
        sh("krgadm", "cluster", "status")
        sh("krgadm", "nodes", "status")
        print(f"\nKDFS goes on without node {last}: every chunk has a copy elsewhere")
        sh("krg", "run", "-n", "1", "--", "sh", "-c", f"sha256sum {mnt}/numbers; echo more >> {mnt}/numbers; wc -l {mnt}/numbers")

        print("\n== Its daemon restarts and, having crashed out of the cluster, rejoins by itself")
        sh("krgd", "--node", str(last), "--detach", "--log-file", f"{args.home}/nodes/{last}/krgd.log")
        took = wait(f"node {last} to rejoin", lambda: node_state(last, 1) == "online")
        print(f"node {last} back online after {took:.1f} s")
        sh("krgadm", "cluster", "status")
        wait("KDFS to have every copy back", lambda: subprocess.run([str(BIN / "kdfs"), "fsck"],
                                                                    capture_output=True).returncode == 0, 60)
        sh("kdfs", "fsck")
    finally:
        if args.keep:
            print(f"\nThe cluster keeps running: export KRG_HOME={args.home}; 'krgadm cluster stop' stops it.")
        else:
            sh("krgadm", "cluster", "stop", check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
