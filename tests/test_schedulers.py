"""Patched schedulers against the unpatched diffusers ones: whole trajectories, every backend.

The model is a deterministic smooth nonlinear function of the sample and the timestep, so
each step's output depends on the previous ones and errors compound as in real sampling.
Tolerances (relative to the trajectory's max |x|): fp32 1e-5; fp16 / bf16 runs compare the
fused fp32-math step against diffusers' own fp16/bf16 arithmetic, so they are bounded by the
storage dtype's rounding compounded over 10 steps: fp16 5e-3, bf16 4e-2 (measured: at most 3.5e-3
and 2.3e-2). They also check that the fused trajectory is no further from the fp32 one than
diffusers' own half-precision trajectory is (within 25%).
"""
import copy
import inspect

import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler, PNDMScheduler,
                       UniPCMultistepScheduler)

from diffaccel.ops import _backend, use_backend
from diffaccel.solvers import is_patched, patch_scheduler, unpatch_scheduler

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
SHAPE = (1, 4, 8, 8)

CONFIGS = {
    "flow": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    "flow_karras": lambda: FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
    "flow_stochastic": lambda: FlowMatchEulerDiscreteScheduler(stochastic_sampling=True),
    "euler_eps": lambda: EulerDiscreteScheduler(),
    "euler_v_karras": lambda: EulerDiscreteScheduler(prediction_type="v_prediction", use_karras_sigmas=True),
    "euler_sample_zero_final": lambda: EulerDiscreteScheduler(prediction_type="sample", final_sigmas_type="zero",
                                                              timestep_spacing="trailing"),
    "ddim_eps_clip": lambda: DDIMScheduler(),
    "ddim_v_trailing": lambda: DDIMScheduler(prediction_type="v_prediction", clip_sample=False,
                                             timestep_spacing="trailing", rescale_betas_zero_snr=True),
    "ddim_sample": lambda: DDIMScheduler(prediction_type="sample", set_alpha_to_one=False),
    "dpm2m_eps": lambda: DPMSolverMultistepScheduler(),
    "dpm2m_v_karras_heun": lambda: DPMSolverMultistepScheduler(prediction_type="v_prediction",
                                                               use_karras_sigmas=True, solver_type="heun"),
    "dpm3m_eps_nolof": lambda: DPMSolverMultistepScheduler(solver_order=3, lower_order_final=False),
    "dpm3m_v_zero_final": lambda: DPMSolverMultistepScheduler(solver_order=3, prediction_type="v_prediction",
                                                              final_sigmas_type="zero"),
    "dpm2m_flow": lambda: DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=3.0),
    "dpm2m_sde": lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"),
    "dpm3m_sde_euler_final": lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3,
                                                                 euler_at_final=True),
    "dpm2m_noise_pred": lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    "dpm3m_noise_pred_v": lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver", solver_order=3,
                                                              prediction_type="v_prediction",
                                                              final_sigmas_type="sigma_min"),
    "dpm2m_sde_noise_pred_heun": lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver",
                                                                     solver_type="heun", prediction_type="sample",
                                                                     final_sigmas_type="sigma_min"),
    # the order-2 c1 of the SDE variants differs between solver_type="midpoint" and "heun" (both fused)
    "dpm2m_sde_heun": lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_type="heun"),
    "dpm2m_sde_noise_pred_midpoint": lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver",
                                                                         solver_type="midpoint",
                                                                         final_sigmas_type="sigma_min"),
    "lcm": lambda: LCMScheduler(),
    "lcm_clip_v": lambda: LCMScheduler(prediction_type="v_prediction", clip_sample=True, clip_sample_range=1.5),
    "unipc_bh2": lambda: UniPCMultistepScheduler(),
    "unipc_bh1_v_karras": lambda: UniPCMultistepScheduler(solver_type="bh1", prediction_type="v_prediction",
                                                          use_karras_sigmas=True, final_sigmas_type="sigma_min"),
    # (final_sigmas_type="zero" with lower_order_final=False makes diffusers' own linalg.solve fail)
    "unipc3_bh2_nolof": lambda: UniPCMultistepScheduler(solver_order=3, lower_order_final=False,
                                                        final_sigmas_type="sigma_min"),
    # (bh1 with final_sigmas_type="zero": diffusers' last step computes -inf * 0 = NaN; the fused step
    # gives the finite limit there, so those configs are compared with sigma_min)
    "unipc3_bh1_sample_skipcorr": lambda: UniPCMultistepScheduler(solver_order=3, solver_type="bh1",
                                                                  prediction_type="sample", disable_corrector=[0, 4],
                                                                  final_sigmas_type="sigma_min"),
    # (noise prediction up to a zero final sigma: diffusers' last step is 0 * inf = NaN; the fused step raises)
    "unipc_noise_pred_v": lambda: UniPCMultistepScheduler(predict_x0=False, prediction_type="v_prediction",
                                                          final_sigmas_type="sigma_min"),
    "unipc3_noise_pred_bh1": lambda: UniPCMultistepScheduler(predict_x0=False, solver_order=3, solver_type="bh1",
                                                             final_sigmas_type="sigma_min"),
    "euler_a_eps": lambda: EulerAncestralDiscreteScheduler(),
    "euler_a_v": lambda: EulerAncestralDiscreteScheduler(prediction_type="v_prediction",
                                                         timestep_spacing="trailing"),
}


def fake_model(x, t):
    t = float(t)
    xf = x.float()
    return (torch.tanh(0.7 * xf + t / 1000.0) + 0.1 * xf * torch.sin(torch.tensor(t / 300.0))).to(x.dtype)


