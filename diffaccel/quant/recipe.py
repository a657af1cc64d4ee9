"""A calibrated quantization recipe: per layer its spec, bits, weight scales (and learned-rounding
integer weights), static activation scale / zero point (one set per calibrated timestep where the
method has them), split point, smoothing and BOS handling; plus the calibrated timesteps and the
temporal feature cache. Saved as one safetensors file whose header metadata holds the JSON
description (format version included); never pickle.

Applying a recipe (used by ``diffaccel.patch(model, quant=recipe)``)::

    new_modules, installers, skipped = recipe.build_modules(backbone)
    # new_modules: {qualified_name: module to put in place of backbone.get_submodule(name)}
    # installers:  [install(backbone) -> remove()]  runtime hooks (the step-state pre-hook that maps
    #              the `timestep` argument to the calibrated timestep index, on the device, no sync,
    #              and its post-hook that ends the call's index)
    # skipped:     {qualified_name: why the layer stays in floating point}

``build_modules`` validates first (missing / extra layers, shape or kind mismatch raise
``RecipeError`` naming the layer) and never changes the backbone. A recipe also holds a probe of
each quantized layer's weights (a few values at fixed positions): a model of the same architecture
with other weights (another checkpoint or fine-tune, Wan 2.2's second expert) is refused too, since
the recipe's scales, and its learned-rounding codes, belong to the weights it was calibrated on.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import pathlib
import threading
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .._moves import FollowsMoves
from ..nn._base import QuantLayerWrapper

RECIPE_FORMAT_VERSION = 3  # 2: weight probes; 3: the BOS input beside the BOS output (older files load)
_META_KEY = "diffaccel_recipe"
WEIGHT_PROBE_SIZE = 16
_log = logging.getLogger("diffaccel")
_TENSOR_FIELDS = ("weight_scale", "weight_q", "act_scale", "act_zero_point", "smooth", "bos_output", "bos_input")
_TENSOR_DTYPES = {"weight_scale": (torch.float32,), "weight_q": (torch.int8, torch.float8_e4m3fn),
                  "act_scale": (torch.float32,), "act_zero_point": (torch.int32,), "smooth": (torch.float32,),
                  "bos_output": (torch.float32,), "bos_input": (torch.float32,)}
# MixDQ's BOS path: a token 0 within this relative L2 distance of the calibrated BOS input takes the
# precomputed output. Loose enough for a recipe calibrated in fp32 applied to an fp16 / bf16 text
# encoder's output; a zeroed token 0 is at distance 1, and CLIP's other tokens about as far.
BOS_MATCH_RTOL = 0.05


class RecipeError(ValueError):
    """A recipe that can't be read, or that does not match the model it is applied to."""


def weight_probe(weight: torch.Tensor) -> torch.Tensor:
    """WEIGHT_PROBE_SIZE values of ``weight`` at evenly spaced flat positions, in its own dtype, on the CPU."""
    flat = weight.detach().reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, min(WEIGHT_PROBE_SIZE, flat.numel()), device=flat.device).round().long()
    return flat[idx].cpu().clone()


def matches_bos(first_tokens: torch.Tensor, bos_input: torch.Tensor) -> torch.Tensor:
    """[B, D] token-0 rows -> [B] bool: which rows are the calibrated BOS input (within
    BOS_MATCH_RTOL); computed on the device, no host sync."""
    x = first_tokens.float()
    b = bos_input.to(device=x.device, dtype=torch.float32)
    return (x - b).norm(dim=-1) <= BOS_MATCH_RTOL * b.norm()


def _probe_mismatch(probe: torch.Tensor, weight: torch.Tensor):
    """None if ``weight`` holds the probed values, up to the rounding of the coarser of the two
    dtypes (a recipe calibrated in fp32 applies to the model cast to fp16 / bf16, and the other way
    round); else the largest relative difference."""
    got = weight_probe(weight)
    if got.shape != probe.shape:
        return float("inf")
    eps = max(torch.finfo(probe.dtype).eps, torch.finfo(got.dtype).eps)
    tiny = max(torch.finfo(probe.dtype).tiny, torch.finfo(got.dtype).tiny)
    a, b = probe.float(), got.float()
    mag = torch.maximum(a.abs(), b.abs())
    if bool(((a - b).abs() <= 2 * eps * mag + tiny).all()):
        return None
    return float(((a - b).abs() / mag.clamp(min=tiny)).max())


