"""Per-instance patching of a diffusers scheduler with a fused step.

The instance gets its own ``set_timesteps``, ``step`` and ``step_with_guidance`` as instance
attributes (the diffusers class is never touched); ``unpatch_scheduler`` deletes them and the
coefficient state, restoring the class's methods exactly. The scheduler's own state
(``_step_index``, ``model_outputs``, ``lower_order_nums``, ...) stays where diffusers keeps it, so
a scheduler can be patched or unpatched between steps.

Copies. The methods are ``_InstanceMethod`` objects, not bound methods: a copy of the instance's
``__dict__`` alone (diffusers' panorama pipeline saves and restores each view's scheduler with
``deepcopy(scheduler.__dict__)`` / ``__dict__.update``) keeps them bound to their own scheduler,
where bound methods would come back bound to a deep copy of it and step that. The instance also
gets a ``__reduce_ex__`` (copy and pickle look it up on the instance), so ``copy.copy``,
``copy.deepcopy``, ``pickle`` and ``torch.save`` rebuild a patched scheduler whose methods are
bound to the new object, with its own coefficient state.
"""
from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import types

import numpy as np
import torch
from dataclasses import dataclass

from ..ops._checks import plain_number
from ..ops.solver import FLOAT_DTYPES as KERNEL_DTYPES
from ._base import PhiloxNoise
from .schedulers import ADAPTERS, unsupported_reason

log = logging.getLogger("diffaccel")

_ATTRS = ("set_timesteps", "step", "step_with_guidance", "__reduce_ex__")
_STATE = "_diffaccel_solver"


@dataclass(frozen=True)
class SchedulerPatchResult:
    patched: bool  # the scheduler now runs the fused step (also True when it already did)
    reason: str
    name: str  # the scheduler's class name


def _check_scheduler(scheduler) -> None:
    if isinstance(scheduler, type) or not (hasattr(scheduler, "set_timesteps") and hasattr(scheduler, "step")
                                           and hasattr(scheduler, "__dict__")):
        what = f"the class {scheduler.__name__}" if isinstance(scheduler, type) else type(scheduler).__name__
        raise TypeError(f"scheduler: expected a diffusers scheduler instance, got {what}")


def is_patched(scheduler) -> bool:
    _check_scheduler(scheduler)
    return _STATE in vars(scheduler)


def patch_scheduler(scheduler, *, dc_ratios=None, dc_order=None, noise=None, seed=None) -> SchedulerPatchResult:
    """Swap the fused step into this scheduler instance; unsupported configs are left alone, with the reason.

    ``dc_ratios`` (one float per step, 1.0 = no compensation) turns on DC-Solver's dynamic
    compensation of UniPC's predictor (diffaccel/solvers/dc.py; ``dc_order``: interpolation over
    ``dc_order + 1`` data predictions, default 2). Asking for it on anything but a fusable
    UniPCMultistepScheduler raises ValueError (the result would silently differ otherwise); the
    ratios are checked against the schedule at each ``set_timesteps``. On an instance already
    patched, the DC options replace its current ones.

    ``noise``: ``"generator"`` (the default for a new patch) draws a stochastic step's noise with
    diffusers' ``randn_tensor`` exactly as diffusers does. ``"philox"`` makes a step called without
    a ``generator`` generate its noise inside the fused kernel (Philox4x32-10, Triton's tl.randn
    stream; diffaccel/ops/philox.py) from ``seed`` (an int; None: ``torch.initial_seed()`` now) at
    counters ``offset + i``, where the offset starts at 0 and advances by the latent's numel at
    each step that draws noise (``set_timesteps`` does not reset it; ``set_noise_seed`` does). A
    step given a ``generator`` (or DDIM / DPM-Solver's ``variance_noise``) still uses it. The seed
    lives in a device tensor written in place by ``set_noise_seed``, so a captured CUDA graph
    replays with new noise. Asking for philox on a scheduler whose steps never draw noise raises
    ValueError. On an instance already patched, given noise options replace the current ones.
    """
    _check_scheduler(scheduler)
    name = type(scheduler).__name__
    noise_opt = _noise_option(scheduler, noise, seed)
    dc = None
    if dc_ratios is not None or dc_order is not None:
        from .dc import DEFAULT_DC_ORDER, as_dc_ratios, check_dc_order, dc_unsupported_reason

        if dc_ratios is None:
            raise ValueError("dc_ratios: dc_order was given without dc_ratios (one ratio per step)")
        why = dc_unsupported_reason(scheduler)
        if why is not None:
            raise ValueError(f"dc_ratios: {why}")
        dc = (as_dc_ratios(dc_ratios), check_dc_order(DEFAULT_DC_ORDER if dc_order is None else dc_order))
    if is_patched(scheduler):
        if dc is None and noise_opt is _KEEP:
            return SchedulerPatchResult(True, "already patched", name)
        state = vars(scheduler)[_STATE]
        replaced = []
        if dc is not None:
            if state.adapter.name != "UniPCMultistepScheduler":  # pragma: no cover - caught above
                raise ValueError(f"dc_ratios: {name} is patched with {state.adapter.name}")
            _set_dc(state, scheduler, dc)
            replaced.append("DC-Solver")
        if noise_opt is not _KEEP:
            _set_noise(state, scheduler, noise_opt)
            replaced.append("noise")
        return SchedulerPatchResult(True, f"already patched; {' and '.join(replaced)} options replaced", name)
    why = unsupported_reason(scheduler)
    if why is not None:
        return SchedulerPatchResult(False, why, name)
    adapter = ADAPTERS[name]()
    for attr in _ATTRS:
        if attr in vars(scheduler):
            return SchedulerPatchResult(False, f"the instance already overrides {attr!r}", name)
    state = adapter.new_state(scheduler)
    if isinstance(noise_opt, PhiloxNoise):
        state.options["noise"] = noise_opt
    if dc is not None:
        _set_dc(state, scheduler, dc)  # a bad ratio vector raises here, before the instance is touched
    elif state.ready_to_build(scheduler):  # timesteps already set: build before touching the instance
        try:
            state.rebuild(scheduler)
        except (ValueError, ArithmeticError, IndexError, np.linalg.LinAlgError) as e:
            return SchedulerPatchResult(False, f"coefficients for the current timesteps failed: {e}", name)
    _install(scheduler, state)
    return SchedulerPatchResult(True, "fused step" + (" with DC-Solver compensation" if dc is not None else "")
                                + (" with in-kernel Philox noise" if isinstance(noise_opt, PhiloxNoise) else ""), name)


