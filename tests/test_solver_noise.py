"""In-kernel Philox noise of the fused solver step (noise_seed / noise_offset) and the schedulers'
``noise="philox"`` mode.

Tolerances: the raw uint32 Philox words are compared bit for bit (torch reference, a scalar
Python transcription, Random123's known answers, the C++ loop, Triton's own tl.randint4x under
the interpreter). The fp32 normals go through log / cos / sqrt, which differ in the last ulps
between torch, libm, numpy (the interpreter) and CUDA's libdevice / approximate instructions:
CPU backends within 1e-5 absolute of the torch reference (measured: at most 5e-7), GPU backends
within 1e-4 (``cos.approx`` / ``lg2.approx`` are allowed ~2^-20 absolute). Trajectories: fp32
within 1e-5 relative to the trajectory's max |x| (as tests/test_schedulers.py).
"""
import copy

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler,
                       UniPCMultistepScheduler)

import diffaccel
from diffaccel.ops import _backend, use_backend
from diffaccel.ops.philox import (philox4x32_10_reference, philox_normal_reference, seed_as_int64,
                                  uint32_to_uniform_reference)
from diffaccel.ops.solver import B_N, CLIP, NUM_COEFFS, fused_solver_step
from diffaccel.solvers import noise_state, patch_scheduler, set_noise_seed, unpatch_scheduler

CPU_NORMAL_ATOL = 1e-5
GPU_NORMAL_ATOL = 1e-4
TRAJ_RTOL = 1e-5
BACKENDS = ["torch", "cuda", "triton"]  # "cuda" = the C++ extension (its CPU loop on a CPU tensor)

M32 = 0xFFFFFFFF


def _philox_scalar(key, ctr, rounds=10):
    """Philox4x32 written from the Random123 paper with Python ints, independent of the reference."""
    (k0, k1), (c0, c1, c2, c3) = key, ctr
    for _ in range(rounds):
        p0, p2 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p2 >> 32) ^ c1 ^ k0) & M32, p2 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def _skip_unless(backend, device="cpu"):
    why = _backend._why_not(_backend.registered_ops()["fused_solver_step"], backend, torch.device(device))
    if why:
        pytest.skip(why)


def _raw_words(backend, seed, offset, numel, device="cpu"):
    seed_t = torch.tensor(seed_as_int64(seed), dtype=torch.int64, device=device)
    if backend == "torch":
        return torch.stack(philox4x32_10_reference(seed_t, torch.arange(numel, device=device) + offset), 1)
    if backend == "cuda":
        return torch.ops.diffaccel.ext_philox4x32(seed_t, offset, numel)
    from diffaccel.kernels import solver as k
    return k.philox_words(seed_t, offset, numel)


def _noise_row():
    """Coefficients with prev_sample = n: the fused op returns its noise."""
    k = torch.zeros(NUM_COEFFS)
    k[CLIP] = float("inf")
    k[B_N] = 1.0
    return k


SEED_OFFSETS = [(0, 0), (1, 5), (42, 2**32 - 3), (-1, 2**40 + 7), (2**63 - 1, 123456789012),
                (2**64 - 1, 17), (0xDEADBEEFCAFEF00D, 2**31 - 100)]


# -- the raw uint32 stream ----------------------------------------------------------------------

