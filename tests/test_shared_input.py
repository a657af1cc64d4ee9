"""project_shared: sibling projections of one input (q/k/v) quantize it once.

The shared codes are the ones each layer computes itself, so every comparison here is bit-exact
(torch.equal), on the torch backend and on Triton (interpreter on CPU)."""
import pytest
import torch
from torch import nn

from diffaccel.nn import QuantLinear
from diffaccel.nn import shared_input as S
from diffaccel.ops import gemm as G
from diffaccel.ops import use_backend

M_SHARED = G.FUSED_QUANT_MAX_M + 13  # above the fused-quantization threshold: sharing applies


def _layers(spec, K=64, Ns=(32, 48, 40), dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return [QuantLinear.from_float(nn.Linear(K, n, bias=i != 1).to(dtype), spec) for i, n in enumerate(Ns)]


class _CountQuantizer:
    """Counts the separate activation-quantization calls (int8 and fp8) made through ops.gemm."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for name in ("quantize_activation_int8", "quantize_activation_fp8"):
            orig = getattr(G, name)

            def counted(*a, _orig=orig, **k):
                self.calls += 1
                return _orig(*a, **k)

            monkeypatch.setattr(G, name, counted)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("spec", ["w8a8", "w4a8", "fp8"])
def test_shared_equals_separate(spec, backend, monkeypatch):
    layers = _layers(spec, K=128)
    x = torch.randn(2, M_SHARED, 128) * 3
    with use_backend(backend):
        separate = [layer(x) for layer in layers]
        counter = _CountQuantizer(monkeypatch)
        assert S.can_share_input(x, layers)
        shared = S.project_shared(x, *layers)
    assert counter.calls == 1
    for a, b, layer in zip(shared, separate, layers):
        assert a.shape == (2, M_SHARED, layer.out_features) and a.dtype == b.dtype
        assert torch.equal(a, b)


def test_bf16_layers_share_and_keep_dtype():
    layers = _layers("w8a8", dtype=torch.bfloat16)
    x = torch.randn(M_SHARED, 64, dtype=torch.bfloat16)
    with use_backend("torch"):
        for a, b in zip(S.project_shared(x, *layers), [layer(x) for layer in layers]):
            assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def _not_shared_cases():
    w8 = _layers("w8a8")
    torch.manual_seed(1)
    smooth = QuantLinear.from_float(nn.Linear(64, 16), "w8a8", smooth=torch.rand(64) + 0.5)
    static = QuantLinear.from_float(nn.Linear(64, 16), _static_spec(), act_scale=torch.tensor([0.05]))
    fp8 = _layers("fp8", Ns=(16,))[0]
    weight_only = _layers(_weight_only_spec(), Ns=(16,))[0]
    hooked = _layers("w8a8", Ns=(16,), seed=3)[0]
    hooked.register_forward_hook(lambda m, i, o: None)
    return {
        "smoothing vector": (w8[:2] + [smooth], M_SHARED),
        "static activations": (w8[:2] + [static], M_SHARED),
        "mixed int8 and fp8": (w8[:2] + [fp8], M_SHARED),
        "weight-only layer": (w8[:2] + [weight_only], M_SHARED),
        "float nn.Linear": (w8[:2] + [nn.Linear(64, 16)], M_SHARED),
        "forward hook": (w8[:2] + [hooked], M_SHARED),
        "small M (fused kernel quantizes)": (w8, G.FUSED_QUANT_MAX_M),
        "single layer": (w8[:1], M_SHARED),
    }


def _weight_only_spec():
    from diffaccel.quant import QuantSpec

    return QuantSpec("int8", None, None)


def _static_spec():
    from diffaccel.quant import QuantSpec

    return QuantSpec("int8", None, "int8", "static", True)


NOT_SHARED = ["smoothing vector", "static activations", "mixed int8 and fp8", "weight-only layer",
              "float nn.Linear", "forward hook", "small M (fused kernel quantizes)", "single layer"]


def test_not_shared_case_list_is_complete():
    assert sorted(NOT_SHARED) == sorted(_not_shared_cases())


@pytest.mark.parametrize("case", NOT_SHARED)
def test_not_shared_falls_back_to_each_layer(case, monkeypatch):
    layers, M = _not_shared_cases()[case]
    x = torch.randn(M, 64)
    assert not S.can_share_input(x, layers)
    counter = _CountQuantizer(monkeypatch)
    expected = [layer(x) for layer in layers]
    calls_separate, counter.calls = counter.calls, 0
    got = S.project_shared(x, *layers)
    assert counter.calls == calls_separate  # no shared quantization pass was added
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_global_hook_disables_sharing():
    layers = _layers("w8a8")
    x = torch.randn(M_SHARED, 64)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert not S.can_share_input(x, layers)
    finally:
        handle.remove()
    assert S.can_share_input(x, layers)


def test_forward_quantized_refuses_static_layer():
    layer = QuantLinear.from_float(nn.Linear(64, 16), _static_spec(), act_scale=torch.tensor([0.05]))
    q, s = G.quantize_activation_int8(torch.randn(4, 64))
    with pytest.raises(ValueError, match="codes: pre-quantized input needs dynamic activations"):
        layer.forward_quantized(q, s)


def test_compiles_fullgraph():
    layers = _layers("w8a8")
    x = torch.randn(M_SHARED, 64)
    with use_backend("torch"):
        expected = S.project_shared(x, *layers)
        got = torch.compile(lambda t: S.project_shared(t, *layers), fullgraph=True, backend="eager")(x)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_attention_processor_quantizes_qkv_input_once(monkeypatch):
    """A patched UNet self-attention with W8A8 projections: one quantization for q/k/v, and the
    output equals the same processor with sharing turned off."""
    diffusers = pytest.importorskip("diffusers")
    from diffaccel.integrations.attention import make_processor

    torch.manual_seed(0)
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=64, heads=2, dim_head=32).eval()
    for name in ("to_q", "to_k", "to_v"):
        setattr(attn, name, QuantLinear.from_float(getattr(attn, name), "w8a8"))
    proc, why = make_processor(attn.processor, module=attn)
    assert proc is not None, why
    attn.set_processor(proc)
    x = torch.randn(2, M_SHARED, 64)
    with use_backend("torch"):
        counter = _CountQuantizer(monkeypatch)
        shared = attn(x)
        assert counter.calls == 1
        monkeypatch.setattr(S, "can_share_input", lambda x, layers: False)
        separate = attn(x)
    assert torch.equal(shared, separate)


# -- SharedInputGroup: siblings that diffusers' own processors call one by one ---------------------

class _CountQuantizationPasses(_CountQuantizer):
    """Every dynamic activation quantization: the shared ones, and each int8_linear / fp8_linear call
    on float activations (which quantizes inside)."""

    def __init__(self, monkeypatch):
        super().__init__(monkeypatch)
        for name in ("int8_linear", "fp8_linear"):
            orig = getattr(G, name)

            def counted(x, *a, _orig=orig, **k):
                self.calls += k.get("act_scale") is None
                return _orig(x, *a, **k)

            monkeypatch.setattr(G, name, counted)


def _passes_saved_by_linking(model, inputs, monkeypatch):
    """(quantization passes saved by the links patch made, linked output, output with them undone)."""
    import tiny_models

    passes = _CountQuantizationPasses(monkeypatch)
    with use_backend("torch"):
        linked = tiny_models.output_of(model, inputs)
        passes_linked, passes.calls = passes.calls, 0
        S.unlink([m for m in model.modules() if isinstance(m, QuantLinear)])
        separate = tiny_models.output_of(model, inputs)
    return passes.calls - passes_linked, linked, separate


def _linked(spec, **kw):
    layers = _layers(spec, **kw)
    group = S.SharedInputGroup(len(layers))
    for layer in layers:
        layer.shared_input = group
    return layers, group


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("spec", ["w8a8", "w4a8", "fp8"])
def test_linked_siblings_quantize_once_bit_exact(spec, backend, monkeypatch):
    layers, group = _linked(spec, K=128)
    x = torch.randn(2, M_SHARED, 128) * 3
    with use_backend(backend):
        S.unlink(layers)
        separate = [layer(x) for layer in layers]
        layers, group = _linked(spec, K=128)
        counter = _CountQuantizer(monkeypatch)
        linked = [layer(x) for layer in layers]
    assert counter.calls == 1
    assert group._entry is None  # every sibling had the codes: x and the codes are let go
    for a, b in zip(linked, separate):
        assert torch.equal(a, b)


def test_group_requantizes_a_changed_or_other_input(monkeypatch):
    """Sharing keys on the tensor itself and its version counter: an in-place change between the
    calls, or another tensor with the same values, is quantized afresh. The group then stands aside
    for good: its layers are not called on one tensor, and it used to hold the last input and its
    codes between calls (HunyuanVideo's single-stream blocks)."""
    layers, group = _linked("w8a8")
    x = torch.randn(M_SHARED, 64)
    with use_backend("torch"):
        counter = _CountQuantizer(monkeypatch)
        layers[0](x)
        assert counter.calls == 1 and group._entry is not None
        x.mul_(2)  # in place: the version counter moves
        got = layers[1](x)  # quantized afresh, by the layer itself (its GEMM's fused quantization)
        assert torch.equal(got, S.QuantLinear.forward(_unlinked(layers[1]), x))
        assert group._entry is None and group.standing_aside  # nothing held between calls
        y = x.clone()
        assert torch.equal(layers[2](y), S.QuantLinear.forward(_unlinked(layers[2]), y))
        assert counter.calls == 1 and group._entry is None  # from now on each layer quantizes for itself


def test_a_round_that_ended_part_way_does_not_end_sharing(monkeypatch):
    """A forward that raised between to_q and to_k (Ctrl-C while sampling) left the group holding
    that call's input; the next call then looked like siblings on different inputs and the group
    stood aside for good (one quantization pass per call became three until patched again). The
    layer that had the last input coming back with a new one starts a new round; outputs are exact."""
    layers, group = _linked("w8a8")
    with use_backend("torch"):
        counter = _CountQuantizer(monkeypatch)
        layers[0](torch.randn(M_SHARED, 64))  # ... and the forward failed here
        assert group._entry is not None
        x = torch.randn(M_SHARED, 64)
        got = [layer(x) for layer in layers]
        assert not group.standing_aside and group._entry is None and counter.calls == 2
        for layer, y in zip(layers, got):
            assert torch.equal(y, S.QuantLinear.forward(_unlinked(layer), x))
        layers[0](x)
        layers[1](torch.randn(M_SHARED, 64))  # a sibling that had not had x, on another tensor
        assert group.standing_aside and group._entry is None


def _unlinked(layer):
    import copy

    other = copy.copy(layer)
    other.shared_input = None
    return other


def test_group_stands_aside_in_inference_mode_and_small_m(monkeypatch):
    layers, group = _linked("w8a8")
    with use_backend("torch"):
        counter = _CountQuantizer(monkeypatch)
        with torch.inference_mode():  # inference tensors have no version counter
            x = torch.randn(M_SHARED, 64)
            outs = [layer(x) for layer in layers]
        assert counter.calls == 0 and group._entry is None  # (each layer's GEMM call quantizes for itself)
        small = torch.randn(G.FUSED_QUANT_MAX_M, 64)
        [layer(small) for layer in layers]  # the GEMM quantizes these rows itself
        assert counter.calls == 0 and group._entry is None
    for a, layer in zip(outs, layers):
        assert torch.equal(a, _unlinked(layer)(x.clone()))


def test_patch_links_dispatcher_processors_siblings_and_unpatch_unlinks(monkeypatch):
    """Wan's processor (diffusers' own, through the dispatcher) calls to_q/to_k/to_v itself: after
    patch with w8a8 they share one quantization of their input, outputs bit-identical to unlinked."""
    import diffaccel
    import tiny_models

    model, inputs = tiny_models.wan()
    inputs = dict(inputs, hidden_states=torch.randn(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(3)))
    diffaccel.patch(model, quant="w8a8", solver=False)
    attn = model.blocks[0].attn1
    assert attn.to_q.shared_input is attn.to_k.shared_input is attn.to_v.shared_input is not None
    saved, linked, separate = _passes_saved_by_linking(model, inputs, monkeypatch)
    assert saved == 2 * 2  # two blocks' self-attention: q/k/v quantize their input once, not three times
    assert torch.equal(linked, separate)
    diffaccel.unpatch(model)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["w8a8", "w4a8", "fp8"])
def test_gpu_shared_equals_separate(spec):
    """SDXL self-attention projections (K = N = 1280) at 4096 tokens, fp16, default backends."""
    if spec == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89 or newer")
    layers = [layer.cuda() for layer in _layers(spec, K=1280, Ns=(1280, 1280, 1280), dtype=torch.float16)]
    x = torch.randn(2, 4096, 1280, dtype=torch.float16, device="cuda")
    assert S.can_share_input(x, layers)
    for a, b in zip(S.project_shared(x, *layers), [layer(x) for layer in layers]):
        assert torch.equal(a, b)


def test_flux_single_block_shares_with_proj_mlp(monkeypatch):
    """Flux's single-stream block runs proj_mlp on the normed input its attention then projects:
    the four layers quantize it once. Double block: q/k/v of the image tokens once (the 6 text
    tokens are below FUSED_QUANT_MAX_M, where the GEMM quantizes its own rows)."""
    import diffaccel
    import tiny_models

    model, inputs = tiny_models.flux()
    g = torch.Generator().manual_seed(3)
    n_img = 9 * 9  # > FUSED_QUANT_MAX_M tokens
    inputs = dict(inputs, hidden_states=torch.randn(1, n_img, 16, generator=g),
                  img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(9.0), torch.arange(9.0),
                                                     indexing="ij"), -1).reshape(-1, 3))
    # norms left unfused: here the links, not the norms' codes (tests/test_fused_norm.py), save the passes
    diffaccel.patch(model, quant="w8a8", solver=False, exclude=("*.norm", "*.norm1", "*.norm1_context"))
    single = model.single_transformer_blocks[0]
    assert single.proj_mlp.shared_input is single.attn.to_q.shared_input is not None
    assert single.proj_mlp.shared_input.size == 4
    saved, linked, separate = _passes_saved_by_linking(model, inputs, monkeypatch)
    assert saved == 2 + 3
    assert torch.equal(linked, separate)