def run(scheduler, steps, *, patched, dtype=torch.float32, guidance=None, step_kwargs=None, seed=0):
    s = copy.deepcopy(scheduler)
    if patched:
        r = patch_scheduler(s)
        assert r.patched, r
    s.set_timesteps(steps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    x = (x * float(getattr(s, "init_noise_sigma", 1.0))).to(dtype)
    gen = {"generator": torch.Generator().manual_seed(seed + 1)} \
        if "generator" in inspect.signature(type(s).step).parameters else {}
    x0s = []
    for t in s.timesteps:
        xin = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
        if guidance is None:
            out = s.step(fake_model(xin, t), t, x, **gen, **(step_kwargs or {}))
        else:
            scale, rescale = guidance
            u, c = fake_model(xin, t), fake_model(xin * 0.9 + 0.05, t)
            if patched:
                out = s.step_with_guidance(u, c, scale, t, x, guidance_rescale=rescale, **gen)
            else:
                from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

                g = u + scale * (c - u)
                if rescale:
                    g = rescale_noise_cfg(g, c, guidance_rescale=rescale)
                out = s.step(g, t, x, **gen)
        x = out.prev_sample
        extra = getattr(out, "pred_original_sample", None)
        if extra is None:
            extra = getattr(out, "denoised", None)
        x0s.append(extra)
    return x, x0s, s


def assert_traj_close(a, b, dtype, tol=None):
    tol = TOL[dtype] if tol is None else tol
    assert a.dtype == b.dtype and a.shape == b.shape
    err = ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp(min=1e-6)).item()
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def _needs(backend):
    why = _backend._why_not(_backend.registered_ops()["fused_solver_step"], backend, torch.device("cpu"))
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_trajectory_fp32_reference(config, steps):
    sch = CONFIGS[config]()
    want, want_x0, _ = run(sch, steps, patched=False)
    with use_backend("torch"):
        got, got_x0, patched = run(sch, steps, patched=True)
    assert_traj_close(want, got, torch.float32)
    for w, g in zip(want_x0, got_x0):  # pred_original_sample / denoised where the original returns them
        assert (w is None) == (g is None)
        if w is not None:
            assert w.dtype == g.dtype
            # x0 at the noisiest steps is (x - sqrt(1-a) e) / sqrt(a): both sides' fp32 rounding of x is
            # amplified by 1/sqrt(a) (about 14 at t=999) before DDIM/LCM clip it to [-1, 1]
            assert_traj_close(w, g, torch.float32, tol=3e-5)
    assert isinstance(patched, DDIMScheduler) or patched.step_index == steps


@pytest.mark.parametrize("config", ["dpm3m_eps_nolof", "euler_eps", "ddim_eps_clip", "unipc3_bh2_nolof"])
def test_trajectory_50_steps(config):
    sch = CONFIGS[config]()
    want, _, _ = run(sch, 50, patched=False)
    got, _, _ = run(sch, 50, patched=True)
    assert_traj_close(want, got, torch.float32)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("config", ["flow", "euler_v_karras", "ddim_eps_clip", "dpm3m_v_zero_final", "dpm2m_sde",
                                    "lcm", "euler_a_eps", "unipc3_bh2_nolof"])
def test_trajectory_fp32_kernels(backend, config):
    _needs(backend)
    sch = CONFIGS[config]()
    steps = 10 if backend == "cuda" else 5  # the interpreter is slow: short trajectories
    want, _, _ = run(sch, steps, patched=False)
    with use_backend(backend):
        got, _, _ = run(sch, steps, patched=True)
    assert_traj_close(want, got, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", ["flow", "euler_eps", "ddim_v_trailing", "dpm3m_eps_nolof", "lcm", "euler_a_v",
                                    "dpm2m_sde", "unipc_bh2", "dpm3m_noise_pred_v"])
def test_trajectory_half(config, dtype):
    sch = CONFIGS[config]()
    want, _, _ = run(sch, 10, patched=False, dtype=dtype)
    got, _, _ = run(sch, 10, patched=True, dtype=dtype)
    assert_traj_close(want, got, dtype)
    exact, _, _ = run(sch, 10, patched=False)
    scale = exact.abs().max()
    ours = ((got.float() - exact).abs().max() / scale).item()
    theirs = ((want.float() - exact).abs().max() / scale).item()
    assert ours <= 1.25 * theirs, (ours, theirs)


@pytest.mark.parametrize("config", ["ddim_v_trailing", "euler_eps", "dpm2m_v_karras_heun", "lcm", "flow",
                                    "unipc_bh1_v_karras"])
