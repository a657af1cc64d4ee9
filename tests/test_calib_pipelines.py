"""Calibration through real diffusers pipelines (tiny random components, CPU): the recorded calls
come from the pipeline's own __call__ (prompt encoding, guidance, latent packing, its scheduler),
the recipe patches the pipeline, and unpatch restores it.

- FluxPipeline: packed latents, T5 + CLIP prompts, FlowMatch Euler; TFMQ's per-timestep recipe.
- WanPipeline: classifier-free guidance as two transformer calls a step, UniPC on flow sigmas.
- PixArtAlphaPipeline: guidance batched into one call, a learned-sigma output, DPM-Solver++.
"""
import pytest
import torch

import diffaccel
import tiny_models
from diffaccel.integrations import reference as ref

PROMPTS = ["a handwritten digit seven", "a digit three", "a handwritten digit one", "a digit two"]
STEPS = 4
# relative L2 of the final latents, W8A8 recipe against the float pipeline (4 steps; measured
# 0.001-0.006 on these configs)
MAX_REL_L2 = 0.03


def _t5(tokenizer, d_model, umt5=False):
    from transformers import T5Config, T5EncoderModel, UMT5EncoderModel

    torch.manual_seed(d_model)
    cfg = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0)
    return (UMT5EncoderModel if umt5 else T5EncoderModel)(cfg).eval()


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    return AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=16).eval()


def _flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = ref.load_tokenizer()
    torch.manual_seed(16)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=tok.model_max_length,
                                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id)).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(), text_encoder=clip, tokenizer=tok,
                        text_encoder_2=_t5(tok, 32), tokenizer_2=tok, transformer=tiny_models.flux()[0])
    return pipe, dict(height=16, width=16, max_sequence_length=12)


def _wan():
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    tok = ref.load_tokenizer()
    torch.manual_seed(4)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tok, text_encoder=_t5(tok, 32, umt5=True), vae=vae, transformer=tiny_models.wan()[0],
                       scheduler=scheduler)
    return pipe, dict(height=16, width=16, num_frames=5, max_sequence_length=12, guidance_scale=5.0)


def _pixart():
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    tok = ref.load_tokenizer()
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=_t5(tok, 24), vae=_vae(),
                               transformer=tiny_models.pixart()[0], scheduler=DPMSolverMultistepScheduler())
    return pipe, dict(height=16, width=16, clean_caption=False, max_sequence_length=12, use_resolution_binning=False)


def _sample(pipe, kwargs):
    with torch.no_grad():
        return pipe(prompt=["a digit seven", "a digit one"], num_inference_steps=STEPS, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **kwargs)[0]


@pytest.mark.parametrize("build,method", [(_flux, "tfmq"), (_wan, "mixdq"), (_pixart, "minmax")],
                         ids=["flux-tfmq", "wan-mixdq", "pixart-minmax"])
def test_real_pipeline_calibrates_patches_and_unpatches(build, method):
    pipe, kwargs = build()
    pipe.set_progress_bar_config(disable=True)
    want = _sample(pipe, kwargs)
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    schedule = pipe.scheduler.timesteps

    recipe = diffaccel.calibrate(pipe, PROMPTS, method=method, num_inference_steps=STEPS, pipe_kwargs=kwargs,
                                 batch_size=2, iters=2, progress=False)
    assert all(torch.equal(v, state[k]) for k, v in pipe.transformer.state_dict().items())
    assert pipe.scheduler.timesteps is schedule or torch.equal(pipe.scheduler.timesteps, schedule)
    assert len(recipe.timesteps) == STEPS  # every step of the run, each once (Wan's two calls a step included)

    report = diffaccel.patch(pipe, quant=recipe)
    patched = {r.name.removeprefix("transformer.") for r in report.by_part("quant")}
    assert recipe.layers and set(recipe.layers) <= patched
    got = _sample(pipe, kwargs)
    assert torch.isfinite(got).all()
    assert ((got - want).norm() / want.norm()).item() < MAX_REL_L2
    diffaccel.unpatch(pipe)
    assert torch.equal(_sample(pipe, kwargs), want)
