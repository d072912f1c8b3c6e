// Elementwise ops in fp32: RMSNorm, rotate-half RoPE and SwiGLU, forward and backward, for prefill and training,
// and the per-vector helpers the decode step uses (dot, axpy, rmsnorm, rope). Vector loops: isa_*.h.

#pragma once

#include "common.h"

namespace {

// Dot product and y += a * x over n floats (the decode step's attention, RMSNorm's sums), vectorized explicitly: a
// float reduction is not vectorized by the compiler without -ffast-math.
inline float dot(const float* a, const float* b, int64_t n) {
    int64_t i = 0;
    float s = dot_vec(a, b, n, i);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

inline void axpy(float a, const float* x, float* y, int64_t n) {
    int64_t i = 0;
    axpy_vec(a, x, y, n, i);
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
        swiglu_fwd_vec(gp, up_, op, i1, i);
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
        swiglu_bwd_vec(dp, gp, up_, dgp, dup, i1, i);
        for (; i < i1; i++) {
            const float g = gp[i], s = 1.f / (1.f + std::exp(-g));
            dup[i] = dp[i] * g * s;
            dgp[i] = dp[i] * up_[i] * s * (1.f + g * (1.f - s));
        }
    });
    return {dg, du};
}
