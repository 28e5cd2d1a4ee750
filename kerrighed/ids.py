"""Node ids, node lists and global PIDs: the numbering users see."""

from __future__ import annotations

from kerrighed.errors import UsageError

MAX_NODE_ID = 1023      # Kerrighed stopped at 255; the global PID leaves 10 bits for the node
_LOCAL_BITS = 21


def parse_node_list(text: str) -> list[int]:
    """Kerrighed's node list: `2,3,6-10` -> [2, 3, 6, 7, 8, 9, 10] (sorted, no duplicates)."""
    nodes: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        lo_s, dash, hi_s = item.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if dash else lo
        except ValueError:
            raise UsageError(f"invalid node list {text!r}: expected ids and ranges like 2,3,6-10") from None
        if lo > hi:
            raise UsageError(f"invalid node range {item!r}: {lo} > {hi}")
        for n in (lo, hi):
            if not 0 <= n <= MAX_NODE_ID:
                raise UsageError(f"invalid node id {n}: must be 0..{MAX_NODE_ID}")
        nodes.update(range(lo, hi + 1))
    return sorted(nodes)


def format_node_list(nodes) -> str:
    return ",".join(str(n) for n in sorted(nodes))


def make_gpid(node: int, local: int) -> int:
    """Kerrighed's global PID: `(node << 22) | (1 << 21) | local`."""
    return (node << (_LOCAL_BITS + 1)) | (1 << _LOCAL_BITS) | (local & ((1 << _LOCAL_BITS) - 1))


def gpid_node(gpid: int) -> int:
    return gpid >> (_LOCAL_BITS + 1)
