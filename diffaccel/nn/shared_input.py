"""One activation quantization for several quantized projections of the same input.

An attention block projects one hidden state three times (``to_q``, ``to_k``, ``to_v``; SD3's
``add_*_proj`` for the context). With dynamic per-token activations each ``QuantLinear`` would
quantize that same tensor again: three quantization passes over [M, K] where one suffices.
``project_shared(x, *layers)`` quantizes once and runs each layer's GEMM on the shared codes.

The codes are the ones each layer would have computed itself (same quantizer, same input, no
smoothing), so outputs are bit-identical to calling the layers one by one. Sharing applies only
when that holds; otherwise each layer is simply called, which computes the same result:
- every layer is a ``QuantLinear`` with dynamic per-token int8 or fp8 activations of the same
  dtype and no SmoothQuant vector (a smoothing vector is per layer, so the codes would differ);
- no forward hooks on the layers and none registered globally (they would be bypassed);
- more than ``FUSED_QUANT_MAX_M`` rows: below that the GEMM kernel quantizes its rows itself,
  which is cheaper than a separate pass.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

from diffaccel.ops import gemm as G

from .quant_linear import QuantLinear

SHARED_ACT_DTYPES = ("int8", "fp8_e4m3")


def _hooked(layer: nn.Module) -> bool:
    return bool(layer._forward_hooks or layer._forward_pre_hooks)


def can_share_input(x: torch.Tensor, layers) -> bool:
    """True when ``layers`` can run on one shared quantization of ``x`` (see the module docstring)."""
    if len(layers) < 2 or x.dim() < 1 or x.numel() // max(x.shape[-1], 1) <= G.FUSED_QUANT_MAX_M:
        return False
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return False
    first = layers[0]
    for layer in layers:
        if type(layer) is not QuantLinear or _hooked(layer):
            return False
        s = layer.spec
        if (s.act_dtype not in SHARED_ACT_DTYPES or s.act_mode != "dynamic" or layer.smooth is not None
                or s.act_dtype != first.spec.act_dtype or layer.in_features != x.shape[-1]):
            return False
    return True


def project_shared(x: torch.Tensor, *layers: nn.Module) -> tuple:
    """``tuple(layer(x) for layer in layers)``, quantizing ``x`` once when every layer allows it."""
    if not can_share_input(x, layers):
        return tuple(layer(x) for layer in layers)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if layers[0].spec.act_dtype == "int8":
        codes, scale = G.quantize_activation_int8(x2)
    else:
        codes, scale = G.quantize_activation_fp8(x2)
    return tuple(layer.forward_quantized(codes, scale).reshape(*lead, layer.out_features) for layer in layers)


__all__ = ["can_share_input", "project_shared"]
