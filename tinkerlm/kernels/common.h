// What every kernel source shares: the GGUF block formats the weights arrive in, the packed layout the products
// read, activations rounded to int16 blocks, and (at the end) the instruction set's inner loops, one header per
// instruction set chosen at compile time. The build is per CPU (-march=native, cached per CPU features:
// tinkerlm/kernels/__init__.py), so the choice is this CPU's, never another machine's.
//
// GGUF weights arrive as rows of 32-value blocks (an fp16 scale d, for Q4_1 an fp16 offset m, 32 integers) or of
// 256-value K-quant super-blocks (Q2_K ... Q6_K: quantized.cpp, k_blocks). At load they are repacked, their
// integers and scales kept exactly, into groups of 16 rows (see "Packed weights" below) so that the products run
// on AVX512-VNNI integer dot products with int16 activation blocks and each group's 16 outputs land in one
// register. Not llama.cpp's 8-bit activations: small models' hidden states carry outliers near 10^4, and 8-bit
// blocks then cost ~1% error per projection, enough to change greedy answers; int16 blocks keep 16 bits.

#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int QK = 32;  // values per block
enum QType { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2, Q5_1 = 3 };
constexpr int64_t BLOCK_BYTES[] = {34, 18, 20, 24};

#ifdef __F16C__
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
    if (type == Q4_0) {  // d * (u - 8), as gguf: the zeros keep d's sign
        for (int k = 0; k < 16; k++) {
            out[k] = d * (float)((qs[k] & 0x0F) - 8);
            out[k + 16] = d * (float)((qs[k] >> 4) - 8);
        }
        return;
    }
    const float m = load_half(blk + 2);
    for (int k = 0; k < 16; k++) {
        out[k] = d * (float)(qs[k] & 0x0F) + m;
        out[k + 16] = d * (float)(qs[k] >> 4) + m;
    }
}

