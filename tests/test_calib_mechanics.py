"""What makes each calibration method what it is: the calibration set's timestep spread, fake
quantization identical to the kernels, AdaRound learning a rounding better than nearest, split
quantizers on the UNet's concat inputs, TFMQ's per-timestep parameters and exact temporal cache,
MixDQ's BOS path and its bit budget."""
import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_calib_support import apply_recipe, backbone_data, bos_embedding, model_and_data, run

from diffaccel.quant.calibrate import CalibrationError, calibrate
from diffaccel.quant.calibrate import collect, fakequant, mixdq, qdiffusion, tfmq
from diffaccel.quant.calibrate.common import find_split_points
from diffaccel.quant.calibrate.reconstruct import LayerInit, reconstruct
from diffaccel.quant.recipe import BOSPrecomputed, TemporalFeatureCache


# -- numerics shared with the kernels ----------------------------------------------------------

def test_act_fake_quant_is_the_kernels_quantizer_bit_for_bit():
    from diffaccel.ops import quantize_per_tensor

    g = torch.Generator().manual_seed(0)
    scale, zp = 0.037, -11
    x = torch.randn(4, 300, generator=g) * 3
    x[0, :40] = (torch.arange(40) - 20 + 0.5) * scale  # exact .5 ties: round half to even
    x[1, :4] = torch.tensor([1e3, -1e3, 0.0, -0.0])   # saturation
    q = quantize_per_tensor(x, scale, zp)
    expected = (q.float() - zp) * torch.tensor(scale)
    got = fakequant.fake_quant_act(x, torch.tensor(scale), torch.tensor(zp, dtype=torch.int32))
    assert torch.equal(got, expected)
    # the LSQ variant has the same forward
    assert torch.equal(fakequant.lsq_fake_quant_act(x, torch.tensor(scale), torch.tensor(zp)), expected)


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_codes_match_the_layer_format(bits):
    from diffaccel.quant.formats import quantize_weight_int

    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    grid = fakequant.weight_grid({8: "int8", 4: "int4"}[bits])
    scale = fakequant.weight_absmax_scale(w, grid)
    q_ref, s_ref = quantize_weight_int(w, bits)
    assert torch.allclose(scale, s_ref, rtol=1e-6, atol=0)
    assert torch.equal(fakequant.quantize_weight(w, s_ref, grid), q_ref)


def test_lp_clip_search_never_loses_to_absmax():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    w[:, 0] *= 8  # an outlier per channel: clipping it pays at 4 bits
    grid = fakequant.weight_grid("int4")
    p = 2.4
    err = lambda s: (w - fakequant.fake_quant_weight(w, s, grid)).abs().pow(p).sum(1)
    searched = fakequant.search_weight_scale(w, grid, p=p)
    absmax = fakequant.weight_absmax_scale(w, grid)
    assert (err(searched) <= err(absmax) + 1e-6).all()
    assert (searched < absmax).any()


# -- calibration set: timesteps spread over the trajectory ---------------------------------------

def test_spread_indices_cover_the_trajectory_uniformly():
    assert collect.spread_indices(50, 5) == [0, 12, 24, 37, 49]
    assert collect.spread_indices(4, 10) == [0, 1, 2, 3]
    assert collect.spread_indices(7, 1) == [3]


def test_bare_data_calibration_set_spreads_timesteps_and_caps_samples():
    data = backbone_data("unet", timesteps=range(1000, 0, -100), per_timestep=3)
    calib = collect.from_backbone_data(data, num_timesteps=4, samples_per_timestep=2)
    assert calib.timesteps.tolist() == [1000.0, 700.0, 400.0, 100.0]
    assert calib.t_index == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(float(s["timestep"][0]) == calib.timesteps[t] for s, t in zip(calib.samples, calib.t_index))


# -- Q-Diffusion: AdaRound + BRECQ on a toy block ------------------------------------------------

def test_adaround_learns_a_rounding_that_beats_nearest_on_a_toy_block():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 16))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        io = [((x,), {}, block(x), 0) for x in (torch.randn(64, 16, generator=g) for _ in range(4))]
    grid = fakequant.weight_grid("int4")
    inits = {rel: LayerInit(grid, fakequant.weight_absmax_scale(block[i].weight, grid))
             for rel, i in (("0", 0), ("2", 2))}
    learned = reconstruct(block, io, inits, iters=400, device="cpu", seed=0, learn_act=False)

    def block_error(codes):
        def fwd(x):
            h = F.linear(x, codes["0"] * fakequant.per_channel_view(inits["0"].weight_scale, block[0].weight),
                         block[0].bias)
            return F.linear(F.gelu(h), codes["2"] * fakequant.per_channel_view(inits["2"].weight_scale,
                                                                                 block[2].weight), block[2].bias)
        with torch.no_grad():
            return sum((fwd(a[0]) - out).pow(2).sum().item() for a, _, out, _ in io)

    nearest = {rel: fakequant.quantize_weight(block[int(rel)].weight, inits[rel].weight_scale, grid).float()
               for rel in inits}
    adaround = {rel: learned[rel].weight_q.float() for rel in inits}
    for rel in inits:
        diff = adaround[rel] - nearest[rel]
        assert (diff != 0).any(), "AdaRound kept every nearest rounding"
        assert diff.abs().max() <= 1  # it only chooses between floor and ceil
        assert adaround[rel].min() >= -8 and adaround[rel].max() <= 7
    assert block_error(adaround) < 0.9 * block_error(nearest)  # nearest rounding with minmax scales
    # the block's own weights were not touched
    assert not any(p.grad is not None for p in block.parameters())


