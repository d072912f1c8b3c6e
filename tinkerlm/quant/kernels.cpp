// Quantized CPU kernels for tinkerlm: products of activations with weights in ggml block formats (Q8_0, Q4_0,
// Q4_1, read in place from a memory-mapped GGUF), and a fused Llama-family decode step.
//
// GGUF weights arrive as rows of 32-value blocks (an fp16 scale d, for Q4_1 an fp16 offset m, 32 integers). At
// load they are repacked, losslessly, into groups of 16 rows (see "Packed weights" below) so that the products
// run on AVX512-VNNI integer dot products with int16 activation blocks and each group's 16 outputs land in one
// register. Not llama.cpp's 8-bit activations: small models' hidden states carry outliers near 10^4, and 8-bit
// blocks then cost ~1% error per projection, enough to change greedy answers; int16 blocks keep 16 bits.
//
// The decode step runs a whole Llama-family forward for one new token per sequence in one call, so a token costs
// the weights' memory traffic rather than thousands of PyTorch dispatches.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define TINKER_AVX512 1
#endif

namespace {

constexpr int QK = 32;  // values per block
enum QType { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2, Q5_1 = 3 };
constexpr int64_t BLOCK_BYTES[] = {34, 18, 20, 24};

#ifdef __F16C__
#include <immintrin.h>
inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
#else
inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
#endif
inline float load_half(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return half_to_float(h); }

struct QW {  // a weight matrix in blocks
    const uint8_t* data;
    int type;
    int64_t rows, K, nb, row_bytes;
};

QW as_qw(const at::Tensor& data, int64_t type) {
    TORCH_CHECK(data.dim() == 2 && data.stride(1) == 1 && data.scalar_type() == at::kByte, "weight blocks must be uint8 rows");
    TORCH_CHECK(type >= 0 && type <= 3, "unknown block type ", type);
    QW w;
    w.data = data.data_ptr<uint8_t>();
    w.type = (int)type;
    w.rows = data.size(0);
    w.row_bytes = data.stride(0);
    w.nb = data.size(1) / BLOCK_BYTES[type];
    w.K = w.nb * QK;
    TORCH_CHECK(data.size(1) == w.nb * BLOCK_BYTES[type], "row bytes are not whole blocks");
    return w;
}

// The 32 values of block `blk` as floats.
inline void block_floats(const uint8_t* blk, int type, float* out) {
    const float d = load_half(blk);
    if (type == Q8_0) {
        for (int k = 0; k < QK; k++) out[k] = d * (float)(int8_t)blk[2 + k];
        return;
    }
    if (type == Q5_1) {  // fp16 d, fp16 m, 32 fifth bits, 16 bytes of low nibbles
        uint32_t qh;
        std::memcpy(&qh, blk + 4, 4);
        const float m = load_half(blk + 2);
        for (int k = 0; k < QK; k++) {
            const int u = (k < 16 ? blk[8 + k] & 0x0F : blk[8 + k - 16] >> 4) | (((qh >> k) & 1) << 4);
            out[k] = d * (float)u + m;
        }
        return;
    }
    const uint8_t* qs = blk + (type == Q4_1 ? 4 : 2);
    const float m = type == Q4_1 ? load_half(blk + 2) : -8.f * d;
    for (int k = 0; k < 16; k++) {
        out[k] = d * (float)(qs[k] & 0x0F) + m;
        out[k + 16] = d * (float)(qs[k] >> 4) + m;
    }
}

#ifdef TINKER_AVX512
// A block's 32 values as floats (d * u + m): values 0..15 in lo, 16..31 in hi.
template <int TYPE>
inline void expand_floats(const uint8_t* blk, __m512& lo, __m512& hi) {
    const __m512 d = _mm512_set1_ps(load_half(blk));
    if (TYPE == Q8_0) {
        const __m256i qv = _mm256_loadu_si256((const __m256i*)(blk + 2));
        lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(qv))));
        hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(qv, 1))));
    } else {
        const __m128i low = _mm_set1_epi8(0x0F);
        const __m128i qs = _mm_loadu_si128((const __m128i*)(blk + (TYPE == Q4_1 ? 4 : 2)));
        const __m512 m = TYPE == Q4_1 ? _mm512_set1_ps(load_half(blk + 2)) : _mm512_mul_ps(d, _mm512_set1_ps(-8.f));
        lo = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(qs, low))), m);
        hi = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(qs, 4), low))), m);
    }
}

#endif

template <int TYPE>
void dequant_rows_t(const QW& w, int64_t r0, int64_t r1, float* out) {
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t* row = w.data + r * w.row_bytes;
        for (int64_t b = 0; b < w.nb; b++) {
            float* o = out + (r - r0) * w.K + b * QK;
#ifdef TINKER_AVX512
            if constexpr (TYPE != Q5_1) {
                __m512 lo, hi;
                expand_floats<TYPE>(row + b * BLOCK_BYTES[TYPE], lo, hi);
                _mm512_storeu_ps(o, lo);
                _mm512_storeu_ps(o + 16, hi);
                continue;
            }
#endif
            block_floats(row + b * BLOCK_BYTES[TYPE], TYPE, o);
        }
    }
}

void dequant_rows(const QW& w, int64_t r0, int64_t r1, float* out) {
    switch (w.type) {
        case Q8_0: dequant_rows_t<Q8_0>(w, r0, r1, out); break;
        case Q4_0: dequant_rows_t<Q4_0>(w, r0, r1, out); break;
        case Q5_1: dequant_rows_t<Q5_1>(w, r0, r1, out); break;
        default: dequant_rows_t<Q4_1>(w, r0, r1, out); break;
    }
}

#ifdef TINKER_AVX512
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
#endif

// ---- Packed weights: the layout the products read --------------------------------------------------------------
// At load a block matrix is repacked into groups of 16 rows. For each group and each 32-column block the group
// holds 16 fp16 scales d, (4-bit only) 16 fp16 offsets m, then the 16 x 32 integers arranged so that one vector
// load gives, in each 32-bit lane j, row j's integers for two neighbouring columns (2p, 2p+1):
//   4-bit (Q4_0 as m = -8d, Q4_1): 4 chunks of 64 bytes; in chunk c, 16-bit word 2j+e holds in its nibble i the
//          integer of row j, column 2(4c+i)+e. One load, three shifts and three ANDs give 4 vectors of int16 pairs.
//   8-bit (Q8_0): 16 chunks of 32 bytes; chunk p, byte 2j+e = row j, column 2p+e (sign-extended to int16 pairs).
//   5-bit (Q5_1): the 4-bit layout for the low four bits, then a 64-byte plane of fifth bits: 16-bit word 2j+e,
//          bit p = row j, column 2p+e; two shifts, an AND and a ternary-logic OR add it to each int16 vector.
// Activations are rounded per 32-value block to int16 with their own scale (amax / 32767): relative error
// 2^-16 of the block's largest value, finer than bfloat16 for the values that matter and safe for the outlier
// channels (values near 10^4) that 8-bit activations lose. Products run on AVX512-VNNI's vpdpwssd, 32
// multiply-adds an instruction at two instructions a cycle, so the 16 rows of a group come out in the 16 lanes of
// one register with no horizontal sums; the fp32 scales are applied once per block:
//   y[row] += d * dx * sum_k(u * xq)  +  m * sx       (sx = dx * sum_k(xq), the block's activation sum)
constexpr int GR = 16;  // rows per group
enum Fmt { X4 = 0, X8 = 1, X5 = 2 };
constexpr int64_t GBLOCK_BYTES[] = {64 + 256, 32 + 512, 64 + 256 + 64};

struct PW {  // a packed weight matrix
    const uint8_t* data;
    int fmt;
    int64_t rows, K, nb, groups;
};

