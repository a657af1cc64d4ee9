"""Flash attention forward (online softmax, K/V tiled) and its INT8-QK / FP8-or-FP16-PV variant.

Every head dim from 8 to 256 runs without padding tensors in memory: D is covered by one
power-of-two tile or, where that saves work, two (40 = 32 + 16, 80 = 64 + 16, 160 = 128 + 32),
with masked loads. Q/K/V/O/mask are read through their strides, so
[B, L, H, D] tensors viewed as [B, H, L, D] and masks broadcast with stride 0 cost no copy.

Numerics (shared with ``diffaccel.ops.attention``'s references):
  scores in fp32 natural units (q.k * scale + additive mask, so a float32-min mask stays finite
  as in torch SDPA), running max and sum in fp32;
  rows whose keys are all masked give 0 output and LSE = -inf (what torch SDPA gives).
Quantized path: Q and K' = K - mean_tokens(K) quantized to INT8 per block of QUANT_BLOCK_M /
QUANT_BLOCK_N tokens per (batch, head), symmetric: s = max(amax, 1e-12) / 127,
q = clamp(round_half_even(x / s), -127, 127) with IEEE division; QK^T in int32.
"""
import functools

import torch
import triton
import triton.language as tl

from ._common import cdiv, dynamic_scale, interpreting, nan_to_zero, next_pow2, round_half_even

AMAX_FLOOR = 1e-12
QUANT_BLOCK_M = 128  # Q rows per INT8 scale
QUANT_BLOCK_N = 64  # K rows per INT8 scale
FP8_E4M3_MAX = 448.0  # P is scaled by this before its E4M3 cast (the kernel spells it out as 448.0)


# -- the float kernel ------------------------------------------------------------------------