@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guidance_folded_in(config, rescale):
    sch = CONFIGS[config]()
    want, _, _ = run(sch, 10, patched=False, guidance=(7.5, rescale))
    got, _, _ = run(sch, 10, patched=True, guidance=(7.5, rescale))
    assert_traj_close(want, got, torch.float32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tables_are_built_once_per_set_timesteps(name, monkeypatch):
    """The step checks whether what its tables were built from changed (config values, sigmas and
    timesteps): nothing a trajectory does itself may count as a change, nor may a panorama-style
    deepcopy / restore of scheduler.__dict__."""
    from diffaccel.solvers._base import SolverState

    builds = []
    real = SolverState.rebuild
    monkeypatch.setattr(SolverState, "rebuild", lambda self, sch: (builds.append(1), real(self, sch)))
    run(CONFIGS[name](), 6, patched=True)
    assert len(builds) == 1
    s = CONFIGS[name]()
    patch_scheduler(s)
    s.set_timesteps(4)
    saved = copy.deepcopy(s.__dict__)
    s.__dict__.update(saved)
    s.step(torch.zeros(SHAPE), s.timesteps[0], torch.zeros(SHAPE))
    assert len(builds) == 2


def test_config_attribute_writes_and_sigma_edits_after_set_timesteps_take_effect():
    """Diffusers' step re-reads its config and sigmas at each step; the fused tables did not. Stable
    Cascade's pipelines write ``scheduler.config.clip_sample = False`` after set_timesteps (the DDIM
    output was 0.995 off on the first run); Cosmos 2's set ``sigmas[-1] = sigmas[-2]`` (1.8e-3)."""
    cases = [(DDIMScheduler, lambda s: setattr(s.config, "clip_sample", False)),
             (EulerDiscreteScheduler, lambda s: setattr(s.config, "prediction_type", "v_prediction")),
             (FlowMatchEulerDiscreteScheduler, lambda s: s.sigmas.__setitem__(-1, s.sigmas[-2])),
             (DPMSolverMultistepScheduler, lambda s: s.sigmas.mul_(1.01))]
    for make, change in cases:
        outs = []
        for patched in (False, True):
            s = make(clip_sample=True) if make is DDIMScheduler else make()
            if patched:
                patch_scheduler(s)
            s.set_timesteps(5)
            change(s)
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 3
            for t in s.timesteps:
                x = s.step(fake_model(x, t), t, x).prev_sample
            outs.append(x)
        assert_traj_close(outs[1], outs[0], torch.float32)
    s = DDIMScheduler()
    patch_scheduler(s)
    s.set_timesteps(4)
    s.config.thresholding = True  # no longer fused: named, as register_to_config is
    with pytest.raises(ValueError, match="config changed since set_timesteps and is no longer fused.*thresholding"):
        s.step(torch.zeros(SHAPE), s.timesteps[0], torch.zeros(SHAPE))


def test_negative_guidance_rescale_is_refused():
    """diffusers' pipelines skip the rescale for guidance_rescale <= 0; the fused step applied the
    formula for a negative one while its diffusers fallback skipped it (1.9e3 apart)."""
    s = EulerDiscreteScheduler()
    patch_scheduler(s)
    s.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8)
    for bad in (-0.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="^guidance_rescale: expected a finite number >= 0"):
            s.step_with_guidance(x, x, 7.5, s.timesteps[0], x, guidance_rescale=bad)
    assert s.step_index is None  # nothing ran


def test_guidance_rescale_clipped_ddim_per_step():
    """DDIM with x0 clipping, scale 7.5 and rescale 0.7 is ill-conditioned: diffusers' own fp32 and fp64
    trajectories differ by ~5e-5 after 10 steps. So check each step from the same state against
    diffusers in fp64: the fused step's error must be of the order of diffusers' own fp32 error."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    ref, pat = CONFIGS["ddim_eps_clip"](), CONFIGS["ddim_eps_clip"]()
    patch_scheduler(pat)
    ref.set_timesteps(10)
    pat.set_timesteps(10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).double()
    for t in ref.timesteps:
        u, c = fake_model(x, t), fake_model(x * 0.9 + 0.05, t)
        want = ref.step(rescale_noise_cfg(u + 7.5 * (c - u), c, guidance_rescale=0.7), t, x).prev_sample
        got = pat.step_with_guidance(u.float(), c.float(), 7.5, t, x.float(), guidance_rescale=0.7).prev_sample
        assert_traj_close(want, got.double(), torch.float32, tol=2e-6)
        x = want


def test_ddim_eta_and_clipped_model_output():
    sch = CONFIGS["ddim_eps_clip"]()
    for kw in ({"eta": 0.5}, {"eta": 1.0, "use_clipped_model_output": True}):
        want, want_x0, _ = run(sch, 10, patched=False, step_kwargs=kw)
        got, got_x0, _ = run(sch, 10, patched=True, step_kwargs=kw)
        assert_traj_close(want, got, torch.float32)
        assert_traj_close(want_x0[-1], got_x0[-1], torch.float32)


def test_euler_churn():
    sch = CONFIGS["euler_eps"]()
    kw = {"s_churn": 0.5, "s_tmin": 0.5, "s_tmax": 5.0}
    want, _, _ = run(sch, 10, patched=False, step_kwargs=kw)
    got, _, _ = run(sch, 10, patched=True, step_kwargs=kw)
    assert_traj_close(want, got, torch.float32)


def test_euler_churn_s_noise():
    """s_noise scales the churn noise (diffusers: eps = noise * s_noise); s_noise=1 cannot tell it is
    applied. Same tolerance as the other fp32 trajectories (1e-5 of max |x|): dropping the factor
    moves the final sample by ~1e-2 of max |x| (measured 1.2e-2; churn only acts for sigma in
    [s_tmin, s_tmax]), three orders of magnitude above it."""
    sch = CONFIGS["euler_eps"]()
    kw = {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 5.0, "s_noise": 0.5}
    want, _, _ = run(sch, 10, patched=False, step_kwargs=kw)
    got, _, _ = run(sch, 10, patched=True, step_kwargs=kw)
    assert_traj_close(want, got, torch.float32)
    # and the factor matters here: s_noise=1 gives another trajectory
    other, _, _ = run(sch, 10, patched=False, step_kwargs=dict(kw, s_noise=1.0))
    assert (other - want).abs().max() > 1e-2 * want.abs().max()


def test_return_types_and_tuple_form():
    for name in ("euler_eps", "dpm2m_eps", "lcm", "flow", "ddim_eps_clip"):
        ref, pat = CONFIGS[name](), CONFIGS[name]()
        patch_scheduler(pat)
        for s in (ref, pat):
            s.set_timesteps(10)
        x = torch.randn(SHAPE)
        t = ref.timesteps[0]
        a = ref.step(fake_model(x, t), t, x)
        b = pat.step(fake_model(x, t), t, x)
        assert type(a) is type(b) and a.keys() == b.keys()
        at = CONFIGS[name]()
        at.set_timesteps(10)
        bt = CONFIGS[name]()
        patch_scheduler(bt)
        bt.set_timesteps(10)
        ta, tb = at.step(fake_model(x, t), t, x, return_dict=False), bt.step(fake_model(x, t), t, x, return_dict=False)
        assert isinstance(tb, tuple) and len(ta) == len(tb)


def test_img2img_begin_index_and_state():
    """Starting mid-schedule (set_begin_index) keeps diffusers' lower-order warm-up."""
    for name in ("dpm3m_eps_nolof", "euler_eps"):
        ref, pat = CONFIGS[name](), CONFIGS[name]()
        patch_scheduler(pat)
        outs = []
        for s in (ref, pat):
            s.set_timesteps(20)
            s.set_begin_index(6)
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
            for t in s.timesteps[6:]:
                x = s.step(fake_model(s.scale_model_input(x, t), t), t, x).prev_sample
            outs.append(x)
            assert s.step_index == 20
        assert_traj_close(outs[0], outs[1], torch.float32)
        if name.startswith("dpm"):
            assert pat.lower_order_nums == ref.lower_order_nums


