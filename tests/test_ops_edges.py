"""Edges of the op API the per-op tests do not cover: a caller's autocast region, and reductions
too long for int32 sums."""
import pytest
import torch
import torch.nn.functional as F

import diffaccel.ops as O
from diffaccel.nn import QuantLinear, quantize_reason
from diffaccel.ops.gemm import MAX_INT8_K


def test_autocast_does_not_reach_the_torch_references():
    """Each op fixes its own precision; under torch.autocast(cpu, bf16) the torch references ran
    their fp32 matmuls in bf16 (attention 1.2e-2 off, fp8_gemm on integer sums 2.0 off, while
    Triton and _C ignore autocast). Results inside and outside an autocast region are identical."""
    g = torch.Generator().manual_seed(0)
    f8 = torch.float8_e4m3fn
    a = torch.randint(-8, 9, (8, 256), generator=g).float().to(f8)
    w8 = torch.randint(-8, 9, (16, 256), generator=g).float().to(f8)
    x = torch.randn(8, 256, generator=g).half()
    wq = torch.randint(-127, 128, (16, 256), generator=g, dtype=torch.int8)
    ws = torch.rand(16, generator=g) * 0.01 + 1e-3
    q, k, v = (torch.randn(1, 2, 64, 64, generator=g) for _ in range(3))
    calls = {
        "fp8_gemm": lambda: O.fp8_gemm(a, w8, torch.ones(8), torch.ones(16), out_dtype=torch.float32),
        "weight_only_gemm": lambda: O.weight_only_gemm(x, wq, ws),
        "attention": lambda: O.attention(q, k, v),
        "int8_linear": lambda: O.int8_linear(x.float(), wq, ws),
    }
    for name, call in calls.items():
        plain = call()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = call()
        assert inside.dtype == plain.dtype and torch.equal(inside, plain), name
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (O.attention(q, k, v) - exact).abs().max().item() < 1e-5


