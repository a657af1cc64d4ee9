"""Norms fused with what follows them.

``group_norm_affine``: GroupNorm folded into a per-(sample, channel) affine.

GroupNorm(x)[b, c] = x[b, c] * scale[b, c] + shift[b, c] with scale = gamma[c] * rstd[b, g(c)] and
shift = beta[c] - mean[b, g(c)] * scale: once the statistics are known the normalization is a
per-channel affine, which ``diffaccel.ops.int8_conv2d(..., in_affine=...)`` applies while it
gathers its input. So a GroupNorm + SiLU + quantized conv reads the conv's input twice (here, and
in the conv) instead of writing and reading the normalized and the activated tensor.

Numerics (the reference; the Triton kernel, ``kernels/norm.py``, sums in its own order, so the
two agree to fp32 rounding): v = fp32(x) (+ add[b, c]); per (b, g) over its C/G * H * W values
mean and the biased variance (two-pass), rstd = 1 / sqrt(var + eps); scale, shift as above, and
with ``add``: shift + add[b, c] * scale (the addition folded into the shift).

``layer_norm_quantize``: a LayerNorm (a UNet transformer block's norm1/2/3) or an adaLN-Zero norm
(DiT, SD3, Flux: LayerNorm without affine, then ``* (1 + scale[b]) + shift[b]``) that also returns
its output's dynamic per-token quantization, so the q/k/v projections behind it skip their
quantization pass: the output is read once fewer and one launch is saved. Numerics (the reference;
the Triton kernel agrees to fp32 rounding in y):
    v = fp32(x); mean, biased var over the last dim (two-pass); n = (v - mean) * (1 / sqrt(var + eps))
    n = n * weight + bias (each if given); n = n * (1 + scale[b]) + shift[b] (each if given)
    y = n.to(x.dtype); (codes, scales) = quantize_activation_int8(y) or quantize_activation_fp8(y)
In each backend the codes are exactly that quantizer applied to the y it returns.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _backend
from ._checks import check_tensor, plain_number
from .gemm import (FLOAT_DTYPES, FP8_DTYPE, FP8_MIN_CAPABILITY, _check_device, quantize_rows_fp8_reference,
                   quantize_rows_int8_reference)


def group_norm_affine_reference(x, weight, bias, add, num_groups: int, eps: float) -> torch.Tensor:
    B, C = x.shape[0], x.shape[1]
    v = x.float()
    if add is not None:
        v = v + add.reshape(B, C, *([1] * (x.dim() - 2)))
    var, mean = torch.var_mean(v.reshape(B, num_groups, -1), dim=-1, correction=0)
    rstd = 1.0 / torch.sqrt(var + eps)
    scale = weight.float().reshape(1, num_groups, -1) * rstd[:, :, None]
    shift = bias.float().reshape(1, num_groups, -1) - mean[:, :, None] * scale
    scale, shift = scale.reshape(B, C), shift.reshape(B, C)
    if add is not None:
        shift = shift + add * scale
    return torch.stack((scale, shift), dim=-1)


def _triton_group_norm_affine(x, weight, bias, add, num_groups, eps):
    from diffaccel.kernels import norm

    out = torch.empty(x.shape[0], x.shape[1], 2, dtype=torch.float32, device=x.device)
    norm.group_norm_affine(x.contiguous(), add, weight.contiguous(), bias.contiguous(), out, num_groups=num_groups,
                           eps=eps)
    return out


_backend.register(_backend.OpBackends("group_norm_affine", torch=group_norm_affine_reference,
                                      triton=_triton_group_norm_affine))


@_backend.custom_op("group_norm_affine")
def _group_norm_affine_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, add: Optional[torch.Tensor],
                          num_groups: int, eps: float) -> torch.Tensor:
    return _backend.implementation("group_norm_affine", x.device)(x, weight, bias, add, num_groups, eps)


@_group_norm_affine_op.register_fake
def _(x, weight, bias, add, num_groups, eps):
    return x.new_empty((x.shape[0], x.shape[1], 2), dtype=torch.float32)


def _check_affine_and_eps(weight, bias, eps, width: int, device, *, optional: bool) -> None:
    """A norm's affine parameters ([width] each, on x's device; None allowed when ``optional``) and eps."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None and optional:
            continue
        check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=1)
        if t.shape[0] != width:
            raise ValueError(f"{name}: expected shape ({width},), got {tuple(t.shape)}")
        _check_device(name, t, device, "x")
    eps = plain_number(eps)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < math.inf:
        raise ValueError(f"eps: expected a positive finite float, got {eps!r}")


