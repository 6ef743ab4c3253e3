/* sdtk._quant: ggml block quantization (optional C extension; sdtk.quant.quantize has a numpy
 * fallback producing the same bytes).
 *
 * Written for sdtk from the block layouts and the reference algorithms (ggml src/ggml-common.h,
 * src/ggml-quants.c `quantize_row_*_ref`; restated in ../shared/reference/quantized-formats.md
 * §2.1-2.3). The target is ggml's reference quantizer in a build WITHOUT floating-point
 * contraction: every sum is accumulated left to right in f32, every product is rounded before
 * it is added (setup.py passes -ffp-contract=off; the reference explains why an FMA build gives
 * different K-quant bytes on up to ~30 % of blocks). Legacy types match gguf-py 0.19.0's
 * `quants.quantize` byte for byte.
 *
 * quantize(type_id, src, dst): src is a C-contiguous float32 buffer whose length is a multiple
 * of the type's block size, dst a writable buffer of exactly the quantized size. The GIL is
 * released while quantizing, so several tensors (or chunks) can be quantized at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define QK_K 256
#define GROUP_MAX_EPS 1e-15f
#define MAX_I(a, b) ((a) > (b) ? (a) : (b))
#define MIN_I(a, b) ((a) < (b) ? (a) : (b))

/* ---- f16 <-> f32 (IEEE binary16, round to nearest even) ---------------------------------- */

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static uint16_t to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t mag = x & 0x7fffffffu;
    if (mag > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);  /* NaN */
    if (mag >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to inf (>= 65520) */
    if (mag < 0x38800000u) {                                    /* f16 subnormal or zero */
        if (mag < 0x33000000u) return (uint16_t)sign;          /* below half the smallest subnormal */
        uint32_t e = mag >> 23;
        uint32_t m = (mag & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e;                               /* 14 - (e - 127) + 13 - 1 ... */
        /* value = m * 2^(e-150); subnormal unit = 2^-24 -> q = m * 2^(e-126) */
        uint32_t q = m >> (shift);
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t r = mag - 0x38000000u;                             /* rebias exponent 127 -> 15 */
    uint32_t q = r >> 13;
    uint32_t rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1))) q++;
    return (uint16_t)(sign | q);
}

static float from_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ffu;
    if (e == 0) {
        if (m == 0) return bits_f32(sign);
        float v = (float)m * (1.0f / 16777216.0f);              /* m * 2^-24, exact */
        return sign ? -v : v;
    }
    if (e == 31) return bits_f32(sign | 0x7f800000u | (m << 13));
    return bits_f32(sign | ((e + 112) << 23) | (m << 13));
}

static inline void put_f16(uint8_t *p, float f) { uint16_t h = to_f16(f); p[0] = h & 0xff; p[1] = h >> 8; }
static inline float f16_value(float f) { return from_f16(to_f16(f)); }

/* round half to even via the 1.5*2^23 magic add, exactly as the reference (valid for |v| < 2^22) */
static inline int nearest_int(float fval) {
    float val = fval + 12582912.f;
    int i; memcpy(&i, &val, sizeof(int));
    return (i & 0x007fffff) - 0x00400000;
}

/* roundf (halves away from zero) without a libm call, exact for |v| < 2^23: v - trunc(v) is exact */
static inline int round_away(float v) {
    int i = (int)v;
    float f = v - (float)i;
    return i + (f >= 0.5f) - (f <= -0.5f);
}

/* ---- legacy 32-element blocks ------------------------------------------------------------ */

static void q8_0(const float *x, uint8_t *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32, y += 34) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) { float a = fabsf(x[j]); if (a > amax) amax = a; }
        const float d = amax / 127;
        const float id = d ? 1.0f / d : 0.0f;
        put_f16(y, d);
        for (int j = 0; j < 32; j++) y[2 + j] = (uint8_t)(int8_t)round_away(x[j] * id);
    }
}

/* the signed value of largest magnitude, first one on ties */
static inline float signed_max(const float *x, int n) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; j++) { float a = fabsf(x[j]); if (amax < a) { amax = a; max = x[j]; } }
    return max;
}