def test_int32_sums_refuse_reductions_that_could_overflow():
    """int8 codes times int8 weights are summed in int32: K = 140000 codes of 127 gave -2.04e9 for
    2.26e9. The int8 ops refuse K above MAX_INT8_K (255 * 128 * K must fit), naming K; the layers
    leave such a layer in floating point with the reason. Weight-only and fp8 sums are float."""
    K = MAX_INT8_K + 128
    a = torch.full((2, K), 127, dtype=torch.int8)
    w = torch.full((4, K), 127, dtype=torch.int8)
    with pytest.raises(ValueError, match=f"^K: {K} int8 products would be summed in int32"):
        O.int8_gemm(a, w, torch.ones(2), torch.ones(4))
    with pytest.raises(ValueError, match="^K: "):
        O.int8_linear(torch.ones(2, K), w, torch.ones(4))
    with pytest.raises(ValueError, match="^K: "):
        O.int8_conv2d(torch.ones(1, K // 16, 4, 4), w, torch.ones(4), kernel_size=4)  # K = C * 4 * 4
    with pytest.raises(ValueError, match="^K: "):
        O.int8_ffn_up(torch.ones(2, K), w, torch.ones(4), activation="gelu")
    # the largest K accepted is exact (127 * 127 * K fits)
    a, w = a[:, :MAX_INT8_K], w[:, :MAX_INT8_K]
    y = O.int8_gemm(a, w, torch.ones(2), torch.ones(4), out_dtype=torch.float32)
    assert torch.equal(y, torch.full((2, 4), 127.0 * 127.0 * MAX_INT8_K))
    big = torch.nn.Linear(K, 4)
    assert "overflow the int32 sums" in quantize_reason(big, "w8a8")
    assert quantize_reason(big, "w4a16") is None and quantize_reason(big, "fp8") is None
    with pytest.raises(ValueError, match="overflow the int32 sums"):
        QuantLinear.from_float(big, "w8a8")


def test_arguments_that_used_to_be_misread_are_refused():
    """Each of these ran and gave a wrong result: an `add` of shape [C, B] (same count as [B, C])
    applied to the wrong channels; codes given as [K, N] reshaped, not transposed, into [N, K];
    guidance_scale without the conditional half ignored; a NaN guidance_scale accepted; a float
    group size accepted by QuantSpec and failing later (numpy integers are kept as ints)."""
    from diffaccel.ops.norm import group_norm_affine
    from diffaccel.quant.formats import QuantSpec

    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match=r"^add: expected one value per sample and channel .* got shape \(8, 2\)"):
        group_norm_affine(x, 2, torch.ones(8), torch.zeros(8), 1e-5, add=torch.randn(8, 2))
    a = torch.randn(2, 8)  # [B, C] and [B, C, 1, 1] are the same add
    assert torch.equal(group_norm_affine(x, 2, torch.ones(8), torch.zeros(8), 1e-5, add=a),
                       group_norm_affine(x, 2, torch.ones(8), torch.zeros(8), 1e-5, add=a[:, :, None, None]))

    lin = torch.nn.Linear(32, 8)
    codes = torch.randint(-127, 128, (8, 32), dtype=torch.int8)
    with pytest.raises(ValueError, match=r"^weight_q: expected 256 codes .* got \(32, 8\)"):
        QuantLinear.from_float(lin, "w8a8", weight_q=codes.t().contiguous(), weight_scale=torch.ones(8))
    QuantLinear.from_float(lin, "w8a8", weight_q=codes, weight_scale=torch.ones(8))

    s = torch.randn(1, 4, 8, 8)
    row = torch.zeros(24)
    row[0] = 1.0
    with pytest.raises(ValueError, match="^guidance_scale: 7.5 needs model_output_cond"):
        O.fused_solver_step(s, s, row, guidance_scale=7.5)
    with pytest.raises(ValueError, match="^guidance_scale: expected a finite number"):
        O.fused_solver_step(s, s, row, model_output_cond=s, guidance_scale=float("nan"))

    with pytest.raises(ValueError, match="^weight_group_size: expected one of"):
        QuantSpec(weight_group_size=16.0)
    np = pytest.importorskip("numpy")
    spec = QuantSpec(weight_group_size=np.int64(16))
    assert type(spec.weight_group_size) is int and spec.weight_group_size == 16


def test_quantized_layers_refuse_another_formats_state_and_float64_input():
    """load_state_dict of an fp8 layer's state into a w8a8 layer of the same shape reported every
    key matched and cast the fp8 codes to int8 (448 -> 120); now it names the buffer. Weight-only
    layers refuse float64 activations like the int8 / fp8 ones (they cast them to bf16)."""
    lin = torch.nn.Linear(32, 8)
    w8a8, fp8 = QuantLinear.from_float(lin, "w8a8"), QuantLinear.from_float(lin, "fp8")
    before = {k: v.clone() for k, v in w8a8.state_dict().items()}
    with pytest.raises(RuntimeError, match="weight_q: stored as torch.float8_e4m3fn, this layer holds torch.int8"):
        w8a8.load_state_dict(fp8.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in w8a8.state_dict().items())
    fresh = QuantLinear.from_float(torch.nn.Linear(32, 8), "w8a8")
    fresh.load_state_dict(w8a8.state_dict())
    x = torch.randn(3, 32)
    assert torch.equal(fresh(x), w8a8(x))
    w4a16 = QuantLinear.from_float(torch.nn.Linear(128, 8).to(torch.bfloat16), "w4a16")
    with pytest.raises(TypeError, match="^x: expected float16, bfloat16 or float32 activations, got torch.float64"):
        w4a16(torch.randn(3, 128, dtype=torch.float64))


def test_empty_features_and_bad_group_sizes_are_named():
    """Raw IndexError / ZeroDivisionError / reshape errors before: zero features to a per-token
    quantizer, a 0-d input, a group size of 0, -16 or 16.0, a 0-d tensor to pack."""
    from diffaccel.quant import formats as fmt

    f8 = torch.float8_e4m3fn
    wi = torch.ones(6, 4, dtype=torch.int8)
    for call in (lambda: O.quantize_activation_int8(torch.randn(3, 0)),
                 lambda: O.quantize_activation_fp8(torch.randn(3, 0)),
                 lambda: O.fp8_linear(torch.tensor(1.0), torch.ones(6, 4).to(f8), torch.ones(6)),
                 lambda: O.weight_only_gemm(torch.randn(2, 0).half(), wi[:, :0], torch.ones(6))):
        with pytest.raises(ValueError, match=r"^x: expected \[\.\.\., K\] with K > 0 features"):
            call()
    for g in (0, -16, 16.0):
        with pytest.raises(ValueError, match="^group_size: expected a positive int or None"):
            fmt.quantize_weight_int(torch.randn(4, 32), 8, g)
    with pytest.raises(ValueError, match="^weight: expected a 2-d"):
        fmt.quantize_weight_int(torch.randn(4, 0), 8)
    with pytest.raises(ValueError, match="^q: expected"):
        fmt.pack_int4(torch.tensor(3, dtype=torch.int8))
    with pytest.raises(ValueError, match="^packed: expected"):
        fmt.unpack_int4(torch.tensor(3, dtype=torch.uint8))


def test_numpy_scalars_pass_where_python_numbers_do():
    """np.float32(0.1) / np.int32(3) were refused ('expected a float ..., got float32') wherever a
    python number passes; they now give the same result as the python number."""
    import numpy as np

    from diffaccel.ops.philox import seed_as_int64

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=g)
    assert torch.equal(O.quantize_per_tensor(x, np.float32(0.05), np.int32(3)),
                       O.quantize_per_tensor(x, float(np.float32(0.05)), 3))
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g) for _ in range(3))
    assert torch.equal(O.attention(q, k, v, scale=np.float32(0.25)), O.attention(q, k, v, scale=0.25))
    xg = torch.randn(2, 8, 4, 4, generator=g)
    ones, zeros = torch.ones(8), torch.zeros(8)
    assert torch.equal(O.group_norm_affine(xg, np.int64(4), ones, zeros, np.float32(1e-5)),
                       O.group_norm_affine(xg, 4, ones, zeros, float(np.float32(1e-5))))
    xh, wq, ws = x.half(), torch.randint(-7, 8, (6, 32), generator=g, dtype=torch.int8), torch.rand(6, 2) + 0.1
    assert torch.equal(O.weight_only_gemm(xh, wq, ws, group_size=np.int64(16)),
                       O.weight_only_gemm(xh, wq, ws, group_size=16))
    assert seed_as_int64(np.uint64(2**64 - 1)) == -1
    with pytest.raises(TypeError, match="^scale: expected a float"):
        O.quantize_per_tensor(x, np.bool_(True))