@dataclass
class LayerRecipe:
    kind: str                                  # "linear" | "conv2d"
    weight_shape: tuple
    spec: dict                                 # QuantSpec.to_dict()
    weight_scale: torch.Tensor | None = None   # fp32 [O]: per output channel
    weight_q: torch.Tensor | None = None       # int8 (float8_e4m3fn for fp8) [O, K] (conv: K = I*kh*kw) learned-rounding codes
    act_scale: torch.Tensor | None = None      # fp32 [T] (or [T, 2] with act_split)
    act_zero_point: torch.Tensor | None = None  # int32, same shape
    act_split: int | None = None               # conv input channels [0:C1) and [C1:) quantized apart
    smooth: torch.Tensor | None = None         # fp32 [K_in] per-input-channel smoothing
    bos_output: torch.Tensor | None = None     # fp32 [O]: the layer's full-precision output for the BOS token
    bos_input: torch.Tensor | None = None      # fp32 [I]: the layer's input for it (None in format <= 2 files)

    @property
    def weight_bits(self) -> int:
        return {"int8": 8, "int4": 4, "fp8_e4m3": 8, "fp4_e2m1": 4}[self.spec["weight_dtype"]]

    @property
    def act_bits(self) -> int:
        return 16 if self.spec.get("act_dtype") is None else 8

    def quant_spec(self):
        from .formats import QuantSpec

        return QuantSpec.from_dict(self.spec)


