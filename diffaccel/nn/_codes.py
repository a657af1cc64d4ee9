"""Activation codes that travel with the tensor they quantize.

A fused norm + quantize (``diffaccel.nn.fused_norm``) writes its output ``y`` and, in the same
pass, y's dynamic per-token codes. It attaches them to the ``y`` object itself; a QuantLinear (or
FusedFeedForward) called on that same object with the same quantizer uses them instead of
quantizing y again. They are used only while y is unmodified (its version counter is the one
recorded when they were attached) and only by layers whose own quantizer is exactly that one
(dynamic per-token, no SmoothQuant vector, same dtype), so results are bit-identical to each layer
quantizing for itself. The codes live as long as y does; a reshape or copy of y does not carry them.
"""
from __future__ import annotations

from typing import Optional

import torch

_ATTR = "_diffaccel_codes"
CODE_DTYPES = ("int8", "fp8_e4m3")  # the activation dtypes whose dynamic codes can be shared


def attach(y: torch.Tensor, act_dtype: str, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """Record on ``y`` its codes [M, K] and scales [M, 1] under ``act_dtype`` ("int8" / "fp8_e4m3")."""
    y.__dict__[_ATTR] = (y._version, act_dtype, codes, scale)


def attached(x: torch.Tensor, act_dtype: str) -> Optional[tuple]:
    """(codes, scale) attached to ``x`` for ``act_dtype`` while x is unmodified, else None."""
    if torch.compiler.is_compiling():
        return None
    e = x.__dict__.get(_ATTR)
    if e is None or e[1] != act_dtype or x.is_inference() or e[0] != x._version:
        return None
    return e[2], e[3]


__all__ = ["CODE_DTYPES", "attach", "attached"]
