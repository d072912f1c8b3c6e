// Causal attention for prefill, in fp32: scores, an exact two-pass softmax and P @ V over register tiles of 16
// keys (the tiles and the softmax's vector loops are the instruction set's: isa_*.h).

#pragma once

#include "common.h"

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
                mx = max_vec(s, n, j);
                for (; j < n; j++) mx = std::max(mx, s[j]);
                j = 0;
                den = exp_sum_vec(s, n, mx, j);
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
