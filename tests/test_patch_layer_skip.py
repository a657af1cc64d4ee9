"""diffusers' layer-skip hooks on patched backbones: skip-layer guidance and perturbed-attention
guidance (``apply_layer_skip``, which diffusers' guiders apply per call) give what they give on the
unpatched model.

``skip_attention_scores=True`` swaps self-attention's result for V through a torch-function mode
that answers diffusers' own SDPA calls; diffaccel's processors and dispatcher backend stand for
those calls, so they must answer the same way. Before the fix, patched models ignored it (relative
L2 error 0.05-0.3 against the hooked unpatched model) or, hooked after `patch`, raised because
diffusers' registry did not know diffaccel's processor class.

Tolerance: fp32 on CPU, the fused attention's reference against diffusers' SDPA, only summation
order differs: relative L2 1e-5 (measured <= 6e-7).
"""
import pytest
import torch

import diffaccel
import tiny_models

pytest.importorskip("diffusers")
from diffusers.hooks import LayerSkipConfig, apply_layer_skip  # noqa: E402

REL_L2 = 1e-5
# (backbone, the ModuleList of blocks holding the self-attention to skip): diffaccel's own processor
# (AttnProcessor2_0 -> DiffaccelAttnProcessor) and dispatcher-routed ones (QwenImage, Z-Image).
# diffusers' layer skip itself fails on Flux, SD3, CogVideoX and Wan (unregistered processor or
# attention classes), so those are not compared.
BACKBONES = {"unet_sd15": "down_blocks.0.attentions.0.transformer_blocks", "pixart": "transformer_blocks",
             "dit": "transformer_blocks", "qwenimage": "transformer_blocks", "zimage": "layers"}
SCORES = dict(skip_attention=False, skip_attention_scores=True)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _hooked_reference(name, skip):
    model, inputs = getattr(tiny_models, name)()
    plain = tiny_models.output_of(model, inputs)
    apply_layer_skip(model, LayerSkipConfig(indices=[0], fqn=BACKBONES[name], **skip))
    hooked = tiny_models.output_of(model, inputs)
    assert _rel(hooked, plain) > 1e-3, "the skip must change the output, or the comparison proves nothing"
    return hooked, inputs


@pytest.mark.parametrize("hooked", ["before_patch", "after_patch"])
@pytest.mark.parametrize("name", list(BACKBONES))
def test_attention_score_skip(name, hooked):
    ref, inputs = _hooked_reference(name, SCORES)
    model, _ = getattr(tiny_models, name)()
    config = LayerSkipConfig(indices=[0], fqn=BACKBONES[name], **SCORES)
    if hooked == "before_patch":
        apply_layer_skip(model, config)
    report = diffaccel.patch(model)
    assert report.by_part("attention")
    if hooked == "after_patch":
        apply_layer_skip(model, config)
    assert _rel(tiny_models.output_of(model, inputs), ref) < REL_L2
    diffaccel.unpatch(model)
    assert torch.equal(tiny_models.output_of(model, inputs), ref)


@pytest.mark.parametrize("name", ["unet_sd15", "pixart"])
def test_attention_skip_after_patch(name):
    """skip_attention=True looks the processor's class up in diffusers' registry: diffaccel's processor
    answers with the entry of the one it replaced."""
    skip = dict(skip_attention=True)
    ref, inputs = _hooked_reference(name, skip)
    model, _ = getattr(tiny_models, name)()
    diffaccel.patch(model)
    apply_layer_skip(model, LayerSkipConfig(indices=[0], fqn=BACKBONES[name], **skip))
    assert _rel(tiny_models.output_of(model, inputs), ref) < REL_L2


def test_attention_score_skip_compiles_fullgraph():
    ref, inputs = _hooked_reference("pixart", SCORES)
    model, _ = tiny_models.pixart()
    diffaccel.patch(model)
    apply_layer_skip(model, LayerSkipConfig(indices=[0], fqn=BACKBONES["pixart"], **SCORES))
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True)(**inputs, return_dict=False)[0]
    assert _rel(out, ref) < REL_L2


def test_score_skip_leaves_cross_attention_alone():
    """The mode answers only calls whose query and value lengths agree (self-attention); cross-attention
    with 7 text tokens still attends."""
    from diffaccel.integrations.attention import _sdpa
    from diffusers.hooks.layer_skip import AttentionScoreSkipFunctionMode

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 16, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g), \
        torch.randn(1, 2, 7, 8, generator=g)
    with AttentionScoreSkipFunctionMode():
        cross = _sdpa(q, k, v)
        self_attn = _sdpa(q, q, q)
    assert torch.allclose(cross, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-6)
    assert self_attn is q
