"""Quantized 3x3 convs at SDXL UNet resnet shapes (batch 2 = the CFG pair, fp16 NCHW in and out).

Ours (Triton on a GPU; the torch reference in the CPU smoke run): the implicit-GEMM int8 conv
``diffaccel.ops.int8_conv2d`` including the activation quantization — W8A8 dynamic per output
pixel, W8A8 static per tensor with a zero point, W4A8 (int4 group 128) dynamic — and the FP8
one, ``diffaccel.ops.fp8_conv2d`` (E4M3 dynamic per output pixel, and static with Q-Diffusion's split
input: two scales over the channel halves; sm_89+). Baselines: cuDNN fp16
``F.conv2d``, and the paths QuantConv2d took before (``F.unfold`` + ``int8_linear`` /
``fp8_linear`` + the transpose back to NCHW), W8A8 dynamic, W4A8, FP8 and FP8 split. Also whole diffusers
ResnetBlock2Ds: the fused forward (GroupNorm + SiLU in the convs' gather) vs diffusers' forward on
the same W8A8 convs vs fp16.
"""
import pytest
import torch
import torch.nn.functional as F

from benchmarks._util import annotate, device, is_smoke, measure
from diffaccel.ops import conv as CV
from diffaccel.ops import gemm as G
from diffaccel.quant import formats as fmt

FAMILY = "conv"
if is_smoke():
    SHAPES = [("tiny", 1, 16, 6, 6, 8)]
else:  # (name, B, C, H, W, N): the resnet conv1/conv2 of each SDXL UNet level at 1024x1024
    SHAPES = [("sdxl-res320@128", 2, 320, 128, 128, 320), ("sdxl-res640@64", 2, 640, 64, 64, 640),
              ("sdxl-res1280@32", 2, 1280, 32, 32, 1280)]
IMPLS = ["diffaccel:w8a8", "diffaccel:w8a8-static-zp", "diffaccel:w4a8", "diffaccel:fp8", "diffaccel:fp8-split-static",
         "baseline:cudnn-fp16", "baseline:unfold-int8_linear-w8a8", "baseline:unfold-int8_linear-w4a8",
         "baseline:unfold-fp8_linear", "baseline:unfold-fp8_linear-split-static"]
KS, PAD = 3, 1

_weights = {}


def _quantized(C, N, dev):
    key = (C, N, str(dev))
    if key not in _weights:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(N, C, KS, KS, generator=g) * 0.02
        w2 = w.reshape(N, -1)
        q8, s8 = fmt.quantize_weight_int(w2, 8)
        # W4A8 preset groups of 128 where K allows (K = 2880 at 320 channels takes 64)
        group4 = next(gs for gs in (128, 64, 16) if w2.shape[1] % gs == 0)
        q4, s4 = fmt.quantize_weight_int(w2, 4, group4)
        f8, sf8 = fmt.quantize_weight_fp8(w2)
        _weights[key] = {k: v.to(dev) for k, v in dict(
            w16=w.half(), q8=q8, s8=s8, sum8=q8.to(torch.int32).sum(1, dtype=torch.int32), q4=fmt.pack_int4(q4),
            s4=s4, f8=f8, sf8=sf8, bias=torch.randn(N, generator=g)).items()}
        _weights[key]["group4"] = group4
    return _weights[key]


def _unfold_linear(x, q, s, N, linear=G.int8_linear, **kw):
    B, _, H, W = x.shape
    cols = F.unfold(x, KS, padding=PAD)
    y = linear(cols.transpose(1, 2).reshape(-1, cols.shape[1]), q, s, **kw)
    return y.reshape(B, H * W, N).transpose(1, 2).reshape(B, N, H, W)


def _split_scales(x):
    """Q-Diffusion's split input at the half: two static FP8 scales (a conv on cat(h, skip))."""
    C1 = x.shape[1] // 2
    return torch.stack([x[:, :C1].float().abs().amax(), x[:, C1:].float().abs().amax()]) / 448, C1


