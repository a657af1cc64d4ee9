"""Quantized 2-d convolution with int8 activations (W8A8, W4A8) as an implicit GEMM.

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
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import _backend
from ._checks import check_tensor
from .gemm import (FLOAT_DTYPES, _check_bias, _check_out_dtype, _check_smooth, _check_weight, _same_layout,
                   check_static_act, int8_linear_reference)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


# -- reference ----------------------------------------------------------------------------------

def int8_conv2d_reference(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, kernel_size: Sequence[int],
                          stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], group_size: int,
                          w_int4: bool, out_dtype: torch.dtype) -> torch.Tensor:
    B, C, H, W = x.shape
    kh, kw = kernel_size
    Ho = conv_output_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_output_size(W, kw, stride[1], padding[1], dilation[1])
    N = w.shape[0]
    cols = F.unfold(x, tuple(kernel_size), dilation=tuple(dilation), padding=tuple(padding), stride=tuple(stride))
    x2 = cols.transpose(1, 2).reshape(-1, C * kh * kw)
    smooth_k = smooth.repeat_interleave(kh * kw) if smooth is not None else None  # K order is (c, kh, kw)
    y = int8_linear_reference(x2, w, w_scale, smooth_k, act_scale, act_zero_point, w_sum, bias, group_size, w_int4,
                              out_dtype)
    return y.reshape(B, Ho * Wo, N).transpose(1, 2).reshape(B, N, Ho, Wo).contiguous()  # a view when B == 1


# -- Triton backend -----------------------------------------------------------------------------

def _triton_int8_conv2d(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, kernel_size, stride, padding,
                        dilation, group_size, w_int4, out_dtype):
    from diffaccel.kernels import conv

    w_scale, w_sum = _same_layout(w_scale, w_sum)
    B, C, H, W = x.shape
    Ho = conv_output_size(H, kernel_size[0], stride[0], padding[0], dilation[0])
    Wo = conv_output_size(W, kernel_size[1], stride[1], padding[1], dilation[1])
    out = torch.empty(B, w.shape[0], Ho, Wo, dtype=out_dtype, device=x.device)
    conv.int8_conv2d(x, w, w_scale, smooth, None if act_scale is None else act_scale.reshape(1), act_zero_point,
                     w_sum, bias, out, kernel_size=tuple(kernel_size), stride=tuple(stride), padding=tuple(padding),
                     dilation=tuple(dilation), group_size=group_size, w_int4=w_int4)
    return out


_backend.register(_backend.OpBackends("int8_conv2d", torch=int8_conv2d_reference, triton=_triton_int8_conv2d))


# -- custom op ------------------------------------------------------------------------------------

@torch.library.custom_op("diffaccel::int8_conv2d", mutates_args=())
def _int8_conv2d_op(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, smooth: Optional[torch.Tensor],
                    act_scale: Optional[torch.Tensor], act_zero_point: Optional[torch.Tensor],
                    w_sum: Optional[torch.Tensor], bias: Optional[torch.Tensor], kernel_size: list[int],
                    stride: list[int], padding: list[int], dilation: list[int], group_size: int, w_int4: bool,
                    out_dtype: torch.dtype) -> torch.Tensor:
    # x is read in place with its own strides (any NCHW / channels-last layout)
    return _backend.implementation("int8_conv2d", x.device)(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum,
                                                            bias, kernel_size, stride, padding, dilation, group_size,
                                                            w_int4, out_dtype)


@_int8_conv2d_op.register_fake
def _(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, kernel_size, stride, padding, dilation,
      group_size, w_int4, out_dtype):
    B, _, H, W = x.shape
    Ho = conv_output_size(H, kernel_size[0], stride[0], padding[0], dilation[0])
    Wo = conv_output_size(W, kernel_size[1], stride[1], padding[1], dilation[1])
    return x.new_empty((B, w.shape[0], Ho, Wo), dtype=out_dtype)


# -- validation + public wrapper -------------------------------------------------------------------

def _pair(name: str, v, minimum: int) -> list[int]:
    vals = (v, v) if isinstance(v, int) and not isinstance(v, bool) else v
    if (not isinstance(vals, (tuple, list)) or len(vals) != 2
            or any(isinstance(e, bool) or not isinstance(e, int) or e < minimum for e in vals)):
        raise ValueError(f"{name}: expected an int >= {minimum} or a pair of them, got {v!r}")
    return [int(vals[0]), int(vals[1])]


def int8_conv2d(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, kernel_size, stride=1, padding=0,
                dilation=1, smooth: Optional[torch.Tensor] = None, act_scale: Optional[torch.Tensor] = None,
                act_zero_point: Optional[torch.Tensor] = None, w_sum: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None, group_size: Optional[int] = None, w_int4: bool = False,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x`` float [B, C, H, W] -> int8 activations (dynamic per output pixel over its receptive
    field, or static per tensor with ``act_scale`` / ``act_zero_point``; ``x / smooth[c]`` folded in)
    -> conv with int8 [N, C*kh*kw] or packed int4 [N, C*kh*kw // 2] weights in (c, kh, kw) order ->
    [B, N, Ho, Wo] in ``out_dtype`` (default x.dtype). ``w_sum`` (int32 row sums of the weight codes,
    [N] or [N, G]) is required with a zero point."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=4)
    ks = _pair("kernel_size", kernel_size, 1)
    st = _pair("stride", stride, 1)
    pd = _pair("padding", padding, 0)
    dl = _pair("dilation", dilation, 1)
    B, C, H, W = x.shape
    Ho = conv_output_size(H, ks[0], st[0], pd[0], dl[0])
    Wo = conv_output_size(W, ks[1], st[1], pd[1], dl[1])
    if C == 0 or Ho <= 0 or Wo <= 0:
        raise ValueError(f"x: shape {tuple(x.shape)} gives an empty output ({Ho} x {Wo}) or has no channels for "
                         f"kernel_size={ks}, stride={st}, padding={pd}, dilation={dl}")
    K = C * ks[0] * ks[1]
    dev = x.device
    N = _check_weight(w, w_scale, w_sum, K=K, group_size=group_size, w_int4=w_int4, device=dev, like="x")
    smooth = _check_smooth(smooth, C, dev, "x")
    act_scale, zp = check_static_act(act_scale, act_zero_point, w_sum, dev)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _check_out_dtype(out_dtype)
    return torch.ops.diffaccel.int8_conv2d(x, w, w_scale, smooth, act_scale, zp, w_sum if zp is not None else None,
                                           _check_bias(bias, N, dev, "x"), ks, st, pd, dl, group_size or 0,
                                           bool(w_int4), out_dtype)


__all__ = ["int8_conv2d", "int8_conv2d_reference", "conv_output_size"]
