"""Fused diffusion-solver step: one elementwise pass per scheduler step.

Every step of the supported schedulers is linear in its tensor inputs once the per-step
scalars are known (diffaccel.ops.solver documents the coefficient layout). Per element,
in fp32 whatever the storage dtype:

  e  = u                                  (one model output), or
  e  = (u + s (c - u)) * f[b]             (classifier-free guidance; f = 1 without rescale)
  p  = clamp(a_x x + a_e e + a_n n, -r, r)
  h' = c_p p + c_x x + c_h0 h0 + c_h1 h1 + c_h2 h2   (the new history entry, e.g. the x0 prediction;
                                          the history terms carry DC-Solver's compensation)
  y  = x, or with a last sample L (UniPC's corrector), the corrected sample stored as a third output
  y  = round_L(d_l L + d_p p + d_h0 h0 + d_h1 h1 + d_h2 h2)
  x' = b_x y + b_e e + b_p p + b_h0 h0 + b_h1 h1 + b_h2 h2 + b_n n

The noise n is loaded from a tensor (HAS_NOISE) or generated here (PHILOX): ``tl.randn(seed,
noise_offset + i)`` with i the flat element index and the int64 seed loaded from a pointer (so a
captured CUDA graph replays with a new seed); diffaccel/ops/philox.py holds the formula and the
torch reference, csrc/solver.h the C++ copy.

With guidance rescale, f[b] = R std(c_b) / std(g_b) + (1 - R) per sample b needs a reduction
first: ``solver_rescale_stats`` writes per-chunk (mean, M2) partials of c and g, and the step
kernel combines them (Chan's formula) at its start — two launches in all, deterministic.
"""
import torch
import triton
import triton.language as tl

from ._common import cdiv, next_pow2

NUM_COEFFS = 24
# column indices, shared with diffaccel/ops/solver.py and csrc/solver.h
(A_X, A_E, A_N, CLIP, C_P, C_X, B_X, B_E, B_P, B_H0, B_H1, B_H2, B_N, D_L, D_P, D_H0, D_H1, D_H2, C_H0, C_H1,
 C_H2) = range(21)
MAX_STAT_CHUNKS = 256
STEP_BLOCK = 2048
STEP_WARPS = 4


@triton.jit
def _guided(u_ptr, c_ptr, offs, mask, s, HAS_COND: tl.constexpr):
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_COND:
        c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return u + s * (c - u), c
    return u, u


