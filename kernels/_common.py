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
