"""One node's KDFS chunks on its disk.

A chunk is immutable data under a 128-bit random id (32 lowercase hex digits), kept in
`<root>/chunks/<first 2 hex>/<id>`. A file is written in `<root>/tmp/` and renamed in, so a chunk
file is always whole; `tmp/` is emptied when a store is opened (what a killed daemon left).

File format (little-endian):

    magic      8 bytes   b"KDFSCHK1"
    length     u64       bytes of data
    block      u32       block size (64 KiB in KDFS)
    count      u32       number of blocks, ceil(length / block)
    crcs       count x u32, the CRC32C of each block (the last block may be short)
    data       length bytes

A read checks the CRC of every block it touches and raises ChunkCorrupt, naming the chunk and
block, on a mismatch, a malformed header, a file of the wrong size or a disk read error (EIO), so
the caller can take another copy. The store is safe to use from several threads.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import struct
from pathlib import Path
from typing import Iterable, Iterator

from kdfs import checksum
from kdfs.checksum import BLOCK_SIZE
from kerrighed.errors import ChunkCorrupt, ChunkMissing

log = logging.getLogger(__name__)

MAGIC = b"KDFSCHK1"
_HEADER = struct.Struct("<8sQII")
_MAX_BLOCK = 1 << 30
_ID = re.compile(r"[0-9a-f]{32}")
# verify() reads this many bytes of blocks at a time, so memory stays bounded for any chunk.
_VERIFY_SPAN = 4 << 20
# The first read of a file takes this much: the header and the CRCs of up to 1018 blocks (all of
# a 4 MiB chunk's 64), so a ranged read costs two preads.
_HEAD_READ = 4096
# Temporary file names: unique in the process (several stores, several threads).
_seq = itertools.count()


def check_id(chunk_id: object) -> str:
    """The id itself when it is 32 lowercase hex digits; ValueError otherwise."""
    if not isinstance(chunk_id, str) or not _ID.fullmatch(chunk_id):
        raise ValueError(f"bad chunk id {chunk_id!r}: a chunk id is 32 lowercase hex digits")
    return chunk_id


class _Header:
    """A chunk file's parsed and checked header."""

    __slots__ = ("length", "block", "count", "data_offset", "crcs")

    def __init__(self, length: int, block: int, count: int, crcs: bytes):
        self.length, self.block, self.count = length, block, count
        self.data_offset = _HEADER.size + 4 * count
        self.crcs = crcs  # the start of the CRC table, as read with the header