def test_scalar_transcription_known_answers():
    """Random123's published Philox4x32-10 known-answer vectors (kat_vectors)."""
    assert _philox_scalar((0, 0), (0, 0, 0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert _philox_scalar((M32, M32), (M32, M32, M32, M32)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert _philox_scalar((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)) == \
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


@pytest.mark.parametrize("seed,offset", SEED_OFFSETS)
def test_reference_words_equal_scalar_transcription(seed, offset):
    words = _raw_words("torch", seed, offset, 8)
    s = seed % 2**64
    for i in range(8):
        ctr = offset + i
        want = _philox_scalar((s & M32, s >> 32), (ctr & M32, ctr >> 32, 0, 0))
        assert tuple(words[i].tolist()) == want, (seed, ctr)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_backend_words_bit_exact(backend):
    _skip_unless(backend)
    for seed, offset in SEED_OFFSETS:
        got = _raw_words(backend, seed, offset, 1000)
        torch.testing.assert_close(got, _raw_words("torch", seed, offset, 1000), rtol=0, atol=0)


def test_uniform_matches_triton_transform_on_edges():
    w = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 12345, 2**32 - 12346], dtype=torch.int64)
    u = uint32_to_uniform_reference(w)
    assert u.dtype == torch.float32
    assert (u >= 0).all() and (u < 1).all()
    assert u[0] == 0 and u[4] == 0  # ~x folds 0xFFFFFFFF onto 0
    assert u[5] == u[6]  # x and 2**32 - 1 - x give the same uniform


# -- the normals through the fused op ------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_op_noise_equals_reference_normals(backend):
    _skip_unless(backend)
    x = torch.zeros(3, 4, 8, 8)
    seed = torch.tensor(987654321)
    with use_backend(backend):
        for offset in (0, 2**32 - 100):
            got = fused_solver_step(x, x, _noise_row(), noise_seed=seed, noise_offset=offset)[0]
            want = philox_normal_reference(seed, offset, x.numel()).reshape(x.shape)
            torch.testing.assert_close(got, want, rtol=0, atol=0 if backend == "torch" else CPU_NORMAL_ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_op_philox_equals_passing_the_same_noise(backend, dtype):
    """Guidance, history and both noise terms: in-kernel noise == the reference normals passed in."""
    _skip_unless(backend)
    g = torch.Generator().manual_seed(0)
    x, u, c, h = (torch.randn(2, 4, 6, 6, generator=g).to(dtype) for _ in range(4))
    k = torch.randn(NUM_COEFFS, generator=g)
    k[CLIP] = 2.5
    seed = torch.tensor(-77)
    n = philox_normal_reference(seed, 1000, x.numel()).reshape(x.shape)
    with use_backend(backend):
        got = fused_solver_step(x, u, k, model_output_cond=c, guidance_scale=4.0, history=[h], noise_seed=seed,
                                noise_offset=1000, out_dtype=torch.float32, history_dtype=torch.float32)
    with use_backend("torch"):
        want = fused_solver_step(x, u, k, model_output_cond=c, guidance_scale=4.0, history=[h], noise=n,
                                 out_dtype=torch.float32, history_dtype=torch.float32)
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4 if backend != "torch" else 0)


def test_noise_statistics():
    seed = torch.tensor(2024)
    n = philox_normal_reference(seed, 0, 100_000).double()
    assert abs(n.mean().item()) < 0.015  # 4.7 standard errors
    assert abs(n.std().item() - 1.0) < 0.01
    from scipy import stats

    assert stats.kstest(n.numpy(), "norm").pvalue > 1e-3
    # consecutive steps (the counter advanced by numel) and neighbouring elements are uncorrelated
    nxt = philox_normal_reference(seed, 100_000, 100_000).double()
    assert abs(np.corrcoef(n.numpy(), nxt.numpy())[0, 1]) < 0.015
    assert abs(np.corrcoef(n[:-1].numpy(), n[1:].numpy())[0, 1]) < 0.015
    other_seed = philox_normal_reference(torch.tensor(2025), 0, 100_000).double()
    assert abs(np.corrcoef(n.numpy(), other_seed.numpy())[0, 1]) < 0.015


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_backend_noise_statistics(backend):
    _skip_unless(backend)
    x = torch.zeros(1, 20_000)
    with use_backend(backend):
        n = fused_solver_step(x, x, _noise_row(), noise_seed=torch.tensor(5), noise_offset=3)[0].double().flatten()
    from scipy import stats

    assert stats.kstest(n.numpy(), "norm").pvalue > 1e-3
    assert abs(n.mean().item()) < 0.035 and abs(n.std().item() - 1.0) < 0.025


def test_opcheck_with_noise_seed():
    x = torch.randn(2, 4, 4, 4, dtype=torch.float16)
    args = (x, x.clone(), torch.randn(NUM_COEFFS), None, None, None, None, None, None, None, 1.0, 0.0,
            torch.float16, torch.float32, True, torch.tensor(3), 64)
    torch.library.opcheck(torch.ops.diffaccel.fused_solver_step.default, args)


def test_compile_fullgraph_with_noise_seed():
    x = torch.randn(1, 4, 8, 8)
    k = torch.randn(NUM_COEFFS)
    k[CLIP] = float("inf")
    seed = torch.tensor(12)

    u = torch.tanh(x)

    def f(x, u, k, seed):
        return fused_solver_step(x, u, k, noise_seed=seed, noise_offset=256)[0] * 2.0

    got = torch.compile(f, fullgraph=True)(x, u, k, seed)
    torch.testing.assert_close(got, f(x, u, k, seed), rtol=1e-6, atol=1e-6)


def test_op_errors_name_the_argument():
    x = torch.zeros(1, 4, 4, 4)
    k = _noise_row()
    seed = torch.tensor(1)
    with pytest.raises(ValueError, match="^noise_seed: given together with noise"):
        fused_solver_step(x, x, k, noise=x, noise_seed=seed, noise_offset=0)
    with pytest.raises(ValueError, match="^noise: this step needs noise"):
        fused_solver_step(x, x, k, needs_noise=True)
    with pytest.raises(ValueError, match="^noise: this step takes no noise"):
        fused_solver_step(x, x, k, noise=x, needs_noise=False)
    with pytest.raises(ValueError, match="^noise_offset: needed with noise_seed"):
        fused_solver_step(x, x, k, noise_seed=seed)
    with pytest.raises(ValueError, match="^noise_offset: given without noise_seed"):
        fused_solver_step(x, x, k, noise_offset=3)
    with pytest.raises(ValueError, match="^noise_offset: expected 0 <="):
        fused_solver_step(x, x, k, noise_seed=seed, noise_offset=-1)
    with pytest.raises(ValueError, match="^noise_offset: expected 0 <="):
        fused_solver_step(x, x, k, noise_seed=seed, noise_offset=2**63 - 10)
    with pytest.raises(TypeError, match="^noise_offset: expected a python int"):
        fused_solver_step(x, x, k, noise_seed=seed, noise_offset=1.0)
    with pytest.raises(TypeError, match="^noise_seed: expected dtype"):
        fused_solver_step(x, x, k, noise_seed=torch.tensor(1, dtype=torch.int32), noise_offset=0)
    with pytest.raises(ValueError, match="^noise_seed: expected one int64 seed"):
        fused_solver_step(x, x, k, noise_seed=torch.tensor([1, 2]), noise_offset=0)
    with pytest.raises(TypeError, match="^seed: expected a python int"):
        philox_normal_reference(1.5, 0, 4)
    with pytest.raises(ValueError, match="^seed: expected a 64-bit value"):
        philox_normal_reference(2**64, 0, 4)


def test_ext_op_errors_name_the_argument():
    _skip_unless("cuda")
    x = torch.zeros(1, 4, 4, 4)
    k = _noise_row()
    ext = torch.ops.diffaccel.ext_fused_solver_step
    with pytest.raises(RuntimeError, match="noise_seed: given together with noise"):
        ext(x, x, k, None, None, None, None, None, x, None, 1.0, 0.0, torch.float32, torch.float32, True,
            torch.tensor(1), 0)
    with pytest.raises(RuntimeError, match="noise_seed: expected an int64 tensor with one element"):
        ext(x, x, k, None, None, None, None, None, None, None, 1.0, 0.0, torch.float32, torch.float32, True,
            torch.tensor([1, 2]), 0)
    with pytest.raises(RuntimeError, match="noise_offset: expected"):
        ext(x, x, k, None, None, None, None, None, None, None, 1.0, 0.0, torch.float32, torch.float32, True,
            torch.tensor(1), -5)


# -- schedulers ------------------------------------------------------------------------------------

SHAPE = (2, 4, 8, 8)
STOCHASTIC = {
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}, {}),
    "ddim_eta1": (lambda: DDIMScheduler(clip_sample=False), {"eta": 1.0}, {}),
    "lcm": (LCMScheduler, {}, {}),
    "dpm2m_sde": (lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), {}, {}),
    "flow_stochastic": (lambda: FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), {}, {}),
    "euler_churn": (EulerDiscreteScheduler, {"s_churn": 1.0}, {}),
    "euler_churn_s_noise": (EulerDiscreteScheduler, {"s_churn": 1.0, "s_noise": 0.5}, {}),
    "dpm2m_sde_heun": (lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_type="heun"),
                       {}, {}),
    "dpm2m_sde_noise_pred_midpoint": (lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver",
                                                                          solver_type="midpoint",
                                                                          final_sigmas_type="sigma_min"), {}, {}),
}
_MODULES = {
    EulerAncestralDiscreteScheduler: "diffusers.schedulers.scheduling_euler_ancestral_discrete",
    DDIMScheduler: "diffusers.schedulers.scheduling_ddim",
    LCMScheduler: "diffusers.schedulers.scheduling_lcm",
    DPMSolverMultistepScheduler: "diffusers.schedulers.scheduling_dpmsolver_multistep",
    FlowMatchEulerDiscreteScheduler: "diffusers.schedulers.scheduling_flow_match_euler_discrete",
    EulerDiscreteScheduler: "diffusers.schedulers.scheduling_euler_discrete",
}


