"""Quantized GEMMs: W8A8/W4A8 (int8 activations, int32 accumulation), FP8 W8A8, W4A16.

Layouts: activations A [M, K] row-major; weights W [N, K] row-major (K contiguous), int4
packed two per byte (uint8 [N, K // 2], low nibble = even k); out [M, N].

Numerics, identical to ``diffaccel.ops.gemm``'s reference so results are bit-exact:
- per-channel weights: acc = sum_k a_q * w_q (int32); acc -= zp * wsum[n] (static asymmetric);
  y = fp32(acc) * a_scale[m] * w_scale[n] (+ bias[n]) in that order, then one cast to out.
- group-wise weights (one group per K block): y = 0; for each group g in K order:
  y = y + fp32(acc_g - zp * wsum[n, g]) * w_scale[n, g]; then y * a_scale[m] (+ bias).
- fused activation quantization (int8): x' = x / smooth[k] (IEEE division, only with smooth);
  dynamic: a_scale[m] = max(amax_k |x'|, 1e-12) / 127, q = clamp(rne(x' / a_scale), -128, 127);
  static: q = clamp(rne(x' / scale) + zp, -128, 127).
- feed-forward epilogue (``int8_ffn_up``): v = act(y) with act = GELU (erf or tanh form) or, gated
  (GEGLU), v = y[:, n] * gelu(y[:, N + n]) over the two weight halves; then either one cast to
  out, or the next layer's static int8 quantization of that cast value (its codes written
  instead of the float activation). act is libdevice/interpreter math, not torch's: equal to
  the reference within a few fp32 ulps (the int32 sums before it are exact).
Launches pass enable_fp_fusion=False so the GPU epilogue does not contract a*b+c into an FMA,
which would round differently from the reference.
"""
import torch
import triton
import triton.language as tl

from ._common import (cdiv, dynamic_scale, interpreting, mul_sigmoid, nan_to_zero, next_pow2, round_half_even,
                      unit_stride,
                      round_to_bf16, row_abs_max, to_e4m3)

AMAX_FLOOR = 1e-12
FP8_MAX = 448.0


@triton.jit
def _to_out(y, out_ptr):
    """fp32 -> the output element type, bf16 rounded on the bits (round_to_bf16: the same in the
    interpreter and on the GPU)."""
    if out_ptr.dtype.element_ty == tl.bfloat16:
        y = round_to_bf16(y)
    return y.to(out_ptr.dtype.element_ty)


@triton.jit
def _round_to(y, VALUE_DTYPE: tl.constexpr):
    """fp32 ``y`` rounded to the float type VALUE_DTYPE (0 fp32, 1 fp16, 2 bf16) and back: the value
    a float output of that type would hold (as _to_out writes it)."""
    if VALUE_DTYPE == 1:
        y = y.to(tl.float16).to(tl.float32)
    elif VALUE_DTYPE == 2:
        y = round_to_bf16(y)
    return y


@triton.jit
def _gelu(y, TANH: tl.constexpr):
    """GELU in fp32: x * Phi(x) (erf), or the tanh form written as x * sigmoid(2u), which is
    0.5 * x * (1 + tanh(u)) without the cancellation of 1 + tanh(u) at large negative u."""
    if TANH:
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        return mul_sigmoid(y, 2.0 * u)
    return 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))


@triton.jit
def _add_weight_group(y, part, g, zp, wsum_ptr, w_scale_ptr, offs_n, n_mask, stride_wsn, HAS_ZP: tl.constexpr):
    """y + fp32(part - zp * wsum[n, g]) * w_scale[n, g]: one weight group's int32 sum, dequantized."""
    if HAS_ZP:
        gsum = tl.load(wsum_ptr + offs_n * stride_wsn + g, mask=n_mask, other=0)
        part = part - zp * gsum[None, :]
    gscale = tl.load(w_scale_ptr + offs_n * stride_wsn + g, mask=n_mask, other=0.0)
    return y + part.to(tl.float32) * gscale[None, :]


@triton.jit
def _int8_epilogue(total, a_scale, zp, wsum_ptr, w_scale_ptr, bias_ptr, offs_n, n_mask,
                   GROUPED: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] before the output cast. ``total`` is the int32 accumulator
    (per-channel weights) or the fp32 sum of dequantized groups (GROUPED); the multiplication
    order is the reference's (see the module docstring)."""
    if GROUPED:
        if PER_TOKEN:
            y = total * a_scale[:, None]
        else:
            y = total * a_scale
    else:
        acc = total
        if HAS_ZP:
            wsum = tl.load(wsum_ptr + offs_n, mask=n_mask, other=0)
            acc = acc - zp * wsum[None, :]
        w_scale = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)
        if PER_TOKEN:
            y = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
        else:
            y = acc.to(tl.float32) * a_scale * w_scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)
        y = y + bias[None, :]
    return y


