/*
 * sdtk._fastcast: vectorised float32 <-> float16 casts, bit-identical to numpy, releasing the
 * GIL.
 *
 * Why: numpy converts float32 to float16 with a scalar software loop (about 0.6 GB/s per core),
 * which made `sdtk convert --dtype fp16` CPU-bound. x86-64 CPUs since 2012 have the F16C
 * instructions (VCVTPS2PH / VCVTPH2PS), which convert 8 values per instruction with IEEE 754
 * round-to-nearest-even, the rounding numpy uses.
 *
 * Optional: the package builds and works without this module (sdtk/fastcast.py falls back to
 * numpy), and the F16C paths are chosen at run time only when the CPU reports F16C and AVX2.
 *
 * Exactness against numpy (numpy/_core/src/common/half.hpp, npy_floatbits_to_halfbits):
 *   - finite values: F16C with imm8 = round-to-nearest-even gives the same bits as numpy,
 *     including subnormal results (F16C ignores MXCSR.FTZ for this instruction).
 *   - NaN: numpy keeps the top mantissa bits without setting the quiet bit (a signalling NaN
 *     stays signalling); F16C quiets it. NaN lanes are rewritten with numpy's bits afterwards.
 * float32 -> bfloat16 stays with ml_dtypes (already fast); bfloat16 -> float32 and float32 -> fp8
 * (ml_dtypes: about 0.1 G values/s, scalar) are here too.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define SDTK_X86 1
#include <immintrin.h>
#else
#define SDTK_X86 0
#endif

/* ---------- portable scalar pieces (also the reference for the vector loops) ---------- */

static inline uint16_t numpy_nan_half(uint32_t f)
{
    /* numpy: h = 0x7c00 + (mantissa >> 13), and 0x7c01 when that would read as inf. */
    uint16_t sign = (uint16_t)((f >> 16) & 0x8000u);
    uint16_t m = (uint16_t)((f & 0x007fffffu) >> 13);
    if (m == 0)
        m = 1;
    return (uint16_t)(sign | 0x7c00u | m);
}

/* After a block was converted: rewrite NaN lanes with numpy's bits, count finite inputs that
   became inf (returned) and inputs that were NaN or inf (`*nonfinite`). `in` and `out` are the
   same block. Each special input gives a special output (exponent all ones), so the common block
   without one costs one auto-vectorised scan. */
static Py_ssize_t f16_fixup_counting(const uint32_t *in, uint16_t *out, Py_ssize_t n, Py_ssize_t *nonfinite)
{
    Py_ssize_t overflow = 0, bad = 0;
    uint32_t any_special = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        any_special |= (uint32_t)((out[i] & 0x7c00u) == 0x7c00u);
    if (!any_special)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if ((out[i] & 0x7c00u) != 0x7c00u)
            continue;
        uint32_t f = in[i];
        if ((f & 0x7f800000u) != 0x7f800000u) {
            overflow++; /* finite input, inf output */
            continue;
        }
        bad++;
        if (f & 0x007fffffu)
            out[i] = numpy_nan_half(f);
    }
    *nonfinite += bad;
    return overflow;
}

static Py_ssize_t f16_fixup(const uint32_t *in, uint16_t *out, Py_ssize_t n)
{
    Py_ssize_t ignored = 0;
    return f16_fixup_counting(in, out, n, &ignored);
}

