"""DPM-Solver multistep (data and noise prediction, ODE and SDE, orders 1-3)."""
from __future__ import annotations


import numpy as np
import torch

from ..ops.solver import NUM_COEFFS, fused_solver_step
from ._base import _Adapter, _row, alpha_sigma_lambda, converted_dtype, multistep_reason, output_conversion

# -- DPMSolverMultistepScheduler ----------------------------------------------------------------

class DPMSolverMultistep(_Adapter):
    """Rows [step, order]: the order a step runs at depends on ``lower_order_nums`` (how many steps ran
    since set_timesteps), which the host tracks exactly as diffusers does."""

    name = "DPMSolverMultistepScheduler"

    def noise_free_reason(self, sch):
        if not sch.config.algorithm_type.startswith("sde-"):
            return f"{self.name} with algorithm_type={sch.config.algorithm_type!r} draws no noise (sde-* do)"
        return None

    def unsupported(self, sch):
        c = sch.config
        if c.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"):
            return f"algorithm_type={c.algorithm_type!r} is not fused"
        if c.algorithm_type == "sde-dpmsolver" and c.solver_order == 3:
            return "algorithm_type='sde-dpmsolver' with solver_order=3: diffusers has no such update"
        if c.algorithm_type in ("dpmsolver", "sde-dpmsolver") and c.prediction_type == "flow_prediction":
            return "prediction_type='flow_prediction' is not supported by the noise-prediction DPM-Solver"
        if c.variance_type is not None:
            return f"variance_type={c.variance_type!r}: learned variance is not fused"
        return multistep_reason(c, ("midpoint", "heun"))

    def build(self, sch, state):
        c = sch.config
        sig, alpha, sigt, lam = alpha_sigma_lambda(sch.sigmas, c.use_flow_sigmas)
        sde = c.algorithm_type.startswith("sde-")
        data = c.algorithm_type.endswith("++")  # DPM-Solver++ integrates x0 predictions, DPM-Solver noise ones
        rows = []
        for i in range(len(sig) - 1):
            p_x, p_e = output_conversion(c.prediction_type, data, alpha[i], sigt[i], sig[i])
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
            # (max: a final step onto an fp32 sigma a rounding above the previous one has h = -1e-9,
            # where diffusers' fp32 gets sqrt(0) and float64 would get NaN)
            bn = s_t * np.sqrt(max(1.0 - np.exp(-2 * h), 0.0))
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
        bn = s_t * np.sqrt(max(np.exp(2 * h) - 1.0, 0.0)) if sde else 0.0  # (max: as in the data-prediction row)
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
        noise = {}
        if c.algorithm_type in ("sde-dpmsolver++", "sde-dpmsolver"):
            noise = {"noise": variance_noise.to(device=model_output.device, dtype=torch.float32)} \
                if variance_noise is not None else self._noise(state, generator, model_output, torch.float32)
        # diffusers casts the new sample to its converted model output's dtype, which it also keeps
        dtype = converted_dtype(c.prediction_type, c.algorithm_type.endswith("++"), sample, model_output)
        prev, x0, _ = fused_solver_step(sample, model_output, state.row("steps", 3 * i + order - 1, sample.device),
                                        model_output_cond=cond, guidance_scale=s, guidance_rescale=rescale,
                                        history=history, **noise, out_dtype=dtype, history_dtype=dtype)
        self._noise_drawn(state, noise, sample)
        for j in range(c.solver_order - 1):
            sch.model_outputs[j] = sch.model_outputs[j + 1]
        sch.model_outputs[-1] = x0
        if sch.lower_order_nums < c.solver_order:
            sch.lower_order_nums += 1
        sch._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)
