"""Quantized GEMMs at SDXL UNet and Flux transformer linear shapes, M = 1 ... 16384 tokens.

Ours (the backend diffaccel picks on a GPU: the CUTLASS GEMMs for W8A8 int8 and fp8 on sm_90 where the
build has them, else Triton; the torch reference in the CPU smoke run): W8A8 int8 including the dynamic
per-token activation quantization (fp16 in, fp16 out), the int8 GEMM alone on pre-quantized
activations, the int8 GEMM quantizing its own rows at every M (``-quant-in-gemm``: the data for
``diffaccel.ops.gemm.FUSED_QUANT_MAX_M``, the M up to which ``int8_linear`` does that instead of a
separate quantization pass), W4A8 (int4 group 128) including quantization, FP8 (per-token fp8 quantization +
GEMM, bf16), W4A16 (weight-only, M <= 1024). Baselines: cuBLAS fp16 and bf16 (F.linear),
torch._int_mm (int8 GEMM only, int32 out, no dequantization), torch._scaled_mm rowwise (fp8 GEMM
only on pre-quantized operands), and torchao when its wheel is installed (carried to the GPU machine
like diffusers' wheel, see BENCHMARKS.md): its int8 dynamic-activation Linear eager (the path that is
~20x slower than bf16 on Flux without compilation) and under torch.compile (M >= 4096 only: every M is
a separate compile), and its fp8 rowwise Linear eager. ``-triton`` W8A8 / FP8 cases force the Triton
GEMM where the automatic choice is the CUTLASS one (sm_90), so both are measured in one run. Also: q/k/v
projections with one shared activation quantization, and whole diffusers feed-forwards
(FusedFeedForward vs the same quantized layers run one by one vs fp16).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from benchmarks._util import annotate, device, is_smoke, measure
from diffaccel.ops import _backend, use_backend
from diffaccel.ops import gemm as G
from diffaccel.quant import formats as fmt

FAMILY = "gemm"
if is_smoke():
    SHAPES = [("tiny", 48, 128)]
    MS = [8]
else:  # (model, N, K) of nn.Linear(K, N)
    SHAPES = [("sdxl-attn1280", 1280, 1280), ("sdxl-ff-geglu", 10240, 1280), ("sdxl-ff-out", 1280, 5120),
              ("flux-qkv", 9216, 3072), ("flux-mlp-up", 12288, 3072), ("flux-mlp-down", 3072, 12288)]
    MS = [1, 256, 1024, 4096, 16384]
IMPLS = ["diffaccel:w8a8", "diffaccel:w8a8-gemm-only", "diffaccel:w8a8-triton", "diffaccel:w8a8-gemm-only-triton",
         "diffaccel:w8a8-quant-in-gemm", "diffaccel:w4a8", "diffaccel:fp8", "diffaccel:fp8-triton", "diffaccel:w4a16",
         "baseline:cublas-fp16", "baseline:cublas-bf16", "baseline:torch-int_mm", "baseline:torch-scaled_mm-rowwise",
         "baseline:torchao-int8-dynamic", "baseline:torchao-int8-dynamic-compiled", "baseline:torchao-fp8-rowwise"]
TORCHAO_COMPILED_MIN_M = 4096

_weights = {}
_torchao = {}


def _torchao_linear(impl, N, K, dev, weight):
    """nn.Linear(K, N) holding ``weight``, quantized in place by torchao's ``quantize_`` (int8 weights +
    dynamic per-token int8 activations in fp16, or fp8 rowwise in bf16); compiled for ``-compiled``."""
    try:
        from torchao.quantization import quantize_
    except ImportError:
        pytest.skip("torchao is not installed")
    key = (impl, N, K, str(dev))
    if key not in _torchao:
        from torch import nn

        if impl == "baseline:torchao-fp8-rowwise":
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

            config, dtype = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), torch.bfloat16
        else:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig

            config, dtype = Int8DynamicActivationInt8WeightConfig(), torch.float16
        lin = nn.Linear(K, N, bias=False, device=dev, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(weight.to(dtype))
        quantize_(lin, config)
        if impl.endswith("-compiled"):
            lin = torch.compile(lin, dynamic=False)
        _torchao[key] = (lin, dtype)
    return _torchao[key]


def _quantized(N, K, dev):
    key = (N, K, str(dev))
    if key not in _weights:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(N, K, generator=g) * 0.02
        q8, s8 = fmt.quantize_weight_int(w, 8)
        q4, s4 = fmt.quantize_weight_int(w, 4, 128)
        f8, sf8 = fmt.quantize_weight_fp8(w)
        _weights[key] = {k: v.to(dev) for k, v in dict(
            w16=w.half(), wbf=w.bfloat16(), q8=q8, s8=s8, q4=fmt.pack_int4(q4), s4=s4, f8=f8, sf8=sf8,
            q8_t=q8.t().contiguous().t()).items()}
    return _weights[key]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_gemm(benchmark, shape, M, impl):
    name, N, K = shape
    dev = device()
    W = _quantized(N, K, dev)
    x16 = torch.randn(M, K, device=dev).half()
    xbf = x16.bfloat16()
    flops = 2 * M * N * K
    w_bytes = N * K * 2
    if impl.endswith("-triton"):
        # the same call with the Triton GEMM forced: only where the automatic choice is another one
        base = impl[: -len("-triton")]
        fp8 = base == "diffaccel:fp8"
        if fp8 and dev.type == "cuda" and torch.cuda.get_device_capability() < (8, 9):
            pytest.skip("fp8 needs sm_89+")
        if _backend.choose("fp8_gemm" if fp8 else "int8_act_gemm", dev)[0] != "cuda":
            pytest.skip("the automatic choice is already Triton (or the reference) here")
        annotate(benchmark, family=FAMILY, case=f"{name} N={N} K={K} M={M}", shape={"M": M, "N": N, "K": K},
                 dtype="bf16" if fp8 else "fp16", impl=impl, flops=flops, bytes=M * K * 2 + N * K + M * N * 2)
        if fp8:
            fn = lambda: G.fp8_linear(xbf, W["f8"], W["sf8"])  # noqa: E731
        elif base == "diffaccel:w8a8":
            fn = lambda: G.int8_linear(x16, W["q8"], W["s8"])  # noqa: E731
        else:
            aq, sa = G.quantize_activation_int8(x16)
            fn = lambda: G.int8_gemm(aq, W["q8"], sa, W["s8"], out_dtype=torch.float16)  # noqa: E731
        with torch.no_grad(), use_backend("triton"):
            out = measure(benchmark, fn)
        assert out.shape == (M, N)
        return
    if impl == "diffaccel:w8a8":
        fn, w_bytes = (lambda: G.int8_linear(x16, W["q8"], W["s8"])), N * K
    elif impl == "diffaccel:w8a8-gemm-only":
        aq, sa = G.quantize_activation_int8(x16)
        fn, w_bytes = (lambda: G.int8_gemm(aq, W["q8"], sa, W["s8"], out_dtype=torch.float16)), N * K
    elif impl == "diffaccel:w8a8-quant-in-gemm":
        # int8_linear's other form at every M: each output tile quantizes its own rows (an amax pass
        # over them, then quantize-on-load), no separate pass; it takes it up to FUSED_QUANT_MAX_M rows
        from diffaccel.kernels import gemm as kernels_gemm

        out16 = torch.empty(M, N, dtype=torch.float16, device=dev)

        def fn():
            kernels_gemm.int8_act_gemm(x16, W["q8"], None, W["s8"], None, None, None, None, out16, group_size=0,
                                       w_int4=False, fuse_quant=1, per_token=True)
            return out16
        w_bytes = N * K
    elif impl == "diffaccel:w4a8":
        fn, w_bytes = (lambda: G.int8_linear(x16, W["q4"], W["s4"], group_size=128, w_int4=True)), N * K // 2
    elif impl == "diffaccel:fp8":
        if dev.type == "cuda" and torch.cuda.get_device_capability() < (8, 9):
            pytest.skip("fp8 needs sm_89+")
        fn, w_bytes = (lambda: G.fp8_linear(xbf, W["f8"], W["sf8"])), N * K
    elif impl == "diffaccel:w4a16":
        if M > 1024:
            pytest.skip("weight-only kernel is for small M (the layer dequantizes + cuBLAS above 256 rows)")
        fn, w_bytes = (lambda: G.weight_only_gemm(x16, W["q4"], W["s4"], group_size=128, w_int4=True)), N * K // 2
    elif impl == "baseline:cublas-fp16":
        fn = lambda: F.linear(x16, W["w16"])  # noqa: E731
    elif impl == "baseline:cublas-bf16":
        fn = lambda: F.linear(xbf, W["wbf"])  # noqa: E731
    elif impl == "baseline:torch-int_mm":
        if dev.type == "cuda" and M <= 16:
            pytest.skip("torch._int_mm on CUDA needs M > 16")
        aq, _ = G.quantize_activation_int8(x16)
        wt = W["q8"].t()
        fn, w_bytes = (lambda: torch._int_mm(aq, wt)), N * K
    elif impl == "baseline:torch-scaled_mm-rowwise":
        if dev.type == "cuda" and torch.cuda.get_device_capability() < (8, 9):
            pytest.skip("fp8 needs sm_89+")
        aq, sa = G.quantize_activation_fp8(xbf)
        sw = W["sf8"].reshape(1, N)
        wt = W["f8"].t()
        fn, w_bytes = (lambda: torch._scaled_mm(aq, wt, scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16)), N * K
    elif impl.startswith("baseline:torchao"):
        if "fp8" in impl and dev.type == "cuda" and torch.cuda.get_device_capability() < (8, 9):
            pytest.skip("fp8 needs sm_89+")
        if "fp8" in impl and dev.type != "cuda":
            pytest.skip("torchao's fp8 Linear needs a CUDA GPU (sm_89+)")
        if impl.endswith("-compiled") and not is_smoke() and M < TORCHAO_COMPILED_MIN_M:
            pytest.skip(f"torchao compiled only at M >= {TORCHAO_COMPILED_MIN_M} (each M compiles anew)")
        lin, dt = _torchao_linear(impl, N, K, dev, W["w16"])
        xt = x16.to(dt)
        fn, w_bytes = (lambda: lin(xt)), N * K
    else:
        raise ValueError(impl)
    annotate(benchmark, family=FAMILY, case=f"{name} N={N} K={K} M={M}", shape={"M": M, "N": N, "K": K},
             dtype="fp16" if "bf16" not in impl and "fp8" not in impl and "scaled" not in impl else "bf16",
             impl=impl, flops=flops, bytes=M * K * 2 + w_bytes + M * N * 2)
    with torch.no_grad():
        out = measure(benchmark, fn)
    assert out.shape == (M, N)


# -- q/k/v projections of one input: one shared activation quantization vs one per layer --------

QKV_SHAPES = [("tiny", 64)] if is_smoke() else [("sdxl-attn1280", 1280), ("flux-attn3072", 3072)]
QKV_MS = [G.FUSED_QUANT_MAX_M + 8] if is_smoke() else [1024, 4096, 16384]
QKV_IMPLS = ["diffaccel:w8a8-shared", "diffaccel:w8a8-per-layer", "baseline:cublas-fp16"]
_qkv_layers = {}


def _qkv(D, dev):
    from torch import nn

    from diffaccel.nn import QuantLinear

    key = (D, str(dev))
    if key not in _qkv_layers:
        torch.manual_seed(0)
        lins = [nn.Linear(D, D).half().to(dev) for _ in range(3)]
        _qkv_layers[key] = (lins, [QuantLinear.from_float(lin, "w8a8") for lin in lins])
    return _qkv_layers[key]


@pytest.mark.parametrize("impl", QKV_IMPLS)
@pytest.mark.parametrize("M", QKV_MS)
@pytest.mark.parametrize("shape", QKV_SHAPES, ids=lambda s: s[0])
def test_qkv_projections(benchmark, shape, M, impl):
    """What diffaccel's attention processors run for q/k/v: ``project_shared`` quantizes the input once."""
    from diffaccel.nn.shared_input import project_shared

    name, D = shape
    dev = device()
    lins, quant = _qkv(D, dev)
    x = torch.randn(M, D, device=dev).half()
    if impl == "diffaccel:w8a8-shared":
        fn, w_bytes = (lambda: project_shared(x, *quant)), 3 * D * D
    elif impl == "diffaccel:w8a8-per-layer":
        fn, w_bytes = (lambda: tuple(layer(x) for layer in quant)), 3 * D * D
    else:
        fn, w_bytes = (lambda: tuple(lin(x) for lin in lins)), 3 * D * D * 2
    annotate(benchmark, family=FAMILY, case=f"qkv {name} D={D} M={M}", shape={"M": M, "N": 3 * D, "K": D},
             dtype="fp16", impl=impl, flops=3 * 2 * M * D * D, bytes=M * D * 2 + w_bytes + 3 * M * D * 2)
    out = measure(benchmark, fn)
    assert len(out) == 3 and out[0].shape == (M, D)


