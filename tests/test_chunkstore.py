"""kdfs.chunkstore: one node's chunks on disk, on both checksum backends.

Most tests use 4 KiB blocks so that chunks of a few blocks stay fast on the pure-Python backend;
one round trip uses KDFS's real sizes (64 KiB blocks, 4 MiB chunks).
"""
import errno
import os
import random
import struct
import subprocess
import threading
import uuid

import pytest

from kdfs import checksum
from kdfs.chunkstore import MAGIC, ChunkStore
from kerrighed.errors import ChunkCorrupt, ChunkMissing

BLOCK = 4096


@pytest.fixture(params=["native", "python"])
def backend(request):
    before = checksum.backend
    if request.param == "native" and not checksum.native_available():
        pytest.skip("kdfs._crc32c is not built: run `make native`")
    checksum.select(request.param == "native")
    yield request.param
    checksum.select(before == "native")


@pytest.fixture
def store(tmp_path, backend):
    return ChunkStore(tmp_path / "disk", block_size=BLOCK)


def new_id() -> str:
    return uuid.uuid4().hex


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def tmp_files(store) -> list[str]:
    return os.listdir(store.root / "tmp")


def flip(path, pos: int) -> None:
    """Invert one byte of a file in place."""
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))


def header_size(nblocks: int) -> int:
    return 24 + 4 * nblocks


# ---- writing and reading -----------------------------------------------------------------------


def test_round_trip_and_file_format(store):
    cid = new_id()
    data = payload(3 * BLOCK + 100)
    store.put(cid, data)
    assert cid in store
    assert store.read(cid) == data
    assert store.length(cid) == len(data)
    store.verify(cid)
    path = store.path(cid)
    assert path == store.root / "chunks" / cid[:2] / cid
    raw = path.read_bytes()
    magic, length, block, count = struct.unpack_from("<8sQII", raw)
    assert (magic, length, block, count) == (MAGIC, len(data), BLOCK, 4)
    assert magic == b"KDFSCHK1"
    crcs = list(struct.unpack_from("<4I", raw, 24))
    assert crcs == [checksum.python_crc32c(data[i:i + BLOCK]) for i in range(0, len(data), BLOCK)]
    assert raw[header_size(4):] == data
    assert tmp_files(store) == []


@pytest.mark.parametrize("n", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1])
def test_sizes_around_a_block(store, n):
    cid = new_id()
    data = payload(n, n)
    store.put(cid, data, sync=True)
    assert store.read(cid) == data
    assert store.length(cid) == n
    store.verify(cid)


def test_buffer_types(store):
    data = payload(2 * BLOCK + 3)
    for value in (bytearray(data), memoryview(data), memoryview(b"xx" + data)[2:]):
        cid = new_id()
        store.put(cid, value)
        assert store.read(cid) == data


def test_ranged_reads_across_block_boundaries(store):
    cid = new_id()
    n = 5 * BLOCK + 123
    data = payload(n, 1)
    store.put(cid, data)
    edges = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK - 1, 3 * BLOCK, n - 1, n, n + 1, n + 5000]
    for offset in edges:
        for length in [0, 1, 2, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 7, n, None]:
            want = data[offset:] if length is None else data[offset:offset + length]
            assert store.read(cid, offset, length) == want, (offset, length)
    assert store.read(cid, n + 10) == b""
    rng = random.Random(2)
    for _ in range(50):
        offset, length = rng.randrange(n + 10), rng.randrange(3 * BLOCK)
        assert store.read(cid, offset, length) == data[offset:offset + length], (offset, length)


@pytest.mark.parametrize("offset,length", [(-1, None), (0, -1), (1.5, None), (0, "1")])
def test_bad_ranges_are_refused(store, offset, length):
    cid = new_id()
    store.put(cid, b"abc")
    with pytest.raises(ValueError):
        store.read(cid, offset, length)


