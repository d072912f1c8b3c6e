// Plain C++ inner loops, for CPUs with neither AVX-512 nor AVX2 (and the AVX2 build's dequantization and rounding):
// what the compiler vectorizes by itself. Every instruction-set header defines these functions:
//   dequant_block<TYPE>    one GGUF block as 32 floats                       (quantized.cpp: dequantize)
//   packed_dequant_group   16 packed rows as floats                          (quantized.cpp: dequantize_packed)
//   round_block            32 activations rounded to int16                   (quantized.cpp: quantize_acts)
//   group_rows<FMT, T>     T activation rows times one group of 16 rows      (quantized.cpp: the products)
//   silu_mul_group         silu(gate) * up for one group's outputs           (quantized.cpp: matmul_swiglu)
//   gelu_mul_group         gelu_tanh(gate) * up, the same for Gemma          (quantized.cpp: matmul_swiglu)
//   dot_vec, axpy_vec, max_vec, exp_sum_vec, swiglu_fwd_vec, swiglu_bwd_vec: the vector part of a loop whose
//                          scalar tail is its caller's (here: nothing, the tail does it all)
//   scores_tile, scores_tile2, pv_tile: attention's register tiles           (attention.cpp)
//   ISA                    the name Python sees as `ops().isa`

#pragma once

#include "common.h"

namespace {

template <int TYPE>
inline void dequant_block(const uint8_t* blk, float* o) {
    block_floats(blk, TYPE, o);
}

#ifndef TINKER_ISA_DEQUANT
// All 16 rows of group g as floats into out (16, K).
inline void packed_dequant_group(const PW& w, int64_t g, float* out) {
    packed_dequant_rows(w, g * GR, g * GR + GR, out);
}
#endif

inline void round_block(const float* xb, int16_t* qb, float& amax, int32_t& s) {
    amax = 0.f;
    for (int k = 0; k < QK; k++) amax = std::max(amax, std::fabs(xb[k]));
    const float inv = amax > 0.f ? 32767.f / amax : 0.f;
    s = 0;
    for (int k = 0; k < QK; k++) { qb[k] = (int16_t)std::nearbyint(xb[k] * inv); s += qb[k]; }
}

#ifndef TINKER_ISA_PRODUCTS
constexpr const char* ISA = "scalar";
constexpr int TILE_ROWS = 12;  // activation rows per pass over a group

// y[t][0 .. 15] = rows g*16 .. g*16+15 of x[t0 + t] @ W^T for t < T: one group of 16 weight rows.
template <int FMT, int T>
void group_rows(const PW& w, int64_t g, const XQ& x, int64_t t0, float* y, int64_t ystride) {
    const int64_t nb = w.nb;
    // Plain C++: unpack the group's block to int16, then integer dot products the compiler can vectorize (per
    // 16-column half for the formats with a scale per half, X6/X3/X2).
    const int64_t valid = std::min<int64_t>(GR, w.rows - g * GR);
    float acc[T][GR] = {};
    int16_t wq[GR][QK];
    float d[2][GR], m[2][GR];
    for (int64_t b = 0; b < nb; b++) {
        for (int j = 0; j < GR; j++)
            for (int k = 0; k < QK; k++) {
                int q; float dd, mm;
                packed_entry(w, g * GR + j, b, k, q, dd, mm);
                wq[j][k] = (int16_t)q;
                d[k / 16][j] = dd;
                m[k / 16][j] = mm;
            }
        for (int t = 0; t < T; t++) {
            const int16_t* xq = x.q.data() + (t0 + t) * x.K + b * QK;
            const int64_t xi = (t0 + t) * x.nb + b;
            for (int j = 0; j < valid; j++) {
                int32_t s[2] = {0, 0};
                for (int k = 0; k < QK; k++) s[k / 16] += (int32_t)wq[j][k] * xq[k];
                if (HALVES[FMT])
                    acc[t][j] += (float)s[0] * (d[0][j] * x.dx[xi]) + (float)s[1] * (d[1][j] * x.dx[xi]) +
                                 m[0][j] * x.sh[xi] + m[1][j] * (x.sx[xi] - x.sh[xi]);
                else
                    acc[t][j] += (float)(s[0] + s[1]) * (d[0][j] * x.dx[xi]) + m[0][j] * x.sx[xi];
            }
        }
    }
    for (int t = 0; t < T; t++)
        for (int j = 0; j < valid; j++) y[t * ystride + j] = acc[t][j];
}
#endif

#ifndef TINKER_ISA_VECTOR_MATH
inline void silu_mul_group(const float* g, const float* u, float* o, int64_t valid) {
    for (int64_t j = 0; j < valid; j++) o[j] = g[j] / (1.f + std::exp(-g[j])) * u[j];
}

inline void gelu_mul_group(const float* g, const float* u, float* o, int64_t valid) {  // GELU-tanh, as torch's
    for (int64_t j = 0; j < valid; j++) {
        const float x = g[j], a = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        o[j] = 0.5f * x * (1.f + std::tanh(a)) * u[j];
    }
}

inline float dot_vec(const float*, const float*, int64_t, int64_t&) { return 0.f; }
inline void axpy_vec(float, const float*, float*, int64_t, int64_t&) {}
inline float max_vec(const float*, int64_t, int64_t&) { return -INFINITY; }
inline float exp_sum_vec(float*, int64_t, float, int64_t&) { return 0.f; }
inline void swiglu_fwd_vec(const float*, const float*, float*, int64_t, int64_t&) {}
inline void swiglu_bwd_vec(const float*, const float*, const float*, float*, float*, int64_t, int64_t&) {}

template <int NR>
inline void scores_tile(const float* q, int64_t qs, const float* kt, int64_t ks, int64_t hd, float scale, float* s) {
    for (int r = 0; r < NR; r++)
        for (int j = 0; j < 16; j++) {
            float a = 0.f;
            for (int64_t d = 0; d < hd; d++) a += q[r * qs + d] * kt[d * 16 + j];
            s[r * ks + j] = a * scale;
        }
}

template <int NR, int ND>
inline void pv_tile(const float* p, int64_t ps, const float* v, int64_t vs, int64_t n, float* o, int64_t os) {
    for (int r = 0; r < NR; r++)
        for (int d = 0; d < 16 * ND; d++) {
            float a = 0.f;
            for (int64_t j = 0; j < n; j++) a += p[r * ps + j] * v[j * vs + d];
            o[r * os + d] = a;
        }
}

#endif  // TINKER_ISA_VECTOR_MATH

// 32 keys as two 16-key tiles, one after the other (here and on AVX2, where four accumulators a row would not fit
// 16 registers at 4 rows; isa_avx512.h has its own, each query value broadcast once for both tiles).
template <int NR>
inline void scores_tile2(const float* q, int64_t qs, const float* kt, int64_t ks, int64_t hd, float scale, float* s) {
    scores_tile<NR>(q, qs, kt, ks, hd, scale, s);
    scores_tile<NR>(q, qs, kt + hd * 16, ks, hd, scale, s + 16);
}

}  // namespace
