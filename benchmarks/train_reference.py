"""Train the reference models that the quality benchmark and `python -m diffaccel demo` run on.

A small text-conditional, pixel-space diffusion model on scikit-learn's bundled digits
(1,797 8x8 images, upsampled to 16x16, scaled to [-1, 1]) with prompts such as
"a handwritten digit seven":

  tokenizer   word-level PreTrainedTokenizerFast (<bos> words <eos> <pad>...), built locally
  classifier  small CNN used only for evaluation (prompt accuracy, Frechet features)
  text_encoder  tiny CLIPTextModel (2 layers, hidden 64, BOS token), fixed: a seeded random init
              shared by both backbones (trained jointly it would tie the DiT to the UNet's run)
  unet        UNet2DConditionModel (cross-attention, time embedding, skip concatenations)
  dit         PixArtTransformer2DModel (patch size 2)

Everything is written with save_pretrained / safetensors into diffaccel/assets/reference/
and loaded back with diffaccel.integrations.reference.load_reference_pipeline.
Deterministic under --seed (CPU, deterministic algorithms). Run one stage at a time:

  python benchmarks/train_reference.py tokenizer classifier text_encoder
  python benchmarks/train_reference.py unet     # the two backbones are independent:
  python benchmarks/train_reference.py dit      # they may run at the same time

The committed weights came from these runs (each resume starts a fresh optimizer and cosine schedule
from the saved weights; training_report.json keeps the chain under "resumed_from"):

  unet   800 steps, lr 2e-3 (prompt acc. 46.5%), then --resume --unet-steps 700 --lr 1e-3 (99.5%)
  dit    800 steps, lr 2e-3 (16.5%), --resume --dit-steps 700 --lr 1.5e-3 (56.5%),
         then --resume --dit-steps 1000 --threads 2 (97.5%)

Wall time depends on what else runs: on the shared, heavily loaded 2-core machine the UNet took
1,818 s in all; the DiT's last 1,000 steps took 222 s when the machine was quiet.

--threads defaults to 1: on the shared 2-core machine two OpenMP threads made a UNet step
about 6x slower than one (10.5 s vs 1.7 s), because the threads wait on each other.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffaccel.integrations import reference as ref

ASSETS = Path(ref.__file__).resolve().parent.parent / "assets" / "reference"


def load_digit_data():
    """(images [N, 1, 16, 16] in [-1, 1], labels [N] int64) from sklearn's bundled digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    return x * 2 - 1, torch.tensor(digits.target, dtype=torch.int64)


def classifier_split(n, seed):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = n // 5
    return perm[n_test:], perm[:n_test]


def random_shift(x, gen, max_shift=1):
    """Shift each image by up to max_shift pixels (zero-filled background): augmentation."""
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(x)
    shifts = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=gen)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        out[i] = pad[i, :, dy:dy + 16, dx:dx + 16]
    return out


# ---------------------------------------------------------------------------------------- stages

def train_tokenizer(out: Path):
    tok = ref.build_tokenizer()
    tok.save_pretrained(out / "tokenizer")
    print(f"tokenizer: {len(tok)} tokens -> {out / 'tokenizer'}")


