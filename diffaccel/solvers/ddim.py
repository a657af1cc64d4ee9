"""DDIM (rows per timestep value) and LCM (rows per step index), from alphas_cumprod."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..ops._checks import plain_number
from ..ops.solver import NUM_COEFFS, fused_solver_step
from ._base import _Adapter, _f64, _row, converted_dtype, thresholding_reason

# -- DDIMScheduler ----------------------------------------------------------------------------

def _alpha_x0_eps(prediction_type, a):
    """x0 = (p_x, p_e) and epsilon = (q_x, q_e) as combinations of (sample, model_output)."""
    sa, sb = math.sqrt(a), math.sqrt(1 - a)
    if prediction_type == "epsilon":
        return (1 / sa, -sb / sa), (0.0, 1.0)
    if prediction_type == "sample":
        return (0.0, 1.0), (1 / sb, -sa / sb)
    return (sa, -sb), (sb, sa)  # v_prediction


def _check_no_thresholding(sch):
    reason = thresholding_reason(sch.config)
    if reason is not None:
        return reason
    if sch.config.clip_sample and not sch.config.clip_sample_range >= 0:
        # diffusers' clamp(-r, r) with r < 0 sets every value to r; the kernels bound |x0| by r
        return (f"clip_sample_range={sch.config.clip_sample_range}: a negative (or NaN) range with "
                f"clip_sample=True is not fused")
    pt = sch.config.prediction_type
    if pt not in ("epsilon", "sample", "v_prediction"):
        return f"prediction_type={pt!r} is not supported by {type(sch).__name__}"
    if pt == "epsilon" and bool((sch.alphas_cumprod == 0).any()):
        # x0 = (x - sqrt(1 - a) eps) / sqrt(a): diffusers divides by zero there (inf, or clip_sample's bound)
        return ("prediction_type='epsilon' with a zero alphas_cumprod (rescale_betas_zero_snr=True): x0 is "
                "undefined at the last training timestep; zero terminal SNR is meant for v_prediction")
    return None


class DDIM(_Adapter):
    """Rows indexed by the timestep value, so a CUDA timestep tensor selects its row on the device."""

    name = "DDIMScheduler"

    def unsupported(self, sch):
        return _check_no_thresholding(sch)

    def _make(self, sch, eta, use_clipped):
        ac = _f64(sch.alphas_cumprod)
        final = float(_f64(sch.final_alpha_cumprod))
        T = sch.config.num_train_timesteps
        ratio = T // sch.num_inference_steps
        clip = sch.config.clip_sample_range if sch.config.clip_sample else np.inf
        rows = []
        for t in range(T):
            a = ac[t]
            prev_t = t - ratio
            a_prev = ac[prev_t] if prev_t >= 0 else final
            b, b_prev = 1 - a, 1 - a_prev
            variance = (b_prev / b) * (1 - a / a_prev)
            std = eta * math.sqrt(variance)
            (p_x, p_e), (q_x, q_e) = _alpha_x0_eps(sch.config.prediction_type, a)
            direction = math.sqrt(max(1 - a_prev - std**2, 0.0))
            if use_clipped:  # epsilon recomputed from the clipped x0
                q_x, q_e, q_p = 1 / math.sqrt(b), 0.0, -math.sqrt(a) / math.sqrt(b)
            else:
                q_p = 0.0
            rows.append(_row(A_X=p_x, A_E=p_e, CLIP=clip, B_X=direction * q_x, B_E=direction * q_e,
                             B_P=math.sqrt(a_prev) + direction * q_p, B_N=std))
        return np.stack(rows)

    def build(self, sch, state):
        state.host[(0.0, False)] = self._make(sch, 0.0, False)

    def step(self, sch, state, model_output, cond, s, rescale, timestep, sample, eta=0.0,
             use_clipped_model_output=False, generator=None, variance_noise=None, return_dict=True):
        from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

        if sch.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        eta = plain_number(eta)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta):
            raise ValueError(f"eta: expected a finite number (0 = DDIM, 1 = DDPM-like), got {eta!r}")
        self._begin(sch, state, model_output, cond, sample, rescale)
        key = (float(eta), bool(use_clipped_model_output))
        state.ensure(key, lambda: self._make(sch, float(eta), bool(use_clipped_model_output)))
        table = state.table(key, sample.device)
        T = table.shape[0]
        row = None
        if isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
            if timestep.is_floating_point() or timestep.numel() != 1:
                raise ValueError(f"timestep: expected one integer timestep, got dtype {timestep.dtype} and shape "
                                 f"{tuple(timestep.shape)}")
            row = timestep.reshape(1)
            if row.dtype not in (torch.int32, torch.int64):
                row = row.long()
            coeffs = table
        else:
            t = self._timestep_value(timestep)
            if not 0 <= t < T:
                raise ValueError(f"timestep: {t} is outside the training schedule [0, {T})")
            coeffs = table[t]
        noise = {}
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                                 "`generator` or `variance_noise` stays `None`.")
            noise = {"noise": variance_noise} if variance_noise is not None else \
                self._noise(state, generator, model_output, model_output.dtype)
        dtype = torch.promote_types(sample.dtype, model_output.dtype)
        x0_dtype = converted_dtype(sch.config.prediction_type, True, sample, model_output)
        prev, x0, _ = fused_solver_step(sample, model_output, coeffs, row=row, model_output_cond=cond, guidance_scale=s,
                                        guidance_rescale=rescale, **noise, out_dtype=dtype, history_dtype=x0_dtype)
        self._noise_drawn(state, noise, sample)
        if not return_dict:
            return (prev, x0)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# -- LCMScheduler -----------------------------------------------------------------------------

class LCM(_Adapter):
    name = "LCMScheduler"

    def unsupported(self, sch):
        return _check_no_thresholding(sch)

    def build(self, sch, state):
        ac = _f64(sch.alphas_cumprod)
        final = float(_f64(sch.final_alpha_cumprod))
        ts = [int(t) for t in sch.timesteps.tolist()]
        clip = sch.config.clip_sample_range if sch.config.clip_sample else np.inf
        rows = []
        for i, t in enumerate(ts):
            prev_t = ts[i + 1] if i + 1 < len(ts) else t
            a = ac[t]
            a_prev = ac[prev_t] if prev_t >= 0 else final
            c_skip, c_out = (float(v) for v in sch.get_scalings_for_boundary_condition_discrete(t))
            (p_x, p_e), _ = _alpha_x0_eps(sch.config.prediction_type, a)
            if i != sch.num_inference_steps - 1:
                sa, sb = math.sqrt(a_prev), math.sqrt(1 - a_prev)
                rows.append(_row(A_X=p_x, A_E=p_e, CLIP=clip, C_P=c_out, C_X=c_skip, B_P=sa * c_out, B_X=sa * c_skip,
                                 B_N=sb))
            else:
                rows.append(_row(A_X=p_x, A_E=p_e, CLIP=clip, C_P=c_out, C_X=c_skip, B_P=c_out, B_X=c_skip))
        state.host["steps"] = np.stack(rows) if rows else np.zeros((0, NUM_COEFFS))
        state.aux["timesteps"] = ts

    def step(self, sch, state, model_output, cond, s, rescale, timestep, sample, generator=None, return_dict=True):
        from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput

        if sch.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        self._begin(sch, state, model_output, cond, sample, rescale)
        host_t = not (isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu")
        t = self._timestep_value(timestep) if host_t else None  # (before diffusers looks it up in the schedule)
        i = self._init_index(sch, timestep)
        if host_t:
            if t != state.aux["timesteps"][i]:
                raise ValueError(f"timestep: {t} is not the schedule's timesteps[{i}] = "
                                 f"{state.aux['timesteps'][i]}; the fused step follows the schedule")
        noise = {}
        dtype = torch.promote_types(sample.dtype, model_output.dtype)
        if i != sch.num_inference_steps - 1:
            noise = self._noise(state, generator, model_output, dtype)
        prev, denoised, _ = fused_solver_step(sample, model_output, state.table("steps", sample.device)[i],
                                              model_output_cond=cond, guidance_scale=s, guidance_rescale=rescale,
                                              **noise, out_dtype=dtype, history_dtype=dtype)
        self._noise_drawn(state, noise, sample)
        sch._step_index += 1
        if not return_dict:
            return (prev, denoised)
        return LCMSchedulerOutput(prev_sample=prev, denoised=denoised)
