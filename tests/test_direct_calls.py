"""The eager fast path of the custom ops (diffaccel.ops._backend.CustomOp): a plain eager call runs
the op's body without the torch dispatcher; everything that needs the dispatcher to see the op
(autograd, fake tensors, profilers, tensor subclasses, torch.compile) still goes through it; both
paths give bit-identical results."""
import importlib

import pytest
import torch

from diffaccel.ops import _backend, use_backend
from diffaccel.ops import gemm as G
from diffaccel.ops import solver as S

A = importlib.import_module("diffaccel.ops.attention")  # the package exports the function under this name


def _int8_linear_args(M=5, K=32, N=24):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g, dtype=torch.float32)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    w_scale = torch.rand(N, generator=g) * 0.01 + 0.001
    return x, w, w_scale


def _calls(op):
    """Wrap ``op``'s dispatcher entry: returns the list that records each call through it."""
    seen = []
    real = op.packet

    def counting(*args):
        seen.append(1)
        return real(*args)
    return seen, counting


def test_every_op_is_a_custom_op_with_its_dispatcher_entry():
    for name in ("int8_linear", "int8_act_gemm", "fp8_gemm", "weight_only_gemm", "attention", "fused_solver_step",
                 "int8_conv2d", "fp8_conv2d", "int8_ffn_up", "group_norm_affine", "layer_norm_quantize"):
        assert hasattr(torch.ops.diffaccel, name), name
    assert isinstance(G._int8_linear_op, _backend.CustomOp)
    assert G._int8_linear_op.packet is torch.ops.diffaccel.int8_linear


def test_eager_call_skips_the_dispatcher(monkeypatch):
    x, w, s = _int8_linear_args()
    seen, counting = _calls(G._int8_linear_op)
    monkeypatch.setattr(G._int8_linear_op, "packet", counting)
    with torch.no_grad():
        G.int8_linear(x, w, s)
    assert seen == []
    with torch.no_grad(), _backend.through_dispatcher():
        G.int8_linear(x, w, s)
    assert seen == [1]


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


@pytest.mark.parametrize("situation", ["grad", "profiler", "function_mode", "subclass"])
def test_dispatcher_kept_where_something_must_see_the_op(situation, monkeypatch):
    x, w, s = _int8_linear_args()
    seen, counting = _calls(G._int8_linear_op)
    monkeypatch.setattr(G._int8_linear_op, "packet", counting)
    if situation == "grad":
        x.requires_grad_(True)
        with torch.enable_grad():
            G.int8_linear(x, w, s)
    elif situation == "profiler":
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            G.int8_linear(x, w, s)
        assert "diffaccel::int8_linear" in {e.key for e in prof.key_averages()}
    elif situation == "function_mode":
        with torch.no_grad(), torch.device("cpu"):  # a TorchFunctionMode
            G.int8_linear(x, w, s)
    else:
        class Marked(torch.Tensor):
            pass
        with torch.no_grad():
            G.int8_linear(x.as_subclass(Marked), w, s)
    assert seen == [1]


def test_fake_tensors_reach_the_fake_kernel():
    x, w, s = _int8_linear_args()
    with _fake_mode() as mode:
        fx, fw, fs = (mode.from_tensor(t) for t in (x, w, s))
        y = G.int8_linear(fx, fw, fs)
    assert type(y).__name__ == "FakeTensor" and tuple(y.shape) == (5, 24)


def test_meta_tensors_take_the_dispatcher():
    x, w, s = _int8_linear_args()
    with torch.no_grad():
        y = torch.ops.diffaccel.int8_linear(x.to("meta"), w.to("meta"), s.to("meta"), None, None, None, None, None,
                                            0, False, torch.float32)
    assert y.device.type == "meta"
    assert not _backend.direct_call_ok((x.to("meta"),))


def _each_op_both_ways(fn):
    with torch.no_grad():
        direct = fn()
        with _backend.through_dispatcher():
            dispatched = fn()
    return direct, dispatched


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_both_paths_bit_identical(backend):
    x, w, s = _int8_linear_args(M=70)  # > FUSED_QUANT_MAX_M: quantize pass + GEMM
    q = torch.randn(1, 2, 9, 16)
    k = torch.randn(1, 2, 11, 16)
    v = torch.randn(1, 2, 11, 16)
    sample, eps, cond = (torch.randn(2, 4, 8, 8) for _ in range(3))
    coeffs = torch.zeros(S.NUM_COEFFS)
    coeffs[S.A_X], coeffs[S.A_E], coeffs[S.C_P] = 0.9, -0.1, 1.0
    coeffs[S.CLIP] = float("inf")
    calls = {
        "int8_linear": lambda: G.int8_linear(x, w, s),
        "attention": lambda: A.attention(q, k, v),
        "attention_int8": lambda: A.attention(q, k, v, quant="int8"),
        "fused_solver_step": lambda: S.fused_solver_step(sample, eps, coeffs, model_output_cond=cond,
                                                         guidance_scale=5.0)[0],
    }
    with use_backend(backend):
        for name, fn in calls.items():
            direct, dispatched = _each_op_both_ways(fn)
            assert torch.equal(direct, dispatched), name


def test_triton_on_another_gpu_runs_under_its_device_guard(monkeypatch):
    """Triton launches on the current CUDA device; a tensor on another GPU gets a device guard
    (the _C kernels set their own). Checked on the returned callable: no GPU here."""
    monkeypatch.setattr(_backend, "choose", lambda op_name, device: ("triton", "test"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    raw = _backend.registered_ops()["int8_linear"].triton
    assert _backend.implementation("int8_linear", torch.device("cuda", 0)) is raw
    guarded = _backend.implementation("int8_linear", torch.device("cuda", 1))
    assert guarded is not raw and guarded.__name__ == "on_device"
    assert _backend.implementation("int8_linear", torch.device("cpu")) is raw


def test_compiled_call_keeps_the_op_in_the_graph():
    x, w, s = _int8_linear_args()
    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    f = torch.compile(lambda x: G.int8_linear(x, w, s), backend=backend, fullgraph=True)
    with torch.no_grad():
        y = f(x)
    assert any("diffaccel.int8_linear" in o for o in ops), ops
    with torch.no_grad():
        assert torch.equal(y, G.int8_linear(x, w, s))


def test_fx_symbolic_trace_records_the_op():
    """fx.Proxy arguments are not tensors but override torch functions: the op must be recorded as
    one node, not its body run on proxies."""
    _, w, s = _int8_linear_args()
    rest = (None, None, None, None, None, 0, False, torch.float32)

    class Layer(torch.nn.Module):
        def forward(self, x):
            return G._int8_linear_op(x, w, s, *rest)

    gm = torch.fx.symbolic_trace(Layer())
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == ["diffaccel.int8_linear.default"] or targets == ["diffaccel.int8_linear"], targets
    x = _int8_linear_args()[0]
    with torch.no_grad():
        assert torch.equal(gm(x), G._int8_linear_op(x, w, s, *rest))
