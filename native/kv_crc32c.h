/* CRC-32C (Castagnoli) for kvstore: plain and fused with a copy.
 *
 * Header-only on purpose: the repository ignores *.c files (generated Cython
 * output), so the C code lives here and is compiled into kvstore._native
 * through native/_native.pyx.
 *
 * Definitions (the same as the pure-Python reference, kvstore/block/reference.py):
 *   polynomial 0x1EDC6F41, reflected (0x82F63B78), register initialised to
 *   0xFFFFFFFF and inverted at the end;  kv_crc32c(0, "123456789") == 0xE3069283.
 *   kv_crc32c(kv_crc32c(0, a), b) == kv_crc32c(0, a ‖ b)   (zlib-style chaining).
 *
 * Three implementations, chosen at run time (kv_crc32c_init):
 *   "sse4.2"  the SSE4.2 crc32 instruction on three independent streams at once
 *             (its latency is 3 cycles, its throughput 1 per cycle), the three
 *             partial CRCs joined with "append N zero bytes" operators kept as
 *             4x256-entry tables;
 *   "table"   portable slicing-by-8 tables.
 * The fused copy (kv_crc32c_copy) loads each 8-byte word once, stores it to
 * the destination and feeds the same register to the CRC, so the bytes are
 * checksummed while they are in registers.
 */
#ifndef KV_CRC32C_H
#define KV_CRC32C_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define KV_CRC32C_POLY 0x82F63B78u /* reflected 0x1EDC6F41 */
#define KV_CRC_LONG 8192           /* bytes per stream, long interleave */
#define KV_CRC_SHORT 256           /* bytes per stream, short interleave */

static uint32_t kv_crc_tab[8][256];    /* slicing-by-8 */
static uint32_t kv_crc_long[4][256];   /* append KV_CRC_LONG zero bytes */
static uint32_t kv_crc_short[4][256];  /* append KV_CRC_SHORT zero bytes */
enum { KV_CRC_TABLE = 0, KV_CRC_SSE42 = 1, KV_CRC_AVX512 = 2 };
static int kv_crc_mode = KV_CRC_TABLE;  /* the implementation in use */
static int kv_crc_best = KV_CRC_TABLE;  /* the best this CPU can run */
static int kv_crc_ready = 0;

static inline uint64_t kv_ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void kv_st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* ---- GF(2) linear operators on the 32-bit CRC register ------------------ */

/* m[i] is the image of bit i. */
static uint32_t kv_gf2_apply(const uint32_t m[32], uint32_t v) {
    uint32_t r = 0;
    for (int i = 0; v; i++, v >>= 1)
        if (v & 1) r ^= m[i];
    return r;
}

/* out = a after b */
static void kv_gf2_compose(uint32_t out[32], const uint32_t a[32], const uint32_t b[32]) {
    uint32_t t[32];
    for (int i = 0; i < 32; i++) t[i] = kv_gf2_apply(a, b[i]);
    memcpy(out, t, sizeof t);
}

/* Operator "append n zero bytes" (on the raw register), as 4 byte tables. */
static void kv_zeros_tables(uint32_t tab[4][256], size_t n) {
    uint32_t op[32], acc[32];
    for (int i = 0; i < 32; i++) {            /* one zero byte */
        uint32_t v = 1u << i;
        op[i] = kv_crc_tab[0][v & 0xff] ^ (v >> 8);
        acc[i] = v;                           /* identity */
    }
    while (n) {
        if (n & 1) kv_gf2_compose(acc, op, acc);
        n >>= 1;
        if (n) kv_gf2_compose(op, op, op);
    }
    for (int k = 0; k < 4; k++)
        for (uint32_t b = 0; b < 256; b++) tab[k][b] = kv_gf2_apply(acc, b << (8 * k));
}

static inline uint32_t kv_shift(const uint32_t tab[4][256], uint32_t r) {
    return tab[0][r & 0xff] ^ tab[1][(r >> 8) & 0xff] ^ tab[2][(r >> 16) & 0xff] ^ tab[3][r >> 24];
}

/* ---- portable: slicing-by-8 ---------------------------------------------- */

