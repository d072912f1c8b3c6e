// AVX-512 inner loops (with VNNI and BW): the build for CPUs that have them runs every vector path, the
// quantized products on vpdpwssd, attention, softmax and SwiGLU. The same functions as isa_plain.h (which lists
// them); common.h includes this header when the compiler targets AVX512F, AVX512VNNI and AVX512BW.

#pragma once

#include <immintrin.h>

#include "common.h"

namespace {

constexpr const char* ISA = "avx512-vnni";
constexpr int TILE_ROWS = 12;  // activation rows per pass over a group: 2 of the 32 zmm registers per row

// A block's 32 values as floats (d * u + m): values 0..15 in lo, 16..31 in hi.
template <int TYPE>
inline void expand_floats(const uint8_t* blk, __m512& lo, __m512& hi) {
    const __m512 d = _mm512_set1_ps(load_half(blk));
    if (TYPE == Q8_0) {
        const __m256i qv = _mm256_loadu_si256((const __m256i*)(blk + 2));
        lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(qv))));
        hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(qv, 1))));
    } else if (TYPE == Q4_0) {  // d * (u - 8), as gguf: the zeros keep d's sign
        const __m128i low = _mm_set1_epi8(0x0F);
        const __m128i qs = _mm_loadu_si128((const __m128i*)(blk + 2));
        const __m512i eight = _mm512_set1_epi32(8);
        lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(qs, low)), eight)));
        hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(qs, 4), low)), eight)));
    } else {
        const __m128i low = _mm_set1_epi8(0x0F);
        const __m128i qs = _mm_loadu_si128((const __m128i*)(blk + 4));
        const __m512 m = _mm512_set1_ps(load_half(blk + 2));
        lo = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(qs, low))), m);
        hi = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(qs, 4), low))), m);
    }
}

// Block `blk` of a GGUF row as 32 floats (Q5_1 through the scalar block_floats: expand_floats has no 5-bit path).
template <int TYPE>
inline void dequant_block(const uint8_t* blk, float* o) {
    if constexpr (TYPE != Q5_1) {
        __m512 lo, hi;
        expand_floats<TYPE>(blk, lo, hi);
        _mm512_storeu_ps(o, lo);
        _mm512_storeu_ps(o + 16, hi);
        return;
    }
    block_floats(blk, TYPE, o);
}

// exp over 16 floats: 2^k * e^r with k = round(x / ln 2) and |r| <= ln(2) / 2, e^r from Cephes' degree-6
// polynomial (about 1 ulp); scalef applies 2^k. std::exp is not vectorized without -ffast-math.
inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.3762626647949f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, k);
}

