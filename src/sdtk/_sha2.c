/*
 * sdtk._sha2: the SHA-256 compression function on the CPU's SHA extensions (SHA-NI), for two
 * independent messages at once, releasing the GIL.
 *
 * Why: a first `sdtk convert` records the input's SHA256 and AutoV3 (sha256 of the same file from
 * a small offset): two sha256 streams over the same bytes. One SHA-NI stream is bound by the
 * latency of SHA256RNDS2 (each pair of rounds waits for the previous one), so the execution units
 * are mostly idle; interleaving the rounds of two independent messages fills them, and both
 * digests cost little more CPU than one (bench/bench_hash.py measures the ratio).
 *
 * What it computes is plain FIPS 180-4 SHA-256 block compression: padding and lengths are done by
 * the caller (sdtk/hashing/sha2pair.py), and tests compare every digest with hashlib's.
 * The state is the eight 32-bit words H0..H7 in native order (32 bytes, a bytearray).
 *
 * Optional: without this module, or on a CPU without SHA-NI (`has_sha_ni()` is False), sdtk hashes
 * with hashlib (OpenSSL), one stream per thread.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define SDTK_X86 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define SDTK_X86 0
#endif

#if SDTK_X86
/* FIPS 180-4 section 4.2.2: the first 32 bits of the fractional parts of the cube roots of the
   first 64 primes. */
static const uint32_t K256[64] __attribute__((aligned(16))) = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define SHA_TARGET __attribute__((target("sha,sse4.1,ssse3")))

/* H0..H7 -> the (ABEF, CDGH) register pair SHA256RNDS2 works on, and back. */
SHA_TARGET static inline void load_state(const uint32_t *h, __m128i *abef, __m128i *cdgh)
{
    __m128i dcba = _mm_loadu_si128((const __m128i *)h);       /* lanes: a b c d */
    __m128i hgfe = _mm_loadu_si128((const __m128i *)(h + 4)); /* lanes: e f g h */
    __m128i badc = _mm_shuffle_epi32(dcba, 0xB1);             /* lanes: b a d c */
    __m128i efgh = _mm_shuffle_epi32(hgfe, 0x1B);             /* lanes: h g f e */
    *abef = _mm_alignr_epi8(badc, efgh, 8);                   /* lanes: f e b a */
    *cdgh = _mm_blend_epi16(efgh, badc, 0xF0);                /* lanes: h g d c */
}

SHA_TARGET static inline void store_state(uint32_t *h, __m128i abef, __m128i cdgh)
{
    __m128i feba = _mm_shuffle_epi32(abef, 0x1B);             /* lanes: a b e f */
    __m128i dchg = _mm_shuffle_epi32(cdgh, 0xB1);             /* lanes: g h c d */
    _mm_storeu_si128((__m128i *)h, _mm_blend_epi16(feba, dchg, 0xF0));       /* a b c d */
    _mm_storeu_si128((__m128i *)(h + 4), _mm_alignr_epi8(dchg, feba, 8));   /* e f g h */
}

/* One message: `nblocks` 64-byte blocks. The schedule keeps W in four registers (W[4g..4g+3]). */
SHA_TARGET static void compress1(uint32_t *h, const uint8_t *p, Py_ssize_t nblocks)
{
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i abef, cdgh;
    load_state(h, &abef, &cdgh);
    for (; nblocks > 0; nblocks--, p += 64) {
        __m128i abef0 = abef, cdgh0 = cdgh, m[4];
#pragma GCC unroll 16
        for (int g = 0; g < 16; g++) {
            __m128i w;
            if (g < 4) {
                w = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16 * g)), bswap);
            } else {
                __m128i t = _mm_add_epi32(_mm_sha256msg1_epu32(m[g & 3], m[(g + 1) & 3]),
                                          _mm_alignr_epi8(m[(g + 3) & 3], m[(g + 2) & 3], 4));
                w = _mm_sha256msg2_epu32(t, m[(g + 3) & 3]);
            }
            m[g & 3] = w;
            __m128i wk = _mm_add_epi32(w, _mm_load_si128((const __m128i *)(K256 + 4 * g)));
            cdgh = _mm_sha256rnds2_epu32(cdgh, abef, wk);
            abef = _mm_sha256rnds2_epu32(abef, cdgh, _mm_shuffle_epi32(wk, 0x0E));
        }
        abef = _mm_add_epi32(abef, abef0);
        cdgh = _mm_add_epi32(cdgh, cdgh0);
    }
    store_state(h, abef, cdgh);
}

