"""Q-Diffusion (Li et al., ICCV 2023): time-step-aware calibration data (uniformly spread over the
sampling trajectory, see collect.spread_indices), Lp clip-ratio search for weight scales (p = 2.4),
BRECQ block reconstruction with AdaRound learned rounding and LSQ-learned activation step sizes,
and split quantization of the concat (h, skip) inputs of the UNet's up-path ResNet blocks.

Blocks are reconstructed in call order, each from the inputs the already-quantized model gives it,
against the full-precision outputs (``block_inputs="quantized"``, the default, as in BRECQ and
Q-Diffusion); ``block_inputs="fp"`` reconstructs them independently from full-precision inputs,
recorded a few blocks per pass. Attention matmuls (QK^T, PV) are quantized by the
attention kernel (``attention(..., quant="int8")``), not calibrated here.
"""
from __future__ import annotations

import copy
import logging
from contextlib import ExitStack
from dataclasses import replace

import torch
from torch import nn

from ..recipe import QuantRecipe
from .collect import observe, progress_bar
from .common import (act_init, find_split_points, layer_recipe, make_spec, plan_layers, weight_init)
from .fakequant import quantize_weight
from .reconstruct import LayerInit, reconstruct, unit_error, wrap_layers
from .structure import blocks as find_blocks

logger = logging.getLogger("diffaccel")
UNDECIDED_WARN = 0.1  # warn above this fraction of rounding choices left to the final hardening


