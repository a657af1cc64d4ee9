"""Quantized k x k conv as an implicit GEMM: int8 activations quantized inside the kernel from
the float NCHW input (no im2col in memory), int8 or packed-int4 weights, int32 accumulation.

GEMM view (the same as ``F.unfold`` + ``kernels/gemm.py``'s int8 GEMM):
  m = (b, oh, ow) over B * Ho * Wo output pixels; n = output channel;
  k = (c, i, j) over C * KH * KW in the weight's (c, kh, kw) order;
  A[m, k] = x[b, c, oh * SH - PH + i * DH, ow * SW - PW + j * DW], 0 outside the image.
The A tile is gathered straight from x with computed addresses (padding via masks), so a padded
position is float 0 before quantization and becomes the code ``zp`` exactly like unfold + quantize.

Numerics, identical to ``diffaccel.ops.conv``'s reference (unfold + ``int8_linear_reference``):
- x' = fp32(x) / smooth[c] (IEEE division, only with a smoothing vector);
- dynamic per token (one output pixel's receptive field): a first pass over K takes
  amax = max |x'|, a_scale = max(amax, 1e-12) / 127; q = clamp(rne(x' / a_scale), -128, 127);
- static per tensor: q = clamp(rne(x' / scale) + zp, -128, 127); K padding past K contributes 0;
- the epilogue of ``kernels/gemm.py``'s int8 GEMM (zero-point correction with w_sum, per-channel
  or group-wise weight scales in the same fp32 order, activation scale, bias, one output cast);
- a split input (Q-Diffusion's cat(h, skip), static only): k < K1 and k >= K1 are quantized with
  their own scale and zero point and dequantized as two GEMMs (zero-point sums [2, N] per channel),
  y = y_0 + (y_1 + bias) in fp32, as ``diffaccel.ops.gemm.split_k_int8_linear`` composes them;
- out is written in [B, N, Ho, Wo] directly.
Launches pass enable_fp_fusion=False (no FMA contraction in the epilogue, as in kernels/gemm.py).
"""
import triton
import triton.language as tl

from ._common import (cdiv, dynamic_scale, interpreting, mul_sigmoid, nan_to_zero, round_half_even, to_e4m3,
                      unit_stride)
from .gemm import FP8_MAX, _add_weight_group, _int8_epilogue, _load_int4_tile_t, _load_int8_tile_t, _to_out

AMAX_FLOOR = 1e-12
MAX_INT32_OFFSET = 2**31 - 1


