"""LoRA (peft, as diffusers loads it) with patching: LoRA branches stay in floating point beside
the quantized base layers."""
import pytest
import torch

import diffaccel

import tiny_models

peft = pytest.importorskip("peft")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _lora_config():
    # init_lora_weights=False: random B, so the adapter really changes the output
    return peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False)


def _rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_lora_loaded_before_quantizing_patch():
    model, inputs = tiny_models.unet_sd15()
    base = tiny_models.output_of(model, inputs)
    model.add_adapter(_lora_config())
    with_lora = tiny_models.output_of(model, inputs)
    assert _rel_l2(with_lora, base) > 0.05  # the adapter is live
    report = diffaccel.patch(model, quant="w8a8", solver=False)
    quantized = {r.name for r in report.by_part("quant")}
    assert any(n.endswith("to_q.base_layer") for n in quantized)
    assert not any(".lora_" in n for n in quantized)
    assert any(s.reason == "LoRA branch kept in floating point" for s in report.skipped)
    to_q = model.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert type(to_q.base_layer).__name__ == "QuantLinear"
    assert isinstance(to_q.lora_A["default"], torch.nn.Linear)
    # measured 0.029: the same W8A8 error as without LoRA (tests/test_patch.py bound)
    assert _rel_l2(tiny_models.output_of(model, inputs), with_lora) < 0.05
    diffaccel.unpatch(model)
    assert torch.equal(tiny_models.output_of(model, inputs), with_lora)


def test_lora_loaded_after_attention_patch():
    patched, inputs = tiny_models.unet_sd15()
    plain, _ = tiny_models.unet_sd15()
    diffaccel.patch(patched, attention=True, solver=False)
    for model in (patched, plain):
        torch.manual_seed(1)
        model.add_adapter(_lora_config())
    expected = tiny_models.output_of(plain, inputs)
    assert _rel_l2(tiny_models.output_of(patched, inputs), expected) < 1e-5  # fp32, torch reference attention
    diffaccel.unpatch(patched)
    assert torch.equal(tiny_models.output_of(patched, inputs), expected)


def test_lora_after_quantizing_patch_is_refused_by_peft():
    """Documented limit: load LoRA before patching with quant (or unpatch, load, patch again)."""
    model, _ = tiny_models.unet_sd15()
    diffaccel.patch(model, quant="w8a8", solver=False)
    with pytest.raises(ValueError, match="QuantLinear"):
        model.add_adapter(_lora_config())
