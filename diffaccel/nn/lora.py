"""LoRA (peft) on diffaccel's quantized layers.

peft builds a LoRA layer around a base layer it recognises; QuantLinear/QuantConv2d are not among
them, so LoRA loaded after a quantizing ``diffaccel.patch`` needs these two layer classes:
``LoraLinear`` and ``LoraConv2d`` are peft's ``lora.Linear`` / ``lora.Conv2d`` (same forward, same
adapter bookkeeping: several adapters, ``set_adapters`` weights, disable/enable, delete) whose base
layer may be quantized. The forward is peft's: ``y = base(x) + scaling * B(A(dropout(x)))``, so the
LoRA branch runs in floating point beside the low-bit GEMM. Merging (``fuse_lora``) into a
quantized base is refused: a float delta cannot be folded into low-bit codes. With a float base
(after ``diffaccel.unpatch``) both classes behave exactly like peft's.

How peft finds them: ``install_peft_dispatch()`` puts ``dispatch_quantized`` in front of peft's
``dispatch_default`` (the last dispatcher ``LoraModel._create_new_module`` tries). The wrapper
returns a layer only when the target's base is a QuantLinear/QuantConv2d and otherwise calls
peft's function unchanged, so models without diffaccel layers see no difference; per-config
mappings (``LoraConfig._register_custom_module``) still take precedence, and installing twice is a
no-op. ``register_lora_layers(config)`` registers the same classes on one LoraConfig instead.
It also puts ``check_fusable`` in front of ``LoraModel._check_merge_allowed``, the check peft runs
before ``merge_adapter`` / ``merge_and_unload`` touch any layer, so those refuse before merging
anything when a LoRA layer sits on a quantized base (``unload()`` without merging still works).

Importing this module needs peft.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch.nn.functional as F
from peft.tuners.lora import layer as _peft_layer
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ._base import quantized_layer_of
from .quant_conv import QuantConv2d
from .quant_linear import QuantLinear

_INSTALLED_MARK = "_diffaccel_quantized_dispatch"
# init schemes that only shape A and B; the others (PiSSA, OLoRA, CorDA, LoftQ, ...) factorise the
# base weight, which a quantized layer only has as codes
_PLAIN_INITS = (True, False, "gaussian")

FUSE_REFUSED = ("cannot merge LoRA into diffaccel's quantized layers: a float delta cannot be folded into low-bit "
                "weight codes. Keep the LoRA unfused (it runs in floating point beside the quantized GEMM), or "
                "call diffaccel.unpatch(...), fuse the LoRA, then diffaccel.patch(...) again")


def _quantized(module: nn.Module) -> bool:
    return quantized_layer_of(module) is not None


# how users know the variants peft's LoraConfig fields switch on
_VARIANT_NAMES = {"use_dora": "DoRA", "alora_invocation_tokens": "aLoRA", "velora_config": "VeLoRA",
                  "use_bdlora": "BD-LoRA", "arrow_config": "Arrow", "kasa_config": "KaSA",
                  "monteclora_config": "MonteCLoRA"}


def _plain_init(init) -> bool:
    return any(init is v or (isinstance(init, str) and init == v) for v in _PLAIN_INITS)


def _needs_base_weight(config) -> list:
    """What in a peft LoraConfig reads the base layer's float weight: a LoRA variant (peft marks
    their fields ``is_lora_variant``: DoRA, VeLoRA, aLoRA, ...) or an init that factorises it."""
    found = [f"{_VARIANT_NAMES.get(f.name, 'a LoRA variant')} ({f.name}={getattr(config, f.name)!r})"
             for f in dataclasses.fields(config) if f.metadata.get("is_lora_variant") and getattr(config, f.name)]
    if not _plain_init(getattr(config, "init_lora_weights", True)):
        found.append(f"init_lora_weights={config.init_lora_weights!r}")
    return found


def check_adapter_config(model: nn.Module, config) -> None:
    """Refuse, before peft wraps any layer, a LoRA config that targets a quantized layer and would
    need its float weight. peft injects layer by layer, so the per-layer refusal would come after
    the float layers before it were already wrapped (and diffusers had marked the model as holding
    adapters), leaving a half-added adapter behind."""
    from peft.tuners.tuners_utils import check_target_module_exists

    needs = _needs_base_weight(config)
    if not needs or not hasattr(config, "target_modules"):
        return
    for name, module in model.named_modules():
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if name.endswith("base_layer") or not _quantized(base) or not check_target_module_exists(config, name):
            continue
        raise ValueError(f"adapter_config: {', '.join(needs)} needs the float weight of {name}, which a diffaccel "
                         f"{type(base).__name__} only holds as low-bit codes; nothing was added. Use plain LoRA, "
                         f"leave the quantized layers out of target_modules, or diffaccel.unpatch first")


class _QuantizedBaseSupport:
    """What differs from peft's layer when the base layer is a QuantLinear/QuantConv2d."""

    def _get_in_out_features(self, module: nn.Module):
        quantized = quantized_layer_of(module)
        if isinstance(quantized, QuantLinear):
            return quantized.in_features, quantized.out_features
        if isinstance(quantized, QuantConv2d):
            return quantized.in_channels, quantized.out_channels
        return super()._get_in_out_features(module)

    def _get_base_layer_device_and_dtype(self, base_layer):
        # peft reads `weight`; a quantized layer's compute dtype is its output dtype
        quantized = quantized_layer_of(base_layer)
        if quantized is not None:
            return quantized.weight_q.device, quantized.original_dtype
        return super()._get_base_layer_device_and_dtype(base_layer)

    def _check_adapter_config(self, config) -> None:
        base = self.get_base_layer()
        if not _quantized(base):
            return
        init = config.init_lora_weights
        if not _plain_init(init):
            raise ValueError(f"config: init_lora_weights={init!r} reads the base weight, which a diffaccel "
                             f"{type(base).__name__} only holds as low-bit codes; use True, False or 'gaussian'")

    def resolve_lora_variant(self, *, config, **kwargs):
        variant = super().resolve_lora_variant(config=config, **kwargs)
        base = self.get_base_layer()
        if variant is not None and _quantized(base):
            raise ValueError(f"config: the LoRA variant {type(variant).__name__} (e.g. DoRA) needs the base weight, "
                             f"which a diffaccel {type(base).__name__} only holds as low-bit codes")
        return variant

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list] = None) -> None:
        if _quantized(self.get_base_layer()):
            raise RuntimeError(f"fuse_lora: {FUSE_REFUSED}")
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def get_delta_weight(self, adapter):
        if _quantized(self.get_base_layer()):
            raise RuntimeError(f"get_delta_weight: {FUSE_REFUSED}")
        return super().get_delta_weight(adapter)


