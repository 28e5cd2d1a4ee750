"""Build kdfs._crc32c, the CRC32C of csrc/crc32c.c, with cffi in API mode.

Run from anywhere (`make native` does: `.venv/bin/python kdfs/_crc32c_build.py`). The compiler's
leftovers (the generated C, the objects) stay in build/crc32c/; only the extension module is put
next to this file, where the editable install imports it. kdfs/checksum.py falls back to pure
Python when the module is missing.
"""

import shutil
import sys
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "crc32c.c"
BUILD = ROOT / "build" / "crc32c"

CDEF = """
uint32_t krg_crc32c(uint32_t crc, const unsigned char *buf, size_t len);
uint32_t krg_crc32c_sw(uint32_t crc, const unsigned char *buf, size_t len);
int krg_crc32c_hw(void);
void krg_block_crcs(const unsigned char *buf, size_t len, size_t block, uint32_t *out);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "kdfs._crc32c",
    "#include <stddef.h>\n#include <stdint.h>\n" + CDEF,
    # Absolute: cffi compiles from inside its temporary directory.
    sources=[str(SOURCE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
)


def main() -> int:
    BUILD.mkdir(parents=True, exist_ok=True)
    built = Path(ffibuilder.compile(tmpdir=str(BUILD), verbose=False))
    target = ROOT / "kdfs" / built.name
    # Through a temporary name and a rename, so a process importing it never sees half a file.
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(built, partial)
    partial.replace(target)
    print(f"built {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
