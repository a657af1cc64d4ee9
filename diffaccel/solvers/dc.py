"""DC-Solver's dynamic compensation for UniPC's predictor-corrector path.

Zhao et al., "DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic
Compensation", ECCV 2024. Followed: github.com/wl-zhao/DC-Solver,
``diffusers/src/diffusers/schedulers/scheduling_dcsolver_multistep.py`` (``dynamic_compensation``,
``_step``, ``find_optim_ratio``, ``_step_search``).

UniPC's predictor at step i uses the data prediction m_i evaluated at the *uncorrected* sample,
while the step starts from the corrected one. DC-Solver replaces m_i, after the corrector and
before the predictor, by the Lagrange interpolation of the last ``dc_order + 1`` data
predictions over their timesteps, evaluated at

    t* = rho_i (t_i - t_{i-1}) + t_{i-1}          (rho_i = 1: t* = t_i, no compensation)

and stores the compensated value in the history in place of m_i (the next corrector, the next
predictors and the next compensations all read it). As in their code: the interpolation runs
in the scheduler's timestep domain (diffusers' ``timestep_list``), ``dc_order`` defaults to 2
(three nodes, at most four), a ratio of exactly 1.0 skips the compensation, and the ratios of the
first ``dc_order`` steps must be 1.0 (too few predictions to interpolate; their search leaves
them at 1.0 and their sampler would fail otherwise).

The compensation is linear in the history with per-step scalar weights, so the fused step folds
it into the coefficient row it already reads (``diffaccel.solvers.unipc``): still one kernel per
step, no host sync. ``DCUniPCReference`` is the plain torch sampler (differentiable in the
ratios) the fused path is tested against and ``fit_dc_ratios`` optimises with.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from ..ops._checks import plain_number
from ._base import _f64, alpha_sigma_lambda
from .unipc import UniPCMultistep, _unipc_rb

DEFAULT_DC_ORDER = 2
IDENTITY_RATIO = 1.0  # t* = t_i: the interpolation returns m_i itself; DC-Solver skips the step
MAX_DC_ORDER = 3  # their code caps the interpolation at 4 nodes; the fused step has 3 history slots


# -- validation -----------------------------------------------------------------------------

def check_dc_order(dc_order) -> int:
    if isinstance(dc_order, bool) or not isinstance(dc_order, (int, np.integer)) or not 1 <= dc_order <= MAX_DC_ORDER:
        raise ValueError(f"dc_order: expected an int in 1..{MAX_DC_ORDER} (interpolation over dc_order + 1 data "
                         f"predictions), got {dc_order!r}")
    return int(dc_order)


def as_dc_ratios(dc_ratios) -> np.ndarray:
    """The ratios as a float64 vector; finite, one-dimensional (length is checked against a schedule later)."""
    if isinstance(dc_ratios, torch.Tensor):
        if dc_ratios.dtype == torch.bool:
            raise TypeError("dc_ratios: expected float ratios, got a bool tensor")
        arr = dc_ratios.detach().to("cpu", torch.float64).numpy()
    else:
        if not isinstance(dc_ratios, np.ndarray) and any(isinstance(r, (bool, np.bool_)) for r in
                                                         (dc_ratios if isinstance(dc_ratios, (list, tuple)) else ())):
            raise TypeError(f"dc_ratios: expected float ratios, got bools ({list(dc_ratios)[:4]})")
        try:
            arr = np.asarray(dc_ratios, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"dc_ratios: expected a sequence of floats or a 1-D tensor, got {type(dc_ratios).__name__}"
                            f" ({e})") from None
    if arr.ndim != 1:
        raise ValueError(f"dc_ratios: expected one ratio per step (1-D), got shape {tuple(arr.shape)}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"dc_ratios: expected finite ratios, dc_ratios[{bad[0]}] = {arr[bad[0]]}")
    return arr.copy()


def check_dc_ratios(dc_ratios, timesteps, dc_order: int) -> np.ndarray:
    """Validate ratios against a schedule (``timesteps``: the scheduler's, one per step)."""
    arr = as_dc_ratios(dc_ratios)
    dc_order = check_dc_order(dc_order)
    ts = _f64(timesteps)
    if len(arr) != len(ts):
        raise ValueError(f"dc_ratios: expected {len(ts)} ratios (one per step of the current schedule), got "
                         f"{len(arr)}")
    for i in np.flatnonzero(arr != IDENTITY_RATIO):
        if i < dc_order:
            raise ValueError(f"dc_ratios[{i}]: must be {IDENTITY_RATIO} (no compensation): step {i} has {i + 1} data "
                             f"prediction(s), the interpolation needs dc_order + 1 = {dc_order + 1}")
        nodes = ts[i - dc_order:i + 1]
        if len(np.unique(nodes)) != len(nodes):
            raise ValueError(f"dc_ratios[{i}]: the interpolation nodes (timesteps {nodes[::-1].tolist()}) coincide; "
                             "compensation is undefined there, use 1.0")
    return arr


# -- the interpolation weights ----------------------------------------------------------------

def dc_weights(timesteps, index: int, ratio, dc_order: int):
    """Lagrange weights on (m_i, m_{i-1}, ..., m_{i-dc_order}) at t* = ratio (t_i - t_{i-1}) + t_{i-1}.

    ``ratio`` may be a float (host tables) or a tensor (gradients for the fit); the weights are of
    the same kind. Their ``dynamic_compensation`` computes the same products in the same order."""
    ts = [float(t) for t in _f64(timesteps)[index - dc_order:index + 1][::-1]]  # newest first
    t_star = ratio * (ts[0] - ts[1]) + ts[1]
    weights = []
    for a in range(dc_order + 1):
        w = 1.0
        for b in range(dc_order + 1):
            if a != b:
                w = w * ((t_star - ts[b]) / (ts[a] - ts[b]))
        weights.append(w)
    return weights


def dc_weight_table(timesteps, dc_ratios: np.ndarray, dc_order: int) -> np.ndarray:
    """[steps, dc_order + 1] float64 weights; identity rows (1, 0, ...) where the ratio is 1.0."""
    table = np.zeros((len(dc_ratios), dc_order + 1))
    table[:, 0] = 1.0
    for i, r in enumerate(dc_ratios):
        if r != IDENTITY_RATIO:
            table[i] = dc_weights(timesteps, i, float(r), dc_order)
    return table


def dc_unsupported_reason(scheduler) -> Optional[str]:
    name = type(scheduler).__name__
    if name != UniPCMultistep.name or type(scheduler).__module__.split(".")[0] != "diffusers":
        return (f"{name} has no predictor-corrector step to compensate (DC-Solver: diffusers' "
                f"{UniPCMultistep.name} only)")
    why = UniPCMultistep().unsupported(scheduler)
    return None if why is None else f"{UniPCMultistep.name} with {why}"


# -- the torch reference sampler ----------------------------------------------------------------

class DCUniPCReference:
    """DC-UniPC in plain torch: diffusers' UniPC step (bh1/bh2, data or noise prediction, its warm-up
    and ``lower_order_final``, ``disable_corrector``) with DC-Solver's compensation between the
    corrector and the predictor. Scalars are float64 on the host from the scheduler's own sigmas
    and timesteps (call ``set_timesteps`` on it first); tensors stay in the caller's dtype, and a
    ratio given as a tensor keeps the step differentiable in it.
    """

    def __init__(self, scheduler, dc_ratios=None, dc_order: int = DEFAULT_DC_ORDER):
        why = dc_unsupported_reason(scheduler)
        if why is not None:
            raise ValueError(f"scheduler: {why}")
        if getattr(scheduler, "num_inference_steps", None) is None:
            raise ValueError("scheduler: call set_timesteps(...) before building DCUniPCReference")
        c = scheduler.config
        self.config = c
        self.dc_order = check_dc_order(dc_order)
        sig, self.alpha, self.sigt, self.lam = alpha_sigma_lambda(scheduler.sigmas, c.use_flow_sigmas)
        self.sig = sig
        self.timesteps = _f64(scheduler.timesteps)
        self.num_steps = len(self.timesteps)
        self.disable_corrector = list(scheduler.disable_corrector)
        self.ratios = (np.full(self.num_steps, IDENTITY_RATIO) if dc_ratios is None
                       else check_dc_ratios(dc_ratios, self.timesteps, self.dc_order))
        self.buffer_size = max(c.solver_order, self.dc_order + 1)
        self.reset()

    def reset(self) -> None:
        self.index = 0
        self.outputs: list = []  # converted model outputs (compensated where DC applied), newest last
        self.last_sample = None
        self.this_order = None
        self.lower_order_nums = 0

    def snapshot(self):
        return (self.index, list(self.outputs), self.last_sample, self.this_order, self.lower_order_nums)

    def restore(self, snap) -> None:
        self.index, outputs, self.last_sample, self.this_order, self.lower_order_nums = snap
        self.outputs = list(outputs)

    # diffusers' convert_model_output
    def convert(self, model_output, sample, i):
        c, a, s = self.config, self.alpha[i], self.sigt[i]
        if c.predict_x0:
            if c.prediction_type == "epsilon":
                return (sample - s * model_output) / a
            if c.prediction_type == "sample":
                return model_output
            if c.prediction_type == "v_prediction":
                return a * sample - s * model_output
            return sample - self.sig[i] * model_output  # flow_prediction
        if c.prediction_type == "epsilon":
            return model_output
        if c.prediction_type == "sample":
            return (sample - a * model_output) / s
        return a * model_output + s * sample  # v_prediction

    def _rb(self, order, rks, h):
        hh = -h if self.config.predict_x0 else h
        with np.errstate(divide="ignore", invalid="ignore"):  # h = 0 (a repeated final sigma): order 1, unused
            return _unipc_rb(order, np.array(rks, dtype=np.float64), hh, self.config.solver_type)

    def _base(self, t, s0, x, m0, h_phi_1):
        if self.config.predict_x0:
            return self.sigt[t] / self.sigt[s0] * x - self.alpha[t] * h_phi_1 * m0, self.alpha[t]
        return self.alpha[t] / self.alpha[s0] * x - self.sigt[t] * h_phi_1 * m0, self.sigt[t]

    # diffusers' multistep_uni_p_bh_update
    def predictor(self, x, order):
        i = self.index
        m0 = self.outputs[-1]
        h = self.lam[i + 1] - self.lam[i]
        rks, d1s = [], []
        for k in range(1, order):
            rk = (self.lam[i - k] - self.lam[i]) / h
            rks.append(rk)
            d1s.append((self.outputs[-(k + 1)] - m0) / rk)
        R, b, h_phi_1, B_h = self._rb(order, rks + [1.0], h)
        x_t_, amp = self._base(i + 1, i, x, m0, h_phi_1)
        if not d1s:
            return x_t_.to(x.dtype)
        rhos = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
        res = sum(float(r) * d for r, d in zip(rhos, d1s))
        return (x_t_ - amp * B_h * res).to(x.dtype)

    # diffusers' multistep_uni_c_bh_update (history not yet shifted: outputs[-1] is step i-1's)
    def corrector(self, model_t, last, order):
        i = self.index
        m0 = self.outputs[-1]
        h = self.lam[i] - self.lam[i - 1]
        rks, d1s = [], []
        for k in range(1, order):
            rk = (self.lam[i - 1 - k] - self.lam[i - 1]) / h
            rks.append(rk)
            d1s.append((self.outputs[-(k + 1)] - m0) / rk)
        R, b, h_phi_1, B_h = self._rb(order, rks + [1.0], h)
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
        x_t_, amp = self._base(i, i - 1, last, m0, h_phi_1)
        res = sum(float(r) * d for r, d in zip(rhos[:-1], d1s)) + float(rhos[-1]) * (model_t - m0)
        return (x_t_ - amp * B_h * res).to(last.dtype)

    def correct_and_push(self, model_output, sample):
        """The first half of a step: corrector, history shift, order bookkeeping. Returns the corrected sample."""
        i, c = self.index, self.config
        if i >= self.num_steps:
            raise ValueError(f"step: all {self.num_steps} steps are done; call reset()")
        m = self.convert(model_output, sample, i)
        if i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None:
            sample = self.corrector(m, self.last_sample, self.this_order)
        self.outputs = (self.outputs + [m])[-self.buffer_size:]
        order = min(c.solver_order, self.num_steps - i) if c.lower_order_final else c.solver_order
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = sample
        return sample

    def compensate(self, ratio) -> None:
        """DC-Solver's dynamic_compensation: replace the newest history entry (a no-op for exactly 1.0)."""
        if isinstance(ratio, (float, int, np.floating)) and float(ratio) == IDENTITY_RATIO:
            return
        i, n = self.index, self.dc_order + 1
        if len(self.outputs) < n:
            raise ValueError(f"dc_ratios[{i}]: step {i} has {len(self.outputs)} data prediction(s); compensation "
                             f"needs dc_order + 1 = {n}")
        w = dc_weights(self.timesteps, i, ratio, self.dc_order)
        self.outputs[-1] = sum(w[k] * self.outputs[-(k + 1)] for k in range(n))

    def predict_and_advance(self, sample):
        prev = self.predictor(sample, self.this_order)
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self.index += 1
        return prev

    def step(self, model_output, sample, ratio=None):
        """One DC-UniPC step from the model output at ``sample``; ``ratio`` overrides this step's ratio."""
        ratio = self.ratios[self.index] if ratio is None and self.index < self.num_steps else ratio
        sample = self.correct_and_push(model_output, sample)
        self.compensate(ratio)
        return self.predict_and_advance(sample)


# -- fitting the ratios -------------------------------------------------------------------------

def _reference_states(ref, model_fn, latents):
    x = latents
    states = [x]
    with torch.no_grad():
        for t in ref.timesteps:
            x = ref.step(model_fn(x, t), t, x).prev_sample
            states.append(x)
    return _f64(ref.sigmas), states


def _target_at(sigma, ref_sigmas, ref_states):
    """The reference state at noise level ``sigma``: exact where the grids share the node, else
    linear in sigma between the two neighbours (their code takes the nearest from above)."""
    j = int(np.argmin(np.abs(ref_sigmas - sigma)))
    if abs(ref_sigmas[j] - sigma) <= 1e-6 * max(abs(sigma), 1e-12):
        return ref_states[j]
    hi = int(np.flatnonzero(ref_sigmas >= sigma).max())
    lo = min(hi + 1, len(ref_sigmas) - 1)
    w = (ref_sigmas[hi] - sigma) / (ref_sigmas[hi] - ref_sigmas[lo])
    return ref_states[hi] + float(w) * (ref_states[lo] - ref_states[hi])


def _checked_model_fn(model_fn: Callable) -> Callable:
    """``model_fn`` that raises when its output is not a floating-point tensor of the sample's shape
    (a wrong batch would broadcast silently through the solver's arithmetic)."""
    def checked(sample, timestep):
        out = model_fn(sample, timestep)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.shape != sample.shape:
            got = (f"shape {tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__)
            raise ValueError(f"model_fn: expected a floating-point tensor of the sample's shape "
                             f"{tuple(sample.shape)}, got {got}")
        return out
    return checked


def fit_dc_ratios(scheduler, model_fn: Callable, latents: torch.Tensor, num_inference_steps: int, *,
                  reference_steps: Optional[int] = None, dc_order: int = DEFAULT_DC_ORDER, num_iters: int = 20,
                  lr: float = 0.1, ratio_init: float = IDENTITY_RATIO, mu: Optional[float] = None,
                  progress: bool = True) -> list:
    """Fit DC-Solver's compensation ratios for ``num_inference_steps`` steps of ``scheduler``'s config.

    Their search (``_step_search`` / ``find_optim_ratio``), step by step along the few-step
    trajectory: for step i >= ``dc_order``, with the ratio as a parameter (initialised to
    ``ratio_init``), compensate, run the predictor, evaluate the model at the new sample and run
    the next corrector, and minimise the MSE to the reference state at that noise level with
    AdamW (``lr``, ``num_iters`` iterations); then take the step with the fitted ratio and go on.
    The reference is the same scheduler config run for ``reference_steps`` steps (default: the
    smallest multiple of ``num_inference_steps`` >= 200, their reference length, so that
    linspace/trailing grids nest).

    ``model_fn(sample, timestep) -> model_output`` is what ``scheduler.step`` receives (guidance
    applied); gradients flow through it when it is differentiable. ``latents``: the initial noisy
    samples (a small batch: the loss averages over it). Deterministic given its inputs; the
    scheduler passed in is not modified. Returns one float per step (1.0 for the first ``dc_order``,
    and where the step's interpolation timesteps coincide: Karras sigmas round to repeated
    timesteps at the end of long schedules, and compensation is undefined there). ``mu``: the
    dynamic-shifting parameter both schedules are set with (``use_dynamic_shifting`` flow configs).

    The solver arithmetic, the reference trajectory and the loss run in float32 (at least): the
    model sees samples in ``latents``' dtype and its output is promoted back, so a half-precision
    model can be fitted without fitting to half-precision rounding noise.
    Deviation from their code: the target for the state after the last-but-one step is the reference
    state at that step's noise level (their index picks the final sample there).
    """
    why = dc_unsupported_reason(scheduler)
    if why is not None:
        raise ValueError(f"scheduler: {why}")
    dc_order = check_dc_order(dc_order)
    num_inference_steps, reference_steps, num_iters, lr, ratio_init, mu = map(
        plain_number, (num_inference_steps, reference_steps, num_iters, lr, ratio_init, mu))
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps: expected a positive int, got {num_inference_steps!r}")
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        raise TypeError(f"latents: expected a floating-point torch.Tensor, got {type(latents).__name__}"
                        + (f" of {latents.dtype}" if isinstance(latents, torch.Tensor) else ""))
    if latents.dim() < 1 or latents.numel() == 0:
        raise ValueError(f"latents: expected a non-empty batch of samples [B, ...], got shape {tuple(latents.shape)}")
    if reference_steps is None:
        reference_steps = num_inference_steps * math.ceil(200 / num_inference_steps)
    if isinstance(reference_steps, bool) or not isinstance(reference_steps, int) or \
            reference_steps <= num_inference_steps:
        raise ValueError(f"reference_steps: expected an int > num_inference_steps ({num_inference_steps}), got "
                         f"{reference_steps!r}")
    for name, v in (("num_iters", num_iters),):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    for name, v in (("lr", lr), ("ratio_init", ratio_init)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (name == "lr" and v <= 0):
            raise ValueError(f"{name}: expected a finite{' positive' if name == 'lr' else ''} float, got {v!r}")
    if not callable(model_fn):
        raise TypeError(f"model_fn: expected a callable (sample, timestep) -> model_output, got "
                        f"{type(model_fn).__name__}")
    if mu is not None and (isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu)):
        raise ValueError(f"mu: expected a finite float or None, got {mu!r}")
    checked = _checked_model_fn(model_fn)
    model_dtype = latents.dtype
    work_dtype = torch.promote_types(latents.dtype, torch.float32)

    def model_fn(sample, timestep):  # the model in its own dtype, the solver's arithmetic in work_dtype
        return checked(sample.to(model_dtype), timestep).to(work_dtype)

    latents = latents.to(work_dtype)
    schedule = {} if mu is None else {"mu": float(mu)}
    few = type(scheduler).from_config(scheduler.config)
    few.set_timesteps(num_inference_steps, device=latents.device, **schedule)
    ref = type(scheduler).from_config(scheduler.config)
    # the reference runs the fused step: it equals diffusers' except where diffusers ends in NaN
    # (bh1 down to a zero final sigma, README), which would leave the last steps without a target
    from ._patch import patch_scheduler
    patch_scheduler(ref)
    ref.set_timesteps(reference_steps, device=latents.device, **schedule)
    few_sigmas = _f64(few.sigmas)
    first = _f64(ref.sigmas)[0]
    if abs(first - few_sigmas[0]) > 1e-6 * abs(few_sigmas[0]):  # (checked before the reference's model calls)
        raise ValueError(f"reference_steps: the {reference_steps}-step schedule starts at sigma {first:.6g}, "
                         f"the {num_inference_steps}-step one at {few_sigmas[0]:.6g} (timestep_spacing="
                         f"{scheduler.config.timestep_spacing!r}); the same latents cannot start both. With "
                         f"'leading' spacing (SD1.5 / SDXL configs) the step counts start at different "
                         f"timesteps: sample (and fit) with timestep_spacing='trailing', e.g. pipe.scheduler = "
                         f"UniPCMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing='trailing')")
    ref_sigmas, ref_states = _reference_states(ref, model_fn, latents)

    bad = [j for j, st in enumerate(ref_states) if not bool(torch.isfinite(st).all())]
    if bad:
        raise ValueError(f"reference_steps: the {reference_steps}-step reference trajectory is not finite from state "
                         f"{bad[0]} on (model_fn returned NaN/inf, or the solver overflowed)")
    from tqdm.auto import tqdm

    sampler = DCUniPCReference(few, None, dc_order)
    ratios = [IDENTITY_RATIO] * num_inference_steps
    x = latents
    ts = few.timesteps
    ts64 = _f64(ts)
    bar = tqdm(range(num_inference_steps), desc="fit_dc_ratios", disable=not progress)
    for i in bar:
        with torch.no_grad():
            x = sampler.correct_and_push(model_fn(x, ts[i]), x)
        if i >= dc_order and len(np.unique(ts64[i - dc_order:i + 1])) == dc_order + 1:
            target = _target_at(few_sigmas[i + 1], ref_sigmas, ref_states)
            snap = sampler.snapshot()
            param = torch.nn.Parameter(torch.tensor(float(ratio_init), dtype=torch.float64, device=latents.device))
            opt = torch.optim.AdamW([param], lr=lr)
            loss = None
            for _ in range(num_iters):
                opt.zero_grad()
                with torch.enable_grad():
                    sampler.restore(snap)
                    sampler.compensate(param)
                    nxt = sampler.predict_and_advance(x)
                    if sampler.index < num_inference_steps and (sampler.index - 1) not in sampler.disable_corrector:
                        out = model_fn(nxt, ts[sampler.index])
                        m = sampler.convert(out, nxt, sampler.index)
                        nxt = sampler.corrector(m, sampler.last_sample, sampler.this_order)
                    loss = torch.nn.functional.mse_loss(nxt, target)
                    loss.backward()
                if not (torch.isfinite(loss) and torch.isfinite(param.grad)):
                    raise ValueError(f"fit_dc_ratios: step {i}: the loss or its gradient is not finite at ratio "
                                     f"{float(param.detach()):.6g} (lr={lr} too large, or model_fn returns NaN/inf)")
                opt.step()
            sampler.restore(snap)
            ratios[i] = float(param.detach())
            bar.set_postfix(step=i, ratio=f"{ratios[i]:.4f}", loss=f"{loss.item():.3g}")
        with torch.no_grad():
            sampler.compensate(ratios[i])
            x = sampler.predict_and_advance(x)
    return ratios


# -- cascade polynomial regression (ratios for unseen step counts / guidance scales) -------------

CPR_CFG_SCALE, CPR_NFE_SCALE = 12.0, 50.0  # their normalisations: CFG / 12, NFE / 50, step / NFE
CPR_FIRST_STEP = 3  # 1-based: their predictor leaves steps 1 and 2 at 1.0 (dc_order 2)


def _cpr_features(guidance_scale, nfe, step, num_terms):
    """Row of the linear map coefficients[i, j, k] -> ratio: x^i * cfg^(2-j) * nfe^(2-k) (their f1(f2(...)))."""
    cfg, x, n = guidance_scale / CPR_CFG_SCALE, step / nfe, nfe / CPR_NFE_SCALE
    return np.array([x**i * cfg**(2 - j) * n**(2 - k) for i in range(num_terms) for j in range(3) for k in range(3)])


def _real_array(value, name: str, expected: str) -> np.ndarray:
    """``value`` as a float64 array when it holds real numbers (ints or floats: no bools, complex,
    strings or objects), else a TypeError naming ``name``."""
    if isinstance(value, torch.Tensor):
        arr = value.detach().cpu().numpy() if value.dtype != torch.bfloat16 else value.detach().float().cpu().numpy()
    else:
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name}: expected {expected}, got {type(value).__name__} ({e})") from None
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}"
                        + (f" of {arr.dtype}" if arr.dtype.kind != "O" or arr.ndim else ""))
    return arr.astype(np.float64)