def group_norm_affine(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                      *, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 [B, C, 2]: per sample and channel the (scale, shift) with which GroupNorm(x + add) =
    (x + add) * scale' + shift' is written as x * scale + shift. ``x`` float [B, C, *spatial];
    ``weight`` / ``bias`` [C] (GroupNorm's affine); ``add`` [B, C] (e.g. a ResNet's time embedding,
    added before the norm) or None."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 3:
        raise ValueError(f"x: expected [B, C, *spatial] with at least one spatial dimension, got {tuple(x.shape)}")
    B, C = x.shape[0], x.shape[1]
    num_groups = plain_number(num_groups)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or C % num_groups:
        raise ValueError(f"num_groups: expected a positive int dividing C={C}, got {num_groups!r}")
    _check_affine_and_eps(weight, bias, eps, C, x.device, optional=False)
    if add is not None:
        check_tensor("add", add, dtypes=FLOAT_DTYPES)
        # [B, C], or [B, C, 1, ...] as added to a [B, C, H, W] tensor ([C, B] has the same count: refused)
        if add.dim() < 2 or tuple(add.shape[:2]) != (B, C) or any(d != 1 for d in add.shape[2:]):
            raise ValueError(f"add: expected one value per sample and channel ([B, C] = [{B}, {C}], or "
                             f"[{B}, {C}, 1, 1]), got shape {tuple(add.shape)}")
        _check_device("add", add, x.device, "x")
        add = add.reshape(B, C).float().contiguous()
    return _group_norm_affine_op(x, weight, bias, add, num_groups, float(eps))


# -- LayerNorm / adaLN + dynamic activation quantization ----------------------------------------

NORM_CODE_DTYPES = ("int8", "fp8_e4m3")


def layer_norm_quantize_reference(x, weight, bias, scale, shift, rows_per_sample: int, eps: float, fp8: bool,
                                  codes: bool = True):
    v = x.float()
    var, mean = torch.var_mean(v, dim=-1, correction=0, keepdim=True)
    n = (v - mean) * (1.0 / torch.sqrt(var + eps))
    if weight is not None:
        n = n * weight.float()
    if bias is not None:
        n = n + bias.float()
    if scale is not None:
        n = n * (1.0 + scale.float()).repeat_interleave(rows_per_sample, dim=0)
    if shift is not None:
        n = n + shift.float().repeat_interleave(rows_per_sample, dim=0)
    y = n.to(x.dtype)
    if not codes:
        return y, *_no_codes(x)
    q, s = quantize_rows_fp8_reference(y, None) if fp8 else quantize_rows_int8_reference(y, None)
    return y, q, s


def _no_codes(x):
    return x.new_empty(0, dtype=torch.int8), x.new_empty(0, dtype=torch.float32)


def _triton_layer_norm_quantize(x, weight, bias, scale, shift, rows_per_sample, eps, fp8, codes=True):
    from diffaccel.kernels import norm

    y = torch.empty_like(x)
    if not codes:
        norm.layer_norm_quantize(x, weight, bias, scale, shift, y, None, None, rows_per_sample=rows_per_sample,
                                 eps=eps, fp8=fp8)
        return y, *_no_codes(x)
    q = torch.empty(x.shape, dtype=FP8_DTYPE if fp8 else torch.int8, device=x.device)
    s = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    norm.layer_norm_quantize(x, weight, bias, scale, shift, y, q, s.view(-1), rows_per_sample=rows_per_sample,
                             eps=eps, fp8=fp8)
    return y, q, s


_backend.register(_backend.OpBackends("layer_norm_quantize", torch=layer_norm_quantize_reference,
                                      triton=_triton_layer_norm_quantize))


@_backend.custom_op("layer_norm_quantize")
def _layer_norm_quantize_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                            scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], rows_per_sample: int,
                            eps: float, fp8: bool, codes: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backend.implementation("layer_norm_quantize", x.device)(x, weight, bias, scale, shift, rows_per_sample,
                                                                    eps, fp8, codes)


