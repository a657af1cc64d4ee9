"""diffusers models with diffaccel attention processors give the unpatched outputs.

Tolerances against the unpatched model (same weights, same inputs):
  fp32, torch backend (the fp32 reference): 1e-5 abs + 1e-5 rel (only summation order differs);
  fp32, Triton backend (interpreter, ieee dots): 1e-4 abs + 1e-4 rel (the online softmax reorders sums);
  bf16, Triton backend: 3e-2 abs + 3e-2 rel (bf16 rounding of P and of every activation downstream);
  quant="int8", torch backend, fp32 model: cosine >= 0.999 against the unpatched output.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

from diffaccel.integrations.attention import (DiffaccelAttnProcessor, DiffaccelCogVideoXAttnProcessor,  # noqa: E402
                                              DiffaccelJointAttnProcessor, dispatcher_backend,
                                              is_diffaccel_processor, make_processor, original_processor)
from diffaccel.ops import _backend, use_backend  # noqa: E402

TOL = {"torch": (1e-5, 1e-5), "triton": (1e-4, 1e-4), "triton_bf16": (3e-2, 3e-2)}


def _tiny_unet():
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32).eval()
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 11)
    mask[1, 7:] = 0  # padded prompt tokens: the key-padding mask path
    inputs = dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=torch.randn(2, 11, 32, generator=g), encoder_attention_mask=mask)
    return model, inputs


def _tiny_sd3(**overrides):
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16, **overrides).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, 9, 32, generator=g),
                  pooled_projections=torch.randn(2, 16, generator=g), timestep=torch.tensor([10, 500]))
    return model, inputs


def _tiny_flux():
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(8, 12, 12)).eval()
    g = torch.Generator().manual_seed(1)
    txt, img = 7, 16
    inputs = dict(hidden_states=torch.randn(1, img, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, txt, 32, generator=g),
                  pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.randn(img, 3, generator=g), txt_ids=torch.zeros(txt, 3))
    return model, inputs


def _tiny_wan():
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1, cross_attn_norm=True, rope_max_seq_len=32).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 7, 32, generator=g))
    return model, inputs


def _fused(factory, **overrides):
    """``fuse_qkv_projections()`` applied (diffusers' Fused*AttnProcessor2_0 with to_qkv / to_kv /
    to_added_qkv): the patched processors must project through the fused layers as the originals do."""
    def make():
        model, inputs = factory(**overrides)
        model.fuse_qkv_projections()
        return model, inputs
    return make


def _tiny(name):
    """A model of tests/tiny_models.py (its masks: QwenImage and HunyuanVideo boolean key padding and
    [B, 1, L, L], LTX additive [B, H, 1, Lk], HunyuanVideo 1.5 query rows with every key masked,
    SkyReels-V2 block-causal). (Z-Image, which has no attn_processors, goes through
    patch in tests/test_patch.py.)"""
    def make():
        import tiny_models

        return tiny_models.FACTORIES[name]()
    return make


_tiny_cogvideox = _tiny("cogvideox")


MODELS = {"unet": _tiny_unet, "sd3": _tiny_sd3, "flux": _tiny_flux, "wan": _tiny_wan, "cogvideox": _tiny_cogvideox,
          "unet_fused_qkv": _fused(_tiny_unet), "sd3_fused_qkv": _fused(_tiny_sd3, qk_norm="rms_norm"),
          "cogvideox_fused_qkv": _fused(_tiny_cogvideox), "qwenimage": _tiny("qwenimage"),
          "hunyuan_video": _tiny("hunyuan_video"), "ltx_video": _tiny("ltx_video"),
          "hunyuan_video15": _tiny("hunyuan_video15"), "skyreels_v2": _tiny("skyreels_v2")}
EXPECTED_PROCESSOR = {"unet": DiffaccelAttnProcessor, "sd3": DiffaccelJointAttnProcessor, "flux": None, "wan": None,
                      "cogvideox": DiffaccelCogVideoXAttnProcessor, "unet_fused_qkv": DiffaccelAttnProcessor,
                      "sd3_fused_qkv": DiffaccelJointAttnProcessor,
                      "cogvideox_fused_qkv": DiffaccelCogVideoXAttnProcessor, "qwenimage": None,
                      "hunyuan_video": None, "ltx_video": None, "hunyuan_video15": None, "skyreels_v2": None}


def _out(model, inputs):
    import tiny_models

    return tiny_models.output_of(model, inputs).float()


def _patch(model, quant=None):
    """Replace every processor through make_processor (what `patch` does) via set_attn_processor."""
    originals = dict(model.attn_processors)
    new, reasons = {}, {}
    for name, proc in originals.items():
        replacement, reason = make_processor(proc, quant=quant)
        assert replacement is not None, (name, reason)
        new[name], reasons[name] = replacement, reason
    model.set_attn_processor(new)
    return originals, reasons


def _needs(backend, op="attention"):
    why = _backend._why_not(_backend.registered_ops()[op], backend, torch.device("cpu"))
    if why:
        pytest.skip(why)


def _cast(inputs, dtype):
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v)
            for k, v in inputs.items()}


def _count_op_calls(monkeypatch):
    calls = []
    real = _backend.implementation

    def counting(op_name, device):
        calls.append(op_name)
        return real(op_name, device)

    monkeypatch.setattr(_backend, "implementation", counting)
    return calls


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(MODELS))
def test_patched_model_matches_unpatched_fp32(name, backend, monkeypatch):
    _needs(backend)
    model, inputs = MODELS[name]()
    expected = _out(model, inputs)
    originals, reasons = _patch(model)
    for proc in model.attn_processors.values():
        assert is_diffaccel_processor(proc)
        if EXPECTED_PROCESSOR[name] is not None:
            assert isinstance(proc, EXPECTED_PROCESSOR[name])
    calls = _count_op_calls(monkeypatch)
    with use_backend(backend):
        got = _out(model, inputs)
    assert calls.count("attention") == len(originals)  # every attention module ran diffaccel's op once
    monkeypatch.undo()
    atol, rtol = TOL[backend]
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    # unpatch: the originals come back, and so do the outputs, bit for bit
    model.set_attn_processor({n: original_processor(p) for n, p in model.attn_processors.items()})
    assert all(model.attn_processors[n] is p for n, p in originals.items())
    assert torch.equal(_out(model, inputs), expected)


@pytest.mark.parametrize("name", ["unet", "flux"])
def test_patched_model_bf16_triton(name):
    _needs("triton")
    model, inputs = MODELS[name]()
    model = model.to(torch.bfloat16)
    inputs = _cast(inputs, torch.bfloat16)
    expected = _out(model, inputs)
    _patch(model)
    with use_backend("triton"):
        got = _out(model, inputs)
    atol, rtol = TOL["triton_bf16"]
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", list(MODELS))
def test_patched_model_int8_close(name, monkeypatch):
    model, inputs = MODELS[name]()
    expected = _out(model, inputs)
    originals, reasons = _patch(model, quant="int8")
    assert all("INT8" in r for r in reasons.values())
    calls = _count_op_calls(monkeypatch)
    got = _out(model, inputs)
    assert calls.count("attention_int8") == len(originals)
    cos = F.cosine_similarity(got.flatten(), expected.flatten(), dim=0).item()
    assert cos >= 0.999, cos


@pytest.mark.parametrize("module,cls", [
    ("diffusers.models.transformers.transformer_hunyuan_video", "HunyuanVideoAttnProcessor2_0"),
    ("diffusers.models.transformers.transformer_qwenimage", "QwenDoubleStreamAttnProcessor2_0"),
    ("diffusers.models.transformers.transformer_wan", "WanAttnProcessor")])
def test_dispatcher_processors_accepted(module, cls):
    import importlib

    proc = getattr(importlib.import_module(module), cls)()
    new, reason = make_processor(proc, quant="int8")
    assert new is not None and "dispatcher" in reason and new.original is proc
    assert new._attention_backend is dispatcher_backend("int8")


def test_dispatcher_route_is_per_instance():
    """Only the patched processor routes to diffaccel; diffusers' class and its other instances do not.
    (The patched one is of a subclass, so that diffusers' type(processor)() re-creations stay routed.)"""
    model, inputs = _tiny_flux()
    procs = list(model.attn_processors.values())
    first, other = procs[0], procs[1]
    new, reason = make_processor(first)
    assert new is not None and "dispatcher" in reason and new.original is first
    assert new._attention_backend is dispatcher_backend(None)
    assert first._attention_backend is None and other._attention_backend is None
    assert type(first)._attention_backend is None
    assert isinstance(new, type(first)) and type(new).__name__ == type(first).__name__


def test_dispatcher_backend_registered_once_and_named():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    member = dispatcher_backend("int8")
    assert member is dispatcher_backend("int8")
    assert AttentionBackendName("diffaccel_int8") is member
    assert member in _AttentionBackendRegistry._backends
    assert AttentionBackendName.NATIVE in _AttentionBackendRegistry._backends


def test_dispatcher_backend_matches_sdpa_with_key_padding():
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 3, 40, generator=g) for _ in range(3))  # [B, L, H, D]
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    got = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=dispatcher_backend(None))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None, None, :]).transpose(1, 2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    out, lse = dispatch_attention_fn(q, k, v, backend=dispatcher_backend(None), attention_kwargs={"return_lse": True})
    assert lse.shape == (2, 12, 3)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        dispatch_attention_fn(q, k, v, dropout_p=0.1, backend=dispatcher_backend(None))


def test_unsupported_processors_refused_with_reason():
    from diffusers.models.attention_processor import (PAGJointAttnProcessor2_0, SlicedAttnProcessor,
                                                      XFormersAttnProcessor)

    for proc in (SlicedAttnProcessor(2), XFormersAttnProcessor(), object()):  # none calls SDPA itself
        new, reason = make_processor(proc)
        assert new is None and "not a supported" in reason
    new, reason = make_processor(PAGJointAttnProcessor2_0())  # calls SDPA itself: its calls redirected
    assert type(new).__name__ == "DiffaccelPAGJointAttnProcessor2_0" and "SDPA calls" in reason
    new, reason = make_processor(torch.nn.Linear(2, 2))
    assert new is None and "holds weights" in reason
    flux_proc = next(iter(_tiny_flux()[0].attn_processors.values()))
    chosen = copy.copy(flux_proc)
    from diffusers.models.attention_dispatch import AttentionBackendName
    chosen._attention_backend = AttentionBackendName._NATIVE_MATH
    new, reason = make_processor(chosen)
    assert new is None and "chosen by the user" in reason
    patched, _ = make_processor(flux_proc)
    assert make_processor(patched) == (None, "already a diffaccel processor")
    with pytest.raises(ValueError, match="quant"):
        make_processor(flux_proc, quant="fp4")


def test_attn_processor_without_sdpa_scale():
    """``AttnProcessor`` (used when scale_qk=False) keeps its module's scale."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=2, dim_head=32, scale_qk=False).eval()
    assert isinstance(attn.processor, AttnProcessor)
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        expected = attn(x)
        attn.set_processor(make_processor(attn.processor)[0])
        got = attn(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_head_dim_out_of_range_refused_when_module_given():
    from diffusers.models.attention_processor import Attention

    wide = Attention(query_dim=64, heads=1, dim_head=320)
    new, reason = make_processor(wide.processor, module=wide)
    assert new is None and "head dim 320" in reason
    ok = Attention(query_dim=64, heads=2, dim_head=32)
    assert make_processor(ok.processor, module=ok)[0] is not None
    flux = _tiny_flux()[0]
    name, proc = next(iter(flux.attn_processors.items()))
    module = flux.get_submodule(name.rsplit(".processor", 1)[0])
    assert make_processor(proc, module=module)[0] is not None


@pytest.mark.gpu
@pytest.mark.parametrize("quant", [None, "int8"])
@pytest.mark.parametrize("name", list(MODELS))
def test_gpu_patched_model_fp16(name, quant):
    """On a GPU the default backend is Triton (FP8 PV on sm89/sm90 for int8): fp16 model vs unpatched."""
    model, inputs = MODELS[name]()
    model = model.to("cuda", torch.float16)
    inputs = {k: (v.cuda().half() if torch.is_tensor(v) and v.is_floating_point() and k != "timestep"
                  else v.cuda() if torch.is_tensor(v) else v) for k, v in inputs.items()}
    expected = _out(model, inputs)
    _patch(model, quant=quant)
    assert _backend.choose("attention", torch.device("cuda"))[0] == "triton"
    got = _out(model, inputs)
    if quant is None:
        torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    else:
        assert F.cosine_similarity(got.flatten(), expected.flatten(), dim=0).item() >= 0.999


def test_dispatcher_backend_runs_grouped_query_heads_through_sdpa():
    """Cosmos3 calls the dispatcher with fewer key/value heads (enable_gqa=True); diffaccel's backend
    raised NotImplementedError at every forward of the patched model. It runs torch SDPA now, as
    the native backend would (the redirect processor does the same)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 12, 4, 16, generator=g)
    k, v = (torch.randn(2, 12, 2, 16, generator=g) for _ in range(2))
    got = dispatch_attention_fn(q, k, v, enable_gqa=True, backend=dispatcher_backend("int8"))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         enable_gqa=True).transpose(1, 2)
    assert torch.equal(got, ref)