# -- the whole feed-forward: activation in the up projection's epilogue vs the loop over net ------

FF_SHAPES = [("tiny-geglu", 64, "geglu"), ("tiny-gelu-tanh", 64, "gelu-approximate")] if is_smoke() else [
    ("sdxl-ff-geglu", 1280, "geglu"), ("flux-ff-gelu-tanh", 3072, "gelu-approximate")]
FF_MS = [G.FUSED_QUANT_MAX_M + 8] if is_smoke() else [1024, 4096, 16384]
FF_IMPLS = ["diffaccel:w8a8-fused", "diffaccel:w8a8-static-fused", "baseline:w8a8-loop", "baseline:w8a8-static-loop",
            "baseline:cublas-fp16"]
_ffs = {}


def _feed_forwards(D, activation_fn, dev):
    """diffusers FeedForward(D, mult=4): fp16 float, W8A8 dynamic and W8A8 static (scales from one
    batch, as a calibrated recipe holds them), each quantized one also as FusedFeedForward."""
    from diffusers.models.attention import FeedForward

    from diffaccel.nn import FusedFeedForward, QuantLinear
    from diffaccel.quant import QuantSpec

    key = (D, activation_fn, str(dev))
    if key not in _ffs:
        torch.manual_seed(0)
        ff = FeedForward(D, mult=4, activation_fn=activation_fn).eval().half().to(dev)
        x = torch.randn(256, D, device=dev).half()
        h = ff.net[0](x)
        static = QuantSpec(weight_dtype="int8", act_dtype="int8", act_mode="static")
        made = {"fp16": ff}
        for mode in ("dynamic", "static"):
            q = copy.deepcopy(ff)
            for holder, attr, inp in ((q.net[0], "proj", x), (q.net, 2, h)):
                lin = getattr(holder, attr) if isinstance(attr, str) else holder[attr]
                if mode == "static":
                    scale = (inp.float().abs().amax() / 127).reshape(1).cpu()
                    new = QuantLinear.from_float(lin, static, act_scale=scale)
                else:
                    new = QuantLinear.from_float(lin, "w8a8")
                if isinstance(attr, str):
                    setattr(holder, attr, new)
                else:
                    holder[attr] = new
            made[f"{mode}-loop"] = q
            made[f"{mode}-fused"] = FusedFeedForward(q)
        _ffs[key] = made
    return _ffs[key]


