"""INT8 activation quantization: static per-tensor and dynamic per-token.

Numerics match ``diffaccel.ops.quantize``'s reference bit for bit: fp32 math, IEEE
division (``div_rn``, not Triton's approximate ``/``), round half to even.
"""
import torch
import triton
import triton.language as tl

from ._common import cdiv, dynamic_scale, nan_to_zero, next_pow2, round_half_even, row_abs_max

AMAX_FLOOR = 1e-12


@triton.jit
def _quantize_per_tensor_kernel(x_ptr, scale_ptr, zp_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    scale = tl.load(scale_ptr)
    zp = tl.load(zp_ptr).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = nan_to_zero(round_half_even(tl.math.div_rn(x, scale))) + zp
    q = tl.minimum(tl.maximum(q, -128.0), 127.0)
    tl.store(out_ptr + offs, q.to(tl.int8), mask=mask)


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, out: torch.Tensor) -> None:
    n = x.numel()
    BLOCK = 4096
    _quantize_per_tensor_kernel[(cdiv(n, BLOCK),)](x, scale, zero_point, out, n, BLOCK=BLOCK)


@triton.jit
def _quantize_per_token_kernel(x_ptr, out_ptr, scale_ptr, K, AMAX_MIN: tl.constexpr, BLOCK_K: tl.constexpr,
                               SINGLE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * K
    o_row = out_ptr + row * K
    if SINGLE_PASS:  # the row fits one block: read it once
        offs = tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        scale = dynamic_scale(tl.max(tl.abs(x), axis=0), tl.sum(x * 0.0, axis=0), AMAX_MIN, 127.0)
        q = nan_to_zero(round_half_even(tl.math.div_rn(x, scale)))
        q = tl.minimum(tl.maximum(q, -128.0), 127.0)
        tl.store(o_row + offs, q.to(tl.int8), mask=mask)
    else:
        amax, bad = row_abs_max(x_row, x_row, K, False, BLOCK_K)
        scale = dynamic_scale(amax, bad, AMAX_MIN, 127.0)
        for start in range(0, K, BLOCK_K):
            offs = start + tl.arange(0, BLOCK_K)
            mask = offs < K
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            q = nan_to_zero(round_half_even(tl.math.div_rn(x, scale)))
            q = tl.minimum(tl.maximum(q, -128.0), 127.0)
            tl.store(o_row + offs, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_per_token(x2d: torch.Tensor, out2d: torch.Tensor, scales: torch.Tensor) -> None:
    """x2d [M, K] contiguous -> out2d int8 [M, K], scales fp32 [M]."""
    M, K = x2d.shape
    if M == 0:
        return
    BLOCK_K = min(next_pow2(K), 8192)
    _quantize_per_token_kernel[(M,)](x2d, out2d, scales, K, AMAX_MIN=AMAX_FLOOR, BLOCK_K=BLOCK_K,
                                     SINGLE_PASS=K <= BLOCK_K)


# Configs the launchers above pick (benchmarks/static_report.py compiles them for sm_80/89/90a):
# per-tensor is one fixed block; per-token is single-pass for K <= 8192 (BLOCK_K = next pow2 of K,
# diffusion widths 320..3072 -> 512..4096) and two-pass with BLOCK_K = 8192 above.
STATIC_REPORT_CASES = [
    *({"name": f"per_tensor_{dt[1:]}", "fn": _quantize_per_tensor_kernel,
       "signature": {"x_ptr": dt, "scale_ptr": "*fp32", "zp_ptr": "*i32", "out_ptr": "*i8", "n": "i32",
                     "BLOCK": "constexpr"},
       "constexprs": {"BLOCK": 4096}, "num_warps": 4, "num_stages": 3, "hot": True, "tensor_cores": False}
      for dt in ("*fp16", "*bf16", "*fp32")),
    *({"name": f"per_token_{dt[1:]}_k{block_k}", "fn": _quantize_per_token_kernel,
       "signature": {"x_ptr": dt, "out_ptr": "*i8", "scale_ptr": "*fp32", "K": "i32",
                     "AMAX_MIN": "constexpr", "BLOCK_K": "constexpr", "SINGLE_PASS": "constexpr"},
       "constexprs": {"AMAX_MIN": AMAX_FLOOR, "BLOCK_K": block_k, "SINGLE_PASS": single},
       "num_warps": 4, "num_stages": 3, "hot": True, "tensor_cores": False}
      for dt, block_k, single in (("*fp16", 512, True), ("*fp16", 4096, True), ("*bf16", 4096, True),
                                  ("*fp16", 8192, False), ("*bf16", 8192, False))),
]