def _model(x, t):
    return torch.tanh(0.8 * x + 0.001 * float(t)) * 0.9


def _run(s, x, steps=8, **step_kwargs):
    s.set_timesteps(steps)
    for t in s.timesteps:
        xin = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
        x = s.step(_model(xin, t), t, x, **step_kwargs).prev_sample
    return x


def _close(a, b, rtol=TRAJ_RTOL):
    scale = max(b.abs().max().item(), 1.0)
    assert (a - b).abs().max().item() <= rtol * scale, (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_philox_trajectory_equals_diffusers_with_reference_noise(name, monkeypatch):
    """Patched philox-mode loop == the unpatched diffusers loop whose randn_tensor returns the
    torch reference's Philox normals at offsets 0, numel, 2 numel, ... (one block per draw)."""
    make, step_kwargs, _ = STOCHASTIC[name]
    ref, s = make(), make()
    seed = 1234
    assert patch_scheduler(s, noise="philox", seed=seed).patched
    counter = {"offset": 0}

    def reference_randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert generator is None
        numel = int(np.prod(shape))
        n = philox_normal_reference(seed, counter["offset"], numel).reshape(shape)
        counter["offset"] += numel
        return n.to(device=device or "cpu", dtype=dtype or torch.float32)

    monkeypatch.setattr(f"{_MODULES[type(ref)]}.randn_tensor", reference_randn)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    want = _run(ref, x0.clone(), **step_kwargs)
    assert counter["offset"] > 0
    got = _run(s, x0.clone(), **step_kwargs)
    _close(got, want)
    assert noise_state(s) == (seed, counter["offset"])  # the counter advanced once per draw, by numel


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", ["euler_ancestral", "ddim_eta1", "lcm"])
def test_philox_trajectory_kernels_equal_reference(backend, name):
    _skip_unless(backend)
    make, step_kwargs, _ = STOCHASTIC[name]
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    outs = []
    for b in ("torch", backend):
        s = make()
        patch_scheduler(s, noise="philox", seed=99)
        with use_backend(b):
            outs.append(_run(s, x0.clone(), steps=5, **step_kwargs))
    _close(outs[1], outs[0], rtol=5e-5)  # normals differ in the last ulps between libm / numpy / torch


def test_determinism_reseed_and_counter():
    make = EulerAncestralDiscreteScheduler
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    a, b, c = make(), make(), make()
    patch_scheduler(a, noise="philox", seed=7)
    patch_scheduler(b, noise="philox", seed=7)
    patch_scheduler(c, noise="philox", seed=8)
    ra, rb, rc = (_run(s, x0.clone()) for s in (a, b, c))
    assert torch.equal(ra, rb)
    assert (ra - rc).abs().max() > 1e-2
    # set_timesteps keeps the counter: a second run draws fresh noise ...
    again = _run(a, x0.clone())
    assert (again - ra).abs().max() > 1e-2
    # ... and set_noise_seed rewinds it
    set_noise_seed(a, 7)
    assert noise_state(a) == (7, 0)
    assert torch.equal(_run(a, x0.clone()), ra)
    set_noise_seed(a, 8)
    assert torch.equal(_run(a, x0.clone()), rc)
    # a deepcopy carries its own seed tensor and counter
    d = copy.deepcopy(a)
    set_noise_seed(d, 7)
    assert noise_state(a)[0] == 8 and noise_state(d) == (7, 0)


def test_panorama_snapshots_do_not_rewind_the_counter():
    """diffusers' panorama pipeline deep-copies scheduler.__dict__ per view and restores it before
    each view's step. The copy held the Philox counter, so each restore rewound it: view 0's noise
    at step 1 was view 1's at step 0 (correlation 1.0) and six draws advanced the counter by four."""
    s = DDIMScheduler()
    patch_scheduler(s, noise="philox", seed=5)
    s.set_timesteps(4)
    x = torch.zeros(1, 4, 8, 8)
    status = [copy.deepcopy(s.__dict__)] * 3  # as StableDiffusionPanoramaPipeline does
    offsets = []
    for t in s.timesteps[:2]:
        for view in range(3):
            s.__dict__.update(status[view])
            offsets.append(noise_state(s)[1])
            s.step(torch.zeros_like(x), t, x, eta=1.0)
            status[view] = copy.deepcopy(s.__dict__)
    assert offsets == [i * x.numel() for i in range(6)] and noise_state(s) == (5, 6 * x.numel())


def test_failed_step_does_not_advance_the_counter():
    s = EulerAncestralDiscreteScheduler()
    patch_scheduler(s, noise="philox", seed=4)
    s.set_timesteps(4)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="^model_output: expected shape"):
        s.step(torch.zeros(1, 4, 8, 8), s.timesteps[0], x)
    assert noise_state(s) == (4, 0)
    s.step(torch.zeros(SHAPE), s.timesteps[0], x)
    assert noise_state(s) == (4, x.numel())


