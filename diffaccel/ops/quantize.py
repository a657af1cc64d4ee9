"""Activation quantization to INT8: static per-tensor (calibrated scale and zero point) and
dynamic per-token (symmetric, scales returned).

Numerics, identical in every backend so results are bit-exact:
  q = clamp(round_half_even(x_fp32 / scale) + zero_point, -128, 127)
with true IEEE division (not a multiply by a reciprocal) and, per token,
  scale = max(amax(|x_fp32|), 1e-12) / 127.
Non-finite input, the same in every backend: a dynamic row (token, pixel) holding a NaN or Inf gets
a NaN scale (``poison``), so its dequantized output is NaN as it would be in float arithmetic
(GPU and Triton max reductions drop NaN: left alone they would hide it); a NaN code is 0 (a
static quantizer has no scale to poison: its NaN element reads as 0).
"""
from __future__ import annotations

import math

import torch

from . import _backend
from ._checks import (FLOAT_DTYPES, check_int8_zero_point, check_positive_finite, check_tensor, plain_number,
                      same_device)

AMAX_FLOOR = 1e-12  # keeps an all-zero row's scale finite and positive


def div_exact(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """``t / divisor`` rounded once (IEEE), on every device. CUDA's tensor / Python number multiplies
    by the rounded reciprocal ``1 / divisor`` instead, an ulp off for some ``t`` (seen on an H200: the
    reference's per-token scales ``amax / 127`` differed from the kernels' in the last bit); CPU and the
    kernels divide."""
    return t / torch.full((), divisor, dtype=t.dtype, device=t.device)


def poison(xf: torch.Tensor) -> torch.Tensor:
    """sum(x * 0) over the last dim: +-0 for a finite row, NaN for one with a NaN or Inf. Added to a
    row's scale (exact for finite rows); the kernels add the same sum."""
    return (xf * 0.0).sum(dim=-1, keepdim=True)


def nan_to_zero(v: torch.Tensor) -> torch.Tensor:
    """A NaN code becomes 0 (casting NaN to int8 is undefined; the kernels' clamps drop it)."""
    return torch.where(torch.isnan(v), torch.zeros_like(v), v)


# -- the references (one per op) ---------------------------------------------------------

def quantize_per_tensor_reference(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    q = nan_to_zero(torch.round(x.float() / scale.float().reshape(()))) + zero_point.reshape(()).float()
    return q.clamp_(-128, 127).to(torch.int8)


def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = div_exact(amax.clamp(min=AMAX_FLOOR), 127.0) + poison(xf)
    q = nan_to_zero(torch.round(xf / scale)).clamp_(-128, 127).to(torch.int8)
    return q, scale


# -- backends -----------------------------------------------------------------------------

def _ext_per_tensor(x, scale, zero_point):
    return torch.ops.diffaccel.ext_quantize_per_tensor(x, scale, zero_point)


def _ext_per_token(x):
    return torch.ops.diffaccel.ext_quantize_per_token(x)


def _triton_per_tensor(x, scale, zero_point):
    from diffaccel.kernels import quantize as k

    out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    k.quantize_per_tensor(x, scale, zero_point, out)
    return out


def _triton_per_token(x):
    from diffaccel.kernels import quantize as k

    out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    k.quantize_per_token(x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1]), scales.view(-1))
    return out, scales


_backend.register(_backend.OpBackends(
    "quantize_per_tensor", torch=quantize_per_tensor_reference, cuda=_ext_per_tensor,
    triton=_triton_per_tensor, cuda_devices=("cpu", "cuda")))
_backend.register(_backend.OpBackends(
    "quantize_per_token", torch=quantize_per_token_reference, cuda=_ext_per_token,
    triton=_triton_per_token, cuda_devices=("cpu", "cuda")))


# -- custom ops (schema + fake kernel: torch.compile and CUDA graphs see one opaque node) --

@_backend.custom_op("quantize_per_tensor")
def _quantize_per_tensor_op(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    return _backend.implementation("quantize_per_tensor", x.device)(x, scale, zero_point)


@_quantize_per_tensor_op.register_fake
def _(x, scale, zero_point):
    return torch.empty(x.shape, dtype=torch.int8, device=x.device)


@_backend.custom_op("quantize_per_token")
def _quantize_per_token_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    return _backend.implementation("quantize_per_token", x.device)(x)


@_quantize_per_token_op.register_fake
def _(x):
    return (torch.empty(x.shape, dtype=torch.int8, device=x.device),
            torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device))


# -- public wrappers: validate, then call the op ------------------------------------------

def _as_scalar_tensor(name: str, value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        check_tensor(name, value, dtypes=(dtype,) if dtype == torch.int32 else FLOAT_DTYPES)
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a single value (per-tensor), got shape {tuple(value.shape)}")
        if not same_device(device, value.device):
            raise ValueError(f"{name}: expected a tensor on {device} like x, got one on {value.device}")
        return value.reshape(1).to(dtype)
    value = plain_number(value)
    if dtype == torch.int32:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int or an int32 tensor, got {type(value).__name__}")
        if not -128 <= value <= 127:  # (checked here too: torch.tensor raises on int32 overflow)
            raise ValueError(f"{name}: expected a value in [-128, 127], got {value}")
    elif not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a float or a float32 tensor, got {type(value).__name__}")
    t = torch.tensor([value], dtype=dtype, device=device)
    if dtype != torch.int32 and value != 0 and math.isfinite(value) and float(t.abs()) in (0.0, math.inf):
        # (a finite, non-zero Python float the float32 scale turns into inf or 0)
        raise ValueError(f"{name}: {value!r} overflows or underflows float32, the kernels' scale dtype "
                         f"(|{name}| up to {torch.finfo(torch.float32).max:.3g})")
    return t


def quantize_per_tensor(x: torch.Tensor, scale, zero_point=0) -> torch.Tensor:
    """Static per-tensor INT8 quantization with a calibrated scale (> 0) and zero point."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    scale_t = _as_scalar_tensor("scale", scale, torch.float32, x.device)
    zp_t = _as_scalar_tensor("zero_point", zero_point, torch.int32, x.device)
    check_positive_finite("scale", scale_t)
    check_int8_zero_point("zero_point", zp_t)
    return _quantize_per_tensor_op(x, scale_t, zp_t)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric INT8 quantization per row of the last dimension.

    Returns ``(q, scales)``: ``q`` int8 of x's shape, ``scales`` float32 of shape
    ``x.shape[:-1] + (1,)``, so that ``q * scales`` approximates ``x``.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x: expected at least one element in the last dimension, got shape {tuple(x.shape)}")
    return _quantize_per_token_op(x)