#if SDTK_X86
__attribute__((target("avx2,f16c")))
static void f32_to_f16_block(const float *in, uint16_t *out, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 a = _mm256_loadu_ps(in + i);
        __m256 b = _mm256_loadu_ps(in + i + 8);
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm_storeu_si128((__m128i *)(out + i + 8), _mm256_cvtps_ph(b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    if (i < n) {
        float tail_in[16] = {0};
        uint16_t tail_out[16];
        memcpy(tail_in, in + i, (size_t)(n - i) * sizeof(float));
        _mm_storeu_si128((__m128i *)tail_out, _mm256_cvtps_ph(_mm256_loadu_ps(tail_in), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm_storeu_si128((__m128i *)(tail_out + 8), _mm256_cvtps_ph(_mm256_loadu_ps(tail_in + 8), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        memcpy(out + i, tail_out, (size_t)(n - i) * sizeof(uint16_t));
    }
}

__attribute__((target("avx2,f16c")))
static void f16_to_f32_block(const uint16_t *in, float *out, Py_ssize_t n)
{
    /* VCVTPH2PS is exact for every half value; NaN payloads are kept in the top mantissa bits
       and quieted, as numpy's npy_halfbits_to_floatbits does not. Fixed up below. */
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(in + i))));
    if (i < n) {
        uint16_t tail_in[8] = {0};
        float tail_out[8];
        memcpy(tail_in, in + i, (size_t)(n - i) * sizeof(uint16_t));
        _mm256_storeu_ps(tail_out, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tail_in)));
        memcpy(out + i, tail_out, (size_t)(n - i) * sizeof(float));
    }
}

static int have_f16c(void)
{
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2");
    }
    return cached;
}
#else
static int have_f16c(void) { return 0; }
static void f32_to_f16_block(const float *in, uint16_t *out, Py_ssize_t n) { (void)in; (void)out; (void)n; }
static void f16_to_f32_block(const uint16_t *in, float *out, Py_ssize_t n) { (void)in; (void)out; (void)n; }
#endif

/* numpy's npy_halfbits_to_floatbits for NaN: the 10 mantissa bits go to the top, no quiet bit
   is added. VCVTPH2PS sets the quiet bit; rewrite NaN lanes. */
static void f32_nan_fixup(const uint16_t *in, uint32_t *out, Py_ssize_t n)
{
    uint32_t any_nan = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        any_nan |= (uint32_t)((in[i] & 0x7c00u) == 0x7c00u && (in[i] & 0x03ffu));
    if (!any_nan)
        return;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint16_t h = in[i];
        if ((h & 0x7c00u) == 0x7c00u && (h & 0x03ffu))
            out[i] = ((uint32_t)(h & 0x8000u) << 16) | 0x7f800000u | ((uint32_t)(h & 0x03ffu) << 13);
    }
}


/* ---------- float32 -> fp8 (OCP FP8: e4m3fn, e5m2), round to nearest even ----------
 * Bit-identical to ml_dtypes (float8_e4m3fn / float8_e5m2 casts from float32), checked by
 * tests/test_fastcast.py over every sign/exponent/top-mantissa prefix:
 *   e4m3fn (bias 7, 3 mantissa bits, max 448 = 0x7e, no inf): NaN, inf and overflow -> 0x7f | sign
 *   e5m2   (bias 15, 2 mantissa bits, max 57344 = 0x7b): overflow and inf -> 0x7c | sign,
 *          NaN -> 0x7e | sign
 * Normal results round the float32 bits directly (a carry moves into the exponent, as it
 * should); subnormal results use the float adder's own round-to-nearest-even (y + 2^23).
 * `saturate` (e4m3fn, as torch's cast does): finite values beyond the largest finite become it.
 * Returns how many finite inputs overflowed (with saturate: how many had |x| > max). Branch-free,
 * so the compiler vectorises it. */
/* m ? x : y for m in {0, 1}, without a branch (keeps the loops vectorisable) */
#define SEL(m, x, y) ((y) ^ (((x) ^ (y)) & (0u - (m))))

static inline float bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

#if SDTK_X86 && defined(__GNUC__) && !defined(__clang__)
#define SDTK_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SDTK_CLONES
#endif

