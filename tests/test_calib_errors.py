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


def test_data_keys_are_checked_against_the_backbone_forward(unet):
    """A misspelt or missing forward argument surfaced as the model's own TypeError once calibration ran."""
    model, data, snap = unet
    typo = [{("encoder_hidden_state" if k == "encoder_hidden_states" else k): v for k, v in d.items()} for d in data]
    with pytest.raises(CalibrationError, match="^data: item 0 has 'encoder_hidden_state', which "
                                               "UNet2DConditionModel.forward does not take"):
        calibrate(model, typo, method="minmax", weight_bits=8, act_bits=8, progress=False)
    missing = [{k: v for k, v in d.items() if k != "encoder_hidden_states"} for d in data]
    with pytest.raises(CalibrationError, match="^data: item 0 lacks 'encoder_hidden_states', a required argument"):
        calibrate(model, missing, method="minmax", weight_bits=8, act_bits=8, progress=False)
    with pytest.raises(CalibrationError, match="^pipe_kwargs: pipeline call arguments, but the target is a bare"):
        calibrate(model, data, method="minmax", weight_bits=8, act_bits=8, progress=False,
                  pipe_kwargs={"guidance_scale": 2.0})
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


# -- every argument checked up front: before any model run, naming the argument ----------------

@pytest.fixture
def no_run(monkeypatch):
    """Collecting the calibration set is the first model run: a check that comes after it fails the test."""
    import diffaccel.quant.calibrate as calib_module

    def ran(*args, **kwargs):
        raise AssertionError("calibrate ran the model before rejecting its arguments")

    monkeypatch.setattr(calib_module, "from_pipeline", ran)
    monkeypatch.setattr(calib_module, "from_backbone_data", ran)


@pytest.fixture
def pipe():
    from test_calib_support import tiny_pipeline

    pipe = tiny_pipeline()
    return pipe, snapshot(pipe.unet)


@pytest.mark.parametrize("steps", [0, -2, 2.5, "4", True])
def test_num_inference_steps_must_be_a_positive_int(pipe, no_run, steps):
    """0 divided by zero in the scheduler, -2 ran a pipeline that "never called its backbone",
    2.5 / "4" failed inside the scheduler."""
    pipe, snap = pipe
    with pytest.raises(CalibrationError, match=f"^num_inference_steps: expected a positive int, got {steps!r}"):
        calibrate(pipe, ["a cat"], method="minmax", num_inference_steps=steps, progress=False)
    assert_unchanged(pipe.unet, snap)


@pytest.mark.parametrize("prompts", [123, None])
def test_pipeline_prompts_must_be_a_string_or_strings(pipe, no_run, prompts):
    """(They raised a bare TypeError from list(prompts).)"""
    pipe, snap = pipe
    with pytest.raises(CalibrationError, match="^data: a pipeline is calibrated with a prompt string or a list of "
                                               f"prompt strings, got {type(prompts).__name__}"):
        calibrate(pipe, prompts, method="minmax", num_inference_steps=2, progress=False)
    assert_unchanged(pipe.unet, snap)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5])
def test_batch_size_must_be_a_positive_int(pipe, no_run, batch_size):
    pipe, snap = pipe
    with pytest.raises(CalibrationError, match=f"^batch_size: expected a positive int, got {batch_size!r}"):
        calibrate(pipe, ["a cat"], method="minmax", num_inference_steps=2, batch_size=batch_size, progress=False)
    assert_unchanged(pipe.unet, snap)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sensitivity_samples=0), r"^sensitivity_samples: expected a positive int, got 0"),
    (dict(sensitivity_samples=-3), r"^sensitivity_samples: expected a positive int, got -3"),
    (dict(act_fp16_fraction=-0.5), r"^act_fp16_fraction: expected a number in \[0, 1\] .*, got -0.5"),
    (dict(act_fp16_fraction=3.0), r"^act_fp16_fraction: expected a number in \[0, 1\] .*, got 3.0"),
    (dict(act_fp16_fraction=math.nan), r"^act_fp16_fraction: expected a number in \[0, 1\]"),
    # the integer program's budget, found infeasible only after the whole sensitivity analysis
    (dict(weight_bits=6, weight_candidates=(8,)),
     r"^weight_bits: mixdq's average weight bit-width 6 lies below the smallest of weight_candidates \(8,\)"),
    (dict(weight_candidates=8), r"^weight_candidates: expected a sequence of weight widths"),
])
def test_mixdq_options_checked_before_any_work(unet, no_run, kwargs, message):
    model, data, snap = unet
    kwargs = {"weight_bits": 8, "act_bits": 8, **kwargs}
    with pytest.raises(CalibrationError, match=message):
        calibrate(model, data, method="mixdq", progress=False, **kwargs)
    assert_unchanged(model, snap)


