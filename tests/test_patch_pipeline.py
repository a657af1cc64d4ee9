"""diffaccel.patch on a diffusers pipeline: backbone and scheduler patched together, text encoder
left alone, unpatch bit-exact, and a calibrated recipe applied through patch."""
import re

import pytest
import torch

import diffaccel
from diffaccel.integrations import reference as ref

PROMPTS = ["a handwritten digit three", "a handwritten digit seven"]
# fp32 on CPU: fused attention (torch reference) and the fused solver step differ from diffusers
# only by rounding order. Random-weight backbones blow latents up to ~1e5, so the bound is
# relative: measured 7e-7 (attention) and 2e-7 (solver) relative L2 over 8 DPM-Solver++ steps.
FP32_REL_L2 = 1e-5


def _rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


def _pipeline(kind="unet", seed=0):
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    backbone = ref.build_unet() if kind == "unet" else ref.build_dit()
    tokenizer = ref.load_tokenizer()
    text_encoder = CLIPTextModel.from_pretrained(str(ref.ASSETS_DIR / "text_encoder"))
    pipe = ref.DigitsPipeline(text_encoder=text_encoder, tokenizer=tokenizer, scheduler=ref.sampling_scheduler(),
                              **({"unet": backbone} if kind == "unet" else {"transformer": backbone}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, steps=8):
    g = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=3.0, generator=g, output_type="latent")


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_pipeline_patch_matches_and_unpatches(kind):
    pipe = _pipeline(kind)
    before = _sample(pipe)
    report = diffaccel.patch(pipe)
    assert report.by_part("attention") and report.by_part("solver"), str(report)
    assert any(s.name == "text_encoder" for s in report.skipped)
    assert diffaccel.solvers.is_patched(pipe.scheduler)
    after = _sample(pipe)
    assert _rel_l2(after, before) < FP32_REL_L2
    diffaccel.unpatch(pipe)
    assert not diffaccel.solvers.is_patched(pipe.scheduler)
    assert torch.equal(_sample(pipe), before)


def _backbone_inputs(pipe, t=999):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, ref.IMAGE_SIZE, ref.IMAGE_SIZE, generator=g)
    return dict(sample=x, timestep=torch.tensor([t, t]), encoder_hidden_states=pipe.encode_prompt(PROMPTS, "cpu"))


def _prediction(pipe):
    with torch.no_grad():
        return pipe.unet(**_backbone_inputs(pipe)).sample


def test_pipeline_with_calibrated_recipe(tmp_path):
    pipe = _pipeline("unet")
    before, pred_before = _sample(pipe), _prediction(pipe)
    # Calibrated on the backbone's own inputs. (A pipeline-collected minmax recipe of a random-weight
    # UNet is dominated by its late latents, which grow to ~1e5: fine for the mechanics, which
    # tests/test_calib_* cover, but no accuracy yardstick.)
    recipe = diffaccel.calibrate(pipe.unet, [_backbone_inputs(pipe)], method="minmax", weight_bits=8, act_bits=8,
                                 progress=False)
    recipe.save(tmp_path / "recipe")
    loaded = diffaccel.QuantRecipe.load(tmp_path / "recipe")
    report = diffaccel.patch(pipe, quant=loaded)
    quantized = report.by_part("quant")
    assert quantized and report.by_part("solver")
    assert all(type(pipe.unet.get_submodule(r.name.split(".", 1)[1])).__name__.startswith(("Quant", "BOS", "Fused"))
               for r in quantized)
    _sample(pipe)  # the whole loop runs through the quantized layers and the fused step
    rel = _rel_l2(_prediction(pipe), pred_before)
    assert rel < 0.05, rel  # W8A8, static per-tensor minmax activations, on the calibration inputs
    diffaccel.unpatch(pipe)
    assert torch.equal(_sample(pipe), before)


def test_recipe_for_another_model_is_refused_and_model_untouched():
    unet_pipe, dit_pipe = _pipeline("unet"), _pipeline("dit")
    recipe = diffaccel.calibrate(unet_pipe, PROMPTS[:1], method="minmax", weight_bits=8, act_bits=8,
                                 num_inference_steps=2, progress=False)
    before = dict(dit_pipe.transformer.named_modules())
    with pytest.raises(ValueError, match="recipe"):
        diffaccel.patch(dit_pipe, quant=recipe)
    assert dict(dit_pipe.transformer.named_modules()) == before
    assert not diffaccel.is_patched(dit_pipe) and not diffaccel.solvers.is_patched(dit_pipe.scheduler)


