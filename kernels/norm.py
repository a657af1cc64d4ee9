"""GroupNorm statistics folded into a per-(sample, channel) affine: the prologue of the implicit-GEMM
conv (``kernels/conv.py``, ``IN_AFFINE``), so a GroupNorm (+ SiLU) in front of a conv needs one
read of its input here instead of the normalized tensor written and read back.

One program per (sample, group) over that group's contiguous C/G * H * W elements of an NCHW
tensor (optionally plus ``add[b, c]``, e.g. a ResNet's time embedding), two passes in fp32:
mean = sum(v) / n, var = sum((v - mean)^2) / n (biased, as GroupNorm), rstd = 1 / sqrt(var + eps);
then for each channel c of the group: scale = gamma[c] * rstd, shift = beta[c] - mean * scale
(+ add[b, c] * scale, folding the addition into the shift). Written as out[b, c] = (scale, shift).
The sums run in another order than torch's: the reference matches to fp32 rounding.

``layer_norm_quantize``: LayerNorm over the last dimension (optionally affine, optionally with the
adaLN modulation ``* (1 + scale[b]) + shift[b]``) that writes both the normed tensor and (WRITE_CODES)
its dynamic per-token quantization (int8 or fp8 E4M3), so the projections behind the norm skip their own
quantization pass. One program per row. The codes are computed from the output as written (rounded
to its dtype first), with the quantizers' own math (IEEE division, round half to even), so they equal
``quantize_activation_*`` applied to that output bit for bit.
"""
import triton
import triton.language as tl

from ._common import dynamic_scale, interpreting, nan_to_zero, next_pow2, round_half_even, round_to_bf16, to_e4m3

AMAX_FLOOR = 1e-12
FP8_MAX = 448.0


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
    BLOCK = min(4096, next_pow2(max(CG * HW, 16)))
    _group_norm_affine_kernel[(B * num_groups,)](
        x, add if add is not None else out, gamma, beta, out, C, HW, CG, num_groups, float(eps),
        HAS_ADD=add is not None, BLOCK=BLOCK, BLOCK_C=next_pow2(CG), num_warps=8 if BLOCK >= 2048 else 4)