@pytest.mark.parametrize("impl", FF_IMPLS)
@pytest.mark.parametrize("M", FF_MS)
@pytest.mark.parametrize("shape", FF_SHAPES, ids=lambda s: s[0])
def test_feed_forward(benchmark, shape, M, impl):
    """A diffusers FeedForward (dim D, inner 4D) at M tokens: FusedFeedForward (GELU / GEGLU in the up
    projection's epilogue; static: it writes the down projection's int8 codes) vs the same quantized
    layers run one by one as diffusers does, vs fp16 cuBLAS."""
    name, D, activation_fn = shape
    dev = device()
    made = _feed_forwards(D, activation_fn, dev)
    mode = "static" if "static" in impl else "dynamic"
    module = made["fp16"] if impl == "baseline:cublas-fp16" else made[f"{mode}-{impl.rsplit('-', 1)[-1]}"]
    x = torch.randn(M, D, device=dev).half()
    up_rows = 8 * D if activation_fn == "geglu" else 4 * D
    w_bytes = (up_rows * D + 4 * D * D) * (2 if impl == "baseline:cublas-fp16" else 1)
    annotate(benchmark, family=FAMILY, case=f"ff {name} D={D} M={M}", shape={"M": M, "D": D, "inner": 4 * D},
             dtype="fp16", impl=impl, flops=2 * M * D * (up_rows + 4 * D), bytes=2 * M * D * 2 + w_bytes)
    with torch.no_grad():
        out = measure(benchmark, lambda: module(x))
    assert out.shape == (M, D)
