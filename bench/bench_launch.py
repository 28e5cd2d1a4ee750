"""Benchmark of launching, streaming and listing jobs, each beside a baseline measured in the same run.

A local 4-node cluster (the real daemons on 127.0.0.11-14, in a temporary home) is driven from this
process. Measured, and what each figure is compared with:

1. Launch latency of /bin/true, median and p99 (200 launches, 50 with --quick, after 10 untimed):
   - "api": this process talks to node 1's daemon over its Unix socket with the minimal client loop
     of kerrighed.cli.krg_run (send proc.run, read the ok, say io.eof as `krg run < /dev/null` does,
     answer io.output with io.credit until io.exit), the job placed on node 2 (cross-node) and on
     node 1 (local): their difference is the cost of crossing to another node;
   - "command": the real `krg --home H run -n 2 /bin/true < /dev/null`, beside the same command
     with $KRG_SOCKET pointing nowhere (its start-up, imports and parsing, then a failed connect);
   all of these and the two local baselines below are timed in turn, round after round, so that
   other work on the machine weighs on each alike;
   baselines: fork+exec of /bin/true here (subprocess.run), os.posix_spawn + waitpid (a lower floor),
   and `ssh 127.0.0.1 true` when an sshd listens there with passwordless key authentication.
2. Launch throughput: 2,000 /bin/true jobs (300 with --quick) through the API, 8 in flight from
   threads connected two by two to the four daemons, each job placed by the scheduler (node=None);
   jobs/s, beside fork+exec here with the same 8 in flight. Every exit status is checked, and that
   the jobs landed on all 4 nodes (the node of each ok reply).
3. Stream throughput of the real `krg run -n 2 cat` in MB/s (10^6 bytes): 512 MiB (128 MiB with
   --quick) of a random 1 MiB block written into its stdin from a thread and read back from its
   stdout, checked by byte count and SHA-256; the same through node 1 (`-n 1`); baseline: a local
   `cat` through the same pipes. The peak RSS of the daemons of nodes 1 and 2 and of the command
   is sampled during each transfer (every 20 ms), to show that memory stays bounded. The reader
   hashes what it reads, in this process, in every case.
4. `krg ps` at scale:
   - simulated ("simulated": true), 10,000 and 100,000 jobs, in this process without daemons but
     with the real code: the entries are built by JobService.local_listing() itself (a coroutine,
     run with asyncio.run) over synthetic hosted jobs, with kerrighed.jobs.tree_stats stubbed; then
     the wire (protocol.encode of the ok reply, and protocol.decode with max_body=MAX_FRAME as
     kerrighed.client does with a reply) beside plain msgpack packb/unpackb of the same list; then
     kerrighed.cli.krg.ps's formatting (table and --json, to /dev/null) with a fake client returning
     the decoded list, beside procps `ps` (per entry). A reply may be as large as protocol.MAX_FRAME
     (protocol.MAX_BODY still bounds requests): a size beyond it is reported as refused (with what
     it would cost were the limit lifted), and the largest list that fits is measured as well;
   - the stubbed tree_stats(), measured apart with the real code on a real job-like process tree:
     tree_stats([that init]) and tree_stats over 10,000 and 100,000 inits (that tree, repeated) at
     this machine's process count and with 1,000 more processes (it reads all of /proc once per
     call), and from the per-process and per-job costs, the projected cost of a real listing of
     10,000 and 100,000 jobs (PROCESSES_PER_JOB processes each on the node);
   - real: detached `sleep` jobs on node 2, listed through node 1 (proc.list and `krg ps --json`)
     at 0, 25, 50, 75, 100 and 150 jobs (0 to 100 with --quick), with the membership nodes 1 and 2
     see, stopping at the first size where the cluster misbehaves. This part runs last: it may
     break the cluster.

The machine's load average and the daemons of other clusters running beside ours are recorded:
on a shared machine they weigh on every figure. Every process of the run is stopped at the end,
checked with pgrep (the daemons and krg-init shepherds carry the temporary home in their command
line, the sleeps a duration unique to the run); anything left makes the run fail.

    .venv/bin/python bench/bench_launch.py [--out FILE] [--quick]     # about 3 min on 2 CPUs, 1.5 quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import itertools
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from pathlib import Path
from typing import Callable

import msgpack
import psutil
import zmq

from kerrighed import jobservice, localcluster
from kerrighed import protocol as p
from kerrighed.caps import Capabilities
from kerrighed.cli import krg, krg_run
from kerrighed.client import Client
from kerrighed.config import Home

from kerrighed.errors import JobLost, KrgError, NotRunning, ProtocolError
from kerrighed.ids import make_gpid
from kerrighed.jobs import JobRecord, tree_stats
from kerrighed.jobservice import JobService

from _harness import CLEAN_ENV, RssSampler, filesystem_of, krgadm, other_daemons, stop_cluster, write_results

NODES = 4
REMOTE = 2
BIN = Path(sys.executable).parent
KRG, KRGADM = BIN / "krg", BIN / "krgadm"
TRUE = ["/bin/true"]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "launch.json"
SLEEP_ARGV = ["sleep", f"900.{os.getpid()}"]    # a duration unique to this run: pgrep finds leftovers
IO_TIMEOUT = 30.0           # bound on every single read from a daemon
WARMUP = 10
CONCURRENCY = 8
BLOCK = 1 << 20
PS_SIZES = (10_000, 100_000)
REPLY_LIMIT = p.MAX_FRAME   # a reply we asked for may be this large (p.MAX_BODY bounds requests)
EXTRA_PROCESSES = 1000
PROCESSES_PER_JOB = 3       # krg-init's shepherd, krg-init as the namespace's init, the program
SETTLE_S = 2.0              # after launching jobs: let the peers re-read node 2's list before timing
PROCPS = ["ps", "-e", "-o", "pid,user,stat,pcpu,rss,etime,args"]
ENTRY_KEYS = {"gpid", "node", "uid", "argv", "start_time", "app", "tty", "detach", "status", "origin", "caps",
              "cpu_time", "rss", "state", "nprocs"}

FULL = {"launches": 200, "jobs": 2000, "stream_mib": 512, "real_ps_sizes": [0, 25, 50, 75, 100, 150]}
QUICK = {"launches": 50, "jobs": 300, "stream_mib": 128, "real_ps_sizes": [0, 25, 50, 100]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    ap.add_argument("--quick", action="store_true", help="fewer launches and jobs, 128 MiB streamed")
    args = ap.parse_args()
    settings = QUICK if args.quick else FULL
    home = Home(Path(tempfile.mkdtemp(prefix="krgbench-launch-", dir="/tmp")))
    os.chmod(home.path, 0o755)
    results: dict = {"quick": args.quick, "settings": settings}
    problems: list[str] = []
    spawned: list[subprocess.Popen] = []        # our own processes outside the cluster
    t0 = time.monotonic()
    try:
        measure(home, settings, results, problems, spawned)
    except Exception as e:
        traceback.print_exc()
        problems.append(f"the benchmark failed: {type(e).__name__}: {e}")
        results["logs_at_failure"] = log_excerpt(home, lines=20, everything=True)
    finally:
        leftovers = clean_up(home, spawned)
    results["duration_s"] = round(time.monotonic() - t0, 1)
    if leftovers:
        problems.append("left running after cleanup: " + "; ".join(leftovers))
        print("CLEANUP FAILED, still running:\n  " + "\n  ".join(leftovers))
    else:
        print("cleanup: no daemon, krg-init or sleep of this run left, temporary home removed")
    return write_results(results, problems, args.out)


def measure(home: Home, settings: dict, results: dict, problems: list[str], spawned: list) -> None:
    cfg = localcluster.ensure_config(home, NODES)
    results.update({
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(home),
        "cluster": {"nodes": NODES, "port": cfg.nodes[1].port, "heartbeat_interval_s": cfg.heartbeat_interval,
                    "failure_timeout_s": cfg.failure_timeout},
    })
    m = results["machine"]
    print(f"machine: {m['nproc']} CPUs ({m['cpu']}), load average {m['loadavg_at_start'][0]:.2f} at start, "
          f"{m['other_krgd_at_start']} daemons of other clusters running beside ours")
    krgadm(home, "cluster", "start", "--local", str(NODES))
    views = {n: states(home, n) for n in range(1, NODES + 1)}
    if any(set(v.values()) != {"online"} for v in views.values()):
        raise RuntimeError(f"after cluster start, the nodes see {views}")
    launch_latency(home, settings["launches"], results, problems)
    launch_throughput(home, settings["jobs"], results, problems)
    stream_throughput(home, settings["stream_mib"], results, problems)
    ps_simulated(results, spawned)
    ps_real(home, settings["real_ps_sizes"], results)
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["machine"]["other_krgd_at_end"] = other_daemons(home)


def machine(home: Home) -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model, "mem_total_mib": psutil.virtual_memory().total >> 20,
            "kernel": platform.release(), "python": platform.python_version(), "libzmq": zmq.zmq_version(),
            "psutil": psutil.__version__, "processes_at_start": len(psutil.pids()),
            "tmp_filesystem": filesystem_of("/tmp"), "loadavg_at_start": os.getloadavg(),
            "other_krgd_at_start": other_daemons(home)}






# -- the cluster --------------------------------------------------------------------------------------------




def states(home: Home, node: int) -> dict[int, str]:
    """Membership as node's daemon sees it."""
    with Client(home.socket(node), timeout=5) as c:
        return {n["id"]: n["state"] for n in c.call(p.NodesStatus())["nodes"]}


