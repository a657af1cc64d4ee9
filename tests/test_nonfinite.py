"""Non-finite activations through the quantizers: every backend gives the reference's codes and
scales, and a row (token, output pixel) that holds a NaN or Inf dequantizes to NaN, as it would in
float arithmetic, while the finite rows are untouched.

Before, the Triton and _C kernels took the row's amax with max reductions that drop NaN: a row
with a NaN got a finite scale and the NaN a code of -128, so the layer's output was finite
garbage (a diverging model looked fine), and codes differed from the reference's. The rule,
stated in diffaccel/ops/quantize.py: a dynamic row's scale gets sum(x * 0) added (NaN for a
non-finite row); a NaN code is 0. Tolerance: exact (codes, scales, and NaN positions).
"""
import pytest
import torch

import diffaccel.ops as O
from diffaccel.ops import _backend, use_backend


def runnable_backends(op_name: str) -> list:
    """The backends that run ``op_name`` on CPU here (torch; Triton in its interpreter; the _C loops)."""
    cpu = torch.device("cpu")
    return [b for b in _backend.BACKENDS if _backend._why_not(_backend.registered_ops()[op_name], b, cpu) is None]

NAN, INF = float("nan"), float("inf")


def _rows(M=6, K=48, dtype=torch.float32, seed=0):
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(dtype)
    x[1, 5] = NAN
    x[3, 0] = INF
    x[4, 7] = -INF
    return x  # rows 0, 2, 5 finite


BAD_ROWS, GOOD_ROWS = [1, 3, 4], [0, 2, 5]


def _same(a, b):
    """Exactly equal, NaN where the other is NaN."""
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.float(), b.float()
    return a.shape == b.shape and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def _each_backend(op_name, call):
    """call() under every backend that runs ``op_name`` here -> {backend: result}."""
    out = {}
    for b in runnable_backends(op_name):
        with use_backend(b):
            out[b] = call()
    assert "torch" in out and len(out) >= 2, f"{op_name}: only {list(out)} ran"
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_per_token_int8_codes_and_scales(dtype):
    x = _rows(dtype=dtype)
    for op_name, call in (("quantize_per_token", lambda: O.quantize_per_token(x)),
                          ("quantize_rows_int8", lambda: O.quantize_activation_int8(x)),
                          ("quantize_rows_fp8", lambda: O.quantize_activation_fp8(x))):
        res = _each_backend(op_name, call)
        q_ref, s_ref = res["torch"]
        assert torch.isnan(s_ref[BAD_ROWS]).all() and torch.isfinite(s_ref[GOOD_ROWS]).all(), op_name
        assert (q_ref[BAD_ROWS].float() == 0).all(), op_name
        for b, (q, s) in res.items():
            assert _same(q, q_ref) and _same(s, s_ref), (op_name, b)
        # the finite rows are what they are without the bad ones
        with use_backend("torch"):
            q_good, s_good = (O.quantize_per_token if op_name == "quantize_per_token"
                              else O.quantize_activation_int8 if op_name == "quantize_rows_int8"
                              else O.quantize_activation_fp8)(x[GOOD_ROWS])
        assert _same(q_ref[GOOD_ROWS], q_good) and _same(s_ref[GOOD_ROWS], s_good)


def test_a_static_quantizer_reads_nan_as_zero():
    """Static per-tensor quantization has no row scale to poison: a NaN is coded as 0 (then the zero
    point), an Inf clamps to the range's end, in every backend."""
    x = _rows()
    scale, zp = torch.tensor([0.02]), torch.tensor([5], dtype=torch.int32)
    res = _each_backend("quantize_per_tensor", lambda: O.quantize_per_tensor(x, 0.02, 5))
    ref = res["torch"]
    assert ref[1, 5] == 5 and ref[3, 0] == 127 and ref[4, 7] == -128
    for b, q in res.items():
        assert torch.equal(q, ref), b
    res = _each_backend("quantize_static_int8", lambda: O.quantize_activation_int8(x, scale=scale, zero_point=zp)[0])
    for b, q in res.items():
        assert torch.equal(q, ref), b
    res = _each_backend("quantize_static_fp8", lambda: O.quantize_activation_fp8(x, scale=scale)[0])
    assert res["torch"][1, 5].float() == 0 and res["torch"][3, 0].float() == 448
    for b, q in res.items():
        assert _same(q, res["torch"]), b


def _nan_rows_only(y, bad, good_ref):
    """Rows ``bad`` all NaN; the other rows equal ``good_ref`` exactly."""
    good = [i for i in range(y.shape[0]) if i not in bad]
    return bool(torch.isnan(y[bad]).all()) and _same(y[good], good_ref)


@pytest.mark.parametrize("M", [6, 40])  # 6: Triton's fused small-M kernel; 40: quantize, then the GEMM
def test_int8_linear_gives_nan_rows_for_non_finite_tokens(M):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, 48, generator=g)
    x[1, 5], x[3, 0] = NAN, INF
    w = torch.randint(-127, 128, (24, 48), generator=g, dtype=torch.int8)
    ws = torch.rand(24, generator=g) * 0.01 + 1e-3
    res = _each_backend("int8_linear", lambda: O.int8_linear(x, w, ws))
    with use_backend("torch"):
        good_ref = O.int8_linear(x[[i for i in range(M) if i not in (1, 3)]], w, ws)
    for b, y in res.items():
        assert _nan_rows_only(y, [1, 3], good_ref), b


