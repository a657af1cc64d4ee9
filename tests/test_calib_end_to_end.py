"""Each method end to end on a tiny UNet2DConditionModel and a tiny PixArt transformer (random
init) on CPU: calibrate, save, load, build, swap in, run through the real quantized layers."""
import copy

import pytest
import torch

from test_calib_support import apply_recipe, assert_unchanged, model_and_data, run, snapshot

from diffaccel.nn import QuantConv2d, QuantLinear
from diffaccel.quant.calibrate import calibrate
from diffaccel.quant.recipe import BOSPrecomputed, QuantRecipe, TemporalFeatureCache

OPTIONS = dict(iters=2, sensitivity_samples=1, progress=False)
# relative L2 error of one backbone call, W8A8 on random-init tiny models (fp32)
MAX_REL_ERROR = {"unet": 0.15, "pixart": 0.08}


@pytest.mark.parametrize("kind", ["unet", "pixart"])
@pytest.mark.parametrize("method", ["minmax", "qdiffusion", "tfmq", "mixdq"])
def test_method_end_to_end(kind, method, tmp_path):
    model, data = model_and_data(kind, timesteps=(900, 100), per_timestep=1)
    snap = snapshot(model)
    recipe = calibrate(model, data, method=method, weight_bits=8, act_bits=8, seed=0, **OPTIONS)
    assert_unchanged(model, snap)
    assert recipe.method == method and recipe.layers
    path = tmp_path / f"{kind}-{method}.safetensors"
    recipe.save(path)
    loaded = QuantRecipe.load(path)

    patched = copy.deepcopy(model)
    new, removers, skipped = apply_recipe(patched, loaded)
    quant_layers = [m for m in patched.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    assert len(quant_layers) == len(loaded.layers)
    for name, module in new.items():
        inner = module.layer if isinstance(module, BOSPrecomputed) else module
        assert isinstance(inner, (QuantLinear, QuantConv2d, TemporalFeatureCache)), name
        if name in loaded.layers:
            lr = loaded.layers[name]
            assert inner.spec.to_dict() == lr.spec
            if lr.weight_q is not None:  # learned rounding reaches the layer's integer codes
                codes = inner.weight_q if inner.spec.weight_dtype == "int8" else None
                assert codes is None or torch.equal(codes.reshape(lr.weight_q.shape), lr.weight_q)
    for sample in data:
        ref, out = run(model, sample), run(patched, sample)
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < MAX_REL_ERROR[kind], (method, rel)
    for r in removers:
        r()


def test_calibration_is_deterministic_under_the_seed_and_chunked_passes_agree():
    model, data = model_and_data("pixart", timesteps=(900, 100), per_timestep=1)
    runs = [calibrate(model, data, method="qdiffusion", weight_bits=4, act_bits=8, seed=3, **OPTIONS)
            for _ in range(2)]
    runs += [calibrate(model, data, method="qdiffusion", weight_bits=4, act_bits=8, seed=3, block_inputs="fp",
                       units_per_pass=per_pass, **OPTIONS) for per_pass in (None, 2)]
    for a, b in (runs[:2], runs[2:]):
        for name in a.layers:
            assert torch.equal(a.layers[name].weight_q, b.layers[name].weight_q)
            assert torch.equal(a.layers[name].act_scale, b.layers[name].act_scale)


def test_w4a8_and_weight_only_recipes_run_on_the_kernels():
    model, data = model_and_data("unet", timesteps=(900, 100), per_timestep=1)
    for act_bits in (8, 16):
        recipe = calibrate(model, data, method="qdiffusion", weight_bits=4, act_bits=act_bits, **OPTIONS)
        assert all(lr.weight_bits == 4 and lr.act_bits == act_bits for lr in recipe.layers.values())
        assert all(lr.weight_q.min() >= -8 and lr.weight_q.max() <= 7 for lr in recipe.layers.values())
        patched = copy.deepcopy(model)
        apply_recipe(patched, recipe)
        out = run(patched, data[0])
        ref = run(model, data[0])
        assert torch.isfinite(out).all() and ((out - ref).norm() / ref.norm()).item() < 0.6


def test_symmetric_activations_and_a_custom_skip_list():
    model, data = model_and_data("pixart", timesteps=(900, 100), per_timestep=1)
    recipe = calibrate(model, data, method="minmax", weight_bits=8, act_bits=8, act_symmetric=True,
                       skip=["proj_out", "transformer_blocks.0.ff.net.2"], progress=False)
    assert "transformer_blocks.0.ff.net.2" in recipe.skipped and "pos_embed.proj" in recipe.layers
    assert all(lr.spec["act_symmetric"] and not lr.act_zero_point.any() for lr in recipe.layers.values())
    patched = copy.deepcopy(model)
    apply_recipe(patched, recipe)
    ref = run(model, data[0])
    assert ((run(patched, data[0]) - ref).norm() / ref.norm()).item() < MAX_REL_ERROR["pixart"]


@pytest.mark.parametrize("method", ["qdiffusion", "tfmq"])
def test_inside_inference_mode_as_outside(method):
    """A script run under torch.inference_mode (model, data, calibrate and patch inside it): AdaRound
    and LSQ still get their autograd, and the patched model then also runs outside inference mode
    (the per-timestep state updates its index in place, which inference tensors would refuse)."""
    import diffaccel

    with torch.inference_mode():
        model, data = model_and_data("unet", timesteps=(900, 100), per_timestep=1)
        recipe = calibrate(model, data, method=method, weight_bits=8, act_bits=8, iters=2, progress=False)
        ref = copy.deepcopy(model)
        diffaccel.patch(model, quant=recipe, solver=False)
        inside = run(model, data[0])
    with torch.no_grad():
        outside = run(model, data[0])
    assert torch.equal(inside, outside)
    rel = ((outside - run(ref, data[0])).norm() / run(ref, data[0]).norm()).item()
    assert rel < 0.15, rel


def test_bit_allocation_is_logged(caplog):
    import logging

    model, data = model_and_data("pixart", timesteps=(900, 100), per_timestep=1)
    with caplog.at_level(logging.INFO, logger="diffaccel"):
        calibrate(model, data, method="minmax", weight_bits=8, act_bits=8, progress=False)
    assert any("bit allocation W8A8: 25" in r.getMessage() for r in caplog.records)


@pytest.mark.gpu
def test_tfmq_recipe_on_cuda_keeps_activations_on_cpu_and_replays_in_a_cuda_graph():
    model, data = model_and_data("unet", timesteps=(900, 500, 100), per_timestep=1)
    model = model.cuda()
    recipe = calibrate(model, data, method="tfmq", weight_bits=8, act_bits=8, activation_device="cpu", **OPTIONS)
    patched = copy.deepcopy(model)
    new, _, _ = apply_recipe(patched, recipe)
    state = next(m.step_state for m in new.values() if getattr(m, "step_state", None) is not None)
    static = {k: v.cuda() for k, v in data[0].items()}
    eager = []
    for sample in data:
        out = run(patched, {k: v.cuda() for k, v in sample.items()})
        ref = run(model, {k: v.cuda() for k, v in sample.items()})
        assert state.index.device.type == "cuda"
        assert ((out - ref).norm() / ref.norm()).item() < MAX_REL_ERROR["unet"]
        eager.append(out)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run(patched, static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = patched(**static, return_dict=False)[0]
    for k, sample in enumerate(data):  # the step-state hook runs inside the graph: new timestep, new set
        for name, v in sample.items():
            static[name].copy_(v)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(graph_out, eager[k])
