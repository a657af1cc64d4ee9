"""Calibration on backbones whose structure the layer plan and the calibration hooks must respect
(tiny configs from tiny_models, fp32 on CPU): each calibrates, leaves the model as it was, and its
recipe runs through patch.

- Wan reads ``next(iter(self.time_embedder.parameters())).dtype`` in its condition embedder: a
  recipe that quantized both of that MLP's layers left it without parameters (StopIteration).
- AnimateDiff's motion modules call ``proj_in(input=...)``: the statistics hook read args[0]
  (IndexError) and the fake-quant layers took ``x``.
- LoRA loaded before calibration: peft reads lora_A/B's weight dtype, so those stay float (as
  the presets keep them), and the base layers are calibrated under them.
"""
import copy

import pytest
import torch

import diffaccel
import tiny_models
from diffaccel.quant.calibrate import calibrate

OPTIONS = dict(weight_bits=8, act_bits=8, seed=0, iters=2, sensitivity_samples=1, progress=False)
# relative L2 of one call, calibrated W8A8 against the float model (random-init tiny models: the
# presets' bound, test_patch.QUANT_REL_L2)
MAX_REL_L2 = 0.1


def _data(name, timesteps=(900, 100)):
    model, inputs = tiny_models.FACTORIES[name]()
    g = torch.Generator().manual_seed(100)
    key = "hidden_states" if "hidden_states" in inputs else "sample"
    t0 = inputs["timestep"]
    items = []
    for t in timesteps:
        item = dict(inputs)
        item[key] = torch.randn(item[key].shape, generator=g)
        item["timestep"] = torch.full(t0.shape, t, dtype=t0.dtype)
        items.append(item)
    return model, items


def _check(model, data, method):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = calibrate(model, data, method=method, **OPTIONS)
    assert {k: v for k, v in model.state_dict().items()}.keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    patched = copy.deepcopy(model)
    diffaccel.patch(patched, quant=recipe, solver=False)
    want, got = tiny_models.output_of(model, data[0]), tiny_models.output_of(patched, data[0])
    assert ((got - want).norm() / want.norm()).item() < MAX_REL_L2
    return recipe


def test_wan_recipe_keeps_the_time_embedder_its_model_reads():
    model, data = _data("wan")
    recipe = _check(model, data, "minmax")
    assert not any(n.startswith("condition_embedder.time_embedder.") for n in recipe.layers)
    assert any(n.startswith("blocks.") for n in recipe.layers)


@pytest.mark.parametrize("method", ["minmax", "qdiffusion", "mixdq"])
def test_animatediff_layers_called_with_input_keyword(method):
    model, data = _data("animatediff", timesteps=(900,))
    recipe = _check(model, data, method)
    assert any(".motion_modules." in n and n.endswith("proj_in") for n in recipe.layers)


def test_lora_loaded_before_calibration_stays_float():
    peft = pytest.importorskip("peft")
    model, data = _data("unet_sd15")
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                      init_lora_weights=False))
    recipe = _check(model, data, "minmax")
    assert not any(".lora_" in n for n in recipe.layers)
    assert any(n.endswith("to_q.base_layer") for n in recipe.layers)


def test_default_skip_is_the_presets_input_output_layers():
    """calibrate's default skip keeps the input/output layers the presets keep (Flux's x_embedder,
    context_embedder, norm_out.linear, proj_out)."""
    from diffaccel.integrations.targets import is_io_layer

    model, data = _data("flux")
    recipe = calibrate(model, data, method="minmax", **OPTIONS)
    io = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and is_io_layer(n)}
    assert io and not io & set(recipe.layers)


# -- TFMQ's temporal block on backbones whose embedding reaches the blocks another way -----------

@pytest.mark.parametrize("temporal_cache", [True, False])
@pytest.mark.parametrize("name", ["hunyuan_video", "unet_svd"])
def test_tfmq_on_backbones_with_other_temporal_embeddings(name, temporal_cache):
    """HunyuanVideo's time_text_embed returns (temb, None): TIAR's unit took no embedding and raised
    a TypeError inside silu. SVD's UNet has no class_embedding attribute: temporal_info raised an
    AttributeError. Both now calibrate and run."""
    model, data = _data(name)
    options = dict(OPTIONS, temporal_cache=temporal_cache)
    recipe = calibrate(model, data, method="tfmq", **options)
    assert recipe.meta["temporal_block"]
    patched = copy.deepcopy(model)
    diffaccel.patch(patched, quant=recipe, solver=False)
    want, got = tiny_models.output_of(model, data[0]), tiny_models.output_of(patched, data[0])
    assert ((got - want).norm() / want.norm()).item() < MAX_REL_L2


