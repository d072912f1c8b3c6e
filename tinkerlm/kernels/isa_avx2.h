// AVX2 inner loops (with FMA and F16C) for CPUs without AVX-512: the quantized products, half a group (8 rows, one
// 256-bit register) at a time, prefill's on each half group unpacked once to int8 (unpack_half); and the vector
// math (exp, SwiGLU, softmax loops, attention tiles; below). The rest is isa_plain.h's loops (included below).

#pragma once

#include <immintrin.h>

#include <array>
#include <vector>

#include "common.h"

namespace {

constexpr const char* ISA = "avx2";  // the products only; attention and elementwise ops are plain C++
// Activation rows per pass over a group: 2 of the 16 ymm registers per row (sum and block sum). AVX-512's 12 rows
// spilled here and ran a 2048x2048 Q4_0/Q8_0 product of 64 rows at about half the speed of 4 to 6 (Zen 3, 1 thread).
constexpr int TILE_ROWS = 5;

// Column pair p's fifth bit (plane bit x5_bit(p)) moved to bit 4 of every 16-bit lane (the value 16 or 0).
inline __m256i fifth_bits(__m256i plane, int p) {
    const int q = x5_bit(p);
    const __m256i moved = q >= 4 ? _mm256_srli_epi16(plane, q - 4) : _mm256_slli_epi16(plane, 4 - q);
    return _mm256_and_si256(moved, _mm256_set1_epi16(0x10));
}

// X6K, X3K, X2K: field F of W bits in the words w[0..2] read as one 48-bit (X2K: w[0..1], 32-bit) number
// (common.h: x6_place, F = 0..7 of a half's words; xk_place, F = 0..15 of a block's), as int16 values
// 0 .. 2^W - 1.
template <int W, int F>
inline __m256i kfield(const __m256i* w) {
    constexpr int bit = W * F, lo = bit / 16, sh = bit % 16;
    const __m256i m = _mm256_set1_epi16((1 << W) - 1);
    if constexpr (sh + W > 16)
        return _mm256_and_si256(_mm256_or_si256(_mm256_slli_epi16(w[lo + 1], 16 - sh), _mm256_srli_epi16(w[lo], sh)), m);
    else if constexpr (sh + W == 16)
        return _mm256_srli_epi16(w[lo], sh);
    else if constexpr (sh == 0)
        return _mm256_and_si256(w[lo], m);
    else
        return _mm256_and_si256(_mm256_srli_epi16(w[lo], sh), m);
}

// tmp[t] += half h's 8 fields (column pairs 8h + F; X3K's the fields 8h + F of the block's number, OFF = 8h) times
// their activation pairs.
template <int W, int OFF, int T, int... F>
inline void k_half(const __m256i* w, __m256i (&tmp)[T], const int32_t* const* xp, int h, std::integer_sequence<int, F...>) {
    auto one = [&](int f, __m256i wi) {
        for (int t = 0; t < T; t++) tmp[t] = _mm256_add_epi32(tmp[t], _mm256_madd_epi16(wi, _mm256_set1_epi32(xp[t][8 * h + f])));
    };
    (one(F, kfield<W, OFF + F>(w)), ...);
}

// -v with the sign flipped, as the scalar code's unary minus (0 - v would make -(+0) +0 where gguf has -0).
inline __m256 neg(__m256 v) { return _mm256_xor_ps(v, _mm256_set1_ps(-0.f)); }

// X6K, X3K, X2K: half h's fp32 scale rows of half group hf from the head, d * the sub-block's int8 scales (X2K:
// d * its 4-bit scales, and in mv its offset rows -dmin * its 4-bit mins); exact.
template <int FMT>
inline __m256 k6_scales(const uint8_t* head, int64_t b, int h, int hf, __m256* mv = nullptr) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(head + 16 * hf)));
    const __m128i bytes = _mm_loadl_epi64((const __m128i*)(head + 32 + 16 * (2 * (b % 8) + h) + 8 * hf));
    if constexpr (FMT == X2K) {
        const __m256i u = _mm256_cvtepu8_epi32(bytes), m4 = _mm256_set1_epi32(15);
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(head + X2K_DMIN + 16 * hf)));
        *mv = _mm256_mul_ps(neg(dmin), _mm256_cvtepi32_ps(_mm256_srli_epi32(u, 4)));
        return _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(u, m4)));
    }
    return _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)));
}

