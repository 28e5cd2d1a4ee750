"""Benchmark of dynamic load balancing: 16 CPU-bound jobs of uneven length started on one node of a
4-node cluster whose nodes are CPU-limited, with the balancer off, with it on, and the ideal.

A local 4-node cluster (the real daemons on 127.0.0.11-14, in a temporary home, no KDFS) is started
with `krgadm cluster start --local 4 --cpu-limit C` (default 0.4 CPU per node: 1.6 of this machine's
CPUs, leaving some for the daemons and CRIU). Each job is a Python loop doing a fixed number of
iterations: its CPU seconds (1.0 to 4.0 in even steps by default, 40 in all) are turned into
iterations by a calibration run in this process's own run (so its work is the same wherever it
runs, and survives a migration: CRIU restores the loop's counter, while a restored process's CPU
clock starts again at zero). The 16 jobs are launched on node 1 from one shell that made itself
`krgcapset -d +CAN_MIGRATE` (all at once, in the background of that shell), so all are
migratable; a `krg wait` per job notes when it ends. The makespan runs from the launches to the
last end (the launches' own time, a few seconds on a loaded 2-core machine, is printed too).

- balancer off (`krgadm scheduler set --balancer none`): the makespan;
  every job shares node 1's quota;
- balancer on (`--balancer mosix_load_balancer --balancer-param interval=I`, default 1 s): the same,
  and the migrations the deciding node logged;
- ideal, a lower bound no schedule beats: max(total CPU work / total capacity, the longest job
  alone on one node's capacity). Printed: each makespan, and the ratios on/ideal, off/ideal, off/on.

Every process and cgroup of the run is gone at the end (checked); anything left fails the run.

    .venv/bin/python bench/bench_balance.py [--out FILE] [--cpu-limit C] [--interval I] [--jobs N]
                                            [--min-cpu S] [--max-cpu S]          # about 3 min
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from kerrighed import localcluster
from kerrighed.cgroups import cgroup_name, find_cpu_hierarchy
from kerrighed.config import Home, KdfsConfig

from _harness import CLEAN_ENV, other_daemons, stop_cluster, write_results

NODES = 4
SOURCE = 1
BIN = Path(sys.executable).parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "balance.json"
TAG = f"krgbench-balance-{os.getpid()}"
# A job: N iterations of a busy loop (its argument), then exit 0. The tag puts the run in its
# command line, for the leftover check.
JOB = f"""# {TAG}
import sys
n = int(sys.argv[1])
x = 0
for i in range(n):
    x += i
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    ap.add_argument("--cpu-limit", type=float, default=0.4, help="CPUs per node (default 0.4)")
    ap.add_argument("--interval", type=float, default=1.0, help="the balancer's interval parameter (default 1 s)")
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--min-cpu", type=float, default=1.0, help="CPU seconds of the shortest job (default 1)")
    ap.add_argument("--max-cpu", type=float, default=4.0, help="CPU seconds of the longest job (default 4)")
    args = ap.parse_args()
    home = Home(Path(tempfile.mkdtemp(prefix="krgbench-balance-", dir="/tmp")))
    home.path.chmod(0o755)
    results: dict = {"jobs": args.jobs, "nodes": NODES, "cpu_limit": args.cpu_limit, "interval_s": args.interval}
    problems: list[str] = []
    t0 = time.monotonic()
    cgroups: list[Path] = []
    try:
        measure(home, args, results, problems, cgroups)
    except Exception as e:
        import traceback
        traceback.print_exc()
        problems.append(f"the benchmark failed: {type(e).__name__}: {e}")
    finally:
        left = clean_up(home, cgroups)
    results["duration_s"] = round(time.monotonic() - t0, 1)
    if left:
        problems.append("left after cleanup: " + "; ".join(left))
    else:
        print("cleanup: no daemon, shepherd, job or node cgroup of this run left")
    return write_results(results, problems, args.out)


