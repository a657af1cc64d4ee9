"""LoRA (peft, as diffusers loads it) with patching, loaded before or after a quantizing patch:
LoRA branches stay in floating point beside the quantized base layers.

Tolerances: fp32 on CPU. The quantized model with LoRA is compared with the float model with the
same LoRA at the W8A8 bound of tests/test_patch.py (0.05 relative L2; measured 0.027-0.029); a
LoRA layer's own output is compared bit-exactly with the quantized base's output plus the float
LoRA branch (the same float ops in the same order)."""
import pytest
import torch

import diffaccel

import tiny_models

peft = pytest.importorskip("peft")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
W8A8_REL_L2 = 0.05
TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _lora_config(targets=TARGETS, **kw):
    # init_lora_weights=False: random B, so the adapter really changes the output
    return peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False, **kw)


def _lora_state_dict(seed, targets=TARGETS):
    """A LoRA as diffusers stores it (peft keys without the adapter name), trained on nothing:
    random A and B drawn under ``seed`` on a float tiny UNet."""
    donor, _ = tiny_models.unet_sd15()
    torch.manual_seed(seed)
    donor.add_adapter(_lora_config(targets), adapter_name="x")
    return {k: v.clone() for k, v in peft.get_peft_model_state_dict(donor, adapter_name="x").items()}


def _with_loras(model, *seeds, targets=TARGETS, low_cpu_mem_usage=False):
    for seed in seeds:
        model.load_lora_adapter(_lora_state_dict(seed, targets), prefix=None, adapter_name=f"lora{seed}",
                                low_cpu_mem_usage=low_cpu_mem_usage)
    return model


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


def test_lora_after_quantizing_patch_equals_lora_before():
    after, inputs = tiny_models.unet_sd15()
    before, _ = tiny_models.unet_sd15()
    plain, _ = tiny_models.unet_sd15()
    diffaccel.patch(after, quant="w8a8", solver=False)
    torch.manual_seed(1)
    after.add_adapter(_lora_config())
    for model in (before, plain):
        torch.manual_seed(1)
        model.add_adapter(_lora_config())
    diffaccel.patch(before, quant="w8a8", solver=False)
    to_q = after.get_submodule(TO_Q)
    assert type(to_q).__name__ == "LoraLinear" and type(to_q.base_layer).__name__ == "QuantLinear"
    assert isinstance(to_q.lora_A["default"], torch.nn.Linear) and to_q.lora_A["default"].weight.dtype == torch.float32
    lora_after = peft.get_peft_model_state_dict(after)
    lora_plain = peft.get_peft_model_state_dict(plain)
    assert lora_after.keys() == lora_plain.keys() and all(torch.equal(lora_after[k], lora_plain[k]) for k in lora_plain)
    out_after = tiny_models.output_of(after, inputs)
    # the same quantized GEMMs and the same float LoRA branches, in the same order
    assert torch.equal(out_after, tiny_models.output_of(before, inputs))
    assert _rel_l2(out_after, tiny_models.output_of(plain, inputs)) < W8A8_REL_L2


