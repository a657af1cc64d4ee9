"""Quantized 2-d convolution with int8 (W8A8, W4A8) or fp8 (FP8 W8A8) activations as an implicit GEMM.

The GEMM view is im2col: rows m = (b, oh, ow) over the B * Ho * Wo output pixels, K ordered
(c, kh, kw) like a conv weight ``[N, C, kh, kw].reshape(N, -1)``; weights int8 [N, K] or packed
int4 uint8 [N, K // 2] (low nibble = even k), scales per output channel [N] or per group [N, G].

Numerics: exactly ``F.unfold`` followed by ``diffaccel.ops.gemm.int8_linear_reference`` (its
docstring states them), reshaped to [B, N, Ho, Wo]; the smoothing vector is per input channel and
divides every k of that channel. Dynamic quantization is per output pixel over its receptive
field (one unfolded row); padded positions are float 0 before quantization (code ``zp`` for
static asymmetric activations). The Triton kernel (``kernels/conv.py``) gathers and quantizes the
activations inside the GEMM, so no im2col matrix and no separate quantization pass exist, and it
writes [B, N, Ho, Wo] directly; it is bit-exact against the reference.

``fp8_conv2d`` is the same for float8_e4m3fn weights [N, K] (per output channel) and activations:
exactly ``F.unfold`` + ``quantize_rows_fp8_reference`` (dynamic, amax / 448 per output pixel) or
``quantize_static_fp8_reference`` + ``fp8_gemm_reference``. Its codes are bit-exact; the fp32
sum over K runs in another order than the reference's (products of E4M3 codes are exact in fp32,
their sums are not), so it matches within fp32 accumulation error.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import _backend
from ._checks import check_flag, check_int8_zero_point, check_positive_finite, check_tensor, plain_number
from .gemm import (FLOAT_DTYPES, FP8_DTYPE, FP8_MIN_CAPABILITY, _check_bias, _check_device, _check_out_dtype,
                   _check_scalar, _check_smooth, _check_weight, _same_layout,
                   check_static_act, fp8_gemm_reference, int8_linear_reference, quantize_rows_fp8_reference,
                   quantize_static_fp8_reference, split_k_int8_linear)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _output_hw(x, kernel_size, stride, padding, dilation) -> tuple:
    H, W = x.shape[2], x.shape[3]
    return (conv_output_size(H, kernel_size[0], stride[0], padding[0], dilation[0]),
            conv_output_size(W, kernel_size[1], stride[1], padding[1], dilation[1]))


def _unfold_rows(x, kernel_size, stride, padding, dilation):
    """im2col: [B * Ho * Wo, C * kh * kw], K in the weight's (c, kh, kw) order."""
    cols = F.unfold(x, tuple(kernel_size), dilation=tuple(dilation), padding=tuple(padding), stride=tuple(stride))
    return cols.transpose(1, 2).reshape(-1, x.shape[1] * kernel_size[0] * kernel_size[1])


def _to_nchw(y, B, Ho, Wo):
    N = y.shape[1]
    return y.reshape(B, Ho * Wo, N).transpose(1, 2).reshape(B, N, Ho, Wo).contiguous()  # a view when B == 1


# -- reference ----------------------------------------------------------------------------------

def input_prologue_reference(x, in_affine, in_silu: bool) -> torch.Tensor:
    """x itself, or fp32 silu?(x * in_affine[b, c, 0] + in_affine[b, c, 1]): the GroupNorm (+ SiLU) a
    conv's gather applies to its input (``diffaccel.ops.group_norm_affine`` gives ``in_affine``)."""
    if in_affine is None:
        return x
    y = x.float() * in_affine[:, :, 0, None, None] + in_affine[:, :, 1, None, None]
    return F.silu(y) if in_silu else y


