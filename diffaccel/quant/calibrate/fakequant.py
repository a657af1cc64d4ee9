"""Fake quantization used while calibrating, mirroring the kernels exactly.

Activations (diffaccel/ops/quantize.py, diffaccel/ops/gemm.py): int8 q = clamp(round_half_even(x_fp32 /
scale) + zp, -128, 127), true division, and the layer computes with (q - zp) * scale; fp8 q =
fp8_e4m3(clamp(x_fp32 / scale, -448, 448)) (torch's cast, nearest even), symmetric. Weights
(diffaccel/quant/formats.py): symmetric, one scale per output channel, codes on the format's grid
(``WeightGrid``): integers in [-127, 127] (int8) or [-8, 7] (int4), or the E4M3 values within
+-448 (fp8). ``torch.round`` rounds half to even, like the kernels, so a recipe calibrated here
behaves the same on the real layers.
"""
from __future__ import annotations

import math

import torch

ACT_QMIN, ACT_QMAX = -128, 127
FP8_MAX = 448.0
ACT_DTYPES = ("int8", "fp8_e4m3")
SCALE_FLOOR = 1e-8  # a constant channel/tensor still gets a finite, positive scale


def _fp8_values() -> torch.Tensor:
    """The 253 finite E4M3 values, ascending, zero once (codes 0x00-0x7E and their negatives)."""
    magnitudes = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return torch.cat(((-magnitudes[1:]).flip(0), magnitudes))


class WeightGrid:
    """The values a weight code can take (in units of its channel's scale): nearest rounding as the
    kernels' quantizer does it, and the floor / step to the next value that AdaRound learns over."""

    def __init__(self, dtype: str):
        if dtype not in ("int8", "int4", "fp8_e4m3"):
            raise ValueError(f"weight_dtype: no calibration grid for {dtype!r}")
        self.dtype = dtype
        self.is_float = dtype == "fp8_e4m3"
        self.qmin, self.qmax = {"int8": (-127, 127), "int4": (-8, 7), "fp8_e4m3": (-FP8_MAX, FP8_MAX)}[dtype]

    def __repr__(self):
        return f"WeightGrid({self.dtype!r})"

    def __eq__(self, other):
        return isinstance(other, WeightGrid) and other.dtype == self.dtype

    def __hash__(self):
        return hash(self.dtype)

    def clamp(self, v: torch.Tensor) -> torch.Tensor:
        return v.clamp(self.qmin, self.qmax)

    def nearest(self, v: torch.Tensor) -> torch.Tensor:
        """fp32 v (weight / scale) -> the grid value the layer's quantizer picks (as fp32)."""
        if self.is_float:
            return self.clamp(v.float()).to(torch.float8_e4m3fn).float()
        return torch.round(v.float()).clamp(self.qmin, self.qmax)

    def floor_step(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, step): lo the largest grid value <= v, step the distance to the next one above it.
        Integer grids: floor(v) and 1 (the caller clamps lo + h * step into [qmin, qmax]); fp8: v is
        saturated to +-448 first, and the step at +448 is 0."""
        if not self.is_float:
            lo = torch.floor(v)
            return lo, torch.ones_like(lo)
        values = _fp8_values().to(v.device)
        v = self.clamp(v.float()).contiguous()
        below = (torch.searchsorted(values, v, right=True) - 1).clamp(0, len(values) - 1)
        lo = values[below]
        return lo, values[(below + 1).clamp(max=len(values) - 1)] - lo

    def codes(self, values: torch.Tensor) -> torch.Tensor:
        """Grid values (fp32) -> the storage the layer takes: int8, or float8_e4m3fn."""
        return values.to(torch.float8_e4m3fn) if self.is_float else values.to(torch.int8)


WEIGHT_GRIDS = {d: WeightGrid(d) for d in ("int8", "int4", "fp8_e4m3")}


def weight_grid(weight_dtype: str) -> WeightGrid:
    try:
        return WEIGHT_GRIDS[weight_dtype]
    except KeyError:
        raise ValueError(f"weight_dtype: no calibration grid for {weight_dtype!r}; expected one of "
                         f"{tuple(WEIGHT_GRIDS)}") from None


def per_channel_view(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[O] scale -> broadcastable against a [O, ...] weight."""
    return scale.reshape(-1, *([1] * (weight.dim() - 1)))


