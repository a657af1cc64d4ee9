"""Pieces every method shares: argument checks, which layers get which spec, split points of the
UNet's concat inputs, the BOS token, and assembling the recipe."""
from __future__ import annotations

import logging
import math
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import nn

from ..recipe import LayerRecipe, QuantRecipe, matches_bos
from .collect import CalibrationError, CalibrationSet, Observations, forward
from .fakequant import act_params_from_range, search_act_range, weight_grid
from .structure import (concat_split_candidates, layer_input, layer_kind, quantizable_layers,
                        split_layers_for_resnet)

logger = logging.getLogger("diffaccel")
SUPPORTED_WEIGHT_BITS = (4, 8)
SUPPORTED_ACT_BITS = (8, 16)
# number format -> (weight dtype per bit width, activation dtype at 8 bits)
NUMBER_FORMATS = {"int": ({8: "int8", 4: "int4"}, "int8"),
                  "fp8": ({8: "fp8_e4m3"}, "fp8_e4m3")}


def weight_dtype_for(weight_bits: int, number_format: str = "int") -> str:
    return NUMBER_FORMATS[number_format][0][weight_bits]


def act_dtype_for(number_format: str = "int") -> str:
    return NUMBER_FORMATS[number_format][1]


def make_spec(weight_bits: int, act_bits: int, act_symmetric: bool, number_format: str = "int"):
    from ..formats import QuantSpec

    weight_dtype = weight_dtype_for(weight_bits, number_format)
    if act_bits == 16:
        return QuantSpec(weight_dtype=weight_dtype, act_dtype=None, act_mode="dynamic")
    return QuantSpec(weight_dtype=weight_dtype, act_dtype=act_dtype_for(number_format), act_mode="static",
                     act_symmetric=act_symmetric)


def check_format(number_format, act_symmetric, weight_bits, method: str) -> bool:
    """-> act_symmetric resolved (None: asymmetric int8, symmetric fp8)."""
    if number_format not in NUMBER_FORMATS:
        raise CalibrationError(f"format: expected one of {tuple(NUMBER_FORMATS)}, got {number_format!r}")
    if act_symmetric is not None and not isinstance(act_symmetric, bool):
        raise CalibrationError(f"act_symmetric: expected a bool or None, got {act_symmetric!r}")
    if number_format == "fp8":
        if act_symmetric is False:
            raise CalibrationError("act_symmetric: fp8 (E4M3) activations are symmetric; leave act_symmetric=None "
                                   "or set it True")
        if weight_bits != 8:
            raise CalibrationError(f"weight_bits: format='fp8' stores FP8 E4M3 weights (8 bits), got {weight_bits}"
                                   + (" (mixdq's average: its only candidate is 8)" if method == "mixdq" else ""))
        return True
    return bool(act_symmetric)