@dataclass
class QuantRecipe:
    method: str
    layers: dict[str, LayerRecipe]
    model_layers: dict[str, tuple]              # every Linear/Conv2d of the calibrated backbone -> weight shape
    skipped: dict[str, str] = field(default_factory=dict)      # layer -> why it stays in floating point
    timesteps: torch.Tensor | None = None       # [T] calibrated timestep values (sampling order)
    temporal_cache: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # module -> [T, ...] outputs
    meta: dict = field(default_factory=dict)
    weight_probes: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> weight_probe() of its weights

    def record_weight_probes(self, backbone: nn.Module) -> None:
        """Probe the quantized layers' weights of ``backbone`` (the model calibrated)."""
        from .calibrate.structure import quantizable_layers

        present = quantizable_layers(backbone)
        self.weight_probes = {name: weight_probe(present[name].weight) for name in self.layers if name in present}

    # -- summary -------------------------------------------------------------------------
    def bits(self) -> dict[str, tuple[int, int]]:
        """{layer: (weight_bits, act_bits)}."""
        return {n: (lr.weight_bits, lr.act_bits) for n, lr in self.layers.items()}

    def average_weight_bits(self) -> float:
        total = sum(math.prod(lr.weight_shape) for lr in self.layers.values())
        return sum(math.prod(lr.weight_shape) * lr.weight_bits for lr in self.layers.values()) / max(total, 1)

    def __repr__(self):
        return (f"QuantRecipe(method={self.method!r}, layers={len(self.layers)}, skipped={len(self.skipped)}, "
                f"timesteps={None if self.timesteps is None else len(self.timesteps)}, "
                f"avg_weight_bits={self.average_weight_bits():.2f}, cache={sorted(self.temporal_cache)})")

    # -- persistence ---------------------------------------------------------------------
    def save(self, path) -> None:
        from safetensors.torch import save_file

        path = _check_path(path)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"path: the directory {str(path.parent)!r} does not exist")
        if path.is_dir():
            raise IsADirectoryError(f"path: {str(path)!r} is a directory; give a file name (e.g. recipe.safetensors)")
        tensors: dict[str, torch.Tensor] = {}
        layers = {}
        for name, lr in self.layers.items():
            entry = {"kind": lr.kind, "weight_shape": list(lr.weight_shape), "spec": lr.spec,
                     "act_split": lr.act_split, "tensors": []}
            for f in _TENSOR_FIELDS:
                t = getattr(lr, f)
                if t is not None:
                    tensors[f"layer/{name}/{f}"] = t.detach().cpu().contiguous()
                    entry["tensors"].append(f)
            layers[name] = entry
        cache = {}
        for name, values in self.temporal_cache.items():
            for i, v in enumerate(values):
                tensors[f"cache/{name}/{i}"] = v.detach().cpu().contiguous()
            cache[name] = len(values)
        if self.timesteps is not None:
            tensors["timesteps"] = self.timesteps.detach().cpu().to(torch.float64).contiguous()
        for name, probe in self.weight_probes.items():
            tensors[f"probe/{name}"] = probe.contiguous()
        header = {"format_version": RECIPE_FORMAT_VERSION, "method": self.method, "layers": layers,
                  "model_layers": {k: list(v) for k, v in self.model_layers.items()}, "skipped": self.skipped,
                  "temporal_cache": cache, "meta": self.meta}
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(header)})

    @classmethod
    def load(cls, path) -> "QuantRecipe":
        from safetensors import safe_open

        path = _check_path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise RecipeError(f"path: {path} is not a readable diffaccel recipe (safetensors: {e})") from None
        if _META_KEY not in metadata:
            raise RecipeError(f"path: {path} is a safetensors file without a diffaccel recipe header")
        try:
            header = json.loads(metadata[_META_KEY])
            version = header["format_version"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise RecipeError(f"path: {path} has a corrupt recipe header ({e})") from None
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RecipeError(f"path: {path} has a corrupt recipe header (format_version {version!r})")
        if version > RECIPE_FORMAT_VERSION:
            raise RecipeError(f"path: {path} is recipe format version {version}; this diffaccel reads versions "
                              f"up to {RECIPE_FORMAT_VERSION} - upgrade diffaccel")
        try:
            layers = {}
            for name, e in header["layers"].items():
                kw = {f: tensors[f"layer/{name}/{f}"] for f in e["tensors"]}
                layers[name] = LayerRecipe(kind=e["kind"], weight_shape=tuple(e["weight_shape"]), spec=e["spec"],
                                           act_split=e["act_split"], **kw)
            cache = {n: [tensors[f"cache/{n}/{i}"] for i in range(k)] for n, k in header["temporal_cache"].items()}
            recipe = cls(method=header["method"], layers=layers,
                         model_layers={k: tuple(v) for k, v in header["model_layers"].items()},
                         skipped=dict(header["skipped"]), timesteps=tensors.get("timesteps"),
                         temporal_cache=cache, meta=dict(header["meta"]),
                         weight_probes={k[len("probe/"):]: v for k, v in tensors.items() if k.startswith("probe/")})
        except (KeyError, TypeError, AttributeError) as e:
            raise RecipeError(f"path: {path} has a corrupt recipe (missing or malformed entry {e})") from None
        for name, lr in recipe.layers.items():
            try:  # an unknown format in the file fails here, naming nothing half-built
                lr.quant_spec()
            except (TypeError, ValueError) as e:
                raise RecipeError(f"path: {path}: layer '{name}' has an invalid spec ({e})") from None
            if len(lr.weight_shape) not in (2, 4) or not all(isinstance(d, int) and d > 0 for d in lr.weight_shape):
                raise RecipeError(f"path: {path}: layer '{name}' has an invalid weight_shape {list(lr.weight_shape)}")
            for f, dtypes in _TENSOR_DTYPES.items():
                t = getattr(lr, f)
                if t is not None and t.dtype not in dtypes:
                    raise RecipeError(f"path: {path}: layer '{name}' holds {f} as {t.dtype}, expected "
                                      f"{' or '.join(str(d) for d in dtypes)}")
        return recipe

    # -- applying ------------------------------------------------------------------------
    def model_names(self, backbone: nn.Module) -> dict[str, str]:
        """Each ``model_layers`` name of the recipe -> the name of that layer in ``backbone``. A LoRA
        loaded through peft moves a layer to ``<name>.base_layer`` and adds its lora_A / lora_B
        branches: a recipe calibrated without the LoRA applies to the model with it (the LoRA stays
        in floating point beside the quantized base), and the other way round."""
        from ..integrations.targets import is_lora_branch
        from .calibrate.structure import quantizable_layers

        present = {n for n in quantizable_layers(backbone) if not is_lora_branch(n)}
        by_key = {_lora_free(n): n for n in present}
        return {name: by_key.get(_lora_free(name), name) for name in self.model_layers if not is_lora_branch(name)}

    def validate(self, backbone: nn.Module) -> None:
        """Raise RecipeError naming the first layer that doesn't match ``backbone``."""
        from ..integrations.targets import is_lora_branch
        from .calibrate.structure import layer_kind, quantizable_layers

        present = quantizable_layers(backbone)
        found = {n: tuple(m.weight.shape) for n, m in present.items() if not is_lora_branch(n)}
        where = self.model_names(backbone)
        for name, at in where.items():
            if at not in found:
                raise RecipeError(f"recipe: layer '{name}' of the recipe is not a Linear/Conv2d of this model "
                                  f"(missing, or already replaced)")
        calibrated = set(where.values())
        for name in found:
            if name not in calibrated:
                raise RecipeError(f"recipe: the model has a layer '{name}' the recipe was not calibrated for")
        for name, at in where.items():
            if tuple(self.model_layers[name]) != found[at]:
                raise RecipeError(f"recipe: layer '{at}' has weight shape {found[at]}, "
                                  f"the recipe expects {tuple(self.model_layers[name])}")
        steps = None if self.timesteps is None else len(self.timesteps)
        for name, lr in self.layers.items():
            if name not in where:  # (an edited file: every quantized layer is one of the model's layers)
                raise RecipeError(f"recipe: layer '{name}' has a recipe entry but is not among the recipe's "
                                  f"model layers (a damaged or edited recipe)")
            at = where[name]
            if layer_kind(present[at]) != lr.kind:
                raise RecipeError(f"recipe: layer '{at}' is a {type(present[at]).__name__}, "
                                  f"the recipe holds a {lr.kind}")
            if tuple(lr.weight_shape) != found[at]:
                raise RecipeError(f"recipe: layer '{at}''s entry has weight shape {tuple(lr.weight_shape)}, the "
                                  f"layer {found[at]} (a damaged or edited recipe)")
            sets = None if lr.act_scale is None else lr.act_scale.shape[0]
            if sets is not None and sets > 1 and sets != steps:
                raise RecipeError(f"recipe: layer '{at}' holds {sets} sets of activation parameters for "
                                  f"{steps} calibrated timesteps (a damaged or edited recipe)")
            for field_name, size in (("bos_output", lr.weight_shape[0]), ("bos_input", lr.weight_shape[-1])):
                t = getattr(lr, field_name)
                if t is not None and (lr.kind != "linear" or tuple(t.shape) != (size,)):
                    raise RecipeError(f"recipe: layer '{name}' has a {field_name} of shape {tuple(t.shape)}; "
                                      f"a {lr.kind} of weight shape {tuple(lr.weight_shape)} takes ({size},) "
                                      f"(and only linear layers have one)")
        if not self.weight_probes:
            _log.warning("recipe: no weight probes (a format-1 file): whether this model has the weights it was "
                         "calibrated on is not checked")
        else:
            unprobed = [n for n in self.layers if n not in self.weight_probes]
            if unprobed:
                raise RecipeError(f"recipe: layer '{unprobed[0]}' has no weight probe, which every quantized layer "
                                  f"of a recipe has (a damaged or edited recipe)")
        for name, probe in self.weight_probes.items():
            at = where.get(name, name)
            if at not in present:
                raise RecipeError(f"recipe: a weight probe for '{name}', which is not a layer of this model")
            diff = _probe_mismatch(probe, present[at].weight)
            if diff is not None:
                raise RecipeError(f"recipe: layer '{at}' has other weights than the model the recipe was "
                                  f"calibrated on (sampled values differ by up to {diff:.3g} relative): a recipe's "
                                  f"scales and rounding belong to one set of weights; calibrate this model")
        modules = dict(backbone.named_modules())
        for name in self.temporal_cache:
            if name not in modules:
                raise RecipeError(f"recipe: temporal-cache module '{name}' is not in this model")
            inside = [n for n in self.layers if n.startswith(name + ".")]
            if inside:
                raise RecipeError(f"recipe: layer '{inside[0]}' is both quantized and inside the cached "
                                  f"module '{name}'")
        if (self.temporal_cache or self._per_timestep()) and self.timesteps is None:
            raise RecipeError("recipe: per-timestep parameters but no calibrated timesteps")

    def _per_timestep(self) -> bool:
        return any(lr.act_scale is not None and lr.act_scale.shape[0] > 1 for lr in self.layers.values())

    def build_modules(self, backbone: nn.Module):
        """-> (new_modules, installers, skipped); see the module docstring. The backbone is not changed."""
        self.validate(backbone)
        from .. import nn as dnn

        modules = dict(backbone.named_modules())
        where = self.model_names(backbone)
        needs_state = bool(self.temporal_cache) or self._per_timestep()
        state = StepState(self.timesteps, exact=bool(self.temporal_cache)) if needs_state else None
        new: dict[str, nn.Module] = {}
        if any(lr.bos_output is not None and lr.bos_input is None for lr in self.layers.values()):
            _log.warning("recipe: a format-2 MixDQ recipe has no BOS input to compare with: its BOS output "
                         "replaces token 0 of every text input, also where that token is not CLIP's BOS "
                         "(a zeroed negative prompt); recalibrate to have it replaced only where it is")
        for recipe_name, lr in self.layers.items():
            name = where[recipe_name]
            original = modules[name]
            spec = lr.quant_spec()
            reason = dnn.quantize_reason(original, spec)
            if reason is not None:
                raise RecipeError(f"recipe: layer '{name}' can't take its recipe spec here: {reason}")
            q = _quantized_layer(original, lr, spec, dnn)
            if state is not None and lr.act_scale is not None:
                q.step_state = state
            if lr.bos_output is not None:
                bos_input = None if lr.bos_input is None else lr.bos_input.to(original.weight.dtype)
                q = BOSPrecomputed(q, lr.bos_output.to(original.weight.dtype), bos_input)
            new[name] = q
        for name, values in self.temporal_cache.items():
            dtype = _param_dtype(modules[name])
            new[name] = TemporalFeatureCache(values, state, dtype, tuple_output=len(values) > 1,
                                             batch_from=_batch_source(modules[name]))
        installers = [state.installer(backbone)] if state is not None else []
        skipped = {where.get(n, n): why for n, why in self.skipped.items()}
        for name, at in where.items():  # (an edited file: a layer with neither an entry nor a reason)
            if name not in self.layers and at not in skipped:
                skipped[at] = "the recipe keeps it in floating point (no recipe entry)"
        return new, installers, skipped


def _lora_free(name: str) -> str:
    """``name`` without peft's ``base_layer`` steps (where a LoRA wrapper moved the layer)."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def build_quantized_modules(backbone: nn.Module, recipe: QuantRecipe):
    """Function form of ``QuantRecipe.build_modules``."""
    return recipe.build_modules(backbone)


def _param_dtype(module: nn.Module) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else torch.float32


def _quantized_layer(original: nn.Module, lr: LayerRecipe, spec, dnn) -> nn.Module:
    kw = {}
    if lr.weight_scale is not None:
        weight_q = lr.weight_q
        if weight_q is None:  # scale calibrated, rounding to nearest (the kernels' convention)
            from .calibrate.fakequant import quantize_weight, weight_grid

            weight_q = quantize_weight(original.weight.reshape(original.weight.shape[0], -1), lr.weight_scale,
                                       weight_grid(spec.weight_dtype))
        kw["weight_q"] = weight_q.reshape(weight_q.shape[0], -1)
        kw["weight_scale"] = lr.weight_scale
    if lr.act_scale is not None:
        kw["act_scale"] = lr.act_scale
        kw["act_zero_point"] = lr.act_zero_point
    if lr.smooth is not None:
        kw["smooth"] = lr.smooth
    if lr.act_split is not None:
        kw["act_split"] = lr.act_split
    cls = dnn.QuantConv2d if lr.kind == "conv2d" else dnn.QuantLinear
    return cls.from_float(original, spec, **kw)


def _batch_source(module: nn.Module) -> str:
    """Where a cached module's call carries the batch size."""
    params = inspect.signature(module.forward).parameters
    return "batch_size" if "batch_size" in params else "arg0"


def _check_path(path) -> pathlib.Path:
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise TypeError(f"path: expected a file path (str or os.PathLike), got {type(path).__name__}")
    return pathlib.Path(path)


# HiDream's forward names it timesteps, Z-Image's t, Stable Cascade's timestep_ratio; Cosmos 3 has one per
# modality (vision_timesteps, sound_timesteps, ...): the vision stream's is calibrated on
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "timestep_ratio", "vision_timesteps")


