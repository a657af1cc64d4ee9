"""Quantized GEMM ops: W8A8 / W4A8 with int8 activations, FP8 W8A8, weight-only W4A16/W8A16,
and the activation quantizers that feed them (smoothing division folded in).

Layouts: activations [M, K]; weights [N, K] (int8, float8_e4m3fn, or int4 packed two per
byte as uint8 [N, K // 2] with the low nibble holding the even k); out [M, N].

Numerics (every backend computes exactly this; ``kernels/gemm.py`` restates it):
- int8 activations, per-channel weights:
    acc = sum_k a_q[m, k] * w_q[n, k]                               (int32, exact)
    acc = acc - zp * w_sum[n]         (static asymmetric activations; w_sum = rowsum(w_q))
    y = fp32(acc) * a_scale[m] * w_scale[n]  (+ bias[n])  -> out_dtype   (fp32, left to right)
- int8 activations, group-wise weights (group g of ``group_size`` along K, in K order):
    y = 0;  y = y + fp32(acc_g - zp * w_sum[n, g]) * w_scale[n, g];  y = y * a_scale[m] (+ bias)
  The int32 group sums are exact; the fp32 sum over groups runs in the same order in the
  reference and in the Triton kernel (one group per K block), so outputs are bit-exact too.
- activation quantization: x' = fp32(x) / smooth[k] (IEEE division, only with a smoothing
  vector); dynamic per token: scale = max(amax|x'|, 1e-12) / 127, q = clamp(rne(x' / scale),
  -128, 127); static: q = clamp(rne(x' / scale) + zp, -128, 127) (as ``quantize_per_tensor``).
- fp8: acc = fp32 sum of fp8 products (``torch._scaled_mm`` with unit scales in the reference,
  which runs on CPU in torch 2.14), then the int8 epilogue. Activations: scale =
  max(amax|x'|, 1e-12) / 448, q = fp8_e4m3(clamp(x' / scale, -448, 448)), round to nearest even.
  The fp32 sum order is the backend's own, so fp8 results equal the reference exactly only
  where partial sums are exact (tests use such operands) and to fp32 rounding otherwise.
- weight-only: y = sum over groups (x @ w_q^T)_g * w_scale[n, g] in fp32 (+ bias) -> x.dtype;
  the float dot's summation order is the backend's own (stated tolerances in the tests).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _backend
from ._checks import (FLOAT_DTYPES, check_features, check_flag, check_int8_zero_point, check_positive_finite, check_tensor,
                      plain_number, same_device)
from .quantize import (AMAX_FLOOR, div_exact, nan_to_zero, poison, quantize_per_tensor_reference,
                       quantize_per_token_reference)

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
FP8_MIN_CAPABILITY = (8, 9)  # fp8 dots (Triton) and torch._scaled_mm start at sm_89
# Below this many rows one fused kernel quantizes the activations inside the GEMM (each
# N-tile requantizes its rows, cheaper than a second launch); above, one quantization pass
# then the int8 GEMM.
FUSED_QUANT_MAX_M = 64


# -- references -------------------------------------------------------------------------------

def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> int8 [N, K]; low nibble = even k (the layout of diffaccel.quant.formats.pack_int4;
    restated here because ops must not import the quant layer above them)."""
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, p >> 4
    lo, hi = lo - ((lo & 8) << 1), hi - ((hi & 8) << 1)
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(torch.int8)