def test_out_of_range_zero_points_and_bad_dequantize_arguments_are_named():
    """A python zero point beyond int32 raised torch's 'value cannot be converted to type int32';
    dequantize_int with a scale of the wrong shape raised a raw reshape error; an fp4 group whose
    fp16 scale overflows gave inf scales."""
    from diffaccel.quant import formats as fmt

    x = torch.randn(4, 32)
    for zp in (2**40, 128, -129):
        with pytest.raises(ValueError, match=r"^zero_point: expected a value in \[-128, 127\]"):
            O.quantize_per_tensor(x, 0.1, zp)
    w = torch.randn(8, 64)
    q, s = fmt.quantize_weight_int(w, 8, 32)
    assert (fmt.dequantize_int(q, s, 32) - w).abs().max() <= s.max() / 2 + 1e-6
    with pytest.raises(ValueError, match=r"^scale: expected shape \(8, 2\)"):
        fmt.dequantize_int(q, s[:, 0], 32)
    with pytest.raises(ValueError, match=r"^scale: expected shape \(8,\)"):
        fmt.dequantize_int(q, s, None)
    with pytest.raises(TypeError, match="^q: expected an int8"):
        fmt.dequantize_int(q.float(), s, 32)
    with pytest.raises(ValueError, match="^weight: fp4_e2m1 stores group scales in float16"):
        fmt.quantize_weight_fp4(w * 1e6, 16)
    packed, s4 = fmt.quantize_weight_fp4(w * 6e4, 16)  # the largest |w| still fits
    assert torch.isfinite(s4).all()


@pytest.mark.parametrize("padding,kernel,dilation", [("valid", 3, 1), ("same", 3, 1), ("same", 3, 2), ("same", 5, 1)])
def test_quant_conv_takes_string_padding(padding, kernel, dilation):
    """'valid' and symmetric 'same' convs were left float ('give explicit padding'); they are
    quantized with the equivalent explicit padding and match the float conv's output shape and the
    layer's reference. An asymmetric 'same' (even kernel) stays float with the reason."""
    from torch import nn

    from diffaccel.nn import QuantConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, kernel, padding=padding, dilation=dilation)
    assert quantize_reason(conv, "w8a8") is None
    layer = QuantConv2d.from_float(conv, "w8a8")
    x = torch.randn(2, 8, 9, 11)
    ref = nn.Conv2d(8, 16, kernel, padding=layer.padding, dilation=dilation)
    ref.load_state_dict(conv.state_dict())
    assert torch.equal(QuantConv2d.from_float(ref, "w8a8")(x), layer(x))
    y = layer(x)
    assert y.shape == conv(x).shape
    assert (y - conv(x)).abs().max() < 0.1
    assert "pads unevenly" in quantize_reason(nn.Conv2d(8, 16, 2, padding="same"), "w8a8")


@pytest.mark.parametrize("spec", ["w8a8", "fp8", "w4a16"])
def test_a_quantized_layer_cast_to_float64_says_so(spec):
    """layer.double() then a call: int8 / fp8 layers raised 'out_dtype: ...' (an argument the caller
    never passed) and weight-only ones returned float64 from a bf16 kernel; all now name the cast,
    and .float() brings the layer back."""
    layer = QuantLinear.from_float(torch.nn.Linear(128, 16), spec)
    x = torch.randn(2, 128)
    expected = layer(x)
    layer.double()
    with pytest.raises(TypeError, match=r"^module: cast to torch.float64 \(e.g. .double\(\)\)"):
        layer(x)
    assert torch.equal(layer.float()(x), expected)


