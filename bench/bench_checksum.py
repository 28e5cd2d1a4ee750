"""Benchmark of KDFS's checksums and chunk store.

Measured in one process:
- CRC32C of 64 MiB: the C module (the SSE4.2 crc32 instruction when the CPU has it, and its table
  code), and the pure-Python fallback;
- ChunkStore with 4 MiB chunks of 64 KiB blocks, on both backends: put (without and with fsync),
  whole read, 64 KiB ranged read, verify. The files are read back from the page cache: these are
  the CPU costs of the store, not the disk's speed.

    .venv/bin/python bench/bench_checksum.py [--out FILE] [--dir DIR] [--chunks N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kdfs import checksum
from kdfs.chunkstore import ChunkStore

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "checksum.json"
MIB = 1 << 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    ap.add_argument("--dir", type=Path, default=None, help="where to put the chunk store (default: a temp dir)")
    ap.add_argument("--chunks", type=int, default=16, help="4 MiB chunks per native store run (default 16)")
    args = ap.parse_args()

    results = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"nproc": len(os.sched_getaffinity(0)), "kernel": platform.release(),
                    "python": platform.python_version(), "sse4.2": checksum.native_uses_sse42()},
        "crc32c_64mib_MBps": crc_figures(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="kdfs-bench-", dir=args.dir))
    try:
        results["chunkstore_4mib_MBps"] = store_figures(tmp, args.chunks)
    finally:
        shutil.rmtree(tmp)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.out}")
    return 0


def rate(nbytes: int, fn, runs: int) -> float:
    """Best-of-runs throughput in MB/s (10^6 bytes)."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(nbytes / min(times) / 1e6, 1)


def crc_figures() -> dict:
    data = os.urandom(64 * MIB)
    out = {}
    if checksum.native_available():
        checksum.select(True)
        out["native"] = rate(len(data), lambda: checksum.crc32c(data), 5)
        out["native_table"] = rate(len(data), lambda: checksum.native_table_crc32c(data), 3)
        out["native_block_crcs"] = rate(len(data), lambda: checksum.block_crcs(data), 5)
    out["python"] = rate(len(data), lambda: checksum.python_crc32c(data), 1)
    for name, value in out.items():
        print(f"crc32c 64 MiB {name:18} {value:10.1f} MB/s")
    return out


def store_figures(tmp: Path, chunks: int) -> dict:
    out = {}
    backends = (["native"] if checksum.native_available() else []) + ["python"]
    for backend in backends:
        checksum.select(backend == "native")
        n = chunks if backend == "native" else max(1, chunks // 8)
        store = ChunkStore(tmp / backend)
        blobs = {uuid.uuid4().hex: os.urandom(4 * MIB) for _ in range(n)}
        total = n * 4 * MIB

        def put(sync):
            for cid, data in blobs.items():
                store.put(cid, data, sync=sync)

        def ranged():
            for cid in blobs:
                for off in range(0, 4 * MIB, MIB):
                    store.read(cid, off + 1000, 65536)

        figures = {
            "put": rate(total, lambda: put(False), 3),
            "put_sync": rate(total, lambda: put(True), 1),
            "read": rate(total, lambda: [len(store.read(cid)) for cid in blobs], 3),
            "verify": rate(total, lambda: [store.verify(cid) for cid in blobs], 3),
            # 64 KiB reads not aligned on blocks (two blocks each): bytes returned per second.
            "read_64k_ranges": rate(n * 4 * 65536, ranged, 3),
        }
        out[backend] = figures
        for name, value in figures.items():
            print(f"chunkstore {backend:6} {name:16} {value:10.1f} MB/s")
    checksum.select()
    return out


if __name__ == "__main__":
    sys.exit(main())
