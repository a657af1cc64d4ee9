"""FusedFeedForward: a diffusers ``FeedForward`` whose quantized up projection applies its GELU /
GEGLU in the GEMM epilogue (``diffaccel.ops.int8_ffn_up``, ``fp8_ffn_up``). When both projections
have int8 activations and the down projection's are static, the epilogue writes that layer's int8
codes directly, so the [M, inner] activation crosses memory once as int8 instead of as a float
tensor, an activation pass and a quantization pass. Otherwise (dynamic per-token activations, fp8,
a float down projection) the float activation is written and the down projection runs as usual:
the activation pass (one to three for GEGLU) is saved.

The module keeps the original ``net`` ModuleList (the same object), so parameter and buffer
names, ``state_dict`` and LoRA target names are unchanged. Each call checks that the fused path
computes what the loop over ``net`` would; otherwise (a LoRA wrapper on a projection, hooks,
dropout in training, a format without the fused epilogue) it runs that loop. The only numerical
difference of the fused path: GELU acts on the fp32 GEMM result instead of its rounding to the
output dtype, so the activation is one rounding closer to exact.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as _module

from diffaccel.ops import ffn as FF
from diffaccel.ops import gemm as G

from . import _codes
from ._base import forward_wrapped, has_forward_hooks, in_autocast_dtype, records_autograd
from .quant_linear import QuantLinear


_CLASSES: Optional[tuple] = None


def _feed_forward_classes() -> tuple:
    """(FeedForward, GELU, GEGLU) of diffusers, imported once (not inside a compiled forward)."""
    global _CLASSES
    if _CLASSES is None:
        from diffusers.models.activations import GEGLU, GELU
        from diffusers.models.attention import FeedForward

        _CLASSES = (FeedForward, GELU, GEGLU)
    return _CLASSES


def _activation_name(act: nn.Module) -> Optional[str]:
    _, GELU, GEGLU = _feed_forward_classes()
    if type(act) is GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if type(act) is GEGLU:  # diffusers' GEGLU always uses the erf GELU
        return "geglu"
    return None


def _up_reason(layer: nn.Module) -> Optional[str]:
    if type(layer) is not QuantLinear:
        return f"net.0.proj is {type(layer).__name__}, not a QuantLinear"
    s = layer.spec
    if s.act_dtype not in ("int8", "fp8_e4m3"):
        return (f"net.0.proj has {s.act_dtype or 'float (weight-only)'} activations; the fused epilogue needs "
                f"int8 or fp8 ones")
    return None


def _takes_static_codes(up: nn.Module, down: nn.Module) -> bool:
    """The int8 epilogue can write ``down``'s codes: both int8, ``down``'s activations static."""
    return (up.spec.act_dtype == "int8" and type(down) is QuantLinear and down.spec.act_dtype == "int8"
            and down.spec.act_mode == "static")


def unfused_reason(ff: nn.Module) -> Optional[str]:
    """Why the fused path cannot replace ``ff``'s loop now (None when it can)."""
    net = ff.net
    if len(net) not in (3, 4) or not all(isinstance(net[i], nn.Dropout) for i in range(1, len(net), 2)):
        return "net is not [activation, Dropout, Linear(, Dropout)]"
    act = net[0]
    activation = _activation_name(act)
    if activation is None:
        return f"activation {type(act).__name__} has no fused epilogue (GELU, GELU tanh and GEGLU do)"
    why = _up_reason(act.proj)
    if why:
        return why
    if ff.training and any(d.p > 0 for d in net if isinstance(d, nn.Dropout)):
        return "dropout is active (training mode)"
    if any(has_forward_hooks(m) for m in (act, act.proj, *net)) or _module._global_forward_hooks \
            or _module._global_forward_pre_hooks:
        return "hooks on its layers would be bypassed"
    return None