static void q4_0(const float *x, uint8_t *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32, y += 18) {
        const float d = signed_max(x, 32) / -8;
        const float id = d ? 1.0f / d : 0.0f;
        put_f16(y, d);
        for (int j = 0; j < 16; j++) {
            const float a = x[j] * id, b = x[j + 16] * id;
            const uint8_t qa = (uint8_t)MIN_I(15, (int8_t)(a + 8.5f));
            const uint8_t qb = (uint8_t)MIN_I(15, (int8_t)(b + 8.5f));
            y[2 + j] = (uint8_t)(qa | (qb << 4));
        }
    }
}

static void q5_0(const float *x, uint8_t *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32, y += 22) {
        const float d = signed_max(x, 32) / -16;
        const float id = d ? 1.0f / d : 0.0f;
        uint32_t qh = 0;
        put_f16(y, d);
        for (int j = 0; j < 16; j++) {
            const float a = x[j] * id, b = x[j + 16] * id;
            const uint8_t qa = (uint8_t)MIN_I(31, (int8_t)(a + 16.5f));
            const uint8_t qb = (uint8_t)MIN_I(31, (int8_t)(b + 16.5f));
            y[6 + j] = (uint8_t)((qa & 15) | ((qb & 15) << 4));
            qh |= ((uint32_t)(qa >> 4) & 1u) << j;
            qh |= ((uint32_t)(qb >> 4) & 1u) << (j + 16);
        }
        y[2] = qh & 0xff; y[3] = (qh >> 8) & 0xff; y[4] = (qh >> 16) & 0xff; y[5] = qh >> 24;
    }
}

static inline void min_max(const float *x, int n, float *mn, float *mx) {
    float lo = FLT_MAX, hi = -FLT_MAX;
    for (int j = 0; j < n; j++) { if (x[j] < lo) lo = x[j]; if (x[j] > hi) hi = x[j]; }
    *mn = lo; *mx = hi;
}

static void q4_1(const float *x, uint8_t *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32, y += 20) {
        float mn, mx;
        min_max(x, 32, &mn, &mx);
        const float d = (mx - mn) / 15;
        const float id = d ? 1.0f / d : 0.0f;
        put_f16(y, d); put_f16(y + 2, mn);
        for (int j = 0; j < 16; j++) {
            const float a = (x[j] - mn) * id, b = (x[j + 16] - mn) * id;
            const uint8_t qa = (uint8_t)MIN_I(15, (int8_t)(a + 0.5f));
            const uint8_t qb = (uint8_t)MIN_I(15, (int8_t)(b + 0.5f));
            y[4 + j] = (uint8_t)(qa | (qb << 4));
        }
    }
}

static void q5_1(const float *x, uint8_t *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32, y += 24) {
        float mn, mx;
        min_max(x, 32, &mn, &mx);
        const float d = (mx - mn) / 31;
        const float id = d ? 1.0f / d : 0.0f;
        uint32_t qh = 0;
        put_f16(y, d); put_f16(y + 2, mn);
        for (int j = 0; j < 16; j++) {
            const float a = (x[j] - mn) * id, b = (x[j + 16] - mn) * id;
            const uint8_t qa = (uint8_t)MIN_I(31, (uint8_t)(a + 0.5f));  /* gguf-py clips to 31 */
            const uint8_t qb = (uint8_t)MIN_I(31, (uint8_t)(b + 0.5f));
            y[8 + j] = (uint8_t)((qa & 15) | ((qb & 15) << 4));
            qh |= ((uint32_t)(qa >> 4) & 1u) << j;
            qh |= ((uint32_t)(qb >> 4) & 1u) << (j + 16);
        }
        y[4] = qh & 0xff; y[5] = (qh >> 8) & 0xff; y[6] = (qh >> 16) & 0xff; y[7] = qh >> 24;
    }
}

/* ---- K-quant helpers (reference §2.3) ----------------------------------------------------- */

