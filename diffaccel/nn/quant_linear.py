"""QuantLinear: an nn.Linear whose weight is stored packed (int8, int4, fp8, fp4) and whose
forward runs the quantized GEMMs of ``diffaccel.ops.gemm``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from diffaccel.quant.formats import QuantSpec, resolve_spec

from . import _codes
from ._base import (QuantLayerBase, _float_tensor, check_float_weight, check_weight_source, own_forward_reason,
                    reason_for_shape)


class QuantLinear(QuantLayerBase):
    # a diffaccel.nn.shared_input.SharedInputGroup when siblings share one quantization of their input
    shared_input = None

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, original_dtype: torch.dtype):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._init_common(spec, out_features, in_features, original_dtype)

    @classmethod
    def from_float(cls, linear: nn.Linear, spec, *, weight: Optional[torch.Tensor] = None,
                   act_scale: Optional[torch.Tensor] = None, act_zero_point: Optional[torch.Tensor] = None,
                   smooth: Optional[torch.Tensor] = None, weight_q: Optional[torch.Tensor] = None,
                   weight_scale: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Quantize ``linear`` with ``spec`` (a QuantSpec or preset name). ``weight`` replaces the float
        weight to quantize (e.g. AdaRound-rounded); ``weight_q``/``weight_scale`` give codes directly.
        ``act_scale``/``act_zero_point`` [T]: static activation parameters, one set per timestep set.
        ``smooth`` [in_features]: SmoothQuant factors (weights * s, activations / s)."""
        spec = resolve_spec(spec)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        why = own_forward_reason(linear, nn.Linear)
        if why:
            raise TypeError(f"linear: {why}; leave it in floating point")
        check_weight_source(weight, weight_q, weight_scale)
        w0 = check_float_weight(linear)  # (first: a lazy layer's shape is not known yet)
        why = quantize_linear_reason(linear, spec)
        if why:
            raise ValueError(f"linear: cannot quantize with {spec}: {why}")
        N, K = linear.out_features, linear.in_features
        if weight is not None:
            w0 = _float_tensor("weight", weight, (N, K))
        smooth_k = None
        if smooth is not None:
            from ._base import _positive

            smooth_k = _positive("smooth", _float_tensor("smooth", smooth, (K,)))
        mod = cls(K, N, spec, linear.weight.dtype)
        with torch.no_grad():
            codes = mod._build_weight(w0.detach(), weight_q, weight_scale, smooth_k)
            mod._build_act(codes, act_scale, act_zero_point, None, smooth_k, w0.device)
            mod._set_bias(linear.bias)
        return mod

    def input_grad(self, grad: torch.Tensor, x_shape) -> torch.Tensor:
        """d loss / d x of the float layer the codes stand for: ``grad @ dequantized_weight()``."""
        return grad @ self.dequantized_weight().to(grad.dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features}, got shape {tuple(x.shape)}")
        if self.takes_shared_codes:  # codes a fused norm attached to x (diffaccel.nn._codes)
            pre = _codes.attached(x, self.spec.act_dtype)
            if pre is not None:
                return self.forward_quantized(*pre).reshape(*x.shape[:-1], self.out_features)
        if self.shared_input is not None:
            y = self.shared_input.forward(self, x)
            if y is not None:
                return y
        lead = x.shape[:-1]
        y = self._gemm(x.reshape(-1, self.in_features))
        return y.reshape(*lead, self.out_features)

    @property
    def takes_shared_codes(self) -> bool:
        """True when this layer's own activation quantizer is the shared one (dynamic per-token int8 or
        fp8, no SmoothQuant vector), so codes computed once for its input are the ones it would compute."""
        s = self.spec
        return s.act_dtype in _codes.CODE_DTYPES and s.act_mode == "dynamic" and self.smooth is None

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 [out_features, in_features]: the weight this layer computes with (smoothing undone)."""
        return self._dequantized_weight_2d()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self._spec_repr()}")


def quantize_linear_reason(linear: nn.Linear, spec: QuantSpec) -> Optional[str]:
    return reason_for_shape(spec, linear.out_features, linear.in_features)