def test_pipeline_folds_guidance_into_the_patched_step(monkeypatch):
    pipe = _pipeline("unet")
    diffaccel.patch(pipe, attention=False)
    calls = {"guided": 0, "plain": 0}
    guided, plain = pipe.scheduler.step_with_guidance, pipe.scheduler.step
    monkeypatch.setattr(pipe.scheduler, "step_with_guidance",
                        lambda *a, **k: calls.__setitem__("guided", calls["guided"] + 1) or guided(*a, **k))
    monkeypatch.setattr(pipe.scheduler, "step",
                        lambda *a, **k: calls.__setitem__("plain", calls["plain"] + 1) or plain(*a, **k))
    _sample(pipe, steps=4)
    assert calls == {"guided": 4, "plain": 0}


def test_patch_again_takes_a_scheduler_assigned_since():
    from diffusers import HeunDiscreteScheduler, UniPCMultistepScheduler

    from diffaccel import solvers

    pipe = _pipeline("unet")
    report = diffaccel.patch(pipe, attention=False)
    first = pipe.scheduler
    pipe.scheduler = UniPCMultistepScheduler.from_config(first.config)
    reference = _sample(pipe)  # diffusers' step until patched
    assert not solvers.is_patched(pipe.scheduler)
    assert diffaccel.patch(pipe, attention=False) is report
    assert solvers.is_patched(pipe.scheduler) and solvers.is_patched(first)
    assert [r.before for r in report.by_part("solver")] == ["UniPCMultistepScheduler"]
    assert _rel_l2(_sample(pipe), reference) < FP32_REL_L2
    # one diffaccel does not take: the report stops claiming the fused step
    pipe.scheduler = HeunDiscreteScheduler.from_config(first.config)
    diffaccel.patch(pipe, attention=False)
    assert not report.by_part("solver") and any(s.name == "scheduler" for s in report.skipped)
    diffaccel.unpatch(pipe)
    assert not solvers.is_patched(first)


def test_patch_scheduler_public_api():
    pipe = _pipeline("unet")
    res = diffaccel.patch_scheduler(pipe.scheduler)
    assert res.patched, res.reason
    assert diffaccel.unpatch_scheduler(pipe.scheduler)


def _unipc_pipeline():
    from diffusers import UniPCMultistepScheduler

    pipe = _pipeline("unet")
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe


def test_patch_passes_dc_solver_options_to_the_scheduler():
    from diffaccel import solvers

    ratios = [1.0, 1.0, 0.97, 1.02, 0.99, 1.0]
    pipe = _unipc_pipeline()
    report = diffaccel.patch(pipe, attention=False, solver={"dc_ratios": ratios})
    assert any(r.part == "solver" for r in report.replaced)
    assert diffaccel.patch(pipe, attention=False, solver={"dc_ratios": tuple(ratios)}) is report  # same options
    with pytest.raises(ValueError, match="already patched with other options"):
        diffaccel.patch(pipe, attention=False, solver={"dc_ratios": [1.0] * 6})
    got = _sample(pipe, steps=6)
    # the same ratios given to patch_scheduler directly
    direct = _unipc_pipeline()
    solvers.patch_scheduler(direct.scheduler, dc_ratios=ratios)
    assert torch.equal(got, _sample(direct, steps=6))
    # and they change the trajectory (the option is not ignored)
    plain = _unipc_pipeline()
    diffaccel.patch(plain, attention=False)
    assert not torch.equal(got, _sample(plain, steps=6))
    diffaccel.unpatch(pipe)
    assert not solvers.is_patched(pipe.scheduler)