def test_patched_cosmos3_attention_with_grouped_query_heads_runs():
    import diffaccel
    from diffusers.models.transformers.transformer_cosmos3 import Cosmos3PackedMoTAttention

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Cosmos3PackedMoTAttention(hidden_size=32, head_dim=16, num_attention_heads=4,
                                                  num_key_value_heads=2, attention_bias=False, rms_norm_eps=1e-6)

        def forward(self, *args):
            return self.attn(*args)

    torch.manual_seed(0)
    model = Wrap().eval()
    args = (torch.randn(5, 32), torch.randn(7, 32), (torch.ones(5, 16), torch.zeros(5, 16), torch.ones(7, 16),
                                                     torch.zeros(7, 16)))
    with torch.no_grad():
        ref = model(*args)
        diffaccel.patch(model, solver=False)
        out = model(*args)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _qk_rms_attention():
    from diffusers.models.attention_processor import Attention

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention(query_dim=32, heads=2, dim_head=16, qk_norm="rms_norm")

        def forward(self, hidden_states):
            return self.attn(hidden_states)

    torch.manual_seed(0)
    return Wrap().eval(), {"hidden_states": torch.randn(2, 12, 32)}


@pytest.mark.parametrize("name", ["qk_rms_attention", "qwenimage"])
def test_patched_attention_under_autocast_with_fp32_qk_norms(name):
    """Under torch.autocast(bf16), RMS q/k norms return fp32 q and k while v stays bf16; torch SDPA
    (an autocast op) casts all three to bf16, so the unpatched model runs. The patched one raised
    'v: expected dtype float32 like q'. diffaccel's attention now casts as SDPA does; the outputs
    agree to bf16 tolerance (3e-2)."""
    import diffaccel
    import tiny_models

    model, inputs = _qk_rms_attention() if name == "qk_rms_attention" else tiny_models.qwenimage()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = model(**inputs)
        ref = first[0] if isinstance(first, tuple) else getattr(first, "sample", first)
        diffaccel.patch(model, solver=False)
        second = model(**inputs)
        out = second[0] if isinstance(second, tuple) else getattr(second, "sample", second)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)