def test_a_lazy_layer_is_refused_as_uninitialized():
    """A LazyLinear's weight was reported as 'quantized or sharded by another library'."""
    lazy = torch.nn.LazyLinear(8)
    assert quantize_reason(lazy, "w8a8").startswith("weight is not initialized yet (a lazy module")
    with pytest.raises(TypeError, match="weight is not initialized yet"):
        QuantLinear.from_float(lazy, "w8a8")


def _runnable(op_name: str) -> list:
    from diffaccel.ops import _backend

    cpu = torch.device("cpu")
    return [b for b in _backend.BACKENDS if _backend._why_not(_backend.registered_ops()[op_name], b, cpu) is None]


def _each_backend(op_name, call):
    """{backend: call()} for every backend that runs ``op_name`` here (Triton in its interpreter)."""
    out = {}
    for b in _runnable(op_name):
        with O.use_backend(b):
            out[b] = call()
    assert "torch" in out
    return out


def test_vectors_of_any_stride_are_read_by_index():
    """A per-channel w_scale (or per-row a_scale, bias) that is a strided view or an expanded
    scalar passes the checks; the Triton fp8 GEMM / weight-only GEMM / fp8 conv read it as if it
    were contiguous (fp8_gemm 68.6 off on integer sums, 3.9e13 reading past an expanded one)."""
    g = torch.Generator().manual_seed(0)
    M, N, K = 3, 7, 16
    f8 = torch.float8_e4m3fn
    a = torch.randint(-16, 17, (M, K), generator=g).float().to(f8)
    w8 = torch.randint(-16, 17, (N, K), generator=g).float().to(f8)
    wi = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    strided = (torch.rand(2 * N, generator=g) + 0.1)[::2]
    expanded = torch.tensor([0.3]).expand(N)
    a_strided = (torch.rand(M, 2, generator=g) + 0.1)[:, :1]  # [M, 1] with row stride 2
    x = torch.randint(-3, 4, (M, K), generator=g).half()
    img = torch.randn(2, 4, 5, 5, generator=g)
    w_conv8 = torch.randint(-8, 9, (N, 4 * 9), generator=g).float().to(f8)
    w_convi = torch.randint(-127, 128, (N, 4 * 9), generator=g, dtype=torch.int8)
    for ws in (strided, expanded):
        calls = {
            "fp8_gemm": lambda: O.fp8_gemm(a, w8, a_strided, ws, bias=strided, out_dtype=torch.float32),
            "weight_only_gemm": lambda: O.weight_only_gemm(x, wi, ws),
            "fp8_conv2d": lambda: O.fp8_conv2d(img, w_conv8, ws, kernel_size=3, padding=1, bias=strided),
            "int8_conv2d": lambda: O.int8_conv2d(img, w_convi, ws, kernel_size=3, padding=1, bias=strided),
        }
        for name, call in calls.items():
            got = _each_backend(name, call)
            for backend, y in got.items():
                assert torch.allclose(y, got["torch"], rtol=1e-5, atol=1e-4), (name, backend, tuple(ws.stride()))


def test_w4a8_codes_at_an_odd_offset_and_per_tensor_ffn_codes():
    """Triton's W4A8 GEMM reads int8 codes in (even, odd) pairs and took a contiguous tensor at an
    odd storage offset (flat[1:].view(M, K)) as it was: 'storage_offset() must be divisible by 2'.
    int8_ffn_up on int8 codes with one per-tensor act_scale read act_scale[m] for every row
    (garbage from row 1 on)."""
    from diffaccel.quant import formats as fmt

    g = torch.Generator().manual_seed(1)
    M, N, K = 3, 7, 32
    codes = torch.randint(-127, 128, (M * K + 1,), generator=g, dtype=torch.int8)[1:].view(M, K)
    assert codes.is_contiguous() and codes.storage_offset() % 2
    w4 = fmt.pack_int4(torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8))
    a_scale, w_scale = torch.rand(M, 1, generator=g) + 0.1, torch.rand(N, generator=g) + 0.1
    got = _each_backend("int8_act_gemm", lambda: O.int8_gemm(codes, w4, a_scale, w_scale, w_int4=True,
                                                         out_dtype=torch.float32))
    assert all(torch.equal(y, got["torch"]) for y in got.values()), list(got)
    q = torch.randint(-127, 128, (5, 64), generator=g, dtype=torch.int8)
    wi = torch.randint(-127, 128, (33, 64), generator=g, dtype=torch.int8)
    ws = torch.rand(33, generator=g) * 0.01 + 1e-4
    got = _each_backend("int8_ffn_up", lambda: O.int8_ffn_up(q, wi, ws, activation="gelu",
                                                              act_scale=torch.tensor([0.02]), out_dtype=torch.float32))
    assert all(torch.allclose(y, got["torch"], rtol=1e-5, atol=1e-5) for y in got.values()), list(got)