PW as_pw(const at::Tensor& data, int64_t fmt, int64_t rows) {
    TORCH_CHECK(data.dim() == 2 && data.is_contiguous() && data.scalar_type() == at::kByte, "packed weight must be contiguous uint8");
    TORCH_CHECK(fmt == X4 || fmt == X8 || fmt == X5, "unknown packed format ", fmt);
    PW w;
    w.data = data.data_ptr<uint8_t>();
    w.fmt = (int)fmt;
    w.rows = rows;
    w.groups = data.size(0);
    w.nb = data.size(1) / GBLOCK_BYTES[fmt];
    w.K = w.nb * QK;
    TORCH_CHECK(w.groups == (rows + GR - 1) / GR && data.size(1) == w.nb * GBLOCK_BYTES[fmt], "packed weight has the wrong size");
    return w;
}

// Where row j, column k of a group-block lives: 4-bit (byte offset, nibble shift) inside the payload.
inline void x4_place(int j, int k, int& byte, int& shift) {
    const int p = k / 2, e = k % 2, c = p / 4, i = p % 4;
    byte = c * 64 + (2 * j + e) * 2 + i / 2;
    shift = (i % 2) * 4;
}
inline int x8_place(int j, int k) { return (k / 2) * 32 + 2 * j + k % 2; }
// 5-bit: the fifth bit's (byte offset inside the plane, bit).
inline void x5_place(int j, int k, int& byte, int& bit) {
    const int word = 2 * j + k % 2, p = k / 2;
    byte = word * 2 + p / 8;
    bit = p % 8;
}
constexpr int X5_PLANE = 64 + 256;  // where the fifth bits start in a 5-bit group block

#ifdef TINKER_AVX512
// Bit p of every 16-bit lane of the fifth-bit plane, moved to bit 4 (the value 16 or 0).
inline __m512i fifth_bits(__m512i plane, int p) {
    const __m512i moved = p >= 4 ? _mm512_srli_epi16(plane, (unsigned)(p - 4)) : _mm512_slli_epi16(plane, (unsigned)(4 - p));
    return _mm512_and_si512(moved, _mm512_set1_epi16(0x10));
}
#endif
#if defined(__AVX2__)
inline __m256i fifth_bits(__m256i plane, int p) {
    const __m256i moved = p >= 4 ? _mm256_srli_epi16(plane, p - 4) : _mm256_slli_epi16(plane, 4 - p);
    return _mm256_and_si256(moved, _mm256_set1_epi16(0x10));
}
#endif

at::Tensor pack(at::Tensor data, int64_t type) {
    QW w = as_qw(data, type);
    const int fmt = type == Q8_0 ? X8 : type == Q5_1 ? X5 : X4;
    const int64_t groups = (w.rows + GR - 1) / GR, GB = GBLOCK_BYTES[fmt];
    auto out = at::zeros({groups, w.nb * GB}, at::kByte);
    uint8_t* o = out.data_ptr<uint8_t>();
    at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; g++)
            for (int64_t b = 0; b < w.nb; b++) {
                uint8_t* gb = o + (g * w.nb + b) * GB;
                for (int j = 0; j < GR && g * GR + j < w.rows; j++) {
                    const uint8_t* blk = w.data + (g * GR + j) * w.row_bytes + b * BLOCK_BYTES[type];
                    std::memcpy(gb + 2 * j, blk, 2);  // d, bit for bit
                    if (fmt == X8) {  // the two bytes of columns (2p, 2p+1) go to chunk p, word j
                        for (int p = 0; p < 16; p++) std::memcpy(gb + 32 + 32 * p + 2 * j, blk + 2 + 2 * p, 2);
                        continue;
                    }
                    if (type == Q4_1 || type == Q5_1) {
                        std::memcpy(gb + 32 + 2 * j, blk + 2, 2);
                    } else {  // Q4_0: d * (u - 8) = d * u + m with m = -8d (exact in fp16)
                        const at::Half m = at::Half(-8.f * load_half(blk));
                        std::memcpy(gb + 32 + 2 * j, &m, 2);
                    }
                    const uint8_t* qs = blk + (type == Q5_1 ? 8 : type == Q4_1 ? 4 : 2);
                    uint8_t u[QK];
                    for (int k = 0; k < 16; k++) {
                        u[k] = qs[k] & 0x0F;
                        u[k + 16] = qs[k] >> 4;
                    }
                    // chunk c, word 2j+e: nibble i holds column 2(4c+i)+e (see x4_place)
                    for (int c = 0; c < 4; c++)
                        for (int e = 0; e < 2; e++) {
                            const uint16_t word = (uint16_t)(u[8 * c + e] | (u[8 * c + 2 + e] << 4) |
                                                             (u[8 * c + 4 + e] << 8) | (u[8 * c + 6 + e] << 12));
                            std::memcpy(gb + 64 + 64 * c + 2 * (2 * j + e), &word, 2);
                        }
                    if (type == Q5_1) {  // word 2j+e of the plane: bit p = fifth bit of column 2p+e (see x5_place)
                        uint32_t qh;
                        std::memcpy(&qh, blk + 4, 4);
                        for (int e = 0; e < 2; e++) {
                            uint16_t word = 0;
                            for (int p = 0; p < 16; p++) word |= (uint16_t)(((qh >> (2 * p + e)) & 1) << p);
                            std::memcpy(gb + X5_PLANE + 2 * (2 * j + e), &word, 2);
                        }
                    }
                }
            }
    });
    return out;
}

// Row r's value at column k of block b, as integer and scales (for unpacking and embedding lookups).
inline void packed_entry(const PW& w, int64_t r, int64_t b, int k, int& q, float& d, float& m) {
    const int64_t GB = GBLOCK_BYTES[w.fmt];
    const uint8_t* gb = w.data + ((r / GR) * w.nb + b) * GB;
    const int j = (int)(r % GR);
    d = load_half(gb + 2 * j);
    if (w.fmt == X8) {
        q = (int8_t)gb[32 + x8_place(j, k)];
        m = 0.f;
        return;
    }
    int byte, shift;
    x4_place(j, k, byte, shift);
    q = (gb[64 + byte] >> shift) & 0x0F;
    if (w.fmt == X5) {
        int hbyte, bit;
        x5_place(j, k, hbyte, bit);
        q |= ((gb[X5_PLANE + hbyte] >> bit) & 1) << 4;
    }
    m = load_half(gb + 32 + 2 * j);
}

void packed_dequant_rows(const PW& w, int64_t r0, int64_t r1, float* out) {
    for (int64_t r = r0; r < r1; r++)
        for (int64_t b = 0; b < w.nb; b++)
            for (int k = 0; k < QK; k++) {
                int q; float d, m;
                packed_entry(w, r, b, k, q, d, m);
                out[(r - r0) * w.K + b * QK + k] = d * (float)q + m;
            }
}

// All 16 rows of group g as floats into out (16, K), vectorized (QLoRA dequantizes every weight twice a step).
// Each int16 pair vector holds rows j = 0..15 at columns (2p, 2p+1): scaled in 32-bit lanes, then each row's
// pair goes to its place with a 64-bit scatter.
void packed_dequant_group(const PW& w, int64_t g, float* out) {
#ifdef TINKER_AVX512
    const int64_t GB = GBLOCK_BYTES[w.fmt];
    const __m512i pairs_lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i pairs_hi = _mm512_add_epi32(pairs_lo, _mm512_set1_epi32(8));
    const __m512i rows_lo = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i idx_lo = _mm512_mullo_epi64(rows_lo, _mm512_set1_epi64(w.K / 2));  // in 8-byte units
    const __m512i idx_hi = _mm512_add_epi64(idx_lo, _mm512_set1_epi64(8 * w.K / 2));
    const __m512i low = _mm512_set1_epi16(0x0F);
    for (int64_t b = 0; b < w.nb; b++) {
        const uint8_t* gb = w.data + (g * w.nb + b) * GB;
        const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)gb));
        const __m512 mv = w.fmt != X8 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(gb + 32))) : _mm512_setzero_ps();
        const __m512 d_lo = _mm512_permutexvar_ps(pairs_lo, dv), d_hi = _mm512_permutexvar_ps(pairs_hi, dv);
        const __m512 m_lo = _mm512_permutexvar_ps(pairs_lo, mv), m_hi = _mm512_permutexvar_ps(pairs_hi, mv);
        auto put = [&](__m512i words, int p) {  // 32 int16: rows 0..15 x columns (2p, 2p+1)
            const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(words))), d_lo, m_lo);
            const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(words, 1))), d_hi, m_hi);
            double* base = (double*)(out + b * QK + 2 * p);
            _mm512_i64scatter_pd(base, idx_lo, _mm512_castps_pd(lo), 8);
            _mm512_i64scatter_pd(base, idx_hi, _mm512_castps_pd(hi), 8);
        };
        if (w.fmt != X8) {
            const __m512i hb = _mm512_loadu_si512((const void*)(gb + X5_PLANE));
            for (int c = 0; c < 4; c++) {
                const __m512i v = _mm512_loadu_si512((const void*)(gb + 64 + 64 * c));
                for (int i = 0; i < 4; i++) {
                    __m512i wi = _mm512_and_si512(_mm512_srli_epi16(v, 4 * i), low);
                    if (w.fmt == X5) wi = _mm512_or_si512(wi, fifth_bits(hb, 4 * c + i));
                    put(wi, 4 * c + i);
                }
            }
        } else {
            for (int p = 0; p < 16; p++) put(_mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(gb + 32 + 32 * p))), p);
        }
    }