def test_default_seed_is_torch_initial_seed():
    torch.manual_seed(31337)
    s = EulerAncestralDiscreteScheduler()
    patch_scheduler(s, noise="philox")
    assert noise_state(s) == (31337, 0)
    t = EulerAncestralDiscreteScheduler()
    patch_scheduler(t, noise="philox", seed=2**64 - 1)  # as int64 bits
    assert noise_state(t) == (-1, 0)


@pytest.mark.parametrize("name", ["euler_ancestral", "ddim_eta1", "lcm", "dpm2m_sde", "dpm2m_sde_heun",
                                  "dpm2m_sde_noise_pred_midpoint", "euler_churn_s_noise"])
def test_generator_given_keeps_diffusers_noise(name):
    make, step_kwargs, _ = STOCHASTIC[name]
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    ref, s = make(), make()
    patch_scheduler(s, noise="philox", seed=1)
    want = _run(ref, x0.clone(), generator=torch.Generator().manual_seed(11), **step_kwargs)
    got = _run(s, x0.clone(), generator=torch.Generator().manual_seed(11), **step_kwargs)
    _close(got, want)
    assert noise_state(s) == (1, 0)  # no in-kernel draw happened


def test_variance_noise_still_used_in_philox_mode():
    ref, s = DDIMScheduler(clip_sample=False), DDIMScheduler(clip_sample=False)
    patch_scheduler(s, noise="philox", seed=1)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    for sch in (ref, s):
        sch.set_timesteps(4)
    vn = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    t = ref.timesteps[0]
    want = ref.step(_model(x0, t), t, x0, eta=1.0, variance_noise=vn).prev_sample
    got = s.step(_model(x0, t), t, x0, eta=1.0, variance_noise=vn).prev_sample
    _close(got, want)
    assert noise_state(s) == (1, 0)


