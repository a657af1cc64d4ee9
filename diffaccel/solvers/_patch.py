"""Per-instance patching of a diffusers scheduler with a fused step.

The instance gets its own ``set_timesteps``, ``step`` and ``step_with_guidance`` as instance
attributes (the diffusers class is never touched); ``unpatch_scheduler`` deletes them and the
coefficient state, restoring the class's methods exactly. The scheduler's own state
(``_step_index``, ``model_outputs``, ``lower_order_nums``, ...) stays where diffusers keeps it, so
a scheduler can be patched or unpatched between steps.
"""
from __future__ import annotations

import functools
import types

import numpy as np
from dataclasses import dataclass

from .schedulers import ADAPTERS, unsupported_reason

_ATTRS = ("set_timesteps", "step", "step_with_guidance")
_STATE = "_diffaccel_solver"


@dataclass(frozen=True)
class SchedulerPatchResult:
    patched: bool  # the scheduler now runs the fused step (also True when it already did)
    reason: str
    name: str  # the scheduler's class name


def is_patched(scheduler) -> bool:
    return _STATE in vars(scheduler)


def patch_scheduler(scheduler, *, dc_ratios=None, dc_order=None) -> SchedulerPatchResult:
    """Swap the fused step into this scheduler instance; unsupported configs are left alone, with the reason.

    ``dc_ratios`` (one float per step, 1.0 = no compensation) turns on DC-Solver's dynamic
    compensation of UniPC's predictor (diffaccel/solvers/dc.py; ``dc_order``: interpolation over
    ``dc_order + 1`` data predictions, default 2). Asking for it on anything but a fusable
    UniPCMultistepScheduler raises ValueError (the result would silently differ otherwise); the
    ratios are checked against the schedule at each ``set_timesteps``. On an instance already
    patched, the DC options replace its current ones.
    """
    name = type(scheduler).__name__
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
        if dc is None:
            return SchedulerPatchResult(True, "already patched", name)
        state = vars(scheduler)[_STATE]
        if state.adapter.name != "UniPCMultistepScheduler":  # pragma: no cover - caught above
            raise ValueError(f"dc_ratios: {name} is patched with {state.adapter.name}")
        _set_dc(state, scheduler, dc)
        return SchedulerPatchResult(True, "already patched; DC-Solver options replaced", name)
    why = unsupported_reason(scheduler)
    if why is not None:
        return SchedulerPatchResult(False, why, name)
    adapter = ADAPTERS[name]()
    for attr in _ATTRS:
        if attr in vars(scheduler):
            return SchedulerPatchResult(False, f"the instance already overrides {attr!r}", name)
    state = adapter.new_state(scheduler)
    if dc is not None:
        _set_dc(state, scheduler, dc)  # a bad ratio vector raises here, before the instance is touched
    elif state.ready_to_build(scheduler):  # timesteps already set: build before touching the instance
        try:
            state.rebuild(scheduler)
        except (ValueError, ArithmeticError, IndexError, np.linalg.LinAlgError) as e:
            return SchedulerPatchResult(False, f"coefficients for the current timesteps failed: {e}", name)
    vars(scheduler)[_STATE] = state
    cls = type(scheduler)
    for attr, fn in (("set_timesteps", _set_timesteps_for(cls)), ("step", _step_for(cls)),
                     ("step_with_guidance", _step_with_guidance)):
        vars(scheduler)[attr] = types.MethodType(fn, scheduler)
    return SchedulerPatchResult(True, "fused step" + (" with DC-Solver compensation" if dc is not None else ""), name)


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


# The methods find their state on the instance (not in a closure), so copy.deepcopy of a patched
# scheduler gives an independent patched copy: deepcopy rebinds the methods to the copy.

# functools.wraps keeps the class method's signature visible: pipelines inspect
# ``scheduler.step`` for ``eta`` / ``generator`` and ``set_timesteps`` for ``sigmas`` / ``timesteps``.

@functools.lru_cache(maxsize=None)
def _set_timesteps_for(cls):
    original = cls.set_timesteps

    @functools.wraps(original)
    def set_timesteps(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        vars(self)[_STATE].rebuild(self)
        return out
    return set_timesteps


@functools.lru_cache(maxsize=None)
def _step_for(cls):
    @functools.wraps(cls.step)
    def step(self, model_output, timestep, sample, *args, **kwargs):
        state = vars(self)[_STATE]
        return state.adapter.step(self, state, model_output, None, 1.0, 0.0, timestep, sample, *args, **kwargs)
    return step


def _step_with_guidance(self, model_output_uncond, model_output_cond, guidance_scale, timestep, sample,
                        guidance_rescale=0.0, *args, **kwargs):
    """``step`` on ``uncond + guidance_scale * (cond - uncond)`` (rescaled like diffusers'
    ``rescale_noise_cfg`` when ``guidance_rescale`` > 0), folded into the same kernel."""
    state = vars(self)[_STATE]
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