def check_bits(method: str, weight_bits, act_bits) -> None:
    def number(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise CalibrationError(f"{name}: expected a number, got {v!r}")

    number("weight_bits", weight_bits)
    number("act_bits", act_bits)
    if method == "mixdq":  # targets of the mixed-precision allocation (averages)
        if not min(SUPPORTED_WEIGHT_BITS) <= weight_bits <= max(SUPPORTED_WEIGHT_BITS):
            raise CalibrationError(f"weight_bits: mixdq's average weight bit-width must lie in "
                                   f"[{min(SUPPORTED_WEIGHT_BITS)}, {max(SUPPORTED_WEIGHT_BITS)}] (the kernels "
                                   f"run {SUPPORTED_WEIGHT_BITS}-bit weights), got {weight_bits}")
        if not min(SUPPORTED_ACT_BITS) <= act_bits <= max(SUPPORTED_ACT_BITS):
            raise CalibrationError(f"act_bits: mixdq's average activation bit-width must lie in "
                                   f"[8, 16], got {act_bits}")
        return
    if weight_bits not in SUPPORTED_WEIGHT_BITS:
        raise CalibrationError(f"weight_bits: the kernels run {SUPPORTED_WEIGHT_BITS}-bit integer weights, "
                               f"got {weight_bits}")
    if act_bits not in SUPPORTED_ACT_BITS:
        raise CalibrationError(f"act_bits: expected 8 (static INT8) or 16 (weight-only), got {act_bits}")


@dataclass
class Plan:
    """The layers to calibrate (name -> module of the working backbone) and the rest with reasons."""
    layers: dict[str, nn.Module]
    skipped: dict[str, str]
    model_layers: dict[str, tuple]
    split_points: dict[str, int] = field(default_factory=dict)


def plan_layers(backbone: nn.Module, *, weight_bits_options, act_symmetric: bool, skip, exclude=(),
                number_format: str = "int", not_run=()) -> Plan:
    """Every Linear/Conv2d minus the input/output layers (``skip``) and those the kernels can't take
    at any of the candidate weight widths."""
    from ... import nn as dnn
    from ...integrations.targets import is_io_layer, is_lora_branch

    all_layers = quantizable_layers(backbone)
    layers, skipped = {}, {}
    for name, module in all_layers.items():
        if name in skip:  # (the default skip is the input/output layers; a skip= given replaces it)
            skipped[name] = ("input/output layer kept in floating point" if is_io_layer(name)
                             else "in skip=; kept in floating point")
            continue
        if name in not_run:
            skipped[name] = "never ran on the calibration data (no input to calibrate on); kept in floating point"
            continue
        if is_lora_branch(name):  # (peft reads lora_A/B's weight dtype; the presets keep them float too)
            skipped[name] = "LoRA branch kept in floating point"
            continue
        if name in exclude:
            skipped[name] = exclude[name] if isinstance(exclude, dict) else "excluded"
            continue
        reason = None
        for wb in weight_bits_options:
            reason = dnn.quantize_reason(module, make_spec(wb, 8, act_symmetric, number_format)) or reason
        if reason is not None:
            skipped[name] = reason
            continue
        layers[name] = module
    return Plan(layers, skipped, {n: tuple(m.weight.shape) for n, m in all_layers.items()})


def resolve_skip(backbone: nn.Module, skip) -> tuple[str, ...]:
    from ...integrations.targets import is_io_layer

    names = dict(backbone.named_modules())
    if skip is None:  # the input/output layers the presets keep in floating point too
        return tuple(n for n in quantizable_layers(backbone) if is_io_layer(n))
    if isinstance(skip, str):
        raise CalibrationError("skip: expected a list of layer names, got a single string")
    try:
        skip = list(skip)
    except TypeError:
        raise CalibrationError(f"skip: expected a list of layer names, got {type(skip).__name__}") from None
    odd = next((n for n in skip if not isinstance(n, str)), None)
    if odd is not None:
        raise CalibrationError(f"skip: expected layer names (str), got {odd!r}")
    unknown = [n for n in skip if n not in names]
    if unknown:
        raise CalibrationError(f"skip: {unknown[0]!r} is not a module of the backbone")
    return tuple(skip)


def find_split_points(backbone: nn.Module, sample: dict, device, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Layers fed by cat(h, skip) in the up path -> C1 (channels of h), read from one forward pass."""
    points: dict[str, int] = {}
    # hooks are context managers: the stack removes every one registered, even if a later one fails
    with ExitStack() as hooks, torch.no_grad():
        for block_name, block in concat_split_candidates(backbone):
            def hook(module, args, kwargs, block_name=block_name):
                res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
                if res is None:
                    return
                res = list(res)
                for j, resnet in enumerate(module.resnets):
                    if not res:
                        break
                    skip_channels = res.pop().shape[1]
                    conv1 = getattr(resnet, "conv1", None)  # (DreamLite's is a depthwise-separable pair)
                    in_channels = conv1.in_channels if isinstance(conv1, nn.Conv2d) else None
                    if in_channels is None or in_channels <= skip_channels:
                        continue
                    first = in_channels - skip_channels
                    for layer in split_layers_for_resnet(resnet, first):
                        points[f"{block_name}.resnets.{j}.{layer}"] = first
            hooks.enter_context(block.register_forward_pre_hook(hook, with_kwargs=True))
        forward(backbone, sample, device, dtype)
    return points


def weight_init(module: nn.Module, weight_dtype: str, *, search: bool, p: float):
    """-> (grid, per-channel scale [O]): absmax, or the Lp clip-ratio search."""
    from .fakequant import search_weight_scale, weight_absmax_scale

    grid = weight_grid(weight_dtype)
    if search:
        return grid, search_weight_scale(module.weight, grid, p=p)
    return grid, weight_absmax_scale(module.weight, grid)


def act_init(obs: Observations, name: str, *, per_timestep: bool, symmetric: bool, search: bool, p: float,
             act_dtype: str = "int8"):
    """Static activation params [T] / [T, 2] (per timestep) or [1] / [1, 2] (pooled over timesteps)."""
    o = obs.layers[name]
    split = o.lo.dim() == 2
    halves = 2 if split else 1
    T = o.lo.shape[0]
    rows = range(T) if per_timestep else [None]
    scales, zps = [], []
    for t in rows:
        row_s, row_z = [], []
        for h in range(halves):
            sel = (slice(None) if t is None else t,) + ((h,) if split else ())
            lo, hi = o.lo[sel].min(), o.hi[sel].max()
            if not (torch.isfinite(lo) and torch.isfinite(hi)):
                raise CalibrationError(f"activations: layer '{name}' saw no input at timestep index {t}")
            if search:
                vals, weights = (torch.cat(parts) for parts in
                                 zip(*(o.sample_of(tt, h) for tt in (range(T) if t is None else [t]))))
                s, z = search_act_range(vals, lo, hi, symmetric, p=p, act_dtype=act_dtype, weights=weights)
            else:
                s, z = act_params_from_range(lo, hi, symmetric, act_dtype)
            row_s.append(s.reshape(()))
            row_z.append(z.reshape(()))
        scales.append(torch.stack(row_s) if split else row_s[0])
        zps.append(torch.stack(row_z) if split else row_z[0])
    return torch.stack(scales).float(), torch.stack(zps).to(torch.int32)


@dataclass
class BOSSource:
    """Where the calibration set shows CLIP's BOS token: a sample and a batch row whose token 0 it is."""
    sample: int
    row: int


def detect_bos(calib: CalibrationSet) -> BOSSource | None:
    """The first text token shared by every sample's encoder_hidden_states rows, where there is one
    (CLIP's BOS output); rows whose token 0 is all zeros (SDXL's zeroed negative prompt) are
    allowed beside it. None for T5-style conditioning, whose first token depends on the prompt."""
    found, bos = None, None
    for i, s in enumerate(calib.samples):
        ehs = s.get("encoder_hidden_states")
        if not isinstance(ehs, torch.Tensor) or ehs.dim() != 3 or ehs.shape[1] < 2:
            return None
        for row, first in enumerate(ehs[:, 0]):
            if not bool(first.any()):
                continue
            if bos is None:
                found, bos = BOSSource(i, row), first
            elif not bool(matches_bos(first[None], bos)[0]):
                return None
    return found


def bos_io(backbone: nn.Module, calib: CalibrationSet, layers: list[str], device,
           source: BOSSource) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's full-precision (input, output) for the BOS token, recorded in one forward pass."""
    modules = dict(backbone.named_modules())
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def fn(module, args, kwargs, result):
            if name not in out:
                x = layer_input(args, kwargs)
                # (cloned: a row of an fp32 CPU input is otherwise a view into the calibration data)
                out[name] = (x[source.row, 0].detach().float().cpu().clone(),
                             result[source.row, 0].detach().float().cpu().clone())
        return fn

    with ExitStack() as hooks, torch.no_grad():
        for n in layers:
            hooks.enter_context(modules[n].register_forward_hook(hook(n), with_kwargs=True))
        forward(backbone, calib.samples[source.sample], device, calib.dtype)
    return out


def layer_recipe(module: nn.Module, spec, *, weight_scale=None, weight_q=None, act_scale=None,
                 act_zero_point=None, act_split=None, bos_output=None, bos_input=None) -> LayerRecipe:
    if spec.act_dtype is None:
        act_scale = act_zero_point = act_split = None
    return LayerRecipe(kind=layer_kind(module), weight_shape=tuple(module.weight.shape), spec=spec.to_dict(),
                       weight_scale=None if weight_scale is None else weight_scale.float().cpu(),
                       weight_q=None if weight_q is None else _codes(weight_q).cpu().reshape(
                           module.weight.shape[0], -1),
                       act_scale=act_scale, act_zero_point=act_zero_point, act_split=act_split,
                       bos_output=bos_output, bos_input=bos_input)


def _codes(weight_q: torch.Tensor) -> torch.Tensor:
    # fp8 codes keep their dtype; integer codes are stored as int8
    return weight_q if weight_q.dtype == torch.float8_e4m3fn else weight_q.to(torch.int8)


def log_allocation(recipe: QuantRecipe) -> None:
    counts: dict[tuple[int, int], int] = {}
    for name, lr in recipe.layers.items():
        counts[(lr.weight_bits, lr.act_bits)] = counts.get((lr.weight_bits, lr.act_bits), 0) + 1
        logger.debug("calibration[%s]: %s -> W%dA%d", recipe.method, name, lr.weight_bits, lr.act_bits)
    summary = ", ".join(f"W{w}A{a}: {n}" for (w, a), n in sorted(counts.items()))
    logger.info("calibration[%s]: bit allocation %s (average weight bits %.2f); %d layers in floating point",
                recipe.method, summary, recipe.average_weight_bits(), len(recipe.skipped))
