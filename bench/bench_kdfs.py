"""Benchmark of KDFS: sequential and random I/O and metadata rates beside local disk and a minimal
pyfuse3 passthrough, and the time KDFS takes to re-replicate after a node loss.

Targets (`--targets`, default all):
- local: a directory on the file system that holds the nodes' disks (the cluster homes are made
  under /tmp; the run checks that the directory is on the same device);
- passthrough: bench/passthrough_fs.py serving a local directory of that file system, mounted beside
  it (the floor any Python FUSE file system pays: writeback cache, keep_cache, 1 s timeouts,
  read-ahead 1 MiB);
- kdfs-r1, kdfs-r2: a local cluster of 3 nodes started by the project's own `krgadm cluster start
  --local 3 --port P` in a temporary home, with `[kdfs] replicas = 1` or 2 in its cluster.toml; the
  figures are taken in its mount (`<home>/kdfs`, type fuse.kdfs). `kdfs` alone means both;
- rereplicate: a local cluster of 4 nodes with replicas = 2; SIZE is written (fsync'ed), and once
  every chunk has its 2 copies, the daemon of the node (not the leader, node 1) that holds the most
  copies of it is killed with SIGKILL. Measured: from the kill until KDFS reports no chunk with fewer
  than 2 copies on live nodes (`kdfs fsck --json`, polled), then the file is read back and checked.

Each target gets, in this order:
- sequential write of SIZE (default 1 GiB) in blocks of 1 MiB (os.write), then fsync and close: all
  in the write time. Every 1 MiB block is random bytes with its index in its first 8 bytes, so no two
  blocks (and no two chunks) are alike;
- `sync; echo 3 > /proc/sys/vm/drop_caches`, then a sequential read of the file in 1 MiB blocks
  (cold: neither the kernel's page cache of the mount nor that of the disk under it holds it; a
  file system's own cache in its user-space process is not dropped), every block compared;
- the same drop, then random 4 KiB reads (os.pread, 4 KiB-aligned, each page at most once, the same
  pages in the same order on every target; 20,000 of them, 2,000 with --quick), every one compared;
- metadata, in a fresh directory: create (O_CREAT|O_EXCL, close) of N files (10,000; 2,000 with
  --quick), then `sync; echo 2 > drop_caches` (dentries and inodes: every stat is a lookup, on FUSE
  a round trip), stat of each, unlink of each, in ops/s. On ext4 without a journal, inodes freed in
  the last minutes are skipped (slowly) by the next creates in their block group: for the targets
  on the local file system, the fresh directory is made under a directory with `chattr +T` (Orlov
  spreads its subdirectories over the block groups) and re-made until it lands in a flex group where
  this run freed no inode (PLATFORM.md, "FUSE").
The local baseline is measured again right before every other target (paired: the ratio of a target
uses the local figures taken just before it, so that other work on the machine weighs on both);
the passthrough, measured once, is the second reference.

Every mount, cluster and file of the run is removed at the end, also on failure, and checked: a
fuse mount left under the run's directories or a daemon of its homes makes the run fail.

    .venv/bin/python bench/bench_kdfs.py [--quick] [--size MiB] [--targets local,passthrough,kdfs,rereplicate]
"""

from __future__ import annotations

import argparse
import contextlib
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
import traceback
from pathlib import Path

import psutil

from kerrighed import localcluster
from kerrighed import protocol as p
from kerrighed.client import Client
from kerrighed.config import Home, KdfsConfig
from kerrighed.errors import KrgError

from _harness import CLEAN_ENV, filesystem_of, krgadm, other_daemons, stop_cluster, write_results

