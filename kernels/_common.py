"""Device helpers shared by the kernel families."""
import os

import triton
import triton.language as tl


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host. ``triton.cdiv`` is a constexpr function since Triton 3.5 and costs
    about 2 us a call in host code, several times per launch (host time is what eager calls pay)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (host ints; 0 for n <= 0, as ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def unit_stride(v):
    """A 1-D vector the kernels index as ``v[i]`` (a per-channel ``w_scale``) with unit stride: a
    strided view or an expanded scalar would be read as if contiguous. A no-op (no copy) for the
    contiguous vectors every layer passes. (The ops' checks already hand the launchers contiguous
    biases, smoothing vectors and activation scales.)"""
    if v is None or v.dim() != 1 or v.shape[0] <= 1 or v.stride(0) == 1:
        return v
    return v.contiguous()


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU tests): kernels switch around the interpreter's gaps."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def round_half_even(x):
    # Exact for every finite fp32 (x - floor(x) is exact) and the same on GPU and in the
    # interpreter, which has no libdevice rint. Matches torch.round.
    r = tl.floor(x)
    d = x - r
    r_is_odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & r_is_odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def dynamic_scale(amax, bad, AMAX_MIN: tl.constexpr, QMAX: tl.constexpr):
    """max(amax, AMAX_MIN) / QMAX (IEEE division) + ``bad``, the row's sum of x * 0: 0, or NaN when
    the row holds a NaN or Inf. Max reductions drop NaN, so this is what makes such a row's scale
    NaN (and its dequantized output NaN), as in diffaccel.ops.quantize's reference."""
    return tl.math.div_rn(tl.maximum(amax, AMAX_MIN), QMAX) + bad


@triton.jit
def nan_to_zero(v):
    """A NaN code becomes 0, as in the reference (clamps with min/max would turn it into a bound)."""
    return tl.where(v != v, 0.0, v)


@triton.jit
def row_abs_max(x_row, smooth_ptr, K, HAS_SMOOTH: tl.constexpr, BLOCK_K: tl.constexpr):
    """(max |x / smooth|, sum of x * 0) over one row of K elements (smooth: SmoothQuant's per-channel
    divisor, applied with IEEE division like the torch reference); see ``dynamic_scale``."""
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    bad = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = tl.math.div_rn(x, tl.load(smooth_ptr + offs, mask=offs < K, other=1.0))
        acc = tl.maximum(acc, tl.abs(x))
        bad += x * 0.0
    return tl.max(acc, axis=0), tl.sum(bad, axis=0)


@triton.jit
def to_e4m3(x, EMULATE: tl.constexpr):
    """fp32 ``x`` with |x| <= 448 -> float8e4nv, round to nearest, ties to even (torch's cast).
    EMULATE (the interpreter, whose fp8 cast does not round: seen 127.3 -> 64) first rounds onto
    the E4M3 grid in fp32 (3 mantissa bits; below 2^-6 the subnormal step 2^-9), so the cast
    only has to convert an exactly representable value. Zero keeps its sign, as torch's does."""
    if EMULATE:
        e = tl.maximum(((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
        inv_step = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3 - e): powers of two, exact
        step = ((124 + e) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3)
        r = round_half_even(x * inv_step) * step
        x = tl.where(r == 0.0, x * 0.0, r)
    return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def round_to_bf16(y):
    """fp32 ``y`` rounded to nearest-even on the bf16 grid, still fp32. Done on the bits: the
    interpreter's fp32 -> bf16 cast truncates, the GPU's rounds; this is the same on both."""
    bits = y.to(tl.uint32, bitcast=True)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def mul_sigmoid(x, z):
    """x * sigmoid(z) in fp32, the sigmoid from t = exp(-|z|) <= 1: nothing overflows, and there is
    no cancellation where sigmoid(z) is tiny (SiLU is mul_sigmoid(z, z); GELU's tanh form x * sigmoid(2u))."""
    t = tl.exp(-tl.abs(z))
    return x * tl.where(z >= 0, 1.0, t) / (1.0 + t)