def clean_up(home: Home, spawned: list[subprocess.Popen]) -> list[str]:
    """Stop the daemons (and so their jobs) and our own processes, remove the home; what remains."""
    stop_cluster(home)
    for proc in spawned:
        stop_process(proc)
    # Shepherds killed by a stopping daemon take a moment to be reaped: wait, boundedly.
    deadline = time.monotonic() + 15
    while (left := leftovers(home)) and time.monotonic() < deadline:
        time.sleep(0.1)
    shutil.rmtree(home.path, ignore_errors=True)
    if home.path.exists():
        left.append(f"temporary home {home.path}")
    return left


def leftovers(home: Home) -> list[str]:
    found = []
    for pattern in (str(home.path), " ".join(SLEEP_ARGV)):
        r = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True, timeout=10)
        found += [line for line in r.stdout.splitlines() if int(line.split()[0]) != os.getpid()]
    return found


def stop_process(proc: subprocess.Popen) -> None:
    """Kill one of our processes and its session (we start them in sessions of their own)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


# -- the client loop of krg run, without a terminal ---------------------------------------------------------


def api_run(path: Path, argv: list[str], node: int | None, detach: bool = False) -> tuple[dict, int | None]:
    """Launch a job through the daemon at `path` as `krg run < /dev/null > ...` does; return the launch
    reply ({"gpid", "node"}) and the job's exit status (None when detached)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(IO_TIMEOUT)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NotRunning(f"cannot reach krgd at {path}: {e.strerror}") from None
        stream = sock.makefile("rb")
        try:
            send(sock, p.RunJob(argv=argv, env=CLEAN_ENV, cwd=CWD, umask=UMASK, node=node, detach=detach,
                                window=krg_run.WINDOW))
            reply, _ = read_message(stream)
            if isinstance(reply, p.Error):
                raise reply.exception()
            if not isinstance(reply, p.Ok):
                raise ProtocolError(f"unexpected {reply.op} before the launch reply")
            if detach:
                return reply.result, None
            send(sock, p.InputEof())
            while True:
                msg, payload = read_message(stream)
                if isinstance(msg, p.Output):
                    send(sock, p.Credit(nbytes=sum(map(len, payload))))
                elif isinstance(msg, p.Exit):
                    return reply.result, msg.code if msg.code is not None else 128 + msg.signal
                elif isinstance(msg, p.Lost):
                    raise JobLost(f"job lost: {msg.reason}")
        finally:
            stream.close()


