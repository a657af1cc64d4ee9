"""The CUTLASS W8A8 GEMMs for Hopper (csrc/gemm_sm90.cuh: int8 and fp8) and how calls reach them.

On CPU: which GEMM calls the sm_90 kernels take and which they hand to Triton (with the
reason), the per-call routing of an op whose _C kernel covers only some calls, and that the
extension declares the kernels. On an sm_90 GPU (``gpu``): the int8 kernel is bit-exact against
the integer reference, outputs included, for M in {1, 77, 333, 4096} (both tiles), N and K odd
multiples of 8 and 16, per-token and per-tensor activation scales (the latter with and without a
zero point), with and without bias, fp16 and bf16 out; QuantLinear / int8_linear pick it
automatically. Tolerance: none (torch.equal; a missing bias adds +0.0, so an output of -0.0 may
come back as +0.0, which compares equal).
The fp8 kernel: bit-exact with small integer operands (every fp32 partial sum exact, so the
accumulation order does not matter), and with random operands within the Hopper accumulation
bound of tests/fp8_accumulation.py plus the epilogue's roundings, as the Triton fp8 GEMM. The
feed-forward up projections (int8_ffn_up, fp8_ffn_up) with GELU's tanh form in the same epilogue:
within the bounds tests/test_ffn_ops.py states for the Triton epilogue.
"""
import pytest
import torch

from diffaccel.ops import _backend, use_backend
from diffaccel.ops import gemm as G


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _args(M=300, N=1280, K=1280, **over):
    """int8_act_gemm's arguments, in its order, for a call the sm_90 kernel covers."""
    a = dict(a=torch.zeros(M, K, dtype=torch.int8), w=torch.zeros(N, K, dtype=torch.int8),
             a_scale=torch.ones(M), w_scale=torch.ones(N), zero_point=None, w_sum=None, bias=None, group_size=0,
             w_int4=False, out_dtype=torch.float16)
    a.update(over)
    return tuple(a.values())


# -- what the sm_90 kernel covers -------------------------------------------------------------

def test_sm90_covers_w8a8_calls():
    assert G._sm90_gemm_declines(*_args()) is None
    assert G._sm90_gemm_declines(*_args(a_scale=torch.ones(1), zero_point=torch.tensor([3], dtype=torch.int32),
                                        w_sum=torch.zeros(1280, dtype=torch.int32))) is None
    assert G._sm90_gemm_declines(*_args(M=1, a_scale=torch.ones(1), out_dtype=torch.bfloat16,
                                        bias=torch.zeros(1280))) is None


@pytest.mark.parametrize("over,reason", [
    (dict(w_int4=True, w=torch.zeros(1280, 640, dtype=torch.uint8)), "int4"),
    (dict(group_size=128), "group-wise"),
    (dict(zero_point=torch.tensor([3], dtype=torch.int32)), "w_sum"),
    (dict(zero_point=torch.tensor([3], dtype=torch.int32), w_sum=torch.zeros(1281, dtype=torch.int32)[1:]), "w_sum"),
    (dict(out_dtype=torch.float32), "float16 or bfloat16"),
    (dict(K=1288, a=torch.zeros(300, 1288, dtype=torch.int8), w=torch.zeros(1280, 1288, dtype=torch.int8)), "K % 16"),
    (dict(N=1284, w=torch.zeros(1284, 1280, dtype=torch.int8), w_scale=torch.ones(1284)), "N % 8"),
    (dict(w=torch.zeros(1280, 2560, dtype=torch.int8)[:, :1280]), "contiguous"),
    (dict(w_scale=torch.ones(2560)[::2]), "w_scale"),
    (dict(w_scale=torch.ones(1281)[1:]), "aligned"),
    (dict(bias=torch.ones(1281)[1:]), "aligned"),
])
def test_sm90_declines_with_reason(over, reason):
    why = G._sm90_gemm_declines(*_args(**over))
    assert why is not None and reason in why


