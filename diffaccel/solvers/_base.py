"""Shared pieces of the fused scheduler steps: the coefficient-row builder, the per-instance
coefficient state (host float64 tables, device fp32 copies), and the adapter base class."""
from __future__ import annotations

import copy
import math
from typing import Optional

import numpy as np
import torch

from ..ops._checks import plain_number

from ..ops.philox import seed_as_int64
from ..ops.solver import (A_E, A_N, A_X, B_E, B_H0, B_H1, B_H2, B_N, B_P, B_X, C_H0, C_H1, C_H2, C_P, C_X, CLIP,
                          D_H0, D_H1, D_H2, D_L, D_P, NUM_COEFFS)

_INT_TIMESTEP_MSG = ("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to `{}.step()` is not "
                     "supported. Make sure to pass one of the `scheduler.timesteps` as a timestep.")


def _row(**cols) -> np.ndarray:
    r = np.zeros(NUM_COEFFS, dtype=np.float64)
    r[CLIP] = np.inf
    r[C_P] = 1.0
    names = {"A_X": A_X, "A_E": A_E, "A_N": A_N, "CLIP": CLIP, "C_P": C_P, "C_X": C_X, "B_X": B_X, "B_E": B_E,
             "B_P": B_P, "B_H0": B_H0, "B_H1": B_H1, "B_H2": B_H2, "B_N": B_N, "D_L": D_L, "D_P": D_P, "D_H0": D_H0,
             "D_H1": D_H1, "D_H2": D_H2, "C_H0": C_H0, "C_H1": C_H1, "C_H2": C_H2}
    for k, v in cols.items():
        r[names[k]] = v
    return r


def _f64(t) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float64)


def alpha_sigma_lambda(sigmas, use_flow_sigmas: bool) -> tuple:
    """float64 (sigma, alpha_t, sigma_t, lambda_t) per entry of ``sigmas``, as diffusers' multistep
    solvers derive them (``_sigma_to_alpha_sigma_t``; lambda = log alpha_t - log sigma_t, infinite
    where sigma is 0)."""
    sig = _f64(sigmas)
    if use_flow_sigmas:
        alpha, sigt = 1 - sig, sig
    else:
        alpha = 1 / np.sqrt(sig**2 + 1)
        sigt = sig * alpha
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lam = np.log(alpha) - np.log(sigt)
    return sig, alpha, sigt, lam


def output_conversion(prediction_type: str, to_x0: bool, alpha_s: float, sigma_s: float, sig: float) -> tuple:
    """(p_x, p_e): diffusers' ``convert_model_output`` as p_x * sample + p_e * model_output, to the
    x0 prediction (``to_x0``) or to epsilon. The epsilon form takes no flow prediction (refused by
    the adapters' ``unsupported``)."""
    if not to_x0:
        if prediction_type == "epsilon":
            return 0.0, 1.0
        if prediction_type == "sample":
            return 1 / sigma_s, -alpha_s / sigma_s
        return sigma_s, alpha_s  # v_prediction
    if prediction_type == "epsilon":
        return 1 / alpha_s, -sigma_s / alpha_s
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return alpha_s, -sigma_s
    return 1.0, -sig  # flow_prediction


def converted_dtype(prediction_type: str, to_x0: bool, sample: torch.Tensor, model_output: torch.Tensor):
    """The dtype of diffusers' ``convert_model_output`` result, which the multistep solvers keep in
    their history and DPM-Solver casts its new sample to: the model's own where the conversion
    returns the model output unchanged (x0 from ``"sample"``, epsilon from ``"epsilon"``), else the
    promotion of sample and model output (fp32 latents with a bf16 model: fp32)."""
    identity = prediction_type == ("sample" if to_x0 else "epsilon")
    return model_output.dtype if identity else torch.promote_types(sample.dtype, model_output.dtype)


def _randn(shape, generator, device, dtype):
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


class PhiloxNoise:
    """In-kernel noise of one patched instance (``patch_scheduler(..., noise="philox")``).

    ``seed`` is the host copy (as int64); the kernels read one 0-d int64 tensor per device, which
    ``reseed`` writes in place, so a CUDA graph captured earlier replays with the new seed.
    ``offset`` is the Philox counter of element 0 of the next step that draws noise; each such step
    advances it by the latent's numel, so no two steps share a counter. ``set_timesteps`` leaves it
    alone (a new trajectory gets fresh noise); ``reseed`` sets it (default 0).
    """

    def __init__(self, seed: int):
        self.seed = seed_as_int64(seed)
        self.offset = 0
        self.seed_tensors: dict = {}

    def seed_tensor(self, device) -> torch.Tensor:
        key = str(torch.device(device))
        t = self.seed_tensors.get(key)
        if t is None:  # a fill kernel, no host-to-device copy
            t = torch.full((), self.seed, dtype=torch.int64, device=device)
            self.seed_tensors[key] = t
        return t

    def reseed(self, seed: int, offset: int = 0) -> None:
        self.seed = seed_as_int64(seed)
        self.offset = offset
        for t in self.seed_tensors.values():
            t.fill_(self.seed)


