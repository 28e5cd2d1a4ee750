"""Benchmark of a local 4-node cluster: start-up, failure detection and request round trips.

Measured, with the real daemons on 127.0.0.11-14 in a temporary home:
- start-up: `krgadm cluster start --local 4` until the command returns with all 4 nodes online;
- failure detection: `kill -9` of node 4's daemon until node 1 no longer sees it online, and until
  it sees it merely possible (design target: within 3 s);
- round trip of `node.ping` from a command through node 1's daemon to node 2 and back, and to node 1
  only (the local socket hop alone).
Baselines, measured in the same run between this process and an echo server on 127.0.0.21: a bare
pyzmq REQ/REP round trip, and a bare DEALER/ROUTER round trip with CURVE, as our links use.

    .venv/bin/python bench/bench_cluster.py [--out FILE] [--requests N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from kerrighed import localcluster
from kerrighed import protocol as p
from kerrighed.client import Client
from kerrighed.config import Home

from _harness import krgadm, stop_cluster


NODES = 4
VICTIM = 4
RUNS = 3
WARMUP = 50
POLL = 0.01
FAILURE_TARGET_S = 3.0
ECHO_ADDRESS = "127.0.0.21"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cluster.json"

# The echo server of the baselines: REP, or ROUTER with CURVE when given a secret key. It exits when
# its parent does, so a benchmark killed outright does not leave it behind.
ECHO_SERVER = """
import os, sys, zmq
parent = os.getppid()
s = zmq.Context().socket(zmq.ROUTER if len(sys.argv) > 1 else zmq.REP)
if len(sys.argv) > 1:
    s.curve_server = True
    s.curve_secretkey = sys.argv[1].encode()
s.rcvtimeo = 1000
s.bind("tcp://%s:*")
print(s.last_endpoint.decode(), flush=True)
while os.getppid() == parent:
    try:
        s.send_multipart(s.recv_multipart())
    except zmq.Again:
        pass