/* Fit x ~ scale*L + min (min <= 0, L in 0..nmax) by a grid of nstep+1 inverse scales, each
 * refined by weighted least squares; returns scale, sets *neg_min = -min. */
static float fit_scale_min(int n, int nmax, const float *x, const float *w, uint8_t *L, float *neg_min,
                           float rmin, float rdelta, int nstep, int use_mad) {
    uint8_t Laux[32];
    float lo = x[0], hi = x[0];
    float sum_w = w[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < lo) lo = x[i];
        if (x[i] > hi) hi = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (lo > 0) lo = 0;
    if (hi == lo) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        *neg_min = -lo;
        return 0.f;
    }
    float iscale = nmax / (hi - lo);
    float scale = 1 / iscale;
    float best = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * (x[i] - lo));
        L[i] = (uint8_t)MAX_I(0, MIN_I(nmax, l));
        float diff = scale * L[i] + lo - x[i];
        diff = use_mad ? fabsf(diff) : diff * diff;
        best += w[i] * diff;
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * is + nmax) / (hi - lo);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * (x[i] - lo));
            l = MAX_I(0, MIN_I(nmax, l));
            Laux[i] = (uint8_t)l;
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float err = 0;
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = use_mad ? fabsf(diff) : diff * diff;
                err += w[i] * diff;
            }
            if (err < best) {
                memcpy(L, Laux, (size_t)n);
                best = err;
                scale = this_scale;
                lo = this_min;
            }
        }
    }
    *neg_min = -lo;
    return scale;
}

/* Symmetric scale for 16 values with weights x^2, L in -nmax..nmax-1 (stored + nmax), trying
 * 19 inverse scales around -nmax/pivot (Q6_K). */