#else
    packed_dequant_rows(w, g * GR, g * GR + GR, out);
#endif
}

// The inverse of pack: GGUF blocks of `type` again, bit for bit.
at::Tensor unpack(at::Tensor data, int64_t fmt, int64_t rows, int64_t type) {
    PW w = as_pw(data, fmt, rows);
    auto out = at::zeros({rows, w.nb * BLOCK_BYTES[type]}, at::kByte);
    uint8_t* o = out.data_ptr<uint8_t>();
    const int64_t GB = GBLOCK_BYTES[w.fmt];
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < w.nb; b++) {
            uint8_t* blk = o + r * w.nb * BLOCK_BYTES[type] + b * BLOCK_BYTES[type];
            const uint8_t* gb = w.data + ((r / GR) * w.nb + b) * GB;
            const int j = (int)(r % GR);
            std::memcpy(blk, gb + 2 * j, 2);
            if (type == Q4_1 || type == Q5_1) std::memcpy(blk + 2, gb + 32 + 2 * j, 2);
            uint8_t* qs = blk + (type == Q5_1 ? 8 : type == Q4_1 ? 4 : 2);
            uint32_t qh = 0;
            for (int k = 0; k < QK; k++) {
                int q; float d, m;
                packed_entry(w, r, b, k, q, d, m);
                if (type == Q5_1) qh |= (uint32_t)(q >> 4) << k;
                if (type == Q8_0) qs[k] = (uint8_t)(int8_t)q;
                else if (k < 16) qs[k] |= (uint8_t)(q & 0x0F);
                else qs[k - 16] |= (uint8_t)((q & 0x0F) << 4);
            }
            if (type == Q5_1) std::memcpy(blk + 4, &qh, 4);
        }
    return out;
}

struct XQ {  // activations as int16 blocks: T rows of K, with a scale and a sum per 32-value block
    std::vector<int16_t> q;
    std::vector<float> dx, sx;
    int64_t T = 0, K = 0, nb = 0;
};

// Round each 32-value block to int16: dx = amax / 32767, q = round_half_even(x * (32767 / amax)).
void quantize_acts(const float* x, int64_t T, int64_t K, XQ& out) {
    out.T = T; out.K = K; out.nb = K / QK;
    out.q.resize(T * K);
    out.dx.resize(T * out.nb);
    out.sx.resize(T * out.nb);
    auto block = [&](int64_t i) {  // i: block index over all rows
        const float* xb = x + i * QK;
        int16_t* qb = out.q.data() + i * QK;
#ifdef TINKER_AVX512
        const __m512 a = _mm512_loadu_ps(xb), c = _mm512_loadu_ps(xb + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
        const float inv = amax > 0.f ? 32767.f / amax : 0.f;
        const __m512 iv = _mm512_set1_ps(inv);
        const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, iv)), qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, iv));
        _mm256_storeu_si256((__m256i*)qb, _mm512_cvtsepi32_epi16(qa));
        _mm256_storeu_si256((__m256i*)(qb + 16), _mm512_cvtsepi32_epi16(qc));
        const int32_t s = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qc));
#else
        float amax = 0.f;
        for (int k = 0; k < QK; k++) amax = std::max(amax, std::fabs(xb[k]));
        const float inv = amax > 0.f ? 32767.f / amax : 0.f;
        int32_t s = 0;
        for (int k = 0; k < QK; k++) { qb[k] = (int16_t)std::nearbyint(xb[k] * inv); s += qb[k]; }
#endif
        out.dx[i] = amax / 32767.f;
        out.sx[i] = out.dx[i] * (float)s;
    };
    const int64_t n = T * out.nb;
    if (n < 1024) { for (int64_t i = 0; i < n; i++) block(i); return; }
    at::parallel_for(0, n, 256, [&](int64_t i0, int64_t i1) { for (int64_t i = i0; i < i1; i++) block(i); });
}

