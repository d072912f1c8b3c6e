"""The C++ elementwise kernels (RMSNorm, RoPE, SwiGLU) against their PyTorch formulas, values and gradients; the
prefill attention kernel against torch's scaled_dot_product_attention."""

import pytest
import torch

from tinkerlm import kernels
from tinkerlm.kernels import ATTENTION_ISAS, ops
from tinkerlm.models import base

pytestmark = pytest.mark.skipif(ops() is None, reason="C++ kernels unavailable (no compiler)")


def eager(monkeypatch, fn, *args):
    """`fn(*args)` with the kernels switched off (the PyTorch formulas)."""
    with monkeypatch.context() as m:
        m.setattr(base, "_kernels", lambda *t: None)
        return fn(*args)


def grads(fn, *inputs, seed=0):
    """Output and the gradients of a random projection of it with respect to every input."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * w).sum().backward()
    return out.detach(), [t.grad for t in inputs]


def test_rms_norm_matches_formula(monkeypatch):
    norm = base.RMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
    x = torch.randn(3, 7, 96) * 4
    fused, (gx, gw) = grads(lambda x, w: base._RMSNormFn.apply(x, w, 1e-5), x, norm.weight)
    ref, (rx, rw) = grads(lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)), x, norm.weight)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, rw, atol=1e-4, rtol=1e-4)
    assert torch.equal(norm(x), base._RMSNormFn.apply(x, norm.weight, 1e-5))  # the module takes the kernel
    torch.testing.assert_close(eager(monkeypatch, norm, x), ref)  # and the fallback is the formula


def test_rope_matches_formula_and_inverts(monkeypatch):
    B, T, H, hd = 2, 9, 3, 16
    inv = base.rope_inv_freq(hd, 10000.0)
    pos = torch.tensor([list(range(T)), list(range(5, 5 + T))])
    cos, sin = base.rope_cos_sin(inv, pos, torch.float32)
    x = torch.randn(B, T, H, hd)
    fused, (g,) = grads(lambda x: base.apply_rope(x, cos, sin), x)
    ref, (rg,) = grads(lambda x: eager(monkeypatch, base.apply_rope, x, cos, sin), x)
    torch.testing.assert_close(fused, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g, rg, atol=1e-6, rtol=1e-6)
    back = ops().rope_apply(fused, cos, sin, True)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)


def test_swiglu_matches_formula(monkeypatch):
    gate, up = torch.randn(4, 50) * 3, torch.randn(4, 50)
    fused, fg = grads(base.swiglu, gate, up)
    ref, rg = grads(lambda g, u: eager(monkeypatch, base.swiglu, g, u), gate, up)
    torch.testing.assert_close(fused, ref, atol=1e-6, rtol=1e-5)
    for a, b in zip(fg, rg):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not {"avx2", "fma", "f16c"} <= kernels._cpu_flags(), reason="no AVX2 on this CPU")
def test_avx2_vector_math_gives_the_vector_builds_bits():
    """The AVX2 build's exp (2^k applied as two exact powers of two, AVX2 having no scalef) and SwiGLU give the
    native build's bits (AVX-512 or AVX2 itself) over the whole range, underflow and overflow included, within
    2e-6 of float64 (isa_plain.h's std::exp loops ran before); its attention tiles agree with torch's."""
    avx2 = kernels.build(("-mno-avx512f",))
    assert avx2.isa == "avx2"
    g = torch.cat([torch.linspace(-120, 120, 48_000), torch.tensor([88.37, 88.38, 88.8, -87.4, -88.4, -104.0, 0.0])])
    g = torch.cat([g, torch.zeros(-len(g) % 16)])  # whole 16-value chunks: the AVX-512 loop's scalar tail is 16 wide
    u, d = torch.randn(2, len(g), generator=torch.Generator().manual_seed(0))
    fwd, (dg, du) = avx2.swiglu_fwd(g, u), avx2.swiglu_bwd(d, g, u)
    assert torch.equal(fwd, ops().swiglu_fwd(g, u))
    for a, b in zip((dg, du), ops().swiglu_bwd(d, g, u)):
        assert torch.equal(a, b)
    g64, u64 = g.double().requires_grad_(), u.double().requires_grad_()
    want = torch.nn.functional.silu(g64) * u64
    want.backward(d.double())
    # d gate's factor 1 + g (1 - s) cancels near g = -1.28: its error is relative to |d u|, not to itself
    for got, ref, scale in ((fwd, want.detach(), 0), (dg, g64.grad, (d * u).abs()), (du, u64.grad, 0)):
        assert ((got.double() - ref).abs() <= 2e-6 * (ref.abs() + scale) + 1e-33).all()  # exp clamps at +-88.38
    q, k, v = torch.randn(3, 1, 4, 45, 32, generator=torch.Generator().manual_seed(1))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(avx2.attention_causal(q, k, v, 32**-0.5).transpose(1, 2), want, atol=2e-6, rtol=1e-5)


def test_attention_kernel_taken_up_to_the_builds_key_limit(monkeypatch):
    """base.attend takes the C++ causal kernel up to the build's key limit (kernels.ATTENTION_ISAS; AVX2: 1,024,
    where torch's flash attention overtakes it), torch's beyond it."""
    monkeypatch.setitem(kernels.ATTENTION_ISAS, ops().isa, 16)
    g = torch.Generator().manual_seed(0)
    for T, taken in ((16, True), (17, False)):
        q, k, v = torch.randn(3, 1, 2, T, 32, generator=g)
        kernel = ops().attention_causal(q, k, v, 32**-0.5).transpose(1, 2)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert not torch.equal(kernel, sdpa)  # the two differ in the last bits, so the test can tell them apart
        with torch.no_grad():
            assert torch.equal(base.attend(q, k, v, base.CAUSAL), kernel if taken else sdpa), T


@pytest.mark.parametrize(
    "B,H,n_kv,T,S,hd", [(1, 9, 3, 77, 77, 64), (2, 4, 2, 37, 50, 32), (1, 2, 1, 5, 5, 128), (1, 6, 6, 16, 40, 48)]
)
def test_causal_attention_kernel_matches_sdpa(B, H, n_kv, T, S, hd, monkeypatch):
    """Grouped heads, strided cache views, queries at the end of a longer key range (S > T), head sizes 32..128."""
    g = torch.Generator().manual_seed(T)
    q = torch.randn(B, T, H, hd, generator=g).transpose(1, 2)  # (B, H, T, hd), strided as the model makes it
    k = torch.randn(B, n_kv, S + 9, hd, generator=g)[:, :, :S]  # views of a longer cache
    v = torch.randn(B, n_kv, S + 9, hd, generator=g)[:, :, :S]
    mask = torch.arange(T)[:, None] + (S - T) >= torch.arange(S)[None, :]  # query i sits at position S - T + i
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != n_kv)
    got = ops().attention_causal(q, k, v, hd**-0.5).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    if S == T:  # the model-level entry point takes the kernel for CAUSAL masks where the build has the vector
        # attention (AVX-512, AVX2; elsewhere it is torch's, the fallback), and the fallback agrees
        with torch.no_grad():
            if ops().isa in ATTENTION_ISAS:
                assert torch.equal(base.attend(q, k, v, base.CAUSAL), got)
            torch.testing.assert_close(eager(monkeypatch, base.attend, q, k, v, base.CAUSAL), got, atol=2e-6, rtol=1e-5)