def test_sm90_fp8_covers_and_declines():
    a = torch.zeros(300, 1280, dtype=torch.float8_e4m3fn)
    w = torch.zeros(1280, 1280, dtype=torch.float8_e4m3fn)
    ok = (a, w, torch.ones(300), torch.ones(1280), None, torch.bfloat16)
    assert G._sm90_fp8_declines(*ok) is None
    assert "float16 or bfloat16" in G._sm90_fp8_declines(*ok[:5], torch.float32)
    narrow = torch.zeros(1284, 1280, dtype=torch.float8_e4m3fn)
    assert "N % 8" in G._sm90_fp8_declines(a, narrow, torch.ones(300), torch.ones(1284), None, torch.bfloat16)


def test_int8_linear_keeps_fused_kernel_at_small_m():
    x = torch.zeros(G.FUSED_QUANT_MAX_M, 1280, dtype=torch.float16)
    w, ws = torch.zeros(1280, 1280, dtype=torch.int8), torch.ones(1280)
    args = (x, w, ws, None, None, None, None, None, 0, False, torch.float16)
    assert "fused" in G._sm90_linear_declines(*args)
    big = (torch.zeros(G.FUSED_QUANT_MAX_M + 1, 1280, dtype=torch.float16),) + args[1:]
    assert G._sm90_linear_declines(*big) is None
    # the float input's own address does not matter: the call quantizes it into a fresh buffer
    shifted = (torch.zeros((G.FUSED_QUANT_MAX_M + 1) * 1280 + 1, dtype=torch.float16)[1:].view(-1, 1280),) + args[1:]
    assert shifted[0].data_ptr() % 16 and G._sm90_linear_declines(*shifted) is None
    assert "aligned" in G._sm90_gemm_declines(*_args(a=torch.zeros(300 * 1280 + 1, dtype=torch.int8)[1:].view(300, 1280)))


def test_extension_declares_the_kernel():
    ext = _backend.extension()
    if ext is None:
        pytest.skip(_backend.extension_error())
    assert isinstance(ext.cutlass_sm90(), bool)
    assert hasattr(torch.ops.diffaccel, "ext_int8_gemm_sm90") and hasattr(torch.ops.diffaccel, "ext_fp8_gemm_sm90")
    for name in ("int8_act_gemm", "int8_linear", "fp8_gemm"):
        op = _backend.registered_ops()[name]
        assert op.cuda_capabilities == ((9, 0),) and op.cuda_built == "cutlass_sm90" and op.cuda_covers is not None


# -- routing of a partial _C kernel (a stand-in op on CPU, where _C kernels may be forced) --------

@pytest.fixture
def partial_op(monkeypatch):
    if _backend.extension() is None:
        pytest.skip(_backend.extension_error())
    calls = []

    def impl(tag):
        def run(x):
            calls.append(tag)
            return x
        return run

    op = _backend.OpBackends("test_partial_cuda", torch=impl("torch"), triton=impl("triton"), cuda=impl("cuda"),
                             cuda_devices=("cpu",), cuda_covers=lambda x: None if x.numel() > 1 else "wants numel > 1")
    monkeypatch.setitem(_backend._REGISTRY, op.name, op)
    _backend._choose.cache_clear()
    _backend._uncovered.cache_clear()
    yield op.name, calls
    _backend._choose.cache_clear()
    _backend._uncovered.cache_clear()


def test_partial_kernel_runs_covered_calls(partial_op):
    name, calls = partial_op
    with use_backend("cuda"):
        _backend.implementation(name, torch.device("cpu"), (torch.zeros(2),))(torch.zeros(2))
    assert calls == ["cuda"]


def test_partial_kernel_forced_raises_on_uncovered(partial_op):
    name, _ = partial_op
    with use_backend("cuda"), pytest.raises(_backend.BackendUnavailable, match="wants numel > 1"):
        _backend.implementation(name, torch.device("cpu"), (torch.zeros(1),))


