// Float rows -> ggml's block formats (Q4_0 ... Q8_0, the K-quants Q2_K ... Q6_K, IQ4_NL), with an optional
// importance matrix (one weight per column, from llama.cpp's imatrix tool), for writing GGUF files.
//
// The arithmetic follows llama.cpp's ggml/src/ggml-quants.c step for step, operation for operation, so that the
// blocks are byte-identical to what `llama-quantize` writes (tests/test_encode.py compares them through
// ggml_quantize_chunk): per type, the same entry ggml_quantize_chunk takes (the `*_ref` quantizer without an
// imatrix, the weighted `*_impl` one with it; Q8_0 ignores the imatrix, IQ4_NL always takes its search path). To
// stay bit-equal, no multiply-add may be fused here (ggml's own build is plain SSE2 and rounds every product), so
// contraction is turned off for this file, and every sum runs in the same order as ggml's. The speed comes from
// the scale searches (most of the time): their candidate scales are tried 8 at a time, one per vector lane (GCC
// vector extensions, so any instruction set), each lane doing the scalar arithmetic; bench/quantize_bench.py
// measures 2-4x llama.cpp's own quantizer for the K-quants. Rows run in parallel (at::parallel_for).
//
// Formats (bytes per block): Q4_0 fp16 d + 16 nibble bytes (18), Q4_1 d, m + 16 (20), Q5_0 d + 4 high-bit bytes +
// 16 (22), Q5_1 d, m + 4 + 16 (24), Q8_0 d + 32 int8 (34), IQ4_NL d + 16 nibbles indexing a 16-value table (18);
// super-blocks of 256: Q2_K 16 scale bytes + 64 + d + dmin (84), Q3_K 32 hmask + 64 + 12 scales + d (110), Q4_K
// d + dmin + 12 packed 6-bit scales/mins + 128 (144), Q5_K as Q4_K + 32 high-bit bytes (176), Q6_K 128 low + 64
// high + 16 int8 scales + d (210).

#pragma once

#include "common.h"

#include <atomic>
#include <cfloat>
#include <optional>

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