CWD = os.getcwd()
UMASK = os.umask(0)
os.umask(UMASK)


def send(sock: socket.socket, msg: p.Message) -> None:
    try:
        sock.sendall(p.pack_stream(p.encode(msg)))
    except (BrokenPipeError, ConnectionResetError):
        pass        # the daemon hung up after the job's end, which we have yet to read


def read_message(stream) -> tuple[p.Message, list[bytes]]:
    (count,) = p.LENGTH.unpack(read_exact(stream, 4))
    frames = []
    for _ in range(count):
        (size,) = p.LENGTH.unpack(read_exact(stream, 4))
        if size > p.MAX_FRAME:
            raise ProtocolError(f"frame of {size} bytes")
        frames.append(read_exact(stream, size))
    msg, _, payload = p.decode(frames, max_body=p.MAX_FRAME)      # as krg run reads its daemon
    return msg, payload


def read_exact(stream, n: int) -> bytes:
    data = stream.read(n)       # a socket timeout raises here: every wait is bounded
    if len(data) != n:
        raise NotRunning("krgd closed the connection")
    return data


# -- figures ------------------------------------------------------------------------------------------------


def timed_ms(call: Callable[[], object], count: int, warmup: int = WARMUP) -> list[float]:
    for _ in range(warmup):
        call()
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def timed_interleaved(calls: dict[str, Callable[[], object]], count: int, failures: dict[str, list[str]],
                      warmup: int = WARMUP) -> dict[str, list[float]]:
    """Milliseconds of each call, `count` rounds of one call of each in turn, after `warmup` rounds.
    A call that fails is recorded in `failures` (and not timed); more than a tenth failing aborts."""
    out: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + count):
        for name, call in calls.items():
            t0 = time.perf_counter()
            try:
                call()
            except Exception as e:
                failures.setdefault(name, []).append(f"round {i}: {type(e).__name__}: {e}")
                if len(failures[name]) > max(3, count // 10):
                    raise RuntimeError(f"{name}: {len(failures[name])} failures, last: {e}") from e
                continue
            if i >= warmup:
                out[name].append((time.perf_counter() - t0) * 1e3)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples),
            "p99": statistics.quantiles(samples, n=100, method="inclusive")[98] if len(samples) > 1 else samples[0],
            "mean": statistics.fmean(samples), "min": min(samples), "max": max(samples), "count": len(samples)}


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


# -- 1. launch latency ----------------------------------------------------------------------------------------


