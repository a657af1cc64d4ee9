"""Copies of quantized layers and patched models: what a copy shares with its source, and what a
copy saved with torch.save needs to load in a fresh process."""
import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import diffaccel
import tiny_models
from diffaccel.nn import QuantConv2d, QuantLinear, QuantSpec


def test_a_quantized_layer_shares_no_storage_with_the_float_layer_or_the_callers_tensors():
    """from_float kept an fp32 bias, the caller's act_scale and smooth as its buffers (.float() and
    .contiguous() return the tensor itself), so editing the float layer later changed the quantized
    one's output, and load_state_dict into a patched model wrote into kept originals."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    act_scale, smooth = torch.tensor([0.05]), torch.rand(16) + 0.5
    q = QuantLinear.from_float(lin, QuantSpec(act_mode="static"), act_scale=act_scale, smooth=smooth)
    x = torch.randn(3, 16)
    before = q(x)
    with torch.no_grad():
        lin.bias.zero_()
        act_scale.fill_(1.0)
        smooth.fill_(2.0)
    assert torch.equal(q(x), before)
    for buf in (q.bias, q.act_scale, q.smooth):
        assert all(buf.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
                   for t in (lin.bias, act_scale, smooth))


def test_unpatch_refuses_after_another_models_weights_were_loaded_while_patched():
    """A patched model given another patched model's state dict: unpatch put back the float layers
    from before the load beside the other model's float layers (norms, conv_in), a silent mix of two
    checkpoints (1.36 relative error against the control). It now refuses and restores nothing; with
    the model's own patched state loaded back, it restores the originals as they were."""
    a, inputs = tiny_models.unet_sd15(seed=0)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    reference = tiny_models.output_of(a, inputs)
    other, _ = tiny_models.unet_sd15(seed=1)
    report = diffaccel.patch(a, quant="w8a8", solver=False)
    own = {k: v.clone() for k, v in a.state_dict().items()}
    diffaccel.patch(other, quant="w8a8", solver=False)
    a.load_state_dict(other.state_dict())
    with pytest.raises(RuntimeError, match=r"quantized layers \(.*\) hold other weights than when they were "
                                           r"patched .* Nothing was restored"):
        diffaccel.unpatch(a)
    assert diffaccel.is_patched(a)
    assert torch.equal(tiny_models.output_of(a, inputs), tiny_models.output_of(other, inputs))
    a.load_state_dict(own)
    diffaccel.unpatch(a)
    quantized = [r.name for r in report.by_part("quant")]
    assert quantized
    after = a.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(tiny_models.output_of(a, inputs), reference)