def test_patch_unpatch_idempotent_and_exact():
    s = DPMSolverMultistepScheduler()
    cls_step = type(s).step
    r1 = patch_scheduler(s)
    r2 = patch_scheduler(s)
    assert r1.patched and r2.patched and r2.reason == "already patched" and r1.name == "DPMSolverMultistepScheduler"
    assert is_patched(s) and "step" in vars(s)
    assert type(s).step is cls_step  # the class itself is untouched
    other = DPMSolverMultistepScheduler()
    assert not is_patched(other) and "step" not in vars(other)
    assert unpatch_scheduler(s) and not is_patched(s)
    assert s.step.__func__ is cls_step and s.set_timesteps.__func__ is type(s).set_timesteps
    assert not hasattr(s, "step_with_guidance")
    assert not unpatch_scheduler(s)


@pytest.mark.parametrize("config", ["flow", "euler_eps", "ddim_eps_clip", "dpm2m_sde", "lcm", "euler_a_eps",
                                    "unipc_bh2"])
def test_signatures_kept_for_pipelines(config):
    """Pipelines inspect step for eta/generator and set_timesteps for sigmas/timesteps."""
    ref, pat = CONFIGS[config](), CONFIGS[config]()
    patch_scheduler(pat)
    for name in ("step", "set_timesteps"):
        assert inspect.signature(getattr(pat, name)) == inspect.signature(getattr(ref, name))


def test_deepcopy_of_patched_is_independent():
    s = DPMSolverMultistepScheduler()
    patch_scheduler(s)
    s.set_timesteps(10)
    d = copy.deepcopy(s)
    assert is_patched(d) and d.step.__self__ is d
    d.set_timesteps(25)  # rebuilds the copy's tables only
    assert len(vars(s)["_diffaccel_solver"].host["steps"]) == 3 * 10
    x = torch.randn(SHAPE)
    for sch in (s, d):
        t = sch.timesteps[0]
        sch.step(fake_model(x, t), t, x)
    assert s.step_index == 1 and d.step_index == 1


def test_patch_and_unpatch_mid_trajectory():
    ref, s = DPMSolverMultistepScheduler(solver_order=3), DPMSolverMultistepScheduler(solver_order=3)
    xs = []
    for sch, switch in ((ref, False), (s, True)):
        sch.set_timesteps(12)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
        for i, t in enumerate(sch.timesteps):
            if switch and i == 3:
                patch_scheduler(sch)  # timesteps already set: tables are built at patch time
            if switch and i == 8:
                unpatch_scheduler(sch)
            x = sch.step(fake_model(x, t), t, x).prev_sample
        xs.append(x)
    assert_traj_close(xs[0], xs[1], torch.float32)


@pytest.mark.parametrize("make,option", [
    (lambda: DDIMScheduler(thresholding=True), "thresholding"),
    (lambda: LCMScheduler(thresholding=True), "thresholding"),
    # diffusers clamps every x0 value to a negative range; the kernels bounded |x0| by it
    (lambda: DDIMScheduler(clip_sample=True, clip_sample_range=-1.0), "clip_sample_range=-1.0"),
    (lambda: LCMScheduler(clip_sample=True, clip_sample_range=-0.5), "clip_sample_range=-0.5"),
    (lambda: DPMSolverMultistepScheduler(thresholding=True), "thresholding"),
    (lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver", solver_order=3,
                                         final_sigmas_type="sigma_min"), "solver_order=3"),
    (lambda: DPMSolverMultistepScheduler(variance_type="learned_range"), "variance_type"),
    (lambda: EulerAncestralDiscreteScheduler(prediction_type="sample"), "prediction_type"),
    (lambda: UniPCMultistepScheduler(solver_p=DDIMScheduler()), "solver_p"),
    (lambda: UniPCMultistepScheduler(thresholding=True), "thresholding"),
    (lambda: DPMSolverMultistepScheduler(solver_order=4), "solver_order=4: at most 3"),
    (lambda: UniPCMultistepScheduler(solver_order=4), "solver_order=4: at most 3"),
    (lambda: PNDMScheduler(), "PNDMScheduler has no fused step"),
])
def test_unsupported_left_unpatched_with_reason(make, option):
    s = make()
    r = patch_scheduler(s)
    assert not r.patched and option in r.reason
    assert not is_patched(s) and "step" not in vars(s)


def test_singular_step_raises_like_diffusers():
    """UniPC order 3 up to a zero final sigma: diffusers' linalg.solve fails; the fused step raises too."""
    make = lambda: UniPCMultistepScheduler(solver_order=3, lower_order_final=False)  # noqa: E731
    with pytest.raises(RuntimeError):  # torch's LinAlgError
        run(make(), 10, patched=False)
    with pytest.raises(ValueError, match="singular or undefined"):
        run(make(), 10, patched=True)


