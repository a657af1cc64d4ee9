"""Calibration, the presets and attention routing on backbones outside tiny_models.FACTORIES, each
of which stood for a defect (tiny configs in tiny_models.CALIBRATION_ONLY, fp32 on CPU unless marked):

- AnyFlow reads ``next(iter(self.delta_embedder.parameters())).dtype`` in ``forward_timestep``,
  not in ``forward``: the scan for such reads missed it, the layers were quantized, and every
  patched forward raised StopIteration.
- Cosmos 3 names its timestep ``vision_timesteps``, Stable Cascade ``timestep_ratio``: no data
  could be given (the backbone refused a ``timestep`` key, calibration demanded one).
- Motif-Video casts the timestep to ``get_parameter_dtype(self.timestep_embedder)``: TFMQ's
  temporal block quantized those layers anyway (the recipe then failed its own validation).
- DreamLite's resnets have a depthwise-separable ``conv1`` without ``in_channels``: the split-point
  pass raised AttributeError.
- ACE-Step's processor passes ``backend=dispatch_backend``, a local copy of its own
  ``self._attention_backend``: read as a backend the user fixed, its attention was left alone.
- SANA-WM sizes its conv chunks from ``inverted_conv.conv.out_channels``: TFMQ's reconstruction
  wrapper hid the layer's attributes (AttributeError).
- A layer given an empty input (AnyFlow-FAR's projection of zero compressed frames) broke the
  statistics hook; layers that never run on the data (Stable Audio 3's inpainting branch) were
  refused, one at a time: they stay in floating point, with the reason in the recipe and a warning.
"""
import copy

import pytest
import torch
from torch import nn

import diffaccel
import tiny_models
from diffaccel.quant.calibrate import CalibrationError, calibrate

OPTIONS = dict(weight_bits=8, act_bits=8, seed=0, iters=2, sensitivity_samples=1, progress=False)
MAX_REL_L2 = 0.1  # (as test_calib_backbones: one call, W8A8 against the float model)


def _data(name):
    factory, key, timesteps = tiny_models.CALIBRATION_ONLY[name]
    model, inputs = factory()
    g = torch.Generator().manual_seed(100)
    latent = "sample" if "sample" in inputs else "vision_tokens" if "vision_tokens" in inputs else "hidden_states"
    items = []
    for t in timesteps:
        item = dict(inputs)
        x = inputs[latent]
        item[latent] = [torch.randn(v.shape, generator=g) for v in x] if isinstance(x, list) else \
            torch.randn(x.shape, generator=g)
        item[key] = torch.full_like(inputs[key], t)
        items.append(item)
    return model, items


def _rel(model, patched, inputs):
    want, got = tiny_models.output_of(model, inputs), tiny_models.output_of(patched, inputs)
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _calibrated(model, data, method, **kw):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = calibrate(model, data, method=method, **{**OPTIONS, **kw})
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    patched = copy.deepcopy(model)
    diffaccel.patch(patched, quant=recipe, solver=False)
    return recipe, patched


@pytest.mark.parametrize("quant", ["w8a8", "recipe"])
def test_anyflow_keeps_the_embedders_a_helper_method_reads(quant):
    model, data = _data("anyflow")
    if quant == "recipe":
        recipe, patched = _calibrated(model, data, "minmax")
        assert not any("time_embedder" in n or "delta_embedder" in n for n in recipe.layers)
    else:
        patched = copy.deepcopy(model)
        report = diffaccel.patch(patched, quant="w8a8", solver=False)
        assert "condition_embedder.delta_embedder.linear_1" in {s.name for s in report.skipped}
    assert _rel(model, patched, data[0]) < MAX_REL_L2


@pytest.mark.parametrize("name", ["cosmos3", "stable_cascade"])
def test_timestep_under_the_backbones_own_name(name):
    model, data = _data(name)
    recipe, patched = _calibrated(model, data, "tfmq" if name == "stable_cascade" else "minmax")
    assert len(recipe.timesteps) == 2
    assert _rel(model, patched, data[0]) < MAX_REL_L2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tfmq_temporal_block_leaves_out_layers_the_model_reads(dtype):
    model, data = _data("motif_video")
    model = model.to(dtype)
    data = [{k: v.to(dtype) if k in ("hidden_states", "encoder_hidden_states") else v for k, v in item.items()}
            for item in data]
    recipe, patched = _calibrated(model, data, "tfmq")
    assert not any(".timestep_embedder." in n for n in recipe.layers)
    assert _rel(model, patched, data[0]) < MAX_REL_L2