def timestep_parameter(forward) -> str:
    """The name ``forward`` gives its timestep argument: the first of TIMESTEP_NAMES it takes."""
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return TIMESTEP_NAMES[0]
    return next((n for n in TIMESTEP_NAMES if n in params), TIMESTEP_NAMES[0])


class StepState:
    """The index of the calibrated timestep the backbone is running at, as a 0-d int64 tensor on
    the model's device (``.index``), updated by a forward pre-hook on the backbone with device ops
    only (no ``.item()``, so a sampling loop stays capturable in a CUDA graph). With ``exact``
    (a temporal feature cache is in use) a timestep outside the calibrated set fails an async
    device assert instead of silently reusing the nearest cached features.

    Each backbone call has its own index: per thread, a stack of the calls running (``StepHook``
    pushes, its post-hook pops), so that two threads calling one model, or a call nested in another
    (from a forward hook), each read their own timestep; with one shared index they read each
    other's, silently. Inside torch.compile, which traces no thread-local state, and outside any
    call, ``.index`` is the last call's (``_index``, which every call also writes)."""

    def __init__(self, timesteps: torch.Tensor, *, exact: bool):
        self.timesteps = timesteps.detach().to(torch.float64).cpu()
        self.exact = exact
        self._index = torch.zeros((), dtype=torch.int64)
        self._tables: dict[torch.device, torch.Tensor] = {}
        self._calls = threading.local()

    @property
    def index(self) -> torch.Tensor:
        stack = self.calls()
        return stack[-1] if stack else self._index

    def calls(self) -> Optional[list]:
        """This thread's stack of running calls' indices; None inside torch.compile."""
        if torch.compiler.is_compiling():
            return None
        stack = getattr(self._calls, "stack", None)
        if stack is None:
            stack = self._calls.stack = []
        return stack

    # (thread-local state neither pickles nor deep-copies: a copy starts with no call running)
    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_calls"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._calls = threading.local()

    def _table(self, device) -> torch.Tensor:
        if device not in self._tables:
            self._tables[device] = self.timesteps.to(device=device, dtype=torch.float32)
        return self._tables[device]

    def update(self, timestep, device) -> torch.Tensor:
        """Set the shared index to ``timestep``'s and return it as a tensor of its own (the call's)."""
        device = torch.device(device)
        table = self._table(device)
        t = torch.as_tensor(timestep, device=device).to(torch.float32).reshape(-1)
        t0 = t[:1]
        dist = (table - t0).abs()
        idx = torch.argmin(dist)
        if self.exact:
            tol = 1e-4 * torch.clamp(t0.abs(), min=1.0)
            torch._assert_async(((dist.min() <= tol) & (t == t0).all()).reshape(()),
                                "diffaccel: a TFMQ recipe with a temporal feature cache runs only at the "
                                "timesteps it was calibrated on (recipe.timesteps): sample with that schedule "
                                "(same scheduler and num_inference_steps), or calibrate with temporal_cache=False")
        else:  # (one set of scales per call: sample 0's would silently serve the whole batch)
            torch._assert_async((t == t0).all().reshape(()),
                                "diffaccel: a per-timestep recipe takes one timestep per call, but this batch mixes "
                                "timesteps: call the backbone once per timestep")
        if self._index.device != device:
            with torch.inference_mode(False):  # a first call under inference_mode must not make every later one fail
                self._index = torch.zeros((), dtype=torch.int64, device=device)
        self._index.copy_(idx)
        return idx

    def installer(self, backbone: nn.Module):
        params = list(inspect.signature(backbone.forward).parameters)
        name = timestep_parameter(backbone.forward)
        hook = StepHook(self, params.index(name) if name in params else None, name)

        def install(target: nn.Module):
            handles = (target.register_forward_pre_hook(hook, with_kwargs=True),
                       target.register_forward_hook(hook.leave, always_call=True))

            def remove():
                for handle in handles:
                    handle.remove()
            return remove

        return install