_MISSING = object()
_SCHEDULE_TENSORS = ("sigmas", "timesteps")


def _sources(sch):
    """(config, its values, (name, tensor, version) of the schedule tensors): what a build reads that
    a caller may change after set_timesteps. ``register_to_config`` replaces the config (a
    FrozenDict); an attribute write (Stable Cascade's ``scheduler.config.clip_sample = False``) keeps
    the object and changes its ``vars``, compared by identity; an in-place edit of ``sigmas`` (Cosmos
    2 sets ``sigmas[-1] = sigmas[-2]``) bumps the tensor's version counter. Held by reference, so a
    deep copy of ``scheduler.__dict__`` (panorama's per-view restore) still matches its own copy.
    All host-side reads, no sync."""
    config = getattr(sch, "_internal_dict", None)
    values = dict(vars(config)) if config is not None else {}
    tensors = tuple((name, t, t._version) for name in _SCHEDULE_TENSORS
                    if isinstance(t := getattr(sch, name, None), torch.Tensor))
    return config, values, tensors


class SolverState:
    """Coefficient tables of one patched instance: host float64 per key, device fp32 per (key, device)."""

    def __init__(self, adapter: "_Adapter"):
        self.adapter = adapter
        self.built = False
        self.sources = None  # what the tables were built from (_sources), to see when it changes
        self.host: dict = {}
        self.aux: dict = {}
        self.device_tables: dict = {}
        # options given to patch_scheduler: "dc" = (ratios, dc_order) (UniPC), "noise" = PhiloxNoise
        self.options: dict = {}

    def __deepcopy__(self, memo):
        """A deep copy keeps the one Philox noise stream: diffusers' panorama pipeline snapshots and
        restores ``scheduler.__dict__`` around each view's step, and a restored copy of the counter
        would draw every view's noise from the same counters. (A copy of the scheduler itself gets a
        stream of its own: ``_restore_patched``.)"""
        noise = self.options.get("noise")
        if noise is not None:
            memo[id(noise)] = noise
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in vars(self).items():
            setattr(new, key, copy.deepcopy(value, memo))
        if self.sources is not None:  # a copied tensor has a version of its own: unchanged if the original was
            config, values, tensors = new.sources
            new.sources = (config, values, tuple(
                (name, t, t._version if old._version == version else -1)
                for (name, t, _), (_, old, version) in zip(tensors, self.sources[2])))
        return new

    def ready_to_build(self, sch) -> bool:
        return getattr(sch, "num_inference_steps", None) is not None

    def rebuild(self, sch) -> None:
        self.host, self.aux, self.device_tables = {}, {}, {}
        self.built = False  # a failed build (e.g. DC ratios for another step count) leaves no stale tables
        self.adapter.build(sch, self)
        self.sources = _sources(sch)
        self.built = True
        dev = sch.timesteps.device if isinstance(getattr(sch, "timesteps", None), torch.Tensor) else None
        if dev is not None and dev.type != "cpu":  # upload now, not inside a captured loop
            for key in list(self.host):
                self.table(key, dev)
            if self.options.get("noise") is not None:
                self.options["noise"].seed_tensor(dev)

    def stale(self, sch) -> bool:
        """True when what the tables were built from changed since (diffusers' step re-reads it)."""
        config, values, tensors = self.sources
        if getattr(sch, "_internal_dict", None) is not config:
            return True
        if any(getattr(sch, name, None) is not t or t._version != version for name, t, version in tensors):
            return True
        current = vars(config) if config is not None else {}
        return len(current) != len(values) or any(current.get(k, _MISSING) is not v for k, v in values.items())

    def table(self, key, device: torch.device) -> torch.Tensor:
        k = (key, str(device))
        t = self.device_tables.get(k)
        if t is None:
            t = torch.as_tensor(self.host[key], dtype=torch.float32).to(device)
            self.device_tables[k] = t
        return t

    def row(self, key, index: int, device: torch.device) -> torch.Tensor:
        """Row ``index`` of table ``key`` on ``device``; a row the schedule should never reach (NaN or
        an infinite coefficient, e.g. a singular UniPC system) raises instead of poisoning the sample."""
        k = (key, index, device)  # rows are kept with the tables: a step makes no new view, no NaN test
        r = self.device_tables.get(k)
        if r is None:
            if not 0 <= index < len(self.host[key]):
                raise ValueError(f"{self.adapter.name}.step: step {index} is past the end of the schedule "
                                 f"({len(self.host[key])} rows for the steps set by set_timesteps); call "
                                 f"set_timesteps again (or set_begin_index) to start another run")
            coeffs = np.delete(self.host[key][index], CLIP)  # (CLIP is inf where nothing is clipped)
            if not np.isfinite(coeffs).all():
                raise ValueError(f"{self.adapter.name}.step: no coefficients for this step ({key}[{index}]): the "
                                 "solver's system is singular or undefined here (diffusers' own step fails or "
                                 "returns NaN)")
            r = self.device_tables[k] = self.table(key, device)[index]
        return r

    def ensure(self, key, make) -> None:
        if key not in self.host:
            self.host[key] = make()