inline __m512 sigmoid16(__m512 g) {
    const __m512 one = _mm512_set1_ps(1.f);
    return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

inline __m512 silu_mul16(__m512 g, __m512 u) { return _mm512_mul_ps(_mm512_mul_ps(g, sigmoid16(g)), u); }

// GELU-tanh (Gemma's MLP), 0.5 g (1 + tanh(a)) with a = sqrt(2 / pi) (g + 0.044715 g^3), written as g sigmoid(2a).
inline __m512 gelu_mul16(__m512 g, __m512 u) {
    const __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
    const __m512 a2 = _mm512_mul_ps(_mm512_fmadd_ps(g3, _mm512_set1_ps(0.044715f), g), _mm512_set1_ps(1.5957691216057308f));
    return _mm512_mul_ps(_mm512_mul_ps(g, sigmoid16(a2)), u);
}

// Column pair p's fifth bit (plane bit x5_bit(p)) moved to bit 4 of every 16-bit lane (the value 16 or 0).
inline __m512i fifth_bits(__m512i plane, int p) {
    const int q = x5_bit(p);
    const __m512i moved = q >= 4 ? _mm512_srli_epi16(plane, (unsigned)(q - 4)) : _mm512_slli_epi16(plane, (unsigned)(4 - q));
    return _mm512_and_si512(moved, _mm512_set1_epi16(0x10));
}

// X6K, X3K, X2K: field F of W bits in the words w[0..2] read as one 48-bit (X2K: w[0..1], 32-bit) number
// (common.h: x6_place, F = 0..7 of a half's words; xk_place, F = 0..15 of a block's), as int16 values
// 0 .. 2^W - 1: one or two ops (a field that straddles two words: one funnel shift) and an AND.
template <int W, int F>
inline __m512i kfield(const __m512i* w) {
    constexpr int bit = W * F, lo = bit / 16, sh = bit % 16;
    const __m512i m = _mm512_set1_epi16((1 << W) - 1);
    if constexpr (sh + W > 16) {
#ifdef __AVX512VBMI2__
        return _mm512_and_si512(_mm512_shldi_epi16(w[lo + 1], w[lo], 16 - sh), m);
#else  // (high word << (16 - sh) | low word >> sh) & 63 as one ternary op
        return _mm512_ternarylogic_epi32(_mm512_slli_epi16(w[lo + 1], 16 - sh), _mm512_srli_epi16(w[lo], sh), m, 0xA8);
#endif
    } else if constexpr (sh + W == 16) {
        return _mm512_srli_epi16(w[lo], sh);
    } else if constexpr (sh == 0) {
        return _mm512_and_si512(w[lo], m);
    } else {
        return _mm512_and_si512(_mm512_srli_epi16(w[lo], sh), m);
    }
}


// tmp[t][f % NC] += the 8 fields OFF + f of w (columns pairs 8h .. 8h+7) times their activation pairs xp[t][8h + f].
template <int W, int OFF, int T, int NC, int... F>
inline void k_half(const __m512i* w, __m512i (&tmp)[T][NC], const int32_t* const* xp, int h,
                   std::integer_sequence<int, F...>) {
    auto one = [&](auto f, __m512i wi) {
        for (int t = 0; t < T; t++)
            tmp[t][f % NC] = _mm512_dpwssd_epi32(tmp[t][f % NC], wi, _mm512_set1_epi32(xp[t][8 * h + f]));
    };
    (one(F, kfield<W, OFF + F>(w)), ...);
}

// -v with the sign flipped, as the scalar code's unary minus (0 - v would make -(+0) +0 where gguf has -0).
inline __m512 neg(__m512 v) { return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32((int)0x80000000))); }

// X4K: the 8 blocks' scale rows d * sc and offset rows -dmin * mn (16 rows each) from a super-block head
// (common.h): the 6-bit fields of the three dword vectors, as k4_scale_min reads them, times d and -dmin.
inline void x4k_scales(const uint8_t* head, __m512* sc, __m512* mn) {
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)head));
    const __m512 dmin = neg(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(head + 32))));
    const __m512i q0 = _mm512_loadu_si512((const void*)(head + 64)), q1 = _mm512_loadu_si512((const void*)(head + 128));
    const __m512i q2 = _mm512_loadu_si512((const void*)(head + 192));
    const __m512i m6 = _mm512_set1_epi32(63), m4 = _mm512_set1_epi32(15), hi2 = _mm512_set1_epi32(0x30);
    for (int i = 0; i < 4; i++) {  // byte i of each dword: sub-blocks i and i + 4
        const __m512i s_lo = _mm512_and_si512(_mm512_srli_epi32(q0, 8 * i), m6);
        const __m512i m_lo = _mm512_and_si512(_mm512_srli_epi32(q1, 8 * i), m6);
        // (low 4 bits from q2) | (the top 2 bits of q0's / q1's byte i, at bits 4-5)
        const __m512i s_hi = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi32(q2, 8 * i), m4),
                                                       _mm512_srli_epi32(q0, 8 * i + 2), hi2, 0xF8);
        const __m512i m_hi = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi32(q2, 8 * i + 4), m4),
                                                       _mm512_srli_epi32(q1, 8 * i + 2), hi2, 0xF8);
        sc[i] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(s_lo));
        mn[i] = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(m_lo));
        sc[i + 4] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(s_hi));
        mn[i + 4] = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(m_hi));
    }
}

