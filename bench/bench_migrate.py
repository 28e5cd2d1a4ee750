"""Benchmark of migration: `migrate GPID 2` of jobs of 64 MiB, 512 MiB and 2 GiB, beside raw CRIU.

A local 3-node cluster (the real daemons on 127.0.0.11-13, in a temporary home) is driven from this
process. For each size, a detached job on node 1 (`krg run -d -n 1 python3 -c ...`: a bytearray of
that size, every page written, then sleeping) is made migratable (`krgcapset -k GPID -e
+CAN_MIGRATE`) once `krg ps --json` shows its RSS at the size, and moved with the real `migrate GPID
2` through node 1's daemon. Measured, each run with a fresh job:

- total: the wall clock of the `migrate` command, from its start to its exit. The job does not run
  from the start of the dump to the end of the restore (CRIU kills the dumped tree; it resumes only
  on node 2), so this is also its honest downtime;
- the daemon's own breakdown, from node 1's log (`job N migrated to node 2: down X s (dump D,
  transfer T, restore R)`): where the downtime goes;
- the peak RSS of the daemons of nodes 1 and 2 during the migration (sampled every 50 ms);
- checked after each migration: `krg ps --json` lists the same gpid on node 2, sleeping, with
  about the same RSS (within 10 %).
Baseline, in the same run, on this node with the images on local disk (/tmp): raw CRIU through
checkpoint.criu on the same program started as a plain process in its own PID namespace
(`unshare --pid --fork --kill-child setsid python3 -c ...`; its init, the python3, is dumped):
`criu.dump(init, DIR)` into a temporary directory under /tmp, then `criu.restore(DIR,
sibling=True)`; the wall time of each, their sum, and the ratio migrate total / (dump + restore).
The restored process is checked (its RSS) and killed.

Runs: 3 per size (medians printed), a baseline and a migration in turn. The 2 GiB size is skipped,
with the reason printed, when less than 8 GiB of memory is available or /tmp has less than 8 GiB free.
Pre-copy (iterative pre-dumps while the job runs) needs the kernel's soft-dirty tracking:
checkpoint.criu.can_track_memory() says whether it is there, and it is printed.

Every process of the run is stopped at the end and checked with pgrep (the daemons and krg-init
shepherds carry the temporary home in their command line, the jobs and the baseline's processes a
tag unique to the run); anything left makes the run fail.

    .venv/bin/python bench/bench_migrate.py [--out FILE] [--sizes 64,512,2048] [--runs N]    # about 4 min
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import psutil
import zmq

from checkpoint import criu
from kerrighed import localcluster
from kerrighed import protocol as p
from kerrighed.client import Client
from kerrighed.config import Home

from _harness import CLEAN_ENV, RssSampler, filesystem_of, other_daemons, stop_cluster, write_results


NODES = 3
SOURCE, TARGET = 1, 2
MIB = 1 << 20
GIB = 1 << 30
SIZES_MIB = (64, 512, 2048)
RUNS = 3                        # per size, each with a fresh job: medians (image writing varies a lot)
BIG_MIB = 2048
BIG_NEEDS = 8 * GIB             # available memory and free space in /tmp for the 2 GiB size
RSS_TOLERANCE = 0.10            # after the move, RSS within this fraction of before
BIN = Path(sys.executable).parent
KRG, KRGADM, MIGRATE, KRGCAPSET = BIN / "krg", BIN / "krgadm", BIN / "migrate", BIN / "krgcapset"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "migrate.json"
TAG = f"krgbench-migrate-{os.getpid()}"     # in every job's command line: pgrep finds leftovers
# The job: SIZE bytes in a bytearray, one byte written in every page (so every page is present and
# not the zero page: CRIU writes them all), then it sleeps.
JOB_SCRIPT = f"""# {TAG}
import sys, time
n = int(sys.argv[1])
b = bytearray(n)
b[::4096] = b"\\x01" * len(range(0, n, 4096))
while True:
    time.sleep(3600)