@pytest.mark.parametrize("name", ["dpm2m_sde", "dpm2m_sde_heun", "dpm2m_sde_noise_pred_midpoint"])
def test_dpm_sde_variance_noise_passed_in(name):
    """DPM-Solver SDE steps with the noise passed in (variance_noise), as a caller with its own noise
    does: the whole trajectory equals diffusers' given the same noise, order 1 and 2 steps included."""
    make, _, _ = STOCHASTIC[name]
    ref, s = make(), make()
    assert patch_scheduler(s).patched
    g = torch.Generator().manual_seed(12)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(13))
    outs = []
    for sch in (ref, s):
        sch.set_timesteps(8)
        outs.append(x0.clone())
    for t in ref.timesteps:
        vn = torch.randn(SHAPE, generator=g)
        outs = [sch.step(_model(x, t), t, x, variance_noise=vn).prev_sample for sch, x in zip((ref, s), outs)]
    _close(outs[1], outs[0])


def test_generator_mode_unchanged_and_repatch_switches():
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(10))
    s = EulerAncestralDiscreteScheduler()
    patch_scheduler(s)
    assert noise_state(s) is None
    torch.manual_seed(0)
    r1 = _run(s, x0.clone())  # global-RNG randn_tensor, as diffusers
    torch.manual_seed(0)
    r2 = _run(EulerAncestralDiscreteScheduler(), x0.clone())
    _close(r1, r2)
    res = patch_scheduler(s, noise="philox", seed=5)
    assert res.patched and "noise" in res.reason and noise_state(s) == (5, 0)
    assert patch_scheduler(s).reason == "already patched" and noise_state(s) == (5, 0)
    patch_scheduler(s, noise="generator")
    assert noise_state(s) is None
    assert unpatch_scheduler(s)