static float fit_scale_sym(int n, int nmax, const float *x, int8_t *L) {
    float pivot = 0, amax = 0;
    for (int i = 0; i < n; ++i) { float a = fabsf(x[i]); if (a > amax) { amax = a; pivot = x[i]; } }
    if (amax < GROUP_MAX_EPS) { for (int i = 0; i < n; ++i) L[i] = 0; return 0.f; }
    float iscale = -nmax / pivot;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = MAX_I(-nmax, MIN_I(nmax - 1, l));
        L[i] = (int8_t)(l + nmax);
        float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / pivot;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * x[i]);
            l = MAX_I(-nmax, MIN_I(nmax - 1, l));
            float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; ++i) {
                int l = nearest_int(iscale * x[i]);
                L[i] = (int8_t)(nmax + MAX_I(-nmax, MIN_I(nmax - 1, l)));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* Q3_K sub-block scale: L in -nmax..nmax-1 by coordinate descent on the weighted error (w = x^2). */
static float fit_scale_q3(int n, int nmax, const float *x, int8_t *L) {
    float pivot = 0, amax = 0;
    for (int i = 0; i < n; ++i) { float a = fabsf(x[i]); if (a > amax) { amax = a; pivot = x[i]; } }
    if (amax < GROUP_MAX_EPS) { for (int i = 0; i < n; ++i) L[i] = 0; return 0.f; }
    float iscale = -nmax / pivot;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = MAX_I(-nmax, MIN_I(nmax - 1, l));
        L[i] = (int8_t)l;
        float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int changed = 0;
        for (int i = 0; i < n; ++i) {
            float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * L[i] * L[i];
                int nl = nearest_int(x[i] * sl2 / slx);
                nl = MAX_I(-nmax, MIN_I(nmax - 1, nl));
                if (nl != L[i]) {
                    slx += w * x[i] * nl;
                    sl2 += w * nl * nl;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (int8_t)nl; sumlx = slx; suml2 = sl2;
                        ++changed;
                    }
                }
            }
        }
        if (!changed) break;
    }
    for (int i = 0; i < n; ++i) L[i] = (int8_t)(L[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* pack 2-bit values: elements l, l+32, l+64, l+96 of each 128-half into one byte */
static void pack2(const uint8_t *L, uint8_t *qs) {
    for (int h = 0; h < QK_K; h += 128)
        for (int l = 0; l < 32; ++l)
            qs[h / 4 + l] = (uint8_t)(L[h + l] | (L[h + l + 32] << 2) | (L[h + l + 64] << 4) | (L[h + l + 96] << 6));
}

static void q2_k(const float *x, uint8_t *y, int64_t nb) {
    uint8_t L[QK_K];
    float w[16], mins[16], scales[16];
    for (int64_t i = 0; i < nb; i++, x += QK_K, y += 84) {
        uint8_t *sc = y, *qs = y + 16;
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < 16; ++j) {
            for (int l = 0; l < 16; ++l) w[l] = fabsf(x[16 * j + l]);
            scales[j] = fit_scale_min(16, 3, x + 16 * j, w, L + 16 * j, &mins[j], -0.5f, 0.1f, 15, 1);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        float d = 0.f, dmin = 0.f;
        if (max_scale > 0) {
            float iscale = 15.f / max_scale;
            for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)nearest_int(iscale * scales[j]);
            d = max_scale / 15.f;
        } else {
            memset(sc, 0, 16);
        }
        if (max_min > 0) {
            float iscale = 15.f / max_min;
            for (int j = 0; j < 16; ++j) sc[j] |= (uint8_t)(nearest_int(iscale * mins[j]) << 4);
            dmin = max_min / 15.f;
        }
        put_f16(y + 80, d); put_f16(y + 82, dmin);
        const float dq = f16_value(d), mq = f16_value(dmin);
        for (int j = 0; j < 16; ++j) {
            const float dd = dq * (sc[j] & 0xF);
            if (!dd) continue;
            const float dm = mq * (sc[j] >> 4);
            for (int ii = 0; ii < 16; ++ii) {
                int l = nearest_int((x[16 * j + ii] + dm) / dd);
                L[16 * j + ii] = (uint8_t)MAX_I(0, MIN_I(3, l));
            }
        }
        pack2(L, qs);
    }
}

static void q3_k(const float *x, uint8_t *y, int64_t nb) {
    int8_t L[QK_K];
    float scales[16];
    for (int64_t i = 0; i < nb; i++, x += QK_K, y += 110) {
        uint8_t *hmask = y, *qs = y + 32, *sc = y + 96;
        float max_scale = 0, amax = 0;
        for (int j = 0; j < 16; ++j) {
            scales[j] = fit_scale_q3(16, 4, x + 16 * j, L + 16 * j);
            float a = fabsf(scales[j]);
            if (a > amax) { amax = a; max_scale = scales[j]; }
        }
        memset(sc, 0, 12);
        float d = 0.f;
        if (max_scale) {
            float iscale = -32.f / max_scale;
            for (int j = 0; j < 16; ++j) {
                int8_t l = (int8_t)nearest_int(iscale * scales[j]);
                l = (int8_t)(MAX_I(-32, MIN_I(31, l)) + 32);
                if (j < 8) sc[j] = (uint8_t)(l & 0xF);
                else sc[j - 8] |= (uint8_t)((l & 0xF) << 4);
                l >>= 4;
                sc[j % 4 + 8] |= (uint8_t)(l << (2 * (j / 4)));
            }
            d = 1 / iscale;
        }
        put_f16(y + 108, d);
        const float dq = f16_value(d);
        for (int j = 0; j < 16; ++j) {
            int8_t s = (int8_t)(j < 8 ? sc[j] & 0xF : sc[j - 8] >> 4);
            s = (int8_t)((s | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
            float dd = dq * s;
            if (!dd) continue;
            for (int ii = 0; ii < 16; ++ii) {
                int l = nearest_int(x[16 * j + ii] / dd);
                L[16 * j + ii] = (int8_t)(MAX_I(-4, MIN_I(3, l)) + 4);
            }
        }
        memset(hmask, 0, 32);
        uint8_t U[QK_K];
        for (int j = 0; j < QK_K; ++j) {  /* high bit of element j: bit j/32 of hmask[j%32] */
            int l = L[j];
            if (l > 3) { hmask[j % 32] |= (uint8_t)(1u << (j / 32)); l -= 4; }
            U[j] = (uint8_t)l;
        }
        pack2(U, qs);
    }
}

/* Q4_K / Q5_K share the scale search and the 6-bit scale/min packing */
static void k_scales_mins(const float *x, int nmax, float rmin, int nstep, uint8_t *L, uint8_t *scales12,
                          uint8_t *dbytes, float *dq_out, float *mq_out) {
    float w[32], mins[8], scales[8];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
        float sum_x2 = 0;
        for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
        float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; ++l) w[l] = av_x + fabsf(x[32 * j + l]);
        scales[j] = fit_scale_min(32, nmax, x + 32 * j, w, L + 32 * j, &mins[j], rmin, 0.1f, nstep, 0);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < 8; ++j) {
        uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]);
        uint8_t lm = (uint8_t)nearest_int(inv_min * mins[j]);
        ls = (uint8_t)MIN_I(63, ls);
        lm = (uint8_t)MIN_I(63, lm);
        if (j < 4) {
            scales12[j] = ls;
            scales12[j + 4] = lm;
        } else {
            scales12[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
            scales12[j - 4] |= (uint8_t)((ls >> 4) << 6);
            scales12[j] |= (uint8_t)((lm >> 4) << 6);
        }
    }
    float d = max_scale / 63.f, dmin = max_min / 63.f;
    put_f16(dbytes, d); put_f16(dbytes + 2, dmin);
    *dq_out = f16_value(d); *mq_out = f16_value(dmin);
}

