"""The baseline: per-output-channel absmax weight scales, round to nearest, and one static
per-tensor activation range from the running min/max over every calibration sample and timestep."""
from __future__ import annotations

from ..recipe import QuantRecipe
from .collect import observe
from .common import act_init, layer_recipe, make_spec, plan_layers, weight_init


def run(ctx) -> QuantRecipe:
    plan = plan_layers(ctx.backbone, weight_bits_options=(ctx.weight_bits,), act_symmetric=ctx.act_symmetric,
                       skip=ctx.skip, number_format=ctx.number_format, not_run=ctx.not_run)
    spec = make_spec(ctx.weight_bits, ctx.act_bits, ctx.act_symmetric, ctx.number_format)
    obs = observe(ctx.backbone, ctx.calib, layers=list(plan.layers) if spec.act_dtype else [], device=ctx.device,
                  seed=ctx.seed, progress=ctx.progress)
    layers = {}
    for name, module in plan.layers.items():
        _, scale = weight_init(module, spec.weight_dtype, search=False, p=2.0)
        act_s = act_z = None
        if spec.act_dtype is not None:
            act_s, act_z = act_init(obs, name, per_timestep=False, symmetric=ctx.act_symmetric, search=False, p=2.0,
                                    act_dtype=spec.act_dtype)
        layers[name] = layer_recipe(module, spec, weight_scale=scale, act_scale=act_s, act_zero_point=act_z)
    return QuantRecipe("minmax", layers, plan.model_layers, plan.skipped, timesteps=ctx.calib.timesteps,
                       meta=ctx.meta())
