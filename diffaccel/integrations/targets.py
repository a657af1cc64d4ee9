"""What `patch` sees in a target: the backbone(s) to patch, the scheduler, what is left alone."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.nn as nn

# every denoiser a pipeline runs per step (Wan 2.2 A14B switches between two experts)
BACKBONE_ATTRS = ("unet", "transformer", "transformer_2", "prior", "decoder")
# what the report calls a left-alone component, by the start of its pipeline attribute name
_COMPONENT_KINDS = (("text_encoder", "text encoder"), ("vae", "VAE"), ("image_encoder", "image encoder"),
                    ("controlnet", "ControlNet"))


def left_alone_reason(name: str) -> str:
    kind = next((k for prefix, k in _COMPONENT_KINDS if name.startswith(prefix)), name)
    return f"{kind} left alone (patch pipe.{name} directly to include it)"


# Input and output layers are the most quantization-sensitive (Q-Diffusion and MixDQ keep them
# in full precision); data-free presets leave them alone. Top-level names: blocks have their own
# proj_in / proj_out. The text-side input projections count too (Flux, SD3, QwenImage).
IO_LAYER_NAMES = ("conv_in", "conv_out", "proj_out", "proj_in", "pos_embed.proj", "norm_out.linear",
                  "proj_out_1", "proj_out_2",  # DiT: the final adaLN modulation and the output layer
                  "patch_embed.proj", "context_embedder", "img_in",
                  # EasyAnimate, ERNIE-Image, CogView3-Plus / ConsisID, Ideogram 4
                  "proj", "text_proj", "text_proj_t5", "final_norm.linear", "final_linear", "patch_embed.text_proj",
                  "input_proj", "llm_cond_proj")
# top-level modules whose every layer is an input/output layer: Z-Image keys its embedders and final
# layer by patch size (all_x_embedder.2-1, all_final_layer.2-1.linear / .adaLN_modulation.1); the
# others are embedders (Flux.3's x_embedders.image, QwenImage 2.1's txt_in MLP, Kandinsky 5's
# *_embeddings.in_layer, GLM-Image's projectors, OmniGen's patch_embedding) and final layers
IO_MODULE_ROOTS = ("all_x_embedder", "all_final_layer", "cap_embedder", "x_embedder", "x_embedders", "txt_in",
                   "final_layer", "context_embedder_2", "visual_embeddings", "text_embeddings",
                   "pooled_text_embeddings", "out_layer", "image_projector", "glyph_projector", "prior_projector",
                   "patch_embedding", "encoder_hid_proj")


# Timestep-embedding MLPs run at M = batch (nothing to gain) and carry the features TFMQ-DM
# found most quantization-sensitive; data-free presets keep them in floating point. (Some
# diffusers code also reads their parameters' dtype, which a fully quantized MLP no longer has.)
TIMESTEP_EMBEDDING_NAMES = ("time_embedding", "time_embedder", "timestep_embedder", "add_embedding",
                            "guidance_embedder", "time_proj", "t_embedder", "time_embed", "time_embeddings",
                            "t_embedding", "time_in", "time_token", "fps_embedding",
                            # AnyFlow's target-time MLP, ACE-Step's second one, Stable Audio 3's
                            "delta_embedder", "time_embed_r", "to_timestep_embed")


@dataclass
class Target:
    backbones: dict  # attribute name ('' for a bare module) -> nn.Module
    scheduler: Optional[object] = None
    left_alone: dict = field(default_factory=dict)  # component name -> reason


def is_pipeline(obj) -> bool:
    """A diffusers pipeline: a classic ``DiffusionPipeline`` or a modular one (``ModularPipeline``,
    built from blocks; its components are attributes too)."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:  # pragma: no cover
        return False
    if isinstance(obj, DiffusionPipeline):
        return True
    try:
        from diffusers.modular_pipelines import ModularPipeline
    except ImportError:  # pragma: no cover - diffusers without modular pipelines
        return False
    return isinstance(obj, ModularPipeline)


def is_scheduler(obj) -> bool:
    return not isinstance(obj, nn.Module) and hasattr(obj, "set_timesteps") and hasattr(obj, "step")


def resolve_target(target) -> Target:
    if is_pipeline(target):
        backbones = {a: getattr(target, a) for a in BACKBONE_ATTRS
                     if isinstance(getattr(target, a, None), nn.Module)}
        if not backbones:
            raise TypeError(f"target: a {type(target).__name__} pipeline with no backbone "
                            f"(looked for {', '.join(BACKBONE_ATTRS)})")
        # every other module the pipeline holds (text encoders, VAE, a ControlNet, ...) is reported
        left = {a: left_alone_reason(a) for a, m in target.components.items()
                if isinstance(m, nn.Module) and a not in backbones}
        return Target(backbones, getattr(target, "scheduler", None), left)
    if isinstance(target, nn.Module):
        return Target({"": target})
    if is_scheduler(target):
        raise TypeError(f"target: {type(target).__name__} is a scheduler; patch it with "
                        f"diffaccel.patch_scheduler(scheduler) (diffaccel.unpatch restores it)")
    raise TypeError(f"target: expected a diffusers pipeline or a torch.nn.Module, got {type(target).__name__}")


def is_io_layer(qualified_name: str) -> bool:
    """The backbone's own input/output layers (top level only: blocks have proj_in/proj_out too),
    also when LoRA loaded before patching wraps one (peft's ``conv_in.base_layer``)."""
    name = _without_lora_wrapper(qualified_name)
    return name in IO_LAYER_NAMES or name.split(".")[0] in IO_MODULE_ROOTS


def _without_lora_wrapper(qualified_name: str) -> str:
    parts = qualified_name.split(".")
    return ".".join(parts[:-1]) if len(parts) > 1 and parts[-1] == "base_layer" else qualified_name


def is_timestep_embedding(qualified_name: str) -> bool:
    return any(part in TIMESTEP_EMBEDDING_NAMES for part in qualified_name.split("."))


def is_lora_branch(qualified_name: str) -> bool:
    """peft's LoRA matrices (lora_A / lora_B / lora_embedding_*): kept in floating point beside the
    quantized ``base_layer`` they adapt."""
    return any(part.startswith("lora_") for part in qualified_name.split("."))


def attention_modules(backbone: nn.Module):
    """(qualified name, module) for every diffusers attention module holding a processor (Mochi's
    has no ``set_processor``: its ``processor`` attribute is set directly)."""
    for name, module in backbone.named_modules():
        if hasattr(module, "set_processor") or (
                callable(getattr(module, "processor", None)) and not isinstance(module.processor, nn.Module)):
            yield name, module
