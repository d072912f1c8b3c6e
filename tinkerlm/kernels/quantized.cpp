// Quantized weights: GGUF blocks repacked into the layout the products read (and back, bit for bit), K-quant
// super-blocks converted straight into it (one pass, groups of rows in parallel), dequantized to float, and the products y = x @ W^T with activations rounded to int16 blocks (see common.h for
// both layouts). The products' inner loops are the instruction set's group_rows (isa_*.h); this file tiles them
// over rows and threads.

#pragma once

#include "common.h"

namespace {

template <int TYPE>
void dequant_rows_t(const QW& w, int64_t r0, int64_t r1, float* out) {
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t* row = w.data + r * w.row_bytes;
        for (int64_t b = 0; b < w.nb; b++) {
            float* o = out + (r - r0) * w.K + b * QK;
            dequant_block<TYPE>(row + b * BLOCK_BYTES[TYPE], o);
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


// ---- K-quant super-blocks straight into the packed layout ------------------------------------------------------
// GGUF K-quant types as pack() numbers them (after the 32-value block types of common.h's QType).
enum KType { K_Q4 = 4, K_Q5 = 5, K_Q6 = 6, K_Q3 = 7, K_Q2 = 8 };
constexpr int64_t SB_BYTES[] = {0, 0, 0, 0, 144, 176, 210, 110, 84};  // bytes of a 256-value super-block
constexpr int KFMT[] = {0, 0, 0, 0, X4K, X5K, X6K, X3K, X2K};

// One row's 32-column block of a super-block: its unsigned integers u (the scales go to the super-block's head).
struct KBlock {
    uint8_t u[QK];
};

// The 8 32-column blocks of one super-block (ggml-common.h layouts, as ggml's dequantize_row_* reads them).
void k_blocks(const uint8_t* sb, int type, KBlock* out) {
    if (type == K_Q4 || type == K_Q5) {  // d, dmin, 12 scale bytes, (Q5_K: 32 bytes of fifth bits), 128 nibbles
        const uint8_t* qh = sb + 16;
        const uint8_t* qs = sb + (type == K_Q5 ? 48 : 16);
        for (int s = 0; s < 8; s++)  // 32-byte chunk s/2: sub-block s in the low (even s) or high nibbles
            for (int l = 0; l < QK; l++) {
                int u = (qs[32 * (s / 2) + l] >> (4 * (s % 2))) & 0x0F;
                if (type == K_Q5) u |= ((qh[l] >> s) & 1) << 4;
                out[s].u[l] = (uint8_t)u;
            }
        return;
    }
    if (type == K_Q6) {  // 128 low-nibble bytes, 64 bytes of 2-bit highs, 16 int8 scales, d
        const uint8_t* ql = sb;
        const uint8_t* qh = sb + 128;
        for (int n = 0; n < 2; n++)  // 128-value halves: ql += 64, qh += 32
            for (int j = 0; j < 4; j++) {  // 32 values l of half n: value 32j + l
                const uint8_t* lq = ql + 64 * n + (j % 2) * 32;
                for (int l = 0; l < QK; l++)
                    out[4 * n + j].u[l] = (uint8_t)(((lq[l] >> (4 * (j / 2))) & 0x0F) | (((qh[32 * n + l] >> (2 * j)) & 3) << 4));
            }
        return;
    }
    if (type == K_Q3) {  // 32 bytes of high bits, 64 bytes of 2-bit lows, 12 bytes of 6-bit scales, d
        const uint8_t* hm = sb;
        const uint8_t* qs = sb + 32;
        for (int n = 0; n < 2; n++)
            for (int j = 0; j < 4; j++)  // shift 2j, high-bit mask 1 << (4n + j)
                for (int l = 0; l < QK; l++)
                    out[4 * n + j].u[l] = (uint8_t)(((qs[32 * n + l] >> (2 * j)) & 3) | (((hm[l] >> (4 * n + j)) & 1) << 2));
        return;
    }
    // Q2_K: 16 bytes of 4-bit scale (low) and min (high), 64 bytes of 2-bit values, d, dmin
    const uint8_t* qs = sb + 16;
    for (int n = 0; n < 2; n++)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < QK; l++) out[4 * n + j].u[l] = (uint8_t)((qs[32 * n + l] >> (2 * j)) & 3);
}

// Row j's block into its payload (format fmt): the nibbles and bit planes, or the fields. (Its scales are in the
// super-block's head, written by pack_k.)
inline void put_block(uint8_t* payload, int fmt, int j, const KBlock& kb) {
    const uint8_t* u = kb.u;
    if (fmt == X6K) {  // half h, parity e: the 8 fields of columns 2(8h+f)+e as one 48-bit number (see x6_place)
        for (int h = 0; h < 2; h++)
            for (int e = 0; e < 2; e++) {
                uint64_t bits = 0;
                for (int f = 0; f < 8; f++) bits |= (uint64_t)u[2 * (8 * h + f) + e] << (6 * f);
                for (int i = 0; i < 3; i++) {
                    const uint16_t word = (uint16_t)(bits >> (16 * i));
                    std::memcpy(payload + 64 * (3 * h + i) + 2 * (2 * j + e), &word, 2);
                }
            }
        return;
    }
    if (fmt == X3K || fmt == X2K) {  // parity e: the 16 fields of columns 2p+e as one 48- or 32-bit number (see
        // xk_place)
        const int W = fmt == X3K ? 3 : 2;
        for (int e = 0; e < 2; e++) {
            uint64_t bits = 0;
            for (int p = 0; p < 16; p++) bits |= (uint64_t)u[2 * p + e] << (W * p);
            for (int i = 0; i < W; i++) {
                const uint16_t word = (uint16_t)(bits >> (16 * i));
                std::memcpy(payload + 64 * i + 2 * (2 * j + e), &word, 2);
            }
        }
        return;
    }
#if defined(__AVX2__) && defined(__BMI2__)
    // Output byte 4c + 2e + h = u[8c+e+4h] | u[8c+2+e+4h] << 4: two byte shuffles of each 16-value half, one OR.
    const __m128i A = _mm_loadu_si128((const __m128i*)u), B = _mm_loadu_si128((const __m128i*)(u + 16));
    const __m128i lo_idx = _mm_setr_epi8(0, 4, 1, 5, 8, 12, 9, 13, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m128i hi_idx = _mm_setr_epi8(2, 6, 3, 7, 10, 14, 11, 15, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(_mm_unpacklo_epi64(_mm_shuffle_epi8(A, lo_idx), _mm_shuffle_epi8(B, lo_idx)), m4);
    const __m128i hi = _mm_and_si128(_mm_unpacklo_epi64(_mm_shuffle_epi8(A, hi_idx), _mm_shuffle_epi8(B, hi_idx)), m4);
    alignas(16) uint32_t words[4];
    _mm_store_si128((__m128i*)words, _mm_or_si128(lo, _mm_slli_epi16(hi, 4)));
    for (int c = 0; c < 4; c++) std::memcpy(payload + 64 * c + 4 * j, &words[c], 4);
    if (FIFTH[fmt]) {  // word 2j+e: the fifth bits of columns 2p+e, from a byte mask and pext, in the plane's order
        const __m256i uv = _mm256_loadu_si256((const __m256i*)u);
        const uint32_t bits = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(uv, 3));  // bit 4 -> 7
        const uint16_t even = x5_word((uint16_t)_pext_u32(bits, 0x55555555u)), odd = x5_word((uint16_t)_pext_u32(bits, 0xAAAAAAAAu));
        std::memcpy(payload + 256 + 4 * j, &even, 2);
        std::memcpy(payload + 256 + 4 * j + 2, &odd, 2);
    }
#else
    for (int c = 0; c < 4; c++)  // chunk c, word 2j+e: nibble i holds column 2(4c+i)+e (see x4_place)
        for (int e = 0; e < 2; e++) {
            const uint16_t word = (uint16_t)((u[8 * c + e] & 0x0F) | ((u[8 * c + 2 + e] & 0x0F) << 4) |
                                             ((u[8 * c + 4 + e] & 0x0F) << 8) | ((u[8 * c + 6 + e] & 0x0F) << 12));
            std::memcpy(payload + 64 * c + 2 * (2 * j + e), &word, 2);
        }
    if (FIFTH[fmt])  // word 2j+e of the plane: the fifth bits of columns 2p+e (see x5_place)
        for (int e = 0; e < 2; e++) {
            uint16_t word = 0;
            for (int p = 0; p < 16; p++) word |= (uint16_t)(((u[2 * p + e] >> 4) & 1) << x5_bit(p));
            std::memcpy(payload + 256 + 2 * (2 * j + e), &word, 2);
        }
#endif
}

// Q3_K's 16 6-bit scales (0..63) from its 12 scale bytes q (ggml's dequantize_row_q3_K), and back (its quantizer).
inline void k3_scales(const uint8_t* q, int* sc) {
    for (int i = 0; i < 16; i++) sc[i] = ((q[i % 8] >> (4 * (i / 8))) & 0x0F) | (((q[8 + i % 4] >> (2 * (i / 4))) & 3) << 4);
}
inline void k3_scale_bytes(const int* sc, uint8_t* q) {
    std::memset(q, 0, 12);
    for (int i = 0; i < 16; i++) {
        q[i % 8] |= (uint8_t)((sc[i] & 0x0F) << (4 * (i / 8)));
        q[8 + i % 4] |= (uint8_t)((sc[i] >> 4) << (2 * (i / 4)));
    }
}

// K-quant super-blocks (rows, K / 256 * SB_BYTES) -> packed (X4K for Q4_K, X5K Q5_K, X6K Q6_K, X3K Q3_K, X2K Q2_K), in
// one pass, groups of rows in parallel.
at::Tensor pack_k(const at::Tensor& data, int64_t type) {
    TORCH_CHECK(data.dim() == 2 && data.stride(1) == 1 && data.scalar_type() == at::kByte, "weight blocks must be uint8 rows");
    const int64_t rows = data.size(0), nsb = data.size(1) / SB_BYTES[type], nb = nsb * 8, row_bytes = data.stride(0);
    TORCH_CHECK(data.size(1) == nsb * SB_BYTES[type], "row bytes are not whole super-blocks");
    const int fmt = KFMT[type];
    const int64_t groups = (rows + GR - 1) / GR, GB = GBLOCK_BYTES[fmt];
    auto out = at::empty({groups, nb * GB}, at::kByte);  // every byte is written but the last group's padding rows
    uint8_t* o = out.data_ptr<uint8_t>();
    if (rows % GR) out.select(0, groups - 1).zero_();
    const uint8_t* src = data.data_ptr<uint8_t>();
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
        KBlock kb[8];
        for (int64_t g = g0; g < g1; g++)
            for (int j = 0; j < GR && g * GR + j < rows; j++) {
                const uint8_t* row = src + (g * GR + j) * row_bytes;
                for (int64_t s = 0; s < nsb; s++) {
                    const uint8_t* sb = row + s * SB_BYTES[type];
                    k_blocks(sb, (int)type, kb);
                    uint8_t* gp = o + g * nb * GB;
                    uint8_t* head = gp + s * SUPER_BYTES[fmt];
                    for (int i = 0; i < 8; i++) put_block(const_cast<uint8_t*>(payload_at(gp, fmt, nb, 8 * s + i)), fmt, j, kb[i]);
                    if (K4_HEAD[fmt]) {  // the head's row j: d, dmin and the 12 scale bytes as they are
                        std::memcpy(head + 2 * j, sb, 2);
                        std::memcpy(head + 32 + 2 * j, sb + 2, 2);
                        for (int i = 0; i < 3; i++) std::memcpy(x4k_dword(head, j, i), sb + 4 + 4 * i, 4);
                    } else {  // d and the 16 sub-blocks' int8 scales (Q6_K: as they are; Q3_K: its 6-bit sc - 32;
                        // Q2_K: its 16 bytes of 4-bit scale and min as they are, and dmin)
                        if (fmt == X6K) {
                            std::memcpy(head + 2 * j, sb + 208, 2);
                            for (int k = 0; k < 16; k++) head[32 + 16 * k + j] = sb[192 + k];
                        } else if (fmt == X2K) {
                            std::memcpy(head + 2 * j, sb + 80, 2);
                            std::memcpy(head + X2K_DMIN + 2 * j, sb + 82, 2);
                            for (int k = 0; k < 16; k++) head[32 + 16 * k + j] = sb[k];
                        } else {
                            std::memcpy(head + 2 * j, sb + 108, 2);
                            int sc[16];
                            k3_scales(sb + 96, sc);
                            for (int k = 0; k < 16; k++) head[32 + 16 * k + j] = (uint8_t)(int8_t)(sc[k] - 32);
                        }
                        if (j == 0 && fmt != X2K) std::memset(head + 32 + 256, 0, X6K_HEAD - 32 - 256);  // the padding
                    }
                }
            }
    });
    return out;
}

constexpr int PACKED[] = {X8, X4S, X4, X5};  // the packed format of each QType

// GGUF blocks (QType) or K-quant super-blocks (KType) -> the packed layout.
at::Tensor pack(at::Tensor data, int64_t type) {
    if (type >= K_Q4 && type <= K_Q2) return pack_k(data, type);
    QW w = as_qw(data, type);
    const int fmt = PACKED[type];
    const int64_t groups = (w.rows + GR - 1) / GR, GB = GBLOCK_BYTES[fmt];
    auto out = at::zeros({groups, w.nb * GB}, at::kByte);
    uint8_t* o = out.data_ptr<uint8_t>();
    at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; g++)
            for (int64_t b = 0; b < w.nb; b++) {
                uint8_t* gp = o + g * w.nb * GB;
                uint8_t* gb = const_cast<uint8_t*>(scales_at(gp, fmt, w.nb, b));
                uint8_t* pl = const_cast<uint8_t*>(payload_at(gp, fmt, w.nb, b));
                for (int j = 0; j < GR && g * GR + j < w.rows; j++) {
                    const uint8_t* blk = w.data + (g * GR + j) * w.row_bytes + b * BLOCK_BYTES[type];
                    std::memcpy(gb + 2 * j, blk, 2);  // d, bit for bit
                    if (fmt == X8) {  // the two bytes of columns (2p, 2p+1) go to chunk p, word j
                        for (int p = 0; p < 16; p++) std::memcpy(gb + 32 + 32 * p + 2 * j, blk + 2 + 2 * p, 2);
                        continue;
                    }
                    if (type == Q4_1 || type == Q5_1) std::memcpy(gb + 32 + 2 * j, blk + 2, 2);
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
                            std::memcpy(pl + 64 * c + 2 * (2 * j + e), &word, 2);
                        }
                    if (type == Q5_1) {  // word 2j+e of the plane: the fifth bits of columns 2p+e (see x5_place)
                        uint32_t qh;
                        std::memcpy(&qh, blk + 4, 4);
                        for (int e = 0; e < 2; e++) {
                            uint16_t word = 0;
                            for (int p = 0; p < 16; p++) word |= (uint16_t)(((qh >> (2 * p + e)) & 1) << x5_bit(p));
                            std::memcpy(pl + 256 + 2 * (2 * j + e), &word, 2);
                        }
                    }
                }
            }
    });
    return out;
}