def test_numpy_integers_accepted_like_ints(unet):
    """np.int64(8) bits were refused as "expected a number"; the recipe records python numbers."""
    import numpy as np

    model, data, snap = unet
    recipe = calibrate(model, data, method="minmax", weight_bits=np.int64(8), act_bits=np.int32(8),
                       num_timesteps=np.int64(2), samples_per_timestep=np.int64(1), iters=np.int64(1),
                       num_inference_steps=np.int64(3), batch_size=np.int64(1), seed=np.int64(0), progress=False)
    assert recipe.layers
    assert type(recipe.meta["weight_bits"]) is int and type(recipe.meta["seed"]) is int
    assert_unchanged(model, snap)
    with pytest.raises(CalibrationError, match="^weight_bits: expected a number, got True"):
        calibrate(model, data, method="minmax", weight_bits=True, progress=False)
    with pytest.raises(CalibrationError, match="^iters: expected a non-negative int, got True"):
        calibrate(model, data, method="qdiffusion", iters=True, progress=False)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("as_pipeline", [False, True])
def test_sequential_offload_refused_before_any_run(no_run, as_pipeline):
    """accelerate.cpu_offload (what enable_sequential_cpu_offload uses) keeps the weights on the meta
    device between calls; calibration failed deep inside with "META device type not an accelerator"."""
    pytest.importorskip("accelerate")
    from accelerate import cpu_offload
    from test_calib_support import run, tiny_pipeline

    pipe = tiny_pipeline()
    model = pipe.unet
    _, data = model_and_data("unet", timesteps=(900, 100), per_timestep=1)
    reference = run(model, data[0])
    cpu_offload(model, execution_device=torch.device("cpu"))
    training = {n: m.training for n, m in model.named_modules()}
    target, prefix = (pipe, "unet\\.") if as_pipeline else (model, "")
    with pytest.raises(ValueError, match=f"^target: {prefix}conv_in.weight is on the meta device .*; calibrate "
                                         r"without sequential offload \(model offload, enable_model_cpu_offload, "
                                         r"is fine\)"):
        calibrate(target, ["a cat"] if as_pipeline else data, method="minmax", num_inference_steps=2, progress=False)
    assert all(p.is_meta for p in model.parameters())  # still offloaded, and still computing the same
    assert {n: m.training for n, m in model.named_modules()} == training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert torch.equal(run(model, data[0]), reference)


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed="abc"), "^seed: expected an int, got 'abc'"),  # (a RuntimeError from manual_seed)
    (dict(seed=1.5), "^seed: expected an int, got 1.5"),
    # (a TypeError from the pipeline call: calibrate passes these itself)
    (dict(pipe_kwargs={"num_inference_steps": 3}), "^pipe_kwargs: 'num_inference_steps' is set by calibrate itself"),
    (dict(pipe_kwargs={"generator": None}), "^pipe_kwargs: 'generator' is set by calibrate itself"),
    (dict(pipe_kwargs=[("guidance_scale", 2.0)]), "^pipe_kwargs: expected a dict of pipeline call arguments"),
])
def test_seed_and_pipe_kwargs_checked_up_front(pipe, no_run, kwargs, message):
    pipe, snap = pipe
    with pytest.raises(CalibrationError, match=message):
        calibrate(pipe, ["a cat"], method="minmax", num_inference_steps=2, progress=False, **kwargs)
    assert_unchanged(pipe.unet, snap)