#define FP8_KERNEL(NAME, SATURATE, M, B, MAX_CODE, OVERFLOW_CODE, INF_CODE, NAN_CODE, SUB_SCALE)            \
SDTK_CLONES static Py_ssize_t NAME(const uint32_t *in, uint8_t *out, Py_ssize_t n)                     \
{                                                                                                          \
    const int saturate = (SATURATE);                                                                       \
    const uint32_t shift = 23 - (M);                                                                       \
    const uint32_t min_normal = (uint32_t)(127 - (B) + 1) << 23;                                          \
    const uint32_t max_bits = ((uint32_t)(MAX_CODE) + ((uint32_t)(127 - (B)) << (M))) << shift;           \
    Py_ssize_t overflow = 0;                                                                               \
    for (Py_ssize_t i = 0; i < n; i++) {                                                                   \
        uint32_t f = in[i];                                                                                \
        uint32_t sign = (f >> 24) & 0x80u;                                                                 \
        uint32_t a = f & 0x7fffffffu;                                                                      \
        uint32_t rounded = a + ((1u << (shift - 1)) - 1u) + ((a >> shift) & 1u);                         \
        uint32_t code_n = (rounded >> shift) - ((uint32_t)(127 - (B)) << (M));                           \
        uint32_t code_s = f32_to_bits(bits_to_f32(a) * (SUB_SCALE) + 8388608.0f) - 0x4b000000u;          \
        uint32_t code = SEL((uint32_t)(a < min_normal), code_s, code_n);                                   \
        uint32_t is_nan = (uint32_t)(a > 0x7f800000u), is_inf = (uint32_t)(a == 0x7f800000u);              \
        uint32_t finite = (uint32_t)(a < 0x7f800000u);                                                     \
        uint32_t over = finite & (uint32_t)(code > (MAX_CODE));                                            \
        uint32_t counted = saturate ? (finite & (uint32_t)(a > max_bits)) : over;                          \
        uint32_t big = saturate ? (uint32_t)(MAX_CODE) : (uint32_t)(OVERFLOW_CODE);                        \
        uint32_t inf = saturate ? (uint32_t)(MAX_CODE) : (uint32_t)(INF_CODE);                             \
        code = SEL(over, big, code);                                                                       \
        code = SEL(is_inf, inf, code);                                                                     \
        code = SEL(is_nan, (uint32_t)(NAN_CODE), code);                                                    \
        out[i] = (uint8_t)(sign | code);                                                                   \
        overflow += counted;                                                                               \
    }                                                                                                      \
    return overflow;                                                                                       \
}

/* e4m3fn: subnormal quantum 2^-9 -> scale 2^9; e5m2: quantum 2^-16 -> scale 2^16 */
FP8_KERNEL(f32_to_e4m3fn_block, 0, 3, 7, 0x7eu, 0x7fu, 0x7fu, 0x7fu, 512.0f)
FP8_KERNEL(f32_to_e4m3fn_sat_block, 1, 3, 7, 0x7eu, 0x7fu, 0x7fu, 0x7fu, 512.0f)
FP8_KERNEL(f32_to_e5m2_block, 0, 2, 15, 0x7bu, 0x7cu, 0x7cu, 0x7eu, 65536.0f)
FP8_KERNEL(f32_to_e5m2_sat_block, 1, 2, 15, 0x7bu, 0x7cu, 0x7cu, 0x7eu, 65536.0f)

SDTK_CLONES static void bf16_to_f32_block(const uint16_t *in, uint32_t *out, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = (uint32_t)in[i] << 16; /* exact: bfloat16 is the top half of a float32 */
}

/* ---------- Python bindings: (src buffer, dst buffer) -> overflow count ---------- */

#define BLOCK 4096 /* values per fix-up pass: the block stays in L1/L2 between the two passes */

static int get_buffers(PyObject *args, const char *fmt, Py_buffer *src, Py_buffer *dst,
                       Py_ssize_t src_item, Py_ssize_t dst_item, Py_ssize_t *n)
{
    if (!PyArg_ParseTuple(args, fmt, src, dst))
        return 0;
    if (src->len % src_item || dst->len % dst_item || src->len / src_item != dst->len / dst_item) {
        PyBuffer_Release(src);
        PyBuffer_Release(dst);
        PyErr_SetString(PyExc_ValueError, "source and destination hold different numbers of values");
        return 0;
    }
    *n = src->len / src_item;
    return 1;
}

