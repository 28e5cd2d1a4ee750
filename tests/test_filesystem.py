"""kdfs.filesystem: the file system core over a real metadata replica and a real chunk store.

No daemon: tests/kdfs_backend.py serves KdfsClient's requests in process (the network is the only
thing faked). A plain local file given the same writes, truncates and reads is the oracle. Chunks of
256 KiB (four 64 KiB blocks) keep the files small while crossing many chunk boundaries.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import threading
import time

import pytest

from kdfs import checksum
from kdfs.filesystem import BLOCK, ROOT, FileSystem
from kerrighed.errors import ChunkCorrupt, FsError, KrgError

from kdfs_backend import LocalKdfs

CS = 256 << 10
READ = 128 << 10          # what the kernel asks for at once with max_read 128 KiB


@pytest.fixture
def backend(tmp_path):
    b = LocalKdfs(tmp_path / "node", CS)
    yield b
    b.shutdown()


@pytest.fixture
def mount(backend):
    """Makes FileSystems over the backend (one per "machine"); all are closed at the end."""
    made: list[FileSystem] = []

    def make(**kw) -> FileSystem:
        fs = FileSystem(lambda: backend, backend.chunk_size, **kw)
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.close()


def create(fs: FileSystem, name: bytes = b"f") -> int:
    return fs.create(ROOT, name, stat.S_IFREG | 0o644, 1000, 1000)["ino"]


def read_all(fs: FileSystem, ino: int, piece: int = READ) -> bytes:
    """The whole file as a sequential reader of the open file sees it."""
    size = fs.getattr(ino)["size"]
    return b"".join(fs.read(ino, off, piece) for off in range(0, size, piece))


def reopened(backend: LocalKdfs, ino: int) -> bytes:
    """The file's content through a fresh FileSystem (another machine, or after a remount)."""
    fs = FileSystem(lambda: backend, backend.chunk_size)
    try:
        fs.open(ino)
        data = read_all(fs, ino)
        fs.release(ino)
        return data
    finally:
        fs.close()


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def fsck_refs(backend: LocalKdfs, ino: int) -> None:
    """Every chunk the map lists is in the store, whole and sound, and no longer than the chunk size."""
    for r in backend.chunks(ino):
        assert r["id"] in backend.store
        backend.store.verify(r["id"])
        assert r["length"] <= backend.store.length(r["id"]) and r["length"] <= CS


class Twin:
    """A KDFS file and a local file given the same operations."""

    def __init__(self, fs: FileSystem, ino: int, path):
        self.fs, self.ino = fs, ino
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def close(self) -> None:
        os.close(self.fd)

    def write(self, off: int, data: bytes) -> None:
        assert self.fs.write(self.ino, off, data) == len(data)
        os.pwrite(self.fd, data, off)

    def truncate(self, size: int) -> None:
        attr = self.fs.setattr(self.ino, {"size": size})
        os.ftruncate(self.fd, size)
        assert attr["size"] == size

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def expected(self, off: int = 0, n: int | None = None) -> bytes:
        return os.pread(self.fd, self.size if n is None else n, off)

    def check(self, off: int, n: int) -> None:
        assert self.fs.read(self.ino, off, n) == self.expected(off, n), f"read({off}, {n})"

    def check_all(self) -> None:
        assert self.fs.getattr(self.ino)["size"] == self.size
        assert read_all(self.fs, self.ino) == self.expected()


@pytest.fixture
def twin(mount, tmp_path):
    made = []

    def make(fs: FileSystem | None = None, name: bytes = b"f", **kw) -> Twin:
        fs = fs or mount(**kw)
        t = Twin(fs, create(fs, name), tmp_path / f"oracle-{name.decode()}")
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def near_boundary(rnd: random.Random, chunks: int) -> int:
    return max(0, rnd.randrange(chunks + 1) * CS + rnd.randint(-300, 300))


def random_size(rnd: random.Random) -> int:
    r = rnd.random()
    if r < 0.4:
        return rnd.randint(1, 4096)
    if r < 0.8:
        return rnd.randint(1, CS)
    return rnd.randint(CS, 3 * CS)


# -- data against the oracle ------------------------------------------------------------------------


@pytest.mark.parametrize("seed, max_uploads, cache_bytes", [(1, 1, 256 << 20), (2, 2, 256 << 20),
                                                         (3, 8, 256 << 20), (4, 2, BLOCK)])