def test_reconstruct_counts_the_rounding_choices_left_undecided():
    """AdaRound's regulariser settles h to 0 or 1 only given enough iterations; what it has not
    settled is decided by the hardening. reconstruct() counts those, per layer."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 32))
    with torch.no_grad():
        io = [((x,), {}, block(x), 0) for x in torch.randn(4, 64, 16).unbind(0)]
    grid = fakequant.weight_grid("int4")
    init = {"0": LayerInit(grid, fakequant.weight_absmax_scale(block[0].weight, grid))}
    short, long = (reconstruct(block, io, init, iters=n, device="cpu", seed=0, learn_act=False)["0"]
                   for n in (10, 1500))
    assert short.rounding == long.rounding == block[0].weight.numel()
    assert short.undecided > 0.5 * short.rounding  # barely moved from the fractional parts
    assert long.undecided < 0.1 * long.rounding
    plain = reconstruct(block, io, init, iters=10, device="cpu", seed=0, adaround=False, learn_act=False)["0"]
    assert plain.undecided == plain.rounding == 0


@pytest.mark.parametrize("method", ["qdiffusion", "tfmq"])
def test_recipe_meta_and_a_warning_say_how_much_of_adaround_went_undecided(method, caplog):
    model, data = model_and_data("unet", timesteps=(900, 100), per_timestep=1)
    with caplog.at_level("WARNING", logger="diffaccel"):
        recipe = calibrate(model, data, method=method, weight_bits=8, act_bits=8, iters=2, progress=False)
    frac = recipe.meta["adaround_undecided"]
    assert 0.5 < frac <= 1.0  # two iterations settle nothing
    assert any("undecided" in r.getMessage() and "raise iters" in r.getMessage() for r in caplog.records)
    plain = calibrate(model, data, method=method, weight_bits=8, act_bits=8, iters=2, adaround=False, progress=False)
    assert plain.meta["adaround_undecided"] is None


def test_lsq_learns_activation_step_sizes_in_the_same_reconstruction():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 8))
    x = torch.randn(128, 8) * torch.linspace(0.1, 4, 8)
    with torch.no_grad():
        io = [((x,), {}, block(x), 0)]
    grid = fakequant.weight_grid("int8")
    s0, z0 = fakequant.act_params_from_range(torch.tensor(-40.0), torch.tensor(40.0), False)  # far too wide
    init = {"0": LayerInit(grid, fakequant.weight_absmax_scale(block[0].weight, grid), s0.reshape(1),
                           z0.reshape(1))}
    res = reconstruct(block, io, init, iters=60, device="cpu", seed=0, adaround=False)
    assert res["0"].act_scale.shape == (1,) and res["0"].act_scale[0] < s0  # learned a tighter step


def test_blocks_are_reconstructed_in_call_order_from_the_quantized_model(monkeypatch):
    model, data = model_and_data("unet", timesteps=(900, 100), per_timestep=1)
    seen = []
    real = qdiffusion.reconstruct

    def spy(unit, io, inits, **kw):
        seen.append((unit, io))
        return real(unit, io, inits, **kw)

    monkeypatch.setattr(qdiffusion, "reconstruct", spy)
    fp_inputs = {}
    names = {m: n for n, m in model.named_modules()}

    def record(module, args):
        fp_inputs.setdefault(names[module], args[0].detach().clone())

    hooks = [model.get_submodule(n).register_forward_pre_hook(record)
             for n in ("mid_block.resnets.0", "up_blocks.0.resnets.0", "down_blocks.0.resnets.0")]
    run(model, data[0])
    for h in hooks:
        h.remove()
    calibrate(model, data, method="qdiffusion", weight_bits=4, act_bits=8, iters=1, progress=False)
    order = [names[u] for u, _ in seen if u in names]
    assert order.index("down_blocks.0.resnets.0") < order.index("mid_block.resnets.0") < order.index("up_blocks.0.resnets.0")
    io = {names[u]: io for u, io in seen if u in names}
    # the first block sees the model's real input; later ones see the output of quantized blocks
    assert torch.equal(io["down_blocks.0.resnets.0"][0][0][0], fp_inputs["down_blocks.0.resnets.0"])
    for later in ("mid_block.resnets.0", "up_blocks.0.resnets.0"):
        assert not torch.equal(io[later][0][0][0], fp_inputs[later])


# -- Q-Diffusion: split quantization of cat(h, skip) ---------------------------------------------

# up block i, resnet j of the tiny UNet: channels of h (the rest of the input is the skip)
EXPECTED_SPLIT = {"up_blocks.0.resnets.0": 64, "up_blocks.0.resnets.1": 64,
                  "up_blocks.1.resnets.0": 64, "up_blocks.1.resnets.1": 32}
# conv_shortcut sees the raw concat; conv1 sees GroupNorm(concat) (8 groups): only where no group
# straddles the boundary (in 128: groups of 16 | 64; in 96: groups of 12 do not divide 64; in 64: 8 | 32)
EXPECTED_SPLIT_LAYERS = {**{f"{r}.conv_shortcut": c for r, c in EXPECTED_SPLIT.items()},
                         "up_blocks.0.resnets.0.conv1": 64, "up_blocks.1.resnets.1.conv1": 32}


def test_split_points_are_the_concat_layers_of_the_up_path():
    model, data = model_and_data("unet", timesteps=(500,), per_timestep=1)
    points = find_split_points(model, data[0], "cpu")
    assert points == EXPECTED_SPLIT_LAYERS
    for name, c1 in points.items():  # the layer really consumes cat(h, skip): C1 + skip = its input
        conv = model.get_submodule(name)
        assert conv.in_channels > c1


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_split_point_hooks_are_removed_when_the_forward_or_a_registration_fails(monkeypatch):
    model, data = model_and_data("unet", timesteps=(500,), per_timestep=1)

    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    with model.mid_block.register_forward_pre_hook(fail):  # the forward pass fails after the hooks are placed
        with pytest.raises(RuntimeError, match="injected"):
            find_split_points(model, data[0], "cpu")
        assert _hook_count(model) == 1  # only the injected one
    # the second candidate block refuses its hook: the first one's must not stay behind
    monkeypatch.setattr(model.up_blocks[1], "register_forward_pre_hook", fail)
    with pytest.raises(RuntimeError, match="injected"):
        find_split_points(model, data[0], "cpu")
    assert _hook_count(model) == 0


def test_qdiffusion_gives_the_concat_layers_separate_quantizers():
    from diffaccel.nn import QuantConv2d

    model, data = model_and_data("unet", timesteps=(900, 100), per_timestep=1)
    recipe = calibrate(model, data, method="qdiffusion", weight_bits=8, act_bits=8, iters=1, progress=False)
    split = {n: lr for n, lr in recipe.layers.items() if lr.act_split is not None}
    assert {n: lr.act_split for n, lr in split.items()} == EXPECTED_SPLIT_LAYERS
    for name, lr in split.items():
        assert lr.act_scale.shape == (1, 2) and lr.act_zero_point.shape == (1, 2)
    # the raw concat's halves (h, skip) have their own ranges
    assert any(not torch.allclose(lr.act_scale[0, 0], lr.act_scale[0, 1]) for lr in split.values())
    assert all(lr.act_split is None for n, lr in recipe.layers.items() if not n.startswith("up_blocks"))
    new, _, _ = recipe.build_modules(model)
    for name in split:
        assert isinstance(new[name], QuantConv2d) and new[name].act_split == recipe.layers[name].act_split


# -- TFMQ-DM: finite-set calibration, switched at run time; exact temporal cache; TIAR ------------

@pytest.fixture(scope="module")
def tfmq_unet():
    model, data = model_and_data("unet", timesteps=(900, 500, 100), per_timestep=1)
    recipe = calibrate(model, data, method="tfmq", weight_bits=8, act_bits=8, iters=1, progress=False)
    return model, data, recipe


def test_tfmq_has_one_activation_set_per_timestep_switched_at_run_time(tfmq_unet):
    model, data, recipe = tfmq_unet
    assert recipe.timesteps.tolist() == [900.0, 500.0, 100.0]
    per_t = [lr for lr in recipe.layers.values() if lr.act_scale is not None]
    assert per_t and all(lr.act_scale.shape[0] == 3 for lr in per_t)
    assert any(not torch.allclose(lr.act_scale[0], lr.act_scale[2]) for lr in per_t)

    patched = copy.deepcopy(model)
    new, removers, _ = apply_recipe(patched, recipe)
    state = next(m.step_state for m in new.values() if getattr(m, "step_state", None) is not None)
    outputs = {}
    for k, sample in enumerate(data):  # one sample per calibrated timestep, in order
        outputs[k] = run(patched, sample)
        assert int(state.index) == k  # the pre-hook mapped `timestep` to the calibrated index
    # the same recipe restricted to timestep k reproduces the per-timestep model exactly at k
    k = 1
    fixed = copy.deepcopy(recipe)
    fixed.timesteps = recipe.timesteps[k:k + 1]
    for lr in fixed.layers.values():
        if lr.act_scale is not None:
            lr.act_scale, lr.act_zero_point = lr.act_scale[k:k + 1], lr.act_zero_point[k:k + 1]
    fixed.temporal_cache = {n: [v[k:k + 1] for v in vals] for n, vals in recipe.temporal_cache.items()}
    single = copy.deepcopy(model)
    _, rm, _ = apply_recipe(single, fixed)
    assert torch.equal(run(single, data[k]), outputs[k])
    # the index alone (hook removed) selects the set: index k reproduces timestep k's output
    for r in removers:
        r()
    state.index.fill_(k)
    assert torch.equal(run(patched, data[k]), outputs[k])
    # and timestep 0's activation set in place of timestep k's changes the output
    other = copy.deepcopy(recipe)
    for lr in other.layers.values():
        if lr.act_scale is not None:
            lr.act_scale, lr.act_zero_point = lr.act_scale[[0, 0, 0]], lr.act_zero_point[[0, 0, 0]]
    swapped = copy.deepcopy(model)
    apply_recipe(swapped, other)
    assert not torch.equal(run(swapped, data[k]), outputs[k])


def test_tfmq_temporal_cache_is_exact_and_rejects_other_timesteps(tfmq_unet):
    model, data, recipe = tfmq_unet
    projections = [n for n in dict(model.named_modules()) if n.endswith("time_emb_proj")]
    assert set(recipe.temporal_cache) == {"time_embedding", *projections}
    assert not any(n.startswith("time_embedding.") or n.endswith("time_emb_proj") for n in recipe.layers)
    new, installers, _ = recipe.build_modules(model)
    cache_only = copy.deepcopy(model)
    for name, module in new.items():
        if isinstance(module, TemporalFeatureCache):
            parent, _, child = name.rpartition(".")
            setattr(cache_only.get_submodule(parent) if parent else cache_only, child, module)
    removers = [i(cache_only) for i in installers]
    for sample in data:  # identical to computing time_embedding + every time_emb_proj
        assert torch.equal(run(cache_only, sample), run(model, sample))
    off = dict(data[0], timestep=torch.full((2,), 321.0))
    with pytest.raises(RuntimeError, match="temporal feature cache runs only at the timesteps it was calibrated on"):
        run(cache_only, off)
    for r in removers:
        r()


def test_tfmq_without_cache_reconstructs_the_temporal_block_as_one_unit(monkeypatch):
    model, data = model_and_data("unet", timesteps=(900, 100), per_timestep=1)
    units = []
    real = qdiffusion.reconstruct

    def spy(unit, io, inits, **kw):
        units.append((unit, set(inits)))
        return real(unit, io, inits, **kw)

    monkeypatch.setattr(qdiffusion, "reconstruct", spy)
    recipe = calibrate(model, data, method="tfmq", weight_bits=8, act_bits=8, iters=2, temporal_cache=False,
                       progress=False)
    tib = [(u, rel) for u, rel in units if isinstance(u, tfmq.TemporalUnit)]
    assert len(tib) == 1
    projections = [n for n in dict(model.named_modules()) if n.endswith("time_emb_proj")]
    assert tib[0][1] == {"embed.linear_1", "embed.linear_2"} | {f"projs.{i}" for i in range(len(projections))}
    for name in ["time_embedding.linear_1", "time_embedding.linear_2", *projections]:
        lr = recipe.layers[name]
        assert lr.weight_q is not None and lr.act_scale.shape == (2,)
    # and the resnets' reconstructions do not own their time_emb_proj
    for unit, rel in units:
        assert not any(r.endswith("time_emb_proj") for r in rel)
    assert recipe.temporal_cache == {}


@pytest.mark.parametrize("act_fn", [None, "silu", "mish"])
def test_tiar_targets_are_the_temporal_features_the_unet_computes(act_fn):
    """TIAR's target must be what the resnets' time_emb_proj really see. With time_embedding_act_fn
    set, the UNet activates the embedding (time_embed_act) before every resnet; the target used to
    skip it (0.39 relative error at the projections, so TIAR reconstructed features the model never
    computes)."""
    from diffusers import UNet2DConditionModel

    from diffaccel.quant.calibrate.structure import temporal_info

    torch.manual_seed(0)
    m = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                             layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                             attention_head_dim=2, norm_num_groups=8, time_embedding_act_fn=act_fn).eval()
    info = temporal_info(m)
    assert info.projections
    embed = m.get_submodule(info.embed)
    unit = tfmq.TemporalUnit(embed, [(m.get_submodule(p), tfmq._projection_act(m, p)) for p in info.projections])
    seen = {}
    hooks = [embed.register_forward_hook(lambda mod, a, o: seen.update(args=a, embed=o))]
    hooks += [m.get_submodule(p).register_forward_hook(lambda mod, a, o, p=p: seen.update({p: o}))
              for p in info.projections]
    with torch.no_grad():
        m(torch.randn(2, 4, 8, 8), torch.tensor([500, 20]), torch.randn(2, 7, 32))
        for h in hooks:
            h.remove()
        target = unit(*seen["args"])
    real = torch.cat([seen[k].reshape(2, -1) for k in ["embed", *info.projections]], dim=-1)
    torch.testing.assert_close(target, real, rtol=1e-6, atol=1e-6)


# -- MixDQ: BOS path, decoupled metrics, integer program ------------------------------------------

def test_mixdq_keeps_the_bos_token_in_full_precision_and_out_of_the_statistics():
    model, data = model_and_data("unet", timesteps=(900, 100), per_timestep=1)
    recipe = calibrate(model, data, method="mixdq", weight_bits=8, act_bits=8, sensitivity_samples=1,
                       progress=False)
    baseline = calibrate(model, data, method="minmax", weight_bits=8, act_bits=8, progress=False)
    kv = [n for n in recipe.layers if ".attn2.to_k" in n or ".attn2.to_v" in n]
    assert kv and recipe.meta["bos"] and sorted(recipe.meta["bos_layers"]) == sorted(kv)
    bos = bos_embedding()
    for name in kv:
        layer = model.get_submodule(name)
        lr = recipe.layers[name]
        assert torch.allclose(lr.bos_output, F.linear(bos, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        if lr.act_scale is None:
            continue
        # the BOS magnitude is outside the calibrated range; a plain min/max range includes it
        assert lr.act_scale[0] * 255 < bos.abs().max()
        assert lr.act_scale[0] < 0.5 * baseline.layers[name].act_scale[0]
    assert all(recipe.layers[n].bos_output is None for n in recipe.layers if n not in kv)
    patched = copy.deepcopy(model)
    new, _, _ = apply_recipe(patched, recipe)
    for name in kv:
        assert isinstance(new[name], BOSPrecomputed)
        x = data[0]["encoder_hidden_states"]
        y = new[name](x)
        assert torch.equal(y[:, 0], recipe.layers[name].bos_output.expand(2, -1))  # exactly the fp32 output
        assert torch.allclose(y[:, 1:], model.get_submodule(name)(x)[:, 1:], rtol=0.1, atol=0.05)


def test_mixdq_without_a_shared_first_token_has_no_bos_path():
    model, data = model_and_data("pixart", timesteps=(900, 100), per_timestep=1, bos=False)
    recipe = calibrate(model, data, method="mixdq", weight_bits=8, act_bits=8, sensitivity_samples=1,
                       progress=False)
    assert not recipe.meta["bos"] and all(lr.bos_output is None for lr in recipe.layers.values())
    with pytest.raises(CalibrationError, match="bos"):
        calibrate(model, data, method="mixdq", weight_bits=8, act_bits=8, bos=True, progress=False)


def _zeroed_negative(data):
    """SDXL's force_zeros_for_empty_prompt: the unconditional half (row 0) is all zeros."""
    out = []
    for item in data:
        ehs = item["encoder_hidden_states"].clone()
        ehs[0] = 0
        out.append({**item, "encoder_hidden_states": ehs})
    return out


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_mixdq_bos_output_only_for_rows_whose_token_0_is_the_bos():
    """The BOS output replaced token 0 of every row: a zeroed negative prompt's to_k / to_v rows got
    CLIP's BOS output (1.17 relative error on that half of the UNet output), and calibration data
    with such rows had no BOS path at all."""
    model, data = model_and_data("unet", timesteps=(900, 100), per_timestep=1)
    data = _zeroed_negative(data)
    recipe = calibrate(model, data, method="mixdq", weight_bits=8, act_bits=8, sensitivity_samples=1,
                       progress=False)
    kv = sorted(n for n in recipe.layers if ".attn2.to_k" in n or ".attn2.to_v" in n)
    assert kv and recipe.meta["bos"] and sorted(recipe.meta["bos_layers"]) == kv
    for name in kv:  # to_k / to_v read encoder_hidden_states directly: their BOS input is the embedding
        assert torch.equal(recipe.layers[name].bos_input, bos_embedding())
    patched = copy.deepcopy(model)
    new, _, _ = apply_recipe(patched, recipe)
    x = data[0]["encoder_hidden_states"]
    for name in kv:
        y, quantized = new[name](x), new[name].layer(x)
        assert torch.equal(y[1, 0], recipe.layers[name].bos_output)  # the BOS row: the fp32 output
        assert torch.equal(y[0, 0], quantized[0, 0]) and torch.equal(y[:, 1:], quantized[:, 1:])
        assert not torch.equal(y[0, 0], recipe.layers[name].bos_output)
    item = data[0]
    with torch.no_grad():
        ref = model(**item).sample
        out = patched(**item).sample
    # measured: zeroed half 0.067, BOS half 0.046 (bos=False: 0.059 / 0.059); before, the zeroed half 1.28
    assert _rel(out[0], ref[0]) < 0.15 and _rel(out[1], ref[1]) < 0.1