/* float32 -> float16; returns the finite values that became inf, and with `counting` also the
   NaN/inf inputs, as a pair. */
static PyObject *f32_to_f16_impl(PyObject *args, int counting)
{
    Py_buffer src, dst;
    Py_ssize_t n, overflow = 0, nonfinite = 0;
    if (!have_f16c()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU lacks F16C/AVX2");
        return NULL;
    }
    if (!get_buffers(args, "y*w*", &src, &dst, 4, 2, &n))
        return NULL;
    const float *in = (const float *)src.buf;
    uint16_t *out = (uint16_t *)dst.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t at = 0; at < n; at += BLOCK) {
        Py_ssize_t m = n - at < BLOCK ? n - at : BLOCK;
        f32_to_f16_block(in + at, out + at, m);
        overflow += f16_fixup_counting((const uint32_t *)(in + at), out + at, m, &nonfinite);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return counting ? Py_BuildValue("(nn)", overflow, nonfinite) : PyLong_FromSsize_t(overflow);
}

static PyObject *py_f32_to_f16(PyObject *self, PyObject *args)
{
    (void)self;
    return f32_to_f16_impl(args, 0);
}

static PyObject *py_f32_to_f16_counting(PyObject *self, PyObject *args)
{
    (void)self;
    return f32_to_f16_impl(args, 1);
}

static PyObject *py_f16_to_f32(PyObject *self, PyObject *args)
{
    Py_buffer src, dst;
    Py_ssize_t n;
    (void)self;
    if (!have_f16c()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU lacks F16C/AVX2");
        return NULL;
    }
    if (!get_buffers(args, "y*w*", &src, &dst, 2, 4, &n))
        return NULL;
    const uint16_t *in = (const uint16_t *)src.buf;
    float *out = (float *)dst.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t at = 0; at < n; at += BLOCK) {
        Py_ssize_t m = n - at < BLOCK ? n - at : BLOCK;
        f16_to_f32_block(in + at, out + at, m);
        f32_nan_fixup(in + at, (uint32_t *)(out + at), m);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return PyLong_FromLong(0);
}


static PyObject *py_f32_to_fp8(PyObject *self, PyObject *args)
{
    Py_buffer src, dst;
    int kind, saturate;
    Py_ssize_t n, overflow = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*ip", &src, &dst, &kind, &saturate))
        return NULL;
    if (src.len % 4 || src.len / 4 != dst.len || (kind != 0 && kind != 1)) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "f32_to_fp8(src float32, dst 1-byte, kind 0=e4m3fn 1=e5m2, saturate)");
        return NULL;
    }
    n = src.len / 4;
    Py_BEGIN_ALLOW_THREADS
    {
        const uint32_t *in = (const uint32_t *)src.buf;
        uint8_t *out = (uint8_t *)dst.buf;
        if (kind == 0)
            overflow = saturate ? f32_to_e4m3fn_sat_block(in, out, n) : f32_to_e4m3fn_block(in, out, n);
        else
            overflow = saturate ? f32_to_e5m2_sat_block(in, out, n) : f32_to_e5m2_block(in, out, n);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return PyLong_FromSsize_t(overflow);
}

static PyObject *py_bf16_to_f32(PyObject *self, PyObject *args)
{
    Py_buffer src, dst;
    Py_ssize_t n;
    (void)self;
    if (!get_buffers(args, "y*w*", &src, &dst, 2, 4, &n))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    bf16_to_f32_block((const uint16_t *)src.buf, (uint32_t *)dst.buf, n);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return PyLong_FromLong(0);
}


