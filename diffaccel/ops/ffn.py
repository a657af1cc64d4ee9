"""The feed-forward up projection with its activation in the GEMM epilogue: ``int8_ffn_up`` (and
``fp8_ffn_up``, the same epilogue on the fp8 GEMM, float output only).

A diffusers ``FeedForward`` runs ``proj`` (dim -> inner, or -> 2 * inner for GEGLU), then GELU
(GEGLU: chunk, GELU of the gate half, product), then the down projection, which quantizes its
input again. Unfused that is the GEMM, one to three elementwise passes over [M, inner] and a
quantization pass. Here one int8 GEMM applies the activation to its fp32 result and writes
either the activation in the output dtype, or, when the down projection's activations are
static (calibrated recipes), directly its int8 codes: [M, inner] crosses memory once, as int8.

Numerics (the reference below; the Triton kernel computes the same):
    y = int8_linear(x, ...) in fp32 (exact int32 sums, the epilogue of ``diffaccel.ops.gemm``)
    v = gelu(y)                                   "gelu" (erf) / "gelu_tanh"
    v = y[:, :N] * gelu(y[:, N:])                 "geglu" / "geglu_tanh" (weights [2N, K], diffusers' order)
    out = v.to(out_dtype), or with ``next_scale``: quantize_per_tensor(out.float() / next_smooth,
          next_scale, next_zero_point) -- the codes the down projection would compute from ``out``.
GELU is torch's in the reference and libdevice / interpreter math in Triton: the two agree to a few
fp32 ulps, so float outputs match within one rounding of out_dtype and codes within one step where
the value sits at a rounding boundary (tests/test_ffn_ops.py states the bounds).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _backend
from ._checks import check_features, check_int8_zero_point, check_positive_finite, check_tensor
from .gemm import (FLOAT_DTYPES, FP8_DTYPE, FP8_MIN_CAPABILITY, FUSED_QUANT_MAX_M, SM90_ACTIVATIONS, SM90_GEMM,
                   _check_act_scale, _check_bias, _check_out_dtype, _check_scalar, _check_smooth, _check_weight,
                   _cuda_fp8_gemm, _cuda_int8_act_gemm, _cuda_int8_linear, _k, _same_layout, _sm90_fp8_declines,
                   _sm90_gemm_declines, _triton_int8_linear, check_static_act, fp8_gemm_reference,
                   int8_act_gemm_reference, int8_linear_reference, quantize_static_int8_reference)

FFN_ACTIVATIONS = ("gelu", "gelu_tanh", "geglu", "geglu_tanh")


def is_gated(activation: str) -> bool:
    return activation.startswith("geglu")


def ffn_activation_reference(y: torch.Tensor, activation: str) -> torch.Tensor:
    """fp32 [M, N or 2N] -> fp32 [M, N]: diffusers' GELU / GEGLU (activations.py) in fp32."""
    approximate = "tanh" if activation.endswith("_tanh") else "none"
    if is_gated(activation):
        h, gate = y.chunk(2, dim=-1)
        return h * F.gelu(gate, approximate=approximate)
    return F.gelu(y, approximate=approximate)


def int8_ffn_up_reference(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, group_size: int,
                          w_int4: bool, activation: str, next_scale, next_zero_point, next_smooth,
                          out_dtype: torch.dtype) -> torch.Tensor:
    if x.dtype == torch.int8:  # codes already quantized per token: act_scale holds their [M] scales
        y = int8_act_gemm_reference(x, w, act_scale, w_scale, None, None, bias, group_size, w_int4, torch.float32)
    else:
        y = int8_linear_reference(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, group_size, w_int4,
                                  torch.float32)
    v = ffn_activation_reference(y, activation).to(out_dtype)
    if next_scale is None:
        return v
    return quantize_static_int8_reference(v, next_smooth, next_scale, next_zero_point)