MIB = 1 << 20
GIB = 1 << 30
BLOCK = MIB                     # sequential I/O block
PAGE = 4096                     # random read size
SIZE_MIB = 1024
QUICK_SIZE_MIB = 128
RANDOM_READS, QUICK_RANDOM_READS = 20_000, 2_000
META_FILES, QUICK_META_FILES = 10_000, 2_000
SEED = 5                        # the random pages: the same on every target
NODES = 3                       # the cluster of the I/O and metadata figures
REPL_NODES, REPL_R = 4, 2       # the cluster of the re-replication
MOUNT_WAIT = 60.0               # s for a mount to show in /proc/mounts
REPL_WAIT = 600.0               # s for every chunk to be back at REPL_R copies
ALL_TARGETS = ("local", "passthrough", "kdfs-r1", "kdfs-r2", "rereplicate")
BIN = Path(sys.executable).parent
KDFS = BIN / "kdfs"
PASSTHROUGH = Path(__file__).resolve().parent / "passthrough_fs.py"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "kdfs.json"
FLEX_GROUP = 16                 # ext4's default flex_bg size: new files go to the first group of
                                # their directory's flex group that has a free inode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, help=f"file size in MiB (default {SIZE_MIB}, {QUICK_SIZE_MIB} with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK_SIZE_MIB} MiB, {QUICK_RANDOM_READS} random reads, {QUICK_META_FILES} files")
    ap.add_argument("--random-reads", type=int, help=f"random 4 KiB reads (default {RANDOM_READS})")
    ap.add_argument("--files", type=int, help=f"files of the metadata figures (default {META_FILES})")
    ap.add_argument("--targets", default="all", help=f"comma-separated subset of {','.join(ALL_TARGETS)} "
                    "('kdfs' = kdfs-r1,kdfs-r2; default all)")
    ap.add_argument("--runs", type=int, default=1, help="runs per target, each with its local baseline (medians; default 1)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = ap.parse_args()
    targets = parse_targets(args.targets)
    size = (args.size or (QUICK_SIZE_MIB if args.quick else SIZE_MIB)) * MIB
    reads = args.random_reads or (QUICK_RANDOM_READS if args.quick else RANDOM_READS)
    files = args.files or (QUICK_META_FILES if args.quick else META_FILES)
    reads = min(reads, size // PAGE)
    if os.geteuid() != 0:
        print("bench_kdfs: needs root (drop_caches, mounts)", file=sys.stderr)
        return 2

    run = Run(size, reads, files, args.runs)
    t0 = time.monotonic()
    try:
        run.measure(targets)
    except Exception as e:
        traceback.print_exc()
        run.problems.append(f"the benchmark failed: {type(e).__name__}: {e}")
    finally:
        leftovers = run.clean_up()
    run.results["duration_s"] = round(time.monotonic() - t0, 1)
    if leftovers:
        run.problems.append("left behind after cleanup: " + "; ".join(leftovers))
        print("CLEANUP FAILED:\n  " + "\n  ".join(leftovers))
    else:
        print("cleanup: no mount, daemon or file of this run left")
    return write_results(run.results, run.problems, args.out)


def parse_targets(text: str) -> list[str]:
    if text == "all":
        return list(ALL_TARGETS)
    wanted = set()
    for t in filter(None, (t.strip() for t in text.split(","))):
        if t == "kdfs":
            wanted |= {"kdfs-r1", "kdfs-r2"}
        elif t in ALL_TARGETS:
            wanted.add(t)
        else:
            raise SystemExit(f"bench_kdfs: unknown target {t!r} (known: {', '.join(ALL_TARGETS)}, kdfs, all)")
    return [t for t in ALL_TARGETS if t in wanted]


# -- the run ------------------------------------------------------------------------------------------------


class Run:
    def __init__(self, size: int, reads: int, files: int, repeats: int):
        self.size, self.reads, self.files, self.repeats = size, reads, files, repeats
        self.problems: list[str] = []
        # Everything of the run lives under one directory of /tmp (the cluster homes too: Unix socket
        # paths must stay short). Its subdirectories are spread over ext4's block groups.
        self.scratch = Path(tempfile.mkdtemp(prefix="krgbench-kdfs-", dir="/tmp"))
        self.scratch.chmod(0o755)
        self.topdir = chattr_topdir(self.scratch)
        self.freed_flex: set[int] = set()   # ext4 flex groups where this run freed inodes
        self.live: list[Target] = []        # started, not yet stopped
        self.block = bytearray(os.urandom(BLOCK))
        self.pages = random.Random(SEED).sample(range(size // PAGE), reads)
        self.results: dict = {
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "size_bytes": size, "block_bytes": BLOCK, "random_read_bytes": PAGE, "random_reads": reads,
            "meta_files": files, "runs_per_target": repeats, "targets": {},
        }

    def measure(self, targets: list[str]) -> None:
        self.results["machine"] = m = machine(self.scratch)
        print(f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['mem_available_mib'] / 1024:.1f} GiB available, "
              f"{m['scratch_free_mib'] / 1024:.0f} GiB free on {m['scratch_filesystem']} ({self.scratch}), "
              f"load average {m['loadavg_at_start'][0]:.2f}, {m['other_krgd_at_start']} daemons of other clusters, "
              f"pressure {show_pressure(m['pressure_at_start'])}")
        print(f"figures: {self.size / MIB:.0f} MiB sequential write (+fsync) and cold read in {BLOCK // 1024} KiB "
              f"blocks, {self.reads} cold random {PAGE // 1024} KiB reads, create/stat/unlink of {self.files} files; "
              f"caches dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before each read phase, dentries and "
              f"inodes (echo 2) before the stat phase; chattr +T on the local directories: {self.topdir}")
        need = self.size * 3 + 2 * GIB
        if m["scratch_free_mib"] * MIB < need:
            raise RuntimeError(f"{self.scratch} has {m['scratch_free_mib']} MiB free, the run needs {need >> 20} MiB")
        figures = self.results["targets"]
        others = [t for t in targets if t not in ("local", "rereplicate")]
        if "local" in targets and not others:
            figures["local"] = {"runs": [self.figures(Local(self), run=i) for i in range(self.repeats)]}
        for name in others:
            target = make_target(self, name)
            try:
                self.start(target)
            except Exception as e:
                print(f"{target.title}: FAILED to start: {e}")
                self.problems.append(f"{name}: could not start: {e}")
                figures[name] = {"error": f"start: {e}"}
                continue
            try:
                runs = []
                for i in range(self.repeats):
                    # The baseline right before the target: other work on the machine weighs on both.
                    if "local" in targets:
                        local = self.figures(Local(self), also=name, run=i)
                        figures.setdefault("local", {"runs": []})["runs"].append(local)
                    runs.append(self.figures(target, run=i))
                figures[name] = {"runs": runs, **target.facts()}
            except Exception as e:
                traceback.print_exc()
                logs = target.log_tails() if isinstance(target, Kdfs) else ""
                if logs:
                    print(f"{target.title}: logs at the failure: {logs}")
                self.problems.append(f"{name}: {type(e).__name__}: {e}")
                figures[name] = {"error": f"{type(e).__name__}: {e}", **({"logs": logs} if logs else {}),
                                 **({"runs": runs} if runs else {})}
            finally:
                self.stop(target)
        if "rereplicate" in targets:
            figures["rereplicate"] = self.rereplication()
        self.results["summary"] = summarize(figures)
        show_table(self.results["summary"], self.size)
        self.results["machine"]["loadavg_at_end"] = os.getloadavg()
        self.results["machine"]["pressure_at_end"] = stalls = pressure()
        print(f"machine at the end: load average {os.getloadavg()[0]:.2f}, pressure {show_pressure(stalls)}")

    def start(self, target: Target) -> None:
        self.live.append(target)
        target.start()

    def stop(self, target: Target) -> None:
        try:
            target.stop()
        except Exception as e:
            self.problems.append(f"{target.name}: stop failed: {e}")
        finally:
            if target in self.live:
                self.live.remove(target)

    def clean_up(self) -> list[str]:
        for target in reversed(self.live):
            with contextlib.suppress(Exception):
                target.stop()
        left = [f"fuse mount at {mp}" for mp in fuse_mounts_under(self.scratch)]
        for mp in fuse_mounts_under(self.scratch):
            subprocess.run(["umount", "-l", mp], capture_output=True, timeout=30)
        for home_dir in self.scratch.glob("home-*"):
            home = Home(home_dir)
            running = localcluster.running_nodes(home)
            if running:
                left.append(f"daemons of nodes {running} in {home_dir}")
                stop_cluster(home)
        # Processes of a stopped cluster (its mount, shepherds) take a moment to go: wait, boundedly.
        deadline = time.monotonic() + 15
        while (procs := processes_of(self.scratch)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for proc in procs:
            left.append(f"process {proc.pid} {' '.join(proc.info['cmdline'] or ())[:120]}")
            with contextlib.suppress(psutil.Error):
                proc.kill()
        shutil.rmtree(self.scratch, ignore_errors=True)
        if self.scratch.exists():
            left.append(f"directory {self.scratch}")
        return left

    # -- one target's figures --------------------------------------------------------------------------

    def figures(self, target: Target, also: str | None = None, run: int = 0) -> dict:
        label = target.title + (f" (baseline before {also})" if also else "") + (
            f" run {run + 1}" if self.repeats > 1 else "")
        workdir = target.workdir()
        fig: dict = {"baseline_for": also} if also else {}
        path = workdir / "bench.dat"
        try:
            fig.update(self.sequential_write(path))
            fig.update(self.sequential_read(path))
            fig.update(self.random_read(path))
        finally:
            with contextlib.suppress(OSError):      # a broken mount must not hide why it broke
                path.unlink()
        show_io(label, fig)
        fig.update(self.metadata(target))
        show_meta(label, fig)
        return fig

    def sequential_write(self, path: Path) -> dict:
        os.sync()
        blocks = self.size // BLOCK
        buf = self.block
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for i in range(blocks):
                buf[:8] = i.to_bytes(8, "little")
                view = memoryview(buf)
                while view:
                    view = view[os.write(fd, view):]
            t_written = time.perf_counter()
            os.fsync(fd)
        finally:
            os.close(fd)
        t = time.perf_counter() - t0
        return {"write_s": t, "write_MBps": self.size / 1e6 / t, "write_fsync_close_s": time.perf_counter() - t_written}

    def sequential_read(self, path: Path) -> dict:
        drop_caches(3)
        buf = bytearray(BLOCK)
        bad, total, i = 0, 0, 0
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
                if n != BLOCK or buf[:8] != i.to_bytes(8, "little") or buf[8:] != self.block[8:]:
                    bad += 1
                i += 1
        t = time.perf_counter() - t0
        if total != self.size or bad:
            self.problems.append(f"{path}: read back {total} bytes of {self.size}, {bad} blocks not as written")
        return {"read_s": t, "read_MBps": self.size / 1e6 / t, "read_bad_blocks": bad}

    def random_read(self, path: Path) -> dict:
        drop_caches(3)
        bad = 0
        fd = os.open(path, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            for page in self.pages:
                off = page * PAGE
                data = os.pread(fd, PAGE, off)
                o = off % BLOCK
                if o == 0:
                    ok = data[:8] == (off // BLOCK).to_bytes(8, "little") and data[8:] == self.block[8:PAGE]
                else:
                    ok = data == self.block[o:o + PAGE]
                bad += not ok
            t = time.perf_counter() - t0
        finally:
            os.close(fd)
        if bad:
            self.problems.append(f"{path}: {bad} of {self.reads} random {PAGE}-byte reads not as written")
        return {"random_s": t, "random_iops": self.reads / t, "random_MBps": self.reads * PAGE / 1e6 / t,
                "random_bad": bad}

    def metadata(self, target: Target) -> dict:
        d = target.fresh_dir()
        names = [os.path.join(d, f"f{i:05d}") for i in range(self.files)]
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        t0 = time.perf_counter()
        for name in names:
            os.close(os.open(name, flags, 0o644))
        create = time.perf_counter() - t0
        drop_caches(2)
        inodes = []
        t0 = time.perf_counter()
        for name in names:
            inodes.append(os.stat(name).st_ino)
        stat_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for name in names:
            os.unlink(name)
        unlink = time.perf_counter() - t0
        os.rmdir(d)
        if target.on_ext4:
            self.freed_flex |= {flex_of(ino) for ino in inodes}
        n = self.files
        return {"create_per_s": n / create, "stat_per_s": n / stat_s, "unlink_per_s": n / unlink,
                "meta_dir_flex_group": target.last_flex}

    # -- re-replication --------------------------------------------------------------------------------

    def rereplication(self) -> dict:
        target = Kdfs(self, REPL_R, REPL_NODES, name="rereplicate")
        try:
            self.start(target)
        except Exception as e:
            print(f"{target.title}: FAILED to start: {e}")
            self.problems.append(f"rereplicate: could not start: {e}")
            return {"error": f"start: {e}"}
        try:
            return self.rereplicate(target)
        except Exception as e:
            traceback.print_exc()
            self.problems.append(f"rereplicate: {type(e).__name__}: {e}")
            return {"error": f"{type(e).__name__}: {e}", "logs": target.log_tails()}
        finally:
            self.stop(target)

    def rereplicate(self, target: Kdfs) -> dict:
        path = target.workdir() / "bench.dat"
        fig: dict = {"nodes": REPL_NODES, "replicas": REPL_R}
        fig.update(self.sequential_write(path))
        t0 = time.monotonic()
        polls = target.wait_replicated(path, REPL_WAIT)
        fig["settle_s"] = time.monotonic() - t0
        fig["chunks"] = polls[-1]["chunks"]
        holders = target.copies_per_node(path)
        fig["copies_per_node_before"] = holders
        leader = min(target.online())
        candidates = {n: c for n, c in holders.items() if n != leader}
        if not candidates:
            raise RuntimeError(f"no node but the leader (node {leader}) holds copies of {path}: {holders}")
        victim = max(candidates, key=lambda n: (candidates[n], n))
        pid = localcluster.daemon_pid(target.home, victim)
        if pid is None:
            raise RuntimeError(f"node {victim} has no running daemon")
        print(f"{target.title}: {self.size / MIB:.0f} MiB written in {fig['write_s']:.2f} s "
              f"({fig['write_MBps']:.0f} MB/s), {fig['chunks']} chunks all at {REPL_R} copies {fig['settle_s']:.1f} s "
              f"later; copies per node {holders}")
        t0 = time.monotonic()
        fig["fsck_before"] = fsck = target.fsck()
        fig["fsck_before_s"] = time.monotonic() - t0
        print(f"{target.title}: before the kill, {fsck['through']} ({fig['fsck_before_s']:.1f} s): {show_fsck(fsck)}")
        self.judge_fsck("before the kill", fsck)
        print(f"{target.title}: kill -9 of node {victim}'s daemon (pid {pid}; it holds the most copies, "
              f"node {leader} leads)")
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        polls = target.wait_replicated(path, REPL_WAIT, victim=victim, since=t_kill)
        fig["rereplicate_s"] = polls[-1]["t"]
        fig["detected_s"] = next((q["t"] for q in polls if victim not in q["online"]), None)
        fig["polls"] = polls
        fig["victim"], fig["lost_copies"] = victim, holders[victim]
        fig["lost_bytes"] = min(holders[victim] * target.chunk_size, self.size)
        fig["rereplicate_MBps"] = fig["lost_bytes"] / 1e6 / fig["rereplicate_s"]
        fig["copy_MBps_after_detection"] = fig["lost_bytes"] / 1e6 / max(fig["rereplicate_s"] - fig["detected_s"], 1e-3)
        fig["copies_per_node_after"] = target.copies_per_node(path)
        print(f"{target.title}: every chunk back at {REPL_R} copies on live nodes {fig['rereplicate_s']:.1f} s after "
              f"the kill (node {victim} seen down after {fig['detected_s']:.1f} s; {fig['lost_copies']} copies, "
              f"{fig['lost_bytes'] / MIB:.0f} MiB, re-created: {fig['rereplicate_MBps']:.0f} MB/s from the kill, "
              f"{fig['copy_MBps_after_detection']:.0f} MB/s once detected); "
              f"copies per node now {fig['copies_per_node_after']} (node {victim}'s, down, still listed)")
        t0 = time.monotonic()
        fsck = target.fsck()
        fig["fsck_after_s"] = time.monotonic() - t0
        fig["fsck_after"] = fsck
        fig.update({f"verify_{k}": v for k, v in self.sequential_read(path).items()})
        print(f"{target.title}: then {fsck['through']} ({fig['fsck_after_s']:.1f} s): {show_fsck(fsck)}; the file "
              f"read back {'intact' if not fig['verify_read_bad_blocks'] else 'DAMAGED'} at "
              f"{fig['verify_read_MBps']:.0f} MB/s (cold)")
        self.judge_fsck("after re-replication", fsck)
        return fig

    def judge_fsck(self, when: str, fsck: dict) -> None:
        """Copies missing, corrupt or short: a problem of the run. Orphan copies (no file references
        them: garbage, no data at risk) are only shown."""
        serious = [q for q in fsck.get("problems", []) if q.get("kind") != "orphan"]
        if serious:
            self.problems.append(f"rereplicate: kdfs fsck {when}: {show_fsck(fsck)}: {serious[:5]}")


def show_fsck(fsck: dict) -> str:
    kinds: dict[str, int] = {}
    for q in fsck.get("problems", []):
        kinds[q.get("kind", "?")] = kinds.get(q.get("kind", "?"), 0) + q.get("count", 1)
    nodes = {}
    for q in fsck.get("problems", []):
        if q.get("kind") == "orphan":
            nodes[q.get("node")] = q.get("count", 1)
    head = "ok" if fsck.get("ok") else "NOT ok"
    return (f"{head}, {fsck.get('chunks')} chunks on nodes {fsck.get('nodes')}"
            + (f", {', '.join(f'{n} {k}' for k, n in kinds.items())} (orphan copies per node: {nodes})" if kinds else ""))


# -- targets ------------------------------------------------------------------------------------------------


class Target:
    name = "?"
    title = "?"
    on_ext4 = False             # its files are inodes of the local file system

    def __init__(self, run: Run):
        self.run = run
        self.last_flex: int | None = None

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def workdir(self) -> Path: raise NotImplementedError
    def facts(self) -> dict: return {}

    def fresh_dir(self) -> str:
        d = self.workdir() / f"meta-{time.monotonic_ns()}"
        d.mkdir()
        return str(d)


class Local(Target):
    name, title, on_ext4 = "local", "local disk", True

    def workdir(self) -> Path:
        d = self.run.scratch / "local"
        d.mkdir(exist_ok=True)
        return d

    def fresh_dir(self) -> str:
        d, self.last_flex = fresh_ext4_dir(self.run.scratch, self.run.freed_flex)
        return str(d)


class Passthrough(Target):
    name, title, on_ext4 = "passthrough", "pyfuse3 passthrough", True

    def __init__(self, run: Run):
        super().__init__(run)
        self.source = run.scratch / "passthrough-source"
        self.mnt = run.scratch / "passthrough-mnt"
        self.proc: subprocess.Popen | None = None
        self.banner = ""

    def start(self) -> None:
        self.source.mkdir()
        chattr_topdir(self.source)
        self.log = open(self.run.scratch / "passthrough.log", "wb")
        self.mnt.mkdir()
        self.proc = subprocess.Popen([sys.executable, str(PASSTHROUGH), str(self.source), str(self.mnt)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, start_new_session=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], MOUNT_WAIT)
        self.banner = self.proc.stdout.readline().strip() if ready else ""
        if not self.banner.startswith("mounted") or not is_mounted(self.mnt, "fuse.passthrough"):
            raise RuntimeError(f"passthrough_fs.py did not mount in {MOUNT_WAIT:g} s (exit {self.proc.poll()}): "
                               f"{(self.run.scratch / 'passthrough.log').read_text()[-500:]}")
        print(f"{self.title}: {self.banner}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("passthrough_fs.py ignored SIGTERM for 60 s: killed")
        finally:
            self.proc.stdout.close()
            self.log.close()
            self.proc = None
        if is_mounted(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, timeout=30)
            raise RuntimeError(f"passthrough_fs.py exited but left {self.mnt} mounted")

    def workdir(self) -> Path:
        return self.mnt

    def fresh_dir(self) -> str:
        # Made on the source (where ext4 places it), used through the mount.
        d, self.last_flex = fresh_ext4_dir(self.source, self.run.freed_flex)
        return str(self.mnt / d.name)

    def facts(self) -> dict:
        return {"mount": self.banner}


class Kdfs(Target):
    """A local cluster of `nodes` daemons with `[kdfs] replicas = r`, started by krgadm."""

    def __init__(self, run: Run, replicas: int, nodes: int, name: str | None = None):
        super().__init__(run)
        self.replicas, self.nodes = replicas, nodes
        self.name = name or f"kdfs-r{replicas}"
        self.title = f"KDFS R={replicas} ({nodes} nodes)" if name is None else f"KDFS re-replication ({nodes} nodes, R={replicas})"
        self.home = Home(run.scratch / f"home-{self.name}")
        self.mountpoint: Path | None = None
        self.chunk_size = 4 * MIB
        self.started = False
        self.same_device: bool | None = None

    def start(self) -> None:
        self.home.path.mkdir(mode=0o755)
        port = localcluster.free_port([localcluster.local_address(n) for n in range(1, self.nodes + 1)],
                                      prefer_default=False)
        cfg = localcluster.ensure_config(self.home, self.nodes, port=port, kdfs=KdfsConfig(replicas=self.replicas))
        self.chunk_size = cfg.kdfs.chunk_size
        self.mountpoint = self.home.kdfs_mountpoint(cfg)
        args = ["cluster", "start", "--local", str(self.nodes), "--port", str(port)]
        self.started = True
        t0 = time.monotonic()
        krgadm(self.home, *args)        # returns once the mount is there
        if not is_mounted(self.mountpoint, "fuse.kdfs"):
            raise RuntimeError(f"no fuse.kdfs mount at {self.mountpoint} after `krgadm {' '.join(args)}`; "
                               f"{self.log_tails()}")
        toml = self.home.load_config().kdfs
        disk, local = self.home.kdfs_disk(1), self.run.scratch
        self.same_device = disk.exists() and os.stat(disk).st_dev == os.stat(local).st_dev
        if not self.same_device:
            print(f"{self.title}: NOTE: node 1's disk {disk} is not on the file system of the local baseline ({local})")
        if toml.replicas != self.replicas:
            raise RuntimeError(f"cluster.toml says replicas = {toml.replicas} after cluster start, not {self.replicas}")
        print(f"{self.title}: `krgadm {' '.join(args)}` and the fuse.kdfs mount at {self.mountpoint} in "
              f"{time.monotonic() - t0:.1f} s; [kdfs] replicas = {toml.replicas}, chunk_size = {toml.chunk_size >> 20} MiB")

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        problems = []
        try:
            krgadm(self.home, "cluster", "poweroff")
        except Exception as e:
            problems.append(f"krgadm cluster poweroff: {e}")
        deadline = time.monotonic() + 30
        while self.mountpoint and is_mounted(self.mountpoint) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.mountpoint and is_mounted(self.mountpoint):
            problems.append(f"{self.mountpoint} still mounted 30 s after `krgadm cluster poweroff`")
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True, timeout=30)
        running = localcluster.running_nodes(self.home)
        if running:
            problems.append(f"daemons of nodes {running} still running after `krgadm cluster poweroff`")
        stop_cluster(self.home)
        if problems:
            raise RuntimeError("; ".join(problems))

    def workdir(self) -> Path:
        assert self.mountpoint is not None
        d = self.mountpoint / "bench"
        d.mkdir(exist_ok=True)
        return d

    def facts(self) -> dict:
        try:
            if KDFS.exists():
                df = self.kdfs_json("df")
            else:
                from kdfs.client import KdfsClient

                with KdfsClient(self.home, timeout=30) as c:
                    df = c.status()
        except Exception as e:
            df = f"kdfs df: {e}"
        return {"nodes": self.nodes, "replicas": self.replicas, "chunk_size": self.chunk_size, "df": df,
                "node_disks_on_baseline_fs": self.same_device}

    # -- the kdfs command ------------------------------------------------------------------------------

    def kdfs(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {**CLEAN_ENV, "KRG_HOME": str(self.home.path)}
        return subprocess.run([str(KDFS), *args], env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def kdfs_json(self, *args: str) -> object:
        r = self.kdfs(*args, "--json")
        if r.returncode not in (0, 1) or not r.stdout.strip():
            raise RuntimeError(f"kdfs {' '.join(args)} --json exited {r.returncode}: {(r.stdout + r.stderr).strip()[-500:]}")
        try:
            return json.loads(r.stdout)
        except json.JSONDecodeError as e:
            raise RuntimeError(f"kdfs {' '.join(args)} --json printed no JSON ({e}): {r.stdout[:300]}") from None

    def fsck(self) -> dict:
        """`kdfs fsck --json` (every copy on every online node read and checked); the client API's
        fsck() while the command is not installed."""
        if KDFS.exists():
            return {"through": "kdfs fsck --json", **self.kdfs_json("fsck")}
        from kdfs.client import KdfsClient

        with KdfsClient(self.home, timeout=600) as c:
            return {"through": f"KdfsClient.fsck() (no {KDFS} command)", **c.fsck()}

    def online(self) -> set[int]:
        """The nodes online, as a live daemon of the cluster sees them."""
        for n in localcluster.running_nodes(self.home):
            with contextlib.suppress(KrgError), Client(self.home.socket(n), timeout=10) as c:
                return {s["id"] for s in c.call(p.NodesStatus())["nodes"] if s["state"] == "online"}
        raise RuntimeError("no daemon of the cluster answers")

    def chunks(self, path: Path) -> list[dict]:
        """path's chunk map through the Python client API ({"idx", "id", "length", "nodes"})."""
        from kdfs.client import KdfsClient

        with KdfsClient(self.home, timeout=30) as c:
            return c.query("chunks", ino=os.stat(path).st_ino)

    def copies_per_node(self, path: Path) -> dict[int, int]:
        counts: dict[int, int] = {}
        for chunk in self.chunks(path):
            for n in chunk["nodes"]:
                counts[n] = counts.get(n, 0) + 1
        return dict(sorted(counts.items()))

    def wait_replicated(self, path: Path, timeout: float, victim: int | None = None,
                        since: float | None = None) -> list[dict]:
        """Poll (every 0.2 s) the chunk map of path and the membership until every chunk lists R
        holders among the online nodes (and, if given, `victim` is no longer online); the polls."""
        since = time.monotonic() if since is None else since
        deadline = time.monotonic() + timeout
        polls = []
        while True:
            online = self.online()
            chunks = self.chunks(path)
            want = min(self.replicas, len(online))
            under = sum(1 for c in chunks if len(set(c["nodes"]) & online) < want)
            polls.append({"t": round(time.monotonic() - since, 3), "online": sorted(online), "chunks": len(chunks),
                          "under_replicated": under})
            if under == 0 and victim not in online:
                return polls
            if time.monotonic() > deadline:
                raise RuntimeError(f"{under} of {len(chunks)} chunks of {path} still short of {want} copies on "
                                   f"online nodes {sorted(online)} after {timeout:g} s")
            time.sleep(0.2)

    def log_tails(self) -> str:
        """The last lines of every daemon's log and of the mount's."""
        out = []
        for n in self.home.local_nodes():
            for what, path in (("krgd", self.home.logfile(n)), ("mount", self.home.state_dir(n) / "kdfs-mount.log")):
                with contextlib.suppress(OSError):
                    lines = path.read_text(errors="replace").splitlines()[-8:]
                    if lines:
                        out.append(f"node {n} {what}: " + " | ".join(lines))
        return "; ".join(out) or "no daemon log"


def make_target(run: Run, name: str) -> Target:
    if name == "passthrough":
        return Passthrough(run)
    if name.startswith("kdfs-r"):
        return Kdfs(run, int(name.removeprefix("kdfs-r")), NODES)
    raise ValueError(name)


# -- the machine and its file system -------------------------------------------------------------------------


def machine(scratch: Path) -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    vm = psutil.virtual_memory()
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model, "mem_total_mib": vm.total >> 20,
            "mem_available_mib": vm.available >> 20, "scratch": str(scratch),
            "scratch_free_mib": shutil.disk_usage(scratch).free >> 20,
            "scratch_filesystem": filesystem_of(str(scratch)), "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_at_start": os.getloadavg(),
            "other_krgd_at_start": other_daemons(Home(scratch)), "pressure_at_start": pressure()}


def pressure() -> dict:
    """The kernel's pressure stall figures (share of the last 60 s some task waited for the CPU, for
    I/O): other work on the machine, which every figure here is sensitive to."""
    out = {}
    for what in ("cpu", "io"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            line = Path(f"/proc/pressure/{what}").read_text().splitlines()[0]
            out[f"{what}_some_avg60"] = float(line.split()[2].split("=")[1])
    return out


def show_pressure(stalls: dict) -> str:
    return "(some, 60 s): " + ", ".join(f"{k.split('_')[0]} {v:.0f} %" for k, v in stalls.items())


def drop_caches(what: int) -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text(f"{what}\n")


def chattr_topdir(path: Path) -> bool:
    """`chattr +T`: ext4's Orlov allocator spreads path's subdirectories over the block groups."""
    r = subprocess.run(["chattr", "+T", str(path)], capture_output=True, text=True, timeout=30)
    return r.returncode == 0


def inodes_per_group(path: Path) -> int | None:
    """ext4's inodes per block group of the file system holding path (statvfs's inode count over
    the group count that /proc/fs/ext4/<dev>/mb_groups lists), None if not ext4."""
    dev = os.stat(path).st_dev
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        major, minor = map(int, fields[2].split(":"))
        sep = fields.index("-")
        if os.makedev(major, minor) == dev and fields[sep + 1] == "ext4":
            name = os.path.basename(fields[sep + 2])
            try:
                groups = sum(1 for g in Path(f"/proc/fs/ext4/{name}/mb_groups").read_text().splitlines()
                             if g.startswith("#") and g[1:2].isdigit())
            except OSError:
                return None
            return os.statvfs(path).f_files // groups if groups else None
    return None


_IPG: list[int | None] = []


def flex_of(ino: int) -> int:
    if not _IPG:
        _IPG.append(inodes_per_group(Path("/tmp")))
    ipg = _IPG[0]
    return -1 if ipg is None else ino // (ipg * FLEX_GROUP)


def fresh_ext4_dir(parent: Path, avoid: set[int], tries: int = 40) -> tuple[Path, int]:
    """A new empty directory under parent (which has chattr +T) in a flex group where this run freed
    no inode; the directories that landed elsewhere are removed. Returns it and its flex group."""
    rejected = []
    try:
        for i in range(tries):
            d = parent / f"meta-{os.getpid()}-{time.monotonic_ns()}"
            d.mkdir()
            flex = flex_of(d.stat().st_ino)
            if flex not in avoid or i == tries - 1:
                return d, flex
            rejected.append(d)
        raise AssertionError("unreachable")
    finally:
        for d in rejected:
            d.rmdir()


def is_mounted(path: Path, fstype: str | None = None) -> bool:
    want = str(path).replace(" ", "\\040")
    with open("/proc/mounts") as f:
        return any(line.split()[1] == want and (fstype is None or line.split()[2] == fstype) for line in f)


def fuse_mounts_under(root: Path) -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f
                if line.split()[2].startswith("fuse") and line.split()[1].startswith(str(root) + "/")]


def processes_of(root: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid != os.getpid() and any(str(root) in a for a in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


# -- figures ---------------------------------------------------------------------------------------------------

METRICS = (("write_MBps", "seq write MB/s", ".0f"), ("read_MBps", "seq read MB/s", ".0f"),
           ("random_iops", "4K rand read/s", ".0f"), ("create_per_s", "creates/s", ".0f"),
           ("stat_per_s", "stats/s", ".0f"), ("unlink_per_s", "unlinks/s", ".0f"))


def medians(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k, _, _ in METRICS}


def summarize(figures: dict) -> dict:
    """Per target: the medians of its runs, of the local runs taken right before them and of the
    passthrough's, and the ratios."""
    out: dict = {}
    local_runs = figures.get("local", {}).get("runs", [])
    pt_runs = figures.get("passthrough", {}).get("runs")
    pt = medians(pt_runs) if pt_runs else None
    if local_runs:
        out["local"] = {"figures": medians(local_runs), "runs": len(local_runs),
                        "range": {k: [min(r[k] for r in local_runs), max(r[k] for r in local_runs)]
                                  for k, _, _ in METRICS}}
    for name, fig in figures.items():
        if name in ("local", "rereplicate"):
            continue
        if not fig.get("runs"):
            out[name] = {k: v for k, v in fig.items() if k == "error"}
            continue
        mine = medians(fig["runs"])
        row: dict = {"figures": mine, "runs": len(fig["runs"])}
        if "error" in fig:
            row["error"] = fig["error"]
        paired = [r for r in local_runs if r.get("baseline_for") == name]
        if paired:
            base = medians(paired)
            row["local_before"] = base
            row["vs_local"] = {k: mine[k] / base[k] for k, _, _ in METRICS}
        if pt and name != "passthrough":
            row["vs_passthrough"] = {k: mine[k] / pt[k] for k, _, _ in METRICS}
        out[name] = row
    if "rereplicate" in figures:
        r = figures["rereplicate"]
        out["rereplicate"] = ({k: r[k] for k in ("rereplicate_s", "lost_bytes", "rereplicate_MBps", "victim")}
                              if "rereplicate_s" in r else {k: v for k, v in r.items() if k == "error"})
    return out


def show_io(label: str, fig: dict) -> None:
    print(f"{label}: write {fig['write_MBps']:.0f} MB/s ({fig['write_s']:.2f} s, of which fsync+close "
          f"{fig['write_fsync_close_s']:.2f} s), cold read {fig['read_MBps']:.0f} MB/s ({fig['read_s']:.2f} s), "
          f"cold random 4 KiB reads {fig['random_iops']:.0f}/s ({fig['random_MBps']:.1f} MB/s)")


def show_meta(label: str, fig: dict) -> None:
    flex = fig.get("meta_dir_flex_group")
    print(f"{label}: {fig['create_per_s']:.0f} creates/s, {fig['stat_per_s']:.0f} stats/s, "
          f"{fig['unlink_per_s']:.0f} unlinks/s" + (f" (directory in ext4 flex group {flex})" if flex is not None else ""))


def show_table(summary: dict, size: int) -> None:
    width = 16
    head = f"{'':24}" + "".join(f"{title:>{width}}" for _, title, _ in METRICS)
    print(f"\nsummary ({size / MIB:.0f} MiB file; ratios: target / local disk measured just before it, and "
          f"target / passthrough):\n{head}")

    def line(label: str, values: dict, fmt: str | None = None) -> None:
        cells = "".join(f"{format(values[k], fmt or f):>{width}}" if values.get(k) is not None else f"{'-':>{width}}"
                        for k, _, f in METRICS)
        print(f"{label:24}{cells}")

    for name, row in summary.items():
        if name == "rereplicate":
            continue
        if "figures" not in row:
            print(f"{name:24}not measured: {row.get('error')}")
            continue
        line(name + (f" (median of {row['runs']})" if row.get("runs", 1) > 1 else ""), row["figures"])
        if "vs_local" in row:
            line("  x local", row["vs_local"], ".2g")
        if "vs_passthrough" in row:
            line("  x passthrough", row["vs_passthrough"], ".2g")
    r = summary.get("rereplicate")
    if r is not None:
        if "rereplicate_s" in r:
            print(f"re-replication after a node loss: {r['rereplicate_s']:.1f} s for {r['lost_bytes'] / MIB:.0f} MiB "
                  f"of lost copies ({r['rereplicate_MBps']:.0f} MB/s, node {r['victim']} killed)")
        else:
            print(f"re-replication: not measured: {r.get('error')}")


if __name__ == "__main__":
    sys.exit(main())
