"""MixDQ (Zhao et al., ECCV 2024): BOS-aware text quantization, metric-decoupled sensitivity
analysis and integer-programming bit allocation.

- BOS-aware: CLIP's first (BOS) token is identical for every prompt and has a huge magnitude; the
  cross-attention to_k / to_v outputs for it are precomputed in full precision (the recipe's
  ``bos_output``) and the token is excluded from their activation-range statistics, so the
  other tokens get a tight range. At inference the precomputed output is used for the rows whose
  token 0 is that BOS input (``bos_input``; a zeroed negative prompt's is not). Enabled when
  every calibration sample shares its first text token, rows of zeros aside (``bos=None``:
  detected; T5-conditioned models such as PixArt have no BOS).
- Metric-decoupled sensitivity: each layer is quantized alone, at each candidate weight width
  (and its input at 8 bits), the rest in full precision. Quality layers are scored by the SQNR
  of the backbone output; content layers (cross-attention, feed-forward) by the SSIM between
  the quantized and the full-precision backbone output, treated as C-channel images (a cheap
  proxy for the SSIM of decoded images: no VAE decode per candidate). Cost: noise-to-signal
  ratio 10^(-SQNR/10) resp. 1 - SSIM, each group normalised to sum 1 at the lowest width, so
  the two metrics weigh alike.
- Allocation: ``scipy.optimize.milp`` picks one width per layer minimising the summed cost under
  the target average weight bit-width (weighted by parameter count); activations likewise
  between 8 and 16 bits under ``act_bits`` plus ``act_fp16_fraction`` of the layers, so the
  most sensitive activations stay in 16 bits.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..recipe import QuantRecipe
from .collect import CalibrationError, forward, observe, progress_bar, spread_indices
from ..recipe import matches_bos
from .common import (act_dtype_for, act_init, bos_io, detect_bos, layer_recipe, make_spec, plan_layers,
                     weight_dtype_for)
from .fakequant import fake_quant_act, fake_quant_weight, weight_absmax_scale, weight_grid
from .structure import cross_attention_kv_layers, is_content_layer, layer_input

logger = logging.getLogger("diffaccel")


# -- metrics --------------------------------------------------------------------------------

def sqnr_db(reference: torch.Tensor, quantized: torch.Tensor) -> float:
    ref = reference.double()
    noise = (ref - quantized.double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)


def ssim(reference: torch.Tensor, other: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity of [B, C, H, W] tensors (Gaussian window, per channel)."""
    x, y = reference.double(), other.double()
    if x.dim() != 4:
        x, y = x.reshape(x.shape[0], 1, 1, -1), y.reshape(y.shape[0], 1, 1, -1)
    data_range = (x.max() - x.min()).clamp(min=1e-12)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    c = x.shape[1]

    def blur(t):
        for dim in (2, 3):
            size = min(window, t.shape[dim]) | 1 if t.shape[dim] > 1 else 1
            if size > t.shape[dim]:
                size -= 2
            if size <= 1:
                continue
            coords = torch.arange(size, dtype=torch.float64) - size // 2
            g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
            g = (g / g.sum()).to(t.device)
            kernel = g.reshape(1, 1, size, 1) if dim == 2 else g.reshape(1, 1, 1, size)
            t = F.conv2d(t, kernel.expand(c, 1, *kernel.shape[2:]), groups=c)
        return t

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return value.mean().item()


# -- the integer program ---------------------------------------------------------------------

