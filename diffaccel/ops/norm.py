"""GroupNorm folded into a per-(sample, channel) affine: ``group_norm_affine``.

GroupNorm(x)[b, c] = x[b, c] * scale[b, c] + shift[b, c] with scale = gamma[c] * rstd[b, g(c)] and
shift = beta[c] - mean[b, g(c)] * scale: once the statistics are known the normalization is a
per-channel affine, which ``diffaccel.ops.int8_conv2d(..., in_affine=...)`` applies while it
gathers its input. So a GroupNorm + SiLU + quantized conv reads the conv's input twice (here, and
in the conv) instead of writing and reading the normalized and the activated tensor.

Numerics (the reference; the Triton kernel, ``kernels/norm.py``, sums in its own order, so the
two agree to fp32 rounding): v = fp32(x) (+ add[b, c]); per (b, g) over its C/G * H * W values
mean and the biased variance (two-pass), rstd = 1 / sqrt(var + eps); scale, shift as above, and
with ``add``: shift + add[b, c] * scale (the addition folded into the shift).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _backend
from ._checks import check_tensor
from .gemm import FLOAT_DTYPES, _check_device


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


@torch.library.custom_op("diffaccel::group_norm_affine", mutates_args=())
def _group_norm_affine_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, add: Optional[torch.Tensor],
                          num_groups: int, eps: float) -> torch.Tensor:
    return _backend.implementation("group_norm_affine", x.device)(x, weight, bias, add, num_groups, eps)


@_group_norm_affine_op.register_fake
def _(x, weight, bias, add, num_groups, eps):
    return x.new_empty((x.shape[0], x.shape[1], 2), dtype=torch.float32)


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
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or C % num_groups:
        raise ValueError(f"num_groups: expected a positive int dividing C={C}, got {num_groups!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=1)
        if t.shape[0] != C:
            raise ValueError(f"{name}: expected shape ({C},), got {tuple(t.shape)}")
        _check_device(name, t, x.device, "x")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps: expected a positive float, got {eps!r}")
    if add is not None:
        check_tensor("add", add, dtypes=FLOAT_DTYPES)
        if add.numel() != B * C:
            raise ValueError(f"add: expected one value per sample and channel ([B, C] = [{B}, {C}]), "
                             f"got shape {tuple(add.shape)}")
        _check_device("add", add, x.device, "x")
        add = add.reshape(B, C).float().contiguous()
    return torch.ops.diffaccel.group_norm_affine(x, weight, bias, add, num_groups, float(eps))


__all__ = ["group_norm_affine", "group_norm_affine_reference"]
