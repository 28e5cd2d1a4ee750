"""Parallel application checkpoint and restart, against the jobs dumped one by one.

An application of 8 jobs (each a python3 holding 64 MiB) over 4 nodes of a local cluster: the time of
`checkpoint -a APPID` (freeze everywhere, every node dumps its jobs in parallel, commit, resume) and of
`restart APPID 1`, beside the baseline measured in the same run: the same 8 jobs checkpointed one
at a time (`checkpoint GPID` of single-job applications, so one dump after the other), and their
restarts one after the other.

    .venv/bin/python bench/bench_checkpoint.py [--out FILE] [--jobs N] [--mib M]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kerrighed import localcluster
from kerrighed.config import Home

from _harness import CLEAN_ENV, krgadm, stop_cluster

BIN = Path(sys.executable).parent
NODES = 4
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "checkpoint.json"
JOB = "import time; b = bytearray({size}); b[::4096] = b'x' * len(b[::4096]); time.sleep(3600)"


def run(home: Home, command: str, *args: str) -> str:
    r = subprocess.run([str(BIN / command), "--home", str(home.path), *args], env=CLEAN_ENV,
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{command} {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def jobs_of(home: Home) -> list[dict]:
    return json.loads(run(home, "krg", "ps", "--json"))


def launch(home: Home, count: int, mib: int, one_app: bool) -> list[int]:
    """`count` jobs round the nodes; one application (started from inside the first) or one each."""
    script = JOB.format(size=mib << 20)
    if one_app:
        inner = "; ".join(f"{BIN / 'krg'} --home {home.path} run -d -n {1 + i % NODES} python3 -c \"{script}\""
                          for i in range(1, count))
        run(home, "krg", "run", "-d", "-n", "1", "sh", "-c", f"{inner}; exec python3 -c \"{script}\"")
    else:
        for i in range(count):
            run(home, "krg", "run", "-d", "-n", str(1 + i % NODES), "python3", "-c", script)
    deadline = time.monotonic() + 120
    while True:
        jobs = [j for j in jobs_of(home) if j["state"] not in ("exited", "lost") and j["rss"] >= mib << 20]
        if len(jobs) == count:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(jobs)} of {count} jobs reached {mib} MiB")
        time.sleep(0.2)
    gpids = sorted(j["gpid"] for j in jobs)
    for gpid in gpids:
        run(home, "krgcapset", "-k", str(gpid), "-e", "+CHECKPOINTABLE")
    return gpids


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def kill_all(home: Home, gpids: list[int]) -> None:
    run(home, "krg", "kill", "-s", "KILL", *map(str, gpids))
    deadline = time.monotonic() + 60
    while any(j["gpid"] in gpids and j["state"] not in ("exited", "lost") for j in jobs_of(home)):
        if time.monotonic() > deadline:
            raise RuntimeError("the jobs did not end")
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--mib", type=int, default=64)
    args = ap.parse_args()
    home = Home(Path(tempfile.mkdtemp(prefix="krgbench-ckpt-", dir="/tmp")))
    home.path.chmod(0o755)
    results = {"machine": {"nproc": os.cpu_count(), "kernel": platform.release()}, "jobs": args.jobs,
               "mib_per_job": args.mib, "nodes": NODES}
    try:
        localcluster.ensure_config(home, NODES)
        krgadm(home, "cluster", "start", "--local", str(NODES))
        app = launch(home, args.jobs, args.mib, one_app=True)
        appid = app[0]
        results["parallel_checkpoint_s"] = timed(lambda: run(home, "checkpoint", "-a", str(appid)))
        kill_all(home, app)
        results["parallel_restart_s"] = timed(lambda: run(home, "restart", str(appid), "1"))
        kill_all(home, app)
        single = launch(home, args.jobs, args.mib, one_app=False)
        results["one_by_one_checkpoint_s"] = sum(timed(lambda g=g: run(home, "checkpoint", str(g))) for g in single)
        kill_all(home, single)
        results["one_by_one_restart_s"] = sum(timed(lambda g=g: run(home, "restart", str(g), "1")) for g in single)
        kill_all(home, single)
    finally:
        stop_cluster(home)
        shutil.rmtree(home.path, ignore_errors=True)
    for what in ("checkpoint", "restart"):
        par, seq = results[f"parallel_{what}_s"], results[f"one_by_one_{what}_s"]
        results[f"{what}_speedup"] = seq / par
        print(f"{what}_{args.jobs}_jobs_{NODES}_nodes_s: parallel {par:.2f}, one by one {seq:.2f} -> "
              f"{seq / par:.2f}x ({args.mib} MiB per job)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