// y[t][0 .. 15] = rows g*16 .. g*16+15 of x[t0 + t] @ W^T for t < T: one group of 16 weight rows.
template <int FMT, int T>
void group_rows(const PW& w, int64_t g, const XQ& x, int64_t t0, float* y, int64_t ystride) {
    const int64_t nb = w.nb, GB = GBLOCK_BYTES[FMT];
    const uint8_t* gp = w.data + g * nb * GB;
#ifdef TINKER_AVX512
    __m512 acc[T];
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi16(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* gb = gp + b * GB;
        const int32_t* xp[T];
        for (int t = 0; t < T; t++) xp[t] = (const int32_t*)(x.q.data() + (t0 + t) * x.K + b * QK);
        // NC independent sums per row: a vpdpwssd waits ~5 cycles for its accumulator, so with few rows one
        // chain per row would leave the two VNNI ports idle.
        constexpr int NC = T == 1 ? 4 : T == 2 ? 2 : 1;
        __m512i tmp[T][NC];
        for (int t = 0; t < T; t++)
            for (int c = 0; c < NC; c++) tmp[t][c] = _mm512_setzero_si512();
        if (FMT != X8) {
            __m512i hb = _mm512_setzero_si512();  // 5-bit: the plane of fifth bits
            if (FMT == X5) hb = _mm512_loadu_si512((const void*)(gb + X5_PLANE));
            for (int c = 0; c < 4; c++) {
                const __m512i v = _mm512_loadu_si512((const void*)(gb + 64 + 64 * c));
                for (int i = 0; i < 4; i++) {  // nibble i: the int16 pairs of columns 2(4c+i), 2(4c+i)+1
                    __m512i wi;
                    if (FMT == X5)  // ((v >> 4i) & 0x0F) | (fifth bit << 4): the AND and OR as one ternary op
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
        for (int t = 0; t < T; t++)
            for (int c = 1; c < NC; c++) tmp[t][0] = _mm512_add_epi32(tmp[t][0], tmp[t][c]);
        const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)gb));
        for (int t = 0; t < T; t++) {
            const int64_t xi = (t0 + t) * x.nb + b;
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(tmp[t][0]), _mm512_mul_ps(dv, _mm512_set1_ps(x.dx[xi])), acc[t]);
        }
        if (FMT != X8) {
            const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(gb + 32)));
            for (int t = 0; t < T; t++) acc[t] = _mm512_fmadd_ps(mv, _mm512_set1_ps(x.sx[(t0 + t) * x.nb + b]), acc[t]);
        }
    }
    const int64_t valid = std::min<int64_t>(GR, w.rows - g * GR);
    const __mmask16 mask = (__mmask16)((1u << valid) - 1);
    for (int t = 0; t < T; t++) _mm512_mask_storeu_ps(y + t * ystride, mask, acc[t]);
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    // The same products half a group (8 rows, one 256-bit register) at a time: vpmaddwd then vpaddd per pair.
    const __m256i low = _mm256_set1_epi16(0x0F);
    const int64_t valid = std::min<int64_t>(GR, w.rows - g * GR);
    for (int hf = 0; hf < 2 && hf * 8 < valid; hf++) {
        __m256 acc[T];
        for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t* gb = gp + b * GB;
            const int32_t* xp[T];
            for (int t = 0; t < T; t++) xp[t] = (const int32_t*)(x.q.data() + (t0 + t) * x.K + b * QK);
            __m256i tmp[T];
            for (int t = 0; t < T; t++) tmp[t] = _mm256_setzero_si256();
            if (FMT != X8) {
                __m256i hb = _mm256_setzero_si256();
                if (FMT == X5) hb = _mm256_loadu_si256((const __m256i*)(gb + X5_PLANE + 32 * hf));
                for (int c = 0; c < 4; c++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i*)(gb + 64 + 64 * c + 32 * hf));
                    for (int i = 0; i < 4; i++) {
                        __m256i wi = _mm256_and_si256(_mm256_srli_epi16(v, 4 * i), low);
                        if (FMT == X5) wi = _mm256_or_si256(wi, fifth_bits(hb, 4 * c + i));
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
            const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(gb + 16 * hf)));
            for (int t = 0; t < T; t++) {
                const int64_t xi = (t0 + t) * x.nb + b;
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tmp[t]), _mm256_mul_ps(dv, _mm256_set1_ps(x.dx[xi])), acc[t]);
            }
            if (FMT != X8) {
                const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(gb + 32 + 16 * hf)));
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
#else
    // Plain C++: unpack the group's block to int16, then integer dot products the compiler can vectorize.
    const int64_t valid = std::min<int64_t>(GR, w.rows - g * GR);
    float acc[T][GR] = {};
    int16_t wq[GR][QK];
    float d[GR], m[GR];
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* gb = gp + b * GB;
        for (int j = 0; j < GR; j++) {
            d[j] = load_half(gb + 2 * j);
            m[j] = FMT != X8 ? load_half(gb + 32 + 2 * j) : 0.f;
            for (int k = 0; k < QK; k++) {
                if (FMT == X8) {
                    wq[j][k] = (int8_t)gb[32 + x8_place(j, k)];
                } else {
                    int byte, shift;
                    x4_place(j, k, byte, shift);
                    wq[j][k] = (gb[64 + byte] >> shift) & 0x0F;
                    if (FMT == X5) {
                        int hbyte, bit;
                        x5_place(j, k, hbyte, bit);
                        wq[j][k] |= ((gb[X5_PLANE + hbyte] >> bit) & 1) << 4;
                    }
                }
            }
        }
        for (int t = 0; t < T; t++) {
            const int16_t* xq = x.q.data() + (t0 + t) * x.K + b * QK;
            const int64_t xi = (t0 + t) * x.nb + b;
            for (int j = 0; j < valid; j++) {
                int32_t s = 0;
                for (int k = 0; k < QK; k++) s += (int32_t)wq[j][k] * xq[k];
                acc[t][j] += (float)s * (d[j] * x.dx[xi]) + m[j] * x.sx[xi];
            }
        }
    }
    for (int t = 0; t < T; t++)
        for (int j = 0; j < valid; j++) y[t * ystride + j] = acc[t][j];
#endif
}

constexpr int TT = 12;  // activation rows per pass over a group (registers: 2 per row)

// Rows t0 .. t0+n-1 (1 <= n <= TT) of one group: the register tile for n, from a table of group_rows<FMT, 1..TT>.
using GroupFn = void (*)(const PW&, int64_t, const XQ&, int64_t, float*, int64_t);

template <int FMT, int... N>
constexpr std::array<GroupFn, sizeof...(N)> group_table(std::integer_sequence<int, N...>) {
    return {&group_rows<FMT, N + 1>...};
}

template <int FMT>
void group_tile(const PW& w, int64_t g, const XQ& x, int64_t t0, int64_t n, float* y, int64_t ystride) {
    static constexpr auto table = group_table<FMT>(std::make_integer_sequence<int, TT>{});
    table[n - 1](w, g, x, t0, y, ystride);
}

inline void tile(const PW& w, int64_t g, const XQ& x, int64_t t0, int64_t n, float* y, int64_t ystride) {
    if (w.fmt == X5) group_tile<X5>(w, g, x, t0, n, y, ystride);
    else if (w.fmt == X4) group_tile<X4>(w, g, x, t0, n, y, ystride);
    else group_tile<X8>(w, g, x, t0, n, y, ystride);
}

// Groups [g0, g1) of W for every activation row: y (T, w.rows). A group's weights stay in L1 across row tiles.
void groups_rows(const PW& w, int64_t g0, int64_t g1, const XQ& x, float* y) {
    for (int64_t g = g0; g < g1; g++)
        for (int64_t t = 0; t < x.T; t += TT) tile(w, g, x, t, std::min<int64_t>(TT, x.T - t), y + t * w.rows + g * GR, w.rows);
}

// Several matrices sharing one input (q/k/v, gate/up): y_i (T, rows_i) = x @ W_i^T, all groups split across
// threads in one parallel region.
void matmul_multi(const std::vector<PW>& ws, const XQ& x, const std::vector<float*>& ys) {
    std::vector<int64_t> start(ws.size() + 1, 0);
    for (size_t i = 0; i < ws.size(); i++) start[i + 1] = start[i] + ws[i].groups;
    const int64_t total = start.back();
    const int64_t grain = std::max<int64_t>(1, total / (4 * at::get_num_threads()));
    at::parallel_for(0, total, grain, [&](int64_t g0, int64_t g1) {
        for (size_t i = 0; i < ws.size(); i++) {
            const int64_t a = std::max(g0, start[i]) - start[i], z = std::min(g1, start[i + 1]) - start[i];
            if (a < z) groups_rows(ws[i], a, z, x, ys[i]);
        }
    });
}

// out (T, I) = silu(x @ Wg^T) * (x @ Wu^T): gate and up computed group by group into a small buffer and combined
// there, so neither (T, I) product goes to memory.
void matmul_swiglu(const PW& wg, const PW& wu, const XQ& x, float* out) {
    const int64_t I = wg.rows;
    TORCH_CHECK(wu.rows == I && wu.K == wg.K, "gate and up projections differ in shape");
    const int64_t grain = std::max<int64_t>(1, wg.groups / (4 * at::get_num_threads()));
    at::parallel_for(0, wg.groups, grain, [&](int64_t g0, int64_t g1) {
        float yg[TT * GR], yu[TT * GR];
        for (int64_t g = g0; g < g1; g++) {
            const int64_t valid = std::min<int64_t>(GR, I - g * GR);
            for (int64_t t = 0; t < x.T; t += TT) {
                const int64_t n = std::min<int64_t>(TT, x.T - t);
                tile(wg, g, x, t, n, yg, GR);
                tile(wu, g, x, t, n, yu, GR);
                for (int64_t i = 0; i < n; i++) {
                    float* o = out + (t + i) * I + g * GR;
#ifdef TINKER_AVX512
                    const __m512 h = silu_mul16(_mm512_loadu_ps(yg + i * GR), _mm512_loadu_ps(yu + i * GR));
                    _mm512_mask_storeu_ps(o, (__mmask16)((1u << valid) - 1), h);
#else
                    for (int64_t j = 0; j < valid; j++) o[j] = yg[i * GR + j] / (1.f + std::exp(-yg[i * GR + j])) * yu[i * GR + j];
#endif
                }
            }
        }
    });
}

