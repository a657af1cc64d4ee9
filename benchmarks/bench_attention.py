"""Attention forward: diffaccel's Triton kernels (fp16/bf16, and quant="int8") vs torch SDPA with each
of its backends (flash, efficient, cudnn, math) and SageAttention where installed, at the shapes of
DESIGN.md (SD1.5, SDXL, SD3, Flux, PixArt, Sana, CogVideoX). Q/K/V are [B, L, H, D] tensors seen as
[B, H, L, D], the layout diffusers hands over, for every implementation."""
import pytest
import torch
import torch.nn.functional as F

from benchmarks._util import annotate, device, dtype_name, is_smoke, measure
from diffaccel.ops import _backend, attention, use_backend

FAMILY = "attention"
if is_smoke():
    SHAPES = [("smoke_hd40", 1, 2, 64, 64, 40), ("smoke_cross77", 1, 2, 32, 77, 72)]
    DTYPES = [torch.float16]
else:  # name, B, H, Lq, Lk, D
    SHAPES = [
        ("sd15_self_64x64", 2, 8, 4096, 4096, 40), ("sd15_cross77", 2, 8, 4096, 77, 40),
        ("sd15_self_32x32", 2, 8, 1024, 1024, 80), ("sd15_self_16x16", 2, 8, 256, 256, 160),
        ("sdxl_self_64x64", 2, 10, 4096, 4096, 64), ("sdxl_self_32x32", 2, 20, 1024, 1024, 64),
        ("sdxl_cross77", 2, 20, 1024, 77, 64),
        ("sd3_joint_4096+333", 2, 24, 4429, 4429, 64), ("flux_joint_4096+512", 1, 24, 4608, 4608, 128),
        ("pixart_self", 2, 16, 4096, 4096, 72), ("pixart_cross120", 2, 16, 4096, 120, 72),
        ("pixart_sigma_cross300", 2, 16, 4096, 300, 72), ("sana_self", 2, 70, 4096, 4096, 32),
        ("cogvideox_17k", 1, 48, 17776, 17776, 64), ("hd256_self", 1, 8, 4096, 4096, 256),
    ]
    DTYPES = [torch.float16, torch.bfloat16]

SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
IMPLS = ["diffaccel:triton", "diffaccel:triton-int8"] + [f"baseline:{n}" for n in SDPA_BACKENDS] + \
    ["baseline:sageattention"]
MATH_MAX_SCORES = 2**31  # the math backend materialises B*H*Lq*Lk scores (several copies); beyond this it OOMs


def _qkv(B, H, Lq, Lk, D, dtype):
    g = torch.Generator(device=device()).manual_seed(0)
    mk = lambda L: torch.randn(B, L, H, D, generator=g, device=device(), dtype=dtype).transpose(1, 2)  # noqa: E731
    return mk(Lq), mk(Lk), mk(Lk)


def _callable(impl, q, k, v):
    if impl.startswith("diffaccel:"):
        quant = "int8" if impl.endswith("-int8") else None
        op = "attention_int8" if quant else "attention"
        why = _backend._why_not(_backend.registered_ops()[op], "triton", q.device)
        if why:
            pytest.skip(f"triton backend unavailable: {why}")

        def run():
            with use_backend("triton"):
                return attention(q, k, v, quant=quant)
        return run
    name = impl.split(":", 1)[1]
    if name == "sageattention":
        try:
            from sageattention import sageattn
        except ImportError:
            pytest.skip("sageattention is not installed")
        if q.shape[-1] not in (64, 128):
            pytest.skip(f"sageattention supports head dims 64/128 only, not {q.shape[-1]}")
        return lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[name])
    if name == "sdpa-math" and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] > MATH_MAX_SCORES:
        pytest.skip("math backend would materialise the full score matrix (out of memory)")

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    try:  # a backend that cannot take this shape/dtype/device raises; report it as a skip, not a number
        run()
    except RuntimeError as e:
        pytest.skip(f"{name} cannot run this case: {str(e).splitlines()[0][:160]}")
    return run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", SHAPES, ids=[s[0] for s in SHAPES])
def test_attention_forward(benchmark, case, dtype, impl):
    name, B, H, Lq, Lk, D = case
    q, k, v = _qkv(B, H, Lq, Lk, D, dtype)
    fn = _callable(impl, q, k, v)
    elem = q.element_size()
    annotate(benchmark, family=FAMILY, case=name, shape={"B": B, "H": H, "Lq": Lq, "Lk": Lk, "D": D}, dtype=dtype,
             impl=impl, quant="int8" if impl.endswith("-int8") else None,
             flops=4 * B * H * Lq * Lk * D, bytes=(2 * B * H * Lq * D + 2 * B * H * Lk * D) * elem)
    out = measure(benchmark, fn)
    assert out.shape == (B, H, Lq, D)