class StepHook:
    """The backbone's forward pre-hook that moves ``state`` to the call's timestep. An object rather
    than a closure: ``copy.deepcopy`` of the patched backbone then copies it together with the layers
    that read ``state`` (one copied state for both, so a copy follows its own timesteps, not the
    original's), and ``torch.save`` can pickle it."""

    def __init__(self, state: StepState, position: Optional[int], name: str = "timestep"):
        self.state = state
        self.position = position  # of the timestep among forward's positional parameters
        self.name = name          # forward's name for it (timestep_parameter)

    def __call__(self, module, args, kwargs):
        stack = self.state.calls()
        if stack is not None:  # (first: ``leave`` pops it also when what follows raises)
            stack.append(self.state._index)
        name = getattr(self, "name", "timestep")  # (a hook pickled before it had a name)
        if name in kwargs:
            t = kwargs[name]
        elif self.position is not None and len(args) > self.position:
            t = args[self.position]
        else:
            raise RuntimeError(f"diffaccel: the quantized backbone needs its `{name}` argument to pick "
                               "the calibrated per-timestep parameters")
        first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
        idx = self.state.update(t, first.device if first is not None else self.state._index.device)
        if stack is not None:
            stack[-1] = idx

    def leave(self, module, args, output):
        """The backbone's post-hook (``always_call``: also when its forward raises an Exception; a
        KeyboardInterrupt skips it and leaves one entry behind, which the next call's sits above)."""
        stack = self.state.calls()
        if stack:
            stack.pop()