def _triton_int8_ffn_up(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, group_size, w_int4,
                        activation, next_scale, next_zero_point, next_smooth, out_dtype):
    out_quant = None if next_scale is None else (next_scale.reshape(1), next_zero_point, next_smooth)
    N = w.shape[0] // 2 if is_gated(activation) else w.shape[0]
    if x.dtype == torch.int8:  # pre-quantized codes, act_scale their [M] (per token) or [1] (per tensor) scales
        w_scale, _ = _same_layout(w_scale, None)
        out = torch.empty(x.shape[0], N, dtype=torch.int8 if out_quant is not None else out_dtype, device=x.device)
        _k().int8_act_gemm(x, w, act_scale.reshape(-1), w_scale, None, None, bias, None, out, group_size=group_size,
                           w_int4=w_int4, fuse_quant=0, per_token=act_scale.numel() > 1, activation=activation,
                           out_quant=out_quant, value_dtype=out_dtype)
        return out
    return _triton_int8_linear(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, group_size, w_int4,
                               out_dtype, activation=activation, out_quant=out_quant, N=N)


def _sm90_ffn_declines(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, group_size, w_int4,
                       activation, next_scale, next_zero_point, next_smooth, out_dtype):
    """The sm_90 int8 GEMM takes the up projection with GELU's tanh form in its epilogue (Flux, SD3,
    PixArt, DiT, Wan) writing the float activation; GEGLU, erf GELU and the next layer's codes stay on
    Triton, and so do float inputs of at most FUSED_QUANT_MAX_M rows (one fused kernel there)."""
    if activation not in SM90_ACTIVATIONS:
        return f"applies GELU's tanh form only in its epilogue, not {activation!r}"
    if next_scale is not None:
        return "writes the float activation only, not the next layer's int8 codes"
    if x.dtype != torch.int8 and x.shape[0] <= FUSED_QUANT_MAX_M:
        return f"is not used at M <= {FUSED_QUANT_MAX_M} (one fused Triton kernel quantizes inside the GEMM)"
    return _sm90_gemm_declines(x, w, act_scale, w_scale, act_zero_point, w_sum, bias, group_size, w_int4, out_dtype,
                               a_is_codes=x.dtype == torch.int8)


def _cuda_int8_ffn_up(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, group_size, w_int4, activation,
                      next_scale, next_zero_point, next_smooth, out_dtype):
    if x.dtype == torch.int8:  # pre-quantized per-token codes, act_scale their [M, 1] scales
        return _cuda_int8_act_gemm(x, w, act_scale, w_scale, None, None, bias, group_size, w_int4, out_dtype,
                                   activation)
    return _cuda_int8_linear(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, group_size, w_int4,
                             out_dtype, activation)


_backend.register(_backend.OpBackends("int8_ffn_up", torch=int8_ffn_up_reference, triton=_triton_int8_ffn_up,
                                      cuda=_cuda_int8_ffn_up, cuda_covers=_sm90_ffn_declines, **SM90_GEMM))


