"""TFMQ-DM (Huang et al., CVPR 2024, "Temporal Feature Matters").

- Temporal Information Block: the timestep MLP and every layer that only projects its output
  (UNet: time_embedding + each resnet's time_emb_proj; PixArt: adaln_single; SD3/Flux:
  time_text_embed + the adaLN modulation linears). Temporal Information Aware Reconstruction
  (TIAR) reconstructs all of it as ONE unit whose output is the concatenation of every temporal
  feature, rather than inside the blocks that consume them.
- Finite Set Calibration: one static activation scale / zero point per timestep of the sampling
  schedule (``num_timesteps=None`` keeps every step), switched at run time by the step state.
- Cache-based maintenance (``temporal_cache=True``, the default where the block depends on t
  alone): the full-precision temporal features of each calibrated timestep are stored in the
  recipe and looked up at run time instead of computing the block: exact and cheaper. The block's
  layers are then not quantized (nothing of them runs).
The remaining blocks are reconstructed as in Q-Diffusion (AdaRound + LSQ, split concat inputs),
with per-timestep activation parameters.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..recipe import QuantRecipe
from .collect import CalibrationError, _to, observe
from .common import find_split_points, plan_layers
from .qdiffusion import brecq
from .structure import TemporalInfo, first_tensor, quantizable_layers, temporal_info

logger = logging.getLogger("diffaccel")


class TemporalUnit(nn.Module):
    """The temporal information block as one module: embed(...) and each projection of it; the
    output is every temporal feature concatenated (TIAR's reconstruction target)."""

    def __init__(self, embed: nn.Module, projections: list[tuple[nn.Module, object]]):
        super().__init__()
        self.embed = embed
        self.projs = nn.ModuleList([p for p, _ in projections])
        self.acts = [a for _, a in projections]

    def features(self, *args, **kwargs) -> list[torch.Tensor]:
        """The embedding module's output(s), then each projection of its first output."""
        out = self.embed(*args, **kwargs)
        feats = [f for f in out if f is not None] if isinstance(out, (tuple, list)) else [out]
        emb = feats[0]  # (HunyuanVideo's second output, the token-replace embedding, may be None)
        return feats + [proj(act(emb)) for proj, act in zip(self.projs, self.acts)]

    def forward(self, *args, **kwargs):
        return torch.cat([f.reshape(f.shape[0], -1).float() for f in self.features(*args, **kwargs)], dim=-1)


def _projection_act(backbone: nn.Module, proj_name: str):
    """What the model applies to the embedding module's output before ``proj_name`` sees it."""
    parent = backbone.get_submodule(proj_name.rpartition(".")[0])
    if hasattr(parent, "time_emb_proj"):  # ResnetBlock2D
        own = (lambda x: x) if getattr(parent, "skip_time_act", False) else parent.nonlinearity
        # a UNet with time_embedding_act_fn activates the embedding once, before every resnet
        shared = getattr(backbone, "time_embed_act", None)
        return own if shared is None else (lambda x: own(shared(x)))
    return F.silu  # adaLN modulation: linear(silu(emb))


def _first_rows(out):
    if isinstance(out, (tuple, list)):
        return [o[0].float() for o in out]
    return [first_tensor(out)[0].float()]


def _same_rows(pred: torch.Tensor, real) -> bool:
    """``real`` (a recorded output) equals ``pred``, or ``pred`` with each row repeated (a motion
    UNet repeats the embedding over frames), to float32 recomputation accuracy."""
    if not isinstance(real, torch.Tensor) or pred.shape[0] == 0 or real.shape[0] % pred.shape[0]:
        return False
    real = real[::real.shape[0] // pred.shape[0]].to(pred.device, torch.float32)
    if real.shape != pred.shape:
        return False
    return bool((pred.float() - real).norm() <= 1e-4 * real.norm() + 1e-6)


def _embedding(out) -> torch.Tensor:
    """The embedding module's first output (HunyuanVideo's second one may be None)."""
    return next(o for o in out if o is not None) if isinstance(out, (tuple, list)) else out


def _verified(backbone: nn.Module, info: TemporalInfo, obs) -> TemporalInfo:
    """``info`` without the projections whose recorded outputs are not proj(act(embedding)) at every
    calibrated timestep. What the model does between the two varies (an activation, an fps
    embedding added in I2VGen-XL, a per-block input); a projection that reads something else is
    neither cached by timestep nor reconstructed from the embedding: it is quantized in its block."""
    emb = obs.module_out.get(info.embed, {})
    kept = []
    for name in info.projections:
        proj, act = backbone.get_submodule(name), _projection_act(backbone, name)
        real = obs.module_out.get(name, {})
        device = next(proj.parameters()).device
        try:
            with torch.no_grad():
                ok = bool(emb) and set(real) == set(emb) and all(
                    _same_rows(proj(act(_embedding(emb[t]).to(device, torch.float32))), real[t]) for t in emb)
        except (RuntimeError, TypeError, ValueError):
            ok = False
        if ok:
            kept.append(name)
        else:
            logger.info("tfmq: %s does not read the timestep embedding alone; quantized in its block", name)
    dropped = set(info.projections) - set(kept)
    if not dropped:
        return info
    return replace(info, projections=kept, layers=[n for n in info.layers if n not in dropped])


def run(ctx) -> QuantRecipe:
    backbone = ctx.backbone
    info = temporal_info(backbone)
    use_cache = ctx.temporal_cache and info.cacheable
    if ctx.temporal_cache and not info.cacheable and info.embed is not None:
        logger.info("tfmq: temporal features not cached (%s); reconstructing them with TIAR", info.why_not_cacheable)
    if use_cache:
        calibrated = set(ctx.calib.timesteps.tolist())
        missing = [t for t in ctx.calib.schedule.tolist() if t not in calibrated]
        if missing:  # (the recipe could not sample the schedule it was calibrated on)
            raise CalibrationError(
                f"temporal_cache: the temporal feature cache holds the calibrated timesteps only, and "
                f"num_timesteps={len(calibrated)} covers {len(calibrated)} of the {len(ctx.calib.schedule)} timesteps "
                f"the pipeline ran (e.g. {missing[0]:g} is left out); use num_timesteps >= num_inference_steps, or "
                f"temporal_cache=False (nearest-timestep activation scales, any schedule)")
    temporal = None
    if info.embed is not None and (use_cache or info.layers):
        temporal = observe(backbone, ctx.calib, layers=[], device=ctx.device,
                           capture_outputs_of=(info.embed, *info.projections), seed=ctx.seed, progress=False,
                           desc="calibration: temporal features")
        info = _verified(backbone, info, temporal)
    cached_modules = ([info.embed] + info.projections) if use_cache else []
    exclude = {}
    for name in info.layers:
        exclude[name] = ("replaced by the temporal feature cache (exact full-precision features)" if use_cache
                         else "reconstructed in the temporal information block")
    plan = plan_layers(backbone, weight_bits_options=(ctx.weight_bits,), act_symmetric=ctx.act_symmetric,
                       skip=ctx.skip, exclude=exclude, number_format=ctx.number_format, not_run=ctx.not_run)
    if ctx.split_shortcut:
        points = find_split_points(backbone, ctx.calib.samples[0], ctx.device, ctx.calib.dtype)
        plan.split_points = {n: c for n, c in points.items() if n in plan.layers}
    T = len(ctx.calib.timesteps)
    cache: dict[str, list[torch.Tensor]] = {}
    extra_units = {}
    tib_layers = {}
    if use_cache:
        for name in cached_modules:
            per_t = temporal.module_out.get(name, {})
            if len(per_t) != T:
                raise CalibrationError(f"tfmq: module '{name}' did not run at every calibrated timestep")
            rows = [_first_rows(per_t[t]) for t in range(T)]
            cache[name] = [torch.stack([rows[t][k] for t in range(T)]) for k in range(len(rows[0]))]
    elif info.embed is not None and info.layers:
        # (not the layers whose parameters the model reads itself: Motif-Video's
        # get_parameter_dtype(self.timestep_embedder); quantizable_layers leaves them out)
        quantizable = quantizable_layers(backbone)
        tib_layers = {n: quantizable[n] for n in info.layers
                      if n not in ctx.skip and n not in ctx.not_run and n in quantizable}
        from ... import nn as dnn
        from .common import make_spec

        spec = make_spec(ctx.weight_bits, ctx.act_bits, ctx.act_symmetric, ctx.number_format)
        for n in list(tib_layers):
            reason = dnn.quantize_reason(tib_layers[n], spec)
            if reason is not None:
                plan.skipped[n] = reason
                del tib_layers[n]
        for n in tib_layers:
            plan.skipped.pop(n, None)
        if tib_layers:
            extra_units = _tiar_unit(ctx, info, tib_layers)
    plan.layers.update(tib_layers)
    layers, extra = brecq(ctx, plan, per_timestep=True, extra_units=extra_units, method="tfmq")
    # the TIB layers were reconstructed as one unit in extra_units, not inside their resnets
    return QuantRecipe("tfmq", layers, plan.model_layers, plan.skipped, timesteps=ctx.calib.timesteps,
                       temporal_cache=cache,
                       meta=ctx.meta(split_points=plan.split_points, temporal_cache=sorted(cache),
                                     temporal_block=info.layers, **extra))


def _tiar_unit(ctx, info, tib_layers) -> dict:
    """-> {"<temporal block>": (TemporalUnit, io, {relative name: layer name})} for ``brecq``
    (``info``: verified, every projection reads the embedding as TemporalUnit re-derives it)."""
    backbone = ctx.backbone
    embed = backbone.get_submodule(info.embed)
    projections = [(backbone.get_submodule(p), _projection_act(backbone, p)) for p in info.projections]
    unit = TemporalUnit(embed, projections)
    obs = observe(backbone, ctx.calib, layers=[], device=ctx.device, capture_blocks=(info.embed,),
                  seed=ctx.seed, progress=False, desc="calibration: temporal block inputs")
    io = []
    with torch.no_grad():
        for args, kwargs, _, t in obs.block_io[info.embed]:
            target = unit(*_to(args, ctx.device), **_to(kwargs, ctx.device)).float()
            io.append((args, kwargs, target.cpu(), t))
    rel = {}
    for name in tib_layers:
        if name.startswith(info.embed + "."):
            rel["embed." + name[len(info.embed) + 1:]] = name
        elif name in info.projections:
            rel[f"projs.{info.projections.index(name)}"] = name
    return {"temporal_block": (unit, io, rel)}