// All 16 rows of group g as floats into out (16, K), vectorized (QLoRA dequantizes every weight twice a step).
// Each int16 pair vector holds rows j = 0..15 at columns (2p, 2p+1): scaled in 32-bit lanes, then each row's
// pair goes to its place with a 64-bit scatter.
void packed_dequant_group(const PW& w, int64_t g, float* out) {
    if (HALVES[w.fmt]) {  // X6K/X3K/X2K (K-quants with 16-value sub-blocks): the scalar loop
        packed_dequant_rows(w, g * GR, std::min<int64_t>(w.rows, g * GR + GR), out);
        return;
    }
    const int64_t GB = GBLOCK_BYTES[w.fmt];
    const __m512i pairs_lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i pairs_hi = _mm512_add_epi32(pairs_lo, _mm512_set1_epi32(8));
    const __m512i rows_lo = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i idx_lo = _mm512_mullo_epi64(rows_lo, _mm512_set1_epi64(w.K / 2));  // in 8-byte units
    const __m512i idx_hi = _mm512_add_epi64(idx_lo, _mm512_set1_epi64(8 * w.K / 2));
    const __m512i low = _mm512_set1_epi16(0x0F);
    __m512 ksc[8], kmn[8];  // X4K, X5K: the super-block's scale and offset rows
    for (int64_t b = 0; b < w.nb; b++) {
        const uint8_t* gp = w.data + g * w.nb * GB;
        const uint8_t *gb = scales_at(gp, w.fmt, w.nb, b), *pl = payload_at(gp, w.fmt, w.nb, b);
        if (K4_HEAD[w.fmt] && b % 8 == 0) x4k_scales(gb, ksc, kmn);
        const __m512 dv = K4_HEAD[w.fmt] ? ksc[b % 8] : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)gb));
        // d q + m (X4S: d (u - 8), no offset: a zero keeps d's sign, as gguf's)
        const __m512 mv = !HAS_OFFSET[w.fmt] ? _mm512_setzero_ps()
                          : K4_HEAD[w.fmt] ? kmn[b % 8]
                                         : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(gb + 32)));
        const __m512 d_lo = _mm512_permutexvar_ps(pairs_lo, dv), d_hi = _mm512_permutexvar_ps(pairs_hi, dv);
        const __m512 m_lo = _mm512_permutexvar_ps(pairs_lo, mv), m_hi = _mm512_permutexvar_ps(pairs_hi, mv);
        auto put = [&](__m512i words, int p) {  // 32 int16: rows 0..15 x columns (2p, 2p+1)
            __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(words)));
            __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(words, 1)));
            lo = HAS_OFFSET[w.fmt] ? _mm512_fmadd_ps(lo, d_lo, m_lo) : _mm512_mul_ps(lo, d_lo);
            hi = HAS_OFFSET[w.fmt] ? _mm512_fmadd_ps(hi, d_hi, m_hi) : _mm512_mul_ps(hi, d_hi);
            double* base = (double*)(out + b * QK + 2 * p);
            _mm512_i64scatter_pd(base, idx_lo, _mm512_castps_pd(lo), 8);
            _mm512_i64scatter_pd(base, idx_hi, _mm512_castps_pd(hi), 8);
        };
        if (w.fmt != X8) {
            const __m512i hb = FIFTH[w.fmt] ? _mm512_loadu_si512((const void*)plane_at(pl)) : _mm512_setzero_si512();
            for (int c = 0; c < 4; c++) {
                const __m512i v = _mm512_loadu_si512((const void*)(pl + 64 * c));
                for (int i = 0; i < 4; i++) {
                    __m512i wi = _mm512_and_si512(_mm512_srli_epi16(v, 4 * i), low);
                    if (FIFTH[w.fmt]) wi = _mm512_or_si512(wi, fifth_bits(hb, 4 * c + i));
                    if (w.fmt == X4S) wi = _mm512_sub_epi16(wi, _mm512_set1_epi16(BIAS[X4S]));
                    put(wi, 4 * c + i);
                }
            }
        } else {
            for (int p = 0; p < 16; p++) put(_mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(gb + 32 + 32 * p))), p);
        }
    }
}