@triton.jit
def _load_int4_tile_t(w_ptr, rn, k0, K, stride_wn, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """Packed W[rn, k0:k0+BLOCK_K]^T as two int8 [BLOCK_K // 2, BLOCK_N] tiles: the even k (low
    nibbles) and the odd k (high nibbles). Multiplying them with the even/odd activation columns
    avoids interleaving the nibbles in registers (a layout shuffle that made the kernel spill)."""
    offs_kh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    ptrs = w_ptr + offs_kh[:, None] + rn[None, :] * stride_wn
    if EVEN_K:
        p = tl.load(ptrs)
    else:
        p = tl.load(ptrs, mask=offs_kh[:, None] < K // 2, other=0)
    pi = p.to(tl.int32)
    lo = pi & 15
    hi = (pi >> 4) & 15
    lo = lo - ((lo & 8) << 1)
    hi = hi - ((hi & 8) << 1)
    return lo.to(tl.int8), hi.to(tl.int8)


@triton.jit
def _load_int8_tile_t(w_ptr, rn, k0, K, stride_wn, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """W[rn, k0:k0+BLOCK_K]^T as [BLOCK_K, BLOCK_N] (zeros past K). ``rn`` is already wrapped into
    [0, N) (columns past N are duplicates whose outputs are never stored), so no N mask."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    ptrs = w_ptr + offs_k[:, None] + rn[None, :] * stride_wn
    if EVEN_K:
        w = tl.load(ptrs)
    else:
        w = tl.load(ptrs, mask=offs_k[:, None] < K, other=0)
    return w


@triton.jit
def _load_int8_pairs(pair_ptr, rm, k0, K, stride_pm, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """A[rm, k0:k0+BLOCK_K] (int8) as its even and odd columns, two int8 [BLOCK_M, BLOCK_K // 2]
    tiles, from the int16 view of A (``stride_pm`` in pairs): byte 0 of each pair (little-endian)
    is the even k. The alternatives cost more: loading the columns with a stride of 2 defeats
    vectorised and asynchronous copies (W4A8 ran 12-25x slower than W8A8 on an H200), and splitting
    a loaded tile in registers spilled at every W4A8 g128 tile but 64 x 64."""
    offs_kh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    ptrs = pair_ptr + rm[:, None] * stride_pm + offs_kh[None, :]
    if EVEN_K:
        p = tl.load(ptrs)
    else:
        p = tl.load(ptrs, mask=offs_kh[None, :] < K // 2, other=0)
    even = ((p << 8) >> 8).to(tl.int8)  # int16 arithmetic shifts sign-extend the low byte
    odd = (p >> 8).to(tl.int8)
    return even, odd


@triton.jit
def _load_act_tile(a_ptr, rm, offs_k, K, stride_am, smooth_ptr, a_scale, zp,
                   FUSE_QUANT: tl.constexpr, HAS_SMOOTH: tl.constexpr, EVEN_K: tl.constexpr):
    """A[rm, offs_k] as int8 (``rm`` wrapped into [0, M)); quantized here when FUSE_QUANT
    (1 dynamic, 2 static)."""
    ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :]
    k_mask = offs_k[None, :] < K
    if FUSE_QUANT == 0:
        if EVEN_K:
            a = tl.load(ptrs)
        else:
            a = tl.load(ptrs, mask=k_mask, other=0)
    else:
        if EVEN_K:
            x = tl.load(ptrs).to(tl.float32)
        else:
            x = tl.load(ptrs, mask=k_mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            if EVEN_K:
                s = tl.load(smooth_ptr + offs_k)
            else:
                s = tl.load(smooth_ptr + offs_k, mask=offs_k < K, other=1.0)
            x = tl.math.div_rn(x, s[None, :])
        if FUSE_QUANT == 1:
            q = nan_to_zero(round_half_even(tl.math.div_rn(x, a_scale[:, None])))
        else:
            q = nan_to_zero(round_half_even(tl.math.div_rn(x, a_scale))) + zp.to(tl.float32)
        q = tl.minimum(tl.maximum(q, -128.0), 127.0)
        if EVEN_K:
            a = q.to(tl.int8)
        else:
            a = tl.where(k_mask, q, 0.0).to(tl.int8)  # K padding contributes 0, not the zero point
    return a


@triton.jit
def _row_offsets(pid_m, BLOCK_M: tl.constexpr, ROWS64: tl.constexpr):
    """The tile's row indices; int64 when ROWS64 (``rows64``), so that row * row stride does not wrap
    past 2^31 elements (int32 otherwise: cheaper address arithmetic for every other shape)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if ROWS64:
        offs_m = offs_m.to(tl.int64)
    return offs_m


def rows64(M: int, block_m: int, *row_strides: int) -> bool:
    """Whether a GEMM's row offsets (row < M rounded up to block_m, times a row stride) reach 2^31
    elements: e.g. M = 2 x 118,800 tokens (HunyuanVideo 720p, batch 2) at K = 15,360, where int32
    offsets wrap and the kernel reads, or writes, 2^32 elements away."""
    return (cdiv(M, block_m) * block_m) * max(row_strides) >= 2**31


@triton.jit
def _int8_act_gemm_kernel(
    a_ptr, w_ptr, a_scale_ptr, w_scale_ptr, zp_ptr, wsum_ptr, bias_ptr, smooth_ptr, out_ptr,
    out_scale_ptr, out_zp_ptr, out_smooth_ptr,
    M, N, K, stride_am, stride_wn, stride_om, stride_wsn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUPED: tl.constexpr, W_INT4: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_ZP: tl.constexpr,
    HAS_BIAS: tl.constexpr, FUSE_QUANT: tl.constexpr, HAS_SMOOTH: tl.constexpr, AMAX_MIN: tl.constexpr,
    EVEN_K: tl.constexpr, ACTIVATION: tl.constexpr = 0, GATED: tl.constexpr = False,
    OUT_QUANT: tl.constexpr = False, OUT_HAS_ZP: tl.constexpr = False, OUT_HAS_SMOOTH: tl.constexpr = False,
    VALUE_DTYPE: tl.constexpr = 0, ROWS64: tl.constexpr = False,
):
    # N is the number of output columns. The feed-forward epilogue (int8_ffn_up): ACTIVATION 1 =
    # GELU (erf), 2 = GELU (tanh); GATED reads a second weight tile at rows N + n (GEGLU's gate
    # half, its own accumulator) and writes y_n * gelu(gate_n). OUT_QUANT writes int8 codes of the
    # value rounded to VALUE_DTYPE, quantized with the next layer's static scale / zero point /
    # smoothing, instead of the float value.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = _row_offsets(pid_m, BLOCK_M, ROWS64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # wrapped row/column indices for the main-loop loads: no M/N masks there (fewer registers)
    rm = offs_m % M
    rn = offs_n % N

    zp = tl.zeros((), dtype=tl.int32)
    if HAS_ZP:
        zp = tl.load(zp_ptr)
    if PER_TOKEN:
        if FUSE_QUANT == 1:  # per-token scale of the fp input, one extra pass over this block's rows
            amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
            bad = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(a_ptr + rm[:, None] * stride_am + offs_k[None, :],
                            mask=offs_k[None, :] < K, other=0.0).to(tl.float32)
                if HAS_SMOOTH:
                    s = tl.load(smooth_ptr + offs_k, mask=offs_k < K, other=1.0)
                    x = tl.math.div_rn(x, s[None, :])
                amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
                bad += tl.sum(x * 0.0, axis=1)
            a_scale = dynamic_scale(amax, bad, AMAX_MIN, 127.0)
        else:
            a_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)  # rows past M: never stored
    else:
        a_scale = tl.load(a_scale_ptr)

    if GROUPED:  # fp32 sum of dequantized groups
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_gate = acc  # GATED only: the gate half's accumulator
    for k0 in range(0, K, BLOCK_K):
        if W_INT4:  # even k times low nibbles plus odd k times high nibbles (exact int32 sums)
            if FUSE_QUANT == 0:  # int8 codes read as int16 pairs (a_ptr is their int16 view)
                a_even, a_odd = _load_int8_pairs(a_ptr, rm, k0, K, stride_am, BLOCK_K, EVEN_K)
            else:
                offs_even = k0 + 2 * tl.arange(0, BLOCK_K // 2)
                a_even = _load_act_tile(a_ptr, rm, offs_even, K, stride_am, smooth_ptr, a_scale, zp,
                                        FUSE_QUANT, HAS_SMOOTH, EVEN_K)
                a_odd = _load_act_tile(a_ptr, rm, offs_even + 1, K, stride_am, smooth_ptr, a_scale, zp,
                                       FUSE_QUANT, HAS_SMOOTH, EVEN_K)
            w_lo, w_hi = _load_int4_tile_t(w_ptr, rn, k0, K, stride_wn, BLOCK_K, EVEN_K)
            part = tl.dot(a_even, w_lo, out_dtype=tl.int32)
            part = tl.dot(a_odd, w_hi, part, out_dtype=tl.int32)
            if GATED:
                g_lo, g_hi = _load_int4_tile_t(w_ptr, rn + N, k0, K, stride_wn, BLOCK_K, EVEN_K)
                part_gate = tl.dot(a_even, g_lo, out_dtype=tl.int32)
                part_gate = tl.dot(a_odd, g_hi, part_gate, out_dtype=tl.int32)
        else:
            a = _load_act_tile(a_ptr, rm, k0 + tl.arange(0, BLOCK_K), K, stride_am, smooth_ptr, a_scale, zp,
                               FUSE_QUANT, HAS_SMOOTH, EVEN_K)
            w = _load_int8_tile_t(w_ptr, rn, k0, K, stride_wn, BLOCK_K, EVEN_K)
            part = tl.dot(a, w, out_dtype=tl.int32)
            if GATED:
                part_gate = tl.dot(a, _load_int8_tile_t(w_ptr, rn + N, k0, K, stride_wn, BLOCK_K, EVEN_K),
                                   out_dtype=tl.int32)
        if GROUPED:  # BLOCK_K is the group size: one scale per (n, group)
            acc = _add_weight_group(acc, part, k0 // BLOCK_K, zp, wsum_ptr, w_scale_ptr, offs_n, n_mask, stride_wsn,
                                    HAS_ZP)
            if GATED:
                acc_gate = _add_weight_group(acc_gate, part_gate, k0 // BLOCK_K, zp, wsum_ptr, w_scale_ptr,
                                             offs_n + N, n_mask, stride_wsn, HAS_ZP)
        else:
            acc += part
            if GATED:
                acc_gate += part_gate

    y = _int8_epilogue(acc, a_scale, zp, wsum_ptr, w_scale_ptr, bias_ptr, offs_n, n_mask, GROUPED, PER_TOKEN, HAS_ZP,
                       HAS_BIAS)
    if GATED:
        gate = _int8_epilogue(acc_gate, a_scale, zp, wsum_ptr, w_scale_ptr, bias_ptr, offs_n + N, n_mask, GROUPED,
                              PER_TOKEN, HAS_ZP, HAS_BIAS)
        y = y * _gelu(gate, ACTIVATION == 2)
    elif ACTIVATION != 0:
        y = _gelu(y, ACTIVATION == 2)
    # (the output pointers are formed in each branch: formed before it, ptxas kept them live
    # through the epilogue and the W4A8 g128 tile spilled on sm_90a)
    if OUT_QUANT:  # the next layer's static quantization of the value it would have read
        v = _round_to(y, VALUE_DTYPE)
        if OUT_HAS_SMOOTH:
            v = tl.math.div_rn(v, tl.load(out_smooth_ptr + offs_n, mask=n_mask, other=1.0)[None, :])
        q = nan_to_zero(round_half_even(tl.math.div_rn(v, tl.load(out_scale_ptr))))
        if OUT_HAS_ZP:
            q = q + tl.load(out_zp_ptr).to(tl.float32)
        q = tl.minimum(tl.maximum(q, -128.0), 127.0)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], q.to(tl.int8),
                 mask=m_mask[:, None] & n_mask[None, :])
    else:
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], _to_out(y, out_ptr),
                 mask=m_mask[:, None] & n_mask[None, :])


