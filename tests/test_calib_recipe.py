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