// One 32-value block of activations rounded to int16 (quantize_acts): writes qb, returns amax and sum(qb).
inline void round_block(const float* xb, int16_t* qb, float& amax, int32_t& s) {
    const __m512 a = _mm512_loadu_ps(xb), c = _mm512_loadu_ps(xb + 16);
    amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
    const float inv = amax > 0.f ? 32767.f / amax : 0.f;
    const __m512 iv = _mm512_set1_ps(inv);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, iv)), qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, iv));
    _mm256_storeu_si256((__m256i*)qb, _mm512_cvtsepi32_epi16(qa));
    _mm256_storeu_si256((__m256i*)(qb + 16), _mm512_cvtsepi32_epi16(qc));
    s = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qc));
}

// y[t][0 .. 15] = rows g*16 .. g*16+15 of x[t0 + t] @ W^T for t < T: one group of 16 weight rows.
template <int FMT, int T>
void group_rows(const PW& w, int64_t g, const XQ& x, int64_t t0, float* y, int64_t ystride) {
    const int64_t nb = w.nb, GB = GBLOCK_BYTES[FMT];
    const uint8_t* gp = w.data + g * nb * GB;
    __m512 acc[T];
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi16(0x0F);
    __m512 ksc[8], kmn[8];  // X4K, X5K: the super-block's scale and offset rows, made once per 8 blocks
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = scales_at(gp, FMT, nb, b), *pl = payload_at(gp, FMT, nb, b);
        if (K4_HEAD[FMT] && b % 8 == 0) x4k_scales(gb, ksc, kmn);
        __m512 d6 = _mm512_setzero_ps(), dmin6 = _mm512_setzero_ps();  // X6K, X3K, X2K: the super-block's d (-dmin)
        if constexpr (K6_HEAD[FMT]) d6 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)gb));
        if constexpr (FMT == X2K) dmin6 = neg(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(gb + X2K_DMIN))));
        // X4K: the hardware prefetcher alone left one row product out of cache at 2.3x X4S's time for the same
        // bytes (bench/matvec_bench.py); four blocks ahead it is within 10%.
        if (FMT == X4K)
            for (int c = 0; c < 4; c++) _mm_prefetch((const char*)(pl + 1024 + 64 * c), _MM_HINT_T0);
        if (FMT == X5K)  // (its payloads and planes: 320 bytes a block)
            for (int c = 0; c < 5; c++) _mm_prefetch((const char*)(pl + 1280 + 64 * c), _MM_HINT_T0);
        if (FMT == X3K || FMT == X2K)  // (192 and 128 bytes a block)
            for (int c = 0; c < KWORDS<FMT>; c++) _mm_prefetch((const char*)(pl + 4 * 64 * KWORDS<FMT> + 64 * c), _MM_HINT_T0);
        const int32_t* xp[T];
        for (int t = 0; t < T; t++) xp[t] = (const int32_t*)(x.q.data() + (t0 + t) * x.K + b * QK);
        // NC independent sums per row: a vpdpwssd waits ~5 cycles for its accumulator, so with few rows one
        // chain per row would leave the two VNNI ports idle.
        constexpr int NC = T == 1 ? 4 : T == 2 ? 2 : 1;
        __m512i tmp[T][NC];
        for (int t = 0; t < T; t++)
            for (int c = 0; c < NC; c++) tmp[t][c] = _mm512_setzero_si512();
        if constexpr (HALVES[FMT]) {  // X6K/X3K/X2K: each 16-column half summed, then scaled, apart
            for (int h = 0; h < 2; h++) {
                // the half's three words of 6-bit fields (X3K: the block's three, 3-bit; X2K: its two, 2-bit)
                __m512i wk[3];
                for (int i = 0; i < KWORDS<FMT>; i++) wk[i] = _mm512_loadu_si512((const void*)(kwords<FMT>(pl, h) + 64 * i));
                k_off<FMT>(h, [&](auto off) { k_half<KBITS<FMT>, decltype(off)::value, T, NC>(wk, tmp, xp, h, std::make_integer_sequence<int, 8>{}); });
                // d * the sub-block's int8 scales (X2K: 4-bit scales, and -dmin * its 4-bit mins); exact, made here,
                // not once per super-block as X4K's: one multiply a half block is cheaper than keeping 16 rows
                const __m128i bytes = _mm_loadu_si128((const __m128i*)(gb + 32 + 16 * (2 * (b % 8) + h)));
                __m512 dv, mv = _mm512_setzero_ps();
                if constexpr (FMT == X2K) {
                    const __m512i u = _mm512_cvtepu8_epi32(bytes);
                    dv = _mm512_mul_ps(d6, _mm512_cvtepi32_ps(_mm512_and_si512(u, _mm512_set1_epi32(15))));
                    mv = _mm512_mul_ps(dmin6, _mm512_cvtepi32_ps(_mm512_srli_epi32(u, 4)));
                } else {
                    dv = _mm512_mul_ps(d6, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)));
                }
                for (int t = 0; t < T; t++) {
                    for (int c = 1; c < NC; c++) tmp[t][0] = _mm512_add_epi32(tmp[t][0], tmp[t][c]);
                    const int64_t xi = (t0 + t) * x.nb + b;
                    if (BIAS[FMT])  // the stored integers are value + BIAS: take BIAS * the half's activation sum off
                        tmp[t][0] = _mm512_sub_epi32(tmp[t][0], _mm512_set1_epi32(BIAS[FMT] * x.hs[2 * xi + h]));
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(tmp[t][0]), _mm512_mul_ps(dv, _mm512_set1_ps(x.dx[xi])), acc[t]);
                    for (int c = 0; c < NC; c++) tmp[t][c] = _mm512_setzero_si512();
                }
                if constexpr (HAS_OFFSET[FMT]) {  // X2K: the offsets times the half's activation sum
                    for (int t = 0; t < T; t++) {
                        const int64_t xi = (t0 + t) * x.nb + b;
                        const float s = h == 0 ? x.sh[xi] : x.sx[xi] - x.sh[xi];
                        acc[t] = _mm512_fmadd_ps(mv, _mm512_set1_ps(s), acc[t]);
                    }
                }
            }
            continue;
        }
        if (FMT != X8) {
            __m512i hb = _mm512_setzero_si512();  // 5-bit: the plane of fifth bits
            if (FIFTH[FMT]) hb = _mm512_loadu_si512((const void*)plane_at(pl));
            for (int c = 0; c < 4; c++) {
                const __m512i v = _mm512_loadu_si512((const void*)(pl + 64 * c));
                for (int i = 0; i < 4; i++) {  // nibble i: the int16 pairs of columns 2(4c+i), 2(4c+i)+1
                    __m512i wi;
                    if constexpr (FIFTH[FMT])  // ((v >> 4i) & 0x0F) | (fifth bit << 4): the AND and OR as one ternary op
                        wi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4 * i), low, fifth_bits(hb, 4 * c + i), 0xEA);
                    else
                        wi = i == 3 ? _mm512_srli_epi16(v, 12) : _mm512_and_si512(_mm512_srli_epi16(v, 4 * i), low);
                    for (int t = 0; t < T; t++)
                        tmp[t][i % NC] = _mm512_dpwssd_epi32(tmp[t][i % NC], wi, _mm512_set1_epi32(xp[t][4 * c + i]));
                }
            }
        } else {
            for (int p = 0; p < 16; p++) {
                const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(gb + 32 + 32 * p)));
                for (int t = 0; t < T; t++) tmp[t][p % NC] = _mm512_dpwssd_epi32(tmp[t][p % NC], wv, _mm512_set1_epi32(xp[t][p]));
            }
        }
        for (int t = 0; t < T; t++) {
            for (int c = 1; c < NC; c++) tmp[t][0] = _mm512_add_epi32(tmp[t][0], tmp[t][c]);
            if (BIAS[FMT]) {  // X4S: take 8 * the block's activation sum off
                const int64_t xi = (t0 + t) * x.nb + b;
                tmp[t][0] = _mm512_sub_epi32(tmp[t][0], _mm512_set1_epi32(BIAS[FMT] * (x.hs[2 * xi] + x.hs[2 * xi + 1])));
            }
        }
        const __m512 dv = K4_HEAD[FMT] ? ksc[b % 8] : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)gb));
        for (int t = 0; t < T; t++) {
            const int64_t xi = (t0 + t) * x.nb + b;
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(tmp[t][0]), _mm512_mul_ps(dv, _mm512_set1_ps(x.dx[xi])), acc[t]);
        }
        if (FMT != X8 && FMT != X4S) {
            const __m512 mv = K4_HEAD[FMT] ? kmn[b % 8] : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(gb + 32)));
            for (int t = 0; t < T; t++) acc[t] = _mm512_fmadd_ps(mv, _mm512_set1_ps(x.sx[(t0 + t) * x.nb + b]), acc[t]);
        }
    }
    const int64_t valid = std::min<int64_t>(GR, w.rows - g * GR);
    const __mmask16 mask = (__mmask16)((1u << valid) - 1);
    for (int t = 0; t < T; t++) _mm512_mask_storeu_ps(y + t * ystride, mask, acc[t]);
}

