"""Quantized layers: QuantLinear, QuantConv2d (packed low-bit weights, real low-bit GEMMs), and
FusedFeedForward (a diffusers FeedForward whose activation runs in the up projection's epilogue).

``diffaccel.nn.lora`` (imported on demand, needs peft) holds the peft LoRA layers that wrap them."""
from __future__ import annotations

from typing import Optional

from torch import nn

from diffaccel.quant.formats import QuantSpec, resolve_spec

from ._base import float_weight_reason, own_forward_reason
from .feed_forward import FusedFeedForward
from .quant_conv import QuantConv2d, quantize_conv_reason
from .quant_linear import QuantLinear, quantize_linear_reason


def quantize_reason(module: nn.Module, spec) -> Optional[str]:
    """Why ``module`` cannot be quantized with ``spec`` (a QuantSpec or preset name), None if it can."""
    spec = resolve_spec(spec)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if isinstance(module, (QuantLinear, QuantConv2d)):
        return "already quantized"
    if isinstance(module, nn.Linear):
        return own_forward_reason(module, nn.Linear) or float_weight_reason(module) or quantize_linear_reason(module, spec)
    if isinstance(module, nn.Conv2d):
        return own_forward_reason(module, nn.Conv2d) or float_weight_reason(module) or quantize_conv_reason(module, spec)
    return f"unsupported module kind {type(module).__name__} (only nn.Linear and nn.Conv2d)"


def quantize_module(module: nn.Module, spec, **params):
    """QuantLinear/QuantConv2d.from_float(module, spec, **params); ValueError with the reason otherwise."""
    spec = resolve_spec(spec)
    why = quantize_reason(module, spec)
    if why is not None:
        raise ValueError(f"module: cannot quantize {type(module).__name__} with {spec}: {why}")
    if isinstance(module, nn.Linear):
        return QuantLinear.from_float(module, spec, **params)
    return QuantConv2d.from_float(module, spec, **params)


__all__ = ["QuantLinear", "QuantConv2d", "FusedFeedForward", "QuantSpec", "quantize_reason", "quantize_module"]
