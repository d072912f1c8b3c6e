// The fused decode step: a whole Llama-family forward for one new token per sequence in one call, so a token
// costs the weights' memory traffic rather than thousands of PyTorch dispatches (tinkerlm/quant/decode.py builds
// its arguments). Built from the products (quantized.cpp) and the per-vector helpers (elementwise.cpp).
// Gemma 3 runs through the same step: its extra norms are optional fields of a layer, its window and RoPE table
// are per layer, and its GELU, embedding, query and logit scales are arguments (Llama's are SiLU, 1, 1/sqrt(hd)
// and none); its (1 + w) norms arrive with the 1 added.

#pragma once

#include "common.h"
#include "elementwise.cpp"
#include "quantized.cpp"

namespace {

// A packed weight matrix as the decode step holds it: the packed bytes, their format (Fmt) and the row count.
struct PackedMatrix {
    at::Tensor data;
    int64_t fmt, rows;
};

PW as_pw(const PackedMatrix& m) { return as_pw(m.data, m.fmt, m.rows); }

// One layer's weights. Norm weights and biases are float32; the biases (Qwen2), the per-head q/k norms (Qwen3,
// Gemma) and the norms of the attention and MLP outputs (Gemma's sandwich) may be empty tensors.
struct DecodeLayer {
    at::Tensor input_norm;
    PackedMatrix wq, wk, wv;
    at::Tensor bq, bk, bv, q_norm, k_norm;
    PackedMatrix wo;
    at::Tensor attn_out_norm, post_norm;  // post_norm: the MLP's input norm
    PackedMatrix w_gate, w_up, w_down;
    at::Tensor mlp_out_norm;
    at::Tensor inv_freq;  // this layer's RoPE frequencies (hd / 2,): Gemma's local and global layers differ
    int64_t window;       // sliding-window length, 0: the whole context
};

// The weights outside the layers: the final norm, the output head and the embedding table.
struct DecodeHead {
    at::Tensor final_norm;
    PackedMatrix lm_head, embedding;
};

// The 8-bit KV cache (kv_cache="q8", tinkerlm/models/base.py KVCache): per (token, head) one record of hd int8
// values then their fp32 scale. Rounding as base.py's quantize_kv (x * (127 / amax), half to even), so the decode
// step writes the bytes the PyTorch path would. The scale multiplies a whole key's score or value's weight once.
inline void kv_quantize(const float* x, int64_t hd, int8_t* rec) {
    float amax = 0.f;
    for (int64_t d = 0; d < hd; d++) amax = std::max(amax, std::fabs(x[d]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f, scale = amax / 127.f;
    for (int64_t d = 0; d < hd; d++) rec[d] = (int8_t)std::nearbyint(x[d] * inv);
    std::memcpy(rec + hd, &scale, sizeof(float));
}

inline float kv_scale(const int8_t* rec, int64_t hd) {
    float s;
    std::memcpy(&s, rec + hd, sizeof(float));
    return s;
}

// a . float(b) and y += a * float(x) over int8 values, widened 16 (AVX-512) or 8 (AVX2) at a time.
inline float dot_i8(const float* a, const int8_t* b, int64_t n) {
    int64_t i = 0;
    float s = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        const __m512 bf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + i))));
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), bf, acc);
    }
    s = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 bf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(b + i))));
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), bf, acc);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_hadd_ps(h, h);
    s = _mm_cvtss_f32(_mm_hadd_ps(h, h));
#endif
    for (; i < n; i++) s += a[i] * (float)b[i];
    return s;
}

inline void axpy_i8(float a, const int8_t* x, float* y, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 av = _mm512_set1_ps(a);
    for (; i + 16 <= n; i += 16) {
        const __m512 xf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(x + i))));
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, xf, _mm512_loadu_ps(y + i)));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 av = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) {
        const __m256 xf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(x + i))));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, xf, _mm256_loadu_ps(y + i)));
    }
#endif
    for (; i < n; i++) y[i] += a * (float)x[i];
}