// o[0 .. valid) = silu(g) * u for one group's 16 outputs (matmul_swiglu).
inline void silu_mul_group(const float* g, const float* u, float* o, int64_t valid) {
    const __m512 h = silu_mul16(_mm512_loadu_ps(g), _mm512_loadu_ps(u));
    _mm512_mask_storeu_ps(o, (__mmask16)((1u << valid) - 1), h);
}

inline void gelu_mul_group(const float* g, const float* u, float* o, int64_t valid) {
    const __m512 h = gelu_mul16(_mm512_loadu_ps(g), _mm512_loadu_ps(u));
    _mm512_mask_storeu_ps(o, (__mmask16)((1u << valid) - 1), h);
}

// The vector parts of loops whose scalar tails live with their callers: each runs whole 16-float chunks from i,
// leaves i past them and returns its partial result.
inline float dot_vec(const float* a, const float* b, int64_t n, int64_t& i) {
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    return _mm512_reduce_add_ps(acc);
}

inline void axpy_vec(float a, const float* x, float* y, int64_t n, int64_t& i) {
    const __m512 av = _mm512_set1_ps(a);
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
}

inline float max_vec(const float* s, int64_t n, int64_t& j) {  // softmax: the row's maximum
    __m512 m16 = _mm512_set1_ps(-INFINITY);
    for (; j + 16 <= n; j += 16) m16 = _mm512_max_ps(m16, _mm512_loadu_ps(s + j));
    return _mm512_reduce_max_ps(m16);
}