"""
LOG_LINE = re.compile(r"job (\d+) migrated to node (\d+): down ([\d.]+) s "
                      r"\(dump ([\d.]+), transfer ([\d.]+), restore ([\d.]+)\)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES_MIB)), help="job sizes in MiB (default 64,512,2048)")
    ap.add_argument("--runs", type=int, default=RUNS, help=f"runs per size (default {RUNS})")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    home = Home(Path(tempfile.mkdtemp(prefix="krgbench-migrate-", dir="/tmp")))
    os.chmod(home.path, 0o755)
    scratch = Path(tempfile.mkdtemp(prefix="krgbench-criu-", dir="/tmp"))
    os.chmod(scratch, 0o755)
    results: dict = {"sizes_mib": sizes}
    problems: list[str] = []
    ours: list[int] = []        # pids of processes this process started outside the cluster
    t0 = time.monotonic()
    try:
        measure(home, scratch, sizes, args.runs, results, problems, ours)
    except Exception as e:
        traceback.print_exc()
        problems.append(f"the benchmark failed: {type(e).__name__}: {e}")
        results["logs_at_failure"] = log_tails(home)
    finally:
        leftovers = clean_up(home, scratch, ours)
    results["duration_s"] = round(time.monotonic() - t0, 1)
    if leftovers:
        problems.append("left running after cleanup: " + "; ".join(leftovers))
        print("CLEANUP FAILED, still running:\n  " + "\n  ".join(leftovers))
    else:
        print("cleanup: no daemon, krg-init, job or restored process of this run left, temporary "
              "directories removed")
    return write_results(results, problems, args.out)


def measure(home: Home, scratch: Path, sizes: list[int], runs: int, results: dict, problems: list[str],
            ours: list[int]) -> None:
    cfg = localcluster.ensure_config(home, NODES, port=localcluster.free_port(
        [localcluster.local_address(n) for n in range(1, NODES + 1)], prefer_default=False))
    results.update({
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(home),
        "cluster": {"nodes": NODES, "port": cfg.nodes[1].port, "source": SOURCE, "target": TARGET},
    })
    m = results["machine"]
    print(f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['mem_available_mib'] / 1024:.1f} GiB available, "
          f"/tmp {m['tmp_free_mib'] / 1024:.0f} GiB free ({m['tmp_filesystem']}), load average "
          f"{m['loadavg_at_start'][0]:.2f} at start, {m['other_krgd_at_start']} daemons of other clusters beside ours; "
          f"{m['criu_version']}")
    if m["can_track_memory"]:
        print("pre-copy: checkpoint.criu.can_track_memory() is True: soft-dirty tracking works here "
              "(this benchmark measures the stop-and-copy migration only)")
    else:
        print("pre-copy: IMPOSSIBLE here: checkpoint.criu.can_track_memory() is False (the kernel lacks "
              "soft-dirty memory tracking), so every migration is a full stop-and-copy: the job is down "
              "for the whole dump, transfer and restore")
    krgadm(home, "cluster", "start", "--local", str(NODES))
    views = {n: states(home, n) for n in range(1, NODES + 1)}
    if any(set(v.values()) != {"online"} for v in views.values()):
        raise RuntimeError(f"after cluster start, the nodes see {views}")
    results["per_size"] = per_size = {}
    for mib in sizes:
        if mib >= BIG_MIB and (reason := too_big(mib)):
            print(f"size_{mib}MiB: SKIPPED: {reason}")
            per_size[str(mib)] = {"skipped": reason}
            continue
        count = runs
        fig = {"runs": count, "migrations": [], "baseline": []}
        per_size[str(mib)] = fig
        for i in range(count):
            # One of each in turn, so that other work on the machine weighs on both alike.
            fig["baseline"].append(raw_criu(scratch, mib, ours))
            fig["migrations"].append(migration(home, mib, problems))
            show_run(mib, i, fig["migrations"][-1], fig["baseline"][-1])
        summarize(mib, fig)
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["machine"]["other_krgd_at_end"] = other_daemons(home)


def machine(home: Home) -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    try:
        version = subprocess.run([criu.criu_binary(), "--version"], capture_output=True, text=True,
                                 timeout=10).stdout.split("\n")[0].strip()
    except OSError as e:
        version = f"criu --version failed: {e}"
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model, "mem_total_mib": psutil.virtual_memory().total >> 20,
            "mem_available_mib": psutil.virtual_memory().available >> 20,
            "tmp_free_mib": shutil.disk_usage("/tmp").free >> 20, "tmp_filesystem": filesystem_of("/tmp"),
            "kernel": platform.release(), "python": platform.python_version(), "libzmq": zmq.zmq_version(),
            "criu": criu.criu_binary(), "criu_version": version, "criu_check": criu.check(),
            "can_track_memory": criu.can_track_memory(), "loadavg_at_start": os.getloadavg(),
            "other_krgd_at_start": other_daemons(home)}


def too_big(mib: int) -> str | None:
    available, free = psutil.virtual_memory().available, shutil.disk_usage("/tmp").free
    if available < BIG_NEEDS:
        return f"{available / GIB:.1f} GiB of memory available, less than {BIG_NEEDS / GIB:.0f} GiB"
    if free < BIG_NEEDS:
        return f"/tmp has {free / GIB:.1f} GiB free, less than {BIG_NEEDS / GIB:.0f} GiB"
    return None






# -- the cluster --------------------------------------------------------------------------------------------


def command(home: Home, program: Path, *args: str, node: int | None = SOURCE,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """One of the installed commands against our home, without the caller's KRG_* variables. Run
    from the home: the daemons' (and so every job's init's) cwd is where krgadm started them, and
    CRIU's parasite makes a directory there while dumping a namespace's init."""
    cmd = [str(program), "--home", str(home.path), *(["--node", str(node)] if node else []), *args]
    return subprocess.run(cmd, env=CLEAN_ENV, cwd=home.path, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


def krgadm(home: Home, *args: str) -> None:
    r = command(home, KRGADM, *args, node=None)
    if r.returncode != 0:
        raise RuntimeError(f"krgadm {' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}".strip())


def krg(home: Home, *args: str, timeout: float = 120) -> str:
    r = command(home, KRG, *args, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"krg {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def states(home: Home, node: int) -> dict[int, str]:
    with Client(home.socket(node), timeout=5) as c:
        return {n["id"]: n["state"] for n in c.call(p.NodesStatus())["nodes"]}


def listed(home: Home, gpid: int) -> dict | None:
    return next((j for j in json.loads(krg(home, "ps", "--json")) if j["gpid"] == gpid), None)


def clean_up(home: Home, scratch: Path, ours: list[int]) -> list[str]:
    """Stop the daemons (and so their jobs), kill what we started, remove our directories; what remains."""
    stop_cluster(home)
    for pid in ours:
        kill_ours(pid)
    # Shepherds killed by a stopping daemon take a moment to be reaped: wait, boundedly.
    deadline = time.monotonic() + 15
    while (left := leftovers(home)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for path in (home.path, scratch):
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            left.append(f"directory {path}")
    return left


def leftovers(home: Home) -> list[str]:
    found = []
    for pattern in (str(home.path), TAG):
        r = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True, timeout=10)
        found += [line[:200] for line in r.stdout.splitlines() if int(line.split()[0]) != os.getpid()]
    return found


def kill_ours(pid: int) -> None:
    """Kill pid if it is still one of this run's processes (TAG in its command line: a pid we knew
    may have been reused since), and reap it if it is our child."""
    try:
        if TAG.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return
        os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def log_tails(home: Home, lines: int = 20) -> dict[str, list[str]]:
    out = {}
    for n in range(1, NODES + 1):
        with contextlib.suppress(OSError):
            out[str(n)] = home.logfile(n).read_text(errors="replace").splitlines()[-lines:]
    return out


# -- one migration -----------------------------------------------------------------------------------------


def ready_timeout(mib: int) -> float:
    return 60 + mib / 50        # at least 50 MiB/s of page touching, or something is wrong


def wait_job_ready(home: Home, gpid: int, mib: int) -> dict:
    """Until `krg ps --json` shows the job with an RSS of at least the size, the same twice in a row
    (the touching is over); its entry."""
    deadline = time.monotonic() + ready_timeout(mib)
    last = None
    while True:
        job = listed(home, gpid)
        if job is not None and job["state"] not in ("sleeping", "running"):
            raise RuntimeError(f"the {mib} MiB job {gpid} ended before it was ready: {job}")
        if job is not None and job["rss"] >= mib * MIB:
            if last is not None and abs(job["rss"] - last) <= 0.01 * last:
                return job
            last = job["rss"]
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {mib} MiB job {gpid} did not reach its size within "
                               f"{ready_timeout(mib):.0f} s: {job}")
        time.sleep(0.2)


def migrated_line(home: Home, gpid: int, timeout: float = 10) -> tuple[float, ...] | None:
    """(down, dump, transfer, restore) seconds from the source daemon's `job N migrated` line."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            for line in home.logfile(SOURCE).read_text(errors="replace").splitlines():
                m = LOG_LINE.search(line)
                if m and int(m.group(1)) == gpid and int(m.group(2)) == TARGET:
                    return tuple(float(m.group(i)) for i in range(3, 7))
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def migration(home: Home, mib: int, problems: list[str]) -> dict:
    out = krg(home, "run", "-d", "-n", str(SOURCE), "python3", "-c", JOB_SCRIPT, str(mib * MIB))
    m = re.search(r"Running application (\d+)", out)
    if not m:
        raise RuntimeError(f"krg run -d printed {out!r}")
    gpid = int(m.group(1))
    try:
        t_ready = time.perf_counter()
        before = wait_job_ready(home, gpid, mib)
        ready_s = time.perf_counter() - t_ready
        r = command(home, KRGCAPSET, "-k", str(gpid), "-e", "+CAN_MIGRATE")
        if r.returncode != 0:
            raise RuntimeError(f"krgcapset -k {gpid} -e +CAN_MIGRATE: {r.stderr.strip()}")
        daemons = {f"krgd_node{n}": localcluster.daemon_pid(home, n) for n in (SOURCE, TARGET)}
        if None in daemons.values():
            raise RuntimeError(f"a daemon is not running: {daemons}")
        sampler = RssSampler(daemons, interval=0.05)
        sampler.start()
        t0 = time.perf_counter()
        r = command(home, MIGRATE, str(gpid), str(TARGET), timeout=900)
        total_s = time.perf_counter() - t0
        peaks = {name: rss / MIB for name, rss in sampler.stop().items()}
        fig = {"gpid": gpid, "ready_s": ready_s, "rss_before_mib": before["rss"] / MIB, "total_s": total_s,
               "exit_status": r.returncode, "daemon_rss_peak_mib": peaks}
        if r.returncode != 0 or r.stdout or r.stderr:
            fig["error"] = (r.stdout + r.stderr).strip()
            problems.append(f"{mib} MiB: migrate {gpid} {TARGET} exited {r.returncode}: {fig['error']}")
            return fig
        logged = migrated_line(home, gpid)
        if logged is None:
            problems.append(f"{mib} MiB: node {SOURCE}'s log has no 'job {gpid} migrated to node {TARGET}' line")
        else:
            fig["daemon_total_s"], fig["dump_s"], fig["transfer_s"], fig["restore_s"] = logged
        after = listed(home, gpid)
        fig["after"] = after and {k: after[k] for k in ("gpid", "node", "state", "rss", "nprocs")}
        ok = (after is not None and after["node"] == TARGET and after["state"] in ("sleeping", "running")
              and abs(after["rss"] - before["rss"]) <= RSS_TOLERANCE * before["rss"])
        fig["verified"] = ok
        if after is not None:
            fig["rss_after_mib"] = after["rss"] / MIB
        if not ok:
            problems.append(f"{mib} MiB: after `migrate {gpid} {TARGET}`, krg ps shows {fig['after']} "
                            f"(before: RSS {before['rss']}, node {before['node']})")
        return fig
    finally:
        end_job(home, gpid)