def test_mixdq_bos_statistics_keep_token_0_of_rows_that_are_not_the_bos():
    model, data = model_and_data("unet", timesteps=(900,), per_timestep=1)
    calib = collect.from_backbone_data(data, num_timesteps=1, samples_per_timestep=None)
    name = next(n for n, _ in model.named_modules() if n.endswith("attn2.to_k"))
    bos = bos_embedding()
    base = collect.observe(model, calib, layers=[name], bos_inputs={name: bos}, device="cpu", progress=False)
    ehs = calib.samples[0]["encoder_hidden_states"]
    assert float(base.layers[name].hi[0]) < float(ehs[:, 1:].max()) + 1e-6  # the BOS stays out
    edited = ehs.clone()
    edited[0, 0] = 1000.0  # an edited token 0: not the BOS, so the quantized layer takes it
    calib.samples[0] = {**calib.samples[0], "encoder_hidden_states": edited}
    obs = collect.observe(model, calib, layers=[name], bos_inputs={name: bos}, device="cpu", progress=False)
    assert float(obs.layers[name].hi[0]) == 1000.0


def test_bos_match_tolerates_the_text_encoders_dtype_only():
    from diffaccel.quant.recipe import BOS_MATCH_RTOL, matches_bos

    bos = bos_embedding()
    rows = torch.stack([bos, bos.half().float(), bos.bfloat16().float(), torch.zeros_like(bos),
                        bos * (1 + 2 * BOS_MATCH_RTOL), torch.randn(bos.shape)])
    assert matches_bos(rows, bos).tolist() == [True, True, True, False, False, False]