def launch_latency(home: Home, count: int, results: dict, problems: list[str]) -> None:
    node1 = home.socket(1)
    run_remote = ["--home", str(home.path), "--node", "1", "run", "-n", str(REMOTE), "/bin/true"]

    def api(node: int) -> Callable[[], None]:
        def call():
            started, code = api_run(node1, TRUE, node)
            if code != 0 or started["node"] != node:
                raise RuntimeError(f"launch on node {node}: {started}, exit status {code}")
        return call

    def command(*argv: str) -> Callable[[], None]:
        def call():
            r = subprocess.run([str(KRG), *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=CLEAN_ENV, text=True, timeout=30)
            if r.returncode != 0:
                raise RuntimeError(f"krg {' '.join(argv)}: exit status {r.returncode}: {r.stderr.strip()}")
        return call

    def startup():
        # The same command, its socket pointing nowhere: it starts, parses, fails to connect, exits.
        r = subprocess.run([str(KRG), *run_remote], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, env={**CLEAN_ENV, "KRG_SOCKET": str(home.path / "nowhere.sock")},
                           text=True, timeout=30)
        if "cannot reach krgd" not in r.stderr:
            raise RuntimeError(f"krg without a daemon: exit status {r.returncode}: {r.stderr.strip()}")

    def fork_exec():
        subprocess.run(TRUE, check=True, timeout=10)

    def posix_spawn():
        pid = os.posix_spawn(TRUE[0], TRUE, CLEAN_ENV)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError("/bin/true failed")

    # Interleaved, one of each in turn: a machine shared with other work loads them all alike.
    failures: dict[str, list[str]] = {}
    samples = timed_interleaved({
        "launch_remote_api_ms": api(REMOTE),
        "launch_local_api_ms": api(1),
        "launch_remote_command_ms": command(*run_remote),
        "command_startup_ms": startup,
        "local_fork_exec_ms": fork_exec,
        "local_posix_spawn_ms": posix_spawn,
    }, count, failures)
    out = {name: summary(s) for name, s in samples.items()}
    reason = ssh_unavailable()
    if reason is None:
        out["ssh_ms"] = summary(timed_ms(ssh_true, max(10, count // 4), warmup=2))
    else:
        out["ssh_ms"] = f"not available ({reason})"
    out["cross_node_cost_ms"] = out["launch_remote_api_ms"]["median"] - out["launch_local_api_ms"]["median"]
    out["failures"] = failures
    results["launch_latency"] = out
    for name, errors in failures.items():
        problems.append(f"{name}: {len(errors)} failed launches, first: {errors[0]}")

    base = out["local_fork_exec_ms"]["median"]
    for name in ("launch_remote_api_ms", "launch_local_api_ms", "launch_remote_command_ms"):
        f = out[name]
        failed = f"; {len(failures[name])} FAILED (not timed), first: {failures[name][0]}" if name in failures else ""
        print(f"{name}: median {f['median']:.1f}, p99 {f['p99']:.1f} ({f['count']} launches); "
              f"local fork+exec median {base:.2f} -> ratio {ratio(f['median'], base):.1f}x{failed}")
    f = out["command_startup_ms"]
    print(f"command_startup_ms (the same krg run, KRG_SOCKET pointing nowhere): median {f['median']:.1f}, "
          f"p99 {f['p99']:.1f}: {100 * f['median'] / out['launch_remote_command_ms']['median']:.0f}% of the "
          f"command's launch")
    print(f"cross_node_cost_ms: {out['cross_node_cost_ms']:.1f} (remote minus local launch, API medians)")
    f = out["local_posix_spawn_ms"]
    print(f"local_posix_spawn_ms: median {f['median']:.2f}, p99 {f['p99']:.2f}; fork+exec median {base:.2f} "
          f"-> remote API launch is {ratio(out['launch_remote_api_ms']['median'], f['median']):.0f}x posix_spawn")
    if isinstance(out["ssh_ms"], dict):
        f = out["ssh_ms"]
        print(f"ssh_ms: median {f['median']:.1f}, p99 {f['p99']:.1f} -> remote API launch / ssh "
              f"{ratio(out['launch_remote_api_ms']['median'], f['median']):.2f}x")
    else:
        print(f"ssh_ms: {out['ssh_ms']}")


SSH = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
       "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5", "127.0.0.1", "true"]


def ssh_unavailable() -> str | None:
    """Why ssh to 127.0.0.1 cannot be the baseline, or None when it can."""
    if shutil.which("ssh") is None:
        return "no ssh client installed"
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", 22))
        except OSError as e:
            return f"no sshd listening on 127.0.0.1:22: {e.strerror or e}"
    try:
        r = subprocess.run(SSH, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        return "ssh 127.0.0.1 true did not finish within 5 s"
    if r.returncode != 0:
        return f"passwordless key authentication failed: exit status {r.returncode}, {r.stderr.strip()[-200:]}"
    return None


def ssh_true() -> None:
    subprocess.run(SSH, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True, timeout=10)


# -- 2. launch throughput -----------------------------------------------------------------------------------


def concurrently(jobs: int, make_call: Callable[[int], Callable[[], object]]) -> tuple[float, list, list[str]]:
    """Run `jobs` calls from CONCURRENCY threads (thread i uses make_call(i)); wall seconds, outcomes, errors."""
    counter, lock = itertools.count(), threading.Lock()
    outcomes: list = []
    errors: list[str] = []
    start = threading.Barrier(CONCURRENCY + 1, timeout=30)

    def worker(i: int) -> None:
        call = make_call(i)
        start.wait()
        while True:
            with lock:
                if next(counter) >= jobs:
                    return
            try:
                outcomes.append(call())
            except Exception as e:
                errors.append(f"thread {i}: {type(e).__name__}: {e}")
                return

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(CONCURRENCY)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    deadline = time.monotonic() + 120 + jobs * 0.1
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    elapsed = time.perf_counter() - t0
    if any(t.is_alive() for t in threads):
        errors.append(f"threads still running after {120 + jobs * 0.1:.0f} s")
    return elapsed, outcomes, errors


def launch_throughput(home: Home, jobs: int, results: dict, problems: list[str]) -> None:
    def via(i: int):
        origin = 1 + i % NODES
        path = home.socket(origin)

        def call():
            started, code = api_run(path, TRUE, None)
            return origin, started["node"], code
        return call

    def fork_exec(i: int):
        return lambda: subprocess.run(TRUE, timeout=10).returncode

    concurrently(4 * CONCURRENCY, via)          # warm-up, not counted
    elapsed, outcomes, errors = concurrently(jobs, via)
    placed = {n: sum(1 for _, node, _ in outcomes if node == n) for n in range(1, NODES + 1)}
    failed = sum(1 for *_, code in outcomes if code != 0)
    base_elapsed, base_outcomes, base_errors = concurrently(jobs, fork_exec)
    ours, base = len(outcomes) / elapsed, len(base_outcomes) / base_elapsed
    out = {"jobs_per_s": ours, "jobs": jobs, "completed": len(outcomes), "elapsed_s": elapsed,
           "concurrency": CONCURRENCY, "clients_on_nodes": sorted({1 + i % NODES for i in range(CONCURRENCY)}),
           "placed_on": placed, "nonzero_exits": failed, "errors": errors[:10],
           "all_exited_0": failed == 0 and len(outcomes) == jobs, "on_all_nodes": all(placed.values()),
           "baseline_local_fork_exec_jobs_per_s": base, "baseline_errors": base_errors[:10],
           "ratio_vs_local_fork_exec": ratio(ours, base)}
    results["launch_throughput"] = out
    print(f"launch_throughput_jobs_per_s: {ours:.1f} ({len(outcomes)}/{jobs} jobs in {elapsed:.1f} s, "
          f"{CONCURRENCY} in flight via nodes 1-{NODES}; placed on {placed}; "
          f"{'all exited 0' if out['all_exited_0'] else f'{failed} nonzero exits'}); local fork+exec "
          f"{CONCURRENCY} in flight {base:.0f} jobs/s -> ratio {ratio(ours, base):.3f} ({base / ours:.0f}x slower)")
    if errors or base_errors:
        problems.append(f"launch throughput: errors {(errors + base_errors)[:3]}")
    if not out["all_exited_0"]:
        problems.append(f"launch throughput: {len(outcomes)}/{jobs} jobs completed, {failed} nonzero exits")
    if not out["on_all_nodes"]:
        problems.append(f"launch throughput: jobs did not land on all {NODES} nodes: {placed}")


# -- 3. stream throughput -------------------------------------------------------------------------------------


def pipe_through(cmd: list[str], blocks: int, block: bytes, expected: str, watch: dict[str, int]) -> dict:
    """Write blocks x block into cmd's stdin from a thread, read its stdout here; MB/s and checks."""
    size = blocks * len(block)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=CLEAN_ENV,
                            start_new_session=True)
    idle = {name: psutil.Process(pid).memory_info().rss for name, pid in watch.items()}
    sampler = RssSampler({**watch, "command": proc.pid})
    sampler.start()
    write_errors: list[str] = []

    def write():
        try:
            for _ in range(blocks):
                proc.stdin.write(block)
        except (BrokenPipeError, ValueError, OSError) as e:
            write_errors.append(f"{type(e).__name__}: {e}")
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    writer = threading.Thread(target=write, daemon=True)
    digest, got, errors = hashlib.sha256(), 0, []
    timeout = 60 + size / 2e6           # at least 2 MB/s, or it is a failure
    t0 = time.perf_counter()
    writer.start()
    fd = proc.stdout.fileno()
    try:
        while True:
            left = t0 + timeout - time.perf_counter()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                errors.append(f"stalled: {got} of {size} bytes back after {timeout:.0f} s")
                break
            data = os.read(fd, BLOCK)
            if not data:
                break
            digest.update(data)
            got += len(data)
        elapsed = time.perf_counter() - t0
    finally:
        if errors:
            stop_process(proc)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            code = proc.returncode
        writer.join(30)
        peak = sampler.stop()
        proc.stdout.close()
    ok = got == size and digest.hexdigest() == expected and code == 0 and not errors and not write_errors
    return {"MBps": got / elapsed / 1e6, "bytes": size, "bytes_back": got, "elapsed_s": elapsed, "exit_status": code,
            "sha256_ok": digest.hexdigest() == expected, "ok": ok, "errors": errors + write_errors,
            "rss_idle_mib": {k: v / 2**20 for k, v in idle.items()},
            "rss_peak_mib": {k: v / 2**20 for k, v in peak.items()}}


def stream_throughput(home: Home, mib: int, results: dict, problems: list[str]) -> None:
    block = os.urandom(BLOCK)
    digest = hashlib.sha256()
    for _ in range(mib):
        digest.update(block)
    expected = digest.hexdigest()
    daemons = {f"krgd_node{n}": localcluster.daemon_pid(home, n) for n in (1, REMOTE)}
    krg_cat = [str(KRG), "--home", str(home.path), "--node", "1", "run", "-n"]
    out = {
        "size_mib": mib,
        "remote": pipe_through(krg_cat + [str(REMOTE), "cat"], mib, block, expected, daemons),
        "local_node": pipe_through(krg_cat + ["1", "cat"], mib, block, expected, daemons),
        "baseline_local_cat": pipe_through(["cat"], mib, block, expected, {}),
    }
    base = out["baseline_local_cat"]["MBps"]
    out["ratio_remote_vs_local_cat"] = ratio(out["remote"]["MBps"], base)
    out["ratio_local_node_vs_local_cat"] = ratio(out["local_node"]["MBps"], base)
    results["stream_throughput"] = out
    for key, label in (("remote", f"krg run -n {REMOTE} cat"), ("local_node", "krg run -n 1 cat")):
        f = out[key]
        rss = ", ".join(f"{name} {f['rss_peak_mib'][name]:.0f} MiB (idle {f['rss_idle_mib'].get(name, 0):.0f})"
                        if name in f["rss_idle_mib"] else f"{name} {f['rss_peak_mib'][name]:.0f} MiB"
                        for name in f["rss_peak_mib"])
        print(f"stream_{key}_MBps: {f['MBps']:.1f} ({mib} MiB through `{label}`, "
              f"{'bytes and sha256 match' if f['ok'] else 'CHECK FAILED'}); local cat {base:.0f} MB/s -> ratio "
              f"{ratio(f['MBps'], base):.3f}; peak RSS {rss}")
    for key in ("remote", "local_node", "baseline_local_cat"):
        if not out[key]["ok"]:
            problems.append(f"stream {key}: {out[key]['bytes_back']}/{out[key]['bytes']} bytes, sha256 "
                            f"{'ok' if out[key]['sha256_ok'] else 'differs'}, exit {out[key]['exit_status']}, "
                            f"{out[key]['errors']}")


# -- 4a. krg ps, simulated --------------------------------------------------------------------------------------


def synthetic_listing(n: int) -> tuple[list[dict], float]:
    """n entries exactly as JobService.local_listing() returns them, built by that very coroutine over
    hosted jobs (a sleeping 2-word command) with kerrighed.jobs.tree_stats stubbed (it hands out
    prepared figures); and the seconds the coroutine took (the event loop's creation not counted)."""
    now = time.time()
    caps = Capabilities.DEFAULT.to_dict()
    hosted, figures = {}, {}
    for i in range(n):
        gpid = make_gpid(REMOTE, 1 + i)
        record = JobRecord(gpid=gpid, argv=["sleep", "600"], uid=0, gid=0, cwd="/root", origin=1, node=REMOTE,
                           start_time=now - i % 3600, app=gpid, caps=caps, host_pid=100_000 + i)
        figures[record.host_pid] = {"cpu_time": 0.01 * (i % 97), "rss": 1_765_376 + 4096 * (i % 13),
                                    "state": "sleeping", "nprocs": 1}
        hosted[gpid] = types.SimpleNamespace(record=record)
    service = types.SimpleNamespace(hosted=hosted, finished={})

    def stub(inits: list[int]) -> dict[int, dict]:
        return {pid: dict(figures[pid]) for pid in inits}

    async def build() -> tuple[list[dict], float]:
        t0 = time.perf_counter()
        entries = await JobService.local_listing(service)
        return entries, time.perf_counter() - t0

    saved = jobservice.tree_stats
    jobservice.tree_stats = stub
    try:
        return asyncio.run(build())
    finally:
        jobservice.tree_stats = saved


def median_s(call: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def body_size(entries: list[dict]) -> int:
    return len(p.encode(p.Ok(result={"jobs": entries}), rid=1)[3])


def largest_fitting(entries: list[dict]) -> int:
    """The largest n such that a reply listing entries[:n] has a body within REPLY_LIMIT."""
    if body_size(entries) <= REPLY_LIMIT:
        return len(entries)
    lo, hi = 0, len(entries)        # lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if body_size(entries[:mid]) <= REPLY_LIMIT else (lo, mid)
    return lo


def decode_reply(frames: list[bytes]) -> p.Message:
    """A reply decoded as kerrighed.client.Client.call does (the transport between daemons alike)."""
    reply, _, _ = p.decode(frames, max_body=p.MAX_FRAME)
    return reply


class FakeClient:
    """Stands for the daemon connection in krg.ps: returns a decoded listing."""

    def __init__(self, jobs: list[dict]):
        self.jobs = jobs

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def call(self, msg: p.Message) -> dict:
        assert isinstance(msg, p.ListJobs)
        return {"jobs": self.jobs}


def ps_format_s(body: bytes, as_json: bool, reps: int) -> float:
    """Seconds kerrighed.cli.krg.ps takes to turn a decoded listing into its output (to /dev/null)."""
    args = argparse.Namespace(user=None, target=None, json=as_json, home=None, node=None, debug=False)
    times = []
    saved = krg.connect
    try:
        for _ in range(reps):
            jobs = msgpack.unpackb(body, raw=False)["result"]["jobs"]       # fresh: ps adds fields
            krg.connect = lambda _args, jobs=jobs: FakeClient(jobs)
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                t0 = time.perf_counter()
                krg.ps(args)
                times.append(time.perf_counter() - t0)
    finally:
        krg.connect = saved
    return statistics.median(times)


def ps_wire_and_format(entries: list[dict], reps: int) -> dict:
    n = len(entries)
    reply = p.Ok(result={"jobs": entries})
    frames = p.encode(reply, rid=1)
    body = frames[3]
    fig = {"entries": n, "body_bytes": len(body), "fits_reply_limit": len(body) <= REPLY_LIMIT,
           "encode_ms": 1e3 * median_s(lambda: p.encode(reply, rid=1), reps)}
    if fig["fits_reply_limit"]:
        if decode_reply(frames).result["jobs"] != entries:
            raise RuntimeError(f"a reply of {n} entries does not decode to what was encoded")
        fig["decode_ms"] = 1e3 * median_s(lambda: decode_reply(frames), reps)
    else:
        try:
            decode_reply(frames)
            fig["refused"] = None
        except ProtocolError as e:
            fig["refused"] = str(e)
        # What decoding would cost were the limit lifted: protocol.decode's own unpack of the body.
        fig["decode_ms_if_allowed"] = 1e3 * median_s(
            lambda: msgpack.unpackb(body, raw=False, strict_map_key=True), reps)
    packed = msgpack.packb(entries, use_bin_type=True)
    fig["baseline_msgpack_ms"] = 1e3 * (median_s(lambda: msgpack.packb(entries, use_bin_type=True), reps)
                                        + median_s(lambda: msgpack.unpackb(packed, raw=False), reps))
    decode = fig.get("decode_ms", fig.get("decode_ms_if_allowed"))
    fig["wire_ms"] = fig["encode_ms"] + decode
    fig["ratio_wire_vs_msgpack"] = ratio(fig["wire_ms"], fig["baseline_msgpack_ms"])
    fig["format_table_ms"] = 1e3 * ps_format_s(body, False, reps)
    fig["format_json_ms"] = 1e3 * ps_format_s(body, True, reps)
    for key in ("wire_ms", "format_table_ms", "format_json_ms"):
        fig[key.replace("_ms", "_us_per_entry")] = 1e3 * fig[key] / n
    return fig


def tree_stats_cost(spawned: list[subprocess.Popen]) -> dict:
    """kerrighed.jobs.tree_stats, the real code, on a job-like tree (a shell standing for the namespace's
    init, and its sleep for the program): tree_stats([that init]) and tree_stats over N inits (that init
    N times: the per-job work of N jobs of that shape), for N in PS_SIZES, at this machine's process
    count and with EXTRA_PROCESSES more; and procps `ps` over the same process tables."""
    host = subprocess.Popen(["sh", "-c", f"{' '.join(SLEEP_ARGV)}; exit 0"], start_new_session=True)
    spawned.append(host)
    deadline = time.monotonic() + 10
    while not psutil.Process(host.pid).children():
        if time.monotonic() > deadline:
            raise RuntimeError("the job-like process tree did not start within 10 s")
        time.sleep(0.01)
    init = host.pid
    got = tree_stats([init])[init]
    if got["nprocs"] != 1 or got["state"] != "sleeping" or not got["rss"]:
        raise RuntimeError(f"the job-like tree is not as expected: {got}")
    many = {n: [init] * n for n in PS_SIZES}

    def procps():
        subprocess.run(PROCPS, stdout=subprocess.DEVNULL, check=True, timeout=60)

    points = []
    sleepers: list[subprocess.Popen] = []
    try:
        for extra in (0, EXTRA_PROCESSES):
            while len(sleepers) < extra:
                sleepers.append(subprocess.Popen(SLEEP_ARGV, stdin=subprocess.DEVNULL, start_new_session=True))
                spawned.append(sleepers[-1])
            processes = len(psutil.pids())
            one_ms = 1e3 * median_s(lambda: tree_stats([init]), 20 if extra else 50)
            inits_ms = {str(n): 1e3 * median_s(lambda n=n: tree_stats(many[n]), 5 if n <= 10_000 else 3)
                        for n in PS_SIZES}
            points.append({"processes": processes, "one_init_ms": one_ms, "inits_ms": inits_ms,
                           "procps_ms": 1e3 * median_s(procps, 5)})
    finally:
        for proc in sleepers:
            stop_process(proc)
        stop_process(host)
    (a, b) = points
    per_process_us = 1e3 * (b["one_init_ms"] - a["one_init_ms"]) / (b["processes"] - a["processes"])
    procps_per_process_us = 1e3 * (b["procps_ms"] - a["procps_ms"]) / (b["processes"] - a["processes"])
    # The per-job walk, from the largest N at both process counts (the scan's cost cancels out).
    largest = max(PS_SIZES)
    per_job_us = statistics.fmean(1e3 * (pt["inits_ms"][str(largest)] - pt["one_init_ms"]) / (largest - 1)
                                  for pt in points)
    # N hosted jobs are PROCESSES_PER_JOB * N processes more on their node, each read once per call.
    projected = {str(n): (a["one_init_ms"] + per_process_us / 1e3 * PROCESSES_PER_JOB * n
                          + per_job_us / 1e3 * (n - 1)) / 1e3 for n in PS_SIZES}
    return {"points": points, "tree_stats_us_per_process": per_process_us, "tree_stats_us_per_job": per_job_us,
            "procps_us_per_process": procps_per_process_us,
            "projected_tree_stats_s": projected,
            "processes_per_job": PROCESSES_PER_JOB,
            "pid_max": int(Path("/proc/sys/kernel/pid_max").read_text()),
            "projection": f"tree_stats over N inits at (processes now + {PROCESSES_PER_JOB}N): one read of "
                          "/proc for the whole machine (per process), then a walk of each job's tree (per job); "
                          "local_listing adds the building of the entries (measured with tree_stats stubbed)"}


def ps_simulated(results: dict, spawned: list[subprocess.Popen]) -> None:
    largest = max(PS_SIZES)
    entries, build_s = synthetic_listing(largest)
    if set(entries[0]) != ENTRY_KEYS:
        raise RuntimeError(f"local_listing() entries have keys {sorted(entries[0])}, expected {sorted(ENTRY_KEYS)}")
    fit = largest_fitting(entries)
    out = {"simulated": True,
           "how": "synthetic hosted jobs (argv ['sleep', '600'], uid 0, default capabilities) listed by the real "
                  "JobService.local_listing() with kerrighed.jobs.tree_stats stubbed, in this process; the ok "
                  "reply through the real protocol.encode and protocol.decode(max_body=MAX_FRAME), as the client "
                  "decodes a reply; the real krg.ps formatting with a fake client, output to /dev/null. "
                  "No daemon, no real job.",
           "max_body": p.MAX_BODY, "max_frame": p.MAX_FRAME, "reply_limit": REPLY_LIMIT,
           "entry_bytes": body_size(entries) / largest, "max_entries_per_reply": fit, "sizes": {}}
    out["entries_per_reply_by_size"] = int(REPLY_LIMIT // out["entry_bytes"])
    for n in sorted({*PS_SIZES, fit}):
        sub = entries[:n]
        _, build = synthetic_listing(n) if n != largest else (None, build_s)
        fig = {"listing_build_ms": 1e3 * build, **ps_wire_and_format(sub, 3 if n <= 10_000 else 1)}
        out["sizes"][str(n)] = fig
    del entries
    out["stats_cost"] = cost = tree_stats_cost(spawned)
    # A real listing of N jobs: tree_stats (projected) plus the rest of local_listing (measured above).
    out["projected_local_listing_s"] = {
        n: s + out["sizes"][n]["listing_build_ms"] / 1e3 for n, s in cost["projected_tree_stats_s"].items()}
    out["list_timeout_s"] = jobservice.LIST_TIMEOUT
    results["ps_simulated"] = out

    print(f"ps_simulated (simulated entries, in-process, real code): {out['entry_bytes']:.0f} bytes per entry; "
          f"a reply may be protocol.MAX_FRAME {p.MAX_FRAME} bytes (MAX_BODY {p.MAX_BODY} bounds requests) -> "
          f"at most {fit:,} jobs in one reply" + (f" (all of them; about {out['entries_per_reply_by_size']:,} by "
                                                   "the entry size)" if fit == largest else ""))
    for n, fig in out["sizes"].items():
        wire = (f"wire encode {fig['encode_ms']:.0f} + decode {fig['decode_ms']:.0f} ms" if fig["fits_reply_limit"]
                else f"REFUSED by protocol.decode ({fig['refused']}); were it allowed: encode "
                     f"{fig['encode_ms']:.0f} + decode {fig['decode_ms_if_allowed']:.0f} ms")
        print(f"ps_simulated_{n}_ms: body {fig['body_bytes'] / 1e6:.2f} MB, {wire} "
              f"({fig['wire_us_per_entry']:.1f} us/entry); msgpack alone {fig['baseline_msgpack_ms']:.0f} ms -> "
              f"ratio {fig['ratio_wire_vs_msgpack']:.2f}x; "
              f"listing build (tree_stats stubbed) {fig['listing_build_ms']:.0f} ms; "
              f"krg ps table {fig['format_table_ms']:.0f} ms ({fig['format_table_us_per_entry']:.1f} us/entry), "
              f"--json {fig['format_json_ms']:.0f} ms ({fig['format_json_us_per_entry']:.1f} us/entry); "
              f"procps ps {cost['procps_us_per_process']:.1f} us/process -> table ratio "
              f"{ratio(fig['format_table_us_per_entry'], cost['procps_us_per_process']):.1f}x")
    a, b = cost["points"]
    many = ", ".join(f"{int(n):,} inits {a['inits_ms'][n]:.0f} ms ({b['inits_ms'][n]:.0f} ms)" for n in a["inits_ms"])
    print(f"ps_tree_stats_ms: tree_stats([1 init]) {a['one_init_ms']:.1f} ms with {a['processes']} processes on the "
          f"machine, {b['one_init_ms']:.1f} ms with {b['processes']} -> {cost['tree_stats_us_per_process']:.1f} us "
          f"per process; over {many} -> {cost['tree_stats_us_per_job']:.2f} us per job")
    print(f"ps_projected_listing_s ({PROCESSES_PER_JOB} processes per job, one /proc pass): "
          + ", ".join(f"{int(n):,} jobs tree_stats {s:.2f} s + entries "
                      f"{out['sizes'][n]['listing_build_ms'] / 1e3:.2f} s = {out['projected_local_listing_s'][n]:.2f} s"
                      for n, s in cost["projected_tree_stats_s"].items())
          + f" (a peer waits LIST_TIMEOUT {jobservice.LIST_TIMEOUT:.0f} s for a node's listing; this machine's "
            f"pid_max {cost['pid_max']} allows {cost['pid_max'] // PROCESSES_PER_JOB:,} jobs at most)")


# -- 4b. krg ps, real jobs -------------------------------------------------------------------------------------


def ps_real(home: Home, sizes: list[int], results: dict) -> None:
    steps = []
    launched = 0
    results["ps_real"] = {"jobs_on_node": REMOTE, "job": SLEEP_ARGV, "detached": True, "steps": steps}
    for size in sizes:
        launch_errors = []
        t0 = time.perf_counter()
        while launched < size:
            try:
                api_run(home.socket(1), SLEEP_ARGV, REMOTE, detach=True)
                launched += 1
            except (KrgError, OSError) as e:
                launch_errors.append(f"{type(e).__name__}: {e}")
                break
        launch_s = time.perf_counter() - t0
        time.sleep(SETTLE_S)
        step = {"jobs_launched": launched, "launch_s": launch_s, "launch_errors": launch_errors,
                "machine_processes": len(psutil.pids())}
        if steps and launched:
            step["processes_per_job"] = (step["machine_processes"] - steps[0]["machine_processes"]) / launched
        try:
            with Client(home.socket(1), timeout=60) as c:
                times, listed = [], []
                for _ in range(3):
                    t1 = time.perf_counter()
                    listed = c.call(p.ListJobs())["jobs"]
                    times.append(1e3 * (time.perf_counter() - t1))
            step["list_api_ms"] = statistics.median(times)
            step["list_api_runs_ms"] = times
            step["listed"] = len(listed)
            step["listed_states"] = {s: sum(1 for j in listed if j["state"] == s) for s in {j["state"] for j in listed}}
            # A sleep of 900 s that ended was killed: by whom, the daemons' logs do not say.
            step["ended_early"] = [{k: j[k] for k in ("gpid", "state", "status")} for j in listed
                                   if j["state"] not in ("sleeping", "running")][:10]
        except KrgError as e:
            step["list_api_error"] = str(e)
        t1 = time.perf_counter()
        r = subprocess.run([str(KRG), "--home", str(home.path), "--node", "1", "ps", "--json"], env=CLEAN_ENV,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        step["command_ms"] = 1e3 * (time.perf_counter() - t1)
        step["command_exit_status"] = r.returncode
        if r.returncode != 0:
            step["command_error"] = r.stderr.strip()[-300:]
        t1 = time.perf_counter()
        subprocess.run(PROCPS, stdout=subprocess.DEVNULL, check=True, timeout=60)
        step["baseline_procps_ms"] = 1e3 * (time.perf_counter() - t1)
        step["views"] = {}
        for n in (1, REMOTE):
            try:
                step["views"][str(n)] = states(home, n)
            except KrgError as e:
                step["views"][str(n)] = f"no answer: {e}"
        # Healthy: every job listed, none lost, every node online as both nodes see it. A job that
        # ended (killed from outside: this machine is shared) is listed as exited, and counts.
        healthy = (not launch_errors and step.get("listed") == launched and r.returncode == 0
                   and "lost" not in step.get("listed_states", {"lost": 0})
                   and all(isinstance(v, dict) and set(v.values()) == {"online"} for v in step["views"].values()))
        step["healthy"] = healthy
        steps.append(step)
        if "list_api_ms" in step:
            listing = (f"proc.list via node 1 median {step['list_api_ms']:.0f} ms (runs "
                       f"{', '.join(f'{t:.0f}' for t in step['list_api_runs_ms'])}), {step['listed']} listed "
                       f"{step['listed_states']}")
        else:
            listing = f"proc.list failed: {step['list_api_error']}"
        print(f"ps_real_{launched}_jobs: {listing}; krg ps --json {step['command_ms']:.0f} ms "
              f"(exit {r.returncode}); procps ps ({step['machine_processes']} processes) "
              f"{step['baseline_procps_ms']:.0f} ms -> ratio "
              f"{ratio(step.get('list_api_ms', float('nan')), step['baseline_procps_ms']):.1f}x; "
              f"node 1 sees {step['views']['1']}, node {REMOTE} sees {step['views'][str(REMOTE)]}"
              + (f"; launch errors: {launch_errors[:1]}" if launch_errors else "")
              + (f"; ended early (900 s sleeps: killed): {step['ended_early']}" if step.get("ended_early") else ""))
        if not healthy:
            print(f"ps_real: the cluster misbehaves with {launched} jobs on node {REMOTE}; stopping here")
            break
    results["ps_real"]["log_excerpt"] = excerpt = log_excerpt(home)
    for n, lines in excerpt.items():
        for line in lines:
            if "view epoch" in line and "epoch 1 " not in line:
                when, what = line.split(" ", 2)[1], line.split(" INFO ", 1)[-1]
                print(f"ps_real: node {n} logged at {when}: {what}")


def log_excerpt(home: Home, lines: int = 12, everything: bool = False) -> dict[str, list[str]]:
    """The daemons' last warnings and membership changes (or last lines), for the record."""
    out = {}
    for n in range(1, NODES + 1):
        try:
            text = home.logfile(n).read_text(errors="replace").splitlines()
        except OSError:
            continue
        out[str(n)] = [line for line in text if everything or "WARNING" in line or "view" in line.lower()][-lines:]
    return out


if __name__ == "__main__":
    sys.exit(main())
