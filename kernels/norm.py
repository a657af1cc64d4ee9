"""GroupNorm statistics folded into a per-(sample, channel) affine: the prologue of the implicit-GEMM
conv (``kernels/conv.py``, ``IN_AFFINE``), so a GroupNorm (+ SiLU) in front of a conv needs one
read of its input here instead of the normalized tensor written and read back.

One program per (sample, group) over that group's contiguous C/G * H * W elements of an NCHW
tensor (optionally plus ``add[b, c]``, e.g. a ResNet's time embedding), two passes in fp32:
mean = sum(v) / n, var = sum((v - mean)^2) / n (biased, as GroupNorm), rstd = 1 / sqrt(var + eps);
then for each channel c of the group: scale = gamma[c] * rstd, shift = beta[c] - mean * scale
(+ add[b, c] * scale, folding the addition into the shift). Written as out[b, c] = (scale, shift).
The sums run in another order than torch's: the reference matches to fp32 rounding.
"""
import triton
import triton.language as tl


@triton.jit
def _group_values(base, add_ptr, c0, i0, n, HW, HAS_ADD: tl.constexpr, BLOCK: tl.constexpr):
    """The group's values [i0, i0 + BLOCK) in fp32 (+ add of their channel), 0 past its n, and the mask."""
    offs = i0 + tl.arange(0, BLOCK)
    ok = offs < n
    v = tl.load(base + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_ADD:
        v = tl.where(ok, v + tl.load(add_ptr + c0 + offs // HW, mask=ok, other=0.0), 0.0)
    return v, ok


@triton.jit
def _group_norm_affine_kernel(x_ptr, add_ptr, gamma_ptr, beta_ptr, out_ptr, C, HW, CG, G, eps,
                              HAS_ADD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // G
    g = pid % G
    n = CG * HW
    base = x_ptr + (b.to(tl.int64) * C + g * CG) * HW
    c0 = b * C + g * CG  # this group's first (b, c) row of add / out
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, n, BLOCK):
        v, _ = _group_values(base, add_ptr, c0, i0, n, HW, HAS_ADD, BLOCK)
        acc += v
    mean = tl.sum(acc, axis=0) / n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, n, BLOCK):
        v, ok = _group_values(base, add_ptr, c0, i0, n, HW, HAS_ADD, BLOCK)
        d = tl.where(ok, v - mean, 0.0)
        acc += d * d
    rstd = 1.0 / tl.sqrt_rn(tl.sum(acc, axis=0) / n + eps)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < CG
    # gamma / beta in the module's own dtype (no per-call fp32 copy of the parameters)
    scale = tl.load(gamma_ptr + g * CG + offs_c, mask=c_ok, other=0.0).to(tl.float32) * rstd
    shift = tl.load(beta_ptr + g * CG + offs_c, mask=c_ok, other=0.0).to(tl.float32) - mean * scale
    if HAS_ADD:
        shift = shift + tl.load(add_ptr + c0 + offs_c, mask=c_ok, other=0.0) * scale
    tl.store(out_ptr + (c0 + offs_c) * 2, scale, mask=c_ok)
    tl.store(out_ptr + (c0 + offs_c) * 2 + 1, shift, mask=c_ok)


def group_norm_affine(x, add, gamma, beta, out, *, num_groups: int, eps: float) -> None:
    """out [B, C, 2] fp32 = (scale, shift) of GroupNorm(x (+ add[b, c])); x contiguous [B, C, H, W];
    ``add`` fp32 contiguous [B, C] or None; gamma / beta contiguous [C], any float dtype."""
    B, C = x.shape[0], x.shape[1]
    HW = x[0, 0].numel()
    CG = C // num_groups
    if B == 0 or C == 0:
        return
    BLOCK = min(4096, triton.next_power_of_2(max(CG * HW, 16)))
    _group_norm_affine_kernel[(B * num_groups,)](
        x, add if add is not None else out, gamma, beta, out, C, HW, CG, num_groups, float(eps),
        HAS_ADD=add is not None, BLOCK=BLOCK, BLOCK_C=triton.next_power_of_2(CG), num_warps=8 if BLOCK >= 2048 else 4)


# -- static report ----------------------------------------------------------------------------

STATIC_REPORT_CASES = [
    {"name": f"group_norm_affine{'_add' if add else ''}", "fn": _group_norm_affine_kernel,
     "signature": {"x_ptr": "*fp16", "add_ptr": "*fp32", "gamma_ptr": "*fp32", "beta_ptr": "*fp32",
                   "out_ptr": "*fp32", "C": "i32", "HW": "i32", "CG": "i32", "G": "i32", "eps": "fp32"},
     "constexprs": {"HAS_ADD": add, "BLOCK": 4096, "BLOCK_C": 16},
     "num_warps": 8, "num_stages": 3, "hot": True, "tensor_cores": False}
    for add in (False, True)
]