// ---- Packed weights: the layout the products read --------------------------------------------------------------
// At load a block matrix is repacked into groups of 16 rows. For each group and each 32-column block the group
// holds 16 fp16 scales d, (4-bit only) 16 fp16 offsets m, then the 16 x 32 integers arranged so that one vector
// load gives, in each 32-bit lane j, row j's integers for two neighbouring columns (2p, 2p+1):
//   4-bit (Q4_1, Q4_K): 4 chunks of 64 bytes; in chunk c, 16-bit word 2j+e holds in its nibble i the
//          integer of row j, column 2(4c+i)+e. One load, three shifts and three ANDs give 4 vectors of int16 pairs.
//   X4S (Q4_0, symmetric): the 16 scales d and the 4-bit layout of u (0..15), no offsets (blocks in pairs,
//          two scale rows then two payloads: scales_at); integer = u - 8, the 8 taken off the block's integer
//          activation sum (as X6's 32 below): 18 bytes per 32 weights, as the file.
//   8-bit (Q8_0): 16 chunks of 32 bytes; chunk p, byte 2j+e = row j, column 2p+e (sign-extended to int16 pairs).
//   5-bit (Q5_1, Q5_K): the 4-bit layout for the low four bits, then a 64-byte plane of fifth bits: 16-bit word
//          2j+e holds row j's fifth bits of columns 2p+e (p = 4c+i: chunk c, nibble i) at bit 4((i+1) % 4) + c
//          (x5_bit). Shifted right by c, the plane has chunk c's fifth bit of nibble i just above that nibble's
//          top (bit 4(i+1)) for i < 3, so one AND of each and an OR make 16^i times the 5-bit value in place
//          (AVX2 decode); the top nibble's is at bit 0. Elsewhere two shifts and an AND move any bit to bit 4.
// The K-quants with 16-value sub-blocks (Q6_K, Q3_K, Q2_K) keep a scale per half block (columns 0-15, 16-31),
// so their two halves are summed apart and scaled apart:
//   X6 (Q6_K, no longer packed: X6K below keeps its payloads with the file's own scales): 16 fp16 scales of
//          columns 0-15, 16 of columns 16-31 (d * sc), then per half h six 64-byte
//          vectors 3h, 3h+1, 3h+2 of 6-bit fields: 16-bit word 2j+e of the three, read as one 48-bit number, holds
//          row j's u (0..63) of column 2(8h+f)+e at bits 6f .. 6f+5 (x6_place). A field is one or two shifts
//          (a funnel shift where it straddles two words) and an AND; integer = u - 32, the 32 taken off the
//          half block's integer sum as 32 * the activations' (XQ::hs). 7 bits a weight.
//   (X3 and X2, no longer packed either, held Q3_K's and Q2_K's integers in the 4-bit layout with fp16 scale rows.)
//   X4K (Q4_K): the file's own bits, 144 bytes per row and 256 columns as in the file. Per group and super-block
//          (8 blocks, 2304 bytes, 36 whole 64-byte lines): a 256-byte head of 16 fp16 d, 16 fp16 dmin and three
//          64-byte vectors whose 32-bit lane j is dword i of row j's 12 scale bytes (ggml's 6-bit sc and mn, as
//          in the file), then the 8 blocks' payloads in the 4-bit layout of u (0..15). Value = (d sc) u -
//          (dmin mn): the products turn the head into the 8 blocks' fp32 scale and offset rows once per
//          super-block (exact: an fp16 times a 6-bit integer), the offset times the block's activation sum as X4.
//   X6K (Q6_K): the file's own scales, 212 bytes per row and 256 columns (the file: 210). Per group and
//          super-block (8 blocks, 3392 bytes, 53 whole 64-byte lines): a 320-byte head of 16 fp16 d, then the 16
//          int8 scales of each 16-value sub-block k (16 bytes, row j at byte j), 32 bytes of padding; then the 8
//          blocks' X6 payloads (384 bytes each). The products turn the head into the 16 sub-blocks' fp32 scale
//          rows d * sc once per super-block (exact: an fp16 times an int8).
//   X5K (Q5_K): X4K with each block's 64-byte plane of fifth bits (as X5's) after its payload: 176 bytes per row
//          and 256 columns, as the file. Per group and super-block (2816 bytes, 44 whole 64-byte lines): X4K's
//          256-byte head, then the 8 blocks' 4-bit payloads of the low bits, each followed by its plane.
//   X3K (Q3_K): the file's own scales and 3-bit integers, 116 bytes per row and 256 columns (the file: 110). Per
//          group and super-block (1856 bytes, 29 whole 64-byte lines): X6K's 320-byte head (16 fp16 d, then the
//          16 sub-blocks' int8 scales sc - 32, row j at byte j), then the 8 blocks' payloads of three 64-byte
//          vectors: 16-bit word 2j+e of the three, read as one 48-bit number, holds row j's u = the file's two low
//          bits | its high bit << 2 (0..7) of column 2p+e at bits 3p .. 3p+2 (xk_place; p = 0..15, half p / 8).
//          A field is a shift and an AND (two of the 16 straddle two words: a funnel shift); integer = u - 4, the
//          4 taken off the half block's integer activation sum as X6K's 32.
//   X2K (Q2_K): the file's own bits, 84 bytes per row and 256 columns as in the file. Per group and super-block
//          (1344 bytes, 21 whole 64-byte lines): X6K's head but for its bytes (16 fp16 d; then each sub-block's
//          byte of the file, its 4-bit scale sc low, its 4-bit min mn high, row j at byte j; then 16 fp16 dmin in
//          what is X6K's padding), then the 8 blocks' payloads of two 64-byte vectors: word 2j+e of the two, read
//          as one 32-bit number, holds row j's u (0..3) of column 2p+e at bits 2p, 2p+1. Value = (d sc) u -
//          (dmin mn): the offset times the half block's activation sum.
// Every format's plane of fifth bits starts 256 bytes after its payload (plane_at). The K-quants keep the file's
// integers and scales exactly.
// Activations are rounded per 32-value block to int16 with their own scale (amax / 32767): relative error
// 2^-16 of the block's largest value, finer than bfloat16 for the values that matter and safe for the outlier
// channels (values near 10^4) that 8-bit activations lose. Products run on AVX512-VNNI's vpdpwssd, 32
// multiply-adds an instruction at two instructions a cycle, so the 16 rows of a group come out in the 16 lanes of
// one register with no horizontal sums; the fp32 scales are applied once per block:
//   y[row] += d * dx * sum_k(u * xq)  +  m * sx       (sx = dx * sum_k(xq), the block's activation sum)
// (X6K, X3K, X2K: the same per half block, with the half blocks' activation sums for X2K's offsets.)
constexpr int GR = 16;  // rows per group
enum Fmt { X4 = 0, X8 = 1, X5 = 2, X6 = 3, X3 = 4, X2 = 5, X4S = 6, X4K = 7, X6K = 8, X5K = 9, X3K = 10, X2K = 11 };
constexpr int N_FMT = 12;
constexpr int64_t X4K_SB = 256 + 8 * 256;  // an X4K group's super-block: the head, then 8 payloads
constexpr int64_t X6K_HEAD = 320, X6K_SB = X6K_HEAD + 8 * 384;  // X6K's: the head, then 8 X6 payloads
constexpr int64_t X5K_SB = 256 + 8 * 320;  // X5K's: X4K's head, then 8 payloads each with its plane
constexpr int64_t X3K_SB = X6K_HEAD + 8 * 192;  // X3K's: X6K's head, then 8 payloads of 3-bit fields
constexpr int64_t X2K_SB = X6K_HEAD + 8 * 128;  // X2K's: its head, then 8 payloads of 2-bit fields
constexpr int64_t X2K_DMIN = 288;  // where X2K's head keeps dmin
// Bytes of a group per 32 columns (X4K, X6K, X5K, X3K, X2K: on average; their blocks come in eights of *_SB bytes).
constexpr int64_t GBLOCK_BYTES[] = {64 + 256, 32 + 512, 64 + 256 + 64, 64 + 256 + 128, 64 + 256, 128 + 256, 32 + 256, X4K_SB / 8, X6K_SB / 8, X5K_SB / 8, X3K_SB / 8, X2K_SB / 8};
// Where the 4-bit payload starts in a group block (after the scale rows).
constexpr int64_t PAYLOAD[] = {64, 32, 64, 64, 64, 128, 32, 0, 0, 0, 0, 0};
constexpr bool HALVES[] = {false, false, false, true, true, true, false, false, true, false, true, true};  // a scale per 16-column half block
constexpr bool K4_HEAD[] = {false, false, false, false, false, false, false, true, false, true, false, false};  // X4K, X5K: Q4_K's scale head
constexpr bool K6_HEAD[] = {false, false, false, false, false, false, false, false, true, false, true, true};  // X6K, X3K, X2K: d, a byte a sub-block
constexpr bool FIFTH[] = {false, false, true, false, false, false, false, false, false, true, false, false};  // X5, X5K: a plane of fifth bits
constexpr bool HAS_OFFSET[] = {true, false, true, false, false, true, false, true, false, true, false, true};  // value d * q + m, not d * q
// Super-block bytes of a group for the formats whose blocks come in eights (X4K, X6K, X5K, X3K, X2K), else 0.
constexpr int64_t SUPER_BYTES[] = {0, 0, 0, 0, 0, 0, 0, X4K_SB, X6K_SB, X5K_SB, X3K_SB, X2K_SB};

