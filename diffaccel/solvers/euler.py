"""FlowMatch Euler, Euler and Euler-Ancestral: rows per step index from the sigmas."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..ops.solver import NUM_COEFFS, fused_solver_step
from ._base import _INT_TIMESTEP_MSG, _Adapter, _f64, _row

# -- FlowMatchEulerDiscreteScheduler --------------------------------------------------------

class FlowMatchEuler(_Adapter):
    name = "FlowMatchEulerDiscreteScheduler"

    def noise_free_reason(self, sch):
        if not sch.config.stochastic_sampling:
            return f"{self.name} with stochastic_sampling=False draws no noise"
        return None

    def unfused_call_reason(self, args, kwargs):
        # step(..., s_churn, s_tmin, s_tmax, s_noise, generator, per_token_timesteps, return_dict):
        # a sigma per token (LTX conditioning, Sana-WM) steps each token differently; diffusers' step runs it
        per_token = kwargs.get("per_token_timesteps", args[5] if len(args) > 5 else None)
        return None if per_token is None else "per_token_timesteps"

    def build(self, sch, state):
        sig = _f64(sch.sigmas)
        rows = []
        for i in range(len(sig) - 1):
            s, sn = sig[i], sig[i + 1]
            if sch.config.stochastic_sampling:
                rows.append(_row(A_X=1.0, A_E=-s, B_P=1.0 - sn, B_N=sn))
            else:
                rows.append(_row(B_X=1.0, B_E=np.float32(sn) - np.float32(s)))
        state.host["steps"] = np.stack(rows) if rows else np.zeros((0, NUM_COEFFS))

    def step(self, sch, state, model_output, cond, s, rescale, timestep, sample, s_churn=0.0, s_tmin=0.0,
             s_tmax=float("inf"), s_noise=1.0, generator=None, per_token_timesteps=None, return_dict=True):
        from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

        if isinstance(timestep, int) or isinstance(timestep, (torch.IntTensor, torch.LongTensor)):
            raise ValueError(_INT_TIMESTEP_MSG.format(self.name))
        self._begin(sch, state, model_output, cond, sample, rescale)
        i = self._init_index(sch, timestep)
        noise = {}
        if sch.config.stochastic_sampling:
            noise = self._noise(state, generator, sample, torch.float32)
        prev, _, _ = fused_solver_step(sample, model_output, state.table("steps", sample.device)[i],
                                       model_output_cond=cond, guidance_scale=s, guidance_rescale=rescale, **noise,
                                       out_dtype=model_output.dtype, write_history=False)
        self._noise_drawn(state, noise, sample)
        sch._step_index += 1
        if not return_dict:
            return (prev,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)


# -- EulerDiscreteScheduler / EulerAncestralDiscreteScheduler ------------------------------

def _x0_from_sigma(prediction_type, sigma, sigma_hat):
    """(a_x, a_e) of diffusers' Euler x0 prediction from the (churned) sample."""
    if prediction_type in ("original_sample", "sample"):
        return 0.0, 1.0
    if prediction_type == "epsilon":
        return 1.0, -sigma_hat
    return 1.0 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1)  # v_prediction