@_layer_norm_quantize_op.register_fake
def _(x, weight, bias, scale, shift, rows_per_sample, eps, fp8, codes):
    if not codes:
        return (torch.empty_like(x), *_no_codes(x))
    return (torch.empty_like(x), x.new_empty(x.shape, dtype=FP8_DTYPE if fp8 else torch.int8),
            x.new_empty((x.shape[0], 1), dtype=torch.float32))


def layer_norm_quantize(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                        eps: float = 1e-5, *, scale: Optional[torch.Tensor] = None,
                        shift: Optional[torch.Tensor] = None, act_dtype: str = "int8"):
    """``(y, codes, act_scale)``: y = LayerNorm(x) over the last dimension in x's dtype, with the
    affine ``weight`` / ``bias`` [K] and the adaLN modulation ``y * (1 + scale[b]) + shift[b]``
    (``scale`` / ``shift`` [B, K] for x [B, L, K]) where given; ``codes`` [M, K] (M = x.numel() // K)
    and ``act_scale`` [M, 1] fp32: y's dynamic per-token quantization, ``act_dtype`` "int8" or
    "fp8_e4m3", exactly what ``quantize_activation_int8`` / ``_fp8`` return for y. ``act_dtype=None``:
    y only, ``(y, None, None)`` (the same y: one norm, with or without the codes)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 2 or x.shape[-1] == 0:
        raise ValueError(f"x: expected [..., K] with at least two dimensions and K > 0, got {tuple(x.shape)}")
    if act_dtype is not None and act_dtype not in NORM_CODE_DTYPES:
        raise ValueError(f"act_dtype: expected one of {NORM_CODE_DTYPES} or None, got {act_dtype!r}")
    if act_dtype == "fp8_e4m3" and x.device.type == "cuda" and \
            torch.cuda.get_device_capability(x.device) < FP8_MIN_CAPABILITY:
        raise ValueError(f"act_dtype: fp8 codes need compute capability {FP8_MIN_CAPABILITY} or newer")
    K = x.shape[-1]
    _check_affine_and_eps(weight, bias, eps, K, x.device, optional=True)
    rows_per_sample = 1
    mods = {}
    for name, t in (("scale", scale), ("shift", shift)):
        if t is None:
            continue
        check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=2)
        if x.dim() != 3 or tuple(t.shape) != (x.shape[0], K):
            raise ValueError(f"{name}: expected [B, K] = [{x.shape[0]}, {K}] for x [B, L, K], got {tuple(t.shape)} "
                             f"with x {tuple(x.shape)}")
        _check_device(name, t, x.device, "x")
        rows_per_sample = x.shape[1]
        mods[name] = t.contiguous()
    x2 = x.reshape(-1, K).contiguous()
    y, q, s = _layer_norm_quantize_op(
        x2, None if weight is None else weight.contiguous(), None if bias is None else bias.contiguous(),
        mods.get("scale"), mods.get("shift"), max(rows_per_sample, 1), float(eps), act_dtype == "fp8_e4m3",
        act_dtype is not None)
    if act_dtype is None:
        return y.reshape(x.shape), None, None
    return y.reshape(x.shape), q, s


__all__ = ["NORM_CODE_DTYPES", "group_norm_affine", "group_norm_affine_reference", "layer_norm_quantize",
           "layer_norm_quantize_reference"]
