// Quantized CPU kernels for tinkerlm: int8-activation x 4/8-bit-weight products and a fused Llama decode step.
//
// Weight format ("packed", made by tinkerlm/quant/qtensor.py): rows of K values in blocks of 32, each block with an
// fp16 scale d and fp16 offset m, value = d * u + m with u an unsigned integer:
//   bits = 8: u8[rows][K], one byte a value (Q8_0 is stored as q + 128 with m = -128 d);
//   bits = 4: u8[rows][K / 2]; blocks go in pairs (2p, 2p+1) and byte k of a pair holds u[2p][k] in its low nibble
//             and u[2p+1][k] in its high one, so unpacking a pair gives 64 values already in order.
// Activations are quantized per block of 32 to int16 with scale xd and block sum xs = xd * sum(q) (like llama.cpp's
// Q8_1 blocks, with 16 bits), so a block's dot product is d * xd * sum(u * q) + m * xs: integer products, two float
// multiplies. With AVX512-VNNI, vpdpwssd multiplies and adds 32 16-bit pairs a step.
//
// The decode step runs a whole Llama-family forward for one new token per sequence in one call, so the per-token
// cost is the weights' memory traffic, not thousands of PyTorch dispatches.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define TINKER_AVX512 1
#endif

namespace {

constexpr int QK = 32;  // values per block

inline float half_to_float(uint16_t h) {
    return c10::detail::fp16_ieee_to_fp32_value(h);
}

struct QW {  // a packed weight matrix
    const uint8_t* q;
    const uint16_t* d;
    const uint16_t* m;
    int64_t rows, K, nb;
    int bits;
    int64_t row_bytes() const { return bits == 8 ? K : K / 2; }
};

QW as_qw(const at::Tensor& q, const at::Tensor& d, const at::Tensor& m) {
    TORCH_CHECK(q.is_contiguous() && d.is_contiguous() && m.is_contiguous(), "packed weight must be contiguous");
    QW w;
    w.q = q.data_ptr<uint8_t>();
    w.d = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
    w.m = reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>());
    w.rows = q.size(0);
    w.nb = d.size(1);
    w.K = w.nb * QK;
    w.bits = q.size(1) == w.K ? 8 : 4;  // one byte a value, or two values a byte
    TORCH_CHECK(q.size(1) == (w.bits == 8 ? w.K : w.K / 2), "packed weight: bytes and scales disagree");
    return w;
}

struct QX {  // quantized activations, B rows of K
    std::vector<int16_t> q;
    std::vector<float> d, s;
    int64_t B, K, nb;
};

// Quantize B rows of K floats to int16 blocks of 32 (symmetric, round to nearest even). 16 bits rather than
// llama.cpp's 8: hidden states of small models carry outliers of 10^4, and 8-bit blocks then cost ~1% error
// per projection, enough to flip greedy choices; 16 bits make the product as good as float.
void quantize_rows(const float* x, int64_t B, int64_t K, QX& out) {
    out.B = B; out.K = K; out.nb = K / QK;
    out.q.resize(B * K); out.d.resize(B * out.nb); out.s.resize(B * out.nb);
    for (int64_t i = 0; i < B * out.nb; i++) {
        const float* xb = x + i * QK;
        float amax = 0.f;
        for (int j = 0; j < QK; j++) amax = std::max(amax, std::fabs(xb[j]));
        const float d = amax / 32767.f, id = d > 0 ? 1.f / d : 0.f;
        int32_t sum = 0;
        for (int j = 0; j < QK; j++) {
            const int v = (int)std::nearbyint(xb[j] * id);
            out.q[i * QK + j] = (int16_t)v;
            sum += v;
        }
        out.d[i] = d;
        out.s[i] = d * (float)sum;
    }
}