def test_patch_and_reseed_errors():
    with pytest.raises(ValueError, match="^noise: expected 'generator' or 'philox'"):
        patch_scheduler(EulerAncestralDiscreteScheduler(), noise="curand")
    with pytest.raises(ValueError, match="^seed: only used with noise='philox'"):
        patch_scheduler(EulerAncestralDiscreteScheduler(), seed=3)
    for make in (UniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler, DPMSolverMultistepScheduler):
        s = make()
        with pytest.raises(ValueError, match="^noise: 'philox' has nothing to do: .*draws no noise"):
            patch_scheduler(s, noise="philox", seed=1)
        assert "_diffaccel_solver" not in vars(s)  # nothing was touched
    with pytest.raises(TypeError, match="^seed: expected a python int"):
        patch_scheduler(EulerAncestralDiscreteScheduler(), noise="philox", seed="7")
    with pytest.raises(ValueError, match="^seed: expected a 64-bit value"):
        patch_scheduler(EulerAncestralDiscreteScheduler(), noise="philox", seed=-2**63 - 1)
    with pytest.raises(ValueError, match="^scheduler: not patched with noise='philox'"):
        set_noise_seed(EulerAncestralDiscreteScheduler(), 1)
    s = EulerAncestralDiscreteScheduler()
    patch_scheduler(s)
    with pytest.raises(ValueError, match="^scheduler: not patched with noise='philox'"):
        set_noise_seed(s, 1)
    patch_scheduler(s, noise="philox", seed=2)
    with pytest.raises(ValueError, match="^offset: expected a python int >= 0"):
        set_noise_seed(s, 1, offset=-1)
    with pytest.raises(TypeError, match="^seed: expected a python int"):
        set_noise_seed(s, 1.0)
    assert noise_state(s) == (2, 0)  # failed calls changed nothing
    assert hasattr(diffaccel.solvers, "set_noise_seed")