def int8_conv2d_reference(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, kernel_size: Sequence[int],
                          stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], group_size: int,
                          w_int4: bool, out_dtype: torch.dtype, act_split: int = 0, in_affine=None,
                          in_silu: bool = False) -> torch.Tensor:
    kh, kw = kernel_size
    x2 = _unfold_rows(input_prologue_reference(x, in_affine, in_silu), kernel_size, stride, padding, dilation)
    smooth_k = smooth.repeat_interleave(kh * kw) if smooth is not None else None  # K order is (c, kh, kw)
    if act_split:
        y = split_k_int8_linear(int8_linear_reference, x2, w, w_scale, smooth_k, act_scale, act_zero_point, w_sum,
                                bias, group_size, w_int4, out_dtype, act_split * kh * kw)
    else:
        y = int8_linear_reference(x2, w, w_scale, smooth_k, act_scale, act_zero_point, w_sum, bias, group_size,
                                  w_int4, out_dtype)
    return _to_nchw(y, x.shape[0], *_output_hw(x, kernel_size, stride, padding, dilation))


def fp8_conv2d_reference(x, w, w_scale, smooth, act_scale, bias, kernel_size: Sequence[int], stride: Sequence[int],
                         padding: Sequence[int], dilation: Sequence[int], out_dtype: torch.dtype,
                         act_split: int = 0) -> torch.Tensor:
    kh, kw = kernel_size
    x2 = _unfold_rows(x, kernel_size, stride, padding, dilation)
    smooth_k = smooth.repeat_interleave(kh * kw) if smooth is not None else None
    if act_split:
        # two K ranges with their own static scale, dequantized apart and summed in fp32 with the
        # bias on the second, then cast once (QuantConv2d's im2col composition, split_k_int8_linear's)
        k1 = act_split * kh * kw
        ys = []
        for part, ks in enumerate((slice(0, k1), slice(k1, None))):
            s = act_scale.reshape(2)[part]
            q = quantize_static_fp8_reference(x2[:, ks], None if smooth_k is None else smooth_k[ks], s)
            ys.append(fp8_gemm_reference(q, w[:, ks], s, w_scale, bias if part == 1 else None, torch.float32))
        y = (ys[0] + ys[1]).to(out_dtype)
    elif act_scale is None:
        q, s = quantize_rows_fp8_reference(x2, smooth_k)
        y = fp8_gemm_reference(q, w, s, w_scale, bias, out_dtype)
    else:
        q = quantize_static_fp8_reference(x2, smooth_k, act_scale)
        y = fp8_gemm_reference(q, w, act_scale, w_scale, bias, out_dtype)
    return _to_nchw(y, x.shape[0], *_output_hw(x, kernel_size, stride, padding, dilation))


# -- Triton backend -----------------------------------------------------------------------------

def _triton_int8_conv2d(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, kernel_size, stride, padding,
                        dilation, group_size, w_int4, out_dtype, act_split=0, in_affine=None, in_silu=False):
    from diffaccel.kernels import conv

    w_scale, w_sum = _same_layout(w_scale, w_sum)
    out = x.new_empty((x.shape[0], w.shape[0], *_output_hw(x, kernel_size, stride, padding, dilation)),
                      dtype=out_dtype)
    conv.int8_conv2d(x, w, w_scale, smooth, None if act_scale is None else act_scale.reshape(-1), act_zero_point,
                     w_sum, bias, out, kernel_size=tuple(kernel_size), stride=tuple(stride), padding=tuple(padding),
                     dilation=tuple(dilation), group_size=group_size, w_int4=w_int4, act_split=act_split,
                     in_affine=in_affine, in_silu=in_silu)
    return out


def _triton_fp8_conv2d(x, w, w_scale, smooth, act_scale, bias, kernel_size, stride, padding, dilation, out_dtype,
                       act_split=0):
    from diffaccel.kernels import conv

    out = x.new_empty((x.shape[0], w.shape[0], *_output_hw(x, kernel_size, stride, padding, dilation)),
                      dtype=out_dtype)
    conv.fp8_conv2d(x, w, w_scale, smooth, None if act_scale is None else act_scale.reshape(-1), bias, out,
                    kernel_size=tuple(kernel_size), stride=tuple(stride), padding=tuple(padding),
                    dilation=tuple(dilation), act_split=act_split)
    return out