def train_classifier(out: Path, seed: int, steps: int):
    images, labels = load_digit_data()
    train_idx, test_idx = classifier_split(len(images), seed)
    x_train, y_train = (images[train_idx] + 1) / 2, labels[train_idx]
    x_test, y_test = (images[test_idx] + 1) / 2, labels[test_idx]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ref.DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(x_train), (128,), generator=gen)
        xb = random_shift(x_train[idx] * 2 - 1, gen) * 0.5 + 0.5
        xb = (xb + 0.05 * torch.randn(xb.shape, generator=gen)).clamp(0, 1)
        loss = F.cross_entropy(model(xb), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"classifier step {step} loss {loss.item():.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        test_acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        train_acc = (model(x_train).argmax(1) == y_train).float().mean().item()
    model.save_pretrained(out / "classifier")
    info = {"test_accuracy": test_acc, "train_accuracy": train_acc, "n_train": len(x_train),
            "n_test": len(x_test), "steps": steps, "seconds": round(time.time() - t0, 1), "seed": seed}
    _update_report(out, "classifier", info)
    print(f"classifier: test accuracy {test_acc:.4f} (train {train_acc:.4f})")


def make_text_encoder(out: Path, seed: int):
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = ref.load_tokenizer(out / "tokenizer")
    CLIPTextModel(ref.text_encoder_config(tokenizer)).save_pretrained(out / "text_encoder")
    ref.sampling_scheduler().save_pretrained(out / "scheduler")
    print(f"text encoder (fixed, seed {seed}) and sampling scheduler -> {out}")


def _ema_update(ema, model, decay):
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


def train_diffusion(out: Path, kind: str, seed: int, steps: int, batch: int, lr: float, eval_samples: int,
                    resume: bool = False):
    import copy

    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    images, labels = load_digit_data()
    tokenizer = ref.load_tokenizer(out / "tokenizer")
    prompt_ids = tokenizer(ref.DIGIT_PROMPTS + [""], padding="max_length", max_length=tokenizer.model_max_length,
                           return_tensors="pt").input_ids  # [11, L]; the last row is the empty prompt
    noise_scheduler = DDPMScheduler(**ref.NOISE_SCHEDULE)

    # The text encoder is fixed (seeded random init, shared by both backbones), so its 11 outputs are
    # computed once; the backbones learn to read them through cross-attention.
    text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder").eval()
    with torch.no_grad():
        prompt_embeds = text_encoder(prompt_ids).last_hidden_state  # [11, L, 64]
    if resume:  # continue from the saved (EMA) weights with a fresh optimizer and schedule
        cls = type(ref.build_unet() if kind == "unet" else ref.build_dit())
        backbone = cls.from_pretrained(out / kind, low_cpu_mem_usage=False).train()
        gen.manual_seed(seed + 2)
    else:
        backbone = ref.build_unet() if kind == "unet" else ref.build_dit()
    params = list(backbone.parameters())
    ema = copy.deepcopy(backbone).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in backbone.parameters())
    print(f"{kind}: {n_params / 1e6:.3f} M parameters", flush=True)

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = 100
    lr_at = lambda s: min(1.0, (s + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)) * 0.9 + 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x0 = images[idx]
        cond = labels[idx].clone()
        drop = torch.rand(batch, generator=gen) < 0.1  # classifier-free guidance: empty prompt
        cond[drop] = 10
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=gen)
        xt = noise_scheduler.add_noise(x0, noise, t)
        text = prompt_embeds[cond]
        pred = ref.backbone_forward(backbone, xt, t, text)
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        _ema_update(ema, backbone, decay)
        if step % 100 == 0 or step == steps - 1:
            el = time.time() - t0
            print(f"{kind} step {step}/{steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{el:.0f}s (eta {el / (step + 1) * (steps - step - 1):.0f}s)", flush=True)
    seconds = time.time() - t0

    ema.save_pretrained(out / kind)
    info = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "seconds": round(seconds, 1),
            "parameters": n_params, "final_loss": loss.item()}
    if resume:
        previous = json.loads((out / "training_report.json").read_text()).get(kind, {})
        info["resumed_from"] = {k: v for k, v in previous.items() if k not in ("resumed_from",)} | (
            {"resumed_from": previous["resumed_from"]} if "resumed_from" in previous else {})
    if eval_samples:
        info.update(evaluate_prompt_accuracy(kind, eval_samples))
    _update_report(out, kind, info)
    print(json.dumps({kind: info}, indent=2))


def evaluate_prompt_accuracy(kind, n_samples, steps=ref.DEFAULT_STEPS, guidance=ref.DEFAULT_GUIDANCE):
    """Prompt accuracy of the saved model, loaded back through the public loader."""
    pipe = ref.load_reference_pipeline(kind)
    classifier = ref.load_classifier()
    prompts, digits = ref.digit_prompts(n_samples)
    t0 = time.time()
    imgs = torch.cat([pipe(prompts[i:i + 50], num_inference_steps=steps, guidance_scale=guidance,
                           generator=ref.sample_generators(range(i, min(i + 50, n_samples))))
                      for i in range(0, n_samples, 50)])
    acc = ref.prompt_accuracy(classifier, imgs, digits)
    print(f"{kind}: prompt accuracy {acc:.4f} over {n_samples} samples ({time.time() - t0:.0f}s)", flush=True)
    return {"prompt_accuracy": acc, "eval_samples": n_samples, "eval_steps": steps, "eval_guidance": guidance}


def _update_report(out: Path, key, info):
    path = out / "training_report.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report[key] = info
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stages", nargs="+", choices=["tokenizer", "classifier", "text_encoder", "unet", "dit", "eval"])
    p.add_argument("--out", type=Path, default=ASSETS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--unet-steps", type=int, default=800)
    p.add_argument("--dit-steps", type=int, default=800)
    p.add_argument("--classifier-steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="unet/dit: continue from the saved weights")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    for stage in args.stages:
        if stage == "tokenizer":
            train_tokenizer(args.out)
        elif stage == "text_encoder":
            make_text_encoder(args.out, args.seed)
        elif stage == "classifier":
            train_classifier(args.out, args.seed, args.classifier_steps)
        elif stage == "eval":
            for kind in ("unet", "dit"):
                if (args.out / kind).exists():
                    _update_report(args.out, kind, {**json.loads((args.out / "training_report.json").read_text())
                                                    .get(kind, {}), **evaluate_prompt_accuracy(kind, args.eval_samples)})
        else:
            train_diffusion(args.out, stage, args.seed, args.unet_steps if stage == "unet" else args.dit_steps,
                            args.batch, args.lr, args.eval_samples, args.resume)


if __name__ == "__main__":
    main()
