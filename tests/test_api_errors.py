"""Bad arguments to the public entry points: each gets an error naming the argument (the raw
Python / torch errors, or silent misreadings, they used to get are in each test's docstring), and
the user's model is unchanged after the failed call."""
import pytest
import torch
from torch import nn

import diffaccel
import tiny_models
from diffaccel.quant.calibrate import CalibrationError


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _unchanged(model, before):
    state, types = before
    now = model.state_dict()
    return [type(m) for m in model.modules()] == types and all(torch.equal(now[k], v) for k, v in state.items())


def test_patch_option_types_are_checked():
    """exclude="*.to_q" was read letter by letter, and its '*' excluded every module (nothing patched,
    no error); exclude=None / [1] and filter_fn="*.attn1" raised raw TypeErrors; attention="no",
    solver="off" and keep_originals="no" counted as True."""
    model, _ = tiny_models.unet_sd15()
    before = _state(model)
    cases = [
        (dict(exclude="*.to_q"), r"^exclude: expected a list or tuple of name patterns, got the string"),
        (dict(exclude=None), r"^exclude: expected a list or tuple of name patterns, got NoneType"),
        (dict(exclude=[1]), r"^exclude: expected name patterns \(str\), got 1"),
        (dict(filter_fn="*.attn1"), r"^filter_fn: expected a callable"),
        (dict(attention="no"), r"^attention: expected True or False"),
        (dict(keep_originals="no"), r"^keep_originals: expected True or False"),
        (dict(solver="off"), r"^solver: expected True, False or a dict"),
    ]
    for kwargs, message in cases:
        with pytest.raises(TypeError, match=message):
            diffaccel.patch(model, quant="w8a8", **kwargs)
        assert _unchanged(model, before) and not diffaccel.is_patched(model), kwargs
    report = diffaccel.patch(model, quant="w8a8", exclude=["*.to_q"], solver=False)
    assert report.by_part("quant") and not any(r.name.endswith(".to_q") for r in report.replaced)


@pytest.mark.parametrize("layer", [nn.Linear(16, 8), nn.Conv2d(4, 8, 3)])
def test_patching_a_bare_layer_says_to_quantize_it_directly(layer):
    """patch(nn.Linear) raised "AttributeError: 'Linear' object has no attribute ''"."""
    before = _state(layer)
    with pytest.raises(TypeError, match=r"^target: a bare (Linear|Conv2d) cannot be replaced in place"):
        diffaccel.patch(layer, quant="w8a8")
    assert _unchanged(layer, before)
    assert diffaccel.patch(nn.Sequential(layer), quant="w8a8").by_part("quant")


def test_unpatch_and_is_patched_refuse_what_cannot_be_patched():
    """unpatch(None) / unpatch("x") returned silently and is_patched("x") said False, while
    patch(None) raised; patch_scheduler(None) raised "vars() argument must have __dict__", and the
    scheduler class was "left alone: type has no fused step"."""
    from diffusers import DDIMScheduler

    from diffaccel.solvers import patch_scheduler, unpatch_scheduler

    for bad in (None, "unet"):
        for call in (diffaccel.unpatch, diffaccel.is_patched):
            with pytest.raises(TypeError, match="^target: expected a diffusers pipeline, a torch.nn.Module or a "
                                                "scheduler"):
                call(bad)
        for call in (patch_scheduler, unpatch_scheduler):
            with pytest.raises(TypeError, match="^scheduler: expected a diffusers scheduler instance"):
                call(bad)
    with pytest.raises(TypeError, match="^scheduler: expected a diffusers scheduler instance, got the class "
                                        "DDIMScheduler"):
        patch_scheduler(DDIMScheduler)


@pytest.mark.parametrize("value,disabled", [("1", True), ("yes", True), ("TRUE", True), ("on", True),
                                            ("0", False), ("false", False), ("No", False), ("off", False), ("", False)])