// One weight row against up to 4 activation rows: y[t] = sum over blocks of d*xd*dot(u, q) + m*xs.
void dot_row(const QW& w, int64_t r, const QX& x, int64_t b0, int nt, float* y /* [nt] */) {
    const uint8_t* wq = w.q + r * w.row_bytes();
    const uint16_t* wd = w.d + r * w.nb;
    const uint16_t* wm = w.m + r * w.nb;
    const int64_t nb = w.nb;
#ifdef TINKER_AVX512
    __m512 acc[4], macc[4];
    for (int t = 0; t < nt; t++) acc[t] = macc[t] = _mm512_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0F);
    alignas(64) float sc[4][16];
    for (int64_t c = 0; c < nb; c += 16) {  // chunks of 16 blocks: their scales in one vector op
        const int n = (int)std::min<int64_t>(16, nb - c);
        const __mmask16 mk = (__mmask16)((1u << n) - 1);
        const __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, wd + c));
        const __m512 mw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, wm + c));
        for (int t = 0; t < nt; t++) {
            const float* xd = x.d.data() + (b0 + t) * nb + c;
            const float* xs = x.s.data() + (b0 + t) * nb + c;
            _mm512_store_ps(sc[t], _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(mk, xd)));
            macc[t] = _mm512_fmadd_ps(mw, _mm512_maskz_loadu_ps(mk, xs), macc[t]);
        }
        for (int j = 0; j < n; j += 2) {  // a pair of blocks per step (nb is even for 4 bits)
            const int64_t blk = c + j;
            __m512i w0, w1;
            if (w.bits == 4) {
                const __m256i p = _mm256_loadu_si256((const __m256i*)(wq + blk * 16));
                w0 = _mm512_cvtepu8_epi16(_mm256_and_si256(p, low));
                w1 = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(p, 4), low));
            } else {
                w0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(wq + blk * QK)));
                w1 = j + 1 < n ? _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(wq + (blk + 1) * QK)))
                               : _mm512_setzero_si512();
            }
            for (int t = 0; t < nt; t++) {
                const int16_t* xq = x.q.data() + (b0 + t) * x.K + blk * QK;
                const __m512i i0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512((const void*)xq));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_set1_ps(sc[t][j]), acc[t]);
                if (j + 1 < n) {
                    const __m512i i1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w1, _mm512_loadu_si512((const void*)(xq + QK)));
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_set1_ps(sc[t][j + 1]), acc[t]);
                }
            }
        }
    }
    for (int t = 0; t < nt; t++) y[t] = _mm512_reduce_add_ps(acc[t]) + _mm512_reduce_add_ps(macc[t]);
#else
    for (int t = 0; t < nt; t++) {
        const int16_t* xq = x.q.data() + (b0 + t) * x.K;
        const float* xd = x.d.data() + (b0 + t) * nb;
        const float* xs = x.s.data() + (b0 + t) * nb;
        float total = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            int32_t isum = 0;
            for (int k = 0; k < QK; k++) {
                int u;
                if (w.bits == 8) {
                    u = wq[b * QK + k];
                } else {
                    const uint8_t byte = wq[(b & ~1) * 16 + k];
                    u = (b & 1) ? (byte >> 4) : (byte & 0x0F);
                }
                isum += u * (int32_t)xq[b * QK + k];
            }
            total += half_to_float(wd[b]) * xd[b] * (float)isum + half_to_float(wm[b]) * xs[b];
        }
        y[t] = total;
    }
#endif
}

// y (B, rows) = x (B, K) @ W^T for pre-quantized activations; rows split across threads.
void qmatmul_into(const QW& w, const QX& x, float* y) {
    const int64_t B = x.B;
    const int64_t grain = std::max<int64_t>(1, w.rows / (4 * at::get_num_threads()));
    at::parallel_for(0, w.rows, grain, [&](int64_t r0, int64_t r1) {
        float tmp[4];
        for (int64_t r = r0; r < r1; r++) {
            for (int64_t b0 = 0; b0 < B; b0 += 4) {
                const int nt = (int)std::min<int64_t>(4, B - b0);
                dot_row(w, r, x, b0, nt, tmp);
                for (int t = 0; t < nt; t++) y[(b0 + t) * w.rows + r] = tmp[t];
            }
        }
    });
}

void dequant_rows(const QW& w, int64_t r0, int64_t r1, float* out) {
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t* wq = w.q + r * w.row_bytes();
        float* o = out + (r - r0) * w.K;
        for (int64_t b = 0; b < w.nb; b++) {
            const float d = half_to_float(w.d[r * w.nb + b]), m = half_to_float(w.m[r * w.nb + b]);
            float* ob = o + b * QK;
            if (w.bits == 8) {
                const uint8_t* u = wq + b * QK;
                for (int k = 0; k < QK; k++) ob[k] = d * (float)u[k] + m;
            } else {
                const uint8_t* u = wq + (b & ~1) * 16;
                const int shift = (b & 1) ? 4 : 0;
                for (int k = 0; k < QK; k++) ob[k] = d * (float)((u[k] >> shift) & 0x0F) + m;
            }
        }
    }
}

void rmsnorm(const float* x, const float* g, float* out, int64_t n, float eps) {
    double ss = 0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float inv = 1.f / std::sqrt((float)(ss / n) + eps);
    for (int64_t i = 0; i < n; i++) out[i] = g[i] * (x[i] * inv);
}

