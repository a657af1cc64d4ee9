"""Calibration data: inputs of the backbone collected from a full-precision sampling run (or given
as forward-kwargs dicts), the timesteps they were drawn at, and the statistics / block inputs and
outputs the methods need, gathered by hooks that are always removed again."""
from __future__ import annotations

import copy
import inspect
import logging
import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ...ops._checks import plain_number
from ..recipe import matches_bos, timestep_parameter
from .structure import first_tensor, layer_input, output_tensors

logger = logging.getLogger("diffaccel")
VALUES_PER_OBSERVATION = 1024  # activation values sampled per call of a layer, for range searches
MAX_VALUES_KEPT = 8192         # per (layer, timestep, split half)
TAIL_VALUES_KEPT = 256         # the largest |values| seen, kept exactly, per (layer, timestep, split half)


class CalibrationError(ValueError):
    """Bad calibration input or data (empty, NaN/Inf, unsupported bits, mismatch)."""


def progress_bar(iterable=None, *, total=None, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


# -- the calibration set --------------------------------------------------------------------

@dataclass
class CalibrationSet:
    samples: list[dict]            # forward kwargs of the backbone, tensors on CPU
    t_index: list[int]             # per sample: index into ``timesteps``
    timesteps: torch.Tensor        # [T] calibrated timestep values, in sampling order
    schedule: torch.Tensor         # every timestep the sampler visited (for the record)
    # the dtype the samples' floating inputs are cast to: the user's model's (``compute_dtype``)
    # for data given as forward kwargs; None for a pipeline's recorded calls, replayed as made
    dtype: torch.dtype | None = None

    def __len__(self):
        return len(self.samples)


def spread_indices(num_steps: int, num_timesteps: int) -> list[int]:
    """``num_timesteps`` step indices spread uniformly over a trajectory of ``num_steps`` steps,
    first and last step included (Q-Diffusion's time-step-aware calibration)."""
    if num_timesteps >= num_steps:
        return list(range(num_steps))
    if num_timesteps == 1:
        return [num_steps // 2]
    return sorted({round(i * (num_steps - 1) / (num_timesteps - 1)) for i in range(num_timesteps)})


def timestep_value(ts) -> float:
    if isinstance(ts, torch.Tensor):
        if ts.numel() == 0:
            raise CalibrationError("data: a sample's 'timestep' is an empty tensor")
        return float(ts.reshape(-1)[0].item())
    ts = plain_number(ts)
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        return float(ts)
    raise CalibrationError(f"data: 'timestep' must be a number or a tensor, got {type(ts).__name__}")


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to(device)
        # data made under torch.inference_mode can't enter the reconstructions' autograd: a normal copy
        return t.clone() if t.is_inference() else t
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    if hasattr(obj, "to_tuple"):  # diffusers BaseOutput
        return _to(obj.to_tuple(), device)
    return obj


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _check_finite(name: str, obj):
    if isinstance(obj, torch.Tensor) and obj.is_floating_point() and not torch.isfinite(obj).all():
        raise CalibrationError(f"data: input '{name}' contains NaN or Inf")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(f"{name}.{k}", v)


def _select(groups: dict[float, list[dict]], order: list[float], num_timesteps: int,
            samples_per_timestep: int | None, schedule: list[float]) -> CalibrationSet:
    chosen = [order[i] for i in spread_indices(len(order), num_timesteps)]
    samples, t_index = [], []
    for ti, t in enumerate(chosen):
        group = groups[t] if samples_per_timestep is None else groups[t][:samples_per_timestep]
        samples.extend(group)
        t_index.extend([ti] * len(group))
    return CalibrationSet(samples, t_index, torch.tensor(chosen, dtype=torch.float64),
                          torch.tensor(schedule, dtype=torch.float64))


def from_backbone_data(data, *, num_timesteps: int, samples_per_timestep: int | None,
                       one_timestep_per_item: bool = False, key: str = "timestep") -> CalibrationSet:
    """``data``: an iterable of forward-kwargs dicts, each holding the timestep under ``key``, the
    backbone's name for it (``timestep_parameter``; one value per item with ``one_timestep_per_item``,
    for methods with per-timestep parameters)."""
    if isinstance(data, dict):
        raise CalibrationError("data: expected an iterable of forward-kwargs dicts, got a single dict")
    if data is None or isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise CalibrationError(f"data: expected an iterable of forward-kwargs dicts (or prompts with a pipeline), "
                               f"got {type(data).__name__}")
    groups: dict[float, list[dict]] = {}
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise CalibrationError(f"data: item {i} is a {type(item).__name__}, expected a dict of forward kwargs")
        if key not in item:
            raise CalibrationError(f"data: item {i} has no {key!r}, the backbone's timestep argument (keys: "
                                   f"{sorted(item)})")
        item = _to(dict(item), "cpu")
        _check_finite(f"data[{i}]", item)
        ts = item[key] = plain_number(item[key])  # (a numpy scalar: the backbone takes python's)
        if one_timestep_per_item and isinstance(ts, torch.Tensor) and ts.numel() > 1 \
                and not bool((ts == ts.reshape(-1)[0]).all()):
            # per-timestep parameters (tfmq): the whole item was filed under its first timestep
            raise CalibrationError(f"data: item {i}'s {key!r} mixes timesteps ({ts.reshape(-1).tolist()[:4]}); "
                                   f"one timestep per item: split it into one item per timestep")
        t = timestep_value(ts)
        if not math.isfinite(t):
            raise CalibrationError(f"data: item {i} has a non-finite timestep")
        groups.setdefault(t, []).append(item)
    if not groups:
        raise CalibrationError("data: empty - calibration needs at least one sample")
    order = sorted(groups, reverse=True)  # sampling order: from noise (large t) to clean
    return _select(groups, order, num_timesteps, samples_per_timestep, order)


def check_forward_kwargs(backbone: nn.Module, calib: CalibrationSet) -> None:
    """Each data item against the backbone's ``forward`` signature, before anything runs: a misspelt
    or missing argument is named here instead of surfacing as the model's TypeError mid-calibration."""
    try:
        params = inspect.signature(backbone.forward).parameters
    except (TypeError, ValueError):  # no introspectable signature: the call itself will tell
        return
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = [n for n, p in params.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty]
    for i, item in enumerate(calib.samples):
        unknown = sorted(k for k in item if k not in named and k != "return_dict")
        if unknown and not takes_any:
            raise CalibrationError(f"data: item {i} has {unknown[0]!r}, which {type(backbone).__name__}.forward does "
                                   f"not take (its arguments: {', '.join(sorted(named))})")
        missing = [n for n in required if n not in item]
        if missing:
            raise CalibrationError(f"data: item {i} lacks {missing[0]!r}, a required argument of "
                                   f"{type(backbone).__name__}.forward")


def backbone_of(pipe, name: str | None = None) -> nn.Module:
    """The pipeline's component ``name``, or by default its ``unet`` else its ``transformer``."""
    if name is not None:
        module = getattr(pipe, name, None) if isinstance(name, str) else None
        if not isinstance(module, nn.Module):
            raise CalibrationError(f"backbone: {type(pipe).__name__} has no module component {name!r}")
        return module
    for attr in ("unet", "transformer"):
        module = getattr(pipe, attr, None)
        if isinstance(module, nn.Module):
            return module
    raise CalibrationError(f"target: {type(pipe).__name__} has no 'unet' or 'transformer' backbone")


def is_pipeline(target) -> bool:
    return not isinstance(target, nn.Module) and callable(target) and hasattr(target, "scheduler")


@contextmanager
def _scheduler_state_kept(pipe):
    """The pipeline run sets the user's scheduler's timesteps and step state for the calibration's own
    schedule: put them back afterwards, also when the run fails (diffusers' panorama pipeline saves
    and restores a scheduler the same way)."""
    scheduler = getattr(pipe, "scheduler", None)
    saved = copy.deepcopy(scheduler.__dict__) if scheduler is not None else None
    try:
        yield
    finally:
        if saved is not None:
            for key in set(scheduler.__dict__) - set(saved):
                del scheduler.__dict__[key]
            scheduler.__dict__.update(saved)


def from_pipeline(pipe, prompts, *, backbone: str | None = None, num_inference_steps: int, num_timesteps: int,
                  samples_per_timestep: int | None, seed: int, batch_size: int, pipe_kwargs: dict,
                  progress: bool) -> CalibrationSet:
    """Run the pipeline in full precision with its own scheduler, recording every backbone call."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise CalibrationError("data: empty - calibration needs at least one prompt")
    if not all(isinstance(p, str) for p in prompts):
        raise CalibrationError("data: a pipeline is calibrated with a list of prompt strings")
    backbone = backbone_of(pipe, backbone)
    signature = inspect.signature(backbone.forward)
    key = timestep_parameter(backbone.forward)
    calls: list[dict] = []

    def record(module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        bound.pop("return_dict", None)
        item = _to(dict(bound), "cpu")
        if item.get(key) is None:
            raise CalibrationError(f"target: the pipeline called {type(module).__name__} without its timestep "
                                   f"argument {key!r}")
        if not isinstance(item[key], torch.Tensor):
            item[key] = torch.tensor(float(item[key]))
        calls.append(item)

    # grouped by timestep, not by call: pipelines that run the conditional and unconditional
    # passes as two calls (Wan, true-CFG Flux / QwenImage, modular guiders) call it twice a step
    groups: dict[float, list[dict]] = {}
    with backbone.register_forward_pre_hook(record, with_kwargs=True), _scheduler_state_kept(pipe):
        device = next(backbone.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
        for batch in progress_bar(batches, desc="calibration: collection", enabled=progress):
            calls.clear()
            with torch.no_grad():
                pipe(prompt=batch, num_inference_steps=num_inference_steps, generator=generator,
                     output_type="latent", **pipe_kwargs)
            for call, item in enumerate(calls):
                _check_finite(f"backbone call {call}", item)
                groups.setdefault(timestep_value(item[key]), []).append(item)
    if not groups:
        raise CalibrationError("target: the pipeline run never called its backbone")
    order = list(groups)  # (first-call order: the schedule's)
    return _select(groups, order, num_timesteps, samples_per_timestep, order)


# -- running the backbone on the calibration set ---------------------------------------------

def compute_dtype(backbone: nn.Module) -> torch.dtype:
    """The dtype a model computes in: its first floating parameter's outside the modules diffusers
    keeps in float32 (``_keep_in_fp32_modules``, matched as name substrings as diffusers does: a
    bf16 Kandinsky 5 loads its time embeddings and modulations in float32). Read from the user's
    model, not from a working copy with calibration layers in it: a FakeQuantLayer's own float32
    parameters come before its layer's in ``parameters()``."""
    keep = getattr(backbone, "_keep_in_fp32_modules", None) or ()
    floating = [(n, p.dtype) for n, p in backbone.named_parameters() if p.is_floating_point()]
    fallback = floating[0][1] if floating else torch.float32
    return next((d for n, d in floating if not any(k in n for k in keep)), fallback)


def forward(backbone: nn.Module, kwargs: dict, device, dtype: torch.dtype | None = None, *,
            every_output: bool = False):
    """``backbone(**kwargs)`` on ``device`` -> its main output tensor (``every_output``: the list of
    every output tensor, the main one first); with a ``dtype`` (``CalibrationSet.dtype``) its
    floating tensor arguments but the timestep are cast to it first."""
    kw = _to(kwargs, device)
    kw.pop("return_dict", None)
    if dtype is not None:
        key = timestep_parameter(backbone.forward)
        kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != key else v)
              for k, v in kw.items()}
    out = backbone(**kw, return_dict=False)
    return output_tensors(out) if every_output else first_tensor(out)


