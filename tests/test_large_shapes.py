"""Video-sized launches: grids and offsets that only a GPU at full size would show, checked on CPU.

- Attention: B * H (batch x heads) was grid axis 1, which CUDA stops at 65535. Temporal attention in
  video UNets has batch = 2 x latent pixels (AnimateDiff at 512 x 512 with CFG: q [8192, 8, 16, 40],
  B * H = 65536), and the launch failed. The launchers are checked through a recording stand-in for
  the kernel (the interpreter would take minutes for 65536 programs); the flattened program index is
  exercised at small sizes by every other attention test.
- GEMMs: row * row stride was int32, and wraps once M x K (or M x N) reaches 2^31 elements, e.g.
  batch 2 of HunyuanVideo 720p (M = 238,112) at K = 15,360. The kernels run in the interpreter on
  a strided operand over a large *virtual* buffer whose row stride puts row 128 past 2^31 elements
  (only the touched pages become resident: a few MB).
"""
import pytest
import torch

from diffaccel.kernels import attention as A
from diffaccel.kernels import gemm as KG

CUDA_AXIS_MAX = 65535  # grid axes 1 and 2


class _Recorder:
    """Stands in for a (tuned) kernel: records the grid of each launch, runs nothing."""

    def __init__(self, block_m=32):
        self.grids, self.block_m = [], block_m

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            g = grid({"BLOCK_M": self.block_m, "BLOCK_N": 32}) if callable(grid) else grid
            self.grids.append(tuple(g))
        return launch


def _check(grids, tiles, B, H):
    for g in grids:
        assert len(g) == 3 and g[0] == tiles and g[1] == H and g[2] <= CUDA_AXIS_MAX, g
    assert sum(g[2] for g in grids) == B


