"""What every benchmark of a local cluster needs: the real krgadm without our environment's KRG_*
variables, a clean stop, and facts about the machine to print beside the figures."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import psutil

from kerrighed import localcluster
from kerrighed.config import Home

KRGADM = Path(sys.executable).parent / "krgadm"
# A benchmark talks to its own cluster only, whatever the calling shell points at.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("KRG_")}


def krgadm(home: Home, *args: str) -> None:
    r = subprocess.run([str(KRGADM), "--home", str(home.path), *args], env=CLEAN_ENV, capture_output=True,
                       text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"krgadm {' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}".strip())


def stop_cluster(home: Home) -> None:
    """`krgadm cluster stop` (which ends the jobs too), then stop whatever daemon still runs."""
    try:
        krgadm(home, "cluster", "stop")
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"krgadm cluster stop: {e}")
    for n in localcluster.running_nodes(home):
        localcluster.stop_daemon(home, n)


def other_daemons(home: Home) -> int:
    """Daemons of other clusters on this machine (tests run beside us share the CPUs and disk)."""
    r = subprocess.run(["pgrep", "-f", "kerrighed.daemon"], capture_output=True, text=True, timeout=10)
    mine = set(subprocess.run(["pgrep", "-f", str(home.path)], capture_output=True, text=True,
                              timeout=10).stdout.split())
    return len(set(r.stdout.split()) - mine)


def filesystem_of(path: str) -> str:
    best = ("", "?")
    for part in psutil.disk_partitions(all=True):
        if path.startswith(part.mountpoint) and len(part.mountpoint) > len(best[0]):
            best = (part.mountpoint, part.fstype)
    return best[1]


class RssSampler(threading.Thread):
    """Peak resident set size (bytes) of some processes, sampled until stopped."""

    def __init__(self, pids: dict[str, int], interval: float = 0.02):
        super().__init__(daemon=True)
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = {name: 0 for name in pids}
        self.interval = interval
        self.done = threading.Event()

    def sample(self) -> None:
        for name, proc in self.procs.items():
            with contextlib.suppress(psutil.Error):
                self.peak[name] = max(self.peak[name], proc.memory_info().rss)

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()

    def stop(self) -> dict[str, int]:
        self.done.set()
        self.join(5)
        return self.peak


def write_results(results: dict, problems: list[str], out: Path) -> int:
    """The JSON beside the printed figures, the problems last; the benchmark's exit status."""
    results["problems"] = problems
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {out} ({results['duration_s']:.0f} s)")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0