def _int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [N, K]^T -> int32 [M, N] (torch._int_mm; exact)."""
    M, K = a.shape
    N = b_t.shape[0]
    if a.device.type == "cuda" and (M <= 16 or K % 8 or N % 8):
        # cuBLAS int8 needs M > 16 and K, N multiples of 8: zero padding leaves the sums unchanged
        Mp, Kp, Np = max(32, -(-M // 8) * 8), -(-K // 8) * 8, -(-N // 8) * 8
        ap = torch.zeros(Mp, Kp, dtype=torch.int8, device=a.device)
        bp = torch.zeros(Np, Kp, dtype=torch.int8, device=a.device)
        ap[:M, :K] = a
        bp[:N, :K] = b_t
        return torch._int_mm(ap, bp.t())[:M, :N]
    if K == 1:  # CPU torch._int_mm returns garbage for K = 1 (torch 2.14, seen: N >= 2); an outer product is exact
        return a.to(torch.int32) * b_t.to(torch.int32).reshape(1, N)
    return torch._int_mm(a.contiguous(), b_t.t())


def int8_act_gemm_reference(a, w, a_scale, w_scale, zero_point, w_sum, bias, group_size: int, w_int4: bool,
                            out_dtype: torch.dtype) -> torch.Tensor:
    wq = _unpack_int4(w) if w_int4 else w
    M, K = a.shape
    N = wq.shape[0]
    sa = a_scale.reshape(-1, 1) if a_scale.numel() > 1 else a_scale.reshape(())
    zp = zero_point.reshape(()) if zero_point is not None else None
    if not group_size:
        acc = _int_mm(a, wq)
        if zp is not None:
            acc = acc - zp * w_sum.reshape(1, N)
        y = acc.float() * sa * w_scale.reshape(1, N)
    else:
        y = torch.zeros(M, N, dtype=torch.float32, device=a.device)
        for g in range(K // group_size):
            sl = slice(g * group_size, (g + 1) * group_size)
            acc = _int_mm(a[:, sl], wq[:, sl])
            if zp is not None:
                acc = acc - zp * w_sum[:, g].reshape(1, N)
            y = y + acc.float() * w_scale[:, g].reshape(1, N)
        y = y * sa
    if bias is not None:
        y = y + bias.reshape(1, N)
    return y.to(out_dtype)


def _smoothed(x: torch.Tensor, smooth: Optional[torch.Tensor]) -> torch.Tensor:
    xf = x.float()
    return xf / smooth.float() if smooth is not None else xf


# The activation quantizers with SmoothQuant's 1/s folded in: the quantization itself is the one
# reference in ops/quantize.py, applied to the smoothed fp32 activations.
def quantize_rows_int8_reference(x, smooth):
    return quantize_per_token_reference(_smoothed(x, smooth))


def quantize_static_int8_reference(x, smooth, scale, zero_point):
    if zero_point is None:
        zero_point = torch.zeros(1, dtype=torch.int32, device=x.device)
    return quantize_per_tensor_reference(_smoothed(x, smooth), scale, zero_point)


def int8_linear_reference(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, group_size: int,
                          w_int4: bool, out_dtype: torch.dtype):
    if act_scale is None:
        q, s = quantize_rows_int8_reference(x, smooth)
    else:
        q, s = quantize_static_int8_reference(x, smooth, act_scale, act_zero_point), act_scale
    return int8_act_gemm_reference(q, w, s, w_scale, act_zero_point, w_sum, bias, group_size, w_int4, out_dtype)


def split_k_int8_linear(linear, x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, group_size: int,
                        w_int4: bool, out_dtype: torch.dtype, split_k: int):
    """Q-Diffusion's split input (cat(h, skip)): K ranges [0, split_k) and [split_k, K) have their own
    static quantizers (``act_scale[p]``, ``act_zero_point[p]``), so the GEMM runs as two, each exact
    against the reference, summed in fp32 with the bias on the second, then cast once. ``w_sum`` is
    [2, N] per channel or [N, G] per group (split_k on a group boundary). ``linear`` has
    ``int8_linear_reference``'s signature: the reference itself, or a dispatching wrapper."""
    K = x.shape[1]
    wk = split_k // 2 if w_int4 else split_k
    ys = []
    for part, (ks, ws) in enumerate(((slice(0, split_k), slice(0, wk)), (slice(split_k, K), slice(wk, None)))):
        if group_size:
            gs = slice(0, split_k // group_size) if part == 0 else slice(split_k // group_size, None)
            p_scale, p_sum = w_scale[:, gs], (w_sum[:, gs] if w_sum is not None else None)
        else:
            p_scale, p_sum = w_scale, (w_sum[part] if w_sum is not None else None)
        ys.append(linear(x[:, ks], w[:, ws], p_scale, None if smooth is None else smooth[ks], act_scale[part:part + 1],
                         None if act_zero_point is None else act_zero_point[part:part + 1], p_sum,
                         bias if part == 1 else None, group_size, w_int4, torch.float32))
    return (ys[0] + ys[1]).to(out_dtype)


def _fp8_acc(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    one = torch.ones((), dtype=torch.float32, device=a.device)
    if a.device.type == "cpu" or (a.shape[1] % 16 == 0 and w.shape[0] % 16 == 0):
        return torch._scaled_mm(a, w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return a.float() @ w.float().t()  # cuBLASLt fp8 needs K and N multiples of 16


def fp8_gemm_reference(a, w, a_scale, w_scale, bias, out_dtype: torch.dtype):
    N = w.shape[0]
    sa = a_scale.reshape(-1, 1) if a_scale.numel() > 1 else a_scale.reshape(())
    y = _fp8_acc(a, w) * sa * w_scale.reshape(1, N)
    if bias is not None:
        y = y + bias.reshape(1, N)
    return y.to(out_dtype)


def quantize_rows_fp8_reference(x, smooth):
    xf = _smoothed(x, smooth)
    scale = div_exact(xf.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_FLOOR), FP8_MAX) + poison(xf)
    return nan_to_zero(xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_static_fp8_reference(x, smooth, scale):
    return nan_to_zero(_smoothed(x, smooth) / scale.float().reshape(())).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def weight_only_gemm_reference(x, w, w_scale, bias, group_size: int, w_int4: bool):
    wq = (_unpack_int4(w) if w_int4 else w).float()
    M, K = x.shape
    N = wq.shape[0]
    xf = x.float()
    if not group_size:
        y = (xf @ wq.t()) * w_scale.reshape(1, N)
    else:
        y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
        for g in range(K // group_size):
            sl = slice(g * group_size, (g + 1) * group_size)
            y = y + (xf[:, sl] @ wq[:, sl].t()) * w_scale[:, g].reshape(1, N)
    if bias is not None:
        y = y + bias.reshape(1, N)
    return y.to(x.dtype)


# -- Triton backends --------------------------------------------------------------------------

def _k():
    from diffaccel.kernels import gemm

    return gemm


def _same_layout(w_scale, w_sum):
    # the kernel indexes scales and sums with one row stride
    return w_scale.contiguous(), (w_sum.contiguous() if w_sum is not None else None)


def _triton_int8_act_gemm(a, w, a_scale, w_scale, zero_point, w_sum, bias, group_size, w_int4, out_dtype):
    w_scale, w_sum = _same_layout(w_scale, w_sum)
    out = torch.empty(a.shape[0], w.shape[0], dtype=out_dtype, device=a.device)
    _k().int8_act_gemm(a, w, a_scale.reshape(-1), w_scale, zero_point, w_sum, bias, None, out,
                       group_size=group_size, w_int4=w_int4, fuse_quant=0, per_token=a_scale.numel() > 1)
    return out


def _triton_quantize_rows_int8(x, smooth):
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    s = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    _k().quantize_act_int8(x, smooth, None, None, q, s.view(-1))
    return q, s


def _triton_quantize_static_int8(x, smooth, scale, zero_point):
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    _k().quantize_act_int8(x, smooth, scale.reshape(1), zero_point, q, None)
    return q


def _triton_int8_linear(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, group_size, w_int4,
                        out_dtype, *, activation=None, out_quant=None, N=None):
    """int8_linear on Triton; ``activation`` / ``out_quant`` / ``N`` (output columns) are the
    feed-forward epilogue's (diffaccel.ops.ffn), passed through to the GEMM kernel."""
    w_scale, w_sum = _same_layout(w_scale, w_sum)
    M = x.shape[0]
    N = w.shape[0] if N is None else N
    out = torch.empty(M, N, dtype=torch.int8 if out_quant is not None else out_dtype, device=x.device)
    k = _k()
    epilogue = dict(activation=activation, out_quant=out_quant, value_dtype=out_dtype)
    dynamic = act_scale is None
    if M <= FUSED_QUANT_MAX_M:
        k.int8_act_gemm(x, w, None if dynamic else act_scale.reshape(1), w_scale, act_zero_point, w_sum, bias,
                        smooth, out, group_size=group_size, w_int4=w_int4, fuse_quant=1 if dynamic else 2,
                        per_token=dynamic, **epilogue)
        return out
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    if dynamic:
        s = torch.empty(M, dtype=torch.float32, device=x.device)
        k.quantize_act_int8(x, smooth, None, None, q, s)
    else:
        s = act_scale.reshape(1)
        k.quantize_act_int8(x, smooth, s, act_zero_point, q, None)
    k.int8_act_gemm(q, w, s, w_scale, act_zero_point, w_sum, bias, None, out, group_size=group_size,
                    w_int4=w_int4, fuse_quant=0, per_token=dynamic, **epilogue)
    return out


def _triton_fp8_gemm(a, w, a_scale, w_scale, bias, out_dtype):
    out = torch.empty(a.shape[0], w.shape[0], dtype=out_dtype, device=a.device)
    _k().fp8_gemm(a, w, a_scale.reshape(-1), w_scale, bias, out, per_token=a_scale.numel() > 1)
    return out


def _triton_quantize_rows_fp8(x, smooth):
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    _k().quantize_act_fp8(x, smooth, None, q, s.view(-1))
    return q, s


def _triton_quantize_static_fp8(x, smooth, scale):
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    _k().quantize_act_fp8(x, smooth, scale.reshape(1), q, None)
    return q


def _triton_weight_only_gemm(x, w, w_scale, bias, group_size, w_int4):
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    _k().weight_only_gemm(x, w, w_scale, bias, out, group_size=group_size, w_int4=w_int4)
    return out


# -- CUDA backend: the CUTLASS W8A8 GEMMs for Hopper (csrc/gemm_sm90.cuh) ---------------------

SM90_OUT_DTYPES = (torch.float16, torch.bfloat16)


def _sm90_gemm_declines(a, w, a_scale, w_scale, zero_point, w_sum, bias, group_size, w_int4, out_dtype,
                        a_is_codes=True):
    """None if the sm_90 CUTLASS GEMM runs these int8_act_gemm arguments, else why not (the call
    then runs on Triton). It takes per-channel int8 weights, activations scaled per row or per
    tensor (with a zero point: ``w_sum`` [N]), fp16/bf16 output, and TMA-aligned operands (16-byte
    rows and base addresses). ``a_is_codes`` False: ``a`` is the float input that the call quantizes
    into a fresh (aligned) buffer first, so its own address does not matter."""
    if w_int4 or group_size:
        return "takes per-channel int8 weights only (not int4, not group-wise)"
    if zero_point is not None and (w_sum is None or not w_sum.is_contiguous() or w_sum.data_ptr() % 16):
        return "needs a contiguous, 16-byte aligned w_sum [N] with a zero point"
    return _sm90_operands_decline(a, w, w_scale, bias, out_dtype, a_is_codes)


def _sm90_operands_decline(a, w, w_scale, bias, out_dtype, a_is_codes=True):
    """What both sm_90 GEMMs (int8, fp8) need of their operands: None if met, else what is not."""
    if out_dtype not in SM90_OUT_DTYPES:
        return f"writes float16 or bfloat16 only, not {out_dtype}"
    K, N = a.shape[1], w.shape[0]
    if K % 16 or N % 8 or K == 0 or N == 0:
        return f"needs K and N positive, K % 16 == 0 and N % 8 == 0 (16-byte TMA rows), got K={K}, N={N}"
    if not w.is_contiguous() or (a_is_codes and a.data_ptr() % 16) or w.data_ptr() % 16:
        return "needs contiguous, 16-byte aligned operands"
    if not w_scale.is_contiguous() or w_scale.dim() != 1:
        return "needs a contiguous per-channel w_scale [N]"
    # (CUTLASS 4.2's row broadcast reads them element by element; the 16 bytes are kept as the
    # kernel's stated contract, which a newer vectorised broadcast would need)
    if w_scale.data_ptr() % 16 or (bias is not None and bias.data_ptr() % 16):
        return "needs 16-byte aligned w_scale and bias"
    return None


# epilogue activations of the sm_90 GEMMs (csrc/gemm_sm90.cuh; the codes of kernels/gemm.py's ACTIVATIONS)
SM90_ACTIVATIONS = {None: 0, "gelu_tanh": 2}


def _cuda_int8_act_gemm(a, w, a_scale, w_scale, zero_point, w_sum, bias, group_size, w_int4, out_dtype,
                        activation=None):
    return torch.ops.diffaccel.ext_int8_gemm_sm90(a, w, a_scale.reshape(-1), w_scale, bias, out_dtype, zero_point,
                                                  w_sum if zero_point is not None else None,
                                                  SM90_ACTIVATIONS[activation])


def _sm90_fp8_declines(a, w, a_scale, w_scale, bias, out_dtype):
    return _sm90_operands_decline(a, w, w_scale, bias, out_dtype)


def _cuda_fp8_gemm(a, w, a_scale, w_scale, bias, out_dtype, activation=None):
    return torch.ops.diffaccel.ext_fp8_gemm_sm90(a, w, a_scale.reshape(-1), w_scale, bias, out_dtype,
                                                 SM90_ACTIVATIONS[activation])


def _sm90_linear_declines(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, group_size, w_int4,
                          out_dtype):
    """int8_linear on sm_90: activation quantization (its own best backend), then the CUTLASS GEMM;
    at or below FUSED_QUANT_MAX_M rows the one fused Triton kernel is cheaper than two launches."""
    if x.shape[0] <= FUSED_QUANT_MAX_M:
        return f"is not used at M <= {FUSED_QUANT_MAX_M} (one fused Triton kernel quantizes inside the GEMM)"
    return _sm90_gemm_declines(x, w, act_scale, w_scale, act_zero_point, w_sum, bias, group_size, w_int4, out_dtype,
                               a_is_codes=False)


def _cuda_int8_linear(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, group_size, w_int4, out_dtype,
                      activation=None):
    dev = x.device
    if act_scale is None:
        q, s = _backend.implementation("quantize_rows_int8", dev)(x, smooth)
    else:
        q, s = _backend.implementation("quantize_static_int8", dev)(x, smooth, act_scale, act_zero_point), act_scale
    return _cuda_int8_act_gemm(q, w, s, w_scale, act_zero_point, w_sum, bias, group_size, w_int4, out_dtype,
                               activation)


SM90_GEMM = dict(cuda_capabilities=((9, 0),), cuda_built="cutlass_sm90")


def _register(name, ref, triton_fn, **options):
    _backend.register(_backend.OpBackends(name, torch=ref, triton=triton_fn, **options))


_register("int8_act_gemm", int8_act_gemm_reference, _triton_int8_act_gemm, cuda=_cuda_int8_act_gemm,
          cuda_covers=_sm90_gemm_declines, **SM90_GEMM)
_register("quantize_rows_int8", quantize_rows_int8_reference, _triton_quantize_rows_int8)
_register("quantize_static_int8", quantize_static_int8_reference, _triton_quantize_static_int8)
_register("int8_linear", int8_linear_reference, _triton_int8_linear, cuda=_cuda_int8_linear,
          cuda_covers=_sm90_linear_declines, **SM90_GEMM)
_register("fp8_gemm", fp8_gemm_reference, _triton_fp8_gemm, triton_min_capability=FP8_MIN_CAPABILITY,
          cuda=_cuda_fp8_gemm, cuda_covers=_sm90_fp8_declines, **SM90_GEMM)
# (the interpreter's fp8 casts do not round like torch's: the kernels round on the E4M3 grid first there)
_register("quantize_rows_fp8", quantize_rows_fp8_reference, _triton_quantize_rows_fp8)
_register("quantize_static_fp8", quantize_static_fp8_reference, _triton_quantize_static_fp8)
_register("weight_only_gemm", weight_only_gemm_reference, _triton_weight_only_gemm)


# -- custom ops ---------------------------------------------------------------------------------

@_backend.custom_op("int8_act_gemm")
def _int8_act_gemm_op(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                      zero_point: Optional[torch.Tensor], w_sum: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      group_size: int, w_int4: bool, out_dtype: torch.dtype) -> torch.Tensor:
    return _backend.run("int8_act_gemm", a.contiguous(), w, a_scale, w_scale, zero_point, w_sum, bias, group_size,
                        w_int4, out_dtype)


@_int8_act_gemm_op.register_fake
def _(a, w, a_scale, w_scale, zero_point, w_sum, bias, group_size, w_int4, out_dtype):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


@_backend.custom_op("quantize_rows_int8")
def _quantize_rows_int8_op(x: torch.Tensor, smooth: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _backend.run("quantize_rows_int8", x.contiguous(), smooth)


@_quantize_rows_int8_op.register_fake
def _(x, smooth):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@_backend.custom_op("quantize_static_int8")
def _quantize_static_int8_op(x: torch.Tensor, smooth: Optional[torch.Tensor], scale: torch.Tensor,
                             zero_point: Optional[torch.Tensor]) -> torch.Tensor:
    return _backend.run("quantize_static_int8", x.contiguous(), smooth, scale, zero_point)


@_quantize_static_int8_op.register_fake
def _(x, smooth, scale, zero_point):
    return x.new_empty(x.shape, dtype=torch.int8)


@_backend.custom_op("int8_linear")
def _int8_linear_op(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, smooth: Optional[torch.Tensor],
                    act_scale: Optional[torch.Tensor], act_zero_point: Optional[torch.Tensor],
                    w_sum: Optional[torch.Tensor], bias: Optional[torch.Tensor], group_size: int, w_int4: bool,
                    out_dtype: torch.dtype) -> torch.Tensor:
    return _backend.run("int8_linear", x.contiguous(), w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias,
                        group_size, w_int4, out_dtype)


@_int8_linear_op.register_fake
def _(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, group_size, w_int4, out_dtype):
    return x.new_empty((x.shape[0], w.shape[0]), dtype=out_dtype)


@_backend.custom_op("fp8_gemm")
def _fp8_gemm_op(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                 bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    return _backend.run("fp8_gemm", a.contiguous(), w, a_scale, w_scale, bias, out_dtype)


@_fp8_gemm_op.register_fake
def _(a, w, a_scale, w_scale, bias, out_dtype):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


@_backend.custom_op("quantize_rows_fp8")
def _quantize_rows_fp8_op(x: torch.Tensor, smooth: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _backend.run("quantize_rows_fp8", x.contiguous(), smooth)


@_quantize_rows_fp8_op.register_fake
def _(x, smooth):
    return x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@_backend.custom_op("quantize_static_fp8")
def _quantize_static_fp8_op(x: torch.Tensor, smooth: Optional[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    return _backend.run("quantize_static_fp8", x.contiguous(), smooth, scale)


@_quantize_static_fp8_op.register_fake
def _(x, smooth, scale):
    return x.new_empty(x.shape, dtype=FP8_DTYPE)


@_backend.custom_op("weight_only_gemm")
def _weight_only_gemm_op(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                         group_size: int, w_int4: bool) -> torch.Tensor:
    return _backend.run("weight_only_gemm", x.contiguous(), w, w_scale, bias, group_size, w_int4)


@_weight_only_gemm_op.register_fake
def _(x, w, w_scale, bias, group_size, w_int4):
    return x.new_empty((x.shape[0], w.shape[0]))


# -- validation ------------------------------------------------------------------------------

def _check_device(name: str, t: torch.Tensor, device: torch.device, like: str) -> None:
    if not same_device(device, t.device):
        raise ValueError(f"{name}: expected a tensor on {device} like {like}, got one on {t.device}")


# int8 codes (with a zero point: up to 255 apart) times int8 weights summed over K in int32:
# 255 * 128 * 65536 < 2**31, one more term may not fit
MAX_INT8_K = 65536


def _check_weight(w, w_scale, w_sum, *, K: int, group_size: Optional[int], w_int4: bool, device, like: str,
                  allowed=(torch.int8,), int32_sums: bool = False):
    w_int4 = check_flag("w_int4", w_int4)
    if int32_sums and K > MAX_INT8_K:
        raise ValueError(f"K: {K} int8 products would be summed in int32, which can overflow above K = {MAX_INT8_K}; "
                         f"split the reduction (e.g. two layers over halves of the input features)")
    if w_int4:
        check_tensor("w", w, dtypes=(torch.uint8,), ndim=2, last_dim_contiguous=True)
        if w.shape[1] * 2 != K:
            raise ValueError(f"w: packed int4 weights need shape [N, K // 2] = [N, {K // 2}] for K={K}, "
                             f"got {tuple(w.shape)}")
    else:
        check_tensor("w", w, dtypes=allowed, ndim=2, last_dim_contiguous=True)
        if w.shape[1] != K:
            raise ValueError(f"w: expected K={K} columns like the activations, got shape {tuple(w.shape)}")
    _check_device("w", w, device, like)
    N = w.shape[0]
    group_size = plain_number(group_size)
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size: expected a positive int or None, got {group_size!r}")
        if group_size % 16 or K % group_size:
            raise ValueError(f"group_size: expected a multiple of 16 that divides K={K}, got {group_size}")
    groups = None if group_size is None else K // group_size
    want = (N,) if groups is None else (N, groups)
    check_tensor("w_scale", w_scale, dtypes=(torch.float32,))
    if tuple(w_scale.shape) != want:
        raise ValueError(f"w_scale: expected shape {want}, got {tuple(w_scale.shape)}")
    _check_device("w_scale", w_scale, device, like)
    if w_scale.dim() == 2 and w_scale.stride(1) != 1:
        raise ValueError(f"w_scale: expected unit stride along groups, got strides {w_scale.stride()}")
    check_positive_finite("w_scale", w_scale)
    if w_sum is not None:
        check_tensor("w_sum", w_sum, dtypes=(torch.int32,))
        if tuple(w_sum.shape) != want:
            raise ValueError(f"w_sum: expected shape {want} (row sums of w per channel/group), got "
                             f"{tuple(w_sum.shape)}")
        _check_device("w_sum", w_sum, device, like)
    return N


def _check_bias(bias, N, device, like):
    if bias is None:
        return None
    check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
    if bias.shape[0] != N:
        raise ValueError(f"bias: expected shape ({N},), got {tuple(bias.shape)}")
    _check_device("bias", bias, device, like)
    return bias.float().contiguous()


def _check_out_dtype(out_dtype):
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype: expected torch.float16, torch.bfloat16 or torch.float32, got {out_dtype!r}")


def _check_scalar(name, t, dtype, device, like):
    check_tensor(name, t, dtypes=(dtype,))
    if t.numel() != 1:
        raise ValueError(f"{name}: expected a single value (per-tensor), got shape {tuple(t.shape)}")
    _check_device(name, t, device, like)
    return t.reshape(1)


def _check_zero_point(zero_point, device, like, name="zero_point"):
    if zero_point is None:
        return None
    zp = _check_scalar(name, zero_point, torch.int32, device, like)
    check_int8_zero_point(name, zp)
    return zp


def _check_smooth(smooth, K, device, like, name="smooth"):
    if smooth is None:
        return None
    check_tensor(name, smooth, dtypes=(torch.float32,), ndim=1, contiguous=True)
    if smooth.shape[0] != K:
        raise ValueError(f"{name}: expected shape ({K},) (one factor per {'output' if name == 'next_smooth' else 'input'}"
                         f" channel), got {tuple(smooth.shape)}")
    _check_device(name, smooth, device, like)
    check_positive_finite(name, smooth)
    return smooth


def _check_act_scale(a_scale, M, device, like, name="a_scale"):
    check_tensor(name, a_scale, dtypes=(torch.float32,))
    if a_scale.numel() not in (1, M) or (a_scale.numel() == M and M > 1 and a_scale.dim() == 2
                                         and a_scale.shape[1] != 1):
        raise ValueError(f"{name}: expected one scale per tensor ([1]) or per row ([M] or [M, 1], M={M}), "
                         f"got shape {tuple(a_scale.shape)}")
    _check_device(name, a_scale, device, like)
    # (NaN: a quantizer's scale for a row with a NaN or Inf; the GEMM then gives that row NaN)
    check_positive_finite(name, a_scale, allow_nan=True)
    return a_scale.reshape(-1).contiguous()


def check_static_act(act_scale, act_zero_point, w_sum, device):
    """(act_scale, zero point or None) of static int8 activations, or (None, None) for dynamic ones."""
    zp = None
    if act_scale is not None:
        act_scale = _check_scalar("act_scale", act_scale, torch.float32, device, "x")
        check_positive_finite("act_scale", act_scale)
        zp = _check_zero_point(act_zero_point, device, "x", "act_zero_point")
        if zp is not None and w_sum is None:
            raise ValueError("w_sum: required with act_zero_point (the zero-point correction)")
    elif act_zero_point is not None:
        raise ValueError("act_zero_point: needs act_scale (dynamic per-token quantization is symmetric)")
    return act_scale, zp


# -- public wrappers -------------------------------------------------------------------------

def int8_gemm(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor, *,
              bias: Optional[torch.Tensor] = None, zero_point: Optional[torch.Tensor] = None,
              w_sum: Optional[torch.Tensor] = None, group_size: Optional[int] = None, w_int4: bool = False,
              out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Dequantized int8 x int8/int4 GEMM: ``a`` int8 [M, K] (activation scales ``a_scale`` per row or
    per tensor, optional static ``zero_point`` with ``w_sum`` = row sums of the weight codes), ``w``
    int8 [N, K] or packed int4 uint8 [N, K // 2] (``w_int4``), ``w_scale`` [N] or [N, K // group_size]."""
    check_tensor("a", a, dtypes=(torch.int8,), ndim=2)
    M, K = a.shape
    dev = a.device
    N = _check_weight(w, w_scale, w_sum, K=K, group_size=group_size, w_int4=w_int4, device=dev, like="a",
                      int32_sums=True)
    a_scale = _check_act_scale(a_scale, M, dev, "a")
    zp = _check_zero_point(zero_point, dev, "a")
    if zp is not None and w_sum is None:
        raise ValueError("w_sum: required with zero_point (the zero-point correction zp * rowsum(w))")
    _check_out_dtype(out_dtype)
    return _int8_act_gemm_op(a, w, a_scale, w_scale, zp, w_sum if zp is not None else None,
                                             _check_bias(bias, N, dev, "a"), group_size or 0, bool(w_int4), out_dtype)


def quantize_activation_int8(x: torch.Tensor, *, smooth: Optional[torch.Tensor] = None,
                             scale: Optional[torch.Tensor] = None, zero_point: Optional[torch.Tensor] = None):
    """int8 activation codes of ``x`` [M, K] with ``x / smooth`` folded in. Dynamic per row
    (``scale=None``): returns ``(q, scales [M, 1])``; static: returns ``(q, scale)``."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    check_features(x)
    smooth = _check_smooth(smooth, x.shape[1], x.device, "x")
    if scale is None:
        if zero_point is not None:
            raise ValueError("zero_point: dynamic per-token quantization is symmetric; pass scale for static")
        return _quantize_rows_int8_op(x, smooth)
    s = _check_scalar("scale", scale, torch.float32, x.device, "x")
    check_positive_finite("scale", s)
    zp = _check_zero_point(zero_point, x.device, "x")
    return _quantize_static_int8_op(x, smooth, s, zp), s


def int8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, smooth=None, act_scale=None,
                act_zero_point=None, w_sum=None, bias=None, group_size: Optional[int] = None, w_int4: bool = False,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x`` [..., K] float -> quantized int8 (dynamic per token, or static with ``act_scale``) ->
    int8/int4 GEMM -> [..., N]. Small M runs as one fused kernel on Triton."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_features(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    M, K = x2.shape
    dev = x.device
    N = _check_weight(w, w_scale, w_sum, K=K, group_size=group_size, w_int4=w_int4, device=dev, like="x",
                      int32_sums=True)
    smooth = _check_smooth(smooth, K, dev, "x")
    act_scale, zp = check_static_act(act_scale, act_zero_point, w_sum, dev)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _check_out_dtype(out_dtype)
    y = _int8_linear_op(x2, w, w_scale, smooth, act_scale, zp, w_sum if zp is not None else None,
                                        _check_bias(bias, N, dev, "x"), group_size or 0, bool(w_int4), out_dtype)
    return y.reshape(*lead, N)


def fp8_gemm(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor, *,
             bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """float8_e4m3fn [M, K] x float8_e4m3fn [N, K]^T with fp32 accumulation, scales per row/tensor
    and per output channel, bias and cast fused."""
    check_tensor("a", a, dtypes=(FP8_DTYPE,), ndim=2)
    M, K = a.shape
    N = _check_weight(w, w_scale, None, K=K, group_size=None, w_int4=False, device=a.device, like="a",
                      allowed=(FP8_DTYPE,))
    a_scale = _check_act_scale(a_scale, M, a.device, "a")
    _check_out_dtype(out_dtype)
    return _fp8_gemm_op(a, w, a_scale, w_scale, _check_bias(bias, N, a.device, "a"), out_dtype)


def quantize_activation_fp8(x: torch.Tensor, *, smooth: Optional[torch.Tensor] = None,
                            scale: Optional[torch.Tensor] = None, _scale_name: str = "scale"):
    """float8_e4m3fn codes of ``x / smooth``: dynamic per row -> ``(q, scales [M, 1])``; static -> ``(q, scale)``."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    check_features(x)
    smooth = _check_smooth(smooth, x.shape[1], x.device, "x")
    if scale is None:
        return _quantize_rows_fp8_op(x, smooth)
    s = _check_scalar(_scale_name, scale, torch.float32, x.device, "x")  # (fp8_linear's act_scale)
    check_positive_finite(_scale_name, s)
    return _quantize_static_fp8_op(x, smooth, s), s


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, smooth=None, act_scale=None, bias=None,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x`` [..., K] -> fp8 per token (or static ``act_scale``) -> fp8 GEMM -> [..., N]."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_features(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    q, s = quantize_activation_fp8(x2, smooth=smooth, scale=act_scale, _scale_name="act_scale")
    y = fp8_gemm(q, w, s, w_scale, bias=bias, out_dtype=x.dtype if out_dtype is None else out_dtype)
    return y.reshape(*lead, w.shape[0])


def weight_only_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, bias=None,
                     group_size: Optional[int] = None, w_int4: bool = False) -> torch.Tensor:
    """fp16/bf16 ``x`` [..., K] times int8 or packed int4 weights dequantized inside the kernel (W8A16/W4A16)."""
    check_tensor("x", x, dtypes=(torch.float16, torch.bfloat16))
    check_features(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    K = x2.shape[1]
    N = _check_weight(w, w_scale, None, K=K, group_size=group_size, w_int4=w_int4, device=x.device, like="x")
    y = _weight_only_gemm_op(x2, w, w_scale, _check_bias(bias, N, x.device, "x"), group_size or 0,
                                             bool(w_int4))
    return y.reshape(*lead, N)
