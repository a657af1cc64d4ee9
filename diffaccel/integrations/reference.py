"""The trained reference models shipped with diffaccel, and how to evaluate their samples.

Two small text-conditional, pixel-space diffusion models trained on scikit-learn's digits
(16x16, one channel; prompts "a handwritten digit zero" ... "a handwritten digit nine") by
benchmarks/train_reference.py, shipped as safetensors in diffaccel/assets/reference/:

  unet/          UNet2DConditionModel (cross-attention, time embedding, skip concatenations)
  dit/           PixArtTransformer2DModel (DiT with adaLN-single, patch size 2)
  text_encoder/  CLIPTextModel (2 layers, hidden 64; BOS token), shared by both
  tokenizer/     word-level PreTrainedTokenizerFast (<bos> words <eos> <pad>...)
  scheduler/     DPMSolverMultistepScheduler (DPM-Solver++ 2M) for sampling
  classifier/    DigitClassifier, a small CNN used only for evaluation

`load_reference_pipeline("unet" | "dit")` loads them with the diffusers/transformers
`from_pretrained` code into `DigitsPipeline`, a diffusers `DiffusionPipeline`.
Images are float tensors [B, 1, 16, 16] in [0, 1]. Metrics: `prompt_accuracy`,
`frechet_distance` (between DigitClassifier penultimate features), `psnr`, `ssim`.
Needs the optional dependencies diffusers and transformers.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from diffusers import (DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, ModelMixin,
                       PixArtTransformer2DModel, UNet2DConditionModel)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "reference"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_PROMPTS = [f"a handwritten digit {w}" for w in DIGIT_WORDS]
IMAGE_SIZE = 16
# The training noise schedule; the sampling scheduler uses the same betas.
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0
KINDS = ("unet", "dit")


# ------------------------------------------------------------------------------- model definitions

def build_tokenizer():
    """Word-level tokenizer over the prompt vocabulary: '<bos> a handwritten digit seven <eos> <pad> <pad>'."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    words = ["a", "handwritten", "digit", *DIGIT_WORDS]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=8, padding_side="right")


def load_tokenizer(path=None):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path or ASSETS_DIR / "tokenizer"))


def text_encoder_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                          projection_dim=64, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def build_unet():
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        # UNet2DConditionModel's attention_head_dim is (for historical reasons) the number of heads:
        # 1 head of dim 32, the smallest head dim diffaccel's attention kernels take.
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=64, attention_head_dim=1)


def build_dit():
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=6,
        cross_attention_dim=64, sample_size=IMAGE_SIZE, patch_size=2, caption_channels=64,
        use_additional_conditions=False, norm_type="ada_norm_single", interpolation_scale=1)


def sampling_scheduler():
    # The cosine schedule's last training step has alpha_bar ~ 2e-9, where the x0 prediction divides by
    # ~5e-5 and blows up; "leading" spacing with offset 1 starts sampling at t=951 (alpha_bar ~ 6e-3).
    return DPMSolverMultistepScheduler(**NOISE_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                       timestep_spacing="leading", steps_offset=1)