def test_thresholding_unpatched_still_runs_diffusers():
    s = DDIMScheduler(thresholding=True)
    patch_scheduler(s)
    s.set_timesteps(5)
    x = torch.randn(SHAPE)
    t = s.timesteps[0]
    torch.testing.assert_close(s.step(fake_model(x, t), t, x).prev_sample,
                               DDIMScheduler.step(s, fake_model(x, t), t, x).prev_sample)


@pytest.mark.parametrize("make", [
    lambda: DPMSolverMultistepScheduler(), lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"),
    lambda: DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    lambda: DPMSolverMultistepScheduler(prediction_type="sample"),
    lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    lambda: UniPCMultistepScheduler(), lambda: UniPCMultistepScheduler(prediction_type="sample"),
    lambda: UniPCMultistepScheduler(predict_x0=False, final_sigmas_type="sigma_min"),
    lambda: DDIMScheduler(prediction_type="sample"),
    lambda: DDIMScheduler(), lambda: EulerDiscreteScheduler()])
@pytest.mark.parametrize("latent_dtype,model_dtype", [(torch.float32, torch.bfloat16), (torch.float16, torch.float32)])
def test_mixed_dtypes_follow_diffusers(make, latent_dtype, model_dtype):
    """Latents in one dtype, the model output in another (Wan / SD3 pipelines keep fp32 latents
    beside a bf16 model): each step returns diffusers' dtype and keeps its history (x0 / converted
    output) in diffusers' dtype. DPM-Solver casts to its converted output's dtype: the promoted
    one, or the model's where the conversion is the identity; it used to return the model's
    always (bf16 from fp32 latents, 7e-3 off after 10 steps). Values: no further from an all-fp32
    run than diffusers' own mixed run is (within 25%, relative L2)."""
    def trajectory(sch, latent_dtype, model_dtype):
        sch.set_timesteps(10)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(latent_dtype)
        gen = {"generator": torch.Generator().manual_seed(1)} \
            if "generator" in inspect.signature(type(sch).step).parameters else {}
        seen = []
        for t in sch.timesteps:
            out = sch.step(fake_model(x.float(), t).to(model_dtype), t, x, **gen)
            x = out.prev_sample
            hist = getattr(sch, "model_outputs", None)
            x0 = getattr(out, "pred_original_sample", None)
            seen.append((x.dtype, hist[-1].dtype if hist else None, None if x0 is None else x0.dtype))
        return x.float(), seen

    pat = make()
    patch_scheduler(pat)
    want, want_dtypes = trajectory(make(), latent_dtype, model_dtype)
    got, got_dtypes = trajectory(pat, latent_dtype, model_dtype)
    assert got_dtypes == want_dtypes
    exact, _ = trajectory(make(), torch.float32, torch.float32)
    # (relative L2: on 256 elements the max of a few bf16 rounding flips is too noisy to rank two runs)
    ours, theirs = ((got - exact).norm() / exact.norm()).item(), ((want - exact).norm() / exact.norm()).item()
    assert ours <= 1.25 * theirs + 1e-6, (ours, theirs)


def test_zero_snr_with_epsilon_left_to_diffusers():
    """rescale_betas_zero_snr makes alphas_cumprod[-1] exactly 0, where epsilon's x0 divides by
    zero: DDIM / LCM with epsilon prediction are left unpatched with the reason (building their
    coefficient rows used to raise ZeroDivisionError inside set_timesteps); v_prediction is fused."""
    for cls in (DDIMScheduler, LCMScheduler):
        s = cls(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        r = patch_scheduler(s)
        assert not r.patched and "zero alphas_cumprod" in r.reason and not is_patched(s)
        s.set_timesteps(4)
        assert patch_scheduler(cls(rescale_betas_zero_snr=True, prediction_type="v_prediction")).patched


def test_config_changed_after_patch_raises():
    """A config the fused step does not take, set after patching (register_to_config, solver_p),
    raises at set_timesteps instead of being ignored; the schedule is left as it was."""
    s = DPMSolverMultistepScheduler()
    patch_scheduler(s)
    s.set_timesteps(10)
    s.register_to_config(thresholding=True)
    with pytest.raises(ValueError, match="config changed since patch_scheduler.*thresholding"):
        s.set_timesteps(5)
    assert len(s.timesteps) == 10
    import diffaccel
    diffaccel.unpatch(s)
    s.set_timesteps(5)
    u = UniPCMultistepScheduler()
    patch_scheduler(u)
    u.solver_p = DDIMScheduler()
    with pytest.raises(ValueError, match="solver_p"):
        u.set_timesteps(5)


def test_unpatch_and_is_patched_take_a_scheduler():
    """diffaccel.unpatch / is_patched on a scheduler patched with patch_scheduler (unpatch used to do
    nothing there); diffaccel.patch(scheduler) points to patch_scheduler."""
    import diffaccel

    s = DPMSolverMultistepScheduler()
    assert not diffaccel.is_patched(s)
    patch_scheduler(s)
    assert diffaccel.is_patched(s)
    diffaccel.unpatch(s)
    assert not diffaccel.is_patched(s) and not is_patched(s) and "step" not in vars(s)
    diffaccel.unpatch(s)  # a no-op now
    with pytest.raises(TypeError, match="is a scheduler; patch it with diffaccel.patch_scheduler"):
        diffaccel.patch(s)


def test_unipc_infinite_coefficients_raise():
    """UniPC order 2 without lower_order_final into a zero final sigma: the last step's system
    has infinite coefficients (diffusers returns inf); the fused step raises as for a singular one."""
    make = lambda: UniPCMultistepScheduler(solver_order=2, lower_order_final=False,  # noqa: E731
                                           final_sigmas_type="zero")
    out = run(make(), 10, patched=False)[0]
    assert not torch.isfinite(out).all()
    with pytest.raises(ValueError, match="singular or undefined"):
        run(make(), 10, patched=True)


def test_errors():
    s = EulerDiscreteScheduler()
    patch_scheduler(s)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, torch.tensor(999.0), x)
    s.set_timesteps(10)
    t = s.timesteps[0]
    with pytest.raises(ValueError, match="^model_output: expected shape"):
        s.step(x[:, :2], t, x)
    with pytest.raises(ValueError, match="^model_output_cond: expected shape"):
        s.step_with_guidance(x, x[0], 5.0, t, x)
    with pytest.raises(ValueError, match="integer indices"):
        s.step(x, 3, x)
    d = DDIMScheduler()
    patch_scheduler(d)
    with pytest.raises(ValueError, match="set_timesteps"):
        d.step(x, 999, x)
    d.set_timesteps(10)
    with pytest.raises(ValueError, match="^timestep: 5000 is outside"):
        d.step(x, 5000, x)
    lcm = LCMScheduler()
    patch_scheduler(lcm)
    lcm.set_timesteps(4)
    lcm._init_step_index(lcm.timesteps[0])
    with pytest.raises(ValueError, match="^timestep: .* is not the schedule's"):
        lcm.step(x, int(lcm.timesteps[0]) - 1, x)


