"""This node's figures, as every node publishes them in its heartbeats."""

from __future__ import annotations

import os

import psutil


def node_stats() -> dict:
    mem = psutil.virtual_memory()
    load1, load5, load15 = os.getloadavg()
    return {
        "cpus": psutil.cpu_count() or 1,
        "cpu_percent": psutil.cpu_percent(interval=None),   # since the previous call
        "load": [load1, load5, load15],
        "mem_total": mem.total,
        "mem_free": mem.available,
    }