_backend.register(_backend.OpBackends("int8_conv2d", torch=int8_conv2d_reference, triton=_triton_int8_conv2d))
_backend.register(_backend.OpBackends("fp8_conv2d", torch=fp8_conv2d_reference, triton=_triton_fp8_conv2d,
                                      triton_min_capability=FP8_MIN_CAPABILITY))


# -- custom op ------------------------------------------------------------------------------------

@_backend.custom_op("int8_conv2d")
def _int8_conv2d_op(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, smooth: Optional[torch.Tensor],
                    act_scale: Optional[torch.Tensor], act_zero_point: Optional[torch.Tensor],
                    w_sum: Optional[torch.Tensor], bias: Optional[torch.Tensor], kernel_size: list[int],
                    stride: list[int], padding: list[int], dilation: list[int], group_size: int, w_int4: bool,
                    out_dtype: torch.dtype, act_split: int, in_affine: Optional[torch.Tensor],
                    in_silu: bool) -> torch.Tensor:
    # x is read in place with its own strides (any NCHW / channels-last layout)
    return _backend.implementation("int8_conv2d", x.device)(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum,
                                                            bias, kernel_size, stride, padding, dilation, group_size,
                                                            w_int4, out_dtype, act_split, in_affine, in_silu)


@_int8_conv2d_op.register_fake
def _(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, kernel_size, stride, padding, dilation,
      group_size, w_int4, out_dtype, act_split, in_affine, in_silu):
    return x.new_empty((x.shape[0], w.shape[0], *_output_hw(x, kernel_size, stride, padding, dilation)),
                       dtype=out_dtype)


@_backend.custom_op("fp8_conv2d")
def _fp8_conv2d_op(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, smooth: Optional[torch.Tensor],
                   act_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor], kernel_size: list[int],
                   stride: list[int], padding: list[int], dilation: list[int],
                   out_dtype: torch.dtype, act_split: int) -> torch.Tensor:
    return _backend.implementation("fp8_conv2d", x.device)(x, w, w_scale, smooth, act_scale, bias, kernel_size, stride,
                                                           padding, dilation, out_dtype, act_split)


@_fp8_conv2d_op.register_fake
def _(x, w, w_scale, smooth, act_scale, bias, kernel_size, stride, padding, dilation, out_dtype, act_split):
    return x.new_empty((x.shape[0], w.shape[0], *_output_hw(x, kernel_size, stride, padding, dilation)),
                       dtype=out_dtype)


# -- validation + public wrapper -------------------------------------------------------------------

def _pair(name: str, v, minimum: int) -> list[int]:
    v = plain_number(v)
    vals = (v, v) if isinstance(v, int) and not isinstance(v, bool) else v
    if isinstance(vals, (tuple, list)):
        vals = [plain_number(e) for e in vals]
    if (not isinstance(vals, (tuple, list)) or len(vals) != 2
            or any(isinstance(e, bool) or not isinstance(e, int) or e < minimum for e in vals)):
        raise ValueError(f"{name}: expected an int >= {minimum} or a pair of them, got {v!r}")
    return [int(vals[0]), int(vals[1])]


def _check_geometry(x, kernel_size, stride, padding, dilation) -> tuple:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=4)
    ks = _pair("kernel_size", kernel_size, 1)
    st = _pair("stride", stride, 1)
    pd = _pair("padding", padding, 0)
    dl = _pair("dilation", dilation, 1)
    Ho, Wo = _output_hw(x, ks, st, pd, dl)
    if x.shape[1] == 0 or Ho <= 0 or Wo <= 0:
        raise ValueError(f"x: shape {tuple(x.shape)} gives an empty output ({Ho} x {Wo}) or has no channels for "
                         f"kernel_size={ks}, stride={st}, padding={pd}, dilation={dl}")
    return ks, st, pd, dl


