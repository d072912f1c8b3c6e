// Quantized weights: GGUF blocks repacked into the layout the products read (and back, bit for bit),
// dequantized to float, and the products y = x @ W^T with activations rounded to int16 blocks (see common.h for
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

// Round each 32-value block to int16: dx = amax / 32767, q = round_half_even(x * (32767 / amax)).
void quantize_acts(const float* x, int64_t T, int64_t K, XQ& out) {
    out.T = T; out.K = K; out.nb = K / QK;
    out.q.resize(T * K);
    out.dx.resize(T * out.nb);
    out.sx.resize(T * out.nb);
    auto block = [&](int64_t i) {  // i: block index over all rows
        const float* xb = x + i * QK;
        int16_t* qb = out.q.data() + i * QK;
        float amax;
        int32_t s;
        round_block(xb, qb, amax, s);
        out.dx[i] = amax / 32767.f;
        out.sx[i] = out.dx[i] * (float)s;
    };
    const int64_t n = T * out.nb;
    if (n < 1024) { for (int64_t i = 0; i < n; i++) block(i); return; }
    at::parallel_for(0, n, 256, [&](int64_t i0, int64_t i1) { for (int64_t i = i0; i < i1; i++) block(i); });
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