def test_lora_branch_runs_in_float_beside_the_quantized_gemm():
    model, _ = tiny_models.unet_sd15()
    plain, _ = tiny_models.unet_sd15()
    diffaccel.patch(model, quant="w8a8", solver=False)
    for m in (model, plain):
        torch.manual_seed(1)
        m.add_adapter(_lora_config())
    layer, float_layer = model.get_submodule(TO_Q), plain.get_submodule(TO_Q)
    x = torch.randn(2, 16, 80, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        float_delta = float_layer.lora_B["default"](float_layer.lora_A["default"](x)) * float_layer.scaling["default"]
        assert torch.equal(layer(x), layer.base_layer(x) + float_delta)
        # and that delta is the unpatched model's LoRA delta
        assert torch.equal(float_layer(x), float_layer.base_layer(x) + float_delta)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_load_lora_adapter_after_patch_adapters_weights_disable_delete_unload(low_cpu_mem_usage):
    model, inputs = tiny_models.unet_sd15()
    plain, _ = tiny_models.unet_sd15()
    original = tiny_models.output_of(model, inputs)
    diffaccel.patch(model, quant="w8a8", solver=False)
    quantized = tiny_models.output_of(model, inputs)
    _with_loras(model, 1, 2, low_cpu_mem_usage=low_cpu_mem_usage)
    _with_loras(plain, 1, 2)
    assert type(model.get_submodule(TO_Q)).__name__ == "LoraLinear"

    def close(note):
        err = _rel_l2(tiny_models.output_of(model, inputs), tiny_models.output_of(plain, inputs))
        assert err < W8A8_REL_L2, f"{note}: {err:.4f}"

    for m in (model, plain):
        m.set_adapters(["lora1", "lora2"], weights=[1.0, 0.5])
    close("two adapters, weights 1.0/0.5")
    assert _rel_l2(tiny_models.output_of(model, inputs), quantized) > 0.05  # the adapters are live
    for m in (model, plain):
        m.set_adapters("lora2")
    close("adapter switched")
    model.disable_lora()
    assert torch.equal(tiny_models.output_of(model, inputs), quantized)
    model.enable_lora()
    close("re-enabled")
    for m in (model, plain):
        m.delete_adapters("lora2")
        m.set_adapters("lora1")
    close("lora2 deleted")
    assert "lora2" not in model.get_submodule(TO_Q).lora_A
    model.unload_lora()
    assert type(model.get_submodule(TO_Q)).__name__ == "QuantLinear"
    assert torch.equal(tiny_models.output_of(model, inputs), quantized)
    diffaccel.unpatch(model)
    assert torch.equal(tiny_models.output_of(model, inputs), original)


def test_fuse_lora_into_quantized_layers_raises_and_changes_nothing():
    model, inputs = tiny_models.unet_sd15()
    diffaccel.patch(model, quant="w8a8", solver=False)
    _with_loras(model, 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = tiny_models.output_of(model, inputs)
    with pytest.raises(RuntimeError, match="fuse_lora: .*cannot merge LoRA into diffaccel's quantized layers"):
        model.fuse_lora(lora_scale=0.5)  # scale_layer would run before merge: the check comes first
    layer = model.get_submodule(TO_Q)
    with pytest.raises(RuntimeError, match="cannot merge LoRA"):
        layer.merge()
    assert not layer.merged and layer.scaling["lora1"] == 1.0
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert torch.equal(tiny_models.output_of(model, inputs), out)
    # unpatch, fuse, patch again: the documented way to fuse
    diffaccel.unpatch(model)
    assert "fuse_lora" not in vars(model)
    model.fuse_lora()
    assert model.get_submodule(TO_Q).merged
    diffaccel.patch(model, quant="w8a8", solver=False)
    assert _rel_l2(tiny_models.output_of(model, inputs), out) < W8A8_REL_L2


def test_fuse_lora_refused_for_lora_loaded_before_patch():
    model, inputs = tiny_models.unet_sd15()
    _with_loras(model, 1)
    diffaccel.patch(model, quant="w8a8", solver=False)
    out = tiny_models.output_of(model, inputs)
    with pytest.raises(RuntimeError, match="cannot merge LoRA"):
        model.fuse_lora()
    assert torch.equal(tiny_models.output_of(model, inputs), out)


def test_unpatch_moves_lora_loaded_after_patch_onto_the_float_layers():
    model, inputs = tiny_models.unet_sd15()
    plain, _ = tiny_models.unet_sd15()
    diffaccel.patch(model, quant="w8a8", solver=False)
    _with_loras(model, 1, 2)
    _with_loras(plain, 1, 2)
    for m in (model, plain):
        m.set_adapters(["lora1", "lora2"], weights=[0.7, 1.0])
    diffaccel.unpatch(model)
    layer = model.get_submodule(TO_Q)
    assert type(layer.base_layer) is torch.nn.Linear
    assert not any(type(m).__name__.startswith("Quant") for m in model.modules())
    # the float layers with the same LoRA branches, peft's forward: the float model with that LoRA
    assert torch.equal(tiny_models.output_of(model, inputs), tiny_models.output_of(plain, inputs))
    model.unload_lora()
    plain.unload_lora()
    assert torch.equal(tiny_models.output_of(model, inputs), tiny_models.output_of(plain, inputs))


def test_adapter_added_after_patch_to_a_layer_with_lora_from_before():
    model, inputs = tiny_models.unet_sd15()
    plain, _ = tiny_models.unet_sd15()
    _with_loras(model, 1)
    peft_cls = type(model.get_submodule(TO_Q))
    diffaccel.patch(model, quant="w8a8", solver=False)
    assert type(model.get_submodule(TO_Q)).__name__ == "LoraLinear"  # peft's class, adopted (no new state)
    _with_loras(model, 2)
    _with_loras(plain, 1, 2)
    for m in (model, plain):
        m.set_adapters(["lora1", "lora2"], weights=[1.0, 1.0])
    assert _rel_l2(tiny_models.output_of(model, inputs), tiny_models.output_of(plain, inputs)) < W8A8_REL_L2
    diffaccel.unpatch(model)
    assert type(model.get_submodule(TO_Q)) is peft_cls
    assert torch.equal(tiny_models.output_of(model, inputs), tiny_models.output_of(plain, inputs))


def test_unpatch_after_unloading_lora_loaded_before_patch():
    model, inputs = tiny_models.unet_sd15()
    original = tiny_models.output_of(model, inputs)
    _with_loras(model, 1)
    diffaccel.patch(model, quant="w8a8", solver=False)
    model.unload_lora()  # the QuantLinear moves up to the wrapper's place
    assert type(model.get_submodule(TO_Q)).__name__ == "QuantLinear"
    diffaccel.unpatch(model)
    assert not any(type(m).__name__.startswith("Quant") for m in model.modules())
    assert torch.equal(tiny_models.output_of(model, inputs), original)


def test_lora_on_quantized_convs():

    targets = ["conv1", "conv2", "conv_shortcut"]
    model, inputs = tiny_models.unet_sd15()
    plain, _ = tiny_models.unet_sd15()
    diffaccel.patch(model, quant="w8a8", solver=False)
    _with_loras(model, 1, targets=targets)
    _with_loras(plain, 1, targets=targets)
    conv = model.get_submodule("down_blocks.0.resnets.0.conv1")
    assert type(conv).__name__ == "LoraConv2d" and type(conv.base_layer).__name__ == "QuantConv2d"
    float_conv = plain.get_submodule("down_blocks.0.resnets.0.conv1")
    x = torch.randn(1, 80, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        delta = float_conv.lora_B["lora1"](float_conv.lora_A["lora1"](x)) * float_conv.scaling["lora1"]
        assert torch.equal(conv(x), conv.base_layer(x) + delta)
    assert _rel_l2(tiny_models.output_of(model, inputs), tiny_models.output_of(plain, inputs)) < W8A8_REL_L2
    diffaccel.unpatch(model)
    assert torch.equal(tiny_models.output_of(model, inputs), tiny_models.output_of(plain, inputs))


def test_lora_configs_that_need_the_base_weight_are_refused():
    model, _ = tiny_models.unet_sd15()
    diffaccel.patch(model, quant="w8a8", solver=False)
    with pytest.raises(ValueError, match="DoRA"):
        model.add_adapter(_lora_config(use_dora=True), adapter_name="dora")
    model2, _ = tiny_models.unet_sd15()
    diffaccel.patch(model2, quant="w8a8", solver=False)
    with pytest.raises(ValueError, match="init_lora_weights"):
        model2.add_adapter(peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"), adapter_name="p")


def test_peft_dispatch_is_installed_once_and_leaves_float_layers_to_peft():
    from peft.tuners.lora import model as lora_model
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    from diffaccel.nn import lora as dlora

    model, _ = tiny_models.unet_sd15()
    diffaccel.patch(model, quant="w8a8", solver=False)
    installed = lora_model.dispatch_default
    dlora.install_peft_dispatch()
    assert lora_model.dispatch_default is installed
    assert not getattr(installed.__wrapped__, "_diffaccel_quantized_dispatch", False)  # wraps peft's own
    plain, _ = tiny_models.unet_sd15()
    plain.add_adapter(_lora_config())
    assert type(plain.get_submodule(TO_Q)) is PeftLoraLinear
    # the per-config route (peft's custom-module mechanism) builds the same layer
    config = _lora_config()
    dlora.register_lora_layers(config)
    assert config._custom_modules[diffaccel.nn.QuantLinear] is dlora.LoraLinear


def test_compile_fullgraph_patched_backbone_with_lora_after_patch():
    plain, inputs = tiny_models.unet_sd15()
    _with_loras(plain, 1)
    with torch.no_grad():
        torch._dynamo.reset()
        torch.compile(plain, fullgraph=True, backend="eager")(**inputs, return_dict=False)  # float + LoRA compiles
    model, _ = tiny_models.unet_sd15()
    diffaccel.patch(model, quant="w8a8", solver=False)
    _with_loras(model, 1)
    expected = tiny_models.output_of(model, inputs)
    with torch.no_grad():
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True, backend="eager")(**inputs, return_dict=False)[0]
    assert torch.equal(out, expected)


def test_adapters_loaded_after_patch_take_the_quantized_layers_dtype():
    """peft places a new adapter on its base layer's device and dtype, read from `weight`; a
    quantized layer has codes instead, so diffaccel's LoRA layers report weight_q's device and the
    output dtype (on a GPU, a CPU-fp32 adapter beside a CUDA-bf16 layer would fail)."""
    model, inputs = tiny_models.unet_sd15()
    _with_loras(model, 1)  # before patching: peft's lora.Linear, adopted by patch
    diffaccel.patch(model, quant="w8a8", solver=False)
    model.to(torch.bfloat16)
    _with_loras(model, 2, targets=TARGETS + ["ff.net.2"])  # ff.net.2: a layer without LoRA so far
    for name in (TO_Q, "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"):
        layer = model.get_submodule(name)
        assert layer.lora_A["lora2"].weight.dtype == torch.bfloat16, name
        assert layer.lora_B["lora2"].weight.dtype == torch.bfloat16, name
    bf16_inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs.items()}
    assert tiny_models.output_of(model, bf16_inputs).dtype == torch.bfloat16


def _tiny_sd_pipeline(seed=0):
    """A StableDiffusionPipeline (diffusers' LoRA loader mixin) with tiny random components."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffaccel.integrations import reference as ref

    torch.manual_seed(seed)
    tokenizer = ref.load_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=1, norm_num_groups=8).eval()
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, sample_size=8)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(ref.text_encoder_config(tokenizer)).eval(),
                                   tokenizer=tokenizer, unet=unet, scheduler=ref.sampling_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet_prediction(pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    text = pipe.text_encoder(pipe.tokenizer(["a digit", "a cat"], padding="max_length",
                                            return_tensors="pt").input_ids)[0]
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500, 10]), encoder_hidden_states=text.detach()).sample


def test_pipeline_load_lora_weights_after_patch_fuse_refused_unload_unpatch():
    pipe, plain = _tiny_sd_pipeline(), _tiny_sd_pipeline()
    donor = _tiny_sd_pipeline().unet
    torch.manual_seed(1)
    donor.add_adapter(_lora_config(), adapter_name="x")
    lora = {f"unet.{k}": v.clone() for k, v in peft.get_peft_model_state_dict(donor, adapter_name="x").items()}
    original = _unet_prediction(pipe)
    diffaccel.patch(pipe, quant="w8a8")
    quantized = _unet_prediction(pipe)
    for p in (pipe, plain):
        p.load_lora_weights(dict(lora), adapter_name="style")
    assert type(pipe.unet.get_submodule(TO_Q)).__name__ == "LoraLinear"
    with_lora = _unet_prediction(pipe)
    assert _rel_l2(with_lora, quantized) > 0.05  # the adapter is live
    assert _rel_l2(with_lora, _unet_prediction(plain)) < W8A8_REL_L2
    latents = pipe(["a digit"], num_inference_steps=2, height=8, width=8, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8) and bool(torch.isfinite(latents).all())
    with pytest.raises(RuntimeError, match="cannot merge LoRA"):
        pipe.fuse_lora(lora_scale=0.5)
    assert torch.equal(_unet_prediction(pipe), with_lora)
    pipe.unload_lora_weights()
    assert torch.equal(_unet_prediction(pipe), quantized)
    diffaccel.unpatch(pipe)
    assert "fuse_lora" not in vars(pipe) and "fuse_lora" not in vars(pipe.unet)
    assert torch.equal(_unet_prediction(pipe), original)


def test_io_layers_with_lora_stay_in_float_whichever_the_order():
    targets = TARGETS + ["conv_in", "conv_out"]
    before, inputs = tiny_models.unet_sd15()
    after, _ = tiny_models.unet_sd15()
    torch.manual_seed(1)
    before.add_adapter(_lora_config(targets))
    report = diffaccel.patch(before, quant="w8a8", solver=False)
    diffaccel.patch(after, quant="w8a8", solver=False)
    torch.manual_seed(1)
    after.add_adapter(_lora_config(targets))
    assert {s.name for s in report.skipped if s.reason.startswith("input/output layer")} == \
        {"conv_in.base_layer", "conv_out.base_layer"}
    for model in (before, after):
        assert type(model.conv_in.base_layer) is torch.nn.Conv2d
    assert torch.equal(tiny_models.output_of(before, inputs), tiny_models.output_of(after, inputs))


def test_peft_merge_and_unload_refuses_before_merging_anything():
    """peft merges layer by layer; the float layer met before the quantized one must stay unmerged."""
    from collections import OrderedDict

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import LoraLayer
    from torch import nn

    from diffaccel.nn import QuantLinear
    from diffaccel.nn import lora as dlora

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(a=nn.Linear(64, 64), act=nn.GELU(), b=nn.Linear(64, 64)))
    model.b = QuantLinear.from_float(model.b, "w8a8")
    dlora.install_peft_dispatch()
    pm = get_peft_model(model, LoraConfig(target_modules=["a", "b"], r=4, init_lora_weights=False))
    x = torch.randn(5, 64)
    out = pm(x)
    state = {k: v.clone() for k, v in pm.state_dict().items()}
    for call in (pm.merge_and_unload, pm.merge_adapter):
        with pytest.raises(RuntimeError, match=r"merge: b: cannot merge LoRA into diffaccel's quantized layers"):
            call()
    inner = pm.base_model.model
    assert isinstance(inner.a, LoraLayer) and not inner.a.merged and isinstance(inner.b, LoraLayer)
    after = pm.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert torch.equal(pm(x), out)
    base = pm.unload()  # without merging: allowed
    assert type(base.a) is nn.Linear and type(base.b) is QuantLinear