# -- GPU -------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_words_bit_exact_and_normals(backend):
    _skip_unless(backend, "cuda")
    for seed, offset in SEED_OFFSETS:
        got = _raw_words(backend, seed, offset, 1 << 16, "cuda").cpu()
        torch.testing.assert_close(got, _raw_words("torch", seed, offset, 1 << 16), rtol=0, atol=0)
    x = torch.zeros(2, 4, 64, 64, device="cuda")
    seed = torch.tensor(77, device="cuda")
    with use_backend(backend):
        got = fused_solver_step(x, x, _noise_row().cuda(), noise_seed=seed, noise_offset=2**33)[0]
    want = philox_normal_reference(77, 2**33, x.numel()).reshape(x.shape)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=GPU_NORMAL_ATOL)


def _gpu_guided_loop(s, x, cond_scale=5.0, **step_kwargs):
    for t in s.timesteps:
        u = torch.tanh(x * 0.7)
        c = torch.tanh(x * 0.6 + 0.1)
        x = s.step_with_guidance(u, c, cond_scale, t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", ["euler_ancestral", "ddim_eta1", "lcm", "dpm2m_sde", "flow_stochastic"])
def test_gpu_profile_one_kernel_per_stochastic_step_no_sync(name, backend):
    from torch.profiler import ProfilerActivity, profile

    _skip_unless(backend, "cuda")
    make, step_kwargs, _ = STOCHASTIC[name]
    s = make()
    patch_scheduler(s, noise="philox", seed=3)
    s.set_timesteps(10, device="cuda")
    x = torch.randn(2, 4, 64, 64, device="cuda")
    u, c = torch.randn_like(x), torch.randn_like(x)
    with use_backend(backend):
        t0 = s.timesteps[0]
        x = s.step_with_guidance(u, c, 5.0, t0, x, **step_kwargs).prev_sample  # index lookup, warm-up
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for t in s.timesteps[1:6]:
                x = s.step_with_guidance(u, c, 5.0, t, x, **step_kwargs).prev_sample
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    launches = [n for n in names if "LaunchKernel" in n]
    assert len(launches) == 5, launches  # noise and guidance folded into the one step kernel
    assert not any("Memcpy" in n and "DtoH" in n for n in names), [n for n in names if "Memcpy" in n]
    assert names.count("cudaStreamSynchronize") == 0 and names.count("cudaMemcpyAsync") == 0


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["euler_ancestral", "ddim_eta1", "dpm2m_sde"])
def test_gpu_graph_replay_after_set_noise_seed_equals_eager(name):
    make, step_kwargs, _ = STOCHASTIC[name]
    s = make()
    patch_scheduler(s, noise="philox", seed=1)
    x0 = torch.randn(2, 4, 64, 64, device="cuda")

    def reset(seed):
        s.set_timesteps(10, device="cuda")
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(0)
        set_noise_seed(s, seed)

    static_x = x0.clone()
    reset(1)
    _gpu_guided_loop(s, static_x.clone(), **step_kwargs)  # warm-up
    reset(1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _gpu_guided_loop(s, static_x, **step_kwargs)
    results = {}
    for seed in (1, 2, 1):
        set_noise_seed(s, seed)  # in place: the graph reads the new seed
        static_x.copy_(x0)
        graph.replay()
        torch.cuda.synchronize()
        results.setdefault(seed, []).append(out.clone())
    for seed in (1, 2):
        reset(seed)
        eager = _gpu_guided_loop(s, x0.clone(), **step_kwargs)
        torch.testing.assert_close(results[seed][0], eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(results[1][0], results[1][1])
    assert (results[1][0] - results[2][0]).abs().max() > 1e-2
