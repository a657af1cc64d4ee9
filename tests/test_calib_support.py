"""Shared fixtures of the calibration tests (tiny models with random init, calibration data, a tiny
text-to-image pipeline) and the pipeline-collection tests."""
import copy

import pytest
import torch
from torch import nn

TEXT_DIM = 32
TOKENS = 6


def tiny_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=8).eval()


def tiny_pixart(seed=0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                    num_layers=2, cross_attention_dim=32, sample_size=8, patch_size=2,
                                    caption_channels=TEXT_DIM, norm_num_groups=8).eval()


def bos_embedding(seed=123):
    """A CLIP-like BOS output: the same for every prompt, large magnitude."""
    return torch.randn(TEXT_DIM, generator=torch.Generator().manual_seed(seed)) * 25


def text_states(batch, generator, bos=True):
    ehs = torch.randn(batch, TOKENS, TEXT_DIM, generator=generator)
    if bos:
        ehs[:, 0] = bos_embedding()
    return ehs


def backbone_data(kind, timesteps=(900, 500, 100), per_timestep=2, batch=2, seed=0, bos=True):
    """Forward-kwargs dicts for a bare backbone, ``per_timestep`` of them at each timestep."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for t in timesteps:
        for _ in range(per_timestep):
            x = torch.randn(batch, 4, 8, 8, generator=g)
            ehs = text_states(batch, g, bos)
            ts = torch.full((batch,), float(t))
            if kind == "unet":
                items.append(dict(sample=x, timestep=ts, encoder_hidden_states=ehs))
            else:
                items.append(dict(hidden_states=x, timestep=ts, encoder_hidden_states=ehs,
                                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}))
    return items


def model_and_data(kind, **kw):
    return (tiny_unet() if kind == "unet" else tiny_pixart()), backbone_data(kind, **kw)


def run(model, kwargs):
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]


def snapshot(model: nn.Module):
    """Parameters, buffers and module types: what a failing/finished calibration must not change."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()}, {n: m.training for n, m in model.named_modules()})


def assert_unchanged(model: nn.Module, snap):
    state, types, training = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: m.training for n, m in model.named_modules()} == training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def apply_recipe(model: nn.Module, recipe):
    """What diffaccel.patch does with a recipe: swap the modules, install the runtime hooks."""
    new, installers, skipped = recipe.build_modules(model)
    for name, module in new.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    removers = [install(model) for install in installers]
    return new, removers, skipped


# -- a tiny text-to-image pipeline: the backbone is called by the pipeline's own scheduler loop --

def tiny_pipeline(num_train_timesteps=1000, split_cfg=False):
    from diffusers import DDIMScheduler, DiffusionPipeline

    class TinyTextToImagePipeline(DiffusionPipeline):
        def __init__(self, unet, scheduler):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)

        def encode(self, prompts):
            rows = []
            for p in prompts:
                g = torch.Generator().manual_seed(sum(map(ord, p)) + 7)
                rows.append(text_states(1, g)[0])
            return torch.stack(rows)

        @torch.no_grad()
        def __call__(self, prompt, num_inference_steps=10, generator=None, output_type="latent",
                     guidance_scale=3.0):
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            cond, uncond = self.encode(prompts), self.encode([""] * len(prompts))
            latents = torch.randn(len(prompts), 4, 8, 8, generator=generator)
            self.scheduler.set_timesteps(num_inference_steps)
            for t in self.scheduler.timesteps:
                if split_cfg:  # two backbone calls per step (Wan, true-CFG Flux / QwenImage, modular guiders)
                    e_c = self.unet(latents, t, encoder_hidden_states=cond).sample
                    e_u = self.unet(latents, t, encoder_hidden_states=uncond).sample
                else:
                    eps = self.unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                    e_u, e_c = eps.chunk(2)
                latents = self.scheduler.step(e_u + guidance_scale * (e_c - e_u), t, latents).prev_sample
            return latents

    return TinyTextToImagePipeline(tiny_unet(), DDIMScheduler(num_train_timesteps=num_train_timesteps))


# -- tests of the pipeline path ----------------------------------------------------------