// Dot product and y += a * x over n floats: the attention's inner loops, vectorized explicitly (a float
// reduction is not vectorized by the compiler without -ffast-math).
inline float dot(const float* a, const float* b, int64_t n) {
    int64_t i = 0;
    float s = 0.f;
#ifdef TINKER_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

inline void axpy(float a, const float* x, float* y, int64_t n) {
    int64_t i = 0;
#ifdef TINKER_AVX512
    const __m512 av = _mm512_set1_ps(a);
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

void rmsnorm(const float* x, const float* g, float* out, int64_t n, float eps) {
    double ss = 0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float inv = 1.f / std::sqrt((float)(ss / n) + eps);
    for (int64_t i = 0; i < n; i++) out[i] = g[i] * (x[i] * inv);
}

// Rotate-half RoPE on one head vector with a precomputed cos/sin table for its position.
void rope(float* v, int64_t hd, const float* cs, const float* sn) {
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Ops exposed to Python

at::Tensor qmatmul(at::Tensor x, at::Tensor data, int64_t fmt, int64_t rows) {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "qmatmul: x must be float32");
    PW w = as_pw(data, fmt, rows);
    auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
    TORCH_CHECK(x2.size(1) == w.K, "qmatmul: x has ", x2.size(1), " features, weight expects ", w.K);
    XQ xq;
    quantize_acts(x2.data_ptr<float>(), x2.size(0), w.K, xq);
    auto sizes = x.sizes().vec();
    sizes.back() = w.rows;
    auto y = at::empty(sizes, x.options());
    matmul_multi({w}, xq, {y.data_ptr<float>()});
    return y;
}

// Several products of one input (q/k/v): the input rounded once, one parallel region.
std::vector<at::Tensor> qmatmul_multi(at::Tensor x, std::vector<at::Tensor> datas, std::vector<int64_t> fmts,
                                      std::vector<int64_t> rows) {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "qmatmul: x must be float32");
    auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
    std::vector<PW> ws;
    std::vector<at::Tensor> ys;
    std::vector<float*> yp;
    for (size_t i = 0; i < datas.size(); i++) {
        ws.push_back(as_pw(datas[i], fmts[i], rows[i]));
        TORCH_CHECK(ws[i].K == x2.size(1), "qmatmul: x has ", x2.size(1), " features, weight expects ", ws[i].K);
        ys.push_back(at::empty({x2.size(0), rows[i]}, x.options()));
        yp.push_back(ys[i].data_ptr<float>());
    }
    XQ xq;
    quantize_acts(x2.data_ptr<float>(), x2.size(0), x2.size(1), xq);
    matmul_multi(ws, xq, yp);
    for (auto& y : ys) {
        auto sizes = x.sizes().vec();
        sizes.back() = y.size(1);
        y = y.view(sizes);
    }
    return ys;
}

// silu(x @ Wg^T) * (x @ Wu^T) without either product going to memory.
at::Tensor qmatmul_swiglu(at::Tensor x, at::Tensor gate, int64_t gfmt, at::Tensor up, int64_t ufmt, int64_t rows) {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "qmatmul: x must be float32");
    auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
    PW wg = as_pw(gate, gfmt, rows), wu = as_pw(up, ufmt, rows);
    TORCH_CHECK(wg.K == x2.size(1), "qmatmul: x has ", x2.size(1), " features, weight expects ", wg.K);
    XQ xq;
    quantize_acts(x2.data_ptr<float>(), x2.size(0), x2.size(1), xq);
    auto sizes = x.sizes().vec();
    sizes.back() = rows;
    auto out = at::empty(sizes, x.options());
    matmul_swiglu(wg, wu, xq, out.data_ptr<float>());
    return out;
}

// x rounded to int16 blocks and back, as the products see it (for the fallback and the tests).
at::Tensor round_acts(at::Tensor x) {
    auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
    XQ xq;
    quantize_acts(x2.data_ptr<float>(), x2.size(0), x2.size(1), xq);
    auto out = at::empty_like(x2);
    float* o = out.data_ptr<float>();
    for (int64_t i = 0; i < x2.numel(); i++) o[i] = xq.dx[i / QK] * (float)xq.q[i];
    return out.view(x.sizes());
}

at::Tensor dequantize(at::Tensor data, int64_t type) {
    QW w = as_qw(data, type);
    auto out = at::empty({w.rows, w.K}, at::kFloat);
    float* o = out.data_ptr<float>();
    at::parallel_for(0, w.rows, 16, [&](int64_t r0, int64_t r1) { dequant_rows(w, r0, r1, o + r0 * w.K); });
    return out;
}

at::Tensor dequantize_packed(at::Tensor data, int64_t fmt, int64_t rows) {
    PW w = as_pw(data, fmt, rows);
    auto out = at::empty({w.groups * GR, w.K}, at::kFloat);  // whole groups; the padding rows are cut off below
    float* o = out.data_ptr<float>();
    at::parallel_for(0, w.groups, 4, [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; g++) packed_dequant_group(w, g, o + g * GR * w.K);
    });
    return out.narrow(0, 0, w.rows);
}

at::Tensor embed(at::Tensor ids, at::Tensor data, int64_t fmt, int64_t rows) {
    PW w = as_pw(data, fmt, rows);
    auto flat = ids.reshape({-1}).contiguous();
    const int64_t n = flat.size(0);
    auto out = at::empty({n, w.K}, at::kFloat);
    const int64_t* id = flat.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; i++) {
        TORCH_CHECK(id[i] >= 0 && id[i] < w.rows, "token id ", id[i], " out of range");
        packed_dequant_rows(w, id[i], id[i] + 1, out.data_ptr<float>() + i * w.K);
    }
    auto sizes = ids.sizes().vec();
    sizes.push_back(w.K);
    return out.reshape(sizes);
}

// Attention register tiles. scores_tile: s[r][0..15] = scale * q_r . k_j for 16 keys j, from a (hd, 16) tile of
// transposed keys kt[d * 16 + j] (contiguous: a strided (hd, S) layout would map every row to the same L1 sets).
template <int NR>
inline void scores_tile(const float* q, int64_t qs, const float* kt, int64_t ks, int64_t hd, float scale, float* s) {
#ifdef TINKER_AVX512
    __m512 acc[NR];
    for (int r = 0; r < NR; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < hd; d++) {
        const __m512 kv = _mm512_loadu_ps(kt + d * 16);
        for (int r = 0; r < NR; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * qs + d]), kv, acc[r]);
    }
    for (int r = 0; r < NR; r++) _mm512_storeu_ps(s + r * ks, _mm512_mul_ps(acc[r], _mm512_set1_ps(scale)));
#else
    for (int r = 0; r < NR; r++)
        for (int j = 0; j < 16; j++) {
            float a = 0.f;
            for (int64_t d = 0; d < hd; d++) a += q[r * qs + d] * kt[d * 16 + j];
            s[r * ks + j] = a * scale;
        }
#endif
}

// scores_tile2: the same for 32 keys (two (hd, 16) tiles): each broadcast query value feeds two products.
template <int NR>
inline void scores_tile2(const float* q, int64_t qs, const float* kt, int64_t ks, int64_t hd, float scale, float* s) {
#ifdef TINKER_AVX512
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
#else
    scores_tile<NR>(q, qs, kt, ks, hd, scale, s);
    scores_tile<NR>(q, qs, kt + hd * 16, ks, hd, scale, s + 16);
#endif
}

// pv_tile: o[r][0 .. 16*ND) = sum_j p[r][j] * v_j[0 .. 16*ND) over keys j < n.
template <int NR, int ND>
inline void pv_tile(const float* p, int64_t ps, const float* v, int64_t vs, int64_t n, float* o, int64_t os) {
#ifdef TINKER_AVX512
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
#else
    for (int r = 0; r < NR; r++)
        for (int d = 0; d < 16 * ND; d++) {
            float a = 0.f;
            for (int64_t j = 0; j < n; j++) a += p[r * ps + j] * v[j * vs + d];
            o[r * os + d] = a;
        }
#endif
}