def test_diffaccel_disable_reads_its_value(monkeypatch, value, disabled):
    """Any value but "" or "0" disabled patching (DIFFACCEL_DISABLE=false did), and the note always
    said "=1"."""
    monkeypatch.setenv("DIFFACCEL_DISABLE", value)
    model, _ = tiny_models.unet_sd15()
    report = diffaccel.patch(model, solver=False)
    assert diffaccel.is_patched(model) is not disabled
    if disabled:
        assert f"DIFFACCEL_DISABLE={value}: patch is a no-op" in str(report)


def test_diffaccel_disable_refuses_a_value_it_cannot_read(monkeypatch):
    monkeypatch.setenv("DIFFACCEL_DISABLE", "maybe")
    model, _ = tiny_models.unet_sd15()
    with pytest.raises(ValueError, match="^DIFFACCEL_DISABLE: expected 1 / true / yes / on to disable"):
        diffaccel.patch(model)
    assert not diffaccel.is_patched(model)


def test_recipe_paths_are_checked(tmp_path):
    """save(None) wrote a file named 'None' (save(123) one named '123'); a missing directory gave a
    raw SafetensorError; load(None) a FileNotFoundError for 'None'."""
    model, inputs = tiny_models.unet_sd15()
    recipe = diffaccel.calibrate(model, [dict(inputs)], method="minmax", progress=False)
    for bad in (None, 123):
        with pytest.raises(TypeError, match="^path: expected a file path"):
            recipe.save(bad)
        with pytest.raises(TypeError, match="^path: expected a file path"):
            type(recipe).load(bad)
    with pytest.raises(FileNotFoundError, match="^path: the directory .* does not exist"):
        recipe.save(tmp_path / "missing" / "r.safetensors")
    recipe.save(tmp_path / "r.safetensors")
    assert type(recipe).load(str(tmp_path / "r.safetensors")).layers.keys() == recipe.layers.keys()


def test_calibrate_names_bad_data_and_device():
    """calibrate(m, None) raised "'NoneType' object is not iterable"; device="tpu" torch's own
    device-string error."""
    model, inputs = tiny_models.unet_sd15()
    before = _state(model)
    with pytest.raises(CalibrationError, match="^data: expected an iterable of forward-kwargs dicts"):
        diffaccel.calibrate(model, None, method="minmax", progress=False)
    with pytest.raises(CalibrationError, match="^device: expected a torch device"):
        diffaccel.calibrate(model, [dict(inputs)], method="minmax", device="tpu", progress=False)
    assert _unchanged(model, before)


def test_cli_refuses_unknown_options(capsys):
    """`python -m diffaccel info --josn` printed the table and exited 0; `demo --bogus-flag` ran the
    demo (a misspelt --out-dir was dropped)."""
    from diffaccel.__main__ import main

    for argv in (["info", "--josn"], ["info", "extra"], ["demo", "--outdir", "x"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        assert "unrecognized arguments" in capsys.readouterr().err


def test_fit_dc_ratios_refuses_leading_spacing_before_any_model_call():
    """With SD1.5/SDXL's timestep_spacing='leading' the reference schedule starts at another timestep;
    the error came after all ~200 reference model calls. It comes before the first."""
    from diffusers import UniPCMultistepScheduler

    from diffaccel.solvers import fit_dc_ratios

    calls = []

    def model_fn(x, t):
        calls.append(t)
        return 0.1 * x

    scheduler = UniPCMultistepScheduler(timestep_spacing="leading", steps_offset=1)
    with pytest.raises(ValueError, match="timestep_spacing='trailing'"):
        fit_dc_ratios(scheduler, model_fn, torch.randn(1, 4, 8, 8), num_inference_steps=6, progress=False)
    assert calls == []


def test_report_names_the_backend_of_a_bos_precomputed_layer():
    """MixDQ's BOSPrecomputed rows showed backend 'n/a'; they show the wrapped layer's."""
    import importlib

    from diffaccel.nn import QuantLinear
    from diffaccel.quant.recipe import BOSPrecomputed

    dpatch = importlib.import_module("diffaccel.patch")
    layer = QuantLinear.from_float(nn.Linear(32, 16), "w8a8")
    wrapped = BOSPrecomputed(layer, torch.zeros(16))
    assert dpatch._backend_of(wrapped) == dpatch._backend_of(layer) != "n/a"