def int8_conv2d(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, kernel_size, stride=1, padding=0,
                dilation=1, smooth: Optional[torch.Tensor] = None, act_scale: Optional[torch.Tensor] = None,
                act_zero_point: Optional[torch.Tensor] = None, w_sum: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None, group_size: Optional[int] = None, w_int4: bool = False,
                act_split: Optional[int] = None, in_affine: Optional[torch.Tensor] = None, in_silu: bool = False,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x`` float [B, C, H, W] -> int8 activations (dynamic per output pixel over its receptive
    field, or static per tensor with ``act_scale`` / ``act_zero_point``; ``x / smooth[c]`` folded in)
    -> conv with int8 [N, C*kh*kw] or packed int4 [N, C*kh*kw // 2] weights in (c, kh, kw) order ->
    [B, N, Ho, Wo] in ``out_dtype`` (default x.dtype). ``w_sum`` (int32 row sums of the weight codes,
    [N] or [N, G]) is required with a zero point.

    ``act_split=C1`` (Q-Diffusion's split input, static activations only): input channels [0, C1)
    and [C1, C) have their own quantizers, ``act_scale`` / ``act_zero_point`` hold two values, and
    per-channel ``w_sum`` is [2, N] (the row sums over each K range); the kernel quantizes each range
    with its own parameters, so the concatenated input is never unfolded.

    ``in_affine`` fp32 [B, C, 2] (per sample and channel: scale, shift) transforms the input first,
    x' = x * scale + shift, then SiLU with ``in_silu``: a GroupNorm + SiLU in front of the conv,
    applied in the gather (``diffaccel.ops.group_norm_affine`` computes ``in_affine``); the conv
    pads the transformed input with zeros, as after an explicit GroupNorm + SiLU."""
    ks, st, pd, dl = _check_geometry(x, kernel_size, stride, padding, dilation)
    C = x.shape[1]
    K = C * ks[0] * ks[1]
    dev = x.device
    smooth = _check_smooth(smooth, C, dev, "x")
    if act_split is None:
        N = _check_weight(w, w_scale, w_sum, K=K, group_size=group_size, w_int4=w_int4, device=dev, like="x",
                          int32_sums=True)
        act_scale, zp = check_static_act(act_scale, act_zero_point, w_sum, dev)
    else:
        N = _check_weight(w, w_scale, w_sum if group_size else None, K=K, group_size=group_size, w_int4=w_int4,
                          device=dev, like="x", int32_sums=True)
        act_scale, zp = _check_split_act(act_split, act_scale, act_zero_point, w_sum, N=N, C=C, khw=ks[0] * ks[1],
                                         group_size=group_size, w_int4=w_int4, device=dev)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _check_out_dtype(out_dtype)
    in_affine = _check_in_affine(in_affine, in_silu, x)
    return _int8_conv2d_op(x, w, w_scale, smooth, act_scale, zp, w_sum if zp is not None else None,
                                           _check_bias(bias, N, dev, "x"), ks, st, pd, dl, group_size or 0,
                                           bool(w_int4), out_dtype, act_split or 0, in_affine, bool(in_silu))


def _check_in_affine(in_affine, in_silu, x):
    in_silu = check_flag("in_silu", in_silu)
    if in_affine is None:
        if in_silu:
            raise ValueError("in_silu: needs in_affine (the SiLU follows the per-channel affine of a GroupNorm)")
        return None
    check_tensor("in_affine", in_affine, dtypes=(torch.float32,), ndim=3, contiguous=True)
    want = (x.shape[0], x.shape[1], 2)
    if tuple(in_affine.shape) != want:
        raise ValueError(f"in_affine: expected shape {want} ([B, C, (scale, shift)]), got {tuple(in_affine.shape)}")
    _check_device("in_affine", in_affine, x.device, "x")
    return in_affine


def fp8_conv2d(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, kernel_size, stride=1, padding=0,
               dilation=1, smooth: Optional[torch.Tensor] = None, act_scale: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, act_split: Optional[int] = None,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x`` float [B, C, H, W] -> float8_e4m3fn activations (dynamic per output pixel over its
    receptive field, amax / 448, or static per tensor with ``act_scale``; ``x / smooth[c]`` folded
    in) -> conv with float8_e4m3fn [N, C*kh*kw] weights in (c, kh, kw) order, scales per output
    channel ``w_scale`` [N] -> [B, N, Ho, Wo] in ``out_dtype`` (default x.dtype).

    ``act_split=C1`` (Q-Diffusion's split input, static only): input channels [0, C1) and [C1, C)
    have their own scale (``act_scale`` holds two); the kernel quantizes each range with its own,
    so the concatenated input is never unfolded."""
    ks, st, pd, dl = _check_geometry(x, kernel_size, stride, padding, dilation)
    C = x.shape[1]
    dev = x.device
    smooth = _check_smooth(smooth, C, dev, "x")
    N = _check_weight(w, w_scale, None, K=C * ks[0] * ks[1], group_size=None, w_int4=False, device=dev, like="x",
                      allowed=(FP8_DTYPE,))
    if act_split is not None:
        act_scale, _ = _check_split_act(act_split, act_scale, None, None, N=N, C=C, khw=ks[0] * ks[1], group_size=None,
                                        w_int4=False, device=dev)
    elif act_scale is not None:
        act_scale = _check_scalar("act_scale", act_scale, torch.float32, dev, "x")
        check_positive_finite("act_scale", act_scale)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _check_out_dtype(out_dtype)
    return _fp8_conv2d_op(x, w, w_scale, smooth, act_scale, _check_bias(bias, N, dev, "x"), ks, st,
                                          pd, dl, out_dtype, act_split or 0)


def _check_split_act(act_split, act_scale, act_zero_point, w_sum, *, N, C, khw, group_size, w_int4, device):
    """(act_scale [2], zero point [2] or None) of a split input's two static quantizers."""
    act_split = plain_number(act_split)
    if isinstance(act_split, bool) or not isinstance(act_split, int) or not 0 < act_split < C:
        raise ValueError(f"act_split: expected an int channel index in (0, {C}), got {act_split!r}")
    k1 = act_split * khw
    if group_size and k1 % group_size:
        raise ValueError(f"act_split: the split at K={k1} must fall on a weight group boundary "
                         f"(group_size={group_size})")
    if w_int4 and k1 % 2:
        raise ValueError(f"act_split: the split at K={k1} must be even for packed int4 weights")
    if act_scale is None:
        raise ValueError("act_scale: act_split needs static activations (two scales, one per input range)")
    act_scale = _check_pair("act_scale", act_scale, torch.float32, device)
    check_positive_finite("act_scale", act_scale)
    if act_zero_point is None:
        return act_scale, None
    zp = _check_pair("act_zero_point", act_zero_point, torch.int32, device)
    check_int8_zero_point("act_zero_point", zp)
    if w_sum is None:
        raise ValueError("w_sum: required with act_zero_point (the zero-point correction)")
    check_tensor("w_sum", w_sum, dtypes=(torch.int32,))
    want = (N, C * khw // group_size) if group_size else (2, N)
    if tuple(w_sum.shape) != want:
        raise ValueError(f"w_sum: expected shape {want} with act_split (row sums of w per "
                         f"{'group' if group_size else 'input range and channel'}), got {tuple(w_sum.shape)}")
    _check_device("w_sum", w_sum, device, "x")
    return act_scale, zp


def _check_pair(name, t, dtype, device):
    check_tensor(name, t, dtypes=(dtype,))
    if t.numel() != 2:
        raise ValueError(f"{name}: expected 2 values with act_split (one per input range), got shape "
                         f"{tuple(t.shape)}")
    _check_device(name, t, device, "x")
    return t.reshape(2).contiguous()


__all__ = ["int8_conv2d", "int8_conv2d_reference", "fp8_conv2d", "fp8_conv2d_reference", "conv_output_size",
           "input_prologue_reference"]