def test_attn_processor_applies_residual_and_rescale_output_factor():
    """Every tiny model has rescale_output_factor 1.0 and no residual connection, so dropping either
    went unnoticed (a mutation test). Modules built with them (diffusers' AttentionBlock-style
    attention in VAEs and old UNets) must divide by the factor after adding the residual."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    for kwargs in (dict(rescale_output_factor=2.0, residual_connection=True), dict(rescale_output_factor=0.5)):
        attn = Attention(query_dim=64, heads=2, dim_head=32, **kwargs).eval()
        for x in (torch.randn(2, 10, 64), torch.randn(2, 64, 3, 4)):  # tokens, and a 4-d feature map
            with torch.no_grad():
                expected = attn(x)
                original = attn.processor
                attn.set_processor(make_processor(original, module=attn)[0])
                got = attn(x)
                attn.set_processor(original)
            # fp32, torch reference against torch SDPA: summation order only
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cogvideox_processor_applies_an_attention_mask():
    """CogVideoX's processor prepares a padding mask over text + video tokens; no tiny model passes
    one, so dropping it went unnoticed (a mutation test)."""
    from diffusers.models.attention_processor import Attention, CogVideoXAttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16, qk_norm="layer_norm", eps=1e-6, bias=True,
                     out_bias=True, processor=CogVideoXAttnProcessor2_0()).eval()
    text, video = torch.randn(2, 5, 32), torch.randn(2, 12, 32)
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[0, 3:5] = False  # padded text tokens of sample 0
    with torch.no_grad():
        expected = attn(video, encoder_hidden_states=text, attention_mask=mask)
        unmasked = attn(video, encoder_hidden_states=text)
        attn.set_processor(DiffaccelCogVideoXAttnProcessor())
        got = attn(video, encoder_hidden_states=text, attention_mask=mask)
    assert not torch.allclose(expected[0], unmasked[0], atol=1e-3)  # the mask matters here
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_dynamic_shape_compile_does_not_guard_on_equal_query_and_text_lengths():
    """_sdpa compared the query and value lengths before asking whether diffusers' layer-skip mode was
    on, so a dynamic-shape compiled graph guarded on Lq != Lk: a text as long as the image recompiled."""
    from diffusers.models.attention_processor import Attention
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16).eval()
    attn.set_processor(make_processor(attn.processor, module=attn)[0])
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(attn, fullgraph=True, dynamic=True, backend="eager")
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        for text in (5, 9, 12):  # 12: as many text tokens as image tokens
            ehs = torch.randn(2, text, 24)
            torch.testing.assert_close(fn(x, encoder_hidden_states=ehs), attn(x, encoder_hidden_states=ehs),
                                       atol=1e-6, rtol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
