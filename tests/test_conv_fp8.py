"""fp8_conv2d (implicit-GEMM FP8 conv) and the fp8 activation quantizers: the Triton kernels
(TRITON_INTERPRET=1 on CPU, forced with use_backend("triton")) against the one reference,
F.unfold + quantize_rows_fp8_reference / quantize_static_fp8_reference + fp8_gemm_reference.

Tolerances:
- fp8 codes (quantize_activation_fp8) bit-exact: the kernels round like torch's cast (the
  interpreter's own fp8 cast does not; the kernels round onto the E4M3 grid first there).
- fp8_conv2d with small-integer operands and a static scale of 1: bit-exact, outputs included
  (every code is the input itself and every fp32 partial sum is an exact integer).
- otherwise fp32 outputs within 2e-6 x sum_k |a_k w_k| (scaled) per output: the fp32 sum over K
  runs in another order than the reference's. One code off by a step would move the output by
  at least 1/16 of one product, which is far outside that bound for K <= 54.
- fp16/bf16 outputs: one rounding of the fp32 result apart at most (rtol 2^-8 resp. 2^-7).
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from diffaccel.nn import QuantConv2d
from diffaccel.ops import _backend, fp8_conv2d, quantize_activation_fp8, use_backend
from diffaccel.ops import conv as CV
from diffaccel.ops import gemm as G
from diffaccel.quant import formats as fmt
from diffaccel.quant.formats import QuantSpec
from fp8_accumulation import FP32_SUM_REL, fp8_sum_rel_bound

FP8 = torch.float8_e4m3fn


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _needs_triton(op="fp8_conv2d", device="cpu"):
    why = _backend._why_not(_backend.registered_ops()[op], "triton", torch.device(device))
    if why:
        pytest.skip(why)


def _operands(g, B, C, H, W, N, ks, *, static=False, smooth=False, bias=False, dtype=torch.float32):
    x = (torch.randn(B, C, H, W, generator=g) * 3).to(dtype)
    w, w_scale = fmt.quantize_weight_fp8(torch.randn(N, C * ks[0] * ks[1], generator=g))
    kw = {}
    if static:
        kw["act_scale"] = (x.float().abs().amax() / 400).reshape(1)
    if smooth:
        kw["smooth"] = torch.rand(C, generator=g) + 0.5
    if bias:
        kw["bias"] = torch.randn(N, generator=g)
    return x, w, w_scale, kw


def _reference(x, w, w_scale, kw, ks, stride, padding, dilation, out_dtype):
    return CV.fp8_conv2d_reference(x, w, w_scale, kw.get("smooth"), kw.get("act_scale"), kw.get("bias"), ks, stride,
                                   padding, dilation, out_dtype)


def _abs_bound(x, w, w_scale, kw, ks, stride, padding, dilation):
    """sum_k |a_k w_k| * scales per output: the scale of the fp32 accumulation error."""
    kh, kw_ = ks
    cols = F.unfold(x.float(), ks, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    x2 = cols.reshape(-1, x.shape[1] * kh * kw_)
    sm = kw.get("smooth")
    smooth_k = sm.repeat_interleave(kh * kw_) if sm is not None else None
    if kw.get("act_scale") is None:
        q, s = G.quantize_rows_fp8_reference(x2, smooth_k)
    else:
        q, s = G.quantize_static_fp8_reference(x2, smooth_k, kw["act_scale"]), kw["act_scale"]
    bound = (q.float().abs() @ w.float().abs().t()) * s * w_scale
    B = x.shape[0]
    Ho, Wo = CV._output_hw(x, ks, stride, padding, dilation)
    return bound.reshape(B, Ho * Wo, -1).transpose(1, 2).reshape(B, -1, Ho, Wo)


def _assert_fp32_close(out, ref, bound, rel=FP32_SUM_REL):
    err = (out - ref).abs()
    worst = (err - rel * bound - 1e-30).max().item()
    assert worst <= 0, f"max |out - ref| exceeds {rel:.3g} * sum|a w| by {worst}"


# (B, C, H, W, N, kernel, stride, padding, dilation)
GEOMETRIES = {
    "3x3_s1_p1": (1, 6, 5, 6, 9, (3, 3), (1, 1), (1, 1), (1, 1)),
    "3x3_s2_p1_downsample": (1, 4, 7, 8, 6, (3, 3), (2, 2), (1, 1), (1, 1)),
    "1x3_dil2_asym": (1, 3, 5, 9, 5, (1, 3), (1, 2), (0, 2), (2, 2)),
    "odd_C5_N7_batch2": (2, 5, 4, 5, 7, (3, 3), (1, 1), (1, 1), (1, 1)),
    # 90 pixels per image (M = 180 > 64: the large config), N = 130 over two column tiles
    "multi_tile_batch2": (2, 3, 9, 10, 130, (3, 3), (1, 1), (1, 1), (1, 1)),
    # K = 64, two whole K blocks (the unmasked EVEN_K loads; with C1 = 8 the split falls on a block)
    "2x2_K64_even": (1, 16, 5, 5, 9, (2, 2), (1, 1), (0, 0), (1, 1)),
}


# -- activation quantizers: now run in the interpreter too ---------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("static,smooth", [(False, False), (False, True), (True, False), (True, True)])
def test_quantize_activation_fp8_codes_exact(backend, static, smooth):
    if backend == "triton":
        _needs_triton("quantize_static_fp8" if static else "quantize_rows_fp8")
    g = _gen(7)
    # every binade from the subnormals (2^-9 steps) to the top (448), ties and signs included
    x = torch.cat([torch.randn(40, 96, generator=g) * 10.0 ** torch.randint(-4, 3, (40, 1), generator=g),
                   torch.arange(256, dtype=torch.uint8).view(FP8)[:96].float().reshape(1, 96) * 1.0625])
    sm = torch.rand(96, generator=g) + 0.5 if smooth else None
    scale = torch.tensor([0.05]) if static else None
    if static:
        ref_q, ref_s = G.quantize_static_fp8_reference(x, sm, scale), scale
    else:
        ref_q, ref_s = G.quantize_rows_fp8_reference(x, sm)
    with use_backend(backend):
        q, s = quantize_activation_fp8(x, smooth=sm, scale=scale)
    assert q.dtype == FP8
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), "fp8 codes differ from torch's cast"
    assert torch.equal(s.reshape(-1), ref_s.reshape(-1))


# -- fp8_conv2d -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("geom", ["3x3_s1_p1", "multi_tile_batch2"])
def test_triton_exact_with_integer_operands(geom, bias):
    """Codes equal to the inputs (static scale 1, integers |x| <= 8): every fp32 partial sum is an
    exact integer, so kernel and reference agree bit for bit whatever the summation order."""
    _needs_triton()
    B, C, H, W, N, ks, stride, padding, dilation = GEOMETRIES[geom]
    g = _gen(hash(geom) % 1000)
    x = torch.randint(-8, 9, (B, C, H, W), generator=g).float()
    w = torch.randint(-8, 9, (N, C * ks[0] * ks[1]), generator=g).float().to(FP8)
    w_scale = torch.rand(N, generator=g) + 0.1
    kw = {"act_scale": torch.ones(1)}
    if bias:
        kw["bias"] = torch.randn(N, generator=g)
    ref = _reference(x, w, w_scale, kw, ks, stride, padding, dilation, torch.float32)
    with use_backend("triton"):
        out = fp8_conv2d(x, w, w_scale, kernel_size=ks, stride=stride, padding=padding, dilation=dilation, **kw)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("geom", list(GEOMETRIES))
@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_triton_matches_reference_geometries(geom, act):
    _needs_triton()
    B, C, H, W, N, ks, stride, padding, dilation = GEOMETRIES[geom]
    g = _gen(len(geom) * 31 + len(act))
    x, w, w_scale, kw = _operands(g, B, C, H, W, N, ks, static=act == "static", bias=True)
    ref = _reference(x, w, w_scale, kw, ks, stride, padding, dilation, torch.float32)
    with use_backend("triton"):
        out = fp8_conv2d(x, w, w_scale, kernel_size=ks, stride=stride, padding=padding, dilation=dilation, **kw)
    assert out.shape == ref.shape == F.conv2d(x, torch.zeros(N, C, *ks), None, stride, padding, dilation).shape
    _assert_fp32_close(out, ref, _abs_bound(x, w, w_scale, kw, ks, stride, padding, dilation))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_triton_half_inputs_and_outputs(dtype, act):
    _needs_triton()
    B, C, H, W, N, ks, stride, padding, dilation = GEOMETRIES["odd_C5_N7_batch2"]
    x, w, w_scale, kw = _operands(_gen(5), B, C, H, W, N, ks, static=act == "static", smooth=True, bias=True,
                                  dtype=dtype)
    ref = _reference(x, w, w_scale, kw, ks, stride, padding, dilation, dtype)
    with use_backend("triton"):
        out = fp8_conv2d(x, w, w_scale, kernel_size=ks, stride=stride, padding=padding, dilation=dilation, **kw)
    assert out.dtype == dtype
    rtol = 2.0**-8 if dtype == torch.float16 else 2.0**-7  # one rounding of the fp32 result
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=1e-3)


# -- Q-Diffusion's split input (two static scales over the channel ranges [0, C1) and [C1, C)) --------

def _split_bound(x, w, w_scale, scales, C1, ks, stride, padding, dilation):
    """_abs_bound for a split input: each K range with its own scale."""
    parts = []
    for xs, ws, s in ((x[:, :C1], w[:, :C1 * ks[0] * ks[1]], scales[0]), (x[:, C1:], w[:, C1 * ks[0] * ks[1]:],
                                                                           scales[1])):
        parts.append(_abs_bound(xs, ws, w_scale, {"act_scale": s.reshape(1)}, ks, stride, padding, dilation))
    return parts[0] + parts[1]


# (geometry, C1): K1 = C1 * kh * kw off the 32-wide K block (the masked boundary tile) but for the
# last (K1 = 32); the multi-tile case spans two N tiles and the large config
SPLITS = [("3x3_s1_p1", 2), ("odd_C5_N7_batch2", 1), ("odd_C5_N7_batch2", 4), ("multi_tile_batch2", 2),
          ("1x3_dil2_asym", 1), ("3x3_s2_p1_downsample", 3), ("2x2_K64_even", 8)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("geom,C1", SPLITS)
def test_split_exact_with_integer_operands(geom, C1, bias):
    """Scales 1 and 2 over the two ranges (codes x and x / 2, exact in E4M3 for |x| <= 8): kernel and
    reference agree bit for bit, so a code quantized with the other range's scale, a range boundary
    off by one or a K-padding code that is not 0 shows."""
    _needs_triton()
    B, C, H, W, N, ks, stride, padding, dilation = GEOMETRIES[geom]
    g = _gen(C1 * 7 + len(geom))
    x = torch.randint(-8, 9, (B, C, H, W), generator=g).float()
    w = torch.randint(-8, 9, (N, C * ks[0] * ks[1]), generator=g).float().to(FP8)
    w_scale = torch.rand(N, generator=g) + 0.1
    scales = torch.tensor([1.0, 2.0])
    bias_t = torch.randn(N, generator=g) if bias else None
    ref = CV.fp8_conv2d_reference(x, w, w_scale, None, scales, bias_t, ks, stride, padding, dilation, torch.float32,
                                  act_split=C1)
    with use_backend("triton"):
        out = fp8_conv2d(x, w, w_scale, kernel_size=ks, stride=stride, padding=padding, dilation=dilation,
                         act_scale=scales, act_split=C1, bias=bias_t)
    assert torch.equal(out, ref)
    # the two scales really act on their own ranges: one scale for both gives another result
    one_scale = CV.fp8_conv2d_reference(x, w, w_scale, None, torch.ones(1), bias_t, ks, stride, padding, dilation,
                                        torch.float32)
    assert not torch.equal(out, one_scale)


@pytest.mark.parametrize("geom,C1", SPLITS)
def test_split_matches_reference(geom, C1):
    _needs_triton()
    B, C, H, W, N, ks, stride, padding, dilation = GEOMETRIES[geom]
    g = _gen(C1 * 11 + len(geom))
    x, w, w_scale, kw = _operands(g, B, C, H, W, N, ks, smooth=True, bias=True)
    x[:, C1:] *= 5  # the skip half on another scale, as in a UNet's up path
    scales = torch.stack([x[:, :C1].abs().amax() / 400, x[:, C1:].abs().amax() / 400])
    ref = CV.fp8_conv2d_reference(x, w, w_scale, kw["smooth"], scales, kw["bias"], ks, stride, padding, dilation,
                                  torch.float32, act_split=C1)
    with use_backend("triton"):
        out = fp8_conv2d(x, w, w_scale, kernel_size=ks, stride=stride, padding=padding, dilation=dilation,
                         act_scale=scales, act_split=C1, smooth=kw["smooth"], bias=kw["bias"])
    xs = x / kw["smooth"].reshape(1, -1, 1, 1)  # (the bound only needs the codes' magnitudes)
    _assert_fp32_close(out, ref, _split_bound(xs, w, w_scale, scales, C1, ks, stride, padding, dilation))


def test_split_reference_is_the_two_range_composition():
    """The reference's split equals the composition QuantConv2d's im2col path ran: two static fp8
    GEMMs over the K ranges, summed in fp32 with the bias on the second."""
    B, C, H, W, N, ks, stride, padding, dilation = GEOMETRIES["odd_C5_N7_batch2"]
    x, w, w_scale, kw = _operands(_gen(21), B, C, H, W, N, ks, bias=True)
    scales, C1 = torch.tensor([0.02, 0.05]), 2
    k1 = C1 * 9
    cols = F.unfold(x, ks, padding=padding).transpose(1, 2).reshape(-1, C * 9)
    ys = [G.fp8_gemm_reference(G.quantize_static_fp8_reference(cols[:, sl], None, scales[p]), w[:, sl], scales[p],
                               w_scale, kw["bias"] if p else None, torch.float32)
          for p, sl in enumerate((slice(0, k1), slice(k1, None)))]
    want = (ys[0] + ys[1]).reshape(B, H * W, N).transpose(1, 2).reshape(B, N, H, W)
    got = CV.fp8_conv2d_reference(x, w, w_scale, None, scales, kw["bias"], ks, stride, padding, dilation,
                                  torch.float32, act_split=C1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_quant_conv_fp8_split_uses_implicit_gemm(backend, monkeypatch):
    if backend == "triton":
        _needs_triton()
    g = _gen(17)
    conv = nn.Conv2d(6, 10, 3, padding=1)
    spec = QuantSpec("fp8_e4m3", None, "fp8_e4m3", "static")
    x = torch.randn(2, 6, 7, 7, generator=g)
    x[:, 4:] *= 4
    q = QuantConv2d.from_float(conv, spec, act_scale=torch.tensor([[0.01, 0.04]]), act_split=4)
    assert q.op_name == "fp8_conv2d"
    calls = []
    real = CV.fp8_conv2d
    monkeypatch.setattr(CV, "fp8_conv2d", lambda *a, **k: calls.append(k["act_split"]) or real(*a, **k))
    if backend == "triton":
        monkeypatch.setattr(F, "unfold", lambda *a, **k: pytest.fail("the fp8 k x k kernel must not unfold"))
    with use_backend(backend):
        y = q(x)
    monkeypatch.undo()
    assert calls == [4]
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 54)
    with use_backend(backend):
        y_unfold = q._gemm(cols).reshape(2, 49, 10).transpose(1, 2).reshape(2, 10, 7, 7)
    torch.testing.assert_close(y, y_unfold, rtol=1e-5, atol=1e-5)
    assert ((y - conv(x)).norm() / conv(x).norm()).item() < 0.05


def test_reference_close_to_float_conv():
    """The reference approximates the float conv (E4M3 has 3 mantissa bits: a few % per code)."""
    g = _gen(11)
    x = torch.randn(2, 8, 9, 9, generator=g)
    wf = torch.randn(12, 8, 3, 3, generator=g)
    w, w_scale = fmt.quantize_weight_fp8(wf.reshape(12, -1))
    y = CV.fp8_conv2d_reference(x, w, w_scale, None, None, None, (3, 3), (1, 1), (1, 1), (1, 1), torch.float32)
    yf = F.conv2d(x, wf, None, 1, 1)
    assert ((y - yf).norm() / yf.norm()).item() < 0.05


def test_strided_input_read_in_place():
    _needs_triton()
    g = _gen(3)
    x_big = torch.randn(2, 10, 8, 9, generator=g)
    x = x_big[:, 2:8, 1:7, ::2]  # a non-contiguous view
    x_cl = torch.randn(2, 6, 6, 5, generator=g).to(memory_format=torch.channels_last)
    w, w_scale = fmt.quantize_weight_fp8(torch.randn(5, 54, generator=g))
    for xi in (x, x_cl):
        ref = _reference(xi.contiguous(), w, w_scale, {}, (3, 3), (1, 1), (1, 1), (1, 1), torch.float32)
        with use_backend("triton"):
            out = fp8_conv2d(xi, w, w_scale, kernel_size=3, padding=1)
        _assert_fp32_close(out, ref, _abs_bound(xi, w, w_scale, {}, (3, 3), (1, 1), (1, 1), (1, 1)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), C=st.integers(1, 6), H=st.integers(1, 7), W=st.integers(1, 7), N=st.integers(1, 20),
       kh=st.integers(1, 3), kw=st.integers(1, 3), stride=st.integers(1, 2), pad=st.integers(0, 2),
       static=st.booleans(), smooth=st.booleans(), seed=st.integers(0, 2**16))
def test_property_triton_matches_reference(B, C, H, W, N, kh, kw, stride, pad, static, smooth, seed):
    _needs_triton()
    ks = (kh, kw)
    Ho, Wo = (H + 2 * pad - kh) // stride + 1, (W + 2 * pad - kw) // stride + 1
    if Ho <= 0 or Wo <= 0:
        return
    x, w, w_scale, kwargs = _operands(_gen(seed), B, C, H, W, N, ks, static=static, smooth=smooth, bias=True)
    geo = ((stride, stride), (pad, pad), (1, 1))
    ref = _reference(x, w, w_scale, kwargs, ks, *geo, torch.float32)
    with use_backend("triton"):
        out = fp8_conv2d(x, w, w_scale, kernel_size=ks, stride=stride, padding=pad, **kwargs)
    _assert_fp32_close(out, ref, _abs_bound(x, w, w_scale, kwargs, ks, *geo))


def test_accumulation_bound_catches_a_wrong_code():
    """The fp32 bound used above is tight enough to see one activation code off by one E4M3 step."""
    B, C, H, W, N, ks, stride, padding, dilation = GEOMETRIES["3x3_s1_p1"]
    x, w, w_scale, kw = _operands(_gen(2), B, C, H, W, N, ks, static=True)
    ref = _reference(x, w, w_scale, kw, ks, stride, padding, dilation, torch.float32)
    x2 = x.clone()
    x2[0, 2, 2, 3] *= 1.2  # > one E4M3 step (at most 12.5 %) for this one input
    bumped = _reference(x2, w, w_scale, kw, ks, stride, padding, dilation, torch.float32)
    with pytest.raises(AssertionError):
        _assert_fp32_close(bumped, ref, _abs_bound(x, w, w_scale, kw, ks, stride, padding, dilation))


# -- QuantConv2d routes fp8 k x k convs through the op ------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("static", [False, True])
def test_quant_conv_fp8_uses_implicit_gemm(backend, static, monkeypatch):
    if backend == "triton":
        _needs_triton()
    g = _gen(13)
    conv = nn.Conv2d(6, 10, 3, padding=1)
    spec = QuantSpec("fp8_e4m3", None, "fp8_e4m3", "static" if static else "dynamic")
    x = torch.randn(2, 6, 7, 7, generator=g)
    q = QuantConv2d.from_float(conv, spec, act_scale=torch.tensor([0.02]) if static else None)
    calls = []
    real = CV.fp8_conv2d
    monkeypatch.setattr(CV, "fp8_conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    if backend == "triton":  # (the torch reference is unfold + GEMM by definition)
        monkeypatch.setattr(F, "unfold", lambda *a, **k: pytest.fail("the fp8 k x k kernel must not unfold"))
    with use_backend(backend):
        y = q(x)
    monkeypatch.undo()
    assert calls == [1]
    # the previous path: unfold + the layer's own fp8 GEMM (same codes; fp32 sums in another order)
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 54)
    with use_backend(backend):
        y_unfold = q._gemm(cols).reshape(2, 49, 10).transpose(1, 2).reshape(2, 10, 7, 7)
    torch.testing.assert_close(y, y_unfold, rtol=1e-5, atol=1e-5)
    assert ((y - conv(x)).norm() / conv(x).norm()).item() < 0.05


@pytest.mark.parametrize("op", ["fp8_gemm", "fp8_conv2d"])
def test_fp8_triton_kernels_need_sm89(op, monkeypatch):
    """On an sm_80 GPU the fp8 Triton kernels are not chosen, and the reason names the arch."""
    monkeypatch.setattr(_backend, "triton_error", lambda: None)
    caps = {"sm80": (8, 0), "sm89": (8, 9), "sm90": (9, 0)}
    for name, cap in caps.items():
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        why = _backend._why_not(_backend.registered_ops()[op], "triton", torch.device("cuda", 0))
        if name == "sm80":
            assert why == f"{op}'s Triton kernel needs sm_89+ (this GPU is sm_80)"
        else:
            assert why is None
    # int8 kernels keep running on sm_80
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert _backend._why_not(_backend.registered_ops()["int8_conv2d"], "triton", torch.device("cuda", 0)) is None


def test_launchers_refuse_samples_past_int32_offsets():
    """Both conv launchers index within a sample in int32: a strided view is measured by its span,
    not its element count (meta tensors: no memory)."""
    from diffaccel.kernels import conv as kconv

    out = torch.empty(1, 4, 8, 8, device="meta")
    w = torch.empty(4, 18, device="meta")
    small = torch.empty(64, device="meta").as_strided((1, 2, 8, 8), (0, 2**31, 8, 1))  # 128 elements, huge span
    with pytest.raises(ValueError, match="x: one sample spans more than 2"):
        kconv._gemm_view(small, w, out, (3, 3))
    # fits: no error; (B, H, W, N, Ho, Wo, K, M)
    assert kconv._gemm_view(torch.empty(1, 2, 8, 8, device="meta"), w, out, (3, 3)) == (1, 8, 8, 4, 8, 8, 18, 64)


# -- custom op, compile, bad input -------------------------------------------------------------------

def test_opcheck():
    g = _gen(1)
    x, w, w_scale, _ = _operands(g, 1, 3, 5, 5, 4, (3, 3))
    no_schema = ("test_faketensor", "test_aot_dispatch_dynamic")
    for scale, split in ((None, 0), (torch.tensor([0.05]), 0), (torch.tensor([0.05, 0.1]), 1)):
        torch.library.opcheck(torch.ops.diffaccel.fp8_conv2d.default,
                              (x, w, w_scale, None, scale, None, [3, 3], [1, 1], [1, 1], [1, 1], torch.float32, split),
                              test_utils=no_schema)


def test_compile_no_graph_break():
    g = _gen(2)
    x, w, w_scale, _ = _operands(g, 1, 3, 5, 5, 4, (3, 3))

    def f(x):
        return fp8_conv2d(x, w, w_scale, kernel_size=3, padding=1) * 2

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(out, f(x))


def test_bad_inputs_named():
    g = _gen(4)
    x, w, w_scale, _ = _operands(g, 1, 3, 5, 5, 4, (3, 3))

    def call(**over):
        args = dict(x=x, w=w, w_scale=w_scale, kernel_size=3, padding=1)
        args.update(over)
        return fp8_conv2d(args.pop("x"), args.pop("w"), args.pop("w_scale"), **args)

    with pytest.raises(TypeError, match="w: expected dtype"):
        call(w=w.float())
    with pytest.raises(ValueError, match=r"w: expected K=12 .*got shape \(4, 27\)"):
        call(kernel_size=2)
    with pytest.raises(ValueError, match="w_scale"):
        call(w_scale=w_scale[:2])
    with pytest.raises(ValueError, match="act_scale"):
        call(act_scale=torch.tensor([0.0]))
    with pytest.raises(ValueError, match="act_scale"):
        call(act_scale=torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="act_scale: expected a single value"):
        call(act_scale=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="smooth"):
        call(smooth=torch.ones(4))
    with pytest.raises(ValueError, match="bias"):
        call(bias=torch.zeros(5))
    with pytest.raises(ValueError, match="x: shape"):
        call(x=x[:, :, :1, :1], padding=0)
    with pytest.raises(ValueError, match="stride"):
        call(stride=0)
    with pytest.raises(TypeError, match="x: expected dtype"):
        call(x=x.to(torch.int32))
    with pytest.raises(TypeError, match="out_dtype"):
        call(out_dtype=torch.int8)
    with pytest.raises(ValueError, match="act_scale: act_split needs static activations"):
        call(act_split=1)
    with pytest.raises(ValueError, match="act_scale: expected 2 values with act_split"):
        call(act_split=1, act_scale=torch.tensor([0.1]))
    with pytest.raises(ValueError, match=r"act_split: expected an int channel index in \(0, 3\)"):
        call(act_split=3, act_scale=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="act_scale"):
        call(act_split=1, act_scale=torch.tensor([0.1, 0.0]))


# -- GPU ---------------------------------------------------------------------------------------------

# SDXL UNet resnet convs (batch 2 = the CFG pair), 3x3 pad 1, and a stride-2 downsampler
GPU_SHAPES = [(2, 320, 128, 128, 320, 1), (2, 640, 64, 64, 640, 1), (2, 1280, 32, 32, 1280, 1),
              (2, 320, 128, 128, 320, 2)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_gpu_sdxl_shapes(shape, act):
    """On the GPU the kernel uses the hardware E4M3 cast: codes must still match torch's, which
    the integer-operand check pins (bit-exact), and the random case stays within the fp32 bound."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")
    B, C, H, W, N, stride = shape
    dev = torch.device("cuda")
    x, w, w_scale, kw = _operands(_gen(C + stride), B, C, H, W, N, (3, 3), static=act == "static", bias=True,
                                  dtype=torch.bfloat16)
    geo = ((stride, stride), (1, 1), (1, 1))
    ref = _reference(x.float(), w, w_scale, kw, (3, 3), *geo, torch.float32)
    with use_backend("triton"):
        out = fp8_conv2d(x.to(dev), w.to(dev), w_scale.to(dev), kernel_size=3, stride=stride, padding=1,
                         out_dtype=torch.float32, **{k: v.to(dev) for k, v in kw.items()})
    _assert_fp32_close(out.cpu(), ref, _abs_bound(x.float(), w, w_scale, kw, (3, 3), *geo), fp8_sum_rel_bound(dev))
    xi = torch.randint(-8, 9, (1, C, 16, 16), generator=_gen(1)).float()
    wi = torch.randint(-8, 9, (N, C * 9), generator=_gen(2)).float().to(FP8)
    one = torch.ones(1)
    ref_i = _reference(xi, wi, w_scale, {"act_scale": one}, (3, 3), (1, 1), (1, 1), (1, 1), torch.float32)
    with use_backend("triton"):
        out_i = fp8_conv2d(xi.to(dev), wi.to(dev), w_scale.to(dev), kernel_size=3, padding=1, act_scale=one.to(dev))
    assert torch.equal(out_i.cpu(), ref_i)


