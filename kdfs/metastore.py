"""One node's replica of the KDFS metadata: namespace, inodes and chunk maps in SQLite.

The replica is a deterministic state machine. The leader stamps every change with what is not
deterministic (the time `now` in ns, ...), and every node calls `apply(seq, term, op)` with the same
entries in the same order, so every replica holds the same rows. An entry is applied in one SQLite
transaction together with its record in the `log` table and the new `applied` sequence number: a
change is either wholly there with its log entry or not at all, and an entry that fails (an `FsError`
the leader hands back to its caller) leaves the database as it was and does not use its sequence
number. Nothing here reads a clock, a random source or the environment.

POSIX semantics are kept (ENOENT, EEXIST, ENOTDIR, EISDIR, ENOTEMPTY, EINVAL, ENAMETOOLONG); POSIX
permissions are not (the kernel checks them: the mount uses `default_permissions`).

Tables:
- `state`: one row: schema version, chunk size, last applied seq and its term, next inode number.
- `inodes`: attributes; `parent` is a directory's parent (a directory has exactly one entry), 0 for
  other types; `target` is a symlink's. An inode whose last link went away stays, with nlink 0, as an
  *orphan* (it may still be open somewhere) until a `forget` entry removes it and frees its chunks.
- `dentries`: (parent, name) -> ino; names are BLOBs, so a directory lists in byte order by its key.
- `chunks`: (ino, idx) -> chunk id, length, holders (a JSON list of node ids, in the order given).
- `log`: (seq, term, op as canonical msgpack), trimmed by the daemon to its retention.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack

from kerrighed.errors import FsError

ROOT = 1
SCHEMA_VERSION = 2
DEFAULT_CHUNK_SIZE = 4 << 20
NAME_MAX = 255
PATH_MAX = 4096                       # a symlink's target, with its terminating NUL in the kernel

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_ATTR_COLS = "ino, mode, nlink, uid, gid, rdev, size, atime_ns, mtime_ns, ctime_ns"
_ATTR_KEYS = tuple(c.strip() for c in _ATTR_COLS.split(","))
_TYPES = {stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK}   # what mknod makes

_SCHEMA = """
CREATE TABLE state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    applied INTEGER NOT NULL,
    last_term INTEGER NOT NULL,
    next_ino INTEGER NOT NULL
);
CREATE TABLE inodes (
    ino INTEGER PRIMARY KEY,
    mode INTEGER NOT NULL,
    nlink INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    rdev INTEGER NOT NULL,
    size INTEGER NOT NULL,
    atime_ns INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    parent INTEGER NOT NULL,
    target BLOB
);
CREATE INDEX inodes_orphans ON inodes (ino) WHERE nlink = 0;
CREATE TABLE dentries (
    parent INTEGER NOT NULL,
    name BLOB NOT NULL,
    ino INTEGER NOT NULL,
    PRIMARY KEY (parent, name)
) WITHOUT ROWID;
CREATE TABLE chunks (
    ino INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    id TEXT NOT NULL UNIQUE,
    length INTEGER NOT NULL,
    nodes TEXT NOT NULL,
    PRIMARY KEY (ino, idx)
) WITHOUT ROWID;
CREATE TABLE held (
    ino INTEGER PRIMARY KEY,
    holder TEXT NOT NULL
);
CREATE TABLE log (
    seq INTEGER PRIMARY KEY,
    term INTEGER NOT NULL,
    op BLOB NOT NULL
);
"""


# Bytes a file's chunks hold (holes hold none): reads report it as "stored", for st_blocks.
_STORED = "(SELECT total(c.length) FROM chunks c WHERE c.ino = i.ino)"


def _with_stored(row: tuple) -> dict:
    attr = dict(zip(_ATTR_KEYS, row))
    attr["stored"] = int(row[len(_ATTR_KEYS)])
    return attr


def _err(code: int, detail: str) -> FsError:
    return FsError.of(code, detail)


def _canonical(v: Any) -> Any:
    """The op with its dict keys sorted at every level, so every replica logs the same bytes."""
    if isinstance(v, dict):
        return {k: _canonical(x) if isinstance(x, (dict, list, tuple)) else x
                for k in sorted(v) for x in (v[k],)}
    if isinstance(v, (list, tuple)):
        return [_canonical(x) if isinstance(x, (dict, list, tuple)) else x for x in v]
    return v


def _pack(op: dict) -> bytes:
    return msgpack.packb(_canonical(op), use_bin_type=True)


def _unpack(b: bytes) -> dict:
    return msgpack.unpackb(b, raw=False)


def _check_name(name: Any) -> bytes:
    if not isinstance(name, bytes):
        raise _err(errno.EINVAL, f"a name is bytes, not {type(name).__name__}")
    if len(name) > NAME_MAX:
        raise _err(errno.ENAMETOOLONG, f"name of {len(name)} bytes (at most {NAME_MAX})")
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise _err(errno.EINVAL, f"invalid name {name!r}")
    return name


def _int(op: dict, key: str, default: int | None = None) -> int:
    v = op.get(key, default)
    if type(v) is not int:                       # bool is not a number here
        raise _err(errno.EINVAL, f"op {op.get('op')!r}: {key} = {v!r} is not an integer")
    return v


def _nodes(v: Any) -> str:
    if not isinstance(v, (list, tuple)) or any(type(n) is not int for n in v):
        raise _err(errno.EINVAL, f"chunk holders {v!r} are not a list of node ids")
    return json.dumps(list(dict.fromkeys(v)), separators=(",", ":"))


def _copy_snapshot(data_file: Path, tmp: Path, chunk_size: int | None) -> None:
    """Copy a received snapshot to `tmp` as one self-contained, checked, synced database file."""
    src = sqlite3.connect(data_file)
    out = sqlite3.connect(tmp, isolation_level=None)
    try:
        src.backup(out)
        out.execute("PRAGMA journal_mode=DELETE")
        check = out.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            raise sqlite3.DatabaseError("; ".join(r[0] for r in check[:3]))
        row = out.execute("SELECT version, chunk_size FROM state").fetchone()
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{data_file}: not a KDFS metadata snapshot ({e})") from None
    finally:
        src.close()
        out.close()
    if row is None or row[0] != SCHEMA_VERSION:
        raise ValueError(f"{data_file}: a snapshot of schema version {row and row[0]}, "
                         f"this code reads version {SCHEMA_VERSION}")
    if chunk_size is not None and row[1] != chunk_size:
        raise ValueError(f"{data_file}: a snapshot of a file system of chunk size {row[1]}, not {chunk_size}")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())


def _retire(path: Path) -> None:
    """Fold the old database's WAL into it and drop the WAL, so that no stale WAL can ever be
    replayed over the snapshot once the snapshot takes the old file's name."""
    old = sqlite3.connect(path, isolation_level=None)
    try:
        old.execute("PRAGMA journal_mode=DELETE")
    except sqlite3.OperationalError as e:
        raise ValueError(f"{path}: cannot retire the old database ({e}); is it still open?") from None
    except sqlite3.DatabaseError:
        for suffix in ("-wal", "-shm"):          # no database: its WAL is worth nothing either
            path.with_name(path.name + suffix).unlink(missing_ok=True)
    finally:
        old.close()