class ChunkStore:
    """The chunks of one node, under `root` (created if needed)."""

    def __init__(self, root: Path | str, block_size: int = BLOCK_SIZE):
        if not isinstance(block_size, int) or not 0 < block_size <= _MAX_BLOCK:
            raise ValueError(f"block size must be in 1..{_MAX_BLOCK}, not {block_size!r}")
        self.root = Path(root)
        self.block_size = block_size
        self._chunks = self.root / "chunks"
        self._tmp = self.root / "tmp"
        self._chunks.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._clean_tmp()

    def __repr__(self) -> str:
        return f"ChunkStore({str(self.root)!r})"

    def _clean_tmp(self) -> None:
        removed = 0
        with os.scandir(self._tmp) as entries:
            for entry in entries:
                try:
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    pass
                except IsADirectoryError:
                    log.warning("chunk store %s: unexpected directory %s left in place",
                                self.root, entry.path)
        if removed:
            log.info("chunk store %s: removed %d unfinished chunk file(s) from tmp/", self.root,
                     removed)

    # ---- names -----------------------------------------------------------------------------------

    def path(self, chunk_id: str) -> Path:
        """Where the chunk's file is (whether or not it exists)."""
        check_id(chunk_id)
        return self._chunks / chunk_id[:2] / chunk_id

    def __contains__(self, chunk_id: str) -> bool:
        return self.path(chunk_id).is_file()

    def ids(self) -> Iterator[str]:
        """The ids of the chunks held, in no particular order (files that are not chunks are
        skipped)."""
        with os.scandir(self._chunks) as subdirs:
            prefixes = [d.name for d in subdirs if d.is_dir(follow_symlinks=False)]
        for prefix in prefixes:
            try:
                with os.scandir(self._chunks / prefix) as entries:
                    names = [e.name for e in entries if e.is_file(follow_symlinks=False)]
            except FileNotFoundError:
                continue
            for name in names:
                if _ID.fullmatch(name) and name[:2] == prefix:
                    yield name

    # ---- writing ---------------------------------------------------------------------------------

    def put(self, chunk_id: str, data: checksum.Buffer, sync: bool = False) -> None:
        """Store data under chunk_id, atomically: a reader sees the old file or the new one, and
        a crash leaves at worst a file in tmp/. With sync, the file and its directory are on disk
        when this returns. Putting an id again replaces its file (same data: a no-op to readers;
        a repair rewrites a bad copy this way). An OSError (ENOSPC, EIO) leaves no temporary file
        behind and is raised again."""
        final = self.path(chunk_id)
        mv = data if isinstance(data, memoryview) else memoryview(data)
        if mv.format != "B" or mv.ndim != 1 or not mv.c_contiguous:
            mv = memoryview(mv.tobytes())
        crcs = checksum.block_crcs(mv, self.block_size)
        header = _HEADER.pack(MAGIC, len(mv), self.block_size, len(crcs)) + struct.pack(
            f"<{len(crcs)}I", *crcs)
        tmp = self._tmp / f"{chunk_id}.{os.getpid()}.{next(_seq)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                _write_all(fd, header)
                _write_all(fd, mv)
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            new_dir = not final.parent.is_dir()
            if new_dir:
                final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("chunk %s: cannot remove temporary file %s: %s", chunk_id, tmp, e)
            raise
        if sync:
            _fsync_dir(final.parent)
            if new_dir:
                _fsync_dir(self._chunks)
        log.debug("chunk %s: stored %d bytes in %d blocks", chunk_id, len(mv), len(crcs))

    def delete(self, chunk_id: str) -> bool:
        """Remove the chunk; False when it was not there."""
        try:
            os.unlink(self.path(chunk_id))
        except FileNotFoundError:
            return False
        log.debug("chunk %s: deleted", chunk_id)
        return True

    def sync(self, chunk_ids: Iterable[str]) -> None:
        """Make these chunks durable (files, then the directories naming them): for chunks put
        without sync. ChunkMissing when one is gone."""
        dirs = set()
        for chunk_id in chunk_ids:
            path = self.path(chunk_id)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise ChunkMissing(f"chunk {chunk_id} is not stored in {self.root}") from None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dirs.add(path.parent)
        for d in sorted(dirs):
            _fsync_dir(d)
        if dirs:
            _fsync_dir(self._chunks)

    # ---- reading ---------------------------------------------------------------------------------

    def read(self, chunk_id: str, offset: int = 0, length: int | None = None) -> bytes:
        """Up to `length` bytes (all to the end when None) from `offset` of the chunk's data,
        checking the CRC of every block the range touches. Past the end: what exists, b"" at
        worst. ChunkMissing when the chunk is not stored, ChunkCorrupt when a block is bad."""
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative integer, not {offset!r}")
        if length is not None and (not isinstance(length, int) or length < 0):
            raise ValueError(f"length must be a non-negative integer or None, not {length!r}")
        fd = self._open(chunk_id)
        try:
            h = self._header(fd, chunk_id)
            end = h.length if length is None else min(h.length, offset + length)
            if offset >= end:
                return b""
            first, last = offset // h.block, (end - 1) // h.block
            buf = self._blocks(fd, chunk_id, h, first, last)
        finally:
            os.close(fd)
        start = offset - first * h.block
        if start == 0 and end - offset == len(buf):
            return buf
        return buf[start:start + end - offset]

    def length(self, chunk_id: str) -> int:
        """Bytes of data in the chunk (from its header, checked against the file's size)."""
        fd = self._open(chunk_id)
        try:
            return self._header(fd, chunk_id).length
        finally:
            os.close(fd)

    def verify(self, chunk_id: str) -> None:
        """Check every block of the chunk; raises like read()."""
        fd = self._open(chunk_id)
        try:
            h = self._header(fd, chunk_id)
            step = max(1, _VERIFY_SPAN // h.block)
            for first in range(0, h.count, step):
                self._blocks(fd, chunk_id, h, first, min(first + step, h.count) - 1)
        finally:
            os.close(fd)

    def usage(self) -> dict[str, int]:
        """Space of the file system holding the store (total, free, avail: bytes, as statvfs says;
        avail is what this unprivileged store may still use) and what the store holds (chunks:
        count; stored: bytes of chunk data, headers not counted)."""
        st = os.statvfs(self.root)
        chunks = stored = 0
        for chunk_id in self.ids():
            try:
                size = os.stat(self._chunks / chunk_id[:2] / chunk_id).st_size
            except FileNotFoundError:
                continue
            chunks += 1
            stored += _data_length(size, self.block_size)
        return {
            "total": st.f_blocks * st.f_frsize,
            "free": st.f_bfree * st.f_frsize,
            "avail": st.f_bavail * st.f_frsize,
            "chunks": chunks,
            "stored": stored,
        }

    # ---- internals -------------------------------------------------------------------------------

    def _open(self, chunk_id: str) -> int:
        path = self.path(chunk_id)
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ChunkMissing(f"chunk {chunk_id} is not stored in {self.root}") from None

    def _corrupt(self, chunk_id: str, what: str) -> ChunkCorrupt:
        log.warning("chunk %s in %s is corrupt: %s", chunk_id, self.root, what)
        return ChunkCorrupt(f"chunk {chunk_id} in {self.root} is corrupt: {what}")

    def _pread(self, fd: int, chunk_id: str, size: int, offset: int) -> bytes:
        try:
            buf = os.pread(fd, size, offset)
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            raise self._corrupt(chunk_id, f"read error at byte {offset} of the file: {e}") from e
        if len(buf) != size:
            raise self._corrupt(chunk_id, f"file truncated: {len(buf)} of {size} bytes at byte "
                                          f"{offset} of the file")
        return buf

    def _header(self, fd: int, chunk_id: str) -> _Header:
        size = os.fstat(fd).st_size
        if size < _HEADER.size:
            raise self._corrupt(chunk_id, f"file of {size} bytes is shorter than a header")
        head = self._pread(fd, chunk_id, min(size, _HEAD_READ), 0)
        magic, length, block, count = _HEADER.unpack_from(head)
        if magic != MAGIC:
            raise self._corrupt(chunk_id, f"bad magic {magic!r} (expected {MAGIC!r})")
        if not 0 < block <= _MAX_BLOCK or count != -(-length // block):
            raise self._corrupt(chunk_id, f"bad header: {length} bytes in {count} blocks of "
                                          f"{block} bytes")
        h = _Header(length, block, count, head[_HEADER.size:_HEADER.size + 4 * count])
        expected = h.data_offset + length
        if size < expected:
            cut = max(0, size - h.data_offset) // block
            raise self._corrupt(chunk_id, f"file truncated: {size} of {expected} bytes, block "
                                          f"{cut} of {count} and later are missing")
        if size > expected:
            raise self._corrupt(chunk_id, f"file is {size} bytes, its header says {expected}")
        return h

    def _blocks(self, fd: int, chunk_id: str, h: _Header, first: int, last: int) -> bytes:
        """Blocks first..last (inclusive) of the data, each checked against its stored CRC."""
        n = last - first + 1
        if 4 * (last + 1) <= len(h.crcs):
            stored = struct.unpack_from(f"<{n}I", h.crcs, 4 * first)
        else:
            stored = struct.unpack(f"<{n}I",
                                   self._pread(fd, chunk_id, 4 * n, _HEADER.size + 4 * first))
        start = first * h.block
        size = min(h.length, (last + 1) * h.block) - start
        buf = self._pread(fd, chunk_id, size, h.data_offset + start)
        computed = checksum.block_crcs(buf, h.block)
        bad = [i for i in range(n) if computed[i] != stored[i]]
        if bad:
            i = bad[0]
            b = first + i
            lo, hi = b * h.block, min(h.length, (b + 1) * h.block) - 1
            more = f"; {len(bad) - 1} more bad block(s) in this range" if len(bad) > 1 else ""
            raise self._corrupt(chunk_id, f"block {b} of {h.count} (data bytes {lo}..{hi}) fails "
                                          f"its CRC32C: stored {stored[i]:08x}, computed "
                                          f"{computed[i]:08x}{more}")
        return buf


def _write_all(fd: int, data: bytes | memoryview) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _data_length(file_size: int, block: int) -> int:
    """Data bytes of a chunk file of file_size bytes written with this block size: the file holds
    the header, ceil(length / block) CRCs of 4 bytes, then the data."""
    rest = max(0, file_size - _HEADER.size)
    return rest - 4 * -(-rest // (block + 4))
