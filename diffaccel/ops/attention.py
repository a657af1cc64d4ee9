"""Scaled dot-product attention with torch SDPA's layout and meaning, and an INT8 path. The kernels
are forward kernels; the backward recomputes exact attention's gradient (``_attention_backward``).

``attention(q, k, v, attn_mask=None, is_causal=False, scale=None, *, quant=None)``:
q [B, H, Lq, D], k and v [B, H, Lk, D] (v's head dim equal to q's), any strides: in particular
[B, L, H, D] tensors seen through ``.transpose(1, 2)`` are read in place, and the output then has
the same [B, L, H, D] memory order. fp16, bf16 and fp32 inputs (q, k, v of one dtype); accumulation
in fp32. Head dims 8..256: the Triton kernels cover D with one or two power-of-two tiles (160 =
128 + 32) and masked loads, never padding the tensors. ``attn_mask`` is bool (True = attend) or
additive float, broadcastable to [B, H, Lq, Lk]; ``is_causal`` is top-left aligned like SDPA.
A query row that can see no key returns 0 (torch SDPA does the same) and LSE = -inf.

``quant="int8"``: K' = K - mean over tokens of K (the same shift for every key: softmax is
unchanged); Q and K' quantized to INT8 per block (``QUANT_BLOCK_M`` query rows /
``QUANT_BLOCK_N`` key rows, per batch and head), s = max(amax, 1e-12) / 127,
x_q = clamp(round_half_even(x / s), -127, 127), IEEE division; QK^T in int32 (exact, the same
integers in every backend: ``attention_int8_debug``), softmax in fp32, P·V in FP8 E4M3 (P scaled
by 448, V per channel by amax/448) on sm89/sm90 and FP16 elsewhere (CPU, the interpreter, sm80),
accumulation in fp32.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _backend
from ._checks import FLOAT_DTYPES, check_flag, check_tensor, plain_number, same_device
from .quantize import div_exact, nan_to_zero, poison

QUANT_MODES = (None, "int8")
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256  # the range is 32..256; small ones cost nothing extra
QUANT_BLOCK_M = 128  # must match kernels/attention.py
QUANT_BLOCK_N = 64
AMAX_FLOOR = 1e-12
FP8_E4M3_MAX = 448.0


# -- references (one per op) -----------------------------------------------------------------------

def _expand_mask(attn_mask, B, H, Lq, Lk):
    return None if attn_mask is None else attn_mask.expand(B, H, Lq, Lk)


def _softmax_pv(scores, v, out_dtype, pv_dtype=torch.float32):
    """scores fp32 [B,H,Lq,Lk] with -inf where masked -> (out, lse); fully masked rows give 0 / -inf."""
    if scores.shape[-1] == 0:  # no keys: every row is fully masked
        row_max = scores.new_full((*scores.shape[:-1], 1), float("-inf"))
    else:
        row_max = scores.amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isinf(row_max) & (row_max < 0), torch.zeros_like(row_max), row_max)
    p = torch.exp(scores - shift)
    denom = p.sum(dim=-1, keepdim=True)
    lse = torch.where(denom > 0, shift + torch.log(denom.clamp(min=torch.finfo(torch.float32).tiny)),
                      torch.full_like(denom, float("-inf"))).squeeze(-1)
    out = (p.to(pv_dtype).float() @ v.to(pv_dtype).float()) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.to(out_dtype), lse


def _mask_scores(scores, attn_mask, is_causal):
    Lq, Lk = scores.shape[-2:]
    if is_causal:
        visible = torch.ones(Lq, Lk, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    return scores


def attention_with_lse_reference(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """fp32 math: softmax(q k^T * scale + mask) v, and the natural-log LSE [B, H, Lq] in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = _mask_scores(scores, attn_mask, is_causal)
    return _softmax_pv(scores, v, q.dtype)


def attention_reference(q, k, v, attn_mask=None, is_causal=False, scale=None):
    return attention_with_lse_reference(q, k, v, attn_mask, is_causal, scale)[0]