def test_real_sizes_64k_blocks_4mib_chunk(tmp_path, backend):
    store = ChunkStore(tmp_path / "disk")
    assert store.block_size == checksum.BLOCK_SIZE == 64 * 1024
    cid = new_id()
    data = payload(4 << 20, 3)
    store.put(cid, data)
    assert store.read(cid) == data
    assert store.read(cid, 65536 - 10, 20) == data[65536 - 10:65536 + 10]
    raw = store.path(cid).read_bytes()
    assert struct.unpack_from("<8sQII", raw) == (MAGIC, 4 << 20, 65536, 64)


def test_block_size_comes_from_the_file(tmp_path, backend):
    cid = new_id()
    data = payload(10 * 1000 + 1)
    ChunkStore(tmp_path / "disk", block_size=1000).put(cid, data)
    other = ChunkStore(tmp_path / "disk", block_size=BLOCK)
    assert other.read(cid, 999, 1003) == data[999:2002]
    other.verify(cid)


def test_crc_table_longer_than_the_first_read(tmp_path, backend):
    # 2048 blocks: their CRCs (8 KiB) go past what is read with the header.
    store = ChunkStore(tmp_path / "disk", block_size=16)
    cid = new_id()
    data = payload(2048 * 16, 5)
    store.put(cid, data)
    assert store.read(cid) == data
    assert store.read(cid, 2000 * 16 - 3, 40) == data[2000 * 16 - 3:2000 * 16 + 37]
    flip(store.path(cid), header_size(2048) + 2000 * 16 + 1)
    with pytest.raises(ChunkCorrupt, match="block 2000 of 2048"):
        store.read(cid, 2000 * 16 - 3, 40)
    with pytest.raises(ChunkCorrupt, match="block 2000 of 2048"):
        store.verify(cid)
    assert store.read(cid, 0, 2000 * 16) == data[:2000 * 16]


def test_idempotent_put_and_replacement(store):
    cid = new_id()
    data = payload(2 * BLOCK + 1)
    store.put(cid, data)
    store.put(cid, data)
    store.put(cid, bytes(data), sync=True)
    assert store.read(cid) == data
    assert list(store.ids()) == [cid]
    # A repair rewrites a bad copy with the good data under the same id.
    flip(store.path(cid), header_size(3) + 5)
    with pytest.raises(ChunkCorrupt):
        store.verify(cid)
    store.put(cid, data)
    store.verify(cid)
    assert tmp_files(store) == []