@pytest.mark.gpu
@pytest.mark.parametrize("C,C1,N,H", [(1920, 1280, 640, 64), (960, 640, 320, 128)], ids=["up1_1920", "up2_960"])
def test_gpu_split_sdxl_up_path(C, C1, N, H):
    """SDXL up-path resnet conv1 on cat(h, skip) (C1 = h's channels), batch 2, static split scales:
    integer operands bit-exact (the hardware E4M3 cast), random ones within the fp32 bound."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")
    dev = torch.device("cuda")
    g = _gen(C + C1)
    geo = ((1, 1), (1, 1), (1, 1))
    x, w, w_scale, kw = _operands(g, 2, C, H, H, N, (3, 3), bias=True, dtype=torch.bfloat16)
    scales = torch.stack([x[:, :C1].float().abs().amax() / 400, x[:, C1:].float().abs().amax() / 400])
    ref = CV.fp8_conv2d_reference(x.float(), w, w_scale, None, scales, kw["bias"], (3, 3), *geo, torch.float32,
                                  act_split=C1)
    with use_backend("triton"):
        out = fp8_conv2d(x.to(dev), w.to(dev), w_scale.to(dev), kernel_size=3, padding=1, act_scale=scales.to(dev),
                         act_split=C1, bias=kw["bias"].to(dev), out_dtype=torch.float32)
    _assert_fp32_close(out.cpu(), ref, _split_bound(x.float(), w, w_scale, scales, C1, (3, 3), *geo),
                       fp8_sum_rel_bound(dev))
    xi = torch.randint(-8, 9, (1, C, 16, 16), generator=_gen(1)).float()
    wi = torch.randint(-8, 9, (N, C * 9), generator=_gen(2)).float().to(FP8)
    two = torch.tensor([1.0, 2.0])
    ref_i = CV.fp8_conv2d_reference(xi, wi, w_scale, None, two, None, (3, 3), *geo, torch.float32, act_split=C1)
    with use_backend("triton"):
        out_i = fp8_conv2d(xi.to(dev), wi.to(dev), w_scale.to(dev), kernel_size=3, padding=1, act_scale=two.to(dev),
                           act_split=C1)
    assert torch.equal(out_i.cpu(), ref_i)
