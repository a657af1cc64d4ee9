"""INT8 activation quantization (per token, per tensor): diffaccel's CUDA and Triton kernels vs the
torch reference run eagerly and under torch.compile, at diffusion widths (4096 tokens x K)."""
import pytest
import torch

from benchmarks._util import annotate, device, dtype_name, is_smoke, measure
from diffaccel.ops import _backend, quantize_per_tensor, quantize_per_token, use_backend
from diffaccel.ops.quantize import quantize_per_tensor_reference, quantize_per_token_reference

FAMILY = "quantize"
if is_smoke():
    SHAPES = [(8, 40)]
    DTYPES = [torch.float16]
else:  # SD1.5/SDXL channel widths 320/640/1280, SD3/Flux hidden 3072
    SHAPES = [(4096, 320), (4096, 640), (4096, 1280), (4096, 3072)]
    DTYPES = [torch.float16, torch.bfloat16]
IMPLS = ["diffaccel:cuda", "diffaccel:triton", "baseline:torch-eager", "baseline:torch-compile"]


def _bytes_moved(M: int, K: int, dtype: torch.dtype, per_token: bool) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return M * K * elem + M * K + (M * 4 if per_token else 8)  # x in, int8 out, scales / scale+zp


def _callable(impl: str, op_name: str, ours, reference, args):
    """A zero-argument call of ``impl``, or a skip saying why it cannot run here."""
    if impl.startswith("diffaccel:"):
        backend = impl.split(":", 1)[1]
        why = _backend._why_not(_backend.registered_ops()[op_name], backend, args[0].device)
        if why is not None:
            pytest.skip(f"{backend} backend unavailable: {why}")

        def run():
            with use_backend(backend):
                return ours(*args)
        return run
    if impl == "baseline:torch-eager":
        return lambda: reference(*args)
    if impl == "baseline:torch-compile":
        if is_smoke():
            pytest.skip("torch.compile baseline runs on GPU only (CPU inductor builds are slow)")
        torch._dynamo.reset()  # a fresh graph per shape; the recompile limit would otherwise fall back to eager
        compiled = torch.compile(reference, dynamic=False, fullgraph=True)
        return lambda: compiled(*args)
    raise ValueError(f"impl: unknown {impl!r}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_quantize_per_token(benchmark, shape, dtype, impl):
    M, K = shape
    x = torch.randn(M, K, dtype=dtype, device=device())
    fn = _callable(impl, "quantize_per_token", quantize_per_token, quantize_per_token_reference, (x,))
    annotate(benchmark, family=FAMILY, case="per_token", shape=shape, dtype=dtype, impl=impl,
             flops=None, bytes=_bytes_moved(M, K, dtype, per_token=True))
    q, scales = measure(benchmark, fn)
    assert q.shape == (M, K) and q.dtype == torch.int8 and scales.shape == (M, 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_quantize_per_tensor(benchmark, shape, dtype, impl):
    M, K = shape
    dev = device()
    x = torch.randn(M, K, dtype=dtype, device=dev)
    scale = torch.tensor([0.02], dtype=torch.float32, device=dev)
    zero_point = torch.tensor([3], dtype=torch.int32, device=dev)
    fn = _callable(impl, "quantize_per_tensor", quantize_per_tensor, quantize_per_tensor_reference,
                   (x, scale, zero_point))
    annotate(benchmark, family=FAMILY, case="per_tensor", shape=shape, dtype=dtype, impl=impl,
             flops=None, bytes=_bytes_moved(M, K, dtype, per_token=False))
    q = measure(benchmark, fn)
    assert q.shape == (M, K) and q.dtype == torch.int8


# -- a norm that also quantizes its output (diffaccel.ops.layer_norm_quantize) ----------------------
# What patch puts in front of dynamically quantized q/k/v: before, the norm (and the adaLN modulation)
# wrote y and the projections' shared quantization pass read it back. Cases: a UNet's affine
# LayerNorm (SDXL, 1280 wide) and a DiT's modulated adaLN norm (Flux / SD3.5, 3072 wide), 4096 tokens.
if is_smoke():
    NORM_CASES = [("affine", (1, 8, 40))]
else:
    NORM_CASES = [("affine", (1, 4096, 1280)), ("adaln", (1, 4096, 3072)), ("adaln", (2, 4096, 3072))]
NORM_IMPLS = ["diffaccel:triton", "baseline:norm+quantize-triton", "baseline:torch-eager", "baseline:torch-compile"]


def _norm_then_quantize(x, w, b, scale, shift):
    """The unfused path: torch's LayerNorm (+ modulation in x's dtype, as diffusers), then one
    dynamic quantization pass (whichever backend quantize_activation_int8 picks)."""
    from diffaccel.ops import quantize_activation_int8

    y = torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, 1e-6)
    if scale is not None:
        y = y * (1 + scale[:, None]) + shift[:, None]
    return (y, *quantize_activation_int8(y.reshape(-1, x.shape[-1])))


@pytest.mark.parametrize("impl", NORM_IMPLS)
@pytest.mark.parametrize("case,shape", NORM_CASES, ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
def test_layer_norm_quantize(benchmark, case, shape, impl):
    from diffaccel.ops import layer_norm_quantize
    from diffaccel.ops.norm import layer_norm_quantize_reference

    B, L, K = shape
    dev, dtype = device(), torch.bfloat16
    x = torch.randn(B, L, K, dtype=dtype, device=dev)
    w = b = scale = shift = None
    if case == "affine":
        w, b = torch.rand(K, dtype=dtype, device=dev) + 0.5, torch.randn(K, dtype=dtype, device=dev)
    else:
        scale, shift = (torch.randn(B, K, dtype=dtype, device=dev) * 0.3 for _ in range(2))
    if impl == "baseline:norm+quantize-triton":
        if _backend._why_not(_backend.registered_ops()["quantize_rows_int8"], "triton", x.device):
            pytest.skip("triton backend unavailable")

        def fn():
            with use_backend("triton"):
                return _norm_then_quantize(x, w, b, scale, shift)
    else:
        def reference(x, w, b, scale, shift):
            return layer_norm_quantize_reference(x.reshape(-1, K), w, b, scale, shift, L, 1e-6, False)

        fn = _callable(impl, "layer_norm_quantize",
                       lambda *a: layer_norm_quantize(a[0], a[1], a[2], 1e-6, scale=a[3], shift=a[4]), reference,
                       (x, w, b, scale, shift))
    elem = x.element_size()
    annotate(benchmark, family=FAMILY, case=f"layer_norm_{case}", shape=shape, dtype=dtype, impl=impl, flops=None,
             bytes=B * L * K * (2 * elem + 1) + B * L * 4)  # x in; y and the codes out; scales
    y, q, s = measure(benchmark, fn)
    assert q.shape == (B * L, K) and s.shape == (B * L, 1)