// Causal attention for prefill (inference): q (B, H, T, hd), k and v (B, n_kv, S, hd), unit stride along hd, any
// other strides (cache views); S >= T and query i, at position S - T + i, sees keys 0 .. S - T + i. Grouped-query
// heads share their kv head. Returns (B, T, H, hd), contiguous. Per task (one head, 16 queries): scores for the
// keys it may see only (the causal half of the square), an exact two-pass softmax in fp32, then P @ V. Keys are
// transposed once per kv head so 16 keys' scores form one vector: no horizontal sums. torch's flash attention
// for CPU runs this shape (head_dim 64) at ~55 GFLOP/s on two cores; this runs it ~3x faster.
at::Tensor attention_causal(at::Tensor q, at::Tensor k, at::Tensor v, double scale) {
    TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
                "attention: float32 only");
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q, k, v must be 4-D");
    TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attention: head_dim must be contiguous");
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3), n_kv = k.size(1), S = k.size(2);
    TORCH_CHECK(S >= T && v.size(2) == S && H % n_kv == 0 && hd % 16 == 0, "attention: unsupported shapes");
    // Sp: score row length, whole 16-key blocks plus 16 so rows do not share L1 sets
    const int64_t off = S - T, rep = H / n_kv, Sp = (S + 15) / 16 * 16 + 16;
    const float fscale = (float)scale;
    auto out = at::empty({B, T, H, hd}, q.options());
    auto kt = at::zeros({B, n_kv, Sp / 16, hd, 16}, q.options());  // keys as (hd, 16) tiles of 16 keys, zero-padded
    const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
    float *op = out.data_ptr<float>(), *ktp = kt.data_ptr<float>();
    at::parallel_for(0, B * n_kv, 1, [&](int64_t a, int64_t z) {
        for (int64_t bg = a; bg < z; bg++) {
            const float* src = kp + (bg / n_kv) * k.stride(0) + (bg % n_kv) * k.stride(1);
            float* dst = ktp + bg * hd * Sp;
            for (int64_t j = 0; j < S; j++)
                for (int64_t d = 0; d < hd; d++) dst[(j / 16 * hd + d) * 16 + j % 16] = src[j * k.stride(2) + d];
        }
    });
    constexpr int QB = 16, R = 4;  // queries per task; query rows sharing each key load
    const int64_t nqb = (T + QB - 1) / QB;
    at::parallel_for(0, B * H * nqb, 1, [&](int64_t a, int64_t z) {
        std::vector<float> sc(QB * Sp);
        for (int64_t task = a; task < z; task++) {
            const int64_t b = task / (H * nqb), h = task / nqb % H, i0 = task % nqb * QB, g = h / rep;
            const int64_t nq = std::min<int64_t>(QB, T - i0), nk = off + i0 + nq;  // keys the last query sees
            const float* Kt = ktp + (b * n_kv + g) * hd * Sp;
            const float* V = vp + b * v.stride(0) + g * v.stride(1);
            const float* Q = qp + b * q.stride(0) + h * q.stride(1) + i0 * q.stride(2);
            for (int64_t r0 = 0; r0 < nq; r0 += R) {
                const int nr = (int)std::min<int64_t>(R, nq - r0);
                int64_t j0 = 0;
                for (; nr == R && j0 + 32 <= nk; j0 += 32)
                    scores_tile2<R>(Q + r0 * q.stride(2), q.stride(2), Kt + j0 * hd, Sp, hd, fscale, sc.data() + r0 * Sp + j0);
                for (; j0 < nk; j0 += 16) {
                    float* srow = sc.data() + r0 * Sp + j0;
                    const float* qr = Q + r0 * q.stride(2);
                    switch (nr) {  // register tiles need compile-time sizes
                        case 4: scores_tile<4>(qr, q.stride(2), Kt + j0 * hd, Sp, hd, fscale, srow); break;
                        case 3: scores_tile<3>(qr, q.stride(2), Kt + j0 * hd, Sp, hd, fscale, srow); break;
                        case 2: scores_tile<2>(qr, q.stride(2), Kt + j0 * hd, Sp, hd, fscale, srow); break;
                        default: scores_tile<1>(qr, q.stride(2), Kt + j0 * hd, Sp, hd, fscale, srow); break;
                    }
                }
            }
            for (int64_t r = 0; r < nq; r++) {  // softmax over the keys query r sees; zeros past them
                float* s = sc.data() + r * Sp;
                const int64_t n = off + i0 + r + 1;
                float mx = -INFINITY, den = 0.f;
                int64_t j = 0;
#ifdef TINKER_AVX512
                __m512 m16 = _mm512_set1_ps(-INFINITY), d16 = _mm512_setzero_ps();
                for (; j + 16 <= n; j += 16) m16 = _mm512_max_ps(m16, _mm512_loadu_ps(s + j));
                mx = _mm512_reduce_max_ps(m16);
#endif
                for (; j < n; j++) mx = std::max(mx, s[j]);
                j = 0;
#ifdef TINKER_AVX512
                const __m512 mxv = _mm512_set1_ps(mx);
                for (; j + 16 <= n; j += 16) {
                    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), mxv));
                    _mm512_storeu_ps(s + j, e);
                    d16 = _mm512_add_ps(d16, e);
                }
                den = _mm512_reduce_add_ps(d16);
#endif
                for (; j < n; j++) { s[j] = std::exp(s[j] - mx); den += s[j]; }
                const float inv = 1.f / den;
                for (j = 0; j < n; j++) s[j] *= inv;
                for (; j < nk; j++) s[j] = 0.f;
            }
            for (int64_t r0 = 0; r0 < nq; r0 += R) {
                const int nr = (int)std::min<int64_t>(R, nq - r0);
                const int64_t n = off + i0 + r0 + nr;  // keys any of these rows sees
                for (int64_t d0 = 0; d0 < hd; d0 += 64) {
                    const int nd = (int)std::min<int64_t>(4, (hd - d0) / 16);
                    const float* p = sc.data() + r0 * Sp;
                    float* o = op + ((b * T + i0 + r0) * H + h) * hd + d0;
                    const int64_t os = H * hd;
                    if (nr == 4 && nd == 4) pv_tile<4, 4>(p, Sp, V + d0, v.stride(2), n, o, os);
                    else if (nd == 4) {
                        for (int r = 0; r < nr; r++) pv_tile<1, 4>(p + r * Sp, Sp, V + d0, v.stride(2), n, o + r * os, os);
                    } else {
                        for (int r = 0; r < nr; r++)
                            for (int c = 0; c < nd; c++)
                                pv_tile<1, 1>(p + r * Sp, Sp, V + d0 + 16 * c, v.stride(2), n, o + r * os + 16 * c, os);
                    }
                }
            }
        }
    });
    return out;
}

// Seconds spent in each phase of llama_decode since profiling was switched on (decode_profile(true)); the
// phases are named in DECODE_PHASES. Off by default: a clock read costs ~20 ns, 8 a layer.
constexpr int N_PHASES = 7;
const char* DECODE_PHASES[N_PHASES] = {"norms, rounding, residuals", "q/k/v products", "RoPE, cache write, attention",
                                      "o products", "gate/up products + SwiGLU", "down products", "output head"};
bool PROFILING = false;
double PROFILE[N_PHASES] = {};

std::vector<std::pair<std::string, double>> decode_profile(bool on) {
    std::vector<std::pair<std::string, double>> out;
    for (int i = 0; i < N_PHASES; i++) out.emplace_back(DECODE_PHASES[i], PROFILE[i]);
    std::fill(PROFILE, PROFILE + N_PHASES, 0.0);
    PROFILING = on;
    return out;
}

