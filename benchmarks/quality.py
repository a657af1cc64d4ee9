"""Quality of diffaccel's quantization on the trained reference digits models.

For each model (UNet, DiT) and each method x bit-width, calibrate a recipe with
`diffaccel.calibrate(pipe, prompts, method=..., weight_bits=..., act_bits=...)`, apply it with
`diffaccel.patch(pipe, quant=recipe)`, sample the fixed evaluation set (sample i: digit i % 10,
seed i) and score it:

  prompt accuracy   the committed DigitClassifier reads the digit the prompt asked for
  Frechet           distance between classifier penultimate features of the samples and of the real digits
  PSNR / SSIM       against the full-precision model's samples from the same noise
  weight memory     bytes of the backbone's parameters and buffers after patching
  calibration time  wall time of diffaccel.calibrate

Besides the four calibration methods, "preset" rows patch with the data-free presets
(`diffaccel.patch(pipe, quant="w8a8" | "w4a8" | "w4a16" | "fp8")`).

Combinations whose calls are not implemented yet (NotImplementedError / AttributeError / an
unsupported keyword) are skipped with a printed note and appear as "not run" in the table;
nothing is estimated. The table goes into BENCHMARKS.md between <!-- quality:begin --> and
<!-- quality:end -->, the raw figures into benchmarks/results/quality-<device>-<date>.json.

  python benchmarks/quality.py                       # full table (slow on CPU)
  python benchmarks/quality.py --models unet --methods minmax --bits W8A8 --samples 50

A partial run (a subset of --models / --methods / --bits) prints its table and writes nothing
unless given --write (it would replace the whole committed table); an existing results file of
the same date is replaced only with --overwrite.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_metrics import EvalSet, sample_eval_set, score_samples  # noqa: E402

from diffaccel.integrations import reference as ref  # noqa: E402

METHODS = ("minmax", "qdiffusion", "tfmq", "mixdq")
# "preset": no calibration, diffaccel.patch(pipe, quant=<data-free preset>) (weights per channel/group,
# activations dynamic per token); listed for comparison with the calibrated recipes.
PRESETS = {"W8A8": "w8a8", "W4A8": "w4a8", "W4A16": "w4a16", "FP8": "fp8"}
# Each bit-width as the keyword arguments of diffaccel.calibrate.
BITS = {
    "W8A8": dict(weight_bits=8, act_bits=8),
    "W4A8": dict(weight_bits=4, act_bits=8),
    "W4A16": dict(weight_bits=4, act_bits=16),
    "FP8": dict(weight_bits=8, act_bits=8, format="fp8"),
}
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
SKIPPABLE = (NotImplementedError, AttributeError, ImportError)


def calibration_prompts(n_per_digit: int):
    return [p for _ in range(n_per_digit) for p in ref.DIGIT_PROMPTS]


def run_one(kind, method, bits, args, eval_set, fp_images, device):
    import diffaccel

    pipe = ref.load_reference_pipeline(kind, device=device)
    try:
        if method == "preset":
            calib_s, recipe = None, PRESETS[bits]
        else:
            start = time.perf_counter()
            recipe = diffaccel.calibrate(pipe, calibration_prompts(args.calib_per_digit), method=method,
                                         num_inference_steps=args.steps, batch_size=10,
                                         pipe_kwargs={"guidance_scale": args.guidance}, seed=0, **BITS[bits])
            calib_s = time.perf_counter() - start
        report = diffaccel.patch(pipe, quant=recipe)
    except SKIPPABLE as exc:
        print(f"  skipped {kind} {method} {bits}: {type(exc).__name__}: {exc}")
        return {"status": "not run", "why": f"{type(exc).__name__}: {exc}"}
    except TypeError as exc:
        if "format" not in str(exc) and "keyword" not in str(exc):
            raise
        print(f"  skipped {kind} {method} {bits}: calibrate does not accept {BITS[bits]} ({exc})")
        return {"status": "not run", "why": f"TypeError: {exc}"}
    if args.verbose:
        print(report)
    images, sample_s = sample_eval_set(pipe, eval_set, args.steps, args.guidance)
    row = {"status": "ok", "calibration_s": calib_s, "sampling_s": sample_s,
           "weight_bytes": ref.weight_bytes(pipe.backbone), **score_samples(images, eval_set, fp_images)}
    print(f"  {kind} {method} {bits}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in row.items()))
    return row


def format_table(results, meta) -> str:
    lines = [
        f"Reference digits models (16x16, {meta['samples']} samples, {meta['steps']} DPM-Solver++ steps, guidance "
        f"{meta['guidance']}), measured on {meta['device']} with torch {meta['torch']} at commit {meta['commit']} "
        f"({meta['date']}). PSNR/SSIM are against the full-precision samples from the same noise; Frechet is "
        "between classifier features of the samples and the 1,797 real digits; weights = backbone parameters "
        "and buffers after patching.",
        "",
        "| model | method | bits | prompt acc. | Frechet | PSNR (dB) | SSIM | weights (MB) | calibration (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['method']} | {r['bits']} | not run: {r['why'][:80]} | | | | | |")
            continue
        psnr = f"{r['psnr']:.2f}" if "psnr" in r else "-"
        ssim = f"{r['ssim']:.4f}" if "ssim" in r else "-"
        calib = f"{r['calibration_s']:.1f}" if r.get("calibration_s") is not None else "-"
        lines.append(f"| {r['model']} | {r['method']} | {r['bits']} | {r['prompt_accuracy']:.1%} | "
                     f"{r['frechet']:.3f} | {psnr} | {ssim} | {r['weight_bytes'] / 1e6:.3f} | {calib} |")
    return "\n".join(lines)


def write_benchmarks_md(table: str, path: Path):
    block = f"{BEGIN}\n{table}\n{END}"
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + block + rest.split(END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n## Quality of quantization (reference digits models)\n\n" + block + "\n"
    else:
        text = "# Benchmarks\n\n## Quality of quantization (reference digits models)\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None):
    from _util import positive_int  # (benchmarks/ is on sys.path: this runs as a script)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(ref.KINDS), choices=ref.KINDS)
    p.add_argument("--methods", nargs="+", default=["preset", *METHODS], choices=["preset", *METHODS])
    p.add_argument("--bits", nargs="+", default=list(BITS), choices=list(BITS))
    p.add_argument("--samples", type=positive_int, default=200)
    p.add_argument("--steps", type=int, default=ref.DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=ref.DEFAULT_GUIDANCE)
    p.add_argument("--calib-per-digit", type=int, default=2, help="calibration prompts per digit")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-write", action="store_true", help="print the table; leave BENCHMARKS.md and results/ alone")
    p.add_argument("--write", action="store_true", help="record a partial run (a subset of models, methods or bits)")
    p.add_argument("--overwrite", action="store_true", help="replace a results file of the same date")
    p.add_argument("--verbose", action="store_true", help="print each patch report")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    eval_set = EvalSet(args.samples, device)
    results = []
    for kind in args.models:
        pipe = ref.load_reference_pipeline(kind, device=device)
        fp_images, sample_s = sample_eval_set(pipe, eval_set, args.steps, args.guidance)
        fp = {"model": kind, "method": "FP", "bits": "fp32", "status": "ok", "calibration_s": None,
              "sampling_s": sample_s, "weight_bytes": ref.weight_bytes(pipe.backbone),
              **score_samples(fp_images, eval_set)}
        print(f"{kind} full precision: prompt accuracy {fp['prompt_accuracy']:.1%}, Frechet {fp['frechet']:.3f}")
        results.append(fp)
        for method in args.methods:
            for bits in args.bits:
                results.append({"model": kind, "method": method, "bits": bits,
                                **run_one(kind, method, bits, args, eval_set, fp_images, device)})
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    meta = {"device": device_name, "torch": torch.__version__, "commit": commit,
            "date": datetime.date.today().isoformat(), "samples": args.samples, "steps": args.steps,
            "guidance": args.guidance, "calibration_prompts": 10 * args.calib_per_digit}
    table = format_table(results, meta)
    print(table)
    full = (set(args.models) == set(ref.KINDS) and set(args.methods) == {"preset", *METHODS}
            and set(args.bits) == set(BITS))
    if not args.no_write and not full and not args.write:
        print("a partial run: BENCHMARKS.md and benchmarks/results/ left alone (--write records it)")
    elif not args.no_write:
        tag = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).lower().replace(" ", "-")
        out = ROOT / "benchmarks" / "results" / f"quality-{tag}-{meta['date']}.json"
        if out.exists() and not args.overwrite:
            raise SystemExit(f"quality.py: {out.relative_to(ROOT)} exists; pass --overwrite to replace it")
        write_benchmarks_md(table, ROOT / "BENCHMARKS.md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        print(f"wrote BENCHMARKS.md and {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