@triton.jit
def _gather_x(x_img, row_off, ih0, iw0, offs_k, K, H, W, stride_xc, stride_xh, stride_xw, aff_img,
              KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, EVEN_K: tl.constexpr,
              IN_AFFINE: tl.constexpr = False, IN_SILU: tl.constexpr = False):
    """fp32 A[m, offs_k]^T ([BLOCK_K, BLOCK_M]) gathered from one image ``x_img``: ``row_off`` is
    each output pixel's receptive-field corner offset; 0 outside the image and past K. K-major so
    that the default layout puts a warp's threads on consecutive pixels: for stride 1 they read
    consecutive addresses (pixel-major is contiguous in NCHW), where k-major threads would not.
    IN_AFFINE: each value is first x * scale[c] + shift[c] (``aff_img``: this image's [C, 2] rows of
    (scale, shift), a GroupNorm folded per channel), then SiLU with IN_SILU; padding stays 0 (the
    conv pads the transformed input)."""
    c = offs_k // (KH * KW)
    r = offs_k % (KH * KW)
    di = (r // KW) * DH
    dj = (r % KW) * DW
    # one unsigned compare per axis covers both 0 <= i and i < size
    ih = (ih0[None, :] + di[:, None]).to(tl.uint32, bitcast=True)
    iw = (iw0[None, :] + dj[:, None]).to(tl.uint32, bitcast=True)
    mask = (ih < H) & (iw < W)
    if not EVEN_K:
        mask = mask & (offs_k[:, None] < K)
    koff = c * stride_xc + di * stride_xh + dj * stride_xw
    x = tl.load(x_img + (koff[:, None] + row_off[None, :]), mask=mask, other=0.0).to(tl.float32)
    if IN_AFFINE:
        c_ok = offs_k < K
        scale = tl.load(aff_img + 2 * c, mask=c_ok, other=0.0)
        shift = tl.load(aff_img + 2 * c + 1, mask=c_ok, other=0.0)
        x = x * scale[:, None] + shift[:, None]
        if IN_SILU:
            x = mul_sigmoid(x, x)  # SiLU
        x = tl.where(mask, x, 0.0)
    return x


@triton.jit
def _smoothed(x, offs_k, K, smooth_ptr, HAS_SMOOTH: tl.constexpr, KHW: tl.constexpr):
    if HAS_SMOOTH:
        s = tl.load(smooth_ptr + offs_k // KHW, mask=offs_k < K, other=1.0)
        x = tl.math.div_rn(x, s[:, None])
    return x


@triton.jit
def _conv_tile(x_ptr, N, Wo, HWo, PH, PW, TILES_PER_IMAGE, stride_xb, stride_xh, stride_xw,
               SH: tl.constexpr, SW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile: one image per M tile, so the batch offset is a scalar and every offset
    inside an image is int32. Returns (b, p, offs_n, p_mask, n_mask, rn, ih0, iw0, x_img, row_off):
    ``p`` / ``rn`` are the output pixels / channels wrapped into range for the main-loop loads
    (those past HWo / N are never stored), ``ih0, iw0`` each pixel's receptive-field corner and
    ``row_off`` its offset in the image ``x_img``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_m // TILES_PER_IMAGE
    offs_p = (pid_m % TILES_PER_IMAGE) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    p_mask = offs_p < HWo
    n_mask = offs_n < N
    p = offs_p % HWo
    rn = offs_n % N
    ih0 = (p // Wo) * SH - PH
    iw0 = (p % Wo) * SW - PW
    x_img = x_ptr + b.to(tl.int64) * stride_xb
    row_off = ih0 * stride_xh + iw0 * stride_xw
    return b, p, offs_n, p_mask, n_mask, rn, ih0, iw0, x_img, row_off


@triton.jit
def _store_nchw(out_ptr, y, b, p, offs_n, p_mask, n_mask, stride_ob, stride_on):
    # [B, N, Ho, Wo]: pixels are contiguous within one (b, n) plane, so stores coalesce along m
    out_img = out_ptr + b.to(tl.int64) * stride_ob
    tl.store(out_img + (p[:, None] + offs_n[None, :] * stride_on), _to_out(y, out_ptr),
             mask=p_mask[:, None] & n_mask[None, :])


@triton.jit
def _field_amax(x_img, row_off, ih0, iw0, K, H, W, stride_xc, stride_xh, stride_xw, smooth_ptr, aff_img,
                KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr, HAS_SMOOTH: tl.constexpr, EVEN_K: tl.constexpr,
                IN_AFFINE: tl.constexpr = False, IN_SILU: tl.constexpr = False):
    """(max |x'|, sum of x' * 0) over each output pixel's receptive field (one unfolded row): dynamic
    per-token quantization's extra pass over this block's rows (see _common.dynamic_scale)."""
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    bad = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _gather_x(x_img, row_off, ih0, iw0, offs_k, K, H, W, stride_xc, stride_xh, stride_xw, aff_img, KH, KW, DH,
                      DW, EVEN_K, IN_AFFINE, IN_SILU)
        x = _smoothed(x, offs_k, K, smooth_ptr, HAS_SMOOTH, KH * KW)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
        bad += tl.sum(x * 0.0, axis=0)
    return amax, bad


@triton.jit
def _act_codes(x_img, row_off, ih0, iw0, offs_k, K, H, W, stride_xc, stride_xh, stride_xw, smooth_ptr, a_scale, zp,
               aff_img, KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
               PER_TOKEN: tl.constexpr, HAS_SMOOTH: tl.constexpr, EVEN_K: tl.constexpr,
               IN_AFFINE: tl.constexpr, IN_SILU: tl.constexpr):
    """int8 codes [BLOCK_M, BLOCK_K] of the gathered tile: dynamic (per-pixel ``a_scale``) or
    static (+ ``zp``)."""
    x = _gather_x(x_img, row_off, ih0, iw0, offs_k, K, H, W, stride_xc, stride_xh, stride_xw, aff_img, KH, KW, DH, DW,
                  EVEN_K, IN_AFFINE, IN_SILU)
    x = _smoothed(x, offs_k, K, smooth_ptr, HAS_SMOOTH, KH * KW)
    if PER_TOKEN:
        q = nan_to_zero(round_half_even(tl.math.div_rn(x, a_scale[None, :])))
    else:
        q = nan_to_zero(round_half_even(tl.math.div_rn(x, a_scale))) + zp.to(tl.float32)
    q = tl.minimum(tl.maximum(q, -128.0), 127.0)
    if not EVEN_K:
        q = tl.where(offs_k[:, None] < K, q, 0.0)  # K padding contributes 0, not the zero point
    return tl.trans(q.to(tl.int8))


@triton.jit
def _conv_k_range(k_begin, k_end, x_img, row_off, ih0, iw0, rn, offs_n, n_mask, w_ptr, w_scale_ptr, wsum_ptr,
                  smooth_ptr, a_scale, zp, K, H, W, stride_xc, stride_xh, stride_xw, stride_wn, stride_wsn, aff_img,
                  KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_K: tl.constexpr,
                  GROUPED: tl.constexpr, W_INT4: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_ZP: tl.constexpr,
                  HAS_SMOOTH: tl.constexpr, EVEN_K: tl.constexpr, IN_AFFINE: tl.constexpr, IN_SILU: tl.constexpr):
    """The GEMM over k in [k_begin, k_end) with one activation quantizer (a_scale, zp): the int32
    accumulator (per-channel weights) or the fp32 sum of its dequantized weight groups (GROUPED).
    GROUP_K: the weight group (one scale per (n, group)), or BLOCK_K for per-channel scales; a
    group runs as GROUP_K // BLOCK_K sub-blocks so the gathered tile stays small in registers.
    Activations at k >= k_lim are masked to 0 (K padding, the end of a split range, or the end of a
    group that is not a multiple of BLOCK_K: 16, 32 are below the int8 dot's minimum K), so each
    range's and each group's int32 sum stays its own."""
    if GROUPED:
        y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    k_lim = k_end
    for k0 in range(k_begin, k_end, GROUP_K):
        if GROUPED:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        if GROUP_K % BLOCK_K != 0:
            k_lim = k0 + GROUP_K
        for kk in range(0, GROUP_K, BLOCK_K):
            kb = k0 + kk
            a = _act_codes(x_img, row_off, ih0, iw0, kb + tl.arange(0, BLOCK_K), k_lim, H, W, stride_xc, stride_xh,
                           stride_xw, smooth_ptr, a_scale, zp, aff_img, KH, KW, DH, DW, PER_TOKEN, HAS_SMOOTH, EVEN_K,
                           IN_AFFINE, IN_SILU)
            if W_INT4:  # even k times low nibbles plus odd k times high nibbles (exact int32 sums)
                a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))
                w_lo, w_hi = _load_int4_tile_t(w_ptr, rn, kb, K, stride_wn, BLOCK_K, EVEN_K)
                acc = tl.dot(a_even, w_lo, acc, out_dtype=tl.int32)
                acc = tl.dot(a_odd, w_hi, acc, out_dtype=tl.int32)
            else:
                w = _load_int8_tile_t(w_ptr, rn, kb, K, stride_wn, BLOCK_K, EVEN_K)
                acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        if GROUPED:
            y = _add_weight_group(y, acc, k0 // GROUP_K, zp, wsum_ptr, w_scale_ptr, offs_n, n_mask, stride_wsn,
                                  HAS_ZP)
    if GROUPED:
        return y
    else:
        return acc


@triton.jit
def _int8_conv2d_kernel(
    x_ptr, w_ptr, a_scale_ptr, w_scale_ptr, zp_ptr, wsum_ptr, bias_ptr, smooth_ptr, aff_ptr, out_ptr,
    N, K, K1, H, W, Wo, HWo, PH, PW, TILES_PER_IMAGE,
    stride_xb, stride_xc, stride_xh, stride_xw, stride_wn, stride_wsn, stride_ob, stride_on,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_K: tl.constexpr,
    GROUPED: tl.constexpr, W_INT4: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_ZP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SMOOTH: tl.constexpr, SPLIT: tl.constexpr, AMAX_MIN: tl.constexpr,
    EVEN_K: tl.constexpr, IN_AFFINE: tl.constexpr = False, IN_SILU: tl.constexpr = False,
):
    b, p, offs_n, p_mask, n_mask, rn, ih0, iw0, x_img, row_off = _conv_tile(
        x_ptr, N, Wo, HWo, PH, PW, TILES_PER_IMAGE, stride_xb, stride_xh, stride_xw, SH, SW, BLOCK_M, BLOCK_N)
    aff_img = aff_ptr + b.to(tl.int64) * (2 * (K // (KH * KW)))  # this image's [C, 2] (scale, shift)

    zp = tl.zeros((), dtype=tl.int32)
    if HAS_ZP:
        zp = tl.load(zp_ptr)
    if PER_TOKEN:
        amax, bad = _field_amax(x_img, row_off, ih0, iw0, K, H, W, stride_xc, stride_xh, stride_xw, smooth_ptr, aff_img,
                                KH, KW, DH, DW, BLOCK_M, BLOCK_K, HAS_SMOOTH, EVEN_K, IN_AFFINE, IN_SILU)
        a_scale = dynamic_scale(amax, bad, AMAX_MIN, 127.0)
    else:
        a_scale = tl.load(a_scale_ptr)

    # K1 == K without a split; with one (Q-Diffusion's cat(h, skip) input, static activations),
    # [K1, K) has its own scale and zero point, and the two ranges are dequantized separately and
    # summed in fp32 with the bias on the second, as the reference's two GEMMs are
    total = _conv_k_range(0, K1, x_img, row_off, ih0, iw0, rn, offs_n, n_mask, w_ptr, w_scale_ptr, wsum_ptr,
                          smooth_ptr, a_scale, zp, K, H, W, stride_xc, stride_xh, stride_xw, stride_wn, stride_wsn,
                          aff_img, KH, KW, DH, DW, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_K, GROUPED, W_INT4, PER_TOKEN,
                          HAS_ZP, HAS_SMOOTH, EVEN_K, IN_AFFINE, IN_SILU)
    if SPLIT:
        y = _int8_epilogue(total, a_scale, zp, wsum_ptr, w_scale_ptr, bias_ptr, offs_n, n_mask, GROUPED, PER_TOKEN,
                           HAS_ZP, False)
        a_scale2 = tl.load(a_scale_ptr + 1)
        zp2 = tl.zeros((), dtype=tl.int32)
        if HAS_ZP:
            zp2 = tl.load(zp_ptr + 1)
        # per-channel zero-point sums are [2, N]: the second range's row follows the first
        wsum2_ptr = wsum_ptr if GROUPED else wsum_ptr + N
        total2 = _conv_k_range(K1, K, x_img, row_off, ih0, iw0, rn, offs_n, n_mask, w_ptr, w_scale_ptr, wsum_ptr,
                               smooth_ptr, a_scale2, zp2, K, H, W, stride_xc, stride_xh, stride_xw, stride_wn,
                               stride_wsn, aff_img, KH, KW, DH, DW, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_K, GROUPED,
                               W_INT4, PER_TOKEN, HAS_ZP, HAS_SMOOTH, EVEN_K, IN_AFFINE, IN_SILU)
        y = y + _int8_epilogue(total2, a_scale2, zp2, wsum2_ptr, w_scale_ptr, bias_ptr, offs_n, n_mask, GROUPED,
                               PER_TOKEN, HAS_ZP, HAS_BIAS)
    else:
        y = _int8_epilogue(total, a_scale, zp, wsum_ptr, w_scale_ptr, bias_ptr, offs_n, n_mask, GROUPED, PER_TOKEN,
                           HAS_ZP, HAS_BIAS)
    _store_nchw(out_ptr, y, b, p, offs_n, p_mask, n_mask, stride_ob, stride_on)


def pick_conv_config(M: int, N: int, K: int, group_size: int, w_int4: bool, split: bool = False,
                     prologue: bool = False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_K, num_warps, num_stages): a fixed table (the configs
    STATIC_REPORT_CASES compiles spill-free for sm_80/89/90a). GROUP_K is the weight group size
    (per-channel: BLOCK_K). The in-kernel gather + quantization is CUDA-core work that every N tile
    repeats, so tiles favour many threads per A tile over large register tiles; int4 weights need
    BLOCK_K = 64 (two K = 32 dots over the even and odd k) and a smaller tile to stay in registers.
    A split input keeps the first range's fp32 result live through the second range's loop, one
    more [BLOCK_M, BLOCK_N] tile: its tiles are those that stay spill-free with it. The GroupNorm +
    SiLU prologue takes the same smaller tile with group-wise int4 weights (128 x 64 spilled 4-40 B)."""
    if w_int4:  # shapes ptxas keeps spill-free on all three archs (64 x 64 at 8 warps spills on sm_89)
        if not group_size:
            return 64, 32, 64, 64, 8, 3
        if split or prologue:  # 128 x 64 at 8 warps and 64 x 64 at 4 warps spill on sm_89 with the extra tile
            return 64, 64, 64, group_size, 8, 3
        if M <= 64:
            return 64, 64, 64, group_size, 4, 3
        return 128, 64, 64, group_size, 8, 3
    if M <= 64:
        return 64, 64, 32, group_size or 32, 4, 3
    if group_size or split:  # a second fp32 tile: the group sums, or the split's first range
        return 64, 128, 32, group_size or 32, 8, 3
    return 128, 128, 32, 32, 16, 3


def _gemm_view(x, w, out, kernel_size) -> tuple:
    """(B, H, W, N, Ho, Wo, K, M) of the implicit GEMM x [B, C, H, W] -> out [B, N, Ho, Wo]. Checks that
    one sample fits the kernels' int32 offsets (x may be a strided view, so its span is measured)."""
    B, C, H, W = x.shape
    N, (Ho, Wo) = w.shape[0], out.shape[2:]
    K, M = C * kernel_size[0] * kernel_size[1], B * Ho * Wo
    per_sample_x = sum((s - 1) * abs(st) for s, st in zip(x.shape[1:], x.stride()[1:]))
    if M and N and (per_sample_x > MAX_INT32_OFFSET or out[0].numel() > MAX_INT32_OFFSET):
        raise ValueError(f"x: one sample spans more than 2**31 - 1 elements (shape {tuple(x.shape)}, "
                         f"out {tuple(out.shape)}); the kernel indexes within a sample in int32")
    return B, H, W, N, Ho, Wo, K, M


def int8_conv2d(x, w, w_scale, smooth, act_scale, zero_point, w_sum, bias, out, *, kernel_size, stride, padding,
                dilation, group_size: int, w_int4: bool, act_split: int = 0, in_affine=None,
                in_silu: bool = False) -> None:
    """out[B, N, Ho, Wo] = dequant(quant(im2col(x)) @ W_q^T) (+ bias) without materialising im2col.
    ``act_scale`` None: dynamic per output pixel; else static per tensor (``zero_point`` optional).
    ``smooth`` is per input channel [C]; ``w_scale`` / ``w_sum`` [N] or [N, K // group_size] with
    unit stride along groups. ``act_split`` = C1 > 0 (static only): channels [0, C1) and [C1, C) have
    their own quantizers, ``act_scale`` / ``zero_point`` [2] and per-channel ``w_sum`` contiguous [2, N].
    ``in_affine`` fp32 contiguous [B, C, 2]: x is first x * scale[b, c] + shift[b, c] (then SiLU with
    ``in_silu``), a GroupNorm (+ SiLU) applied in the gather."""
    B, H, W, N, Ho, Wo, K, M = _gemm_view(x, w, out, kernel_size)
    if M == 0 or N == 0:
        return
    KH, KW = kernel_size
    per_token = act_scale is None
    K1 = act_split * KH * KW if act_split else K
    BM, BN, BK, GK, warps, stages = pick_conv_config(M, N, K, group_size, w_int4, split=bool(act_split),
                                                     prologue=in_affine is not None)
    dummy = out  # never read: the constexpr flags switch its loads off
    tiles_per_image = cdiv(Ho * Wo, BM)
    grid = (B * tiles_per_image, cdiv(N, BN))
    _int8_conv2d_kernel[grid](
        x, w, act_scale if act_scale is not None else dummy, w_scale,
        zero_point if zero_point is not None else dummy, w_sum if w_sum is not None else dummy,
        bias if bias is not None else dummy, smooth if smooth is not None else dummy,
        in_affine if in_affine is not None else dummy, out,
        N, K, K1, H, W, Wo, Ho * Wo, padding[0], padding[1], tiles_per_image,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3), w.stride(0), w_scale.stride(0) if group_size else 0,
        out.stride(0), out.stride(1),
        KH=KH, KW=KW, SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1],
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_K=GK, GROUPED=bool(group_size), W_INT4=w_int4,
        PER_TOKEN=per_token,
        HAS_ZP=zero_point is not None, HAS_BIAS=bias is not None, HAS_SMOOTH=smooth is not None,
        SPLIT=bool(act_split), AMAX_MIN=AMAX_FLOOR, EVEN_K=K % BK == 0 and K1 % BK == 0 and GK % BK == 0,
        IN_AFFINE=in_affine is not None, IN_SILU=bool(in_silu),
        num_warps=warps, num_stages=stages,
        enable_fp_fusion=False,
    )


# -- FP8 activations and weights (sm_89+; Triton emits fp8 tensor-core code for sm_90a) ---------

@triton.jit
def _fp8_k_range(k_begin, k_end, x_img, row_off, ih0, iw0, rn, w_ptr, smooth_ptr, a_div, K, H, W, stride_xc,
                 stride_xh, stride_xw, stride_wn, KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr,
                 DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_SMOOTH: tl.constexpr, FMAX: tl.constexpr, EMULATE_FP8: tl.constexpr, EVEN_K: tl.constexpr):
    """The fp32 sum over k in [k_begin, k_end) of E4M3(x' / a_div) * w: activations and weights past
    k_end are masked to 0 (K padding, or the end of a split input's first range)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _gather_x(x_img, row_off, ih0, iw0, offs_k, k_end, H, W, stride_xc, stride_xh, stride_xw, x_img, KH, KW,
                      DH, DW, EVEN_K)
        x = _smoothed(x, offs_k, k_end, smooth_ptr, HAS_SMOOTH, KH * KW)
        q = tl.minimum(tl.maximum(nan_to_zero(tl.math.div_rn(x, a_div)), -FMAX), FMAX)  # masked: x = 0 -> code 0
        a = tl.trans(to_e4m3(q, EMULATE_FP8))
        w_ptrs = w_ptr + offs_k[:, None] + rn[None, :] * stride_wn  # W^T tile [BLOCK_K, BLOCK_N]
        if EVEN_K:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_end, other=0.0)
        # fp32 promotion per K tile (Hopper's fp8 accumulator; see kernels/gemm.py's fp8 GEMM)
        acc = tl.dot(a, w, acc, out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_K)
    return acc


@triton.jit
def _fp8_conv2d_kernel(
    x_ptr, w_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, smooth_ptr, out_ptr,
    N, K, K1, H, W, Wo, HWo, PH, PW, TILES_PER_IMAGE,
    stride_xb, stride_xc, stride_xh, stride_xw, stride_wn, stride_ob, stride_on,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PER_TOKEN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SMOOTH: tl.constexpr, AMAX_MIN: tl.constexpr, FMAX: tl.constexpr,
    EMULATE_FP8: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr = False,
):
    # the int8 kernel's tiling and gather; codes are E4M3 (no zero point), the accumulator fp32,
    # the epilogue that of kernels/gemm.py's fp8 GEMM. K1 == K without a split; with one (static
    # only), [K1, K) has its own scale and the two ranges are dequantized and summed in fp32 with
    # the bias on the second, as the reference's two GEMMs are.
    b, p, offs_n, p_mask, n_mask, rn, ih0, iw0, x_img, row_off = _conv_tile(
        x_ptr, N, Wo, HWo, PH, PW, TILES_PER_IMAGE, stride_xb, stride_xh, stride_xw, SH, SW, BLOCK_M, BLOCK_N)
    if PER_TOKEN:
        amax, bad = _field_amax(x_img, row_off, ih0, iw0, K, H, W, stride_xc, stride_xh, stride_xw, smooth_ptr, x_img,
                                KH, KW, DH, DW, BLOCK_M, BLOCK_K, HAS_SMOOTH, EVEN_K)
        a_scale = dynamic_scale(amax, bad, AMAX_MIN, FMAX)
        a_div = a_scale[None, :]
    else:
        a_scale = tl.load(a_scale_ptr)
        a_div = a_scale
    acc = _fp8_k_range(0, K1, x_img, row_off, ih0, iw0, rn, w_ptr, smooth_ptr, a_div, K, H, W, stride_xc, stride_xh,
                       stride_xw, stride_wn, KH, KW, DH, DW, BLOCK_M, BLOCK_N, BLOCK_K, HAS_SMOOTH, FMAX, EMULATE_FP8,
                       EVEN_K)
    w_scale = tl.load(w_scale_ptr + rn)
    if PER_TOKEN:
        y = acc * a_scale[:, None] * w_scale[None, :]
    else:
        y = acc * a_scale * w_scale[None, :]
    if SPLIT:
        a_scale2 = tl.load(a_scale_ptr + 1)
        acc2 = _fp8_k_range(K1, K, x_img, row_off, ih0, iw0, rn, w_ptr, smooth_ptr, a_scale2, K, H, W, stride_xc,
                            stride_xh, stride_xw, stride_wn, KH, KW, DH, DW, BLOCK_M, BLOCK_N, BLOCK_K, HAS_SMOOTH,
                            FMAX, EMULATE_FP8, EVEN_K)
        y2 = acc2 * a_scale2 * w_scale[None, :]
        if HAS_BIAS:
            y2 = y2 + tl.load(bias_ptr + rn)[None, :]
        y = y + y2
    elif HAS_BIAS:
        y = y + tl.load(bias_ptr + rn)[None, :]
    _store_nchw(out_ptr, y, b, p, offs_n, p_mask, n_mask, stride_ob, stride_on)


def fp8_conv2d(x, w, w_scale, smooth, act_scale, bias, out, *, kernel_size, stride, padding, dilation,
               act_split: int = 0) -> None:
    """out[B, N, Ho, Wo] = conv(E4M3(x' / a_scale), W_fp8) * a_scale * w_scale (+ bias), im2col-free.
    ``act_scale`` None: dynamic per output pixel (amax / 448 over its receptive field); else
    static per tensor ([1], or [2] with ``act_split`` = C1 > 0: channels [0, C1) and [C1, C) have
    their own scale). ``w`` float8_e4m3fn [N, C * KH * KW], ``w_scale`` [N], ``smooth`` [C]."""
    B, H, W, N, Ho, Wo, K, M = _gemm_view(x, w, out, kernel_size)
    if M == 0 or N == 0:
        return
    KH, KW = kernel_size
    K1 = act_split * KH * KW if act_split else K
    w_scale = unit_stride(w_scale)  # (the int8 conv gets its w_scale contiguous from ops.gemm._same_layout)
    # the int8 per-channel tiles (a split keeps the first range's fp32 result live: its tiles)
    BM, BN, BK, _, warps, stages = pick_conv_config(M, N, K, 0, False, split=bool(act_split))
    tiles_per_image = cdiv(Ho * Wo, BM)
    dummy = out
    _fp8_conv2d_kernel[(B * tiles_per_image, cdiv(N, BN))](
        x, w, act_scale if act_scale is not None else dummy, w_scale, bias if bias is not None else dummy,
        smooth if smooth is not None else dummy, out,
        N, K, K1, H, W, Wo, Ho * Wo, padding[0], padding[1], tiles_per_image,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3), w.stride(0), out.stride(0), out.stride(1),
        KH=KH, KW=KW, SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1],
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, PER_TOKEN=act_scale is None, HAS_BIAS=bias is not None,
        HAS_SMOOTH=smooth is not None, AMAX_MIN=AMAX_FLOOR, FMAX=FP8_MAX, EMULATE_FP8=interpreting(),
        EVEN_K=K % BK == 0 and K1 % BK == 0, SPLIT=bool(act_split), num_warps=warps, num_stages=stages,
        enable_fp_fusion=False,
    )


# -- static report ----------------------------------------------------------------------------

def _conv_case(name, bm, bn, bk, warps, stages, *, group, w_int4, per_token, stride=1, x_dtype="*fp16",
               split=False, prologue=False):
    return {
        "name": name, "fn": _int8_conv2d_kernel,
        "signature": {"x_ptr": x_dtype, "w_ptr": "*u8" if w_int4 else "*i8", "a_scale_ptr": "*fp32",
                      "w_scale_ptr": "*fp32", "zp_ptr": "*i32", "wsum_ptr": "*i32", "bias_ptr": "*fp32",
                      "smooth_ptr": "*fp32", "aff_ptr": "*fp32", "out_ptr": "*fp16", "N": "i32", "K": "i32",
                      "K1": "i32", "H": "i32",
                      "W": "i32",
                      "Wo": "i32", "HWo": "i32", "PH": "i32", "PW": "i32", "TILES_PER_IMAGE": "i32",
                      "stride_xb": "i32", "stride_xc": "i32", "stride_xh": "i32", "stride_xw": "i32",
                      "stride_wn": "i32", "stride_wsn": "i32", "stride_ob": "i32", "stride_on": "i32"},
        "constexprs": {"KH": 3, "KW": 3, "SH": stride, "SW": stride, "DH": 1, "DW": 1,
                       "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_K": group or bk, "GROUPED": bool(group),
                       "W_INT4": w_int4, "PER_TOKEN": per_token, "HAS_ZP": not per_token, "HAS_BIAS": True,
                       "HAS_SMOOTH": False, "SPLIT": split, "AMAX_MIN": AMAX_FLOOR, "EVEN_K": True,
                       "IN_AFFINE": prologue, "IN_SILU": prologue},
        "num_warps": warps, "num_stages": stages, "hot": True, "tensor_cores": True,
    }


# the configs pick_conv_config returns, per activation mode and weight format
def _fp8_conv_case(name, bm, bn, bk, warps, stages, *, per_token, split=False):
    return {
        "name": name, "fn": _fp8_conv2d_kernel,
        "signature": {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32",
                      "bias_ptr": "*fp32", "smooth_ptr": "*fp32", "out_ptr": "*bf16", "N": "i32", "K": "i32",
                      "K1": "i32", "H": "i32", "W": "i32", "Wo": "i32", "HWo": "i32", "PH": "i32", "PW": "i32",
                      "TILES_PER_IMAGE": "i32", "stride_xb": "i32", "stride_xc": "i32", "stride_xh": "i32",
                      "stride_xw": "i32", "stride_wn": "i32", "stride_ob": "i32", "stride_on": "i32"},
        "constexprs": {"KH": 3, "KW": 3, "SH": 1, "SW": 1, "DH": 1, "DW": 1, "BLOCK_M": bm, "BLOCK_N": bn,
                       "BLOCK_K": bk, "PER_TOKEN": per_token, "HAS_BIAS": True, "HAS_SMOOTH": False,
                       "AMAX_MIN": AMAX_FLOOR, "FMAX": FP8_MAX, "EMULATE_FP8": False, "EVEN_K": True,
                       "SPLIT": split},
        "num_warps": warps, "num_stages": stages, "hot": True, "tensor_cores": True,
        # fp8 dots start at sm_89 (QMMA there, unlike kernels/gemm.py's fp8 GEMM; QGMMA on sm_90a)
        "archs": ["89", "90a"],
    }


STATIC_REPORT_CASES = [
    _conv_case("conv3x3_w8a8_dynamic_m128", 128, 128, 32, 16, 3, group=None, w_int4=False, per_token=True),
    _conv_case("conv3x3_w8a8_static_zp_m128", 128, 128, 32, 16, 3, group=None, w_int4=False, per_token=False),
    _conv_case("conv3x3_s2_w8a8_dynamic_m128", 128, 128, 32, 16, 3, group=None, w_int4=False, per_token=True,
               stride=2),
    _conv_case("conv3x3_w8a8_g128_dynamic_m64x128", 64, 128, 32, 8, 3, group=128, w_int4=False, per_token=True),
    _conv_case("conv3x3_w8a8_g64_static_zp_m64x128", 64, 128, 32, 8, 3, group=64, w_int4=False, per_token=False),
    _conv_case("conv3x3_w8a8_g64_dynamic_m64", 64, 64, 32, 4, 3, group=64, w_int4=False, per_token=True),
    _conv_case("conv3x3_w8a8_dynamic_m64", 64, 64, 32, 4, 3, group=None, w_int4=False, per_token=True),
    _conv_case("conv3x3_w4a8_g128_dynamic_m128x64", 128, 64, 64, 8, 3, group=128, w_int4=True, per_token=True),
    _conv_case("conv3x3_w4a8_g64_static_zp_m128x64", 128, 64, 64, 8, 3, group=64, w_int4=True, per_token=False),
    _conv_case("conv3x3_w4a8_g128_dynamic_m64", 64, 64, 64, 4, 3, group=128, w_int4=True, per_token=True),
    _conv_case("conv3x3_w4a8_channel_dynamic", 64, 32, 64, 8, 3, group=None, w_int4=True, per_token=True),
    # Q-Diffusion's split input (static, two quantizers; the up path's first resnet conv): one case
    # per split row of pick_conv_config
    _conv_case("conv3x3_w8a8_split_static_zp_m64x128", 64, 128, 32, 8, 3, group=None, w_int4=False,
               per_token=False, split=True),
    _conv_case("conv3x3_w8a8_g64_split_static_zp_m64x128", 64, 128, 32, 8, 3, group=64, w_int4=False,
               per_token=False, split=True),
    _conv_case("conv3x3_w8a8_split_static_zp_m64", 64, 64, 32, 4, 3, group=None, w_int4=False,
               per_token=False, split=True),
    _conv_case("conv3x3_w8a8_g64_split_static_zp_m64", 64, 64, 32, 4, 3, group=64, w_int4=False,
               per_token=False, split=True),
    _conv_case("conv3x3_w4a8_split_static_zp", 64, 32, 64, 8, 3, group=None, w_int4=True, per_token=False,
               split=True),
    _conv_case("conv3x3_w4a8_g64_split_static_zp_m64x64", 64, 64, 64, 8, 3, group=64, w_int4=True,
               per_token=False, split=True),
    # fp8 activations and weights: the per-channel rows of pick_conv_config (fp32 accumulator)
    # the GroupNorm + SiLU prologue (a ResNet block's convs): the per-channel affine and SiLU in the gather
    _conv_case("conv3x3_w8a8_dynamic_gn_silu_m128", 128, 128, 32, 16, 3, group=None, w_int4=False,
               per_token=True, prologue=True),
    _conv_case("conv3x3_w8a8_static_zp_gn_silu_m128", 128, 128, 32, 16, 3, group=None, w_int4=False,
               per_token=False, prologue=True),
    _conv_case("conv3x3_w8a8_dynamic_gn_silu_m64", 64, 64, 32, 4, 3, group=None, w_int4=False, per_token=True,
               prologue=True),
    _conv_case("conv3x3_w4a8_g128_dynamic_gn_silu_m64x64", 64, 64, 64, 8, 3, group=128, w_int4=True,
               per_token=True, prologue=True),
    _conv_case("conv3x3_w4a8_g64_static_zp_gn_silu_m64x64", 64, 64, 64, 8, 3, group=64, w_int4=True,
               per_token=False, prologue=True),
    _fp8_conv_case("conv3x3_fp8_dynamic_m128", 128, 128, 32, 16, 3, per_token=True),
    _fp8_conv_case("conv3x3_fp8_static_m64", 64, 64, 32, 4, 3, per_token=False),
    _fp8_conv_case("conv3x3_fp8_split_static_m64x128", 64, 128, 32, 8, 3, per_token=False, split=True),
    _fp8_conv_case("conv3x3_fp8_split_static_m64", 64, 64, 32, 4, 3, per_token=False, split=True),
]