static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) { *d = q[j] & 63; *m = q[j + 4] & 63; }
    else { *d = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)); *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4)); }
}

static void requantize_k(const float *x, const uint8_t *scales12, float dq, float mq, int nmax, uint8_t *L) {
    for (int j = 0; j < 8; ++j) {
        uint8_t sc, m;
        scale_min_k4(j, scales12, &sc, &m);
        const float d = dq * sc;
        if (!d) continue;
        const float dm = mq * m;
        for (int ii = 0; ii < 32; ++ii) {
            int l = nearest_int((x[32 * j + ii] + dm) / d);
            L[32 * j + ii] = (uint8_t)MAX_I(0, MIN_I(nmax, l));
        }
    }
}

static void q4_k(const float *x, uint8_t *y, int64_t nb) {
    uint8_t L[QK_K];
    for (int64_t i = 0; i < nb; i++, x += QK_K, y += 144) {
        float dq, mq;
        memset(y + 4, 0, 12);
        k_scales_mins(x, 15, -1.f, 20, L, y + 4, y, &dq, &mq);
        requantize_k(x, y + 4, dq, mq, 15, L);
        uint8_t *q = y + 16;
        for (int j = 0; j < QK_K; j += 64, q += 32)
            for (int l = 0; l < 32; ++l) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
    }
}

static void q5_k(const float *x, uint8_t *y, int64_t nb) {
    uint8_t L[QK_K];
    for (int64_t i = 0; i < nb; i++, x += QK_K, y += 176) {
        float dq, mq;
        memset(y + 4, 0, 12);
        k_scales_mins(x, 31, -0.5f, 15, L, y + 4, y, &dq, &mq);
        requantize_k(x, y + 4, dq, mq, 31, L);
        uint8_t *qh = y + 16, *ql = y + 48;
        memset(qh, 0, 32);
        uint8_t m1 = 1, m2 = 2;
        for (int n = 0; n < QK_K; n += 64, ql += 32, m1 <<= 2, m2 <<= 2) {
            for (int j = 0; j < 32; ++j) {
                int l1 = L[n + j], l2 = L[n + j + 32];
                if (l1 > 15) { l1 -= 16; qh[j] |= m1; }
                if (l2 > 15) { l2 -= 16; qh[j] |= m2; }
                ql[j] = (uint8_t)(l1 | (l2 << 4));
            }
        }
    }
}