def test_hunyuan_video_single_block_links_qkv_only_and_holds_nothing_after_a_call(monkeypatch):
    """HunyuanVideo's single-stream processor projects q/k/v from cat(hidden, text) while proj_mlp
    takes the hidden states alone: linked as four (as Flux's are), the group saw 3 of its 4 uses and
    held the last input and its codes after every call (torch.save of the model grew after a forward)."""
    import diffaccel
    import tiny_models

    model, inputs = tiny_models.hunyuan_video()
    diffaccel.patch(model, quant="w8a8", solver=False)
    single = model.single_transformer_blocks[0]
    assert single.proj_mlp.shared_input is None and single.attn.to_q.shared_input.size == 3
    with use_backend("torch"):
        tiny_models.output_of(model, inputs)
    groups = {id(g): g for m in model.modules() if (g := getattr(m, "shared_input", None)) is not None}
    assert groups and not any(g._entry is not None or g.standing_aside for g in groups.values())


def test_dynamic_shape_compile_does_not_guard_on_the_row_threshold():
    """project_shared branched in Python on rows > FUSED_QUANT_MAX_M, so torch.compile(dynamic=True)
    guarded on it and recompiled when batch x tokens crossed 64 (SD1.5 512px: batch 1 <-> 2 at the 8x8
    level); the unpatched model compiles once. Inside compile the codes are shared at any row count:
    the same outputs bit for bit."""
    from torch._dynamo.utils import counters

    class QKV(nn.Module):  # (a module: its layers' buffers are static to dynamo, as in a model)
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(_layers("w8a8"))

        def forward(self, x):
            return S.project_shared(x, *self.layers)

    qkv = QKV()
    layers = list(qkv.layers)
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(qkv, fullgraph=True, dynamic=True, backend="eager")
    with use_backend("torch"):
        # both sides of FUSED_QUANT_MAX_M = 64, none equal to a layer dimension (dynamo would duck-size them together)
        for rows in (50, 96, 44, 130):
            x = torch.randn(rows, 64)
            for a, b in zip(fn(x), (layer(x) for layer in layers)):
                assert torch.equal(a, b), rows
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