// X4K: rows 8 hf .. 8 hf + 7 of the 8 blocks' scale rows d * sc and offset rows -dmin * mn from a super-block
// head (common.h; isa_avx512.h's x4k_scales, half a group).
inline void x4k_scales(const uint8_t* head, int hf, __m256* sc, __m256* mn) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(head + 16 * hf)));
    const __m256 dmin = neg(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(head + 32 + 16 * hf))));
    const __m256i q0 = _mm256_loadu_si256((const __m256i*)(head + 64 + 32 * hf));
    const __m256i q1 = _mm256_loadu_si256((const __m256i*)(head + 128 + 32 * hf));
    const __m256i q2 = _mm256_loadu_si256((const __m256i*)(head + 192 + 32 * hf));
    const __m256i m6 = _mm256_set1_epi32(63), m4 = _mm256_set1_epi32(15), hi2 = _mm256_set1_epi32(0x30);
    for (int i = 0; i < 4; i++) {
        const __m128i c = _mm_cvtsi32_si128(8 * i), c2 = _mm_cvtsi32_si128(8 * i + 2), c4 = _mm_cvtsi32_si128(8 * i + 4);
        const __m256i s_lo = _mm256_and_si256(_mm256_srl_epi32(q0, c), m6);
        const __m256i m_lo = _mm256_and_si256(_mm256_srl_epi32(q1, c), m6);
        const __m256i s_hi = _mm256_or_si256(_mm256_and_si256(_mm256_srl_epi32(q2, c), m4), _mm256_and_si256(_mm256_srl_epi32(q0, c2), hi2));
        const __m256i m_hi = _mm256_or_si256(_mm256_and_si256(_mm256_srl_epi32(q2, c4), m4), _mm256_and_si256(_mm256_srl_epi32(q1, c2), hi2));
        sc[i] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(s_lo));
        mn[i] = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(m_lo));
        sc[i + 4] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(s_hi));
        mn[i + 4] = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(m_hi));
    }
}

// Decode's prefetch distance: four blocks ahead (X4K: 256-byte payloads, X5K: 320; X6K, X3K, X2K: below; the others
// whole blocks). It took a Q6_K output head out of cache from 8.7 to 7.0-7.6 ms (2 threads); further ahead measured
// no better.
constexpr int PF4 = 1024, PF5 = 1280;

// Decode (one activation row) of the formats with one scale per block: both half groups at once, so each block's
// 64-byte lines are read once, each activation pair broadcast once for two products, and the two halves' sums are
// independent chains. The same operations per half as group_rows below, so the same bits.
template <int FMT>
void group_row_pair(const PW& w, int64_t g, const XQ& x, int64_t t0, float* y) {
    const int64_t nb = w.nb, GB = GBLOCK_BYTES[FMT];
    const uint8_t* gp = w.data + g * nb * GB;
    const __m256i low = _mm256_set1_epi16(0x0F);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    __m256 ksc[2][8], kmn[2][8];
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = scales_at(gp, FMT, nb, b), *pl = payload_at(gp, FMT, nb, b);
        if (K4_HEAD[FMT] && b % 8 == 0) {
            x4k_scales(gb, 0, ksc[0], kmn[0]);
            x4k_scales(gb, 1, ksc[1], kmn[1]);
        }
        if constexpr (FMT == X4K)
            for (int c = 0; c < 4; c++) _mm_prefetch((const char*)(pl + PF4 + 64 * c), _MM_HINT_T0);
        else if constexpr (FMT == X5K)  // a payload and its plane: 5 lines a block
            for (int c = 0; c < 5; c++) _mm_prefetch((const char*)(pl + PF5 + 64 * c), _MM_HINT_T0);
        else  // X4, X4S, X5: a block's scales and payload together, four blocks ahead
            for (int c = 0; c < (GB + 63) / 64; c++) _mm_prefetch((const char*)(gb + 4 * GB + 64 * c), _MM_HINT_T0);
        const int32_t* xp = (const int32_t*)(x.q.data() + t0 * x.K + b * QK);
        __m256i tmp[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        // Nibble i of each 16-bit word is used in place, as 16^i times its value (masked, not shifted; the top
        // one shifted, not masked), into a sum per i taken back down by 16^i at the end of the block: exact, as
        // the sums are multiples of 16^i, and within int32 (4 * 2 * 7936 * 32767 < 2^31). 5-bit: the plane
        // shifted right by c holds each nibble's fifth bit just above it (common.h, x5_bit), ANDed and ORed in.
        const __m256i m1 = _mm256_set1_epi16(0xF0), m2 = _mm256_set1_epi16(0xF00);
        const __m256i h0 = _mm256_set1_epi16(0x10), h1 = _mm256_set1_epi16(0x100), h2 = _mm256_set1_epi16(0x1000);
        __m256i hb[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        if constexpr (FIFTH[FMT]) {
            hb[0] = _mm256_loadu_si256((const __m256i*)plane_at(pl));
            hb[1] = _mm256_loadu_si256((const __m256i*)(plane_at(pl) + 32));
        }
        __m256i s1[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}, s2[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int c = 0; c < 4; c++) {
            const __m256i v[2] = {_mm256_loadu_si256((const __m256i*)(pl + 64 * c)), _mm256_loadu_si256((const __m256i*)(pl + 64 * c + 32))};
            const __m256i x0 = _mm256_set1_epi32(xp[4 * c]), x1 = _mm256_set1_epi32(xp[4 * c + 1]);
            const __m256i x2 = _mm256_set1_epi32(xp[4 * c + 2]), x3 = _mm256_set1_epi32(xp[4 * c + 3]);
            for (int hf = 0; hf < 2; hf++) {
                __m256i w0 = _mm256_and_si256(v[hf], low), w1 = _mm256_and_si256(v[hf], m1);
                __m256i w2 = _mm256_and_si256(v[hf], m2), w3 = _mm256_srli_epi16(v[hf], 12);
                if constexpr (FIFTH[FMT]) {
                    const __m256i hc = _mm256_srli_epi16(hb[hf], c);
                    w0 = _mm256_or_si256(w0, _mm256_and_si256(hc, h0));
                    w1 = _mm256_or_si256(w1, _mm256_and_si256(hc, h1));
                    w2 = _mm256_or_si256(w2, _mm256_and_si256(hc, h2));
                    w3 = _mm256_or_si256(w3, _mm256_and_si256(_mm256_slli_epi16(hc, 4), h0));
                }
                tmp[hf] = _mm256_add_epi32(tmp[hf], _mm256_madd_epi16(w0, x0));
                s1[hf] = _mm256_add_epi32(s1[hf], _mm256_madd_epi16(w1, x1));
                s2[hf] = _mm256_add_epi32(s2[hf], _mm256_madd_epi16(w2, x2));
                tmp[hf] = _mm256_add_epi32(tmp[hf], _mm256_madd_epi16(w3, x3));
            }
        }
        for (int hf = 0; hf < 2; hf++)
            tmp[hf] = _mm256_add_epi32(tmp[hf], _mm256_add_epi32(_mm256_srai_epi32(s1[hf], 4), _mm256_srai_epi32(s2[hf], 8)));
        const int64_t xi = t0 * x.nb + b;
        for (int hf = 0; hf < 2; hf++) {
            const __m256 dv = K4_HEAD[FMT] ? ksc[hf][b % 8] : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(gb + 16 * hf)));
            if (BIAS[FMT]) tmp[hf] = _mm256_sub_epi32(tmp[hf], _mm256_set1_epi32(BIAS[FMT] * (x.hs[2 * xi] + x.hs[2 * xi + 1])));
            acc[hf] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tmp[hf]), _mm256_mul_ps(dv, _mm256_set1_ps(x.dx[xi])), acc[hf]);
            if (FMT != X4S) {
                const __m256 mv = K4_HEAD[FMT] ? kmn[hf][b % 8] : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(gb + 32 + 16 * hf)));
                acc[hf] = _mm256_fmadd_ps(mv, _mm256_set1_ps(x.sx[xi]), acc[hf]);
            }
        }
    }
    const int64_t valid = std::min<int64_t>(GR, w.rows - g * GR);
    float out[16];
    _mm256_storeu_ps(out, acc[0]);
    _mm256_storeu_ps(out + 8, acc[1]);
    std::copy(out, out + valid, y);
}

