"""krg top: a live view of the whole cluster, refreshed every few seconds: per-node load bars and
the busiest jobs wherever they run. `q` quits; `-b` prints snapshots instead (for scripts, like
top's batch mode)."""

from __future__ import annotations

import curses
import time

from kerrighed import protocol as p
from kerrighed.cli._common import connect

BAR = 30


class Snapshot:
    """One refresh: node figures, and each job's CPU share since the previous refresh."""

    def __init__(self, info: dict, jobs: list[dict], previous: Snapshot | None):
        self.taken = time.monotonic()
        self.nodes = info["nodes"]
        self.jobs = jobs
        cpu_before = {j["gpid"]: j["cpu_time"] for j in previous.jobs} if previous else {}
        span = self.taken - previous.taken if previous else None
        for j in jobs:
            if span and j["gpid"] in cpu_before:
                j["cpu_percent"] = 100.0 * max(0.0, j["cpu_time"] - cpu_before[j["gpid"]]) / span
            else:
                elapsed = max(1e-3, time.time() - j["start_time"])
                j["cpu_percent"] = 100.0 * j["cpu_time"] / elapsed

    def lines(self, width: int, height: int) -> list[str]:
        online = [n for n in self.nodes if n["state"] == "online" and "cpus" in n]
        cpus = sum(n["cpus"] for n in online)
        load = sum(n["load"][0] for n in online)
        total = sum(n["mem_total"] for n in online)
        free = sum(n["mem_free"] for n in online)
        running = sum(1 for j in self.jobs if j["state"] not in ("exited", "lost"))
        out = [f"krg top - {time.strftime('%H:%M:%S')}  {len(online)} nodes online, {cpus} CPUs, "
               f"load {load:.2f}, mem {_gib(total - free)}/{_gib(total)}, {running} jobs",
               ""]
        for n in self.nodes:
            if "cpus" not in n:
                out.append(f"node {n['id']:>3} {n['state']:<8}")
                continue
            share = min(1.0, n["load"][0] / max(1, n["cpus"]))
            bar = "|" * round(share * BAR)
            out.append(f"node {n['id']:>3} {n['state']:<8} [{bar:<{BAR}}] load {n['load'][0]:5.2f} "
                       f"cpu {n['cpu_percent']:5.1f}% mem {_gib(n['mem_total'] - n['mem_free'])}/{_gib(n['mem_total'])}")
        out += ["", f"{'GPID':>10} {'NODE':>4} {'UID':>6} {'STATE':<9} {'%CPU':>6} {'RSS':>9}  COMMAND"]
        busiest = sorted(self.jobs, key=lambda j: (-j["cpu_percent"], j["gpid"]))
        for j in busiest[: max(0, height - len(out) - 1)]:
            out.append(f"{j['gpid']:>10} {j['node']:>4} {j['uid']:>6} {j['state'][:9]:<9} {j['cpu_percent']:>6.1f} "
                       f"{j['rss'] // 1024:>8}K  {' '.join(j['argv'])}")
        return [line[:width] for line in out]


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}G"


def take(args, previous: Snapshot | None) -> Snapshot:
    with connect(args) as c:
        return Snapshot(c.call(p.ClusterInfo()), c.call(p.ListJobs())["jobs"], previous)


def batch(args) -> int:
    snap = None
    for i in range(args.iterations):
        if i:
            time.sleep(args.delay)
        snap = take(args, snap)
        print("\n".join(snap.lines(200, 10_000)), end="\n\n", flush=True)
    return 0


def interactive(args) -> int:
    def loop(screen) -> None:
        curses.curs_set(0)
        screen.timeout(int(args.delay * 1000))
        snap = None
        while True:
            snap = take(args, snap)
            height, width = screen.getmaxyx()
            screen.erase()
            for y, line in enumerate(snap.lines(width - 1, height)):
                screen.addstr(y, 0, line)
            screen.refresh()
            if screen.getch() in (ord("q"), ord("Q")):
                return

    curses.wrapper(loop)
    return 0
