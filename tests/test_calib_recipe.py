"""QuantRecipe: safetensors + JSON round trip, damaged / newer files, and validation against the
model it is applied to (the model is never changed by a failing application)."""
import copy
import json

import pytest
import torch
from torch import nn

from test_calib_support import assert_unchanged, model_and_data, snapshot, tiny_unet

from diffaccel.quant.calibrate import calibrate
from diffaccel.quant.recipe import RECIPE_FORMAT_VERSION, QuantRecipe, RecipeError


@pytest.fixture(scope="module")
def unet_recipe():
    model, data = model_and_data("unet", timesteps=(900, 100), per_timestep=1)
    return model, calibrate(model, data, method="tfmq", weight_bits=4, act_bits=8, iters=1, progress=False)


def test_round_trip_keeps_every_field(unet_recipe, tmp_path):
    _, recipe = unet_recipe
    path = tmp_path / "r.safetensors"
    recipe.save(path)
    assert not path.read_bytes().startswith(b"\x80")  # not a pickle
    back = QuantRecipe.load(path)
    assert back.method == recipe.method and back.meta == json.loads(json.dumps(recipe.meta))
    assert back.model_layers == recipe.model_layers and back.skipped == recipe.skipped
    assert torch.equal(back.timesteps, recipe.timesteps.double())
    assert back.layers.keys() == recipe.layers.keys()
    for name, lr in recipe.layers.items():
        b = back.layers[name]
        assert (b.kind, b.weight_shape, b.spec, b.act_split) == (lr.kind, lr.weight_shape, lr.spec, lr.act_split)
        for f in ("weight_scale", "weight_q", "act_scale", "act_zero_point", "smooth", "bos_output", "bos_input"):
            x, y = getattr(lr, f), getattr(b, f)
            assert (x is None) == (y is None), (name, f)
            if x is not None:
                assert torch.equal(x, y) and x.dtype == y.dtype, (name, f)
    assert back.temporal_cache.keys() == recipe.temporal_cache.keys()
    for n, vals in recipe.temporal_cache.items():
        assert all(torch.equal(a, b) for a, b in zip(vals, back.temporal_cache[n]))


def test_mixdq_bos_fields_round_trip_and_are_checked_against_the_layer(tmp_path):
    model, data = model_and_data("unet", timesteps=(900, 100), per_timestep=1)
    recipe = calibrate(model, data, method="mixdq", weight_bits=8, act_bits=8, sensitivity_samples=1,
                       progress=False)
    kv = recipe.meta["bos_layers"]
    assert kv
    recipe.save(tmp_path / "m.safetensors")
    back = QuantRecipe.load(tmp_path / "m.safetensors")
    for name in kv:
        for f in ("bos_output", "bos_input"):
            assert torch.equal(getattr(back.layers[name], f), getattr(recipe.layers[name], f)), (name, f)
    lr = back.layers[kv[0]]
    lr.bos_input = lr.bos_input[:-1]
    with pytest.raises(RecipeError, match=f"layer '{kv[0]}' has a bos_input of shape"):
        back.build_modules(model)


def test_damaged_newer_and_foreign_files_are_clear_errors(unet_recipe, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, recipe = unet_recipe
    path = tmp_path / "r.safetensors"
    recipe.save(path)
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(RecipeError, match="path: .* not a readable diffaccel recipe"):
        QuantRecipe.load(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(RecipeError, match="not a readable"):
        QuantRecipe.load(tmp_path / "junk.safetensors")

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["diffaccel_recipe"])
    header["format_version"] = RECIPE_FORMAT_VERSION + 1
    save_file(tensors, str(tmp_path / "newer.safetensors"), metadata={"diffaccel_recipe": json.dumps(header)})
    with pytest.raises(RecipeError, match=f"version {RECIPE_FORMAT_VERSION + 1}.*upgrade"):
        QuantRecipe.load(tmp_path / "newer.safetensors")
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    with pytest.raises(RecipeError, match="without a diffaccel recipe header"):
        QuantRecipe.load(tmp_path / "bare.safetensors")
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"diffaccel_recipe": "{not json"})
    with pytest.raises(RecipeError, match="corrupt recipe header"):
        QuantRecipe.load(tmp_path / "bad.safetensors")
    missing = dict(tensors)
    missing.pop(next(k for k in missing if k.endswith("/weight_scale")))
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(RecipeError, match="corrupt recipe"):
        QuantRecipe.load(tmp_path / "missing.safetensors")


def test_mismatched_models_are_rejected_naming_the_layer_and_left_untouched(unet_recipe):
    from diffusers import UNet2DConditionModel

    _, recipe = unet_recipe
    torch.manual_seed(0)
    wider = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48, attention_head_dim=8, norm_num_groups=8).eval()
    snap = snapshot(wider)
    with pytest.raises(RecipeError, match=r"layer 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k' "
                                          r"has weight shape \(32, 48\), the recipe expects \(32, 32\)"):
        recipe.build_modules(wider)
    assert_unchanged(wider, snap)

    extra = tiny_unet()
    extra.down_blocks[0].extra_proj = nn.Linear(4, 4)
    with pytest.raises(RecipeError, match="model has a layer 'down_blocks.0.extra_proj'"):
        recipe.build_modules(extra)

    fewer = tiny_unet()
    fewer.conv_out = nn.Identity()
    with pytest.raises(RecipeError, match="layer 'conv_out' of the recipe is not a Linear/Conv2d"):
        recipe.build_modules(fewer)

    model, _ = model_and_data("pixart")
    snap = snapshot(model)
    with pytest.raises(RecipeError, match="recipe: layer"):
        recipe.build_modules(model)
    assert_unchanged(model, snap)