# -- GPU: capture, replay, and what a step costs -------------------------------------------------

def _gpu_loop(s, x, cond_scale=5.0):
    for t in s.timesteps:
        u = torch.tanh(x * 0.7)
        c = torch.tanh(x * 0.6 + 0.1)
        x = s.step_with_guidance(u, c, cond_scale, t, x).prev_sample
    return x


@pytest.mark.gpu
@pytest.mark.parametrize("make", [lambda: DPMSolverMultistepScheduler(solver_order=3), lambda: EulerDiscreteScheduler(),
                                  lambda: DDIMScheduler(clip_sample=False), lambda: FlowMatchEulerDiscreteScheduler()])
def test_gpu_cuda_graph_capture_and_replay(make):
    ref, s = make(), make()
    assert patch_scheduler(s).patched
    x0 = torch.randn(2, 4, 64, 64, device="cuda")
    for sch in (ref, s):
        sch.set_timesteps(10, device="cuda")
    # eager reference through diffusers
    x = x0.clone()
    for t in ref.timesteps:
        u, c = torch.tanh(x * 0.7), torch.tanh(x * 0.6 + 0.1)
        x = ref.step(u + 5.0 * (c - u), t, x).prev_sample
    want = x
    static_x = x0.clone()

    def reset():
        s.set_timesteps(10, device="cuda")
        if hasattr(s, "set_begin_index"):  # the step index comes from the host, not a CUDA timestep (.item())
            s.set_begin_index(0)

    reset()
    _gpu_loop(s, static_x.clone())  # warm-up: allocations, Triton compilation
    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _gpu_loop(s, static_x)
    for _ in range(2):  # replays are repeatable
        static_x.copy_(x0)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("make,kernels_per_step", [
    (lambda: DPMSolverMultistepScheduler(solver_order=2), 1),
    (lambda: FlowMatchEulerDiscreteScheduler(), 1),
    (lambda: EulerDiscreteScheduler(), 1),
    (lambda: DDIMScheduler(clip_sample=False), 1),  # row chosen on the device from the CUDA timestep
    (lambda: UniPCMultistepScheduler(), 1),  # corrector and predictor in the same kernel
])
def test_gpu_profile_kernels_per_step_no_sync(make, kernels_per_step, backend):
    from torch.profiler import ProfilerActivity, profile

    why = _backend._why_not(_backend.registered_ops()["fused_solver_step"], backend, torch.device("cuda"))
    if why:
        pytest.skip(why)
    s = make()
    patch_scheduler(s)
    s.set_timesteps(10, device="cuda")
    x = torch.randn(2, 4, 64, 64, device="cuda")
    u, c = torch.randn_like(x), torch.randn_like(x)
    with use_backend(backend):
        t0 = s.timesteps[0]
        x = s.step_with_guidance(u, c, 5.0, t0, x).prev_sample  # first step: index lookup (one sync), warm-up
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for t in s.timesteps[1:6]:
                x = s.step_with_guidance(u, c, 5.0, t, x).prev_sample
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    launches = [n for n in names if "LaunchKernel" in n]
    assert len(launches) == 5 * kernels_per_step, launches  # guidance folded in
    assert not any("Memcpy" in n and "DtoH" in n for n in names), [n for n in names if "Memcpy" in n]
    # .item() / CPU-table indexing with a CUDA index show up as a memcpy plus cudaStreamSynchronize
    assert names.count("cudaStreamSynchronize") == 0 and names.count("cudaMemcpyAsync") == 0


@pytest.mark.parametrize("config", ["bh1_flow_wan", "bh1_eps"])
def test_unipc_bh1_to_a_zero_final_sigma_gives_the_finite_limit(config):
    """UniPC bh1 down to sigma = 0 (final_sigmas_type="zero", e.g. Wan's flow sigmas): diffusers'
    last order-1 step computes B(h) * 0 with B(h) = h = -inf, i.e. NaN. The fused step drops that
    zero term, so its last sample is the limit, the x0 prediction at the last step, which diffusers
    returns for bh2. Every step before matches diffusers as usual."""
    sch = (UniPCMultistepScheduler(solver_type="bh1", prediction_type="flow_prediction", use_flow_sigmas=True,
                                   flow_shift=5.0) if config == "bh1_flow_wan" else
           UniPCMultistepScheduler(solver_type="bh1"))
    steps = 10
    ref = copy.deepcopy(sch)
    ours = copy.deepcopy(sch)
    assert patch_scheduler(ours).patched
    for s in (ref, ours):
        s.set_timesteps(steps)
    x_ref = x_ours = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(ref.timesteps):
        if i == steps - 1:
            limit = copy.deepcopy(ref).convert_model_output(fake_model(x_ref, t), sample=x_ref)
        x_ref = ref.step(fake_model(x_ref, t), t, x_ref).prev_sample
        with use_backend("torch"):
            x_ours = ours.step(fake_model(x_ours, t), t, x_ours).prev_sample
        if i < steps - 1:
            assert_traj_close(x_ref, x_ours, torch.float32)
    assert not torch.isfinite(x_ref).all()  # diffusers' NaN (if this fails, diffusers fixed it: compare directly)
    assert torch.isfinite(x_ours).all()
    assert_traj_close(limit, x_ours, torch.float32)


