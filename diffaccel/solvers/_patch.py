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


def patch_scheduler(scheduler) -> SchedulerPatchResult:
    """Swap the fused step into this scheduler instance; unsupported configs are left alone, with the reason."""
    name = type(scheduler).__name__
    if is_patched(scheduler):
        return SchedulerPatchResult(True, "already patched", name)
    why = unsupported_reason(scheduler)
    if why is not None:
        return SchedulerPatchResult(False, why, name)
    adapter = ADAPTERS[name]()
    for attr in _ATTRS:
        if attr in vars(scheduler):
            return SchedulerPatchResult(False, f"the instance already overrides {attr!r}", name)
    state = adapter.new_state(scheduler)
    if state.ready_to_build(scheduler):  # timesteps already set: build before touching the instance
        try:
            state.rebuild(scheduler)
        except (ValueError, ArithmeticError, IndexError, np.linalg.LinAlgError) as e:
            return SchedulerPatchResult(False, f"coefficients for the current timesteps failed: {e}", name)
    vars(scheduler)[_STATE] = state
    cls = type(scheduler)
    for attr, fn in (("set_timesteps", _set_timesteps_for(cls)), ("step", _step_for(cls)),
                     ("step_with_guidance", _step_with_guidance)):
        vars(scheduler)[attr] = types.MethodType(fn, scheduler)
    return SchedulerPatchResult(True, "fused step", name)


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
    for attr in _ATTRS + (_STATE,):
        vars(scheduler).pop(attr, None)
    return True