def test_partial_kernel_needs_args(partial_op):
    name, _ = partial_op
    with use_backend("cuda"), pytest.raises(TypeError, match="pass args"):
        _backend.implementation(name, torch.device("cpu"))


def test_partial_kernel_hands_uncovered_calls_on(partial_op, monkeypatch):
    # the automatic choice picks _C only on a GPU: stand in for that choice here
    name, calls = partial_op
    real = _backend.choose
    monkeypatch.setattr(_backend, "choose", lambda n, d: ("cuda", "test") if n == name else real(n, d))
    x = torch.zeros(1)
    _backend.implementation(name, torch.device("cpu"), (x,))(x)
    _backend.implementation(name, torch.device("cpu"), (torch.zeros(3),))(x)
    assert calls == ["triton" if _backend.triton_interpreting() else "torch", "cuda"]


# -- what the patch report says a layer runs on ---------------------------------------------------

@pytest.fixture
def sm90_chosen(monkeypatch):
    """The automatic choice of an sm_90 GPU with the CUTLASS build, on CPU: the GEMM ops pick their
    _C kernel, which then takes or declines each call by its arguments (as it does on the GPU)."""
    real = _backend.choose
    partial = {n for n, op in _backend.registered_ops().items() if op.cuda_covers is not None}
    monkeypatch.setattr(_backend, "choose", lambda n, d: ("cuda", "test") if n in partial else real(n, d))
    _backend._uncovered.cache_clear()
    yield
    _backend._uncovered.cache_clear()


@pytest.mark.parametrize("preset,expected", [("w8a8", "cuda"), ("fp8", "cuda"), ("w4a8", "fallback")])
def test_report_backend_is_the_layers_own(sm90_chosen, preset, expected):
    from diffaccel.nn import QuantLinear
    from diffaccel.patch import _backend_of

    layer = QuantLinear.from_float(torch.nn.Linear(256, 128).to(torch.bfloat16), preset)
    fallback = "triton" if _backend.triton_interpreting() else "torch"
    assert _backend_of(layer) == (fallback if expected == "fallback" else expected)


def test_probe_does_not_run_the_probed_op(sm90_chosen, monkeypatch):
    from diffaccel.nn import QuantLinear

    import dataclasses

    layer = QuantLinear.from_float(torch.nn.Linear(256, 128).half(), "w8a8")
    ran = []
    op = _backend.registered_ops()["int8_linear"]
    monkeypatch.setitem(_backend._REGISTRY, "int8_linear",
                        dataclasses.replace(op, cuda=lambda *a: ran.append(a) or torch.zeros(100, 128)))
    x = torch.zeros(100, 256, dtype=torch.float16)
    assert _backend.probe_backend(lambda: layer(x), ("int8_linear",)) == "cuda"
    assert ran == []
    # probing another op: the layer's call runs (on the stand-in _C kernel) and nothing is probed
    assert _backend.probe_backend(lambda: layer(x), ("no_such_op",)) is None
    assert len(ran) == 1


# -- GPU: bit-exact on sm_90 -------------------------------------------------------------------

def _sm90_or_skip(op="int8_act_gemm"):
    dev = torch.device("cuda")
    why = _backend._why_not(_backend.registered_ops()[op], "cuda", dev)
    if why:
        pytest.skip(why)
    return dev


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 77, 333, 4096])
@pytest.mark.parametrize("N,K", [(1280, 1280), (8 * 163, 16 * 161)])
@pytest.mark.parametrize("act,bias,out_dtype", [("per_token", True, torch.float16), ("per_token", False, torch.bfloat16),
                                               ("static", True, torch.bfloat16), ("static_zp", False, torch.float16),
                                               ("static_zp", True, torch.bfloat16)])