template <int W, int OFF, int... F>
inline void k_pair_half(const __m256i (&wk)[2][3], __m256i (&tmp)[2], const int32_t* xp, int h, std::integer_sequence<int, F...>) {
    auto one = [&](int f, __m256i w0, __m256i w1) {
        const __m256i xv = _mm256_set1_epi32(xp[8 * h + f]);
        tmp[0] = _mm256_add_epi32(tmp[0], _mm256_madd_epi16(w0, xv));
        tmp[1] = _mm256_add_epi32(tmp[1], _mm256_madd_epi16(w1, xv));
    };
    (one(F, kfield<W, OFF + F>(wk[0]), kfield<W, OFF + F>(wk[1])), ...);
}

// The same for the formats with a scale per 16-column half block (X6K, X3K, X2K).
template <int FMT>
void group_row_pair_halves(const PW& w, int64_t g, const XQ& x, int64_t t0, float* y) {
    const int64_t nb = w.nb, GB = GBLOCK_BYTES[FMT];
    const uint8_t* gp = w.data + g * nb * GB;
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = scales_at(gp, FMT, nb, b), *pl = payload_at(gp, FMT, nb, b);
        const int32_t* xp = (const int32_t*)(x.q.data() + t0 * x.K + b * QK);
        const int64_t xi = t0 * x.nb + b;
        constexpr int lines = FMT == X6K ? 6 : KWORDS<FMT>;  // a block's payload (384, 192, 128 bytes), 4 blocks on
        for (int c = 0; c < lines; c++) _mm_prefetch((const char*)(pl + 4 * 64 * lines + 64 * c), _MM_HINT_T0);
        for (int h = 0; h < 2; h++) {
            __m256i tmp[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
            __m256i wk[2][3];
            for (int hf = 0; hf < 2; hf++)
                for (int i = 0; i < KWORDS<FMT>; i++) wk[hf][i] = _mm256_loadu_si256((const __m256i*)(kwords<FMT>(pl, h) + 64 * i + 32 * hf));
            k_off<FMT>(h, [&](auto off) { k_pair_half<KBITS<FMT>, decltype(off)::value>(wk, tmp, xp, h, std::make_integer_sequence<int, 8>{}); });
            for (int hf = 0; hf < 2; hf++) {
                __m256 mv;
                const __m256 dv = k6_scales<FMT>(gb, b, h, hf, &mv);
                if (BIAS[FMT]) tmp[hf] = _mm256_sub_epi32(tmp[hf], _mm256_set1_epi32(BIAS[FMT] * x.hs[2 * xi + h]));
                acc[hf] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tmp[hf]), _mm256_mul_ps(dv, _mm256_set1_ps(x.dx[xi])), acc[hf]);
                if constexpr (HAS_OFFSET[FMT])  // X2K: the offsets times the half's activation sum
                    acc[hf] = _mm256_fmadd_ps(mv, _mm256_set1_ps(h == 0 ? x.sh[xi] : x.sx[xi] - x.sh[xi]), acc[hf]);
            }
        }
    }
    const int64_t valid = std::min<int64_t>(GR, w.rows - g * GR);
    float out[16];
    _mm256_storeu_ps(out, acc[0]);
    _mm256_storeu_ps(out + 8, acc[1]);
    std::copy(out, out + valid, y);
}

