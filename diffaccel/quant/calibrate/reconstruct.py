"""BRECQ block reconstruction with AdaRound learned rounding and LSQ-learned activation step
sizes, on fake-quantized copies of a block (the user's modules are never touched).

Per layer: weights w -> s * clamp(lo + h(alpha) * step, qmin, qmax), lo the grid value at or below
w/s and step the distance to the next one (1 on the integer grids; on the FP8 grid it grows with the
magnitude), h the rectified sigmoid of AdaRound (zeta=1.1, gamma=-0.1), annealed to hard 0/1 by the
regulariser sum(1 - |2h-1|^beta); activations -> the kernels' static INT8 or FP8 quantizer with a
learned scale (straight-through round),
one scale per calibrated timestep where the method has them, two for a split concat input.
Loss: ||block_q(x) - block_fp(x)||^2 (sum over features, mean over the batch) + lambda * reg.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .collect import _to, progress_bar
from .fakequant import SCALE_FLOOR, WeightGrid, fake_quant_act, lsq_fake_quant_act, per_channel_view
from .structure import output_tensors

ZETA, GAMMA = 1.1, -0.1


def _f32(obj, device):
    """Recorded block inputs on ``device``, floating tensors in fp32 (the unit copy runs in fp32)."""
    obj = _to(obj, device)
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _f32(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_f32(v, device) for v in obj)
    return obj


@dataclass
class LayerInit:
    """Starting point of one layer: weight grid and scale, activation params (None: 16-bit)."""
    grid: WeightGrid | None
    weight_scale: torch.Tensor | None        # [O]
    act_scale: torch.Tensor | None = None    # [T] or [T, 2]
    act_zero_point: torch.Tensor | None = None
    act_split: int | None = None
    weight_q: torch.Tensor | None = None     # fixed weight codes (evaluation of a result)
    act_dtype: str = "int8"                  # "int8" | "fp8_e4m3" (with act_scale)


UNDECIDED = 0.01  # a rounding variable h with UNDECIDED < h < 1 - UNDECIDED was not settled by the regulariser


@dataclass
class LayerResult:
    weight_q: torch.Tensor | None
    act_scale: torch.Tensor | None
    undecided: int = 0   # AdaRound's rounding variables still soft when hardened
    rounding: int = 0    # AdaRound's rounding variables in all


class FakeQuantLayer(nn.Module):
    """A Linear/Conv2d computed with fake-quantized weights (AdaRound) and input (LSQ)."""

    def __init__(self, module: nn.Module, init: LayerInit, ctx: dict, *, adaround: bool, learn_act: bool):
        super().__init__()
        self.module = module
        for p in module.parameters():
            p.requires_grad_(False)
        self.ctx = ctx
        self.init = init
        self.hard = False
        self.adaround = adaround and init.grid is not None
        w = module.weight.detach().float()
        if init.grid is not None:
            s = per_channel_view(init.weight_scale.float().to(w.device), w)
            lo, step = init.grid.floor_step(w / s)
            self.register_buffer("w_scale", s)
            self.register_buffer("w_floor", lo)
            self.register_buffer("w_step", step)
            if self.adaround:
                rest = ((w / s - lo) / step.clamp(min=1e-30)).clamp(1e-4, 1 - 1e-4)
                self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        if init.act_scale is not None:
            # log-parametrised: Adam's steps are then relative changes of the step size
            log_scale = init.act_scale.float().clamp(min=SCALE_FLOOR).log().to(w.device)
            self.act_log_scale = nn.Parameter(log_scale, requires_grad=learn_act)
            self.register_buffer("act_zp", init.act_zero_point.to(torch.int32).clone().to(w.device))

    def __getattr__(self, name):
        # the layer's config (out_channels, kernel_size, in_features...) reads through: SANA-WM's
        # conv block sizes its chunks from inverted_conv.conv.out_channels
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def grid_weight(self) -> torch.Tensor:
        """The weight codes as fp32 grid values: learned up/down choices, fixed codes, or nearest."""
        if self.init.weight_q is not None:
            return self.init.weight_q.to(self.w_floor.device).float().reshape(self.w_floor.shape)
        if self.adaround:
            return self.init.grid.clamp(self.w_floor + (self.alpha >= 0).float() * self.w_step)
        return self.init.grid.nearest(self.module.weight.detach().float() / self.w_scale)

    def weight(self) -> torch.Tensor:
        if self.init.grid is None:
            return self.module.weight
        if self.adaround and not self.hard:
            w = self.init.grid.clamp(self.w_floor + self.h() * self.w_step) * self.w_scale
        else:
            w = self.grid_weight() * self.w_scale
        return w.to(self.module.weight.dtype)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.init.act_scale is None:
            return x
        t = self.ctx["t"] if self.act_log_scale.shape[0] > 1 else 0
        scale = self.act_log_scale[t].exp()
        zp = self.act_zp[t]
        fq = lsq_fake_quant_act if self.act_log_scale.requires_grad and not self.hard else fake_quant_act
        dt = self.init.act_dtype
        if self.init.act_split is None:
            return fq(x, scale, zp, dt)
        c = self.init.act_split
        return torch.cat([fq(x[:, :c], scale[0], zp[0], dt), fq(x[:, c:], scale[1], zp[1], dt)], dim=1)

    def forward(self, input):  # (torch's parameter name: callers pass input=)
        x = self.quantize_input(input)
        m = self.module
        if isinstance(m, nn.Conv2d):
            return F.conv2d(x, self.weight(), m.bias, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, self.weight(), m.bias)


def wrap_layers(unit: nn.Module, inits: dict[str, LayerInit], ctx: dict, *, adaround: bool,
                learn_act: bool) -> dict[str, FakeQuantLayer]:
    """Swap the named (relative) layers of ``unit`` for FakeQuantLayers, in place (``unit`` is a copy)."""
    wrapped = {}
    for rel, init in inits.items():
        parent_name, _, child = rel.rpartition(".")
        parent = unit.get_submodule(parent_name) if parent_name else unit
        fq = FakeQuantLayer(getattr(parent, child), init, ctx, adaround=adaround, learn_act=learn_act)
        setattr(parent, child, fq)
        wrapped[rel] = fq
    return wrapped


def unit_error(unit: nn.Module, io: list, inits: dict[str, LayerInit], *, device) -> float:
    """Mean squared error of ``unit`` with hard-quantized layers (nearest rounding unless an init
    fixes its integer weights) against the recorded full-precision outputs."""
    work = copy.deepcopy(unit).to(device).float()
    work.eval()
    ctx = {"t": 0}
    for layer in wrap_layers(work, inits, ctx, adaround=False, learn_act=False).values():
        layer.hard = True
    total = 0.0
    with torch.no_grad():
        for args, kwargs, out, t in io:
            ctx["t"] = t
            ys = output_tensors(work(*_f32(args, device), **_f32(kwargs, device)))
            total += sum((y.float() - r.to(device).float()).pow(2).sum().item()
                         for y, r in zip(ys, output_tensors(out)))
    return total / max(len(io), 1)


def reconstruct(unit: nn.Module, io: list, inits: dict[str, LayerInit], *, iters: int, device,
                seed: int, adaround: bool = True, learn_act: bool = True, weight_lr: float = 1e-2,
                act_lr: float = 5e-3, reg_lambda: float = 0.01, warmup: float = 0.2,
                beta_range: tuple[float, float] = (20.0, 2.0), desc: str = "", progress: bool = False
                ) -> dict[str, LayerResult]:
    """Reconstruct ``unit`` (a module the caller owns: it is copied) from its recorded full-precision
    (args, kwargs, output, t_index) ``io``; returns the learned integer weights and act scales."""
    work = copy.deepcopy(unit).to(device).float()
    work.eval()
    ctx = {"t": 0}
    layers = wrap_layers(work, inits, ctx, adaround=adaround, learn_act=learn_act)
    alphas = [l.alpha for l in layers.values() if l.adaround]
    scales = [l.act_log_scale for l in layers.values() if l.init.act_scale is not None and learn_act]
    groups = []
    if alphas:
        groups.append({"params": alphas, "lr": weight_lr})
    if scales:
        groups.append({"params": scales, "lr": act_lr})
    if groups and iters > 0 and io:
        opt = torch.optim.Adam(groups)
        gen = torch.Generator().manual_seed(seed)
        for it in progress_bar(range(iters), desc=desc, enabled=progress):
            args, kwargs, out, t = io[int(torch.randint(len(io), (1,), generator=gen))]
            ctx["t"] = t
            with torch.enable_grad():
                ys = output_tensors(work(*_f32(args, device), **_f32(kwargs, device)))
                targets = output_tensors(out)
                loss = sum((y.float() - t.to(device).float()).pow(2).reshape(y.shape[0], -1).sum(1).mean()
                           for y, t in zip(ys, targets))
                if alphas and it >= warmup * iters:
                    progress_frac = (it - warmup * iters) / max((1 - warmup) * iters, 1)
                    beta = beta_range[1] + 0.5 * (beta_range[0] - beta_range[1]) * (1 + math.cos(math.pi * progress_frac))
                    loss = loss + reg_lambda * sum(l.regulariser(beta) for l in layers.values() if l.adaround)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    results = {}
    with torch.no_grad():
        for rel, l in layers.items():
            l.hard = True
            wq = l.init.grid.codes(l.grid_weight()).cpu() if l.init.grid is not None else None
            act = (l.act_log_scale.detach().float().exp().cpu().clamp(min=SCALE_FLOOR)
                   if l.init.act_scale is not None else None)
            undecided = rounding = 0
            if l.adaround:
                h = l.h()
                undecided = int(((h > UNDECIDED) & (h < 1 - UNDECIDED)).sum())
                rounding = h.numel()
            results[rel] = LayerResult(wq, act, undecided, rounding)
    return results