class _LayerUnit(nn.Module):
    """A single layer as a reconstruction unit (layers outside any block)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, input):  # (torch's parameter name: callers pass input=)
        return self.layer(input)


def units_for(backbone: nn.Module, layer_names, exclude_blocks=()) -> dict[str, list[str]]:
    """Reconstruction unit (block name or a lone layer's name) -> its planned layers."""
    units: dict[str, list[str]] = {}
    block_names = [b for b in find_blocks(backbone) if b not in exclude_blocks]
    for name in layer_names:
        owner = next((b for b in block_names if name.startswith(b + ".")), name)
        units.setdefault(owner, []).append(name)
    return units


def execution_order(backbone: nn.Module, sample: dict, device, names: list[str],
                    dtype: torch.dtype | None = None) -> list[str]:
    """``names`` in the order the forward pass first calls them (module order is not call order:
    a UNet registers mid_block after up_blocks)."""
    from .collect import forward

    order: list[str] = []
    modules = dict(backbone.named_modules())
    with ExitStack() as hooks, torch.no_grad():
        for n in names:
            hooks.enter_context(modules[n].register_forward_pre_hook(
                lambda m, a, n=n: order.append(n) if n not in order else None))
        forward(backbone, sample, device, dtype)
    return order + [n for n in names if n not in order]


def brecq(ctx, plan, *, per_timestep: bool, extra_units: dict | None = None, method: str) -> tuple[dict, dict]:
    """Initial scales + block reconstruction of every planned layer; -> ({name: LayerRecipe}, meta),
    meta holding ``adaround_undecided``: the fraction of the kept learned rounding choices that the
    regulariser had not settled (0.01 < h < 0.99) when they were hardened; None without AdaRound, or
    when every block fell back to nearest rounding.

    ``ctx.block_inputs == "quantized"`` (BRECQ's and Q-Diffusion's default): blocks are
    reconstructed in call order, each fed by the model whose earlier blocks are already quantized
    (fake-quantized exactly like the kernels), against the full-precision block output, so a
    block learns to compensate the error arriving from before it. ``"fp"``: every block from its
    full-precision inputs (one recording pass, cheaper)."""
    spec = make_spec(ctx.weight_bits, ctx.act_bits, ctx.act_symmetric, ctx.number_format)
    quant_act = spec.act_dtype is not None
    separate = {n for u in (extra_units or {}).values() for n in u[2].values()}
    units = units_for(ctx.backbone, [n for n in plan.layers if n not in separate])
    sequential = ctx.block_inputs == "quantized"
    if sequential:
        order = execution_order(ctx.backbone, ctx.calib.samples[0], ctx.device, list(units), ctx.calib.dtype)
        unit_groups = [[u] for u in order]
    else:
        # all units' inputs/outputs in one pass, or ``units_per_pass`` at a time (bounded memory, one
        # more full-precision pass over the calibration set per group)
        per_pass = ctx.units_per_pass or max(len(units), 1)
        unit_groups = [list(units)[i:i + per_pass] for i in range(0, len(units), per_pass)]
    unit_groups = unit_groups or [[]]
    obs = observe(ctx.backbone, ctx.calib, layers=list(plan.layers) if quant_act else [], device=ctx.device,
                  split_points=plan.split_points if quant_act else {},
                  capture_blocks=() if sequential else tuple(unit_groups[0]),
                  seed=ctx.seed, progress=ctx.progress, storage=ctx.activation_device)
    modules = dict(ctx.backbone.named_modules())
    inits: dict[str, LayerInit] = {}
    absmax: dict[str, LayerInit] = {}
    for name, module in plan.layers.items():
        grid, w_scale = weight_init(module, spec.weight_dtype, search=True, p=ctx.p)
        _, w_absmax = weight_init(module, spec.weight_dtype, search=False, p=ctx.p)
        a_s = a_z = None
        if quant_act:
            a_s, a_z = act_init(obs, name, per_timestep=per_timestep, symmetric=ctx.act_symmetric,
                                search=True, p=ctx.p, act_dtype=spec.act_dtype)
        split = plan.split_points.get(name) if quant_act else None
        act_dtype = spec.act_dtype or "int8"
        inits[name] = LayerInit(grid, w_scale, a_s, a_z, split, act_dtype=act_dtype)
        absmax[name] = LayerInit(grid, w_absmax, a_s, a_z, split, act_dtype=act_dtype)
    qmodel, qctx = (copy.deepcopy(ctx.backbone), {"t": 0}) if sequential else (None, None)
    layers = {}
    # the temporal block (TIAR) runs first in the model
    work = [(name, unit, 0) for name, unit in (extra_units or {}).items()]
    work += [(name, units[name], g) for g, group in enumerate(unit_groups) for name in group]
    io_group = 0
    undecided = rounding = 0
    for i, (unit_name, names, group) in enumerate(progress_bar(work, desc=f"calibration: reconstruction ({method})",
                                                               enabled=ctx.progress)):
        if isinstance(names, tuple):  # (unit module, io, {relative: name})
            unit, io, rel_names = names
        else:
            module = modules[unit_name]
            if unit_name in plan.layers:
                unit, rel_names = _LayerUnit(module), {"layer": unit_name}
            else:
                unit, rel_names = module, {n[len(unit_name) + 1:]: n for n in names}
            if sequential:
                fp = observe(ctx.backbone, ctx.calib, layers=[], device=ctx.device, capture_blocks=(unit_name,),
                             seed=ctx.seed, progress=False, storage=ctx.activation_device)
                q = observe(qmodel, ctx.calib, layers=[], device=ctx.device, capture_blocks=(unit_name,),
                            seed=ctx.seed, progress=False, storage=ctx.activation_device,
                            on_sample=lambda t: qctx.__setitem__("t", t))
                io = [(qa, qk, fo, t) for (qa, qk, _, t), (_, _, fo, _) in
                      zip(q.block_io.get(unit_name, []), fp.block_io.get(unit_name, []))]
            else:
                if group != io_group:
                    obs = observe(ctx.backbone, ctx.calib, layers=[], device=ctx.device,
                                  capture_blocks=tuple(unit_groups[group]), seed=ctx.seed, progress=False,
                                  storage=ctx.activation_device)
                    io_group = group
                io = obs.block_io.pop(unit_name, [])
        # The Lp-searched weight scales minimise the weights' own error, not the block's: start from
        # whichever of them and the absmax scales gives the smaller block error, and keep the learned
        # rounding / step sizes only where they beat that start on the calibration data.
        searched = {rel: inits[n] for rel, n in rel_names.items()}
        plain = {rel: absmax[n] for rel, n in rel_names.items()}
        start = searched
        if io and unit_error(unit, io, plain, device=ctx.device) < unit_error(unit, io, searched, device=ctx.device):
            start = plain
        results = reconstruct(unit, io, start, iters=ctx.iters, device=ctx.device, seed=ctx.seed + i,
                              adaround=ctx.adaround, learn_act=quant_act and ctx.learn_act)
        learned = {rel: replace(init, weight_q=results[rel].weight_q,
                                act_scale=results[rel].act_scale if init.act_scale is not None else None)
                   for rel, init in start.items()}
        if io and ctx.iters > 0 and unit_error(unit, io, learned, device=ctx.device) > \
                unit_error(unit, io, start, device=ctx.device):
            learned = {rel: replace(init, weight_q=quantize_weight(plan.layers[rel_names[rel]].weight,
                                                                   init.weight_scale, init.grid))
                       for rel, init in start.items()}
        else:
            undecided += sum(r.undecided for r in results.values())
            rounding += sum(r.rounding for r in results.values())
        for rel, name in rel_names.items():
            init = learned[rel]
            layers[name] = layer_recipe(plan.layers[name], spec, weight_scale=init.weight_scale,
                                        weight_q=init.weight_q, act_scale=init.act_scale,
                                        act_zero_point=init.act_zero_point, act_split=init.act_split)
        if sequential:  # later blocks see this one quantized, exactly as the kernels will run it
            installed = wrap_layers(qmodel, {name: learned[rel] for rel, name in rel_names.items()}, qctx,
                                    adaround=False, learn_act=False)
            for layer in installed.values():
                layer.hard = True
    return layers, {"adaround_undecided": _report_undecided(method, undecided, rounding, ctx.iters)}


def _report_undecided(method: str, undecided: int, rounding: int, iters: int) -> float | None:
    if not rounding:
        return None
    frac = undecided / rounding
    if frac > UNDECIDED_WARN:  # the hardening, not the learned rounding, then decides those weights
        logger.warning("%s: %.0f%% of AdaRound's rounding choices were still undecided (0.01 < h < 0.99) when "
                       "hardened after iters=%d: the hardening, not the learned rounding, decided those weights "
                       "(close to round-to-nearest); raise iters (the papers' code runs 20000 per block) for a settled result",
                       method, 100 * frac, iters)
    else:
        logger.info("%s: %.1f%% of AdaRound's rounding choices undecided when hardened", method, 100 * frac)
    return frac


def run(ctx) -> QuantRecipe:
    plan = plan_layers(ctx.backbone, weight_bits_options=(ctx.weight_bits,), act_symmetric=ctx.act_symmetric,
                       skip=ctx.skip, number_format=ctx.number_format, not_run=ctx.not_run)
    if ctx.split_shortcut:
        points = find_split_points(ctx.backbone, ctx.calib.samples[0], ctx.device, ctx.calib.dtype)
        plan.split_points = {n: c for n, c in points.items() if n in plan.layers}
    layers, extra = brecq(ctx, plan, per_timestep=False, method="qdiffusion")
    return QuantRecipe("qdiffusion", layers, plan.model_layers, plan.skipped, timesteps=ctx.calib.timesteps,
                       meta=ctx.meta(split_points=plan.split_points, **extra))