def weight_absmax_scale(weight: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    amax = weight.detach().float().reshape(weight.shape[0], -1).abs().amax(dim=1)
    return (amax / grid.qmax).clamp(min=SCALE_FLOOR)


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    """Round-to-nearest weight codes (int8, or float8_e4m3fn) for a per-channel scale [O]."""
    s = per_channel_view(scale.float(), weight)
    return grid.codes(grid.nearest(weight.detach().float() / s))


def fake_quant_weight(weight: torch.Tensor, scale: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    s = per_channel_view(scale.float(), weight)
    return grid.nearest(weight.float() / s) * s


def search_weight_scale(weight: torch.Tensor, grid: WeightGrid, *, p: float = 2.4, num_candidates: int = 40,
                        min_ratio: float = 0.3) -> torch.Tensor:
    """Per-channel clip-ratio search: the scale ``r * amax / qmax`` minimising sum |w - Q(w)|^p."""
    qmax = grid.qmax
    w = weight.detach().float().reshape(weight.shape[0], -1)
    amax = w.abs().amax(dim=1).clamp(min=SCALE_FLOOR * qmax)
    best_err = torch.full_like(amax, math.inf)
    best_scale = amax / qmax
    for r in torch.linspace(1.0, min_ratio, num_candidates).tolist():
        s = (amax * r / qmax).clamp(min=SCALE_FLOOR)
        wq = grid.nearest(w / s[:, None]) * s[:, None]
        err = (w - wq).abs().pow(p).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
    return best_scale


def check_act_dtype(act_dtype: str) -> None:
    if act_dtype not in ACT_DTYPES:
        raise ValueError(f"act_dtype: expected one of {ACT_DTYPES}, got {act_dtype!r}")


def act_params_from_range(lo: torch.Tensor, hi: torch.Tensor, symmetric: bool, act_dtype: str = "int8"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp32) and zero point (int32) covering [lo, hi] (0 always representable); fp8 is
    symmetric with zero point 0."""
    check_act_dtype(act_dtype)
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if act_dtype == "fp8_e4m3":
        if not symmetric:
            raise ValueError("act_symmetric: fp8_e4m3 activations are symmetric")
        scale = (torch.maximum(hi, -lo) / FP8_MAX).clamp(min=SCALE_FLOOR)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    if symmetric:
        scale = (torch.maximum(hi, -lo) / ACT_QMAX).clamp(min=SCALE_FLOOR)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = ((hi - lo) / (ACT_QMAX - ACT_QMIN)).clamp(min=SCALE_FLOOR)
    zp = torch.round(ACT_QMIN - lo / scale).clamp(ACT_QMIN, ACT_QMAX).to(torch.int32)
    return scale, zp


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, act_dtype: str = "int8"
                   ) -> torch.Tensor:
    """Exactly the kernels' static quantization (int8 with zero point, or fp8), dequantized (no gradient)."""
    if act_dtype == "fp8_e4m3":
        q = (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
        return (q * scale.float()).to(x.dtype)
    zp = zero_point.float()
    q = torch.clamp(torch.round(x.float() / scale.float()) + zp, ACT_QMIN, ACT_QMAX)
    return ((q - zp) * scale.float()).to(x.dtype)


def round_ste(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()


def round_fp8_ste(v: torch.Tensor) -> torch.Tensor:
    """E4M3 nearest rounding of an (already saturated) v, straight-through."""
    return v + (v.to(torch.float8_e4m3fn).float() - v).detach()


def lsq_fake_quant_act(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, act_dtype: str = "int8"
                       ) -> torch.Tensor:
    """Same forward as ``fake_quant_act``; straight-through rounding, so the scale learns (LSQ)."""
    if act_dtype == "fp8_e4m3":
        q = round_fp8_ste((x.float() / scale).clamp(-FP8_MAX, FP8_MAX))
        return (q * scale).to(x.dtype)
    zp = zero_point.float().detach()
    q = torch.clamp(round_ste(x.float() / scale) + zp, ACT_QMIN, ACT_QMAX)
    return ((q - zp) * scale).to(x.dtype)


def search_act_range(samples: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, symmetric: bool, *,
                     p: float = 2.4, num_candidates: int = 20, min_ratio: float = 0.4, act_dtype: str = "int8",
                     weights: torch.Tensor | None = None):
    """Shrink [lo, hi] by the ratio minimising the Lp error on a sample of the activation (each
    sampled value standing for ``weights`` values of it: a weighted mean; None: all equal)."""
    best = None
    x = samples.float()
    w = torch.ones_like(x) if weights is None else weights.float()
    for r in torch.linspace(1.0, min_ratio, num_candidates).tolist():
        scale, zp = act_params_from_range(lo * r, hi * r, symmetric, act_dtype)
        err = ((x - fake_quant_act(x, scale, zp, act_dtype)).abs().pow(p) * w).sum().item() / w.sum().item()
        if best is None or err < best[0]:
            best = (err, scale, zp)
    return best[1], best[2]