// x += y for B rows of C, y first RMS-normed by `norm` where it is not empty (Gemma's post-attention and
// post-MLP norms; in place in y).
inline void add_normed(float* x, float* y, const at::Tensor& norm, int64_t B, int64_t C, float eps) {
    if (norm.numel())
        for (int64_t b = 0; b < B; b++) rmsnorm(y + b * C, norm.data_ptr<float>(), y + b * C, C, eps);
    for (int64_t i = 0; i < B * C; i++) x[i] += y[i];
}

}  // namespace

// Seconds spent in each phase of llama_decode since profiling was switched on (decode_profile(true)); the
// phases are named in DECODE_PHASES. Off by default: a clock read costs ~20 ns, 8 a layer.
constexpr int N_PHASES = 7;
const char* DECODE_PHASES[N_PHASES] = {"norms, rounding, residuals", "q/k/v products", "RoPE, cache write, attention",
                                      "o products", "gate/up products + GLU", "down products", "output head"};
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
// rows `rows`: each layer's weights in `layers`, the final norm, output head and embedding in `head`. `scale`
// multiplies the attention scores, `embed_scale` the embedding rows; `gelu`: the MLP is GELU-tanh gated, not
// SiLU; `softcap` > 0: logits become tanh(logits / softcap) * softcap. Returns (B, V).
at::Tensor llama_decode(at::Tensor tokens, at::Tensor positions, at::Tensor rows, const std::vector<DecodeLayer>& layers,
                        const DecodeHead& head, std::vector<at::Tensor> k_cache, std::vector<at::Tensor> v_cache,
                        int64_t n_heads, int64_t n_kv, int64_t hd, double eps, double scale, double embed_scale,
                        bool gelu, double softcap) {
    const int64_t B = tokens.size(0);
    const int64_t L = (int64_t)layers.size();
    const int64_t* tok = tokens.data_ptr<int64_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* row = rows.data_ptr<int64_t>();
    const float feps = (float)eps;

    PW emb = as_pw(head.embedding);
    const int64_t C = emb.K, half = hd / 2;
    const int64_t q_dim = n_heads * hd, kv_dim = n_kv * hd;
    // The cache: float32 (B, n_kv, S, hd) per layer, or 8-bit records (B, n_kv, S, hd + 4) int8 (kv_cache="q8")
    TORCH_CHECK(k_cache.size() == layers.size() && v_cache.size() == layers.size(), "one cache tensor per layer");
    const bool q8 = L > 0 && k_cache[0].scalar_type() == at::kChar;
    const int64_t rec = hd + 4;  // bytes per record
    for (int64_t l = 0; l < L; l++)
        for (const at::Tensor& c : {k_cache[l], v_cache[l]}) {
            TORCH_CHECK(c.dim() == 4 && c.is_contiguous() && c.size(1) == n_kv && c.size(3) == (q8 ? rec : hd) &&
                            c.scalar_type() == (q8 ? at::kChar : at::kFloat),
                        "decode: cache tensors must be contiguous (B, n_kv, S, hd) float32 or (B, n_kv, S, hd + 4) int8");
            for (int64_t b = 0; b < B; b++) TORCH_CHECK(row[b] >= 0 && row[b] < c.size(0), "cache row out of range");
        }
    std::vector<float> x(B * C), h(B * C), q(B * q_dim), k(B * kv_dim), v(B * kv_dim), att(B * q_dim), tmp(B * C);
    std::vector<float> gate;
    for (int64_t b = 0; b < B; b++) {
        TORCH_CHECK(tok[b] >= 0 && tok[b] < emb.rows, "token id ", tok[b], " out of range");
        packed_dequant_rows(emb, tok[b], tok[b] + 1, x.data() + b * C);
        if (embed_scale != 1.0)
            for (int64_t i = 0; i < C; i++) x[b * C + i] *= (float)embed_scale;
    }
    // RoPE tables (cos, sin), one position per row, for each distinct frequency tensor of the layers (one for
    // Llama, local and global for Gemma); `table[l]` is layer l's.
    std::vector<const float*> freqs;
    std::vector<std::vector<float>> cs, sn;
    std::vector<size_t> table(L);
    for (int64_t l = 0; l < L; l++) {
        const at::Tensor& f = layers[l].inv_freq;
        TORCH_CHECK(f.scalar_type() == at::kFloat && f.is_contiguous() && f.numel() == half, "inv_freq must be (hd / 2,) float32");
        const float* fp = f.data_ptr<float>();
        table[l] = std::find(freqs.begin(), freqs.end(), fp) - freqs.begin();
        if (table[l] < freqs.size()) continue;
        freqs.push_back(fp);
        cs.emplace_back(B * half);
        sn.emplace_back(B * half);
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < half; i++) {
                const float a = (float)pos[b] * fp[i];
                cs.back()[b * half + i] = std::cos(a);
                sn.back()[b * half + i] = std::sin(a);
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
        const DecodeLayer& layer = layers[l];
        // attention
        for (int64_t b = 0; b < B; b++) rmsnorm(x.data() + b * C, layer.input_norm.data_ptr<float>(), h.data() + b * C, C, feps);
        quantize_acts(h.data(), B, C, xq);
        lap(0);
        matmul_multi({as_pw(layer.wq), as_pw(layer.wk), as_pw(layer.wv)}, xq, {q.data(), k.data(), v.data()});
        lap(1);
        for (int i = 0; i < 3; i++) {
            const at::Tensor& bias = i == 0 ? layer.bq : i == 1 ? layer.bk : layer.bv;
            if (!bias.numel()) continue;
            float* y = i == 0 ? q.data() : i == 1 ? k.data() : v.data();
            const int64_t n = bias.numel();
            for (int64_t b = 0; b < B; b++)
                for (int64_t j = 0; j < n; j++) y[b * n + j] += bias.data_ptr<float>()[j];
        }
        const float* lcs = cs[table[l]].data();
        const float* lsn = sn[table[l]].data();
        for (int64_t b = 0; b < B; b++) {
            float* qb = q.data() + b * q_dim;
            float* kb = k.data() + b * kv_dim;
            const float* vb = v.data() + b * kv_dim;
            for (int64_t hh = 0; hh < n_heads; hh++) {
                if (layer.q_norm.numel()) rmsnorm(qb + hh * hd, layer.q_norm.data_ptr<float>(), qb + hh * hd, hd, feps);  // Qwen3, Gemma
                rope(qb + hh * hd, hd, lcs + b * half, lsn + b * half);
            }
            const int64_t S = k_cache[l].size(2);
            TORCH_CHECK(pos[b] < S, "position ", pos[b], " beyond the cache of ", S);
            for (int64_t hh = 0; hh < n_kv; hh++) {
                if (layer.k_norm.numel()) rmsnorm(kb + hh * hd, layer.k_norm.data_ptr<float>(), kb + hh * hd, hd, feps);
                rope(kb + hh * hd, hd, lcs + b * half, lsn + b * half);
                const int64_t slot = (row[b] * n_kv + hh) * S + pos[b];
                if (q8) {
                    kv_quantize(kb + hh * hd, hd, k_cache[l].data_ptr<int8_t>() + slot * rec);
                    kv_quantize(vb + hh * hd, hd, v_cache[l].data_ptr<int8_t>() + slot * rec);
                } else {
                    std::copy(kb + hh * hd, kb + (hh + 1) * hd, k_cache[l].data_ptr<float>() + slot * hd);
                    std::copy(vb + hh * hd, vb + (hh + 1) * hd, v_cache[l].data_ptr<float>() + slot * hd);
                }
            }
        }
        // each row attends over its own keys; (row, head) pairs across threads
        const int64_t window = layer.window;
        const float fscale = (float)scale;
        at::parallel_for(0, B * n_heads, 1, [&](int64_t i0, int64_t i1) {
            std::vector<float> sc;
            for (int64_t i = i0; i < i1; i++) {
                const int64_t b = i / n_heads, hh = i % n_heads, g = hh / (n_heads / n_kv);
                const int64_t S = k_cache[l].size(2);
                const int64_t start = window > 0 ? std::max<int64_t>(0, pos[b] - window + 1) : 0, n = pos[b] + 1 - start;
                const float* qv = q.data() + b * q_dim + hh * hd;
                const int64_t first = (row[b] * n_kv + g) * S + start;  // the slot of key `start`
                sc.resize(n);
                float mx = -INFINITY;
                if (q8) {  // 8-bit records read in place: the scale applies to the whole score
                    const int8_t* kb = k_cache[l].data_ptr<int8_t>() + first * rec;
                    for (int64_t j = 0; j < n; j++) {
                        sc[j] = dot_i8(qv, kb + j * rec, hd) * (kv_scale(kb + j * rec, hd) * fscale);
                        mx = std::max(mx, sc[j]);
                    }
                } else {
                    const float* kb = k_cache[l].data_ptr<float>() + first * hd;
                    for (int64_t j = 0; j < n; j++) {
                        sc[j] = dot(qv, kb + j * hd, hd) * fscale;
                        mx = std::max(mx, sc[j]);
                    }
                }
                int64_t j = 0;  // exp over whole vectors (isa_*.h), the scalar tail here
                float den = exp_sum_vec(sc.data(), n, mx, j);
                for (; j < n; j++) { sc[j] = std::exp(sc[j] - mx); den += sc[j]; }
                float* out = att.data() + b * q_dim + hh * hd;
                std::fill(out, out + hd, 0.f);
                if (q8) {  // and to the whole value's softmax weight
                    const int8_t* vb = v_cache[l].data_ptr<int8_t>() + first * rec;
                    for (int64_t j = 0; j < n; j++) axpy_i8(sc[j] / den * kv_scale(vb + j * rec, hd), vb + j * rec, out, hd);
                } else {
                    const float* vb = v_cache[l].data_ptr<float>() + first * hd;
                    for (int64_t j = 0; j < n; j++) axpy(sc[j] / den, vb + j * hd, out, hd);
                }
            }
        });
        lap(2);
        quantize_acts(att.data(), B, q_dim, xq);
        lap(0);
        matmul_multi({as_pw(layer.wo)}, xq, {tmp.data()});
        lap(3);
        add_normed(x.data(), tmp.data(), layer.attn_out_norm, B, C, feps);
        // MLP
        for (int64_t b = 0; b < B; b++) rmsnorm(x.data() + b * C, layer.post_norm.data_ptr<float>(), h.data() + b * C, C, feps);
        PW wg = as_pw(layer.w_gate), wu = as_pw(layer.w_up), wd = as_pw(layer.w_down);
        const int64_t I = wg.rows;
        gate.resize(B * I);
        quantize_acts(h.data(), B, C, xq);
        lap(0);
        matmul_swiglu(wg, wu, xq, gate.data(), gelu);
        lap(4);
        quantize_acts(gate.data(), B, I, xq);
        lap(0);
        matmul_multi({wd}, xq, {tmp.data()});
        lap(5);
        add_normed(x.data(), tmp.data(), layer.mlp_out_norm, B, C, feps);
    }
    for (int64_t b = 0; b < B; b++) rmsnorm(x.data() + b * C, head.final_norm.data_ptr<float>(), h.data() + b * C, C, feps);
    PW lm = as_pw(head.lm_head);
    auto logits = at::empty({B, lm.rows}, at::kFloat);
    quantize_acts(h.data(), B, C, xq);
    matmul_multi({lm}, xq, {logits.data_ptr<float>()});
    if (softcap > 0) {
        float* lp = logits.data_ptr<float>();
        const float c = (float)softcap;
        for (int64_t i = 0; i < B * lm.rows; i++) lp[i] = std::tanh(lp[i] / c) * c;
    }
    lap(6);
    return logits;
}