_KEEP = object()  # no noise option given: a new patch uses the generator, a patched instance keeps its mode


def _noise_option(scheduler, noise, seed):
    """_KEEP, None (diffusers' generator noise) or a PhiloxNoise; a combination that cannot work raises."""
    if noise is None and seed is None:
        return _KEEP
    mode = "generator" if noise is None else noise
    if mode not in ("generator", "philox"):
        raise ValueError(f"noise: expected 'generator' or 'philox', got {noise!r}")
    if mode == "generator":
        if seed is not None:
            raise ValueError("seed: only used with noise='philox' (with noise='generator' the step's generator "
                             "argument seeds the noise)")
        return None
    adapter = ADAPTERS.get(type(scheduler).__name__)
    if adapter is not None and unsupported_reason(scheduler) is None:
        why = adapter().noise_free_reason(scheduler)
        if why is not None:
            raise ValueError(f"noise: 'philox' has nothing to do: {why}")
    return PhiloxNoise(torch.initial_seed() if seed is None else seed)


def _set_noise(state, scheduler, opt) -> None:
    current = state.options.get("noise")
    if opt is None:
        state.options.pop("noise", None)
    elif current is not None:  # in place: graphs captured with the current seed tensors see the new seed
        current.reseed(opt.seed)
    else:
        state.options["noise"] = opt
        dev = getattr(scheduler, "timesteps", None)
        if state.built and isinstance(dev, torch.Tensor) and dev.device.type != "cpu":
            opt.seed_tensor(dev.device)


def set_noise_seed(scheduler, seed: int, *, offset: int = 0) -> None:
    """Reseed the in-kernel noise of a scheduler patched with ``noise="philox"``: writes ``seed`` into
    its device seed tensors in place (a CUDA graph captured before replays with the new noise; a
    fill kernel, no host sync) and sets the Philox counter of the next noise-drawing step to
    ``offset`` (default 0: the run that follows repeats one started right after patching with this seed)."""
    _check_scheduler(scheduler)
    state = vars(scheduler).get(_STATE)
    philox = state.options.get("noise") if state is not None else None
    if philox is None:
        raise ValueError("scheduler: not patched with noise='philox' (patch_scheduler(scheduler, noise='philox'))")
    offset = plain_number(offset)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset: expected a python int >= 0, got {offset!r}")
    philox.reseed(seed, offset)


def noise_state(scheduler):
    """(seed as int64, offset of the next noise-drawing step) of a philox-mode scheduler, else None."""
    _check_scheduler(scheduler)
    state = vars(scheduler).get(_STATE)
    philox = state.options.get("noise") if state is not None else None
    return None if philox is None else (philox.seed, philox.offset)


