"""Per-instance patching of a diffusers scheduler with a fused step.

The instance gets its own ``set_timesteps``, ``step`` and ``step_with_guidance`` as instance
attributes (the diffusers class is never touched); ``unpatch_scheduler`` deletes them and the
coefficient state, restoring the class's methods exactly. The scheduler's own state
(``_step_index``, ``model_outputs``, ``lower_order_nums``, ...) stays where diffusers keeps it, so
a scheduler can be patched or unpatched between steps.
"""
from __future__ import annotations

import types
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
    vars(scheduler)[_STATE] = state
    original_set_timesteps = type(scheduler).set_timesteps

    def set_timesteps(self, *args, **kwargs):
        out = original_set_timesteps(self, *args, **kwargs)
        state.rebuild(self)
        return out

    def step(self, model_output, timestep, sample, *args, **kwargs):
        return adapter.step(self, state, model_output, None, 1.0, 0.0, timestep, sample, *args, **kwargs)

    def step_with_guidance(self, model_output_uncond, model_output_cond, guidance_scale, timestep, sample,
                           guidance_rescale=0.0, *args, **kwargs):
        """``step`` on ``uncond + guidance_scale * (cond - uncond)`` (rescaled like diffusers'
        ``rescale_noise_cfg`` when ``guidance_rescale`` > 0), folded into the same kernel."""
        return adapter.step(self, state, model_output_uncond, model_output_cond, guidance_scale, guidance_rescale,
                            timestep, sample, *args, **kwargs)

    vars(scheduler)["set_timesteps"] = types.MethodType(set_timesteps, scheduler)
    vars(scheduler)["step"] = types.MethodType(step, scheduler)
    vars(scheduler)["step_with_guidance"] = types.MethodType(step_with_guidance, scheduler)
    if state.ready_to_build(scheduler):
        state.rebuild(scheduler)
    return SchedulerPatchResult(True, "fused step", name)


def unpatch_scheduler(scheduler) -> bool:
    """Restore the class's own methods; True if the instance was patched."""
    if not is_patched(scheduler):
        return False
    for attr in _ATTRS + (_STATE,):
        vars(scheduler).pop(attr, None)
    return True
