"""Quality metrics of the reference digits models (benchmarks/quality.py).

The metric functions live in diffaccel.integrations.reference (the demo uses them too and may
import only from diffaccel); this module adds what only the benchmark needs: sampling a fixed
evaluation set and scoring it against real images and against full-precision samples.
"""
from __future__ import annotations

import time

import torch

from diffaccel.integrations.reference import (classify, digit_prompts, frechet_distance, load_classifier,
                                              prompt_accuracy, psnr, real_digit_images, sample_generators, ssim)

__all__ = ["classify", "frechet_distance", "prompt_accuracy", "psnr", "ssim", "EvalSet", "sample_eval_set",
           "score_samples"]


class EvalSet:
    """Fixed prompts and seeds (sample i: digit i % 10, seed i) and the real-image features they are judged by."""

    def __init__(self, n_samples: int = 200, device="cpu"):
        self.n_samples = n_samples
        self.prompts, self.digits = digit_prompts(n_samples)
        self.seeds = list(range(n_samples))
        self.classifier = load_classifier(device)
        real, _ = real_digit_images()
        _, self.real_features = classify(self.classifier, real)


def sample_eval_set(pipe, eval_set: EvalSet, steps: int, guidance: float, batch_size: int = 50):
    """(images [N, 1, 16, 16] in [0, 1] on CPU, sampling seconds)."""
    device = pipe._execution_device
    out = []
    start = time.perf_counter()
    for i in range(0, eval_set.n_samples, batch_size):
        seeds = eval_set.seeds[i:i + batch_size]
        out.append(pipe(eval_set.prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                        generator=sample_generators(seeds, device)).cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.cat(out), time.perf_counter() - start


def score_samples(images, eval_set: EvalSet, fp_images=None) -> dict:
    """Prompt accuracy, Frechet distance of classifier features to the real digits, and (given the full-precision
    samples from the same noise) mean PSNR / SSIM against them."""
    _, features = classify(eval_set.classifier, images)
    scores = {"prompt_accuracy": prompt_accuracy(eval_set.classifier, images, eval_set.digits),
              "frechet": frechet_distance(features, eval_set.real_features)}
    if fp_images is not None:
        scores["psnr"] = psnr(images, fp_images).mean().item()
        scores["ssim"] = ssim(images, fp_images).mean().item()
    return scores