def _set_dc(state, scheduler, dc) -> None:
    """Install DC options; with timesteps set, rebuild now (validating the ratios) and keep the old
    options and tables if that fails."""
    old_options, old = dict(state.options), (state.built, state.host, state.aux, state.device_tables)
    state.options["dc"] = dc
    if state.ready_to_build(scheduler):
        try:
            state.rebuild(scheduler)
        except Exception:
            state.options = old_options
            state.built, state.host, state.aux, state.device_tables = old
            raise


def _install(scheduler, state) -> None:
    vars(scheduler)[_STATE] = state
    cls = type(scheduler)
    for attr, fn in (("set_timesteps", _set_timesteps_for(cls)), ("step", _step_for(cls)),
                     ("step_with_guidance", _step_with_guidance), ("__reduce_ex__", _reduce_ex)):
        vars(scheduler)[attr] = _InstanceMethod(fn, scheduler)


class _InstanceMethod:
    """``fn`` bound to one scheduler, as an instance attribute. Unlike a bound method it is not
    copied with a copy of the instance's ``__dict__`` (module docstring): the copy of a whole
    patched scheduler goes through ``_reduce_ex``, which binds new ones to the new object."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, fn, owner):
        self.__func__, self.__self__ = fn, owner

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):  # reached by a pickle of the instance dict alone: rebind by attribute name
        attr = next(k for k, v in vars(self.__self__).items() if v is self)
        return _method_of, (self.__self__, attr)

    @property
    def __signature__(self):  # pipelines inspect step for eta / generator, set_timesteps for sigmas / timesteps
        return inspect.signature(types.MethodType(self.__func__, self.__self__))

    @property
    def __name__(self):
        return self.__func__.__name__

    def __repr__(self):
        return f"<diffaccel fused {type(self.__self__).__name__}.{self.__func__.__name__}>"


def _method_of(owner, attr):
    return vars(owner)[attr]


def _reduce_ex(self, protocol):
    """copy / deepcopy / pickle of a patched scheduler: rebuilt by ``_restore_patched``, then given
    the instance's own attributes (patched methods and coefficient state left out: rebuilt)."""
    attrs = {k: v for k, v in vars(self).items() if k not in _ATTRS and k != _STATE}
    return _restore_patched, (type(self), vars(self)[_STATE]), attrs


def _restore_patched(cls, state):
    """A patched ``cls`` instance with methods bound to it and its own coefficient state (a deep copy
    or an unpickled one is already its own; a shallow copy's tables are shared until either
    rebuilds them, options such as the Philox noise stream are copied)."""
    obj = cls.__new__(cls)
    own = copy.copy(state)
    own.options = copy.deepcopy(state.options)
    own.device_tables = dict(state.device_tables)
    own.host, own.aux = dict(state.host), dict(state.aux)
    _install(obj, own)
    return obj


# The methods find their state on the instance (not in a closure): the scheduler they are bound to
# is the one whose tables they use.

# functools.wraps keeps the class method's signature visible: pipelines inspect
# ``scheduler.step`` for ``eta`` / ``generator`` and ``set_timesteps`` for ``sigmas`` / ``timesteps``.

@functools.lru_cache(maxsize=None)
def _set_timesteps_for(cls):
    original = cls.set_timesteps

    @functools.wraps(original)
    def set_timesteps(self, *args, **kwargs):
        why = unsupported_reason(self)  # (register_to_config since patching, e.g. thresholding=True)
        if why is not None:
            raise ValueError(f"scheduler: its config changed since patch_scheduler and is no longer fused ({why}); "
                             f"diffaccel.unpatch(scheduler) to run diffusers' own step")
        out = original(self, *args, **kwargs)
        vars(self)[_STATE].rebuild(self)
        return out
    return set_timesteps


_FALLBACKS_WARNED: set = set()  # (scheduler class, reason) already warned about