static void q6_k(const float *x, uint8_t *y, int64_t nb) {
    int8_t L[QK_K];
    float scales[16];
    for (int64_t i = 0; i < nb; i++, x += QK_K, y += 210) {
        uint8_t *ql = y, *qh = y + 128;
        int8_t *sc = (int8_t *)(y + 192);
        float max_scale = 0, max_abs = 0;
        for (int ib = 0; ib < 16; ++ib) {
            scales[ib] = fit_scale_sym(16, 32, x + 16 * ib, L + 16 * ib);
            float a = fabsf(scales[ib]);
            if (a > max_abs) { max_abs = a; max_scale = scales[ib]; }
        }
        if (max_abs < GROUP_MAX_EPS) { memset(y, 0, 210); continue; }
        float iscale = -128.f / max_scale;
        put_f16(y + 208, 1 / iscale);
        const float dq = f16_value(1 / iscale);
        for (int ib = 0; ib < 16; ++ib) sc[ib] = (int8_t)MIN_I(127, nearest_int(iscale * scales[ib]));
        for (int j = 0; j < 16; ++j) {
            float d = dq * sc[j];
            if (!d) continue;
            for (int ii = 0; ii < 16; ++ii) {
                int l = nearest_int(x[16 * j + ii] / d);
                L[16 * j + ii] = (int8_t)(MAX_I(-32, MIN_I(31, l)) + 32);
            }
        }
        for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
            for (int l = 0; l < 32; ++l) {
                const uint8_t a = (uint8_t)L[j + l], b = (uint8_t)L[j + l + 32], c = (uint8_t)L[j + l + 64], e = (uint8_t)L[j + l + 96];
                ql[l] = (uint8_t)((a & 0xF) | ((c & 0xF) << 4));
                ql[l + 32] = (uint8_t)((b & 0xF) | ((e & 0xF) << 4));
                qh[l] = (uint8_t)((a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6));
            }
        }
    }
}

/* ---- dispatch ------------------------------------------------------------------------------ */

typedef void (*quant_fn)(const float *, uint8_t *, int64_t);
typedef struct { int id; int block; int nbytes; quant_fn fn; } quant_type;

/* ids, block sizes, bytes: ggml.h / ggml.c type_traits */
static const quant_type TYPES[] = {
    {2, 32, 18, q4_0}, {3, 32, 20, q4_1}, {6, 32, 22, q5_0}, {7, 32, 24, q5_1}, {8, 32, 34, q8_0},
    {10, 256, 84, q2_k}, {11, 256, 110, q3_k}, {12, 256, 144, q4_k}, {13, 256, 176, q5_k}, {14, 256, 210, q6_k},
};

static PyObject *py_quantize(PyObject *self, PyObject *args) {
    int type_id;
    Py_buffer src, dst;
    if (!PyArg_ParseTuple(args, "iy*w*", &type_id, &src, &dst)) return NULL;
    const quant_type *t = NULL;
    for (size_t k = 0; k < sizeof(TYPES) / sizeof(TYPES[0]); k++) if (TYPES[k].id == type_id) t = &TYPES[k];
    PyObject *result = NULL;
    if (t == NULL) {
        PyErr_Format(PyExc_ValueError, "ggml type %d is not quantized by sdtk._quant", type_id);
    } else if (src.len % (Py_ssize_t)(4 * t->block) != 0) {
        PyErr_SetString(PyExc_ValueError, "source length is not a whole number of blocks");
    } else if (dst.len != src.len / (4 * t->block) * t->nbytes) {
        PyErr_SetString(PyExc_ValueError, "destination has the wrong size");
    } else if (((uintptr_t)src.buf) % 4 != 0) {
        PyErr_SetString(PyExc_ValueError, "source is not 4-byte aligned");
    } else {
        int64_t nb = src.len / (4 * t->block);
        Py_BEGIN_ALLOW_THREADS
        t->fn((const float *)src.buf, (uint8_t *)dst.buf, nb);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyMethodDef METHODS[] = {
    {"quantize", py_quantize, METH_VARARGS, "quantize(ggml_type_id, float32 buffer, writable byte buffer)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_quant", "ggml block quantization (sdtk)", -1, METHODS};

PyMODINIT_FUNC PyInit__quant(void) { return PyModule_Create(&MODULE); }