def test_a_format_2_mixdq_recipe_warns_and_replaces_every_row(caplog):
    model, data = model_and_data("unet", timesteps=(900, 100), per_timestep=1)
    recipe = calibrate(model, data, method="mixdq", weight_bits=8, act_bits=8, sensitivity_samples=1,
                       progress=False)
    kv = recipe.meta["bos_layers"]
    for name in kv:
        recipe.layers[name].bos_input = None  # what a format-2 file loads as
    with caplog.at_level("WARNING", logger="diffaccel"):
        new, _, _ = recipe.build_modules(model)
    assert "format-2 MixDQ recipe" in caplog.text
    x = torch.zeros(2, 5, bos_embedding().numel())
    for name in kv:
        assert torch.equal(new[name](x)[:, 0], recipe.layers[name].bos_output.expand(2, -1))


def test_ilp_honours_the_budget_and_is_optimal():
    rng = np.random.default_rng(0)
    L, cands = 7, (4, 8)
    sizes = rng.integers(10, 1000, L).astype(float)
    costs = np.stack([rng.uniform(1, 5, L), rng.uniform(0, 1, L)], axis=1)  # 4 bits costs more
    for budget in (4.0, 5.0, 6.3, 7.9, 8.0):
        bits = mixdq.allocate_bits(costs, sizes, cands, budget)
        assert (sizes * bits).sum() / sizes.sum() <= budget + 1e-9
        best = min((sum(costs[l, cands.index(b)] for l, b in enumerate(combo)), combo)
                   for combo in itertools.product(cands, repeat=L)
                   if (sizes * np.array(combo)).sum() / sizes.sum() <= budget + 1e-9)
        got = sum(costs[l, cands.index(b)] for l, b in enumerate(bits))
        assert math.isclose(got, best[0], rel_tol=1e-9)
    with pytest.raises(CalibrationError, match="bit budget"):
        mixdq.allocate_bits(costs, sizes, cands, 3.5)


