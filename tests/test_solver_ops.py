"""The generic fused solver-step op: every backend against the one reference."""
import pytest
import torch

import diffaccel
from diffaccel.ops import BackendUnavailable, _backend, use_backend
from diffaccel.ops.solver import NUM_COEFFS, fused_solver_step_reference

CPU_BACKENDS = ["torch", "cuda", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp32 math everywhere: the only differences are the order of fp32 operations (and, for the
# reduced dtypes, one rounding of the stored result, which may land on the other neighbour)
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _needs(backend, device="cpu"):
    why = _backend._why_not(_backend.registered_ops()["fused_solver_step"], backend, torch.device(device))
    if why:
        pytest.skip(why)


def _inputs(shape, dtype, n_hist, cond, noise, seed=0, device="cpu", last=False):
    g = torch.Generator().manual_seed(seed)

    def r():
        return torch.randn(shape, generator=g).to(dtype).to(device)

    coeffs = torch.randn(NUM_COEFFS, generator=g)
    coeffs[3] = 1.5  # clip range: exercised (|p| exceeds it somewhere)
    return dict(sample=r(), model_output=r(), coeffs=coeffs.to(device),
                model_output_cond=r() if cond else None, history=[r() for _ in range(n_hist)],
                noise=r() if noise else None, last_sample=r() if last else None)


def _ref(a, guidance_scale=1.0, guidance_rescale=0.0, row=None, out_dtype=None, history_dtype=None):
    h = list(a["history"]) + [None] * (3 - len(a["history"]))
    md = a["model_output"].dtype
    return fused_solver_step_reference(a["sample"], a["model_output"], a["coeffs"], row, a["model_output_cond"],
                                       h[0], h[1], h[2], a["noise"], a.get("last_sample"), guidance_scale,
                                       guidance_rescale, out_dtype or md, history_dtype or md)


def _close(got, want, dtype):
    torch.testing.assert_close(got.float(), want.float(), atol=ATOL[dtype], rtol=RTOL[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_hist,cond,noise,rescale,last", [(0, False, False, 0.0, False), (1, True, False, 0.0, False),
                                                            (2, False, True, 0.0, False), (3, True, True, 0.7, False),
                                                            (3, True, False, 0.0, True), (1, False, False, 0.0, True)])
def test_backend_matches_reference(backend, dtype, n_hist, cond, noise, rescale, last):
    _needs(backend)
    a = _inputs((2, 4, 6, 5), dtype, n_hist, cond, noise, last=last)
    kw = dict(guidance_scale=7.5 if cond else 1.0, guidance_rescale=rescale)
    with use_backend(backend):
        x, h, corrected = diffaccel.ops.fused_solver_step(a["sample"], a["model_output"], a["coeffs"],
                                                          model_output_cond=a["model_output_cond"],
                                                          history=a["history"], noise=a["noise"],
                                                          last_sample=a["last_sample"], **kw)
    rx, rh, rc = _ref(a, **kw)
    assert x.dtype == dtype and h.dtype == dtype and x.shape == a["sample"].shape
    _close(x, rx, dtype)
    _close(h, rh, dtype)
    if last:  # the corrected sample, stored in last_sample's dtype
        assert corrected.dtype == dtype and corrected.shape == x.shape
        _close(corrected, rc, dtype)
    else:
        assert corrected.numel() == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_corrected_sample_rounded_to_storage_dtype_before_b_x(backend):
    """UniPC's corrector: diffusers stores the corrected sample in the latents' dtype and steps from
    that, so prev_sample = b_x * fp16(corrected), not b_x * corrected in fp32. With fp16 storage and
    b_x = 100 (every other step coefficient 0) the one rounding is amplified to ~100 fp16 ulps of the
    corrected sample, far beyond the fp16 tolerances that hid it. Exact (atol=rtol=0): every backend
    computes corrected = D_L * last (one fp32 product; 0 * finite adds nothing, FMA or not), rounds it
    to fp16, and multiplies by 100 in fp32 (prev_sample is requested as fp32, so no second rounding)."""
    from diffaccel.ops.solver import B_X, CLIP, D_L

    _needs(backend)
    g = torch.Generator().manual_seed(7)
    shape = (2, 4, 6, 5)
    x, u, last = (torch.randn(shape, generator=g).to(torch.float16) for _ in range(3))
    k = torch.zeros(NUM_COEFFS)
    k[CLIP] = float("inf")
    k[D_L] = 0.3  # 0.3 * an fp16 value is (almost always) not an fp16 value
    k[B_X] = 100.0
    with use_backend(backend):
        prev, _, corrected = diffaccel.ops.fused_solver_step(x, u, k, last_sample=last, out_dtype=torch.float32,
                                                             history_dtype=torch.float32)
    y = torch.tensor(0.3) * last.float()
    assert corrected.dtype == torch.float16
    torch.testing.assert_close(corrected, y.to(torch.float16), rtol=0, atol=0)
    want = torch.tensor(100.0) * y.to(torch.float16).float()
    assert prev.dtype == torch.float32
    torch.testing.assert_close(prev, want, rtol=0, atol=0)
    # the test can tell: stepping from the unrounded corrected sample is visibly different
    assert (torch.tensor(100.0) * y - want).abs().max() > 1e-2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes_and_fp32_outputs(backend):
    """Euler-style: fp16 storage in, fp32 x0 out (diffusers upcasts the sample)."""
    _needs(backend)
    a = _inputs((1, 4, 8, 8), torch.float16, 1, False, True)
    a["sample"] = a["sample"].float()
    with use_backend(backend):
        x, h, _ = diffaccel.ops.fused_solver_step(a["sample"], a["model_output"], a["coeffs"], history=a["history"],
                                               noise=a["noise"], out_dtype=torch.float16,
                                               history_dtype=torch.float32)
    rx, rh, _ = _ref(a, out_dtype=torch.float16, history_dtype=torch.float32)
    assert x.dtype == torch.float16 and h.dtype == torch.float32
    _close(x, rx, torch.float16)
    _close(h, rh, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("row_dtype", [torch.int64, torch.int32])
def test_table_row_read_on_device(backend, row_dtype):
    _needs(backend)
    a = _inputs((2, 3, 4, 4), torch.float32, 0, False, False)
    table = torch.randn(7, NUM_COEFFS, generator=torch.Generator().manual_seed(3))
    table[:, 3] = float("inf")
    with use_backend(backend):
        x, h, _ = diffaccel.ops.fused_solver_step(a["sample"], a["model_output"], table,
                                               row=torch.tensor(5, dtype=row_dtype))
        xb, hb, _ = diffaccel.ops.fused_solver_step(a["sample"], a["model_output"], table,
                                                 row=torch.tensor([7], dtype=row_dtype))
    a1 = dict(a, coeffs=table[5])
    rx, rh, _ = _ref(a1)
    _close(x, rx, torch.float32)
    _close(h, rh, torch.float32)
    assert torch.isnan(xb).all()  # an off-table row poisons, never reads out of bounds
    rbx, _, _ = _ref(dict(a, coeffs=table), row=torch.tensor([7]))
    assert torch.isnan(rbx).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS + [pytest.param("cuda-gpu", marks=pytest.mark.gpu)])
def test_nan_reaches_every_output(backend):
    """An off-table row, or NaN in the model output, makes the history entry and the corrected
    sample NaN too, as in the reference: the clip of the x0 prediction lets NaN through (a
    fmaxf/fminf clip turned it into -CLIP, so only prev_sample showed it). cuda-gpu: the CUDA kernel."""
    device = "cuda" if backend == "cuda-gpu" else "cpu"
    backend = backend.replace("-gpu", "")
    _needs(backend, device)
    a = _inputs((2, 3, 4, 4), torch.float32, 1, False, False, last=True, device=device)
    table = torch.randn(4, NUM_COEFFS, generator=torch.Generator().manual_seed(3)).to(device)
    table[:, 3] = 1.5
    bad_output = a["model_output"].clone()
    bad_output[1, 0, 2, 2] = float("nan")
    step = diffaccel.ops.fused_solver_step
    with use_backend(backend):
        off_table = step(a["sample"], a["model_output"], table, row=torch.tensor([9], device=device),
                         history=a["history"], last_sample=a["last_sample"])
        nan_in = step(a["sample"], bad_output, table, row=torch.tensor([1], device=device), history=a["history"],
                      last_sample=a["last_sample"])
    for out in off_table:
        assert torch.isnan(out).all()
    ref = _ref(dict(a, model_output=bad_output, coeffs=table), row=torch.tensor([1], device=device))
    for got, want in zip(nan_in, ref):
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got[1, 0, 2, 2])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_without_history_write(backend):
    _needs(backend)
    a = _inputs((2, 4, 8, 8), torch.float16, 0, True, False)
    with use_backend(backend):
        x, h, _ = diffaccel.ops.fused_solver_step(a["sample"], a["model_output"], a["coeffs"],
                                               model_output_cond=a["model_output_cond"], guidance_scale=4.0,
                                               write_history=False)
    rx, _, _ = _ref(a, guidance_scale=4.0)
    assert h.numel() == 0
    _close(x, rx, torch.float16)


def test_rescale_matches_diffusers_rescale_noise_cfg():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    a = _inputs((2, 4, 8, 8), torch.float32, 0, True, False)
    a["coeffs"] = torch.zeros(NUM_COEFFS)
    a["coeffs"][3] = float("inf")
    a["coeffs"][7] = 1.0  # x' = e: the guided, rescaled model output itself
    x, _, _ = diffaccel.ops.fused_solver_step(a["sample"], a["model_output"], a["coeffs"],
                                              model_output_cond=a["model_output_cond"], guidance_scale=5.0,
                                           guidance_rescale=0.7)
    u, c = a["model_output"], a["model_output_cond"]
    want = rescale_noise_cfg(u + 5.0 * (c - u), c, guidance_rescale=0.7)
    torch.testing.assert_close(x, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_rescale_many_chunks(backend):
    """A sample longer than one statistics chunk: the per-chunk partials are combined."""
    _needs(backend)
    a = _inputs((2, 3, 70, 70), torch.float32, 0, True, False)
    a["model_output_cond"] = a["model_output_cond"] + 3.0  # a mean far from 0 tests the combination
    with use_backend(backend):
        x, h, _ = diffaccel.ops.fused_solver_step(a["sample"], a["model_output"], a["coeffs"],
                                               model_output_cond=a["model_output_cond"], guidance_scale=4.0,
                                               guidance_rescale=0.5)
    rx, rh, _ = _ref(a, guidance_scale=4.0, guidance_rescale=0.5)
    _close(x, rx, torch.float32)


def test_coefficient_layout_shared_with_kernels():
    """kernels/ may not import the package: its copy of the layout must agree."""
    from diffaccel.kernels import solver as k
    from diffaccel.ops import solver as o

    assert k.NUM_COEFFS == o.NUM_COEFFS
    for name in ("A_X", "A_E", "A_N", "CLIP", "C_P", "C_X", "B_X", "B_E", "B_P", "B_H0", "B_H1", "B_H2", "B_N",
                 "D_L", "D_P", "D_H0", "D_H1", "D_H2"):
        assert getattr(k, name) == getattr(o, name), name


def test_opcheck():
    a = _inputs((2, 4, 4, 4), torch.float16, 2, True, True)
    h = a["history"]
    args = (a["sample"], a["model_output"], a["coeffs"], None, a["model_output_cond"], h[0], h[1], None, a["noise"],
            h[0].float(), 3.0, 0.5, torch.float16, torch.float32, True)
    torch.library.opcheck(torch.ops.diffaccel.fused_solver_step.default, args)
    table = torch.randn(4, NUM_COEFFS)
    args = (a["sample"], a["model_output"], table, torch.tensor([2]), None, None, None, None, None, None, 1.0, 0.0,
            torch.float32, torch.float16, False)
    torch.library.opcheck(torch.ops.diffaccel.fused_solver_step.default, args)


def test_opcheck_channels_last():
    a = _inputs((2, 4, 4, 4), torch.float32, 1, True, False)
    cl = torch.channels_last
    x, u, c, h = (t.to(memory_format=cl) for t in (a["sample"], a["model_output"], a["model_output_cond"],
                                                    a["history"][0]))
    args = (x, u, a["coeffs"], None, c, h, None, None, None, x, 3.0, 0.5, torch.float32, torch.float32, True)
    torch.library.opcheck(torch.ops.diffaccel.fused_solver_step.default, args)


def test_compile_fullgraph():
    a = _inputs((1, 4, 8, 8), torch.float32, 1, True, False)

    def f(x, u, c, h, k):
        return diffaccel.ops.fused_solver_step(x, u, k, model_output_cond=c, guidance_scale=7.0, history=[h])

    got = torch.compile(f, fullgraph=True, backend="eager")(a["sample"], a["model_output"], a["model_output_cond"],
                                                            a["history"][0], a["coeffs"])
    want = f(a["sample"], a["model_output"], a["model_output_cond"], a["history"][0], a["coeffs"])
    torch.testing.assert_close(got, want)


def test_bad_inputs_name_the_argument():
    a = _inputs((1, 4, 8, 8), torch.float32, 0, False, False)
    x, u, k = a["sample"], a["model_output"], a["coeffs"]
    op = diffaccel.ops.fused_solver_step
    with pytest.raises(ValueError, match="^model_output: expected shape"):
        op(x, u[:, :2], k)
    with pytest.raises(ValueError, match="^model_output_cond: expected shape"):
        op(x, u, k, model_output_cond=u[..., :4])
    with pytest.raises(ValueError, match=r"^history\[1\]: expected shape"):
        op(x, u, k, history=[u, u[0]])
    with pytest.raises(ValueError, match="^history: expected at most 3"):
        op(x, u, k, history=[u] * 4)
    with pytest.raises(TypeError, match="^sample: expected dtype"):
        op(x.double(), u, k)
    with pytest.raises(TypeError, match="^coeffs: expected dtype"):
        op(x, u, k.double())
    with pytest.raises(ValueError, match="^last_sample: expected shape"):
        op(x, u, k, last_sample=x[0])
    with pytest.raises(ValueError, match=f"^coeffs: expected {NUM_COEFFS}"):
        op(x, u, k[:8])
    with pytest.raises(ValueError, match="^coeffs: a table"):
        op(x, u, k.reshape(1, NUM_COEFFS))
    with pytest.raises(TypeError, match="^row: expected dtype"):
        op(x, u, k.reshape(1, NUM_COEFFS), row=torch.tensor([0.0]))
    with pytest.raises(ValueError, match="^guidance_rescale: needs model_output_cond"):
        op(x, u, k, guidance_rescale=0.5)
    with pytest.raises(TypeError, match="^out_dtype: expected"):
        op(x, u, k, out_dtype=torch.int8)
    with pytest.raises(TypeError, match="^noise: expected a torch.Tensor"):
        op(x, u, k, noise=1.0)
    # a negative rescale: diffusers' pipelines skip rescaling for it, the formula would apply it
    with pytest.raises(ValueError, match="^guidance_rescale: expected a number >= 0"):
        op(x, u, k, model_output_cond=u, guidance_rescale=-0.5)
    # a 1-d sample: torch's std over dims [] is the whole tensor's, the kernels' per sample (NaN)
    with pytest.raises(ValueError, match="^guidance_rescale: needs a sample"):
        op(x.reshape(-1), u.reshape(-1), k, model_output_cond=u.reshape(-1), guidance_rescale=0.5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_channels_last_inputs_are_read_in_place_and_stay_channels_last(backend, monkeypatch):
    """The op made every input contiguous: a channels_last UNet's step copied sample, both halves and
    the history each step, and returned a contiguous latent where diffusers' step returns channels_last."""
    _needs(backend)
    cl = torch.channels_last
    a = _inputs((2, 4, 5, 6), torch.float32, 2, True, True, last=True)
    want = _ref(a, 4.0, 0.7)
    b = {k: (v.to(memory_format=cl) if isinstance(v, torch.Tensor) and v.dim() == 4 else v) for k, v in a.items()}
    b["history"] = [h.to(memory_format=cl) for h in a["history"]]
    storages = {t.untyped_storage().data_ptr() for t in [b["sample"], b["model_output"], b["model_output_cond"],
                                                         b["noise"], b["last_sample"], *b["history"]]}
    seen = []
    real = _backend.implementation

    def recording(name, device):
        impl = real(name, device)

        def run(*args):
            seen.extend(t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor) and t.dim() == 4)
            return impl(*args)
        return run

    monkeypatch.setattr(_backend, "implementation", recording)
    with use_backend(backend):
        got = diffaccel.ops.fused_solver_step(b["sample"], b["model_output"], b["coeffs"],
                                              model_output_cond=b["model_output_cond"], guidance_scale=4.0,
                                              guidance_rescale=0.7, history=b["history"], noise=b["noise"],
                                              last_sample=b["last_sample"])
    assert len(seen) == 7 and set(seen) == storages  # every latent-sized input read where it lies
    for g, w in zip(got, want):
        assert g.is_contiguous(memory_format=cl) and g.shape == w.shape
        _close(g, w, torch.float32)
    mixed = diffaccel.ops.fused_solver_step(b["sample"], a["model_output"], a["coeffs"])[0]  # one input NCHW
    assert mixed.is_contiguous(memory_format=cl)
    _close(mixed, diffaccel.ops.fused_solver_step(a["sample"], a["model_output"], a["coeffs"])[0], torch.float32)


def test_forced_backend_unavailable_raises():
    a = _inputs((1, 4, 2, 2), torch.float32, 0, False, False)
    if _backend._why_not(_backend.registered_ops()["fused_solver_step"], "triton", torch.device("cpu")) is None:
        pytest.skip("triton runs here")
    with use_backend("triton"), pytest.raises(BackendUnavailable):
        diffaccel.ops.fused_solver_step(a["sample"], a["model_output"], a["coeffs"])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_backend_matches_reference(backend, dtype):
    _needs(backend, "cuda")
    a = _inputs((2, 16, 64, 64), dtype, 2, True, True, device="cuda")
    with use_backend(backend):
        x, h, _ = diffaccel.ops.fused_solver_step(a["sample"], a["model_output"], a["coeffs"],
                                               model_output_cond=a["model_output_cond"], history=a["history"],
                                               noise=a["noise"], guidance_scale=6.0, guidance_rescale=0.7)
    rx, rh, _ = _ref(a, guidance_scale=6.0, guidance_rescale=0.7)
    _close(x, rx, dtype)
    _close(h, rh, dtype)


def _misaligned(t):
    """A contiguous copy of ``t`` whose data starts 2 bytes past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 8, dtype=t.dtype, device=t.device)
    out = flat[1:1 + t.numel()].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["vectorised", "odd_per_sample", "misaligned"])
@pytest.mark.parametrize("n_hist,cond,noise,last", [(0, True, False, False), (3, True, True, False),
                                                    (1, False, False, True)])
def test_gpu_cuda_kernel_both_paths(dtype, layout, n_hist, cond, noise, last):
    """The CUDA step has a vectorised kernel (16-byte accesses: per-sample size a multiple of 8,
    every tensor 16-byte aligned) and an element-wise one for everything else (an odd size, a
    misaligned tensor): each against the reference."""
    _needs("cuda", "cuda")
    shape = (2, 3, 5, 7) if layout == "odd_per_sample" else (2, 16, 24, 40)
    a = _inputs(shape, dtype, n_hist, cond, noise, device="cuda", last=last)
    kw = dict(guidance_scale=6.0 if cond else 1.0, guidance_rescale=0.7 if cond else 0.0)

    def run(b):
        with use_backend("cuda"):
            return diffaccel.ops.fused_solver_step(b["sample"], b["model_output"], b["coeffs"],
                                                   model_output_cond=b["model_output_cond"], history=b["history"],
                                                   noise=b["noise"], last_sample=b["last_sample"], **kw)

    if layout == "misaligned":
        b = {k: (_misaligned(v) if torch.is_tensor(v) and k != "coeffs" else v) for k, v in a.items()}
        b["history"] = [_misaligned(h) for h in a["history"]]
        assert b["sample"].data_ptr() % 16 != 0
        x, h, corrected = run(b)  # the element-wise kernel
    else:
        x, h, corrected = run(a)
    rx, rh, rc = _ref(a, **kw)
    _close(x, rx, dtype)
    _close(h, rh, dtype)
    if last:
        _close(corrected, rc, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(70001,), (70000, 8)])
def test_gpu_batch_above_the_grid_limit(shape):
    """More samples than gridDim.y allows (65535): without guidance rescale the step runs as one flat
    sample (a 1-d latent has a batch of numel); the element-wise and the vectorised kernel."""
    _needs("cuda", "cuda")
    a = _inputs(shape, torch.float16, 1, False, False, device="cuda")
    with use_backend("cuda"):
        x, h, _ = diffaccel.ops.fused_solver_step(a["sample"], a["model_output"], a["coeffs"], history=a["history"])
    rx, rh, _ = _ref(a)
    _close(x, rx, torch.float16)
    _close(h, rh, torch.float16)


def test_history_entry_carries_history_terms():
    """C_H0..C_H2 (DC-Solver's compensated history entry): h' = c_p p + c_x x + sum c_hk hk, on every backend,
    against the formula written out here; absent history slots contribute nothing."""
    from diffaccel.kernels import solver as k
    from diffaccel.ops import solver as o

    for name in ("C_H0", "C_H1", "C_H2"):
        assert getattr(k, name) == getattr(o, name), name
    a = _inputs((2, 3, 5), torch.float32, 3, False, False, seed=11)
    c = torch.zeros(NUM_COEFFS)
    c[o.CLIP] = float("inf")
    c[o.A_E], c[o.C_P], c[o.C_X] = 1.0, 0.25, 0.5
    c[o.C_H0], c[o.C_H1], c[o.C_H2] = -0.75, 1.5, 2.0
    u, x, (h0, h1, h2) = a["model_output"], a["sample"], a["history"]
    for backend in CPU_BACKENDS:
        if _backend._why_not(_backend.registered_ops()["fused_solver_step"], backend, torch.device("cpu")):
            continue
        with use_backend(backend):
            _, got3, _ = diffaccel.ops.fused_solver_step(x, u, c, history=[h0, h1, h2])
            _, got1, _ = diffaccel.ops.fused_solver_step(x, u, c, history=[h0])
        torch.testing.assert_close(got3, 0.25 * u + 0.5 * x - 0.75 * h0 + 1.5 * h1 + 2.0 * h2, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got1, 0.25 * u + 0.5 * x - 0.75 * h0, atol=1e-6, rtol=1e-6)