// A packed K-quant (X4K, X5K, X6K, X3K, X2K) -> the super-blocks of `type` it was packed from, bit for bit: each
// row's scales from its super-block's head back where the file keeps them, then every integer back in its fields.
at::Tensor unpack_k(const PW& w, int64_t type) {
    const int64_t nsb = w.nb / 8, SB = SB_BYTES[type];
    auto out = at::zeros({w.rows, nsb * SB}, at::kByte);
    uint8_t* o = out.data_ptr<uint8_t>();
    for (int64_t r = 0; r < w.rows; r++)
        for (int64_t s = 0; s < nsb; s++) {
            uint8_t* sb = o + (r * nsb + s) * SB;
            const uint8_t* head = w.data + (r / GR) * w.nb * GBLOCK_BYTES[w.fmt] + s * SUPER_BYTES[w.fmt];
            const int j = (int)(r % GR);
            if (K4_HEAD[w.fmt]) {  // Q4_K, Q5_K: d, dmin, the 12 scale bytes
                std::memcpy(sb, head + 2 * j, 2);
                std::memcpy(sb + 2, head + 32 + 2 * j, 2);
                x4k_scale_bytes(head, j, sb + 4);
            } else if (w.fmt == X6K) {  // Q6_K: 16 int8 scales, then d
                for (int k = 0; k < 16; k++) sb[192 + k] = head[32 + 16 * k + j];
                std::memcpy(sb + 208, head + 2 * j, 2);
            } else if (w.fmt == X3K) {  // Q3_K: 12 bytes of 6-bit scales, then d
                int sc[16];
                for (int k = 0; k < 16; k++) sc[k] = (int8_t)head[32 + 16 * k + j] + 32;
                k3_scale_bytes(sc, sb + 96);
                std::memcpy(sb + 108, head + 2 * j, 2);
            } else {  // Q2_K: 16 bytes of 4-bit scale and min first, d and dmin last
                for (int k = 0; k < 16; k++) sb[k] = head[32 + 16 * k + j];
                std::memcpy(sb + 80, head + 2 * j, 2);
                std::memcpy(sb + 82, head + X2K_DMIN + 2 * j, 2);
            }
            for (int i = 0; i < 8; i++)  // sub-block i (32 values l): n = i / 4, m = i % 4 as ggml's loops
                for (int l = 0; l < QK; l++) {
                    int q; float d, mm;
                    packed_entry(w, r, 8 * s + i, l, q, d, mm);
                    q += BIAS[w.fmt];
                    const int n = i / 4, m = i % 4;
                    if (K4_HEAD[w.fmt]) {  // 32-byte chunk i/2, low (even i) or high nibbles; Q5_K's fifth bit of
                        // value l is bit i of byte 16 + l, its nibbles after those 32 bytes
                        sb[(w.fmt == X5K ? 48 : 16) + 32 * (i / 2) + l] |= (uint8_t)((q & 0x0F) << (4 * (i % 2)));
                        if (w.fmt == X5K) sb[16 + l] |= (uint8_t)((q >> 4) << i);
                    } else if (w.fmt == X6K) {  // low nibble in byte 64n + 32 (m % 2) + l (high half for m >= 2), top
                        // two bits at 2m of byte 128 + 32n + l
                        sb[64 * n + 32 * (m % 2) + l] |= (uint8_t)((q & 0x0F) << (4 * (m / 2)));
                        sb[128 + 32 * n + l] |= (uint8_t)((q >> 4) << (2 * m));
                    } else {  // two bits at 2m of byte 32n + l after the high bits (Q3_K: 32 bytes) or scales (Q2_K:
                        // 16); Q3_K's high bit is bit i of byte l
                        sb[(w.fmt == X3K ? 32 : 16) + 32 * n + l] |= (uint8_t)((q & 3) << (2 * m));
                        if (w.fmt == X3K) sb[l] |= (uint8_t)((q >> 2) << i);
                    }
                }
        }
    return out;
}