/* The message schedule of one block, plus the round constants: W[i] + K[i], i = 0..63. */
SHA_TARGET static inline void schedule(__m128i *wk, const uint8_t *p)
{
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i m[4];
#pragma GCC unroll 16
    for (int g = 0; g < 16; g++) {
        __m128i w;
        if (g < 4) {
            w = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16 * g)), bswap);
        } else {
            __m128i t = _mm_add_epi32(_mm_sha256msg1_epu32(m[g & 3], m[(g + 1) & 3]),
                                      _mm_alignr_epi8(m[(g + 3) & 3], m[(g + 2) & 3], 4));
            w = _mm_sha256msg2_epu32(t, m[(g + 3) & 3]);
        }
        m[g & 3] = w;
        _mm_store_si128(wk + g, _mm_add_epi32(w, _mm_load_si128((const __m128i *)(K256 + 4 * g))));
    }
}

/* Two independent messages of `nblocks` blocks each, their rounds interleaved. W+K of both blocks
   go through memory first: each round pair then takes its inputs with a load (the upper pair of
   a group with a 64-bit load) instead of a shuffle on the port SHA256RNDS2 needs, which is what
   bounds two interleaved streams. */
SHA_TARGET static void compress2(uint32_t *ha, const uint8_t *pa, uint32_t *hb, const uint8_t *pb, Py_ssize_t nblocks)
{
    __m128i abef_a, cdgh_a, abef_b, cdgh_b;
    __m128i wk_a[16], wk_b[16];
    load_state(ha, &abef_a, &cdgh_a);
    load_state(hb, &abef_b, &cdgh_b);
    for (; nblocks > 0; nblocks--, pa += 64, pb += 64) {
        __m128i a0 = abef_a, c0 = cdgh_a, b0 = abef_b, d0 = cdgh_b;
        schedule(wk_a, pa);
        schedule(wk_b, pb);
        __asm__ volatile("" : : "r"(wk_a), "r"(wk_b) : "memory"); /* the rounds read W+K from memory */
#pragma GCC unroll 16
        for (int g = 0; g < 16; g++) {
            cdgh_a = _mm_sha256rnds2_epu32(cdgh_a, abef_a, _mm_load_si128(wk_a + g));
            cdgh_b = _mm_sha256rnds2_epu32(cdgh_b, abef_b, _mm_load_si128(wk_b + g));
            abef_a = _mm_sha256rnds2_epu32(abef_a, cdgh_a, _mm_loadl_epi64((const __m128i *)((const char *)(wk_a + g) + 8)));
            abef_b = _mm_sha256rnds2_epu32(abef_b, cdgh_b, _mm_loadl_epi64((const __m128i *)((const char *)(wk_b + g) + 8)));
        }
        abef_a = _mm_add_epi32(abef_a, a0);
        cdgh_a = _mm_add_epi32(cdgh_a, c0);
        abef_b = _mm_add_epi32(abef_b, b0);
        cdgh_b = _mm_add_epi32(cdgh_b, d0);
    }
    store_state(ha, abef_a, cdgh_a);
    store_state(hb, abef_b, cdgh_b);
}

static int have_sha_ni(void)
{
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        /* SHA (CPUID.7.0:EBX bit 29), SSE4.1 and SSSE3 for the shuffles and blends */
        unsigned int eax, ebx = 0, ecx, edx;
        int sha = 0;
        if (__get_cpuid_max(0, NULL) >= 7) {
            __cpuid_count(7, 0, eax, ebx, ecx, edx);
            sha = (ebx >> 29) & 1;
        }
        (void)eax;
        (void)ecx;
        (void)edx;
        cached = sha && __builtin_cpu_supports("sse4.1") && __builtin_cpu_supports("ssse3");
    }
    return cached;
}
#else
static int have_sha_ni(void) { return 0; }
static void compress1(uint32_t *h, const uint8_t *p, Py_ssize_t n) { (void)h; (void)p; (void)n; }
static void compress2(uint32_t *ha, const uint8_t *pa, uint32_t *hb, const uint8_t *pb, Py_ssize_t n)
{
    (void)ha; (void)pa; (void)hb; (void)pb; (void)n;
}
#endif