class BOSPrecomputed(QuantLayerWrapper, FollowsMoves, nn.Module):
    """MixDQ's BOS-aware text path: where token 0 is CLIP's BOS (the same for every prompt, huge
    magnitude), the layer's full-precision output for it, computed at calibration, replaces the
    quantized one (whose activation range was calibrated without the BOS). Other token-0 rows
    (SDXL's zeroed negative prompt, edited embeddings) keep the quantized layer's output; the
    choice is made per row on the device. ``bos_input=None`` (format-2 recipes) replaces every row."""

    def __init__(self, layer: nn.Module, bos_output: torch.Tensor, bos_input: torch.Tensor | None = None):
        super().__init__()
        self.layer = layer
        self.register_buffer("bos_output", bos_output.detach().clone())
        self.register_buffer("bos_input", None if bos_input is None else bos_input.detach().clone())
        self.original_dtype = bos_output.dtype  # the float layer's (FollowsMoves: unpatch casts it alike)

    def _apply(self, fn, recurse=True):
        self.record_move(fn, self.bos_output.device)
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        if y.dim() != 3 or y.shape[1] == 0:
            return y
        bos = self.bos_output.to(dtype=y.dtype, device=y.device).expand(y.shape[0], 1, y.shape[2])
        if self.bos_input is not None:
            bos = torch.where(matches_bos(x[:, 0], self.bos_input).reshape(-1, 1, 1), bos, y[:, :1])
        return torch.cat([bos, y[:, 1:]], dim=1)