namespace {
namespace encq {

constexpr int QKK = 256;               // values per K-quant super-block
constexpr float TINY_GROUP = 1e-15f;   // below this a group's largest magnitude counts as all zero (as ggml)
constexpr int8_t IQ4NL_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

enum GgmlType { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q2_K = 10, T_Q3_K = 11,
                T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_IQ4_NL = 20 };

struct TypeInfo { int block, bytes; };
inline TypeInfo type_info(int64_t t) {
    switch (t) {
        case T_Q4_0: return {32, 18};
        case T_Q4_1: return {32, 20};
        case T_Q5_0: return {32, 22};
        case T_Q5_1: return {32, 24};
        case T_Q8_0: return {32, 34};
        case T_Q2_K: return {256, 84};
        case T_Q3_K: return {256, 110};
        case T_Q4_K: return {256, 144};
        case T_Q5_K: return {256, 176};
        case T_Q6_K: return {256, 210};
        case T_IQ4_NL: return {32, 18};
        default: return {0, 0};
    }
}

// Round to the nearest integer, ties to even, by adding 1.5 * 2^23 (the float's mantissa then holds the integer):
// ggml's rounding for every K-quant, valid for |f| < 2^22.
inline int nearest_int(float f) {
    float v = f + 12582912.f;
    int32_t i;
    std::memcpy(&i, &v, 4);
    return (i & 0x007fffff) - 0x00400000;
}

// Candidate scales are tried 8 at a time, one per lane: each lane runs the scalar arithmetic unchanged (same
// operations, same order over the values), so the vector search picks exactly what the scalar one would.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
constexpr int LANES = 8;

inline v8f splat(float f) { return v8f{f, f, f, f, f, f, f, f}; }
inline v8i nearest_int(v8f f, int lo, int hi) {  // nearest_int per lane, then clamped to [lo, hi]
    const v8f v = f + 12582912.f;
    v8i i;
    std::memcpy(&i, &v, sizeof(i));
    i = (i & 0x007fffff) - 0x00400000;
    i = i < lo ? lo : i;
    return i > hi ? hi : i;
}
inline v8f to_float(v8i i) { return __builtin_convertvector(i, v8f); }

inline uint16_t f2h(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }  // round to nearest even
inline float h2f(uint16_t h) { return half_to_float(h); }
inline void put_half(uint8_t* p, float f) { uint16_t h = f2h(f); std::memcpy(p, &h, 2); }
inline float rounded(float f) { return h2f(f2h(f)); }  // the value a reader sees once stored as fp16

// ---------------------------------------------------------------- scale searches shared by the K-quants

// The value of largest magnitude (the first of equals): the symmetric fits start from the scale mapping it to -nmax.
inline float largest_magnitude(int n, const float* x) {
    float amax = 0, max = 0;
    for (int i = 0; i < n; i++) {
        const float a = std::fabs(x[i]);
        if (a > amax) { amax = a; max = x[i]; }
    }
    return max;
}

// Symmetric: L[i] in [0, 2 nmax) with x ~ scale * (L[i] - nmax). Starts at the scale that maps the largest
// magnitude to -nmax, then (weighted least squares, `w` or x^2) tries 18 nearby scales and keeps the best fit.
float fit_symmetric(int n, int nmax, const float* x, int8_t* L, const float* w) {
    const float max = largest_magnitude(n, x);
    if (std::fabs(max) < TINY_GROUP) {
        for (int i = 0; i < n; i++) L[i] = 0;
        return 0.f;
    }
    auto weight = [&](int i) { return w ? w[i] : x[i] * x[i]; };
    float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        const int l = std::max(-nmax, std::min(nmax - 1, nearest_int(iscale * x[i])));
        L[i] = (int8_t)(l + nmax);
        const float wi = weight(i);
        sumlx += wi * x[i] * l;
        suml2 += wi * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    // the 18 candidates -(nmax + 0.1 is) / max, is = -9..9 but 0, in 3 groups of lanes (the last 6 lanes idle)
    float wx[32], wv[32];
    for (int i = 0; i < n; i++) {
        wv[i] = weight(i);
        wx[i] = wv[i] * x[i];
    }
    constexpr int NC = 18;
    float cand[24];
    for (int c = 0; c < 24; c++) {
        const int is = c < 9 ? c - 9 : c - 8;
        cand[c] = -(nmax + 0.1f * std::min(is, 9)) / max;
    }
    for (int c0 = 0; c0 < NC; c0 += LANES) {
        v8f is_v;
        std::memcpy(&is_v, cand + c0, sizeof(is_v));
        v8f slx = splat(0), sl2 = splat(0);
        for (int i = 0; i < n; i++) {
            const v8f l = to_float(nearest_int(is_v * x[i], -nmax, nmax - 1));
            slx += wx[i] * l;
            sl2 += wv[i] * l * l;
        }
        for (int c = c0; c < std::min(c0 + LANES, NC); c++) {  // in the scalar search's order
            const float sx = slx[c - c0], s2 = sl2[c - c0];
            if (s2 > 0 && sx * sx > best * s2) {
                for (int i = 0; i < n; i++)
                    L[i] = (int8_t)(nmax + std::max(-nmax, std::min(nmax - 1, nearest_int(cand[c] * x[i]))));
                scale = sx / s2;
                best = scale * sx;
            }
        }
    }
    return scale;
}

// Q3_K's symmetric fit (weights x^2): from the max-magnitude scale, move single values to their best level while
// that improves the weighted fit, up to 5 sweeps. L[i] ends in [0, 2 nmax) (or all 0 for an all-zero group).
float fit_symmetric_sweeps(int n, int nmax, const float* x, int8_t* L) {
    const float max = largest_magnitude(n, x);
    if (std::fabs(max) < TINY_GROUP) {
        for (int i = 0; i < n; i++) L[i] = 0;
        return 0.f;
    }
    const float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        const int l = std::max(-nmax, std::min(nmax - 1, nearest_int(iscale * x[i])));
        L[i] = (int8_t)l;
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int sweep = 0; sweep < 5; sweep++) {
        int changed = 0;
        for (int i = 0; i < n; i++) {
            const float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * L[i] * L[i];
                int nl = std::max(-nmax, std::min(nmax - 1, nearest_int(x[i] * sl2 / slx)));
                if (nl != L[i]) {
                    slx += w * x[i] * nl;
                    sl2 += w * nl * nl;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (int8_t)nl;
                        sumlx = slx;
                        suml2 = sl2;
                        changed++;
                    }
                }
            }
        }
        if (!changed) break;
    }
    for (int i = 0; i < n; i++) L[i] = (int8_t)(L[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// Asymmetric: L[i] in [0, nmax] with x ~ scale * L[i] - *neg_min (the offset is <= 0, stored negated). Tries
// nstep + 1 scales (nmax + rmin + rdelta * step over the range), refitting scale and offset by weighted least
// squares at each, and keeps the lowest weighted error (absolute with `mad`, squared otherwise). ggml's
// make_qkx2_quants and make_qkx3_quants do the same arithmetic for non-null weights.
float fit_affine(int n, int nmax, const float* x, const float* w, uint8_t* L, float* neg_min, uint8_t* Laux,
                 float rmin, float rdelta, int nstep, bool mad) {
    float min = x[0], max = x[0];
    float sum_w = w[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;
    if (max <= min) {
        for (int i = 0; i < n; i++) L[i] = 0;
        *neg_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best = 0;
    for (int i = 0; i < n; i++) {
        L[i] = (uint8_t)std::max(0, std::min(nmax, nearest_int(iscale * (x[i] - min))));
        float diff = scale * L[i] + min - x[i];
        diff = mad ? std::fabs(diff) : diff * diff;
        best += w[i] * diff;
    }
    if (nstep < 1) {
        *neg_min = -min;
        return scale;
    }
    // Each step's candidate scale and its rounding depend on the offset kept so far, which an improving step
    // changes: lanes past a step that moved it are recomputed from the next step on.
    float xm[32];
    v8f lv[32];
    for (int s0 = 0; s0 <= nstep;) {  // steps s0 .. s0 + 7, one per lane
        for (int i = 0; i < n; i++) xm[i] = x[i] - min;
        v8f is_v;
        for (int k = 0; k < LANES; k++) is_v[k] = (rmin + rdelta * std::min(s0 + k, nstep) + nmax) / (max - min);
        v8f sum_l = splat(0), sum_l2 = splat(0), sum_xl = splat(0);
        for (int i = 0; i < n; i++) {
            const v8f l = to_float(nearest_int(is_v * xm[i], 0, nmax));
            lv[i] = l;
            const v8f wl = w[i] * l;
            sum_l += wl;
            sum_l2 += wl * l;
            sum_xl += wl * x[i];
        }
        const v8f D = sum_w * sum_l2 - sum_l * sum_l;
        v8f this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
        v8f this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        const auto clip = this_min > 0;
        this_scale = clip ? sum_xl / sum_l2 : this_scale;
        this_min = clip ? splat(0) : this_min;
        v8f err = splat(0);
        for (int i = 0; i < n; i++) {
            v8f diff = this_scale * lv[i] + this_min - x[i];
            if (mad) {
                v8i bits;
                std::memcpy(&bits, &diff, sizeof(bits));
                bits &= 0x7fffffff;
                std::memcpy(&diff, &bits, sizeof(diff));
            } else {
                diff = diff * diff;
            }
            err += w[i] * diff;
        }
        int next = s0 + LANES;
        for (int k = 0; k < LANES && s0 + k <= nstep; k++) {  // in the scalar search's order
            if (D[k] > 0 && err[k] < best) {
                for (int i = 0; i < n; i++) L[i] = (uint8_t)lv[i][k];
                best = err[k];
                scale = this_scale[k];
                const bool moved = this_min[k] != min;
                min = this_min[k];
                if (moved) {
                    next = s0 + k + 1;
                    break;
                }
            }
        }
        s0 = next;
    }
    (void)Laux;
    *neg_min = -min;
    return scale;
}

// Non-negative values (the sub-block scales or mins of a super-block) onto [0, nmax] with weights: 8 nearby
// scales by weighted squared error, then single-level moves while they improve the fit (as make_qp_quants).
float fit_positive(int n, int nmax, const float* x, uint8_t* L, const float* w) {
    float max = 0;
    for (int i = 0; i < n; i++) max = std::max(max, x[i]);
    if (max < TINY_GROUP) {
        for (int i = 0; i < n; i++) L[i] = 0;
        return 0.f;
    }
    float iscale = nmax / max;
    for (int i = 0; i < n; i++) L[i] = (uint8_t)nearest_int(iscale * x[i]);
    const float scale = 1 / iscale;
    float best = 0;
    for (int i = 0; i < n; i++) {
        const float diff = x[i] - scale * L[i];
        best += w[i] * diff * diff;
    }
    for (int is = -4; is <= 4; is++) {
        if (is == 0) continue;
        const float iscale_is = (0.1f * is + nmax) / max;
        const float scale_is = 1 / iscale_is;
        float mse = 0;
        for (int i = 0; i < n; i++) {
            const int l = std::min(nmax, nearest_int(iscale_is * x[i]));
            const float diff = x[i] - scale_is * l;
            mse += w[i] * diff * diff;
        }
        if (mse < best) {
            best = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        const int l = std::min(nmax, nearest_int(iscale * x[i]));
        L[i] = (uint8_t)l;
        sumlx += w[i] * x[i] * l;
        suml2 += w[i] * l * l;
    }
    for (int sweep = 0; sweep < 5; sweep++) {
        int changed = 0;
        for (int i = 0; i < n; i++) {
            float slx = sumlx - w[i] * x[i] * L[i];
            float sl2 = suml2 - w[i] * L[i] * L[i];
            if (slx > 0 && sl2 > 0) {
                const int nl = std::min(nmax, nearest_int(x[i] * sl2 / slx));
                if (nl != L[i]) {
                    slx += w[i] * x[i] * nl;
                    sl2 += w[i] * nl * nl;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (uint8_t)nl;
                        sumlx = slx;
                        suml2 = sl2;
                        changed++;
                    }
                }
            }
        }
        if (!changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// ---------------------------------------------------------------- 32-value blocks

// The imatrix paths weight each column by imatrix * sqrt(sigma2 + x^2), sigma2 the row's mean square.
inline float row_mean_square(const float* x, int64_t K) {
    float s = 0;
    for (int64_t j = 0; j < K; j++) s += x[j] * x[j];
    return s / K;
}

// low nibbles: values 0..15, high nibbles: values 16..31
inline void pack_nibbles(const uint8_t* L, uint8_t* qs) {
    for (int j = 0; j < 16; j++) qs[j] = (uint8_t)(L[j] | (L[j + 16] << 4));
}
inline void pack_fifth_bits(const uint8_t* L, uint8_t* qh4, uint8_t* qs) {
    uint32_t qh = 0;
    for (int j = 0; j < 16; j++) {
        qs[j] = (uint8_t)((L[j] & 0x0F) | ((L[j + 16] & 0x0F) << 4));
        qh |= (uint32_t)((L[j] & 0x10u) >> 4) << j;
        qh |= (uint32_t)((L[j + 16] & 0x10u) >> 4) << (j + 16);
    }
    std::memcpy(qh4, &qh, 4);
}

// Q4_0 / Q5_0 without imatrix: d = (signed value of largest magnitude) / -(levels/2), truncating rounding.
template <int BITS>
void row_x_0(const float* x, uint8_t* y, int64_t K) {
    constexpr int half = 1 << (BITS - 1), top = (1 << BITS) - 1;
    constexpr int bytes = BITS == 4 ? 18 : 22;
    for (int64_t b = 0; b < K / 32; b++, x += 32, y += bytes) {
        float amax = 0, max = 0;
        for (int j = 0; j < 32; j++)
            if (amax < std::fabs(x[j])) { amax = std::fabs(x[j]); max = x[j]; }
        const float d = max / -half;
        const float id = d ? 1.0f / d : 0.0f;
        put_half(y, d);
        uint8_t L[32];
        for (int j = 0; j < 32; j++) L[j] = (uint8_t)std::min(top, (int)(int8_t)(x[j] * id + (half + 0.5f)));
        if (BITS == 4) pack_nibbles(L, y + 2);
        else pack_fifth_bits(L, y + 2, y + 6);
    }
}

// Q4_1 / Q5_1 without imatrix: min and (max - min) / (levels - 1).
template <int BITS>
void row_x_1(const float* x, uint8_t* y, int64_t K) {
    constexpr int top = (1 << BITS) - 1;
    constexpr int bytes = BITS == 4 ? 20 : 24;
    for (int64_t b = 0; b < K / 32; b++, x += 32, y += bytes) {
        float min = FLT_MAX, max = -FLT_MAX;
        for (int j = 0; j < 32; j++) {
            if (x[j] < min) min = x[j];
            if (x[j] > max) max = x[j];
        }
        const float d = (max - min) / top;
        const float id = d ? 1.0f / d : 0.0f;
        put_half(y, d);
        put_half(y + 2, min);
        uint8_t L[32];
        for (int j = 0; j < 32; j++) {
            const float v = (x[j] - min) * id + 0.5f;
            L[j] = BITS == 4 ? (uint8_t)std::min(15, (int)(int8_t)v) : (uint8_t)v;
        }
        if (BITS == 4) pack_nibbles(L, y + 4);
        else pack_fifth_bits(L, y + 4, y + 8);
    }
}

// Q4_0 / Q5_0 with imatrix: the weighted symmetric fit per block.
template <int BITS>
void row_x_0_weighted(const float* x, uint8_t* y, int64_t K, const float* qw) {
    constexpr int bytes = BITS == 4 ? 18 : 22;
    const float sigma2 = row_mean_square(x, K);
    for (int64_t b = 0; b < K / 32; b++, x += 32, qw += 32, y += bytes) {
        float w[32];
        for (int j = 0; j < 32; j++) w[j] = qw[j] * std::sqrt(sigma2 + x[j] * x[j]);
        int8_t L[32];
        put_half(y, fit_symmetric(32, 1 << (BITS - 1), x, L, w));
        if (BITS == 4) pack_nibbles((const uint8_t*)L, y + 2);
        else pack_fifth_bits((const uint8_t*)L, y + 2, y + 6);
    }
}

// Q4_1 / Q5_1 with imatrix: the weighted affine fit per block.
template <int BITS>
void row_x_1_weighted(const float* x, uint8_t* y, int64_t K, const float* qw) {
    constexpr int bytes = BITS == 4 ? 20 : 24;
    const float sigma2 = row_mean_square(x, K);
    for (int64_t b = 0; b < K / 32; b++, x += 32, qw += 32, y += bytes) {
        float w[32];
        for (int j = 0; j < 32; j++) w[j] = qw[j] * std::sqrt(sigma2 + x[j] * x[j]);
        uint8_t L[32], Laux[32];
        float neg_min;
        const float d = fit_affine(32, (1 << BITS) - 1, x, w, L, &neg_min, Laux, -0.9f, 0.05f, 36, false);
        put_half(y, d);
        put_half(y + 2, -neg_min);
        if (BITS == 4) pack_nibbles(L, y + 4);
        else pack_fifth_bits(L, y + 4, y + 8);
    }
}

void row_q8_0(const float* x, uint8_t* y, int64_t K) {
    for (int64_t b = 0; b < K / 32; b++, x += 32, y += 34) {
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = std::max(amax, std::fabs(x[j]));
        const float d = amax / 127;
        const float id = d ? 1.0f / d : 0.0f;
        put_half(y, d);
        for (int j = 0; j < 32; j++) y[2 + j] = (uint8_t)(int8_t)std::round(x[j] * id);
    }
}

// The nearest of the 16 sorted table values to v (ties to the upper one), by bisection.
inline int nearest_level(float v) {
    const int8_t* t = IQ4NL_VALUES;
    if (v <= t[0]) return 0;
    if (v >= t[15]) return 15;
    int lo = 0, hi = 15;
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (v < t[mid]) hi = mid;
        else lo = mid;
    }
    return v - t[hi - 1] < t[hi] - v ? hi - 1 : hi;
}

// IQ4_NL: per 32-value block, the scale whose table-rounded values fit best (weighted least squares; weights x^2,
// or the imatrix's) among the max-magnitude one and 15 around it.
void row_iq4_nl(const float* x, uint8_t* y, int64_t K, const float* qw) {
    const int8_t* t = IQ4NL_VALUES;
    uint8_t L[32];
    for (int64_t b = 0; b < K / 32; b++, x += 32, y += 18) {
        float sigma2 = 0;
        for (int j = 0; j < 32; j++) sigma2 += x[j] * x[j];
        sigma2 *= 2.f / 32;
        float w[32];
        for (int j = 0; j < 32; j++) w[j] = qw ? qw[32 * b + j] * std::sqrt(sigma2 + x[j] * x[j]) : x[j] * x[j];
        float amax = 0, max = 0;
        for (int j = 0; j < 32; j++)
            if (std::fabs(x[j]) > amax) { amax = std::fabs(x[j]); max = x[j]; }
        float d = 0;
        if (amax >= TINY_GROUP) {
            d = -max / t[0];
            float id = 1 / d;
            float sumqx = 0, sumq2 = 0;
            for (int j = 0; j < 32; j++) {
                const float q = t[nearest_level(id * x[j])];
                sumqx += w[j] * q * x[j];
                sumq2 += w[j] * q * q;
            }
            d = sumq2 > 0 ? sumqx / sumq2 : 0.f;
            float best = d * sumqx;
            for (int step = -7; step <= 7; step++) {
                id = (step + t[0]) / max;
                sumqx = sumq2 = 0;
                for (int j = 0; j < 32; j++) {
                    const float q = t[nearest_level(id * x[j])];
                    sumqx += w[j] * q * x[j];
                    sumq2 += w[j] * q * q;
                }
                if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
                    d = sumqx / sumq2;
                    best = d * sumqx;
                }
            }
        }
        put_half(y, d);
        const float id = d ? 1 / d : 0;
        for (int j = 0; j < 32; j++) L[j] = (uint8_t)nearest_level(id * x[j]);
        pack_nibbles(L, y + 2);
    }
}

// ---------------------------------------------------------------- K-quants (256-value super-blocks)

// 2-bit values, four to a byte: byte l of each 32-byte group holds values l, l+32, l+64, l+96 of its 128.
inline void pack_2bit(const uint8_t* L, uint8_t* qs) {
    for (int j = 0; j < QKK; j += 128)
        for (int l = 0; l < 32; l++)
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

// Q2_K: 16 groups of 16 with a 4-bit scale and 4-bit min each (times the fp16 d and dmin).
void row_q2_K(const float* x, uint8_t* y, int64_t K, const float* qw) {
    uint8_t L[QKK], Laux[16];
    float w[16], mins[16], scales[16];
    for (int64_t s = 0; s < K / QKK; s++, x += QKK, y += 84) {
        uint8_t* sc = y;
        uint8_t* qs = y + 16;
        float dm, mm;
        if (!qw) {
            float max_scale = 0, max_min = 0;
            for (int j = 0; j < 16; j++) {
                for (int l = 0; l < 16; l++) w[l] = std::fabs(x[16 * j + l]);
                scales[j] = fit_affine(16, 3, x + 16 * j, w, L + 16 * j, &mins[j], Laux, -0.5f, 0.1f, 15, true);
                if (scales[j] > max_scale) max_scale = scales[j];
                if (mins[j] > max_min) max_min = mins[j];
            }
            if (max_scale > 0) {
                const float iscale = 15.f / max_scale;
                for (int j = 0; j < 16; j++) sc[j] = (uint8_t)nearest_int(iscale * scales[j]);
                put_half(y + 80, max_scale / 15.f);
            } else {
                for (int j = 0; j < 16; j++) sc[j] = 0;
                put_half(y + 80, 0.f);
            }
            if (max_min > 0) {
                const float iscale = 15.f / max_min;
                for (int j = 0; j < 16; j++) sc[j] |= (uint8_t)(nearest_int(iscale * mins[j]) << 4);
                put_half(y + 82, max_min / 15.f);
            } else {
                put_half(y + 82, 0.f);
            }
        } else {
            const float* q = qw + QKK * s;
            float sumx2 = 0;
            for (int j = 0; j < QKK; j++) sumx2 += x[j] * x[j];
            const float sigma2 = sumx2 / QKK;
            float sw[16];
            for (int j = 0; j < 16; j++) {
                sw[j] = 0;
                for (int l = 0; l < 16; l++) w[l] = q[16 * j + l] * std::sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]);
                for (int l = 0; l < 16; l++) sw[j] += w[l];
                scales[j] = fit_affine(16, 3, x + 16 * j, w, L + 16 * j, &mins[j], Laux, -0.9f, 0.05f, 36, false);
            }
            uint8_t Ls[16], Lm[16];
            put_half(y + 80, fit_positive(16, 15, scales, Ls, sw));
            put_half(y + 82, fit_positive(16, 15, mins, Lm, sw));
            for (int j = 0; j < 16; j++) sc[j] = (uint8_t)(Ls[j] | (Lm[j] << 4));
        }
        dm = load_half(y + 80);
        mm = load_half(y + 82);
        for (int j = 0; j < 16; j++) {  // requantize against the stored scales
            const float d = dm * (sc[j] & 0xF);
            if (!d) continue;
            const float m = mm * (sc[j] >> 4);
            for (int l = 0; l < 16; l++)
                L[16 * j + l] = (uint8_t)std::max(0, std::min(3, nearest_int((x[16 * j + l] + m) / d)));
        }
        pack_2bit(L, qs);
    }
}

// Q3_K's 6-bit signed sub-block scales, stored +32: low nibbles in bytes 0..7, top two bits in bytes 8..11.
inline void q3k_put_scale(uint8_t* sc, int j, int l) {
    if (j < 8) sc[j] = (uint8_t)(l & 0xF);
    else sc[j - 8] |= (uint8_t)((l & 0xF) << 4);
    sc[j % 4 + 8] |= (uint8_t)((l >> 4) << (2 * (j / 4)));
}
inline int q3k_get_scale(const uint8_t* sc, int j) {
    int8_t v = (int8_t)(j < 8 ? sc[j] & 0xF : sc[j - 8] >> 4);
    v = (int8_t)((v | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
    return v;
}

void row_q3_K(const float* x, uint8_t* y, int64_t K, const float* qw) {
    int8_t L[QKK];
    float scales[16], w[16], sw[16];
    for (int64_t s = 0; s < K / QKK; s++, x += QKK, y += 110) {
        uint8_t* hmask = y;
        uint8_t* qs = y + 32;
        uint8_t* sc = y + 96;
        std::memset(sc, 0, 12);
        if (!qw) {
            float max_scale = 0, amax = 0;
            for (int j = 0; j < 16; j++) {
                scales[j] = fit_symmetric_sweeps(16, 4, x + 16 * j, L + 16 * j);
                if (std::fabs(scales[j]) > amax) { amax = std::fabs(scales[j]); max_scale = scales[j]; }
            }
            if (max_scale) {
                const float iscale = -32.f / max_scale;
                for (int j = 0; j < 16; j++) {
                    int8_t l = (int8_t)nearest_int(iscale * scales[j]);
                    l = (int8_t)(std::max(-32, std::min(31, (int)l)) + 32);
                    q3k_put_scale(sc, j, l);
                }
                put_half(y + 108, 1 / iscale);
            } else {
                put_half(y + 108, 0.f);
            }
        } else {
            const float* q = qw + QKK * s;
            float sumx2 = 0;
            for (int j = 0; j < QKK; j++) sumx2 += x[j] * x[j];
            const float sigma2 = 2 * sumx2 / QKK;
            for (int j = 0; j < 16; j++) {
                for (int l = 0; l < 16; l++) w[l] = q[16 * j + l] * std::sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]);
                float sumw = 0;
                for (int l = 0; l < 16; l++) sumw += w[l];
                sw[j] = sumw;
                scales[j] = fit_symmetric(16, 4, x + 16 * j, L + 16 * j, w);
            }
            int8_t Ls[16];
            const float d_block = fit_symmetric(16, 32, scales, Ls, sw);
            for (int j = 0; j < 16; j++) q3k_put_scale(sc, j, Ls[j]);
            put_half(y + 108, d_block);
        }
        const float dall = load_half(y + 108);
        for (int j = 0; j < 16; j++) {
            const float d = dall * q3k_get_scale(sc, j);
            if (!d) continue;
            for (int l = 0; l < 16; l++)
                L[16 * j + l] = (int8_t)(std::max(-4, std::min(3, nearest_int(x[16 * j + l] / d))) + 4);
        }
        std::memset(hmask, 0, 32);
        for (int j = 0; j < QKK; j++)  // the third bit of value j: hmask byte j % 32, bit j / 32
            if (L[j] > 3) {
                hmask[j % 32] |= (uint8_t)(1 << (j / 32));
                L[j] -= 4;
            }
        pack_2bit((const uint8_t*)L, qs);
    }
}

// Q4_K / Q5_K's 6-bit scales and mins of the 8 sub-blocks, packed into 12 bytes.
inline void k4_put(uint8_t* sc, int j, uint8_t ls, uint8_t lm) {
    if (j < 4) {
        sc[j] = ls;
        sc[j + 4] = lm;
    } else {
        sc[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
        sc[j - 4] |= (uint8_t)((ls >> 4) << 6);
        sc[j] |= (uint8_t)((lm >> 4) << 6);
    }
}
inline void k4_get(const uint8_t* sc, int j, int* d, int* m) {
    if (j < 4) {
        *d = sc[j] & 63;
        *m = sc[j + 4] & 63;
    } else {
        *d = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4);
        *m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
    }
}

// Q4_K (BITS 4) and Q5_K (BITS 5): 8 sub-blocks of 32, affine, 6-bit scales and mins.
template <int BITS>
void row_q45_K(const float* x, uint8_t* y, int64_t K, const float* qw) {
    constexpr int nmax = (1 << BITS) - 1;
    constexpr int bytes = BITS == 4 ? 144 : 176;
    uint8_t L[QKK], Laux[32];
    float w[32], mins[8], scales[8];
    for (int64_t s = 0; s < K / QKK; s++, x += QKK, y += bytes) {
        uint8_t* sc = y + 4;
        std::memset(sc, 0, 12);
        if (!qw) {
            float max_scale = 0, max_min = 0;
            for (int j = 0; j < 8; j++) {
                float sum_x2 = 0;
                for (int l = 0; l < 32; l++) sum_x2 += x[32 * j + l] * x[32 * j + l];
                const float av_x = std::sqrt(sum_x2 / 32);
                for (int l = 0; l < 32; l++) w[l] = av_x + std::fabs(x[32 * j + l]);
                scales[j] = BITS == 4
                    ? fit_affine(32, nmax, x + 32 * j, w, L + 32 * j, &mins[j], Laux, -1.f, 0.1f, 20, false)
                    : fit_affine(32, nmax, x + 32 * j, w, L + 32 * j, &mins[j], Laux, -0.5f, 0.1f, 15, false);
                if (scales[j] > max_scale) max_scale = scales[j];
                if (mins[j] > max_min) max_min = mins[j];
            }
            const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
            const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
            for (int j = 0; j < 8; j++) {
                uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]);
                uint8_t lm = (uint8_t)nearest_int(inv_min * mins[j]);
                k4_put(sc, j, std::min<uint8_t>(63, ls), std::min<uint8_t>(63, lm));
            }
            put_half(y, max_scale / 63.f);
            put_half(y + 2, max_min / 63.f);
        } else {
            const float* q = qw + QKK * s;
            float sum_x2 = 0;
            for (int l = 0; l < QKK; l++) sum_x2 += x[l] * x[l];
            const float sigma2 = 2 * sum_x2 / QKK;
            float sw[8];
            for (int j = 0; j < 8; j++) {
                for (int l = 0; l < 32; l++) w[l] = q[32 * j + l] * std::sqrt(sigma2 + x[32 * j + l] * x[32 * j + l]);
                float sumw = 0;
                for (int l = 0; l < 32; l++) sumw += w[l];
                sw[j] = sumw;
                scales[j] = fit_affine(32, nmax, x + 32 * j, w, L + 32 * j, &mins[j], Laux, -0.9f, 0.05f, 36, false);
            }
            uint8_t Ls[8], Lm[8];
            const float d_block = fit_positive(8, 63, scales, Ls, sw);
            const float m_block = fit_positive(8, 63, mins, Lm, sw);
            for (int j = 0; j < 8; j++)  // ggml clamps here for Q5_K only (fit_positive's levels are <= 63 anyway)
                k4_put(sc, j, BITS == 5 ? std::min<uint8_t>(63, Ls[j]) : Ls[j], BITS == 5 ? std::min<uint8_t>(63, Lm[j]) : Lm[j]);
            put_half(y, d_block);
            put_half(y + 2, m_block);
        }
        const float dall = load_half(y), mall = load_half(y + 2);
        for (int j = 0; j < 8; j++) {
            int ls, lm;
            k4_get(sc, j, &ls, &lm);
            const float d = dall * ls;
            if (!d) continue;
            const float dm = mall * lm;
            for (int l = 0; l < 32; l++)
                L[32 * j + l] = (uint8_t)std::max(0, std::min(nmax, nearest_int((x[32 * j + l] + dm) / d)));
        }
        if (BITS == 4) {
            uint8_t* qs = y + 16;
            for (int j = 0; j < QKK; j += 64, qs += 32)  // byte l: value j+l low, value j+l+32 high
                for (int l = 0; l < 32; l++) qs[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
        } else {
            uint8_t* qh = y + 16;
            uint8_t* ql = y + 48;
            std::memset(qh, 0, 32);
            uint8_t m1 = 1, m2 = 2;
            for (int n = 0; n < QKK; n += 64, ql += 32, m1 <<= 2, m2 <<= 2)
                for (int j = 0; j < 32; j++) {
                    int l1 = L[n + j], l2 = L[n + j + 32];
                    if (l1 > 15) { l1 -= 16; qh[j] |= m1; }
                    if (l2 > 15) { l2 -= 16; qh[j] |= m2; }
                    ql[j] = (uint8_t)(l1 | (l2 << 4));
                }
        }
    }
}

// Q6_K: 16 groups of 16, symmetric 6-bit values, int8 scales times one fp16 d.
void row_q6_K(const float* x, uint8_t* y, int64_t K, const float* qw) {
    int8_t L[QKK];
    float scales[16];
    for (int64_t s = 0; s < K / QKK; s++, x += QKK, y += 210) {
        float max_scale = 0, max_abs = 0;
        for (int j = 0; j < 16; j++) {  // with an imatrix its values weigh the fit directly (as ggml)
            scales[j] = fit_symmetric(16, 32, x + 16 * j, L + 16 * j, qw ? qw + QKK * s + 16 * j : nullptr);
            if (std::fabs(scales[j]) > max_abs) { max_abs = std::fabs(scales[j]); max_scale = scales[j]; }
        }
        std::memset(y, 0, 210);
        if (max_abs < TINY_GROUP) continue;
        int8_t* sc = (int8_t*)(y + 192);
        const float iscale = -128.f / max_scale;
        put_half(y + 208, 1 / iscale);
        for (int j = 0; j < 16; j++) sc[j] = (int8_t)std::min(127, nearest_int(iscale * scales[j]));
        const float dall = load_half(y + 208);
        for (int j = 0; j < 16; j++) {
            const float d = dall * sc[j];
            if (!d) continue;
            for (int l = 0; l < 16; l++)
                L[16 * j + l] = (int8_t)(std::max(-32, std::min(31, nearest_int(x[16 * j + l] / d))) + 32);
        }
        uint8_t* ql = y;
        uint8_t* qh = y + 128;
        for (int j = 0; j < QKK; j += 128, ql += 64, qh += 32)
            for (int l = 0; l < 32; l++) {
                const int a = L[j + l], b = L[j + l + 32], c = L[j + l + 64], e = L[j + l + 96];
                ql[l] = (uint8_t)((a & 0xF) | ((c & 0xF) << 4));
                ql[l + 32] = (uint8_t)((b & 0xF) | ((e & 0xF) << 4));
                qh[l] = (uint8_t)((a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6));
            }
    }
}

// One row, through the path ggml_quantize_chunk takes for this type with or without an imatrix (qw).
void quantize_row(int64_t type, const float* x, uint8_t* y, int64_t K, const float* qw) {
    switch (type) {
        case T_Q4_0: qw ? row_x_0_weighted<4>(x, y, K, qw) : row_x_0<4>(x, y, K); break;
        case T_Q5_0: qw ? row_x_0_weighted<5>(x, y, K, qw) : row_x_0<5>(x, y, K); break;
        case T_Q4_1: qw ? row_x_1_weighted<4>(x, y, K, qw) : row_x_1<4>(x, y, K); break;
        case T_Q5_1: qw ? row_x_1_weighted<5>(x, y, K, qw) : row_x_1<5>(x, y, K); break;
        case T_Q8_0: row_q8_0(x, y, K); break;
        case T_Q2_K: row_q2_K(x, y, K, qw); break;
        case T_Q3_K: row_q3_K(x, y, K, qw); break;
        case T_Q4_K: row_q45_K<4>(x, y, K, qw); break;
        case T_Q5_K: row_q45_K<5>(x, y, K, qw); break;
        case T_Q6_K: row_q6_K(x, y, K, qw); break;
        case T_IQ4_NL: row_iq4_nl(x, y, K, qw); break;
        default: break;
    }
}

}  // namespace encq

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// x float32 (rows, K) contiguous, a ggml type id, an optional imatrix (K,) -> uint8 (rows, K / block * bytes).
at::Tensor quantize_rows(at::Tensor x, int64_t type, std::optional<at::Tensor> imatrix) {
    const encq::TypeInfo info = encq::type_info(type);
    TORCH_CHECK(info.block > 0, "quantize_rows: unsupported ggml type ", type);
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be float32 (rows, K)");
    const int64_t rows = x.size(0), K = x.size(1);
    TORCH_CHECK(K % info.block == 0, "row length ", K, " is not a multiple of the block size ", info.block);
    const float* qw = nullptr;
    at::Tensor im;
    if (imatrix.has_value() && imatrix->defined() && imatrix->numel() > 0) {
        im = imatrix->to(at::kFloat).contiguous();
        TORCH_CHECK(im.numel() == K, "imatrix has ", im.numel(), " values, expected one per column (", K, ")");
        qw = im.data_ptr<float>();
    }
    const int64_t row_bytes = K / info.block * info.bytes;
    auto out = at::empty({rows, row_bytes}, at::kByte);
    const float* src = x.data_ptr<float>();
    uint8_t* dst = out.data_ptr<uint8_t>();
    // A NaN or infinity would make garbage scales (and ggml's rounding trick assumes |x| < 2^22): such rows are
    // reported, the first one by index, instead of quantized.
    std::atomic<int64_t> bad{rows};
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++) {
            const float* xr = src + r * K;
            bool finite = true;
            for (int64_t j = 0; j < K; j++) finite &= std::isfinite(xr[j]);
            if (!finite) {
                int64_t cur = bad.load();
                while (r < cur && !bad.compare_exchange_weak(cur, r)) {}
                continue;
            }
            encq::quantize_row(type, xr, dst + r * row_bytes, K, qw);
        }
    });
    TORCH_CHECK(bad.load() == rows, "non-finite value in row ", bad.load());
    return out;
}

}  // namespace