def _unfold_fp8_split(x, q, s, N, scales, C1, bias):
    """What QuantConv2d ran for a split fp8 input before fp8_conv2d took act_split: im2col, then two
    static fp8 GEMMs over the K ranges, summed in fp32 with the bias on the second."""
    B, _, H, W = x.shape
    cols = F.unfold(x, KS, padding=PAD)
    x2 = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    k1 = C1 * KS * KS
    ys = [G.fp8_linear(x2[:, ks], q[:, ks], s, act_scale=scales[p], bias=bias if p else None, out_dtype=torch.float32)
          for p, ks in enumerate((slice(0, k1), slice(k1, None)))]
    return (ys[0] + ys[1]).half().reshape(B, H * W, N).transpose(1, 2).reshape(B, N, H, W)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_conv(benchmark, shape, impl):
    name, B, C, H, W, N = shape
    dev = device()
    if "fp8" in impl and dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (8, 9):
        pytest.skip("fp8 needs sm_89+")
    Wt = _quantized(C, N, dev)
    x = torch.randn(B, C, H, W, device=dev).half()
    K = C * KS * KS
    bias = Wt["bias"]
    conv = dict(kernel_size=KS, padding=PAD, bias=bias)
    w_bytes = N * K
    if impl == "diffaccel:w8a8":
        fn = lambda: CV.int8_conv2d(x, Wt["q8"], Wt["s8"], **conv)  # noqa: E731
    elif impl == "diffaccel:w8a8-static-zp":
        scale = (x.float().abs().amax() / 120).reshape(1)
        zp = torch.tensor([3], dtype=torch.int32, device=dev)
        fn = lambda: CV.int8_conv2d(x, Wt["q8"], Wt["s8"], act_scale=scale, act_zero_point=zp,  # noqa: E731
                                    w_sum=Wt["sum8"], **conv)
    elif impl == "diffaccel:w4a8":
        fn, w_bytes = (lambda: CV.int8_conv2d(x, Wt["q4"], Wt["s4"], group_size=Wt["group4"], w_int4=True,
                                              **conv)), N * K // 2
    elif impl == "diffaccel:fp8":
        fn = lambda: CV.fp8_conv2d(x, Wt["f8"], Wt["sf8"], **conv)  # noqa: E731
    elif impl == "diffaccel:fp8-split-static":
        scales, C1 = _split_scales(x)
        fn = lambda: CV.fp8_conv2d(x, Wt["f8"], Wt["sf8"], act_scale=scales, act_split=C1, **conv)  # noqa: E731
    elif impl == "baseline:unfold-fp8_linear-split-static":
        scales, C1 = _split_scales(x)
        fn = lambda: _unfold_fp8_split(x, Wt["f8"], Wt["sf8"], N, scales, C1, bias)  # noqa: E731
    elif impl == "baseline:cudnn-fp16":
        b16 = bias.half()
        fn, w_bytes = (lambda: F.conv2d(x, Wt["w16"], b16, padding=PAD)), N * K * 2
    elif impl == "baseline:unfold-int8_linear-w8a8":
        fn = lambda: _unfold_linear(x, Wt["q8"], Wt["s8"], N, bias=bias)  # noqa: E731
    elif impl == "baseline:unfold-int8_linear-w4a8":
        fn, w_bytes = (lambda: _unfold_linear(x, Wt["q4"], Wt["s4"], N, bias=bias, group_size=Wt["group4"],
                                              w_int4=True)), N * K // 2
    elif impl == "baseline:unfold-fp8_linear":
        fn = lambda: _unfold_linear(x, Wt["f8"], Wt["sf8"], N, linear=G.fp8_linear, bias=bias)  # noqa: E731
    else:
        raise ValueError(impl)
    annotate(benchmark, family=FAMILY, case=f"{name} 3x3 C={C} N={N}",
             shape={"B": B, "C": C, "H": H, "W": W, "N": N, "k": KS}, dtype="fp16", impl=impl,
             flops=2 * B * H * W * N * K, bytes=x.numel() * 2 + w_bytes + B * N * H * W * 2)
    out = measure(benchmark, fn)
    assert out.shape == (B, N, H, W) and out.dtype == torch.float16


# -- whole ResNet blocks: GroupNorm + SiLU inside the convs' gather vs diffusers' forward ----------

RES_SHAPES = [("tiny", 1, 16, 6, 6)] if is_smoke() else [
    ("sdxl-res320@128", 2, 320, 128, 128), ("sdxl-res640@64", 2, 640, 64, 64), ("sdxl-res1280@32", 2, 1280, 32, 32)]
RES_IMPLS = ["diffaccel:w8a8-fused", "baseline:w8a8-diffusers-forward", "baseline:fp16-diffusers-forward"]
_blocks = {}


def _resnet_blocks(C, dev):
    """diffusers ResnetBlock2D(C -> C, temb 1280, 32 groups) in fp16: float, W8A8 convs run by diffusers'
    forward, and the same W8A8 convs with diffaccel.nn.resnet's fused forward."""
    import copy

    from diffusers.models.resnet import ResnetBlock2D

    from diffaccel.nn import QuantConv2d
    from diffaccel.nn import resnet as dres

    key = (C, str(dev))
    if key not in _blocks:
        torch.manual_seed(0)
        groups = 32 if C % 32 == 0 else 8
        blk = ResnetBlock2D(in_channels=C, out_channels=C, temb_channels=1280 if C >= 320 else 16,
                            groups=groups).eval().half().to(dev)
        q = copy.deepcopy(blk)
        q.conv1, q.conv2 = QuantConv2d.from_float(q.conv1, "w8a8"), QuantConv2d.from_float(q.conv2, "w8a8")
        _blocks[key] = {"fp16": blk, "w8a8": q, "fused": dres.fuse_resnet(copy.deepcopy(q))}
    return _blocks[key]


@pytest.mark.parametrize("impl", RES_IMPLS)
@pytest.mark.parametrize("shape", RES_SHAPES, ids=lambda s: s[0])
def test_resnet_block(benchmark, shape, impl):
    name, B, C, H, W = shape
    dev = device()
    blocks = _resnet_blocks(C, dev)
    module = {"diffaccel:w8a8-fused": blocks["fused"], "baseline:w8a8-diffusers-forward": blocks["w8a8"],
              "baseline:fp16-diffusers-forward": blocks["fp16"]}[impl]
    x = torch.randn(B, C, H, W, device=dev).half()
    temb = torch.randn(B, module.time_emb_proj.in_features, device=dev).half()
    K = C * KS * KS
    annotate(benchmark, family=FAMILY, case=f"resnet {name} C={C}", shape={"B": B, "C": C, "H": H, "W": W},
             dtype="fp16", impl=impl, flops=2 * 2 * B * H * W * C * K, bytes=2 * x.numel() * 2)
    with torch.no_grad():
        out = measure(benchmark, lambda: module(x, temb))
    assert out.shape == (B, C, H, W)