def test_patch_solver_options_errors_leave_the_pipeline_unpatched():
    from diffaccel import solvers

    pipe = _pipeline("unet")  # DPM-Solver++: DC-Solver applies to UniPC only
    # patch_scheduler's errors name the option as the caller passed it (they said "dc_ratios:", "seed:")
    with pytest.raises(ValueError, match=r"^solver\['dc_ratios'\]: DPMSolverMultistepScheduler has no predictor"):
        diffaccel.patch(pipe, attention=False, solver={"dc_ratios": [1.0] * 4})
    assert not solvers.is_patched(pipe.scheduler) and not diffaccel.is_patched(pipe)
    with pytest.raises(ValueError, match=r"^solver\['noise'\]: expected 'generator' or 'philox', got 'x'"):
        diffaccel.patch(pipe, solver={"noise": "x"})
    with pytest.raises(ValueError, match=r"^solver\['seed'\]: only used with noise='philox'"):
        diffaccel.patch(pipe, solver={"seed": 3})
    assert not solvers.is_patched(pipe.scheduler) and not diffaccel.is_patched(pipe)
    with pytest.raises(ValueError, match=r"solver: unknown option\(s\) \['eta'\]"):
        diffaccel.patch(pipe, solver={"eta": 0.5})
    with pytest.raises(ValueError, match=r"^solver\['dc_ratios'\]: expected a sequence of floats"):
        diffaccel.patch(pipe, solver={"dc_ratios": "fast"})
    pipe = _unipc_pipeline()
    solvers.patch_scheduler(pipe.scheduler)
    with pytest.raises(ValueError, match="solver: the scheduler is already patched by patch_scheduler"):
        diffaccel.patch(pipe, attention=False, solver={"dc_ratios": [1.0] * 4})
    assert not diffaccel.is_patched(pipe)


def test_patch_passes_philox_noise_options():
    from diffusers import EulerAncestralDiscreteScheduler

    from diffaccel import solvers

    pipe = _pipeline("unet")
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    diffaccel.patch(pipe, attention=False, solver={"noise": "philox", "seed": 7})
    pipe.scheduler.set_timesteps(4)
    assert solvers.noise_state(pipe.scheduler)[0] == 7


def _two_expert_pipeline():
    """Wan 2.2 A14B's layout: two denoisers of one architecture (``transformer``, ``transformer_2``)."""
    import tiny_models
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    class TwoExperts(DiffusionPipeline):
        def __init__(self, transformer, transformer_2, scheduler):
            super().__init__()
            self.register_modules(transformer=transformer, transformer_2=transformer_2, scheduler=scheduler)

    (high, inputs), (low, _) = tiny_models.wan(seed=0), tiny_models.wan(seed=1)
    return TwoExperts(high, low, FlowMatchEulerDiscreteScheduler()), inputs


def test_both_experts_of_a_two_backbone_pipeline_are_patched():
    import tiny_models

    pipe, inputs = _two_expert_pipeline()
    refs = [tiny_models.output_of(m, inputs) for m in (pipe.transformer, pipe.transformer_2)]
    report = diffaccel.patch(pipe, quant="w8a8")
    for attr in ("transformer", "transformer_2"):
        assert any(r.name.startswith(f"{attr}.") for r in report.by_part("quant")), attr
        assert any(r.name.startswith(f"{attr}.") for r in report.by_part("attention")), attr
    diffaccel.unpatch(pipe)
    assert all(torch.equal(tiny_models.output_of(m, inputs), r)
               for m, r in zip((pipe.transformer, pipe.transformer_2), refs))