ACTIVATIONS = {None: (0, False), "gelu": (1, False), "gelu_tanh": (2, False), "geglu": (1, True),
               "geglu_tanh": (2, True)}  # name -> (ACTIVATION, GATED)
VALUE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def pick_int8_config(M: int, N: int, K: int, group_size: int, activation=None, w_int4: bool = False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): a fixed table, no autotuning
    (these are the configs STATIC_REPORT_CASES compiles). With the feed-forward epilogue the tiles
    shrink where the static report found them spilling: gated (GEGLU, two accumulators) output
    tiles are 32 columns wide (64 weight rows; 128 x 64 spilled on sm_80/89, the W4A8 64 x 64 on all
    three archs), and group-wise weights take 32 rows (64 x 128 spilled on sm_89 with GELU). Group-wise
    int8 weights (not a preset) take 32 x 128 too: at 64 x 128 with BLOCK_K = 128 they spilled
    270-490 B on all three archs, at 32 x 128 8 B on sm_80 (so they are not in STATIC_REPORT_CASES)."""
    block_k = group_size if group_size else 64
    if M <= 16:
        bm, bn, warps, stages = 16, 64, 4, 4
    elif group_size:
        bm, bn, warps, stages = 64, 128, 8, 3
    elif M <= 64:
        bm, bn, warps, stages = 64, 64, 8, 3
    else:
        bm, bn, warps, stages = 128, 128, 8, 2
    if activation is not None and ACTIVATIONS[activation][1]:
        bn = 32
    elif group_size and M > 16 and (activation is not None or not w_int4):
        bm = 32
    return bm, bn, block_k, warps, stages


def int8_act_gemm(a, w, a_scale, w_scale, zero_point, w_sum, bias, smooth, out, *, group_size: int,
                  w_int4: bool, fuse_quant: int, per_token: bool, activation=None, out_quant=None,
                  value_dtype=torch.float32, config=None) -> None:
    """out[M, N] = dequant(A_q @ W_q^T) (+ bias). ``a`` is int8 [M, K] (fuse_quant=0) or the float
    activations (1: dynamic per-token, 2: static per-tensor); ``K`` is the logical K.
    ``activation`` (a key of ACTIVATIONS) applies the feed-forward epilogue; gated ones read 2N
    weight rows for N = out.shape[1] columns. ``out_quant`` = (scale [1], zero point [1] or None,
    smooth [N] or None): ``out`` is int8 and receives the codes of the value rounded to
    ``value_dtype``."""
    M = a.shape[0]
    N = out.shape[1]
    K = a.shape[1]
    if M == 0 or N == 0:
        return
    act, gated = ACTIVATIONS[activation]
    # config (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): benchmarks/gemm_configs.py tries candidates
    BM, BN, BK, warps, stages = config or pick_int8_config(M, N, K, group_size, activation, w_int4)
    dummy = out  # never read: the constexpr flags switch its loads off
    o_scale, o_zp, o_smooth = out_quant if out_quant is not None else (None, None, None)
    grid = (cdiv(M, BM), cdiv(N, BN))
    stride_am = a.stride(0)
    if w_int4 and fuse_quant == 0:  # the kernel reads int8 codes in (even, odd) pairs: K is even
        if a.stride(1) != 1 or a.stride(0) % 2 or a.storage_offset() % 2:
            # a fresh copy: contiguous() returns a contiguous view at an odd offset unchanged
            a = a.clone(memory_format=torch.contiguous_format)
        a, stride_am = a.view(torch.int16), a.stride(0) // 2
    _int8_act_gemm_kernel[grid](
        a, w, a_scale if a_scale is not None else dummy, w_scale,
        zero_point if zero_point is not None else dummy, w_sum if w_sum is not None else dummy,
        bias if bias is not None else dummy, smooth if smooth is not None else dummy, out,
        o_scale if o_scale is not None else dummy, o_zp if o_zp is not None else dummy,
        o_smooth if o_smooth is not None else dummy,
        M, N, K, stride_am, w.stride(0), out.stride(0), w_scale.stride(0) if group_size else 0,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUPED=bool(group_size), W_INT4=w_int4, PER_TOKEN=per_token,
        HAS_ZP=zero_point is not None, HAS_BIAS=bias is not None, FUSE_QUANT=fuse_quant,
        HAS_SMOOTH=smooth is not None, AMAX_MIN=AMAX_FLOOR, EVEN_K=K % BK == 0,
        ACTIVATION=act, GATED=gated, OUT_QUANT=out_quant is not None, OUT_HAS_ZP=o_zp is not None,
        OUT_HAS_SMOOTH=o_smooth is not None, VALUE_DTYPE=VALUE_DTYPES[value_dtype],
        ROWS64=rows64(M, BM, stride_am, out.stride(0)), num_warps=warps, num_stages=stages, enable_fp_fusion=False,
    )


# -- activation quantization with the smoothing division folded in -------------------------

@triton.jit
def _quantize_act_int8_kernel(x_ptr, smooth_ptr, scale_ptr, zp_ptr, out_ptr, K, stride_xm,
                              HAS_SMOOTH: tl.constexpr, STATIC: tl.constexpr, HAS_ZP: tl.constexpr,
                              AMAX_MIN: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    o_row = out_ptr + row * K
    if STATIC:
        scale = tl.load(scale_ptr)
    else:
        amax, bad = row_abs_max(x_row, smooth_ptr, K, HAS_SMOOTH, BLOCK_K)
        scale = dynamic_scale(amax, bad, AMAX_MIN, 127.0)
        tl.store(scale_ptr + row, scale)
    zp = 0.0
    if HAS_ZP:
        zp = tl.load(zp_ptr).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = tl.math.div_rn(x, tl.load(smooth_ptr + offs, mask=mask, other=1.0))
        q = nan_to_zero(round_half_even(tl.math.div_rn(x, scale))) + zp
        q = tl.minimum(tl.maximum(q, -128.0), 127.0)
        tl.store(o_row + offs, q.to(tl.int8), mask=mask)


def quantize_act_int8(x2d, smooth, scale, zero_point, out, scales_out) -> None:
    """Dynamic (scale None: per-row scales written to ``scales_out`` [M]) or static per-tensor."""
    M, K = x2d.shape
    if M == 0:
        return
    BLOCK_K = min(next_pow2(K), 4096)
    static = scale is not None
    _quantize_act_int8_kernel[(M,)](
        x2d, smooth if smooth is not None else x2d, scale if static else scales_out,
        zero_point if zero_point is not None else x2d, out, K, x2d.stride(0),
        HAS_SMOOTH=smooth is not None, STATIC=static, HAS_ZP=zero_point is not None,
        AMAX_MIN=AMAX_FLOOR, BLOCK_K=BLOCK_K)


# -- FP8 ------------------------------------------------------------------------------------

@triton.jit
def _fp8_epilogue(acc, a_scale_ptr, w_scale_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask,
                  PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr):
    """acc * a_scale[m] * w_scale[n] (+ bias[n]) in fp32, in the reference's order."""
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)
    if PER_TOKEN:
        a_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
        y = acc * a_scale[:, None] * w_scale[None, :]
    else:
        y = acc * tl.load(a_scale_ptr) * w_scale[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    return y


@triton.jit
def _fp8_gemm_kernel(a_ptr, w_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K,
                     stride_am, stride_wn, stride_om,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                     ACTIVATION: tl.constexpr = 0, GATED: tl.constexpr = False, ROWS64: tl.constexpr = False):
    # N output columns; ACTIVATION / GATED as in _int8_act_gemm_kernel (the gate half at weight rows N + n)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = _row_offsets(pid_m, BLOCK_M, ROWS64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_gate = acc
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + (offs_m % M)[:, None] * stride_am + offs_k[None, :]
        w_ptrs = w_ptr + offs_k[:, None] + (offs_n % N)[None, :] * stride_wn
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < K, other=0.0)
        # Hopper's fp8 MMA keeps ~14 significant bits in its accumulator (Triton's sm_90 default lets it
        # run over all of K: measured on an H200, K = 1024 gave errors of 5e-4 of sum|a*w|): one K tile
        # accumulates there, then adds into fp32, as DeepGEMM promotes
        acc = tl.dot(a, w, acc, out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_K)
        if GATED:
            if EVEN_K:
                wg = tl.load(w_ptrs + N * stride_wn)
            else:
                wg = tl.load(w_ptrs + N * stride_wn, mask=offs_k[:, None] < K, other=0.0)
            acc_gate = tl.dot(a, wg, acc_gate, out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_K)
    y = _fp8_epilogue(acc, a_scale_ptr, w_scale_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, PER_TOKEN, HAS_BIAS)
    if GATED:
        gate = _fp8_epilogue(acc_gate, a_scale_ptr, w_scale_ptr, bias_ptr, offs_m, offs_n + N, m_mask, n_mask,
                             PER_TOKEN, HAS_BIAS)
        y = y * _gelu(gate, ACTIVATION == 2)
    elif ACTIVATION != 0:
        y = _gelu(y, ACTIVATION == 2)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], _to_out(y, out_ptr),
             mask=m_mask[:, None] & n_mask[None, :])