def _as_cpr_coeffs(cpr_coeffs) -> np.ndarray:
    arr = _real_array(cpr_coeffs, "cpr_coeffs", "real coefficients [K, 3, 3] (an array, tensor or nested list)")
    if arr.ndim not in (1, 3) or (arr.ndim == 3 and arr.shape[1:] != (3, 3)):
        raise ValueError(f"cpr_coeffs: expected shape [K, 3, 3] (or those K * 9 numbers flat), got shape "
                         f"{tuple(arr.shape)}")
    arr = arr.reshape(-1)
    if arr.size == 0 or arr.size % 9 or not np.isfinite(arr).all():
        raise ValueError(f"cpr_coeffs: expected finite coefficients, a multiple of 9 of them ([K, 3, 3]), got "
                         f"{arr.size}" + ("" if np.isfinite(arr).all() else " with NaN/inf"))
    return arr.reshape(-1, 3, 3)


def predict_dc_ratios(cpr_coeffs, guidance_scale: float, num_inference_steps: int) -> list:
    """DC-Solver's cascade polynomial regression (their ``cascade_polynomial_regression``): ratios for
    ``num_inference_steps`` steps at ``guidance_scale`` from coefficients [K, 3, 3] (their ``.npy``
    files, or ``fit_cascade_polynomial``). The ratio of 1-based step s >= 3 is a degree K-1
    polynomial in s / NFE whose coefficients are quadratics in CFG / 12 whose coefficients are
    quadratics in NFE / 50; steps 1 and 2 get 1.0."""
    coeffs = _as_cpr_coeffs(cpr_coeffs)
    num_inference_steps, guidance_scale = plain_number(num_inference_steps), plain_number(guidance_scale)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps: expected a positive int, got {num_inference_steps!r}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or \
            not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale: expected a finite float, got {guidance_scale!r}")
    flat = coeffs.reshape(-1)
    return [IDENTITY_RATIO if step < CPR_FIRST_STEP else
            float(_cpr_features(float(guidance_scale), num_inference_steps, step, len(coeffs)) @ flat)
            for step in range(1, num_inference_steps + 1)]