/* 16-bit float -> fp8 through float32 in blocks that stay in L1 (the widening is exact, so the
   result is the direct round-to-nearest-even cast; fp8 NaNs are canonical either way). */
static Py_ssize_t half_to_fp8(const uint16_t *in, uint8_t *out, Py_ssize_t n, int is_bf16, int kind, int saturate)
{
    uint32_t wide[1024];
    Py_ssize_t overflow = 0;
    for (Py_ssize_t at = 0; at < n; at += 1024) {
        Py_ssize_t m = n - at < 1024 ? n - at : 1024;
        if (is_bf16)
            bf16_to_f32_block(in + at, wide, m);
        else
            f16_to_f32_block(in + at, (float *)wide, m);
        if (kind == 0)
            overflow += saturate ? f32_to_e4m3fn_sat_block(wide, out + at, m) : f32_to_e4m3fn_block(wide, out + at, m);
        else
            overflow += saturate ? f32_to_e5m2_sat_block(wide, out + at, m) : f32_to_e5m2_block(wide, out + at, m);
    }
    return overflow;
}

static PyObject *py_half_to_fp8(PyObject *self, PyObject *args)
{
    Py_buffer src, dst;
    int is_bf16, kind, saturate;
    Py_ssize_t overflow;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*pip", &src, &dst, &is_bf16, &kind, &saturate))
        return NULL;
    if (src.len % 2 || src.len / 2 != dst.len || (kind != 0 && kind != 1) || (!is_bf16 && !have_f16c())) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "half_to_fp8(src 2-byte, dst 1-byte, is_bf16, kind, saturate); float16 needs F16C");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    overflow = half_to_fp8((const uint16_t *)src.buf, (uint8_t *)dst.buf, src.len / 2, is_bf16, kind, saturate);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return PyLong_FromSsize_t(overflow);
}

/* The weighted sum's steps through memory, a block at a time: widen both (numpy's NaN bits),
   x = a * wa, y = b * wb, x + y, narrow, fix up. The reference for the vector loop below, which
   runs it on the tail. */
static Py_ssize_t weighted_sum_steps(const uint16_t *pa, const uint16_t *pb, float wa, float wb,
                                     uint16_t *out, Py_ssize_t m)
{
    float ta[BLOCK], tb[BLOCK];
    f16_to_f32_block(pa, ta, m);
    f32_nan_fixup(pa, (uint32_t *)ta, m);
    f16_to_f32_block(pb, tb, m);
    f32_nan_fixup(pb, (uint32_t *)tb, m);
    for (Py_ssize_t i = 0; i < m; i++) {
        float x = ta[i] * wa;
        float y = tb[i] * wb;
        ta[i] = x + y;
    }
    f32_to_f16_block(ta, out, m);
    return f16_fixup((const uint32_t *)ta, out, m);
}

#if SDTK_X86
/* 16 float32 values (two registers) narrowed to fp16 and stored; a chunk whose result holds an
   inf or NaN is fixed up and counted from its float32 values, as f16_fixup_counting does for a
   block. Returns the finite values that became inf. */
