"""QuantConv2d: 1x1 convs run as a GEMM over pixels (channels as K); k x k convs with int8
activations (W8A8, W4A8) or fp8 ones, static or dynamic, Q-Diffusion's split input included, as an
implicit GEMM (``diffaccel.ops.int8_conv2d`` / ``fp8_conv2d``: the kernel gathers
and quantizes the activations itself, no im2col in memory). K is ordered (channel, kh, kw) like
the conv weight. Dynamic activation quantization is per GEMM row: per pixel
over channels for 1x1, per output position over its receptive field for k x k."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffaccel.ops import conv as CV
from diffaccel.ops._checks import plain_number
from diffaccel.quant.formats import QuantSpec, resolve_spec

from ._base import (WEIGHT_ONLY_KERNEL_MAX_M, QuantLayerBase, _float_tensor, _positive, check_float_weight,
                    check_weight_source, own_forward_reason, reason_for_shape)


class QuantConv2d(QuantLayerBase):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation,
                 spec: QuantSpec, original_dtype: torch.dtype):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.padding = tuple(padding)
        self.dilation = tuple(dilation)
        kh, kw = self.kernel_size
        self._init_common(spec, out_channels, in_channels * kh * kw, original_dtype)

    @property
    def is_pointwise(self) -> bool:
        return self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, spec, *, weight: Optional[torch.Tensor] = None,
                   act_scale: Optional[torch.Tensor] = None, act_zero_point: Optional[torch.Tensor] = None,
                   act_split: Optional[int] = None, smooth: Optional[torch.Tensor] = None,
                   weight_q: Optional[torch.Tensor] = None,
                   weight_scale: Optional[torch.Tensor] = None) -> "QuantConv2d":
        """Like ``QuantLinear.from_float``; ``act_split=C1`` quantizes input channels [0, C1) and
        [C1, C) with separate static parameters (act_scale/act_zero_point of shape [T, 2]);
        ``smooth`` is per input channel [C]."""
        spec = resolve_spec(spec)
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv: expected an nn.Conv2d, got {type(conv).__name__}")
        why = own_forward_reason(conv, nn.Conv2d)
        if why:
            raise TypeError(f"conv: {why}; leave it in floating point")
        check_weight_source(weight, weight_q, weight_scale)
        w0 = check_float_weight(conv)  # (first: a lazy layer's shape is not known yet)
        why = quantize_conv_reason(conv, spec)
        if why:
            raise ValueError(f"conv: cannot quantize with {spec}: {why}")
        N, C, kh, kw = conv.weight.shape
        if weight is not None:
            w0 = _float_tensor("weight", weight, tuple(conv.weight.shape))
        mod = cls(C, N, conv.kernel_size, conv.stride, explicit_padding(conv), conv.dilation, spec, conv.weight.dtype)
        act_split = plain_number(act_split)
        if act_split is not None:
            if isinstance(act_split, bool) or not isinstance(act_split, int) or not 0 < act_split < C:
                raise ValueError(f"act_split: expected an int channel index in (0, {C}), got {act_split!r}")
            k1 = act_split * kh * kw
            g = spec.weight_group_size
            if g is not None and k1 % g:
                raise ValueError(f"act_split: the split at K={k1} must fall on a weight group boundary "
                                 f"(weight_group_size={g})")
            if spec.weight_dtype == "int4" and k1 % 2:
                raise ValueError(f"act_split: the split at K={k1} must be even for packed int4 weights")
            mod.act_split_k = k1
        mod.act_split = act_split
        smooth_k = None
        if smooth is not None:
            smooth_c = _positive("smooth", _float_tensor("smooth", smooth, (C,)))
            smooth_k = smooth_c.repeat_interleave(kh * kw)  # K order is (c, kh, kw)
        with torch.no_grad():
            codes = mod._build_weight(w0.detach().reshape(N, -1), weight_q, weight_scale, smooth_k)
            mod._build_act(codes, act_scale, act_zero_point, act_split, smooth_k, w0.device)
            mod._set_bias(conv.bias)
        return mod

    def input_grad(self, grad: torch.Tensor, x_shape) -> torch.Tensor:
        """d loss / d x of the float conv the codes stand for (``dequantized_weight()``)."""
        if len(x_shape) == 3:  # unbatched [C, H, W] (as _forward takes it)
            return self.input_grad(grad.unsqueeze(0), (1, *x_shape)).squeeze(0)
        return torch.nn.grad.conv2d_input(x_shape, self.dequantized_weight().to(grad.dtype), grad, self.stride,
                                          self.padding, self.dilation)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and x.shape[0] == self.in_channels:  # unbatched [C, H, W], as nn.Conv2d takes it
            return self._forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected [B, {self.in_channels}, H, W] or [{self.in_channels}, H, W], "
                             f"got shape {tuple(x.shape)}")
        B, C, H, W = x.shape
        N = self.out_channels
        if self.is_pointwise:
            x2 = x.permute(0, 2, 3, 1).reshape(-1, C)
            y = self._gemm(x2).reshape(B, H, W, N).permute(0, 3, 1, 2)  # (channels_last strides)
            # the layout nn.Conv2d returns: channels_last for a channels_last input, as it is already
            return y if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else y.contiguous()
        s = self.spec
        if s.act_dtype == "int8":
            return self._implicit_gemm_int8(x)
        if s.act_dtype == "fp8_e4m3":
            return self._implicit_gemm_fp8(x)
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if s.act_dtype is None and not self._weight_only_kernel_fits(B * Ho * Wo):
            return self._dequantized_conv(x)
        # im2col (F.unfold) + GEMM remains for weight-only layers small enough for the in-kernel
        # dequantizing GEMM
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        x2 = cols.transpose(1, 2).reshape(-1, self.gemm_k)
        y = self._gemm(x2)
        return y.reshape(B, Ho * Wo, N).transpose(1, 2).reshape(B, N, Ho, Wo)

    @property
    def op_name(self) -> str:
        s = self.spec
        if not self.is_pointwise:
            if s.act_dtype == "int8":
                return "int8_conv2d"
            if s.act_dtype == "fp8_e4m3":
                return "fp8_conv2d"
        return super().op_name

    @property
    def takes_normalized_input(self) -> bool:
        """True when ``forward_normalized`` can run: a k x k conv on the int8 implicit GEMM."""
        return self.spec.act_dtype == "int8" and not self.is_pointwise

    def forward_normalized(self, x: torch.Tensor, in_affine: torch.Tensor, in_silu: bool) -> torch.Tensor:
        """``self(silu?(x * in_affine[..., 0] + in_affine[..., 1]))`` with the per-(sample, channel)
        affine (a GroupNorm, ``diffaccel.ops.group_norm_affine``) and the SiLU applied while the
        kernel gathers x: the normalized input is never written."""
        if not self.takes_normalized_input:
            raise ValueError(f"x: a normalized-input conv needs int8 activations and a k x k kernel; this layer has "
                             f"{self._spec_repr()}, kernel {self.kernel_size}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected [B, {self.in_channels}, H, W], got shape {tuple(x.shape)}")
        return self._implicit_gemm_int8(x, in_affine=in_affine, in_silu=in_silu)

    def _implicit_gemm_int8(self, x: torch.Tensor, **prologue) -> torch.Tensor:
        s = self.spec
        common = dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding, dilation=self.dilation,
                      smooth=self._smooth_per_channel(), bias=self.bias, group_size=self.group_size,
                      w_int4=s.weight_dtype == "int4", out_dtype=self.original_dtype, **prologue)
        if s.act_mode == "dynamic":
            return CV.int8_conv2d(x, self.weight_q, self.weight_scale, **common)
        scale, zp = self._act_params()  # two of each with a split input
        return CV.int8_conv2d(x, self.weight_q, self.weight_scale, act_scale=scale, act_zero_point=zp,
                              w_sum=self.weight_sum, act_split=self.act_split, **common)

    def _implicit_gemm_fp8(self, x: torch.Tensor) -> torch.Tensor:
        scale = None if self.spec.act_mode == "dynamic" else self._act_params()[0]
        return CV.fp8_conv2d(x, self.weight_q, self.weight_scale, kernel_size=self.kernel_size, stride=self.stride,
                             padding=self.padding, dilation=self.dilation, act_scale=scale,
                             smooth=self._smooth_per_channel(), bias=self.bias, act_split=self.act_split,
                             out_dtype=self.original_dtype)

    def _smooth_per_channel(self):
        # smooth is stored per K (c, kh, kw), every kh * kw entries equal; the conv ops take it per channel
        if self.smooth is None:
            return None
        return self.smooth[::self.kernel_size[0] * self.kernel_size[1]].contiguous()

    def _weight_only_kernel_fits(self, M: int) -> bool:
        # the same choice QuantLayerBase._weight_only makes for a GEMM of M rows
        dt = self.original_dtype if self.original_dtype in (torch.float16, torch.bfloat16) else torch.float32
        return self.spec.weight_dtype in ("int8", "int4") and dt != torch.float32 and M <= WEIGHT_ONLY_KERNEL_MAX_M

    def _dequantized_conv(self, x: torch.Tensor) -> torch.Tensor:
        # weight-only at large M: dequantize once, then cuDNN's own implicit GEMM (instead of unfold + GEMM)
        dt = self.original_dtype if self.original_dtype in (torch.float16, torch.bfloat16) else torch.float32
        w = self._weight_gemm_dequantized().reshape(self.out_channels, self.in_channels, *self.kernel_size).to(dt)
        y = F.conv2d(x.to(dt), w, None if self.bias is None else self.bias.to(dt), self.stride, self.padding,
                     self.dilation)
        return y.to(self.original_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 [out_channels, in_channels, kh, kw]: the weight this layer computes with."""
        return self._dequantized_weight_2d().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.act_split_k is not None:
            s += f", act_split={self.act_split}"
        return f"{s}, bias={self.bias is not None}, {self._spec_repr()}"


def explicit_padding(conv: nn.Conv2d) -> Optional[tuple]:
    """``conv.padding`` as (ph, pw); 'valid' is (0, 0) and 'same' d * (k - 1) / 2 per side. None for
    a 'same' whose total padding is odd (torch pads one more on the right: asymmetric)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)
    return tuple(conv.padding)


def quantize_conv_reason(conv: nn.Conv2d, spec: QuantSpec) -> Optional[str]:
    if conv.groups != 1:
        return f"grouped conv (groups={conv.groups}) is not supported"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')"
    if explicit_padding(conv) is None:
        return (f"padding={conv.padding!r} with kernel_size={conv.kernel_size} and dilation={conv.dilation} pads "
                "unevenly (only symmetric padding is supported)")
    N, C, kh, kw = conv.weight.shape
    return reason_for_shape(spec, N, C * kh * kw)
