"""Device helpers shared by the kernel families."""
import triton
import triton.language as tl


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
def row_abs_max(x_row, smooth_ptr, K, HAS_SMOOTH: tl.constexpr, BLOCK_K: tl.constexpr):
    """max |x / smooth| over one row of K elements (smooth: SmoothQuant's per-channel divisor,
    applied with IEEE division like the torch reference)."""
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = tl.math.div_rn(x, tl.load(smooth_ptr + offs, mask=offs < K, other=1.0))
        acc = tl.maximum(acc, tl.abs(x))
    return tl.max(acc, axis=0)
