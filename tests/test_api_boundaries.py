"""Bad input at the public API's boundary, found by a sweep of every public callable: each raised a
raw error from deep inside torch or diffusers, named the wrong argument, changed the caller's object,
or took nonsense (a string where a bool belongs) as a value. Each case here failed that way before."""
import copy

import pytest
import torch
from torch import nn

import diffaccel
import diffaccel.ops as O
import tiny_models
from diffaccel.nn import QuantLinear, quantize_reason
from diffaccel.quant import QuantSpec


# -- patch ----------------------------------------------------------------------------------------

def test_patch_refuses_what_it_cannot_do_before_touching_the_model(monkeypatch):
    model, inputs = tiny_models.unet_sd15()
    before = tiny_models.output_of(model, inputs)
    # a static spec: every layer failed for want of scales, with advice to exclude the first one
    with pytest.raises(ValueError, match="^quant: a QuantSpec with static activations needs calibrated"):
        diffaccel.patch(model, quant=QuantSpec(act_mode="static"))
    with pytest.raises(ValueError, match="^attention_quant: 'int8' with attention=False"):
        diffaccel.patch(model, attention=False, attention_quant="int8")
    with pytest.raises(ValueError, match="^solver: scheduler options .* holds no scheduler"):
        diffaccel.patch(model, solver={"noise": "philox"})
    assert not diffaccel.is_patched(model) and torch.equal(tiny_models.output_of(model, inputs), before)
    monkeypatch.setenv("DIFFACCEL_DISABLE", "1")  # switched off, a bad call still fails as it would
    with pytest.raises(TypeError, match="^attention: expected True or False"):
        diffaccel.patch(model, attention="yes")
    report = diffaccel.patch(model)
    with pytest.raises(ValueError, match="^part: expected 'attention', 'quant' or 'solver', got 'attn'"):
        report.by_part("attn")


# -- schedulers -------------------------------------------------------------------------------------

def test_patched_step_refuses_integer_tensors_without_stepping():
    """An int64 model output went to diffusers' own step (the float64 fallback), which ran on it and
    advanced the scheduler's state."""
    from diffusers import DPMSolverMultistepScheduler

    s = DPMSolverMultistepScheduler()
    diffaccel.patch_scheduler(s)
    s.set_timesteps(4)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(TypeError, match="^model_output: expected a floating-point tensor, got int64"):
        s.step(x.long(), s.timesteps[0], x)
    with pytest.raises(TypeError, match="^sample: expected a floating-point tensor, got int32"):
        s.step(x, s.timesteps[0], x.int())
    assert s.step_index is None and all(o is None for o in s.model_outputs)


def test_scheduler_arguments_are_named():
    from diffusers import DDIMScheduler, UniPCMultistepScheduler

    from diffaccel.solvers import noise_state, set_noise_seed

    for call in (lambda: set_noise_seed(None, 1), lambda: noise_state(None)):
        with pytest.raises(TypeError, match="^scheduler: expected a diffusers scheduler instance"):
            call()
    s = DDIMScheduler()
    diffaccel.patch_scheduler(s)
    s.set_timesteps(4)
    x = torch.zeros(1, 4, 8, 8)
    for eta in ("0.5", float("nan"), None):
        with pytest.raises(ValueError, match="^eta: expected a finite number"):
            s.step(x, s.timesteps[0], x, eta=eta)
    for t in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="^timestep: expected an integer timestep of the schedule"):
            s.step(x, t, x)
    u = UniPCMultistepScheduler()
    diffaccel.patch_scheduler(u)
    u.set_timesteps(4)
    with pytest.raises(TypeError, match="^timestep: expected a number or a tensor of the schedule, got str"):
        u.step(x, "5", x)


# -- ops --------------------------------------------------------------------------------------------