// Rotate-half RoPE on one head vector at position pos.
void rope(float* v, int64_t hd, const float* inv_freq, int64_t pos) {
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) {
        const float f = (float)pos * inv_freq[i];
        const float c = std::cos(f), s = std::sin(f);
        const float a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Ops exposed to Python

at::Tensor qmatmul(at::Tensor x, at::Tensor q, at::Tensor d, at::Tensor m) {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "qmatmul: x must be float32");
    QW w = as_qw(q, d, m);
    auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
    TORCH_CHECK(x2.size(1) == w.K, "qmatmul: x has ", x2.size(1), " features, weight expects ", w.K);
    QX xq;
    quantize_rows(x2.data_ptr<float>(), x2.size(0), w.K, xq);
    auto sizes = x.sizes().vec();
    sizes.back() = w.rows;
    auto y = at::empty(sizes, x.options());
    qmatmul_into(w, xq, y.data_ptr<float>());
    return y;
}

at::Tensor dequantize(at::Tensor q, at::Tensor d, at::Tensor m) {
    QW w = as_qw(q, d, m);
    auto out = at::empty({w.rows, w.K}, at::kFloat);
    float* o = out.data_ptr<float>();
    at::parallel_for(0, w.rows, 16, [&](int64_t r0, int64_t r1) { dequant_rows(w, r0, r1, o + r0 * w.K); });
    return out;
}