def test_torch_save_after_a_memory_format_move():
    """FollowsMoves kept the torch.memory_format object, which torch.save cannot pickle ("cannot
    pickle 'module' object")."""
    import io

    model, inputs = tiny_models.unet_sd15()
    diffaccel.patch(model, quant="w8a8", solver=False)
    model.to(memory_format=torch.channels_last)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(tiny_models.output_of(loaded, inputs), tiny_models.output_of(model, inputs))
    diffaccel.unpatch(model)
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("cls", [QuantLinear, QuantConv2d])
def test_to_empty_allocates_a_meta_quantized_layer(cls):
    """The meta-init flow (to('meta'), to_empty, load_state_dict) raised 'Cannot copy out of meta
    tensor' on quantized layers; .to(device) of a meta layer still raises, as torch's does."""
    float_layer = nn.Linear(64, 32) if cls is QuantLinear else nn.Conv2d(8, 8, 3)
    layer = cls.from_float(float_layer, "w8a8")
    meta = copy.deepcopy(layer).to("meta")
    with pytest.raises(NotImplementedError):
        copy.deepcopy(meta).to("cpu")
    empty = meta.to_empty(device="cpu")
    assert all(b.device.type == "cpu" for b in empty.buffers())
    empty.load_state_dict(layer.state_dict())
    x = torch.randn(2, 64) if cls is QuantLinear else torch.randn(1, 8, 6, 6)
    assert torch.equal(empty(x), layer(x))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_torch_save_of_a_model_with_fused_norms_loads_in_a_fresh_process(name, tmp_path):
    """w8a8 / fp8 fuse the adaLN norms of SD3 / Flux / DiT into classes made on first use; they were
    local classes, so torch.save raised "Can't pickle local object". They are found by name now, also
    by a process that has patched nothing."""
    model, inputs = getattr(tiny_models, name)()
    diffaccel.patch(model, quant="w8a8", solver=False)
    assert any(type(m).__name__.startswith("FusedAdaLayerNorm") for m in model.modules())
    expected = tiny_models.output_of(model, inputs)
    torch.save({"model": model, "inputs": inputs, "expected": expected}, tmp_path / "m.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(tiny_models.__file__.rsplit('/', 1)[0])!r})
        import tiny_models
        saved = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)
        out = tiny_models.output_of(saved["model"], saved["inputs"])
        assert torch.equal(out, saved["expected"]), (out - saved["expected"]).abs().max()
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_a_copy_of_a_per_timestep_patched_model_follows_its_own_timesteps(tmp_path):
    """A per-timestep recipe (TFMQ-DM: one activation scale set per calibrated timestep) picks its set
    through a pre-hook on the backbone. The hook was a closure: a deepcopy's hook kept moving the
    original's state, so the copy ran every timestep with the scales of the copy-time one, and
    torch.save failed. The recipe here is a minmax one given three scale sets by hand (what a TFMQ
    recipe holds), so the sets differ enough to show."""
    model, inputs = tiny_models.unet_sd15()
    data = [dict(inputs, timestep=torch.tensor([t, t])) for t in (900, 100)]
    recipe = diffaccel.calibrate(model, data, method="minmax", progress=False)
    recipe.timesteps = torch.tensor([900.0, 500.0, 100.0])
    for lr in recipe.layers.values():
        if lr.act_scale is not None:
            lr.act_scale = torch.cat([lr.act_scale[:1] * f for f in (1, 2, 4)])
            if lr.act_zero_point is not None:
                lr.act_zero_point = lr.act_zero_point[:1].repeat(3, *([1] * (lr.act_zero_point.dim() - 1)))
    diffaccel.patch(model, quant=recipe, solver=False)
    torch.save(model, tmp_path / "m.pt")
    copies = [copy.deepcopy(model), torch.load(tmp_path / "m.pt", weights_only=False)]
    outs = {}
    for t in (900, 500, 100):
        at_t = dict(inputs, timestep=torch.tensor([t, t]))
        outs[t] = tiny_models.output_of(model, at_t)
        for dup in copies:
            assert torch.equal(tiny_models.output_of(dup, at_t), outs[t]), t
    assert not torch.equal(outs[900], outs[500])  # (the three sets do differ)


def test_a_loaded_copy_takes_the_same_preset_again_and_says_why_it_refuses_others(tmp_path):
    """A torch.load-ed copy lost its patch options: patch with the same preset raised "already
    patched with other options; call diffaccel.unpatch first", and unpatch refuses a copy."""
    model, inputs = tiny_models.unet_sd15()
    diffaccel.patch(model, quant="w8a8", solver=False)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    before = tiny_models.output_of(loaded, inputs)
    diffaccel.patch(loaded, quant="w8a8", solver=False)  # the same options: nothing to do
    assert torch.equal(tiny_models.output_of(loaded, inputs), before)
    for other in (dict(quant="w4a16"), dict(quant="w8a8", filter_fn=lambda m, n: True)):
        with pytest.raises(ValueError, match="a copy of a patched model .* cannot be unpatched: patch a fresh model"):
            diffaccel.patch(loaded, solver=False, **other)
    diffaccel.patch(model, quant="w8a8", solver=False, filter_fn=None)  # (the original is unaffected)


@pytest.mark.parametrize("strict", [True, False])
def test_a_float_state_dict_into_a_patched_model_is_named(strict):
    """The float model's state dict loaded into a quant-patched one: strict=True raised torch's list
    of 20,000 characters of keys without a word on why, strict=False loaded new biases beside the
    old codes silently. Each quantized layer now refuses it, naming the key and what to do."""
    source, _ = tiny_models.unet_sd15(seed=1)
    model, _ = tiny_models.unet_sd15()
    diffaccel.patch(model, quant="w8a8", solver=False)
    with pytest.raises(RuntimeError, match=r"proj_in.weight: a float weight for a quantized layer .* load it "
                                           r"before diffaccel.patch"):
        model.load_state_dict(source.state_dict(), strict=strict)