def test_tfmq_keeps_projections_that_read_more_than_the_timestep_out_of_the_temporal_block():
    """I2VGen-XL adds an fps embedding to the time embedding before its resnets. The temporal
    feature cache stored the resnets' time_emb_proj outputs per timestep, so a run at another fps
    got the calibration fps's features (and TIAR reconstructed features the model never computes).
    Projections whose recorded outputs are not proj(act(embedding)) are now quantized in their
    blocks; the embedding MLP itself, which depends on t alone, is still cached."""
    model, data = _data("i2vgen_xl")
    recipe = calibrate(model, data, method="tfmq", **dict(OPTIONS, temporal_cache=True))
    assert sorted(recipe.temporal_cache) == ["time_embedding"]
    projections = [n for n, _ in model.named_modules() if n.endswith("time_emb_proj")]
    assert projections and all(n in recipe.layers for n in projections)
    patched = copy.deepcopy(model)
    diffaccel.patch(patched, quant=recipe, solver=False)
    errors = []
    for fps in (16, 4):  # the calibration fps, another one
        inputs = dict(data[0], fps=torch.full_like(data[0]["fps"], fps))
        want, got = tiny_models.output_of(model, inputs), tiny_models.output_of(patched, inputs)
        errors.append(((got - want).norm() / want.norm()).item())
    assert errors[0] < MAX_REL_L2 and errors[1] < 1.5 * errors[0], errors  # cached fps-16 features: 0.081 vs 0.033


# -- backbones that name their timestep otherwise ------------------------------------------------

def _renamed_timestep_data(name, key, values):
    model, inputs = tiny_models.FACTORIES[name]()
    return model, [dict(inputs, **{key: torch.full_like(inputs[key], v)}) for v in values]


@pytest.mark.parametrize("method", ["minmax", "tfmq"])
@pytest.mark.parametrize("name,key,values", [("hidream", "timesteps", (900, 100)), ("zimage", "t", (0.9, 0.1))])
def test_backbones_whose_forward_names_the_timestep_otherwise(name, key, values, method):
    """HiDream's forward takes `timesteps`, Z-Image's `t`. calibrate demanded a `timestep` key, which
    their forward then refused: no data could be given. The runtime hook of a per-timestep (TFMQ)
    recipe reads the same argument."""
    model, data = _renamed_timestep_data(name, key, values)
    recipe = calibrate(model, data, method=method, **OPTIONS)
    patched = copy.deepcopy(model)
    diffaccel.patch(patched, quant=recipe, solver=False)
    for item in data:  # each at its own timestep's parameters
        want, got = tiny_models.output_of(model, item), tiny_models.output_of(patched, item)
        assert ((got - want).norm() / want.norm()).item() < MAX_REL_L2
    with pytest.raises(diffaccel.quant.calibrate.CalibrationError, match=rf"has no '{key}', the backbone's timestep"):
        calibrate(model, [{k: v for k, v in data[0].items() if k != key}], method=method, **OPTIONS)


def test_pipeline_calibration_records_a_timestep_named_otherwise():
    """A pipeline that calls its transformer with `timesteps=` (HiDream's): the recording hook read
    item['timestep'] and raised a bare KeyError mid-run."""
    model, data = _renamed_timestep_data("hidream", "timesteps", (900, 100))

    class Scheduler:
        pass

    class Pipe:
        scheduler = Scheduler()
        transformer = model

        def __call__(self, prompt, num_inference_steps, generator, output_type, **kwargs):
            for item in data:
                self.transformer(**item, return_dict=False)

    recipe = calibrate(Pipe(), ["a cat"], method="tfmq", num_inference_steps=2, **OPTIONS)
    assert recipe.timesteps.tolist() == [900.0, 100.0]


