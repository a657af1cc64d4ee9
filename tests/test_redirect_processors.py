"""DiffaccelRedirectProcessor: diffusers processors that call F.scaled_dot_product_attention
themselves (AuraFlow, CogView4, HunyuanDiT, Allegro, Stable Audio, HiDream, Lumina2, Mochi, Sana's
cross-attention; Cosmos through diffusers' dispatcher with its native backend) run unchanged, with
their SDPA calls answered by diffaccel attention.

Tolerances (fp32 on CPU, the op's torch reference against SDPA; summation order only): the
backbone outputs in tests/test_patch.py (1e-4); here the single-call comparisons, 1e-5.
"""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F

import diffaccel
import tiny_models
from diffaccel.integrations import attention as A

REDIRECTED = ["sana", "auraflow", "lumina2", "cogview4", "hunyuan_dit", "mochi", "allegro", "stable_audio", "hidream",
              "cosmos", "easyanimate", "omnigen",
              # calls diffusers' dispatcher with backend=None on its prefill path (the segments of its
              # block-causal mask) and with its own backend on the decode path
              "qwenimage21"]


def _processors(model):
    return [m.processor for _, m in diffaccel.integrations.targets.attention_modules(model)]


@pytest.mark.parametrize("name", REDIRECTED)
def test_sdpa_calls_run_diffaccel_attention(name, monkeypatch):
    model, inputs = tiny_models.FACTORIES[name]()
    ref = tiny_models.output_of(model, inputs)
    report = diffaccel.patch(model, solver=False)
    redirected = [p for p in _processors(model) if isinstance(p, A.DiffaccelRedirectProcessor)]
    assert redirected and len(redirected) == len(report.by_part("attention"))
    calls, real_attention = [], A.attention
    monkeypatch.setattr(A, "attention", lambda *a, **k: calls.append(1) or real_attention(*a, **k))
    out = tiny_models.output_of(model, inputs)
    # each SDPA call is answered by diffaccel or counted as a fallback: none of the latter
    assert len(calls) >= len(redirected) and all(not p.fallbacks for p in redirected)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    monkeypatch.undo()
    diffaccel.unpatch(model)
    assert not any(isinstance(p, A.DiffaccelRedirectProcessor) for p in _processors(model))
    assert torch.equal(tiny_models.output_of(model, inputs), ref)


@pytest.mark.parametrize("quant", [None, "w8a8"])
def test_compiles_fullgraph(quant):
    """The torch-function mode is traced away. (With w8a8, eager and compiled differ by the code flips
    of fused paths that step aside under compile: compared with the float model instead.)"""
    model, inputs = tiny_models.auraflow()
    ref = tiny_models.output_of(model, inputs)
    diffaccel.patch(model, quant=quant, solver=False)
    eager = tiny_models.output_of(model, inputs)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True)(**inputs, return_dict=False)[0]
    if quant is None:
        assert ((out - eager).norm() / eager.norm()).item() < 1e-4
    else:
        assert ((out - ref).norm() / ref.norm()).item() < 0.05


def test_int8_attention_close():
    model, inputs = tiny_models.cogview4()
    ref = tiny_models.output_of(model, inputs)
    diffaccel.patch(model, attention_quant="int8", solver=False)
    assert all(p.quant == "int8" for p in _processors(model))
    out = tiny_models.output_of(model, inputs)
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item() > 0.999


def test_calls_the_op_cannot_take_run_sdpa_and_are_counted(caplog):
    """Grouped-query heads and dropout: torch SDPA runs the call as asked (the same result as the
    unpatched processor), the processor counts it, and the first of each kind is logged."""
    from diffusers.models.attention_processor import AuraFlowAttnProcessor2_0

    proc = A._redirect_processor(AuraFlowAttnProcessor2_0())
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 8, 16, generator=g), torch.randn(1, 2, 8, 16, generator=g), \
        torch.randn(1, 2, 8, 16, generator=g)
    with caplog.at_level(logging.WARNING, logger="diffaccel"):
        for _ in range(2):
            got = proc.attend(q, k, v, enable_gqa=True)
    assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    (why, count), = proc.fallbacks.items()
    assert why.startswith("grouped-query attention (4 query heads, 2 key/value heads)") and count == 2
    assert caplog.text.count("torch SDPA ran that call") == 1
    torch.manual_seed(1)
    proc.attend(q, q, q, dropout_p=0.5)
    assert proc.fallbacks["dropout_p=0.5"] == 1
    kk = torch.randn(1, 4, 8, 16, generator=g)
    assert torch.allclose(proc.attend(q, kk, kk), F.scaled_dot_product_attention(q, kk, kk), atol=1e-5)
    assert len(proc.fallbacks) == 2  # the plain call took diffaccel's path


def test_built_without_arguments_copied_and_pickled(tmp_path):
    """diffusers re-creates kept processors as type(processor)(); copies and torch.save of a whole
    patched model rebuild the class made at run time."""
    model, inputs = tiny_models.hidream()
    diffaccel.patch(model, solver=False)
    proc = _processors(model)[0]
    fresh = type(proc)()
    assert type(fresh.original) is type(proc).WRAPS and type(fresh) is type(proc)
    expected = tiny_models.output_of(model, inputs)
    twin = copy.deepcopy(model)
    assert type(_processors(twin)[0]) is type(proc)
    assert torch.equal(tiny_models.output_of(twin, inputs), expected)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(_processors(loaded)[0]) is type(proc)
    assert torch.equal(tiny_models.output_of(loaded, inputs), expected)


def test_keyword_arguments_reach_the_wrapped_processor():
    """diffusers' Attention.forward drops keyword arguments its processor's __call__ does not name:
    the wrapper carries the wrapped processor's signature (RoPE reached HunyuanDiT's processor)."""
    import inspect

    from diffusers.models.attention_processor import HunyuanAttnProcessor2_0

    cls = A._redirect_class(HunyuanAttnProcessor2_0)
    assert "image_rotary_emb" in inspect.signature(cls()).parameters


def test_a_processor_naming_another_backend_itself_is_left_alone():
    """QwenImage 2.1's flex processor calls the dispatcher with backend="flex" on its prefill path:
    neither diffaccel's backend nor the redirect would see those calls, so patch leaves it alone and
    says so (rather than reporting it replaced)."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21FlexAttnProcessor

    model, _ = tiny_models.qwenimage21()
    model.set_attn_processor(QwenImage21FlexAttnProcessor())
    report = diffaccel.patch(model, solver=False)
    assert not report.by_part("attention")
    reasons = {s.reason for s in report.skipped if s.part == "attention"}
    assert reasons == {"QwenImage21FlexAttnProcessor calls the attention dispatcher with backend='flex'; not replaced"}