def fit_cascade_polynomial(fitted_ratios, num_terms: int = 3) -> np.ndarray:
    """Least-squares coefficients [num_terms, 3, 3] for ``predict_dc_ratios`` from ratios fitted at
    several settings: ``fitted_ratios`` maps ``(guidance_scale, num_inference_steps)`` to that
    setting's ratios (e.g. from ``fit_dc_ratios``). The model is linear in its coefficients, so this
    is the exact least-squares optimum their curve fit approaches; use at least three guidance scales
    and three step counts (fewer leave the quadratics undetermined: ValueError)."""
    num_terms = plain_number(num_terms)
    if isinstance(num_terms, bool) or not isinstance(num_terms, int) or num_terms < 1:
        raise ValueError(f"num_terms: expected a positive int, got {num_terms!r}")
    if not hasattr(fitted_ratios, "items"):
        raise TypeError(f"fitted_ratios: expected a mapping {{(guidance_scale, num_inference_steps): ratios}}, got "
                        f"{type(fitted_ratios).__name__}")
    rows, values = [], []
    for key, ratios in fitted_ratios.items():
        cfg, nfe = (plain_number(k) for k in key) if isinstance(key, tuple) and len(key) == 2 else (None, None)
        if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or \
                isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"fitted_ratios: expected keys (guidance_scale: a finite float, num_inference_steps: a "
                             f"positive int), got {key!r}")
        cfg = float(cfg)
        try:
            r = as_dc_ratios(ratios)
        except (TypeError, ValueError) as e:
            msg = str(e).replace('dc_ratios: ', '').replace('dc_ratios', 'ratios')
            raise type(e)(f"fitted_ratios[{key!r}]: {msg}") from None
        if len(r) != nfe:
            raise ValueError(f"fitted_ratios[{key!r}]: expected {nfe!r} ratios (one per step), got {len(r)}")
        for step in range(CPR_FIRST_STEP, int(nfe) + 1):
            rows.append(_cpr_features(cfg, int(nfe), step, num_terms))
            values.append(r[step - 1])
    if not rows:
        raise ValueError(f"fitted_ratios: no step >= {CPR_FIRST_STEP} to fit")
    a = np.stack(rows)
    if np.linalg.matrix_rank(a) < a.shape[1]:
        raise ValueError(f"fitted_ratios: {len(rows)} ratios from {len(fitted_ratios)} settings do not determine "
                         f"the {a.shape[1]} coefficients (use >= 3 guidance scales, >= 3 step counts and enough steps "
                         "per setting, or fewer num_terms)")
    coeffs, *_ = np.linalg.lstsq(a, np.array(values), rcond=None)
    return coeffs.reshape(num_terms, 3, 3)


__all__ = ["DCUniPCReference", "DEFAULT_DC_ORDER", "IDENTITY_RATIO", "check_dc_ratios", "dc_weights",
           "dc_weight_table", "fit_cascade_polynomial", "fit_dc_ratios", "predict_dc_ratios"]