// The inverse of pack: GGUF blocks of `type` (the K-quants: their super-blocks) again, bit for bit.
at::Tensor unpack(at::Tensor data, int64_t fmt, int64_t rows, int64_t type) {
    PW w = as_pw(data, fmt, rows);
    if (type >= K_Q4 && type <= K_Q2 && fmt == KFMT[type]) return unpack_k(w, type);
    TORCH_CHECK(type >= 0 && type <= 3 && fmt == PACKED[type],
                "unpack: packed format ", fmt, " has no GGUF block type ", type);
    auto out = at::zeros({rows, w.nb * BLOCK_BYTES[type]}, at::kByte);
    uint8_t* o = out.data_ptr<uint8_t>();
    const int64_t GB = GBLOCK_BYTES[w.fmt];
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < w.nb; b++) {
            uint8_t* blk = o + r * w.nb * BLOCK_BYTES[type] + b * BLOCK_BYTES[type];
            const uint8_t* gb = scales_at(w.data + (r / GR) * w.nb * GB, w.fmt, w.nb, b);
            const int j = (int)(r % GR);
            std::memcpy(blk, gb + 2 * j, 2);
            if (type == Q4_1 || type == Q5_1) std::memcpy(blk + 2, gb + 32 + 2 * j, 2);
            uint8_t* qs = blk + (type == Q5_1 ? 8 : type == Q4_1 ? 4 : 2);
            uint32_t qh = 0;
            for (int k = 0; k < QK; k++) {
                int q; float d, m;
                packed_entry(w, r, b, k, q, d, m);
                q += BIAS[w.fmt];  // Q4_0: u again
                if (type == Q5_1) qh |= (uint32_t)(q >> 4) << k;
                if (type == Q8_0) qs[k] = (uint8_t)(int8_t)q;
                else if (k < 16) qs[k] |= (uint8_t)(q & 0x0F);
                else qs[k - 16] |= (uint8_t)((q & 0x0F) << 4);
            }
            if (type == Q5_1) std::memcpy(blk + 4, &qh, 4);
        }
    return out;
}

