"""Post-training calibration of a diffusion backbone into a ``QuantRecipe`` that runs on
diffaccel's quantized layers: ``minmax`` (baseline), ``qdiffusion``, ``tfmq``, ``mixdq``.

    recipe = calibrate(pipe, prompts, method="qdiffusion", weight_bits=4, act_bits=8)
    recipe.save("unet.w4a8.safetensors")
    diffaccel.patch(pipe, quant=recipe)

The model handed in is never modified: statistics are gathered with hooks that are removed
again, reconstruction works on copies, and any error leaves it as it was.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ...ops._checks import plain_number
from ..recipe import QuantRecipe, RecipeError, timestep_parameter
from . import minmax, mixdq, qdiffusion, tfmq
from .collect import (CalibrationError, CalibrationSet, backbone_of, check_forward_kwargs, compute_dtype,
                      from_backbone_data, from_pipeline, is_pipeline, layers_not_run, working_copy)
from .structure import quantizable_layers
from .common import check_bits, check_format, log_allocation, resolve_skip

logger = logging.getLogger("diffaccel")
METHODS = {"minmax": minmax.run, "qdiffusion": qdiffusion.run, "tfmq": tfmq.run, "mixdq": mixdq.run}

__all__ = ["calibrate", "METHODS", "CalibrationError", "CalibrationSet", "QuantRecipe", "RecipeError"]


@dataclass
class Context:
    """Everything a method needs: the (read-only) backbone, the calibration set and the options."""
    backbone: nn.Module
    calib: CalibrationSet
    method: str
    weight_bits: float
    act_bits: float
    device: torch.device
    seed: int
    progress: bool
    act_symmetric: bool
    number_format: str
    skip: tuple
    activation_device: object
    iters: int
    p: float
    adaround: bool
    learn_act: bool
    split_shortcut: bool
    temporal_cache: bool
    weight_candidates: tuple
    act_fp16_fraction: float
    sensitivity_samples: int
    bos: bool | None
    not_run: tuple = ()  # layers no calibration sample runs (kept in floating point)
    units_per_pass: int | None = None
    block_inputs: str = "quantized"
    options: dict = field(default_factory=dict)

    def meta(self, **extra) -> dict:
        from ... import __version__

        return {"method": self.method, "weight_bits": self.weight_bits, "act_bits": self.act_bits,
                "seed": self.seed, "model": type(self.backbone).__name__, "diffaccel": __version__,
                "act_symmetric": self.act_symmetric, "format": self.number_format, "iters": self.iters, "p": self.p,
                "block_inputs": self.block_inputs,
                "schedule": [float(t) for t in self.calib.schedule.tolist()],
                "samples": len(self.calib), **extra}


def _int_arg(name: str, value, *, minimum: int | None = 1, optional: bool = False):
    """-> ``value`` as a python int (numpy integers accepted, bools not), checked >= ``minimum``."""
    value = plain_number(value)
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        expected = {None: "an int", 0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise CalibrationError(f"{name}: expected {expected}{' or None' if optional else ''}, got {value!r}")
    return value


def _meta_tensor(module: nn.Module) -> str | None:
    return next((n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta), None)


def calibrate(target, data, *, method: str, weight_bits: float = 8, act_bits: float = 8,
              num_timesteps: int | None = None, samples_per_timestep: int | None = None,
              num_inference_steps: int = 10, seed: int = 0, device=None, activation_device=None,
              progress: bool = True, format: str = "int", act_symmetric: bool | None = None, skip=None, iters: int = 100,
              p: float = 2.4, adaround: bool = True, learn_act: bool = True, split_shortcut: bool = True,
              temporal_cache: bool = True, weight_candidates=(4, 8), act_fp16_fraction: float = 0.05,
              sensitivity_samples: int = 4, bos: bool | None = None, batch_size: int = 1,
              pipe_kwargs: dict | None = None, units_per_pass: int | None = None,
              block_inputs: str = "quantized", backbone: str | None = None) -> QuantRecipe:
    """Calibrate ``target`` (a diffusers pipeline with prompts as ``data``, or a bare backbone with an
    iterable of forward-kwargs dicts, each holding ``timestep``) and return a QuantRecipe.

    method: "minmax" | "qdiffusion" | "tfmq" | "mixdq".
    weight_bits / act_bits: 4 or 8 / 8 or 16 (16 = weight-only); for mixdq the target averages of
        the mixed-precision allocation (weights from ``weight_candidates``, activations 8 or 16).
    format: "int" (INT8/INT4 weights per output channel, static INT8 activations) or "fp8" (FP8 E4M3
        weights per output channel, static per-tensor FP8 E4M3 activations: weight_bits must be 8;
        mixdq then allocates only the activations' 8 or 16 bits). Every method works in either:
        scale searches, AdaRound (between neighbouring E4M3 values) and LSQ run on the format's grid.
    act_symmetric: symmetric static activations (None: asymmetric with a zero point for int8,
        symmetric for fp8, which has no zero point).
    num_timesteps: calibrated timesteps spread uniformly over the trajectory (None: every step);
        tfmq keeps one set of activation parameters per calibrated timestep.
    samples_per_timestep: samples kept per timestep (None: all; a pipeline gives one per prompt batch).
    data: for a pipeline, a prompt string or a non-empty iterable of prompt strings.
    num_inference_steps, batch_size, pipe_kwargs: the full-precision pipeline run that is recorded
        (num_inference_steps and batch_size: ints >= 1; pipe_kwargs: further call arguments, not the
        prompt, num_inference_steps, generator or output_type that calibrate passes itself).
    seed: an int; seeds the pipeline run's generator and the methods' sampling.
    backbone: for a pipeline, the component to calibrate (default "unet", else "transformer"); e.g.
        "transformer_2" for Wan 2.2's second expert, which records only the steps that expert runs.
    device: where to calibrate (default: the backbone's device; another device works on a copy).
    activation_device: where recorded block activations are kept (None: the device if they fit in
        40% of its free memory, else the CPU).
    sensitivity_samples: mixdq scores each layer on this many samples (timesteps spread out; an int >= 1).
    weight_candidates: mixdq's weight widths to choose from (a subset of (4, 8)); weight_bits must not
        lie below the smallest.
    act_fp16_fraction: mixdq's share of layers, in [0, 1], whose activations it may keep in 16 bits on
        top of the ``act_bits`` average.
    iters: reconstruction iterations per block (qdiffusion, tfmq); p: the Lp norm of scale searches.
    block_inputs: "quantized" (reconstruct blocks in call order from the already-quantized model's
        inputs, as BRECQ / Q-Diffusion do) or "fp" (from full-precision inputs: one recording pass).
    units_per_pass: with block_inputs="fp", record the inputs/outputs of this many reconstruction blocks per full-precision
        pass (None: all in one pass; set it to bound memory on large models).
    skip: layer names kept in floating point (default: the model's input/output layers).
    Integer arguments take python or numpy integers (not bools). The weights must be loaded: a model
    under sequential CPU offload (accelerate.cpu_offload, enable_sequential_cpu_offload) keeps them on
    the meta device and is refused; model offload (enable_model_cpu_offload) is fine.
    Every argument is checked before the model runs.
    """
    if method not in METHODS:
        raise CalibrationError(f"method: unknown calibration method {method!r}; expected one of {tuple(METHODS)}")
    for name, flag in (("progress", progress), ("adaround", adaround), ("learn_act", learn_act),
                       ("split_shortcut", split_shortcut), ("temporal_cache", temporal_cache)):
        if not isinstance(flag, bool):  # (bos="no" turned the BOS path on; temporal_cache=None off)
            raise CalibrationError(f"{name}: expected True or False, got {flag!r}")
    if bos is not None and not isinstance(bos, bool):
        raise CalibrationError(f"bos: expected True, False or None (mixdq's default), got {bos!r}")
    weight_bits, act_bits, p = plain_number(weight_bits), plain_number(act_bits), plain_number(p)
    check_bits(method, weight_bits, act_bits)
    act_symmetric = check_format(format, act_symmetric, weight_bits, method)
    # mixdq's options: checked whatever the method (nonsense is refused, not ignored)
    try:
        weight_candidates = tuple(plain_number(b) for b in weight_candidates)
    except TypeError:
        raise CalibrationError(f"weight_candidates: expected a sequence of weight widths from (4, 8), "
                               f"got {weight_candidates!r}") from None
    bad = [b for b in weight_candidates if isinstance(b, bool) or b not in (4, 8)]
    if bad or not weight_candidates:
        raise CalibrationError(f"weight_candidates: the kernels run 4- and 8-bit weights, got {weight_candidates}")
    # the allocation's budget: every layer at the narrowest candidate is the least it can reach
    # (fp8 has the one width 8, which check_format already requires of weight_bits)
    if method == "mixdq" and format == "int" and weight_bits < min(weight_candidates) - 1e-9:
        raise CalibrationError(f"weight_bits: mixdq's average weight bit-width {weight_bits} lies below the "
                               f"smallest of weight_candidates {weight_candidates}, so no allocation reaches "
                               f"it; include 4 in weight_candidates or raise weight_bits to "
                               f"{min(weight_candidates)}")
    act_fp16_fraction = plain_number(act_fp16_fraction)
    if (isinstance(act_fp16_fraction, bool) or not isinstance(act_fp16_fraction, (int, float))
            or not 0 <= act_fp16_fraction <= 1):
        raise CalibrationError(f"act_fp16_fraction: expected a number in [0, 1] (the share of layers whose "
                               f"activations may stay in 16 bits), got {act_fp16_fraction!r}")
    sensitivity_samples = _int_arg("sensitivity_samples", sensitivity_samples)
    num_timesteps = _int_arg("num_timesteps", num_timesteps, optional=True)
    samples_per_timestep = _int_arg("samples_per_timestep", samples_per_timestep, optional=True)
    units_per_pass = _int_arg("units_per_pass", units_per_pass, optional=True)
    if block_inputs not in ("quantized", "fp"):
        raise CalibrationError(f"block_inputs: expected 'quantized' or 'fp', got {block_inputs!r}")
    iters = _int_arg("iters", iters, minimum=0)
    if not (isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0 and math.isfinite(p)):
        raise CalibrationError(f"p: expected a positive number, got {p!r}")
    num_inference_steps = _int_arg("num_inference_steps", num_inference_steps)
    batch_size = _int_arg("batch_size", batch_size)
    seed = _int_arg("seed", seed, minimum=None)
    if pipe_kwargs is not None:
        if not isinstance(pipe_kwargs, Mapping):
            raise CalibrationError(f"pipe_kwargs: expected a dict of pipeline call arguments or None, "
                                   f"got {type(pipe_kwargs).__name__}")
        taken = [k for k in ("prompt", "num_inference_steps", "generator", "output_type") if k in pipe_kwargs]
        if taken:
            raise CalibrationError(f"pipe_kwargs: {taken[0]!r} is set by calibrate itself (from data, "
                                   f"num_inference_steps and seed); leave it out of pipe_kwargs")

    if backbone is not None and not is_pipeline(target):
        raise CalibrationError("backbone: names a pipeline component; with a module as the target, leave it None")
    if is_pipeline(target):
        component = backbone
        backbone = backbone_of(target, component)
        if component is None:
            component = next(a for a in ("unet", "transformer") if getattr(target, a, None) is backbone)
        if not isinstance(data, str):
            try:
                iter(data)
            except TypeError:
                raise CalibrationError(f"data: a pipeline is calibrated with a prompt string or a list of prompt "
                                       f"strings, got {type(data).__name__}") from None
    elif isinstance(target, nn.Module):
        backbone = target
        if pipe_kwargs:
            raise CalibrationError("pipe_kwargs: pipeline call arguments, but the target is a bare backbone, "
                                   "which is calibrated on the forward-kwargs dicts in data; leave it None")
    else:
        raise CalibrationError(f"target: expected a diffusers pipeline or an nn.Module, got {type(target).__name__}")
    if next(backbone.parameters(), None) is None:
        raise CalibrationError("target: the backbone has no parameters")
    meta = _meta_tensor(backbone)
    if meta is not None:  # sequential offload swaps the weights in for each call only
        prefix = f"{component}." if is_pipeline(target) else ""
        raise CalibrationError(f"target: {prefix}{meta} is on the meta device (weights not loaded yet, or offloaded "
                               f"by sequential CPU offload - accelerate.cpu_offload / enable_sequential_cpu_offload "
                               f"keep them there between calls); calibrate without sequential offload (model "
                               f"offload, enable_model_cpu_offload, is fine)")
    from ... import nn as dnn

    quantized = [name for name, m in backbone.named_modules() if isinstance(m, (dnn.QuantLinear, dnn.QuantConv2d))]
    if quantized:  # calibrating them would find only the layers the patch left in floating point
        raise CalibrationError(f"target: {len(quantized)} layers ({', '.join(quantized[:2])}, ...) are already quantized "
                               f"by diffaccel.patch; calibrate the float model (diffaccel.unpatch(target) first)")
    try:
        device = torch.device(device) if device is not None else next(backbone.parameters()).device
    except (RuntimeError, TypeError) as e:
        raise CalibrationError(f"device: expected a torch device or a name like 'cuda:0' / 'cpu', got {device!r} "
                               f"({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CalibrationError(f"device: {device} requested, but torch sees no CUDA device here")
    if activation_device is not None:
        try:
            activation_device = torch.device(activation_device)
        except (RuntimeError, TypeError) as e:
            raise CalibrationError(f"activation_device: expected None, a torch device or a name like 'cpu', got "
                                   f"{activation_device!r} ({e})") from None
        if activation_device.type == "cuda" and not torch.cuda.is_available():
            raise CalibrationError(f"activation_device: {activation_device} requested, but torch sees no CUDA device "
                                   f"here")
        if activation_device.type not in ("cpu", "cuda"):  # (recorded activations are read back to compute)
            raise CalibrationError(f"activation_device: expected 'cpu' or a CUDA device, got {activation_device}")
    resolve_skip(backbone, skip)  # (checked before the model runs; resolved again on the working copy)
    n_t = num_timesteps if num_timesteps is not None else 10**9

    training = {m: m.training for m in backbone.modules()}
    # AdaRound / LSQ need autograd, and the recipe's tensors must be usable outside inference
    # mode: a call made inside torch.inference_mode works as one made outside
    with torch.inference_mode(False):
        try:
            backbone.eval()
            if is_pipeline(target):
                calib = from_pipeline(target, data, backbone=component, num_inference_steps=num_inference_steps,
                                      num_timesteps=n_t, samples_per_timestep=samples_per_timestep, seed=seed,
                                      batch_size=batch_size, pipe_kwargs=dict(pipe_kwargs or {}), progress=progress)
            else:
                calib = from_backbone_data(data, num_timesteps=n_t, samples_per_timestep=samples_per_timestep,
                                           one_timestep_per_item=method == "tfmq",
                                           key=timestep_parameter(backbone.forward))
                check_forward_kwargs(backbone, calib)
                # (read from the user's model: its working copy gains float32 calibration parameters)
                calib.dtype = compute_dtype(backbone)
            work = working_copy(backbone, device)
            work.eval()
            not_run = tuple(layers_not_run(work, calib, list(quantizable_layers(work)), device))
            if not_run:
                shown = ", ".join(not_run[:8]) + (", ..." if len(not_run) > 8 else "")
                logger.warning("calibration: %d layers never ran on the calibration data and stay in floating "
                               "point: %s", len(not_run), shown)
            ctx = Context(backbone=work, calib=calib, method=method, weight_bits=weight_bits, act_bits=act_bits,
                          device=device, seed=seed, progress=progress, act_symmetric=act_symmetric, number_format=format,
                          skip=resolve_skip(work, skip), activation_device=activation_device, iters=iters, p=float(p),
                          adaround=adaround, learn_act=learn_act, split_shortcut=split_shortcut,
                          temporal_cache=temporal_cache, weight_candidates=tuple(weight_candidates),
                          act_fp16_fraction=act_fp16_fraction, sensitivity_samples=sensitivity_samples, bos=bos,
                          not_run=not_run,
                          units_per_pass=units_per_pass, block_inputs=block_inputs)
            logger.info("calibration[%s]: %d samples at %d timesteps %s", method, len(calib), len(calib.timesteps),
                        [round(t, 3) for t in calib.timesteps.tolist()])
            recipe = METHODS[method](ctx)
            recipe.record_weight_probes(backbone)  # the user's weights, not the working copy's
        finally:
            for m, flag in training.items():
                m.training = flag
    log_allocation(recipe)
    return recipe