@_backend.custom_op("int8_ffn_up")
def _int8_ffn_up_op(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, smooth: Optional[torch.Tensor],
                    act_scale: Optional[torch.Tensor], act_zero_point: Optional[torch.Tensor],
                    w_sum: Optional[torch.Tensor], bias: Optional[torch.Tensor], group_size: int, w_int4: bool,
                    activation: str, next_scale: Optional[torch.Tensor], next_zero_point: Optional[torch.Tensor],
                    next_smooth: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    return _backend.run("int8_ffn_up", x.contiguous(), w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias,
                        group_size, w_int4, activation, next_scale, next_zero_point, next_smooth, out_dtype)


@_int8_ffn_up_op.register_fake
def _(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, group_size, w_int4, activation, next_scale,
      next_zero_point, next_smooth, out_dtype):
    N = w.shape[0] // 2 if is_gated(activation) else w.shape[0]
    return x.new_empty((x.shape[0], N), dtype=torch.int8 if next_scale is not None else out_dtype)


def _check_next_quant(next_scale, next_zero_point, next_smooth, N, device):
    """The down projection's static activation quantizer: scale [1], zero point [1] int32, smooth [N]."""
    if next_scale is None:
        for name, v in (("next_zero_point", next_zero_point), ("next_smooth", next_smooth)):
            if v is not None:
                raise ValueError(f"{name}: needs next_scale (the next layer's static activation quantizer)")
        return None, None, None
    next_scale = _check_scalar("next_scale", next_scale, torch.float32, device, "x")
    check_positive_finite("next_scale", next_scale)
    zp = None
    if next_zero_point is not None:
        zp = _check_scalar("next_zero_point", next_zero_point, torch.int32, device, "x")
        check_int8_zero_point("next_zero_point", zp)
    return next_scale, zp, _check_smooth(next_smooth, N, device, "x", "next_smooth")


def int8_ffn_up(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, activation: str, smooth=None,
                act_scale=None, act_zero_point=None, w_sum=None, bias=None, group_size: Optional[int] = None,
                w_int4: bool = False, next_scale=None, next_zero_point=None, next_smooth=None,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x`` [..., K] float -> ``int8_linear`` (same arguments) -> ``activation`` in the epilogue ->
    [..., N] in ``out_dtype`` (default x.dtype), where N = w's rows (half of them for the gated
    "geglu" / "geglu_tanh": the first half is the value, the second the gate, as in diffusers'
    GEGLU.proj). With ``next_scale`` (and optionally ``next_zero_point``, ``next_smooth`` [N]) the
    result is instead the int8 codes of that output under the next layer's static quantizer.
    ``x`` int8 [M, K]: activations already quantized per token (``diffaccel.ops.layer_norm_quantize``,
    ``quantize_activation_int8``), with ``act_scale`` their scales [M, 1] and ``out_dtype`` required;
    ``smooth`` / ``act_zero_point`` do not apply."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.int8:
        return _int8_ffn_up_codes(x, w, w_scale, activation, act_scale, bias, group_size, w_int4, next_scale,
                                  next_zero_point, next_smooth, out_dtype, smooth, act_zero_point, w_sum)
    check_tensor("x", x, dtypes=FLOAT_DTYPES + (torch.int8,))  # (int8 codes took the branch above: named for uint8)
    check_features(x)
    if activation not in FFN_ACTIVATIONS:
        raise ValueError(f"activation: expected one of {', '.join(FFN_ACTIVATIONS)}, got {activation!r}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    K = x2.shape[1]
    dev = x.device
    rows = _check_weight(w, w_scale, w_sum, K=K, group_size=group_size, w_int4=w_int4, device=dev, like="x",
                         int32_sums=True)
    if is_gated(activation) and rows % 2:
        raise ValueError(f"w: {activation} needs an even number of rows (value half, then gate half), got {rows}")
    N = rows // 2 if is_gated(activation) else rows
    smooth = _check_smooth(smooth, K, dev, "x")
    act_scale, zp = check_static_act(act_scale, act_zero_point, w_sum, dev)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _check_out_dtype(out_dtype)
    next_scale, next_zp, next_smooth = _check_next_quant(next_scale, next_zero_point, next_smooth, N, dev)
    y = _int8_ffn_up_op(x2, w, w_scale, smooth, act_scale, zp, w_sum if zp is not None else None,
                                        _check_bias(bias, rows, dev, "x"), group_size or 0, bool(w_int4), activation,
                                        next_scale, next_zp, next_smooth, out_dtype)
    return y.reshape(*lead, N)


def _int8_ffn_up_codes(x, w, w_scale, activation, act_scale, bias, group_size, w_int4, next_scale, next_zero_point,
                       next_smooth, out_dtype, smooth, act_zero_point, w_sum):
    check_tensor("x", x, dtypes=(torch.int8,), ndim=2)
    if activation not in FFN_ACTIVATIONS:
        raise ValueError(f"activation: expected one of {', '.join(FFN_ACTIVATIONS)}, got {activation!r}")
    for name, v in (("smooth", smooth), ("act_zero_point", act_zero_point), ("w_sum", w_sum)):
        if v is not None:
            raise ValueError(f"{name}: does not apply to pre-quantized int8 x (dynamic symmetric codes)")
    if act_scale is None:
        raise ValueError("act_scale: required with pre-quantized int8 x (its per-token scales [M, 1])")
    if out_dtype is None:
        raise ValueError("out_dtype: required with pre-quantized int8 x")
    M, K = x.shape
    dev = x.device
    rows = _check_weight(w, w_scale, None, K=K, group_size=group_size, w_int4=w_int4, device=dev, like="x",
                         int32_sums=True)
    if is_gated(activation) and rows % 2:
        raise ValueError(f"w: {activation} needs an even number of rows (value half, then gate half), got {rows}")
    N = rows // 2 if is_gated(activation) else rows
    a_scale = _check_act_scale(act_scale, M, dev, "x", name="act_scale")
    _check_out_dtype(out_dtype)
    next_scale, next_zp, next_smooth = _check_next_quant(next_scale, next_zero_point, next_smooth, N, dev)
    return _int8_ffn_up_op(x, w, w_scale, None, a_scale.reshape(-1, 1), None, None,
                                           _check_bias(bias, rows, dev, "x"), group_size or 0, bool(w_int4),
                                           activation, next_scale, next_zp, next_smooth, out_dtype)


# -- fp8: the same epilogue on the fp8 GEMM (its input quantized by quantize_activation_fp8) ----------

def fp8_ffn_up_reference(a, w, a_scale, w_scale, bias, activation: str, out_dtype: torch.dtype) -> torch.Tensor:
    y = fp8_gemm_reference(a, w, a_scale, w_scale, bias, torch.float32)
    return ffn_activation_reference(y, activation).to(out_dtype)


def _triton_fp8_ffn_up(a, w, a_scale, w_scale, bias, activation, out_dtype):
    N = w.shape[0] // 2 if is_gated(activation) else w.shape[0]
    out = torch.empty(a.shape[0], N, dtype=out_dtype, device=a.device)
    _k().fp8_gemm(a, w, a_scale.reshape(-1), w_scale, bias, out, per_token=a_scale.numel() > 1,
                  activation=activation)
    return out


def _sm90_fp8_ffn_declines(a, w, a_scale, w_scale, bias, activation, out_dtype):
    if activation not in SM90_ACTIVATIONS:
        return f"applies GELU's tanh form only in its epilogue, not {activation!r}"
    return _sm90_fp8_declines(a, w, a_scale, w_scale, bias, out_dtype)


def _cuda_fp8_ffn_up(a, w, a_scale, w_scale, bias, activation, out_dtype):
    return _cuda_fp8_gemm(a, w, a_scale, w_scale, bias, out_dtype, activation)


_backend.register(_backend.OpBackends("fp8_ffn_up", torch=fp8_ffn_up_reference, triton=_triton_fp8_ffn_up,
                                      triton_min_capability=FP8_MIN_CAPABILITY, cuda=_cuda_fp8_ffn_up,
                                      cuda_covers=_sm90_fp8_ffn_declines, **SM90_GEMM))


@_backend.custom_op("fp8_ffn_up")
def _fp8_ffn_up_op(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                   bias: Optional[torch.Tensor], activation: str, out_dtype: torch.dtype) -> torch.Tensor:
    return _backend.run("fp8_ffn_up", a.contiguous(), w, a_scale, w_scale, bias, activation, out_dtype)


@_fp8_ffn_up_op.register_fake
def _(a, w, a_scale, w_scale, bias, activation, out_dtype):
    return a.new_empty((a.shape[0], w.shape[0] // 2 if is_gated(activation) else w.shape[0]), dtype=out_dtype)


def fp8_ffn_up(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor, *, activation: str,
               bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``diffaccel.ops.fp8_gemm`` (float8_e4m3fn codes ``a`` [M, K] with scales per row or tensor, weights
    [N or 2N, K] per channel) with ``activation`` applied to its fp32 result in the epilogue -> [M, N]."""
    check_tensor("a", a, dtypes=(FP8_DTYPE,), ndim=2)
    if activation not in FFN_ACTIVATIONS:
        raise ValueError(f"activation: expected one of {', '.join(FFN_ACTIVATIONS)}, got {activation!r}")
    M, K = a.shape
    rows = _check_weight(w, w_scale, None, K=K, group_size=None, w_int4=False, device=a.device, like="a",
                         allowed=(FP8_DTYPE,))
    if is_gated(activation) and rows % 2:
        raise ValueError(f"w: {activation} needs an even number of rows (value half, then gate half), got {rows}")
    a_scale = _check_act_scale(a_scale, M, a.device, "a")
    _check_out_dtype(out_dtype)
    return _fp8_ffn_up_op(a, w, a_scale, w_scale, _check_bias(bias, rows, a.device, "a"), activation,
                                          out_dtype)


__all__ = ["FFN_ACTIVATIONS", "int8_ffn_up", "int8_ffn_up_reference", "fp8_ffn_up", "fp8_ffn_up_reference",
           "ffn_activation_reference", "is_gated"]