def allocate_bits(costs: np.ndarray, sizes: np.ndarray, candidates, budget_average: float) -> list[int]:
    """Choose one candidate width per layer: minimise sum(cost[l, c]) subject to
    sum(size_l * bits_c) <= budget_average * sum(size_l). -> chosen widths, one per layer."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    costs = np.asarray(costs, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    cand = np.asarray(candidates, dtype=np.float64)
    L, C = costs.shape
    if L == 0:
        return []
    if budget_average < cand.min() - 1e-9:
        raise CalibrationError(f"bit budget: an average of {budget_average} bits is below the smallest "
                               f"candidate width {int(cand.min())}")
    # ties go to the wider width: a layer that scores 0 at every width (it feeds only an output the
    # scores do not see, e.g. Kandinsky 6's audio head) is not narrowed for free
    span = float(cand.max() - cand.min()) or 1.0
    tie = 1e-6 * (float(np.abs(costs).max()) or 1.0) * (cand.max() - cand) / span
    c = (costs + tie[None, :]).reshape(-1)
    one_each = np.zeros((L, L * C))
    for l in range(L):
        one_each[l, l * C:(l + 1) * C] = 1
    budget_row = (sizes[:, None] * cand[None, :]).reshape(1, -1) / sizes.sum()
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(budget_row, -np.inf, budget_average + 1e-9)]
    res = milp(c, constraints=constraints, integrality=np.ones(L * C), bounds=Bounds(0, 1))
    if not res.success:
        raise CalibrationError(f"bit budget: the integer program found no allocation ({res.message})")
    x = np.round(res.x).reshape(L, C)
    return [int(cand[int(np.argmax(row))]) for row in x]


# -- the method --------------------------------------------------------------------------------

def _sample_subset(calib, count: int) -> list[int]:
    """``count`` samples, one per timestep, at timesteps spread over the calibrated ones."""
    T = len(calib.timesteps)
    wanted = spread_indices(T, count)
    first = {}
    for i, t in enumerate(calib.t_index):
        first.setdefault(t, i)
    return [first[t] for t in wanted if t in first]


def _bos_rows(x: torch.Tensor, bos_input) -> torch.Tensor | None:
    """[B, 1, 1] bool: the rows whose token 0 the quantized model computes in full precision (None: no BOS path)."""
    if bos_input is None or x.dim() != 3 or x.shape[1] < 2:
        return None
    return matches_bos(x[:, 0], bos_input).reshape(-1, 1, 1)


def _layer_delta_hook(module: nn.Module, delta_w: torch.Tensor, bos_input=None):
    def hook(mod, args, kwargs, out):
        x = layer_input(args, kwargs)
        if isinstance(mod, nn.Conv2d):
            extra = F.conv2d(x, delta_w.to(x.dtype), None, mod.stride, mod.padding, mod.dilation, mod.groups)
        else:
            extra = F.linear(x, delta_w.to(x.dtype))
        bos = _bos_rows(x, bos_input)
        if bos is not None:  # the BOS token's output is the full-precision one
            extra = torch.cat([extra[:, :1].masked_fill(bos, 0), extra[:, 1:]], dim=1)
        return out + extra
    return module.register_forward_hook(hook, with_kwargs=True)


def _act_quant_hook(module: nn.Module, scale, zp, bos_input, act_dtype: str):
    def hook(mod, args, kwargs):
        x = layer_input(args, kwargs)
        bos = _bos_rows(x, bos_input)
        q = fake_quant_act(x, scale, zp, act_dtype)
        x = q if bos is None else torch.cat([torch.where(bos, x[:, :1], q[:, :1]), q[:, 1:]], dim=1)
        return ((x,), kwargs) if args else (args, {**kwargs, "input": x})
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def run(ctx) -> QuantRecipe:
    backbone, calib = ctx.backbone, ctx.calib
    fmt = ctx.number_format
    # fp8 has one weight width (E4M3); the allocation then only chooses the activations' 8 or 16 bits
    w_cands = tuple(sorted(ctx.weight_candidates)) if fmt == "int" else (8,)
    act_dtype = act_dtype_for(fmt)
    a_cands = (8, 16)
    plan = plan_layers(backbone, weight_bits_options=w_cands, act_symmetric=ctx.act_symmetric, skip=ctx.skip,
                       number_format=fmt, not_run=ctx.not_run)
    source = detect_bos(calib)
    if ctx.bos and source is None:
        raise CalibrationError("bos: bos=True but the calibration samples do not share their first text token "
                               "(rows whose token 0 is all zeros aside)")
    use_bos = source is not None if ctx.bos is None else ctx.bos
    kv = tuple(n for n in cross_attention_kv_layers(backbone) if n in plan.layers) if use_bos else ()
    if ctx.bos and not kv:
        raise CalibrationError("bos: bos=True but no cross-attention key / value layer is calibrated here to "
                               "take the BOS path")
    bos = bos_io(backbone, calib, list(kv), ctx.device, source) if kv else {}  # name -> (input, output)
    bos_in = {n: x for n, (x, _) in bos.items()}
    obs = observe(backbone, calib, layers=list(plan.layers), bos_inputs=bos_in, device=ctx.device, seed=ctx.seed,
                  progress=ctx.progress)
    names = list(plan.layers)
    # weights: per-channel min/max scales (MixDQ's weight quantizer); its gains come from the BOS
    # path, the activation ranges and the allocation
    w_scale = {n: {b: weight_absmax_scale(plan.layers[n].weight, weight_grid(weight_dtype_for(b, fmt)))
                   for b in w_cands} for n in names}
    act = {n: act_init(obs, n, per_timestep=False, symmetric=ctx.act_symmetric, search=True, p=ctx.p,
                       act_dtype=act_dtype) for n in names}

    subset = _sample_subset(calib, ctx.sensitivity_samples)

    refs = [obs.outputs[i] for i in subset]  # per sample: every output tensor, the main one first

    def score(name, install) -> float:
        with install(), torch.no_grad():
            outs = [[o.cpu() for o in forward(backbone, calib.samples[i], ctx.device, calib.dtype,
                                              every_output=True)] for i in subset]
        if is_content_layer(name):  # (the image: the main output)
            return float(np.mean([1.0 - ssim(r[0], o[0]) for r, o in zip(refs, outs)]))
        # every output counts: a layer feeding only Kandinsky 6's audio head scored 0 on the video
        noise = [np.mean([10 ** (-sqnr_db(a, b) / 10) if math.isfinite(sqnr_db(a, b)) else 0.0
                          for a, b in zip(r, o)]) for r, o in zip(refs, outs)]
        return float(np.mean(noise))

    w_cost = np.zeros((len(names), len(w_cands)))
    a_cost = np.zeros((len(names), 2))
    jobs = [(i, n) for i, n in enumerate(names)]
    for i, n in progress_bar(jobs, desc="calibration: sensitivity", enabled=ctx.progress):
        module = plan.layers[n]
        for j, b in enumerate(w_cands):
            grid = weight_grid(weight_dtype_for(b, fmt))
            delta = (fake_quant_weight(module.weight, w_scale[n][b].to(module.weight.device), grid)
                     - module.weight.float()).detach()
            w_cost[i, j] = score(n, lambda m=module, d=delta: _layer_delta_hook(m, d, bos_in.get(n)))
        s, z = act[n]
        a_cost[i, 0] = score(n, lambda m=module, s=s, z=z: _act_quant_hook(
            m, s[0].to(ctx.device), z[0].to(ctx.device), bos_in.get(n), act_dtype))
    content = np.array([is_content_layer(n) for n in names])
    for group in (content, ~content):
        for cost in (w_cost, a_cost):
            total = cost[group, 0].sum()
            if group.any() and total > 0:
                cost[group] /= total

    sizes = np.array([plan.layers[n].weight.numel() for n in names], dtype=np.float64)
    w_bits = allocate_bits(w_cost, sizes, w_cands, float(ctx.weight_bits))
    n_fp16 = math.ceil(ctx.act_fp16_fraction * len(names)) if ctx.act_bits < 16 else 0
    act_budget = min(16.0, (len(names) * float(ctx.act_bits) + 8 * n_fp16) / max(len(names), 1))
    a_bits = allocate_bits(a_cost, np.ones(len(names)), a_cands, act_budget)

    layers = {}
    for i, n in enumerate(names):
        spec = make_spec(w_bits[i], a_bits[i], ctx.act_symmetric, fmt)
        s, z = act[n]
        layers[n] = layer_recipe(plan.layers[n], spec, weight_scale=w_scale[n][w_bits[i]], act_scale=s,
                                 act_zero_point=z, bos_output=bos[n][1] if n in bos else None,
                                 bos_input=bos_in.get(n))
    sensitivity = {n: {"group": "content" if content[i] else "quality",
                       **{f"w{b}": float(w_cost[i, j]) for j, b in enumerate(w_cands)}, "a8": float(a_cost[i, 0])}
                   for i, n in enumerate(names)}
    recipe = QuantRecipe("mixdq", layers, plan.model_layers, plan.skipped, timesteps=calib.timesteps,
                         meta=ctx.meta(bos=bool(kv), bos_layers=list(kv), weight_budget=float(ctx.weight_bits),
                                       act_budget=act_budget, sensitivity=sensitivity,
                                       sensitivity_metrics={"quality": "SQNR of every backbone output, averaged",
                                                            "content": "SSIM of the main backbone output"}))
    return recipe
