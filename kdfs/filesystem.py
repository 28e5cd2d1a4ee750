"""The KDFS file system core: what the mount does, without the mount (docs/kdfs.md).

Metadata calls go to the local daemon (whose replica answers reads, and whose leader orders
changes). File data is buffered per open file, chunk by chunk: a chunk that fills up is uploaded at
once (in the background, a few at a time), and flush/fsync/release upload the rest and commit the
file's new chunk map in one metadata change, so at every flush or fsync a file shows its old or its
new content, never half. (A writer far ahead of its uploads commits every `commit_every` bytes on
the way, so between two flushes a reader may see part of the new content, as with a local disk.)
Writing into an existing chunk reads it first (chunks are immutable: the new content goes under a
new id). Reads go through a cache of 64 KiB blocks; a sequential reader fetches 1 MiB at a time.

Thread-safe: the FUSE adapter calls it from worker threads, each with its own daemon connection.
"""

from __future__ import annotations

import collections
import errno
import logging
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from kdfs.client import KdfsClient, new_chunk_id
from kerrighed.errors import FsError, KrgError

log = logging.getLogger(__name__)

BLOCK = 64 << 10
READ_AHEAD = 16                 # blocks a sequential reader fetches at once (1 MiB)
ROOT = 1


class BlockCache:
    """An LRU of (chunk id, block number) -> bytes. Chunks never change, so nothing goes stale."""

    def __init__(self, limit: int):
        self.limit, self.size = limit, 0
        self._d: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: tuple[str, int], value: bytes) -> None:
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.size -= len(old)
            self._d[key] = value
            self.size += len(value)
            while self.size > self.limit and self._d:
                _, v = self._d.popitem(last=False)
                self.size -= len(v)


class OpenFile:
    """The data state of one open inode (however many handles)."""

    def __init__(self, ino: int, size: int, refs: dict[int, dict]):
        self.ino = ino
        self.size = size
        self.refs = refs                          # idx -> committed chunk ref
        self.dirty: dict[int, bytearray] = {}     # idx -> whole new content of that chunk
        # idx -> byte ranges written so far into a chunk that started empty. The kernel's writeback
        # does not always come in order: a chunk is complete when its writes cover all of it, not
        # when its last byte arrives (an upload then would be redone, and the first copy wasted).
        self.written: dict[int, list[tuple[int, int]]] = {}
        self.uploads: dict[int, tuple[bytearray, Future]] = {}   # idx -> (content, put future)
        self.pending: dict[int, dict] = {}        # uploaded, not yet committed
        self.discard: list[str] = []              # uploaded, then superseded before any commit
        self.error: Exception | None = None       # an upload failed: the next flush fails, commits nothing
        self.mtime_ns: int | None = None
        self.opens = 0
        self.lock = threading.RLock()
        self.next_read = 0                        # where a sequential reader reads next

    @property
    def modified(self) -> bool:
        return bool(self.dirty or self.uploads or self.pending) or self.mtime_ns is not None


