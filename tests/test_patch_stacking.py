"""diffaccel.patch(quant=...) on a model another library already changed: weights quantized by
torchao, stored in fp8, pruned, torch.ao-quantized layers, a layer shared between two places, and
peft LoRA variants (DoRA) that read the base weight. Each such layer is either quantized correctly
or left in floating point with the reason in the report; a refusal changes nothing."""
import logging

import pytest
import torch
from torch import nn

import diffaccel
import tiny_models
from diffaccel.nn import QuantLinear

# fp32 on CPU, only the attention path differing from the reference model: rounding order
FP32_REL_L2 = 1e-5
# dynamic W8A8 on the tiny Flux (test_patch.QUANT_REL_L2 gives 0.05 for every tiny backbone)
W8A8_REL_L2 = 0.05


def _rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


def _skipped(report, name):
    return next((s.reason for s in report.skipped if s.name == name and s.part == "quant"), None)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: m for n, m in model.named_modules()}


def test_torchao_quantized_weights_are_left_alone_with_the_reason():
    """torchao's quantize_ turns weights into tensor subclasses (Int8Tensor, ...) that report a float
    dtype. Reading them as float matrices raised torchao's 'aten.abs not implemented' from inside
    patch; they are now reported as quantized by another library and the model keeps torchao's
    layers (its output is torchao's, with diffaccel's attention)."""
    torchao_q = pytest.importorskip("torchao.quantization")
    model, inputs = tiny_models.flux()
    torchao_q.quantize_(model, torchao_q.Int8WeightOnlyConfig())
    ref = tiny_models.output_of(model, inputs)
    report = diffaccel.patch(model, quant="w8a8")
    reason = _skipped(report, "transformer_blocks.0.attn.to_q")
    assert reason is not None and "quantized or sharded by another library" in reason, str(report)
    assert not report.by_part("quant")
    assert _rel_l2(tiny_models.output_of(model, inputs), ref) < FP32_REL_L2
    diffaccel.unpatch(model)
    assert torch.equal(tiny_models.output_of(model, inputs), ref)


def test_fp8_stored_weight_is_left_alone_and_direct_from_float_names_it():
    model, inputs = tiny_models.flux()
    layer = model.transformer_blocks[0].attn.to_q
    layer.weight = nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    report = diffaccel.patch(model, quant="w8a8")
    assert _skipped(report, "transformer_blocks.0.attn.to_q") == \
        "weight dtype torch.float8_e4m3fn is not float16, bfloat16 or float32"
    assert isinstance(model.transformer_blocks[0].attn.to_k, QuantLinear)
    assert model.transformer_blocks[0].attn.to_q is layer
    with pytest.raises(TypeError, match=r"module: expected a plain float16/bfloat16/float32 weight, but its weight "
                                        r"dtype torch.float8_e4m3fn"):
        QuantLinear.from_float(layer, "w8a8")


def test_pruned_layer_is_left_alone_until_the_pruning_is_made_permanent():
    """torch.nn.utils.prune recomputes `weight` in a forward pre-hook from weight_orig and
    weight_mask; the quantized layer carrying that hook crashed at its first call. It is left in
    floating point with the way out in the reason; after prune.remove it is quantized."""
    from torch.nn.utils import prune

    model, inputs = tiny_models.flux()
    prune.l1_unstructured(model.transformer_blocks[0].attn.to_q, "weight", amount=0.5)
    ref = tiny_models.output_of(model, inputs)
    report = diffaccel.patch(model, quant="w8a8")
    assert "prune.remove(module, 'weight')" in _skipped(report, "transformer_blocks.0.attn.to_q")
    assert _rel_l2(tiny_models.output_of(model, inputs), ref) < W8A8_REL_L2
    diffaccel.unpatch(model)
    assert torch.equal(tiny_models.output_of(model, inputs), ref)

    prune.remove(model.transformer_blocks[0].attn.to_q, "weight")
    diffaccel.patch(model, quant="w8a8")
    assert isinstance(model.transformer_blocks[0].attn.to_q, QuantLinear)
    assert _rel_l2(tiny_models.output_of(model, inputs), ref) < W8A8_REL_L2