struct PW {  // a packed weight matrix
    const uint8_t* data;
    int fmt;
    int64_t rows, K, nb, groups;
};

PW as_pw(const at::Tensor& data, int64_t fmt, int64_t rows) {
    TORCH_CHECK(data.dim() == 2 && data.is_contiguous() && data.scalar_type() == at::kByte, "packed weight must be contiguous uint8");
    TORCH_CHECK(fmt >= 0 && fmt < N_FMT && fmt != X6 && fmt != X3 && fmt != X2, "unknown packed format ", fmt);  // (by X6K, X3K, X2K)
    PW w;
    w.data = data.data_ptr<uint8_t>();
    w.fmt = (int)fmt;
    w.rows = rows;
    w.groups = data.size(0);
    w.nb = data.size(1) / GBLOCK_BYTES[fmt];
    w.K = w.nb * QK;
    TORCH_CHECK(w.groups == (rows + GR - 1) / GR && data.size(1) == w.nb * GBLOCK_BYTES[fmt], "packed weight has the wrong size");
    TORCH_CHECK(!SUPER_BYTES[fmt] || w.nb % 8 == 0, "packed K-quant weight is not whole super-blocks");
    return w;
}

// Block b of the group whose row starts at gp: where its scale rows and its payload start. X4S keeps its blocks
// in pairs, the two scale rows (64 bytes) then the two payloads (a lone last block: 32 bytes of scales, then its
// payload), so that the 256-byte payloads stay on 64-byte lines in one stream; X4K's "scales" are its
// super-block's head (X5K's, X6K's: theirs); the other formats keep each block whole.
inline const uint8_t* scales_at(const uint8_t* gp, int fmt, int64_t nb, int64_t b) {
    if (SUPER_BYTES[fmt]) return gp + SUPER_BYTES[fmt] * (b / 8);
    return fmt == X4S ? gp + 576 * (b / 2) + 32 * (b % 2) : gp + b * GBLOCK_BYTES[fmt];
}
inline const uint8_t* payload_at(const uint8_t* gp, int fmt, int64_t nb, int64_t b) {
    if (fmt == X4K) return gp + X4K_SB * (b / 8) + 256 + 256 * (b % 8);
    if (fmt == X5K) return gp + X5K_SB * (b / 8) + 256 + 320 * (b % 8);
    if (fmt == X6K) return gp + X6K_SB * (b / 8) + X6K_HEAD + 384 * (b % 8);
    if (fmt == X3K) return gp + X3K_SB * (b / 8) + X6K_HEAD + 192 * (b % 8);
    if (fmt == X2K) return gp + X2K_SB * (b / 8) + X6K_HEAD + 128 * (b % 8);
    return fmt == X4S ? gp + 576 * (b / 2) + ((b | 1) < nb ? 64 : 32) + 256 * (b % 2) : gp + b * GBLOCK_BYTES[fmt] + PAYLOAD[fmt];
}
// X5, X5K: the block's plane of fifth bits, right after its 256-byte payload.
inline const uint8_t* plane_at(const uint8_t* pl) { return pl + 256; }

