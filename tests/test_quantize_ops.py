"""Activation quantization ops: every backend bit-exact against the one reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffaccel
from diffaccel.ops import BackendUnavailable, _backend, use_backend
from diffaccel.ops.quantize import quantize_per_tensor_reference, quantize_per_token_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# diffusion-ish shapes: tokens x channels, including odd widths and a 1-token row
SHAPES = [(1, 7), (77, 320), (3, 5, 640), (333, 1280), (2, 4096, 40)]
CPU_BACKENDS = ["torch", "cuda", "triton"]


def _needs(backend, op):
    why = _backend._why_not(_backend.registered_ops()[op], backend, torch.device("cpu"))
    if why:
        pytest.skip(why)


def _data(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x[..., 0] = 40.0  # an outlier channel, as diffusion activations have
    # exact halves exercise round-half-to-even
    x.view(-1)[1::7] = torch.arange(x.numel())[1::7].float().remainder(9) - 4.5
    return x.to(dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_per_tensor_bit_exact(backend, dtype, shape):
    _needs(backend, "quantize_per_tensor")
    x = _data(shape, dtype)
    scale, zp = torch.tensor([0.05]), torch.tensor([-3], dtype=torch.int32)
    with use_backend(backend):
        q = diffaccel.ops.quantize_per_tensor(x, scale, zp)
    ref = quantize_per_tensor_reference(x, scale, zp)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert torch.equal(q, ref)
    assert q.min() == -128 and q.max() == 127  # saturation was exercised


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_per_token_bit_exact(backend, dtype, shape):
    _needs(backend, "quantize_per_token")
    x = _data(shape, dtype, seed=1)
    x.view(-1, shape[-1])[0] = 0  # an all-zero row keeps a positive scale
    with use_backend(backend):
        q, s = diffaccel.ops.quantize_per_token(x)
    rq, rs = quantize_per_token_reference(x)
    assert s.shape == (*shape[:-1], 1) and s.dtype == torch.float32
    assert torch.equal(q, rq)
    assert torch.equal(s, rs)
    assert bool((s > 0).all())


def test_reference_round_trip_error_bounded():
    x = _data((64, 256), torch.float32)
    q, s = quantize_per_token_reference(x)
    assert ((q.float() * s - x).abs() <= s / 2 + 1e-6).all()


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 300), scale=st.floats(1e-3, 10.0), zp=st.integers(-128, 127),
       seed=st.integers(0, 2**16))
def test_property_all_backends_agree(m, k, scale, zp, seed):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 5
    scale_t, zp_t = torch.tensor([scale]), torch.tensor([zp], dtype=torch.int32)
    ref = quantize_per_tensor_reference(x, scale_t, zp_t)
    rq, rs = quantize_per_token_reference(x)
    for backend in CPU_BACKENDS:
        if _backend._why_not(_backend.registered_ops()["quantize_per_tensor"], backend, torch.device("cpu")):
            continue
        with use_backend(backend):
            assert torch.equal(diffaccel.ops.quantize_per_tensor(x, scale_t, zp_t), ref), backend
            q, s = diffaccel.ops.quantize_per_token(x)
        assert torch.equal(q, rq) and torch.equal(s, rs), backend


def test_opcheck():
    x = torch.randn(5, 33)
    torch.library.opcheck(torch.ops.diffaccel.quantize_per_tensor.default,
                          (x, torch.tensor([0.1]), torch.tensor([2], dtype=torch.int32)))
    torch.library.opcheck(torch.ops.diffaccel.quantize_per_token.default, (x,))


def test_compile_no_graph_break():
    f = torch.compile(lambda x: diffaccel.ops.quantize_per_token(x), fullgraph=True, backend="eager")
    x = torch.randn(4, 16)
    q, s = f(x)
    rq, rs = quantize_per_token_reference(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)


@pytest.mark.parametrize("bad_scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale_named(bad_scale):
    with pytest.raises(ValueError, match="scale"):
        diffaccel.ops.quantize_per_tensor(torch.randn(4, 4), bad_scale, 0)


@pytest.mark.parametrize("scale", [1e300, -1e300, 1e-300])
def test_a_python_scale_outside_float32_is_named(scale):
    """A finite Python float that float32 turns into inf or 0 was refused as 'got NaN or Inf' /
    'got min 0', values the caller never passed."""
    with pytest.raises(ValueError, match=r"^scale: .*e[+-]300 overflows or underflows float32"):
        diffaccel.ops.quantize_per_tensor(torch.randn(4, 4), scale, 0)
    q = diffaccel.ops.quantize_per_tensor(torch.randn(4, 4), 1e-40, 0)  # a float32 subnormal is a value
    assert q.dtype == torch.int8


def test_bad_inputs_named():
    with pytest.raises(TypeError, match="x: expected dtype"):
        diffaccel.ops.quantize_per_token(torch.randint(0, 4, (4, 4)))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        diffaccel.ops.quantize_per_token([1.0, 2.0])
    with pytest.raises(ValueError, match="x: expected at least one element"):
        diffaccel.ops.quantize_per_token(torch.randn(4, 0))
    with pytest.raises(ValueError, match="zero_point"):
        diffaccel.ops.quantize_per_tensor(torch.randn(4, 4), 0.1, 300)
    with pytest.raises(ValueError, match="scale: expected a single value"):
        diffaccel.ops.quantize_per_tensor(torch.randn(4, 4), torch.tensor([0.1, 0.2]), 0)
    with pytest.raises(TypeError, match="zero_point"):
        diffaccel.ops.quantize_per_tensor(torch.randn(4, 4), 0.1, 1.5)


def test_extension_checks_name_arguments():
    if _backend.extension() is None:
        pytest.skip("extension not built")
    with pytest.raises(RuntimeError, match="x: expected a contiguous"):
        torch.ops.diffaccel.ext_quantize_per_token(torch.randn(8, 8).t())
    with pytest.raises(RuntimeError, match="scale: expected one float32"):
        torch.ops.diffaccel.ext_quantize_per_tensor(torch.randn(8), torch.tensor([1.0, 2.0]),
                                                    torch.tensor([0], dtype=torch.int32))


def test_non_contiguous_input_is_handled():
    x = _data((32, 64), torch.float16).t()
    q, s = diffaccel.ops.quantize_per_token(x)
    rq, rs = quantize_per_token_reference(x.contiguous())
    assert torch.equal(q, rq) and torch.equal(s, rs)


def test_forced_backend_fails_clearly(monkeypatch):
    monkeypatch.setenv("DIFFACCEL_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        diffaccel.ops.quantize_per_token(torch.randn(2, 2))
    monkeypatch.setenv("DIFFACCEL_BACKEND", "bogus")
    with pytest.raises(BackendUnavailable, match="DIFFACCEL_BACKEND"):
        diffaccel.ops.quantize_per_token(torch.randn(2, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(4096, 5120)])
def test_gpu_bit_exact(backend, dtype, shape):
    dev = torch.device("cuda")
    why = _backend._why_not(_backend.registered_ops()["quantize_per_token"], backend, dev)
    if why:
        pytest.skip(why)
    x = _data(shape, dtype).cuda()
    scale, zp = torch.tensor([0.05], device=dev), torch.tensor([-3], dtype=torch.int32, device=dev)
    with use_backend(backend):
        q = diffaccel.ops.quantize_per_tensor(x, scale, zp)
        tq, ts = diffaccel.ops.quantize_per_token(x)
    assert torch.equal(q.cpu(), quantize_per_tensor_reference(x.cpu(), scale.cpu(), zp.cpu()))
    rq, rs = quantize_per_token_reference(x.cpu())
    assert torch.equal(tq.cpu(), rq) and torch.equal(ts.cpu(), rs)