@pytest.mark.parametrize("B,H,Lq", [(8192, 8, 16), (2 * 96 * 96, 8, 16), (2 * 2 * 128 * 128, 10, 16), (3, 5, 100)])
def test_attention_launchers_keep_batch_heads_off_the_limited_axes(monkeypatch, B, H, Lq):
    """(B, H) = (65536, 10): AnimateDiff-SDXL at 1024 x 1024, two videos with CFG: launched in two
    batch chunks."""
    D = 40
    q = torch.zeros(B, H, Lq, D, dtype=torch.float16)
    rec = _Recorder()
    monkeypatch.setattr(A, "_tuned", lambda *a, **k: rec)
    A.attention_fwd(q, q, q, None, torch.empty_like(q), None, False, 0.1)
    _check(rec.grids, -(-Lq // 32), B, H)

    rec.grids.clear()
    qi = torch.zeros(B, H, Lq, D, dtype=torch.int8)
    n_q, n_k = -(-Lq // A.QUANT_BLOCK_M), -(-Lq // A.QUANT_BLOCK_N)
    qs, ks = torch.ones(B, H, n_q), torch.ones(B, H, n_k)
    A.attention_int8_fwd(qi, qs, qi, ks, q, None, None, torch.empty_like(q), None, False, 0.1, pv_fp8=False)
    _check(rec.grids, -(-Lq // 32), B, H)

    quant_qk = _Recorder()
    monkeypatch.setattr(A, "_quant_qk_int8_blocks_kernel", quant_qk)
    A.quantize_qk_int8_blocks(q, q, None, qi, qs, qi, ks)
    _check(quant_qk.grids, n_q + n_k, B, H)

    fp8 = _Recorder()
    monkeypatch.setattr(A, "_quant_fp8_per_channel_kernel", fp8)
    A.quantize_fp8_per_channel(q, torch.ones(B, H, D), torch.empty(B, H, Lq, D))
    _check(fp8.grids, -(-Lq // 64), B, H)


@pytest.mark.parametrize("quant", [None, "int8"])
def test_attention_in_batch_chunks_equals_one_launch(monkeypatch, quant):
    """The chunked launches (a batch above the grid limit, made small here) compute what one launch
    does, bit for bit, mask and log-sum-exp included."""
    from diffaccel.ops import use_backend
    from diffaccel.ops.attention import attention_with_lse

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 2, 40, 40, generator=g, dtype=torch.float32).to(torch.float16) for _ in range(3))
    mask = torch.rand(5, 1, 1, 40, generator=g) > 0.3
    mask[..., 0] = True
    with use_backend("triton"):
        whole = attention_with_lse(q, k, v, attn_mask=mask, quant=quant)
        monkeypatch.setattr(A, "GRID_AXIS_MAX", 2)
        chunked = attention_with_lse(q, k, v, attn_mask=mask, quant=quant)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


def test_rows64_threshold():
    assert not KG.rows64(75_600, 128, 13_824, 5_120)  # Wan 14B 720p FFN down, batch 1: 0.49 x 2^31
    assert KG.rows64(238_112, 128, 15_360, 3_072)  # HunyuanVideo 720p proj_out, batch 2: 1.70 x 2^31
    assert KG.rows64(151_200, 128, 5_120, 15_360)  # Wan fused QKV output, batch 2: 1.08 x 2^31
    assert KG.rows64(128, 128, 2**24) and not KG.rows64(127, 1, 2**24)


STRIDE = 2**24  # row 128 starts at element 2^31
M = 136


def _strided(dtype, cols, fill):
    """[M, cols] with row stride STRIDE over a virtual buffer of M * STRIDE elements."""
    buf = torch.empty(M * STRIDE, dtype=dtype)
    t = buf.as_strided((M, cols), (STRIDE, 1))
    t.copy_(fill)
    return t


@pytest.fixture
def interpreter_only():
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter check (a GPU would need the whole buffers resident)")


def test_int8_gemm_rows_past_2_31_elements(interpreter_only):
    K, N = 64, 48
    g = torch.Generator().manual_seed(0)
    a = _strided(torch.int8, K, torch.randint(-9, 10, (M, K), generator=g, dtype=torch.int8))
    w = torch.randint(-9, 10, (N, K), generator=g, dtype=torch.int8)
    out = _strided(torch.float16, N, torch.zeros(M, N, dtype=torch.float16))
    a_scale, w_scale = torch.full((M,), 0.01), torch.full((N,), 0.02)
    KG.int8_act_gemm(a, w, a_scale, w_scale, None, None, None, None, out, group_size=0, w_int4=False,
                     fuse_quant=0, per_token=True)
    ref = ((a.to(torch.int32) @ w.to(torch.int32).T).float() * 0.01 * 0.02).to(torch.float16)
    assert torch.equal(out, ref)


def test_fp8_gemm_rows_past_2_31_elements(interpreter_only):
    K, N = 64, 48
    g = torch.Generator().manual_seed(1)
    a = _strided(torch.float8_e4m3fn, K, torch.randn(M, K, generator=g).to(torch.float8_e4m3fn))
    w = torch.randn(N, K, generator=g).to(torch.float8_e4m3fn)
    out = _strided(torch.bfloat16, N, torch.zeros(M, N, dtype=torch.bfloat16))
    a_scale, w_scale = torch.full((M,), 0.5), torch.full((N,), 0.25)
    KG.fp8_gemm(a, w, a_scale, w_scale, None, out, per_token=True)
    ref = (a.float() @ w.float().T * 0.125).to(torch.bfloat16)
    assert ((out.float() - ref.float()).abs() <= 1e-2 * ref.float().abs() + 1e-3).all()


def test_weight_only_gemm_rows_past_2_31_elements(interpreter_only):
    K, N = 64, 48
    g = torch.Generator().manual_seed(2)
    x = _strided(torch.float16, K, torch.randn(M, K, generator=g).to(torch.float16))
    w = torch.randint(-9, 10, (N, K), generator=g, dtype=torch.int8)
    out = _strided(torch.float16, N, torch.zeros(M, N, dtype=torch.float16))
    KG.weight_only_gemm(x, w, torch.full((N,), 0.02), None, out, group_size=0, w_int4=False, split_k=1)
    ref = (x.float() @ (w.float() * 0.02).T)
    assert ((out.float() - ref).abs() <= 2e-3 * ref.abs() + 2e-3).all()


# -- on a GPU, at full size (each under 6 GB of device memory) ---------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("quant", [None, "int8"])
def test_gpu_attention_batch_heads_over_65535(quant):
    """AnimateDiff SD1.5 at 512 x 512 with CFG: 16 frames, B = 2 x 64 x 64, 8 heads of 40."""
    from diffaccel.ops import attention, use_backend

    q, k, v = (torch.randn(8192, 8, 16, 40, device="cuda", dtype=torch.float16) for _ in range(3))
    with use_backend("triton"):
        out = attention(q, k, v, quant=quant)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float()).half()
    tol = 2e-3 if quant is None else 5e-2  # (int8 QK^T: the per-block quantization error)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def _int8_rows(a, w, rows):
    return (a[rows].to(torch.int32) @ w.to(torch.int32).T).float()


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N,out_dtype", [(131_328, 16_384, 128, torch.float32),  # A offsets past 2^31
                                             (140_000, 64, 16_384, torch.float16)])  # output offsets past 2^31
def test_gpu_int8_gemm_offsets_past_2_31(M, K, N, out_dtype):
    from diffaccel.ops import int8_gemm, use_backend

    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randint(-8, 8, (M, K), device="cuda", dtype=torch.int8, generator=g)
    w = torch.randint(-8, 8, (N, K), device="cuda", dtype=torch.int8, generator=g)
    with use_backend("triton"):
        out = int8_gemm(a, w, torch.ones(M, 1, device="cuda"), torch.ones(N, device="cuda"), out_dtype=out_dtype)
    rows = torch.tensor([0, 2**31 // max(K, N) - 1, 2**31 // max(K, N) + 1, M - 1], device="cuda")
    torch.testing.assert_close(out[rows], _int8_rows(a, w, rows).to(out_dtype), atol=0, rtol=0)
