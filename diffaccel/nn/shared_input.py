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
- no hooks on the layers (torch forward hooks, or a forward wrapped on the instance as accelerate's
  offload does) and none registered globally (they would be bypassed);
- more than ``FUSED_QUANT_MAX_M`` rows: below that the GEMM kernel quantizes its rows itself,
  which is cheaper than a separate pass.

Processors diffaccel does not write (diffusers' own, routed through its attention dispatcher:
Flux, Wan, QwenImage, ...) call ``attn.to_q(x)``, ``attn.to_k(x)``, ``attn.to_v(x)`` themselves.
``link_siblings(attn)`` gives those layers one ``SharedInputGroup``: the first call quantizes x,
the next ones with that same tensor (same object, unmodified: same version counter) reuse the
codes, and the group lets them go once every sibling has used them. It stands aside (each layer
quantizes for itself) inside torch.compile, for inference-mode tensors (they have no version
counter to prove them unmodified) and where ``can_share_input``'s conditions fail; and for good
once a new input comes to a sibling that has not had the last one (the layers are then not called
on one tensor, and the group must not keep an input alive between calls). A sibling that had the
last input coming back with a new one means that round ended part-way (the forward raised between
to_q and to_k): the group drops it and goes on sharing; until then it holds that one input.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

from diffaccel.ops import gemm as G

from . import _codes
from ._base import has_forward_hooks, records_autograd
from .quant_linear import QuantLinear


def _shareable(layer: nn.Module) -> bool:
    """A QuantLinear whose own quantizer is the shared one: dynamic int8/fp8, no smoothing vector."""
    return type(layer) is QuantLinear and layer.takes_shared_codes


def _rows_above_fused_max(x: torch.Tensor) -> bool:
    # at or below FUSED_QUANT_MAX_M rows the GEMM quantizes its rows itself, cheaper than a pass.
    # Inside torch.compile the row count is not read: a branch on it would guard the graph on it, one
    # recompile each time batch x tokens crosses the threshold (SD1.5 512px: batch 1 <-> 2 at 8x8);
    # the shared codes give the same outputs bit for bit, so sharing always is as exact
    if torch.compiler.is_compiling():
        return x.dim() >= 1
    return x.dim() >= 1 and x.numel() // max(x.shape[-1], 1) > G.FUSED_QUANT_MAX_M


def can_share_input(x: torch.Tensor, layers) -> bool:
    """True when ``layers`` can run on one shared quantization of ``x`` (see the module docstring)."""
    if len(layers) < 2 or not _rows_above_fused_max(x) or records_autograd(x):
        return False  # (shared int8 codes would cut the autograd graph: each layer's own call has a backward)
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return False
    return all(_shareable(layer) and not has_forward_hooks(layer) and layer.spec.act_dtype == layers[0].spec.act_dtype
               and layer.in_features == x.shape[-1] for layer in layers)


def project_shared(x: torch.Tensor, *layers: nn.Module) -> tuple:
    """``tuple(layer(x) for layer in layers)``, quantizing ``x`` once when every layer allows it."""
    if not can_share_input(x, layers):
        return tuple(layer(x) for layer in layers)
    lead = x.shape[:-1]
    pre = _codes.attached(x, layers[0].spec.act_dtype)  # a fused norm's codes for x
    codes, scale = pre if pre is not None else _quantize(x.reshape(-1, x.shape[-1]), layers[0].spec.act_dtype)
    return tuple(layer.forward_quantized(codes, scale).reshape(*lead, layer.out_features) for layer in layers)


def _quantize(x2: torch.Tensor, act_dtype: str):
    return G.quantize_activation_int8(x2) if act_dtype == "int8" else G.quantize_activation_fp8(x2)


class SharedInputGroup:
    """Sibling QuantLinears called one after another on one input (see the module docstring)."""

    standing_aside = False  # set for good once the siblings turned out not to share one input

    def __init__(self, size: int):
        self.size = size
        self._entry = None  # [x, its version, act dtype, codes, scale, ids of the layers that used them]

    def forward(self, layer: QuantLinear, x: torch.Tensor):
        """``layer(x)`` on shared codes, or None when sharing does not apply (the caller then runs
        its own quantization). link_siblings checked the layers' specs."""
        if self.standing_aside or torch.compiler.is_compiling() or x.is_inference() or not _rows_above_fused_max(x):
            return None
        s = layer.spec
        e = self._entry
        if e is None or e[0] is not x or e[1] != x._version or e[2] != s.act_dtype:
            if e is not None and id(layer) not in e[5]:
                # another input before every sibling had this one: these layers are not called on one
                # tensor (a processor that projects a concatenation, say), so the group would hold an
                # input and its codes between calls. Each layer quantizes for itself from now on.
                self._entry, self.standing_aside = None, True
                return None
            # (a layer that had the last input back with a new one: that round ended part-way, e.g.
            # the forward raised between to_q and to_k; it is dropped and a new round starts)
            codes, scale = _quantize(x.reshape(-1, x.shape[-1]), s.act_dtype)
            e = self._entry = [x, x._version, s.act_dtype, codes, scale, set()]
        e[5].add(id(layer))
        if len(e[5]) >= self.size:  # every sibling has had them: don't hold x and its codes any longer
            self._entry = None
        return layer.forward_quantized(e[3], e[4]).reshape(*x.shape[:-1], layer.out_features)


SIBLING_PROJECTIONS = (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"))


def link_siblings(attn: nn.Module, also=()) -> list:
    """Give ``attn``'s dynamic-activation q/k/v QuantLinears (and the context ones) a shared group;
    ``also``: layers called on the same input just before q/k/v (Flux's single-stream ``proj_mlp``).
    Returns the layers linked (``unlink`` takes them apart)."""
    linked = []
    for i, names in enumerate(SIBLING_PROJECTIONS):
        layers = ([*also] if i == 0 else []) + [getattr(attn, n, None) for n in names]
        if not all(_shareable(m) for m in layers) or len({(m.spec.act_dtype, m.in_features) for m in layers}) != 1:
            continue
        group = SharedInputGroup(len(layers))
        for m in layers:
            m.shared_input = group
        linked += layers
    return linked


def unlink(layers) -> None:
    for m in layers:
        m.shared_input = None


__all__ = ["SharedInputGroup", "can_share_input", "link_siblings", "project_shared", "unlink"]
