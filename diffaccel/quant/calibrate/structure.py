"""What a calibration method needs to know about a backbone's structure: its quantizable layers,
its reconstruction blocks, its temporal information block, its cross-attention (text) inputs and
its content (cross-attention / feed-forward) layers. Works on diffusers UNet2DConditionModel and
DiT-style transformers (PixArt, SD3, DiT); unknown models fall back to generic rules."""
from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

# Top-level input/output layers kept in floating point by default (Q-Diffusion and its successors
# leave the first and last layer unquantized: they are tiny and very sensitive).
BLOCK_CLASSES = ("ResnetBlock2D", "Transformer2DModel", "BasicTransformerBlock", "JointTransformerBlock",
                 "FluxTransformerBlock", "FluxSingleTransformerBlock", "Downsample2D", "Upsample2D",
                 "DiTBlock", "SD3SingleTransformerBlock")


_WEIGHT_READ = re.compile(r"\bself((?:\.\w+|\[\d+\])+?)\.weight\b")
_PARAMETERS_READ = re.compile(r"\bself((?:\.\w+|\[\d+\])+?)\.parameters\(\)")
# diffusers' get_parameter_dtype(module): the first floating parameter or buffer, a quantized layer's fp8 codes
_PARAMETER_DTYPE_READ = re.compile(r"\bget_parameter_dtype\(\s*self((?:\.\w+|\[\d+\])+?)\s*\)")


def _paths(pattern, source) -> frozenset:
    return frozenset(tuple(a or b for a, b in re.findall(r"\.(\w+)|\[(\d+)\]", path))
                     for path in pattern.findall(source))


@functools.lru_cache(maxsize=None)
def _weights_read_by_forward(cls: type) -> frozenset:
    """Paths (as qualified-name parts) of the submodules whose ``.weight`` ``cls.forward`` reads
    itself, e.g. HunyuanDiT's attention pool handing ``self.q_proj.weight`` to
    ``F.multi_head_attention_forward``, or ``self.mlp[0].weight.dtype``."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return frozenset()
    return _paths(_WEIGHT_READ, source)


@functools.lru_cache(maxsize=None)
def _parameters_read_by_forward(cls: type) -> frozenset:
    """Paths of the submodules whose ``.parameters()`` ``cls.forward`` reads, e.g. Wan's
    ``next(iter(self.time_embedder.parameters())).dtype``, or SkyReels-V2's
    ``get_parameter_dtype(self.time_embedder)``: a module whose every layer is quantized has no
    float parameter left (diffusers' helper then returns the fp8 codes' dtype, and the timestep is
    cast to it), so the layers under such a path keep their float weights. Read in ``forward`` and
    in the class's own other methods but ``__init__`` (AnyFlow reads them in ``forward_timestep``)."""
    methods = [cls.forward] + [f for name, f in vars(cls).items()
                               if inspect.isfunction(f) and name not in ("forward", "__init__")]
    paths = frozenset()
    for method in methods:
        try:
            source = inspect.getsource(method)
        except (OSError, TypeError):
            continue
        paths |= _paths(_PARAMETERS_READ, source) | _paths(_PARAMETER_DTYPE_READ, source)
    return paths


def weight_read_reason(backbone: nn.Module, qualified_name: str, levels: int = 3) -> Optional[str]:
    """Why the layer ``qualified_name`` must keep its float ``weight``: a module up to ``levels``
    above it reads that weight, or the parameters of a module holding it, in its own forward (a
    quantized layer has none). None if none does."""
    parts = qualified_name.split(".")
    for up in range(1, min(levels, len(parts)) + 1):
        owner_name = ".".join(parts[:-up])
        owner = backbone.get_submodule(owner_name) if owner_name else backbone
        below = tuple(parts[-up:])
        if below in _weights_read_by_forward(type(owner)):
            return f"{type(owner).__name__}.forward reads its weight directly; kept in floating point"
        held_by = next((p for p in _parameters_read_by_forward(type(owner)) if below[:len(p)] == p), None)
        if held_by is not None:
            return (f"{type(owner).__name__} reads the parameters of {'.'.join(held_by)} itself (their dtype); "
                    f"kept in floating point")
    return None