""" % ECHO_ADDRESS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    ap.add_argument("--requests", type=int, default=1000, help="round trips per latency figure (default 1000)")
    args = ap.parse_args()
    if args.requests < 100:
        ap.error("--requests must be at least 100 (for a p99)")
    home = Home(Path(tempfile.mkdtemp(prefix="krgbench-")))
    servers: list[subprocess.Popen] = []
    try:
        results = measure(home, args.requests, servers)
    finally:
        leftovers = clean_up(home, servers)
    if leftovers:
        print(f"cleanup failed: {leftovers}")
        return 1
    print("cleanup: no daemon left running, echo servers terminated")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.out}")
    return 0


def measure(home: Home, requests: int, servers: list[subprocess.Popen]) -> dict:
    # Written before the first run, so that every run reuses the same keys and port (ensure_config
    # picks a port free on all of 127.0.0.11-14, away from any other local cluster).
    cfg = localcluster.ensure_config(home, NODES)
    results = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"nproc": len(os.sched_getaffinity(0)), "kernel": platform.release(),
                    "python": platform.python_version(), "libzmq": zmq.zmq_version()},
        "cluster": {"nodes": NODES, "port": cfg.nodes[1].port, "heartbeat_interval_s": cfg.heartbeat_interval,
                    "failure_timeout_s": cfg.failure_timeout},
        "requests": requests,
        "warmup": WARMUP,
    }
    runs = [startup(home, stop_first=i > 0) for i in range(RUNS)]
    results["startup_4_nodes_s"] = {"median": statistics.median(runs), "runs": runs}
    show("startup_4_nodes_s", results["startup_4_nodes_s"])

    detections = [failure_detection(home, cfg.heartbeat_interval) for _ in range(RUNS)]
    for key in ("not_online", "possible"):
        runs = [d[key] for d in detections]
        name = f"failure_detection_{key}_s"
        results[name] = {"median": statistics.median(runs), "max": max(runs), "runs": runs,
                         "target": FAILURE_TARGET_S, "within_target": max(runs) <= FAILURE_TARGET_S}
        show(name, results[name])

    with Client(home.socket(1)) as c:
        for target, name in ((2, "node_ping_remote_us"), (1, "node_ping_local_us")):
            results[name] = summary(round_trips(lambda: c.call(p.NodePing(node=target)), requests))
            show(name, results[name])

    frames = p.encode(p.PeerPing(sent=time.time()), rid=1)      # what a node ping carries
    results["zmq_req_rep_us"] = summary(zmq_round_trips(zmq.REQ, None, frames, requests, servers))
    show("zmq_req_rep_us", results["zmq_req_rep_us"])
    results["zmq_curve_dealer_router_us"] = summary(zmq_round_trips(zmq.DEALER, zmq.curve_keypair(), frames,
                                                                    requests, servers))
    show("zmq_curve_dealer_router_us", results["zmq_curve_dealer_router_us"])

    ours = results["node_ping_remote_us"]["median"]
    results["ratio_node_ping_vs_req_rep"] = ours / results["zmq_req_rep_us"]["median"]
    results["ratio_node_ping_vs_curve_dealer_router"] = ours / results["zmq_curve_dealer_router_us"]["median"]
    for name in ("ratio_node_ping_vs_req_rep", "ratio_node_ping_vs_curve_dealer_router"):
        print(f"{name}: {results[name]:.1f}x")
    return results


# -- the cluster --------------------------------------------------------------------------------------




def states(home: Home, node: int = 1) -> dict[int, str]:
    with Client(home.socket(node), timeout=5) as c:
        return {n["id"]: n["state"] for n in c.call(p.NodesStatus())["nodes"]}


def startup(home: Home, stop_first: bool) -> float:
    """Seconds for `krgadm cluster start --local 4` to return with every node online."""
    if stop_first:
        krgadm(home, "cluster", "stop")
    t0 = time.perf_counter()
    krgadm(home, "cluster", "start", "--local", str(NODES))
    elapsed = time.perf_counter() - t0
    st = states(home)
    if list(st.values()) != ["online"] * NODES:
        raise RuntimeError(f"after cluster start, node 1 sees {st}")
    return elapsed


def failure_detection(home: Home, heartbeat_interval: float) -> dict[str, float]:
    """Kill node 4's daemon; seconds until node 1 sees it not online, then possible. Then restore it."""
    wait_state(home, VICTIM, {"online"}, timeout=15)
    # Node 4 has just heartbeated (its join was acknowledged that way): without a pause at a random
    # point of the heartbeat period, every kill would measure the worst case.
    time.sleep(random.uniform(0, heartbeat_interval))
    pid = localcluster.daemon_pid(home, VICTIM)
    if pid is None:
        raise RuntimeError(f"no daemon for node {VICTIM}")
    found: dict[str, float] = {}
    with Client(home.socket(1), timeout=5) as c:
        os.kill(pid, signal.SIGKILL)
        t0 = time.perf_counter()
        deadline = t0 + 15
        while "possible" not in found:
            state = next(n["state"] for n in c.call(p.NodesStatus())["nodes"] if n["id"] == VICTIM)
            now = time.perf_counter()
            if state != "online":
                found.setdefault("not_online", now - t0)
            if state == "possible":
                found["possible"] = now - t0
            if now > deadline:
                raise RuntimeError(f"node 1 still sees node {VICTIM} {state} 15 s after its daemon was killed")
            time.sleep(POLL)
    wait_gone(home, VICTIM, pid)
    localcluster.start_daemons(home, [VICTIM])
    wait_state(home, VICTIM, {"present"}, timeout=15)
    with Client(home.socket(1)) as c:
        c.call(p.NodesAdd(nodes=[VICTIM]))
    return found


