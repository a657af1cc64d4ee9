"""``layer_norm_quantize``: LayerNorm / adaLN-Zero that also returns its output's dynamic per-token
quantization (Triton under TRITON_INTERPRET=1 vs its reference, the reference vs torch's LayerNorm).

Tolerances:
- y, Triton vs reference (sums in another order): fp32 rtol/atol 1e-5; fp16 / bf16 one rounding of
  the dtype (atol 2e-3 / 1.6e-2 on values of order 1-5, rtol 2^-10 / 2^-7).
- codes and scales: in each backend exactly ``quantize_activation_int8`` / ``_fp8`` of the y that
  backend returned (the contract the projections behind the norm rely on), bit for bit.
- the reference vs F.layer_norm + modulation in fp32, rounded once: the same tolerances as y.
"""
import pytest
import torch
import torch.nn.functional as F

from diffaccel.ops import _backend, layer_norm_quantize, use_backend
from diffaccel.ops import gemm as G
from diffaccel.ops import norm as NORM

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2 ** -10, 2e-3), torch.bfloat16: (2 ** -7, 1.6e-2)}


def _needs_triton():
    why = _backend._why_not(_backend.registered_ops()["layer_norm_quantize"], "triton", torch.device("cpu"))
    if why:
        pytest.skip(why)


def _inputs(B, L, K, dtype, affine, modulated, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, L, K, generator=g) * 2 + 0.5).to(dtype)
    w = (torch.rand(K, generator=g) + 0.5).to(dtype) if affine else None
    b = torch.randn(K, generator=g).to(dtype) if affine else None
    scale = (torch.randn(B, K, generator=g) * 0.3).to(dtype) if modulated else None
    shift = (torch.randn(B, K, generator=g) * 0.3).to(dtype) if modulated else None
    return x, w, b, scale, shift


def _quantized(y, act_dtype):
    y2 = y.reshape(-1, y.shape[-1])
    with use_backend("torch"):
        return G.quantize_activation_int8(y2) if act_dtype == "int8" else G.quantize_activation_fp8(y2)


def _assert_codes_of(y, q, s, act_dtype):
    # the quantizer's reference on CPU: there it divides (on an H200, CUDA's division by a Python
    # number, a multiply by the reciprocal, made the scales an ulp off; diffaccel.ops.quantize.div_exact)
    q_ref, s_ref = _quantized(y.cpu(), act_dtype)
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu().view(torch.int8), q_ref.view(torch.int8))


