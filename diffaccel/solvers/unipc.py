"""UniPC multistep with its corrector (bh1/bh2, data or noise prediction)."""
from __future__ import annotations


import numpy as np
import torch

from ..ops.solver import B_H0, B_P, C_H0, C_P, NUM_COEFFS, fused_solver_step
from ._base import _Adapter, _row, alpha_sigma_lambda, converted_dtype, multistep_reason, output_conversion

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

    With DC-Solver's compensation (``patch_scheduler(s, dc_ratios=...)``; diffaccel/solvers/dc.py)
    the compensated data prediction w0 m_i + w1 H0 + ... replaces m_i in the predictor and in the
    stored history entry: the weights fold into B_P / B_H* and C_P / C_H*, so the step stays one
    launch. The history then holds ``max(solver_order, dc_order + 1)`` entries, as in their code.
    """

    name = "UniPCMultistepScheduler"

    def noise_free_reason(self, sch):
        return f"{self.name} draws no noise"

    def unsupported(self, sch):
        c = sch.config
        if not c.predict_x0 and c.prediction_type == "flow_prediction":
            return "predict_x0=False with prediction_type='flow_prediction' is not supported by diffusers' UniPC"
        if sch.solver_p is not None:
            return "solver_p is set: an external predictor scheduler is not fused"
        return multistep_reason(c, ("bh1", "bh2"))

    def build(self, sch, state):
        c = sch.config
        sig, alpha, sigt, lam = alpha_sigma_lambda(sch.sigmas, c.use_flow_sigmas)
        n = len(sig) - 1
        nan = np.full(NUM_COEFFS, np.nan)
        pred, pc = [], []  # rows [step, predictor order] and [step, corrector order, predictor order]
        for i in range(n):
            p_x, p_e = output_conversion(c.prediction_type, c.predict_x0, alpha[i], sigt[i], sig[i])
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
        dc = state.options.get("dc")
        state.aux["dc_steps"] = frozenset()
        if dc is not None:
            self._fold_dc(sch, state, *dc)

    @staticmethod
    def _fold_dc(sch, state, ratios, dc_order):
        from .dc import IDENTITY_RATIO, check_dc_ratios, dc_weight_table

        ratios = check_dc_ratios(ratios, sch.timesteps, dc_order)
        weights = dc_weight_table(sch.timesteps, ratios, dc_order)
        steps = np.flatnonzero(ratios != IDENTITY_RATIO)
        for key, per_step in (("pred", 3), ("pc", 9)):
            table = state.host[key]
            for i in steps:  # (orders a step never reaches may hold NaN/inf rows: they stay unusable)
                rows = table[per_step * i:per_step * (i + 1)]  # a view: edits land in the table
                w = weights[i]
                b_m0 = rows[:, B_P].copy()  # the predictor's coefficient on m_i, now on its interpolation
                rows[:, B_P] = b_m0 * w[0]
                rows[:, C_P] = w[0]
                for k in range(1, dc_order + 1):
                    with np.errstate(invalid="ignore", over="ignore"):
                        rows[:, B_H0 + k - 1] += b_m0 * w[k]
                    rows[:, C_H0 + k - 1] = w[k]
        state.aux["dc_steps"] = frozenset(int(i) for i in steps)
        state.aux["dc_order"] = dc_order

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
        dc_steps = state.aux.get("dc_steps", frozenset())
        if state.options.get("dc") is not None:  # DC-Solver keeps dc_order + 1 entries (their buffer_size)
            size = max(c.solver_order, state.options["dc"][1] + 1)
            for buffer in (sch.model_outputs, sch.timestep_list):  # (set_timesteps resets only model_outputs)
                if len(buffer) < size:
                    buffer[:0] = [None] * (size - len(buffer))
        before = list(sch.model_outputs)  # H0 = before[-1], H1 = before[-2], ...
        dc_hist = state.aux["dc_order"] if i in dc_steps else 0
        if dc_hist and any(h is None for h in before[len(before) - dc_hist:]):
            raise ValueError(f"dc_ratios[{i}]: step {i} has fewer than dc_order + 1 = {dc_hist + 1} data predictions "
                             "(e.g. a schedule begun mid-way): use 1.0 there")
        if c.lower_order_final:
            this_order = min(c.solver_order, len(sch.timesteps) - i)
        else:
            this_order = c.solver_order
        this_order = min(this_order, sch.lower_order_nums + 1)
        hist_dtype = converted_dtype(c.prediction_type, c.predict_x0, sample, model_output)
        if use_corrector:
            oc = sch.this_order
            coeffs = state.row("pc", 9 * i + 3 * (oc - 1) + this_order - 1, sample.device)
            history = [before[-1 - k] for k in range(max(oc, this_order - 1, dc_hist))]
            last = sch.last_sample
        else:
            coeffs = state.row("pred", 3 * i + this_order - 1, sample.device)
            history = [before[-1 - k] for k in range(max(this_order - 1, dc_hist))]
            last = None
        prev, x0, corrected = fused_solver_step(
            sample, model_output, coeffs, model_output_cond=cond, guidance_scale=s, guidance_rescale=rescale,
            history=history, last_sample=last, out_dtype=sample.dtype if last is None else last.dtype,
            history_dtype=hist_dtype)
        if last is None:
            corrected = sample
        for j in range(len(sch.model_outputs) - 1):
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
