"""The metadata replica: every op and its errors, determinism across replicas, the log, snapshots."""

import errno
import itertools
import random
import sqlite3
import stat

import pytest

from kdfs.metastore import ROOT, MetaStore
from kerrighed.errors import FsError

CS = 1000       # a small chunk size keeps the truncation arithmetic readable
REG, DIR = stat.S_IFREG, stat.S_IFDIR


class Leader:
    """Drives a store as the leader would: stamps seq, term and time; a failing op uses no seq."""

    def __init__(self, store: MetaStore, term: int = 1):
        self.m, self.term = store, term

    def __call__(self, op: str, **kw) -> dict:
        seq = self.m.applied + 1
        return self.m.apply(seq, self.term, {"op": op, "now": seq * 1000, **kw})

    def mknod(self, parent, name, mode=REG | 0o644, **kw):
        return self("mknod", parent=parent, name=name, mode=mode, uid=kw.pop("uid", 1000),
                    gid=kw.pop("gid", 100), rdev=kw.pop("rdev", 0))["attr"]["ino"]

    def mkdir(self, parent, name, mode=0o755):
        return self("mkdir", parent=parent, name=name, mode=mode, uid=1000, gid=100)["attr"]["ino"]

    def commit(self, ino, chunks, size):
        return self("commit", ino=ino, chunks=[{"idx": i, "id": c, "length": n, "nodes": [1, 2]}
                                               for i, c, n in chunks], size=size, mtime_ns=None)