def test_float64_steps_run_diffusers_step():
    """The step kernel takes fp16 / bf16 / fp32; a float64 step (a pipeline cast to fp64 to debug
    it) runs the class's own step on the same scheduler state, with a warning, so it equals
    diffusers exactly, guidance included."""
    ref, pat = DPMSolverMultistepScheduler(), DPMSolverMultistepScheduler()
    patch_scheduler(pat)
    outs = []
    for sch in (ref, pat):
        sch.set_timesteps(6)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for t in sch.timesteps:
            u, c = fake_model(x, t), fake_model(x * 0.9, t)
            if sch is pat:
                x = sch.step_with_guidance(u, c, 4.0, t, x).prev_sample
            else:
                x = sch.step(u + 4.0 * (c - u), t, x).prev_sample
        outs.append(x)
    assert outs[1].dtype == torch.float64 and torch.equal(outs[0], outs[1])
    from diffaccel.solvers._patch import _FALLBACKS_WARNED  # (warned once per process, class and reason)
    assert any(cls is DPMSolverMultistepScheduler and why.startswith("float64") for cls, why in _FALLBACKS_WARNED)


@pytest.mark.parametrize("make", [lambda: DDIMScheduler(clip_sample=False), lambda: DPMSolverMultistepScheduler(),
                                  lambda: EulerDiscreteScheduler()], ids=["ddim", "dpm2m", "euler"])
def test_unfused_step_with_guidance_applies_guidance_rescale(make):
    """step_with_guidance on a call that is not fused (float64 tensors) runs diffusers' step on
    ``rescale_noise_cfg(uncond + s (cond - uncond), cond, guidance_rescale)``, as the pipelines do.
    Both sides run the same fp64 torch ops in the same order, so they are compared bit for bit."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    ref, pat = make(), make()
    assert patch_scheduler(pat).patched
    outs = []
    for sch in (ref, pat):
        sch.set_timesteps(5)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        x = x * float(sch.init_noise_sigma)
        for t in sch.timesteps:
            xin = sch.scale_model_input(x, t)
            u, c = fake_model(xin, t), fake_model(xin * 0.9 + 0.05, t)
            if sch is pat:
                x = sch.step_with_guidance(u, c, 7.5, t, x, guidance_rescale=0.7).prev_sample
            else:
                x = sch.step(rescale_noise_cfg(u + 7.5 * (c - u), c, guidance_rescale=0.7), t, x).prev_sample
        outs.append(x)
    assert outs[1].dtype == torch.float64 and torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("positional", [False, True])
def test_flow_match_per_token_timesteps_run_diffusers_step(positional):
    """LTX's conditioning pipeline and Sana-WM pass ``per_token_timesteps`` (a sigma per token) to
    FlowMatch's step; the patched step raised ValueError, so patch(pipe) broke those pipelines. Such a
    call now runs diffusers' own step (warned once), and the steps around it stay fused: the
    trajectory equals the unpatched scheduler's."""
    ref, pat = FlowMatchEulerDiscreteScheduler(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    patch_scheduler(pat)
    outs = []
    for sch in (ref, pat):
        sch.set_timesteps(6)
        x = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(0))
        for i, t in enumerate(sch.timesteps):
            out = fake_model(x, t)
            if i % 2:  # conditioning tokens 0..2 stay one step behind
                per_token = t.expand(2, 10).clone()
                per_token[:, :3] = sch.timesteps[i - 1]
                x = (sch.step(out, t, x, 0.0, 0.0, float("inf"), 1.0, None, per_token, False)[0] if positional
                     else sch.step(out, t, x, per_token_timesteps=per_token).prev_sample)
            else:
                x = sch.step(out, t, x).prev_sample
        outs.append(x)
    assert torch.equal(outs[0], outs[1]) or (outs[0] - outs[1]).abs().max() <= 1e-5 * outs[0].abs().max()
    from diffaccel.solvers._patch import _FALLBACKS_WARNED

    assert (FlowMatchEulerDiscreteScheduler, "per_token_timesteps") in _FALLBACKS_WARNED


def _relative(a, b):
    return float((a - b).abs().max() / a.abs().max())


def _views_run(make, patched, views, steps=8):
    """StableDiffusionPanoramaPipeline's pattern: each view's scheduler state is saved with
    ``deepcopy(scheduler.__dict__)`` and put back with ``__dict__.update`` around its step."""
    torch.manual_seed(0)  # LCM draws its noise from the global generator
    s = make()
    if patched:
        assert patch_scheduler(s).patched
    s.set_timesteps(steps)
    lat = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(j)) * float(s.init_noise_sigma)
           for j in range(views)]
    status = [copy.deepcopy(s.__dict__)] * views
    for t in s.timesteps:
        for j in range(views):
            s.__dict__.update(status[j])
            lat[j] = s.step(fake_model(s.scale_model_input(lat[j], t), t), t, lat[j]).prev_sample
            status[j] = copy.deepcopy(s.__dict__)
    return torch.stack(lat)