// y[t][0 .. 15] = rows g*16 .. g*16+15 of x[t0 + t] @ W^T for t < T: one group of 16 weight rows.
template <int FMT, int T>
void group_rows(const PW& w, int64_t g, const XQ& x, int64_t t0, float* y, int64_t ystride) {
    if constexpr (T == 1 && HALVES[FMT]) {
        group_row_pair_halves<FMT>(w, g, x, t0, y);
        return;
    } else if constexpr (T == 1 && FMT != X8) {  // (X8 paired measured slower: its widening is no cheaper)
        group_row_pair<FMT>(w, g, x, t0, y);
        return;
    }
    const int64_t nb = w.nb, GB = GBLOCK_BYTES[FMT];
    const uint8_t* gp = w.data + g * nb * GB;
    // The same products half a group (8 rows, one 256-bit register) at a time: vpmaddwd then vpaddd per pair.
    const __m256i low = _mm256_set1_epi16(0x0F);
    const int64_t valid = std::min<int64_t>(GR, w.rows - g * GR);
    for (int hf = 0; hf < 2 && hf * 8 < valid; hf++) {
        __m256 acc[T];
        for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
        __m256 ksc[8], kmn[8];  // X4K, X5K: the super-block's scale and offset rows
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *gb = scales_at(gp, FMT, nb, b), *pl = payload_at(gp, FMT, nb, b);
            if (K4_HEAD[FMT] && b % 8 == 0) x4k_scales(gb, hf, ksc, kmn);
            if (FMT == X4K && hf == 0)  // as isa_avx512.h: four blocks ahead (the second half reads from cache)
                for (int c = 0; c < 4; c++) _mm_prefetch((const char*)(pl + PF4 + 64 * c), _MM_HINT_T0);
            if (FMT == X5K && hf == 0)
                for (int c = 0; c < 5; c++) _mm_prefetch((const char*)(pl + PF5 + 64 * c), _MM_HINT_T0);
            const int32_t* xp[T];
            for (int t = 0; t < T; t++) xp[t] = (const int32_t*)(x.q.data() + (t0 + t) * x.K + b * QK);
            __m256i tmp[T];
            for (int t = 0; t < T; t++) tmp[t] = _mm256_setzero_si256();
            if constexpr (HALVES[FMT]) {  // X6K/X3K/X2K: each 16-column half scaled apart
                for (int h = 0; h < 2; h++) {
                    __m256i wk[3];
                    for (int i = 0; i < KWORDS<FMT>; i++) wk[i] = _mm256_loadu_si256((const __m256i*)(kwords<FMT>(pl, h) + 64 * i + 32 * hf));
                    k_off<FMT>(h, [&](auto off) { k_half<KBITS<FMT>, decltype(off)::value, T>(wk, tmp, xp, h, std::make_integer_sequence<int, 8>{}); });
                    __m256 mv;
                    const __m256 dv = k6_scales<FMT>(gb, b, h, hf, &mv);
                    for (int t = 0; t < T; t++) {
                        const int64_t xi = (t0 + t) * x.nb + b;
                        if (BIAS[FMT]) tmp[t] = _mm256_sub_epi32(tmp[t], _mm256_set1_epi32(BIAS[FMT] * x.hs[2 * xi + h]));
                        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tmp[t]), _mm256_mul_ps(dv, _mm256_set1_ps(x.dx[xi])), acc[t]);
                        tmp[t] = _mm256_setzero_si256();
                    }
                    if constexpr (HAS_OFFSET[FMT]) {
                        for (int t = 0; t < T; t++) {
                            const int64_t xi = (t0 + t) * x.nb + b;
                            acc[t] = _mm256_fmadd_ps(mv, _mm256_set1_ps(h == 0 ? x.sh[xi] : x.sx[xi] - x.sh[xi]), acc[t]);
                        }
                    }
                }
                continue;
            }
            if (FMT != X8) {
                __m256i hb = _mm256_setzero_si256();
                if (FIFTH[FMT]) hb = _mm256_loadu_si256((const __m256i*)(plane_at(pl) + 32 * hf));
                for (int c = 0; c < 4; c++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i*)(pl + 64 * c + 32 * hf));
                    for (int i = 0; i < 4; i++) {
                        __m256i wi = _mm256_and_si256(_mm256_srli_epi16(v, 4 * i), low);
                        if (FIFTH[FMT]) wi = _mm256_or_si256(wi, fifth_bits(hb, 4 * c + i));
                        for (int t = 0; t < T; t++)
                            tmp[t] = _mm256_add_epi32(tmp[t], _mm256_madd_epi16(wi, _mm256_set1_epi32(xp[t][4 * c + i])));
                    }
                }
            } else {
                for (int p = 0; p < 16; p++) {
                    const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(gb + 32 + 32 * p + 16 * hf)));
                    for (int t = 0; t < T; t++) tmp[t] = _mm256_add_epi32(tmp[t], _mm256_madd_epi16(wv, _mm256_set1_epi32(xp[t][p])));
                }
            }
            const __m256 dv = K4_HEAD[FMT] ? ksc[b % 8] : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(gb + 16 * hf)));
            for (int t = 0; t < T; t++) {
                const int64_t xi = (t0 + t) * x.nb + b;
                if (BIAS[FMT]) tmp[t] = _mm256_sub_epi32(tmp[t], _mm256_set1_epi32(BIAS[FMT] * (x.hs[2 * xi] + x.hs[2 * xi + 1])));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tmp[t]), _mm256_mul_ps(dv, _mm256_set1_ps(x.dx[xi])), acc[t]);
            }
            if (FMT != X8 && FMT != X4S) {
                const __m256 mv = K4_HEAD[FMT] ? kmn[b % 8] : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(gb + 32 + 16 * hf)));
                for (int t = 0; t < T; t++) acc[t] = _mm256_fmadd_ps(mv, _mm256_set1_ps(x.sx[(t0 + t) * x.nb + b]), acc[t]);
            }
        }
        const int64_t n = std::min<int64_t>(8, valid - hf * 8);
        for (int t = 0; t < T; t++) {
            float out[8];
            _mm256_storeu_ps(out, acc[t]);
            std::copy(out, out + n, y + t * ystride + 8 * hf);
        }
    }
}