def test_split_points_with_a_resnet_conv1_that_is_not_a_conv():
    model, data = _data("dreamlite")
    recipe, patched = _calibrated(model, data, "qdiffusion")
    assert _rel(model, patched, data[0]) < MAX_REL_L2


def test_layers_that_never_run_on_the_data_stay_float_with_a_reason(caplog):
    """Stable Audio 3's inpainting projections run only with ``local_add_cond``, which text-to-audio
    data does not give: every method raised 'saw no input' on the first of them."""
    model, data = _data("stable_audio3")
    never = {n for n, m in model.named_modules() if "to_local_embed" in n and isinstance(m, nn.Linear)}
    with caplog.at_level("WARNING", logger="diffaccel"):
        recipe, patched = _calibrated(model, data, "tfmq")
    assert never and never <= set(recipe.skipped) and not never & set(recipe.layers)
    assert all("never ran on the calibration data" in recipe.skipped[n] for n in never)
    assert "never ran on the calibration data" in caplog.text
    assert recipe.layers and _rel(model, patched, data[0]) < MAX_REL_L2


class _Gated(nn.Module):
    """A projection applied to the first ``n`` tokens, ``n`` = 0 in some calls."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.extra = nn.Linear(8, 8)

    def forward(self, hidden_states, timestep, n, return_dict=True):
        h = self.body(hidden_states)
        return (h + self.extra(h[:, :n]).sum(1, keepdim=True),)


def test_a_layer_given_an_empty_input_in_some_calls_is_calibrated_on_the_others():
    torch.manual_seed(0)
    model = _Gated().eval()
    data = [dict(hidden_states=torch.randn(1, 4, 8), timestep=torch.tensor([t]), n=n)
            for t, n in ((900, 0), (100, 3))]
    recipe = calibrate(model, data, method="minmax", skip=[], **OPTIONS)
    assert {"body", "extra"} <= set(recipe.layers)


def test_mixdq_scores_every_output_of_the_backbone():
    """Kandinsky 6 returns video and audio. MixDQ's sensitivity read the video only, so the layers
    feeding only the audio head scored 0 at every width and could be narrowed for free (at a
    budget of 8 bits they were: 0.117 relative error on the audio)."""
    model, data = _data("kandinsky6")
    recipe = calibrate(model, data, method="mixdq", **OPTIONS)
    audio = [n for n in recipe.meta["sensitivity"] if n.startswith("audio_out_layer.")]
    assert audio and all(recipe.meta["sensitivity"][n]["w8"] > 0 for n in audio)
    assert all(layer.spec["weight_dtype"] == "int8" for layer in recipe.layers.values())
    patched = copy.deepcopy(model)
    diffaccel.patch(patched, quant=recipe, solver=False)
    with torch.no_grad():
        want, got = model(**data[0], return_dict=False), patched(**data[0], return_dict=False)
    for w, g in zip(want, got):  # video, audio
        assert ((g - w).norm() / w.norm()).item() < MAX_REL_L2


def test_attention_routed_when_the_processor_copies_its_backend_to_a_local():
    model, inputs = tiny_models.ace_step()
    patched = copy.deepcopy(model)
    report = diffaccel.patch(patched, solver=False)
    assert len(report.by_part("attention")) == 4 and not [s for s in report.skipped if s.part == "attention"]
    assert _rel(model, patched, inputs) < 1e-5
    diffaccel.unpatch(patched)
    assert torch.equal(tiny_models.output_of(patched, inputs), tiny_models.output_of(model, inputs))


@pytest.mark.parametrize("factory,kept", [(tiny_models.ace_step, "time_embed_r.linear_1"),
                                          (tiny_models.stable_audio3, "to_timestep_embed.0")])
def test_presets_keep_these_timestep_mlps_float(factory, kept):
    """ACE-Step's second timestep MLP and Stable Audio 3's were quantized by the data-free presets
    (ACE-Step's first one, and the time_proj beside the second, were kept)."""
    model, _ = factory()
    report = diffaccel.patch(model, quant="w8a8", solver=False)
    assert kept in {s.name for s in report.skipped if s.part == "quant"}


def test_skip_given_by_the_user_is_reported_as_such():
    model, data = _data("stable_cascade")
    recipe = calibrate(model, data, method="minmax", skip=["down_blocks.0.0.channelwise.0"], **OPTIONS)
    assert recipe.skipped["down_blocks.0.0.channelwise.0"] == "in skip=; kept in floating point"


@pytest.mark.parametrize("method", ["tfmq", "qdiffusion"])
def test_reconstruction_wrapper_shows_the_layers_attributes(method):
    model, data = _data("sana_wm")
    recipe, patched = _calibrated(model, data, method)
    assert _rel(model, patched, data[0]) < MAX_REL_L2