@pytest.mark.parametrize("config", ["euler_eps", "dpm2m_eps", "unipc_bh2", "lcm", "ddim_eps_clip"])
@pytest.mark.parametrize("views", [1, 3])
def test_state_saved_and_restored_through_dict_copies(config, views):
    """The patched methods used to be bound methods in the instance dict: a deepcopy of the dict
    brought them back bound to a copy of the scheduler, which then stepped instead (Euler 12% off
    with one view, IndexError or wrong-timestep errors with three)."""
    ref, got = _views_run(CONFIGS[config], False, views), _views_run(CONFIGS[config], True, views)
    assert _relative(ref, got) < TOL[torch.float32]


def test_shallow_copy_and_pickle_give_patched_schedulers_of_their_own():
    """copy.copy kept methods bound to the original (the copy stepped the original: 14% off), and a
    pickled patched scheduler (torch.save of a pipeline) could not be loaded back."""
    import pickle

    def trajectory(sch, steps=10):
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        for t in sch.timesteps:
            x = sch.step(fake_model(sch.scale_model_input(x, t), t), t, x).prev_sample
        assert sch.step_index == steps
        return x

    ref = EulerDiscreteScheduler()
    ref.set_timesteps(10)
    want = trajectory(ref)
    s = EulerDiscreteScheduler()
    patch_scheduler(s)
    s.set_timesteps(10)
    for c in (copy.copy(s), pickle.loads(pickle.dumps(s)), copy.deepcopy(s)):
        assert is_patched(c) and c.step.__self__ is c
        assert vars(c)["_diffaccel_solver"] is not vars(s)["_diffaccel_solver"]
        assert _relative(want, trajectory(c)) < TOL[torch.float32] and s.step_index is None
        c.set_timesteps(4)  # rebuilds the copy's own tables only
        assert unpatch_scheduler(c) and "__reduce_ex__" not in vars(c) and is_patched(s)
    assert _relative(want, trajectory(s)) < TOL[torch.float32]
    assert inspect.signature(s.step) == inspect.signature(ref.step)
    pickle.loads(pickle.dumps(s.__dict__))  # the dict alone pickles too (its methods rebind by name)


@pytest.mark.parametrize("config", ["ddim_eps_clip", "euler_eps", "dpm2m_eps", "unipc_bh2"])
def test_config_changed_between_set_timesteps_and_step(config):
    """diffusers reads its config at each step: register_to_config(prediction_type=...) after
    set_timesteps takes effect at the next step. The fused step kept the tables built for the old
    config, silently (0.97 to 286 relative off over 8 steps)."""
    xs = []
    for patched in (False, True):
        s = CONFIGS[config]()
        if patched:
            patch_scheduler(s)
        s.set_timesteps(8)
        s.register_to_config(prediction_type="v_prediction")
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * float(s.init_noise_sigma)
        for i, t in enumerate(s.timesteps):
            if i == 4:
                s.register_to_config(prediction_type="epsilon")
            x = s.step(fake_model(s.scale_model_input(x, t), t), t, x).prev_sample
        xs.append(x)
    assert _relative(*xs) < TOL[torch.float32]


def test_config_changed_to_unfused_after_set_timesteps_raises():
    s = DPMSolverMultistepScheduler()
    patch_scheduler(s)
    s.set_timesteps(8)
    s.register_to_config(thresholding=True)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="config changed since set_timesteps and is no longer fused"):
        s.step(x, s.timesteps[0], x)


@pytest.mark.parametrize("config", ["ddim_eps_clip", "lcm"])
def test_a_fractional_timestep_is_refused(config):
    """diffusers indexes alphas_cumprod with the timestep (900.7 raises there); the fused DDIM / LCM
    step took int(900.7) = 900 silently."""
    s = CONFIGS[config]()
    patch_scheduler(s)
    s.set_timesteps(10)
    x = torch.randn(SHAPE)
    t = float(s.timesteps[0]) + 0.7
    with pytest.raises(ValueError, match="timestep: expected an integer timestep of the schedule"):
        s.step(x, t, x)
    s.step(x, float(s.timesteps[0]), x)  # an integral float is that timestep


@pytest.mark.parametrize("config", ["euler_eps", "euler_a_eps", "dpm2m_eps", "unipc_bh2", "lcm", "flow"])
def test_a_step_past_the_end_of_the_schedule_is_named(config):
    """One step more than set_timesteps gave: numpy's IndexError, or UniPC's "system is singular"."""
    s = CONFIGS[config]()
    patch_scheduler(s)
    s.set_timesteps(4)
    x = torch.randn(SHAPE)
    for t in s.timesteps:
        x = s.step(fake_model(x, t), t, x).prev_sample
    with pytest.raises(ValueError, match="past the end of the schedule"):
        s.step(fake_model(x, s.timesteps[-1]), s.timesteps[-1], x)


@pytest.mark.parametrize("algorithm", ["sde-dpmsolver++", "sde-dpmsolver"])
def test_sde_final_step_onto_a_rounding_larger_sigma(algorithm):
    """With Lu lambdas, squaredcos_cap_v2 and final_sigmas_type="sigma_min", diffusers' last fp32
    sigma is 1.4e-9 above the one before it: h < 0 by a rounding, and the SDE noise coefficient
    sqrt(1 - exp(-2h)) (sqrt(exp(2h) - 1)) was NaN in float64, so the whole trajectory ran and
    then the last step raised; diffusers' fp32 gets sqrt(0) there."""
    sch = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", algorithm_type=algorithm,
                                      use_lu_lambdas=True, final_sigmas_type="sigma_min")
    probe = copy.deepcopy(sch)
    probe.set_timesteps(10)
    assert probe.sigmas[-1] > probe.sigmas[-2]  # (the case itself: otherwise this tests nothing)
    ref, _, _ = run(sch, 10, patched=False)
    got, _, _ = run(sch, 10, patched=True)
    assert torch.isfinite(ref).all()
    assert_traj_close(ref, got, torch.float32)