static inline uint32_t kv_sw_word(uint32_t r, uint64_t w) {
    uint32_t lo = r ^ (uint32_t)w, hi = (uint32_t)(w >> 32);
    return kv_crc_tab[7][lo & 0xff] ^ kv_crc_tab[6][(lo >> 8) & 0xff] ^
           kv_crc_tab[5][(lo >> 16) & 0xff] ^ kv_crc_tab[4][lo >> 24] ^
           kv_crc_tab[3][hi & 0xff] ^ kv_crc_tab[2][(hi >> 8) & 0xff] ^
           kv_crc_tab[1][(hi >> 16) & 0xff] ^ kv_crc_tab[0][hi >> 24];
}

static inline uint32_t kv_sw_byte(uint32_t r, uint8_t b) {
    return kv_crc_tab[0][(r ^ b) & 0xff] ^ (r >> 8);
}

/* raw register update; dst may be NULL (no copy) */
static uint32_t kv_sw_raw(uint32_t r, uint8_t *dst, const uint8_t *src, size_t n) {
    if (dst) {
        while (n >= 8) { uint64_t w = kv_ld64(src); kv_st64(dst, w); r = kv_sw_word(r, w);
                         src += 8; dst += 8; n -= 8; }
        while (n--) { uint8_t b = *src++; *dst++ = b; r = kv_sw_byte(r, b); }
    } else {
        while (n >= 8) { r = kv_sw_word(r, kv_ld64(src)); src += 8; n -= 8; }
        while (n--) r = kv_sw_byte(r, *src++);
    }
    return r;
}

/* ---- SSE4.2 crc32 instruction, 3 streams ---------------------------------- */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KV_HAVE_X86 1
#include <immintrin.h>

#define KV_HW __attribute__((target("sse4.2")))

/* One interleaved step over 3 streams of `len` bytes at p, p+len, p+2len. */
#define KV_HW_STRIPES(len, tab)                                                        \
    while (n >= 3 * (size_t)(len)) {                                                   \
        uint64_t c0 = r, c1 = 0, c2 = 0;                                               \
        const uint8_t *s = src;                                                        \
        if (COPY) {                                                                    \
            uint8_t *d = dst;                                                          \
            for (size_t i = 0; i < (len); i += 8) {                                    \
                uint64_t a = kv_ld64(s + i), b = kv_ld64(s + (len) + i),               \
                         c = kv_ld64(s + 2 * (len) + i);                               \
                kv_st64(d + i, a); kv_st64(d + (len) + i, b); kv_st64(d + 2 * (len) + i, c); \
                c0 = _mm_crc32_u64(c0, a); c1 = _mm_crc32_u64(c1, b);                  \
                c2 = _mm_crc32_u64(c2, c);                                             \
            }                                                                          \
            dst += 3 * (len);                                                          \
        } else {                                                                       \
            for (size_t i = 0; i < (len); i += 8) {                                    \
                c0 = _mm_crc32_u64(c0, kv_ld64(s + i));                                \
                c1 = _mm_crc32_u64(c1, kv_ld64(s + (len) + i));                        \
                c2 = _mm_crc32_u64(c2, kv_ld64(s + 2 * (len) + i));                    \
            }                                                                          \
        }                                                                              \
        r = kv_shift(tab, (uint32_t)c0) ^ (uint32_t)c1;                                \
        r = kv_shift(tab, r) ^ (uint32_t)c2;                                           \
        src += 3 * (len); n -= 3 * (size_t)(len);                                      \
    }

#define KV_HW_BODY                                                                     \
    KV_HW_STRIPES(KV_CRC_LONG, kv_crc_long)                                            \
    KV_HW_STRIPES(KV_CRC_SHORT, kv_crc_short)                                          \
    {                                                                                  \
        uint64_t c = r;                                                                \
        while (n >= 8) {                                                               \
            uint64_t w = kv_ld64(src);                                                 \
            if (COPY) { kv_st64(dst, w); dst += 8; }                                   \
            c = _mm_crc32_u64(c, w); src += 8; n -= 8;                                 \
        }                                                                              \
        r = (uint32_t)c;                                                               \
        while (n--) {                                                                  \
            uint8_t b = *src++;                                                        \
            if (COPY) *dst++ = b;                                                      \
            r = _mm_crc32_u8(r, b);                                                    \
        }                                                                              \
    }                                                                                  \
    return r;