// Embedding rows from a packed table.
at::Tensor embed(at::Tensor ids, at::Tensor q, at::Tensor d, at::Tensor m) {
    QW w = as_qw(q, d, m);
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

// One decode step of a Llama-family model for B sequences, one new token each.
//
// layers: per layer, in order: input_norm, qkv (q, d, m), qkv_bias (or empty), q_norm, k_norm (or empty),
//         o (q, d, m), post_norm, gate_up (q, d, m), down (q, d, m)  -> 17 tensors a layer
// head:   final_norm, lm_head (q, d, m), embed (q, d, m)
// k_cache / v_cache: per layer (Bc, n_kv, S, hd) float, rows `rows` of the batch written at `positions`.
at::Tensor llama_decode(at::Tensor tokens, at::Tensor positions, at::Tensor rows, std::vector<at::Tensor> layers,
                        std::vector<at::Tensor> head, std::vector<at::Tensor> k_cache, std::vector<at::Tensor> v_cache,
                        at::Tensor inv_freq, int64_t n_heads, int64_t n_kv, int64_t hd, double eps, int64_t window) {
    constexpr int PER_LAYER = 17;
    const int64_t B = tokens.size(0);
    const int64_t L = (int64_t)layers.size() / PER_LAYER;
    const int64_t* tok = tokens.data_ptr<int64_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* row = rows.data_ptr<int64_t>();
    const float* freq = inv_freq.data_ptr<float>();

    QW emb = as_qw(head[4], head[5], head[6]);
    const int64_t C = emb.K;
    const int64_t q_dim = n_heads * hd, kv_dim = n_kv * hd, qkv_dim = q_dim + 2 * kv_dim;
    std::vector<float> x(B * C), h(B * C), qkv(B * qkv_dim), att(B * q_dim), tmp(B * C), gu, act;
    for (int64_t b = 0; b < B; b++) dequant_rows(emb, tok[b], tok[b] + 1, x.data() + b * C);
    QX xq;

    for (int64_t l = 0; l < L; l++) {
        const at::Tensor* t = layers.data() + l * PER_LAYER;
        // attention
        for (int64_t b = 0; b < B; b++) rmsnorm(x.data() + b * C, t[0].data_ptr<float>(), h.data() + b * C, C, (float)eps);
        QW wqkv = as_qw(t[1], t[2], t[3]);
        quantize_rows(h.data(), B, C, xq);
        qmatmul_into(wqkv, xq, qkv.data());
        if (t[4].numel()) {
            const float* bias = t[4].data_ptr<float>();
            for (int64_t b = 0; b < B; b++)
                for (int64_t i = 0; i < qkv_dim; i++) qkv[b * qkv_dim + i] += bias[i];
        }
        for (int64_t b = 0; b < B; b++) {
            float* qb = qkv.data() + b * qkv_dim;
            float* kb = qb + q_dim;
            float* vb = kb + kv_dim;
            if (t[5].numel()) {  // per-head q/k RMSNorm (Qwen3), before RoPE
                for (int64_t hh = 0; hh < n_heads; hh++) rmsnorm(qb + hh * hd, t[5].data_ptr<float>(), qb + hh * hd, hd, (float)eps);
                for (int64_t hh = 0; hh < n_kv; hh++) rmsnorm(kb + hh * hd, t[6].data_ptr<float>(), kb + hh * hd, hd, (float)eps);
            }
            for (int64_t hh = 0; hh < n_heads; hh++) rope(qb + hh * hd, hd, freq, pos[b]);
            for (int64_t hh = 0; hh < n_kv; hh++) rope(kb + hh * hd, hd, freq, pos[b]);
            auto& kc = k_cache[l];
            auto& vc = v_cache[l];
            const int64_t S = kc.size(2);
            TORCH_CHECK(pos[b] < S, "position ", pos[b], " beyond the cache of ", S);
            float* kbase = kc.data_ptr<float>() + row[b] * n_kv * S * hd;
            float* vbase = vc.data_ptr<float>() + row[b] * n_kv * S * hd;
            for (int64_t hh = 0; hh < n_kv; hh++) {
                std::copy(kb + hh * hd, kb + (hh + 1) * hd, kbase + (hh * S + pos[b]) * hd);
                std::copy(vb + hh * hd, vb + (hh + 1) * hd, vbase + (hh * S + pos[b]) * hd);
            }
        }
        // scores over each row's own keys, (b, head) pairs across threads
        at::parallel_for(0, B * n_heads, 1, [&](int64_t i0, int64_t i1) {
            std::vector<float> sc;
            for (int64_t i = i0; i < i1; i++) {
                const int64_t b = i / n_heads, hh = i % n_heads, g = hh / (n_heads / n_kv);
                const int64_t S = k_cache[l].size(2);
                const int64_t start = window > 0 ? std::max<int64_t>(0, pos[b] - window + 1) : 0, n = pos[b] + 1 - start;
                const float* qv = qkv.data() + b * qkv_dim + hh * hd;
                const float* kbase = k_cache[l].data_ptr<float>() + ((row[b] * n_kv + g) * S + start) * hd;
                const float* vbase = v_cache[l].data_ptr<float>() + ((row[b] * n_kv + g) * S + start) * hd;
                sc.resize(n);
                const float scale = 1.f / std::sqrt((float)hd);
                float mx = -INFINITY;
                for (int64_t j = 0; j < n; j++) {
                    float s = 0.f;
                    for (int64_t k = 0; k < hd; k++) s += qv[k] * kbase[j * hd + k];
                    sc[j] = s * scale;
                    mx = std::max(mx, sc[j]);
                }
                float den = 0.f;
                for (int64_t j = 0; j < n; j++) { sc[j] = std::exp(sc[j] - mx); den += sc[j]; }
                float* out = att.data() + b * q_dim + hh * hd;
                std::fill(out, out + hd, 0.f);
                for (int64_t j = 0; j < n; j++) {
                    const float p = sc[j] / den;
                    for (int64_t k = 0; k < hd; k++) out[k] += p * vbase[j * hd + k];
                }
            }
        });
        QW wo = as_qw(t[7], t[8], t[9]);
        quantize_rows(att.data(), B, q_dim, xq);
        qmatmul_into(wo, xq, tmp.data());
        for (int64_t i = 0; i < B * C; i++) x[i] += tmp[i];
        // MLP
        for (int64_t b = 0; b < B; b++) rmsnorm(x.data() + b * C, t[10].data_ptr<float>(), h.data() + b * C, C, (float)eps);
        QW wgu = as_qw(t[11], t[12], t[13]);
        const int64_t I = wgu.rows / 2;
        gu.resize(B * 2 * I);
        act.resize(B * I);
        quantize_rows(h.data(), B, C, xq);
        qmatmul_into(wgu, xq, gu.data());
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < I; i++) {
                const float g = gu[b * 2 * I + i], u = gu[b * 2 * I + I + i];
                act[b * I + i] = g / (1.f + std::exp(-g)) * u;
            }
        QW wdown = as_qw(t[14], t[15], t[16]);
        quantize_rows(act.data(), B, I, xq);
        qmatmul_into(wdown, xq, tmp.data());
        for (int64_t i = 0; i < B * C; i++) x[i] += tmp[i];
    }
    for (int64_t b = 0; b < B; b++) rmsnorm(x.data() + b * C, head[0].data_ptr<float>(), h.data() + b * C, C, (float)eps);
    QW lm = as_qw(head[1], head[2], head[3]);
    auto logits = at::empty({B, lm.rows}, at::kFloat);
    quantize_rows(h.data(), B, C, xq);
    qmatmul_into(lm, xq, logits.data_ptr<float>());
    return logits;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
    mod.def("qmatmul", &qmatmul, "y = x @ dequant(W).T with int8 activations");
    mod.def("dequantize", &dequantize, "packed weight -> float32 (rows, K)");
    mod.def("embed", &embed, "embedding rows from a packed table");
    mod.def("llama_decode", &llama_decode, "one fused decode step of a Llama-family model");
#ifdef TINKER_AVX512
    mod.attr("isa") = "avx512-vnni";
#else
    mod.attr("isa") = "scalar";
#endif
}