def test_pipeline_collection_spreads_timesteps_over_the_trajectory():
    from diffaccel.quant.calibrate.collect import from_pipeline, spread_indices

    pipe = tiny_pipeline()
    calib = from_pipeline(pipe, ["a cat", "a dog"], num_inference_steps=10, num_timesteps=4,
                          samples_per_timestep=None, seed=0, batch_size=1, pipe_kwargs={}, progress=False)
    pipe.scheduler.set_timesteps(10)
    schedule = pipe.scheduler.timesteps.double()
    assert torch.equal(calib.schedule, schedule)  # recorded from the pipeline's own scheduler
    assert spread_indices(10, 4) == [0, 3, 6, 9]
    assert calib.timesteps.tolist() == schedule[[0, 3, 6, 9]].tolist()  # first and last step included
    assert len(calib) == 8 and calib.t_index == [0, 0, 1, 1, 2, 2, 3, 3]  # one sample per prompt
    for s, ti in zip(calib.samples, calib.t_index):
        assert float(s["timestep"]) == calib.timesteps[ti]
        assert s["sample"].shape == (2, 4, 8, 8)  # the CFG batch the pipeline actually ran


def test_pipeline_calling_its_backbone_twice_a_step_keeps_both_calls_per_timestep():
    """Conditional and unconditional passes as two backbone calls per step: the calls are grouped
    by timestep (they used to be grouped by call index, which listed each timestep twice and kept
    only the unconditional call's inputs)."""
    from diffaccel.quant.calibrate.collect import from_pipeline

    pipe = tiny_pipeline(split_cfg=True)
    calib = from_pipeline(pipe, ["a cat", "a dog"], num_inference_steps=3, num_timesteps=10,
                          samples_per_timestep=None, seed=0, batch_size=1, pipe_kwargs={}, progress=False)
    pipe.scheduler.set_timesteps(3)
    assert calib.timesteps.tolist() == pipe.scheduler.timesteps.double().tolist()
    assert torch.equal(calib.schedule, pipe.scheduler.timesteps.double())
    assert calib.t_index == [0] * 4 + [1] * 4 + [2] * 4  # 2 prompts x (cond, uncond) per timestep
    uncond = pipe.encode([""])
    is_uncond = [bool(torch.equal(s["encoder_hidden_states"], uncond)) for s in calib.samples]
    assert sum(is_uncond) == 6 and len({id(s) for s in calib.samples}) == 12


def test_tfmq_cache_calibrated_on_part_of_the_schedule_is_refused():
    """A temporal feature cache holds the calibrated timesteps only: calibrated on 2 of the 4
    steps a pipeline runs, the recipe could not sample that schedule (it failed at sampling time);
    calibrate says so before reconstruction. temporal_cache=False takes any schedule."""
    from diffaccel.quant.calibrate import CalibrationError, calibrate

    pipe = tiny_pipeline()
    with pytest.raises(CalibrationError, match="^temporal_cache: .* covers 2 of the 4 timesteps"):
        calibrate(pipe, ["a cat"], method="tfmq", num_inference_steps=4, num_timesteps=2, iters=1,
                  progress=False)