def test_random_writes_truncates_and_flushes_agree_with_a_local_file(backend, twin, seed, max_uploads,
                                                                    cache_bytes):
    rnd = random.Random(seed)
    t = twin(max_uploads=max_uploads, cache_bytes=cache_bytes)
    fs, ino = t.fs, t.ino
    for _ in range(200):
        r = rnd.random()
        if r < 0.55:
            off = near_boundary(rnd, 8) if rnd.random() < 0.5 else rnd.randrange(8 * CS)
            t.write(off, rnd.randbytes(random_size(rnd)))
        elif r < 0.65:
            t.truncate(near_boundary(rnd, 8) if rnd.random() < 0.5 else rnd.randrange(9 * CS))
        elif r < 0.75:
            fs.flush(ino)
            assert backend.committed(ino) == t.expected()
        else:
            t.check(rnd.randrange(t.size + 10), rnd.choice([1, 100, READ, 3 * CS]))
        assert fs.getattr(ino)["size"] == t.size
    t.check_all()
    fs.release(ino)
    assert backend.committed(ino) == t.expected()
    fsck_refs(backend, ino)
    assert reopened(backend, ino) == t.expected()
    backend.reopen()
    assert reopened(backend, ino) == t.expected()


def test_write_into_a_committed_chunk_makes_a_new_chunk_of_it_alone(backend, mount):
    fs = mount()
    ino = create(fs)
    data = bytearray(random.Random(4).randbytes(3 * CS + 5000))
    fs.write(ino, 0, bytes(data))
    fs.release(ino)
    before = backend.chunks(ino)
    assert [(r["idx"], r["length"]) for r in before] == [(0, CS), (1, CS), (2, CS), (3, 5000)]

    fs2 = mount()
    fs2.open(ino)
    mid = CS + CS // 2
    fs2.write(ino, mid, b"0123456789")
    data[mid:mid + 10] = b"0123456789"
    assert fs2.read(ino, mid - 5, 20) == bytes(data[mid - 5:mid + 15])
    fs2.flush(ino)
    after = backend.chunks(ino)
    assert [r["id"] for r in after] == [before[0]["id"], after[1]["id"], before[2]["id"], before[3]["id"]]
    assert after[1]["id"] != before[1]["id"] and after[1]["length"] == CS
    assert before[1]["id"] not in backend.store          # freed by the commit
    assert backend.committed(ino) == bytes(data)
    assert read_all(fs2, ino) == bytes(data)
    fs2.release(ino)
    assert reopened(backend, ino) == bytes(data)


def test_a_sparse_file_reads_zeros_in_its_holes_without_fetching_them(backend, mount, twin):
    t = twin()
    t.write(10, b"head")
    t.write(20 * CS + 7, b"tail")
    t.check_all()
    t.fs.flush(t.ino)
    assert [(r["idx"], r["length"]) for r in backend.chunks(t.ino)] == [(0, 14), (20, 11)]
    assert backend.committed(t.ino) == t.expected()
    gets = backend.calls["get"]
    assert t.fs.read(t.ino, 5 * CS, 3 * CS) == bytes(3 * CS)
    assert t.fs.read(t.ino, 100, CS) == bytes(CS)        # past the end of chunk 0's data
    assert backend.calls["get"] == gets
    t.check_all()
    t.fs.release(t.ino)
    assert reopened(backend, t.ino) == t.expected()


def test_truncate_shrinks_and_grows_with_dirty_buffers(backend, twin):
    rnd = random.Random(5)
    t = twin()
    t.write(0, rnd.randbytes(3 * CS + 100))
    t.fs.flush(t.ino)
    old = {r["idx"]: r["id"] for r in backend.chunks(t.ino)}
    t.write(2 * CS + 10, rnd.randbytes(1000))             # dirty chunk 2
    t.write(4 * CS + 10, rnd.randbytes(1000))             # dirty chunk 4, past the end
    t.truncate(CS + 10)                                   # cuts chunk 1; 2.. go
    t.check_all()
    refs = backend.chunks(t.ino)
    assert [(r["idx"], r["length"]) for r in refs] == [(0, CS), (1, 10)]
    assert old[2] not in backend.store and old[3] not in backend.store
    # The store's copy of chunk 1 still holds the old bytes past 10: they must not come back.
    t.truncate(3 * CS)
    t.check_all()
    t.write(CS + 5000, b"x" * 10)                         # read-modify-write of the shortened chunk
    t.check_all()
    t.truncate(0)
    assert backend.chunks(t.ino) == []
    t.write(CS - 3, b"abcdef")
    t.check_all()
    t.fs.release(t.ino)
    assert backend.committed(t.ino) == t.expected()
    # A file that is not open here: the change goes straight to the metadata.
    t.fs.setattr(t.ino, {"size": 2})
    os.ftruncate(t.fd, 2)
    assert reopened(backend, t.ino) == t.expected()