// Prefill (two tiles of activation rows or more): each half group's weights are unpacked once into the int8 values
// the products multiply (less the format's bias, so no bias is taken off the sums), and its scale and offset rows
// into fp32, and every tile of rows then reads them from L1 (24 KB a half group at K = 2048). The nibble shifts and
// masks, the 6-bit field assembly and the scale rows are paid once per half group instead of once per tile. The
// integer sums are the same (sum (u - bias) x = sum u x - bias sum x, exactly), and the fp32 operations the same, in
// the same order, as group_rows: bit for bit its results.
#define TINKER_UNPACKED_TILES
constexpr int UNPACKED_TILE = TILE_ROWS;  // rows per pass (6 and 7 measured slower on Zen 3)
constexpr int UBLOCK = 16 * 16 + 4 * 32;  // bytes per block: 16 column pairs' 16 int8 weights, then dv[2] and mv[2]

template <int W, int OFF, int... F>
inline void k_store(const __m256i* w, __m256i* out, std::integer_sequence<int, F...>) {
    ((out[F] = kfield<W, OFF + F>(w)), ...);
}

template <int FMT>
void unpack_half(const PW& w, int64_t g, int hf, uint8_t* buf) {
    const int64_t nb = w.nb;
    const uint8_t* gp = w.data + g * nb * GBLOCK_BYTES[FMT];
    const __m256i low = _mm256_set1_epi16(0x0F), bias = _mm256_set1_epi16(BIAS[FMT]);
    __m256 ksc[8], kmn[8];
    __m256i wi[16];
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = scales_at(gp, FMT, nb, b), *pl = payload_at(gp, FMT, nb, b);
        uint8_t* wb = buf + b * UBLOCK;
        float* fb = (float*)(wb + 256);
        if constexpr (HALVES[FMT]) {
            for (int h = 0; h < 2; h++) {
                __m256i wk[3];
                for (int i = 0; i < KWORDS<FMT>; i++) wk[i] = _mm256_loadu_si256((const __m256i*)(kwords<FMT>(pl, h) + 64 * i + 32 * hf));
                k_off<FMT>(h, [&](auto off) { k_store<KBITS<FMT>, decltype(off)::value>(wk, wi + 8 * h, std::make_integer_sequence<int, 8>{}); });
                __m256 mv;
                _mm256_storeu_ps(fb + 8 * h, k6_scales<FMT>(gb, b, h, hf, &mv));
                if constexpr (HAS_OFFSET[FMT]) _mm256_storeu_ps(fb + 16 + 8 * h, mv);
            }
        } else {
            if constexpr (K4_HEAD[FMT])
                if (b % 8 == 0) x4k_scales(gb, hf, ksc, kmn);
            if constexpr (FMT != X8) {
                __m256i hb = _mm256_setzero_si256();
                if constexpr (FIFTH[FMT]) hb = _mm256_loadu_si256((const __m256i*)(plane_at(pl) + 32 * hf));
                for (int c = 0; c < 4; c++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i*)(pl + 64 * c + 32 * hf));
                    for (int i = 0; i < 4; i++) {
                        wi[4 * c + i] = _mm256_and_si256(_mm256_srli_epi16(v, 4 * i), low);
                        if constexpr (FIFTH[FMT]) wi[4 * c + i] = _mm256_or_si256(wi[4 * c + i], fifth_bits(hb, 4 * c + i));
                    }
                }
            } else {
                for (int p = 0; p < 16; p++) wi[p] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(gb + 32 + 32 * p + 16 * hf)));
            }
            _mm256_storeu_ps(fb, K4_HEAD[FMT] ? ksc[b % 8] : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(gb + 16 * hf))));
            if constexpr (FMT != X8 && FMT != X4S)
                _mm256_storeu_ps(fb + 16, K4_HEAD[FMT] ? kmn[b % 8] : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(gb + 32 + 16 * hf))));
        }
        for (int p = 0; p < 16; p += 2) {  // pairs p and p+1 as 16 int8 each, in lane order
            const __m256i packed = _mm256_packs_epi16(_mm256_sub_epi16(wi[p], bias), _mm256_sub_epi16(wi[p + 1], bias));
            _mm256_storeu_si256((__m256i*)(wb + 16 * p), _mm256_permute4x64_epi64(packed, 0xD8));
        }
    }
}

