"""Per-scheduler coefficient tables and fused steps.

Each adapter turns one diffusers scheduler's step into rows of the generic fused op
(``diffaccel.ops.fused_solver_step``; layout in diffaccel/ops/solver.py). Rows are computed
on the host in float64 from the scheduler's own fp32 tables (sigmas, alphas_cumprod) when
``set_timesteps`` runs, uploaded once to the timesteps' device, and indexed there with host
ints (or, for DDIM, a device timestep read by the kernel), so a step issues no host sync.
The step's state lives where diffusers keeps it (``_step_index``, ``model_outputs``,
``lower_order_nums``).

Not fused, so left unpatched with the reason: dynamic thresholding (a per-sample quantile),
learned variance, UniPC with ``solver_p``. Noise for stochastic steps is drawn with
diffusers' ``randn_tensor`` and the caller's generator, exactly where diffusers draws it, so
seeded trajectories match; with ``patch_scheduler(..., noise="philox")`` a step called without
a generator has the kernel generate it instead (``_Adapter._noise``; offsets in PhiloxNoise).
"""
from __future__ import annotations

from typing import Optional

from .ddim import DDIM, LCM
from .dpm import DPMSolverMultistep
from .euler import EulerAncestral, EulerDiscrete, FlowMatchEuler
from .unipc import UniPCMultistep

ADAPTERS = {a.name: a for a in (FlowMatchEuler, EulerDiscrete, DDIM, DPMSolverMultistep, LCM, EulerAncestral,
                                UniPCMultistep)}


def unsupported_reason(scheduler) -> Optional[str]:
    """None if ``patch_scheduler`` can fuse this scheduler's step, else why not (naming the option)."""
    name = type(scheduler).__name__
    adapter = ADAPTERS.get(name)
    if adapter is None:
        return f"{name} has no fused step (fused: {', '.join(sorted(ADAPTERS))})"
    try:
        import diffusers  # noqa: F401
    except ImportError:  # pragma: no cover
        return "diffusers is not importable"
    if type(scheduler).__module__.split(".")[0] != "diffusers":
        return f"{name} is not diffusers' class of that name ({type(scheduler).__module__})"
    return adapter().unsupported(scheduler)
