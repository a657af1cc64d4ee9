"""Bad input to calibrate(): each a clear error, and the model left exactly as it was."""
import math

import pytest
import torch

from test_calib_support import assert_unchanged, model_and_data, snapshot

from diffaccel.quant.calibrate import CalibrationError, calibrate


@pytest.fixture
def unet():
    model, data = model_and_data("unet", timesteps=(900, 100), per_timestep=1)
    return model, data, snapshot(model)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="gptq"), "method: unknown calibration method 'gptq'"),
    (dict(method="minmax", weight_bits=3), "weight_bits: the kernels run"),
    (dict(method="qdiffusion", weight_bits=16), "weight_bits"),
    (dict(method="minmax", act_bits=4), "act_bits: expected 8"),
    (dict(method="tfmq", weight_bits=True), "weight_bits: expected a number"),
    (dict(method="mixdq", weight_bits=3.5), "weight_bits: mixdq's average"),
    (dict(method="mixdq", act_bits=20), "act_bits: mixdq's average"),
    (dict(method="mixdq", weight_candidates=(2, 8)), "weight_candidates"),
    (dict(method="minmax", num_timesteps=0), "num_timesteps"),
    (dict(method="qdiffusion", iters=-1), "iters"),
    (dict(method="minmax", skip=["no_such_layer"]), "skip: 'no_such_layer' is not a module"),
])
def test_bad_arguments(unet, kwargs, message):
    model, data, snap = unet
    kwargs = {"weight_bits": 8, "act_bits": 8, **kwargs}
    with pytest.raises(CalibrationError, match=message):
        calibrate(model, data, progress=False, **kwargs)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("method", ["minmax", "qdiffusion", "tfmq", "mixdq"])
def test_bad_data(unet, method):
    model, data, snap = unet
    with pytest.raises(CalibrationError, match="data: empty"):
        calibrate(model, [], method=method, weight_bits=8, act_bits=8, progress=False)
    with pytest.raises(CalibrationError, match="data: empty"):
        calibrate(model, iter(()), method=method, weight_bits=8, act_bits=8, progress=False)
    bad = [dict(d) for d in data]
    bad[1]["sample"] = bad[1]["sample"].clone()
    bad[1]["sample"][0, 0, 0, 0] = math.nan
    with pytest.raises(CalibrationError, match="data: input 'data\\[1\\].sample' contains NaN"):
        calibrate(model, bad, method=method, weight_bits=8, act_bits=8, progress=False)
    no_t = [{k: v for k, v in d.items() if k != "timestep"} for d in data]
    with pytest.raises(CalibrationError, match="has no 'timestep'"):
        calibrate(model, no_t, method=method, weight_bits=8, act_bits=8, progress=False)
    with pytest.raises(CalibrationError, match="expected an iterable of forward-kwargs dicts"):
        calibrate(model, data[0], method=method, weight_bits=8, act_bits=8, progress=False)
    assert_unchanged(model, snap)


def test_non_finite_activations_name_the_layer(unet):
    model, data, _ = unet
    with torch.no_grad():
        model.down_blocks[0].resnets[0].conv1.weight[0, 0, 0, 0] = math.inf
    model.train()  # calibration evaluates in eval mode and gives the training flags back
    snap = snapshot(model)
    with pytest.raises(CalibrationError, match="activations: the input of layer 'down_blocks.0.resnets.0.conv2' "
                                               "contains NaN or Inf at timestep 900"):
        calibrate(model, data, method="qdiffusion", weight_bits=8, act_bits=8, iters=1, progress=False)
    assert_unchanged(model, snap)


def test_target_must_be_a_pipeline_or_module():
    with pytest.raises(CalibrationError, match="target: expected a diffusers pipeline or an nn.Module"):
        calibrate(object(), [], method="minmax", weight_bits=8, act_bits=8, progress=False)


def test_quant_patched_model_refused(unet):
    """Calibrating a model patched with quant would find only the layers the patch left in floating
    point (it used to return such a recipe); attention-only patches calibrate as before."""
    import diffaccel

    model, data, _ = unet
    diffaccel.patch(model, quant="w8a8")
    snap = snapshot(model)
    with pytest.raises(CalibrationError, match=r"target: \d+ layers .* are already quantized by diffaccel.patch"):
        calibrate(model, data, method="minmax", weight_bits=8, act_bits=8, progress=False)
    assert_unchanged(model, snap)
    diffaccel.unpatch(model)
    diffaccel.patch(model)  # attention only
    assert calibrate(model, data, method="minmax", weight_bits=8, act_bits=8, progress=False).layers