def test_gpu_sm90_gemm_bit_exact(M, N, K, act, bias, out_dtype):
    dev = _sm90_or_skip()
    g = _gen(M + N)
    a = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    a_scale = torch.rand(M, 1, generator=g) * 0.1 + 1e-3 if act == "per_token" else torch.tensor([0.037])
    w_scale = torch.rand(N, generator=g) * 0.01 + 1e-4
    b = torch.randn(N, generator=g) if bias else None
    zp = torch.tensor([-9], dtype=torch.int32) if act == "static_zp" else None
    w_sum = w.to(torch.int32).sum(1, dtype=torch.int32) if zp is not None else None
    ref = G.int8_act_gemm_reference(a, w, a_scale, w_scale, zp, w_sum, b, 0, False, out_dtype)
    kw = {} if zp is None else dict(zero_point=zp.to(dev), w_sum=w_sum.to(dev))
    with use_backend("cuda"):
        out = G.int8_gemm(a.to(dev), w.to(dev), a_scale.to(dev), w_scale.to(dev),
                          bias=None if b is None else b.to(dev), out_dtype=out_dtype, **kw)
    assert torch.equal(out.cpu(), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [77, 333, 4096])
@pytest.mark.parametrize("act", ["dynamic", "static", "static_zp"])
def test_gpu_sm90_int8_linear_automatic(M, act):
    dev = _sm90_or_skip()
    g = _gen(M)
    N, K = 2560, 1280
    x = torch.randn(M, K, generator=g).to(torch.float16)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    w_scale = torch.rand(N, generator=g) * 0.01 + 1e-4
    b = torch.randn(N, generator=g)
    act_scale = None if act == "dynamic" else torch.tensor([0.05])
    zp = torch.tensor([-9], dtype=torch.int32) if act == "static_zp" else None
    w_sum = w.to(torch.int32).sum(1, dtype=torch.int32) if zp is not None else None
    ref = G.int8_linear_reference(x, w, w_scale, None, act_scale, zp, w_sum, b, 0, False, torch.float16)
    assert _backend.choose("int8_linear", dev)[0] == "cuda"
    kw = {} if act_scale is None else dict(act_scale=act_scale.to(dev))
    if zp is not None:
        kw.update(act_zero_point=zp.to(dev), w_sum=w_sum.to(dev))
    with use_backend("cuda"):  # M > FUSED_QUANT_MAX_M: the sm_90 GEMM takes every one of these calls
        out = G.int8_linear(x.to(dev), w.to(dev), w_scale.to(dev), bias=b.to(dev), **kw)
    assert torch.equal(out.cpu(), ref)


@pytest.mark.gpu
def test_gpu_sm90_uncovered_call_runs_on_triton():
    dev = _sm90_or_skip()
    g = _gen(5)
    M, N, K = 333, 1280, 1280
    x = torch.randn(M, K, generator=g).to(torch.float16)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    w_scale = torch.rand(N, K // 128, generator=g) * 0.01 + 1e-4  # group-wise: not the sm_90 kernel's
    ref = G.int8_linear_reference(x, w, w_scale, None, None, None, None, None, 128, False, torch.float16)
    out = G.int8_linear(x.to(dev), w.to(dev), w_scale.to(dev), group_size=128)
    assert torch.equal(out.cpu(), ref)
    with use_backend("cuda"), pytest.raises(_backend.BackendUnavailable, match="group-wise"):
        G.int8_linear(x.to(dev), w.to(dev), w_scale.to(dev), group_size=128)


@pytest.mark.gpu
def test_gpu_sm90_quant_linear_layer():
    dev = _sm90_or_skip()
    from diffaccel.nn import QuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(1280, 5120).half()
    layer = QuantLinear.from_float(lin, "w8a8")
    x = torch.randn(2, 600, 1280).half()
    with use_backend("torch"):
        ref = layer(x)
    out = layer.to(dev)(x.to(dev))
    assert torch.equal(out.cpu(), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 77, 333, 4096])