@triton.jit
def _normed(v, d, rstd, offs, mask, b, K, w_ptr, b_ptr, scale_ptr, shift_ptr, HAS_W: tl.constexpr,
            HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """(v - mean) * rstd, then the affine and the modulation, in fp32 (``d`` = v - mean)."""
    n = d * rstd
    if HAS_W:
        n = n * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        n = n + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        n = n * (1.0 + tl.load(scale_ptr + b * K + offs, mask=mask, other=0.0).to(tl.float32))
    if HAS_SHIFT:
        n = n + tl.load(shift_ptr + b * K + offs, mask=mask, other=0.0).to(tl.float32)
    return n


@triton.jit
def _as_stored(n, y_ptr):
    """fp32 ``n`` rounded to y's element type (to nearest even), kept in fp32."""
    if y_ptr.dtype.element_ty == tl.bfloat16:
        return round_to_bf16(n)
    if y_ptr.dtype.element_ty == tl.float16:
        return n.to(tl.float16).to(tl.float32)
    return n


@triton.jit
def _store_codes(q_ptrs, y, qs, mask, FP8: tl.constexpr, EMULATE_FP8: tl.constexpr, QMAX: tl.constexpr):
    # (stores rather than returns: the two branches' element types differ)
    if FP8:
        v = nan_to_zero(tl.math.div_rn(y, qs))
        tl.store(q_ptrs, to_e4m3(tl.minimum(tl.maximum(v, -QMAX), QMAX), EMULATE_FP8), mask=mask)
    else:
        q = nan_to_zero(round_half_even(tl.math.div_rn(y, qs)))
        tl.store(q_ptrs, tl.minimum(tl.maximum(q, -128.0), 127.0).to(tl.int8), mask=mask)


@triton.jit
def _layer_norm_quantize_kernel(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, y_ptr, q_ptr, s_ptr, K, L, eps,
                                HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                                HAS_SHIFT: tl.constexpr, WRITE_CODES: tl.constexpr, FP8: tl.constexpr,
                                EMULATE_FP8: tl.constexpr, AMAX_MIN: tl.constexpr, QMAX: tl.constexpr,
                                BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // L  # the sample whose modulation applies
    x_row = x_ptr + row * K
    y_row = y_ptr + row * K
    q_row = q_ptr + row * K
    if SINGLE_PASS:  # the row stays in registers: one read of x, one write each of y and the codes
        offs = tl.arange(0, BLOCK_K)
        mask = offs < K
        v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(v, axis=0) / K
        d = tl.where(mask, v - mean, 0.0)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(d * d, axis=0) / K + eps)
        y = _as_stored(_normed(v, d, rstd, offs, mask, b, K, w_ptr, b_ptr, scale_ptr, shift_ptr, HAS_W, HAS_B,
                               HAS_SCALE, HAS_SHIFT), y_ptr)
        tl.store(y_row + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        if WRITE_CODES:
            amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0)
            qs = dynamic_scale(amax, tl.sum(tl.where(mask, y * 0.0, 0.0), axis=0), AMAX_MIN, QMAX)
            _store_codes(q_row + offs, y, qs, mask, FP8, EMULATE_FP8, QMAX)
            tl.store(s_ptr + row, qs)
    else:  # wide rows: statistics, then y (and its amax), then the codes from y as written
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            acc += tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / K
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            mask = offs < K
            d = tl.where(mask, tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
            acc += d * d
        rstd = 1.0 / tl.sqrt_rn(tl.sum(acc, axis=0) / K + eps)
        amax_acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        bad = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            mask = offs < K
            v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, v - mean, 0.0)
            y = _as_stored(_normed(v, d, rstd, offs, mask, b, K, w_ptr, b_ptr, scale_ptr, shift_ptr, HAS_W, HAS_B,
                                   HAS_SCALE, HAS_SHIFT), y_ptr)
            tl.store(y_row + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
            amax_acc = tl.maximum(amax_acc, tl.where(mask, tl.abs(y), 0.0))
            bad += tl.where(mask, y * 0.0, 0.0)
        if WRITE_CODES:
            qs = dynamic_scale(tl.max(amax_acc, axis=0), tl.sum(bad, axis=0), AMAX_MIN, QMAX)
            for k0 in range(0, K, BLOCK_K):
                offs = k0 + tl.arange(0, BLOCK_K)
                mask = offs < K
                y = tl.load(y_row + offs, mask=mask, other=0.0).to(tl.float32)  # this program's own stores
                _store_codes(q_row + offs, y, qs, mask, FP8, EMULATE_FP8, QMAX)
            tl.store(s_ptr + row, qs)


LAYER_NORM_MAX_BLOCK = 8192  # rows up to this width (every diffusion hidden size) take the single pass


def layer_norm_quantize(x2d, weight, bias, scale, shift, y, q, scales, *, rows_per_sample: int, eps: float,
                        fp8: bool, block_k=None) -> None:
    """y [M, K] (x's dtype), q [M, K] int8 / float8e4nv, scales [M] fp32 from contiguous x2d [M, K]
    (q and scales None: y only);
    weight / bias [K] or None; scale / shift contiguous [M // rows_per_sample, K] or None.
    ``block_k`` (tests) forces a narrower block, and so the multi-pass loop."""
    M, K = x2d.shape
    if M == 0:
        return
    BLOCK_K = block_k or min(next_pow2(K), LAYER_NORM_MAX_BLOCK)
    _layer_norm_quantize_kernel[(M,)](
        x2d, weight if weight is not None else x2d, bias if bias is not None else x2d,
        scale if scale is not None else x2d, shift if shift is not None else x2d, y, y if q is None else q,
        y if scales is None else scales, K, rows_per_sample, float(eps), HAS_W=weight is not None,
        HAS_B=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, WRITE_CODES=q is not None,
        FP8=fp8, EMULATE_FP8=interpreting(), AMAX_MIN=AMAX_FLOOR,
        QMAX=FP8_MAX if fp8 else 127.0, BLOCK_K=BLOCK_K, SINGLE_PASS=K <= BLOCK_K,
        num_warps=8 if BLOCK_K >= 4096 else 4)


# -- static report ----------------------------------------------------------------------------

STATIC_REPORT_CASES = [
    {"name": f"group_norm_affine{'_add' if add else ''}", "fn": _group_norm_affine_kernel,
     "signature": {"x_ptr": "*fp16", "add_ptr": "*fp32", "gamma_ptr": "*fp32", "beta_ptr": "*fp32",
                   "out_ptr": "*fp32", "C": "i32", "HW": "i32", "CG": "i32", "G": "i32", "eps": "fp32"},
     "constexprs": {"HAS_ADD": add, "BLOCK": 4096, "BLOCK_C": 16},
     "num_warps": 8, "num_stages": 3, "hot": True, "tensor_cores": False}
    for add in (False, True)
]


def _layer_norm_quantize_case(name, dt, block_k, single, fp8, affine, modulated):
    return {"name": name, "fn": _layer_norm_quantize_kernel,
            "signature": {"x_ptr": dt, "w_ptr": dt, "b_ptr": dt, "scale_ptr": dt, "shift_ptr": dt, "y_ptr": dt,
                          "q_ptr": "*fp8e4nv" if fp8 else "*i8", "s_ptr": "*fp32", "K": "i32", "L": "i32",
                          "eps": "fp32"},
            "constexprs": {"HAS_W": affine, "HAS_B": affine, "HAS_SCALE": modulated, "HAS_SHIFT": modulated,
                           "WRITE_CODES": True, "FP8": fp8, "EMULATE_FP8": False, "AMAX_MIN": AMAX_FLOOR, "QMAX": FP8_MAX if fp8 else 127.0,
                           "BLOCK_K": block_k, "SINGLE_PASS": single},
            "num_warps": 8 if block_k >= 4096 else 4, "num_stages": 3, "hot": True, "tensor_cores": False,
            **({"archs": ["89", "90a"]} if fp8 else {})}


# the UNet's affine LayerNorms (320..1280 -> 512..2048 wide) and the DiTs' modulated adaLN (1152..3072
# -> 2048 / 4096), int8 and fp8; the multi-pass loop above 8192
STATIC_REPORT_CASES += [
    _layer_norm_quantize_case("layer_norm_int8_fp16_k2048", "*fp16", 2048, True, False, True, False),
    _layer_norm_quantize_case("adaln_int8_bf16_k4096", "*bf16", 4096, True, False, False, True),
    _layer_norm_quantize_case("adaln_fp8_bf16_k4096", "*bf16", 4096, True, True, False, True),
    _layer_norm_quantize_case("adaln_int8_bf16_k8192_loop", "*bf16", 8192, False, False, False, True),
]