def test_fp8_recipe_keeps_the_layers_whose_dtype_the_model_reads_with_get_parameter_dtype():
    """SkyReels-V2 casts the timestep to ``get_parameter_dtype(self.time_embedder)``. With that MLP's
    layers in FP8, diffusers' helper returned float8_e4m3fn (the first floating buffer: the codes)
    and the patched model raised in the first quantized layer ('x: expected dtype in (float16,
    bfloat16, float32), got float8_e4m3fn'). Those layers now stay float, as Wan's do."""
    model, data = _data("skyreels_v2")
    recipe = calibrate(model, data, method="minmax", format="fp8", **OPTIONS)
    assert not any(".time_embedder." in n for n in recipe.layers)
    assert any(n.startswith("blocks.") for n in recipe.layers)
    patched = copy.deepcopy(model)
    diffaccel.patch(patched, quant=recipe, solver=False)
    want, got = tiny_models.output_of(model, data[0]), tiny_models.output_of(patched, data[0])
    assert ((got - want).norm() / want.norm()).item() < MAX_REL_L2


@pytest.mark.parametrize("method", ["tfmq", "qdiffusion"])
def test_bf16_model_calibrates_once_its_first_layer_is_wrapped(method):
    """Flux's first parameter is its time embedder's. Once reconstruction wrapped that layer (TFMQ's
    temporal block, Q-Diffusion's first unit), the working copy's first parameter was the wrapper's
    float32 rounding variable, the calibration forward cast every input to float32, and a bf16 Flux
    raised 'mat1 and mat2 must have the same dtype'. Inputs are cast to the user's model's dtype."""
    model, data = _data("flux")
    model = model.to(torch.bfloat16)
    recipe = calibrate(model, data, method=method, **OPTIONS)
    patched = copy.deepcopy(model)
    diffaccel.patch(patched, quant=recipe, solver=False)
    inputs = {k: v.to(torch.bfloat16) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v
              for k, v in data[0].items()}
    want, got = tiny_models.output_of(model, inputs), tiny_models.output_of(patched, inputs)
    assert got.dtype == want.dtype == torch.bfloat16
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < MAX_REL_L2


def test_pipeline_calls_are_replayed_with_the_dtypes_the_pipeline_passed():
    """A bf16 Flux called by its pipeline with float32 position ids (pipelines pass such arguments
    in float32 on purpose: ids, guidance, a float32-kept module's input): calibration cast every
    recorded floating argument to the model's dtype, so it calibrated on calls the pipeline never
    makes. Recorded calls are now replayed as made; only data given as kwargs is cast."""
    model, data = _data("flux")
    model = model.to(torch.bfloat16)
    calls = [{k: v.to(torch.bfloat16) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v
              for k, v in item.items()} for item in data]
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["img_ids"].dtype, kw["hidden_states"].dtype)),
                                    with_kwargs=True)

    class Pipe:
        scheduler = type("Scheduler", (), {})()
        transformer = model

        def __call__(self, prompt, num_inference_steps, generator, output_type, **kwargs):
            for item in calls:
                self.transformer(**item, return_dict=False)

    calibrate(Pipe(), ["a cat"], method="minmax", num_inference_steps=2, **OPTIONS)
    assert len(seen) > len(calls)  # the pipeline's own calls, then the calibration's
    assert set(seen) == {(torch.float32, torch.bfloat16)}


def test_bf16_model_with_float32_kept_modules_calibrates_on_bf16_data():
    """Kandinsky 5 loaded in bf16 keeps its time embeddings and modulations in float32
    (``_keep_in_fp32_modules``). The calibration forward cast the data to the first parameter's
    dtype, the time embedder's float32, and the bf16 text embedding layer refused it. The model's
    dtype is now read as diffusers reads it, outside the kept modules."""
    model, data = _data("kandinsky5")
    model = model.to(torch.bfloat16)
    for name, p in model.named_parameters():  # (as from_pretrained(torch_dtype=torch.bfloat16) leaves it)
        if any(k in name for k in model._keep_in_fp32_modules):
            p.data = p.data.float()
    assert next(model.parameters()).dtype == torch.float32
    data = [{k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v
             for k, v in item.items()} for item in data]
    recipe = calibrate(model, data, method="minmax", **OPTIONS)
    patched = copy.deepcopy(model)
    diffaccel.patch(patched, quant=recipe, solver=False)
    want, got = tiny_models.output_of(model, data[0]), tiny_models.output_of(patched, data[0])
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < MAX_REL_L2