class FusedFeedForward(nn.Module):
    """Wraps a diffusers FeedForward (sharing its ``net``); see the module docstring."""

    def __init__(self, ff: nn.Module):
        super().__init__()
        FeedForward, _, _ = _feed_forward_classes()
        if type(ff) is not FeedForward:
            raise TypeError(f"ff: expected a diffusers FeedForward, got {type(ff).__name__}")
        why = unfused_reason(ff)
        if why is not None:
            raise ValueError(f"ff: cannot fuse this feed-forward: {why}")
        self.net = ff.net
        self.training = ff.training

    @property
    def activation(self) -> str:
        return _activation_name(self.net[0])

    @property
    def writes_codes(self) -> bool:
        """True when the up projection writes the down projection's static int8 codes."""
        return _takes_static_codes(self.net[0].proj, self.net[2])

    @property
    def op_name(self) -> str:
        return "fp8_ffn_up" if self.net[0].proj.spec.act_dtype == "fp8_e4m3" else "int8_ffn_up"

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # (FeedForward takes and ignores a deprecated ``scale`` argument the same way; the fused op has
        # no backward, the layers one by one have)
        if records_autograd(hidden_states) or unfused_reason(self) is not None:
            for module in self.net:
                hidden_states = module(hidden_states)
            return hidden_states
        up, down = self.net[0].proj, self.net[2]
        if hidden_states.shape[-1] != up.in_features:
            raise ValueError(f"hidden_states: expected last dimension {up.in_features}, got shape "
                             f"{tuple(hidden_states.shape)}")
        lead = hidden_states.shape[:-1]
        x2 = hidden_states.reshape(-1, up.in_features)
        # codes a fused norm attached to the input (diffaccel.nn._codes): the up projection's own
        pre = _codes.attached(hidden_states, up.spec.act_dtype) if up.takes_shared_codes else None
        if up.spec.act_dtype == "fp8_e4m3":
            if pre is not None:
                codes, a_scale = pre
            else:
                scale = up._act_params()[0] if up.spec.act_mode == "static" else None
                codes, a_scale = G.quantize_activation_fp8(x2, smooth=up.smooth, scale=scale)
            h = FF.fp8_ffn_up(codes, up.weight_q, a_scale, up.weight_scale, activation=self.activation, bias=up.bias,
                              out_dtype=up.original_dtype)
            y = down(h)
            return y.reshape(*lead, y.shape[-1])
        kw = dict(activation=self.activation, smooth=up.smooth, bias=up.bias, group_size=up.group_size,
                  w_int4=up.spec.weight_dtype == "int4", out_dtype=up.original_dtype)
        if up.spec.act_mode == "static":
            scale, zp = up._act_params()
            kw.update(act_scale=scale, act_zero_point=zp, w_sum=up.weight_sum if zp is not None else None)
        elif pre is not None:  # int8 codes with their per-token scales in place of x
            x2 = pre[0]
            kw.update(act_scale=pre[1])
        if self.writes_codes:
            next_scale, next_zp = down._act_params()
            codes = FF.int8_ffn_up(x2, up.weight_q, up.weight_scale, next_scale=next_scale, next_zero_point=next_zp,
                                   next_smooth=down.smooth, **kw)
            y = in_autocast_dtype(down.forward_static_codes(codes))  # (down(h) does this itself)
        else:
            y = down(FF.int8_ffn_up(x2, up.weight_q, up.weight_scale, **kw))
        return y.reshape(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        return f"activation={self.activation}, writes_codes={self.writes_codes}"


def is_target(module: nn.Module) -> bool:
    """True for exactly diffusers' FeedForward (False without diffusers)."""
    try:
        return type(module) is _feed_forward_classes()[0]
    except ImportError:  # pragma: no cover - diffusers is optional
        return False


def fuse_reason(module: nn.Module) -> Optional[str]:
    """None when ``module`` is a diffusers FeedForward that FusedFeedForward can take now, else why not
    (also "not a diffusers FeedForward" for anything else)."""
    if not is_target(module):
        return "not a diffusers FeedForward"
    if forward_wrapped(module):
        # FusedFeedForward takes the FeedForward's place: a forward set on the instance would go with it
        # (torch hooks on it are carried over by diffaccel.patch)
        return "its forward is wrapped on the instance (e.g. a diffusers hook), which the fused module would drop"
    return unfused_reason(module)


__all__ = ["FusedFeedForward", "fuse_reason", "is_target", "unfused_reason"]