def pick_fp8_config(M: int, N: int, K: int, gated: bool = False):
    if M <= 16:
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
    elif M <= 64:
        bm, bn, bk, warps, stages = 64, 64, 128, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    return bm, (bn // 2 if gated else bn), bk, warps, stages


def fp8_gemm(a, w, a_scale, w_scale, bias, out, *, per_token: bool, activation=None, config=None) -> None:
    """out[M, N] = (A_fp8 @ W_fp8^T) * scales (+ bias); ``activation`` (a key of ACTIVATIONS) applies
    the feed-forward epilogue, gated ones reading 2N weight rows for N = out.shape[1]."""
    M, K = a.shape
    N = out.shape[1]
    if M == 0 or N == 0:
        return
    act, gated = ACTIVATIONS[activation]
    BM, BN, BK, warps, stages = config or pick_fp8_config(M, N, K, gated)
    w_scale = unit_stride(w_scale)  # (the int8 paths get theirs contiguous from ops.gemm._same_layout)
    _fp8_gemm_kernel[(cdiv(M, BM), cdiv(N, BN))](
        a, w, a_scale, w_scale, bias if bias is not None else out, out, M, N, K,
        a.stride(0), w.stride(0), out.stride(0), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        PER_TOKEN=per_token, HAS_BIAS=bias is not None, EVEN_K=K % BK == 0, ACTIVATION=act, GATED=gated,
        ROWS64=rows64(M, BM, a.stride(0), out.stride(0)), num_warps=warps, num_stages=stages, enable_fp_fusion=False)


@triton.jit
def _quantize_act_fp8_kernel(x_ptr, smooth_ptr, scale_ptr, out_ptr, K, stride_xm, HAS_SMOOTH: tl.constexpr,
                             STATIC: tl.constexpr, AMAX_MIN: tl.constexpr, FMAX: tl.constexpr,
                             EMULATE_FP8: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    if STATIC:
        scale = tl.load(scale_ptr)
    else:
        amax, bad = row_abs_max(x_row, smooth_ptr, K, HAS_SMOOTH, BLOCK_K)
        scale = dynamic_scale(amax, bad, AMAX_MIN, FMAX)
        tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = tl.math.div_rn(x, tl.load(smooth_ptr + offs, mask=mask, other=1.0))
        q = tl.minimum(tl.maximum(nan_to_zero(tl.math.div_rn(x, scale)), -FMAX), FMAX)
        tl.store(out_ptr + row * K + offs, to_e4m3(q, EMULATE_FP8), mask=mask)


def quantize_act_fp8(x2d, smooth, scale, out, scales_out) -> None:
    M, K = x2d.shape
    if M == 0:
        return
    static = scale is not None
    _quantize_act_fp8_kernel[(M,)](
        x2d, smooth if smooth is not None else x2d, scale if static else scales_out, out, K, x2d.stride(0),
        HAS_SMOOTH=smooth is not None, STATIC=static, AMAX_MIN=AMAX_FLOOR, FMAX=FP8_MAX,
        EMULATE_FP8=interpreting(), BLOCK_K=min(next_pow2(K), 4096))


# -- W4A16 / W8A16: weight-only, dequantized in the main loop ------------------------------

@triton.jit
def _load_x_tile(x_ptr, rm, offs_k, K, stride_xm, EVEN_K: tl.constexpr):
    ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :]
    if EVEN_K:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_k[None, :] < K, other=0.0)