def measure(home: Home, args, results: dict, problems: list[str], cgroups: list[Path]) -> None:
    cpu_s = [args.min_cpu + (args.max_cpu - args.min_cpu) * i / max(1, args.jobs - 1) for i in range(args.jobs)]
    rate = calibrate()
    iterations = [round(s * rate) for s in cpu_s]
    capacity = NODES * args.cpu_limit
    ideal = max(sum(cpu_s) / capacity, max(cpu_s) / args.cpu_limit)
    results.update({
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"nproc": len(os.sched_getaffinity(0)), "kernel": platform.release(),
                    "python": platform.python_version(), "loadavg_at_start": os.getloadavg(),
                    "other_krgd_at_start": other_daemons(home)},
        "job_cpu_s": [round(s, 3) for s in cpu_s], "total_cpu_s": round(sum(cpu_s), 3),
        "iterations_per_cpu_s": round(rate), "ideal_s": round(ideal, 2),
        "ideal_parts": {"work_over_capacity_s": round(sum(cpu_s) / capacity, 2),
                        "longest_job_alone_s": round(max(cpu_s) / args.cpu_limit, 2)},
    })
    m = results["machine"]
    print(f"machine: {m['nproc']} CPUs, load average {m['loadavg_at_start'][0]:.2f} at start, "
          f"{m['other_krgd_at_start']} daemons of other clusters beside ours")
    print(f"jobs: {args.jobs} busy loops of {min(cpu_s):.1f} to {max(cpu_s):.1f} CPU s ({sum(cpu_s):.1f} in all; "
          f"{rate / 1e6:.1f} M iterations per CPU s), all started on node {SOURCE} of {NODES} nodes limited to "
          f"{args.cpu_limit:g} CPU each ({capacity:g} CPU in all)")

    port = localcluster.free_port([localcluster.local_address(n) for n in range(1, NODES + 1)], prefer_default=False)
    localcluster.ensure_config(home, NODES, port=port, kdfs=KdfsConfig(enabled=False))
    session = home.load_config().session
    hierarchy = find_cpu_hierarchy()
    cgroups += [hierarchy.root / cgroup_name(home.path, session, n) for n in range(1, NODES + 1)]
    run(home, "krgadm", "cluster", "start", "--local", str(NODES), "--port", str(port),
        "--cpu-limit", str(args.cpu_limit), node=None)
    print(f"cluster: nodes limited with {hierarchy} ({', '.join(p.name for p in cgroups)})")

    run(home, "krgadm", "scheduler", "set", "--balancer", "none")
    off = makespan(home, iterations, problems, "off")
    results["balancer_off"] = off
    print(f"balancer off: makespan {off['makespan_s']:.1f} s (every job on node {SOURCE}; launching them took "
          f"{off['launch_s']:.1f} s)")

    run(home, "krgadm", "scheduler", "set", "--balancer", "mosix_load_balancer",
        "--balancer-param", f"interval={args.interval}")
    wait_adopted(home)
    before = home.logfile(SOURCE).read_text(errors="replace")
    on = makespan(home, iterations, problems, "on")
    log = home.logfile(SOURCE).read_text(errors="replace")[len(before):]
    moves = re.findall(r"balancer: job (\d+) moved from node (\d+) to node (\d+) \(down ([\d.]+) s\)", log)
    on["migrations"] = len(moves)
    on["migrations_failed"] = len(re.findall(r"balancer: job \d+ stays on node", log))
    on["migration_down_s"] = [float(d) for *_, d in moves]
    on["moves"] = [[int(g), int(s), int(t)] for g, s, t, _ in moves]
    on["log"] = [line.split(" INFO ", 1)[-1] for line in log.splitlines() if "balancer: " in line]
    results["balancer_on"] = on
    print(f"balancer on (mosix_load_balancer, interval {args.interval:g} s, stability 1.3): makespan "
          f"{on['makespan_s']:.1f} s, {on['migrations']} migrations ({on['migrations_failed']} failed), each down "
          f"{min(on['migration_down_s'], default=0):.2f}-{max(on['migration_down_s'], default=0):.2f} s")
    print(f"ideal (lower bound): {ideal:.1f} s = max({sum(cpu_s):.1f} CPU s / {capacity:g} CPU, "
          f"longest job {max(cpu_s):.1f} CPU s / {args.cpu_limit:g} CPU)")
    ratios = {"on_over_ideal": on["makespan_s"] / ideal, "off_over_ideal": off["makespan_s"] / ideal,
              "off_over_on": off["makespan_s"] / on["makespan_s"]}
    results["ratios"] = {k: round(v, 3) for k, v in ratios.items()}
    print(f"ratios: on/ideal {ratios['on_over_ideal']:.2f}x, off/ideal {ratios['off_over_ideal']:.2f}x, "
          f"off/on {ratios['off_over_on']:.2f}x (the balancer's speed-up)")
    results["machine"]["loadavg_at_end"] = os.getloadavg()