def test_appends_make_full_chunks_and_a_short_last_one(backend, twin):
    rnd = random.Random(6)
    t = twin()
    for i in range(200):
        t.write(t.size, rnd.randbytes(rnd.randint(1, 20000)))
        if i % 37 == 36:
            t.fs.flush(t.ino)
            t.check(max(0, t.size - 30000), 30000)
    t.check_all()
    t.fs.release(t.ino)
    refs = backend.chunks(t.ino)
    assert [r["idx"] for r in refs] == list(range(-(-t.size // CS)))
    assert all(r["length"] == CS for r in refs[:-1]) and refs[-1]["length"] == t.size - (len(refs) - 1) * CS
    assert reopened(backend, t.ino) == t.expected()


def test_an_overwrite_in_place_uploads_each_chunk_once(backend, twin):
    """A committed chunk is full from its first write on: it goes when the writer reaches its end."""
    rnd = random.Random(16)
    t = twin()
    t.write(0, rnd.randbytes(4 * CS))
    t.fs.release(t.ino)
    t.fs.open(t.ino)
    puts = backend.calls["put"]
    for off in range(0, 4 * CS, BLOCK):                   # dd conv=notrunc, a database's pages
        t.write(off, rnd.randbytes(BLOCK))
    t.fs.flush(t.ino)
    assert backend.calls["put"] - puts == 4
    t.check_all()
    assert backend.committed(t.ino) == t.expected()


def test_writes_into_a_chunk_whose_upload_is_in_flight(backend, twin):
    rnd = random.Random(7)
    t = twin(max_uploads=1)
    backend.gate.clear()
    t.write(0, rnd.randbytes(CS))                         # chunk 0 full: its upload starts, held
    assert backend.in_flight.wait(5)
    t.check(0, CS)                                        # read from the buffer on its way
    assert t.fs.getattr(t.ino)["size"] == CS
    assert backend.chunks(t.ino) == []
    opener = threading.Timer(0.05, backend.gate.set)
    opener.start()
    try:
        t.write(100, b"x" * 50)                           # waits for that upload, makes a new version
        t.write(CS - 10, rnd.randbytes(CS + 20))          # chunk 1 full (waits for the slot), chunk 2
        t.write(CS + 7, b"y" * 3)                         # chunk 1 again, while it uploads
    finally:
        opener.join()
    t.check_all()
    t.fs.flush(t.ino)
    assert backend.committed(t.ino) == t.expected()
    t.check_all()
    t.fs.release(t.ino)
    fsck_refs(backend, t.ino)
    assert reopened(backend, t.ino) == t.expected()


def test_threads_writing_their_own_files_and_one_shared_file(backend, mount, tmp_path):
    fs = mount(max_uploads=2)
    shared = Twin(fs, create(fs, b"shared"), tmp_path / "oracle-shared")
    own = [Twin(fs, create(fs, f"own{i}".encode()), tmp_path / f"oracle-{i}") for i in range(3)]
    errors = []

    def work(i: int) -> None:
        try:
            rnd = random.Random(100 + i)
            for _ in range(25):
                off = rnd.randrange(4 * CS)
                own[i].write(off, rnd.randbytes(rnd.randint(1, CS)))
                # The shared file: thread i writes its own quarter only, so the outcome is known.
                base = i * 2 * CS
                off = base + rnd.randrange(2 * CS - 1000)
                data = rnd.randbytes(rnd.randint(1, min(base + 2 * CS - off, CS)))
                shared.write(off, data)
                if rnd.random() < 0.2:
                    fs.flush(own[i].ino)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for t in [shared, *own]:
        t.check_all()
        fs.release(t.ino)
        assert reopened(backend, t.ino) == t.expected()
        t.close()


# -- commits ----------------------------------------------------------------------------------------


def test_flush_commits_the_new_chunk_map_in_one_change(backend, mount):
    rnd = random.Random(8)
    fs = mount()
    ino = create(fs)
    old = rnd.randbytes(4 * CS)
    fs.write(ino, 0, old)
    fs.release(ino)

    writer = mount()
    writer.open(ino)
    new = rnd.randbytes(5 * CS + 77)
    puts = backend.calls["put done"]
    writer.write(ino, 0, new)
    wait_for(lambda: backend.calls["put done"] == puts + 5)   # the full chunks are stored already...
    assert backend.committed(ino) == old                      # ...but not in the file
    assert reopened(backend, ino) == old
    assert writer.read(ino, 0, len(new)) == new               # this mount sees its own writes
    assert writer.getattr(ino)["size"] == len(new)

    commits = len([c for c in backend.changes if c["op"] == "commit"])
    writer.fsync(ino)
    flushed = [c for c in backend.changes if c["op"] == "commit"][commits:]
    assert len(flushed) == 1 and [r["idx"] for r in flushed[0]["chunks"]] == list(range(6))
    assert backend.calls["sync"] == 1
    assert backend.committed(ino) == new
    assert reopened(backend, ino) == new
    writer.flush(ino)                                         # nothing new: no change
    assert len([c for c in backend.changes if c["op"] == "commit"]) == commits + 1


def test_a_reader_elsewhere_sees_the_old_content_until_the_flush(backend, mount):
    rnd = random.Random(9)
    writer, reader = mount(), mount()
    ino = create(writer)
    old = rnd.randbytes(2 * CS + 3)
    writer.write(ino, 0, old)
    writer.flush(ino)
    new = rnd.randbytes(3 * CS)
    writer.write(ino, 0, new)
    reader.open(ino)
    assert read_all(reader, ino) == old
    reader.release(ino)
    writer.flush(ino)
    reader.open(ino)
    assert read_all(reader, ino) == new
    reader.release(ino)
    writer.release(ino)


# -- orphans ----------------------------------------------------------------------------------------


def gone(backend: LocalKdfs, ino: int, ids: list[str]) -> bool:
    """The inode is no more, and no map references its chunks, nor does the store hold them."""
    with backend.lock:
        try:
            backend.meta.getattr(ino)
            return False
        except FsError as e:
            assert e.errno == errno.ENOENT
        assert all(backend.meta.chunk(i) is None and i not in backend.store for i in ids)
        return True


def test_an_unlinked_open_file_lives_until_released_and_forgotten(backend, mount):
    fs = mount()
    ino = create(fs)                                  # the kernel knows it: one lookup
    data = random.Random(10).randbytes(2 * CS + 1)
    fs.write(ino, 0, data)
    fs.flush(ino)
    ids = [r["id"] for r in backend.chunks(ino)]
    fs.unlink(ROOT, b"f")
    with pytest.raises(FsError) as e:
        fs.lookup(ROOT, b"f")
    assert e.value.errno == errno.ENOENT
    assert fs.read(ino, 0, len(data)) == data
    fs.write(ino, len(data), b"more")                 # still writable, and committed at release
    assert fs.getattr(ino)["nlink"] == 0
    fs.release(ino)
    assert backend.meta.orphans() == [ino]            # the kernel may still stat it
    assert backend.committed(ino) == data + b"more"
    assert not gone(backend, ino, ids)
    ids = [r["id"] for r in backend.chunks(ino)]      # chunk 2 is a new one
    fs.forget([(ino, 1)])
    assert gone(backend, ino, ids)
    assert backend.meta.orphans() == []


def test_forget_counts_lookups_and_open_handles(backend, mount):
    fs = mount()
    ino = create(fs)                                  # 1 lookup
    fs.write(ino, 0, b"x" * (CS + 1))
    fs.release(ino)
    ids = [r["id"] for r in backend.chunks(ino)]
    fs.lookup(ROOT, b"f")
    fs.lookup(ROOT, b"f")                             # 3 lookups
    fs.open(ino)
    fs.open(ino)                                      # 2 handles
    fs.unlink(ROOT, b"f")
    fs.forget([(ino, 2)])
    fs.release(ino)
    assert not gone(backend, ino, ids)
    fs.forget([(ino, 1)])                             # no lookup left, one handle
    assert not gone(backend, ino, ids)
    assert fs.read(ino, CS, 10) == b"x"
    fs.release(ino)
    assert gone(backend, ino, ids)


def test_an_inode_never_looked_up_goes_at_release_and_a_linked_one_stays(backend, mount):
    fs = mount()
    ino = create(fs, b"a")
    fs.write(ino, 0, b"a" * 10)
    fs.release(ino)
    fs.forget([(ino, 1)])
    other = mount()                                   # opens by inode number, no lookup here
    other.open(ino)
    other.unlink(ROOT, b"a")
    assert other.read(ino, 0, 100) == b"a" * 10
    ids = [r["id"] for r in backend.chunks(ino)]
    other.release(ino)
    assert gone(backend, ino, ids)

    keep = create(fs, b"k")
    fs.link(keep, ROOT, b"k2")
    fs.write(keep, 0, b"kept")
    fs.release(keep)
    fs.unlink(ROOT, b"k")
    fs.forget([(keep, 2)])
    assert backend.meta.getattr(keep)["nlink"] == 1
    assert reopened(backend, keep) == b"kept"


def test_rename_over_an_open_file_orphans_it(backend, mount):
    fs = mount()
    victim = create(fs, b"v")
    fs.write(victim, 0, b"old content")
    fs.flush(victim)
    ids = [r["id"] for r in backend.chunks(victim)]
    src = create(fs, b"s")
    fs.write(src, 0, b"new")
    fs.release(src)
    fs.rename(ROOT, b"s", ROOT, b"v", 0)
    assert fs.lookup(ROOT, b"v")["ino"] == src
    assert fs.read(victim, 0, 100) == b"old content"
    fs.release(victim)
    fs.forget([(victim, 1)])
    assert gone(backend, victim, ids)


# -- errors -----------------------------------------------------------------------------------------


def enospc_once(backend: LocalKdfs, bad_idx: int) -> None:
    def hook(ino: int, idx: int) -> None:
        if idx == bad_idx:
            backend.on_put = None
            raise FsError.of(errno.ENOSPC, "node 1: No space left on device")
    backend.on_put = hook


@pytest.mark.parametrize("max_uploads", [1, 2, 8])
def test_a_failed_put_fails_the_flush_and_commits_nothing(backend, mount, max_uploads):
    rnd = random.Random(11)
    fs = mount(max_uploads=max_uploads)
    ino = create(fs)
    old = rnd.randbytes(2 * CS + 10)
    fs.write(ino, 0, old)
    fs.flush(ino)
    before = backend.chunks(ino)
    commits = len(backend.changes)

    enospc_once(backend, 1)
    new = rnd.randbytes(6 * CS + 10)
    raised = []
    for off in range(0, len(new), READ):                  # the error may show at a write already...
        try:
            fs.write(ino, off, new[off:off + READ])
        except FsError as e:
            raised.append(e.errno)
    assert set(raised) <= {errno.ENOSPC}
    with pytest.raises(FsError) as e:
        fs.flush(ino)                                     # ...and must at the flush
    assert e.value.errno == errno.ENOSPC
    assert backend.chunks(ino) == before and len(backend.changes) == commits
    assert backend.committed(ino) == old
    # This mount shows the committed file again, not the lost writes (nor zeros in their place).
    assert fs.getattr(ino)["size"] == len(old)
    assert fs.read(ino, 0, len(new)) == old
    fs.flush(ino)
    fs.release(ino)                                       # nothing left to commit, half or whole
    assert backend.chunks(ino) == before and backend.committed(ino) == old

    fs.open(ino)                                          # the disk has room again
    fs.write(ino, 0, new)
    fs.release(ino)
    assert reopened(backend, ino) == new


def corrupt(backend: LocalKdfs, chunk_id: str, data_offset: int) -> None:
    """Invert one byte of a chunk copy's data."""
    path = backend.store.path(chunk_id)
    length = backend.store.length(chunk_id)
    header = 24 + 4 * -(-length // BLOCK)
    with open(path, "r+b") as f:
        f.seek(header + data_offset)
        b = f.read(1)
        f.seek(header + data_offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("raw", [False, True], ids=["daemon-EIO", "raw-ChunkCorrupt"])
def test_a_corrupt_block_is_an_error_never_data(backend, mount, raw):
    backend.raw_chunk_errors = raw
    data = random.Random(12).randbytes(2 * CS)
    fs = mount()
    ino = create(fs)
    fs.write(ino, 0, data)
    fs.release(ino)
    bad = backend.chunks(ino)[1]["id"]
    corrupt(backend, bad, 2 * BLOCK + 5)                  # chunk 1, block 2
    expected = (ChunkCorrupt,) if raw else (FsError,)

    fs2 = mount()
    fs2.open(ino)
    for _ in range(2):                                    # nothing bad was cached by the first try
        with pytest.raises(expected) as e:
            fs2.read(ino, CS + 2 * BLOCK, 100)
        if not raw:
            assert e.value.errno == errno.EIO
    assert fs2.read(ino, CS + 3 * BLOCK, BLOCK) == data[CS + 3 * BLOCK:CS + 4 * BLOCK]
    with pytest.raises(expected):
        fs2.write(ino, CS + 10, b"patch")                 # read-modify-write needs the whole chunk
    fs2.release(ino)
    assert backend.chunks(ino)[1]["id"] == bad

    # A sequential reader gets every good block; only the bad one fails (read-ahead must not make
    # the good blocks around it unreadable).
    fs3 = mount()
    fs3.open(ino)
    got = []
    for off in range(0, 2 * CS, BLOCK):
        try:
            got.append(fs3.read(ino, off, BLOCK))
        except KrgError:
            got.append(None)
    want = [data[off:off + BLOCK] for off in range(0, 2 * CS, BLOCK)]
    want[4 + 2] = None
    assert got == want
    fs3.release(ino)


# -- the block cache --------------------------------------------------------------------------------


def test_a_sequential_reader_fetches_a_mebibyte_at_a_time(tmp_path):
    cs = 4 << 20
    backend = LocalKdfs(tmp_path / "node", cs)
    fs = FileSystem(lambda: backend, cs)
    try:
        ino = create(fs)
        data = random.Random(13).randbytes(16 << 20)
        fs.write(ino, 0, data)
        fs.release(ino)
        fs.open(ino)
        gets = backend.calls["get"]
        reads = range(0, len(data), READ)
        assert b"".join(fs.read(ino, off, READ) for off in reads) == data
        fetched = backend.calls["get"] - gets
        assert fetched <= len(reads) // 6, f"{fetched} gets for {len(reads)} reads"
        rnd = random.Random(14)
        for _ in range(50):                                # everything is cached now
            off = rnd.randrange(len(data))
            assert fs.read(ino, off, 5000) == data[off:off + 5000]
        assert backend.calls["get"] - gets == fetched
        fs.release(ino)
    finally:
        fs.close()
        backend.shutdown()


# -- odds and ends ----------------------------------------------------------------------------------


def test_statfs_and_readdir_see_the_files(backend, mount):
    fs = mount()
    for i in range(3):
        ino = create(fs, f"f{i}".encode())
        fs.write(ino, 0, bytes(i * CS + 1))
        fs.release(ino)
    st = fs.statfs()
    assert st["total"]["total"] > 0 and st["files"]["files"] == 3 and st["files"]["chunks"] == 6
    assert [(n, a["size"]) for n, a in fs.readdir(ROOT)] == [(b"f0", 1), (b"f1", CS + 1), (b"f2", 2 * CS + 1)]


def test_python_checksums_give_the_same_files(tmp_path):
    """A small read-modify-write round trip with the pure-Python CRC32C on both ends."""
    before = checksum.backend
    checksum.select(False)
    try:
        backend = LocalKdfs(tmp_path / "node", CS)
        fs = FileSystem(lambda: backend, CS)
        ino = create(fs)
        data = bytearray(random.Random(15).randbytes(CS + 100))
        fs.write(ino, 0, bytes(data))
        fs.release(ino)
        fs.open(ino)
        fs.write(ino, 50, b"python")
        data[50:56] = b"python"
        fs.release(ino)
        fs.close()
        assert reopened(backend, ino) == bytes(data)
        corrupt(backend, backend.chunks(ino)[0]["id"], 7)
        with pytest.raises(FsError):
            reopened(backend, ino)
        backend.shutdown()
    finally:
        checksum.select(before == "native")