def wait_state(home: Home, node: int, wanted: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (state := states(home)[node]) not in wanted:
        if time.monotonic() > deadline:
            raise RuntimeError(f"node 1 sees node {node} {state}, not {'/'.join(wanted)}, after {timeout:g} s")
        time.sleep(POLL)


def wait_gone(home: Home, node: int, pid: int, timeout: float = 10) -> None:
    """Wait until the killed daemon is gone, reaping it when it is our child (a restarted one is)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if localcluster.daemon_pid(home, node) is None:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"killed daemon of node {node} (pid {pid}) still there after {timeout:g} s")
        time.sleep(POLL)


def clean_up(home: Home, servers: list[subprocess.Popen]) -> list[str]:
    """Stop every daemon and echo server we started and remove the home; what could not be stopped."""
    stop_cluster(home)
    for s in servers:
        stop_server(s)
    leftovers = [f"daemon of node {n}" for n in localcluster.running_nodes(home)]
    leftovers += [f"echo server pid {s.pid}" for s in servers if s.poll() is None]
    shutil.rmtree(home.path, ignore_errors=True)
    return leftovers


# -- round trips --------------------------------------------------------------------------------------


def round_trips(call, requests: int) -> list[float]:
    """Microseconds of each of `requests` calls, after WARMUP untimed ones."""
    for _ in range(WARMUP):
        call()
    rtts = []
    for _ in range(requests):
        t0 = time.perf_counter()
        call()
        rtts.append((time.perf_counter() - t0) * 1e6)
    return rtts


def summary(rtts: list[float]) -> dict[str, float]:
    return {"median": statistics.median(rtts), "p99": statistics.quantiles(rtts, n=100)[98],
            "mean": statistics.fmean(rtts), "count": len(rtts)}


def show(name: str, fig: dict) -> None:
    if "runs" in fig:
        runs = ", ".join(f"{r:.2f}" for r in fig["runs"])
        extra = f", max {fig['max']:.2f}" if "max" in fig else ""
        target = f"; target {fig['target']:g} s: {'met' if fig['within_target'] else 'MISSED'}" if "target" in fig else ""
        print(f"{name}: median {fig['median']:.2f}{extra} (runs {runs}){target}")
    else:
        print(f"{name}: median {fig['median']:.0f}, p99 {fig['p99']:.0f}, mean {fig['mean']:.0f} "
              f"({fig['count']} requests)")


def zmq_round_trips(kind: int, client_keys: tuple[bytes, bytes] | None, frames: list[bytes], requests: int,
                    servers: list[subprocess.Popen]) -> list[float]:
    """Round trips to an echo server process: REQ to REP, or DEALER to ROUTER with CURVE keys."""
    server_keys = zmq.curve_keypair() if client_keys else None
    endpoint = start_server(server_keys[1].decode() if server_keys else None, servers)
    ctx = zmq.Context()
    s = ctx.socket(kind)
    s.linger = 0
    s.rcvtimeo = s.sndtimeo = 5000       # a lost server raises zmq.Again instead of hanging
    if client_keys:
        s.curve_serverkey = server_keys[0]
        s.curve_publickey, s.curve_secretkey = client_keys
    s.connect(endpoint)
    try:
        def call():
            s.send_multipart(frames)
            s.recv_multipart()
        return round_trips(call, requests)
    finally:
        ctx.destroy(linger=0)
        stop_server(servers[-1])


def start_server(curve_secret: str | None, servers: list[subprocess.Popen]) -> str:
    """Start an echo server and return its endpoint."""
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, *([curve_secret] if curve_secret else [])],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    servers.append(proc)
    if not select.select([proc.stdout], [], [], 10)[0]:
        raise RuntimeError("the echo server did not report its endpoint within 10 s")
    endpoint = proc.stdout.readline().strip()
    if not endpoint.startswith(f"tcp://{ECHO_ADDRESS}:"):
        raise RuntimeError(f"the echo server failed (exit status {proc.poll()})")
    return endpoint


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    proc.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