class MetaStore:
    """One metadata replica. Not thread-safe: the caller serialises calls (one thread at a time)."""

    def __init__(self, path: Path, *, chunk_size: int | None = None):
        """Open the replica at `path`, creating it (with the root directory) if it does not exist.

        `chunk_size` is fixed when the file system is created (default 4 MiB); on reopen it must be
        None or the stored value."""
        self.path = Path(path)
        if chunk_size is not None and (type(chunk_size) is not int or chunk_size <= 0):
            raise ValueError(f"chunk_size = {chunk_size!r}: a positive number of bytes")
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA cache_size=-65536")
            exists = self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'state'").fetchone()
            if not exists:
                self._create(chunk_size or DEFAULT_CHUNK_SIZE)
            row = self._db.execute(
                "SELECT version, chunk_size, applied, last_term, next_ino FROM state").fetchone()
            if row is None:
                raise ValueError(f"{self.path}: no state row; not a KDFS metadata database")
            version, self.chunk_size, self._applied, self._last_term, self._next_ino = row
            if version != SCHEMA_VERSION:
                raise ValueError(f"{self.path}: metadata schema version {version} "
                                 f"(this code reads version {SCHEMA_VERSION})")
            if chunk_size is not None and chunk_size != self.chunk_size:
                raise ValueError(f"{self.path}: chunk size {self.chunk_size} was fixed when the file "
                                 f"system was made; {chunk_size} was asked")
        except BaseException:
            self._db.close()
            raise
        self._ops: dict[str, Callable[[dict], dict]] = {
            "mknod": self._mknod, "mkdir": self._mkdir, "symlink": self._symlink,
            "link": self._link, "unlink": self._unlink, "rmdir": self._rmdir,
            "rename": self._rename, "setattr": self._setattr, "commit": self._commit,
            "replicas": self._replicas, "forget": self._forget, "release_held": self._release_held,
        }

    def _create(self, chunk_size: int) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.execute("INSERT INTO state VALUES (1, ?, ?, 0, 0, ?)", (SCHEMA_VERSION, chunk_size, ROOT + 1))
            db.execute("INSERT INTO inodes VALUES (?, ?, 2, 0, 0, 0, 0, 0, 0, 0, ?, NULL)",
                       (ROOT, stat.S_IFDIR | 0o1777, ROOT))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> MetaStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the log

    @property
    def applied(self) -> int:
        """Sequence number of the last applied entry (0 on a fresh database)."""
        return self._applied

    def last_term(self) -> int:
        """Term of the last applied entry (0 if none), kept even when the log is trimmed."""
        return self._last_term

    def term_at(self, seq: int) -> int | None:
        """Term of entry `seq`: 0 for seq 0, the last term for `applied`, else that of a retained
        entry; None for an entry trimmed away or not applied yet."""
        if seq == 0:
            return 0
        if seq == self._applied:
            return self._last_term
        row = self._db.execute("SELECT term FROM log WHERE seq = ?", (seq,)).fetchone()
        return row[0] if row else None

    def apply(self, seq: int, term: int, op: dict) -> dict:
        """Apply entry `seq` (which must be `applied + 1`) atomically with its log record; return the
        op's result. An `FsError` (or any failure) leaves the database and `applied` unchanged."""
        if seq != self._applied + 1:
            raise ValueError(f"entry {seq} applied after {self._applied} (expected {self._applied + 1})")
        if term < self._last_term:
            raise ValueError(f"entry {seq} has term {term}, older than the last applied term {self._last_term}")
        if not isinstance(op, dict):
            raise _err(errno.EINVAL, f"an op is a dict, not {type(op).__name__}")
        handler = self._ops.get(op.get("op"))
        if handler is None:
            raise _err(errno.EINVAL, f"unknown op {op.get('op')!r} (known: {', '.join(sorted(self._ops))})")
        self._now = _int(op, "now")
        next_ino = self._next_ino
        db = self._db
        db.execute("BEGIN")
        try:
            try:
                result = handler(op)
            except KeyError as e:
                raise _err(errno.EINVAL, f"op {op['op']!r} lacks {e}") from None
            db.execute("INSERT INTO log VALUES (?, ?, ?)", (seq, term, _pack(op)))
            db.execute("UPDATE state SET applied = ?, last_term = ?, next_ino = ?",
                       (seq, term, self._next_ino))
            db.execute("COMMIT")
        except BaseException:
            self._next_ino = next_ino
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._applied, self._last_term = seq, term
        return result

    def entries(self, after: int, limit: int = 1000) -> list[tuple[int, int, dict]]:
        """Retained entries with seq > `after`, in order: (seq, term, op)."""
        rows = self._db.execute("SELECT seq, term, op FROM log WHERE seq > ? ORDER BY seq LIMIT ?",
                                (after, limit)).fetchall()
        return [(s, t, _unpack(o)) for s, t, o in rows]

    def trim(self, keep: int) -> None:
        """Keep only the last `keep` entries of the log."""
        if keep < 0:
            raise ValueError(f"keep = {keep}: must be >= 0")
        self._db.execute("DELETE FROM log WHERE seq <= ?", (self._applied - keep,))

    def first_retained(self) -> int:
        """Lowest seq still in the log (`applied + 1` if the log is empty)."""
        row = self._db.execute("SELECT min(seq) FROM log").fetchone()
        return row[0] if row[0] is not None else self._applied + 1

    def snapshot(self, dest: Path) -> None:
        """Write a consistent copy of the whole database (one self-contained file) to `dest`."""
        dest = Path(dest)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.unlink(missing_ok=True)
        out = sqlite3.connect(tmp, isolation_level=None)
        try:
            self._db.backup(out)
            out.execute("PRAGMA journal_mode=DELETE")
        finally:
            out.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)

    @classmethod
    def install_snapshot(cls, path: Path, data_file: Path, *, chunk_size: int | None = None) -> MetaStore:
        """Replace the database at `path` (closed by the caller) with the snapshot `data_file`
        atomically, and open it. A crash leaves either the old database or the snapshot; a snapshot
        that is damaged or of another schema or chunk size is refused (ValueError), the old database
        kept. `data_file` itself is left in place."""
        path, data_file = Path(path), Path(data_file)
        tmp = path.with_name(path.name + ".snap")
        tmp.unlink(missing_ok=True)
        try:
            _copy_snapshot(data_file, tmp, chunk_size)
            if path.exists():
                _retire(path)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls(path, chunk_size=chunk_size)

    # ---- reads

    def query(self, name: str, args: dict) -> Any:
        """The read queries by name, as clients ask them over the wire."""
        if name == "getattr":
            return self.getattr(args["ino"])
        if name == "lookup":
            return self.lookup(args["parent"], args["name"])
        if name == "readdir":
            return self.readdir(args["ino"], args.get("after"), args.get("limit", 5000))
        if name == "readlink":
            return self.readlink(args["ino"])
        if name == "chunks":
            return self.chunks(args["ino"])
        if name == "open":          # what opening a file needs, in one round trip
            return {"attr": self.getattr(args["ino"]), "chunks": self.chunks(args["ino"])}
        if name == "chunk":
            return self.chunk(args["id"])
        if name == "stats":
            return self.stats()
        raise _err(errno.EINVAL, f"unknown KDFS query {name!r}")

    def getattr(self, ino: int) -> dict:
        row = self._db.execute(f"SELECT {_ATTR_COLS}, {_STORED} FROM inodes i WHERE ino = ?", (ino,)).fetchone()
        if row is None:
            raise _err(errno.ENOENT, f"no inode {ino}")
        return _with_stored(row)

    def lookup(self, parent: int, name: bytes) -> dict:
        """Attributes of `name` in directory `parent` (b"." and b".." included)."""
        if len(name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG, f"name of {len(name)} bytes (at most {NAME_MAX})")
        row = self._db.execute(
            "SELECT i.ino, i.mode, i.nlink, i.uid, i.gid, i.rdev, i.size, i.atime_ns, i.mtime_ns, i.ctime_ns, "
            f"{_STORED} FROM dentries d JOIN inodes i ON i.ino = d.ino WHERE d.parent = ? AND d.name = ?",
            (parent, name)).fetchone()
        if row is not None:
            return _with_stored(row)
        p = self._dir(parent)
        if name == b".":
            return self.getattr(parent)
        if name == b"..":
            return self.getattr(p[3])
        raise _err(errno.ENOENT, f"no entry {name!r} in directory {parent}")

    def readdir(self, ino: int, after: bytes | None, limit: int) -> list[tuple[bytes, dict]]:
        """Entries of directory `ino` with names > `after` (all if None), sorted by name bytes,
        at most `limit`. "." and ".." are not listed."""
        self._dir(ino)
        rows = self._db.execute(
            "SELECT d.name, i.ino, i.mode, i.nlink, i.uid, i.gid, i.rdev, i.size, i.atime_ns, i.mtime_ns, "
            f"i.ctime_ns, {_STORED} FROM dentries d JOIN inodes i ON i.ino = d.ino "
            "WHERE d.parent = ? AND d.name > ? ORDER BY d.name LIMIT ?",
            (ino, after or b"", limit)).fetchall()
        return [(r[0], _with_stored(r[1:])) for r in rows]

    def readlink(self, ino: int) -> bytes:
        row = self._db.execute("SELECT mode, target FROM inodes WHERE ino = ?", (ino,)).fetchone()
        if row is None:
            raise _err(errno.ENOENT, f"no inode {ino}")
        if not stat.S_ISLNK(row[0]):
            raise _err(errno.EINVAL, f"inode {ino} is not a symlink")
        return row[1]

    def chunks(self, ino: int) -> list[dict]:
        """The chunk map of `ino`: [{"idx", "id", "length", "nodes"}] sorted by idx."""
        self._inode(ino)
        rows = self._db.execute("SELECT idx, id, length, nodes FROM chunks WHERE ino = ? ORDER BY idx",
                                (ino,)).fetchall()
        return [{"idx": i, "id": c, "length": n, "nodes": json.loads(h)} for i, c, n, h in rows]

    def chunk(self, chunk_id: str) -> dict | None:
        row = self._db.execute("SELECT ino, idx, id, length, nodes FROM chunks WHERE id = ?",
                               (chunk_id,)).fetchone()
        return self._chunk_dict(row) if row else None

    def all_chunks(self) -> Iterator[dict]:
        """Every referenced chunk, by (ino, idx); read in pages, so applying between two items is fine."""
        last = (-1, -1)
        while True:
            rows = self._db.execute(
                "SELECT ino, idx, id, length, nodes FROM chunks WHERE (ino, idx) > (?, ?) "
                "ORDER BY ino, idx LIMIT 1000", last).fetchall()
            if not rows:
                return
            for r in rows:
                yield self._chunk_dict(r)
            last = (rows[-1][0], rows[-1][1])

    def under_replicated(self, online: set[int], replicas: int, limit: int = 1000) -> list[dict]:
        """Chunks with fewer than `replicas` distinct holders in `online`, by (ino, idx); chunks with
        no live holder at all are included (the caller tells lost from repairable)."""
        rows = self._db.execute(
            "SELECT ino, idx, id, length, nodes FROM chunks c WHERE "
            "(SELECT count(DISTINCT h.value) FROM json_each(c.nodes) h "
            " WHERE h.value IN (SELECT value FROM json_each(?))) < ? "
            "ORDER BY ino, idx LIMIT ?",
            (json.dumps(sorted(online)), replicas, limit)).fetchall()
        return [self._chunk_dict(r) for r in rows]

    def orphans(self, limit: int = 1000) -> list[int]:
        """Inodes with no link left (unlinked while maybe open), waiting for a `forget`."""
        rows = self._db.execute("SELECT ino FROM inodes WHERE nlink = 0 ORDER BY ino LIMIT ?", (limit,))
        return [r[0] for r in rows]

    def stats(self) -> dict:
        """Counts: files, dirs, symlinks, other (fifos, sockets, devices), orphans, inodes, bytes
        (sum of regular files' sizes), chunks, chunk_bytes (sum of chunk lengths)."""
        f, d, l_ = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK
        row = self._db.execute(
            f"SELECT count(*), total(mode & 61440 = {f}), total(mode & 61440 = {d}), "
            f"total(mode & 61440 = {l_}), total(nlink = 0), total(CASE WHEN mode & 61440 = {f} "
            "THEN size ELSE 0 END) FROM inodes").fetchone()
        inodes, files, dirs, links, orphans, size = (int(x) for x in row)
        chunks, chunk_bytes = self._db.execute("SELECT count(*), total(length) FROM chunks").fetchone()
        return {"files": files, "dirs": dirs, "symlinks": links, "other": inodes - files - dirs - links,
                "orphans": orphans, "inodes": inodes, "bytes": size, "chunks": chunks,
                "chunk_bytes": int(chunk_bytes)}

    # ---- helpers (inside or outside a transaction)

    @staticmethod
    def _chunk_dict(r: tuple) -> dict:
        return {"ino": r[0], "idx": r[1], "id": r[2], "length": r[3], "nodes": json.loads(r[4])}

    def _inode(self, ino: int) -> tuple:
        """(mode, nlink, parent) of `ino`, or ENOENT."""
        row = self._db.execute("SELECT mode, nlink, parent FROM inodes WHERE ino = ?", (ino,)).fetchone()
        if row is None:
            raise _err(errno.ENOENT, f"no inode {ino}")
        return row

    def _dir(self, ino: int) -> tuple:
        """(ino, mode, nlink, parent) of directory `ino`, or ENOENT / ENOTDIR."""
        mode, nlink, parent = self._inode(ino)
        if not stat.S_ISDIR(mode):
            raise _err(errno.ENOTDIR, f"inode {ino} is not a directory")
        return ino, mode, nlink, parent

    def _entry(self, parent: int, name: bytes) -> tuple | None:
        """(ino, mode, nlink) of `name` in `parent`, or None."""
        return self._db.execute(
            "SELECT i.ino, i.mode, i.nlink FROM dentries d JOIN inodes i ON i.ino = d.ino "
            "WHERE d.parent = ? AND d.name = ?", (parent, name)).fetchone()

    def _touch_dir(self, ino: int, nlink_delta: int = 0) -> None:
        self._db.execute("UPDATE inodes SET nlink = nlink + ?, mtime_ns = ?, ctime_ns = ? WHERE ino = ?",
                         (nlink_delta, self._now, self._now, ino))

    def _create_entry(self, op: dict, mode: int, rdev: int = 0, target: bytes | None = None) -> dict:
        parent, name = _int(op, "parent"), _check_name(op["name"])
        uid, gid = _int(op, "uid"), _int(op, "gid")
        pmode, pgid = self._parent_mode_gid(parent)
        if pmode & stat.S_ISGID:
            # BSD group semantics under a set-group-ID directory, as Linux does; subdirectories inherit it.
            gid = pgid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        ino, now = self._next_ino, self._now
        try:
            self._db.execute("INSERT INTO dentries VALUES (?, ?, ?)", (parent, name, ino))
        except sqlite3.IntegrityError:
            raise _err(errno.EEXIST, f"{name!r} exists in directory {parent}") from None
        is_dir = stat.S_ISDIR(mode)
        nlink, size = (2 if is_dir else 1), (len(target) if target is not None else 0)
        self._db.execute("INSERT INTO inodes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (ino, mode, nlink, uid, gid, rdev, size, now, now, now, parent if is_dir else 0, target))
        self._next_ino = ino + 1
        self._touch_dir(parent, 1 if is_dir else 0)
        return {"attr": {"ino": ino, "mode": mode, "nlink": nlink, "uid": uid, "gid": gid, "rdev": rdev,
                         "size": size, "atime_ns": now, "mtime_ns": now, "ctime_ns": now}}

    def _parent_mode_gid(self, parent: int) -> tuple[int, int]:
        self._dir(parent)
        return self._db.execute("SELECT mode, gid FROM inodes WHERE ino = ?", (parent,)).fetchone()

    def _free_chunks(self, where: str, args: tuple) -> list[str]:
        freed = [r[0] for r in self._db.execute(f"SELECT id FROM chunks WHERE {where} ORDER BY ino, idx", args)]
        if freed:
            self._db.execute(f"DELETE FROM chunks WHERE {where}", args)
        return freed

    # ---- ops (called by apply inside its transaction; self._now is the entry's time)

    def _mknod(self, op: dict) -> dict:
        mode = _int(op, "mode")
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        if stat.S_IFMT(mode) not in _TYPES:
            raise _err(errno.EINVAL, f"mknod of mode {mode:o} (a file, fifo, socket or device)")
        return self._create_entry(op, stat.S_IFMT(mode) | (mode & 0o7777), rdev=_int(op, "rdev", 0))

    def _mkdir(self, op: dict) -> dict:
        return self._create_entry(op, stat.S_IFDIR | (_int(op, "mode") & 0o7777))

    def _symlink(self, op: dict) -> dict:
        target = op["target"]
        if not isinstance(target, bytes) or b"\0" in target:
            raise _err(errno.EINVAL, f"symlink target {target!r} is not bytes without NUL")
        if not target:
            raise _err(errno.ENOENT, "empty symlink target")
        if len(target) >= PATH_MAX:
            raise _err(errno.ENAMETOOLONG, f"symlink target of {len(target)} bytes (at most {PATH_MAX - 1})")
        return self._create_entry(op, stat.S_IFLNK | 0o777, target=target)

    def _link(self, op: dict) -> dict:
        ino, parent, name = _int(op, "ino"), _int(op, "parent"), _check_name(op["name"])
        mode, nlink, _ = self._inode(ino)
        if stat.S_ISDIR(mode):
            raise _err(errno.EPERM, f"hard link to directory {ino}")
        if nlink == 0:
            raise _err(errno.ENOENT, f"inode {ino} has no link left")
        self._dir(parent)
        if self._entry(parent, name) is not None:
            raise _err(errno.EEXIST, f"{name!r} exists in directory {parent}")
        self._db.execute("INSERT INTO dentries VALUES (?, ?, ?)", (parent, name, ino))
        self._db.execute("UPDATE inodes SET nlink = nlink + 1, ctime_ns = ? WHERE ino = ?", (self._now, ino))
        self._touch_dir(parent)
        return {"attr": self.getattr(ino)}

    def _removed_entry(self, op: dict) -> tuple[int, bytes, int, int, int]:
        """The entry an unlink or rmdir names: parent, name, ino, mode, nlink (ENOENT if none)."""
        parent, name = _int(op, "parent"), _check_name(op["name"])
        self._dir(parent)
        e = self._entry(parent, name)
        if e is None:
            raise _err(errno.ENOENT, f"no entry {name!r} in directory {parent}")
        return (parent, name, *e)

    def _unlink(self, op: dict) -> dict:
        parent, name, ino, mode, nlink = self._removed_entry(op)
        if stat.S_ISDIR(mode):
            raise _err(errno.EISDIR, f"{name!r} in directory {parent} is a directory")
        self._db.execute("DELETE FROM dentries WHERE parent = ? AND name = ?", (parent, name))
        self._db.execute("UPDATE inodes SET nlink = ?, ctime_ns = ? WHERE ino = ?", (nlink - 1, self._now, ino))
        self._touch_dir(parent)
        # "drop": the caller knows nobody has it open, so the last link frees it in this same change.
        drop = op.get("drop") is True or op.get("drop") == ino     # True, or the inode the caller means
        freed = self._forget({"ino": ino})["freed"] if nlink == 1 and drop else []
        if nlink == 1 and not drop:
            self._hold(ino, op)
        return {"ino": ino, "nlink": nlink - 1, "freed": freed}

    def _rmdir(self, op: dict) -> dict:
        parent, name, ino, mode, _ = self._removed_entry(op)
        if not stat.S_ISDIR(mode):
            raise _err(errno.ENOTDIR, f"{name!r} in directory {parent} is not a directory")
        self._check_empty(ino)
        self._db.execute("DELETE FROM dentries WHERE parent = ? AND name = ?", (parent, name))
        self._db.execute("DELETE FROM inodes WHERE ino = ?", (ino,))
        self._touch_dir(parent, -1)
        return {"ino": ino}

    def _check_empty(self, ino: int) -> None:
        if self._db.execute("SELECT 1 FROM dentries WHERE parent = ? LIMIT 1", (ino,)).fetchone():
            raise _err(errno.ENOTEMPTY, f"directory {ino} is not empty")

    def _within(self, ino: int, ancestor: int) -> bool:
        """Is directory `ino` `ancestor` or below it?"""
        while True:
            if ino == ancestor:
                return True
            if ino == ROOT:
                return False
            ino = self._inode(ino)[2]

    def _rename(self, op: dict) -> dict:
        parent, name = _int(op, "parent"), _check_name(op["name"])
        newparent, newname = _int(op, "newparent"), _check_name(op["newname"])
        flags = _int(op, "flags", 0)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise _err(errno.EINVAL, f"rename flags {flags}")
        self._dir(parent)
        self._dir(newparent)
        src = self._entry(parent, name)
        if src is None:
            raise _err(errno.ENOENT, f"no entry {name!r} in directory {parent}")
        dst = self._entry(newparent, newname)
        if flags & RENAME_NOREPLACE and dst is not None:
            raise _err(errno.EEXIST, f"{newname!r} exists in directory {newparent}")
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise _err(errno.ENOENT, f"no entry {newname!r} in directory {newparent}")
            return self._exchange(parent, name, src, newparent, newname, dst)
        ino, mode, _ = src
        src_dir = stat.S_ISDIR(mode)
        if dst is not None and dst[0] == ino:
            return {"replaced": None, "nlink": None}         # two links of one file: nothing to do
        if src_dir and parent != newparent and self._within(newparent, ino):
            raise _err(errno.EINVAL, f"directory {ino} moved into itself (directory {newparent})")
        db, now = self._db, self._now
        replaced = replaced_nlink = None
        nlink_delta = {parent: 0, newparent: 0}
        if dst is not None:
            replaced, dmode, dnlink = dst
            if stat.S_ISDIR(dmode):
                if not src_dir:
                    raise _err(errno.EISDIR, f"{newname!r} in directory {newparent} is a directory")
                self._check_empty(replaced)
                db.execute("DELETE FROM inodes WHERE ino = ?", (replaced,))
                nlink_delta[newparent] -= 1
                replaced_nlink = 0
            else:
                if src_dir:
                    raise _err(errno.ENOTDIR, f"{newname!r} in directory {newparent} is not a directory")
                replaced_nlink = dnlink - 1
                db.execute("UPDATE inodes SET nlink = ?, ctime_ns = ? WHERE ino = ?", (replaced_nlink, now, replaced))
                if replaced_nlink == 0:
                    self._hold(replaced, op)
            db.execute("DELETE FROM dentries WHERE parent = ? AND name = ?", (newparent, newname))
        db.execute("UPDATE dentries SET parent = ?, name = ? WHERE parent = ? AND name = ?",
                   (newparent, newname, parent, name))
        if src_dir and parent != newparent:
            nlink_delta[parent] -= 1
            nlink_delta[newparent] += 1
            db.execute("UPDATE inodes SET parent = ?, ctime_ns = ? WHERE ino = ?", (newparent, now, ino))
        else:
            db.execute("UPDATE inodes SET ctime_ns = ? WHERE ino = ?", (now, ino))
        for d, delta in nlink_delta.items():
            self._touch_dir(d, delta)
        return {"replaced": replaced, "nlink": replaced_nlink}

    def _exchange(self, parent: int, name: bytes, src: tuple, newparent: int, newname: bytes,
                  dst: tuple) -> dict:
        if src[0] == dst[0]:
            return {"replaced": None, "nlink": None}
        src_dir, dst_dir = stat.S_ISDIR(src[1]), stat.S_ISDIR(dst[1])
        if parent != newparent:
            if src_dir and self._within(newparent, src[0]):
                raise _err(errno.EINVAL, f"directory {src[0]} moved into itself (directory {newparent})")
            if dst_dir and self._within(parent, dst[0]):
                raise _err(errno.EINVAL, f"directory {dst[0]} moved into itself (directory {parent})")
        db, now = self._db, self._now
        db.execute("UPDATE dentries SET ino = ? WHERE parent = ? AND name = ?", (dst[0], parent, name))
        db.execute("UPDATE dentries SET ino = ? WHERE parent = ? AND name = ?", (src[0], newparent, newname))
        db.execute("UPDATE inodes SET ctime_ns = ?, parent = CASE WHEN parent = 0 THEN 0 ELSE ? END "
                   "WHERE ino = ?", (now, newparent, src[0]))
        db.execute("UPDATE inodes SET ctime_ns = ?, parent = CASE WHEN parent = 0 THEN 0 ELSE ? END "
                   "WHERE ino = ?", (now, parent, dst[0]))
        moved = int(src_dir) - int(dst_dir)            # subdirectories going from parent to newparent
        nlink_delta = {parent: 0, newparent: 0}
        if parent != newparent:
            nlink_delta[parent] -= moved
            nlink_delta[newparent] += moved
        for d, delta in nlink_delta.items():
            self._touch_dir(d, delta)
        return {"replaced": None, "nlink": None}

    def _cut(self, ino: int, size: int) -> list[str]:
        """Drop the chunks of `ino` past `size` and shorten the one `size` cuts; return freed ids."""
        cs = self.chunk_size
        freed = self._free_chunks("ino = ? AND idx >= ?", (ino, -(-size // cs)))
        if size % cs:
            idx = size // cs
            self._db.execute("UPDATE chunks SET length = ? WHERE ino = ? AND idx = ? AND length > ?",
                             (size - idx * cs, ino, idx, size - idx * cs))
        return freed

    def _setattr(self, op: dict) -> dict:
        ino = _int(op, "ino")
        mode, _, _ = self._inode(ino)
        now = self._now
        sets: dict[str, int] = {}
        freed: list[str] = []
        if op.get("mode") is not None:
            sets["mode"] = stat.S_IFMT(mode) | (_int(op, "mode") & 0o7777)
        for k in ("uid", "gid", "atime_ns", "mtime_ns"):
            if op.get(k) is not None:
                sets[k] = _int(op, k)
        if op.get("size") is not None:
            size = _int(op, "size")
            if stat.S_ISDIR(mode):
                raise _err(errno.EISDIR, f"inode {ino} is a directory")
            if not stat.S_ISREG(mode):
                raise _err(errno.EINVAL, f"size of inode {ino}, not a regular file")
            if size < 0:
                raise _err(errno.EINVAL, f"size {size}")
            sets["size"] = size
            sets.setdefault("mtime_ns", now)
            freed = self._cut(ino, size)
        sets["ctime_ns"] = _int(op, "ctime_ns") if op.get("ctime_ns") is not None else now
        self._db.execute(f"UPDATE inodes SET {', '.join(f'{k} = ?' for k in sets)} WHERE ino = ?",
                         (*sets.values(), ino))
        return {"attr": self.getattr(ino), "freed": freed}

    def _commit(self, op: dict) -> dict:
        ino = _int(op, "ino")
        mode, _, _ = self._inode(ino)
        if stat.S_ISDIR(mode):
            raise _err(errno.EISDIR, f"inode {ino} is a directory")
        if not stat.S_ISREG(mode):
            raise _err(errno.EINVAL, f"data for inode {ino}, not a regular file")
        size = _int(op, "size")
        mtime = _int(op, "mtime_ns") if op.get("mtime_ns") is not None else self._now
        chunks = op["chunks"]
        if size < 0 or not isinstance(chunks, (list, tuple)):
            raise _err(errno.EINVAL, f"commit of size {size}, chunks {chunks!r}")
        db, cs = self._db, self.chunk_size
        freed: list[str] = []
        seen_idx, seen_id = set(), set()
        for c in chunks:
            if not isinstance(c, dict):
                raise _err(errno.EINVAL, f"chunk {c!r} is not a dict")
            idx, length, cid, nodes = _int(c, "idx"), _int(c, "length"), c["id"], _nodes(c["nodes"])
            if not isinstance(cid, str) or not cid:
                raise _err(errno.EINVAL, f"chunk id {cid!r}")
            if idx < 0 or not 0 <= length <= cs:
                raise _err(errno.EINVAL, f"chunk {cid} at {idx} of length {length} (chunk size {cs})")
            if idx in seen_idx or cid in seen_id:
                raise _err(errno.EINVAL, f"chunk {cid} at {idx} twice in one commit")
            seen_idx.add(idx)
            seen_id.add(cid)
            other = db.execute("SELECT ino, idx FROM chunks WHERE id = ?", (cid,)).fetchone()
            if other is not None and other != (ino, idx):
                raise _err(errno.EINVAL, f"chunk {cid} is already inode {other[0]}'s chunk {other[1]}")
            old = db.execute("SELECT id FROM chunks WHERE ino = ? AND idx = ?", (ino, idx)).fetchone()
            if old is None:
                db.execute("INSERT INTO chunks VALUES (?, ?, ?, ?, ?)", (ino, idx, cid, length, nodes))
            else:
                if old[0] != cid:
                    freed.append(old[0])
                db.execute("UPDATE chunks SET id = ?, length = ?, nodes = ? WHERE ino = ? AND idx = ?",
                           (cid, length, nodes, ino, idx))
        # Uploads this file's writer superseded before committing them (it wrote a chunk again while
        # the first version was on its way): never referenced, so freed here with the others.
        discard = op.get("discard") or []
        if not isinstance(discard, (list, tuple)) or any(not isinstance(c, str) or not c for c in discard):
            raise _err(errno.EINVAL, f"discarded chunks {discard!r} are not a list of chunk ids")
        for cid in dict.fromkeys(discard):
            if cid not in seen_id and db.execute("SELECT 1 FROM chunks WHERE id = ?", (cid,)).fetchone() is None:
                freed.append(cid)
        db.execute("UPDATE inodes SET size = max(size, ?), mtime_ns = ?, ctime_ns = ? WHERE ino = ?",
                   (size, mtime, self._now, ino))
        return {"attr": self.getattr(ino), "freed": freed}

    def _replicas(self, op: dict) -> dict:
        cid, nodes = op["id"], _nodes(op["nodes"])
        cur = self._db.execute("UPDATE chunks SET nodes = ? WHERE id = ?", (nodes, cid))
        if cur.rowcount == 0:
            raise _err(errno.ENOENT, f"no chunk {cid!r} is referenced")
        return {}

    def _hold(self, ino: int, op: dict) -> None:
        """An orphan is held by the mount that may have it open (op["holder"]): when that mount
        starts again, nothing can have it open any more ("release_held")."""
        holder = op.get("holder")
        if isinstance(holder, str) and holder:
            self._db.execute("INSERT OR REPLACE INTO held VALUES (?, ?)", (ino, holder))

    def _release_held(self, op: dict) -> dict:
        holder = op.get("holder")
        if not isinstance(holder, str) or not holder:
            raise _err(errno.EINVAL, "release_held needs a holder")
        freed: list[str] = []
        for (ino,) in self._db.execute("SELECT ino FROM held WHERE holder = ? ORDER BY ino", (holder,)).fetchall():
            freed += self._forget({"ino": ino})["freed"]
        self._db.execute("DELETE FROM held WHERE holder = ?", (holder,))
        return {"freed": freed}

    def _forget(self, op: dict) -> dict:
        ino = _int(op, "ino")
        row = self._db.execute("SELECT nlink FROM inodes WHERE ino = ?", (ino,)).fetchone()
        if row is None or row[0] > 0:
            return {"freed": []}
        freed = self._free_chunks("ino = ?", (ino,))
        self._db.execute("DELETE FROM inodes WHERE ino = ?", (ino,))
        self._db.execute("DELETE FROM held WHERE ino = ?", (ino,))
        return {"freed": freed}