inline float exp_sum_vec(float* s, int64_t n, float mx, int64_t& j) {  // softmax: s = exp(s - mx), returns the sum
    __m512 d16 = _mm512_setzero_ps();
    const __m512 mxv = _mm512_set1_ps(mx);
    for (; j + 16 <= n; j += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), mxv));
        _mm512_storeu_ps(s + j, e);
        d16 = _mm512_add_ps(d16, e);
    }
    return _mm512_reduce_add_ps(d16);
}

inline void swiglu_fwd_vec(const float* gp, const float* up_, float* op, int64_t i1, int64_t& i) {
        for (; i + 16 <= i1; i += 16) {
            const __m512 g = _mm512_loadu_ps(gp + i);
            _mm512_storeu_ps(op + i, silu_mul16(g, _mm512_loadu_ps(up_ + i)));
        }
}

inline void swiglu_bwd_vec(const float* dp, const float* gp, const float* up_, float* dgp, float* dup, int64_t i1,
                           int64_t& i) {
        const __m512 one = _mm512_set1_ps(1.f);
        for (; i + 16 <= i1; i += 16) {
            const __m512 g = _mm512_loadu_ps(gp + i), d = _mm512_loadu_ps(dp + i), s = sigmoid16(g);
            _mm512_storeu_ps(dup + i, _mm512_mul_ps(d, _mm512_mul_ps(g, s)));
            // d * up * s * (1 + g * (1 - s))
            const __m512 t = _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one);
            _mm512_storeu_ps(dgp + i, _mm512_mul_ps(_mm512_mul_ps(d, _mm512_loadu_ps(up_ + i)), _mm512_mul_ps(s, t)));
        }
}