def test_op_flags_and_argument_names():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=g)
    w = torch.randint(-127, 128, (16, 32), dtype=torch.int8, generator=g)
    ws = torch.rand(16, generator=g) + 0.5
    with pytest.raises(TypeError, match="^w_int4: expected True or False, got 'yes'"):
        O.int8_linear(x, w, ws, w_int4="yes")
    with pytest.raises(TypeError, match="^act_zero_point: expected"):
        O.int8_linear(x, w, ws, act_scale=torch.tensor([0.1]), act_zero_point=3,
                      w_sum=w.sum(1, dtype=torch.int32))
    with pytest.raises(TypeError, match="^out_dtype: expected torch.float16, torch.bfloat16 or torch.float32, "
                                        "got 'float16'"):
        O.int8_linear(x, w, ws, out_dtype="float16")
    w8 = torch.randn(16, 32, generator=g).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="^act_scale: expected a torch.Tensor"):
        O.fp8_linear(x, w8, ws, act_scale=0.1)
    xc = torch.randn(1, 8, 5, 5, generator=g)
    wc = torch.randint(-127, 128, (4, 8 * 9), dtype=torch.int8, generator=g)
    with pytest.raises(TypeError, match="^in_silu: expected True or False, got 'no'"):
        O.int8_conv2d(xc, wc, torch.ones(4), kernel_size=3, padding=1, in_silu="no")
    with pytest.raises(ValueError, match="^eps: expected a positive finite float, got inf"):
        O.group_norm_affine(xc, 2, torch.ones(8), torch.zeros(8), eps=float("inf"))


def test_ffn_next_smooth_is_named():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=g)
    w = torch.randint(-127, 128, (16, 32), dtype=torch.int8, generator=g)
    with pytest.raises(ValueError, match=r"^next_smooth: expected shape \(16,\) \(one factor per output channel\)"):
        O.int8_ffn_up(x, w, torch.ones(16), activation="gelu", next_scale=torch.tensor([0.1]),
                      next_smooth=torch.ones(3))


def test_fused_solver_step_history_and_flags():
    from diffaccel.ops.solver import NUM_COEFFS

    x = torch.zeros(2, 4, 4, 4)
    k = torch.zeros(NUM_COEFFS)
    with pytest.raises(TypeError, match="^history: expected a list or tuple of tensors"):
        O.fused_solver_step(x, x, k, history=None)
    with pytest.raises(TypeError, match="^history: expected a list or tuple of tensors"):
        O.fused_solver_step(x, x, k, history=x)  # (was split along the batch)
    with pytest.raises(TypeError, match="^write_history: expected True or False, got 'no'"):
        O.fused_solver_step(x, x, k, write_history="no")
    with pytest.raises(TypeError, match="^needs_noise: expected True or False, got 'yes'"):
        O.fused_solver_step(x, x, k, needs_noise="yes")


# -- layers -----------------------------------------------------------------------------------------

def test_quantized_layer_sources_are_checked():
    lin = nn.Linear(16, 8)
    codes = torch.zeros(8, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="^weight: given together with weight_q / weight_scale"):
        QuantLinear.from_float(lin, "w8a8", weight=torch.randn(8, 16), weight_q=codes, weight_scale=torch.ones(8))
    with pytest.raises(TypeError, match="^act_zero_point: expected an int32 tensor, got torch.bool"):
        QuantLinear.from_float(lin, QuantSpec(act_mode="static", act_symmetric=False),
                               act_scale=torch.tensor([0.1]), act_zero_point=torch.tensor([True]))
    with pytest.raises(ValueError, match="^weight: a tensor on the meta device"):
        QuantLinear.from_float(lin, "w8a8", weight=torch.empty(8, 16, device="meta"))
    with pytest.raises(TypeError, match="^module: expected a torch.nn.Module, got NoneType"):
        quantize_reason(None, "w8a8")


# -- calibrate and recipes ------------------------------------------------------------------------------