class TemporalFeatureCache(FollowsMoves, nn.Module):
    """TFMQ-DM's cache-based maintenance: the full-precision output of a module that depends only
    on the timestep, precomputed for each calibrated timestep and looked up by the step state's
    index; it replaces computing the module (and is exactly its output)."""

    def __init__(self, values: list[torch.Tensor], state: StepState, dtype: torch.dtype, *,
                 tuple_output: bool, batch_from: str):
        super().__init__()
        self.state = state
        self.tuple_output = tuple_output
        self.batch_from = batch_from
        for i, v in enumerate(values):
            self.register_buffer(f"value_{i}", v.detach().to(dtype).clone())
        self.num_values = len(values)
        self.original_dtype = dtype  # the cached module's (FollowsMoves: unpatch casts it alike)

    def _apply(self, fn, recurse=True):
        self.record_move(fn, self.value_0.device)
        return super()._apply(fn, recurse)

    def forward(self, *args, **kwargs):
        if self.batch_from == "batch_size":
            batch = kwargs.get("batch_size", args[2] if len(args) > 2 else None)
        else:
            batch = args[0].shape[0] if args else next(iter(kwargs.values())).shape[0]
        outs = []
        for i in range(self.num_values):
            v = getattr(self, f"value_{i}")
            row = v.index_select(0, self.state.index.to(v.device).reshape(1))
            outs.append(row.expand(batch, *v.shape[1:]))
        return tuple(outs) if self.tuple_output else outs[0]