KV_HW static uint32_t kv_hw_raw(uint32_t r, const uint8_t *src, size_t n) {
    enum { COPY = 0 };
    uint8_t *dst = NULL;
    (void)dst;
    KV_HW_BODY
}

KV_HW static uint32_t kv_hw_raw_copy(uint32_t r, uint8_t *dst, const uint8_t *src, size_t n) {
    enum { COPY = 1 };
    KV_HW_BODY
}

/* ---- AVX-512 + VPCLMULQDQ: carry-less multiply folding -------------------
 *
 * The message is a polynomial over GF(2); the raw CRC register after it is
 * (M(x) * x^32) mod P(x).  Folding keeps four 512-bit accumulators (sixteen
 * 128-bit lanes covering a 256-byte window) congruent to the message so far
 * modulo P.  Moving a lane L forward by F bits is
 *     L(x) * x^F  ==  Llo(x) * (x^(F+64) mod P)  +  Lhi(x) * (x^F mod P)
 * two 64x32-bit carry-less products that fit in 128 bits.  In the reflected
 * bit order used here (byte 0, bit 0 is the highest power), a 64-bit half
 * times a 32-bit reflected constant lands 33 bits "too high", so the
 * constants are x^(F+31) and x^(F-33) mod P (see kv_fold_consts).  The
 * starting register is xored into the first 4 bytes; at the end the sixteen
 * lanes are folded into one and its 16 bytes run through the crc32
 * instruction, which multiplies by x^32 and reduces. */

enum { KV_K128, KV_K256, KV_K384, KV_K512, KV_K1024, KV_K1536, KV_K2048 };
static const size_t kv_fold_bits[7] = {128, 256, 384, 512, 1024, 1536, 2048};
static uint64_t kv_fold_k[7][2]; /* {low-qword, high-qword} constants per kv_fold_bits */

/* rev32(x^n mod P), in the reflected register representation */
static uint32_t kv_xpow_mod(size_t n) {
    uint32_t r = 0x80000000u; /* x^0 */
    while (n--) r = (r >> 1) ^ ((r & 1) ? KV_CRC32C_POLY : 0);
    return r;
}

static void kv_fold_consts(uint64_t out[2], size_t f_bits) {
    out[0] = kv_xpow_mod(f_bits + 31); /* multiplies the low qword (higher powers) */
    out[1] = kv_xpow_mod(f_bits - 33); /* multiplies the high qword */
}


#define KV_V512 __attribute__((target("avx512f,avx512bw,vpclmulqdq,pclmul,sse4.2")))

KV_V512 static inline __m512i kv_fold512(__m512i x, __m512i k, __m512i y) {
    return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00),
                                     _mm512_clmulepi64_epi128(x, k, 0x11), y, 0x96);
}

KV_V512 static inline __m128i kv_fold128(__m128i x, int which, __m128i y) {
    __m128i k = _mm_set_epi64x((long long)kv_fold_k[which][1], (long long)kv_fold_k[which][0]);
    return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00),
                                       _mm_clmulepi64_si128(x, k, 0x11)), y);
}

KV_V512 static inline __m512i kv_k512(int which) {
    return _mm512_broadcast_i32x4(
        _mm_set_epi64x((long long)kv_fold_k[which][1], (long long)kv_fold_k[which][0]));
}