__attribute__((target("avx2,f16c")))
static inline Py_ssize_t narrow16_store(__m256 w0, __m256 w1, uint16_t *out, Py_ssize_t *nonfinite)
{
    const __m256i exponent = _mm256_set1_epi16(0x7c00);
    __m128i o0 = _mm256_cvtps_ph(w0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m128i o1 = _mm256_cvtps_ph(w1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256i o = _mm256_inserti128_si256(_mm256_castsi128_si256(o0), o1, 1);
    _mm256_storeu_si256((__m256i *)out, o);
    __m256i bad = _mm256_cmpeq_epi16(_mm256_and_si256(o, exponent), exponent);
    if (_mm256_testz_si256(bad, bad))
        return 0;
    float w[16];
    _mm256_storeu_ps(w, w0);
    _mm256_storeu_ps(w + 8, w1);
    return f16_fixup_counting((const uint32_t *)w, out, 16, nonfinite);
}

/* The same 16 values at a time in registers, one pass over memory, no FMA (the steps'
   roundings). No NaN fix-up after widening: the multiply quiets a signalling NaN exactly as
   VCVTPH2PS does, so a * wa has the same bits either way (every 16-bit pattern is tested). Where
   both inputs are NaN, which payload survives is the compiler's choice, as in numpy's loops. */
__attribute__((target("avx2,f16c")))
static Py_ssize_t weighted_sum_avx2(const uint16_t *pa, const uint16_t *pb, float wa, float wb,
                                    uint16_t *out, Py_ssize_t m)
{
    const __m256 va = _mm256_set1_ps(wa), vb = _mm256_set1_ps(wb);
    Py_ssize_t overflow = 0, ignored = 0, i = 0;
    for (; i + 16 <= m; i += 16) {
        __m128i a0 = _mm_loadu_si128((const __m128i *)(pa + i)), a1 = _mm_loadu_si128((const __m128i *)(pa + i + 8));
        __m128i b0 = _mm_loadu_si128((const __m128i *)(pb + i)), b1 = _mm_loadu_si128((const __m128i *)(pb + i + 8));
        __m256 w0 = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtph_ps(a0), va), _mm256_mul_ps(_mm256_cvtph_ps(b0), vb));
        __m256 w1 = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtph_ps(a1), va), _mm256_mul_ps(_mm256_cvtph_ps(b1), vb));
        overflow += narrow16_store(w0, w1, out + i, &ignored);
    }
    if (i < m)
        overflow += weighted_sum_steps(pa + i, pb + i, wa, wb, out + i, m - i);
    return overflow;
}
#else
static Py_ssize_t weighted_sum_avx2(const uint16_t *pa, const uint16_t *pb, float wa, float wb,
                                    uint16_t *out, Py_ssize_t m)
{
    return weighted_sum_steps(pa, pb, wa, wb, out, m);
}
#endif

/* A merge's hot loop, fused: out = fp16(wa * fp32(a) + wb * fp32(b)) for fp16 A, B, in one
   pass (weighted_sum_avx2), with exactly the steps of the unfused path (widen with numpy's NaN bits, one
   float32 multiply per input, one float32 add: no FMA, this function's target has none; narrow
   round-to-nearest-even with numpy's NaN bits). Returns the finite values that became inf. */
static PyObject *py_f16_weighted_sum(PyObject *self, PyObject *args)
{
    Py_buffer a, b, dst;
    double wa_d, wb_d;
    Py_ssize_t n, overflow = 0;
    (void)self;
    if (!have_f16c()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU lacks F16C/AVX2");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*y*w*dd", &a, &b, &dst, &wa_d, &wb_d))
        return NULL;
    if (a.len % 2 || a.len != b.len || a.len != dst.len) {
        PyBuffer_Release(&a);
        PyBuffer_Release(&b);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "A, B and the output hold different numbers of fp16 values");
        return NULL;
    }
    n = a.len / 2;
    const float wa = (float)wa_d, wb = (float)wb_d; /* numpy (NEP 50): a Python float meets float32 as float32 */
    const uint16_t *pa = (const uint16_t *)a.buf, *pb = (const uint16_t *)b.buf;
    uint16_t *out = (uint16_t *)dst.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t at = 0; at < n; at += BLOCK) {
        Py_ssize_t m = n - at < BLOCK ? n - at : BLOCK;
        overflow += weighted_sum_avx2(pa + at, pb + at, wa, wb, out + at, m);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    PyBuffer_Release(&dst);
    return PyLong_FromSsize_t(overflow);
}

static PyObject *py_has_f16c(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    return PyBool_FromLong(have_f16c());
}

/* The steps of a bake, block by block through memory: widen (numpy's NaN bits), t = p1 * p2
   (LoHa; skipped for LoRA), t = t * factor, w = w + t, narrow, fix up and count. The reference
   for the vector loop below, which runs it on the tail. */