# (B, L, K): M = B * L in {1, 77, 333, 4096}-like row counts, odd and diffusion widths
SHAPES = [(1, 1, 320), (1, 77, 77), (3, 111, 1152), (2, 4, 3072), (1, 5, 4097)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("affine,modulated", [(True, False), (False, True), (False, False), (True, True)])
@pytest.mark.parametrize("act_dtype", ["int8", "fp8_e4m3"])
def test_triton_matches_reference(shape, dtype, affine, modulated, act_dtype):
    _needs_triton()
    x, w, b, scale, shift = _inputs(*shape, dtype, affine, modulated, seed=sum(shape))
    with use_backend("torch"):
        y_ref, q_ref, s_ref = layer_norm_quantize(x, w, b, 1e-6, scale=scale, shift=shift, act_dtype=act_dtype)
    with use_backend("triton"):
        y, q, s = layer_norm_quantize(x, w, b, 1e-6, scale=scale, shift=shift, act_dtype=act_dtype)
    assert y.dtype == dtype and y.shape == x.shape
    assert q.shape == (x.numel() // x.shape[-1], x.shape[-1]) and s.shape == (q.shape[0], 1)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    _assert_codes_of(y, q, s, act_dtype)
    _assert_codes_of(y_ref, q_ref, s_ref, act_dtype)


@pytest.mark.parametrize("act_dtype", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_pass_loop(act_dtype, dtype):
    """Rows wider than the block take the four-pass loop; forced here with a narrow block."""
    _needs_triton()
    from diffaccel.kernels import norm as KN

    x, w, b, scale, shift = _inputs(2, 3, 1000, dtype, True, True, seed=7)
    x2 = x.reshape(-1, 1000)
    outs = []
    for block_k in (None, 128):
        y = torch.empty_like(x2)
        q = torch.empty(x2.shape, dtype=G.FP8_DTYPE if act_dtype != "int8" else torch.int8)
        s = torch.empty(x2.shape[0], dtype=torch.float32)
        KN.layer_norm_quantize(x2, w, b, scale, shift, y, q, s, rows_per_sample=3, eps=1e-5,
                               fp8=act_dtype != "int8", block_k=block_k)
        _assert_codes_of(y, q, s.view(-1, 1), act_dtype)
        outs.append(y)
    torch.testing.assert_close(outs[1], outs[0], rtol=TOL[dtype][0], atol=TOL[dtype][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("affine,modulated", [(True, False), (False, True)])
def test_reference_is_layer_norm(dtype, affine, modulated):
    x, w, b, scale, shift = _inputs(2, 9, 64, dtype, affine, modulated, seed=3)
    with use_backend("torch"):
        y, _, _ = layer_norm_quantize(x, w, b, 1e-6, scale=scale, shift=shift)
    n = F.layer_norm(x.float(), (64,), None if w is None else w.float(), None if b is None else b.float(), 1e-6)
    if modulated:
        n = n * (1 + scale.float()[:, None]) + shift.float()[:, None]
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y, n.to(dtype), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("K", [96, 1000])
def test_output_alone_is_the_same_output(backend, K):
    """act_dtype=None writes y only (the kernel skips the codes): the same y as with them."""
    if backend == "triton":
        _needs_triton()
    x, w, b, scale, shift = _inputs(2, 40, K, torch.bfloat16, True, True, seed=K)
    with use_backend(backend):
        y, q, s = layer_norm_quantize(x, w, b, scale=scale, shift=shift, act_dtype=None)
        y2, _, _ = layer_norm_quantize(x, w, b, scale=scale, shift=shift)
    assert q is None and s is None and torch.equal(y, y2)


def test_codes_follow_the_output_not_the_fp32_value():
    """Values sitting on a rounding boundary of y's dtype: the codes are those of y as stored."""
    x = torch.tensor([[[1.0, -1.0, 3.0, 0.004]]], dtype=torch.bfloat16).repeat(1, 70, 1)
    with use_backend("torch"):
        y, q, s = layer_norm_quantize(x, act_dtype="int8")
    _assert_codes_of(y, q, s, "int8")


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=torch.randn(4)), "x: expected"),
    (dict(x=torch.randint(0, 3, (2, 4))), "x"),
    (dict(weight=torch.randn(5)), "weight: expected shape"),
    (dict(bias=torch.randn(4, 1)), "bias"),
    (dict(eps=0.0), "eps: expected a positive finite float"),
    (dict(act_dtype="int4"), "act_dtype: expected one of"),
    (dict(scale=torch.randn(3, 4)), r"scale: expected \[B, K\]"),
    (dict(x=torch.randn(6, 4), shift=torch.randn(2, 4)), "shift: expected"),
])
def test_bad_input(kwargs, match):
    args = dict(x=torch.randn(2, 3, 4), weight=None, bias=None, eps=1e-5)
    args.update(kwargs)
    x = args.pop("x")
    with pytest.raises((ValueError, TypeError), match=match):
        layer_norm_quantize(x, **args)


def test_fake_kernel_under_compile():
    x, w, b, scale, shift = _inputs(2, 70, 32, torch.float32, False, True, seed=1)
    fn = torch.compile(lambda *a: layer_norm_quantize(a[0], scale=a[1], shift=a[2]), fullgraph=True, backend="eager")
    with use_backend("torch"):
        y, q, s = fn(x, scale, shift)
        y0, q0, s0 = NORM.layer_norm_quantize_reference(x.reshape(-1, 32), None, None, scale, shift, 70, 1e-5, False)
    assert torch.equal(y.reshape(-1, 32), y0) and torch.equal(q, q0) and torch.equal(s, s0)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["unet_affine_1280", "flux_adaln_3072", "wide_loop_12288"])
