"""The fused solver step: one generic op that every fused scheduler step reduces to.

Per element, fp32 math whatever the storage dtype (x = sample, u = model output, c = the
conditional model output when guidance is folded in, h0..h2 = history, newest first,
n = noise), with one row ``k`` of per-step coefficients computed on the host:

  e  = u                                   without guidance
  e  = (u + s (c - u)) * f_b               with guidance scale s; f_b = 1 unless rescaled
  f_b = R std(c_b) / std(g_b) + (1 - R)    guidance rescale R (unbiased std per sample b, g = u + s(c-u))
  p  = clamp(k[A_X] x + k[A_E] e + k[A_N] n, -k[CLIP], k[CLIP])
  history_entry = k[C_P] p + k[C_X] x + k[C_H0] h0 + k[C_H1] h1 + k[C_H2] h2
                                           (the history terms: DC-Solver's compensated x0 entry)
  y  = x, or given a last sample L (UniPC's corrector) the corrected sample, rounded to L's dtype:
  corrected     = k[D_L] L + k[D_P] p + k[D_H0] h0 + k[D_H1] h1 + k[D_H2] h2;  y = corrected
  prev_sample   = k[B_X] y + k[B_E] e + k[B_P] p + k[B_H0] h0 + k[B_H1] h1 + k[B_H2] h2 + k[B_N] n

``coeffs`` is either one fp32 row [24] or a device table [R, 24] with ``row`` an integer
tensor [1] on the same device naming the row (read on the device, so e.g. DDIM can index its
table by a CUDA timestep without a host sync; an off-table row gives NaN, never an
out-of-bounds read). One kernel launch per call; two with guidance rescale (per-sample
statistics, then the step).

The noise n is either a tensor (``noise``) or generated inside the kernel (``noise_seed``, a
one-element int64 tensor on the sample's device read by the kernel, and ``noise_offset``, a host
int): element i (flat index over the whole latent) gets the fp32 normal of Philox4x32-10 at
counter ``noise_offset + i`` under that seed, Triton's ``tl.randn`` stream (formula:
diffaccel/ops/philox.py). As the seed is read on the device, a captured CUDA graph replays with
new noise after ``noise_seed.copy_(...)`` / ``fill_(...)``; the offset is baked into the launch.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import _backend
from ._checks import FLOAT_DTYPES, check_flag, check_tensor, plain_number, same_device
from .philox import philox_normal_reference

NUM_COEFFS = 24  # 21 used; the rest keep rows 32-byte aligned
(A_X, A_E, A_N, CLIP, C_P, C_X, B_X, B_E, B_P, B_H0, B_H1, B_H2, B_N, D_L, D_P, D_H0, D_H1, D_H2, C_H0, C_H1,
 C_H2) = range(21)
INDEX_DTYPES = (torch.int32, torch.int64)
MAX_NOISE_OFFSET = 2**63 - 1


# -- the reference ------------------------------------------------------------------------

def fused_solver_step_reference(sample, model_output, coeffs, row, model_output_cond, h0, h1, h2, noise,
                                last_sample, guidance_scale: float, guidance_rescale: float, out_dtype: torch.dtype,
                                history_dtype: torch.dtype, write_history: bool = True,
                                noise_seed: Optional[torch.Tensor] = None, noise_offset: int = 0):
    if row is not None:
        r = row.reshape(()).long()
        valid = (r >= 0) & (r < coeffs.shape[0])
        k = coeffs.index_select(0, r.clamp(0, coeffs.shape[0] - 1).reshape(1)).reshape(NUM_COEFFS)
        k = torch.where(valid, k, torch.full_like(k, float("nan")))
    else:
        k = coeffs.reshape(NUM_COEFFS)
    k = k.float()
    x = sample.float()
    e = model_output.float()
    if model_output_cond is not None:
        c = model_output_cond.float()
        e = e + guidance_scale * (c - e)
        if guidance_rescale != 0.0:
            dims = list(range(1, x.dim()))
            factor = guidance_rescale * (c.std(dim=dims, keepdim=True) / e.std(dim=dims, keepdim=True)) \
                + (1.0 - guidance_rescale)
            e = e * factor
    p = k[A_X] * x + k[A_E] * e
    xo = k[B_E] * e
    if noise_seed is not None:
        noise = philox_normal_reference(noise_seed, noise_offset, sample.numel()).reshape(sample.shape)
    if noise is not None:
        nz = noise.float()
        p = p + k[A_N] * nz
        xo = xo + k[B_N] * nz
    p = torch.minimum(torch.maximum(p, -k[CLIP]), k[CLIP])
    ho = k[C_P] * p + k[C_X] * x
    xo = xo + k[B_P] * p
    for col, hcol, h in ((B_H0, C_H0, h0), (B_H1, C_H1, h1), (B_H2, C_H2, h2)):
        if h is not None:
            xo = xo + k[col] * h.float()
            ho = ho + k[hcol] * h.float()
    corrected = _empty(sample, sample.dtype)
    if last_sample is not None:
        y = k[D_L] * last_sample.float() + k[D_P] * p
        for col, h in ((D_H0, h0), (D_H1, h1), (D_H2, h2)):
            if h is not None:
                y = y + k[col] * h.float()
        corrected = y.to(last_sample.dtype)
        xo = xo + k[B_X] * corrected.float()
    else:
        xo = xo + k[B_X] * x
    return xo.to(out_dtype), (ho.to(history_dtype) if write_history else _empty(sample, history_dtype)), corrected


def _empty(sample, dtype):
    return torch.empty((0,), dtype=dtype, device=sample.device)


# -- backends -----------------------------------------------------------------------------

def _outputs(sample, last_sample, out_dtype, history_dtype, write_history):
    return (torch.empty(sample.shape, dtype=out_dtype, device=sample.device),
            torch.empty(sample.shape, dtype=history_dtype, device=sample.device) if write_history
            else _empty(sample, history_dtype),
            torch.empty(sample.shape, dtype=last_sample.dtype, device=sample.device) if last_sample is not None
            else _empty(sample, sample.dtype))


def _ext_step(sample, model_output, coeffs, row, model_output_cond, h0, h1, h2, noise, last_sample, guidance_scale,
              guidance_rescale, out_dtype, history_dtype, write_history, noise_seed=None, noise_offset=0):
    return torch.ops.diffaccel.ext_fused_solver_step(sample, model_output, coeffs, row, model_output_cond, h0, h1,
                                                     h2, noise, last_sample, guidance_scale, guidance_rescale,
                                                     out_dtype, history_dtype, write_history, noise_seed,
                                                     noise_offset)


def _triton_step(sample, model_output, coeffs, row, model_output_cond, h0, h1, h2, noise, last_sample,
                 guidance_scale, guidance_rescale, out_dtype, history_dtype, write_history, noise_seed=None,
                 noise_offset=0):
    from diffaccel.kernels import solver as k

    x_out, h_out, c_out = _outputs(sample, last_sample, out_dtype, history_dtype, write_history)
    k.fused_solver_step(sample, model_output, model_output_cond, h0, h1, h2, noise, last_sample, coeffs, row,
                        guidance_scale, guidance_rescale, x_out, h_out if write_history else None, c_out,
                        noise_seed=noise_seed, noise_offset=noise_offset)
    return x_out, h_out, c_out


_backend.register(_backend.OpBackends(
    "fused_solver_step", torch=fused_solver_step_reference, cuda=_ext_step, triton=_triton_step,
    cuda_devices=("cpu", "cuda")))


# -- the custom op ------------------------------------------------------------------------

@_backend.custom_op("fused_solver_step")
def _fused_solver_step_op(sample: torch.Tensor, model_output: torch.Tensor, coeffs: torch.Tensor,
                          row: Optional[torch.Tensor], model_output_cond: Optional[torch.Tensor],
                          h0: Optional[torch.Tensor], h1: Optional[torch.Tensor], h2: Optional[torch.Tensor],
                          noise: Optional[torch.Tensor], last_sample: Optional[torch.Tensor], guidance_scale: float,
                          guidance_rescale: float, out_dtype: torch.dtype, history_dtype: torch.dtype,
                          write_history: bool, noise_seed: Optional[torch.Tensor] = None,
                          noise_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    perm, inverse = _memory_order(sample)

    def flat(t):  # row-major in the sample's memory order: no copy for a tensor laid out like sample
        return None if t is None else t.permute(perm).contiguous()

    impl = _backend.implementation("fused_solver_step", sample.device)
    args = (flat(sample), flat(model_output), coeffs.contiguous(), None if row is None else row.contiguous(),
            flat(model_output_cond), flat(h0), flat(h1), flat(h2), flat(noise), flat(last_sample), guidance_scale,
            guidance_rescale, out_dtype, history_dtype, write_history)
    outs = impl(*args) if noise_seed is None else impl(*args, noise_seed, noise_offset)  # (seed 0-d: reshaped)
    return _in_sample_layout(outs, inverse)


@_fused_solver_step_op.register_fake
def _(sample, model_output, coeffs, row, model_output_cond, h0, h1, h2, noise, last_sample, guidance_scale,
      guidance_rescale, out_dtype, history_dtype, write_history, noise_seed=None, noise_offset=0):
    perm, inverse = _memory_order(sample)
    flat_last = None if last_sample is None else last_sample.permute(perm)
    return _in_sample_layout(_outputs(sample.permute(perm), flat_last, out_dtype, history_dtype, write_history),
                             inverse)


def _memory_order(sample: torch.Tensor) -> tuple[tuple, tuple]:
    """(perm, inverse): ``sample.permute(perm)`` is row-major when sample is dense with its batch
    outermost (a channels_last latent: perm = (0, 2, 3, 1)); else perm is the identity. The kernels
    index one flat, row-major view of every tensor; reading each through ``perm`` spares a
    channels_last step a copy of each input and returns channels_last outputs, as diffusers' step
    does. (Per-sample reductions see the same elements; in-kernel noise is drawn in memory order.)"""
    identity = tuple(range(sample.dim()))
    perm = tuple(sorted(identity, key=lambda d: (-sample.stride(d), d)))
    if perm == identity or perm[0] != 0 or not sample.permute(perm).is_contiguous():
        return identity, identity
    return perm, tuple(perm.index(d) for d in identity)


def _in_sample_layout(outs, inverse):
    # (the empty placeholders are 1-d; a 1-d sample's order is the identity)
    return tuple(o.permute(inverse) if o.dim() == len(inverse) else o for o in outs)


_SOLVER_TENSOR_ARGS = 10  # sample .. last_sample: the inputs a gradient can flow to


def _solver_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_SOLVER_TENSOR_ARGS])
    ctx.rest = inputs[_SOLVER_TENSOR_ARGS:]


def _solver_backward(ctx, *grads):
    """The step's gradient, recomputed through the reference's torch math: it is linear in its
    tensors but for the clip of the x0 prediction and the guidance rescale, whose gradients come
    at the reference's point. A coefficient table that requires grad gets one too."""
    def reference(*tensors):
        return fused_solver_step_reference(*tensors, *ctx.rest)

    return _backend.recomputed_grads(reference, ctx.saved_tensors, ctx.needs_input_grad[:_SOLVER_TENSOR_ARGS],
                                     grads) + (None,) * len(ctx.rest)