static Py_ssize_t bake_f16_steps(const uint16_t *pb, const float *a, const float *b, float factor,
                                 uint16_t *out, Py_ssize_t m, Py_ssize_t *nonfinite)
{
    float tw[BLOCK];
    f16_to_f32_block(pb, tw, m);
    f32_nan_fixup(pb, (uint32_t *)tw, m);
    if (b) {
        for (Py_ssize_t i = 0; i < m; i++) {
            float t = a[i] * b[i];
            t = t * factor;
            tw[i] = tw[i] + t;
        }
    } else {
        for (Py_ssize_t i = 0; i < m; i++) {
            float t = a[i] * factor;
            tw[i] = tw[i] + t;
        }
    }
    f32_to_f16_block(tw, out, m);
    return f16_fixup_counting((const uint32_t *)tw, out, m, nonfinite);
}

#if SDTK_X86
/* The same steps 16 values at a time in registers, one pass over memory: separate multiplies and
   add (no FMA in this target: the same roundings as the steps). The base is widened without
   numpy's NaN fix-up: the add that follows quiets a signalling NaN exactly as VCVTPH2PS does
   (x86 returns the first operand's NaN, quieted), so w + t has the same bits either way (tested
   with signalling and payload NaNs in tests/test_lora_apply_nonfinite.py); narrow16_store narrows,
   fixes up and counts. Where two NaNs meet, which payload survives is the compiler's choice (it
   may swap the operands of + and *), as it is in numpy's own loops: the result is a NaN. */
__attribute__((target("avx2,f16c")))
static Py_ssize_t bake_f16_avx2(const uint16_t *pb, const float *a, const float *b, float factor,
                                uint16_t *out, Py_ssize_t m, Py_ssize_t *nonfinite)
{
    const __m256 f = _mm256_set1_ps(factor);
    Py_ssize_t overflow = 0, i = 0;
    for (; i + 16 <= m; i += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(pb + i));
        __m256 t0 = _mm256_loadu_ps(a + i), t1 = _mm256_loadu_ps(a + i + 8);
        if (b) {
            t0 = _mm256_mul_ps(t0, _mm256_loadu_ps(b + i));
            t1 = _mm256_mul_ps(t1, _mm256_loadu_ps(b + i + 8));
        }
        t0 = _mm256_mul_ps(t0, f);
        t1 = _mm256_mul_ps(t1, f);
        __m256 w0 = _mm256_add_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), t0);
        __m256 w1 = _mm256_add_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), t1);
        overflow += narrow16_store(w0, w1, out + i, nonfinite);
    }
    if (i < m)
        overflow += bake_f16_steps(pb + i, a + i, b ? b + i : NULL, factor, out + i, m - i, nonfinite);
    return overflow;
}
#else
static Py_ssize_t bake_f16_avx2(const uint16_t *pb, const float *a, const float *b, float factor,
                                uint16_t *out, Py_ssize_t m, Py_ssize_t *nonfinite)
{
    return bake_f16_steps(pb, a, b, factor, out, m, nonfinite);
}
#endif

/* out = fp16(f32(base) + (p1 * p2) * factor), or with p2 absent fp16(f32(base) + p1 * factor),
   float32 math in that order: a LoHa (numpy's `p1 *= p2; p1 *= factor; w += p1`) or LoRA
   (`p *= factor; w += p`) module baked into the widened fp16 weight, then the cast; counting
   finite results that became inf and NaN/inf results, in one pass over each block. */