@pytest.mark.parametrize("act_dtype", ["int8", "fp8_e4m3"])
def test_gpu_matches_reference(case, act_dtype):
    """The GPU's Triton kernel vs the reference on the same device, bf16, SDXL / Flux widths and a
    row wider than one block (the multi-pass loop); the codes exactly those of the kernel's own y."""
    why = _backend._why_not(_backend.registered_ops()["layer_norm_quantize"], "triton", torch.device("cuda"))
    if why:
        pytest.skip(why)
    if act_dtype == "fp8_e4m3" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 codes need sm_89+")
    B, L, K = {"unet_affine_1280": (1, 4096, 1280), "flux_adaln_3072": (2, 4096, 3072),
               "wide_loop_12288": (1, 300, 12288)}[case]
    x, w, b, scale, shift = _inputs(B, L, K, torch.bfloat16, "affine" in case, "affine" not in case, seed=K)
    x, w, b, scale, shift = (t.cuda() if t is not None else None for t in (x, w, b, scale, shift))
    with use_backend("torch"):
        y_ref, _, _ = layer_norm_quantize(x, w, b, 1e-6, scale=scale, shift=shift, act_dtype=act_dtype)
    with use_backend("triton"):
        y, q, s = layer_norm_quantize(x, w, b, 1e-6, scale=scale, shift=shift, act_dtype=act_dtype)
    rtol, atol = TOL[torch.bfloat16]
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    _assert_codes_of(y, q, s, act_dtype)


@pytest.mark.parametrize("eps", [1e-5, 1.0])
@pytest.mark.parametrize("block_k", [None, 32])
def test_eps_is_used(eps, block_k):
    """eps reaches rstd = 1 / sqrt(var + eps) in the single-pass kernel, the multi-pass loop (block_k=32
    over K=96) and the reference. The other tests' rows have variance ~4, where eps = 1e-5 or 1e-6 is
    below fp32 resolution: a kernel that dropped it passed them. Here two rows are constant (variance
    exactly 0: y = bias; without eps 0 * inf = NaN), and eps = 1.0 moves every row. Tolerances: fp32
    Triton vs reference and reference vs F.layer_norm as the other tests (TOL: rtol/atol 1e-5); codes
    exactly those of each y."""
    from diffaccel.kernels import norm as KN

    _needs_triton()
    K = 96
    x, w, b, _, _ = _inputs(2, 3, K, torch.float32, True, False, seed=13)
    x[0, 1] = 0.75
    x[1, 2] = -3.0
    with use_backend("torch"):
        y_ref, q_ref, s_ref = layer_norm_quantize(x, w, b, eps, act_dtype="int8")
    if block_k is None:
        with use_backend("triton"):
            y, q, s = layer_norm_quantize(x, w, b, eps, act_dtype="int8")
    else:
        x2 = x.reshape(-1, K)
        y, q, s = torch.empty_like(x2), torch.empty(x2.shape, dtype=torch.int8), torch.empty(x2.shape[0])
        KN.layer_norm_quantize(x2, w, b, None, None, y, q, s, rows_per_sample=3, eps=eps, fp8=False, block_k=block_k)
        y, s = y.reshape(x.shape), s.view(-1, 1)
    assert torch.isfinite(y).all()
    rtol, atol = TOL[torch.float32]
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    _assert_codes_of(y, q, s, "int8")
    _assert_codes_of(y_ref, q_ref, s_ref, "int8")
    for out in (y, y_ref):  # a constant row normalizes to 0: the output is the bias
        assert torch.equal(out[0, 1], b) and torch.equal(out[1, 2], b)
    torch.testing.assert_close(y_ref, F.layer_norm(x, (K,), w, b, eps), rtol=rtol, atol=atol)