_fused_solver_step_op.register_autograd(_solver_backward, setup_context=_solver_setup_context)


# -- the public wrapper -------------------------------------------------------------------

def _check_like(name, t, sample):
    check_tensor(name, t, dtypes=FLOAT_DTYPES)
    if tuple(t.shape) != tuple(sample.shape):
        raise ValueError(f"{name}: expected shape {tuple(sample.shape)} like sample, got {tuple(t.shape)}")
    if not same_device(sample.device, t.device):
        raise ValueError(f"{name}: expected a tensor on {sample.device} like sample, got one on {t.device}")


def fused_solver_step(sample: torch.Tensor, model_output: torch.Tensor, coeffs: torch.Tensor, *,
                      row: Optional[torch.Tensor] = None, model_output_cond: Optional[torch.Tensor] = None,
                      guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
                      history: Sequence[torch.Tensor] = (), noise: Optional[torch.Tensor] = None,
                      last_sample: Optional[torch.Tensor] = None,
                      out_dtype: Optional[torch.dtype] = None, history_dtype: Optional[torch.dtype] = None,
                      write_history: bool = True, noise_seed: Optional[torch.Tensor] = None,
                      noise_offset: Optional[int] = None,
                      needs_noise: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fused solver step; returns ``(prev_sample, history_entry, corrected_sample)`` (see the
    module docstring). ``corrected_sample`` is empty (0 elements) unless ``last_sample`` is given.

    ``sample`` is [B, ...]; ``model_output`` (the unconditional half when ``model_output_cond`` is
    given), ``model_output_cond``, ``history`` (newest first, at most 3) and ``noise`` have its
    shape. ``out_dtype`` / ``history_dtype`` default to ``model_output``'s dtype. With
    ``write_history=False`` the history entry is not stored (an empty tensor is returned in its place),
    saving a full-latent write for steps whose caller drops it.

    Noise: ``noise`` (a tensor like sample), or ``noise_seed`` (int64 tensor with one element on
    sample's device, read by the kernel) with ``noise_offset`` (a host int >= 0, the Philox counter
    of element 0; see diffaccel/ops/philox.py) for noise generated inside the kernel, or neither
    (no noise term). ``needs_noise=True`` makes "neither" an error, ``False`` makes any noise one.
    """
    check_tensor("sample", sample, dtypes=FLOAT_DTYPES)
    if sample.dim() < 1:
        raise ValueError(f"sample: expected a tensor with a batch dimension, got shape {tuple(sample.shape)}")
    _check_like("model_output", model_output, sample)
    if model_output_cond is not None:
        _check_like("model_output_cond", model_output_cond, sample)
    if isinstance(history, torch.Tensor) or not isinstance(history, (list, tuple)):
        raise TypeError(f"history: expected a list or tuple of tensors (newest first, at most 3), got "
                        f"{type(history).__name__}")
    history = list(history)
    write_history = check_flag("write_history", write_history)
    if needs_noise is not None:
        check_flag("needs_noise", needs_noise)
    if len(history) > 3:
        raise ValueError(f"history: expected at most 3 entries, got {len(history)}")
    for i, h in enumerate(history):
        _check_like(f"history[{i}]", h, sample)
    if noise is not None:
        _check_like("noise", noise, sample)
    noise_offset = _check_noise_source(sample, noise, noise_seed, noise_offset, needs_noise)
    if last_sample is not None:
        _check_like("last_sample", last_sample, sample)
    check_tensor("coeffs", coeffs, dtypes=(torch.float32,), ndim=(1, 2))
    if not same_device(sample.device, coeffs.device):
        raise ValueError(f"coeffs: expected a tensor on {sample.device} like sample, got one on {coeffs.device}")
    if coeffs.shape[-1] != NUM_COEFFS:
        raise ValueError(f"coeffs: expected {NUM_COEFFS} coefficients in the last dimension, got {coeffs.shape[-1]}")
    if row is None:
        if coeffs.dim() != 1:
            raise ValueError(f"coeffs: a table {tuple(coeffs.shape)} needs row; pass one row [{NUM_COEFFS}] "
                             "or give row")
    else:
        check_tensor("row", row, dtypes=INDEX_DTYPES)
        if row.numel() != 1:
            raise ValueError(f"row: expected a single index, got shape {tuple(row.shape)}")
        if coeffs.dim() != 2:
            raise ValueError(f"coeffs: expected a table [R, {NUM_COEFFS}] with row, got shape {tuple(coeffs.shape)}")
        if not same_device(sample.device, row.device):
            raise ValueError(f"row: expected a tensor on {sample.device} like sample, got one on {row.device}")
        row = row.reshape(1)
    guidance_scale, guidance_rescale = plain_number(guidance_scale), plain_number(guidance_rescale)
    for name, v in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}: expected a python float, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"{name}: expected a finite number, got {v!r}")
    if guidance_rescale < 0:  # (diffusers' pipelines skip the rescale for it; the formula would run)
        raise ValueError(f"guidance_rescale: expected a number >= 0, got {guidance_rescale!r}")
    if guidance_rescale != 0.0 and model_output_cond is None:
        raise ValueError("guidance_rescale: needs model_output_cond (the conditional half)")
    if guidance_rescale != 0.0 and sample.dim() < 2:  # (its std is per sample: over dims 1..)
        raise ValueError(f"guidance_rescale: needs a sample [B, ...] with dims past the batch, got shape "
                         f"{tuple(sample.shape)}")
    if guidance_scale != 1.0 and model_output_cond is None:  # (it would be ignored: no second half to mix)
        raise ValueError(f"guidance_scale: {guidance_scale} needs model_output_cond (the conditional half)")
    out_dtype = model_output.dtype if out_dtype is None else out_dtype
    history_dtype = model_output.dtype if history_dtype is None else history_dtype
    for name, d in (("out_dtype", out_dtype), ("history_dtype", history_dtype)):
        if d not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected torch.float16, torch.bfloat16 or torch.float32, got {d!r}")
    h = history + [None] * (3 - len(history))
    args = (sample, model_output, coeffs, row, model_output_cond, h[0], h[1], h[2], noise, last_sample,
            float(guidance_scale), float(guidance_rescale), out_dtype, history_dtype, bool(write_history))
    if noise_seed is not None:
        args = args + (noise_seed.reshape(()), noise_offset)
    return _fused_solver_step_op(*args)


def _check_noise_source(sample, noise, noise_seed, noise_offset, needs_noise) -> int:
    """Validate the noise arguments; returns the offset (0 when unused)."""
    if noise is not None and noise_seed is not None:
        raise ValueError("noise_seed: given together with noise; pass either a noise tensor or a seed for "
                         "in-kernel noise, not both")
    if needs_noise is True and noise is None and noise_seed is None:
        raise ValueError("noise: this step needs noise; pass noise (a tensor) or noise_seed and noise_offset")
    if needs_noise is False and (noise is not None or noise_seed is not None):
        raise ValueError(f"{'noise' if noise is not None else 'noise_seed'}: this step takes no noise")
    if noise_seed is None:
        if noise_offset is not None:
            raise ValueError("noise_offset: given without noise_seed")
        return 0
    check_tensor("noise_seed", noise_seed, dtypes=(torch.int64,))
    if noise_seed.numel() != 1:
        raise ValueError(f"noise_seed: expected one int64 seed (a 0-d tensor), got shape {tuple(noise_seed.shape)}")
    if not same_device(sample.device, noise_seed.device):
        raise ValueError(f"noise_seed: expected a tensor on {sample.device} like sample (the kernel reads it), got "
                         f"one on {noise_seed.device}")
    if noise_offset is None:
        raise ValueError("noise_offset: needed with noise_seed (the Philox counter of element 0)")
    noise_offset = plain_number(noise_offset)
    if isinstance(noise_offset, bool) or not isinstance(noise_offset, int):
        raise TypeError(f"noise_offset: expected a python int, got {type(noise_offset).__name__}")
    if not 0 <= noise_offset <= MAX_NOISE_OFFSET - sample.numel():
        raise ValueError(f"noise_offset: expected 0 <= noise_offset <= 2**63 - 1 - numel, got {noise_offset}")
    return noise_offset