def test_ilp_ties_go_to_the_wider_width():
    """Layers that score 0 at every width (Kandinsky 6's audio head: the sensitivity scores read the
    first output only) were narrowed to 4 bits at a budget of 8, which the solver left free."""
    sizes = np.array([100.0, 300.0, 50.0, 700.0])
    costs = np.array([[0.0, 0.0], [0.5, 0.1], [0.0, 0.0], [2.0, 0.3]])
    assert mixdq.allocate_bits(costs, sizes, (4, 8), 8.0) == [8, 8, 8, 8]
    assert mixdq.allocate_bits(np.zeros((4, 2)), sizes, (4, 8), 8.0) == [8, 8, 8, 8]


def test_mixdq_allocation_meets_its_budgets_and_keeps_the_most_sensitive_activations_16bit():
    model, data = model_and_data("pixart", timesteps=(900, 100), per_timestep=1)
    recipe = calibrate(model, data, method="mixdq", weight_bits=6, act_bits=8, act_fp16_fraction=0.1,
                       sensitivity_samples=1, progress=False)
    assert recipe.average_weight_bits() <= 6 + 1e-9
    bits = recipe.bits()
    assert {w for w, _ in bits.values()} == {4, 8}
    n16 = sum(a == 16 for _, a in bits.values())
    assert n16 == math.ceil(0.1 * len(bits))
    sens = recipe.meta["sensitivity"]
    top = sorted(sens, key=lambda n: sens[n]["a8"], reverse=True)[:n16]
    # the most sensitive activations (within the group-normalised cost) are the 16-bit ones
    assert {n for n, (_, a) in bits.items() if a == 16} == set(top)
    for name, s in sens.items():
        assert s["group"] == ("content" if (".attn2." in name or ".ff." in name) else "quality")


def test_metrics():
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert mixdq.ssim(x, x) == pytest.approx(1.0)
    assert mixdq.ssim(x, x + 0.5 * torch.randn_like(x)) < 0.9
    assert mixdq.sqnr_db(x, x + 0.01 * x) == pytest.approx(40.0, abs=1e-4)