def test_calibrate_checks_skip_activation_device_and_mixdq_options_up_front():
    from test_calib_support import model_and_data

    from diffaccel.quant.calibrate import CalibrationError, calibrate

    model, data = model_and_data("unet", timesteps=(900,), per_timestep=1)
    for kw, message in ((dict(skip=5), "^skip: expected a list of layer names, got int"),
                        (dict(skip=[3]), "^skip: expected layer names"),
                        (dict(activation_device="bogus"), "^activation_device: expected None, a torch device"),
                        # (parsed but not checked: qdiffusion / tfmq failed after the observation pass with
                        # torch's "Found no NVIDIA driver", minmax / mixdq ignored it; meta failed on a copy)
                        *(((dict(activation_device="cuda"), "^activation_device: cuda requested, but torch sees no "
                                                           "CUDA device here"),) if not torch.cuda.is_available() else ()),
                        (dict(activation_device="meta"), "^activation_device: expected 'cpu' or a CUDA device, got meta"),
                        (dict(act_fp16_fraction=7), "^act_fp16_fraction: expected a number in"),
                        (dict(weight_candidates=(2,)), "^weight_candidates: the kernels run")):
        with pytest.raises(CalibrationError, match=message):
            calibrate(model, data, method="minmax", weight_bits=8, act_bits=8, progress=False, **kw)


def test_recipe_files_with_bad_entries_are_named(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file
    from test_calib_support import model_and_data

    from diffaccel.quant.calibrate import calibrate
    from diffaccel.quant.recipe import QuantRecipe, RecipeError

    model, data = model_and_data("unet", timesteps=(900,), per_timestep=1)
    recipe = calibrate(model, data, method="minmax", weight_bits=8, act_bits=8, progress=False)
    with pytest.raises(IsADirectoryError, match="^path: .* is a directory"):
        recipe.save(tmp_path)
    path = tmp_path / "r.safetensors"
    recipe.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["diffaccel_recipe"])
    name = next(iter(header["layers"]))

    def edited(change, tensor_change=None):
        h = copy.deepcopy(header)
        change(h)
        t = dict(tensors)
        if tensor_change:
            tensor_change(t)
        out = tmp_path / "edited.safetensors"
        save_file(t, str(out), metadata={"diffaccel_recipe": json.dumps(h)})
        return out

    cases = [(lambda h: h.update(format_version="3"), "corrupt recipe header \\(format_version '3'\\)"),
             (lambda h: h.update(format_version=-5), "corrupt recipe header \\(format_version -5\\)"),
             (lambda h: h["layers"][name].update(spec="bogus"), f"layer '{name}' has an invalid spec"),
             (lambda h: h["layers"][name].update(weight_shape="xx"), f"layer '{name}' has an invalid weight_shape")]
    for change, message in cases:
        with pytest.raises(RecipeError, match=message):
            QuantRecipe.load(edited(change))
    key = f"layer/{name}/weight_scale"
    with pytest.raises(RecipeError, match=f"layer '{name}' holds weight_scale as torch.int64"):
        QuantRecipe.load(edited(lambda h: None, lambda t: t.__setitem__(key, t[key].long())))


def test_remaining_flags_and_values_are_named():
    import numpy as np
    from diffusers import EulerDiscreteScheduler

    from diffaccel.ops import explain

    q = torch.randn(1, 2, 8, 16)
    out = O.attention(q, q, q, is_causal=np.bool_(True))  # "is_causal: expected a bool, got bool" before
    torch.testing.assert_close(out, O.attention(q, q, q, is_causal=True))
    assert explain("cpu") == explain(torch.device("cpu"))  # a raw AttributeError before
    from diffusers import UniPCMultistepScheduler

    with pytest.raises(TypeError, match="^dc_ratios: expected float ratios, got bools"):
        diffaccel.patch_scheduler(UniPCMultistepScheduler(), dc_ratios=[True, True, False])
    s = EulerDiscreteScheduler()
    diffaccel.patch_scheduler(s)
    s.set_timesteps(4)
    x = torch.zeros(1, 4, 8, 8, dtype=torch.float64)  # (the diffusers fallback took "7" into an index error)
    with pytest.raises(ValueError, match="^guidance_scale: expected a finite number, got '7'"):
        s.step_with_guidance(x, x, "7", s.timesteps[0], x)
