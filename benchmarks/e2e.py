"""End-to-end: full-size SDXL UNet and Flux transformer (their real configs, random weights), one
denoising step and a 4-step loop at native resolution, batch 1 and batch 2 (guidance), for

    baseline:diffusers-eager     diffusers bf16, eager
    baseline:diffusers-compile   diffusers bf16 + torch.compile
    diffaccel:attn               patched, attention only
    diffaccel:attn+w8a8          + W8A8 layers
    diffaccel:attn+w4a8          + W4A8 layers
    diffaccel:int8attn+w8a8      + int8 attention
    ...+graph                    the same, one step's forward captured in a CUDA graph and replayed
                                 (no per-op host work: on the H200 an eager diffaccel op cost
                                 0.1-0.3 ms of host time, see BENCHMARKS.md)

measuring latency (median of CUDA-event timed runs), peak memory and backbone weight memory.

    python -m benchmarks.e2e [--models sdxl,flux] [--out e2e-raw.json]    # on a GPU machine
    python -m benchmarks.results e2e-raw.json --commit SHA   # -> benchmarks/results/<gpu>-<date>-e2e.json
    python -m benchmarks.e2e --smoke       # tiny configs on CPU: checks the code path, records nothing

The raw file goes through ``benchmarks/results.py`` like the microbenchmarks' (same checks, same
``--commit`` for a device's stale checkout); given with that day's microbenchmark raw file, both
land in one results file.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import subprocess
import sys
import time
from typing import Optional

import torch

VARIANTS = {
    "baseline:diffusers-eager": dict(patch=None, compile=False),
    "diffaccel:attn": dict(patch=dict(attention=True, quant=None), compile=False),
    "diffaccel:attn+w8a8": dict(patch=dict(attention=True, quant="w8a8"), compile=False),
    "diffaccel:attn+w4a8": dict(patch=dict(attention=True, quant="w4a8"), compile=False),
    "diffaccel:int8attn+w8a8": dict(patch=dict(attention=True, quant="w8a8", attention_quant="int8"), compile=False),
    "baseline:diffusers-eager+graph": dict(patch=None, compile=False, graph=True),
    "diffaccel:attn+w8a8+graph": dict(patch=dict(attention=True, quant="w8a8"), compile=False, graph=True),
    "diffaccel:int8attn+w8a8+graph": dict(patch=dict(attention=True, quant="w8a8", attention_quant="int8"),
                                          compile=False, graph=True),
    # last: compiling a full-size backbone (once per batch size) can take minutes of a time-limited call
    "baseline:diffusers-compile": dict(patch=None, compile=True),
}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def sdxl_unet(smoke: bool):
    from diffusers import UNet2DConditionModel

    if smoke:
        cfg = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                   attention_head_dim=(4, 8), transformer_layers_per_block=(1, 1), addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        text_dim, pooled, latent, tokens = 32, 32, 8, 77
    else:  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
        cfg = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                   attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                   addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
        text_dim, pooled, latent, tokens = 2048, 1280, 128, 77
    model = UNet2DConditionModel(in_channels=4, out_channels=4, addition_embed_type="text_time",
                                 use_linear_projection=True, **cfg)

    def inputs(batch, device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
        return dict(sample=r(batch, 4, latent, latent), timestep=torch.tensor([500] * batch, device=device),
                    encoder_hidden_states=r(batch, tokens, text_dim),
                    added_cond_kwargs={"text_embeds": r(batch, pooled), "time_ids": r(batch, 6)})
    return model, inputs


def flux_transformer(smoke: bool):
    from diffusers import FluxTransformer2DModel

    if smoke:
        cfg = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
        side, txt = 4, 8
    else:  # black-forest-labs/FLUX.1-dev transformer/config.json
        cfg = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                   joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
        side, txt = 64, 512  # 1024x1024: 128x128 latents packed 2x2 -> 64x64 = 4096 tokens
    model = FluxTransformer2DModel(patch_size=1, guidance_embeds=True, **cfg)

    def inputs(batch, device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)),
                                         indexing="ij"), -1).reshape(-1, 3)
        return dict(hidden_states=r(batch, side * side, cfg["in_channels"]), encoder_hidden_states=r(batch, txt, cfg["joint_attention_dim"]),
                    pooled_projections=r(batch, cfg["pooled_projection_dim"]),
                    timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
                    guidance=torch.full((batch,), 3.5, device=device, dtype=dtype),
                    img_ids=ids.to(device), txt_ids=torch.zeros(txt, 3, device=device))
    return model, inputs


MODELS = {"sdxl": sdxl_unet, "flux": flux_transformer}


def _weight_bytes(model) -> int:
    total = 0
    for m in model.modules():
        own = getattr(m, "weight_bytes", None)
        if callable(own):
            total += own()
            continue
        total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
        total += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
    return total


def _time_ms(fn, reps: int, smoke: bool) -> list:
    if smoke:
        t0 = time.perf_counter()
        fn()
        return [(time.perf_counter() - t0) * 1e3]
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return out


def run(models, variants, batches=(1, 2), steps=(1, 4), smoke=False, reps=10, deadline=None, on_case=None) -> list:
    """The cases measured. ``deadline`` (unix time): no variant starts after it, so a time-limited
    run ends on its own; ``on_case(cases)`` is called after each case (main writes the JSON there,
    so what was measured survives a kill)."""
    import diffaccel
    from benchmarks._util import cuda_graph_replay

    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    cases = []
    for mname in models:
        for vname in variants:
            if deadline is not None and time.time() > deadline:
                print(f"deadline passed: not starting {mname} {vname} or anything after it", flush=True)
                return cases
            v = VARIANTS[vname]
            torch.manual_seed(0)
            # built on the device in the run's dtype: a full-size Flux in fp32 on the host is 48 GB,
            # initialised again for every variant
            with torch.device(device), _default_dtype(dtype):
                model, make_inputs = MODELS[mname](smoke)
            model = model.to(device, dtype).eval()
            if v["patch"] is not None:
                diffaccel.patch(model, solver=False, **v["patch"])
            fwd = torch.compile(model) if v["compile"] else model
            weight_bytes = _weight_bytes(model)
            if v.get("graph") and smoke:
                print(f"{vname}: smoke run on CPU, no CUDA graph: the forward runs eagerly (nothing is recorded)",
                      flush=True)
            for batch in batches:
                inputs = make_inputs(batch, device, dtype)
                if v.get("graph") and not smoke:
                    with torch.no_grad():  # one step's forward on these (static) inputs
                        step = cuda_graph_replay(lambda: fwd(**inputs, return_dict=False))
                else:
                    def step():
                        fwd(**inputs, return_dict=False)
                for n_steps in steps:
                    def loop():
                        with torch.no_grad():
                            for _ in range(n_steps):
                                step()
                    if not smoke:
                        torch.cuda.reset_peak_memory_stats()
                    times = _time_ms(loop, reps, smoke)
                    peak = None if smoke else torch.cuda.max_memory_allocated()
                    cases.append(dict(family="e2e", case=f"{mname}/steps{n_steps}/b{batch}", shape=f"batch={batch}",
                                      dtype="fp32" if smoke else "bf16", impl=vname,
                                      median_ms=statistics.median(times), mean_ms=statistics.fmean(times),
                                      stddev_ms=statistics.pstdev(times), min_ms=min(times), max_ms=max(times),
                                      rounds=len(times), inner_calls=1,
                                      flops=None, bytes=None, tflops=None, gbps=None,
                                      peak_memory_bytes=peak, weight_bytes=weight_bytes, name=f"e2e[{mname}-{vname}]"))
                    print(f"{mname:5} {vname:28} b{batch} steps{n_steps}: {cases[-1]['median_ms']:9.2f} ms  "
                          f"weights {weight_bytes / 2**30:.2f} GiB" + (f"  peak {peak / 2**30:.2f} GiB" if peak else ""),
                          flush=True)
                    if on_case is not None:
                        on_case(cases)
            # free the weights before the next variant: the closures name fwd, and a graph variant's
            # step holds its CUDA graph and memory pool
            model = fwd = step = loop = None
            if not smoke:
                torch.cuda.empty_cache()
    return cases


def raw_document(cases: list, env: dict, commit: Optional[str], dirty: bool, when: str) -> dict:
    """The cases as a pytest-benchmark-shaped raw file, for ``python -m benchmarks.results``: the same
    checks as the microbenchmarks' (a GPU run, not the interpreter, one commit, each diffaccel
    variant paired with a baseline of the same run) and the same ``--commit`` for the device's stale
    checkout. Times are stored in seconds per loop, as pytest-benchmark stores them."""
    benches = []
    for c in cases:
        extra = {k: c[k] for k in ("family", "case", "shape", "dtype", "impl", "flops", "bytes", "inner_calls",
                                   "peak_memory_bytes", "weight_bytes")}
        # e2e checks no outputs (tests/test_patch_backbones.py does): "passed" means it ran to the end
        extra.update(smoke=False, outcome="passed")
        stats = {"median": c["median_ms"] / 1e3, "mean": c["mean_ms"] / 1e3, "stddev": c["stddev_ms"] / 1e3,
                 "min": c["min_ms"] / 1e3, "max": c["max_ms"] / 1e3, "rounds": c["rounds"], "iterations": 1}
        benches.append({"group": f"e2e/{c['case']}", "name": c["name"], "fullname": f"benchmarks/e2e.py::{c['name']}",
                        "extra_info": extra, "stats": stats})
    return {"machine_info": {"diffaccel_env": env}, "commit_info": {"id": commit, "dirty": dirty},
            "datetime": when, "benchmarks": benches, "source": "benchmarks/e2e.py"}


def main(argv=None) -> int:
    from benchmarks._util import environment_info, positive_int, stage_deadline, write_json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sdxl,flux")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--smoke", action="store_true", help="tiny configs on CPU; nothing is written")
    p.add_argument("--reps", type=positive_int, default=10)
    p.add_argument("--out", default="e2e-raw.json",
                   help="raw file (rewritten after every case); then: python -m benchmarks.results FILE --commit SHA")
    a = p.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    variants = [v for v in a.variants.split(",") if v]
    for name, known, what in ((models, MODELS, "--models"), (variants, VARIANTS, "--variants")):
        bad = [x for x in name if x not in known]
        if bad:
            p.error(f"{what}: unknown {', '.join(bad)}; expected some of {', '.join(known)}")
    if not a.smoke and not torch.cuda.is_available():
        p.error("no CUDA device: full-size end-to-end runs need a GPU (use --smoke for a CPU check)")
    deadline = stage_deadline()
    if a.smoke:
        run(models, variants, smoke=True, reps=a.reps, batches=(1,), steps=(1,), deadline=deadline)
        return 0

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip() or None

    env = environment_info()
    commit, dirty = git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    when = datetime.datetime.now(datetime.timezone.utc).isoformat()

    def save(cases):
        write_json(a.out, raw_document(cases, env, commit, dirty, when))

    cases = run(models, variants, reps=a.reps, deadline=deadline, on_case=save)
    save(cases)
    print(f"wrote {a.out} ({len(cases)} cases); record it with: python -m benchmarks.results {a.out} --commit SHA")
    return 0


if __name__ == "__main__":
    sys.exit(main())