// y[t][0 .. n-1] = the half group's n rows of x[t0 + t] @ W^T for t < T, from its unpacked buffer.
template <int FMT, int T>
void unpacked_rows(const uint8_t* buf, int64_t nb, const XQ& x, int64_t t0, float* y, int64_t ystride, int64_t n) {
    __m256 acc[T];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* wb = buf + b * UBLOCK;
        const float* fb = (const float*)(wb + 256);
        const int32_t* xp[T];
        for (int t = 0; t < T; t++) xp[t] = (const int32_t*)(x.q.data() + (t0 + t) * x.K + b * QK);
        __m256i tmp[T];
        for (int t = 0; t < T; t++) tmp[t] = _mm256_setzero_si256();
        if constexpr (HALVES[FMT]) {
            for (int h = 0; h < 2; h++) {
                for (int p = 8 * h; p < 8 * h + 8; p++) {
                    const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wb + 16 * p)));
                    for (int t = 0; t < T; t++) tmp[t] = _mm256_add_epi32(tmp[t], _mm256_madd_epi16(wv, _mm256_set1_epi32(xp[t][p])));
                }
                const __m256 dv = _mm256_loadu_ps(fb + 8 * h);
                for (int t = 0; t < T; t++) {
                    const int64_t xi = (t0 + t) * x.nb + b;
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tmp[t]), _mm256_mul_ps(dv, _mm256_set1_ps(x.dx[xi])), acc[t]);
                    tmp[t] = _mm256_setzero_si256();
                }
                if constexpr (HAS_OFFSET[FMT]) {  // X2K
                    const __m256 mv = _mm256_loadu_ps(fb + 16 + 8 * h);
                    for (int t = 0; t < T; t++) {
                        const int64_t xi = (t0 + t) * x.nb + b;
                        acc[t] = _mm256_fmadd_ps(mv, _mm256_set1_ps(h == 0 ? x.sh[xi] : x.sx[xi] - x.sh[xi]), acc[t]);
                    }
                }
            }
            continue;
        }
        for (int p = 0; p < 16; p++) {
            const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wb + 16 * p)));
            for (int t = 0; t < T; t++) tmp[t] = _mm256_add_epi32(tmp[t], _mm256_madd_epi16(wv, _mm256_set1_epi32(xp[t][p])));
        }
        const __m256 dv = _mm256_loadu_ps(fb);
        for (int t = 0; t < T; t++) {
            const int64_t xi = (t0 + t) * x.nb + b;
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tmp[t]), _mm256_mul_ps(dv, _mm256_set1_ps(x.dx[xi])), acc[t]);
        }
        if constexpr (FMT != X8 && FMT != X4S) {
            const __m256 mv = _mm256_loadu_ps(fb + 16);
            for (int t = 0; t < T; t++) acc[t] = _mm256_fmadd_ps(mv, _mm256_set1_ps(x.sx[(t0 + t) * x.nb + b]), acc[t]);
        }
    }
    for (int t = 0; t < T; t++) {
        float out[8];
        _mm256_storeu_ps(out, acc[t]);
        std::copy(out, out + n, y + t * ystride);
    }
}

using UnpackedFn = void (*)(const uint8_t*, int64_t, const XQ&, int64_t, float*, int64_t, int64_t);

template <int FMT, int... N>
constexpr std::array<UnpackedFn, sizeof...(N)> unpacked_table(std::integer_sequence<int, N...>) {
    return {&unpacked_rows<FMT, N + 1>...};
}

// Rows [t0, t1) of x times group g of W into y (row t0, column g*16; ystride between rows), a half group at a time.
template <int FMT>
void unpacked_group_fmt(const PW& w, int64_t g, const XQ& x, int64_t t0, int64_t t1, float* y, int64_t ystride) {
    static constexpr auto table = unpacked_table<FMT>(std::make_integer_sequence<int, UNPACKED_TILE>{});
    thread_local std::vector<uint8_t> buf;
    if ((int64_t)buf.size() < w.nb * UBLOCK) buf.resize(w.nb * UBLOCK);
    const int64_t valid = std::min<int64_t>(GR, w.rows - g * GR);
    for (int hf = 0; hf < 2 && hf * 8 < valid; hf++) {
        unpack_half<FMT>(w, g, hf, buf.data());
        const int64_t n = std::min<int64_t>(8, valid - hf * 8);
        for (int64_t t = t0; t < t1; t += UNPACKED_TILE) {
            const int64_t m = std::min<int64_t>(UNPACKED_TILE, t1 - t);
            table[m - 1](buf.data(), w.nb, x, t, y + (t - t0) * ystride + 8 * hf, ystride, n);
        }
    }
}

