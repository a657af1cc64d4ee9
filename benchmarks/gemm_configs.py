"""Check and time candidate tiles of the int8, W4A8 and fp8 GEMMs on this GPU.

The tile table in ``kernels/gemm.py`` (``pick_int8_config``, ``pick_fp8_config``) was chosen from
the static report, never timed: on the H200 the int8 GEMM ran 381-502 TOPS with its 128x128x64
two-stage tile, and compiled as a diffusion layer runs it (N, K and strides multiples of 16) that
tile holds 174 registers and 32 KB of shared memory, so much larger tiles fit. This measures them:

    python -m benchmarks.gemm_configs [--out gemm-configs.json] [--jobs 8]

Phase 1, one process per (family, tile), ``--jobs`` at a time: compile every shape and check the
output against the reference (int8 and W4A8 bit for bit; fp8 within Hopper's accumulation bound,
2^-10 of sum|a w|). A tile that faults or is wrong fails only its own process. Phase 2, one process
per family, alone on the GPU: time the tiles that passed (``triton.testing.do_bench``, median).
Prints per (family, shape) the tiles by speed in TOPS, the current default marked; exit 1 if the
current default failed its check or something was not run. ``--out`` is rewritten after phase 1
and after each family's timing; under gpu_session.sh's stage deadline nothing starts after it (a
tile not checked has ``"ok": null``, a family not timed is listed in ``"not_timed"``).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import sys

from benchmarks._util import past_deadline, run_in_child, write_json

M = 4096
SHAPES = {"sdxl-attn1280": (1280, 1280), "sdxl-ff-geglu": (10240, 1280), "flux-qkv": (9216, 3072),
          "flux-mlp-down": (3072, 12288)}  # name: (N, K) of nn.Linear(K, N)
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the first of each list is today's default at M = 4096.
# All compile for sm_90a without spills when N, K and the strides are multiples of 16 (static report).
CANDIDATES = {
    "int8": [(128, 128, 64, 8, 2), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (128, 256, 128, 8, 3),
             (256, 128, 128, 8, 3), (128, 128, 128, 8, 4)],
    "w4a8": [(64, 128, 128, 8, 3), (128, 64, 128, 8, 3), (64, 128, 128, 8, 4), (64, 64, 128, 8, 3)],
    "fp8": [(128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4),
            (256, 128, 64, 8, 3)],
}
FP8_REL = 2.0**-10
DEVICE = "cuda"  # tests run the checks on CPU (Triton's interpreter) with small shapes


def _operands(family: str, N: int, K: int):
    import torch

    from diffaccel.ops import gemm as G
    from diffaccel.quant import formats as fmt

    g = torch.Generator().manual_seed(N + K)
    x = torch.randn(M, K, generator=g)  # M read at call time: tests shrink it
    w = torch.randn(N, K, generator=g)
    if family == "fp8":
        a, sa = G.quantize_rows_fp8_reference(x, None)
        wq, sw = fmt.quantize_weight_fp8(w)
    else:
        a, sa = G.quantize_rows_int8_reference(x, None)
        wq, sw = fmt.quantize_weight_int(w, 4 if family == "w4a8" else 8, 128 if family == "w4a8" else None)
        if family == "w4a8":
            wq = fmt.pack_int4(wq)
    return [t.to(DEVICE) for t in (a, wq, sa, sw)]


def _launcher(family: str, a, wq, sa, sw, out, config):
    from diffaccel.kernels import gemm as KG

    if family == "fp8":
        return lambda: KG.fp8_gemm(a, wq, sa.reshape(-1), sw, None, out, per_token=True, config=config)
    group = 128 if family == "w4a8" else 0
    return lambda: KG.int8_act_gemm(a, wq, sa.reshape(-1), sw, None, None, None, None, out, group_size=group,
                                    w_int4=family == "w4a8", fuse_quant=0, per_token=True, config=config)


def check(family: str, config: tuple) -> dict:
    """Phase 1 (its own process): every shape compiles and matches the reference."""
    import torch

    from diffaccel.ops import gemm as G

    worst = {}
    for name, (N, K) in SHAPES.items():
        a, wq, sa, sw = _operands(family, N, K)
        out = torch.empty(M, N, dtype=torch.float32, device=DEVICE)
        _launcher(family, a, wq, sa, sw, out, config)()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        if family == "fp8":
            ref = G.fp8_gemm_reference(a, wq, sa, sw, None, torch.float32)
            bound = FP8_REL * (a.float().abs() @ wq.float().abs().t()) * sa * sw
            worst[name] = float(((out - ref).abs() - bound).max())
            ok = worst[name] <= 0
        else:
            ref = G.int8_act_gemm_reference(a, wq, sa, sw, None, None, None, 128 if family == "w4a8" else 0,
                                            family == "w4a8", torch.float32)
            worst[name] = float((out - ref).abs().max())
            ok = torch.equal(out, ref)
        if not ok:
            return {"ok": False, "shape": name, "worst": worst[name]}
    return {"ok": True, "worst": worst}


def time_family(family: str, configs: list) -> dict:
    """Phase 2 (one process per family, alone on the GPU): median ms per (config, shape)."""
    import torch
    import triton

    times = {}
    for name, (N, K) in SHAPES.items():
        a, wq, sa, sw = _operands(family, N, K)
        out = torch.empty(M, N, dtype=torch.bfloat16 if family == "fp8" else torch.float16, device="cuda")
        for config in configs:
            ms = triton.testing.do_bench(_launcher(family, a, wq, sa, sw, out, tuple(config)), warmup=25, rep=100,
                                         return_mode="median")
            times[f"{name}|{tuple(config)}"] = ms
    return times


def _check_one(item):
    family, config = item
    if past_deadline():
        return family, config, {"ok": None, "error": "not run: the stage deadline had passed"}
    res, err = run_in_child("benchmarks.gemm_configs", "check", (family, config), 300)
    if res is None:
        res = {"ok": None if err.startswith("not run") else False, "error": err}
    return family, config, res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--families", default=",".join(CANDIDATES))
    args = ap.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    items = [(f, c) for f in families for c in CANDIDATES[f]]
    with cf.ThreadPoolExecutor(args.jobs) as ex:
        checked = list(ex.map(_check_one, items))
    report = {"M": M, "shapes": SHAPES, "checks": [], "times": {}, "not_timed": []}

    def save():  # what was measured survives a stage killed at its limit
        if args.out:
            write_json(args.out, report)

    default_failed = incomplete = False
    for family, config, res in checked:
        report["checks"].append({"family": family, "config": list(config), **res})
        if res["ok"] is None:
            incomplete = True
            print(f"NOT RUN {family} {config}: {res['error']}")
        elif not res["ok"]:
            default_failed |= config == CANDIDATES[family][0]
            print(f"FAIL {family} {config}: {res.get('error') or res}")
    save()
    for family in families:
        good = [list(c) for f, c, r in checked if f == family and r["ok"]]
        if not good:
            continue
        res, err = run_in_child("benchmarks.gemm_configs", "time_family", (family, good), 600)
        if res is None:
            incomplete = True
            report["not_timed"].append({"family": family, "error": err})
            save()
            print(f"TIMING {'NOT RUN' if err.startswith('not run') else 'FAILED'} {family}: {err}")
            continue
        report["times"][family] = res
        save()
        for name, (N, K) in SHAPES.items():
            rows = sorted((ms, cfg) for key, ms in res.items() for cfg in [key.split("|")[1]]
                          if key.split("|")[0] == name)
            print(f"{family} {name} (M={M} N={N} K={K}):")
            for ms, cfg in rows:
                mark = "  <- default" if cfg == str(CANDIDATES[family][0]) else ""
                print(f"    {cfg:24} {ms * 1e3:8.1f} us  {2 * M * N * K / ms / 1e9:7.0f} TOPS{mark}")
    return 1 if default_failed or incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