def test_build_modules_does_not_change_the_backbone(unet_recipe):
    model, recipe = unet_recipe
    fresh = copy.deepcopy(model)
    snap = snapshot(fresh)
    new, installers, skipped = recipe.build_modules(fresh)
    assert_unchanged(fresh, snap)
    assert set(new) == set(recipe.layers) | set(recipe.temporal_cache)
    assert skipped == recipe.skipped and len(installers) == 1


def test_same_architecture_other_weights_is_refused(unet_recipe):
    """Structure alone does not tell two checkpoints apart: the weight probes do. A model with one
    layer's weights changed is refused naming that layer (and left as it is); the same weights in
    fp16 or bf16 are accepted."""
    import diffaccel

    model, recipe = unet_recipe
    assert set(recipe.weight_probes) == set(recipe.layers)
    name = next(n for n in recipe.layers if n.endswith("attn1.to_q"))
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.get_submodule(name).weight.mul_(1.01)
    snap = snapshot(other)
    with pytest.raises(RecipeError, match=rf"layer '{name}' has other weights than the model the recipe was "
                                          r"calibrated on \(sampled values differ by up to 0.0099"):
        diffaccel.patch(other, quant=recipe, solver=False)
    assert_unchanged(other, snap)
    with pytest.raises(RecipeError, match="has other weights"):
        recipe.validate(tiny_unet(seed=1))  # the same architecture, another initialization
    for dtype in (torch.float16, torch.bfloat16):
        recipe.validate(copy.deepcopy(model).to(dtype))


def test_probes_round_trip_and_format_1_files_load_without_them(unet_recipe, tmp_path, caplog):
    import logging

    from safetensors import safe_open
    from safetensors.torch import save_file

    model, recipe = unet_recipe
    path = tmp_path / "r.safetensors"
    recipe.save(path)
    back = QuantRecipe.load(path)
    assert back.weight_probes.keys() == recipe.weight_probes.keys()
    assert all(torch.equal(back.weight_probes[n], p) and back.weight_probes[n].dtype == p.dtype
               for n, p in recipe.weight_probes.items())
    # a format-1 file (written before probes): loads, applies, and says the weights are not checked
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if not k.startswith("probe/")}
    header = json.loads(meta["diffaccel_recipe"])
    header["format_version"] = 1
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata={"diffaccel_recipe": json.dumps(header)})
    old = QuantRecipe.load(tmp_path / "v1.safetensors")
    assert old.weight_probes == {}
    with caplog.at_level(logging.WARNING, logger="diffaccel"):
        old.validate(copy.deepcopy(model))
    assert "no weight probes" in caplog.text


def test_a_cast_after_patching_reaches_the_modules_a_recipe_replaced(unet_recipe):
    """TFMQ's temporal-feature caches (and MixDQ's BOS wrappers) had no record of model.half()
    since patching: unpatch gave back time_embedding / time_emb_proj in fp32 inside an fp16 model,
    whose forward then failed on mixed dtypes."""
    import diffaccel
    from test_calib_support import backbone_data, run

    _, recipe = unet_recipe
    model = tiny_unet()
    reference = tiny_unet().half()
    diffaccel.patch(model, quant=recipe, solver=False)
    assert any(type(m).__name__ == "TemporalFeatureCache" for m in model.modules())
    model.half()
    diffaccel.unpatch(model)
    assert {k: v.dtype for k, v in model.state_dict().items()} == {k: v.dtype for k, v in reference.state_dict().items()}
    data = {k: v.half() if v.is_floating_point() else v for k, v in backbone_data("unet", timesteps=(900,),
                                                                                 per_timestep=1)[0].items()}
    assert torch.equal(run(model, data), run(reference, data))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_exclude_and_filter_fn_apply_to_a_recipe(unet_recipe):
    """The preset path honoured exclude / filter_fn; the recipe path swapped in every layer it held."""
    import diffaccel

    model, recipe = unet_recipe
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    for kw in (dict(exclude=("*.to_q",)), dict(filter_fn=lambda m, n: not n.endswith("to_q"))):
        m = copy.deepcopy(model)
        report = diffaccel.patch(m, quant=recipe, solver=False, **kw)
        assert type(m.get_submodule(name)) is nn.Linear
        assert any(s.name == name and s.reason == "excluded by filter" for s in report.skipped)
        assert not any(r.name == name for r in report.replaced)
        assert type(m.get_submodule(name.replace("to_q", "to_k"))).__name__ == "QuantLinear"
        diffaccel.unpatch(m)