def test_fp8_linear_gives_nan_rows_for_non_finite_tokens():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 32, generator=g)
    x[2, 1] = NAN
    w = (torch.randn(16, 32, generator=g) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    ws = torch.rand(16, generator=g) * 0.01 + 1e-3
    res = _each_backend("quantize_rows_fp8", lambda: O.fp8_linear(x, w, ws))
    with use_backend("torch"):
        good_ref = O.fp8_linear(x[[0, 1, 3, 4, 5, 6, 7]], w, ws)
    for b, y in res.items():
        assert _nan_rows_only(y, [2], good_ref), b


@pytest.mark.parametrize("fp8", [False, True])
def test_conv_gives_nan_at_output_pixels_that_see_a_non_finite_input(fp8):
    """Dynamic per output pixel: the pixels whose receptive field holds the NaN are NaN (a 3x3
    neighbourhood), the others equal the reference."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, 7, 7, generator=g)
    x[0, 2, 3, 3] = NAN
    N = 16
    if fp8:
        w = (torch.randn(N, 72, generator=g) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        call, op_name = (lambda: O.fp8_conv2d(x, w, torch.rand(N, generator=g.manual_seed(4)) * 0.01 + 1e-3,
                                              kernel_size=3, padding=1)), "fp8_conv2d"
    else:
        w = torch.randint(-127, 128, (N, 72), generator=g, dtype=torch.int8)
        call, op_name = (lambda: O.int8_conv2d(x, w, torch.rand(N, generator=g.manual_seed(4)) * 0.01 + 1e-3,
                                               kernel_size=3, padding=1)), "int8_conv2d"
    res = _each_backend(op_name, call)
    seen = torch.zeros(7, 7, dtype=torch.bool)
    seen[2:5, 2:5] = True
    for b, y in res.items():
        assert torch.isnan(y[0][:, seen]).all() and torch.isfinite(y[0][:, ~seen]).all(), b
        assert _same(y, res["torch"]), b


@pytest.mark.parametrize("act_dtype", ["int8", "fp8_e4m3"])
def test_layer_norm_quantize_poisons_the_row_it_normalises(act_dtype):
    x = _rows(M=5, K=64)
    res = _each_backend("layer_norm_quantize", lambda: O.layer_norm_quantize(x, act_dtype=act_dtype))
    y_ref, q_ref, s_ref = res["torch"]
    assert torch.isnan(y_ref[[1, 3, 4]]).all() and torch.isfinite(y_ref[[0, 2]]).all()
    assert torch.isnan(s_ref[[1, 3, 4]]).all() and torch.isfinite(s_ref[[0, 2]]).all()
    quantize = O.quantize_activation_int8 if act_dtype == "int8" else O.quantize_activation_fp8
    for b, (y, q, s) in res.items():
        # y: the norm's float output, 1 ulp apart between backends (summation order); the codes are
        # exactly the reference quantization of the y each backend wrote
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, equal_nan=True)
        with use_backend("torch"):
            q_of_y, s_of_y = quantize(y)
        assert _same(q, q_of_y) and _same(s, s_of_y), b


def test_ffn_up_next_layer_codes_read_nan_as_zero():
    """int8_ffn_up writing the next layer's static codes: a NaN output (from a poisoned row) is
    coded as the zero point, the same in every backend."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 32, generator=g)
    x[2, 3] = NAN
    w = torch.randint(-127, 128, (16, 32), generator=g, dtype=torch.int8)
    ws = torch.rand(16, generator=g) * 0.01 + 1e-3
    kw = dict(activation="gelu", next_scale=torch.tensor([0.05]), next_zero_point=torch.tensor([-3], dtype=torch.int32))
    res = _each_backend("int8_ffn_up", lambda: O.int8_ffn_up(x, w, ws, **kw))
    assert (res["torch"][2] == -3).all()
    for b, q in res.items():
        assert torch.equal(q, res["torch"]), b


def test_int8_attention_blocks_with_a_nan_give_nan_like_float_attention():
    """INT8 Q/K per block of tokens: a NaN in a query makes its block's scale NaN (that block's
    rows come out NaN; float attention has only the one row), a NaN in a key makes every row NaN,
    as in float attention. The integers and scales equal the reference in every backend; before,
    the Triton quantizer dropped the NaN and gave finite rows."""
    from diffaccel.ops.attention import QUANT_BLOCK_M, attention_int8_debug

    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 160, 16, generator=g)
    k, v = (torch.randn(1, 2, 80, 16, generator=g) for _ in range(2))
    q[0, 0, 3, 1] = NAN
    ref = attention_int8_debug(q, k, v, backend="torch")
    assert torch.isnan(ref["q_scale"][0, 0, 0]) and torch.isfinite(ref["q_scale"][0, 1]).all()
    if "triton" in runnable_backends("attention_int8"):
        tri = attention_int8_debug(q, k, v, backend="triton")
        for name in ("q_int8", "q_scale", "k_int8", "k_scale"):
            assert _same(tri[name], ref[name]), name
    res = _each_backend("attention_int8", lambda: O.attention(q, k, v, quant="int8"))
    for b, out in res.items():
        block = torch.zeros(160, dtype=torch.bool)
        block[:QUANT_BLOCK_M] = True  # the query block holding the NaN
        assert torch.isnan(out[0, 0, block]).all() and torch.isfinite(out[0, 0, ~block]).all(), b
        assert torch.isfinite(out[0, 1]).all(), b
    k[0, 1, 70, 0] = NAN
    for b, out in _each_backend("attention_int8", lambda: O.attention(q, k, v, quant="int8")).items():
        assert torch.isnan(out[0, 1]).all(), b
