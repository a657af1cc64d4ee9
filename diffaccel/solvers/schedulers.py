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
seeded trajectories match.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..ops.solver import (A_E, A_N, A_X, B_E, B_H0, B_H1, B_H2, B_N, B_P, B_X, C_P, C_X, CLIP, D_H0, D_H1, D_H2,
                          D_L, D_P, NUM_COEFFS, fused_solver_step)

_INT_TIMESTEP_MSG = ("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to `{}.step()` is not "
                     "supported. Make sure to pass one of the `scheduler.timesteps` as a timestep.")


def _row(**cols) -> np.ndarray:
    r = np.zeros(NUM_COEFFS, dtype=np.float64)
    r[CLIP] = np.inf
    r[C_P] = 1.0
    names = {"A_X": A_X, "A_E": A_E, "A_N": A_N, "CLIP": CLIP, "C_P": C_P, "C_X": C_X, "B_X": B_X, "B_E": B_E,
             "B_P": B_P, "B_H0": B_H0, "B_H1": B_H1, "B_H2": B_H2, "B_N": B_N, "D_L": D_L, "D_P": D_P, "D_H0": D_H0,
             "D_H1": D_H1, "D_H2": D_H2}
    for k, v in cols.items():
        r[names[k]] = v
    return r


def _f64(t) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float64)


def _randn(shape, generator, device, dtype):
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


class SolverState:
    """Coefficient tables of one patched instance: host float64 per key, device fp32 per (key, device)."""

    def __init__(self, adapter: "_Adapter"):
        self.adapter = adapter
        self.built = False
        self.host: dict = {}
        self.aux: dict = {}
        self.device_tables: dict = {}

    def ready_to_build(self, sch) -> bool:
        return getattr(sch, "num_inference_steps", None) is not None

    def rebuild(self, sch) -> None:
        self.host, self.aux, self.device_tables = {}, {}, {}
        self.adapter.build(sch, self)
        self.built = True
        dev = sch.timesteps.device if isinstance(getattr(sch, "timesteps", None), torch.Tensor) else None
        if dev is not None and dev.type != "cpu":  # upload now, not inside a captured loop
            for key in list(self.host):
                self.table(key, dev)

    def table(self, key, device: torch.device) -> torch.Tensor:
        k = (key, str(device))
        t = self.device_tables.get(k)
        if t is None:
            t = torch.as_tensor(self.host[key], dtype=torch.float32).to(device)
            self.device_tables[k] = t
        return t

    def row(self, key, index: int, device: torch.device) -> torch.Tensor:
        """Row ``index`` of table ``key`` on ``device``; a row the schedule should never reach (NaN,
        e.g. a singular UniPC system) raises instead of poisoning the sample."""
        if np.isnan(self.host[key][index]).any():
            raise ValueError(f"{self.adapter.name}.step: no coefficients for this step ({key}[{index}]): the "
                             "solver's system is singular or undefined here (diffusers' own step fails or "
                             "returns NaN)")
        return self.table(key, device)[index]

    def ensure(self, key, make) -> None:
        if key not in self.host:
            self.host[key] = make()


class _Adapter:
    name = ""

    def unsupported(self, sch) -> Optional[str]:
        return None

    def new_state(self, sch) -> SolverState:
        return SolverState(self)

    def build(self, sch, state: SolverState) -> None:
        raise NotImplementedError

    # -- shared pieces of every step --
    def _begin(self, sch, state, model_output, cond, sample, guidance_rescale):
        if not state.built or getattr(sch, "num_inference_steps", None) is None:
            raise ValueError(f"{self.name}.step: call set_timesteps(...) before step; the fused step's "
                             "coefficients are computed there")
        for nm, t in (("model_output", model_output), ("sample", sample)) + ((("model_output_cond", cond),)
                                                                              if cond is not None else ()):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{nm}: expected a torch.Tensor, got {type(t).__name__}")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output: expected shape {tuple(sample.shape)} like sample, got "
                             f"{tuple(model_output.shape)}")
        if cond is not None and cond.shape != sample.shape:
            raise ValueError(f"model_output_cond: expected shape {tuple(sample.shape)} like sample, got "
                             f"{tuple(cond.shape)}")
        if guidance_rescale and cond is None:
            raise ValueError("guidance_rescale: needs the conditional half (step_with_guidance)")

    @staticmethod
    def _init_index(sch, timestep):
        if sch.step_index is None:
            sch._init_step_index(timestep)
        return sch.step_index


