"""Norms that quantize their output for the projections behind them.

With dynamic per-token activations each quantized projection reads its float input once more to
quantize it. Where a block's norm feeds only quantized projections (a UNet transformer block's
norm1 -> attn1 q/k/v, norm2 -> attn2.to_q, norm3 -> the feed-forward's up projection; the adaLN
norms of DiT, SD3 and Flux -> q/k/v, the context's add_q/k/v, Flux's single-stream proj_mlp), the
norm computes the codes in the same pass that writes its output
(``diffaccel.ops.layer_norm_quantize``) and attaches them to that output (``diffaccel.nn._codes``).
The projections use them when called on that very tensor, unmodified, with the same quantizer;
otherwise they quantize as before. Outputs of the projections are bit-identical to quantizing the
norm's output themselves.

``fuse_norm(norm, act_dtype)`` changes that one instance's class to a subclass of its own that adds
only ``forward`` (``FusedLayerNorm`` for an ``nn.LayerNorm``; ``FusedAdaLayerNormZero``,
``FusedAdaLayerNormZeroSingle`` and ``FusedAdaLayerNormContinuous`` for diffusers' adaptive norms
with a LayerNorm inside), so parameter names,
``state_dict`` and hooks are unchanged; ``unfuse_norm`` restores the class. The codes are made only where they can be used and pay:
not under torch.compile, not in inference mode (no version counter), above ``FUSED_QUANT_MAX_M``
rows (below, the GEMM quantizes its rows itself); elsewhere the same op writes the output alone,
so eager and compiled, inference-mode and no_grad runs give the same results. The original
forward runs where the op cannot stand in: autograd recording (the op has no backward), another
input width, hooks on an adaptive norm's inner LayerNorm.

Numerics: the norm (and the modulation) run in fp32 and round once to the output dtype, where
diffusers rounds the LayerNorm output, then ``1 + scale``, the product and the sum; in fp32 models
the two agree to a few ulps.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as _module

from diffaccel.ops import gemm as G
from diffaccel.ops import norm as NORM

from . import _codes
from ._base import forward_wrapped, has_forward_hooks, records_autograd, set_class
from .quant_linear import QuantLinear

CODE_DTYPE_ATTR = "code_dtype"  # on a fused norm: the codes it writes ("int8" / "fp8_e4m3")


def _codes_pay(x: torch.Tensor) -> bool:
    """Whether this call also computes and attaches codes (see the module docstring)."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or x.is_inference():
        return False
    return x.numel() // x.shape[-1] > G.FUSED_QUANT_MAX_M


def _norm(module: nn.Module, norm: nn.Module, x: torch.Tensor, scale=None, shift=None) -> torch.Tensor:
    """``norm``'s output (modulated) from the one fused op, with the codes attached where they pay.
    The same op runs with and without codes, so results do not depend on whether they were made."""
    act = getattr(module, CODE_DTYPE_ATTR) if _codes_pay(x) else None
    y, q, s = NORM.layer_norm_quantize(x, norm.weight, norm.bias, norm.eps, scale=scale, shift=shift, act_dtype=act)
    if act is not None:
        _codes.attach(y, act, q, s)
    return y


def _takes(x, norm: nn.Module) -> bool:
    """The fused op can stand in for ``norm`` on ``x``: float, [..., K] of its width, no autograd
    (the op has no backward)."""
    return (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2 and x.shape[-1] > 0
            and x.shape[-1] == norm.normalized_shape[0] and not records_autograd(x, norm.weight, norm.bias))


def _plain_layer_norm(norm: nn.Module) -> bool:
    return type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1


class FusedLayerNorm(nn.LayerNorm):
    """An ``nn.LayerNorm`` instance whose output carries its codes (see the module docstring)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not _takes(input, self):
            return super().forward(input)
        return _norm(self, self, input)


def _modulated(module: nn.Module, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """adaLN's ``norm(x) * (1 + scale[:, None]) + shift[:, None]``, with codes where they pay."""
    norm = module.norm
    if (x.dim() == 3 and tuple(scale.shape) == (x.shape[0], x.shape[-1]) == tuple(shift.shape) and _takes(x, norm)
            and not records_autograd(x, scale, shift) and not has_forward_hooks(norm)
            and not (_module._global_forward_hooks or _module._global_forward_pre_hooks)):
        return _norm(module, norm, x, scale, shift)
    return norm(x) * (1 + scale[:, None]) + shift[:, None]