class FileSystem:
    def __init__(self, connect: Callable[[], KdfsClient], chunk_size: int, cache_bytes: int = 256 << 20,
                 max_uploads: int = 8, commit_every: int = 64 << 20, holder: str = ""):
        self._connect = connect
        # Who holds the files this core unlinks while open (the mount: machine and home): a new mount
        # of the same holder releases what the old one held (kdfs/metastore.py "release_held").
        self.holder = holder
        self.chunk_size = chunk_size
        self.max_uploads, self.commit_every = max_uploads, commit_every
        self.cache = BlockCache(cache_bytes)
        self._tls = threading.local()
        self._lock = threading.Lock()
        self._files: dict[int, OpenFile] = {}
        self._lookups: collections.Counter[int] = collections.Counter()
        self._orphans: set[int] = set()           # unlinked while known to the kernel
        # (parent, name) -> inode, as last seen: the kernel looks a name up before it unlinks it,
        # so rm knows the inode without asking. A hint only: the change checks it.
        self._names: dict[tuple[int, bytes], int] = {}
        self._uploader = ThreadPoolExecutor(4, thread_name_prefix="kdfs-put")
        self._clients: list[KdfsClient] = []

    @property
    def client(self) -> KdfsClient:
        c = getattr(self._tls, "client", None)
        if c is None:
            c = self._tls.client = self._connect()
            with self._lock:
                self._clients.append(c)
        return c

    def close(self) -> None:
        self.flush_all()
        self._uploader.shutdown(wait=True)
        with self._lock:
            for c in self._clients:
                c.close()
            self._clients.clear()

    # -- names and attributes ---------------------------------------------------------------------

    def _known(self, attr: dict, n: int = 1) -> dict:
        with self._lock:
            self._lookups[attr["ino"]] += n
        return attr

    def lookup(self, parent: int, name: bytes) -> dict:
        return self._named(parent, name, self._known(self._fresh(self.client.query("lookup", parent=parent, name=name))))

    def _named(self, parent: int, name: bytes, attr: dict) -> dict:
        if len(self._names) > 100_000:
            self._names.clear()
        self._names[(parent, name)] = attr["ino"]
        return attr

    def getattr(self, ino: int) -> dict:
        return self._fresh(self.client.query("getattr", ino=ino))

    def _fresh(self, attr: dict) -> dict:
        """Attributes as this mount sees them: an open file's unflushed size and mtime count."""
        f = self._files.get(attr["ino"])
        if f is not None and f.modified:
            attr = {**attr, "size": f.size}
            if f.mtime_ns is not None:
                attr["mtime_ns"] = attr["ctime_ns"] = max(attr["mtime_ns"], f.mtime_ns)
        return attr

    def setattr(self, ino: int, fields: dict) -> dict:
        f = self._files.get(ino)
        if f is not None and ("size" in fields or "mtime_ns" in fields):
            # Commit buffered writes first: a truncate cuts what was written before it, and an
            # explicit mtime (futimens after writing, as cp -p and tar do; the kernel's own mtime at
            # writeback) outranks the time of those writes, which a later commit would put back.
            with f.lock:
                if fields.keys() == {"mtime_ns"} and f.modified:
                    # The kernel writing back its mtime of a written file (at close, with the
                    # writeback cache): it goes with the data's commit, one change instead of two.
                    f.mtime_ns = fields["mtime_ns"]
                    self._flush(f)
                    return self.getattr(ino)
                self._flush(f)
                result = self.client.change("setattr", ino=ino, **fields)
                if "size" in fields:
                    f.size = fields["size"]
                    f.refs = {r["idx"]: r for r in self.client.query("chunks", ino=ino)}
                return self._fresh(result["attr"])
        return self._fresh(self.client.change("setattr", ino=ino, **fields)["attr"])

    # A set-group-ID directory's group and bit pass on inside the change itself (kdfs/metastore.py).

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> dict:
        return self._named(parent, name, self._known(self.client.change(
            "mknod", parent=parent, name=name, mode=mode, uid=uid, gid=gid, rdev=rdev)["attr"]))

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> dict:
        return self._known(self.client.change("mkdir", parent=parent, name=name, mode=stat.S_IMODE(mode),
                                              uid=uid, gid=gid)["attr"])

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> dict:
        return self._known(self.client.change("symlink", parent=parent, name=name, target=target,
                                              uid=uid, gid=gid)["attr"])

    def link(self, ino: int, parent: int, name: bytes) -> dict:
        return self._known(self._fresh(self.client.change("link", ino=ino, parent=parent, name=name)["attr"]))

    def readlink(self, ino: int) -> bytes:
        return self.client.query("readlink", ino=ino)

    def unlink(self, parent: int, name: bytes) -> None:
        # Not open here: the last link frees the file in the same change (rm costs one change, not two).
        # Open: it lives on as an orphan until released and forgotten. Like NFS, another machine's
        # mount that has it open is not asked.
        ino = self._names.pop((parent, name), None)
        if ino is None:
            try:
                ino = self.client.query("lookup", parent=parent, name=name)["ino"]
            except FsError:
                pass
        # The change drops the file only if the name still means that inode.
        drop = ino if ino is not None and ino not in self._files else False
        r = self.client.change("unlink", parent=parent, name=name, drop=drop, holder=self.holder)
        if r.get("nlink") == 0 and not (drop and r.get("ino") == ino):
            self._orphaned(r["ino"])

    def rmdir(self, parent: int, name: bytes) -> None:
        self.client.change("rmdir", parent=parent, name=name)

    def rename(self, parent: int, name: bytes, newparent: int, newname: bytes, flags: int) -> None:
        self._names.pop((parent, name), None)
        self._names.pop((newparent, newname), None)
        r = self.client.change("rename", parent=parent, name=name, newparent=newparent, newname=newname,
                               flags=flags, holder=self.holder)
        if r.get("replaced") is not None and r.get("nlink") == 0:
            self._orphaned(r["replaced"])

    def _orphaned(self, ino: int) -> None:
        """The last name went: the inode lives while the kernel knows it (open files), then goes."""
        with self._lock:
            if self._lookups[ino] > 0 or ino in self._files:
                self._orphans.add(ino)
                return
        self.client.change("forget", ino=ino)

    def forget(self, items: list[tuple[int, int]]) -> None:
        gone = []
        with self._lock:
            for ino, n in items:
                self._lookups[ino] -= n
                if self._lookups[ino] <= 0:
                    del self._lookups[ino]
                    if ino in self._orphans and ino not in self._files:
                        self._orphans.discard(ino)
                        gone.append(ino)
        for ino in gone:
            self.client.change("forget", ino=ino)

    def readdir(self, ino: int) -> list[tuple[bytes, dict]]:
        """The whole listing, read in pages (readdir of a 100,000-entry directory is 20 requests)."""
        out: list[tuple[bytes, dict]] = []
        after = None
        while True:
            page = self.client.query("readdir", ino=ino, after=after, limit=5000)
            out.extend((bytes(n), self._fresh(a)) for n, a in page)
            if len(page) < 5000:
                return out
            after = out[-1][0]

    def dots(self, ino: int) -> list[tuple[bytes, dict]]:
        """The "." and ".." entries of directory `ino`, which a listing starts with (programs count
        on them). The kernel keeps no lookup of them, so neither do we."""
        return [(b".", self.getattr(ino)), (b"..", self._fresh(self.client.query("lookup", parent=ino, name=b"..")))]

    def statfs(self) -> dict:
        return self.client.status()

    # -- open files -------------------------------------------------------------------------------

    def open(self, ino: int) -> None:
        with self._lock:
            f = self._files.get(ino)
            if f is not None:
                f.opens += 1
                return
        got = self.client.query("open", ino=ino)
        attr, refs = got["attr"], {r["idx"]: r for r in got["chunks"]}
        with self._lock:
            f = self._files.get(ino)
            if f is None:
                f = self._files[ino] = OpenFile(ino, attr["size"], refs)
            f.opens += 1

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> dict:
        attr = self.mknod(parent, name, mode, 0, uid, gid)
        with self._lock:
            f = self._files[attr["ino"]] = OpenFile(attr["ino"], 0, {})
            f.opens += 1
        return attr

    def release(self, ino: int) -> None:
        f = self._files.get(ino)
        if f is None:
            return
        try:
            self.flush(ino)
        finally:
            forget = False
            with self._lock:
                f.opens -= 1
                if f.opens <= 0:
                    del self._files[ino]
                    if ino in self._orphans and self._lookups[ino] <= 0:
                        self._orphans.discard(ino)
                        forget = True
            if forget:
                self.client.change("forget", ino=ino)

    def idle(self, ino: int) -> bool:
        """Nothing to upload or commit for this inode: flush has nothing to do (no round trip)."""
        f = self._files.get(ino)
        return f is None or (not f.modified and f.error is None)

    def release_idle(self, ino: int) -> bool:
        """Release without any request when there is nothing to flush or forget; False otherwise."""
        with self._lock:
            f = self._files.get(ino)
            if f is None:
                return True
            if f.modified or f.error is not None:
                return False
            if f.opens > 1:
                f.opens -= 1
                return True
            if ino in self._orphans:
                return False
            del self._files[ino]
            return True

    def flush(self, ino: int) -> None:
        f = self._files.get(ino)
        if f is not None:
            with f.lock:
                self._flush(f)

    def fsync(self, ino: int) -> None:
        f = self._files.get(ino)
        if f is None:
            return
        with f.lock:
            self._flush(f)
            self.client.sync([(r["id"], r["nodes"]) for r in f.refs.values()])

    def flush_all(self) -> None:
        for ino in list(self._files):
            try:
                self.flush(ino)
            except Exception:
                log.exception("kdfs: could not flush inode %d", ino)

    def read(self, ino: int, offset: int, size: int) -> bytes:
        f = self._files[ino]
        with f.lock:
            end = min(offset + size, f.size)
            if offset >= end:
                return b""
            sequential = offset == f.next_read
            f.next_read = end
            out = bytearray()
            cs = self.chunk_size
            for idx in range(offset // cs, (end - 1) // cs + 1):
                base = idx * cs
                lo, hi = max(offset, base) - base, min(end, base + cs) - base
                out += self._piece(f, idx, lo, hi, sequential)
            return bytes(out)

    def _piece(self, f: OpenFile, idx: int, lo: int, hi: int, sequential: bool) -> bytes:
        buf = f.dirty.get(idx)
        if buf is None and idx in f.uploads:
            buf = f.uploads[idx][0]
        if buf is not None:
            piece = bytes(buf[lo:hi])
            return piece + bytes(hi - lo - len(piece))
        ref = f.pending.get(idx) or f.refs.get(idx)
        if ref is None:
            return bytes(hi - lo)                   # a hole
        have = min(hi, ref["length"])
        piece = self._read_ref(ref, lo, have, sequential) if have > lo else b""
        return piece + bytes(hi - lo - len(piece))

    def _read_ref(self, ref: dict, lo: int, hi: int, sequential: bool) -> bytes:
        first, last = lo // BLOCK, (hi - 1) // BLOCK
        blocks = {b: self.cache.get((ref["id"], b)) for b in range(first, last + 1)}
        missing = [b for b, v in blocks.items() if v is None]
        if missing:
            start, stop = missing[0], missing[-1] + 1
            ahead = max(stop, min(start + READ_AHEAD, -(-ref["length"] // BLOCK))) if sequential else stop
            try:
                data = self.client.get(ref["id"], ref["nodes"], start * BLOCK, (ahead - start) * BLOCK)
            except KrgError:
                if ahead == stop:
                    raise
                # The read-ahead may have met a bad block this reader did not ask for.
                ahead = stop
                data = self.client.get(ref["id"], ref["nodes"], start * BLOCK, (stop - start) * BLOCK)
            for b in range(start, ahead):
                piece = bytes(data[(b - start) * BLOCK:(b - start + 1) * BLOCK])
                self.cache.put((ref["id"], b), piece)
                if b in blocks:
                    blocks[b] = piece
        joined = b"".join(blocks[b] for b in range(first, last + 1))
        return joined[lo - first * BLOCK:hi - first * BLOCK]

    def write(self, ino: int, offset: int, data: bytes) -> int:
        f = self._files[ino]
        cs = self.chunk_size
        with f.lock:
            if f.error is not None:
                raise _upload_error(f.error)
            pos = 0
            while pos < len(data):
                idx = (offset + pos) // cs
                lo = offset + pos - idx * cs
                n = min(cs - lo, len(data) - pos)
                buf = self._writable(f, idx)
                was_full = len(buf) >= cs
                if len(buf) < lo:
                    buf.extend(bytes(lo - len(buf)))
                buf[lo:lo + n] = data[pos:pos + n]
                pos += n
                # Upload a new chunk once writes cover it; a chunk full from the start (an overwrite
                # in place) when its writer reaches its end, not at every write into it.
                if idx in f.written:
                    done = _cover(f.written[idx], lo, lo + n) == [(0, cs)]
                else:
                    done = len(buf) >= cs and (not was_full or lo + n == cs)
                if done:
                    self._start_upload(f, idx)
            f.size = max(f.size, offset + len(data))
            f.mtime_ns = time.time_ns()
        return len(data)

    def _writable(self, f: OpenFile, idx: int) -> bytearray:
        buf = f.dirty.get(idx)
        if buf is not None:
            return buf
        if idx in f.uploads:
            # Written again while on its way: let it land, then write a newer version.
            buf = bytearray(self._land(f, idx))
        else:
            ref = f.pending.get(idx) or f.refs.get(idx)
            buf = bytearray()
            if ref is not None and ref["length"] > 0:
                buf += self.client.get(ref["id"], ref["nodes"], 0, ref["length"])[:ref["length"]]
            else:
                f.written[idx] = []
        f.dirty[idx] = buf
        return buf

    def _start_upload(self, f: OpenFile, idx: int) -> None:
        buf = f.dirty.pop(idx)
        f.written.pop(idx, None)
        while len(f.uploads) >= self.max_uploads:
            self._land(f, min(f.uploads))
        size_hint = f.size
        f.uploads[idx] = (buf, self._uploader.submit(self._put, f.ino, idx, bytes(buf), size_hint))
        if f.error is None and len(f.pending) * self.chunk_size >= self.commit_every:
            self._commit(f)

    def _land(self, f: OpenFile, idx: int) -> bytearray:
        """Wait for chunk idx's upload: its ref goes to pending, or its error to f.error (raised by the
        next flush, which then commits none of the file's new chunks). Returns the uploaded content."""
        content, fut = f.uploads.pop(idx)
        try:
            ref = fut.result()
        except Exception as e:
            f.error = f.error or e
        else:
            old = f.pending.get(idx)
            if old is not None:
                f.discard.append(old["id"])     # freed by the next commit, not left on the disks
            f.pending[idx] = ref
        return content

    def _put(self, ino: int, idx: int, data: bytes, size_hint: int) -> dict:
        chunk_id = new_chunk_id()
        nodes = self.client.put(chunk_id, data, ino, idx, size_hint)
        return {"idx": idx, "id": chunk_id, "length": len(data), "nodes": nodes}

    def _flush(self, f: OpenFile) -> None:
        """Upload what is buffered and commit the file's new chunks (f.lock is held)."""
        for idx in sorted(f.dirty):
            self._start_upload(f, idx)
        for idx in sorted(f.uploads):
            self._land(f, idx)
        if f.error is not None:
            # Drop every write since the last commit (half of them would mix old and new content)
            # and show the committed file again.
            e, f.error = f.error, None
            f.discard += [r["id"] for r in f.pending.values()]
            f.pending.clear()
            f.mtime_ns = None
            try:
                f.size = self.client.query("getattr", ino=f.ino)["size"]
            except KrgError:
                pass
            raise _upload_error(e)
        self._commit(f)

    def _commit(self, f: OpenFile) -> None:
        if not f.pending and f.mtime_ns is None:
            return
        refs = [f.pending[i] for i in sorted(f.pending)]
        extra = {"discard": list(f.discard)} if f.discard else {}
        self.client.change("commit", ino=f.ino, chunks=refs, size=f.size, mtime_ns=f.mtime_ns or time.time_ns(),
                           **extra)
        for r in refs:
            f.refs[r["idx"]] = r
        f.pending.clear()
        f.discard.clear()
        if not f.dirty and not f.uploads:
            f.mtime_ns = None


def _upload_error(e: Exception) -> FsError:
    return e if isinstance(e, FsError) else FsError.of(errno.EIO, f"chunk upload failed: {e}")


def _cover(ranges: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """Add [lo, hi) to sorted, disjoint ranges (in place, merging what touches); return them."""
    out = []
    for a, b in ranges:
        if b < lo or a > hi:
            out.append((a, b))
        else:
            lo, hi = min(lo, a), max(hi, b)
    out.append((lo, hi))
    out.sort()
    ranges[:] = out
    return ranges