def test_concurrent_puts(store):
    ids = [new_id() for _ in range(32)]
    errors = []

    def worker(part):
        try:
            for cid in part:
                store.put(cid, cid.encode() * 300)
        except Exception as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(ids[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(store.ids()) == sorted(ids)
    for cid in ids:
        assert store.read(cid) == cid.encode() * 300


# ---- damage ----------------------------------------------------------------------------------


def test_one_corrupt_byte_is_found_and_its_block_named(store):
    cid = new_id()
    data = payload(6 * BLOCK + 10, 4)
    store.put(cid, data)
    flip(store.path(cid), header_size(7) + 3 * BLOCK + 77)  # a byte of block 3
    with pytest.raises(ChunkCorrupt) as e:
        store.read(cid)
    assert cid in str(e.value) and "block 3 " in str(e.value)
    with pytest.raises(ChunkCorrupt, match="block 3 "):
        store.verify(cid)
    with pytest.raises(ChunkCorrupt, match="block 3 "):
        store.read(cid, 3 * BLOCK + 100, 1)
    with pytest.raises(ChunkCorrupt, match="block 3 "):
        store.read(cid, 2 * BLOCK, BLOCK + 1)  # ends one byte into block 3
    # Ranges that do not touch block 3 read only their own blocks and succeed.
    assert store.read(cid, 0, 3 * BLOCK) == data[:3 * BLOCK]
    assert store.read(cid, 4 * BLOCK) == data[4 * BLOCK:]
    assert store.length(cid) == len(data)


def test_a_corrupt_stored_crc_is_found(store):
    cid = new_id()
    store.put(cid, payload(3 * BLOCK))
    flip(store.path(cid), 24 + 4 * 2)  # the CRC of block 2
    with pytest.raises(ChunkCorrupt, match=f"{cid}.*block 2 "):
        store.verify(cid)


def test_last_short_block_is_checked(store):
    cid = new_id()
    store.put(cid, payload(2 * BLOCK + 5))
    size = store.path(cid).stat().st_size
    flip(store.path(cid), size - 1)
    with pytest.raises(ChunkCorrupt, match="block 2 of 3"):
        store.read(cid, 2 * BLOCK + 4)


@pytest.mark.parametrize("keep", [0, 10, 24, 24 + 4, 24 + 12 + BLOCK, -1])
def test_truncated_file(store, keep):
    cid = new_id()
    data = payload(3 * BLOCK)
    store.put(cid, data)
    path = store.path(cid)
    os.truncate(path, path.stat().st_size + keep if keep < 0 else keep)
    for call in (store.read, store.verify, store.length):
        with pytest.raises(ChunkCorrupt, match=cid):
            call(cid)


def test_truncated_file_names_the_first_missing_block(store):
    cid = new_id()
    store.put(cid, payload(3 * BLOCK))
    os.truncate(store.path(cid), header_size(3) + BLOCK + 10)
    with pytest.raises(ChunkCorrupt, match="block 1 of 3"):
        store.read(cid, 0, 1)


@pytest.mark.parametrize("garble", ["magic", "length", "block", "count", "grown"])
def test_garbled_header(store, garble):
    cid = new_id()
    store.put(cid, payload(2 * BLOCK))
    path = store.path(cid)
    raw = bytearray(path.read_bytes())
    if garble == "magic":
        raw[0:8] = b"KDFSCHK2"
    elif garble == "length":
        struct.pack_into("<Q", raw, 8, 2 * BLOCK - 1)
    elif garble == "block":
        struct.pack_into("<I", raw, 16, 0)
    elif garble == "count":
        struct.pack_into("<I", raw, 20, 3)
    else:
        raw += b"x"
    path.write_bytes(raw)
    with pytest.raises(ChunkCorrupt, match=cid):
        store.read(cid)
    with pytest.raises(ChunkCorrupt, match=cid):
        store.verify(cid)


def test_missing_chunk(store):
    cid = new_id()
    assert cid not in store
    for call in (store.read, store.length, store.verify):
        with pytest.raises(ChunkMissing, match=cid):
            call(cid)
    with pytest.raises(ChunkMissing, match=cid):
        store.sync([cid])
    assert store.delete(cid) is False


BAD_IDS = ["", "0" * 31, "0" * 33, "A" * 32, "g" * 32, "../" + "0" * 29, "0" * 32 + "\n",
           "00/" + "0" * 29, "/" + "0" * 31, "." * 32, b"0" * 32, None, 12345,
           uuid.UUID(int=0)]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_bad_ids_are_refused(store, bad):
    before = sorted(p.relative_to(store.root.parent) for p in store.root.parent.rglob("*"))
    for call in (lambda: store.put(bad, b"x"), lambda: store.read(bad), lambda: store.path(bad),
                 lambda: store.length(bad), lambda: store.verify(bad), lambda: store.delete(bad),
                 lambda: bad in store, lambda: store.sync([bad])):
        with pytest.raises(ValueError, match="chunk id"):
            call()
    assert sorted(p.relative_to(store.root.parent) for p in store.root.parent.rglob("*")) == before


# ---- failures while writing ------------------------------------------------------------------


def _patch_on_tmp(monkeypatch, store, name, code):
    """Make os.<name> fail with `code` on the store's temporary files only."""
    real = getattr(os, name)
    tmp = str(store.root / "tmp") + "/"

    def failing(fd, *args):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(tmp):
            raise OSError(code, os.strerror(code))
        return real(fd, *args)

    monkeypatch.setattr(os, name, failing)


@pytest.mark.parametrize("name,code,sync", [("write", errno.ENOSPC, False),
                                            ("write", errno.EIO, False),
                                            ("fsync", errno.EIO, True)])
def test_write_error_leaves_no_tmp(store, monkeypatch, name, code, sync):
    cid = new_id()
    _patch_on_tmp(monkeypatch, store, name, code)
    with pytest.raises(OSError) as e:
        store.put(cid, payload(BLOCK), sync=sync)
    monkeypatch.undo()
    assert e.value.errno == code
    assert tmp_files(store) == []
    assert cid not in store


def test_partial_writes_are_completed(store, monkeypatch):
    real = os.write

    def short(fd, data):
        return real(fd, bytes(memoryview(data)[:1000]))

    monkeypatch.setattr(os, "write", short)
    cid = new_id()
    data = payload(3 * BLOCK + 1)
    store.put(cid, data)
    monkeypatch.undo()
    assert store.read(cid) == data


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a 1 MiB tmpfs to fill a disk: needs root")
def test_enospc_on_a_full_disk_leaves_no_tmp(tmp_path, backend):
    disk = tmp_path / "small"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        store = ChunkStore(disk, block_size=BLOCK)
        small = new_id()
        store.put(small, b"kept", sync=True)
        cid = new_id()
        with pytest.raises(OSError) as e:
            store.put(cid, payload(2 << 20), sync=True)
        assert e.value.errno == errno.ENOSPC
        assert tmp_files(store) == []
        assert cid not in store
        assert list(store.ids()) == [small]
        # The space came back: a chunk that fits still goes in.
        other = new_id()
        store.put(other, payload(100 * 1024))
        assert store.read(other) == payload(100 * 1024)
        assert store.read(small) == b"kept"
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ---- housekeeping ----------------------------------------------------------------------------


def test_tmp_is_emptied_when_the_store_opens(tmp_path, backend):
    store = ChunkStore(tmp_path / "disk", block_size=BLOCK)
    cid = new_id()
    store.put(cid, b"data")
    (store.root / "tmp" / f"{new_id()}.123.0").write_bytes(b"half a chunk")
    (store.root / "tmp" / "junk").write_bytes(b"")
    again = ChunkStore(tmp_path / "disk", block_size=BLOCK)
    assert tmp_files(again) == []
    assert again.read(cid) == b"data"


def test_delete(store):
    cid = new_id()
    store.put(cid, b"abc")
    assert store.delete(cid) is True
    assert cid not in store
    assert store.delete(cid) is False
    with pytest.raises(ChunkMissing):
        store.read(cid)


def test_ids_skip_what_is_not_a_chunk(store):
    ids = {new_id() for _ in range(20)}
    for cid in ids:
        store.put(cid, cid.encode())
    chunks = store.root / "chunks"
    (chunks / "README").write_text("not a chunk")
    (chunks / "zz").mkdir()
    (chunks / "zz" / ("z" * 32)).write_text("not a chunk")
    misplaced = "ab" + "0" * 30
    (chunks / "cd").mkdir(exist_ok=True)
    (chunks / "cd" / misplaced).write_text("in the wrong directory")
    assert set(store.ids()) == ids
    for cid in list(ids)[:5]:
        store.delete(cid)
        ids.discard(cid)
    assert set(store.ids()) == ids


def test_sync(store):
    ids = [new_id() for _ in range(3)]
    for cid in ids:
        store.put(cid, b"x" * 10)
    store.sync(ids)
    store.sync([])


def test_usage(store):
    empty = store.usage()
    assert set(empty) == {"total", "free", "avail", "chunks", "stored"}
    assert empty["chunks"] == empty["stored"] == 0
    assert empty["total"] >= empty["free"] >= empty["avail"] >= 0
    assert empty["total"] > 0
    sizes = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 17, 3 * (BLOCK + 4)]
    for n in sizes:
        store.put(new_id(), payload(n))
    used = store.usage()
    assert used["chunks"] == len(sizes)
    assert used["stored"] == sum(sizes)
    st = os.statvfs(store.root)
    assert used["total"] == st.f_blocks * st.f_frsize