def backbone_forward(backbone, sample, timestep, encoder_hidden_states):
    """The noise prediction of either backbone for a batch; timestep is a scalar or a [B] tensor."""
    timestep = torch.as_tensor(timestep, device=sample.device)
    if timestep.ndim == 0:
        timestep = timestep.expand(sample.shape[0])
    if isinstance(backbone, UNet2DConditionModel):
        return backbone(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
    if isinstance(backbone, PixArtTransformer2DModel):
        return backbone(sample, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    raise TypeError(f"backbone: expected UNet2DConditionModel or PixArtTransformer2DModel, got {type(backbone).__name__}")


class DigitClassifier(ModelMixin, ConfigMixin):
    """Small CNN on [B, 1, 16, 16] images in [0, 1]; `features` is the penultimate layer."""

    @register_to_config
    def __init__(self, channels: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        c = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * c * 16, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images):
        return self.body(images)

    def forward(self, images):
        return self.head(self.body(images))


def load_classifier(device=None):
    return DigitClassifier.from_pretrained(str(ASSETS_DIR / "classifier"), low_cpu_mem_usage=False).to(device or "cpu").eval()


# ------------------------------------------------------------------------------------- the pipeline

class DigitsPipeline(DiffusionPipeline):
    """Text-to-image in pixel space with either backbone (`unet` or `transformer`), classifier-free guidance
    and the scheduler's own `step` (so `diffaccel.patch_scheduler` applies)."""

    model_cpu_offload_seq = "text_encoder->unet->transformer"
    _optional_components = ["unet", "transformer"]

    def __init__(self, text_encoder, tokenizer, scheduler, unet=None, transformer=None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("unet, transformer: expected exactly one backbone")
        self.register_modules(text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                              unet=unet, transformer=transformer)

    @property
    def backbone(self):
        return self.unet if self.unet is not None else self.transformer

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], device):
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        return self.text_encoder(ids).last_hidden_state

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], num_inference_steps: int = DEFAULT_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE, generator=None, latents=None, output_type: str = "pt"):
        """Images [B, 1, 16, 16] in [0, 1] (output_type "pt"), or the final sample as the scheduler left it
        (output_type "latent": pixel space, nominally [-1, 1], unclamped). `generator`: one torch.Generator,
        or one per prompt (per-sample noise independent of the batch it is drawn in)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt: expected at least one prompt")
        if output_type not in ("pt", "latent"):
            raise ValueError(f"output_type: expected 'pt' or 'latent', got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected >= 1, got {num_inference_steps}")
        device = self._execution_device
        backbone = self.backbone
        dtype = next(backbone.parameters()).dtype
        batch = len(prompts)
        text = self.encode_prompt(prompts, device)
        do_cfg = guidance_scale > 1.0
        if do_cfg:
            text = torch.cat([self.encode_prompt([""] * batch, device), text])
        text = text.to(dtype)
        shape = (batch, backbone.config.in_channels, IMAGE_SIZE, IMAGE_SIZE)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif latents.shape != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=torch.float32)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            noise = backbone_forward(backbone, model_in.to(dtype), t, text).float()
            if do_cfg:
                uncond, cond = noise.chunk(2)
                # a scheduler patched by diffaccel folds the guidance into its one step kernel
                step_with_guidance = getattr(self.scheduler, "step_with_guidance", None)
                if step_with_guidance is not None:
                    latents = step_with_guidance(uncond, cond, guidance_scale, t, latents).prev_sample
                    continue
                noise = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise, t, latents).prev_sample
        self.maybe_free_model_hooks()
        return latents if output_type == "latent" else (latents.clamp(-1, 1) + 1) / 2


def load_reference_pipeline(kind: str = "unet", device=None, dtype=None, progress: bool = False) -> DigitsPipeline:
    """The trained reference model `kind` ("unet" or "dit") as a DigitsPipeline on `device`."""
    from transformers import CLIPTextModel

    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    backbone_dir = ASSETS_DIR / kind
    if not (backbone_dir / "config.json").is_file():
        raise FileNotFoundError(f"kind: no trained weights at {backbone_dir} (run benchmarks/train_reference.py {kind})")
    if kind == "unet":
        backbone = {"unet": UNet2DConditionModel.from_pretrained(str(backbone_dir), low_cpu_mem_usage=False)}
    else:
        backbone = {"transformer": PixArtTransformer2DModel.from_pretrained(str(backbone_dir), low_cpu_mem_usage=False)}
    pipe = DigitsPipeline(text_encoder=CLIPTextModel.from_pretrained(str(ASSETS_DIR / "text_encoder")),
                          tokenizer=load_tokenizer(),
                          scheduler=DPMSolverMultistepScheduler.from_pretrained(str(ASSETS_DIR / "scheduler")),
                          **backbone)
    pipe.set_progress_bar_config(disable=not progress)
    pipe.to(device=device or "cpu")
    if dtype is not None:
        pipe.backbone.to(dtype)
    return pipe


def training_noise_scheduler():
    return DDPMScheduler(**NOISE_SCHEDULE)


# ----------------------------------------------------------------------------- evaluation helpers

def digit_prompts(n: int):
    """n prompts cycling through the ten digits, and their digit labels [n]."""
    digits = torch.arange(n) % 10
    return [DIGIT_PROMPTS[d] for d in digits.tolist()], digits


def sample_generators(seeds: Iterable[int], device="cpu"):
    """One generator per sample so each sample's noise depends only on its seed."""
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def classify(classifier, images, batch_size: int = 256):
    """(predicted digits [B], penultimate features [B, F] float64) of images in [0, 1]."""
    device = next(classifier.parameters()).device
    preds, feats = [], []
    for chunk in torch.as_tensor(images).split(batch_size):
        f = classifier.features(chunk.to(device=device, dtype=torch.float32))
        preds.append(classifier.head(f).argmax(1).cpu())
        feats.append(f.double().cpu())
    return torch.cat(preds), torch.cat(feats)


def prompt_accuracy(classifier, images, digits) -> float:
    """Fraction of images that the classifier reads as the digit their prompt asked for."""
    digits = torch.as_tensor(digits)
    if len(images) != len(digits):
        raise ValueError(f"digits: expected {len(images)} labels, got {len(digits)}")
    preds, _ = classify(classifier, images)
    return (preds == digits.cpu()).double().mean().item()


def frechet_distance(features_a, features_b) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets [N, F] (as in FID).
    Tr((S_a S_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S_a^(1/2) S_b S_a^(1/2), which has the same spectrum as S_a S_b."""
    a, b = torch.as_tensor(features_a).double(), torch.as_tensor(features_b).double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"features_a, features_b: expected [N>=2, F] each with equal F, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt
    return max(value.item(), 0.0)


def psnr(images, reference, data_range: float = 1.0, max_db: float = 100.0):
    """Per-image PSNR in dB [B]; identical images give max_db (MSE floored to keep the mean finite)."""
    x, y = torch.as_tensor(images).double(), torch.as_tensor(reference).double()
    if x.shape != y.shape or x.ndim < 2:
        raise ValueError(f"images, reference: expected equal shapes [B, ...], got {tuple(x.shape)}, {tuple(y.shape)}")
    mse = (x - y).square().flatten(1).mean(1)
    floor = data_range ** 2 / 10 ** (max_db / 10)
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(floor))


def _gaussian_window(size: int, sigma: float):
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(images, reference, data_range: float = 1.0, window_size: int = 7, sigma: float = 1.5):
    """Per-image SSIM [B] of [B, C, H, W] images (Wang et al. 2004: Gaussian window, K1=0.01, K2=0.03, valid
    filtering, mean over the SSIM map and channels). The 7-pixel window suits 16x16 images."""
    x, y = torch.as_tensor(images).double(), torch.as_tensor(reference).double()
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"images, reference: expected equal shapes [B, C, H, W], got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}")
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"images: expected H, W >= window_size={window_size}, got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    w = _gaussian_window(window_size, sigma).to(x.device).expand(c, 1, window_size, window_size)
    filt = lambda t: F.conv2d(t, w, groups=c)
    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x.square()
    var_y = filt(y * y) - mu_y.square()
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return smap.flatten(1).mean(1)


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (what its weights occupy in memory)."""
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def real_digit_images():
    """(images [1797, 1, 16, 16] in [0, 1], labels) prepared exactly as the training data."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(digits.target, dtype=torch.int64)