class EulerDiscrete(_Adapter):
    name = "EulerDiscreteScheduler"

    def unsupported(self, sch):
        pt = sch.config.prediction_type
        if pt not in ("epsilon", "v_prediction", "sample", "original_sample"):
            return f"prediction_type={pt!r} is not one diffusers' Euler step supports"
        return None

    def _make(self, sch, s_churn, s_tmin, s_tmax, s_noise):
        sig = _f64(sch.sigmas)
        sig32 = sch.sigmas.detach().cpu().float().numpy()
        n = len(sig)
        rows, gammas = [], []
        for i in range(n - 1):
            sigma = sig[i]
            gamma = min(s_churn / (n - 1), 2**0.5 - 1) if s_tmin <= float(sig32[i]) <= s_tmax else 0.0
            sigma_hat = sigma * (gamma + 1)
            k = s_noise * math.sqrt(max(sigma_hat**2 - sigma**2, 0.0)) if gamma > 0 else 0.0
            a_x, a_e = _x0_from_sigma(sch.config.prediction_type, sigma, sigma_hat)
            dt = sig[i + 1] - sigma_hat
            g = dt / sigma_hat  # x' = s' + (s' - x0) dt / sigma_hat with s' = x + k n
            rows.append(_row(A_X=a_x, A_E=a_e, A_N=a_x * k, B_X=1.0 + g, B_P=-g, B_N=(1.0 + g) * k))
            gammas.append(gamma)
        return (np.stack(rows) if rows else np.zeros((0, NUM_COEFFS))), gammas

    def build(self, sch, state):
        state.host["default"], state.aux["default"] = self._make(sch, 0.0, 0.0, float("inf"), 1.0)

    def step(self, sch, state, model_output, cond, s, rescale, timestep, sample, s_churn=0.0, s_tmin=0.0,
             s_tmax=float("inf"), s_noise=1.0, generator=None, return_dict=True):
        from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput, logger

        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(_INT_TIMESTEP_MSG.format(self.name))
        self._begin(sch, state, model_output, cond, sample, rescale)
        if not sch.is_scale_input_called:
            logger.warning("The `scale_model_input` function should be called before `step` to ensure correct "
                           "denoising. See `StableDiffusionPipeline` for a usage example.")
        i = self._init_index(sch, timestep)
        key = "default" if (s_churn, s_tmin, s_tmax, s_noise) == (0.0, 0.0, float("inf"), 1.0) else \
            ("churn", float(s_churn), float(s_tmin), float(s_tmax), float(s_noise))
        if key not in state.host:
            state.host[key], state.aux[key] = self._make(sch, s_churn, s_tmin, s_tmax, s_noise)
        noise = {}
        if state.aux[key][i] > 0:  # diffusers draws only when churning this step
            noise = self._noise(state, generator, model_output, model_output.dtype)
        x0_is_output = sch.config.prediction_type in ("original_sample", "sample")
        prev, x0, _ = fused_solver_step(sample, model_output, state.table(key, sample.device)[i],
                                        model_output_cond=cond, guidance_scale=s, guidance_rescale=rescale,
                                        **noise, out_dtype=model_output.dtype,
                                        history_dtype=model_output.dtype if x0_is_output else torch.float32)
        self._noise_drawn(state, noise, sample)
        sch._step_index += 1
        if not return_dict:
            return (prev, x0)
        return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class EulerAncestral(_Adapter):
    name = "EulerAncestralDiscreteScheduler"

    def unsupported(self, sch):
        pt = sch.config.prediction_type
        if pt not in ("epsilon", "v_prediction"):
            return f"prediction_type={pt!r} is not implemented by diffusers' EulerAncestral step"
        return None

    def build(self, sch, state):
        sig = _f64(sch.sigmas)
        rows = []
        for i in range(len(sig) - 1):
            s_from, s_to = sig[i], sig[i + 1]
            sigma_up = math.sqrt(max(s_to**2 * (s_from**2 - s_to**2) / s_from**2, 0.0))
            sigma_down = math.sqrt(max(s_to**2 - sigma_up**2, 0.0))
            a_x, a_e = _x0_from_sigma(sch.config.prediction_type, s_from, s_from)
            g = (sigma_down - s_from) / s_from
            rows.append(_row(A_X=a_x, A_E=a_e, B_X=1.0 + g, B_P=-g, B_N=sigma_up))
        state.host["steps"] = np.stack(rows) if rows else np.zeros((0, NUM_COEFFS))

    def step(self, sch, state, model_output, cond, s, rescale, timestep, sample, generator=None, return_dict=True):
        from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
            EulerAncestralDiscreteSchedulerOutput, logger)

        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(_INT_TIMESTEP_MSG.format(self.name))
        self._begin(sch, state, model_output, cond, sample, rescale)
        if not sch.is_scale_input_called:
            logger.warning("The `scale_model_input` function should be called before `step` to ensure correct "
                           "denoising. See `StableDiffusionPipeline` for a usage example.")
        i = self._init_index(sch, timestep)
        noise = self._noise(state, generator, model_output, model_output.dtype)
        prev, x0, _ = fused_solver_step(sample, model_output, state.table("steps", sample.device)[i],
                                        model_output_cond=cond, guidance_scale=s, guidance_rescale=rescale, **noise,
                                        out_dtype=model_output.dtype, history_dtype=torch.float32)
        self._noise_drawn(state, noise, sample)
        sch._step_index += 1
        if not return_dict:
            return (prev, x0)
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