def test_step_state_refuses_a_batch_of_mixed_timesteps_and_survives_inference_mode():
    """A per-timestep recipe has one set of scales per call: a batch with timesteps [900, 100] ran
    entirely with 900's (sample 1: 0.77 relative error, no warning). And the device index made by a
    first call under torch.inference_mode was an inference tensor, so every later call outside it
    failed ('Inplace update to inference tensor outside InferenceMode')."""
    from diffaccel.quant.recipe import StepState

    state = StepState(torch.tensor([900.0, 100.0]), exact=False)
    state.update(torch.tensor([100.0, 100.0]), "cpu")
    assert int(state.index) == 1
    with pytest.raises(RuntimeError, match="takes one timestep per call, but this batch mixes timesteps"):
        state.update(torch.tensor([900.0, 100.0]), "cpu")
    with torch.inference_mode():
        state.update(torch.tensor(900.0), "meta")  # (meta stands in for a first GPU call)
    assert not state.index.is_inference()
    state.update(torch.tensor(100.0), "meta")


@pytest.fixture(scope="module")
def tfmq_patched():
    """A tiny UNet patched with a TFMQ recipe at two timesteps (temporal feature cache on), the data,
    and each item's output from plain sequential calls."""
    import diffaccel

    model, data = model_and_data("unet", timesteps=(900, 100), per_timestep=1)
    recipe = calibrate(copy.deepcopy(model), data, method="tfmq", iters=1, progress=False)
    diffaccel.patch(model, quant=recipe, solver=False)
    return model, data, [run(model, d) for d in data]


def _step_state(model):
    return next(m.step_state for m in model.modules() if getattr(m, "step_state", None) is not None)


def test_a_call_nested_in_another_keeps_its_own_timestep(tfmq_patched):
    """One shared timestep index per model: a call made from a forward hook during another call (at
    another timestep) overwrote it, and the outer call finished with the inner one's scales and
    cached features (0.14 relative error, no warning)."""
    model, (at900, at100), (want900, want100) = tfmq_patched
    inner = []

    def nested(module, args, output):
        if not inner:
            inner.append(None)
            inner[0] = run(model, at100)

    handle = model.down_blocks[0].register_forward_hook(nested)
    try:
        got = run(model, at900)
    finally:
        handle.remove()
    assert torch.equal(inner[0], want100) and torch.equal(got, want900)
    assert _step_state(model).calls() == []


def test_two_threads_each_keep_their_own_timestep(tfmq_patched):
    """Two threads calling one patched model: thread A is held inside its call (after its first
    block) while thread B runs a whole call at another timestep, then A finishes. With one shared
    index A finished with B's timestep; each thread has its own now."""
    import threading

    model, (at900, at100), (want900, want100) = tfmq_patched
    inside, b_done, results = threading.Event(), threading.Event(), {}

    def hold(module, args, output):
        if threading.current_thread().name == "A" and not inside.is_set():
            inside.set()
            assert b_done.wait(60)

    def call(name, data, event=None):
        results[name] = run(model, data)
        if event is not None:
            event.set()

    handle = model.down_blocks[0].register_forward_hook(hold)
    try:
        a = threading.Thread(target=call, args=("A", at900), name="A")
        a.start()
        assert inside.wait(60)
        b = threading.Thread(target=call, args=("B", at100, b_done), name="B")
        b.start()
        b.join(60)
        a.join(60)
    finally:
        handle.remove()
    assert torch.equal(results["B"], want100) and torch.equal(results["A"], want900)


def test_a_failed_call_leaves_no_timestep_behind(tfmq_patched):
    model, (at900, at100), (want900, want100) = tfmq_patched

    def boom(module, args):
        raise RuntimeError("fails inside the backbone")

    handle = model.down_blocks[1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="fails inside the backbone"):
            run(model, at900)
    finally:
        handle.remove()
    assert _step_state(model).calls() == []
    assert torch.equal(run(model, at100), want100)
    with pytest.raises(RuntimeError, match="needs its `timestep` argument"):  # (raised inside the pre-hook)
        model(sample=at900["sample"], encoder_hidden_states=at900["encoder_hidden_states"])
    assert _step_state(model).calls() == []


def test_a_tfmq_patched_model_compiles_fullgraph(tfmq_patched):
    """torch.compile traces no thread-local state: inside it the index is the shared one, which
    every call writes; outputs equal eager."""
    model, data, want = tfmq_patched
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert all(torch.equal(run(compiled, d), w) for d, w in zip(data, want))


def test_calibrate_checks_its_flags_and_each_items_timestep():
    """bos="no" turned MixDQ's BOS path on and temporal_cache=None turned the cache off, silently;
    an item whose timestep tensor held [900, 100] was filed under 900; a numpy timestep was refused."""
    model, data = model_and_data("unet", timesteps=(900,), per_timestep=1)
    for kw in (dict(bos="no"), dict(temporal_cache=None), dict(adaround="no"), dict(progress="yes")):
        name = next(iter(kw))
        with pytest.raises(CalibrationError, match=f"{name}: expected True"):
            calibrate(model, data, method="tfmq", iters=1, **kw)
    mixed = [dict(data[0], timestep=torch.tensor([900.0, 100.0]))]
    with pytest.raises(CalibrationError, match=r"data: item 0's 'timestep' mixes timesteps"):
        calibrate(model, mixed, method="tfmq", iters=1, progress=False)  # (per-timestep parameters)
    numpy_t = [dict(data[0], timestep=np.float32(900))]
    assert calibrate(model, numpy_t, method="minmax", progress=False).timesteps.tolist() == [900.0]


