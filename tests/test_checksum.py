"""kdfs.checksum: CRC32C, native (csrc/crc32c.c through cffi) and pure Python.

The pure-Python code is the oracle: it is checked against published vectors and a bit-at-a-time
CRC written here, then the C code (the SSE4.2 path and the table path) is checked against it on
random data of many lengths and alignments. The public API runs on both backends.
"""
import array
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from kdfs import checksum

ROOT = Path(__file__).resolve().parent.parent
NOT_BUILT = "kdfs._crc32c is not built: run `make native`"

# (data, crc32c): RFC 3720 (iSCSI) B.4 and common check values.
VECTORS = [
    (b"", 0x00000000),
    (b"a", 0xC1D04330),
    (b"123456789", 0xE3069283),
    (b"The quick brown fox jumps over the lazy dog", 0x22620404),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]

KIB = 1024
LENGTHS = [0, 1, 7, 8, 9, 15, 16, 63, 64, 65, 1000, 64 * KIB - 1, 64 * KIB, 64 * KIB + 1]


def bitwise_crc32c(data: bytes, crc: int = 0) -> int:
    """The CRC straight from its definition, one bit at a time: checks the oracle's tables."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.fixture(params=["native", "python"])
def backend(request):
    """Each test once per backend; the backend chosen before is restored afterwards."""
    before = checksum.backend
    if request.param == "native" and not checksum.native_available():
        pytest.skip(NOT_BUILT)
    checksum.select(request.param == "native")
    yield request.param
    checksum.select(before == "native")


@pytest.fixture
def native():
    if not checksum.native_available():
        pytest.skip(NOT_BUILT)


def test_select_names_the_backend(backend):
    assert checksum.backend == backend


@pytest.mark.parametrize("data,expected", VECTORS)
def test_known_vectors(backend, data, expected):
    assert checksum.crc32c(data) == expected


@pytest.mark.parametrize("data,expected", VECTORS)
def test_oracle_matches_the_definition(data, expected):
    assert bitwise_crc32c(data) == expected
    assert checksum.python_crc32c(data) == expected


def test_oracle_against_the_definition_on_random_data():
    rng = random.Random(1)
    for n in list(range(0, 40)) + [255, 256, 257, 1021]:
        data = rng.randbytes(n)
        crc = rng.getrandbits(32)
        assert checksum.python_crc32c(data) == bitwise_crc32c(data), n
        assert checksum.python_crc32c(data, crc) == bitwise_crc32c(data, crc), n


@pytest.fixture(scope="module")
def big():
    """4 MiB + 8 of random data and the oracle's CRC of each 4 MiB window at offsets 0..7
    (the pure-Python CRC of 4 MiB takes a good fraction of a second: computed once)."""
    data = random.Random(2).randbytes(4 * KIB * KIB + 8)
    mv = memoryview(data)
    return data, {a: checksum.python_crc32c(mv[a:a + 4 * KIB * KIB]) for a in (0, 1, 3)}


def test_native_matches_oracle_on_many_lengths_and_alignments(native):
    rng = random.Random(3)
    buf = memoryview(rng.randbytes(64 * KIB + 64))
    for n in LENGTHS:
        for align in range(8):
            piece = buf[align:align + n]
            want = checksum.python_crc32c(piece)
            assert checksum._native_crc32c(piece) == want, (n, align)
            assert checksum.native_table_crc32c(piece) == want, (n, align)


def test_native_matches_oracle_on_4mib(native, big):
    data, want = big
    mv = memoryview(data)
    for align, crc in want.items():
        assert checksum._native_crc32c(mv[align:align + 4 * KIB * KIB]) == crc, align
        assert checksum.native_table_crc32c(mv[align:align + 4 * KIB * KIB]) == crc, align


def test_native_block_crcs_match_oracle_on_4mib(native, big):
    data, _ = big
    want = checksum.python_block_crcs(data)
    assert len(want) == 65  # 64 full blocks and one of 8 bytes
    assert checksum._native_block_crcs(data) == want


@pytest.mark.parametrize("n", LENGTHS)
def test_continuation(backend, n):
    rng = random.Random(n)
    data = rng.randbytes(n)
    whole = checksum.crc32c(data)
    for cut in {0, n // 3, n // 2, max(0, n - 1), n}:
        assert checksum.crc32c(data[cut:], checksum.crc32c(data[:cut])) == whole, cut
    # The continued CRC may be any 32-bit value, with or without the C code.
    start = rng.getrandbits(32)
    assert checksum.crc32c(data, start) == checksum.python_crc32c(data, start)


@pytest.mark.parametrize("n,block", [(0, 7), (1, 7), (6, 7), (7, 7), (8, 7), (100, 7),
                                     (64 * KIB - 1, 64 * KIB), (64 * KIB, 64 * KIB),
                                     (64 * KIB + 1, 64 * KIB), (3 * 64 * KIB + 5, 64 * KIB)])
def test_block_crcs(backend, n, block):
    data = random.Random(n).randbytes(n)
    want = [checksum.python_crc32c(data[i:i + block]) for i in range(0, n, block)]
    assert checksum.block_crcs(data, block) == want
    assert len(want) == -(-n // block)
    if block == checksum.BLOCK_SIZE:
        assert checksum.block_crcs(data) == want


@pytest.mark.parametrize("block", [0, -1, 1.5, None])
def test_block_crcs_refuses_a_bad_block_size(backend, block):
    with pytest.raises(ValueError):
        checksum.block_crcs(b"abc", block)


def test_buffer_types(backend):
    data = b"123456789"
    assert checksum.crc32c(bytearray(data)) == 0xE3069283
    assert checksum.crc32c(memoryview(data)) == 0xE3069283
    assert checksum.crc32c(memoryview(b"xx123456789")[2:]) == 0xE3069283
    # Not contiguous: every other byte.
    assert checksum.crc32c(memoryview(b"1-2-3-4-5-6-7-8-9-")[::2]) == 0xE3069283
    words = array.array("I", range(100))
    assert checksum.crc32c(words) == checksum.python_crc32c(words.tobytes())
    assert checksum.block_crcs(memoryview(words), 64) == checksum.python_block_crcs(
        words.tobytes(), 64)
    with pytest.raises(TypeError):
        checksum.crc32c("123456789")


def test_fallback_when_the_module_is_missing(monkeypatch):
    before = checksum.backend
    monkeypatch.setattr(checksum, "_native", None)
    monkeypatch.setitem(sys.modules, "kdfs._crc32c", None)  # import raises ImportError
    try:
        assert checksum.select() == "python"
        assert checksum.crc32c(b"123456789") == 0xE3069283
        assert not checksum.native_available()
        with pytest.raises(ImportError, match="make native"):
            checksum.select(True)
    finally:
        monkeypatch.undo()
        checksum.select(before == "native")


def _backend_in_subprocess(**env) -> str:
    code = "from kdfs import checksum; print(checksum.backend)"
    environ = {k: v for k, v in os.environ.items() if k != "KRG_NATIVE"} | env
    r = subprocess.run([sys.executable, "-c", code], env=environ, cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_krg_native_python_forces_the_fallback():
    assert _backend_in_subprocess(KRG_NATIVE="python") == "python"


def test_native_by_default_when_built(native):
    assert _backend_in_subprocess() == "native"