// One decode step of a Llama-family model for B sequences, one new token each, written at `positions` into cache
// rows `rows`. Per layer, 14 tensors: input_norm, wq, wk, wv, bq, bk, bv (biases may be empty), q_norm, k_norm
// (may be empty), wo, post_norm, w_gate, w_up, w_down (packed); `types` (L, 14) gives the packed format and row
// count of wq..w_down. head: final_norm, lm_head, embedding; head_types: their formats and rows. Returns (B, V).
at::Tensor llama_decode(at::Tensor tokens, at::Tensor positions, at::Tensor rows, std::vector<at::Tensor> layers,
                        at::Tensor types, std::vector<at::Tensor> head, at::Tensor head_types,
                        std::vector<at::Tensor> k_cache, std::vector<at::Tensor> v_cache, at::Tensor inv_freq,
                        int64_t n_heads, int64_t n_kv, int64_t hd, double eps, int64_t window) {
    constexpr int PER_LAYER = 14;
    const int64_t B = tokens.size(0);
    const int64_t L = (int64_t)layers.size() / PER_LAYER;
    const int64_t* tok = tokens.data_ptr<int64_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* row = rows.data_ptr<int64_t>();
    const int64_t* ty = types.data_ptr<int64_t>();
    const int64_t* hty = head_types.data_ptr<int64_t>();
    const float feps = (float)eps;

    PW emb = as_pw(head[2], hty[2], hty[3]);
    const int64_t C = emb.K, half = hd / 2;
    const int64_t q_dim = n_heads * hd, kv_dim = n_kv * hd;
    std::vector<float> x(B * C), h(B * C), q(B * q_dim), k(B * kv_dim), v(B * kv_dim), att(B * q_dim), tmp(B * C);
    std::vector<float> gate, cs(B * half), sn(B * half);
    for (int64_t b = 0; b < B; b++) {
        TORCH_CHECK(tok[b] >= 0 && tok[b] < emb.rows, "token id ", tok[b], " out of range");
        packed_dequant_rows(emb, tok[b], tok[b] + 1, x.data() + b * C);
        for (int64_t i = 0; i < half; i++) {  // RoPE tables: one position per row, shared by every layer
            const float f = (float)pos[b] * inv_freq.data_ptr<float>()[i];
            cs[b * half + i] = std::cos(f);
            sn[b * half + i] = std::sin(f);
        }
    }
    XQ xq;
    auto last = std::chrono::steady_clock::now();
    auto lap = [&](int phase) {  // time since the previous lap goes to `phase`
        if (!PROFILING) return;
        const auto now = std::chrono::steady_clock::now();
        PROFILE[phase] += std::chrono::duration<double>(now - last).count();
        last = now;
    };
    for (int64_t l = 0; l < L; l++) {
        const at::Tensor* t = layers.data() + l * PER_LAYER;
        const int64_t* lt = ty + l * 14;
        // attention
        for (int64_t b = 0; b < B; b++) rmsnorm(x.data() + b * C, t[0].data_ptr<float>(), h.data() + b * C, C, feps);
        quantize_acts(h.data(), B, C, xq);
        lap(0);
        matmul_multi({as_pw(t[1], lt[0], lt[1]), as_pw(t[2], lt[2], lt[3]), as_pw(t[3], lt[4], lt[5])}, xq, {q.data(), k.data(), v.data()});
        lap(1);
        for (int i = 0; i < 3; i++) {
            const at::Tensor& bias = t[4 + i];
            if (!bias.numel()) continue;
            float* y = i == 0 ? q.data() : i == 1 ? k.data() : v.data();
            const int64_t n = bias.numel();
            for (int64_t b = 0; b < B; b++)
                for (int64_t j = 0; j < n; j++) y[b * n + j] += bias.data_ptr<float>()[j];
        }
        for (int64_t b = 0; b < B; b++) {
            float* qb = q.data() + b * q_dim;
            float* kb = k.data() + b * kv_dim;
            const float* vb = v.data() + b * kv_dim;
            for (int64_t hh = 0; hh < n_heads; hh++) {
                if (t[7].numel()) rmsnorm(qb + hh * hd, t[7].data_ptr<float>(), qb + hh * hd, hd, feps);  // Qwen3
                rope(qb + hh * hd, hd, cs.data() + b * half, sn.data() + b * half);
            }
            const int64_t S = k_cache[l].size(2);
            TORCH_CHECK(pos[b] < S, "position ", pos[b], " beyond the cache of ", S);
            float* kbase = k_cache[l].data_ptr<float>() + row[b] * n_kv * S * hd;
            float* vbase = v_cache[l].data_ptr<float>() + row[b] * n_kv * S * hd;
            for (int64_t hh = 0; hh < n_kv; hh++) {
                if (t[8].numel()) rmsnorm(kb + hh * hd, t[8].data_ptr<float>(), kb + hh * hd, hd, feps);
                rope(kb + hh * hd, hd, cs.data() + b * half, sn.data() + b * half);
                std::copy(kb + hh * hd, kb + (hh + 1) * hd, kbase + (hh * S + pos[b]) * hd);
                std::copy(vb + hh * hd, vb + (hh + 1) * hd, vbase + (hh * S + pos[b]) * hd);
            }
        }
        // each row attends over its own keys; (row, head) pairs across threads
        at::parallel_for(0, B * n_heads, 1, [&](int64_t i0, int64_t i1) {
            std::vector<float> sc;
            for (int64_t i = i0; i < i1; i++) {
                const int64_t b = i / n_heads, hh = i % n_heads, g = hh / (n_heads / n_kv);
                const int64_t S = k_cache[l].size(2);
                const int64_t start = window > 0 ? std::max<int64_t>(0, pos[b] - window + 1) : 0, n = pos[b] + 1 - start;
                const float* qv = q.data() + b * q_dim + hh * hd;
                const float* kb = k_cache[l].data_ptr<float>() + ((row[b] * n_kv + g) * S + start) * hd;
                const float* vb = v_cache[l].data_ptr<float>() + ((row[b] * n_kv + g) * S + start) * hd;
                sc.resize(n);
                const float scale = 1.f / std::sqrt((float)hd);
                float mx = -INFINITY;
                for (int64_t j = 0; j < n; j++) {
                    sc[j] = dot(qv, kb + j * hd, hd) * scale;
                    mx = std::max(mx, sc[j]);
                }
                float den = 0.f;
                for (int64_t j = 0; j < n; j++) { sc[j] = std::exp(sc[j] - mx); den += sc[j]; }
                float* out = att.data() + b * q_dim + hh * hd;
                std::fill(out, out + hd, 0.f);
                for (int64_t j = 0; j < n; j++) axpy(sc[j] / den, vb + j * hd, out, hd);
            }
        });
        lap(2);
        quantize_acts(att.data(), B, q_dim, xq);
        lap(0);
        matmul_multi({as_pw(t[9], lt[6], lt[7])}, xq, {tmp.data()});
        lap(3);
        for (int64_t i = 0; i < B * C; i++) x[i] += tmp[i];
        // MLP
        for (int64_t b = 0; b < B; b++) rmsnorm(x.data() + b * C, t[10].data_ptr<float>(), h.data() + b * C, C, feps);
        PW wg = as_pw(t[11], lt[8], lt[9]), wu = as_pw(t[12], lt[10], lt[11]), wd = as_pw(t[13], lt[12], lt[13]);
        const int64_t I = wg.rows;
        gate.resize(B * I);
        quantize_acts(h.data(), B, C, xq);
        lap(0);
        matmul_swiglu(wg, wu, xq, gate.data());
        lap(4);
        quantize_acts(gate.data(), B, I, xq);
        lap(0);
        matmul_multi({wd}, xq, {tmp.data()});
        lap(5);
        for (int64_t i = 0; i < B * C; i++) x[i] += tmp[i];
    }
    for (int64_t b = 0; b < B; b++) rmsnorm(x.data() + b * C, head[0].data_ptr<float>(), h.data() + b * C, C, feps);
    PW lm = as_pw(head[1], hty[0], hty[1]);
    auto logits = at::empty({B, lm.rows}, at::kFloat);
    quantize_acts(h.data(), B, C, xq);
    matmul_multi({lm}, xq, {logits.data_ptr<float>()});
    lap(6);
    return logits;
}

// ---------------------------------------------------------------------------------------------------------------
// Fused elementwise ops for prefill and training (float32): each reads its inputs once and writes once, where the
// PyTorch formulas take five to eight passes over memory, forward and backward.