def test_recipes_per_backbone_through_a_dict():
    """A recipe belongs to one backbone: one recipe for two experts is refused upfront; a dict gives
    each its own (a recipe of the other expert fails the weights check, naming the layer); a
    backbone the dict leaves out is reported and stays in floating point."""
    pipe, inputs = _two_expert_pipeline()
    data = [dict(inputs)]
    r_high = diffaccel.calibrate(pipe.transformer, data, method="minmax", progress=False)
    r_low = diffaccel.calibrate(pipe.transformer_2, data, method="minmax", progress=False)
    with pytest.raises(ValueError, match=r"quant: a recipe is calibrated for one backbone and this pipeline has 2 "
                                         r"\(transformer, transformer_2\); pass a dict"):
        diffaccel.patch(pipe, quant=r_high)
    with pytest.raises(ValueError, match=r"recipe: layer '.*' has other weights"):
        diffaccel.patch(pipe, quant={"transformer": r_high, "transformer_2": r_high})
    assert not diffaccel.is_patched(pipe)
    assert not any(type(m).__name__.startswith("Quant") for m in pipe.transformer.modules())
    with pytest.raises(ValueError, match=r"quant: \['unet'\] are not backbones of this pipeline"):
        diffaccel.patch(pipe, quant={"unet": "w8a8"})
    with pytest.raises(ValueError, match=r"quant\['transformer'\]: unknown preset 'w9a9'"):
        diffaccel.patch(pipe, quant={"transformer": "w9a9"})
    with pytest.raises(TypeError, match="quant: a dict maps a pipeline's backbone names"):
        diffaccel.patch(pipe.transformer, quant={"transformer": "w8a8"})

    report = diffaccel.patch(pipe, quant={"transformer": r_high, "transformer_2": r_low})
    assert {r.name.split(".")[0] for r in report.by_part("quant")} == {"transformer", "transformer_2"}
    diffaccel.unpatch(pipe)
    report = diffaccel.patch(pipe, quant={"transformer_2": "w8a8"}, solver=False)
    assert {r.name.split(".")[0] for r in report.by_part("quant")} == {"transformer_2"}
    assert any(s.name == "transformer" and s.reason == "backbone not in the quant dict" for s in report.skipped)
    assert diffaccel.patch(pipe, quant={"transformer_2": "w8a8"}, solver=False) is report  # idempotent


def test_every_other_component_is_reported_left_alone():
    """Modules of the pipeline that are not backbones (text encoder, a ControlNet, ...) are listed
    in the report with how to include them, never skipped silently."""
    import tiny_models
    from diffusers import ControlNetModel, DDIMScheduler, DiffusionPipeline

    class WithControlNet(DiffusionPipeline):
        def __init__(self, unet, controlnet, scheduler):
            super().__init__()
            self.register_modules(unet=unet, controlnet=controlnet, scheduler=scheduler)

    unet, _ = tiny_models.unet_sd15()
    pipe = WithControlNet(unet, ControlNetModel.from_unet(unet), DDIMScheduler())
    report = diffaccel.patch(pipe, quant="w8a8")
    left = {s.name: s.reason for s in report.skipped if s.part == "component"}
    assert left == {"controlnet": "ControlNet left alone (patch pipe.controlnet directly to include it)"}
    assert not any(r.name.startswith("controlnet") for r in report.replaced)
    assert "ControlNet left alone" in str(report)
    diffaccel.patch(pipe.controlnet, quant="w8a8")  # and it can be patched directly
    assert any(type(m).__name__ == "QuantLinear" for m in pipe.controlnet.modules())


def test_save_pretrained_of_a_quantized_patch_refuses_before_writing(tmp_path):
    """A quantized backbone's checkpoint would hold low-bit buffers diffusers cannot load back (the
    reloaded model's float weights were left on the meta device): save_pretrained on the patched
    pipeline or its backbone refuses before writing a file. Attention-only patches save as usual
    (nothing in the state dict changes), and after unpatch the float model saves and reloads."""
    pipe = _pipeline("unet")
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    diffaccel.patch(pipe, quant="w8a8")
    for owner, where in ((pipe, tmp_path / "pipe"), (pipe.unet, tmp_path / "unet")):
        with pytest.raises(RuntimeError, match=r"save_pretrained: \S+ is a diffaccel quantized layer, .* nothing "
                                               r"was written"):
            owner.save_pretrained(where)
        assert not where.exists()
    diffaccel.unpatch(pipe)
    assert "save_pretrained" not in vars(pipe) and "save_pretrained" not in vars(pipe.unet)

    diffaccel.patch(pipe)  # attention and solver only
    assert "save_pretrained" not in vars(pipe.unet)
    pipe.unet.save_pretrained(tmp_path / "unet")
    diffaccel.unpatch(pipe)
    reloaded = type(pipe.unet).from_pretrained(tmp_path / "unet").state_dict()
    assert reloaded.keys() == original.keys() and all(torch.equal(reloaded[k], v) for k, v in original.items())