// Q4_K/Q5_K 6-bit scale and min of sub-block i from a super-block's 12 scale bytes q (ggml's get_scale_min_k4).
inline void k4_scale_min(const uint8_t* q, int i, int& sc, int& mn) {
    if (i < 4) { sc = q[i] & 63; mn = q[i + 4] & 63; }
    else { sc = (q[i + 4] & 0x0F) | ((q[i - 4] >> 6) << 4); mn = (q[i + 4] >> 4) | ((q[i] >> 6) << 4); }
}

// X4K, X5K: row j's 12 scale bytes from a super-block head (dword i in lane j of the head's vector i), and the place of
// dword i.
inline uint8_t* x4k_dword(uint8_t* head, int j, int i) { return head + 64 + 64 * i + 4 * j; }
inline void x4k_scale_bytes(const uint8_t* head, int j, uint8_t* q) {
    for (int i = 0; i < 3; i++) std::memcpy(q + 4 * i, head + 64 + 64 * i + 4 * j, 4);
}
// Row j's scale d * sc and offset -dmin * mn of block s (0..7) of a super-block head.
inline void x4k_scale(const uint8_t* head, int j, int s, float& d, float& m) {
    uint8_t q[12];
    x4k_scale_bytes(head, j, q);
    int sc, mn;
    k4_scale_min(q, s, sc, mn);
    d = load_half(head + 2 * j) * (float)sc;
    m = -load_half(head + 32 + 2 * j) * (float)mn;
}