def end_job(home: Home, gpid: int) -> None:
    """Kill the job wherever it is now and wait for its end (the cluster's stop is the fallback)."""
    r = command(home, KRG, "kill", "-s", "KILL", str(gpid))
    if r.returncode == 0:
        with contextlib.suppress(subprocess.TimeoutExpired):
            command(home, KRG, "wait", str(gpid), timeout=30)


# -- the baseline: raw CRIU on one node ----------------------------------------------------------------------


def raw_criu(scratch: Path, mib: int, ours: list[int]) -> dict:
    """The same program as the init of its own PID namespace, dumped and restored by checkpoint.criu."""
    work = Path(tempfile.mkdtemp(prefix=f"{mib}mib-", dir=scratch))
    cwd, images = work / "cwd", work / "images"
    cwd.mkdir()
    images.mkdir()
    # The init's cwd is its own directory: CRIU's parasite makes `proc.crtools` there while dumping.
    outer = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "setsid", "python3", "-c", JOB_SCRIPT,
                              str(mib * MIB)], cwd=cwd, env=CLEAN_ENV, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ours.append(outer.pid)
    root = init = None
    try:
        init = wait_init(outer, mib)
        ours.append(init.pid)
        rss_before = init.memory_info().rss
        t0 = time.perf_counter()
        stats = criu.dump(init.pid, images)
        dump_s = time.perf_counter() - t0
        outer.wait(timeout=30)          # the dump killed the tree: unshare sees its child die
        image_bytes = sum(f.stat().st_size for f in images.iterdir() if f.is_file())
        t0 = time.perf_counter()
        root = criu.restore(images, sibling=True)
        restore_s = time.perf_counter() - t0
        ours.append(root)
        rss_after = psutil.Process(root).memory_info().rss
        if abs(rss_after - rss_before) > RSS_TOLERANCE * rss_before:
            raise RuntimeError(f"the restored {mib} MiB process has an RSS of {rss_after}, was {rss_before}")
        return {"dump_s": dump_s, "restore_s": restore_s, "sum_s": dump_s + restore_s,
                "frozen_s": (stats.frozen_time or 0) / 1e6, "memdump_s": (stats.memdump_time or 0) / 1e6,
                "memwrite_s": (stats.memwrite_time or 0) / 1e6, "pages_written": stats.pages_written,
                "image_mib": image_bytes / MIB, "rss_before_mib": rss_before / MIB, "rss_after_mib": rss_after / MIB}
    finally:
        # The restored root is our child (sibling=True); the dumped init was unshare's child, dead
        # unless the dump failed; unshare itself is our child. Each killed and reaped here.
        for pid in (root, init and init.pid):
            if pid is not None:
                kill_ours(pid)
        if outer.poll() is None:
            outer.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            outer.wait(timeout=5)
        for pid in (root, init and init.pid, outer.pid):
            if pid in ours:
                ours.remove(pid)
        shutil.rmtree(work, ignore_errors=True)


