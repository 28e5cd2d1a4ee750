/*
 * CRC32C (Castagnoli) for KDFS chunk checksums: the iSCSI / ext4 / btrfs crc32c.
 *
 * Reflected polynomial 0x82F63B78, register initialised to 0xFFFFFFFF and the result xor'ed with
 * 0xFFFFFFFF; crc32c("123456789") == 0xE3069283. The value passed in and returned is the finished
 * CRC, so the function continues a previous result: crc(a + b) == krg_crc32c(krg_crc32c(0, a), b).
 *
 * On x86-64 with SSE4.2 (checked once at load with __builtin_cpu_supports) the crc32 instruction
 * does 8 bytes at a time; elsewhere a slicing-by-8 table does. libc only. Built by cffi
 * (kdfs/_crc32c_build.py, `make native`); the C functions are called without the GIL.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define POLY 0x82F63B78u

static uint32_t table[8][256];
static int have_sse42;

static void crc32c_init(void) __attribute__((constructor));

static void crc32c_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (POLY & (0u - (c & 1u)));
        table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 1; k < 8; k++)
            table[k][n] = (table[k - 1][n] >> 8) ^ table[0][table[k - 1][n] & 0xFF];
#if defined(__x86_64__)
    __builtin_cpu_init();
    have_sse42 = __builtin_cpu_supports("sse4.2") != 0;
#endif
}

/* Little-endian loads that compile to one mov on x86 and are safe at any alignment. */
static inline uint32_t load_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Slicing-by-8 on the raw register (no pre/post inversion). */
static uint32_t crc32c_sw(uint32_t crc, const unsigned char *p, size_t len)
{
    while (len && ((uintptr_t)p & 7)) {
        crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xFF];
        len--;
    }
    while (len >= 8) {
        uint32_t lo = load_le32(p) ^ crc;
        uint32_t hi = load_le32(p + 4);
        crc = table[7][lo & 0xFF] ^ table[6][(lo >> 8) & 0xFF] ^
              table[5][(lo >> 16) & 0xFF] ^ table[4][lo >> 24] ^
              table[3][hi & 0xFF] ^ table[2][(hi >> 8) & 0xFF] ^
              table[1][(hi >> 16) & 0xFF] ^ table[0][hi >> 24];
        p += 8;
        len -= 8;
    }
    while (len--)
        crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xFF];
    return crc;
}

#if defined(__x86_64__)
/* The SSE4.2 crc32 instruction computes exactly this CRC (same polynomial, reflected). */
__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crc, const unsigned char *p, size_t len)
{
    uint64_t c = crc;
    while (len && ((uintptr_t)p & 7)) {
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
        len--;
    }
    while (len >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
        p += 8;
        len -= 8;
    }
    while (len--)
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return (uint32_t)c;
}
#endif

uint32_t krg_crc32c(uint32_t crc, const unsigned char *buf, size_t len)
{
    crc = ~crc;
#if defined(__x86_64__)
    if (have_sse42)
        return ~crc32c_hw(crc, buf, len);
#endif
    return ~crc32c_sw(crc, buf, len);
}

/* The table path whatever the CPU, so tests can check it on machines that have SSE4.2. */
uint32_t krg_crc32c_sw(uint32_t crc, const unsigned char *buf, size_t len)
{
    return ~crc32c_sw(~crc, buf, len);
}

/* 1 when krg_crc32c uses the crc32 instruction, 0 when it uses the table. */
int krg_crc32c_hw(void)
{
    return have_sse42;
}

/* One CRC per block of `block` bytes (the last block may be short): ceil(len / block) values. */
void krg_block_crcs(const unsigned char *buf, size_t len, size_t block, uint32_t *out)
{
    if (block == 0)
        return;
    for (size_t off = 0; off < len; off += block) {
        size_t n = len - off < block ? len - off : block;
        *out++ = krg_crc32c(0, buf + off, n);
    }
}