static int get_state(PyObject *obj, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->len != 32) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "a sha256 state is 32 bytes");
        return -1;
    }
    return 0;
}

static int get_blocks(PyObject *obj, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->len % 64) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "sha256 data must be whole 64-byte blocks");
        return -1;
    }
    return 0;
}

/* compress(state_a, data_a, state_b=None, data_b=None): feed whole blocks to one or two states. */
static PyObject *py_compress(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *sa, *da, *sb = Py_None, *db = Py_None;
    Py_buffer bsa, bda, bsb, bdb;
    if (!PyArg_ParseTuple(args, "OO|OO", &sa, &da, &sb, &db))
        return NULL;
    if (!have_sha_ni()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU has no SHA extensions");
        return NULL;
    }
    int two = sb != Py_None;
    if (get_state(sa, &bsa) < 0)
        return NULL;
    if (get_blocks(da, &bda) < 0) {
        PyBuffer_Release(&bsa);
        return NULL;
    }
    if (two) {
        if (get_state(sb, &bsb) < 0) {
            PyBuffer_Release(&bsa);
            PyBuffer_Release(&bda);
            return NULL;
        }
        if (get_blocks(db, &bdb) < 0) {
            PyBuffer_Release(&bsa);
            PyBuffer_Release(&bda);
            PyBuffer_Release(&bsb);
            return NULL;
        }
        if (bsa.buf == bsb.buf) {
            PyBuffer_Release(&bsa);
            PyBuffer_Release(&bda);
            PyBuffer_Release(&bsb);
            PyBuffer_Release(&bdb);
            PyErr_SetString(PyExc_ValueError, "the two states must be different objects");
            return NULL;
        }
    }
    Py_ssize_t na = bda.len / 64, nb = two ? bdb.len / 64 : 0;
    Py_BEGIN_ALLOW_THREADS
    uint32_t *ha = (uint32_t *)bsa.buf;
    const uint8_t *pa = (const uint8_t *)bda.buf;
    if (two) {
        uint32_t *hb = (uint32_t *)bsb.buf;
        const uint8_t *pb = (const uint8_t *)bdb.buf;
        Py_ssize_t both = na < nb ? na : nb;
        /* in pieces of 256 KiB so both messages stay in L2 while they are read */
        for (Py_ssize_t done = 0; done < both;) {
            Py_ssize_t n = both - done < 4096 ? both - done : 4096;
            compress2(ha, pa + 64 * done, hb, pb + 64 * done, n);
            done += n;
        }
        if (nb > both)
            compress1(hb, pb + 64 * both, nb - both);
        if (na > both)
            compress1(ha, pa + 64 * both, na - both);
    } else if (na) {
        compress1(ha, pa, na);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&bsa);
    PyBuffer_Release(&bda);
    if (two) {
        PyBuffer_Release(&bsb);
        PyBuffer_Release(&bdb);
    }
    Py_RETURN_NONE;
}

static PyObject *py_has_sha_ni(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    return PyBool_FromLong(have_sha_ni());
}

static PyMethodDef methods[] = {
    {"compress", py_compress, METH_VARARGS,
     "compress(state_a, blocks_a, state_b=None, blocks_b=None): SHA-256 block compression of whole 64-byte blocks "
     "into one or two 32-byte states (H0..H7, native order), two messages interleaved. Needs SHA-NI."},
    {"has_sha_ni", py_has_sha_ni, METH_NOARGS, "True when the CPU has the SHA extensions (and SSE4.1, SSSE3)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "sdtk._sha2", "Two-stream SHA-256 on SHA-NI.", -1, methods};

PyMODINIT_FUNC PyInit__sha2(void) { return PyModule_Create(&module); }