@triton.jit
def _load_2d(ptrs, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    # bounds checks only where the tile can overhang: unmasked loads vectorise and save predicates
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _mask_scores(s, offs_m, offs_n, row_ok, col_ok, m_base, s_mn,
                 HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_N: tl.constexpr):
    if not EVEN_N:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    if IS_CAUSAL:  # top-left aligned, like torch SDPA: key j is visible to query i when j <= i
        s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
    if HAS_MASK:
        mvals = tl.load(m_base + offs_n[None, :] * s_mn, mask=row_ok[:, None] & col_ok[None, :], other=0)
        if MASK_IS_BOOL:
            s = tl.where(mvals != 0, s, float("-inf"))
        else:
            s = s + mvals.to(tl.float32)
    return s


@triton.jit
def _online_softmax_step(s, m_i, l_i):
    """Fold one tile of scores into the running row max and sum. Returns the tile's probabilities
    and alpha, the factor that rescales every accumulator to the new max."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # rows with nothing visible yet keep m = -inf; shift by 0 there so exp gives 0, not NaN
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_shift[:, None])
    alpha = tl.exp(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return p, m_new, l_i, alpha


@triton.jit
def _batch_head(H):
    """(b, h, b * H + h) of a program in a grid (tiles, H, B). B * H as one grid axis would stop at
    65535 (axes 1 and 2 do), which temporal attention in video UNets passes: its batch is 2 x the
    latent pixels (AnimateDiff at 512 x 512 with CFG: B * H = 65536). The launch order is unchanged:
    a head's tiles run next to each other (its K / V stay in L2). ``batch_chunks`` keeps B <= 65535."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    return b, h, b * H + h


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Mask, Out, Lse,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_mb, s_mh, s_mm, s_mn,
    H, Lq, Lk, qk_scale,
    LQ_BUCKET, LK_BUCKET,  # autotune keys only
    HEAD_DIM: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BF16_DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    # The head dim is covered by a power-of-two chunk BLOCK_D and, for head dims like 40/80/160, a second
    # narrower chunk BLOCK_D1 (160 = 128 + 32, 80 = 64 + 16): far less padding than one next-power-of-two tile.
    SPLIT: tl.constexpr = BLOCK_D1 > 0
    EVEN_D: tl.constexpr = HEAD_DIM >= BLOCK_D
    EVEN_D1: tl.constexpr = BLOCK_D + BLOCK_D1 == HEAD_DIM
    pid_m = tl.program_id(0)
    b, h, pid_bh = _batch_head(H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Lq
    d_ok = offs_d < HEAD_DIM

    q_base = Q + b * s_qb + h * s_qh
    q_off = offs_m[:, None].to(tl.int64) * s_qm
    q = _load_2d(q_base + q_off + offs_d[None, :] * s_qd, row_ok, d_ok, True, not EVEN_D)
    if BF16_DOT_IN_FP32:  # the interpreter's bf16 tl.dot returns garbage (Triton 3.8); bf16 values are exact in fp32
        q = q.to(tl.float32)
    # pointers advance by a scalar per K/V tile (cheaper than recomputing 64-bit addresses per element)
    offs_n0 = tl.arange(0, BLOCK_N)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    # int32 offset tensors added to a scalar base once: the address math stays cheap in registers
    k_ptrs = k_base + (offs_n0[None, :] * s_kn + offs_d[:, None] * s_kd)
    v_ptrs = v_base + (offs_n0[:, None] * s_vn + offs_d[None, :] * s_vd)
    m_base = Mask + b * s_mb + h * s_mh + offs_m[:, None].to(tl.int64) * s_mm

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    if SPLIT:
        offs_d1 = BLOCK_D + tl.arange(0, BLOCK_D1)
        d1_ok = offs_d1 < HEAD_DIM
        q1 = _load_2d(q_base + q_off + offs_d1[None, :] * s_qd, row_ok, d1_ok, True, not EVEN_D1)
        if BF16_DOT_IN_FP32:
            q1 = q1.to(tl.float32)
        k1_ptrs = k_base + (offs_n0[None, :] * s_kn + offs_d1[:, None] * s_kd)
        v1_ptrs = v_base + (offs_n0[:, None] * s_vn + offs_d1[None, :] * s_vd)
        acc1 = tl.zeros((BLOCK_M, BLOCK_D1), tl.float32)

    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < Lk
        kt = _load_2d(k_ptrs, d_ok, col_ok, not EVEN_D, not EVEN_N)
        k_ptrs += BLOCK_N * s_kn
        if BF16_DOT_IN_FP32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if SPLIT:
            k1t = _load_2d(k1_ptrs, d1_ok, col_ok, not EVEN_D1, not EVEN_N)
            k1_ptrs += BLOCK_N * s_kn
            if BF16_DOT_IN_FP32:
                k1t = k1t.to(tl.float32)
            s = tl.dot(q1, k1t, s, input_precision=DOT_PRECISION)
        s = s * qk_scale
        s = _mask_scores(s, offs_m, offs_n, row_ok, col_ok, m_base, s_mn, HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, EVEN_N)

        p, m_new, l_i, alpha = _online_softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None]
        v = _load_2d(v_ptrs, col_ok, d_ok, not EVEN_N, not EVEN_D)
        v_ptrs += BLOCK_N * s_vn
        if BF16_DOT_IN_FP32:
            p_in = p.to(tl.bfloat16).to(tl.float32)
            v = v.to(tl.float32)
        else:
            p_in = p.to(v.dtype)
        acc = tl.dot(p_in, v, acc, input_precision=DOT_PRECISION)
        if SPLIT:
            acc1 = acc1 * alpha[:, None]
            v1 = _load_2d(v1_ptrs, col_ok, d1_ok, not EVEN_N, not EVEN_D1)
            v1_ptrs += BLOCK_N * s_vn
            if BF16_DOT_IN_FP32:
                v1 = v1.to(tl.float32)
            acc1 = tl.dot(p_in, v1, acc1, input_precision=DOT_PRECISION)
        m_i = m_new

    has_any = l_i > 0.0
    inv_l = 1.0 / tl.where(has_any, l_i, 1.0)
    o_rows = Out + b * s_ob + h * s_oh + offs_m[:, None].to(tl.int64) * s_om
    tl.store(o_rows + offs_d[None, :] * s_od, (acc * inv_l[:, None]).to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    if SPLIT:
        tl.store(o_rows + offs_d1[None, :] * s_od, (acc1 * inv_l[:, None]).to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & d1_ok[None, :])
    if STORE_LSE:
        lse = tl.where(has_any, m_i + tl.log(tl.where(has_any, l_i, 1.0)), float("-inf"))
        tl.store(Lse + pid_bh * Lq + offs_m, lse, mask=row_ok)


# (BLOCK_M, BLOCK_N, num_warps, num_stages, tile head dims it may serve) per arch family. Chosen with
# benchmarks/static_report.py: none of these spills at the head dims it serves (128-row tiles need 8
# warps: with 4 the fp32 accumulator and scores exceed 255 registers). The autotuner picks among
# them per (Lq, Lk, head dim, mask, causal) bucket.
_SMALL_D, _MID_D, _ALL_D = (16, 32, 64), (16, 32, 64, 128), (16, 32, 64, 128, 256)
_CONFIGS = {
    "sm90": [(128, 64, 8, 3, _MID_D), (128, 128, 8, 2, _SMALL_D), (64, 64, 8, 3, _MID_D), (64, 32, 4, 3, _MID_D),
             (128, 64, 8, 2, _MID_D), (64, 32, 8, 2, (256,)), (64, 32, 8, 1, (256,)), (32, 32, 4, 2, (256,))],
    "sm80": [(128, 64, 8, 3, _MID_D), (128, 128, 8, 2, _SMALL_D), (64, 64, 4, 3, _SMALL_D), (64, 64, 8, 3, _MID_D),
             (64, 32, 4, 3, _MID_D), (128, 64, 8, 2, _MID_D), (64, 32, 8, 2, (256,)), (64, 32, 8, 1, (256,))],
}
_INTERPRETER_CONFIG = (32, 32, 4, 1)  # one fixed config keeps CPU tests fast
_TUNE_KEY = ["LQ_BUCKET", "LK_BUCKET", "BLOCK_D", "BLOCK_D1", "HAS_MASK", "IS_CAUSAL", "DOT_PRECISION",
             "BF16_DOT_IN_FP32"]


def _arch_family(device: torch.device) -> str:
    if interpreting() or device.type != "cuda":
        return "interpreter"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major >= 9 else "sm80"


def miscompiled(family: str, kernel_name: str, config: tuple, head_dim: int, block_d: int, block_d1: int) -> bool:
    """Configs that computed wrong attention on this arch family, so the autotuner never tries them.
    Measured on an H200 with Triton 3.6 (benchmarks/attention_configs.py, 2026-12-04): the fp16 kernel
    with 128-row tiles where the head dim's second chunk is partly masked (40 = 32 + 16, 72 = 64 + 16)
    and the single-stage tile at 160 = 128 + 32 gave relative L2 errors of 0.5-1.2 against SDPA,
    deterministically; every other config at those head dims matched to 3e-4, and the INT8 kernel
    matched at all of them. The sd15 64x64 shape (head dim 40) also hit an illegal memory access
    while autotuning over all configs."""
    if family != "sm90" or kernel_name != "_attn_fwd_kernel" or block_d1 == 0:
        return False
    bm, _, _, stages = config
    return (bm >= 128 and block_d + block_d1 != head_dim) or stages == 1


def _prune_for_head_dim(configs, named_args, *, family: str, kernel_name: str, **kwargs):
    # register pressure follows the whole tile width: 160 = 128 + 32 is tuned like 256
    bd, bd1 = kwargs.get("BLOCK_D", 64), kwargs.get("BLOCK_D1", 0)
    block_d = _block_d(bd + bd1)
    kept = [c for c in configs if block_d in c.kwargs.get("_head_dims", (block_d,))] or list(configs)
    kept = [c for c in kept if not miscompiled(family, kernel_name, _config_tuple(c), kwargs.get("HEAD_DIM", 0),
                                               bd, bd1)]
    if not kept:
        raise RuntimeError(f"attention: no launch config left for head dim {kwargs.get('HEAD_DIM')} on {family}")
    return [_strip(c) for c in kept]


def _config_tuple(config) -> tuple:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _strip(config):
    kw = {k: v for k, v in config.kwargs.items() if k != "_head_dims"}
    return triton.Config(kw, num_warps=config.num_warps, num_stages=config.num_stages)


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, family: str):
    fn = globals()[kernel_name]
    if family == "interpreter":
        bm, bn, w, s = _INTERPRETER_CONFIG
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)]
    else:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "_head_dims": dims}, num_warps=w, num_stages=s)
                   for bm, bn, w, s, dims in _CONFIGS[family]]
    # EVEN_N depends on the tuned BLOCK_N, so the heuristic sits inside the autotuner
    fn = triton.heuristics({"EVEN_N": lambda a: a["Lk"] % a["BLOCK_N"] == 0})(fn)
    prune = functools.partial(_prune_for_head_dim, family=family, kernel_name=kernel_name)
    return triton.autotune(configs=configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": prune})(fn)


def _bucket(n: int) -> int:
    return next_pow2(max(int(n), 1))


GRID_AXIS_MAX = 65535  # CUDA's limit on grid axes 1 and 2: heads and batch (see _batch_head)


def batch_chunks(B: int):
    """Batch slices of at most GRID_AXIS_MAX for launches on a (tiles, H, B) grid."""
    return [slice(lo, min(lo + GRID_AXIS_MAX, B)) for lo in range(0, B, GRID_AXIS_MAX)]


def _part(t, c):
    return None if t is None else t[c]


def _mask_args(mask):
    if mask is None:
        return None, (0, 0, 0, 0), False, False
    is_bool = mask.dtype == torch.bool
    return (mask.view(torch.uint8) if is_bool else mask), mask.stride(), True, is_bool


def _fixed_config(kernel, config, Lk: int):
    """The untuned kernel and its launch options for one (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    bm, bn, w, s = config
    return kernel, dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, EVEN_N=Lk % bn == 0)


def attention_fwd(q, k, v, mask, out, lse, is_causal: bool, scale: float, *, config=None) -> None:
    """q [B,H,Lq,D], k/v [B,H,Lk,D] (any strides), mask None or expanded to [B,H,Lq,Lk] (bool or float),
    out like q, lse None or contiguous fp32 [B,H,Lq]. ``config`` (BLOCK_M, BLOCK_N, num_warps,
    num_stages) bypasses the autotuner (benchmarks/attention_configs.py checks each config alone)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if B * H * Lq == 0:
        return
    if B > GRID_AXIS_MAX:
        for c in batch_chunks(B):
            attention_fwd(q[c], k[c], v[c], _part(mask, c), out[c], _part(lse, c), is_causal, scale, config=config)
        return
    mask_t, ms, has_mask, mask_bool = _mask_args(mask)
    if config is None:
        kernel, cfg = _tuned("_attn_fwd_kernel", _arch_family(q.device)), {}
    else:
        kernel, cfg = _fixed_config(_attn_fwd_kernel, config, Lk)
    interpret_bf16 = interpreting() and q.dtype == torch.bfloat16
    block_d, block_d1 = split_head_dim(D)
    grid = lambda meta: (cdiv(Lq, meta["BLOCK_M"]), H, B)  # noqa: E731  (see _batch_head)
    kernel[grid](
        q, k, v, mask_t if has_mask else q, out, lse if lse is not None else out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *ms,
        H, Lq, Lk, float(scale), _bucket(Lq), _bucket(Lk), HEAD_DIM=D,
        HAS_MASK=has_mask, MASK_IS_BOOL=mask_bool, IS_CAUSAL=bool(is_causal), STORE_LSE=lse is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or interpret_bf16 else "tf32",
        BF16_DOT_IN_FP32=interpret_bf16, BLOCK_D=block_d, BLOCK_D1=block_d1, **cfg,
    )


def _block_d(D: int) -> int:
    return max(16, next_pow2(D))


def split_head_dim(D: int, min_chunk: int = 16) -> tuple:
    """(BLOCK_D, BLOCK_D1): a power-of-two chunk plus, where it saves padding, a second power-of-two
    chunk of at least ``min_chunk`` (the MMA's K granularity); BLOCK_D1 = 0 means one tile."""
    full = max(min_chunk, _block_d(D))  # the INT8 MMA needs K >= 32 (head dims <= 16 failed to compile)
    if D <= min_chunk or D == full:
        return full, 0
    first = full // 2
    second = max(min_chunk, next_pow2(D - first))
    return (first, second) if first + second < full else (full, 0)


# -- INT8 quantization of Q and K (per block of tokens, per head) --------------------------------

@triton.jit
def _quant_int8_block(X, Mean, Xq, Scale, s_xb, s_xh, s_xl, s_xd, b, h, pid_bh, blk, L, D, n_blocks,
                      HAS_MEAN: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_D: tl.constexpr, AMAX_MIN: tl.constexpr):
    """Block ``blk`` of QBLOCK tokens of head (b, h): int8 codes into Xq [B, H, L, D] (contiguous) and
    its scale into Scale [B, H, n_blocks]."""
    offs_l = blk * QBLOCK + tl.arange(0, QBLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_l < L)[:, None] & (offs_d < D)[None, :]
    x = tl.load(X + b * s_xb + h * s_xh + offs_l[:, None].to(tl.int64) * s_xl + offs_d[None, :] * s_xd,
                mask=ok, other=0.0).to(tl.float32)
    if HAS_MEAN:  # K - mean over tokens: the same shift for every key, so softmax is unchanged
        mean = tl.load(Mean + pid_bh * D + offs_d, mask=offs_d < D, other=0.0)
        x = tl.where(ok, x - mean[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = dynamic_scale(amax, tl.sum(tl.sum(x * 0.0, axis=1), axis=0), AMAX_MIN, 127.0)
    qv = nan_to_zero(round_half_even(tl.math.div_rn(x, scale)))
    qv = tl.minimum(tl.maximum(qv, -127.0), 127.0)
    tl.store(Xq + pid_bh * L * D + offs_l[:, None].to(tl.int64) * D + offs_d[None, :], qv.to(tl.int8), mask=ok)
    tl.store(Scale + pid_bh * n_blocks + blk, scale)


@triton.jit
def _quant_qk_int8_blocks_kernel(
    Q, K, KMean, Qi, Qs, Ki, Ks,
    s_qb, s_qh, s_ql, s_qd,
    s_kb, s_kh, s_kl, s_kd,
    H, Lq, Lk, D, n_qblocks, n_kblocks,
    HAS_MEAN: tl.constexpr, QBLOCK_Q: tl.constexpr, QBLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    AMAX_MIN: tl.constexpr,
):
    # one launch for both operands: programs [0, n_qblocks) take Q's blocks, the rest K's
    pid = tl.program_id(0)
    b, h, pid_bh = _batch_head(H)
    if pid < n_qblocks:
        _quant_int8_block(Q, KMean, Qi, Qs, s_qb, s_qh, s_ql, s_qd, b, h, pid_bh, pid, Lq, D, n_qblocks,
                          False, QBLOCK_Q, BLOCK_D, AMAX_MIN)
    else:
        _quant_int8_block(K, KMean, Ki, Ks, s_kb, s_kh, s_kl, s_kd, b, h, pid_bh, pid - n_qblocks, Lk, D,
                          n_kblocks, HAS_MEAN, QBLOCK_K, BLOCK_D, AMAX_MIN)


def quant_qk_warps(block_d: int) -> int:
    """A 128-token Q block of 128 channels is 128 fp32 values per thread at 4 warps: 148 B of
    spills on sm_90a (4.5 KB at head dim 256); 8 warps hold head dim 128 without any (256: 268 B;
    16 warps would cap registers at 128 and spill more)."""
    return 4 if block_d <= 64 else 8


def quantize_qk_int8_blocks(q, k, k_mean, qi, qs, ki, ks) -> None:
    """q [B,H,Lq,D], k [B,H,Lk,D] any strides; k_mean None or contiguous fp32 [B,H,D]; qi / ki contiguous
    int8 like q / k; qs / ks contiguous fp32 [B,H,cdiv(L,block)] with QUANT_BLOCK_M / QUANT_BLOCK_N
    tokens per block. One launch (a launch is host time an eager call pays)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    n_q, n_k = cdiv(Lq, QUANT_BLOCK_M), cdiv(Lk, QUANT_BLOCK_N)
    if B * H == 0 or n_q + n_k == 0:
        return
    if B > GRID_AXIS_MAX:
        for c in batch_chunks(B):
            quantize_qk_int8_blocks(q[c], k[c], _part(k_mean, c), qi[c], qs[c], ki[c], ks[c])
        return
    _quant_qk_int8_blocks_kernel[(n_q + n_k, H, B)](
        q, k, k_mean if k_mean is not None else qs, qi, qs, ki, ks, *q.stride(), *k.stride(), H, Lq, Lk, D, n_q, n_k,
        HAS_MEAN=k_mean is not None, QBLOCK_Q=QUANT_BLOCK_M, QBLOCK_K=QUANT_BLOCK_N, BLOCK_D=_block_d(D),
        AMAX_MIN=AMAX_FLOOR, num_warps=quant_qk_warps(_block_d(D)))


@triton.jit
def _quant_fp8_per_channel_kernel(
    X, Scale, Xq,
    s_xb, s_xh, s_xl, s_xd,
    H, L, D, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_l = tl.program_id(0)
    b, h, pid_bh = _batch_head(H)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_l < L)[:, None] & (offs_d < D)[None, :]
    x = tl.load(X + b * s_xb + h * s_xh + offs_l[:, None].to(tl.int64) * s_xl + offs_d[None, :] * s_xd,
                mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(Scale + pid_bh * D + offs_d, mask=offs_d < D, other=1.0)
    xq = tl.math.div_rn(x, scale[None, :])
    tl.store(Xq + pid_bh * L * D + offs_l[:, None].to(tl.int64) * D + offs_d[None, :],
             xq.to(Xq.dtype.element_ty), mask=ok)


def quantize_fp8_per_channel(x, scales, xq) -> None:
    """x [B,H,L,D] any strides -> xq contiguous float8_e4m3fn, x / scales[b,h,d] (scales fp32 [B,H,D])."""
    B, H, L, D = x.shape
    if B * H * L == 0:
        return
    if B > GRID_AXIS_MAX:
        for c in batch_chunks(B):
            quantize_fp8_per_channel(x[c], scales[c], xq[c])
        return
    BLOCK_L = 64
    _quant_fp8_per_channel_kernel[(cdiv(L, BLOCK_L), H, B)](
        x, scales, xq, *x.stride(), H, L, D, BLOCK_L=BLOCK_L, BLOCK_D=_block_d(D))


# -- the quantized attention kernel ---------------------------------------------------------------

@triton.jit
def _attn_int8_fwd_kernel(
    Qi, Qs, Ki, Ks, V, Vs, Mask, Out, Lse, Dbg,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_mb, s_mh, s_mm, s_mn,
    H, Lq, Lk, n_qblocks, n_kblocks, qk_scale,
    LQ_BUCKET, LK_BUCKET,
    HEAD_DIM: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, STORE_LSE: tl.constexpr,
    PV_FP8: tl.constexpr, STORE_QK: tl.constexpr, QBLOCK_M: tl.constexpr, QBLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    # head dim split as in _attn_fwd_kernel; the second chunk is >= 32 wide (the INT8 MMA's K step)
    D: tl.constexpr = HEAD_DIM
    SPLIT: tl.constexpr = BLOCK_D1 > 0
    EVEN_D: tl.constexpr = HEAD_DIM >= BLOCK_D
    EVEN_D1: tl.constexpr = BLOCK_D + BLOCK_D1 == HEAD_DIM
    pid_m = tl.program_id(0)
    b, h, pid_bh = _batch_head(H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Lq
    d_ok = offs_d < D

    q_base = Qi + pid_bh * Lq * D
    q_off = offs_m[:, None].to(tl.int64) * D
    qi = _load_2d(q_base + q_off + offs_d[None, :], row_ok, d_ok, True, not EVEN_D)
    # per-row Q scale (a tile may span several quantization blocks) with the softmax scale folded in
    q_scale = tl.load(Qs + pid_bh * n_qblocks + offs_m // QBLOCK_M, mask=row_ok, other=0.0) * qk_scale
    offs_n0 = tl.arange(0, BLOCK_N)
    k_base = Ki + pid_bh * Lk * D
    v_base = V + b * s_vb + h * s_vh
    k_ptrs = k_base + (offs_n0[None, :] * D + offs_d[:, None])
    v_ptrs = v_base + (offs_n0[:, None] * s_vn + offs_d[None, :] * s_vd)
    ks_base = Ks + pid_bh * n_kblocks
    m_base = Mask + b * s_mb + h * s_mh + offs_m[:, None].to(tl.int64) * s_mm

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    if SPLIT:
        offs_d1 = BLOCK_D + tl.arange(0, BLOCK_D1)
        d1_ok = offs_d1 < D
        qi1 = _load_2d(q_base + q_off + offs_d1[None, :], row_ok, d1_ok, True, not EVEN_D1)
        k1_ptrs = k_base + (offs_n0[None, :] * D + offs_d1[:, None])
        v1_ptrs = v_base + (offs_n0[:, None] * s_vn + offs_d1[None, :] * s_vd)
        acc1 = tl.zeros((BLOCK_M, BLOCK_D1), tl.float32)

    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < Lk
        kt = _load_2d(k_ptrs, d_ok, col_ok, not EVEN_D, not EVEN_N)
        k_ptrs += BLOCK_N * D
        s_int = tl.dot(qi, kt, out_dtype=tl.int32)
        if SPLIT:
            k1t = _load_2d(k1_ptrs, d1_ok, col_ok, not EVEN_D1, not EVEN_N)
            k1_ptrs += BLOCK_N * D
            s_int = tl.dot(qi1, k1t, s_int, out_dtype=tl.int32)
        if STORE_QK:  # debug: the exact integer scores, compared bit for bit with the reference
            tl.store(Dbg + pid_bh * Lq * Lk + offs_m[:, None].to(tl.int64) * Lk + offs_n[None, :], s_int,
                     mask=row_ok[:, None] & col_ok[None, :])
        k_scale = tl.load(ks_base + offs_n // QBLOCK_N, mask=col_ok, other=0.0)
        s = s_int.to(tl.float32) * q_scale[:, None] * k_scale[None, :]
        s = _mask_scores(s, offs_m, offs_n, row_ok, col_ok, m_base, s_mn, HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, EVEN_N)

        p, m_new, l_i, alpha = _online_softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None]
        v = _load_2d(v_ptrs, col_ok, d_ok, not EVEN_N, not EVEN_D)
        v_ptrs += BLOCK_N * s_vn
        if PV_FP8:
            # p <= 1, so p * 448 uses the whole E4M3 range; V arrives pre-scaled per channel. Hopper's FP8
            # MMA accumulates in reduced precision, so each tile's product starts from zero and is added
            # to the fp32 accumulator outside the MMA (SageAttention2's two-level accumulation).
            p_in = (p * 448.0).to(tl.float8e4nv)
            acc += tl.dot(p_in, v)
        else:
            p_in = p.to(tl.float16)
            acc = tl.dot(p_in, v.to(tl.float16), acc)
        if SPLIT:
            acc1 = acc1 * alpha[:, None]
            v1 = _load_2d(v1_ptrs, col_ok, d1_ok, not EVEN_N, not EVEN_D1)
            v1_ptrs += BLOCK_N * s_vn
            if PV_FP8:
                acc1 += tl.dot(p_in, v1)
            else:
                acc1 = tl.dot(p_in, v1.to(tl.float16), acc1)
        m_i = m_new

    has_any = l_i > 0.0
    inv_l = 1.0 / tl.where(has_any, l_i, 1.0)
    if PV_FP8:  # undo the per-channel V scale and P's 448
        inv_v = tl.load(Vs + pid_bh * D + offs_d, mask=d_ok, other=0.0) * (1.0 / 448.0)
        acc = acc * inv_v[None, :]
        if SPLIT:
            acc1 = acc1 * (tl.load(Vs + pid_bh * D + offs_d1, mask=d1_ok, other=0.0) * (1.0 / 448.0))[None, :]
    o_rows = Out + b * s_ob + h * s_oh + offs_m[:, None].to(tl.int64) * s_om
    tl.store(o_rows + offs_d[None, :] * s_od, (acc * inv_l[:, None]).to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    if SPLIT:
        tl.store(o_rows + offs_d1[None, :] * s_od, (acc1 * inv_l[:, None]).to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & d1_ok[None, :])
    if STORE_LSE:
        lse = tl.where(has_any, m_i + tl.log(tl.where(has_any, l_i, 1.0)), float("-inf"))
        tl.store(Lse + pid_bh * Lq + offs_m, lse, mask=row_ok)


def attention_int8_fwd(q_int8, q_scale, k_int8, k_scale, v, v_scale, mask, out, lse, is_causal: bool,
                       scale: float, *, pv_fp8: bool, qk_debug=None, config=None) -> None:
    """q_int8 [B,H,Lq,D] / k_int8 [B,H,Lk,D] contiguous with block scales [B,H,nblocks] fp32;
    v [B,H,Lk,D] any strides: fp16/bf16 (cast to fp16 in the tile), or contiguous float8_e4m3fn
    with per-channel v_scale [B,H,D] when pv_fp8; qk_debug None or int32 [B,H,Lq,Lk] contiguous."""
    B, H, Lq, D = q_int8.shape
    Lk = k_int8.shape[2]
    if B * H * Lq == 0:
        return
    if B > GRID_AXIS_MAX:
        for c in batch_chunks(B):
            attention_int8_fwd(q_int8[c], q_scale[c], k_int8[c], k_scale[c], v[c], _part(v_scale, c), _part(mask, c),
                               out[c], _part(lse, c), is_causal, scale, pv_fp8=pv_fp8,
                               qk_debug=_part(qk_debug, c), config=config)
        return
    mask_t, ms, has_mask, mask_bool = _mask_args(mask)
    block_d, block_d1 = split_head_dim(D, min_chunk=32)
    if qk_debug is not None:
        # the debug store runs per tile; one fixed config keeps it independent of tuning
        kernel, cfg = _fixed_config(_attn_int8_fwd_kernel, (32, 32, 4, 1), Lk)
    elif config is not None:
        kernel, cfg = _fixed_config(_attn_int8_fwd_kernel, config, Lk)
    else:
        kernel, cfg = _tuned("_attn_int8_fwd_kernel", _arch_family(q_int8.device)), {}
    grid = lambda meta: (cdiv(Lq, meta["BLOCK_M"]), H, B)  # noqa: E731  (see _batch_head)
    kernel[grid](
        q_int8, q_scale, k_int8, k_scale, v, v_scale if v_scale is not None else q_scale,
        mask_t if has_mask else q_scale, out, lse if lse is not None else q_scale,
        qk_debug if qk_debug is not None else q_scale,
        *v.stride(), *out.stride(), *ms,
        H, Lq, Lk, q_scale.shape[2], k_scale.shape[2], float(scale), _bucket(Lq), _bucket(Lk), HEAD_DIM=D,
        HAS_MASK=has_mask, MASK_IS_BOOL=mask_bool, IS_CAUSAL=bool(is_causal), STORE_LSE=lse is not None,
        PV_FP8=pv_fp8, STORE_QK=qk_debug is not None, QBLOCK_M=QUANT_BLOCK_M, QBLOCK_N=QUANT_BLOCK_N,
        BLOCK_D=block_d, BLOCK_D1=block_d1, **cfg,
    )


# -- static report (benchmarks/static_report.py compiles these for sm_80 / sm_89 / sm_90a) ---------

def _fp_case(name, dtype, head_dim, bm, bn, warps, stages):
    t = "*fp16" if dtype == "fp16" else "*bf16"
    sig = {"Q": t, "K": t, "V": t, "Mask": t, "Out": t, "Lse": "*fp32"}
    sig.update({n: "i32" for n in ("s_qb", "s_qh", "s_qm", "s_kb", "s_kh", "s_kn",
                                   "s_vb", "s_vh", "s_vn", "s_ob", "s_oh", "s_om",
                                   "s_mb", "s_mh", "s_mm", "s_mn", "H", "Lq", "Lk")})
    sig.update({"qk_scale": "fp32", "LQ_BUCKET": "i32", "LK_BUCKET": "i32"})
    # unit strides in D are specialised to the constant 1 by the JIT, as here
    block_d, block_d1 = split_head_dim(head_dim)
    consts = dict(s_qd=1, s_kd=1, s_vd=1, s_od=1, HEAD_DIM=head_dim, EVEN_N=True, BLOCK_D1=block_d1,
                  HAS_MASK=False, MASK_IS_BOOL=False, IS_CAUSAL=False, STORE_LSE=False, DOT_PRECISION="tf32",
                  BF16_DOT_IN_FP32=False,
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d)
    sig.update({k: "constexpr" for k in consts})
    return {"name": name, "fn": _attn_fwd_kernel, "signature": sig, "constexprs": consts,
            "num_warps": warps, "num_stages": stages, "hot": True, "tensor_cores": True}


def _int8_case(name, head_dim, pv_fp8, bm, bn, warps, stages):
    sig = {"Qi": "*i8", "Qs": "*fp32", "Ki": "*i8", "Ks": "*fp32", "V": "*fp8e4nv" if pv_fp8 else "*fp16",
           "Vs": "*fp32", "Mask": "*fp16", "Out": "*fp16", "Lse": "*fp32", "Dbg": "*i32"}
    sig.update({n: "i32" for n in ("s_vb", "s_vh", "s_vn", "s_ob", "s_oh", "s_om",
                                   "s_mb", "s_mh", "s_mm", "s_mn", "H", "Lq", "Lk", "n_qblocks", "n_kblocks")})
    sig.update({"qk_scale": "fp32", "LQ_BUCKET": "i32", "LK_BUCKET": "i32"})
    block_d, block_d1 = split_head_dim(head_dim, min_chunk=32)
    consts = dict(s_vd=1, s_od=1, HEAD_DIM=head_dim, EVEN_N=True, BLOCK_D1=block_d1, HAS_MASK=False,
                  MASK_IS_BOOL=False, IS_CAUSAL=False, STORE_LSE=False, PV_FP8=pv_fp8, STORE_QK=False,
                  QBLOCK_M=QUANT_BLOCK_M, QBLOCK_N=QUANT_BLOCK_N,
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d)
    sig.update({k: "constexpr" for k in consts})
    case = {"name": name, "fn": _attn_int8_fwd_kernel, "signature": sig, "constexprs": consts,
            "num_warps": warps, "num_stages": stages, "hot": True, "tensor_cores": True}
    if pv_fp8:  # FP8 tensor cores: sm89 and sm90 only
        case["archs"] = ["89", "90a"]
    return case


def _static_report_cases():
    """One case per (arch family config, head dim) the autotuner may pick, fp16, plus the INT8 kernel's
    (PV fp16 on sm80, FP8 on sm89/sm90) and a bf16 sample."""
    cases = []
    for family, archs in (("sm80", ["80", "89"]), ("sm90", ["90a"])):
        for bm, bn, w, st, dims in _CONFIGS[family]:
            for hd in (64, 80, 128, 160, 256):  # 80 = 64 + 16 and 160 = 128 + 32: the split-tile kernels
                if _block_d(sum(split_head_dim(hd))) not in dims:
                    continue
                tag = f"hd{hd}_{bm}x{bn}_w{w}s{st}"
                fp = _fp_case(f"attn_fwd_fp16_{tag}_{family}", "fp16", hd, bm, bn, w, st)
                fp["archs"] = archs
                cases.append(fp)
                if family == "sm80":
                    i8 = _int8_case(f"attn_int8_pv_fp16_{tag}_sm80", hd, False, bm, bn, w, st)
                    i8["archs"] = ["80"]
                    cases.append(i8)
                    i8 = _int8_case(f"attn_int8_pv_fp8_{tag}_sm89", hd, True, bm, bn, w, st)
                    i8["archs"] = ["89"]
                    cases.append(i8)
                else:
                    i8 = _int8_case(f"attn_int8_pv_fp8_{tag}_sm90", hd, True, bm, bn, w, st)
                    i8["archs"] = ["90a"]
                    cases.append(i8)
    bf = _fp_case("attn_fwd_bf16_hd128_128x64_w8s3", "bf16", 128, 128, 64, 8, 3)
    cases.append(bf)
    # small head dims (tiny test models, 16): the INT8 MMA's K >= 32 is met by padding the tile
    small = _int8_case("attn_int8_pv_fp8_hd16_64x64_w8s3_sm90", 16, True, 64, 64, 8, 3)
    small["archs"] = ["90a"]
    cases.append(small)
    cases += [_quant_qk_case(f"attn_quant_qk_int8_hd{hd}_fp16", hd) for hd in (64, 128, 256)]
    return cases


def _quant_qk_case(name, head_dim):
    sig = {"Q": "*fp16", "K": "*fp16", "KMean": "*fp32", "Qi": "*i8", "Qs": "*fp32", "Ki": "*i8", "Ks": "*fp32"}
    sig.update({n: "i32" for n in ("s_qb", "s_qh", "s_ql", "s_kb", "s_kh", "s_kl", "H", "Lq", "Lk", "D",
                                   "n_qblocks", "n_kblocks")})
    consts = dict(s_qd=1, s_kd=1, HAS_MEAN=True, QBLOCK_Q=QUANT_BLOCK_M, QBLOCK_K=QUANT_BLOCK_N,
                  BLOCK_D=_block_d(head_dim), AMAX_MIN=AMAX_FLOOR)
    sig.update({k: "constexpr" for k in consts})
    return {"name": name, "fn": _quant_qk_int8_blocks_kernel, "signature": sig, "constexprs": consts,
            "num_warps": quant_qk_warps(_block_d(head_dim)), "num_stages": 1, "hot": False, "tensor_cores": False}


STATIC_REPORT_CASES = _static_report_cases()