// RMSNorm over the last dimension: y = w * (x * r) with r = 1 / sqrt(mean(x^2) + eps). Returns {y, r (rows,)}.
std::vector<at::Tensor> rms_norm_fwd(at::Tensor x, at::Tensor w, double eps) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "rms_norm: float32 only");
    const int64_t C = x.size(-1);
    auto x2 = x.reshape({-1, C}).contiguous();
    const int64_t N = x2.size(0);
    auto y = at::empty_like(x2);
    auto r = at::empty({N}, x.options());
    const float* xp = x2.data_ptr<float>();
    const float* wp = w.contiguous().data_ptr<float>();
    float* yp = y.data_ptr<float>();
    float* rp = r.data_ptr<float>();
    at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; n++) {
            const float* xr = xp + n * C;
            const float rr = 1.f / std::sqrt(dot(xr, xr, C) / C + (float)eps);
            rp[n] = rr;
            float* yr = yp + n * C;
            for (int64_t i = 0; i < C; i++) yr[i] = wp[i] * (xr[i] * rr);
        }
    });
    return {y.view(x.sizes()), r};
}

// Gradient of rms_norm_fwd with respect to x: r * w * g - x * r^3 * sum_j(w_j g_j x_j) / C.
at::Tensor rms_norm_bwd(at::Tensor g, at::Tensor x, at::Tensor w, at::Tensor r) {
    const int64_t C = x.size(-1);
    auto g2 = g.reshape({-1, C}).contiguous();
    auto x2 = x.reshape({-1, C}).contiguous();
    const int64_t N = x2.size(0);
    auto gx = at::empty_like(x2);
    const float *gp = g2.data_ptr<float>(), *xp = x2.data_ptr<float>(), *rp = r.data_ptr<float>();
    const float* wp = w.contiguous().data_ptr<float>();
    float* op = gx.data_ptr<float>();
    at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
        std::vector<float> wg(C);
        for (int64_t n = n0; n < n1; n++) {
            const float *gr = gp + n * C, *xr = xp + n * C;
            for (int64_t i = 0; i < C; i++) wg[i] = wp[i] * gr[i];
            const float rr = rp[n];
            const float k = dot(wg.data(), xr, C) * rr * rr * rr / C;
            float* o = op + n * C;
            for (int64_t i = 0; i < C; i++) o[i] = rr * wg[i] - k * xr[i];
        }
    });
    return gx.view(x.sizes());
}

// Rotate-half RoPE on x (B, T, H, hd) with half-width tables cos, sin (B, T, hd/2); inverse=true rotates back
// (the backward pass: the transpose of a rotation is the rotation by minus the angle).
at::Tensor rope_apply(at::Tensor x, at::Tensor cos, at::Tensor sin, bool inverse) {
    TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "rope: x must be float32 (B, T, H, hd)");
    auto xc = x.contiguous();
    auto cc = cos.contiguous(), sc = sin.contiguous();
    const int64_t B = x.size(0), T = x.size(1), H = x.size(2), hd = x.size(3), half = hd / 2;
    TORCH_CHECK(cc.numel() == B * T * half && sc.numel() == B * T * half, "rope: tables must be (B, T, hd/2)");
    auto out = at::empty_like(xc);
    const float *xp = xc.data_ptr<float>(), *cp = cc.data_ptr<float>(), *sp = sc.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const float sign = inverse ? -1.f : 1.f;
    at::parallel_for(0, B * T, 4, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++) {
            const float *c = cp + r * half, *s = sp + r * half;
            for (int64_t h = 0; h < H; h++) {
                const float* v = xp + (r * H + h) * hd;
                float* o = op + (r * H + h) * hd;
                for (int64_t i = 0; i < half; i++) {
                    const float a = v[i], b = v[i + half], si = sign * s[i];
                    o[i] = a * c[i] - b * si;
                    o[i + half] = b * c[i] + a * si;
                }
            }
        }
    });
    return out;
}


// SwiGLU: silu(gate) * up, and its gradients {d gate, d up}.
at::Tensor swiglu_fwd(at::Tensor gate, at::Tensor up) {
    auto gc = gate.contiguous(), uc = up.contiguous();
    auto out = at::empty_like(gc);
    const float *gp = gc.data_ptr<float>(), *up_ = uc.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, gc.numel(), 1 << 14, [&](int64_t i0, int64_t i1) {
        int64_t i = i0;
#ifdef TINKER_AVX512
        for (; i + 16 <= i1; i += 16) {
            const __m512 g = _mm512_loadu_ps(gp + i);
            _mm512_storeu_ps(op + i, silu_mul16(g, _mm512_loadu_ps(up_ + i)));
        }
#endif
        for (; i < i1; i++) op[i] = gp[i] / (1.f + std::exp(-gp[i])) * up_[i];
    });
    return out;
}

std::vector<at::Tensor> swiglu_bwd(at::Tensor grad, at::Tensor gate, at::Tensor up) {
    auto dc = grad.contiguous(), gc = gate.contiguous(), uc = up.contiguous();
    auto dg = at::empty_like(gc), du = at::empty_like(uc);
    const float *dp = dc.data_ptr<float>(), *gp = gc.data_ptr<float>(), *up_ = uc.data_ptr<float>();
    float *dgp = dg.data_ptr<float>(), *dup = du.data_ptr<float>();
    at::parallel_for(0, gc.numel(), 1 << 14, [&](int64_t i0, int64_t i1) {
        int64_t i = i0;
#ifdef TINKER_AVX512
        const __m512 one = _mm512_set1_ps(1.f);
        for (; i + 16 <= i1; i += 16) {
            const __m512 g = _mm512_loadu_ps(gp + i), d = _mm512_loadu_ps(dp + i), s = sigmoid16(g);
            _mm512_storeu_ps(dup + i, _mm512_mul_ps(d, _mm512_mul_ps(g, s)));
            // d * up * s * (1 + g * (1 - s))
            const __m512 t = _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one);
            _mm512_storeu_ps(dgp + i, _mm512_mul_ps(_mm512_mul_ps(d, _mm512_loadu_ps(up_ + i)), _mm512_mul_ps(s, t)));
        }
#endif
        for (; i < i1; i++) {
            const float g = gp[i], s = 1.f / (1.f + std::exp(-g));
            dup[i] = dp[i] * g * s;
            dgp[i] = dp[i] * up_[i] * s * (1.f + g * (1.f - s));
        }
    });
    return {dg, du};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
    mod.def("rms_norm_fwd", &rms_norm_fwd, "RMSNorm forward: {y, 1/rms}");
    mod.def("rms_norm_bwd", &rms_norm_bwd, "RMSNorm input gradient");
    mod.def("rope_apply", &rope_apply, "rotate-half RoPE on (B, T, H, hd), or its inverse");
    mod.def("swiglu_fwd", &swiglu_fwd, "silu(gate) * up");
    mod.def("swiglu_bwd", &swiglu_bwd, "SwiGLU gradients {d gate, d up}");
    mod.def("pack", &pack, "GGUF blocks -> the packed layout the products read");
    mod.def("unpack", &unpack, "packed layout -> GGUF blocks, bit for bit");
    mod.def("qmatmul", &qmatmul, "y = x @ W.T, W packed, x rounded to int16 blocks");
    mod.def("qmatmul_multi", &qmatmul_multi, "[x @ W_i.T], x rounded once");
    mod.def("qmatmul_swiglu", &qmatmul_swiglu, "silu(x @ Wg.T) * (x @ Wu.T)");
    mod.def("round_acts", &round_acts, "x rounded to int16 blocks, as qmatmul sees it");
    mod.def("dequantize", &dequantize, "GGUF blocks -> float32 (rows, K)");
    mod.def("dequantize_packed", &dequantize_packed, "packed weight -> float32 (rows, K)");
    mod.def("embed", &embed, "embedding rows from a packed table");
    mod.def("attention_causal", &attention_causal, "causal grouped-query attention for prefill -> (B, T, H, hd)");
    mod.def("llama_decode", &llama_decode, "one fused decode step of a Llama-family model");
    mod.def("decode_profile", &decode_profile, "seconds per llama_decode phase since the last call; on: keep timing");
#if defined(TINKER_AVX512)
    mod.attr("isa") = "avx512-vnni";
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    mod.attr("isa") = "avx2";  // the products only; attention and elementwise ops are plain C++
#else
    mod.attr("isa") = "scalar";
#endif
}
