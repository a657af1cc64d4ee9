"""Fused scheduler steps: ``patch_scheduler(scheduler)`` swaps a fused step (guidance folded in, no
host syncs after the first step) into one diffusers scheduler instance; ``unpatch_scheduler``
restores it.

Fused: FlowMatchEulerDiscreteScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
DDIMScheduler (any eta), DPMSolverMultistepScheduler (dpmsolver++ / sde-dpmsolver++ / dpmsolver /
sde-dpmsolver, orders 1-3), LCMScheduler, UniPCMultistepScheduler (bh1 / bh2, data or noise
prediction, with the corrector). A patched instance keeps
``set_timesteps`` / ``step`` (signatures and return types), ``scale_model_input``, ``add_noise``,
``step_index``, ``order`` and the history diffusers keeps, and gains
``step_with_guidance(uncond, cond, guidance_scale, timestep, sample, guidance_rescale=0.0, ...)``.

Kernel launches per step: one, UniPC's corrector included (two with ``guidance_rescale`` > 0:
per-sample statistics first); stochastic steps add diffusers' ``randn_tensor`` for the noise,
drawn with the caller's generator so seeded runs match — or, with
``patch_scheduler(s, noise="philox", seed=...)``, a step called without a generator generates
its noise inside the same kernel (Philox; ``set_noise_seed`` reseeds in place, so a captured
graph replays with new noise; ``noise_state`` reads the seed and the next step's counter).
The first step of a scheduler that finds its step index from a CUDA timestep does diffusers'
one lookup sync (avoid it with
``set_begin_index``); after that no step reads device memory on the host, so a loop can be
captured in a CUDA graph (with a CPU generator, stochastic steps copy noise host to device).

DC-Solver (Zhao et al., ECCV 2024): ``patch_scheduler(unipc, dc_ratios=...)`` adds its dynamic
compensation to UniPC's predictor, folded into the same kernel; ``fit_dc_ratios`` fits the ratios
against a high-NFE reference; ``fit_cascade_polynomial`` / ``predict_dc_ratios`` their cascade
polynomial regression for unseen step counts and guidance scales; ``DCUniPCReference`` is the
plain torch sampler (see ``dc.py``).
"""
from .dc import DCUniPCReference, fit_cascade_polynomial, fit_dc_ratios, predict_dc_ratios
from ._patch import (SchedulerPatchResult, is_patched, noise_state, patch_scheduler, set_noise_seed,
                     unpatch_scheduler)
from .schedulers import ADAPTERS, unsupported_reason

SUPPORTED_SCHEDULERS = tuple(sorted(ADAPTERS))

__all__ = ["DCUniPCReference", "SchedulerPatchResult", "SUPPORTED_SCHEDULERS", "fit_cascade_polynomial",
           "fit_dc_ratios", "is_patched", "noise_state", "patch_scheduler", "predict_dc_ratios", "set_noise_seed",
           "unpatch_scheduler", "unsupported_reason"]