// Attention register tiles (attention.cpp). scores_tile: s[r][0..15] = scale * q_r . k_j for 16 keys j, from a
// (hd, 16) tile of transposed keys kt[d * 16 + j] (contiguous: a strided (hd, S) layout would map every row to the
// same L1 sets).
template <int NR>
inline void scores_tile(const float* q, int64_t qs, const float* kt, int64_t ks, int64_t hd, float scale, float* s) {
    __m512 acc[NR];
    for (int r = 0; r < NR; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < hd; d++) {
        const __m512 kv = _mm512_loadu_ps(kt + d * 16);
        for (int r = 0; r < NR; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * qs + d]), kv, acc[r]);
    }
    for (int r = 0; r < NR; r++) _mm512_storeu_ps(s + r * ks, _mm512_mul_ps(acc[r], _mm512_set1_ps(scale)));
}

// scores_tile2: the same for 32 keys (two (hd, 16) tiles): each broadcast query value feeds two products.
template <int NR>
inline void scores_tile2(const float* q, int64_t qs, const float* kt, int64_t ks, int64_t hd, float scale, float* s) {
    __m512 acc[NR][2];
    for (int r = 0; r < NR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const float* kt2 = kt + hd * 16;
    for (int64_t d = 0; d < hd; d++) {
        const __m512 k0 = _mm512_loadu_ps(kt + d * 16), k1 = _mm512_loadu_ps(kt2 + d * 16);
        for (int r = 0; r < NR; r++) {
            const __m512 qv = _mm512_set1_ps(q[r * qs + d]);
            acc[r][0] = _mm512_fmadd_ps(qv, k0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(qv, k1, acc[r][1]);
        }
    }
    for (int r = 0; r < NR; r++) {
        _mm512_storeu_ps(s + r * ks, _mm512_mul_ps(acc[r][0], _mm512_set1_ps(scale)));
        _mm512_storeu_ps(s + r * ks + 16, _mm512_mul_ps(acc[r][1], _mm512_set1_ps(scale)));
    }
}

// pv_tile: o[r][0 .. 16*ND) = sum_j p[r][j] * v_j[0 .. 16*ND) over keys j < n.
template <int NR, int ND>
inline void pv_tile(const float* p, int64_t ps, const float* v, int64_t vs, int64_t n, float* o, int64_t os) {
    __m512 acc[NR][ND];
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < ND; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++)
        for (int c = 0; c < ND; c++) {
            const __m512 vv = _mm512_loadu_ps(v + j * vs + 16 * c);
            for (int r = 0; r < NR; r++) acc[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(p[r * ps + j]), vv, acc[r][c]);
        }
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < ND; c++) _mm512_storeu_ps(o + r * os + 16 * c, acc[r][c]);
}

}  // namespace