@dataclass
class LayerObservation:
    """Per layer and calibrated timestep: input min/max (per concat half when split) and a
    sample of the input values for range searches, stratified by magnitude: the ``tails`` (the
    largest |x| seen, exactly: a single outlier token decides a clipping range, and a uniform
    sample misses it or not depending on the seed) and a uniform sample of the rest, each value
    standing for ``weights`` values of the input (``sample_of`` puts the two together)."""
    lo: torch.Tensor               # [T] or [T, 2]
    hi: torch.Tensor
    values: list[list[torch.Tensor]]  # [T][half] 1-D uniform samples
    weights: list[list[torch.Tensor]]  # [T][half] how many input values each sampled value stands for
    tails: list[list[torch.Tensor]]   # [T][half] the TAIL_VALUES_KEPT largest |values| seen

    def sample_of(self, t: int, half: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, weights) for timestep index ``t`` and split half ``half``: every value with
        |x| above the smallest tail exactly (weight 1), the uniform sample below it."""
        tails, values, weights = self.tails[t][half], self.values[t][half], self.weights[t][half]
        below = values.abs() < tails.abs().min() if tails.numel() else torch.ones_like(values, dtype=torch.bool)
        return torch.cat([tails, values[below]]), torch.cat([torch.ones_like(tails), weights[below]])


@dataclass
class Observations:
    layers: dict[str, LayerObservation] = field(default_factory=dict)
    block_io: dict[str, list[tuple]] = field(default_factory=dict)   # name -> [(args, kwargs, out, t_index)]
    module_out: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [T, ...] output row 0
    outputs: list[list[torch.Tensor]] = field(default_factory=list)  # per sample: every output tensor (CPU)
    split_points: dict[str, int] = field(default_factory=dict)


def observe(backbone: nn.Module, calib: CalibrationSet, *, layers: list[str], device,
            bos_inputs: dict[str, torch.Tensor] | None = None, split_points: dict[str, int] | None = None,
            capture_blocks: tuple[str, ...] = (), capture_outputs_of: tuple[str, ...] = (),
            storage: str | torch.device | None = None, seed: int = 0, progress: bool = True,
            desc: str = "calibration: collection", on_sample=None) -> Observations:
    """One full-precision pass over the calibration set with hooks; nothing of the model changes."""
    split_points = split_points or {}
    bos_inputs = bos_inputs or {}
    modules = dict(backbone.named_modules())
    T = len(calib.timesteps)
    obs = Observations(split_points=dict(split_points))
    gen = torch.Generator().manual_seed(seed)
    storage_dev = torch.device(storage) if storage is not None else None
    state = {"t": 0, "sample": 0}
    for name in layers:
        halves = 2 if name in split_points else 1
        shape = (T, 2) if halves == 2 else (T,)
        obs.layers[name] = LayerObservation(torch.full(shape, math.inf), torch.full(shape, -math.inf),
                                            *([[torch.empty(0) for _ in range(halves)] for _ in range(T)]
                                              for _ in range(3)))

    def stat_hook(name):
        def hook(module, args, kwargs):
            x = layer_input(args, kwargs).detach()
            if x.numel() == 0:  # (AnyFlow-FAR runs a projection on zero compressed frames)
                return
            if not torch.isfinite(x).all():
                raise CalibrationError(
                    f"activations: the input of layer '{name}' contains NaN or Inf at timestep "
                    f"{calib.timesteps[state['t']].item():g} (sample {state['sample']})")
            if name in bos_inputs and x.dim() == 3 and x.shape[1] > 1:
                # MixDQ: a BOS token 0 is computed in full precision, not quantized; other rows' token 0 is
                first = x[:, 0][~matches_bos(x[:, 0], bos_inputs[name])]
                x = torch.cat([first, x[:, 1:].reshape(-1, x.shape[-1])])
            o = obs.layers[name]
            t = state["t"]
            parts = [x] if name not in split_points else [x[:, :split_points[name]], x[:, split_points[name]:]]
            for h, part in enumerate(parts):
                pf = part.float()
                lo, hi = pf.min().cpu(), pf.max().cpu()
                if len(parts) == 2:
                    o.lo[t, h] = torch.minimum(o.lo[t, h], lo)
                    o.hi[t, h] = torch.maximum(o.hi[t, h], hi)
                else:
                    o.lo[t] = torch.minimum(o.lo[t], lo)
                    o.hi[t] = torch.maximum(o.hi[t], hi)
                # sampled where the activation is (one small copy to the host, not the whole tensor)
                flat = pf.reshape(-1)
                n = min(VALUES_PER_OBSERVATION, flat.numel())
                pick = torch.randint(0, flat.numel(), (n,), generator=gen)
                kept = torch.cat([o.values[t][h], flat[pick.to(flat.device)].cpu()])
                weights = torch.cat([o.weights[t][h], torch.full((n,), flat.numel() / n)])
                if kept.numel() > MAX_VALUES_KEPT:  # bounded memory on long calibration sets
                    keep = torch.randperm(kept.numel(), generator=gen)[:MAX_VALUES_KEPT]
                    kept, weights = kept[keep], weights[keep] * (kept.numel() / MAX_VALUES_KEPT)
                o.values[t][h], o.weights[t][h] = kept, weights
                # the running top-k of |x| merged with this call's top-k is the top-k of all calls; once
                # k are kept, only values above the smallest of them can enter (a top-k over the whole
                # input is ~35x a min/max pass on a CPU: the filter leaves it a few values)
                tails = o.tails[t][h]
                mag = flat.abs()
                if tails.numel() >= TAIL_VALUES_KEPT:
                    above = mag > tails.abs().min().to(flat.device)
                    flat, mag = flat[above], mag[above]
                top = flat[mag.topk(min(TAIL_VALUES_KEPT, flat.numel())).indices].cpu()
                tails = torch.cat([tails, top])
                o.tails[t][h] = tails[tails.abs().topk(min(TAIL_VALUES_KEPT, tails.numel())).indices]
        return hook

    captured: dict[str, dict] = {}

    def block_pre(name):
        def hook(module, args, kwargs):
            captured[name] = {"args": _to(args, storage_dev or device), "kwargs": _to(kwargs, storage_dev or device)}
        return hook

    def block_post(name):
        def hook(module, args, kwargs, out):
            c = captured.pop(name)
            obs.block_io.setdefault(name, []).append(
                (c["args"], c["kwargs"], _to(out, storage_dev or device), state["t"]))
        return hook

    def out_hook(name):
        def hook(module, args, out):
            t = state["t"]
            store = obs.module_out.setdefault(name, {})
            if t not in store:
                store[t] = _to(out, "cpu")
        return hook

    with ExitStack() as hooks:
        for name in layers:
            hooks.enter_context(modules[name].register_forward_pre_hook(stat_hook(name), with_kwargs=True))
        for name in capture_blocks:
            hooks.enter_context(modules[name].register_forward_pre_hook(block_pre(name), with_kwargs=True))
            hooks.enter_context(modules[name].register_forward_hook(block_post(name), with_kwargs=True))
        for name in capture_outputs_of:
            hooks.enter_context(modules[name].register_forward_hook(out_hook(name)))
        with torch.no_grad():
            for i in progress_bar(range(len(calib)), desc=desc, enabled=progress):
                state["t"], state["sample"] = calib.t_index[i], i
                if on_sample is not None:
                    on_sample(calib.t_index[i])
                outs = forward(backbone, calib.samples[i], device, calib.dtype, every_output=True)
                if not all(torch.isfinite(o).all() for o in outs):
                    raise CalibrationError(f"activations: the backbone output contains NaN or Inf (sample {i})")
                obs.outputs.append([o.detach().cpu() for o in outs])
                if i == 0 and storage_dev is None:
                    storage_dev = _storage_for(obs, len(calib), device)
                    obs.block_io = {k: [(_to(a, storage_dev), _to(kw, storage_dev), _to(o, storage_dev), t)
                                        for a, kw, o, t in v] for k, v in obs.block_io.items()}
    return obs


def layers_not_run(backbone: nn.Module, calib: CalibrationSet, layers: list[str], device) -> list[str]:
    """The ``layers`` no calibration sample gives an input: a branch the data never takes (Stable
    Audio 3's inpainting projections, Kandinsky 6's audio path run video-only, Cosmos 3's LM head).
    Samples run until every layer has run: one forward when all run on the first."""
    pending = set(layers)
    modules = dict(backbone.named_modules())

    def hook(name):
        def fn(module, args, kwargs):
            if layer_input(args, kwargs).numel():
                pending.discard(name)
        return fn

    with ExitStack() as hooks, torch.no_grad():
        for name in layers:
            hooks.enter_context(modules[name].register_forward_pre_hook(hook(name), with_kwargs=True))
        for sample in calib.samples:
            if not pending:
                break
            forward(backbone, sample, device, calib.dtype)
    return [n for n in layers if n in pending]


def _storage_for(obs: Observations, num_samples: int, device) -> torch.device:
    """Block inputs/outputs stay on the compute device only when all of them fit comfortably."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    need = tensor_bytes([v for v in obs.block_io.values()]) * num_samples
    free, _ = torch.cuda.mem_get_info(device)
    if need > 0.4 * free:
        logger.info("calibration: keeping %.1f GiB of block activations on the CPU", need / 2**30)
        return torch.device("cpu")
    return device


def working_copy(backbone: nn.Module, device) -> nn.Module:
    """The user's model when it already lives on ``device`` (only read, under hooks that are
    removed), else a copy moved there: calibration never changes the model it is given."""
    p = next(backbone.parameters())
    if p.device == torch.empty(0, device=device).device:
        return backbone
    return copy.deepcopy(backbone).to(device)