class LoraLinear(_QuantizedBaseSupport, _peft_layer.Linear):
    """peft's lora.Linear over a base layer that may be a diffaccel QuantLinear."""

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        self._check_adapter_config(config)
        return super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)


class LoraConv2d(_QuantizedBaseSupport, _peft_layer.Conv2d):
    """peft's lora.Conv2d over a base layer that may be a diffaccel QuantConv2d."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
        # peft's _ConvNd.__init__ reads base_layer.weight and .groups, which QuantConv2d lacks
        # (its weight is codes, its conv is ungrouped); this sets the same state
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        if kwargs.get("use_alora", False):
            raise ValueError("aLoRA does not support adapting conv layers.")
        if config.velora_config is not None:
            raise ValueError("VeLoRA does not support adapting conv layers.")
        base = self.get_base_layer()
        groups = getattr(base, "groups", 1)
        if r % groups != 0:
            raise ValueError(f"r: {r} must be divisible by the conv's groups={groups}")
        self._active_adapter = adapter_name
        self._kernel_dim = 4
        self.conv_fn = F.conv2d
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        base = self.get_base_layer()
        if not isinstance(base, QuantConv2d):
            return super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        # peft's _ConvNd.update_layer for the plain-LoRA case; it builds A and B with type(base_layer)
        self._check_adapter_config(config)
        if r <= 0:
            raise ValueError(f"r: expected a positive integer, got {r}")
        self.resolve_lora_variant(config=config)  # raises for variants (they read the base weight)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0.0 \
            else nn.Identity()
        self.lora_A[adapter_name] = nn.Conv2d(self.in_features, r, base.kernel_size, base.stride, base.padding,
                                              bias=False)
        self.lora_B[adapter_name] = nn.Conv2d(r, self.out_features, (1, 1), (1, 1), bias=config.lora_bias)
        self.lora_bias[adapter_name] = config.lora_bias
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = config.use_dora
        if config.init_lora_weights:
            self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)


# peft's own classes and the diffaccel subclass that accepts a quantized base (no extra state)
LORA_CLASS_FOR_PEFT_CLASS = {_peft_layer.Linear: LoraLinear, _peft_layer.Conv2d: LoraConv2d}


def dispatch_quantized(target: nn.Module, adapter_name: str, config, parameter_name: Optional[str] = None,
                       **kwargs) -> Optional[nn.Module]:
    """A peft LoRA dispatcher: a LoraLinear/LoraConv2d around a QuantLinear/QuantConv2d, else None."""
    if parameter_name is not None:
        return None
    base = quantized_layer_of(target.get_base_layer() if isinstance(target, BaseTunerLayer) else target)
    if isinstance(base, QuantLinear):
        if config.fan_in_fan_out:
            raise ValueError("config: fan_in_fan_out=True does not apply to a QuantLinear (an nn.Linear layout)")
        return LoraLinear(target, adapter_name, config=config, **kwargs)
    if isinstance(base, QuantConv2d):
        return LoraConv2d(target, adapter_name, config=config, **kwargs)
    return None


def install_peft_dispatch() -> None:
    """Let peft build LoRA layers around QuantLinear/QuantConv2d (idempotent; see the module docstring)."""
    from peft.tuners.lora import model as lora_model

    peft_default = lora_model.dispatch_default
    if getattr(peft_default, _INSTALLED_MARK, False):
        return

    def dispatch_default(target, adapter_name, config, **kwargs):
        new_module = dispatch_quantized(target, adapter_name, config, **kwargs)
        if new_module is not None:
            return new_module
        return peft_default(target, adapter_name, config=config, **kwargs)

    dispatch_default.__wrapped__ = peft_default
    dispatch_default.__doc__ = "diffaccel.nn.lora.dispatch_quantized, then peft's dispatch_default."
    setattr(dispatch_default, _INSTALLED_MARK, True)
    lora_model.dispatch_default = dispatch_default

    # peft merges layer by layer: without this check merge_and_unload would merge and unload the
    # float layers it meets before the first quantized one raises
    peft_check = lora_model.LoraModel._check_merge_allowed

    def _check_merge_allowed(self):
        check_fusable(self.model, "merge")
        peft_check(self)

    _check_merge_allowed.__wrapped__ = peft_check
    _check_merge_allowed.__doc__ = "diffaccel.nn.lora.check_fusable, then peft's _check_merge_allowed."
    lora_model.LoraModel._check_merge_allowed = _check_merge_allowed


def register_lora_layers(config) -> None:
    """Register LoraLinear/LoraConv2d for QuantLinear/QuantConv2d on one peft LoraConfig (peft's
    per-config custom-module mechanism), without ``install_peft_dispatch``."""
    config._register_custom_module({QuantLinear: LoraLinear, QuantConv2d: LoraConv2d})


def lora_layers_on_quantized_base(model: nn.Module) -> list:
    """Qualified names of peft LoRA layers whose base layer is a diffaccel quantized layer."""
    return [name for name, m in model.named_modules()
            if isinstance(m, BaseTunerLayer) and _quantized(m.get_base_layer())]


def check_fusable(model: nn.Module, what: str = "fuse_lora") -> None:
    """Raise (before anything is merged) if fusing LoRA into ``model`` would hit a quantized layer;
    ``what`` names the call in the message."""
    names = lora_layers_on_quantized_base(model)
    if names:
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        raise RuntimeError(f"{what}: {names[0]}{more}: {FUSE_REFUSED}")


__all__ = ["LoraLinear", "LoraConv2d", "dispatch_quantized", "install_peft_dispatch", "register_lora_layers",
           "lora_layers_on_quantized_base", "check_fusable", "check_adapter_config", "FUSE_REFUSED", "LORA_CLASS_FOR_PEFT_CLASS"]