// Where row j, column k of a group-block lives: 4-bit (byte offset, nibble shift) inside the payload.
inline void x4_place(int j, int k, int& byte, int& shift) {
    const int p = k / 2, e = k % 2, c = p / 4, i = p % 4;
    byte = c * 64 + (2 * j + e) * 2 + i / 2;
    shift = (i % 2) * 4;
}
inline int x8_place(int j, int k) { return (k / 2) * 32 + 2 * j + k % 2; }
// 5-bit: the plane word's bit holding the fifth bit of column pair p = 4c + i (see "Packed weights").
constexpr int x5_bit(int p) { return 4 * ((p % 4 + 1) % 4) + p / 4; }
// A 16-bit word whose bit p is column pair p's fifth bit, in the plane's order (two byte tables).
struct X5Order { uint16_t lo[256], hi[256]; };
constexpr X5Order make_x5_order() {
    X5Order t{};
    for (int v = 0; v < 256; v++)
        for (int p = 0; p < 8; p++)
            if ((v >> p) & 1) {
                t.lo[v] = (uint16_t)(t.lo[v] | (1 << x5_bit(p)));
                t.hi[v] = (uint16_t)(t.hi[v] | (1 << x5_bit(p + 8)));
            }
    return t;
}
constexpr X5Order X5_ORDER = make_x5_order();
inline uint16_t x5_word(uint16_t bits) { return (uint16_t)(X5_ORDER.lo[bits & 0xFF] | X5_ORDER.hi[bits >> 8]); }
// 5-bit: the fifth bit's (byte offset inside the plane, bit).
inline void x5_place(int j, int k, int& byte, int& bit) {
    const int word = 2 * j + k % 2, q = x5_bit(k / 2);
    byte = word * 2 + q / 8;
    bit = q % 8;
}
// X6: row j, column k's (byte offset in the payload of the word holding bit 0 of the 48-bit number, bit of the
// field in that number).
inline void x6_place(int j, int k, int& byte, int& bit) {
    const int p = k / 2, h = p / 8;
    byte = 64 * 3 * h + 2 * (2 * j + k % 2);
    bit = 6 * (p % 8);
}
// X3K, X2K: the same for the W-bit fields (3 or 2; all 16 column pairs in one 48- or 32-bit number).
inline void xk_place(int j, int k, int W, int& byte, int& bit) {
    byte = 2 * (2 * j + k % 2);
    bit = W * (k / 2);
}
// X6K, X3K, X2K in the products: the field width, the words of half h of a block's payload pl (X6K: the half's
// own; X3K, X2K: the block's), and f(std::integral_constant<int, OFF>{}) with half h's first field OFF in them
// (X3K, X2K: 8h).
template <int FMT>
constexpr int KBITS = FMT == X6K ? 6 : FMT == X3K ? 3 : 2;
template <int FMT>
constexpr int KWORDS = FMT == X2K ? 2 : 3;
template <int FMT>
inline const uint8_t* kwords(const uint8_t* pl, int h) { return FMT == X6K ? pl + 192 * h : pl; }
template <int FMT, typename G>
inline void k_off(int h, G&& f) {
    if constexpr (FMT == X6K) f(std::integral_constant<int, 0>{});
    else if (h == 0) f(std::integral_constant<int, 0>{});
    else f(std::integral_constant<int, 8>{});
}
constexpr int BIAS[] = {0, 0, 0, 32, 4, 0, 8, 0, 32, 0, 4, 0};  // what the stored integers exceed the values by (X6K, X3, X4S, X3K)
static_assert(std::size(GBLOCK_BYTES) == N_FMT && std::size(PAYLOAD) == N_FMT && std::size(HALVES) == N_FMT &&
                  std::size(K4_HEAD) == N_FMT && std::size(FIFTH) == N_FMT && std::size(SUPER_BYTES) == N_FMT &&
                  std::size(BIAS) == N_FMT && std::size(HAS_OFFSET) == N_FMT && std::size(K6_HEAD) == N_FMT,
              "a per-format table lacks a format");