inline void unpacked_group(const PW& w, int64_t g, const XQ& x, int64_t t0, int64_t t1, float* y, int64_t ystride) {
    with_fmt(w.fmt, [&](auto f) { unpacked_group_fmt<decltype(f)::value>(w, g, x, t0, t1, y, ystride); });
}

// All 16 rows of group g as floats into out (16, K) (quantized.cpp: dequantize_packed; exports, fp32 loads and
// QLoRA read every weight this way): each half group unpacked as for prefill, then each value d * q (+ m) from its
// int8 integer and fp32 scale rows, the same operations as packed_dequant_rows (common.h) and so its bits, 10-20x
// faster than looking each value up in the packed layout.
#define TINKER_ISA_DEQUANT
template <int FMT>
void packed_dequant_group_fmt(const PW& w, int64_t g, float* out) {
    thread_local std::vector<uint8_t> buf;
    if ((int64_t)buf.size() < w.nb * UBLOCK) buf.resize(w.nb * UBLOCK);
    for (int hf = 0; hf < 2; hf++) {
        unpack_half<FMT>(w, g, hf, buf.data());
        for (int64_t b = 0; b < w.nb; b++) {
            const int8_t* wb = (const int8_t*)(buf.data() + b * UBLOCK);
            const float* fb = (const float*)(wb + 256);  // scale rows (per half for HALVES), then offset rows
            for (int j = 0; j < 8; j++) {
                float* o = out + (8 * hf + j) * w.K + b * QK;
                for (int k = 0; k < QK; k++) {  // column k = 2p + e: byte 2j + e of pair p's 16
                    const int h = HALVES[FMT] ? k / 16 : 0;
                    const float d = fb[8 * h + j], q = (float)wb[16 * (k / 2) + 2 * j + k % 2];
                    o[k] = HAS_OFFSET[FMT] ? d * q + fb[16 + 8 * h + j] : d * q;
                }
            }
        }
    }
}

inline void packed_dequant_group(const PW& w, int64_t g, float* out) {
    with_fmt(w.fmt, [&](auto f) { packed_dequant_group_fmt<decltype(f)::value>(w, g, out); });
}

// ----- Vector math: the SwiGLU/GELU epilogues, the softmax loops and attention's register tiles -----------------
// The same operations as isa_avx512.h's, 8 floats at a time (its 16-wide tiles as two 256-bit halves): exp, SiLU,
// GELU and SwiGLU give its bits; the sums (dot, softmax) add in another order. Before these, the AVX2 build ran
// isa_plain.h's scalar loops (std::exp is not vectorized without -ffast-math).

// exp over 8 floats, as isa_avx512.h's exp16: 2^k * e^r with k = round(x / ln 2), e^r from Cephes' degree-6
// polynomial. AVX2 has no scalef: 2^k (k in -128 .. 128 after the clamp) is applied as two exact powers of two
// 2^(k >> 1) and 2^(k - (k >> 1)), each a normal float, so only the last product rounds, as scalef does.
inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i ki = _mm256_cvtps_epi32(k), k1 = _mm256_srai_epi32(ki, 1), k2 = _mm256_sub_epi32(ki, k1);
    const __m256i e127 = _mm256_set1_epi32(127);
    const __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, e127), 23));
    const __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, e127), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
}

inline __m256 sigmoid8(__m256 g) {
    const __m256 one = _mm256_set1_ps(1.f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}

inline __m256 silu_mul8(__m256 g, __m256 u) { return _mm256_mul_ps(_mm256_mul_ps(g, sigmoid8(g)), u); }

// GELU-tanh as g sigmoid(2a), a = sqrt(2 / pi) (g + 0.044715 g^3) (isa_avx512.h's gelu_mul16).
inline __m256 gelu_mul8(__m256 g, __m256 u) {
    const __m256 g3 = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
    const __m256 a2 = _mm256_mul_ps(_mm256_fmadd_ps(g3, _mm256_set1_ps(0.044715f), g), _mm256_set1_ps(1.5957691216057308f));
    return _mm256_mul_ps(_mm256_mul_ps(g, sigmoid8(a2)), u);
}

// o[0 .. valid) = silu(g) * u (gelu_mul_group: GELU) for one group's 16 outputs; g and u hold 16 floats.
template <bool GELU>
inline void act_mul_group(const float* g, const float* u, float* o, int64_t valid) {
    auto f = [](__m256 a, __m256 b) { return GELU ? gelu_mul8(a, b) : silu_mul8(a, b); };
    const __m256 h0 = f(_mm256_loadu_ps(g), _mm256_loadu_ps(u)), h1 = f(_mm256_loadu_ps(g + 8), _mm256_loadu_ps(u + 8));
    if (valid == GR) {
        _mm256_storeu_ps(o, h0);
        _mm256_storeu_ps(o + 8, h1);
        return;
    }
    float tmp[16];
    _mm256_storeu_ps(tmp, h0);
    _mm256_storeu_ps(tmp + 8, h1);
    std::copy(tmp, tmp + valid, o);
}

inline void silu_mul_group(const float* g, const float* u, float* o, int64_t valid) { act_mul_group<false>(g, u, o, valid); }
inline void gelu_mul_group(const float* g, const float* u, float* o, int64_t valid) { act_mul_group<true>(g, u, o, valid); }

inline float hsum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

inline float hmax8(__m256 v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

// The vector parts of loops whose scalar tails live with their callers: whole 8-float chunks from i.
inline float dot_vec(const float* a, const float* b, int64_t n, int64_t& i) {
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return hsum8(acc);
}

inline void axpy_vec(float a, const float* x, float* y, int64_t n, int64_t& i) {
    const __m256 av = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
}

inline float max_vec(const float* s, int64_t n, int64_t& j) {  // softmax: the row's maximum
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= n; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + j));
    return hmax8(m8);
}