def _unfused_reason(self, tensors, args, kwargs):
    """Why this call cannot take the fused step (None: it can): a dtype the kernel does not take
    (float64 latents, to debug a pipeline), or a step argument the adapter does not fuse (FlowMatch's
    ``per_token_timesteps``). Such a call runs the class's own step, which keeps the same scheduler
    state, with a warning once per class and reason."""
    bad = next((t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.dtype not in KERNEL_DTYPES), None)
    if bad is not None and not bad.is_floating_point:  # (diffusers' step would run it, and change its state)
        names = ("model_output", "sample") if len(tensors) == 2 else ("model_output_uncond", "model_output_cond",
                                                                      "sample")
        name = next(n for n, t in zip(names, tensors) if isinstance(t, torch.Tensor) and t.dtype == bad)
        raise TypeError(f"{name}: expected a floating-point tensor, got {str(bad).replace('torch.', '')}")
    if bad is not None:
        return (f"{str(bad).replace('torch.', '')} tensors (the fused step takes "
                f"{', '.join(str(d).replace('torch.', '') for d in KERNEL_DTYPES)})")
    return vars(self)[_STATE].adapter.unfused_call_reason(args, kwargs)


def _diffusers_step(self, why, model_output_uncond, model_output_cond, guidance_scale, guidance_rescale, timestep,
                    sample, *args, **kwargs):
    if (type(self), why) not in _FALLBACKS_WARNED:
        _FALLBACKS_WARNED.add((type(self), why))
        log.warning("diffaccel: %s.step on %s runs diffusers' step", type(self).__name__, why)
    guided = model_output_uncond
    if model_output_cond is not None:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

        guided = model_output_uncond + guidance_scale * (model_output_cond - model_output_uncond)
        if guidance_rescale > 0:
            guided = rescale_noise_cfg(guided, model_output_cond, guidance_rescale=guidance_rescale)
    return type(self).step(self, guided, timestep, sample, *args, **kwargs)


def _current_state(self):
    """The coefficient state, rebuilt first if the config or the schedule changed since it was built:
    diffusers reads them at each step (``register_to_config(prediction_type=...)`` or a config
    attribute written between ``set_timesteps`` and ``step``, sigmas edited in place, take effect at
    the next step), the tables baked the old ones in. A config that is no longer fused raises, as
    ``set_timesteps`` does."""
    state = vars(self)[_STATE]
    if state.built and state.stale(self):
        why = unsupported_reason(self)
        if why is not None:
            raise ValueError(f"scheduler: its config changed since set_timesteps and is no longer fused ({why}); "
                             f"diffaccel.unpatch(scheduler) to run diffusers' own step")
        state.rebuild(self)
    return state


@functools.lru_cache(maxsize=None)
def _step_for(cls):
    @functools.wraps(cls.step)
    def step(self, model_output, timestep, sample, *args, **kwargs):
        why = _unfused_reason(self, (model_output, sample), args, kwargs)
        if why is not None:
            return _diffusers_step(self, why, model_output, None, 1.0, 0.0, timestep, sample, *args, **kwargs)
        state = _current_state(self)
        return state.adapter.step(self, state, model_output, None, 1.0, 0.0, timestep, sample, *args, **kwargs)
    return step


def _step_with_guidance(self, model_output_uncond, model_output_cond, guidance_scale, timestep, sample,
                        guidance_rescale=0.0, *args, **kwargs):
    """``step`` on ``uncond + guidance_scale * (cond - uncond)`` (rescaled like diffusers'
    ``rescale_noise_cfg`` when ``guidance_rescale`` > 0), folded into the same kernel."""
    scale = plain_number(guidance_scale)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"guidance_scale: expected a finite number, got {guidance_scale!r}")
    rescale = plain_number(guidance_rescale)
    if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not 0 <= rescale < math.inf:
        # (a negative one: diffusers' pipelines skip the rescale, the fused formula would apply it)
        raise ValueError(f"guidance_rescale: expected a finite number >= 0, got {guidance_rescale!r}")
    why = _unfused_reason(self, (model_output_uncond, model_output_cond, sample), args, kwargs)
    if why is not None:
        return _diffusers_step(self, why, model_output_uncond, model_output_cond, guidance_scale, guidance_rescale,
                               timestep, sample, *args, **kwargs)
    state = _current_state(self)
    return state.adapter.step(self, state, model_output_uncond, model_output_cond, guidance_scale,
                              guidance_rescale, timestep, sample, *args, **kwargs)


def unpatch_scheduler(scheduler) -> bool:
    """Restore the class's own methods; True if the instance was patched."""
    if not is_patched(scheduler):
        return False
    if vars(scheduler)[_STATE].options.get("dc") is not None:  # diffusers' own step shifts solver_order entries
        keep = scheduler.config.solver_order
        for name in ("model_outputs", "timestep_list"):
            hist = getattr(scheduler, name, None)
            if isinstance(hist, list) and len(hist) > keep:
                setattr(scheduler, name, hist[len(hist) - keep:])
    for attr in _ATTRS + (_STATE,):
        vars(scheduler).pop(attr, None)
    return True
