"""The error bound of an fp8 GEMM's accumulation, per device.

Hopper's fp8 tensor cores (wgmma) accumulate with about 14 significant bits (DeepSeek-V3 technical
report, section 3.3.2), so an fp8 GEMM on sm_90 is not the fp32 sum in another order. The kernels add
each K tile's partial sum into an fp32 accumulator (``max_num_imprecise_acc=BLOCK_K``). Bound per
output: ``rel * sum_k |a_k w_k|`` (times the scales) with ``rel`` = 2^-10 on sm_90. Measured on an
H200 (Triton 3.6, K = 1024, the whole K in the tensor core's accumulator, before the per-tile
promotion): at worst 4.6e-4 of that sum. Elsewhere (CPU, the interpreter, sm_89) the sum is fp32:
2e-6 covers any summation order at these K.
"""
import torch

HOPPER_FP8_REL = 2.0**-10
FP32_SUM_REL = 2e-6


def fp8_sum_rel_bound(device) -> float:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev) == (9, 0):
        return HOPPER_FP8_REL
    return FP32_SUM_REL


def abs_product_sum(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """fp64 [M, N] on CPU: sum_k |a_mk w_nk| * a_scale (per row or one) * w_scale[n]. Summed in fp32 on
    a's device (a bound's scale: its own rounding, 1e-7 relative, does not matter; TF32 is off)."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        s = (a.float().abs() @ w.to(a.device).float().abs().t()).double().cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    sa = a_scale.cpu().double()
    sa = sa.reshape(-1, 1) if sa.numel() > 1 else sa.reshape(())
    return s * sa * w_scale.cpu().double().reshape(1, -1)