_ADALN: dict = {}  # diffusers' class -> its fused subclass, made on first use (diffusers is optional)


def _adaln_classes() -> dict:
    if not _ADALN:
        from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle

        class FusedAdaLayerNormZero(AdaLayerNormZero):
            def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
                # diffusers' forward, with the modulated norm computing its codes
                if self.emb is not None:
                    emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
                emb = self.linear(self.silu(emb))
                shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
                return _modulated(self, x, scale_msa, shift_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp

        class FusedAdaLayerNormZeroSingle(AdaLayerNormZeroSingle):
            def forward(self, x, emb=None):
                emb = self.linear(self.silu(emb))
                shift_msa, scale_msa, gate_msa = emb.chunk(3, dim=1)
                return _modulated(self, x, scale_msa, shift_msa), gate_msa

        class FusedAdaLayerNormContinuous(AdaLayerNormContinuous):
            def forward(self, x, conditioning_embedding):
                emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
                scale, shift = torch.chunk(emb, 2, dim=1)
                return _modulated(self, x, scale, shift)

        for cls in (FusedAdaLayerNormZero, FusedAdaLayerNormZeroSingle, FusedAdaLayerNormContinuous):
            cls.__qualname__ = cls.__name__  # pickled by name: found through this module's __getattr__
        _ADALN.update({AdaLayerNormZero: FusedAdaLayerNormZero, AdaLayerNormZeroSingle: FusedAdaLayerNormZeroSingle,
                       AdaLayerNormContinuous: FusedAdaLayerNormContinuous})
    return _ADALN


def __getattr__(name: str):
    """The fused AdaLayerNorm classes by name (made on first use), so that pickle / torch.load find
    them for a model saved with fused norms, in a process that has not patched anything yet."""
    if name.startswith("FusedAdaLayerNorm"):
        for cls in _adaln_classes().values():
            if cls.__name__ == name:
                return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fused_class(norm: nn.Module) -> Optional[type]:
    if type(norm) is nn.LayerNorm:
        return FusedLayerNorm
    try:
        return _adaln_classes().get(type(norm))
    except ImportError:  # pragma: no cover - diffusers is optional
        return None


def fuse_reason(norm: nn.Module) -> Optional[str]:
    """None when ``fuse_norm`` can take ``norm`` now, else why not."""
    cls = _fused_class(norm)
    if cls is None:
        return (f"{type(norm).__name__} is not an nn.LayerNorm or a diffusers AdaLayerNormZero(Single) / "
                f"AdaLayerNormContinuous")
    if cls is FusedLayerNorm:
        if not _plain_layer_norm(norm):
            return f"normalizes over {tuple(norm.normalized_shape)}, not the last dimension only"
    elif not _plain_layer_norm(norm.norm):
        return f"its norm is {type(norm.norm).__name__}, not an nn.LayerNorm over the last dimension"
    if forward_wrapped(norm):
        return "its forward is wrapped on the instance (e.g. a diffusers hook)"
    return None


def fuse_norm(norm: nn.Module, act_dtype: str) -> nn.Module:
    """Make ``norm`` write ``act_dtype`` codes with its output, in place; returns it."""
    if act_dtype not in _codes.CODE_DTYPES:
        raise ValueError(f"act_dtype: expected one of {_codes.CODE_DTYPES}, got {act_dtype!r}")
    why = fuse_reason(norm)
    if why is not None:
        raise ValueError(f"norm: cannot fuse it with the quantization: {why}")
    set_class(norm, _fused_class(norm))
    setattr(norm, CODE_DTYPE_ATTR, act_dtype)
    return norm


def unfuse_norm(norm: nn.Module) -> nn.Module:
    """Undo ``fuse_norm`` (a no-op on a norm that is not fused)."""
    if type(norm) is FusedLayerNorm or type(norm) in _ADALN.values():
        set_class(norm, type(norm).__bases__[0])
        norm.__dict__.pop(CODE_DTYPE_ATTR, None)
    return norm


# -- which norm feeds which projections ---------------------------------------------------------

def _projections(attn: Optional[nn.Module], context: bool) -> list:
    """The layers an attention module projects its (context) input with: q/k/v, or the fused one."""
    if attn is None:
        return []
    fused = "to_added_qkv" if context else "to_qkv"
    if getattr(attn, "fused_projections", False) and isinstance(getattr(attn, fused, None), nn.Module):
        return [getattr(attn, fused)]
    names = ("add_q_proj", "add_k_proj", "add_v_proj") if context else ("to_q", "to_k", "to_v")
    return [getattr(attn, n, None) for n in names]


def _ff_up(ff: Optional[nn.Module]) -> list:
    """A diffusers FeedForward's (or FusedFeedForward's) up projection, net[0].proj."""
    net = getattr(ff, "net", None)
    return [getattr(net[0], "proj", None) if isinstance(net, nn.ModuleList) and len(net) else None]


def norm_consumers(block: nn.Module) -> list:
    """[(norm attribute, [layers its output goes to], reason)] for the transformer blocks diffaccel
    knows (diffusers 0.3x-0.4x block code): reason None where the forward passes the norm's output
    unchanged to those layers (it can compute their codes), else why it does not (the report says it)."""
    kind = type(block).__name__
    if kind == "BasicTransformerBlock":
        attn1 = _projections(block.attn1, False)
        attn1 = attn1[:1] if block.only_cross_attention else attn1
        attn2 = _projections(block.attn2, False)[:1] if block.attn2 is not None else []
        plain = block.norm_type == "layer_norm"
        other = f"not fused in a BasicTransformerBlock with norm_type={block.norm_type!r}"
        positions = "positional embeddings are added to its output before the projections"
        entries = [("norm1", attn1, None if plain or block.norm_type == "ada_norm_zero" else other)]
        if block.attn2 is not None:
            entries.append(("norm2", attn2, None if plain else other))
        if block.pos_embed is not None:  # (added to norm1's and norm2's outputs, not norm3's)
            entries = [(attr, layers, why or positions) for attr, layers, why in entries]
        chunked = "the feed-forward is chunked (it gets slices of the output)"
        entries.append(("norm3", _ff_up(block.ff), (None if block._chunk_size is None else chunked) if plain else other))
        return entries
    if kind in ("JointTransformerBlock", "FluxTransformerBlock"):
        return [("norm1", _projections(block.attn, False), None),
                ("norm1_context", _projections(block.attn, True), None)]
    if kind == "FluxSingleTransformerBlock":
        return [("norm", [getattr(block, "proj_mlp", None), *_projections(block.attn, False)], None)]
    return []


def _unwrapped(layer: Optional[nn.Module]) -> Optional[nn.Module]:
    """The base layer of a peft LoRA layer (its forward passes x to the base unchanged), else the layer."""
    base = getattr(layer, "base_layer", None)
    return base if isinstance(base, nn.Module) and hasattr(layer, "lora_A") else layer


def consumers_reason(layers, width: int) -> tuple:
    """(act dtype, None) when every layer (or the base of its LoRA wrapper) takes shared codes of one
    dtype for a ``width``-wide input, else (None, why not)."""
    if not layers or any(m is None for m in layers):
        return None, "a projection behind it is missing"
    layers = [_unwrapped(m) for m in layers]
    if not all(type(m) is QuantLinear for m in layers):
        return None, "not every projection behind it is a QuantLinear"
    if not all(m.takes_shared_codes for m in layers):
        return None, "a projection behind it does not quantize dynamically per token without smoothing"
    dtypes = {m.spec.act_dtype for m in layers}
    if len(dtypes) != 1:
        return None, f"the projections behind it quantize to different dtypes ({', '.join(sorted(dtypes))})"
    if any(m.in_features != width for m in layers):
        return None, "a projection behind it has another input width"
    return dtypes.pop(), None


def norm_width(norm: nn.Module) -> Optional[int]:
    inner = norm if isinstance(norm, nn.LayerNorm) else getattr(norm, "norm", None)
    shape = getattr(inner, "normalized_shape", None)
    return shape[0] if shape and len(shape) == 1 else None


__all__ = ["FusedLayerNorm", "consumers_reason", "fuse_norm", "fuse_reason", "norm_consumers", "norm_width",
           "unfuse_norm"]