def _lora(model, seed=1, targets=("to_q", "to_k", "to_v")):
    import peft

    torch.manual_seed(seed)
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=list(targets), init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.1)
    return model


def test_a_recipe_applies_to_the_model_with_a_lora_loaded_before_patching(unet_recipe):
    """A LoRA moves a layer to <name>.base_layer: a recipe calibrated without it was refused ('not a
    Linear/Conv2d of this model') when the LoRA came first, and ran when it came after patching."""
    import diffaccel

    from test_calib_support import backbone_data, run

    model, recipe = unet_recipe
    data = backbone_data("unet", timesteps=(900, 100), per_timestep=1)
    first, after, plain = _lora(copy.deepcopy(model)), copy.deepcopy(model), copy.deepcopy(model)
    reference = [run(first, d) for d in data]
    without_lora = [run(plain, d) for d in data]
    for m in (first, after, plain):
        diffaccel.patch(m, quant=recipe, solver=False)
    _lora(after)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert type(first.get_submodule(name + ".base_layer")).__name__ == "QuantLinear"
    for d, ref, ref_plain in zip(data, reference, without_lora):
        out = run(first, d)
        # (a W4A8 recipe: the LoRA adds no error of its own beyond the quantized base's)
        assert torch.equal(out, run(after, d)) and _rel(out, ref) < 1.5 * _rel(run(plain, d), ref_plain) + 0.02
    diffaccel.unpatch(first)
    assert torch.equal(run(first, data[0]), reference[0])


def test_mixdq_with_a_lora_on_the_cross_attention_keys_and_values():
    """A LoRA on to_k / to_v hid them from the BOS path (peft's wrapper is not an nn.Linear), even with
    bos=True; a LoRA loaded after patching with a MixDQ recipe failed half-way ('Target module
    BOSPrecomputed is not supported') and left layers wrapped."""
    import diffaccel
    from diffaccel.quant.calibrate import CalibrationError
    from diffaccel.quant.recipe import BOSPrecomputed

    from test_calib_support import run

    model, data = model_and_data("unet", timesteps=(900, 100), per_timestep=1)
    with_lora = _lora(copy.deepcopy(model), targets=("to_k", "to_v"))
    recipe = calibrate(with_lora, data, method="mixdq", weight_bits=8, act_bits=8, sensitivity_samples=1,
                       bos=True, progress=False)
    kv = recipe.meta["bos_layers"]
    assert kv and all(n.endswith((".attn2.to_k.base_layer", ".attn2.to_v.base_layer")) for n in kv)
    with pytest.raises(CalibrationError, match="bos: bos=True but no cross-attention key / value layer"):
        calibrate(model, data, method="mixdq", weight_bits=8, act_bits=8, sensitivity_samples=1, bos=True,
                  skip=[n for n, _ in model.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))],
                  progress=False)
    plain = calibrate(model, data, method="mixdq", weight_bits=8, act_bits=8, sensitivity_samples=1,
                      progress=False)
    reference = _lora(copy.deepcopy(model), targets=("to_k", "to_v"))
    expected = [run(reference, d) for d in data]
    patched = copy.deepcopy(model)
    diffaccel.patch(patched, quant=plain, solver=False)
    _lora(patched, targets=("to_k", "to_v"))
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    assert isinstance(patched.get_submodule(name + ".base_layer"), BOSPrecomputed)
    assert all(_rel(run(patched, d), e) < 0.15 for d, e in zip(data, expected))
    diffaccel.unpatch(patched)
    assert torch.equal(run(patched, data[0]), expected[0])


def test_edited_recipes_are_refused_naming_what_is_wrong(unet_recipe):
    model, recipe = unet_recipe
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    steps = copy.deepcopy(recipe)  # 3 timesteps, 2 sets of scales: an IndexError at the third
    steps.timesteps = torch.tensor([900.0, 500.0, 100.0], dtype=torch.float64)
    with pytest.raises(RecipeError, match=f"layer '.*' holds 2 sets of activation parameters for 3 calibrated"):
        steps.build_modules(model)
    renamed = copy.deepcopy(recipe)  # a bare KeyError
    renamed.layers[name + "_x"] = renamed.layers.pop(name)
    with pytest.raises(RecipeError, match=f"layer '{name}_x' has a recipe entry but is not among"):
        renamed.build_modules(model)
    shape = copy.deepcopy(recipe)
    shape.layers[name].weight_shape = (1, 1)
    with pytest.raises(RecipeError, match=f"layer '{name}''s entry has weight shape \\(1, 1\\)"):
        shape.build_modules(model)
    unprobed = copy.deepcopy(recipe)
    del unprobed.weight_probes[name]
    with pytest.raises(RecipeError, match=f"layer '{name}' has no weight probe"):
        unprobed.build_modules(model)
    dropped = copy.deepcopy(recipe)  # neither quantized nor skipped: left float without a word
    del dropped.layers[name]
    new, _, skipped = dropped.build_modules(model)
    assert name not in new and skipped[name] == "the recipe keeps it in floating point (no recipe entry)"