_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")


def thresholding_reason(config) -> Optional[str]:
    if getattr(config, "thresholding", False):
        return "thresholding=True: dynamic thresholding (a per-sample quantile) is not fused"
    return None


def multistep_reason(config, solver_types: tuple) -> Optional[str]:
    """Why a DPM-Solver / UniPC config has no fused step, for the checks the two share; else None."""
    reason = thresholding_reason(config)
    if reason is None and config.solver_type not in solver_types:
        reason = f"solver_type={config.solver_type!r} is not fused"
    if reason is None and config.prediction_type not in _PREDICTION_TYPES:
        reason = f"prediction_type={config.prediction_type!r} is not supported"
    if reason is None and config.solver_order > 3:
        reason = f"solver_order={config.solver_order}: at most 3 (three history slots)"
    return reason


class _Adapter:
    name = ""

    def unsupported(self, sch) -> Optional[str]:
        return None

    def new_state(self, sch) -> SolverState:
        return SolverState(self)

    def build(self, sch, state: SolverState) -> None:
        raise NotImplementedError

    def unfused_call_reason(self, args, kwargs) -> Optional[str]:
        """Why a step call with these extra arguments (after model_output, timestep, sample) must run
        diffusers' own step (None: the fused step takes it)."""
        return None

    def noise_free_reason(self, sch) -> Optional[str]:
        """None if some step of this scheduler may draw noise, else why in-kernel noise has nothing to do."""
        return None

    # -- noise: diffusers' randn_tensor with the caller's generator, or in-kernel Philox --
    @staticmethod
    def _noise(state, generator, sample, dtype) -> dict:
        """The fused op's noise arguments for one noise-drawing step. In philox mode a step without
        a generator draws in the kernel; a generator keeps diffusers' randn_tensor (its seeded
        trajectories)."""
        philox = state.options.get("noise")
        if philox is None or generator is not None:
            return {"noise": _randn(sample.shape, generator, sample.device, dtype)}
        return {"noise_seed": philox.seed_tensor(sample.device), "noise_offset": philox.offset}

    @staticmethod
    def _noise_drawn(state, noise_args: dict, sample) -> None:
        """After a successful step: advance the Philox counter past this step's elements."""
        if "noise_seed" in noise_args:
            state.options["noise"].offset += sample.numel()

    # -- shared pieces of every step --
    def _begin(self, sch, state, model_output, cond, sample, guidance_rescale):
        if not state.built or getattr(sch, "num_inference_steps", None) is None:
            raise ValueError(f"{self.name}.step: call set_timesteps(...) before step; the fused step's "
                             "coefficients are computed there")
        for nm, t in (("model_output", model_output), ("sample", sample)) + ((("model_output_cond", cond),)
                                                                              if cond is not None else ()):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{nm}: expected a torch.Tensor, got {type(t).__name__}")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output: expected shape {tuple(sample.shape)} like sample, got "
                             f"{tuple(model_output.shape)}")
        if cond is not None and cond.shape != sample.shape:
            raise ValueError(f"model_output_cond: expected shape {tuple(sample.shape)} like sample, got "
                             f"{tuple(cond.shape)}")
        if guidance_rescale and cond is None:
            raise ValueError("guidance_rescale: needs the conditional half (step_with_guidance)")

    @staticmethod
    def _timestep_value(timestep) -> int:
        """A host timestep as the integer the schedule holds: diffusers indexes alphas_cumprod with it,
        so 900.7 fails there; int() would silently take row 900."""
        if isinstance(timestep, torch.Tensor) and timestep.numel() != 1:
            raise ValueError(f"timestep: expected one timestep, got a tensor of shape {tuple(timestep.shape)}")
        value = timestep.item() if isinstance(timestep, torch.Tensor) else plain_number(timestep)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value != int(value):
            raise ValueError(f"timestep: expected an integer timestep of the schedule, got {value!r}")
        return int(value)

    def _init_index(self, sch, timestep):
        if sch.step_index is None:
            if not isinstance(timestep, torch.Tensor):
                value = plain_number(timestep)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    # (diffusers' own lookup fails on it with an AttributeError deep inside)
                    raise TypeError(f"timestep: expected a number or a tensor of the schedule, got "
                                    f"{type(timestep).__name__}")
            sch._init_step_index(timestep)
        i, steps = sch.step_index, len(sch.timesteps)
        if i >= steps:  # (the tables have a row per step: numpy's IndexError, or "singular" from UniPC)
            raise ValueError(f"{self.name}.step: step {i} is past the end of the schedule ({steps} steps set by "
                             f"set_timesteps); call set_timesteps again (or set_begin_index) to start another run")
        return i
