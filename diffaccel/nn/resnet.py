"""A diffusers ``ResnetBlock2D`` whose two GroupNorm + SiLU + conv chains run as one statistics pass
and one quantized conv each: ``diffaccel.ops.group_norm_affine`` reduces the GroupNorm to a
per-(sample, channel) affine, and the int8 implicit-GEMM conv applies that affine and the SiLU
while it gathers its input (``QuantConv2d.forward_normalized``). The normalized and the activated
tensors are never written; the time-embedding addition before ``norm2`` is folded into the
second affine.

``fuse_resnet(block)`` changes that one instance's class to ``FusedResnetBlock2D``, a subclass of
diffusers' class that adds nothing but ``forward`` (no state), so parameter names, ``state_dict``,
hooks and LoRA targets are unchanged; ``unfuse_resnet`` restores the class. Each call checks that
the fused path computes what diffusers' forward would and otherwise runs that forward: up/down
sampling blocks, "scale_shift" time embeddings, another activation, hooks on the chain's layers
(torch forward hooks, or a forward wrapped by accelerate or diffusers: sequential CPU offload loads
a layer's weights in its own forward only), active dropout, convs that are not int8 k x k (fp8,
weight-only, float, LoRA-wrapped).

The fused path computes in fp32 where diffusers rounds the normalized and the activated tensors
to the model's dtype; in fp32 models the two agree to a few ulps (GroupNorm's statistics are summed
in another order).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as _module

from diffaccel.ops import norm as NORM

from ._base import forward_wrapped, has_forward_hooks, records_autograd, set_class
from .quant_conv import QuantConv2d

_FUSED_CLASS: Optional[type] = None


def _conv_reason(name: str, conv: nn.Module) -> Optional[str]:
    if type(conv) is not QuantConv2d:
        return f"{name} is {type(conv).__name__}, not a QuantConv2d"
    if not conv.takes_normalized_input:
        return f"{name} is not an int8 k x k conv ({conv._spec_repr()})"
    return None


def unfused_reason(block: nn.Module, temb: Optional[torch.Tensor] = None, check_temb: bool = False,
                   x: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why the fused forward cannot stand in for ``block``'s own (None when it can). ``check_temb``:
    also check this call's ``temb`` (against the time-embedding projection, and ``x``'s batch)."""
    if block.upsample is not None or block.downsample is not None:
        return "up/down-sampling block"
    if block.time_embedding_norm != "default":
        return f"time_embedding_norm={block.time_embedding_norm!r}"
    if type(block.nonlinearity) is not nn.SiLU:
        return f"activation {type(block.nonlinearity).__name__} (the fused prologue is SiLU)"
    for name in ("norm1", "norm2"):
        norm = getattr(block, name)
        if type(norm) is not nn.GroupNorm or not norm.affine:
            return f"{name} is not an affine GroupNorm"
    for name in ("conv1", "conv2"):
        why = _conv_reason(name, getattr(block, name))
        if why:
            return why
    if block.training and block.dropout.p > 0:
        return "dropout is active (training mode)"
    chain = (block.norm1, block.nonlinearity, block.conv1, block.norm2, block.dropout, block.conv2)
    if any(has_forward_hooks(m) for m in chain) or _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return "hooks on its layers would be bypassed"
    if check_temb and (temb is None) != (block.time_emb_proj is None):
        return "temb given without a time_emb_proj (or missing)"
    if check_temb and temb is not None and x is not None and (temb.dim() != 2 or temb.shape[0] != x.shape[0]):
        return "temb broadcasts over the batch (diffusers' forward broadcasts it; the fused norm takes [B, C])"
    return None


def _needs_grad(block: nn.Module, input_tensor: torch.Tensor, temb: Optional[torch.Tensor]) -> bool:
    """A gradient would flow through the chain: its input, temb, the norms' affine or the time-embedding
    projection (LoRA on it included). The fused ops have no backward; diffusers' forward, whose
    layers have one, runs instead."""
    if not torch.is_grad_enabled():
        return False
    return records_autograd(input_tensor, temb) or any(
        p.requires_grad for m in (block.norm1, block.norm2, block.time_emb_proj) if m is not None
        for p in m.parameters())


def _fused_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs.get("scale") is not None or input_tensor.dim() != 4 or _needs_grad(self, input_tensor, temb) \
            or unfused_reason(self, temb, check_temb=True, x=input_tensor) is not None:
        return super(type(self), self).forward(input_tensor, temb, *args, **kwargs)
    n1, n2 = self.norm1, self.norm2
    h = self.conv1.forward_normalized(input_tensor, NORM.group_norm_affine(
        input_tensor, n1.num_groups, n1.weight, n1.bias, n1.eps), in_silu=True)
    add = None
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        add = self.time_emb_proj(temb)  # [B, C]: folded into norm2's affine
    h = self.conv2.forward_normalized(h, NORM.group_norm_affine(h, n2.num_groups, n2.weight, n2.bias, n2.eps,
                                                                add=add), in_silu=True)
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor.contiguous() if self.training else input_tensor)
    return (input_tensor + h) / self.output_scale_factor


def fused_class() -> type:
    """``FusedResnetBlock2D``: diffusers' ResnetBlock2D with the fused forward (made once, lazily:
    diffusers is an optional dependency)."""
    global _FUSED_CLASS
    if _FUSED_CLASS is None:
        from diffusers.models.resnet import ResnetBlock2D

        _FUSED_CLASS = type("FusedResnetBlock2D", (ResnetBlock2D,), {
            "forward": _fused_forward, "__module__": __name__,
            "__doc__": "ResnetBlock2D whose GroupNorm + SiLU run inside its quantized convs (diffaccel.nn.resnet)."})
    return _FUSED_CLASS


def __getattr__(name: str):
    # pickle finds the class by name (torch.save of a whole patched model, and loading it again)
    if name == "FusedResnetBlock2D":
        return fused_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_target(module: nn.Module) -> bool:
    """True for exactly diffusers' ResnetBlock2D (False without diffusers)."""
    try:
        from diffusers.models.resnet import ResnetBlock2D
    except ImportError:  # pragma: no cover - diffusers is optional
        return False
    return type(module) is ResnetBlock2D


def fuse_reason(module: nn.Module) -> Optional[str]:
    """None when ``fuse_resnet`` can take ``module`` now, else why not ("not a ResnetBlock2D" for
    anything that is not exactly diffusers' ResnetBlock2D)."""
    if not is_target(module):
        return "not a ResnetBlock2D"
    if forward_wrapped(module):
        # the instance's own forward runs before the class's: the fused forward would never be called
        return "its forward is wrapped on the instance (e.g. a diffusers hook), which would bypass the fused one"
    return unfused_reason(module)


def fuse_resnet(block: nn.Module) -> nn.Module:
    """Give ``block`` (a diffusers ResnetBlock2D) the fused forward, in place; returns it."""
    why = fuse_reason(block)
    if why is not None:
        raise ValueError(f"block: cannot fuse this ResNet block: {why}")
    set_class(block, fused_class())
    return block


def unfuse_resnet(block: nn.Module) -> nn.Module:
    """Undo ``fuse_resnet`` (a no-op on a block that is not fused)."""
    if type(block) is _FUSED_CLASS:
        set_class(block, _FUSED_CLASS.__bases__[0])
    return block


__all__ = ["fuse_resnet", "unfuse_resnet", "fuse_reason", "is_target", "unfused_reason", "fused_class"]