// Round each 32-value block to int16: dx = amax / 32767, q = round_half_even(x * (32767 / amax)).
void quantize_acts(const float* x, int64_t T, int64_t K, XQ& out) {
    out.T = T; out.K = K; out.nb = K / QK;
    out.q.resize(T * K);
    out.dx.resize(T * out.nb);
    out.sx.resize(T * out.nb);
    out.sh.resize(T * out.nb);
    out.hs.resize(2 * T * out.nb);
    auto block = [&](int64_t i) {  // i: block index over all rows
        const float* xb = x + i * QK;
        int16_t* qb = out.q.data() + i * QK;
        float amax;
        int32_t s;
        round_block(xb, qb, amax, s);
        out.dx[i] = amax / 32767.f;
        out.sx[i] = out.dx[i] * (float)s;
        int32_t h = 0;
        for (int k = 0; k < 16; k++) h += qb[k];
        out.sh[i] = out.dx[i] * (float)h;
        out.hs[2 * i] = h;
        out.hs[2 * i + 1] = s - h;
    };
    const int64_t n = T * out.nb;
    if (n < 1024) { for (int64_t i = 0; i < n; i++) block(i); return; }
    at::parallel_for(0, n, 256, [&](int64_t i0, int64_t i1) { for (int64_t i = i0; i < i1; i++) block(i); });
}