// Row r's value at column k of block b, as integer and scales (for unpacking and embedding lookups).
inline void packed_entry(const PW& w, int64_t r, int64_t b, int k, int& q, float& d, float& m) {
    const int64_t GB = GBLOCK_BYTES[w.fmt];
    const uint8_t* gp = w.data + (r / GR) * w.nb * GB;
    const uint8_t *gb = scales_at(gp, w.fmt, w.nb, b), *pl = payload_at(gp, w.fmt, w.nb, b);
    const int j = (int)(r % GR);
    if (w.fmt == X8) {
        d = load_half(gb + 2 * j);
        q = (int8_t)gb[32 + x8_place(j, k)];
        m = 0.f;
        return;
    }
    int byte, shift;
    if (K6_HEAD[w.fmt]) {  // X6K, X3K, X2K: a field of the 48-bit (X2K: 32-bit) number of three (two) words
        if (w.fmt == X6K) x6_place(j, k, byte, shift);
        else xk_place(j, k, w.fmt == X3K ? 3 : 2, byte, shift);
        uint64_t bits = 0;
        for (int i = 0; i < (w.fmt == X2K ? 2 : 3); i++) {
            uint16_t word;
            std::memcpy(&word, pl + byte + 64 * i, 2);
            bits |= (uint64_t)word << (16 * i);
        }
        q = (int)((bits >> shift) & (w.fmt == X6K ? 63 : w.fmt == X3K ? 7 : 3));
    } else {
        x4_place(j, k, byte, shift);
        q = (pl[byte] >> shift) & 0x0F;
    }
    if (FIFTH[w.fmt]) {
        int hbyte, bit;
        x5_place(j, k, hbyte, bit);
        q |= ((plane_at(pl)[hbyte] >> bit) & 1) << 4;
    }
    if (K6_HEAD[w.fmt]) {  // sub-block 2 (b % 8) + k / 16's int8 scale times the super-block's d (X2K: its byte's
        // 4-bit scale times d, its 4-bit min times -dmin)
        const uint8_t sb = gb[32 + 16 * (2 * (b % 8) + k / 16) + j];
        d = load_half(gb + 2 * j) * (w.fmt == X2K ? (float)(sb & 0x0F) : (float)(int8_t)sb);
        m = w.fmt == X2K ? -load_half(gb + X2K_DMIN + 2 * j) * (float)(sb >> 4) : 0.f;
        q -= BIAS[w.fmt];
        return;
    }
    q -= BIAS[w.fmt];
    if (K4_HEAD[w.fmt]) {
        x4k_scale(gb, j, (int)(b % 8), d, m);
        return;
    }
    d = load_half(gb + 2 * j);
    m = w.fmt == X4S ? 0.f : load_half(gb + 32 + 2 * j);
}

void packed_dequant_rows(const PW& w, int64_t r0, int64_t r1, float* out) {
    for (int64_t r = r0; r < r1; r++)
        for (int64_t b = 0; b < w.nb; b++)
            for (int k = 0; k < QK; k++) {
                int q; float d, m;
                packed_entry(w, r, b, k, q, d, m);  // (no offset: d * q alone, so a zero keeps d's sign, as gguf's)
                out[(r - r0) * w.K + b * QK + k] = HAS_OFFSET[w.fmt] ? d * (float)q + m : d * (float)q;
            }
}

struct XQ {  // activations as int16 blocks: T rows of K, with a scale and a sum per 32-value block
    std::vector<int16_t> q;
    std::vector<float> dx, sx, sh;  // sh: dx * the sum of the block's first 16 values (X2K's half-block offsets)
    std::vector<int32_t> hs;  // the integer sums of each block's two 16-value halves (X6's and X3's biases)
    int64_t T = 0, K = 0, nb = 0;
};

// f(std::integral_constant<int, FMT>{}) for the packed format fmt: the one switch from a run-time format to the
// templates instantiated per format.
template <typename F>
inline void with_fmt(int64_t fmt, F&& f) {
    switch (fmt) {
        case X4: f(std::integral_constant<int, X4>{}); break;
        case X5: f(std::integral_constant<int, X5>{}); break;
        case X4S: f(std::integral_constant<int, X4S>{}); break;
        case X4K: f(std::integral_constant<int, X4K>{}); break;
        case X6K: f(std::integral_constant<int, X6K>{}); break;
        case X3K: f(std::integral_constant<int, X3K>{}); break;
        case X2K: f(std::integral_constant<int, X2K>{}); break;
        case X5K: f(std::integral_constant<int, X5K>{}); break;
        default: f(std::integral_constant<int, X8>{}); break;
    }
}

}  // namespace

// The instruction set's inner loops (each header defines the same functions; see isa_plain.h for the list).
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include "isa_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "isa_avx2.h"
#else
#include "isa_plain.h"
#endif
