"""Fused scheduler step (guidance folded in) vs diffusers' step after a torch CFG combine, per step.

Each case times one mid-trajectory step (the step index is reset before every call; for the
multistep schedulers the history is already full, so the step runs at its full order).
``bytes`` is what the fused step must move at least: read sample, both model-output halves and
the history it uses, write the new sample (and the history entry where the scheduler keeps one);
the same figure is recorded for the baseline so both rows give an effective bandwidth.
"""
import copy

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from benchmarks._util import annotate, device, dtype_name, is_smoke, measure
from diffaccel.ops import _backend, use_backend
from diffaccel.solvers import patch_scheduler

FAMILY = "solver"
GUIDANCE = 7.5
STEPS = 20
MID = 10

# (case, latent shape without batch, dtype, scheduler factory, history entries read, history entry written)
if is_smoke():
    CASES = [("smoke_dpm2m", (4, 8, 8), torch.float16, lambda: DPMSolverMultistepScheduler(), 1, True),
             ("smoke_flow", (16, 8), torch.bfloat16, lambda: FlowMatchEulerDiscreteScheduler(), 0, False)]
    BATCHES = [1]
else:
    CASES = [
        ("sd15_dpm2m", (4, 64, 64), torch.float16, lambda: DPMSolverMultistepScheduler(), 1, True),
        ("sdxl_euler", (4, 128, 128), torch.float16, lambda: EulerDiscreteScheduler(), 0, True),
        ("flux_flowmatch", (4096, 64), torch.bfloat16, lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), 0, False),
        ("video_flowmatch", (16, 21, 90, 160), torch.bfloat16, lambda: FlowMatchEulerDiscreteScheduler(shift=5.0),
         0, False),
        ("video_dpm2m_flow", (16, 21, 90, 160), torch.bfloat16,
         lambda: DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0),
         1, True),
    ]
    BATCHES = [1, 2]
IMPLS = ["diffaccel:cuda", "diffaccel:triton", "baseline:diffusers"]


def _bytes_moved(numel: int, dtype: torch.dtype, n_hist: int, writes_history: bool) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return numel * elem * (3 + n_hist + 1 + (1 if writes_history else 0))


def _prepared(factory, x, patched: bool):
    s = factory()
    if patched:
        assert patch_scheduler(s).patched
    s.set_timesteps(STEPS, device=x.device)
    if hasattr(s, "model_outputs"):  # a full history: the step runs at its configured order
        s.model_outputs = [torch.randn_like(x) for _ in s.model_outputs]
        s.lower_order_nums = s.config.solver_order
    return s


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_solver_step_cfg(benchmark, case, batch, impl):
    name, latent, dtype, factory, n_hist, writes_history = case
    dev = device()
    shape = (batch, *latent)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=g).to(dev, dtype)
    u = torch.randn(shape, generator=g).to(dev, dtype)
    c = torch.randn(shape, generator=g).to(dev, dtype)
    if impl.startswith("diffaccel:"):
        backend = impl.split(":", 1)[1]
        why = _backend._why_not(_backend.registered_ops()["fused_solver_step"], backend, x.device)
        if why is not None:
            pytest.skip(f"{backend} backend unavailable: {why}")
        s = _prepared(factory, x, patched=True)
        t = s.timesteps[MID]
        history = copy.copy(getattr(s, "model_outputs", None))

        def fn():
            s._step_index = MID
            if history is not None:
                s.model_outputs[:] = history
            with use_backend(backend):
                return s.step_with_guidance(u, c, GUIDANCE, t, x).prev_sample
    else:
        s = _prepared(factory, x, patched=False)
        t = s.timesteps[MID]
        history = copy.copy(getattr(s, "model_outputs", None))

        def fn():
            s._step_index = MID
            if history is not None:
                s.model_outputs[:] = history
            return s.step(u + GUIDANCE * (c - u), t, x).prev_sample
    annotate(benchmark, family=FAMILY, case=f"{name}_b{batch}_cfg", shape=shape, dtype=dtype_name(dtype), impl=impl,
             flops=None, bytes=_bytes_moved(x.numel(), dtype, n_hist, writes_history))
    out = measure(benchmark, fn)
    assert out.shape == shape and out.dtype == dtype