@triton.jit
def _solver_rescale_stats_kernel(u_ptr, c_ptr, part_ptr, per_sample, s, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # partials[b, chunk, :] = (mean_c, M2_c, mean_g, M2_g) over the chunk; two passes over the
    # chunk (the second from cache) keep M2 accurate when the mean is large against the spread.
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    base = b * per_sample
    start = chunk.to(tl.int64) * CHUNK
    count = tl.minimum(per_sample - start, CHUNK).to(tl.float32)
    sum_c = tl.zeros((BLOCK,), tl.float32)
    sum_g = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < per_sample
        g, c = _guided(u_ptr + base, c_ptr + base, offs, mask, s, True)
        sum_c += c
        sum_g += g
    mean_c = tl.sum(sum_c, axis=0) / count
    mean_g = tl.sum(sum_g, axis=0) / count
    m2_c = tl.zeros((BLOCK,), tl.float32)
    m2_g = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < per_sample
        g, c = _guided(u_ptr + base, c_ptr + base, offs, mask, s, True)
        dc = tl.where(mask, c - mean_c, 0.0)
        dg = tl.where(mask, g - mean_g, 0.0)
        m2_c += dc * dc
        m2_g += dg * dg
    out = part_ptr + (b * n_chunks + chunk) * 4
    tl.store(out + 0, mean_c)
    tl.store(out + 1, tl.sum(m2_c, axis=0))
    tl.store(out + 2, mean_g)
    tl.store(out + 3, tl.sum(m2_g, axis=0))


@triton.jit
def _rescale_factor(part_ptr, b, n_chunks, per_sample, rescale, CHUNK: tl.constexpr, MAX_CHUNKS: tl.constexpr):
    k = tl.arange(0, MAX_CHUNKS)
    kmask = k < n_chunks
    row = part_ptr + (b * n_chunks + k) * 4
    cnt = tl.where(kmask, tl.minimum(per_sample - k.to(tl.int64) * CHUNK, CHUNK).to(tl.float32), 0.0)
    mean_c = tl.load(row + 0, mask=kmask, other=0.0)
    m2_c = tl.load(row + 1, mask=kmask, other=0.0)
    mean_g = tl.load(row + 2, mask=kmask, other=0.0)
    m2_g = tl.load(row + 3, mask=kmask, other=0.0)
    n = per_sample + 0.0  # (not .to: Triton passes an int argument equal to 1 as a constant)
    mu_c = tl.sum(cnt * mean_c, axis=0) / n
    mu_g = tl.sum(cnt * mean_g, axis=0) / n
    var_c = (tl.sum(m2_c, axis=0) + tl.sum(cnt * (mean_c - mu_c) * (mean_c - mu_c), axis=0)) / (n - 1.0)
    var_g = (tl.sum(m2_g, axis=0) + tl.sum(cnt * (mean_g - mu_g) * (mean_g - mu_g), axis=0)) / (n - 1.0)
    return rescale * (tl.sqrt(var_c) / tl.sqrt(var_g)) + (1.0 - rescale)


@triton.jit(do_not_specialize=["noise_offset"])  # the offset changes every step: one compiled variant
def _fused_solver_step_kernel(
    x_ptr, u_ptr, c_ptr, h0_ptr, h1_ptr, h2_ptr, n_ptr, l_ptr, coef_ptr, row_ptr, part_ptr, xo_ptr, ho_ptr, co_ptr,
    seed_ptr, per_sample, n_rows, n_chunks, s, rescale, noise_offset,
    HAS_COND: tl.constexpr, RESCALE: tl.constexpr, N_HIST: tl.constexpr, HAS_NOISE: tl.constexpr,
    HAS_ROW: tl.constexpr, WRITE_HIST: tl.constexpr, HAS_LAST: tl.constexpr, CHUNK: tl.constexpr,
    MAX_CHUNKS: tl.constexpr, BLOCK: tl.constexpr, NCOEF: tl.constexpr, PHILOX: tl.constexpr = False,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < per_sample
    base = b * per_sample

    cp = coef_ptr
    bad = 0.0
    if HAS_ROW:  # the row (e.g. DDIM's timestep) is read on the device: no host sync
        row = tl.load(row_ptr).to(tl.int64)
        ok = (row >= 0) & (row < n_rows)
        cp = coef_ptr + tl.where(ok, row, 0) * NCOEF
        bad = tl.where(ok, 0.0, float("nan"))  # an off-table row poisons the result, never reads out of bounds
    a_x = tl.load(cp + 0) + bad
    a_e = tl.load(cp + 1)
    a_n = tl.load(cp + 2)
    clip = tl.load(cp + 3)
    c_p = tl.load(cp + 4)
    c_x = tl.load(cp + 5)
    b_x = tl.load(cp + 6) + bad
    b_e = tl.load(cp + 7)
    b_p = tl.load(cp + 8)

    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    e, _c = _guided(u_ptr + base, c_ptr + base, offs, mask, s, HAS_COND)
    if RESCALE:
        e = e * _rescale_factor(part_ptr, b, n_chunks, per_sample, rescale, CHUNK, MAX_CHUNKS)
    p = a_x * x + a_e * e
    xo = b_e * e
    if HAS_NOISE:
        nz = tl.load(n_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        p += a_n * nz
        xo += tl.load(cp + 12) * nz
    if PHILOX:
        nz = tl.randn(tl.load(seed_ptr), noise_offset + base + offs)
        p += a_n * nz
        xo += tl.load(cp + 12) * nz
    p = tl.where(p < -clip, -clip, tl.where(p > clip, clip, p))  # NaN passes, as in the reference
    ho = c_p * p + c_x * x
    xo += b_p * p
    h0 = 0.0
    h1 = 0.0
    h2 = 0.0
    if N_HIST >= 1:
        h0 = tl.load(h0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        xo += tl.load(cp + 9) * h0
        ho += tl.load(cp + 18) * h0
    if N_HIST >= 2:
        h1 = tl.load(h1_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        xo += tl.load(cp + 10) * h1
        ho += tl.load(cp + 19) * h1
    if N_HIST >= 3:
        h2 = tl.load(h2_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        xo += tl.load(cp + 11) * h2
        ho += tl.load(cp + 20) * h2
    if HAS_LAST:  # UniPC: correct the last sample, store it, and step from it (rounded like diffusers)
        last = tl.load(l_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(cp + 13) * last + tl.load(cp + 14) * p + tl.load(cp + 15) * h0 + tl.load(cp + 16) * h1 \
            + tl.load(cp + 17) * h2
        y = y.to(co_ptr.dtype.element_ty)
        tl.store(co_ptr + base + offs, y, mask=mask)
        xo += b_x * y.to(tl.float32)
    else:
        xo += b_x * x
    tl.store(xo_ptr + base + offs, xo.to(xo_ptr.dtype.element_ty), mask=mask)
    if WRITE_HIST:
        tl.store(ho_ptr + base + offs, ho.to(ho_ptr.dtype.element_ty), mask=mask)


def stat_chunk(per_sample: int) -> int:
    """Elements per statistics chunk: a power of two >= 4096 giving at most MAX_STAT_CHUNKS chunks."""
    return max(4096, next_pow2(cdiv(per_sample, MAX_STAT_CHUNKS)))


def fused_solver_step(x, u, c, h0, h1, h2, noise, last, coeffs, row, guidance_scale: float,
                      guidance_rescale: float, x_out, h_out, c_out, noise_seed=None, noise_offset: int = 0) -> None:
    """All tensors contiguous with x's shape [B, ...] (coeffs fp32 [24] or [R, 24] with ``row`` an
    integer tensor [1]); writes x_out, h_out (not when None) and, given ``last``, c_out. Absent inputs are None.
    ``noise_seed`` (an int64 tensor with one element) replaces ``noise`` by Philox noise at counters
    ``noise_offset + i``."""
    batch = x.shape[0]
    per_sample = x.numel() // batch if batch else 0
    if x.numel() == 0:
        return
    hist = [h for h in (h0, h1, h2) if h is not None]
    rescale = c is not None and guidance_rescale != 0.0
    chunk = stat_chunk(per_sample)
    n_chunks = cdiv(per_sample, chunk)
    parts = x_out  # placeholder pointer when unused
    if rescale:
        parts = torch.empty((batch, n_chunks, 4), dtype=torch.float32, device=x.device)
        _solver_rescale_stats_kernel[(batch, n_chunks)](u, c, parts, per_sample, float(guidance_scale),
                                                       CHUNK=chunk, BLOCK=1024)
    grid = (batch, cdiv(per_sample, STEP_BLOCK))
    _fused_solver_step_kernel[grid](
        x, u, c if c is not None else u, *(hist + [x] * (3 - len(hist))), noise if noise is not None else x,
        last if last is not None else x, coeffs, row if row is not None else coeffs, parts, x_out,
        h_out if h_out is not None else x_out, c_out if last is not None else x_out,
        noise_seed if noise_seed is not None else coeffs,
        per_sample, coeffs.shape[0] if coeffs.dim() == 2 else 1, n_chunks, float(guidance_scale),
        float(guidance_rescale), int(noise_offset),
        HAS_COND=c is not None, RESCALE=rescale, N_HIST=len(hist), HAS_NOISE=noise is not None,
        HAS_ROW=row is not None, WRITE_HIST=h_out is not None, HAS_LAST=last is not None, CHUNK=chunk,
        MAX_CHUNKS=MAX_STAT_CHUNKS, BLOCK=STEP_BLOCK, NCOEF=NUM_COEFFS, PHILOX=noise_seed is not None,
        num_warps=STEP_WARPS)


@triton.jit
def _philox_words_kernel(seed_ptr, out_ptr, offset, numel, BLOCK: tl.constexpr):
    # the raw uint32 words of Triton's own tl.randint4x (as int64), to pin the stream in tests
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    w0, w1, w2, w3 = tl.randint4x(tl.load(seed_ptr), offset + i)
    tl.store(out_ptr + i * 4 + 0, w0.to(tl.uint32).to(tl.int64), mask=mask)
    tl.store(out_ptr + i * 4 + 1, w1.to(tl.uint32).to(tl.int64), mask=mask)
    tl.store(out_ptr + i * 4 + 2, w2.to(tl.uint32).to(tl.int64), mask=mask)
    tl.store(out_ptr + i * 4 + 3, w3.to(tl.uint32).to(tl.int64), mask=mask)


def philox_words(seed, offset: int, numel: int):
    """[numel, 4] int64: the uint32 words tl.randint4x gives for counters offset .. offset + numel - 1."""
    out = torch.empty((numel, 4), dtype=torch.int64, device=seed.device)
    if numel:
        _philox_words_kernel[(cdiv(numel, 1024),)](seed, out, int(offset), numel, BLOCK=1024)
    return out


def _step_case(name, dtype, **flags):
    sig = {k: f"*{dtype}" for k in ("x_ptr", "u_ptr", "c_ptr", "h0_ptr", "h1_ptr", "h2_ptr", "n_ptr", "l_ptr")}
    sig.update({"coef_ptr": "*fp32", "row_ptr": "*i64", "part_ptr": "*fp32", "xo_ptr": f"*{dtype}",
                "ho_ptr": f"*{dtype}", "co_ptr": f"*{dtype}", "seed_ptr": "*i64", "per_sample": "i32", "n_rows": "i32",
                "n_chunks": "i32", "s": "fp32", "rescale": "fp32", "noise_offset": "i64"})
    constexprs = dict(HAS_COND=False, RESCALE=False, N_HIST=0, HAS_NOISE=False, HAS_ROW=False, WRITE_HIST=True,
                      HAS_LAST=False, CHUNK=4096, MAX_CHUNKS=MAX_STAT_CHUNKS, BLOCK=STEP_BLOCK, NCOEF=NUM_COEFFS,
                      PHILOX=False)
    constexprs.update(flags)
    for k in constexprs:
        sig[k] = "constexpr"
    return {"name": name, "fn": _fused_solver_step_kernel, "signature": sig, "constexprs": constexprs,
            "num_warps": STEP_WARPS, "num_stages": 1, "hot": True, "tensor_cores": False}


STATIC_REPORT_CASES = [
    _step_case("solver_step_flow_euler_fp16", "fp16", WRITE_HIST=False),
    _step_case("solver_step_euler_fp16", "fp16"),
    _step_case("solver_step_dpm3m_cfg_bf16", "bf16", HAS_COND=True, N_HIST=2),
    _step_case("solver_step_ddim_eta_cfg_rescale_fp16", "fp16", HAS_COND=True, RESCALE=True, HAS_NOISE=True,
               HAS_ROW=True),
    _step_case("solver_step_fp32", "fp32", HAS_COND=True, N_HIST=3, HAS_NOISE=True),
    _step_case("solver_step_unipc3_corrector_cfg_fp16", "fp16", HAS_COND=True, N_HIST=3, HAS_LAST=True),
    _step_case("solver_step_euler_ancestral_philox_cfg_fp16", "fp16", HAS_COND=True, PHILOX=True),
    _step_case("solver_step_dpm2m_sde_philox_bf16", "bf16", HAS_COND=True, N_HIST=1, PHILOX=True),
    {"name": "solver_rescale_stats_fp16", "fn": _solver_rescale_stats_kernel,
     "signature": {"u_ptr": "*fp16", "c_ptr": "*fp16", "part_ptr": "*fp32", "per_sample": "i32", "s": "fp32",
                   "CHUNK": "constexpr", "BLOCK": "constexpr"},
     "constexprs": {"CHUNK": 4096, "BLOCK": 1024}, "num_warps": 4, "num_stages": 1, "hot": True,
     "tensor_cores": False},
]