@pytest.mark.parametrize("per_token,bias,out_dtype", [(True, True, torch.bfloat16), (False, False, torch.float16)])
def test_gpu_sm90_fp8_exact_accumulation(M, per_token, bias, out_dtype):
    dev = _sm90_or_skip("fp8_gemm")
    g = _gen(M)
    N, K = 8 * 163, 16 * 161
    # |products| <= 4, so |partial sums| <= 4 K < 2^14: exact even in wgmma's fp8 accumulator, which
    # keeps about 14 significant bits (tests/fp8_accumulation.py), and in fp32
    a = torch.randint(-2, 3, (M, K), generator=g).float().to(torch.float8_e4m3fn)
    w = torch.randint(-2, 3, (N, K), generator=g).float().to(torch.float8_e4m3fn)
    a_scale = torch.rand(M, 1, generator=g) + 0.01 if per_token else torch.tensor([0.37])
    w_scale = torch.rand(N, generator=g) + 0.01
    b = torch.randn(N, generator=g) if bias else None
    ref = G.fp8_gemm_reference(a, w, a_scale.reshape(-1), w_scale, b, out_dtype)
    with use_backend("cuda"):
        out = G.fp8_gemm(a.to(dev), w.to(dev), a_scale.to(dev), w_scale.to(dev),
                         bias=None if b is None else b.to(dev), out_dtype=out_dtype)
    assert torch.equal(out.cpu(), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [77, 4096])
def test_gpu_sm90_fp8_linear_within_bound(M):
    from fp8_accumulation import abs_product_sum, fp8_sum_rel_bound

    from diffaccel.quant import formats as fmt

    dev = _sm90_or_skip("fp8_gemm")
    g = _gen(M)
    x = torch.randn(M, 1024, generator=g).to(torch.bfloat16)
    w, ws = fmt.quantize_weight_fp8(torch.randn(768, 1024, generator=g))
    rq, rs = G.quantize_rows_fp8_reference(x, None)
    assert _backend.choose("fp8_gemm", dev)[0] == "cuda"
    q, s = G.quantize_activation_fp8(x.to(dev))
    out = G.fp8_gemm(q, w.to(dev), s, ws.to(dev), out_dtype=torch.bfloat16)
    ref = G.fp8_gemm_reference(rq, w, rs, ws, None, torch.float32).double()
    # the accumulation's bound, the epilogue's fp32 roundings, and the bf16 output's half ulp (2^-8)
    bound = fp8_sum_rel_bound(dev) * abs_product_sum(rq, w, rs, ws) + (2.0**-21 + 2.0**-8) * ref.abs()
    worst = ((out.cpu().double() - ref).abs() - bound).max().item()
    assert worst <= 0, f"fp8 GEMM error exceeds its bound by {worst:.3g}"


# -- the feed-forward up projection with GELU (tanh) in the epilogue ----------------------------

def _ffn_args(M=300, x_dtype=torch.float16, activation="gelu_tanh", next_scale=None):
    """int8_ffn_up's op arguments, in its order."""
    x = torch.zeros(M, 1280, dtype=x_dtype)
    act_scale = torch.ones(M, 1) if x_dtype == torch.int8 else None
    return (x, torch.zeros(5120, 1280, dtype=torch.int8), torch.ones(5120), None, act_scale, None, None, None, 0,
            False, activation, next_scale, None, None, torch.float16)


