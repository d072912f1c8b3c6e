// Quantized CPU kernels for tinkerlm: products of activations with weights in ggml block formats (Q8_0, Q4_0,
// Q4_1, read in place from a memory-mapped GGUF), and a fused Llama-family decode step.
//
// A weight row is K / 32 blocks; a block holds an fp16 scale d (Q4_1: and an fp16 offset m) and 32 integers u.
// Activations are rounded to bfloat16; each weight block is expanded once to 32 bfloat16 values (d * u + m) and
// multiplied with every activation row by AVX512-BF16's vdpbf16ps (32 products summed into fp32 lanes). Not
// llama.cpp's 8-bit integer activations: small models' hidden states carry outliers near 10^4, and 8-bit blocks
// then cost ~1% error per projection, enough to change greedy answers, while bfloat16 keeps every value to 3
// significant digits. Expanding a block once and reusing it for up to 16 rows makes batched decoding cheap.
//
// The decode step runs a whole Llama-family forward for one new token per sequence in one call, so a token costs
// the weights' memory traffic rather than thousands of PyTorch dispatches.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define TINKER_AVX512 1
#endif

namespace {

constexpr int QK = 32;  // values per block
constexpr int TILE = 16;  // activation rows sharing one expansion of a weight block (the batch of a decode step)
enum QType { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2 };
constexpr int64_t BLOCK_BYTES[] = {34, 18, 20};

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
    TORCH_CHECK(type >= 0 && type <= 2, "unknown block type ", type);
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

struct QX {  // activations rounded to bfloat16, B rows of K
    std::vector<uint16_t> q;
    int64_t B = 0, K = 0;
};

inline uint16_t to_bf16(float f) {  // round to nearest even, as vcvtneps2bf16 does
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

inline float from_bf16(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

void quantize_rows(const float* x, int64_t B, int64_t K, QX& out) {
    out.B = B; out.K = K;
    out.q.resize(B * K);
    int64_t i = 0;
#ifdef TINKER_AVX512
    for (; i + 16 <= B * K; i += 16)
        _mm256_storeu_si256((__m256i*)(out.q.data() + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
#endif
    for (; i < B * K; i++) out.q[i] = to_bf16(x[i]);
}

// The 32 values of block `blk` as floats.
inline void block_floats(const uint8_t* blk, int type, float* out) {
    const float d = load_half(blk);
    if (type == Q8_0) {
        for (int k = 0; k < QK; k++) out[k] = d * (float)(int8_t)blk[2 + k];
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

// The same as bfloat16, low half values 0..15, high half 16..31.
template <int TYPE>
inline __m512bh expand_block(const uint8_t* blk) {
    __m512 lo, hi;
    expand_floats<TYPE>(blk, lo, hi);
    return _mm512_cvtne2ps_pbh(hi, lo);
}
#endif

// One weight row against up to TILE activation rows. Each block is expanded once to 32 bfloat16 weights
// (d * u + m), then every activation row takes one vdpbf16ps: 32 multiply-adds into fp32, no per-row scaling.
template <int TYPE>
void dot_row(const QW& w, int64_t r, const QX& x, int64_t b0, int nt, float* y) {
    const uint8_t* row = w.data + r * w.row_bytes;
    const int64_t nb = w.nb;
#ifdef TINKER_AVX512
    __m512 acc[TILE];
    for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m512bh wv = expand_block<TYPE>(row + b * BLOCK_BYTES[TYPE]);
        const uint16_t* xb = x.q.data() + b0 * x.K + b * QK;
        for (int t = 0; t < nt; t++)
            acc[t] = _mm512_dpbf16_ps(acc[t], wv, (__m512bh)_mm512_loadu_si512((const void*)(xb + t * x.K)));
    }
    for (int t = 0; t < nt; t++) y[t] = _mm512_reduce_add_ps(acc[t]);
#else
    float wf[QK];
    float total[TILE] = {};
    for (int64_t b = 0; b < nb; b++) {
        block_floats(row + b * BLOCK_BYTES[TYPE], TYPE, wf);
        for (int t = 0; t < nt; t++) {
            const uint16_t* xq = x.q.data() + (b0 + t) * x.K + b * QK;
            for (int k = 0; k < QK; k++) total[t] += from_bf16(to_bf16(wf[k])) * from_bf16(xq[k]);
        }
    }
    for (int t = 0; t < nt; t++) y[t] = total[t];
#endif
}

void dot_rows(const QW& w, int64_t r0, int64_t r1, const QX& x, float* y, int64_t ystride) {
    float tmp[TILE];
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t b0 = 0; b0 < x.B; b0 += TILE) {
            const int nt = (int)std::min<int64_t>(TILE, x.B - b0);
            switch (w.type) {
                case Q8_0: dot_row<Q8_0>(w, r, x, b0, nt, tmp); break;
                case Q4_0: dot_row<Q4_0>(w, r, x, b0, nt, tmp); break;
                default: dot_row<Q4_1>(w, r, x, b0, nt, tmp); break;
            }
            for (int t = 0; t < nt; t++) y[(b0 + t) * ystride + r] = tmp[t];
        }
    }
}

// Several matrices sharing one input (q/k/v, gate/up): y_i (B, rows_i) = x @ W_i^T, all rows split across threads
// in one parallel region.
void matmul_multi(const std::vector<QW>& ws, const QX& x, const std::vector<float*>& ys) {
    std::vector<int64_t> start(ws.size() + 1, 0);
    for (size_t i = 0; i < ws.size(); i++) start[i + 1] = start[i] + ws[i].rows;
    const int64_t total = start.back();
    const int64_t grain = std::max<int64_t>(16, total / (8 * at::get_num_threads()));
    at::parallel_for(0, total, grain, [&](int64_t g0, int64_t g1) {
        for (size_t i = 0; i < ws.size(); i++) {
            const int64_t r0 = std::max(g0, start[i]) - start[i], r1 = std::min(g1, start[i + 1]) - start[i];
            if (r0 < r1) dot_rows(ws[i], r0, r1, x, ys[i], ws[i].rows);
        }
    });
}

template <int TYPE>
void dequant_rows_t(const QW& w, int64_t r0, int64_t r1, float* out) {
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t* row = w.data + r * w.row_bytes;
        for (int64_t b = 0; b < w.nb; b++) {
            float* o = out + (r - r0) * w.K + b * QK;
#ifdef TINKER_AVX512
            __m512 lo, hi;
            expand_floats<TYPE>(row + b * BLOCK_BYTES[TYPE], lo, hi);
            _mm512_storeu_ps(o, lo);
            _mm512_storeu_ps(o + 16, hi);
#else
            block_floats(row + b * BLOCK_BYTES[TYPE], TYPE, o);
#endif
        }
    }
}

void dequant_rows(const QW& w, int64_t r0, int64_t r1, float* out) {
    switch (w.type) {
        case Q8_0: dequant_rows_t<Q8_0>(w, r0, r1, out); break;
        case Q4_0: dequant_rows_t<Q4_0>(w, r0, r1, out); break;
        default: dequant_rows_t<Q4_1>(w, r0, r1, out); break;
    }
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

at::Tensor qmatmul(at::Tensor x, at::Tensor data, int64_t type) {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "qmatmul: x must be float32");
    QW w = as_qw(data, type);
    auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
    TORCH_CHECK(x2.size(1) == w.K, "qmatmul: x has ", x2.size(1), " features, weight expects ", w.K);
    QX xq;
    quantize_rows(x2.data_ptr<float>(), x2.size(0), w.K, xq);
    auto sizes = x.sizes().vec();
    sizes.back() = w.rows;
    auto y = at::empty(sizes, x.options());
    matmul_multi({w}, xq, {y.data_ptr<float>()});
    return y;
}

at::Tensor dequantize(at::Tensor data, int64_t type) {
    QW w = as_qw(data, type);
    auto out = at::empty({w.rows, w.K}, at::kFloat);
    float* o = out.data_ptr<float>();
    at::parallel_for(0, w.rows, 16, [&](int64_t r0, int64_t r1) { dequant_rows(w, r0, r1, o + r0 * w.K); });
    return out;
}

at::Tensor embed(at::Tensor ids, at::Tensor data, int64_t type) {
    QW w = as_qw(data, type);
    auto flat = ids.reshape({-1}).contiguous();
    const int64_t n = flat.size(0);
    auto out = at::empty({n, w.K}, at::kFloat);
    const int64_t* id = flat.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; i++) {
        TORCH_CHECK(id[i] >= 0 && id[i] < w.rows, "token id ", id[i], " out of range");
        dequant_rows(w, id[i], id[i] + 1, out.data_ptr<float>() + i * w.K);
    }
    auto sizes = ids.sizes().vec();
    sizes.push_back(w.K);
    return out.reshape(sizes);
}

// One decode step of a Llama-family model for B sequences, one new token each, written at `positions` into cache
// rows `rows`. Per layer, 14 tensors: input_norm, wq, wk, wv, bq, bk, bv (biases may be empty), q_norm, k_norm
// (may be empty), wo, post_norm, w_gate, w_up, w_down; `types` (L, 7) gives the block type of wq..w_down.
// head: final_norm, lm_head, embedding; head_types: their two block types. Returns logits (B, V).
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

    QW emb = as_qw(head[2], hty[1]);
    const int64_t C = emb.K, half = hd / 2;
    const int64_t q_dim = n_heads * hd, kv_dim = n_kv * hd;
    std::vector<float> x(B * C), h(B * C), q(B * q_dim), k(B * kv_dim), v(B * kv_dim), att(B * q_dim), tmp(B * C);
    std::vector<float> gate, up, cs(B * half), sn(B * half);
    for (int64_t b = 0; b < B; b++) {
        dequant_rows(emb, tok[b], tok[b] + 1, x.data() + b * C);
        for (int64_t i = 0; i < half; i++) {  // RoPE tables: one position per row, shared by every layer
            const float f = (float)pos[b] * inv_freq.data_ptr<float>()[i];
            cs[b * half + i] = std::cos(f);
            sn[b * half + i] = std::sin(f);
        }
    }
    QX xq;
    for (int64_t l = 0; l < L; l++) {
        const at::Tensor* t = layers.data() + l * PER_LAYER;
        const int64_t* lt = ty + l * 7;
        // attention
        for (int64_t b = 0; b < B; b++) rmsnorm(x.data() + b * C, t[0].data_ptr<float>(), h.data() + b * C, C, feps);
        quantize_rows(h.data(), B, C, xq);
        matmul_multi({as_qw(t[1], lt[0]), as_qw(t[2], lt[1]), as_qw(t[3], lt[2])}, xq, {q.data(), k.data(), v.data()});
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
        quantize_rows(att.data(), B, q_dim, xq);
        matmul_multi({as_qw(t[9], lt[3])}, xq, {tmp.data()});
        for (int64_t i = 0; i < B * C; i++) x[i] += tmp[i];
        // MLP
        for (int64_t b = 0; b < B; b++) rmsnorm(x.data() + b * C, t[10].data_ptr<float>(), h.data() + b * C, C, feps);
        QW wg = as_qw(t[11], lt[4]), wu = as_qw(t[12], lt[5]), wd = as_qw(t[13], lt[6]);
        const int64_t I = wg.rows;
        gate.resize(B * I);
        up.resize(B * I);
        quantize_rows(h.data(), B, C, xq);
        matmul_multi({wg, wu}, xq, {gate.data(), up.data()});
        for (int64_t i = 0; i < B * I; i++) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
        quantize_rows(gate.data(), B, I, xq);
        matmul_multi({wd}, xq, {tmp.data()});
        for (int64_t i = 0; i < B * C; i++) x[i] += tmp[i];
    }
    for (int64_t b = 0; b < B; b++) rmsnorm(x.data() + b * C, head[0].data_ptr<float>(), h.data() + b * C, C, feps);
    QW lm = as_qw(head[1], hty[0]);
    auto logits = at::empty({B, lm.rows}, at::kFloat);
    quantize_rows(h.data(), B, C, xq);
    matmul_multi({lm}, xq, {logits.data_ptr<float>()});
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
#endif

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
            _mm512_storeu_ps(op + i, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid16(g)), _mm512_loadu_ps(up_ + i)));
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
    mod.def("qmatmul", &qmatmul, "y = x @ dequant(W).T with bfloat16 products");
    mod.def("dequantize", &dequantize, "weight blocks -> float32 (rows, K)");
    mod.def("embed", &embed, "embedding rows from a table in blocks");
    mod.def("llama_decode", &llama_decode, "one fused decode step of a Llama-family model");
#ifdef TINKER_AVX512
    mod.attr("isa") = "avx512-bf16";
#else
    mod.attr("isa") = "scalar";
#endif
}