def test_range_search_sample_keeps_the_outliers_a_uniform_sample_misses():
    """The Lp range search ran on a uniform sample of each layer's input (1024 values per call): one
    outlier token in 64k values was in it for some seeds and not others, so the clipping range, and
    TFMQ on PixArt without the temporal cache, depended on the seed (0.12 vs 0.018 relative error at
    t=900). The largest |x| are now kept exactly and the rest sampled with weights: the search picks
    what it picks on the whole input (or the next candidate), for every seed."""
    from diffaccel.quant.calibrate.common import act_init

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, sample, timestep, return_dict=True):
            return (self.lin(sample),)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4096, 16, generator=g)
    x[0, 1234, 5] = 40.0  # one outlier value (an outlier token's channel)
    data = [dict(sample=x, timestep=torch.tensor([900.0]))]
    calib = collect.from_backbone_data(data, num_timesteps=1, samples_per_timestep=None)
    whole = fakequant.search_act_range(x.reshape(-1), x.min(), x.max(), symmetric=False, p=2.4)[0]
    for seed in range(6):
        obs = collect.observe(Toy(), calib, layers=["lin"], device="cpu", progress=False, seed=seed)
        o = obs.layers["lin"]
        assert 40.0 in o.tails[0][0].tolist()
        values, weights = o.sample_of(0, 0)
        assert math.isclose(float(weights.sum()), x.numel(), rel_tol=0.05)  # the weights count the input
        scale, _ = act_init(obs, "lin", per_timestep=True, symmetric=False, search=True, p=2.4)
        # within one of the search's 20 candidate ratios (3.2% apart) of the whole-input choice
        assert abs(float(scale.reshape(())) / float(whole) - 1) < 0.04, (seed, float(scale), float(whole))


# -- per-timestep activation ranges, and the p of the Lp searches ---------------------------------

