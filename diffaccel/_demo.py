"""`python -m diffaccel demo`: the reference digits model in full precision, then accelerated by diffaccel.

Loads the shipped UNet reference model (diffaccel/assets/reference) into a diffusers pipeline,
samples a 2x10 grid (each digit twice) in full precision, calibrates a W8A8 recipe on the spot
and patches the pipeline (fused attention, quantized layers, fused solver), samples again from
the same noise, prints latency / backbone weight memory / quality against full precision, and
writes both grids to a PNG.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from diffaccel.ops import _backend

GRID_ROWS, GRID_COLS = 2, 10


def missing_kernels_warning(device: torch.device):
    """On a GPU without ``_C`` or ``diffaccel.kernels`` the patched figures would be the torch
    references': a warning that says why and what to do, else None."""
    missing = _backend.gpu_kernels_missing() if device.type == "cuda" else []
    if not missing:
        return None
    return (f"warning: {'; '.join(missing)}. The patched pipeline will run torch references where those kernels "
            f"would run. Is this the source checkout rather than the installed wheel? Run the demo from another "
            f"folder: cd /tmp && python -m diffaccel demo --out-dir \"$OLDPWD\"")


def _accelerate(pipe, prompts, method: str = "minmax", steps: int = 20):
    """The one place the demo calls diffaccel's acceleration API: calibrate a W8A8 recipe on `prompts`
    (recording a full-precision run with the demo's own number of steps, so per-timestep parameters
    match the schedule it samples with) and patch `pipe` in place. Returns (patch report, calibration seconds)."""
    try:
        from diffaccel import calibrate, patch
    except ImportError as exc:
        raise RuntimeError(
            "diffaccel.calibrate / diffaccel.patch are not available in this build of diffaccel, so the demo "
            f"cannot accelerate the pipeline ({exc})") from exc
    start = time.perf_counter()
    recipe = calibrate(pipe, prompts, method=method, weight_bits=8, act_bits=8, num_inference_steps=steps,
                       batch_size=len(prompts))
    seconds = time.perf_counter() - start
    report = patch(pipe, quant=recipe)
    return report, seconds


def _sample(pipe, prompts, seeds, steps, device):
    from diffaccel.integrations.reference import sample_generators

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    images = pipe(prompts, num_inference_steps=steps, generator=sample_generators(seeds, device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images.cpu(), time.perf_counter() - start


def save_grid_png(path, grids, labels, scale: int = 4):
    """Write image sets ([R*C, 1, H, W] in [0, 1], row-major) one above the other, each under its label."""
    from PIL import Image, ImageDraw

    label_h, gap = 14, 6
    tiles = []
    for images in grids:
        n, _, h, w = images.shape
        rows = (n + GRID_COLS - 1) // GRID_COLS
        cell_h, cell_w = h + 1, w + 1  # one gray pixel between digits
        canvas = torch.full((rows * cell_h - 1, GRID_COLS * cell_w - 1), 0.5)
        for i in range(n):
            r, c = divmod(i, GRID_COLS)
            canvas[r * cell_h:r * cell_h + h, c * cell_w:c * cell_w + w] = images[i, 0]
        tiles.append(Image.fromarray((canvas.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), mode="L")
                     .resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST))
    width = max(t.width for t in tiles)
    height = sum(t.height + label_h + gap for t in tiles)
    out = Image.new("L", (width, height), color=255)
    draw = ImageDraw.Draw(out)
    y = 0
    for tile, label in zip(tiles, labels):
        draw.text((2, y + 1), label, fill=0)
        out.paste(tile, (0, y + label_h))
        y += tile.height + label_h + gap
    out.save(path)
    return Path(path)


def _format_table(rows):
    header = ["run", "latency (s)", "backbone weights (MB)", "PSNR vs FP (dB)", "SSIM vs FP", "prompt accuracy"]
    body = [[r["run"], f"{r['latency_s']:.2f}", f"{r['weight_mb']:.3f}", r.get("psnr", "-"), r.get("ssim", "-"),
             f"{r['prompt_accuracy']:.0%}"] for r in rows]
    body = [[c if isinstance(c, str) else f"{c:.2f}" if h.startswith("PSNR") else f"{c:.4f}"
             for c, h in zip(row, header)] for row in body]
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(row) for row in body])


def run_demo(out_dir=".", device=None, method: str = "minmax", steps: int | None = None, accelerate=None):
    """Run the demo; returns a dict of the measured figures and the PNG path. `accelerate(pipe, prompts)`
    replaces `_accelerate` (tests)."""
    try:
        from diffaccel.integrations import reference as ref
    except ImportError as exc:
        raise RuntimeError(f"the demo needs diffusers and transformers: pip install 'diffaccel[diffusers]' ({exc})") \
            from exc

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    steps = steps or ref.DEFAULT_STEPS
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = GRID_ROWS * GRID_COLS
    prompts, digits = ref.digit_prompts(n)
    seeds = list(range(n))

    print(f"diffaccel demo: reference UNet digits model on {device}, {n} samples, {steps} steps")
    warning = missing_kernels_warning(device)
    if warning:  # (stderr: the table stays clean)
        print(warning, file=sys.stderr)
    pipe = ref.load_reference_pipeline("unet", device=device)
    classifier = ref.load_classifier(device)
    pipe(prompts[:1], num_inference_steps=2, generator=ref.sample_generators([0], device))  # warm-up
    fp_images, fp_latency = _sample(pipe, prompts, seeds, steps, device)
    fp_bytes = ref.weight_bytes(pipe.backbone)
    rows = [{"run": "full precision", "latency_s": fp_latency, "weight_mb": fp_bytes / 1e6,
             "prompt_accuracy": ref.prompt_accuracy(classifier, fp_images, digits)}]

    print(f"calibrating ({method}, W8A8) and patching ...")
    report, calib_s = (accelerate or (lambda p, pr: _accelerate(p, pr, method, steps)))(pipe, prompts)
    report_lines = str(report).splitlines()
    report_path = out_dir / "diffaccel_demo_patch_report.txt"
    report_path.write_text(str(report) + "\n")
    print(f"{report_lines[-1] if report_lines else report} (full report: {report_path})")
    pipe(prompts[:1], num_inference_steps=2, generator=ref.sample_generators([0], device))  # warm-up
    q_images, q_latency = _sample(pipe, prompts, seeds, steps, device)
    rows.append({"run": f"diffaccel {method} W8A8", "latency_s": q_latency,
                 "weight_mb": ref.weight_bytes(pipe.backbone) / 1e6,
                 "prompt_accuracy": ref.prompt_accuracy(classifier, q_images, digits),
                 "psnr": ref.psnr(q_images, fp_images).mean().item(),
                 "ssim": ref.ssim(q_images, fp_images).mean().item()})
    print(f"calibration took {calib_s:.1f} s")
    print(_format_table(rows))
    if device.type == "cpu":
        print("note: on CPU the quantized layers and attention run diffaccel's torch reference backends (real "
              "integer arithmetic, unfused), so the patched run is slower here; the kernels run on a GPU.")
    png = save_grid_png(out_dir / "diffaccel_demo.png", [fp_images, q_images],
                        ["full precision", f"diffaccel {method} W8A8 (same noise)"])
    print(f"wrote {png}")
    return {"rows": rows, "calibration_s": calib_s, "png": png, "report": report}