def test_torch_ao_quantized_layers_are_reported():
    """quantize_dynamic's layers are not nn.Linear: patch(quant=...) used to pass over them without
    a word (a report with no quant entry at all)."""
    model, _ = tiny_models.flux()
    model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    report = diffaccel.patch(model, quant="w8a8")
    assert _skipped(report, "transformer_blocks.0.attn.to_q") == "already quantized by torch.ao.quantization"
    assert not any(s.name.endswith("_packed_params") for s in report.skipped)


def test_a_layer_shared_by_two_places_is_quantized_once_for_both():
    """The same nn.Linear object at two names (named_modules lists it once): both places get the
    same quantized layer and both are reported; unpatch puts the shared original back at both."""
    model, inputs = tiny_models.flux()
    attn = model.transformer_blocks[0].attn
    attn.to_k = attn.to_q
    shared = attn.to_q
    ref = tiny_models.output_of(model, inputs)
    report = diffaccel.patch(model, quant="w8a8")
    assert isinstance(attn.to_q, QuantLinear) and attn.to_k is attn.to_q
    replaced = {r.name for r in report.by_part("quant")}
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"} <= replaced
    assert _rel_l2(tiny_models.output_of(model, inputs), ref) < W8A8_REL_L2
    diffaccel.unpatch(model)
    assert attn.to_q is shared and attn.to_k is shared
    assert torch.equal(tiny_models.output_of(model, inputs), ref)


def test_dora_loaded_before_patch_keeps_its_base_layer_float():
    """DoRA reads the base weight at every call (its magnitude normalisation): a base layer under
    DoRA used to be quantized without a word, and the first forward failed. It stays float now,
    with the reason; the plain-LoRA layers beside it are quantized."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    model, inputs = tiny_models.flux()
    model.add_adapter(LoraConfig(r=4, target_modules=["to_q"], use_dora=True, init_lora_weights=False))
    model.add_adapter(LoraConfig(r=4, target_modules=["to_k"], init_lora_weights=False), adapter_name="plain")
    model.set_adapters(["default", "plain"])
    ref = tiny_models.output_of(model, inputs)
    report = diffaccel.patch(model, quant="w8a8")
    reason = _skipped(report, "transformer_blocks.0.attn.to_q.base_layer")
    assert reason is not None and "DoraLinearVariant" in reason, str(report)
    assert type(model.transformer_blocks[0].attn.to_q.base_layer) is nn.Linear
    assert isinstance(model.transformer_blocks[0].attn.to_k.base_layer, QuantLinear)
    assert _rel_l2(tiny_models.output_of(model, inputs), ref) < W8A8_REL_L2
    diffaccel.unpatch(model)
    assert torch.equal(tiny_models.output_of(model, inputs), ref)


def test_dora_added_after_patch_is_refused_before_any_layer_is_wrapped(caplog):
    """peft wraps layer by layer: the per-layer refusal came after the float layers before the
    first quantized one were already wrapped, and diffusers had marked the model as holding
    adapters, so the next add_adapter failed too. The config is now checked first: nothing is
    wrapped, and a plain LoRA can be added afterwards."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    model, inputs = tiny_models.flux()
    diffaccel.patch(model, quant="w8a8")
    before_state, before_modules = _snapshot(model)
    before_flag = model._hf_peft_config_loaded
    for config in (LoraConfig(r=4, target_modules=["to_q", "x_embedder"], use_dora=True),
                   LoraConfig(r=4, target_modules=["x_embedder", "to_q"], init_lora_weights="pissa")):
        with pytest.raises(ValueError, match=r"adapter_config: (DoRA \(use_dora=True\)|init_lora_weights='pissa') needs the "
                                             r"float weight of transformer_blocks.0.attn.to_q, .* nothing was added"):
            model.add_adapter(config)
        after_state, after_modules = _snapshot(model)
        assert after_modules.keys() == before_modules.keys()
        assert all(after_modules[n] is m for n, m in before_modules.items())
        assert all(torch.equal(after_state[k], v) for k, v in before_state.items())
        assert model._hf_peft_config_loaded == before_flag and not hasattr(model, "peft_config")
    # DoRA on float layers only is peft's business
    model.add_adapter(LoraConfig(r=4, target_modules=["x_embedder"], use_dora=True), adapter_name="dora_float")
    model.add_adapter(LoraConfig(r=4, target_modules=["to_q"]), adapter_name="plain")
    assert isinstance(model.transformer_blocks[0].attn.to_q.base_layer, QuantLinear)
    tiny_models.output_of(model, inputs)