def _two_expert_pipeline(boundary=500):
    """Wan 2.2 A14B's scheme on tiny UNets: ``transformer`` denoises at t >= boundary,
    ``transformer_2`` below it."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    base = type(tiny_pipeline())

    class TwoExperts(DiffusionPipeline):
        encode = base.encode

        def __init__(self, transformer, transformer_2, scheduler):
            super().__init__()
            self.register_modules(transformer=transformer, transformer_2=transformer_2, scheduler=scheduler)

        @torch.no_grad()
        def __call__(self, prompt, num_inference_steps=10, generator=None, output_type="latent"):
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            cond = self.encode(prompts)
            latents = torch.randn(len(prompts), 4, 8, 8, generator=generator)
            self.scheduler.set_timesteps(num_inference_steps)
            for t in self.scheduler.timesteps:
                expert = self.transformer if t >= boundary else self.transformer_2
                latents = self.scheduler.step(expert(latents, t, encoder_hidden_states=cond).sample, t,
                                              latents).prev_sample
            return latents

    return TwoExperts(tiny_unet(seed=0), tiny_unet(seed=1), DDIMScheduler())


def test_calibrate_the_second_expert_of_a_pipeline():
    import diffaccel
    from diffaccel.quant.calibrate import CalibrationError, calibrate

    pipe = _two_expert_pipeline()
    kw = dict(method="minmax", num_inference_steps=6, progress=False)
    high = calibrate(pipe, ["a cat"], **kw)  # default: the pipeline's `transformer`
    low = calibrate(pipe, ["a cat"], backbone="transformer_2", **kw)
    assert high.timesteps.min() >= 500 and low.timesteps.max() < 500  # each saw only its own steps
    assert len(high.timesteps) + len(low.timesteps) == 6
    report = diffaccel.patch(pipe, quant={"transformer": high, "transformer_2": low}, solver=False)
    assert {r.name.split(".")[0] for r in report.by_part("quant")} == {"transformer", "transformer_2"}
    assert torch.isfinite(pipe("a cat", num_inference_steps=6, generator=torch.Generator().manual_seed(0))).all()
    diffaccel.unpatch(pipe)
    with pytest.raises(CalibrationError, match="backbone: TwoExperts has no module component 'unet_2'"):
        calibrate(pipe, ["a cat"], backbone="unet_2", **kw)
    with pytest.raises(CalibrationError, match="backbone: names a pipeline component"):
        calibrate(pipe.transformer, [{}], backbone="transformer", **kw)


def test_calibrate_pipeline_end_to_end_and_patch():
    from diffaccel.nn import QuantConv2d, QuantLinear
    from diffaccel.quant.calibrate import calibrate

    pipe = tiny_pipeline()
    snap = snapshot(pipe.unet)
    recipe = calibrate(pipe, ["a red cube", "a blue ball"], method="tfmq", weight_bits=8, act_bits=8,
                       num_inference_steps=3, iters=2, progress=False)
    assert_unchanged(pipe.unet, snap)
    pipe.scheduler.set_timesteps(3)
    assert recipe.timesteps.tolist() == pipe.scheduler.timesteps.double().tolist()  # tfmq: every step
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    pipe("a red cube", num_inference_steps=3, generator=torch.Generator().manual_seed(5))
    handle.remove()
    with torch.no_grad():
        reference = [pipe.unet(*a, **k).sample for a, k in calls]
    new, removers, _ = apply_recipe(pipe.unet, recipe)
    assert sum(isinstance(m, (QuantLinear, QuantConv2d)) for m in pipe.unet.modules()) == len(recipe.layers)
    with torch.no_grad():  # every step of the run, through the real quantized layers
        for (a, k), ref in zip(calls, reference):
            out = pipe.unet(*a, **k).sample
            rel = ((out - ref).norm() / ref.norm()).item()
            assert rel < 0.15, rel  # W8A8 on a random-init UNet
    assert torch.isfinite(pipe("a red cube", num_inference_steps=3, generator=torch.Generator().manual_seed(5))).all()
    for r in removers:
        r()


def test_empty_prompt_list_is_an_error_and_leaves_the_pipeline_alone():
    from diffaccel.quant.calibrate import CalibrationError, calibrate

    pipe = tiny_pipeline()
    snap = snapshot(pipe.unet)
    with pytest.raises(CalibrationError, match="data: empty"):
        calibrate(pipe, [], method="minmax", weight_bits=8, act_bits=8, progress=False)
    assert_unchanged(pipe.unet, snap)


@pytest.mark.parametrize("fail", [False, True])
def test_calibrating_a_pipeline_leaves_its_scheduler_as_it_was(fail):
    """The recording run set the user's scheduler to the calibration's schedule (3 steps here) and
    left it there, mid-trajectory when the run failed. Its state is put back either way."""
    from diffaccel.quant.calibrate import calibrate

    pipe = tiny_pipeline()
    s = pipe.scheduler
    s.set_timesteps(7)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in s.__dict__.items()}
    calls = [0]

    def boom(module, args):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("fails in the second backbone call")

    handle = pipe.unet.mid_block.register_forward_pre_hook(boom) if fail else None
    try:
        if fail:
            with pytest.raises(RuntimeError, match="second backbone call"):
                calibrate(pipe, ["a digit"], method="minmax", num_inference_steps=3, progress=False)
        else:
            calibrate(pipe, ["a digit"], method="minmax", num_inference_steps=3, progress=False)
    finally:
        if handle is not None:
            handle.remove()
    assert s.__dict__.keys() == before.keys()
    for k, v in before.items():
        now = s.__dict__[k]
        assert torch.equal(now, v) if isinstance(v, torch.Tensor) else now == v, k
    assert s.num_inference_steps == 7 and len(s.timesteps) == 7