def test_save_of_a_pipeline_whose_backbone_alone_was_patched_says_what_it_wrote(tmp_path):
    """Only the backbone patched: the pipeline's save_pretrained writes the components before it,
    then the backbone's guard raised saying "nothing was written". It now says what was."""
    pipe = _pipeline("unet")
    diffaccel.patch(pipe.unet, quant="w8a8")
    with pytest.raises(RuntimeError, match=r"nothing of it was written, but \w+\.save_pretrained, which is not "
                                           r"patched itself, has written the components it saved before this one"):
        pipe.save_pretrained(tmp_path / "pipe")
    with pytest.raises(RuntimeError, match="nothing was written"):
        pipe.unet.save_pretrained(tmp_path / "unet")
    assert not (tmp_path / "unet").exists()


def test_perturbed_attention_guidance_pipeline():
    """diffusers' PAG pipelines set their own processors on the chosen layers for each call and put the
    previous ones back after it: on a patched pipeline those layers run PAG's processors for the call
    and diffaccel's again afterwards. fp32: the same bound as the plain pipeline."""
    from diffusers import AutoencoderKL, StableDiffusionPAGPipeline
    from transformers import CLIPTextModel

    def make():
        torch.manual_seed(0)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=1, block_out_channels=(8,),
                            norm_num_groups=8, down_block_types=("DownEncoderBlock2D",),
                            up_block_types=("UpDecoderBlock2D",))
        pipe = StableDiffusionPAGPipeline(
            vae=vae, text_encoder=CLIPTextModel.from_pretrained(str(ref.ASSETS_DIR / "text_encoder")),
            tokenizer=ref.load_tokenizer(), unet=ref.build_unet(), scheduler=ref.sampling_scheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False, pag_applied_layers=["up"])
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample(pipe):
        return pipe(PROMPTS[:1], num_inference_steps=4, guidance_scale=3.0, pag_scale=2.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0), height=ref.IMAGE_SIZE, width=ref.IMAGE_SIZE).images

    expected = sample(make())
    pipe = make()
    diffaccel.patch(pipe)
    assert _rel_l2(sample(pipe), expected) < FP32_REL_L2
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"DiffaccelAttnProcessor"}
    diffaccel.unpatch(pipe)
    assert torch.equal(sample(pipe), expected)


def _modular_denoise(blocks_cls, **components):
    """The denoise part of a diffusers modular pipeline (built from blocks, not a DiffusionPipeline)
    holding the given components."""
    pipe = blocks_cls().sub_blocks["denoise"].init_pipeline()
    pipe.update_components(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_modular_pipelines_are_patched_like_classic_ones(tmp_path):
    """A ModularPipeline (diffusers' block-built pipelines) is a pipeline target: its backbone and
    scheduler are patched, its guider (CFG run as two backbone calls) is untouched. SDXL with
    DPM-Solver++ and classifier-free guidance through the guider component, W8A8; Flux's
    FlowMatch denoise, attention only. unpatch is bit-exact; a quantized patch refuses
    save_pretrained before writing."""
    pytest.importorskip("diffusers.modular_pipelines")
    import tiny_models
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.modular_pipelines import FluxAutoBlocks, StableDiffusionXLAutoBlocks

    unet, _ = tiny_models.unet_sdxl()
    pipe = _modular_denoise(StableDiffusionXLAutoBlocks, unet=unet, scheduler=DPMSolverMultistepScheduler(),
                            guider=ClassifierFreeGuidance(guidance_scale=5.0))
    g = torch.Generator().manual_seed(3)
    cond = dict(prompt_embeds=torch.randn(1, 7, 32, generator=g), negative_prompt_embeds=torch.randn(1, 7, 32, generator=g),
                pooled_prompt_embeds=torch.randn(1, 32, generator=g),
                negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g))

    def sdxl():
        return pipe(**cond, height=64, width=64, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                    output="latents")

    before = sdxl()
    report = diffaccel.patch(pipe, quant="w8a8")
    assert report.by_part("attention") and report.by_part("quant") and report.by_part("solver"), str(report)
    assert diffaccel.solvers.is_patched(pipe.scheduler)
    assert isinstance(pipe.unet.down_blocks[1].attentions[0].proj_in, diffaccel.nn.QuantLinear)
    # the tiny UNet's W8A8 error through 5 steps with guidance: measured 0.039
    assert _rel_l2(sdxl(), before) < 0.06
    with pytest.raises(RuntimeError, match="save_pretrained: .* nothing was written"):
        pipe.save_pretrained(tmp_path / "modular")
    assert not (tmp_path / "modular").exists()
    diffaccel.unpatch(pipe)
    assert not diffaccel.solvers.is_patched(pipe.scheduler) and "save_pretrained" not in vars(pipe)
    assert torch.equal(sdxl(), before)

    transformer, inputs = tiny_models.flux()
    pipe = _modular_denoise(FluxAutoBlocks, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())

    def flux():
        return pipe(prompt_embeds=inputs["encoder_hidden_states"], pooled_prompt_embeds=inputs["pooled_projections"],
                    height=32, width=32, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                    output="latents")

    before = flux()
    report = diffaccel.patch(pipe)
    assert len(report.by_part("attention")) == 2 and diffaccel.solvers.is_patched(pipe.scheduler), str(report)
    assert _rel_l2(flux(), before) < FP32_REL_L2
    diffaccel.unpatch(pipe)
    assert torch.equal(flux(), before)