def dump(path) -> dict:
    """Every table of the database at `path`, rows in order, and the schema."""
    db = sqlite3.connect(path)
    try:
        tables = [r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        out = {"schema": db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()}
        for t in tables:
            ncols = len(db.execute(f"SELECT * FROM {t} LIMIT 0").description)
            order = ", ".join(str(i) for i in range(1, ncols + 1))
            out[t] = db.execute(f"SELECT * FROM {t} ORDER BY {order}").fetchall()
        return out
    finally:
        db.close()


@pytest.fixture
def store(tmp_path):
    m = MetaStore(tmp_path / "meta.db", chunk_size=CS)
    yield m
    m.close()


@pytest.fixture
def L(store):
    return Leader(store)


def fails(code, fn, *a, **kw):
    with pytest.raises(FsError) as e:
        fn(*a, **kw)
    assert e.value.errno == code, e.value
    return e.value


def names(m, ino):
    return [n for n, _ in m.readdir(ino, None, 1 << 20)]


# ---- creation, reads

def test_a_fresh_store_has_the_root_and_an_empty_log(store):
    root = store.getattr(ROOT)
    assert root == {"ino": 1, "mode": DIR | 0o1777, "nlink": 2, "uid": 0, "gid": 0, "rdev": 0, "size": 0,
                    "atime_ns": 0, "mtime_ns": 0, "ctime_ns": 0, "stored": 0}
    assert store.applied == 0 and store.last_term() == 0 and store.first_retained() == 1
    assert store.entries(0) == [] and store.term_at(0) == 0 and store.term_at(1) is None
    assert store.readdir(ROOT, None, 10) == []
    assert store.chunk_size == CS
    assert store.stats() == {"files": 0, "dirs": 1, "symlinks": 0, "other": 0, "orphans": 0, "inodes": 1,
                             "bytes": 0, "chunks": 0, "chunk_bytes": 0}


def test_mknod_allocates_inodes_in_order_and_stamps_the_leaders_time(store, L):
    r = L("mknod", parent=ROOT, name=b"a", mode=REG | 0o640, uid=5, gid=6, rdev=0)
    assert r == {"attr": {"ino": 2, "mode": REG | 0o640, "nlink": 1, "uid": 5, "gid": 6, "rdev": 0, "size": 0,
                          "atime_ns": 1000, "mtime_ns": 1000, "ctime_ns": 1000}}
    assert store.lookup(ROOT, b"a") == {**r["attr"], "stored": 0} == store.getattr(2)
    assert L.mknod(ROOT, b"b") == 3
    root = store.getattr(ROOT)
    assert root["mtime_ns"] == root["ctime_ns"] == 2000 and root["nlink"] == 2
    assert names(store, ROOT) == [b"a", b"b"]
    # a type of 0 is a regular file; fifos, sockets and devices keep their type and rdev
    assert stat.S_ISREG(store.getattr(L.mknod(ROOT, b"plain", mode=0o600))["mode"])
    fifo = store.getattr(L.mknod(ROOT, b"fifo", mode=stat.S_IFIFO | 0o600))
    assert stat.S_ISFIFO(fifo["mode"])
    dev = store.getattr(L.mknod(ROOT, b"null", mode=stat.S_IFCHR | 0o666, rdev=0x103))
    assert stat.S_ISCHR(dev["mode"]) and dev["rdev"] == 0x103
    assert stat.S_ISSOCK(store.getattr(L.mknod(ROOT, b"sock", mode=stat.S_IFSOCK | 0o600))["mode"])


def test_mknod_errors(store, L):
    f = L.mknod(ROOT, b"f")
    fails(errno.EEXIST, L.mknod, ROOT, b"f")
    fails(errno.ENOENT, L.mknod, 999, b"g")
    fails(errno.ENOTDIR, L.mknod, f, b"g")
    fails(errno.EINVAL, L.mknod, ROOT, b"d", mode=DIR | 0o755)       # mkdir makes directories
    fails(errno.EINVAL, L.mknod, ROOT, b"l", mode=stat.S_IFLNK | 0o777)
    fails(errno.EINVAL, L, "mknod", parent=ROOT, name=b"x", mode=REG)     # no uid: a malformed op
    fails(errno.EINVAL, L, "nosuchop")
    assert store.applied == 1


@pytest.mark.parametrize("name, code", [
    (b"", errno.EINVAL), (b".", errno.EINVAL), (b"..", errno.EINVAL), (b"a/b", errno.EINVAL),
    (b"a\0b", errno.EINVAL), ("text", errno.EINVAL), (b"x" * 256, errno.ENAMETOOLONG),
])
def test_bad_names_are_refused_by_every_op_that_makes_an_entry(store, L, name, code):
    f = L.mknod(ROOT, b"f")
    fails(code, L.mknod, ROOT, name)
    fails(code, L.mkdir, ROOT, name)
    fails(code, L, "symlink", parent=ROOT, name=name, target=b"t", uid=0, gid=0)
    fails(code, L, "link", ino=f, parent=ROOT, name=name)
    fails(code, L, "rename", parent=ROOT, name=b"f", newparent=ROOT, newname=name, flags=0)
    assert names(store, ROOT) == [b"f"]


def test_names_are_any_bytes_up_to_255_and_list_in_byte_order(store, L):
    odd = [bytes([b]) for b in range(1, 256) if b not in b"/."]
    weird = [b"\xff\xfe", "é".encode(), b"\x01\x02", b"a\n b", b"x" * 255, b"..."] + odd
    for n in weird:
        L.mknod(ROOT, n)
    assert names(store, ROOT) == sorted(set(weird))
    for n in weird:
        assert store.lookup(ROOT, n)["ino"] > 1
    fails(errno.ENAMETOOLONG, store.lookup, ROOT, b"x" * 256)
    fails(errno.ENOENT, store.lookup, ROOT, b"x" * 254)


def test_lookup_and_readdir_errors_and_dot_entries(store, L):
    d = L.mkdir(ROOT, b"d")
    f = L.mknod(d, b"f")
    fails(errno.ENOENT, store.lookup, ROOT, b"nope")
    fails(errno.ENOENT, store.lookup, 999, b"f")
    fails(errno.ENOTDIR, store.lookup, f, b"x")
    fails(errno.ENOTDIR, store.readdir, f, None, 10)
    fails(errno.ENOENT, store.readdir, 999, None, 10)
    fails(errno.ENOENT, store.getattr, 999)
    assert store.lookup(d, b".")["ino"] == d and store.lookup(d, b"..")["ino"] == ROOT
    assert store.lookup(ROOT, b"..")["ino"] == ROOT


# ---- directories

def test_mkdir_and_rmdir_keep_the_parents_link_count(store, L):
    d = L.mkdir(ROOT, b"d", mode=0o2750)
    a = store.getattr(d)
    assert a["mode"] == DIR | 0o2750 and a["nlink"] == 2 and a["size"] == 0
    assert store.getattr(ROOT)["nlink"] == 3
    e = L.mkdir(d, b"e")
    assert store.getattr(d)["nlink"] == 3 and store.getattr(ROOT)["nlink"] == 3
    L.mknod(d, b"file")
    assert store.getattr(d)["nlink"] == 3           # files do not count
    fails(errno.EEXIST, L.mkdir, ROOT, b"d")
    fails(errno.ENOTEMPTY, L, "rmdir", parent=ROOT, name=b"d")
    fails(errno.ENOTDIR, L, "rmdir", parent=d, name=b"file")
    fails(errno.ENOENT, L, "rmdir", parent=d, name=b"nope")
    fails(errno.EISDIR, L, "unlink", parent=d, name=b"e")
    before = store.applied
    assert L("rmdir", parent=d, name=b"e") == {"ino": e}
    fails(errno.ENOENT, store.getattr, e)
    a = store.getattr(d)
    assert a["nlink"] == 2 and a["mtime_ns"] == a["ctime_ns"] == (before + 1) * 1000
    L("unlink", parent=d, name=b"file")
    L("rmdir", parent=ROOT, name=b"d")
    assert store.getattr(ROOT)["nlink"] == 2 and names(store, ROOT) == []


# ---- symlinks, hard links, orphans

def test_symlink_and_readlink(store, L):
    r = L("symlink", parent=ROOT, name=b"l", target=b"../some/\xfftarget", uid=7, gid=8)["attr"]
    assert r["mode"] == stat.S_IFLNK | 0o777 and r["size"] == len(b"../some/\xfftarget") and r["nlink"] == 1
    assert store.readlink(r["ino"]) == b"../some/\xfftarget"
    assert store.stats()["symlinks"] == 1
    f = L.mknod(ROOT, b"f")
    fails(errno.EINVAL, store.readlink, f)
    fails(errno.ENOENT, store.readlink, 999)
    fails(errno.EEXIST, L, "symlink", parent=ROOT, name=b"f", target=b"x", uid=0, gid=0)
    fails(errno.ENOENT, L, "symlink", parent=ROOT, name=b"e", target=b"", uid=0, gid=0)
    fails(errno.ENAMETOOLONG, L, "symlink", parent=ROOT, name=b"e", target=b"x" * 4096, uid=0, gid=0)


def test_hard_links_count_and_the_last_unlink_leaves_an_orphan_until_forget(store, L):
    f = L.mknod(ROOT, b"f")
    d = L.mkdir(ROOT, b"d")
    L.commit(f, [(0, "c0", CS), (1, "c1", 10)], CS + 10)
    r = L("link", ino=f, parent=d, name=b"g")["attr"]
    assert r["ino"] == f and r["nlink"] == 2 and r["ctime_ns"] == store.applied * 1000
    assert store.lookup(d, b"g")["ino"] == f
    fails(errno.EPERM, L, "link", ino=d, parent=ROOT, name=b"d2")
    fails(errno.EEXIST, L, "link", ino=f, parent=ROOT, name=b"d")
    fails(errno.ENOENT, L, "link", ino=999, parent=ROOT, name=b"x")
    fails(errno.ENOTDIR, L, "link", ino=f, parent=f, name=b"x")
    assert L("unlink", parent=ROOT, name=b"f") == {"ino": f, "nlink": 1, "freed": []}
    fails(errno.ENOENT, L, "unlink", parent=ROOT, name=b"f")
    assert L("forget", ino=f) == {"freed": []}                      # still linked: nothing to do
    assert L("unlink", parent=d, name=b"g") == {"ino": f, "nlink": 0, "freed": []}
    a = store.getattr(f)                                            # open files still read it
    assert a["nlink"] == 0 and a["size"] == CS + 10
    assert [c["id"] for c in store.chunks(f)] == ["c0", "c1"]
    assert store.orphans() == [f] and store.stats()["orphans"] == 1
    fails(errno.ENOENT, L, "link", ino=f, parent=ROOT, name=b"back")  # no resurrection
    L.commit(f, [(1, "c1b", 20)], CS + 20)                            # an open file still writes
    assert L("forget", ino=f) == {"freed": ["c0", "c1b"]}
    fails(errno.ENOENT, store.getattr, f)
    assert store.chunk("c0") is None and store.orphans() == []
    assert L("forget", ino=f) == {"freed": []}                      # absent: nothing to do


def test_unlink_with_drop_frees_a_file_nobody_has_open_in_the_same_change(store, L):
    f = L.mknod(ROOT, b"f")
    L("link", ino=f, parent=ROOT, name=b"g")
    L.commit(f, [(0, "c0", CS)], CS)
    assert L("unlink", parent=ROOT, name=b"f", drop=True) == {"ino": f, "nlink": 1, "freed": []}
    assert L("unlink", parent=ROOT, name=b"g", drop=True) == {"ino": f, "nlink": 0, "freed": ["c0"]}
    fails(errno.ENOENT, store.getattr, f)
    assert store.orphans() == [] and store.chunk("c0") is None


def test_reads_report_the_bytes_chunks_hold_and_holes_hold_none(store, L):
    f = L.mknod(ROOT, b"sparse")
    L.commit(f, [(0, "c0", 100), (9, "c9", CS)], 10 * CS)
    assert store.getattr(f)["size"] == 10 * CS and store.getattr(f)["stored"] == CS + 100
    assert store.lookup(ROOT, b"sparse")["stored"] == CS + 100
    assert dict(store.readdir(ROOT, None, 10))[b"sparse"]["stored"] == CS + 100


def test_unlink_drops_only_the_inode_the_caller_means(store, L):
    a = L.mknod(ROOT, b"a")
    b = L.mknod(ROOT, b"b")
    L("rename", parent=ROOT, name=b"b", newparent=ROOT, newname=b"a", flags=0)   # "a" is b now
    assert L("unlink", parent=ROOT, name=b"a", drop=a)["freed"] == []           # stale hint: kept
    assert store.orphans() == sorted([a, b])


def test_a_set_group_id_directory_passes_on_its_group_and_the_bit(store, L):
    d = L("mkdir", parent=ROOT, name=b"d", mode=0o2775, uid=1, gid=50)["attr"]["ino"]
    f = L("mknod", parent=d, name=b"f", mode=REG | 0o644, uid=1000, gid=100, rdev=0)["attr"]
    sub = L("mkdir", parent=d, name=b"s", mode=0o755, uid=1000, gid=100)["attr"]
    assert f["gid"] == 50 and not f["mode"] & stat.S_ISGID
    assert sub["gid"] == 50 and sub["mode"] & stat.S_ISGID
    plain = L("mknod", parent=ROOT, name=b"p", mode=REG | 0o644, uid=1000, gid=100, rdev=0)["attr"]
    assert plain["gid"] == 100


def test_orphans_held_by_a_mount_go_when_that_mount_starts_again(store, L):
    a, b, c = (L.mknod(ROOT, n) for n in (b"a", b"b", b"c"))
    L.commit(a, [(0, "ca", 10)], 10)
    L("unlink", parent=ROOT, name=b"a", holder="m1")              # open on mount m1
    L("rename", parent=ROOT, name=b"b", newparent=ROOT, newname=b"c", flags=0, holder="m2")
    assert sorted(store.orphans()) == [a, c]
    fails(errno.EINVAL, L, "release_held", holder="")
    assert L("release_held", holder="m1") == {"freed": ["ca"]}
    assert store.orphans() == [c]
    assert L("release_held", holder="m1") == {"freed": []}
    L("forget", ino=c)                                              # released by its own mount
    assert L("release_held", holder="m2") == {"freed": []} and store.orphans() == []


# ---- rename

def test_rename_moves_within_and_across_directories(store, L):
    f = L.mknod(ROOT, b"f")
    d = L.mkdir(ROOT, b"d")
    assert L("rename", parent=ROOT, name=b"f", newparent=ROOT, newname=b"g", flags=0) == \
        {"replaced": None, "nlink": None}
    assert names(store, ROOT) == [b"d", b"g"]
    L("rename", parent=ROOT, name=b"g", newparent=d, newname=b"h", flags=0)
    now = store.applied * 1000
    assert names(store, ROOT) == [b"d"] and names(store, d) == [b"h"]
    assert store.getattr(f)["ctime_ns"] == now
    for ino in (ROOT, d):
        a = store.getattr(ino)
        assert a["mtime_ns"] == a["ctime_ns"] == now
    assert store.getattr(ROOT)["nlink"] == 3 and store.getattr(d)["nlink"] == 2
    fails(errno.ENOENT, L, "rename", parent=ROOT, name=b"nope", newparent=ROOT, newname=b"x", flags=0)
    fails(errno.ENOENT, L, "rename", parent=d, name=b"h", newparent=999, newname=b"x", flags=0)
    fails(errno.ENOTDIR, L, "rename", parent=d, name=b"h", newparent=f, newname=b"x", flags=0)
    fails(errno.EINVAL, L, "rename", parent=d, name=b"h", newparent=ROOT, newname=b"x", flags=3)


def test_rename_over_a_file_replaces_it_in_one_step(store, L):
    a, b = L.mknod(ROOT, b"a"), L.mknod(ROOT, b"b")
    L("link", ino=b, parent=ROOT, name=b"b2")
    assert L("rename", parent=ROOT, name=b"a", newparent=ROOT, newname=b"b", flags=0) == \
        {"replaced": b, "nlink": 1}
    assert store.lookup(ROOT, b"b")["ino"] == a and names(store, ROOT) == [b"b", b"b2"]
    assert store.getattr(b)["ctime_ns"] == store.applied * 1000
    assert L("rename", parent=ROOT, name=b"b", newparent=ROOT, newname=b"b2", flags=0) == \
        {"replaced": b, "nlink": 0}
    assert store.getattr(b)["nlink"] == 0 and store.orphans() == [b]
    assert names(store, ROOT) == [b"b2"] and store.lookup(ROOT, b"b2")["ino"] == a


def test_rename_noreplace_and_exchange(store, L):
    a, b = L.mknod(ROOT, b"a"), L.mknod(ROOT, b"b")
    fails(errno.EEXIST, L, "rename", parent=ROOT, name=b"a", newparent=ROOT, newname=b"b", flags=1)
    L("rename", parent=ROOT, name=b"a", newparent=ROOT, newname=b"c", flags=1)
    assert L("rename", parent=ROOT, name=b"c", newparent=ROOT, newname=b"b", flags=2) == \
        {"replaced": None, "nlink": None}
    assert store.lookup(ROOT, b"b")["ino"] == a and store.lookup(ROOT, b"c")["ino"] == b
    assert store.getattr(a)["nlink"] == store.getattr(b)["nlink"] == 1
    fails(errno.ENOENT, L, "rename", parent=ROOT, name=b"c", newparent=ROOT, newname=b"zz", flags=2)
    # a directory swapped with a file in another directory: both parents' link counts follow
    d, e = L.mkdir(ROOT, b"d"), L.mkdir(ROOT, b"e")
    sub = L.mkdir(d, b"sub")
    f = L.mknod(e, b"f")
    assert store.getattr(d)["nlink"] == 3 and store.getattr(e)["nlink"] == 2
    L("rename", parent=d, name=b"sub", newparent=e, newname=b"f", flags=2)
    assert store.lookup(e, b"f")["ino"] == sub and store.lookup(d, b"sub")["ino"] == f
    assert store.getattr(d)["nlink"] == 2 and store.getattr(e)["nlink"] == 3
    assert store.lookup(sub, b"..")["ino"] == e
    # exchanging a directory with its own ancestor would cut it off the tree
    inner = L.mkdir(sub, b"inner")
    fails(errno.EINVAL, L, "rename", parent=sub, name=b"inner", newparent=e, newname=b"f", flags=2)
    fails(errno.EINVAL, L, "rename", parent=e, name=b"f", newparent=sub, newname=b"inner", flags=2)
    assert store.lookup(sub, b"inner")["ino"] == inner


def test_rename_directory_rules(store, L):
    d = L.mkdir(ROOT, b"d")
    sub = L.mkdir(d, b"sub")
    deep = L.mkdir(sub, b"deep")
    f = L.mknod(ROOT, b"f")
    empty = L.mkdir(ROOT, b"empty")
    full = L.mkdir(ROOT, b"full")
    L.mknod(full, b"x")
    fails(errno.EISDIR, L, "rename", parent=ROOT, name=b"f", newparent=ROOT, newname=b"empty", flags=0)
    fails(errno.ENOTDIR, L, "rename", parent=ROOT, name=b"d", newparent=ROOT, newname=b"f", flags=0)
    fails(errno.ENOTEMPTY, L, "rename", parent=ROOT, name=b"d", newparent=ROOT, newname=b"full", flags=0)
    fails(errno.EINVAL, L, "rename", parent=ROOT, name=b"d", newparent=deep, newname=b"d", flags=0)
    fails(errno.EINVAL, L, "rename", parent=ROOT, name=b"d", newparent=d, newname=b"d", flags=0)
    assert store.getattr(ROOT)["nlink"] == 5
    # over an empty directory: the replaced directory goes away, link counts stay right
    assert L("rename", parent=d, name=b"sub", newparent=ROOT, newname=b"empty", flags=0) == \
        {"replaced": empty, "nlink": 0}
    fails(errno.ENOENT, store.getattr, empty)
    assert store.lookup(ROOT, b"empty")["ino"] == sub and store.lookup(sub, b"..")["ino"] == ROOT
    assert store.getattr(ROOT)["nlink"] == 5 and store.getattr(d)["nlink"] == 2
    # a plain move down and up again
    L("rename", parent=ROOT, name=b"empty", newparent=d, newname=b"back", flags=0)
    assert store.getattr(ROOT)["nlink"] == 4 and store.getattr(d)["nlink"] == 3
    assert store.lookup(sub, b"..")["ino"] == d and store.lookup(deep, b"..")["ino"] == sub
    assert store.stats()["dirs"] == 5


def test_rename_between_links_of_one_file_does_nothing(store, L):
    f = L.mknod(ROOT, b"a")
    L("link", ino=f, parent=ROOT, name=b"b")
    before = store.getattr(f)
    assert L("rename", parent=ROOT, name=b"a", newparent=ROOT, newname=b"b", flags=0) == \
        {"replaced": None, "nlink": None}
    assert names(store, ROOT) == [b"a", b"b"] and store.getattr(f) == before
    assert L("rename", parent=ROOT, name=b"a", newparent=ROOT, newname=b"a", flags=0)["replaced"] is None
    fails(errno.EEXIST, L, "rename", parent=ROOT, name=b"a", newparent=ROOT, newname=b"b", flags=1)


# ---- attributes, data

def test_setattr_changes_what_it_is_given_and_the_ctime(store, L):
    f = L.mknod(ROOT, b"f", mode=REG | 0o644)
    r = L("setattr", ino=f, mode=0o4711, uid=0, gid=0, atime_ns=5, mtime_ns=6)
    a = r["attr"]
    assert r["freed"] == [] and a["mode"] == REG | 0o4711 and a["uid"] == a["gid"] == 0
    assert (a["atime_ns"], a["mtime_ns"], a["ctime_ns"]) == (5, 6, store.applied * 1000)
    a = L("setattr", ino=f, ctime_ns=77)["attr"]
    assert a["ctime_ns"] == 77 and a["mtime_ns"] == 6
    d = L.mkdir(ROOT, b"d")
    assert L("setattr", ino=d, mode=0o700)["attr"]["mode"] == DIR | 0o700
    fails(errno.EISDIR, L, "setattr", ino=d, size=0)
    lnk = L("symlink", parent=ROOT, name=b"l", target=b"t", uid=0, gid=0)["attr"]["ino"]
    fails(errno.EINVAL, L, "setattr", ino=lnk, size=0)
    fails(errno.EINVAL, L, "setattr", ino=f, size=-1)
    fails(errno.ENOENT, L, "setattr", ino=999, mode=0o600)


def test_truncate_frees_whole_chunks_and_shortens_the_cut_one(store, L):
    f = L.mknod(ROOT, b"f")
    L.commit(f, [(0, "c0", CS), (1, "c1", CS), (2, "c2", CS), (3, "c3", 500)], 3 * CS + 500)
    assert store.getattr(f)["size"] == 3500 and store.stats()["bytes"] == 3500
    r = L("setattr", ino=f, size=1200)
    assert r["freed"] == ["c2", "c3"] and r["attr"]["size"] == 1200
    assert r["attr"]["mtime_ns"] == r["attr"]["ctime_ns"] == store.applied * 1000
    assert [(c["idx"], c["id"], c["length"]) for c in store.chunks(f)] == [(0, "c0", CS), (1, "c1", 200)]
    r = L("setattr", ino=f, size=5000)                # growing only moves the size: a hole
    assert r["freed"] == [] and r["attr"]["size"] == 5000
    assert [(c["idx"], c["length"]) for c in store.chunks(f)] == [(0, CS), (1, 200)]
    r = L("setattr", ino=f, size=1000, mtime_ns=42)   # exactly on a chunk boundary
    assert r["freed"] == ["c1"] and r["attr"]["mtime_ns"] == 42
    assert [(c["idx"], c["length"]) for c in store.chunks(f)] == [(0, CS)]
    assert L("setattr", ino=f, size=0)["freed"] == ["c0"] and store.chunks(f) == []
    assert store.stats()["chunks"] == 0


def test_commit_publishes_chunks_and_frees_the_ones_it_replaces(store, L):
    f = L.mknod(ROOT, b"f")
    g = L.mknod(ROOT, b"g")
    r = L.commit(f, [(0, "a0", CS), (1, "a1", 300)], 1300)
    assert r["freed"] == [] and r["attr"]["size"] == 1300 and r["attr"]["mtime_ns"] == store.applied * 1000
    assert store.chunks(f) == [{"idx": 0, "id": "a0", "length": CS, "nodes": [1, 2]},
                               {"idx": 1, "id": "a1", "length": 300, "nodes": [1, 2]}]
    assert store.chunk("a1") == {"ino": f, "idx": 1, "id": "a1", "length": 300, "nodes": [1, 2]}
    r = L("commit", ino=f, chunks=[{"idx": 1, "id": "b1", "length": 100, "nodes": [3]}], size=1100,
          mtime_ns=9)
    assert r["freed"] == ["a1"] and r["attr"]["size"] == 1300 and r["attr"]["mtime_ns"] == 9
    assert store.chunk("a1") is None and store.chunk("b1")["nodes"] == [3]
    # the same chunk at the same place again is no replacement
    assert L.commit(f, [(1, "b1", 100)], 0)["freed"] == []
    fails(errno.EINVAL, L.commit, g, [(0, "a0", 10)], 10)               # referenced by f
    fails(errno.EINVAL, L.commit, g, [(0, "x", 10), (1, "x", 10)], 10)  # twice in one commit
    fails(errno.EINVAL, L.commit, g, [(0, "x", 10), (0, "y", 10)], 10)
    fails(errno.EINVAL, L.commit, g, [(0, "x", CS + 1)], CS + 1)
    fails(errno.EINVAL, L.commit, g, [(-1, "x", 1)], 1)
    fails(errno.EINVAL, L, "commit", ino=g, chunks=[{"idx": 0, "id": "x", "length": 1, "nodes": ["n1"]}],
          size=1, mtime_ns=None)
    fails(errno.EISDIR, L.commit, ROOT, [(0, "x", 1)], 1)
    fails(errno.ENOENT, L.commit, 999, [(0, "x", 1)], 1)
    assert store.chunks(g) == [] and store.getattr(g)["size"] == 0


def test_commit_frees_the_uploads_its_writer_discarded(store, L):
    f = L.mknod(ROOT, b"f")
    g = L.mknod(ROOT, b"g")
    L.commit(g, [(0, "g0", 10)], 10)
    L.commit(f, [(0, "a0", 5)], 5)
    # a1 and a2 were uploads of chunk 0 the writer overwrote before committing a3
    r = L("commit", ino=f, chunks=[{"idx": 0, "id": "a3", "length": 7, "nodes": [1]}], size=7, mtime_ns=None,
          discard=["a1", "a2", "a1", "a3", "g0"])
    assert r["freed"] == ["a0", "a1", "a2"]             # a3 is committed here, g0 is g's
    assert store.chunks(f) == [{"idx": 0, "id": "a3", "length": 7, "nodes": [1]}]
    assert store.chunk("g0")["ino"] == g
    for bad in ("a4", [4], [""], {"a4": 1}):
        fails(errno.EINVAL, L, "commit", ino=f, chunks=[{"idx": 1, "id": "b1", "length": 1, "nodes": [1]}],
              size=CS + 1, mtime_ns=None, discard=bad)
    assert store.chunk("b1") is None and store.getattr(f)["size"] == 7     # a refused commit changes nothing
    assert L("commit", ino=f, chunks=[], size=7, mtime_ns=None, discard=[])["freed"] == []


def test_replica_lists_and_repair_scans(store, L):
    f = L.mknod(ROOT, b"f")
    g = L.mknod(ROOT, b"g")
    L("commit", ino=f, chunks=[{"idx": 0, "id": "c0", "length": 1, "nodes": [1, 2]},
                               {"idx": 1, "id": "c1", "length": 1, "nodes": [2, 3, 2]}], size=1001, mtime_ns=0)
    L("commit", ino=g, chunks=[{"idx": 0, "id": "c2", "length": 1, "nodes": [3]}], size=1, mtime_ns=0)
    assert store.chunk("c1")["nodes"] == [2, 3]                       # duplicates dropped, order kept
    assert [c["id"] for c in store.all_chunks()] == ["c0", "c1", "c2"]
    ids = lambda cs: [c["id"] for c in cs]                            # noqa: E731
    assert ids(store.under_replicated({1, 2, 3}, 2)) == ["c2"]
    assert ids(store.under_replicated({1, 2}, 2)) == ["c1", "c2"]     # c2 has no live copy at all
    assert ids(store.under_replicated({1, 2}, 2, limit=1)) == ["c1"]
    assert ids(store.under_replicated(set(), 1)) == ["c0", "c1", "c2"]
    assert L("replicas", id="c2", nodes=[1, 3]) == {}
    assert ids(store.under_replicated({1, 2, 3}, 2)) == []
    fails(errno.ENOENT, L, "replicas", id="gone", nodes=[1])
    assert store.stats()["chunks"] == 3 and store.stats()["chunk_bytes"] == 3


def test_all_chunks_pages_through_many_chunks(tmp_path):
    m = MetaStore(tmp_path / "m.db", chunk_size=1)
    L = Leader(m)
    f = L.mknod(ROOT, b"f")
    L.commit(f, [(i, f"c{i}", 1) for i in range(2500)], 2500)
    assert [c["idx"] for c in m.all_chunks()] == list(range(2500))
    m.close()


# ---- the log and the state machine

def test_a_failing_op_changes_nothing_and_uses_no_sequence_number(store, L, tmp_path):
    L.mknod(ROOT, b"f")
    d = L.mkdir(ROOT, b"d")
    L.mknod(d, b"x")
    before = dump(tmp_path / "meta.db")
    for op in [dict(op="rename", parent=ROOT, name=b"d", newparent=d, newname=b"d", flags=0),
               dict(op="rmdir", parent=ROOT, name=b"d"),
               dict(op="mknod", parent=ROOT, name=b"f", mode=REG, uid=0, gid=0, rdev=0),
               dict(op="commit", ino=2, chunks=[{"idx": 0, "id": "a", "length": 1, "nodes": []},
                                                {"idx": 1, "id": "a", "length": 1, "nodes": []}], size=5)]:
        with pytest.raises(FsError):
            store.apply(4, 1, {**op, "now": 4000})
        assert store.applied == 3
    assert dump(tmp_path / "meta.db") == before
    assert L.mknod(ROOT, b"g") == 5                    # the inode counter did not move either
    with pytest.raises(ValueError, match="expected 5"):
        store.apply(6, 1, {"op": "forget", "ino": 1, "now": 0})
    with pytest.raises(ValueError, match="term"):
        store.apply(5, 0, {"op": "forget", "ino": 1, "now": 0})


def test_entries_trim_and_terms(store):
    for seq in range(1, 11):
        store.apply(seq, 1 if seq <= 4 else 3, {"op": "mknod", "parent": ROOT, "name": b"f%d" % seq,
                                                "mode": REG, "uid": 0, "gid": 0, "rdev": 0, "now": seq})
    es = store.entries(0)
    assert [(s, t) for s, t, _ in es] == [(s, 1 if s <= 4 else 3) for s in range(1, 11)]
    assert es[0][2] == {"gid": 0, "mode": REG, "name": b"f1", "now": 1, "op": "mknod", "parent": 1,
                        "rdev": 0, "uid": 0}
    assert [s for s, _, _ in store.entries(7)] == [8, 9, 10]
    assert [s for s, _, _ in store.entries(2, limit=3)] == [3, 4, 5]
    assert store.last_term() == 3 and store.term_at(4) == 1 and store.term_at(5) == 3
    assert store.term_at(11) is None
    store.trim(3)
    assert store.first_retained() == 8 and [s for s, _, _ in store.entries(0)] == [8, 9, 10]
    assert store.term_at(4) is None and store.term_at(9) == 3
    store.trim(0)
    assert store.entries(0) == [] and store.first_retained() == 11
    assert store.term_at(10) == 3 and store.last_term() == 3     # the last term outlives the log


def random_op(rng: random.Random, dirs: list[int], inos: list[int], chunk_ids) -> dict:
    pool = [b"a", b"b", b"c", b"d", b"\xff", b"e e"]
    kind = rng.choice(["mknod"] * 4 + ["mkdir"] * 3 + ["symlink", "link", "unlink", "unlink", "rmdir",
                       "rename", "rename", "rename", "setattr", "commit", "commit", "replicas", "forget"])
    p, n = rng.choice(dirs), rng.choice(pool)
    if kind == "mknod":
        return dict(op=kind, parent=p, name=n, mode=REG | 0o644, uid=1, gid=1, rdev=0)
    if kind == "mkdir":
        return dict(op=kind, parent=p, name=n, mode=0o755, uid=1, gid=1)
    if kind == "symlink":
        return dict(op=kind, parent=p, name=n, target=rng.choice([b"x", b"/y/z"]), uid=1, gid=1)
    if kind == "link":
        return dict(op=kind, ino=rng.choice(inos), parent=p, name=n)
    if kind in ("unlink", "rmdir"):
        return dict(op=kind, parent=p, name=n)
    if kind == "rename":
        return dict(op=kind, parent=p, name=n, newparent=rng.choice(dirs), newname=rng.choice(pool),
                    flags=rng.choice([0, 0, 0, 1, 2]))
    if kind == "setattr":
        return dict(op=kind, ino=rng.choice(inos), size=rng.randrange(0, 5 * CS), mode=rng.choice([None, 0o600]))
    if kind == "commit":
        chunks = [{"idx": i, "id": next(chunk_ids), "length": rng.randrange(1, CS + 1),
                   "nodes": rng.sample([1, 2, 3, 4], 2)} for i in rng.sample(range(5), rng.randrange(1, 3))]
        return dict(op=kind, ino=rng.choice(inos), chunks=chunks, size=rng.randrange(0, 5 * CS),
                    mtime_ns=rng.choice([None, 123]))
    if kind == "replicas":
        return dict(op=kind, id=f"{rng.randrange(60):032x}", nodes=rng.sample([1, 2, 3, 4], 2))
    return dict(op=kind, ino=rng.choice(inos))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_replicas_applying_the_same_log_reach_the_same_state(tmp_path, seed):
    rng = random.Random(seed)
    leader = MetaStore(tmp_path / "leader.db", chunk_size=CS)
    follower = MetaStore(tmp_path / "follower.db", chunk_size=CS)
    chunk_ids = (f"{i:032x}" for i in itertools.count())
    dirs, inos, failed = [ROOT], [ROOT], 0
    while leader.applied < 600:
        seq = leader.applied + 1
        op = {**random_op(rng, dirs, inos, chunk_ids), "now": 10**12 + seq}
        try:
            result = leader.apply(seq, 1 + seq // 200, op)
        except FsError:
            failed += 1
            continue
        assert follower.apply(seq, 1 + seq // 200, op) == result
        if op["op"] in ("mknod", "mkdir", "symlink"):
            inos.append(result["attr"]["ino"])
            if op["op"] == "mkdir":
                dirs.append(result["attr"]["ino"])
    assert failed > 50                                # the sequence did exercise the errors
    st = leader.stats()
    assert st["dirs"] > 3 and st["files"] > 3 and st["chunks"] > 3
    assert dump(tmp_path / "leader.db") == dump(tmp_path / "follower.db")
    # a third replica replaying the leader's log from its start gets there too
    late = MetaStore(tmp_path / "late.db", chunk_size=CS)
    for seq, term, op in leader.entries(0, limit=10_000):
        late.apply(seq, term, op)
    assert dump(tmp_path / "late.db") == dump(tmp_path / "leader.db")
    for m in (leader, follower, late):
        m.close()


# ---- persistence, snapshots

def test_reopening_keeps_everything(tmp_path):
    path = tmp_path / "meta.db"
    m = MetaStore(path, chunk_size=CS)
    L = Leader(m, term=4)
    f = L.mknod(ROOT, b"f")
    L.commit(f, [(0, "c0", 10)], 10)
    m.close()
    before = dump(path)
    m = MetaStore(path)                               # the chunk size is read back
    assert m.chunk_size == CS and m.applied == 2 and m.last_term() == 4
    assert m.lookup(ROOT, b"f")["size"] == 10
    assert Leader(m, term=4).mknod(ROOT, b"g") == f + 1
    m.close()
    assert dump(path)["chunks"] == before["chunks"]
    with pytest.raises(ValueError, match="chunk size"):
        MetaStore(path, chunk_size=4 << 20)
    MetaStore(path, chunk_size=CS).close()


def test_a_snapshot_brings_a_lagging_or_diverged_replica_to_the_leaders_state(tmp_path):
    leader = MetaStore(tmp_path / "leader.db", chunk_size=CS)
    L = Leader(leader, term=2)
    for i in range(50):
        f = L.mknod(ROOT, b"f%d" % i)
        L.commit(f, [(0, "c%d" % i, 10)], 10)
    leader.trim(10)
    # a diverged replica: it applied an entry nobody else has, in an older term
    lagging = MetaStore(tmp_path / "node2.db", chunk_size=CS)
    lagging.apply(1, 1, {"op": "mkdir", "parent": ROOT, "name": b"lost", "mode": 0o755, "uid": 0, "gid": 0,
                         "now": 5})
    assert lagging.term_at(1) != leader.term_at(1) and lagging.applied < leader.first_retained()
    lagging.close()
    leader.snapshot(tmp_path / "snap.db")
    assert not (tmp_path / "snap.db-wal").exists()
    node2 = MetaStore.install_snapshot(tmp_path / "node2.db", tmp_path / "snap.db")
    assert node2.applied == leader.applied == 100 and node2.last_term() == 2
    assert node2.first_retained() == 91 and node2.chunk_size == CS
    fails(errno.ENOENT, node2.lookup, ROOT, b"lost")
    assert dump(tmp_path / "node2.db") == dump(tmp_path / "leader.db")
    # it then follows the log as usual
    L.mknod(ROOT, b"after")
    for seq, term, op in leader.entries(node2.applied):
        node2.apply(seq, term, op)
    assert node2.lookup(ROOT, b"after")["ino"] == leader.lookup(ROOT, b"after")["ino"]
    node2.close()
    assert dump(tmp_path / "node2.db") == dump(tmp_path / "leader.db")
    # and reopens as itself
    with MetaStore(tmp_path / "node2.db") as again:
        assert again.applied == 101
    # a fresh node installs the snapshot where no database was
    fresh = MetaStore.install_snapshot(tmp_path / "node3.db", tmp_path / "snap.db")
    assert fresh.applied == 100
    fresh.close()
    leader.close()


def test_install_snapshot_refuses_what_is_not_a_snapshot(tmp_path):
    (tmp_path / "junk").write_bytes(b"not a database" * 100)
    with pytest.raises(ValueError, match="not a KDFS metadata snapshot"):
        MetaStore.install_snapshot(tmp_path / "m.db", tmp_path / "junk")
    m = MetaStore(tmp_path / "a.db", chunk_size=CS)
    m.snapshot(tmp_path / "snap.db")
    m.close()
    with pytest.raises(ValueError, match="chunk size"):
        MetaStore.install_snapshot(tmp_path / "m.db", tmp_path / "snap.db", chunk_size=4 << 20)
    data = (tmp_path / "snap.db").read_bytes()
    (tmp_path / "cut.db").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="not a KDFS metadata snapshot"):
        MetaStore.install_snapshot(tmp_path / "m.db", tmp_path / "cut.db")
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "m.db.snap").exists()
    # the old database must be closed first; while open, it is kept as it is
    old = MetaStore(tmp_path / "m.db", chunk_size=CS)
    Leader(old).mkdir(ROOT, b"kept")
    with pytest.raises(ValueError, match="still open"):
        MetaStore.install_snapshot(tmp_path / "m.db", tmp_path / "snap.db")
    assert old.lookup(ROOT, b"kept") and not (tmp_path / "m.db.snap").exists()
    old.close()
    with MetaStore.install_snapshot(tmp_path / "m.db", tmp_path / "snap.db") as new:
        fails(errno.ENOENT, new.lookup, ROOT, b"kept")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.db", "cut.db", "junk", "m.db", "snap.db"]


# ---- scale

def test_readdir_pages_through_20000_entries(store, L):
    for i in range(20_000):
        L.mknod(ROOT, b"%05d" % (19_999 - i))
    seen, after = [], None
    while page := store.readdir(ROOT, after, 1000):
        assert len(page) <= 1000
        seen.extend(n for n, _ in page)
        after = page[-1][0]
    assert seen == [b"%05d" % i for i in range(20_000)]
    assert store.readdir(ROOT, b"19990", 100)[0][0] == b"19991"
    assert store.readdir(ROOT, b"\xff", 10) == []
    assert store.stats()["files"] == 20_000