def quantize_int8_blocks_reference(x: torch.Tensor, block: int, mean: Optional[torch.Tensor] = None):
    """x [B,H,L,D] -> (int8 [B,H,L,D] contiguous, fp32 scales [B,H,cdiv(L,block)])."""
    B, H, L, D = x.shape
    xf = x.float()
    if mean is not None:
        xf = xf - mean[:, :, None, :]
    n_blocks = -(-L // block)
    padded = torch.zeros(B, H, n_blocks * block, D, dtype=torch.float32, device=x.device)
    padded[:, :, :L] = xf
    blocks = padded.view(B, H, n_blocks, block * D)
    # (a block holding a NaN or Inf gets a NaN scale and codes 0, as ops/quantize.py's rows do)
    scales = div_exact(blocks.abs().amax(dim=-1).clamp(min=AMAX_FLOOR), 127.0) + poison(blocks)[..., 0]
    qv = nan_to_zero(torch.round(blocks / scales[..., None])).clamp_(-127, 127).to(torch.int8)
    return qv.view(B, H, n_blocks * block, D)[:, :, :L].contiguous(), scales


def _k_mean(k):
    # shared by every backend (the same torch reduction), so the quantized K is bit-identical
    return k.mean(dim=2, dtype=torch.float32).contiguous()


def int8_qk_scores_reference(q_int8, q_scale, k_int8, k_scale):
    """The exact int32 QK^T (float64 matmul is exact here: |sum| <= 127*127*256 < 2**53)."""
    qk = (q_int8.double() @ k_int8.double().transpose(-1, -2)).to(torch.int32)
    Lq, Lk = q_int8.shape[2], k_int8.shape[2]
    qs = q_scale.repeat_interleave(QUANT_BLOCK_M, dim=2)[:, :, :Lq]
    ks = k_scale.repeat_interleave(QUANT_BLOCK_N, dim=2)[:, :, :Lk]
    return qk, qs, ks


def pv_uses_fp8(device: torch.device) -> bool:
    if device.type != "cuda" or _backend.triton_interpreting():
        return False
    return torch.cuda.get_device_capability(device) in ((8, 9), (9, 0))


def attention_int8_with_lse_reference(q, k, v, attn_mask=None, is_causal=False, scale=None, k_mean=None):
    """Quantized-path reference: the same INT8 Q/K and int32 QK^T as the kernels; softmax in fp32;
    P·V with P and V rounded to fp16 (the CPU/interpreter/sm80 PV path), fp32 accumulation."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k_mean = _k_mean(k) if k_mean is None else k_mean
    qi, qs = quantize_int8_blocks_reference(q, QUANT_BLOCK_M)
    ki, ks = quantize_int8_blocks_reference(k, QUANT_BLOCK_N, k_mean)
    qk, qs_rows, ks_cols = int8_qk_scores_reference(qi, qs, ki, ks)
    scores = qk.float() * (qs_rows[..., :, None] * scale) * ks_cols[..., None, :]
    scores = _mask_scores(scores, attn_mask, is_causal)
    return _softmax_pv(scores, v, q.dtype, pv_dtype=torch.float16)


def attention_int8_reference(q, k, v, attn_mask=None, is_causal=False, scale=None):
    return attention_int8_with_lse_reference(q, k, v, attn_mask, is_causal, scale)[0]


# -- backends ------------------------------------------------------------------------------------------

def _out_like_q(q, dtype=None):
    """Output in q's memory order: [B,L,H,D]-strided q gets a [B,L,H,D]-strided output (no copy on flatten)."""
    B, H, Lq, _ = q.shape
    Dv = q.shape[3]
    dtype = q.dtype if dtype is None else dtype
    if _is_blhd(q):
        return torch.empty(B, Lq, H, Dv, dtype=dtype, device=q.device).transpose(1, 2)
    return torch.empty(B, H, Lq, Dv, dtype=dtype, device=q.device)


def _is_blhd(t):
    # transposed view of a contiguous [B, L, H, D] (heads interleaved per token)
    B, H, L, D = t.shape
    return H > 1 and t.stride(3) == 1 and t.stride(1) == D and t.stride(2) == H * D


def _torch_attention(q, k, v, attn_mask, is_causal, scale, return_lse):
    out, lse = attention_with_lse_reference(q, k, v, attn_mask, is_causal, scale)
    res = _out_like_q(q)
    res.copy_(out)
    return res, lse


def _triton_attention(q, k, v, attn_mask, is_causal, scale, return_lse):
    from diffaccel.kernels import attention as kern

    B, H, Lq, _ = q.shape
    out = _out_like_q(q)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    kern.attention_fwd(q, k, v, _expand_mask(attn_mask, B, H, Lq, k.shape[2]), out,
                       lse if return_lse else None, is_causal, scale)
    return out, lse


def _torch_attention_int8(q, k, v, attn_mask, is_causal, scale, return_lse, k_mean):
    out, lse = attention_int8_with_lse_reference(q, k, v, attn_mask, is_causal, scale, k_mean)
    res = _out_like_q(q)
    res.copy_(out)
    return res, lse


def _triton_quantize_qk(q, k, k_mean):
    from diffaccel.kernels import attention as kern

    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    qi = torch.empty(B, H, Lq, D, dtype=torch.int8, device=q.device)
    ki = torch.empty(B, H, Lk, D, dtype=torch.int8, device=q.device)
    qs = torch.empty(B, H, -(-Lq // QUANT_BLOCK_M), dtype=torch.float32, device=q.device)
    ks = torch.empty(B, H, -(-Lk // QUANT_BLOCK_N), dtype=torch.float32, device=q.device)
    kern.quantize_qk_int8_blocks(q, k, k_mean, qi, qs, ki, ks)
    return qi, qs, ki, ks


def _triton_quantize_v_fp8(v):
    from diffaccel.kernels import attention as kern

    B, H, Lk, D = v.shape
    # max |v| per channel in one reduction kernel (abs, amax and the fp32 cast were three launches); exact
    amax = torch.linalg.vector_norm(v, float("inf"), dim=2, dtype=torch.float32)
    v_scale = div_exact(amax.clamp_(min=AMAX_FLOOR), FP8_E4M3_MAX)
    v8 = torch.empty(B, H, Lk, D, dtype=torch.float8_e4m3fn, device=v.device)
    kern.quantize_fp8_per_channel(v, v_scale, v8)
    return v8, v_scale


def _triton_attention_int8(q, k, v, attn_mask, is_causal, scale, return_lse, k_mean, qk_debug=None):
    from diffaccel.kernels import attention as kern

    B, H, Lq, _ = q.shape
    qi, qs, ki, ks = _triton_quantize_qk(q, k, k_mean)
    fp8 = pv_uses_fp8(q.device) and qk_debug is None
    v_in, v_scale = _triton_quantize_v_fp8(v) if fp8 else (v, None)
    out = _out_like_q(q)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    kern.attention_int8_fwd(qi, qs, ki, ks, v_in, v_scale, _expand_mask(attn_mask, B, H, Lq, k.shape[2]), out,
                            lse if return_lse else None, is_causal, scale, pv_fp8=fp8, qk_debug=qk_debug)
    return out, lse


_backend.register(_backend.OpBackends("attention", torch=_torch_attention, triton=_triton_attention))
_backend.register(_backend.OpBackends("attention_int8", torch=_torch_attention_int8, triton=_triton_attention_int8))


# -- custom ops ---------------------------------------------------------------------------------------

@_backend.custom_op("attention")
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                  is_causal: bool, scale: float, quant: Optional[str], return_lse: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    if k.shape[2] == 0:
        # no keys (SDPA's answer: 0, as for a fully masked row; the LSE is -inf); kernels need Lk > 0
        B, H, Lq, _ = q.shape
        return _out_like_q(q).zero_(), torch.full((B, H, Lq), float("-inf"), device=q.device)
    if quant == "int8":
        impl = _backend.implementation("attention_int8", q.device)
        return impl(q, k, v, attn_mask, is_causal, scale, return_lse, _k_mean(k))
    return _backend.implementation("attention", q.device)(q, k, v, attn_mask, is_causal, scale, return_lse)


@_attention_op.register_fake
def _(q, k, v, attn_mask, is_causal, scale, quant, return_lse):
    B, H, Lq, _ = q.shape
    return _out_like_q(q), q.new_empty((B, H, Lq), dtype=torch.float32)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, attn_mask, is_causal, scale, quant, return_lse = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.is_causal, ctx.scale, ctx.return_lse = is_causal, scale, return_lse


def _attention_backward(ctx, grad_out, grad_lse):
    """The gradient of exact attention, recomputed from q, k, v: torch SDPA's backward (flash or
    memory-efficient kernels on a GPU), or the fp32 reference's when the LSE output is used too.
    For ``quant="int8"`` this is the straight-through gradient: the quantization of Q, K and V is
    treated as the identity, as in quantization-aware training."""
    def exact(q, k, v, attn_mask):
        if ctx.return_lse:
            return attention_with_lse_reference(q, k, v, attn_mask, ctx.is_causal, ctx.scale)
        return (torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=ctx.is_causal,
                                                                 scale=ctx.scale),)

    grads = (grad_out, grad_lse) if ctx.return_lse else (grad_out,)
    return _backend.recomputed_grads(exact, ctx.saved_tensors, ctx.needs_input_grad[:4], grads) + (None,) * 4


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


# -- public wrappers -----------------------------------------------------------------------------------

def _broadcastable(mask_shape, target):
    if len(mask_shape) > len(target):
        return False
    for m, t in zip(reversed(mask_shape), reversed(target)):
        if m != 1 and m != t:
            return False
    return True


def _validate(q, k, v, attn_mask, is_causal, scale, quant):
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor("v", v, dtypes=FLOAT_DTYPES, ndim=4)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {str(q.dtype).replace('torch.', '')} like q, "
                            f"got {str(t.dtype).replace('torch.', '')}")
        if not same_device(q.device, t.device):
            raise ValueError(f"{name}: expected a tensor on {q.device} like q, got one on {t.device}")
    B, H, Lq, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k: expected shape [B={B}, H={H}, Lk, D={D}] to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected shape {tuple(k.shape)} like k, got {tuple(v.shape)}")
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim (last dimension) must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {D}")
    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask, dtypes=(torch.bool,) + FLOAT_DTYPES)
        if not _broadcastable(tuple(attn_mask.shape), (B, H, Lq, k.shape[2])):
            raise ValueError(f"attn_mask: shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"[B, H, Lq, Lk] = {(B, H, Lq, k.shape[2])}")
        if not same_device(q.device, attn_mask.device):
            raise ValueError(f"attn_mask: expected a tensor on {q.device} like q, got one on {attn_mask.device}")
        if is_causal:
            raise ValueError("attn_mask: must be None when is_causal=True (as in torch SDPA)")
    is_causal = check_flag("is_causal", is_causal)
    scale = plain_number(scale)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise TypeError(f"scale: expected a finite float or None, got {scale!r}")
    if quant not in QUANT_MODES:
        raise ValueError(f"quant: expected one of {QUANT_MODES}, got {quant!r}")


def _prepare(q, k, v, attn_mask, is_causal, scale, quant):
    _validate(q, k, v, attn_mask, is_causal, scale, quant)
    if attn_mask is not None:
        while attn_mask.dim() < 4:  # SDPA broadcasting: leading dims are added on the left
            attn_mask = attn_mask.unsqueeze(0)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return attn_mask, scale


def attention(q, k, v, attn_mask=None, is_causal=False, scale=None, *, quant=None) -> torch.Tensor:
    """Like ``torch.nn.functional.scaled_dot_product_attention`` (no dropout; differentiable); see the module doc."""
    attn_mask, scale = _prepare(q, k, v, attn_mask, is_causal, scale, quant)
    return _attention_op(q, k, v, attn_mask, bool(is_causal), scale, quant, False)[0]


def attention_with_lse(q, k, v, attn_mask=None, is_causal=False, scale=None, *, quant=None):
    """``(out, lse)``: lse [B, H, Lq] fp32, natural log of the softmax denominator (-inf for a row that sees no key)."""
    attn_mask, scale = _prepare(q, k, v, attn_mask, is_causal, scale, quant)
    return _attention_op(q, k, v, attn_mask, bool(is_causal), scale, quant, True)


def attention_int8_debug(q, k, v, attn_mask=None, is_causal=False, scale=None, *, backend: str = "torch") -> dict:
    """The quantized path's intermediate integers from one backend, for exact comparison:
    ``q_int8, q_scale, k_int8, k_scale`` and ``qk_int32`` [B, H, Lq, Lk] (all keys, mask not applied)."""
    attn_mask, scale = _prepare(q, k, v, attn_mask, is_causal, scale, "int8")
    k_mean = _k_mean(k)
    if backend == "torch":
        qi, qs = quantize_int8_blocks_reference(q, QUANT_BLOCK_M)
        ki, ks = quantize_int8_blocks_reference(k, QUANT_BLOCK_N, k_mean)
        qk = int8_qk_scores_reference(qi, qs, ki, ks)[0]
    elif backend == "triton":
        why = _backend._why_not(_backend.registered_ops()["attention_int8"], "triton", q.device)
        if why:
            raise _backend.BackendUnavailable(f"backend 'triton' for attention_int8 on {q.device.type}: {why}")
        qi, qs, ki, ks = _triton_quantize_qk(q, k, k_mean)
        B, H, Lq, _ = q.shape
        # every tile's integer scores; causal tiles past the diagonal are skipped, so compute without it
        qk = torch.zeros(B, H, Lq, k.shape[2], dtype=torch.int32, device=q.device)
        _triton_attention_int8(q, k, v, None, False, scale, False, k_mean, qk_debug=qk)
    else:
        raise ValueError(f"backend: expected 'torch' or 'triton', got {backend!r}")
    return {"q_int8": qi, "q_scale": qs, "k_int8": ki, "k_scale": ks, "qk_int32": qk}