static PyObject *bake_f16(PyObject *args, int hadamard)
{
    Py_buffer base, p1, p2, dst;
    double factor_d;
    Py_ssize_t n, overflow = 0, nonfinite = 0;
    if (!have_f16c()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU lacks F16C/AVX2");
        return NULL;
    }
    memset(&p2, 0, sizeof p2);
    if (hadamard ? !PyArg_ParseTuple(args, "y*y*y*dw*", &base, &p1, &p2, &factor_d, &dst)
                 : !PyArg_ParseTuple(args, "y*y*dw*", &base, &p1, &factor_d, &dst))
        return NULL;
    if (base.len % 2 || dst.len != base.len || p1.len != 2 * base.len || (hadamard && p2.len != p1.len)) {
        PyBuffer_Release(&base);
        PyBuffer_Release(&p1);
        if (hadamard)
            PyBuffer_Release(&p2);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "the weight, the products and the output hold different numbers of values");
        return NULL;
    }
    n = base.len / 2;
    const float factor = (float)factor_d; /* the caller passes a float32 value */
    const uint16_t *pb = (const uint16_t *)base.buf;
    const float *a = (const float *)p1.buf, *b = hadamard ? (const float *)p2.buf : NULL;
    uint16_t *out = (uint16_t *)dst.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t at = 0; at < n; at += BLOCK) {
        Py_ssize_t m = n - at < BLOCK ? n - at : BLOCK;
        overflow += bake_f16_avx2(pb + at, a + at, b ? b + at : NULL, factor, out + at, m, &nonfinite);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&base);
    PyBuffer_Release(&p1);
    if (hadamard)
        PyBuffer_Release(&p2);
    PyBuffer_Release(&dst);
    return Py_BuildValue("(nn)", overflow, nonfinite);
}

static PyObject *py_f16_add_hadamard(PyObject *self, PyObject *args)
{
    (void)self;
    return bake_f16(args, 1);
}

static PyObject *py_f16_add_scaled(PyObject *self, PyObject *args)
{
    (void)self;
    return bake_f16(args, 0);
}

static PyMethodDef methods[] = {
    {"f32_to_f16", py_f32_to_f16, METH_VARARGS, "f32_to_f16(src, dst) -> finite values that became inf. Needs F16C."},
    {"f32_to_f16_counting", py_f32_to_f16_counting, METH_VARARGS, "f32_to_f16_counting(src, dst) -> (finite values that became inf, NaN/inf inputs). Needs F16C."},
    {"f16_to_f32", py_f16_to_f32, METH_VARARGS, "f16_to_f32(src, dst) -> 0. Needs F16C."},
    {"f32_to_fp8", py_f32_to_fp8, METH_VARARGS, "f32_to_fp8(src, dst, kind, saturate) -> overflowed values. kind 0 = e4m3fn, 1 = e5m2."},
    {"bf16_to_f32", py_bf16_to_f32, METH_VARARGS, "bf16_to_f32(src, dst) -> 0."},
    {"half_to_fp8", py_half_to_fp8, METH_VARARGS, "half_to_fp8(src, dst, is_bf16, kind, saturate) -> overflowed values."},
    {"f16_weighted_sum", py_f16_weighted_sum, METH_VARARGS, "f16_weighted_sum(a, b, out, wa, wb) -> overflowed values: out = fp16(wa*a + wb*b), float32 math. Needs F16C."},
    {"f16_add_hadamard", py_f16_add_hadamard, METH_VARARGS, "f16_add_hadamard(base, p1, p2, factor, out) -> (overflowed, NaN/inf): out = fp16(f32(base) + (p1*p2)*factor). Needs F16C."},
    {"f16_add_scaled", py_f16_add_scaled, METH_VARARGS, "f16_add_scaled(base, p, factor, out) -> (overflowed, NaN/inf): out = fp16(f32(base) + p*factor). Needs F16C."},
    {"has_f16c", py_has_f16c, METH_NOARGS, "True when the CPU has F16C and AVX2 (the fp16 paths)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "sdtk._fastcast", "Vectorised fp32<->fp16 casts.", -1, methods};

PyMODINIT_FUNC PyInit__fastcast(void) { return PyModule_Create(&module); }