def test_sm90_ffn_covers_gelu_tanh_only():
    from diffaccel.ops import ffn as FF

    assert FF._sm90_ffn_declines(*_ffn_args()) is None
    assert FF._sm90_ffn_declines(*_ffn_args(M=1, x_dtype=torch.int8)) is None  # codes: no fused-quant kernel
    assert "not 'geglu'" in FF._sm90_ffn_declines(*_ffn_args(activation="geglu"))
    assert "not 'gelu'" in FF._sm90_ffn_declines(*_ffn_args(activation="gelu"))
    assert "codes" in FF._sm90_ffn_declines(*_ffn_args(next_scale=torch.tensor([0.1])))
    assert "fused" in FF._sm90_ffn_declines(*_ffn_args(M=G.FUSED_QUANT_MAX_M))
    a = torch.zeros(300, 1280, dtype=torch.float8_e4m3fn)
    w = torch.zeros(5120, 1280, dtype=torch.float8_e4m3fn)
    fp8 = (a, w, torch.ones(300), torch.ones(5120), None)
    assert FF._sm90_fp8_ffn_declines(*fp8, "gelu_tanh", torch.bfloat16) is None
    assert "not 'geglu_tanh'" in FF._sm90_fp8_ffn_declines(*fp8, "geglu_tanh", torch.bfloat16)
    assert "float16 or bfloat16" in FF._sm90_fp8_ffn_declines(*fp8, "gelu_tanh", torch.float32)
    for name in ("int8_ffn_up", "fp8_ffn_up"):
        op = _backend.registered_ops()[name]
        assert op.cuda_capabilities == ((9, 0),) and op.cuda_covers is not None


@pytest.mark.gpu
@pytest.mark.parametrize("M", [77, 333, 4096])
@pytest.mark.parametrize("codes", [False, True])
def test_gpu_sm90_int8_ffn_up_gelu_tanh(M, codes):
    """SDXL-sized up projection (1280 -> 5120) with GELU (tanh) in the sm_90 epilogue: within the
    bound tests/test_ffn_ops.py states for the Triton epilogue (8 fp32 ulps of the pre-activation
    scale plus one rounding of the fp16 output); from float input and from per-token codes."""
    from test_ffn_ops import _assert_float_close, _operands, _scale

    from diffaccel.ops import int8_ffn_up

    dev = _sm90_or_skip("int8_ffn_up")
    x, w, s, kw = _operands(torch.Generator().manual_seed(M), M, 1280, 5120, "gelu_tanh", dtype=torch.float16)
    with use_backend("torch"):
        ref = int8_ffn_up(x, w, s, **kw)
    on = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in kw.items()}
    with use_backend("cuda"):
        if codes:
            q, qs = G.quantize_activation_int8(x.to(dev))
            out = int8_ffn_up(q, w.to(dev), s.to(dev), act_scale=qs, out_dtype=torch.float16, **on).cpu()
        else:
            out = int8_ffn_up(x.to(dev), w.to(dev), s.to(dev), **on).cpu()
    _assert_float_close(out, ref, _scale(x, w, s, kw))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [77, 4096])
def test_gpu_sm90_fp8_ffn_up_gelu_tanh(M):
    """Flux-sized fp8 up projection (3072 -> 12288), GELU (tanh) in the sm_90 epilogue, bf16 out:
    the pre-activation within the Hopper accumulation bound d (tests/fp8_accumulation.py), GELU
    moving it by at most 1.13 d, plus fp32 roundings and one bf16 rounding (2^-8 relative)."""
    from fp8_accumulation import abs_product_sum, fp8_sum_rel_bound

    from diffaccel.ops import ffn as FF
    from diffaccel.quant import formats as fmt

    dev = _sm90_or_skip("fp8_ffn_up")
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 3072, generator=g)
    wq, ws = fmt.quantize_weight_fp8(torch.randn(12288, 3072, generator=g) * 0.02)
    a, s = G.quantize_rows_fp8_reference(x, None)
    with use_backend("torch"):
        ref = FF.fp8_ffn_up(a, wq, s, ws, activation="gelu_tanh", out_dtype=torch.float32).double()
    with use_backend("cuda"):
        out = FF.fp8_ffn_up(a.to(dev), wq.to(dev), s.to(dev), ws.to(dev), activation="gelu_tanh",
                            out_dtype=torch.bfloat16).cpu().double()
    bound = 1.13 * fp8_sum_rel_bound(dev) * abs_product_sum(a, wq, s, ws) + (2.0**-20 + 2.0**-8) * ref.abs() + 2.0**-40
    worst = ((out - ref).abs() - bound).max().item()
    assert worst <= 0, f"fp8 feed-forward error exceeds its bound by {worst:.3g}"