def calibrate() -> float:
    """Iterations of JOB per CPU second, from two runs here (the faster counts: less disturbed)."""
    best = 0.0
    n = 5_000_000
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-c", JOB, str(n)], check=True, env=CLEAN_ENV)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        best = max(best, n / cpu)
    return best


def run(home: Home, command: str, *args: str, node: int | None = SOURCE, timeout: float = 120) -> str:
    cmd = [str(BIN / command), "--home", str(home.path), *(["--node", str(node)] if node else []), *args]
    r = subprocess.run(cmd, env=CLEAN_ENV, cwd=home.path, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{command} {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def wait_adopted(home: Home, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        shown = [json.loads(run(home, "krgadm", "scheduler", "show", "--json", node=n))["balancer"]
                 for n in range(1, NODES + 1)]
        if all(b and b["name"] == "mosix_load_balancer" for b in shown):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not every node runs the balancer: {shown}")
        time.sleep(0.1)


def makespan(home: Home, iterations: list[int], problems: list[str], label: str) -> dict:
    """Launch every job on SOURCE from one migratable shell; from the launches to the last end."""
    krg, krgcapset = BIN / "krg", BIN / "krgcapset"
    # All at once (one after the other, the last would start seconds after the first).
    launches = " ".join(f"{krg} --home {home.path} --node {SOURCE} run -d -n {SOURCE} {sys.executable} -c "
                        f"\"$JOB\" {n} &" for n in iterations)
    script = f"{krgcapset} --home {home.path} --node {SOURCE} -d +CAN_MIGRATE && {{ {launches} wait; }}"
    t0 = time.monotonic()
    r = subprocess.run(["sh", "-c", script], env={**CLEAN_ENV, "JOB": JOB}, cwd=home.path, capture_output=True,
                       text=True, timeout=120)
    launched_s = time.monotonic() - t0
    gpids = [int(g) for g in re.findall(r"Running application (\d+)", r.stdout)]
    if r.returncode != 0 or len(gpids) != len(iterations):
        raise RuntimeError(f"launching the jobs failed ({r.returncode}): {r.stderr.strip()}")
    ends: dict[int, tuple[float, int]] = {}

    def wait(gpid: int) -> None:
        w = subprocess.run([str(krg), "--home", str(home.path), "--node", str(SOURCE), "wait", str(gpid)],
                           env=CLEAN_ENV, capture_output=True, text=True, timeout=900)
        ends[gpid] = (time.monotonic(), w.returncode)

    waiters = [threading.Thread(target=wait, args=(g,)) for g in gpids]
    for w in waiters:
        w.start()
    for w in waiters:
        w.join()
    failed = {g: rc for g, (_, rc) in ends.items() if rc != 0}
    if failed:
        problems.append(f"balancer {label}: jobs ended with a non-zero status: {failed}")
    finish = [ends[g][0] - t0 for g in gpids]
    return {"makespan_s": round(max(finish), 2), "launch_s": round(launched_s, 2),
            "job_end_s": [round(f, 2) for f in finish], "gpids": gpids}


def clean_up(home: Home, cgroups: list[Path]) -> list[str]:
    stop_cluster(home)
    deadline = time.monotonic() + 15
    while (left := leftovers(home, cgroups)) and time.monotonic() < deadline:
        time.sleep(0.1)
    shutil.rmtree(home.path, ignore_errors=True)
    if home.path.exists():
        left.append(f"directory {home.path}")
    return left


def leftovers(home: Home, cgroups: list[Path]) -> list[str]:
    found = [f"cgroup {path}" for path in cgroups if path.exists()]
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            line = " ".join(proc.info["cmdline"] or ())
            if proc.pid != os.getpid() and (str(home.path) in line or TAG in line):
                found.append(f"process {proc.pid} {line[:150]}")
    return found


if __name__ == "__main__":
    sys.exit(main())
