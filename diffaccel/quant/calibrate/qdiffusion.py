"""Q-Diffusion (Li et al., ICCV 2023): time-step-aware calibration data (uniformly spread over the
sampling trajectory, see collect.spread_indices), Lp clip-ratio search for weight scales (p = 2.4),
BRECQ block reconstruction with AdaRound learned rounding and LSQ-learned activation step sizes,
and split quantization of the concat (h, skip) inputs of the UNet's up-path ResNet blocks.

Blocks are reconstructed independently from their full-precision inputs and outputs (BRECQ's
"FP input" variant: one pass collects them all). Attention matmuls (QK^T, PV) are quantized by the
attention kernel (``attention(..., quant="int8")``), not calibrated here.
"""
from __future__ import annotations

from torch import nn

from ..recipe import QuantRecipe
from .collect import observe, progress_bar
from .common import (act_init, find_split_points, layer_recipe, make_spec, plan_layers, weight_init)
from .reconstruct import LayerInit, reconstruct
from .structure import blocks as find_blocks


class _LayerUnit(nn.Module):
    """A single layer as a reconstruction unit (layers outside any block)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def units_for(backbone: nn.Module, layer_names, exclude_blocks=()) -> dict[str, list[str]]:
    """Reconstruction unit (block name or a lone layer's name) -> its planned layers."""
    units: dict[str, list[str]] = {}
    block_names = [b for b in find_blocks(backbone) if b not in exclude_blocks]
    for name in layer_names:
        owner = next((b for b in block_names if name.startswith(b + ".")), name)
        units.setdefault(owner, []).append(name)
    return units


def brecq(ctx, plan, *, per_timestep: bool, extra_units: dict | None = None, method: str) -> dict:
    """Initial scales + block reconstruction of every planned layer; -> {name: LayerRecipe}."""
    spec = make_spec(ctx.weight_bits, ctx.act_bits, ctx.act_symmetric)
    quant_act = spec.act_dtype is not None
    separate = {n for u in (extra_units or {}).values() for n in u[2].values()}
    units = units_for(ctx.backbone, [n for n in plan.layers if n not in separate])
    # all units' inputs/outputs in one pass, or ``units_per_pass`` at a time (bounded memory, one
    # more full-precision pass over the calibration set per group)
    per_pass = ctx.units_per_pass or max(len(units), 1)
    unit_groups = [list(units)[i:i + per_pass] for i in range(0, len(units), per_pass)] or [[]]
    obs = observe(ctx.backbone, ctx.calib, layers=list(plan.layers) if quant_act else [], device=ctx.device,
                  split_points=plan.split_points if quant_act else {}, capture_blocks=tuple(unit_groups[0]),
                  seed=ctx.seed, progress=ctx.progress, storage=ctx.activation_device)
    modules = dict(ctx.backbone.named_modules())
    inits: dict[str, LayerInit] = {}
    for name, module in plan.layers.items():
        qrange, w_scale = weight_init(module, ctx.weight_bits, search=True, p=ctx.p)
        a_s = a_z = None
        if quant_act:
            a_s, a_z = act_init(obs, name, per_timestep=per_timestep, symmetric=ctx.act_symmetric,
                                search=True, p=ctx.p)
        inits[name] = LayerInit(qrange, w_scale, a_s, a_z, plan.split_points.get(name) if quant_act else None)
    layers = {}
    work = [(name, units[name], g) for g, group in enumerate(unit_groups) for name in group]
    work += [(name, unit, len(unit_groups) - 1) for name, unit in (extra_units or {}).items()]
    io_group = 0
    for i, (unit_name, names, group) in enumerate(progress_bar(work, desc=f"calibration: reconstruction ({method})",
                                                               enabled=ctx.progress)):
        if group != io_group:
            obs = observe(ctx.backbone, ctx.calib, layers=[], device=ctx.device,
                          capture_blocks=tuple(unit_groups[group]), seed=ctx.seed, progress=False,
                          storage=ctx.activation_device)
            io_group = group
        if isinstance(names, tuple):  # (unit module, io, {relative: name})
            unit, io, rel_names = names
        else:
            module = modules[unit_name]
            if unit_name in plan.layers:
                unit, rel_names = _LayerUnit(module), {"layer": unit_name}
            else:
                unit, rel_names = module, {n[len(unit_name) + 1:]: n for n in names}
            io = obs.block_io.get(unit_name, [])
        results = reconstruct(unit, io, {rel: inits[n] for rel, n in rel_names.items()}, iters=ctx.iters,
                              device=ctx.device, seed=ctx.seed + i, adaround=ctx.adaround,
                              learn_act=quant_act and ctx.learn_act)
        for rel, name in rel_names.items():
            init, res = inits[name], results[rel]
            layers[name] = layer_recipe(plan.layers[name], spec, weight_scale=init.weight_scale,
                                        weight_q=res.weight_q, act_scale=res.act_scale,
                                        act_zero_point=init.act_zero_point, act_split=init.act_split)
        if not isinstance(names, tuple):
            obs.block_io.pop(unit_name, None)  # done with it: free the recorded activations
    return layers


def run(ctx) -> QuantRecipe:
    plan = plan_layers(ctx.backbone, weight_bits_options=(ctx.weight_bits,), act_symmetric=ctx.act_symmetric,
                       skip=ctx.skip)
    if ctx.split_shortcut:
        plan.split_points = {n: c for n, c in find_split_points(ctx.backbone, ctx.calib.samples[0], ctx.device).items()
                             if n in plan.layers}
    layers = brecq(ctx, plan, per_timestep=False, method="qdiffusion")
    return QuantRecipe("qdiffusion", layers, plan.model_layers, plan.skipped, timesteps=ctx.calib.timesteps,
                       meta=ctx.meta(split_points=plan.split_points))
