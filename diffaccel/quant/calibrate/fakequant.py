"""Fake quantization used while calibrating, mirroring the integer kernels exactly.

Activations (diffaccel/ops/quantize.py): q = clamp(round_half_even(x_fp32 / scale) + zp, -128, 127),
true division, and the layer computes with (q - zp) * scale. Weights (diffaccel/quant/formats.py):
symmetric, one scale per output channel, q = clamp(round_half_even(w / scale), qmin, qmax) with
[qmin, qmax] = [-127, 127] for int8 and [-8, 7] for int4. ``torch.round`` rounds half to
even, like the kernels, so a recipe calibrated here behaves the same on the real layers.
"""
from __future__ import annotations

import math

import torch

ACT_QMIN, ACT_QMAX = -128, 127
WEIGHT_QRANGE = {"int8": (-127, 127), "int4": (-8, 7)}
WEIGHT_DTYPE_FOR_BITS = {8: "int8", 4: "int4"}
SCALE_FLOOR = 1e-8  # a constant channel/tensor still gets a finite, positive scale


def weight_qrange(weight_dtype: str) -> tuple[int, int]:
    return WEIGHT_QRANGE[weight_dtype]


def per_channel_view(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[O] scale -> broadcastable against a [O, ...] weight."""
    return scale.reshape(-1, *([1] * (weight.dim() - 1)))


def weight_absmax_scale(weight: torch.Tensor, qrange: tuple[int, int]) -> torch.Tensor:
    qmax = qrange[1]
    amax = weight.detach().float().reshape(weight.shape[0], -1).abs().amax(dim=1)
    return (amax / qmax).clamp(min=SCALE_FLOOR)


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, qrange: tuple[int, int]) -> torch.Tensor:
    """Round-to-nearest integer weights (int8 storage) for a per-channel scale [O]."""
    s = per_channel_view(scale.float(), weight)
    return torch.round(weight.detach().float() / s).clamp_(*qrange).to(torch.int8)


def fake_quant_weight(weight: torch.Tensor, scale: torch.Tensor, qrange: tuple[int, int]) -> torch.Tensor:
    s = per_channel_view(scale.float(), weight)
    return torch.round(weight.float() / s).clamp(*qrange) * s


def search_weight_scale(weight: torch.Tensor, qrange: tuple[int, int], *, p: float = 2.4, num_candidates: int = 40,
                        min_ratio: float = 0.3) -> torch.Tensor:
    """Per-channel clip-ratio search: the scale ``r * amax / qmax`` minimising sum |w - Q(w)|^p."""
    qmax = qrange[1]
    w = weight.detach().float().reshape(weight.shape[0], -1)
    amax = w.abs().amax(dim=1).clamp(min=SCALE_FLOOR * qmax)
    best_err = torch.full_like(amax, math.inf)
    best_scale = amax / qmax
    for r in torch.linspace(1.0, min_ratio, num_candidates).tolist():
        s = (amax * r / qmax).clamp(min=SCALE_FLOOR)
        wq = torch.round(w / s[:, None]).clamp(*qrange) * s[:, None]
        err = (w - wq).abs().pow(p).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
    return best_scale


def act_params_from_range(lo: torch.Tensor, hi: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp32) and zero point (int32) covering [lo, hi] (0 always representable)."""
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if symmetric:
        scale = (torch.maximum(hi, -lo) / ACT_QMAX).clamp(min=SCALE_FLOOR)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = ((hi - lo) / (ACT_QMAX - ACT_QMIN)).clamp(min=SCALE_FLOOR)
    zp = torch.round(ACT_QMIN - lo / scale).clamp(ACT_QMIN, ACT_QMAX).to(torch.int32)
    return scale, zp


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Exactly the kernels' static INT8 quantization, dequantized (no gradient)."""
    zp = zero_point.float()
    q = torch.clamp(torch.round(x.float() / scale.float()) + zp, ACT_QMIN, ACT_QMAX)
    return ((q - zp) * scale.float()).to(x.dtype)


def round_ste(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()


def lsq_fake_quant_act(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Same forward as ``fake_quant_act``; straight-through rounding, so the scale learns (LSQ)."""
    zp = zero_point.float().detach()
    q = torch.clamp(round_ste(x.float() / scale) + zp, ACT_QMIN, ACT_QMAX)
    return ((q - zp) * scale).to(x.dtype)


def search_act_range(samples: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, symmetric: bool, *,
                     p: float = 2.4, num_candidates: int = 20, min_ratio: float = 0.4):
    """Shrink [lo, hi] by the ratio minimising the Lp error on a sample of the activation."""
    best = None
    x = samples.float()
    for r in torch.linspace(1.0, min_ratio, num_candidates).tolist():
        scale, zp = act_params_from_range(lo * r, hi * r, symmetric)
        err = (x - fake_quant_act(x, scale, zp)).abs().pow(p).mean().item()
        if best is None or err < best[0]:
            best = (err, scale, zp)
    return best[1], best[2]