class _TimestepScaled(nn.Module):
    """A bare backbone whose one layer sees ``sample * timestep / 100``: its input range at each
    timestep is known exactly (timesteps 1600, 400, 100: the sample's range times 16, 4, 1)."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():  # (the same layer every time, and the global RNG left alone)
            torch.manual_seed(0)
            self.lin = nn.Linear(16, 16)

    def forward(self, sample, timestep, return_dict=True):
        return (self.lin(sample * (timestep.reshape(-1)[0] / 100)),)


_FACTORS = {1600.0: 16.0, 400.0: 4.0, 100.0: 1.0}  # powers of two: the scaled ranges are exact


def _timestep_scaled_data():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 2048, 16, generator=g) for _ in range(4)]
    xs[2][0, 1234, 5] = 40.0  # one outlier: the L2 search clips it (ratio ~0.84 on the whole input)
    data = [dict(sample=x, timestep=torch.tensor([t])) for t in _FACTORS for x in xs]
    return data, torch.cat([x.reshape(-1) for x in xs])


def _search_ratio(scale, lo, hi, symmetric):
    return float(scale) / float(fakequant.act_params_from_range(lo, hi, symmetric)[0])


def test_per_timestep_activation_ranges_are_each_timesteps_own():
    """TFMQ / Q-Diffusion per-timestep activation parameters: row t comes from timestep t's inputs.
    Filling row t from timestep t+1's min/max, or running row t's Lp search on every timestep's
    sample pooled, passed the whole calibration suite (every timestep silently got another's range)."""
    from diffaccel.quant.calibrate.common import act_init

    data, whole = _timestep_scaled_data()
    calib = collect.from_backbone_data(data, num_timesteps=3, samples_per_timestep=None)
    assert calib.timesteps.tolist() == [1600.0, 400.0, 100.0]
    obs = collect.observe(_TimestepScaled(), calib, layers=["lin"], device="cpu", progress=False)
    factors = [_FACTORS[t] for t in calib.timesteps.tolist()]
    for symmetric in (False, True):
        # min/max: each row is exactly its timestep's range
        s, z = act_init(obs, "lin", per_timestep=True, symmetric=symmetric, search=False, p=2.0)
        assert s.shape == (3,) and z.shape == (3,)
        for t, f in enumerate(factors):
            es, ez = fakequant.act_params_from_range(whole.min() * f, whole.max() * f, symmetric)
            assert float(s[t]) == float(es) and int(z[t]) == int(ez), (symmetric, t)
        # pooled over timesteps: the widest range (timestep 1600's)
        s1, _ = act_init(obs, "lin", per_timestep=False, symmetric=symmetric, search=False, p=2.0)
        assert float(s1.reshape(())) == float(s[0])
    # the Lp search (asymmetric, p=2): row t searches timestep t's range on timestep t's sample
    s, z = act_init(obs, "lin", per_timestep=True, symmetric=False, search=True, p=2.0)
    o = obs.layers["lin"]
    for t, f in enumerate(factors):
        lo, hi = whole.min() * f, whole.max() * f
        own, own_w = o.sample_of(t, 0)
        es, ez = fakequant.search_act_range(own, lo, hi, False, p=2.0, weights=own_w)
        assert float(s[t]) == float(es) and int(z[t]) == int(ez), t
        # and what the search picks on the whole input of that timestep, within two of its 20
        # candidate ratios (3.2% apart; the sample is a sample): the other timesteps' values pooled
        # in move it to 1.0 (t=100: all of them clipped) or to ~0.7 (t=1600: all of them small)
        ratio = _search_ratio(s[t], lo, hi, False)
        whole_ratio = _search_ratio(fakequant.search_act_range(whole * f, lo, hi, False, p=2.0)[0], lo, hi, False)
        assert whole_ratio < 0.9
        assert abs(ratio - whole_ratio) < 0.07, (t, ratio, whole_ratio)


def test_tfmq_recipe_holds_each_timesteps_searched_activation_range():
    """End to end: tfmq's per-timestep activation scales (iters=0: the initial Lp-searched ones) are
    act_init's per-timestep rows, in the recipe's timestep order, each its own timestep's range."""
    from diffaccel.quant.calibrate.common import act_init

    data, whole = _timestep_scaled_data()
    recipe = calibrate(_TimestepScaled(), data, method="tfmq", iters=0, p=2.0, progress=False)
    lr = recipe.layers["lin"]
    assert recipe.timesteps.tolist() == [1600.0, 400.0, 100.0]
    calib = collect.from_backbone_data(data, num_timesteps=3, samples_per_timestep=None,
                                       one_timestep_per_item=True)
    obs = collect.observe(_TimestepScaled(), calib, layers=["lin"], device="cpu", progress=False)
    s, z = act_init(obs, "lin", per_timestep=True, symmetric=False, search=True, p=2.0)
    # (the reconstruction keeps the scale as its log: exp(log(s)) is s to an ulp)
    assert torch.allclose(lr.act_scale.reshape(-1), s, rtol=1e-6, atol=0)
    assert torch.equal(lr.act_zero_point.reshape(-1), z)
    for t, ts in enumerate(recipe.timesteps.tolist()):
        f = _FACTORS[ts]
        lo, hi = whole.min() * f, whole.max() * f
        whole_ratio = _search_ratio(fakequant.search_act_range(whole * f, lo, hi, False, p=2.0)[0], lo, hi, False)
        assert abs(_search_ratio(lr.act_scale.reshape(-1)[t], lo, hi, False) - whole_ratio) < 0.07, t


def test_weight_lp_search_is_the_argmin_of_the_given_p():
    """search_weight_scale picks, per output channel, the candidate ratio whose |w - Q(w)|^p error is
    smallest for the p it is given (p=2 in place of p survived: the other test only checks the
    searched scale does not lose to absmax)."""
    g = torch.Generator().manual_seed(3)
    ratios = torch.linspace(1.0, 0.3, 40).tolist()  # the search's candidates
    picks = {}
    # a few outliers per channel, of varied size (int8 clips only on wide channels)
    for dtype, (cols, k, mult) in {"int4": (64, 3, 6), "int8": (2048, 2, 20)}.items():
        w = torch.randn(48, cols, generator=g)
        w[:, :k] *= torch.rand(48, k, generator=g) * mult + 1
        grid = fakequant.weight_grid(dtype)
        amax = w.abs().amax(dim=1)
        cands = torch.stack([(amax * r / grid.qmax).clamp(min=fakequant.SCALE_FLOOR) for r in ratios])  # [R, O]
        for p in (1.0, 2.0, 2.4, 4.0):
            errs = torch.stack([(w - grid.nearest(w / s[:, None]) * s[:, None]).abs().pow(p).sum(dim=1)
                                for s in cands])
            best = errs.argmin(dim=0)  # (first of equal minima, as the search keeps the first)
            expected = cands[best, torch.arange(w.shape[0])]
            got = fakequant.search_weight_scale(w, grid, p=p)
            assert torch.equal(got, expected), (dtype, p)
            picks[dtype, p] = best
        # the data tells the p values apart: another p would pick other ratios
        for p in (1.0, 2.4, 4.0):
            assert not torch.equal(picks[dtype, p], picks[dtype, 2.0]), (dtype, p)


def test_activation_lp_search_is_the_argmin_of_the_given_p():
    """search_act_range picks the candidate ratio with the smallest weighted mean |x - Q(x)|^p for
    the p it is given (p=1 in place of p survived)."""
    g = torch.Generator().manual_seed(4)
    ratios = torch.linspace(1.0, 0.4, 20).tolist()
    u = torch.rand(8192, generator=g) - 0.5
    laplace = -u.sign() * torch.log1p(-2 * u.abs())
    student_t3 = torch.randn(8192, generator=g) / (torch.randn(3, 8192, generator=g).pow(2).mean(0)).sqrt()
    cases = [laplace, torch.cat([torch.randn(8192, generator=g), torch.tensor([40.0, -7.0])]), student_t3]
    for i, x in enumerate(cases):
        weights = torch.rand(x.numel(), generator=g) * 3 + 0.5
        lo, hi = x.min(), x.max()
        for symmetric in (False, True):
            picks = {}
            for p in (1.0, 2.4, 4.0):
                errs = []
                for r in ratios:
                    s, z = fakequant.act_params_from_range(lo * r, hi * r, symmetric)
                    e = (x - fakequant.fake_quant_act(x, s, z)).abs().pow(p) * weights
                    errs.append(e.sum().item() / weights.sum().item())
                best = min(range(len(ratios)), key=lambda k: (errs[k], k))
                es, ez = fakequant.act_params_from_range(lo * ratios[best], hi * ratios[best], symmetric)
                gs, gz = fakequant.search_act_range(x, lo, hi, symmetric, p=p, weights=weights)
                assert float(gs) == float(es) and int(gz) == int(ez), (i, symmetric, p)
                picks[p] = best
            assert picks[2.4] != picks[1.0] and picks[4.0] != picks[1.0], (i, symmetric, picks)


@pytest.mark.parametrize("method", ["qdiffusion", "tfmq", "mixdq"])
def test_methods_hand_their_p_to_the_scale_searches(method, monkeypatch):
    """calibrate(p=...) reaches every Lp search a method runs (qdiffusion / tfmq: weights and
    activations; mixdq: activations, its weights are min/max): qdiffusion searching its weights
    with p=2.0 whatever p was given survived."""
    from diffaccel.quant.calibrate import common

    seen = {"weight": [], "act": []}
    real_w, real_a = fakequant.search_weight_scale, common.search_act_range

    def weight_search(*args, p, **kw):
        seen["weight"].append(p)
        return real_w(*args, p=p, **kw)

    def act_search(*args, p, **kw):
        seen["act"].append(p)
        return real_a(*args, p=p, **kw)

    monkeypatch.setattr(fakequant, "search_weight_scale", weight_search)
    monkeypatch.setattr(common, "search_act_range", act_search)
    data, _ = _timestep_scaled_data()
    data = data[::4]  # one item per timestep
    recipe = calibrate(_TimestepScaled(), data, method=method, iters=0, p=3.25, sensitivity_samples=1,
                       progress=False)
    assert recipe.meta["p"] == 3.25
    assert seen["act"] and set(seen["act"]) == {3.25}, seen
    if method == "mixdq":
        assert seen["weight"] == []
    else:
        assert seen["weight"] and set(seen["weight"]) == {3.25}, seen