def quantizable_layers(backbone: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear / nn.Conv2d, by qualified name (module order), but those whose weight a
    module above them reads itself (they never run as layers, and a quantized one has no weight)."""
    return {n: m for n, m in backbone.named_modules()
            if type(m) in (nn.Linear, nn.Conv2d) and weight_read_reason(backbone, n) is None}


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A Linear / Conv2d call's input, passed positionally or by torch's name for it (AnimateDiff's
    motion modules call ``proj_in(input=...)``); hooks reading it are registered with_kwargs."""
    return args[0] if args else kwargs["input"]


def layer_kind(module: nn.Module) -> str:
    return "conv2d" if isinstance(module, nn.Conv2d) else "linear"


@dataclass
class TemporalInfo:
    """The Temporal Information Block (TFMQ-DM): modules whose output depends only on the timestep
    (and, for SD3/Flux, the pooled text). ``cacheable`` when it depends on t alone."""
    embed: str | None                     # the timestep MLP (UNet time_embedding, PixArt adaln_single)
    projections: list[str] = field(default_factory=list)   # per-block projections of the embedding
    layers: list[str] = field(default_factory=list)        # every Linear inside the block
    cacheable: bool = False
    why_not_cacheable: str | None = None


def temporal_info(backbone: nn.Module) -> TemporalInfo:
    names = dict(backbone.named_modules())
    if "time_embedding" in names and hasattr(backbone, "time_proj"):  # UNet2DConditionModel
        projections = [n for n in names if n.endswith(".time_emb_proj") and isinstance(names[n], nn.Linear)]
        reasons = []
        if getattr(backbone, "class_embedding", None) is not None:
            reasons.append("class_embedding is added to the time embedding")
        if getattr(backbone, "add_embedding", None) is not None:
            reasons.append("an added (text/time) embedding is added to the time embedding")
        if getattr(backbone.time_embedding, "cond_proj", None) is not None:
            reasons.append("time_embedding takes a timestep_cond")
        layers = [n for n in names if n.startswith("time_embedding.") and isinstance(names[n], nn.Linear)]
        if reasons and (getattr(backbone, "class_embedding", None) is not None
                        or getattr(backbone, "add_embedding", None) is not None):
            projections = []  # their input mixes in non-temporal embeddings: they stay with their blocks
        return TemporalInfo("time_embedding", projections, layers + projections, not reasons,
                            "; ".join(reasons) or None)
    if "adaln_single" in names:  # PixArt: adaLN-single depends on t (and resolution/aspect conditions)
        layers = [n for n in names if n.startswith("adaln_single.") and isinstance(names[n], nn.Linear)]
        extra = getattr(backbone.adaln_single, "use_additional_conditions", False)
        return TemporalInfo("adaln_single", [], layers, not extra,
                            "adaln_single also embeds resolution/aspect ratio" if extra else None)
    if "time_text_embed" in names:  # SD3 / Flux: the embedding also sees the pooled text
        projections = [n for n, m in names.items() if isinstance(m, nn.Linear)
                       and (n.endswith("norm1.linear") or n.endswith("norm1_context.linear")
                            or n.endswith("norm.linear") or n == "norm_out.linear")]
        layers = [n for n in names if n.startswith("time_text_embed.") and isinstance(names[n], nn.Linear)]
        return TemporalInfo("time_text_embed", projections, layers + projections, False,
                            "the temporal features depend on the pooled text, not only on t")
    return TemporalInfo(None, [], [], False, "no timestep embedding module recognised")


def blocks(backbone: nn.Module) -> list[str]:
    """Reconstruction units (BRECQ blocks): ResNet blocks, transformer blocks (a UNet's whole
    Transformer2DModel, a DiT's per-layer blocks), resamplers; outermost match wins."""
    found: list[str] = []
    for name, module in backbone.named_modules():
        if not name or type(module).__name__ not in BLOCK_CLASSES:
            continue
        if any(name.startswith(b + ".") for b in found):
            continue
        found.append(name)
    return found


def cross_attention_kv_layers(backbone: nn.Module) -> list[str]:
    """to_k / to_v of cross-attention: the layers that consume the text encoder's tokens (a peft
    LoRA wrapper's ``base_layer`` where a LoRA adapts them)."""
    out = []
    for name, module in backbone.named_modules():
        if getattr(module, "is_cross_attention", False) and type(module).__name__ == "Attention":
            for proj in ("to_k", "to_v"):
                layer = getattr(module, proj, None)
                if isinstance(layer, nn.Linear):
                    out.append(f"{name}.{proj}")
                elif isinstance(getattr(layer, "base_layer", None), nn.Linear):
                    out.append(f"{name}.{proj}.base_layer")
    return out


def is_content_layer(name: str) -> bool:
    """MixDQ's content layers: cross-attention and feed-forward (they shape what is drawn)."""
    parts = name.split(".")
    return "attn2" in parts or "ff" in parts or "ff_context" in parts


def concat_split_candidates(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """Up-path blocks whose resnets consume cat(h, skip) along channels (diffusers' up blocks
    take ``res_hidden_states_tuple``)."""
    import inspect

    out = []
    for name, module in backbone.named_modules():
        if hasattr(module, "resnets") and "res_hidden_states_tuple" in inspect.signature(module.forward).parameters:
            out.append((name, module))
    return out


def split_layers_for_resnet(resnet: nn.Module, first_channels: int) -> list[str]:
    """Which convs of a ResnetBlock2D fed by cat(h[:C1], skip) see the two sources in separate
    input channels: conv_shortcut sees the raw concat; conv1 sees silu(GroupNorm(concat)), whose
    channel halves keep their own ranges only if no norm group straddles the boundary."""
    out = []
    if isinstance(getattr(resnet, "conv_shortcut", None), nn.Conv2d):
        out.append("conv_shortcut")
    norm = getattr(resnet, "norm1", None)
    if isinstance(norm, nn.GroupNorm) and isinstance(getattr(resnet, "conv1", None), nn.Conv2d) \
            and getattr(resnet, "upsample", None) is None and getattr(resnet, "downsample", None) is None:
        per_group = norm.num_channels // norm.num_groups
        if first_channels % per_group == 0:
            out.append("conv1")
    return out


def output_tensors(out) -> list[torch.Tensor]:
    """Every tensor a block returns (joint blocks return image and text streams; None skipped)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in output_tensors(o)]
    return []


def output_tensors(out) -> list[torch.Tensor]:
    """Every tensor a backbone call returns, the main one first (Kandinsky 6 and MiniMax-H3 return
    video and audio; a dataclass's fields, a tuple's entries)."""
    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else [first_tensor(out)]
    return [t for t in items if isinstance(t, torch.Tensor)] or [first_tensor(out)]


def first_tensor(out) -> torch.Tensor:
    """The main output of a backbone / block call (diffusers returns dataclasses or tuples)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")