def wait_init(outer: subprocess.Popen, mib: int) -> psutil.Process:
    """unshare's child, the python3 that is PID 1 of the new namespace, once its RSS is the size."""
    deadline = time.monotonic() + ready_timeout(mib)
    last = None
    while True:
        if outer.poll() is not None:
            raise RuntimeError(f"unshare exited with status {outer.returncode} before the job was ready")
        children = psutil.Process(outer.pid).children()
        if children:
            init = children[0]
            with contextlib.suppress(psutil.Error):
                rss = init.memory_info().rss
                if rss >= mib * MIB and init.name().startswith("python"):
                    if last is not None and abs(rss - last) <= 0.01 * last:
                        nspid = next(line.split()[1:] for line in Path(f"/proc/{init.pid}/status").read_text()
                                     .splitlines() if line.startswith("NSpid:"))
                        if nspid[-1] != "1":
                            raise RuntimeError(f"the baseline's python3 is not its namespace's init: NSpid {nspid}")
                        return init
                    last = rss
        if time.monotonic() > deadline:
            raise RuntimeError(f"the baseline's {mib} MiB process did not reach its size in {ready_timeout(mib):.0f} s")
        time.sleep(0.1)


# -- figures ---------------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def show_run(mib: int, i: int, mig: dict, base: dict) -> None:
    if "error" in mig:
        print(f"size_{mib}MiB run {i + 1}: MIGRATION FAILED ({mig['total_s']:.2f} s): {mig['error']}")
        return
    split = (f"dump {mig['dump_s']:.2f}, transfer {mig['transfer_s']:.2f}, restore {mig['restore_s']:.2f}"
             if "dump_s" in mig else "no breakdown logged")
    print(f"size_{mib}MiB run {i + 1}: migrate total {mig['total_s']:.2f} s (daemon {mig.get('daemon_total_s', 0):.2f}: "
          f"{split}); raw dump {base['dump_s']:.2f} + restore {base['restore_s']:.2f} = {base['sum_s']:.2f} s "
          f"(frozen {base['frozen_s']:.3f}, images {base['image_mib']:.0f} MiB); RSS {mig['rss_before_mib']:.0f} -> "
          f"{mig.get('rss_after_mib', float('nan')):.0f} MiB on node {(mig.get('after') or {}).get('node')}"
          f"{'' if mig.get('verified') else ' NOT VERIFIED'}; daemons' peak RSS "
          + ", ".join(f"{k} {v:.0f} MiB" for k, v in mig["daemon_rss_peak_mib"].items()))


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(mib: int, fig: dict) -> None:
    base = fig["baseline"]
    migs = [m for m in fig["migrations"] if "error" not in m]      # a failed migration has no figures
    s = {key: median_of(migs, key) for key in ("total_s", "daemon_total_s", "dump_s", "transfer_s", "restore_s")}
    s.update({f"raw_{key}": median_of(base, key) for key in ("dump_s", "restore_s", "sum_s", "frozen_s", "image_mib")})
    s["downtime_s"] = s["total_s"]
    s["ratio_total_vs_raw_dump_restore"] = ratio(s["total_s"], s["raw_sum_s"])
    # What the cluster adds to the raw dump and restore: the transfer, the command, the daemons.
    s["beyond_raw_s"] = s["total_s"] - s["raw_sum_s"] if s["total_s"] is not None and s["raw_sum_s"] else None
    s["total_MBps"] = mib * MIB / 1e6 / s["total_s"] if s["total_s"] else None
    s["all_verified"] = all(m.get("verified") for m in fig["migrations"])
    fig["median"] = s
    n = len(migs)
    label = f"median of {n}" if n > 1 else "1 run"
    def f(x, fmt=".2f"):
        return "?" if x is None else format(x, fmt)
    def runs(items, key):
        return "" if len(items) < 2 else f" (runs {', '.join(f(r[key]) for r in items)})"
    print(f"migrate_{mib}MiB ({label}): total {f(s['total_s'])} s{runs(migs, 'total_s')} = downtime (the job does "
          f"not run from the dump's start to the restore's end): dump {f(s['dump_s'])} + transfer "
          f"{f(s['transfer_s'])} + restore {f(s['restore_s'])} s; {f(s['total_MBps'], '.0f')} MB/s of job moved")
    print(f"raw_criu_{mib}MiB ({label}, one node, images in /tmp): dump {f(s['raw_dump_s'])} s + restore "
          f"{f(s['raw_restore_s'])} s = {f(s['raw_sum_s'])} s{runs(base, 'sum_s')} (frozen {f(s['raw_frozen_s'], '.3f')} s, images "
          f"{f(s['raw_image_mib'], '.0f')} MiB) -> ratio migrate total / (dump + restore) "
          f"{f(s['ratio_total_vs_raw_dump_restore'])}x, {f(s['beyond_raw_s'])} s beyond them"
          f"{'' if s['all_verified'] else '; NOT ALL MIGRATIONS VERIFIED'}")


if __name__ == "__main__":
    sys.exit(main())