constexpr int TT = TILE_ROWS;  // activation rows per pass over a group (the instruction set's register tile)
#ifdef TINKER_UNPACKED_TILES
// From two tiles of rows up, a half group's weights are unpacked once (isa_avx2.h), for chunks of this many rows.
constexpr int64_t UNPACK_MIN_ROWS = 2 * TT, UNPACK_CHUNK = 96 * TT;
#endif

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
    with_fmt(w.fmt, [&](auto f) { group_tile<decltype(f)::value>(w, g, x, t0, n, y, ystride); });
}

// Groups [g0, g1) of W for every activation row: y (T, w.rows). A group's weights stay in L1 across row tiles.
void groups_rows(const PW& w, int64_t g0, int64_t g1, const XQ& x, float* y) {
#ifdef TINKER_UNPACKED_TILES
    if (x.T >= UNPACK_MIN_ROWS) {  // each half group unpacked once per chunk of rows (the chunk stays in cache)
        for (int64_t t = 0; t < x.T; t += UNPACK_CHUNK)
            for (int64_t g = g0; g < g1; g++)
                unpacked_group(w, g, x, t, std::min<int64_t>(x.T, t + UNPACK_CHUNK), y + t * w.rows + g * GR, w.rows);
        return;
    }
#endif
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

// out (T, I) = silu(x @ Wg^T) * (x @ Wu^T) (gelu: gelu_tanh for silu): gate and up computed group by group into a
// small buffer and combined there, so neither (T, I) product goes to memory.
void matmul_swiglu(const PW& wg, const PW& wu, const XQ& x, float* out, bool gelu = false) {
    const int64_t I = wg.rows;
    TORCH_CHECK(wu.rows == I && wu.K == wg.K, "gate and up projections differ in shape");
    const int64_t grain = std::max<int64_t>(1, wg.groups / (4 * at::get_num_threads()));
#ifdef TINKER_UNPACKED_TILES
    if (x.T >= UNPACK_MIN_ROWS) {
        at::parallel_for(0, wg.groups, grain, [&](int64_t g0, int64_t g1) {
            std::vector<float> yg(std::min<int64_t>(x.T, UNPACK_CHUNK) * GR), yu(yg.size());
            for (int64_t t = 0; t < x.T; t += UNPACK_CHUNK) {
                const int64_t t1 = std::min<int64_t>(x.T, t + UNPACK_CHUNK);
                for (int64_t g = g0; g < g1; g++) {
                    const int64_t valid = std::min<int64_t>(GR, I - g * GR);
                    unpacked_group(wg, g, x, t, t1, yg.data(), GR);
                    unpacked_group(wu, g, x, t, t1, yu.data(), GR);
                    for (int64_t i = 0; i < t1 - t; i++) {
                        float* o = out + (t + i) * I + g * GR;
                        if (gelu)
                            gelu_mul_group(yg.data() + i * GR, yu.data() + i * GR, o, valid);
                        else
                            silu_mul_group(yg.data() + i * GR, yu.data() + i * GR, o, valid);
                    }
                }
            }
        });
        return;
    }
#endif
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
                    if (gelu)
                        gelu_mul_group(yg + i * GR, yu + i * GR, o, valid);
                    else
                        silu_mul_group(yg + i * GR, yu + i * GR, o, valid);
                }
            }
        }
    });
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