def test_a_pipeline_sharing_a_patched_backbone():
    """A pipeline built from a patched one's components (Pipeline(**pipe.components), from_pipe)
    shares the patched backbone and runs it: is_patched says so, and patch / unpatch on it name
    the pipeline to use instead (unpatch used to be a silent no-op, patch a report of 0 replaced).
    Unpatching the patched pipeline restores both; the other can then be patched itself."""
    pipe = _pipeline()
    before = _sample(pipe)
    diffaccel.patch(pipe, quant="w8a8")
    other = ref.DigitsPipeline(**pipe.components)
    other.set_progress_bar_config(disable=True)
    assert other.unet is pipe.unet and diffaccel.is_patched(other)
    with pytest.raises(ValueError, match="its unet is patched through another DigitsPipeline"):
        diffaccel.patch(other)
    with pytest.raises(RuntimeError, match="its unet is patched through another DigitsPipeline"):
        diffaccel.unpatch(other)
    with pytest.raises(ValueError, match="it is patched through another DigitsPipeline"):
        diffaccel.patch(pipe.unet)
    diffaccel.unpatch(pipe)
    assert not diffaccel.is_patched(other) and torch.equal(_sample(other), before)
    diffaccel.patch(other)
    with pytest.raises(ValueError, match="patched through another"):
        diffaccel.patch(pipe)
    diffaccel.unpatch(other)
    assert torch.equal(_sample(pipe), before)


def test_a_scheduler_shared_by_two_pipelines_names_whose_patch_fused_it():
    """SDXL's refiner is built with scheduler=base.scheduler. Patching the refiner after the base
    reported the scheduler as 'already patched by patch_scheduler', which nobody had called."""
    base, refiner = _pipeline("unet"), _pipeline("unet", seed=1)
    refiner.scheduler = base.scheduler
    diffaccel.patch(base)
    report = diffaccel.patch(refiner)
    (skip,) = [s for s in report.skipped if s.name == "scheduler"]
    assert re.fullmatch(r"already patched by another DigitsPipeline \(0x[0-9a-f]+\) that shares it; it runs fused "
                        r"while that one stays patched", skip.reason), skip.reason
    third = _pipeline("unet", seed=2)
    third.scheduler = base.scheduler
    with pytest.raises(ValueError, match=r"^solver: the scheduler is already patched by another DigitsPipeline .* "
                                         r"give the DC-Solver options when patching that DigitsPipeline"):
        diffaccel.patch(third, solver={"seed": 1, "noise": "philox"})
    assert not diffaccel.is_patched(third)
    diffaccel.unpatch(refiner)
    assert diffaccel.solvers.is_patched(base.scheduler)  # the base's patch holds it
    diffaccel.unpatch(base)
    assert not diffaccel.solvers.is_patched(base.scheduler)
    # patch_scheduler's own patch keeps its reason
    solo = _pipeline("unet")
    diffaccel.solvers.patch_scheduler(solo.scheduler)
    (skip,) = [s for s in diffaccel.patch(solo).skipped if s.name == "scheduler"]
    assert skip.reason == "already patched by patch_scheduler"