# -- FlowMatchEulerDiscreteScheduler --------------------------------------------------------

class FlowMatchEuler(_Adapter):
    name = "FlowMatchEulerDiscreteScheduler"

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
        if per_token_timesteps is not None:
            raise ValueError("per_token_timesteps: not supported by diffaccel's fused step; "
                             "unpatch_scheduler(scheduler) to use it")
        self._begin(sch, state, model_output, cond, sample, rescale)
        i = self._init_index(sch, timestep)
        noise = None
        if sch.config.stochastic_sampling:
            noise = _randn(sample.shape, generator, sample.device, torch.float32)
        prev, _, _ = fused_solver_step(sample, model_output, state.table("steps", sample.device)[i],
                                       model_output_cond=cond, guidance_scale=s, guidance_rescale=rescale, noise=noise,
                                       out_dtype=model_output.dtype, write_history=False)
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
        noise = None
        if state.aux[key][i] > 0:  # diffusers draws only when churning this step
            noise = _randn(model_output.shape, generator, model_output.device, model_output.dtype)
        x0_is_output = sch.config.prediction_type in ("original_sample", "sample")
        prev, x0, _ = fused_solver_step(sample, model_output, state.table(key, sample.device)[i],
                                        model_output_cond=cond, guidance_scale=s, guidance_rescale=rescale,
                                        noise=noise, out_dtype=model_output.dtype,
                                        history_dtype=model_output.dtype if x0_is_output else torch.float32)
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
        noise = _randn(model_output.shape, generator, model_output.device, model_output.dtype)
        prev, x0, _ = fused_solver_step(sample, model_output, state.table("steps", sample.device)[i],
                                        model_output_cond=cond, guidance_scale=s, guidance_rescale=rescale, noise=noise,
                                        out_dtype=model_output.dtype, history_dtype=torch.float32)
        sch._step_index += 1
        if not return_dict:
            return (prev, x0)
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


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
    if getattr(sch.config, "thresholding", False):
        return "thresholding=True: dynamic thresholding (a per-sample quantile) is not fused"
    pt = sch.config.prediction_type
    if pt not in ("epsilon", "sample", "v_prediction"):
        return f"prediction_type={pt!r} is not supported by {type(sch).__name__}"
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
            t = int(timestep)
            if not 0 <= t < T:
                raise ValueError(f"timestep: {t} is outside the training schedule [0, {T})")
            coeffs = table[t]
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                                 "`generator` or `variance_noise` stays `None`.")
            noise = variance_noise if variance_noise is not None else \
                _randn(model_output.shape, generator, model_output.device, model_output.dtype)
        dtype = torch.promote_types(sample.dtype, model_output.dtype)
        prev, x0, _ = fused_solver_step(sample, model_output, coeffs, row=row, model_output_cond=cond, guidance_scale=s,
                                        guidance_rescale=rescale, noise=noise, out_dtype=dtype, history_dtype=dtype)
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
        i = self._init_index(sch, timestep)
        if not (isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu"):
            if int(timestep) != state.aux["timesteps"][i]:
                raise ValueError(f"timestep: {int(timestep)} is not the schedule's timesteps[{i}] = "
                                 f"{state.aux['timesteps'][i]}; the fused step follows the schedule")
        noise = None
        dtype = torch.promote_types(sample.dtype, model_output.dtype)
        if i != sch.num_inference_steps - 1:
            noise = _randn(model_output.shape, generator, model_output.device, dtype)
        prev, denoised, _ = fused_solver_step(sample, model_output, state.table("steps", sample.device)[i],
                                              model_output_cond=cond, guidance_scale=s, guidance_rescale=rescale,
                                              noise=noise, out_dtype=dtype, history_dtype=dtype)
        sch._step_index += 1
        if not return_dict:
            return (prev, denoised)
        return LCMSchedulerOutput(prev_sample=prev, denoised=denoised)


# -- DPMSolverMultistepScheduler ----------------------------------------------------------------

class DPMSolverMultistep(_Adapter):
    """Rows [step, order]: the order a step runs at depends on ``lower_order_nums`` (how many steps ran
    since set_timesteps), which the host tracks exactly as diffusers does."""

    name = "DPMSolverMultistepScheduler"

    def unsupported(self, sch):
        c = sch.config
        if c.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"):
            return f"algorithm_type={c.algorithm_type!r} is not fused"
        if c.algorithm_type == "sde-dpmsolver" and c.solver_order == 3:
            return "algorithm_type='sde-dpmsolver' with solver_order=3: diffusers has no such update"
        if c.algorithm_type in ("dpmsolver", "sde-dpmsolver") and c.prediction_type == "flow_prediction":
            return "prediction_type='flow_prediction' is not supported by the noise-prediction DPM-Solver"
        if c.thresholding:
            return "thresholding=True: dynamic thresholding (a per-sample quantile) is not fused"
        if c.variance_type is not None:
            return f"variance_type={c.variance_type!r}: learned variance is not fused"
        if c.solver_type not in ("midpoint", "heun"):
            return f"solver_type={c.solver_type!r} is not fused"
        if c.prediction_type not in ("epsilon", "sample", "v_prediction", "flow_prediction"):
            return f"prediction_type={c.prediction_type!r} is not supported"
        if c.solver_order > 3:
            return f"solver_order={c.solver_order}: at most 3"
        return None

    def build(self, sch, state):
        c = sch.config
        sig = _f64(sch.sigmas)
        if c.use_flow_sigmas:
            alpha, sigt = 1 - sig, sig
        else:
            alpha = 1 / np.sqrt(sig**2 + 1)
            sigt = sig * alpha
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            lam = np.log(alpha) - np.log(sigt)
        sde = c.algorithm_type.startswith("sde-")
        data = c.algorithm_type.endswith("++")  # DPM-Solver++ integrates x0 predictions, DPM-Solver noise ones
        rows = []
        for i in range(len(sig) - 1):
            a_s, s_s = alpha[i], sigt[i]
            if not data:  # history holds epsilon
                if c.prediction_type == "epsilon":
                    p_x, p_e = 0.0, 1.0
                elif c.prediction_type == "sample":
                    p_x, p_e = 1 / s_s, -a_s / s_s
                else:  # v_prediction
                    p_x, p_e = s_s, a_s
            elif c.prediction_type == "epsilon":
                p_x, p_e = 1 / a_s, -s_s / a_s
            elif c.prediction_type == "sample":
                p_x, p_e = 0.0, 1.0
            elif c.prediction_type == "v_prediction":
                p_x, p_e = a_s, -s_s
            else:  # flow_prediction
                p_x, p_e = 1.0, -sig[i]
            for order in (1, 2, 3):
                with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                    rows.append(self._order_row(c, sde, data, order, i, alpha, sigt, lam, p_x, p_e))
        state.host["steps"] = np.stack(rows) if rows else np.zeros((0, NUM_COEFFS))

    @staticmethod
    def _order_row(c, sde, data, order, i, alpha, sigt, lam, p_x, p_e):
        a_t, s_t, s_s0 = alpha[i + 1], sigt[i + 1], sigt[i]
        h = lam[i + 1] - lam[i]
        if order > 1 and i < order - 1:
            return np.full(NUM_COEFFS, np.nan)  # never chosen: not enough history
        if not data:
            return DPMSolverMultistep._noise_order_row(c, sde, order, i, alpha, sigt, lam, p_x, p_e)
        if sde:
            bx = s_t / s_s0 * np.exp(-h)
            c0 = a_t * (1 - np.exp(-2.0 * h))  # on D0
            bn = s_t * np.sqrt(1.0 - np.exp(-2 * h))
        else:
            bx = s_t / s_s0
            c0 = -(a_t * (np.exp(-h) - 1.0))
            bn = 0.0
        m = np.zeros(3)  # coefficients on m0 (new x0), m1 (h0), m2 (h1)
        m[0] = c0
        if order >= 2:
            h_0 = lam[i] - lam[i - 1]
            r0 = h_0 / h
            d10 = np.array([1 / r0, -1 / r0, 0.0])
        if order == 2:
            if c.solver_type == "midpoint":
                c1 = 0.5 * c0
            elif sde:
                c1 = a_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
            else:
                c1 = a_t * ((np.exp(-h) - 1.0) / h + 1.0)
            m = m + c1 * d10
        elif order == 3:
            h_1 = lam[i - 1] - lam[i - 2]
            r1 = h_1 / h
            d11 = np.array([0.0, 1 / r1, -1 / r1])
            d1 = d10 + (r0 / (r0 + r1)) * (d10 - d11)
            d2 = (1.0 / (r0 + r1)) * (d10 - d11)
            if sde:
                c1 = a_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
                c2 = a_t * ((1.0 - np.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
            else:
                c1 = a_t * ((np.exp(-h) - 1.0) / h + 1.0)
                c2 = -(a_t * ((np.exp(-h) - 1.0 + h) / h**2 - 0.5))
            m = m + c1 * d1 + c2 * d2
        return _row(A_X=p_x, A_E=p_e, B_X=bx, B_P=m[0], B_H0=m[1], B_H1=m[2], B_N=bn)

    @staticmethod
    def _noise_order_row(c, sde, order, i, alpha, sigt, lam, p_x, p_e):
        """DPM-Solver (noise prediction): diffusers' dpmsolver / sde-dpmsolver updates."""
        a_t, s_t, a_s0 = alpha[i + 1], sigt[i + 1], alpha[i]
        h = lam[i + 1] - lam[i]
        bx = a_t / a_s0
        phi = s_t * (np.exp(h) - 1.0)
        c0 = -2.0 * phi if sde else -phi
        bn = s_t * np.sqrt(np.exp(2 * h) - 1.0) if sde else 0.0
        m = np.zeros(3)
        m[0] = c0
        if order >= 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d10 = np.array([1 / r0, -1 / r0, 0.0])
        heun = s_t * ((np.exp(h) - 1.0) / h - 1.0)
        if order == 2:
            if c.solver_type == "midpoint":
                c1 = -phi if sde else -0.5 * phi
            else:
                c1 = -2.0 * heun if sde else -heun
            m = m + c1 * d10
        elif order == 3:
            r1 = (lam[i - 1] - lam[i - 2]) / h
            d11 = np.array([0.0, 1 / r1, -1 / r1])
            d1 = d10 + (r0 / (r0 + r1)) * (d10 - d11)
            d2 = (1.0 / (r0 + r1)) * (d10 - d11)
            c2 = -(s_t * ((np.exp(h) - 1.0 - h) / h**2 - 0.5))
            m = m - heun * d1 + c2 * d2
        return _row(A_X=p_x, A_E=p_e, B_X=bx, B_P=m[0], B_H0=m[1], B_H1=m[2], B_N=bn)

    def step(self, sch, state, model_output, cond, s, rescale, timestep, sample, generator=None, variance_noise=None,
             return_dict=True):
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        if sch.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        self._begin(sch, state, model_output, cond, sample, rescale)
        c = sch.config
        i = self._init_index(sch, timestep)
        n = len(sch.timesteps)
        lower_order_final = (i == n - 1) and (c.euler_at_final or (c.lower_order_final and n < 15)
                                               or c.final_sigmas_type == "zero")
        lower_order_second = (i == n - 2) and c.lower_order_final and n < 15
        if c.solver_order == 1 or sch.lower_order_nums < 1 or lower_order_final:
            order = 1
        elif c.solver_order == 2 or sch.lower_order_nums < 2 or lower_order_second:
            order = 2
        else:
            order = 3
        history = [sch.model_outputs[-1 - j] for j in range(order - 1)]
        noise = None
        if c.algorithm_type in ("sde-dpmsolver++", "sde-dpmsolver"):
            noise = variance_noise.to(device=model_output.device, dtype=torch.float32) if variance_noise is not None \
                else _randn(model_output.shape, generator, model_output.device, torch.float32)
        prev, x0, _ = fused_solver_step(sample, model_output, state.row("steps", 3 * i + order - 1, sample.device),
                                        model_output_cond=cond, guidance_scale=s, guidance_rescale=rescale,
                                        history=history, noise=noise, out_dtype=model_output.dtype,
                                        history_dtype=torch.promote_types(sample.dtype, model_output.dtype))
        for j in range(c.solver_order - 1):
            sch.model_outputs[j] = sch.model_outputs[j + 1]
        sch.model_outputs[-1] = x0
        if sch.lower_order_nums < c.solver_order:
            sch.lower_order_nums += 1
        sch._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)


# -- UniPCMultistepScheduler ------------------------------------------------------------------

def _unipc_rb(order, rks, hh, solver_type):
    """diffusers' R (powers of rks) and b for UniPC's B(h) variants, in float64."""
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    B_h = hh if solver_type == "bh1" else np.expm1(hh)
    R, b = [], []
    for i in range(1, order + 1):
        R.append(np.power(rks, i - 1))
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return np.stack(R), np.array(b), h_phi_1, B_h


class UniPCMultistep(_Adapter):
    """UniPC (data or noise prediction, B(h) = bh1/bh2) with its corrector. The rho coefficients (diffusers'
    ``torch.linalg.solve`` on the device) are solved on the host at set_timesteps.

    One launch per step, corrector included: the op reads ``last_sample`` and writes the corrected
    sample (diffusers' new ``last_sample``, rounded to its dtype before the predictor uses it, as
    diffusers does) next to the new sample and the x0 history entry. Rows are indexed by
    (step, corrector order, predictor order); both orders are host state, as in diffusers.
    """

    name = "UniPCMultistepScheduler"

    def unsupported(self, sch):
        c = sch.config
        if not c.predict_x0 and c.prediction_type == "flow_prediction":
            return "predict_x0=False with prediction_type='flow_prediction' is not supported by diffusers' UniPC"
        if c.thresholding:
            return "thresholding=True: dynamic thresholding (a per-sample quantile) is not fused"
        if sch.solver_p is not None:
            return "solver_p is set: an external predictor scheduler is not fused"
        if c.solver_type not in ("bh1", "bh2"):
            return f"solver_type={c.solver_type!r} is not fused"
        if c.prediction_type not in ("epsilon", "sample", "v_prediction", "flow_prediction"):
            return f"prediction_type={c.prediction_type!r} is not supported"
        if c.solver_order > 3:
            return f"solver_order={c.solver_order}: at most 3 (three history slots)"
        return None

    def build(self, sch, state):
        c = sch.config
        sig = _f64(sch.sigmas)
        if c.use_flow_sigmas:
            alpha, sigt = 1 - sig, sig
        else:
            alpha = 1 / np.sqrt(sig**2 + 1)
            sigt = sig * alpha
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            lam = np.log(alpha) - np.log(sigt)
        n = len(sig) - 1
        nan = np.full(NUM_COEFFS, np.nan)
        pred, pc = [], []  # rows [step, predictor order] and [step, corrector order, predictor order]
        for i in range(n):
            a_s, s_s = alpha[i], sigt[i]
            if not c.predict_x0:  # history holds epsilon
                if c.prediction_type == "epsilon":
                    p_x, p_e = 0.0, 1.0
                elif c.prediction_type == "sample":
                    p_x, p_e = 1 / s_s, -a_s / s_s
                else:  # v_prediction
                    p_x, p_e = s_s, a_s
            elif c.prediction_type == "epsilon":
                p_x, p_e = 1 / a_s, -s_s / a_s
            elif c.prediction_type == "sample":
                p_x, p_e = 0.0, 1.0
            elif c.prediction_type == "v_prediction":
                p_x, p_e = a_s, -s_s
            else:
                p_x, p_e = 1.0, -sig[i]
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                preds = [self._solved(self._predictor, c, i, po, alpha, sigt, lam) if po <= i + 1 else None
                         for po in (1, 2, 3)]
                corrs = [self._solved(self._corrector, c, i, oc, alpha, sigt, lam) if 1 <= i and oc <= i else None
                         for oc in (1, 2, 3)]
            for pr in preds:  # b_x on the (corrected) sample, b_m0 on the new x0, b_h on H0, H1
                pred.append(nan if pr is None else _row(A_X=p_x, A_E=p_e, B_X=pr[0], B_P=pr[1], B_H0=pr[2][0],
                                                        B_H1=pr[2][1]))
            for cr in corrs:  # d_l on last_sample, d_m0 on the new x0, d_h on H0, H1, H2
                for pr in preds:
                    if cr is None or pr is None:
                        pc.append(nan)
                        continue
                    pc.append(_row(A_X=p_x, A_E=p_e, B_X=pr[0], B_P=pr[1], B_H0=pr[2][0], B_H1=pr[2][1],
                                   D_L=cr[0], D_P=cr[1], D_H0=cr[2][0], D_H1=cr[2][1], D_H2=cr[2][2]))
        for key, rows in (("pred", pred), ("pc", pc)):
            state.host[key] = np.stack(rows) if rows else np.zeros((0, NUM_COEFFS))

    @staticmethod
    def _solved(fn, *args):
        # a (step, order) pair the schedule never reaches can be singular (e.g. past a zero final
        # sigma); its row stays NaN, so reaching it anyway shows instead of passing silently
        try:
            return fn(*args)
        except np.linalg.LinAlgError:
            return None

    @staticmethod
    def _scales(c, t, s0, alpha, sigt, h):
        """(coefficient on the sample, amplitude of the model terms, hh) for data or noise prediction."""
        if c.predict_x0:
            return sigt[t] / sigt[s0], alpha[t], -h
        return alpha[t] / alpha[s0], sigt[t], h

    @staticmethod
    def _predictor(c, i, order, alpha, sigt, lam):
        h = lam[i + 1] - lam[i]
        b_x, a_t, hh = UniPCMultistep._scales(c, i + 1, i, alpha, sigt, h)
        rks = [(lam[i - k] - lam[i]) / h for k in range(1, order)] + [1.0]
        R, b, h_phi_1, B_h = _unipc_rb(order, np.array(rks), hh, c.solver_type)
        if order == 1:
            rhos = np.zeros(0)
        elif order == 2:
            rhos = np.array([0.5])
        else:
            rhos = np.linalg.solve(R[:-1, :-1], b[:-1])
        b_h = np.zeros(3)
        b_m0 = -a_t * h_phi_1
        for k in range(1, order):  # D1_k = (H_{k-1} - m0) / rk_k
            w = -a_t * B_h * rhos[k - 1] / rks[k - 1]
            b_h[k - 1] += w
            b_m0 -= w
        return b_x, b_m0, b_h

    @staticmethod
    def _corrector(c, i, order, alpha, sigt, lam):
        h = lam[i] - lam[i - 1]
        b_l, a_t, hh = UniPCMultistep._scales(c, i, i - 1, alpha, sigt, h)
        rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, order)] + [1.0]
        R, b, h_phi_1, B_h = _unipc_rb(order, np.array(rks), hh, c.solver_type)
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
        b_h = np.zeros(3)
        b_h[0] = -a_t * h_phi_1
        for k in range(1, order):  # D1_k = (H_k - H0) / rk_k
            w = -a_t * B_h * rhos[k - 1] / rks[k - 1]
            b_h[k] += w
            b_h[0] -= w
        w = -a_t * B_h * rhos[-1]  # D1_t = m0_new - H0
        return b_l, w, b_h - np.array([w, 0.0, 0.0])

    def step(self, sch, state, model_output, cond, s, rescale, timestep, sample, return_dict=True):
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        if sch.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        self._begin(sch, state, model_output, cond, sample, rescale)
        c = sch.config
        i = self._init_index(sch, timestep)
        use_corrector = i > 0 and (i - 1) not in sch.disable_corrector and sch.last_sample is not None
        before = list(sch.model_outputs)  # H0 = before[-1], H1 = before[-2], ...
        if c.lower_order_final:
            this_order = min(c.solver_order, len(sch.timesteps) - i)
        else:
            this_order = c.solver_order
        this_order = min(this_order, sch.lower_order_nums + 1)
        hist_dtype = torch.promote_types(sample.dtype, model_output.dtype)
        if use_corrector:
            oc = sch.this_order
            coeffs = state.row("pc", 9 * i + 3 * (oc - 1) + this_order - 1, sample.device)
            history = [before[-1 - k] for k in range(max(oc, this_order - 1))]
            last = sch.last_sample
        else:
            coeffs = state.row("pred", 3 * i + this_order - 1, sample.device)
            history = [before[-1 - k] for k in range(this_order - 1)]
            last = None
        prev, x0, corrected = fused_solver_step(
            sample, model_output, coeffs, model_output_cond=cond, guidance_scale=s, guidance_rescale=rescale,
            history=history, last_sample=last, out_dtype=sample.dtype if last is None else last.dtype,
            history_dtype=hist_dtype)
        if last is None:
            corrected = sample
        for j in range(c.solver_order - 1):
            sch.model_outputs[j] = sch.model_outputs[j + 1]
            sch.timestep_list[j] = sch.timestep_list[j + 1]
        sch.model_outputs[-1] = x0
        sch.timestep_list[-1] = timestep
        sch.this_order = this_order
        sch.last_sample = corrected
        if sch.lower_order_nums < c.solver_order:
            sch.lower_order_nums += 1
        sch._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)


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