inline float exp_sum_vec(float* s, int64_t n, float mx, int64_t& j) {  // softmax: s = exp(s - mx), returns the sum
    __m256 d8 = _mm256_setzero_ps();
    const __m256 mxv = _mm256_set1_ps(mx);
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mxv));
        _mm256_storeu_ps(s + j, e);
        d8 = _mm256_add_ps(d8, e);
    }
    return hsum8(d8);
}

inline void swiglu_fwd_vec(const float* gp, const float* up_, float* op, int64_t i1, int64_t& i) {
    for (; i + 8 <= i1; i += 8) _mm256_storeu_ps(op + i, silu_mul8(_mm256_loadu_ps(gp + i), _mm256_loadu_ps(up_ + i)));
}

inline void swiglu_bwd_vec(const float* dp, const float* gp, const float* up_, float* dgp, float* dup, int64_t i1,
                           int64_t& i) {
    const __m256 one = _mm256_set1_ps(1.f);
    for (; i + 8 <= i1; i += 8) {
        const __m256 g = _mm256_loadu_ps(gp + i), d = _mm256_loadu_ps(dp + i), s = sigmoid8(g);
        _mm256_storeu_ps(dup + i, _mm256_mul_ps(d, _mm256_mul_ps(g, s)));
        const __m256 t = _mm256_fmadd_ps(g, _mm256_sub_ps(one, s), one);  // d * up * s * (1 + g * (1 - s))
        _mm256_storeu_ps(dgp + i, _mm256_mul_ps(_mm256_mul_ps(d, _mm256_loadu_ps(up_ + i)), _mm256_mul_ps(s, t)));
    }
}

// Attention's register tiles (attention.cpp; isa_avx512.h explains the layouts), a 16-key or 16-column unit as two
// 256-bit halves. scores_tile: s[r][0..15] = scale * q_r . k_j for 16 keys j, from a (hd, 16) tile of transposed keys.
template <int NR>
inline void scores_tile(const float* q, int64_t qs, const float* kt, int64_t ks, int64_t hd, float scale, float* s) {
    __m256 acc[NR][2];
    for (int r = 0; r < NR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d++) {
        const __m256 k0 = _mm256_loadu_ps(kt + d * 16), k1 = _mm256_loadu_ps(kt + d * 16 + 8);
        for (int r = 0; r < NR; r++) {
            const __m256 qv = _mm256_set1_ps(q[r * qs + d]);
            acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
        }
    }
    const __m256 sv = _mm256_set1_ps(scale);
    for (int r = 0; r < NR; r++) {
        _mm256_storeu_ps(s + r * ks, _mm256_mul_ps(acc[r][0], sv));
        _mm256_storeu_ps(s + r * ks + 8, _mm256_mul_ps(acc[r][1], sv));
    }
}

// pv_tile: o[r][0 .. 16*ND) = sum_j p[r][j] * v_j[0 .. 16*ND) over keys j < n, one 16-column unit at a time (the
// probabilities re-read from L1 per unit; all of them at once would spill).
template <int NR, int ND>
inline void pv_tile(const float* p, int64_t ps, const float* v, int64_t vs, int64_t n, float* o, int64_t os) {
    for (int c = 0; c < ND; c++) {
        __m256 acc[NR][2];
        for (int r = 0; r < NR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            const __m256 v0 = _mm256_loadu_ps(v + j * vs + 16 * c), v1 = _mm256_loadu_ps(v + j * vs + 16 * c + 8);
            for (int r = 0; r < NR; r++) {
                const __m256 pv = _mm256_set1_ps(p[r * ps + j]);
                acc[r][0] = _mm256_fmadd_ps(pv, v0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(pv, v1, acc[r][1]);
            }
        }
        for (int r = 0; r < NR; r++) {
            _mm256_storeu_ps(o + r * os + 16 * c, acc[r][0]);
            _mm256_storeu_ps(o + r * os + 16 * c + 8, acc[r][1]);
        }
    }
}

}  // namespace

#define TINKER_ISA_VECTOR_MATH  // isa_plain.h: the vector math above replaces its loops
#define TINKER_ISA_PRODUCTS  // isa_plain.h: the products above replace its group_rows
#include "isa_plain.h"
