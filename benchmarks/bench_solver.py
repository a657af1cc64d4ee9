"""Fused scheduler step (guidance folded in) vs diffusers' step after a torch CFG combine, per step.

Each case times one mid-trajectory step (the step index is reset before every call; for the
multistep schedulers the history is already full, so the step runs at its full order).
``bytes`` is what one fused step must move at least: read sample, both model-output halves and
the history it uses, write the new sample (and the history entry / corrected sample where the
scheduler keeps them); the same figure is recorded for the baseline so both rows give an
effective bandwidth. UniPC's fused step takes two launches when its corrector runs (the corrected
sample round-trips through memory once more than the figure counts).
"""
import copy

import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       UniPCMultistepScheduler)

from benchmarks._util import annotate, cuda_graph_replay, device, dtype_name, is_smoke, measure
from diffaccel.ops import _backend, use_backend
from diffaccel.solvers import patch_scheduler

FAMILY = "solver"
GUIDANCE = 7.5
STEPS = 20
MID = 10

# (case, latent shape without batch, dtype, scheduler factory, full-latent tensors moved by one step)
# moved: sample + uncond + cond + history read + new sample (+ history entry, + UniPC's last_sample
# read and corrected sample written)
if is_smoke():
    CASES = [("smoke_dpm2m", (4, 8, 8), torch.float16, lambda: DPMSolverMultistepScheduler(), 6),
             ("smoke_flow", (16, 8), torch.bfloat16, lambda: FlowMatchEulerDiscreteScheduler(), 4),
             ("smoke_unipc", (4, 8, 8), torch.float16, lambda: UniPCMultistepScheduler(), 9)]
    BATCHES = [1]
else:
    CASES = [
        ("sd15_dpm2m", (4, 64, 64), torch.float16, lambda: DPMSolverMultistepScheduler(), 6),
        ("sd15_unipc", (4, 64, 64), torch.float16, lambda: UniPCMultistepScheduler(), 9),
        ("sdxl_euler", (4, 128, 128), torch.float16, lambda: EulerDiscreteScheduler(), 5),
        ("flux_flowmatch", (4096, 64), torch.bfloat16, lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), 4),
        ("video_flowmatch", (16, 21, 90, 160), torch.bfloat16, lambda: FlowMatchEulerDiscreteScheduler(shift=5.0), 4),
        ("video_dpm2m_flow", (16, 21, 90, 160), torch.bfloat16,
         lambda: DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0),
         6),
    ]
    BATCHES = [1, 2]
# +graph: the patched step captured once in a CUDA graph and replayed, i.e. the kernel without the
# step()'s host work (on the H200 that host work, ~0.1 ms, set the time of every step but the
# largest); diffusers' step is not capturable (host syncs), so it has no such variant
IMPLS = ["diffaccel:cuda", "diffaccel:triton", "diffaccel:cuda+graph", "diffaccel:triton+graph", "baseline:diffusers"]


def _bytes_moved(numel: int, dtype: torch.dtype, tensors_moved: int) -> int:
    return numel * torch.empty((), dtype=dtype).element_size() * tensors_moved


def _prepared(factory, x, patched: bool):
    s = factory()
    if patched:
        assert patch_scheduler(s).patched
    s.set_timesteps(STEPS, device=x.device)
    if hasattr(s, "model_outputs"):  # a full history: the step runs at its configured order
        s.model_outputs = [torch.randn_like(x) for _ in s.model_outputs]
        s.lower_order_nums = s.config.solver_order
    if hasattr(s, "last_sample"):  # UniPC: its corrector runs
        s.last_sample = torch.randn_like(x)
        s.this_order = s.config.solver_order
        s.timestep_list = [s.timesteps[MID - 1 - k] for k in range(s.config.solver_order)][::-1]
    return s


_STATE_ATTRS = ("model_outputs", "timestep_list", "last_sample", "this_order", "lower_order_nums")


def _state(s):
    return {k: copy.copy(getattr(s, k)) for k in _STATE_ATTRS if hasattr(s, k)}


def _restore(s, saved):
    """Every timed call runs the same mid-trajectory step (host-side attributes only)."""
    s._step_index = MID
    for k, v in saved.items():
        setattr(s, k, copy.copy(v))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_solver_step_cfg(benchmark, case, batch, impl):
    name, latent, dtype, factory, tensors_moved = case
    dev = device()
    shape = (batch, *latent)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=g).to(dev, dtype)
    u = torch.randn(shape, generator=g).to(dev, dtype)
    c = torch.randn(shape, generator=g).to(dev, dtype)
    if impl.startswith("diffaccel:"):
        backend, _, graphed = impl.split(":", 1)[1].partition("+")
        if graphed and dev.type != "cuda":
            pytest.skip("CUDA graphs need a GPU")
        why = _backend._why_not(_backend.registered_ops()["fused_solver_step"], backend, x.device)
        if why is not None:
            pytest.skip(f"{backend} backend unavailable: {why}")
        s = _prepared(factory, x, patched=True)
        t = s.timesteps[MID]
        saved = _state(s)

        def fn():
            _restore(s, saved)
            with use_backend(backend):
                return s.step_with_guidance(u, c, GUIDANCE, t, x).prev_sample
        if graphed:
            fn = cuda_graph_replay(fn)
    else:
        s = _prepared(factory, x, patched=False)
        t = s.timesteps[MID]
        saved = _state(s)

        def fn():
            _restore(s, saved)
            return s.step(u + GUIDANCE * (c - u), t, x).prev_sample
    annotate(benchmark, family=FAMILY, case=f"{name}_b{batch}_cfg", shape=shape, dtype=dtype_name(dtype), impl=impl,
             flops=None, bytes=_bytes_moved(x.numel(), dtype, tensors_moved))
    out = measure(benchmark, fn)
    assert out.shape == shape and out.dtype == dtype