#define KV_V512_BODY                                                                   \
    if (n >= 512) {                                                                    \
        __m512i x0 = _mm512_loadu_si512(src), x1 = _mm512_loadu_si512(src + 64),       \
                x2 = _mm512_loadu_si512(src + 128), x3 = _mm512_loadu_si512(src + 192); \
        if (COPY) {                                                                    \
            KV_ST512(dst, x0); KV_ST512(dst + 64, x1);                                 \
            KV_ST512(dst + 128, x2); KV_ST512(dst + 192, x3);                          \
            dst += 256;                                                                \
        }                                                                              \
        x0 = _mm512_xor_si512(x0, _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, \
                                                    0, 0, 0, (int)r));                 \
        src += 256; n -= 256;                                                          \
        const __m512i k = kv_k512(KV_K2048);                                           \
        while (n >= 256) {                                                             \
            __m512i y0 = _mm512_loadu_si512(src), y1 = _mm512_loadu_si512(src + 64),   \
                    y2 = _mm512_loadu_si512(src + 128), y3 = _mm512_loadu_si512(src + 192); \
            if (COPY) {                                                                \
                KV_ST512(dst, y0); KV_ST512(dst + 64, y1);                             \
                KV_ST512(dst + 128, y2); KV_ST512(dst + 192, y3);                      \
                dst += 256;                                                            \
            }                                                                          \
            x0 = kv_fold512(x0, k, y0); x1 = kv_fold512(x1, k, y1);                    \
            x2 = kv_fold512(x2, k, y2); x3 = kv_fold512(x3, k, y3);                    \
            src += 256; n -= 256;                                                      \
        }                                                                              \
        x3 = kv_fold512(x0, kv_k512(KV_K1536), x3);                                    \
        x3 = kv_fold512(x1, kv_k512(KV_K1024), x3);                                    \
        x3 = kv_fold512(x2, kv_k512(KV_K512), x3);                                     \
        __m128i a = _mm512_extracti32x4_epi32(x3, 3);                                  \
        a = kv_fold128(_mm512_extracti32x4_epi32(x3, 0), KV_K384, a);                  \
        a = kv_fold128(_mm512_extracti32x4_epi32(x3, 1), KV_K256, a);                  \
        a = kv_fold128(_mm512_extracti32x4_epi32(x3, 2), KV_K128, a);                  \
        uint64_t c = _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(a));                 \
        r = (uint32_t)_mm_crc32_u64(c, (uint64_t)_mm_extract_epi64(a, 1));             \
    }                                                                                  \
    {                                                                                  \
        uint64_t c = r;                                                                \
        while (n >= 8) {                                                               \
            uint64_t w = kv_ld64(src);                                                 \
            if (COPY) { kv_st64(dst, w); dst += 8; }                                   \
            c = _mm_crc32_u64(c, w); src += 8; n -= 8;                                 \
        }                                                                              \
        r = (uint32_t)c;                                                               \
        while (n--) {                                                                  \
            uint8_t b = *src++;                                                        \
            if (COPY) *dst++ = b;                                                      \
            r = _mm_crc32_u8(r, b);                                                    \
        }                                                                              \
    }                                                                                  \
    return r;

#define KV_ST512(p, v) _mm512_storeu_si512((void *)(p), (v))

KV_V512 static uint32_t kv_v512_raw(uint32_t r, const uint8_t *src, size_t n) {
    enum { COPY = 0 };
    uint8_t *dst = NULL;
    (void)dst;
    KV_V512_BODY
}

KV_V512 static uint32_t kv_v512_raw_copy(uint32_t r, uint8_t *dst, const uint8_t *src, size_t n) {
    enum { COPY = 1 };
    KV_V512_BODY
}

#undef KV_ST512
#define KV_ST512(p, v) _mm512_stream_si512((void *)(p), (v))

/* The same with non-temporal (streaming) stores, which skip reading the
 * destination lines into the cache first: faster for copies much larger than
 * the cache, slower for small ones. dst must be 64-byte aligned. */
KV_V512 static uint32_t kv_v512_raw_copy_nt_aligned(uint32_t r, uint8_t *dst, const uint8_t *src,
                                                    size_t n) {
    enum { COPY = 1 };
    KV_V512_BODY
}

#undef KV_ST512

KV_V512 static uint32_t kv_v512_raw_copy_nt(uint32_t r, uint8_t *dst, const uint8_t *src,
                                            size_t n) {
    size_t head = (size_t)(-(uintptr_t)dst & 63);
    if (head > n) head = n;
    if (head) {
        r = kv_hw_raw_copy(r, dst, src, head);
        dst += head; src += head; n -= head;
    }
    r = kv_v512_raw_copy_nt_aligned(r, dst, src, n);
    _mm_sfence(); /* order the streaming stores before whatever follows */
    return r;
}
#else
#define KV_HAVE_X86 0
#endif

