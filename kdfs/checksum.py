"""CRC32C of data and of each block of a chunk.

CRC32C is the Castagnoli CRC of iSCSI, ext4 and btrfs (reflected polynomial 0x82F63B78, initial
value and final xor 0xFFFFFFFF): `crc32c(b"123456789") == 0xE3069283`. A CRC continues a previous
one: `crc32c(a + b) == crc32c(b, crc32c(a))`.

Two backends behind one API:
- "native": kdfs._crc32c, csrc/crc32c.c built by cffi (`make native`); the SSE4.2 crc32
  instruction when the CPU has it, else a slicing-by-8 table. Calls release the GIL.
- "python": the pure-Python table code below (`python_crc32c`, `python_block_crcs`), used when
  the module is not built or when `KRG_NATIVE=python` is set. It is the tests' oracle.

The environment is read once, at import; `select()` switches the backend afterwards (tests run
both paths in one process). Data may be bytes, bytearray, memoryview or any buffer.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Callable

log = logging.getLogger(__name__)

BLOCK_SIZE = 64 * 1024

_POLY = 0x82F63B78
_MASK = 0xFFFFFFFF

Buffer = bytes | bytearray | memoryview


# ---- pure Python ---------------------------------------------------------------------------------


def _make_tables() -> tuple[list[int], ...]:
    """Slicing-by-8 tables: _T[0] is the classic byte table; _T[k][n] is the CRC register after n
    followed by k zero bytes, so eight table lookups advance the register by one 64-bit word."""
    t0 = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ (_POLY if c & 1 else 0)
        t0.append(c)
    tables = [t0]
    for _ in range(7):
        prev = tables[-1]
        tables.append([(prev[n] >> 8) ^ t0[prev[n] & 0xFF] for n in range(256)])
    return tuple(tables)


_T = _make_tables()
# The 64-bit words are read in native byte order: the word loop is right only on little-endian
# machines, elsewhere every byte goes through the byte loop.
_WORDS = sys.byteorder == "little"


def _bytes_view(data: Buffer) -> memoryview:
    """A flat unsigned-byte view of any buffer, without copying when it is already one."""
    mv = data if isinstance(data, memoryview) else memoryview(data)
    if mv.format == "B" and mv.ndim == 1 and mv.c_contiguous:
        return mv
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    return mv.cast("B")


def _update(crc: int, mv: memoryview) -> int:
    """Advance the raw (inverted) register over mv: 8 bytes per step, the tail byte by byte."""
    t0, t1, t2, t3, t4, t5, t6, t7 = _T
    n = len(mv) & ~7 if _WORDS else 0
    if n:
        for w in mv[:n].cast("Q"):
            x = crc ^ w
            crc = (t7[x & 0xFF] ^ t6[(x >> 8) & 0xFF] ^ t5[(x >> 16) & 0xFF] ^ t4[(x >> 24) & 0xFF]
                   ^ t3[(x >> 32) & 0xFF] ^ t2[(x >> 40) & 0xFF] ^ t1[(x >> 48) & 0xFF] ^ t0[x >> 56])
    for b in mv[n:]:
        crc = t0[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def python_crc32c(data: Buffer, crc: int = 0) -> int:
    """CRC32C of data, continuing `crc` (the CRC of what came before; 0 to start)."""
    return _update((crc & _MASK) ^ _MASK, _bytes_view(data)) ^ _MASK


def python_block_crcs(data: Buffer, block_size: int = BLOCK_SIZE) -> list[int]:
    """One CRC32C per block_size bytes of data (the last block may be short; none for b"")."""
    _check_block_size(block_size)
    mv = _bytes_view(data)
    return [_update(_MASK, mv[i:i + block_size]) ^ _MASK for i in range(0, len(mv), block_size)]


# ---- native --------------------------------------------------------------------------------------

_native = None  # the kdfs._crc32c module once imported
_native_error: ImportError | None = None


def _load_native():
    global _native, _native_error
    if _native is None:
        try:
            _crc32c = importlib.import_module("kdfs._crc32c")
        except ImportError as e:
            _native_error = e
        else:
            _native, _native_error = _crc32c, None
    return _native


def _native_crc32c(data: Buffer, crc: int = 0) -> int:
    ffi, lib = _native.ffi, _native.lib
    mv = _bytes_view(data)
    return lib.krg_crc32c(crc & _MASK, ffi.from_buffer(mv), len(mv))


def _native_block_crcs(data: Buffer, block_size: int = BLOCK_SIZE) -> list[int]:
    _check_block_size(block_size)
    ffi, lib = _native.ffi, _native.lib
    mv = _bytes_view(data)
    n = -(-len(mv) // block_size)
    if n == 0:
        return []
    out = ffi.new("uint32_t[]", n)
    lib.krg_block_crcs(ffi.from_buffer(mv), len(mv), block_size, out)
    return list(out)


def native_table_crc32c(data: Buffer, crc: int = 0) -> int:
    """The C table code whatever the CPU (tests check it against the oracle); needs the module."""
    if _load_native() is None:
        raise ImportError(f"kdfs._crc32c is not built (run `make native`): {_native_error}")
    ffi, lib = _native.ffi, _native.lib
    mv = _bytes_view(data)
    return lib.krg_crc32c_sw(crc & _MASK, ffi.from_buffer(mv), len(mv))


def native_uses_sse42() -> bool:
    """True when the C code uses the CPU's crc32 instruction; False without it or the module."""
    return _load_native() is not None and bool(_native.lib.krg_crc32c_hw())


# ---- the public API ------------------------------------------------------------------------------


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block size must be a positive integer, not {block_size!r}")


backend = "python"
_crc_impl: Callable[[Buffer, int], int] = python_crc32c
_blocks_impl: Callable[[Buffer, int], list[int]] = python_block_crcs


def select(native: bool | None = None) -> str:
    """Choose the backend and return its name: the C module (True; ImportError when it is not
    built), the Python code (False), or None: what KRG_NATIVE says, the C module when built."""
    global backend, _crc_impl, _blocks_impl
    if native is None:
        native = os.environ.get("KRG_NATIVE", "").strip().lower() != "python"
        if native and _load_native() is None:
            log.debug("kdfs._crc32c not available (%s): pure-Python CRC32C", _native_error)
            native = False
    elif native and _load_native() is None:
        raise ImportError(f"kdfs._crc32c is not built (run `make native`): {_native_error}")
    if native:
        backend, _crc_impl, _blocks_impl = "native", _native_crc32c, _native_block_crcs
    else:
        backend, _crc_impl, _blocks_impl = "python", python_crc32c, python_block_crcs
    return backend


def native_available() -> bool:
    """Whether the C module is built and importable (whatever backend is selected)."""
    return _load_native() is not None


def crc32c(data: Buffer, crc: int = 0) -> int:
    """CRC32C of data, continuing `crc` (the CRC of the data before it; 0 to start)."""
    return _crc_impl(data, crc)


def block_crcs(data: Buffer, block_size: int = BLOCK_SIZE) -> list[int]:
    """One CRC32C per block of block_size bytes; the last block may be short; [] for no data."""
    return _blocks_impl(data, block_size)


select()