@triton.jit
def _float_dot(x, w, DOT_FP32: tl.constexpr):
    if DOT_FP32:  # interpreter only: its bf16 x bf16 dot returns garbage; fp32 products are exact
        return tl.dot(x.to(tl.float32), w.to(tl.float32), out_dtype=tl.float32)
    return tl.dot(x, w.to(x.dtype), out_dtype=tl.float32)


@triton.jit
def _weight_only_gemm_kernel(x_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K,
                             stride_xm, stride_wn, stride_om, stride_wsn, k_blocks_per_split,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUPED: tl.constexpr, W_INT4: tl.constexpr, HAS_BIAS: tl.constexpr,
                             DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr, WRITE_PARTIAL: tl.constexpr = False,
                             ROWS64: tl.constexpr = False):
    # split-K (WRITE_PARTIAL): program (m, n, s) sums K blocks [s * k_blocks_per_split, ...) and writes
    # its fp32 partial to out_ptr = partials [S, M, N]; _split_k_reduce_kernel adds them in order of s
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = _row_offsets(pid_m, BLOCK_M, ROWS64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rm = offs_m % M
    rn = offs_n % N
    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if WRITE_PARTIAL:
        k_begin = pid_s * k_blocks_per_split * BLOCK_K
        k_end = tl.minimum(K, k_begin + k_blocks_per_split * BLOCK_K)
    else:
        k_begin = 0
        k_end = K
    for k0 in range(k_begin, k_end, BLOCK_K):
        if W_INT4:
            offs_even = k0 + 2 * tl.arange(0, BLOCK_K // 2)
            x_even = _load_x_tile(x_ptr, rm, offs_even, K, stride_xm, EVEN_K)
            x_odd = _load_x_tile(x_ptr, rm, offs_even + 1, K, stride_xm, EVEN_K)
            w_lo, w_hi = _load_int4_tile_t(w_ptr, rn, k0, K, stride_wn, BLOCK_K, EVEN_K)
            part = _float_dot(x_even, w_lo, DOT_FP32)
            part += _float_dot(x_odd, w_hi, DOT_FP32)
        else:
            x = _load_x_tile(x_ptr, rm, k0 + tl.arange(0, BLOCK_K), K, stride_xm, EVEN_K)
            w = _load_int8_tile_t(w_ptr, rn, k0, K, stride_wn, BLOCK_K, EVEN_K)
            part = _float_dot(x, w, DOT_FP32)
        if GROUPED:
            gscale = tl.load(w_scale_ptr + offs_n * stride_wsn + k0 // BLOCK_K, mask=n_mask, other=0.0)
            y = y + part * gscale[None, :]
        else:
            y = y + part
    if WRITE_PARTIAL:
        tl.store(out_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :], y,
                 mask=m_mask[:, None] & n_mask[None, :])
    else:
        y = _weight_only_epilogue(y, w_scale_ptr, bias_ptr, offs_n, n_mask, GROUPED, HAS_BIAS)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], _to_out(y, out_ptr),
                 mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _weight_only_epilogue(y, w_scale_ptr, bias_ptr, offs_n, n_mask, GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr):
    if not GROUPED:
        y = y * tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    return y


@triton.jit
def _split_k_reduce_kernel(partial_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, stride_om, SPLIT: tl.constexpr,
                           GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    y = tl.zeros((1, BLOCK_N), dtype=tl.float32)
    for s in range(SPLIT):  # a fixed order: the result does not depend on scheduling
        y += tl.load(partial_ptr + (s * M + m) * N + offs_n, mask=n_mask, other=0.0)[None, :]
    y = _weight_only_epilogue(y, w_scale_ptr, bias_ptr, offs_n, n_mask, GROUPED, HAS_BIAS)
    tl.store(out_ptr + m * stride_om + offs_n[None, :], _to_out(y, out_ptr), mask=n_mask[None, :])


def pick_weight_only_config(M: int, N: int, K: int, group_size: int):
    block_k = group_size if group_size else 64
    if M <= 16:
        return 16, 64, block_k, 4, 4
    return 64, 128, block_k, 8, 3


SPLIT_K_MIN_BLOCKS = 2  # K blocks per program at least


def pick_split_k(M: int, N: int, K: int, config: tuple, device: torch.device) -> int:
    """K splits for the small-M weight-only GEMM: enough programs for two per SM. Without it a batch-1
    projection ran one program per 64 output columns (20-144 programs on an H200's 132 SMs, each
    walking all of K): 5-108 GB/s, 0.11-0.16x cuBLAS fp16. Off the GPU (the interpreter) 1."""
    BM, BN, BK = config[:3]
    if device.type != "cuda" or M > BM:
        return 1
    tiles = cdiv(M, BM) * cdiv(N, BN)
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    k_blocks = cdiv(K, BK)
    split = min(cdiv(target, tiles), k_blocks // SPLIT_K_MIN_BLOCKS)
    if split < 2:
        return 1
    return cdiv(k_blocks, cdiv(k_blocks, split))  # no empty split


def weight_only_gemm(x, w, w_scale, bias, out, *, group_size: int, w_int4: bool, split_k=None) -> None:
    """``split_k`` (tests) overrides ``pick_split_k``."""
    M, K = x.shape
    N = w.shape[0]
    if M == 0 or N == 0:
        return
    config = pick_weight_only_config(M, N, K, group_size)
    BM, BN, BK, warps, stages = config
    w_scale = unit_stride(w_scale)
    k_blocks = cdiv(K, BK)
    split = split_k or pick_split_k(M, N, K, config, x.device)
    per_split = cdiv(k_blocks, split)
    split = cdiv(k_blocks, per_split)
    partials = out if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    _weight_only_gemm_kernel[(cdiv(M, BM), cdiv(N, BN), split)](
        x, w, w_scale, bias if bias is not None else out, partials, M, N, K,
        x.stride(0), w.stride(0), out.stride(0), w_scale.stride(0) if group_size else 0, per_split,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUPED=bool(group_size), W_INT4=w_int4,
        HAS_BIAS=bias is not None, DOT_FP32=interpreting() and x.dtype != torch.float16, EVEN_K=K % BK == 0,
        WRITE_PARTIAL=split > 1, ROWS64=rows64(M, BM, x.stride(0), partials.stride(-2)), num_warps=warps,
        num_stages=stages, enable_fp_fusion=False)
    if split > 1:
        BLOCK_N = 256
        _split_k_reduce_kernel[(M, cdiv(N, BLOCK_N))](
            partials, w_scale, bias if bias is not None else out, out, M, N, out.stride(0), SPLIT=split,
            GROUPED=bool(group_size), HAS_BIAS=bias is not None, BLOCK_N=BLOCK_N, num_warps=4,
            enable_fp_fusion=False)


# -- static report ----------------------------------------------------------------------------

def _int8_case(name, bm, bn, bk, warps, stages, *, grouped, w_int4, fuse_quant, per_token, a_dtype="*i8",
               activation=None, out_codes=False):
    act, gated = ACTIVATIONS[activation]
    epilogue = {"ACTIVATION": "constexpr", "GATED": "constexpr", "OUT_QUANT": "constexpr",
                "OUT_HAS_ZP": "constexpr", "OUT_HAS_SMOOTH": "constexpr", "VALUE_DTYPE": "constexpr",
                "ROWS64": "constexpr"}
    return {
        "name": name, "fn": _int8_act_gemm_kernel,
        # W4 with int8 codes: the launcher passes their int16 view (pairs of K columns)
        "signature": {"a_ptr": "*i16" if w_int4 and fuse_quant == 0 else a_dtype, "w_ptr": "*u8" if w_int4 else "*i8",
                      "a_scale_ptr": "*fp32",
                      "w_scale_ptr": "*fp32", "zp_ptr": "*i32", "wsum_ptr": "*i32", "bias_ptr": "*fp32",
                      "smooth_ptr": "*fp32", "out_ptr": "*i8" if out_codes else "*fp16", "out_scale_ptr": "*fp32",
                      "out_zp_ptr": "*i32", "out_smooth_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
                      "stride_am": "i32", "stride_wn": "i32", "stride_om": "i32", "stride_wsn": "i32",
                      "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                      "GROUPED": "constexpr", "W_INT4": "constexpr", "PER_TOKEN": "constexpr",
                      "HAS_ZP": "constexpr", "HAS_BIAS": "constexpr", "FUSE_QUANT": "constexpr",
                      "HAS_SMOOTH": "constexpr", "AMAX_MIN": "constexpr", "EVEN_K": "constexpr", **epilogue},
        "constexprs": {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUPED": grouped, "W_INT4": w_int4,
                       "PER_TOKEN": per_token, "HAS_ZP": not per_token, "HAS_BIAS": True,
                       "FUSE_QUANT": fuse_quant, "HAS_SMOOTH": False, "AMAX_MIN": AMAX_FLOOR, "EVEN_K": True,
                       "ACTIVATION": act, "GATED": gated, "OUT_QUANT": out_codes, "OUT_HAS_ZP": out_codes,
                       "OUT_HAS_SMOOTH": out_codes, "VALUE_DTYPE": 1, "ROWS64": False},
        "num_warps": warps, "num_stages": stages, "hot": True, "tensor_cores": True,
    }


def _fp8_case(name, bm, bn, bk, warps, stages, activation=None):
    act, gated = ACTIVATIONS[activation]
    return {
        "name": name, "fn": _fp8_gemm_kernel,
        "signature": {"a_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32",
                      "bias_ptr": "*fp32", "out_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
                      "stride_am": "i32", "stride_wn": "i32", "stride_om": "i32"},
        "constexprs": {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PER_TOKEN": True, "HAS_BIAS": True,
                       "EVEN_K": True, "ACTIVATION": act, "GATED": gated, "ROWS64": False},
        "num_warps": warps, "num_stages": stages, "hot": True, "tensor_cores": True,
        # fp8 tensor cores start at sm_89, but Triton 3.8's sm_89 build of this kernel has no
        # tensor-core instruction in its SASS (static report): listed for sm_90a only
        "archs": ["90a"],
    }


def _weight_only_case(name, bm, bn, bk, warps, stages, partial=False):
    return {
        "name": name, "fn": _weight_only_gemm_kernel,
        "signature": {"x_ptr": "*fp16", "w_ptr": "*u8", "w_scale_ptr": "*fp32", "bias_ptr": "*fp32",
                      "out_ptr": "*fp32" if partial else "*fp16", "M": "i32", "N": "i32", "K": "i32",
                      "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32", "stride_wsn": "i32",
                      "k_blocks_per_split": "i32", "BLOCK_M": "constexpr",
                      "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUPED": "constexpr",
                      "W_INT4": "constexpr", "HAS_BIAS": "constexpr", "DOT_FP32": "constexpr",
                      "EVEN_K": "constexpr", "WRITE_PARTIAL": "constexpr", "ROWS64": "constexpr"},
        "constexprs": {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUPED": True, "W_INT4": True,
                       "HAS_BIAS": True, "DOT_FP32": False, "EVEN_K": True, "WRITE_PARTIAL": partial,
                       "ROWS64": False},
        "num_warps": warps, "num_stages": stages, "hot": True, "tensor_cores": True,
    }


def _aligned(case):
    """``case`` compiled as Triton's JIT specialises a call whose N, K and row strides are multiples of
    16 (every diffusion layer's): without that hint the loads are not vectorised or pipelined and the
    int8 128x128 tile reported 255 registers; with it, 174."""
    ints = ("N", "K", "stride_am", "stride_xm", "stride_wn", "stride_om")  # not stride_wsn: K / group size
    return {**case, "name": case["name"] + "_aligned",
            "divisible_by_16": [a for a in ints if a in case["signature"]]}


STATIC_REPORT_CASES = [
    _int8_case("w8a8_int8_m128", 128, 128, 64, 8, 2, grouped=False, w_int4=False, fuse_quant=0, per_token=True),
    _int8_case("w8a8_int8_m64", 64, 64, 64, 8, 3, grouped=False, w_int4=False, fuse_quant=0, per_token=True),
    _int8_case("w8a8_int8_m16", 16, 64, 64, 4, 4, grouped=False, w_int4=False, fuse_quant=0, per_token=True),
    _int8_case("w8a8_int8_static_zp_m128", 128, 128, 64, 8, 2, grouped=False, w_int4=False, fuse_quant=0,
               per_token=False),
    _int8_case("w8a8_fused_quant_m16", 16, 64, 64, 4, 4, grouped=False, w_int4=False, fuse_quant=1,
               per_token=True, a_dtype="*fp16"),
    _int8_case("w8a8_fused_quant_m64", 64, 64, 64, 8, 3, grouped=False, w_int4=False, fuse_quant=1,
               per_token=True, a_dtype="*fp16"),
    _int8_case("w8a8_fused_static_quant_m64", 64, 64, 64, 8, 3, grouped=False, w_int4=False, fuse_quant=2,
               per_token=False, a_dtype="*fp16"),
    # groups of 128 make K, the activations' row stride and the packed weights' a multiple of 16 at every
    # call (without that hint the int16-pair loads spilled 40 B on sm_80; with it, 170 registers)
    {**_int8_case("w4a8_g128_m64x128", 64, 128, 128, 8, 3, grouped=True, w_int4=True, fuse_quant=0,
                  per_token=True), "divisible_by_16": ["K", "stride_am", "stride_wn"]},
    _int8_case("w4a8_g64_m64x128", 64, 128, 64, 8, 3, grouped=True, w_int4=True, fuse_quant=0, per_token=True),
    _int8_case("w4a8_g128_m16", 16, 64, 128, 4, 4, grouped=True, w_int4=True, fuse_quant=0, per_token=True),
    _int8_case("w4a8_g128_fused_quant_m16", 16, 64, 128, 4, 4, grouped=True, w_int4=True, fuse_quant=1,
               per_token=True, a_dtype="*fp16"),
    # the feed-forward epilogue (int8_ffn_up): GELU, GEGLU (two accumulators, half-wide N tile), and
    # the next layer's static codes written instead of the float value
    _int8_case("w8a8_ffn_gelu_tanh_m128", 128, 128, 64, 8, 2, grouped=False, w_int4=False, fuse_quant=0,
               per_token=True, activation="gelu_tanh"),
    _int8_case("w8a8_ffn_geglu_m128x32", 128, 32, 64, 8, 2, grouped=False, w_int4=False, fuse_quant=0,
               per_token=True, activation="geglu"),
    _int8_case("w8a8_ffn_geglu_codes_static_zp_m128x32", 128, 32, 64, 8, 2, grouped=False, w_int4=False,
               fuse_quant=0, per_token=False, activation="geglu", out_codes=True),
    _int8_case("w8a8_ffn_geglu_m64x32", 64, 32, 64, 8, 3, grouped=False, w_int4=False, fuse_quant=0,
               per_token=True, activation="geglu"),
    _int8_case("w4a8_g128_ffn_geglu_m64x32", 64, 32, 128, 8, 3, grouped=True, w_int4=True, fuse_quant=0,
               per_token=True, activation="geglu"),
    _int8_case("w4a8_g128_ffn_gelu_tanh_codes_m32x128", 32, 128, 128, 8, 3, grouped=True, w_int4=True,
               fuse_quant=0, per_token=True, activation="gelu_tanh", out_codes=True),
    _int8_case("w8a8_g128_ffn_gelu_codes_static_zp_m32x128", 32, 128, 128, 8, 3, grouped=True, w_int4=False,
               fuse_quant=0, per_token=False, activation="gelu", out_codes=True),
    _int8_case("w8a8_ffn_geglu_fused_quant_m16", 16, 32, 64, 4, 4, grouped=False, w_int4=False, fuse_quant=1,
               per_token=True, a_dtype="*fp16", activation="geglu"),
    _fp8_case("fp8_m128", 128, 128, 64, 8, 3),
    _fp8_case("fp8_ffn_gelu_tanh_m128", 128, 128, 64, 8, 3, activation="gelu_tanh"),
    _fp8_case("fp8_ffn_geglu_m128x64", 128, 64, 64, 8, 3, activation="geglu"),
    _fp8_case("fp8_ffn_geglu_m16", 16, 32, 128, 4, 4, activation="geglu"),
    _weight_only_case("w4a16_g128_m16", 16, 64, 128, 4, 4),
    _weight_only_case("w4a16_g128_m16_split_k", 16, 64, 128, 4, 4, partial=True),
    _weight_only_case("w4a16_g128_m64x128", 64, 128, 128, 8, 3),
]
# the large-M tiles as diffusion shapes run them (the rows above: any N, K and strides)
STATIC_REPORT_CASES += [_aligned(c) for c in STATIC_REPORT_CASES
                        if c["name"] in ("w8a8_int8_m128", "w4a8_g128_m64x128", "fp8_m128", "w4a16_g128_m16_split_k")]