/* ---- public ---------------------------------------------------------------- */

/* Build the tables and pick the implementation. Call once (module import),
 * before any other thread can call in. */
static void kv_crc32c_init(void) {
    if (kv_crc_ready) return;
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ KV_CRC32C_POLY : c >> 1;
        kv_crc_tab[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int k = 1; k < 8; k++)
            kv_crc_tab[k][i] = (kv_crc_tab[k - 1][i] >> 8) ^ kv_crc_tab[0][kv_crc_tab[k - 1][i] & 0xff];
    kv_zeros_tables(kv_crc_long, KV_CRC_LONG);
    kv_zeros_tables(kv_crc_short, KV_CRC_SHORT);
#if KV_HAVE_X86
    for (int i = 0; i < 7; i++) kv_fold_consts(kv_fold_k[i], kv_fold_bits[i]);
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) kv_crc_best = KV_CRC_SSE42;
    if (kv_crc_best == KV_CRC_SSE42 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("vpclmulqdq") &&
        __builtin_cpu_supports("pclmul"))
        kv_crc_best = KV_CRC_AVX512;
#endif
    kv_crc_mode = kv_crc_best;
    kv_crc_ready = 1;
}

/* Use implementation `mode` (KV_CRC_*; -1: the best available).  For tests
 * and benchmarks; not thread-safe against concurrent CRCs.  Returns 0 when the
 * CPU cannot run it. */
static int kv_crc32c_select(int mode) {
    if (mode < 0) mode = kv_crc_best;
    if (mode > kv_crc_best) return 0;
    kv_crc_mode = mode;
    return 1;
}

static const char *kv_crc32c_impl_name(int mode) {
    switch (mode) {
    case KV_CRC_AVX512: return "avx512-vpclmulqdq";
    case KV_CRC_SSE42: return "sse4.2";
    default: return "table";
    }
}

/* CRC-32C of buf, continuing from crc (a previous result; 0 to start). */
static uint32_t kv_crc32c(uint32_t crc, const void *buf, size_t n) {
    uint32_t r = ~crc;
#if KV_HAVE_X86
    if (kv_crc_mode == KV_CRC_AVX512) return ~kv_v512_raw(r, (const uint8_t *)buf, n);
    if (kv_crc_mode == KV_CRC_SSE42) return ~kv_hw_raw(r, (const uint8_t *)buf, n);
#endif
    return ~kv_sw_raw(r, NULL, (const uint8_t *)buf, n);
}

/* memcpy(dst, src, n) and the CRC-32C of those bytes, in one pass.
 * dst and src must not overlap. */
static uint32_t kv_crc32c_copy(uint32_t crc, void *dst, const void *src, size_t n) {
    uint32_t r = ~crc;
#if KV_HAVE_X86
    if (kv_crc_mode == KV_CRC_AVX512)
        return ~kv_v512_raw_copy(r, (uint8_t *)dst, (const uint8_t *)src, n);
    if (kv_crc_mode == KV_CRC_SSE42)
        return ~kv_hw_raw_copy(r, (uint8_t *)dst, (const uint8_t *)src, n);
#endif
    return ~kv_sw_raw(r, (uint8_t *)dst, (const uint8_t *)src, n);
}

/* The same as kv_crc32c_copy, with streaming stores where the CPU has them
 * (AVX-512): for copies much larger than the caches. */
static uint32_t kv_crc32c_copy_nt(uint32_t crc, void *dst, const void *src, size_t n) {
#if KV_HAVE_X86
    if (kv_crc_mode == KV_CRC_AVX512)
        return ~kv_v512_raw_copy_nt(~crc, (uint8_t *)dst, (const uint8_t *)src, n);
#endif
    return kv_crc32c_copy(crc, dst, src, n);
}

#endif /* KV_CRC32C_H */
