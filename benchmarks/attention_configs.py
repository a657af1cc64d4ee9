"""Check every attention autotune config alone on this GPU, one process per case.

The autotuner tries each config of ``kernels/attention.py`` on first use; one config that faults
(an illegal memory access poisons the whole CUDA context) or computes wrong values breaks every
later call in that process. This runs each (path, config, head dim) in its own process with
``CUDA_LAUNCH_BLOCKING=1`` and compares it with a float32 SDPA reference:

    python -m benchmarks.attention_configs [--out configs.json] [--jobs 12]

Prints one row per case that faulted or missed its tolerance (fp16: rel L2 <= 2e-3; int8 QK with
fp8/fp16 PV: rel L2 <= 5e-2), then a summary; exit 1 if any case failed.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys

HEAD_DIMS = (32, 40, 64, 72, 80, 128, 160, 256)
# (Lq, Lk): self attention with a ragged last tile, and cross attention on 77 text tokens
LENGTHS = ((2000, 2000), (1024, 77))
TOL = {"fp16": 2e-3, "int8": 5e-2}


def _child(path: str, config: tuple, D: int) -> dict:
    import torch
    import torch.nn.functional as F

    from diffaccel.kernels import attention as kern
    from diffaccel.ops import attention, use_backend

    name = "attention_fwd" if path == "fp16" else "attention_int8_fwd"
    launch = getattr(kern, name)
    setattr(kern, name, lambda *a, **kw: launch(*a, config=config, **kw))
    errs = []
    for Lq, Lk in LENGTHS:
        g = torch.Generator(device="cuda").manual_seed(D)
        q, k, v = (torch.randn(2, 4, L, D, generator=g, device="cuda", dtype=torch.float16) for L in (Lq, Lk, Lk))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        with use_backend("triton"):
            out = attention(q, k, v, quant="int8" if path == "int8" else None)
        torch.cuda.synchronize()
        errs.append(float((out.float() - ref).norm() / ref.norm()))
    return {"rel_l2": max(errs)}


def _cases():
    from diffaccel.kernels import attention as kern

    cases = []
    for path, min_chunk in (("fp16", 16), ("int8", 32)):
        for D in HEAD_DIMS:
            bd, bd1 = kern.split_head_dim(D, min_chunk=min_chunk)
            block_d = kern._block_d(bd + bd1)
            for bm, bn, w, s, dims in kern._CONFIGS["sm90"]:
                if block_d in dims:
                    cases.append((path, (bm, bn, w, s), D))
    return cases


def _run(case) -> dict:
    path, config, D = case
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    code = (f"import json, benchmarks.attention_configs as m; "
            f"print('RESULT', json.dumps(m._child({path!r}, {config!r}, {D})))")
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired:
        out, rc = "timed out after 240 s", 124
    row = {"path": path, "config": list(config), "head_dim": D, "rc": rc}
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if rc == 0 and lines:
        row.update(json.loads(lines[-1][7:]))
        row["ok"] = row["rel_l2"] <= TOL[path]
    else:
        row["ok"] = False
        row["error"] = "\n".join(out.strip().splitlines()[-6:])
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--jobs", type=int, default=12)
    args = ap.parse_args(argv)
    cases = _cases()
    with cf.ThreadPoolExecutor(args.jobs) as ex:
        rows = list(ex.map(_run, cases))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if not r["ok"]]
    for r in bad:
        what = f"rel_l2 {r['rel_l2']:.2e}" if "rel_l2" in r else r["error"].replace("\n", " | ")[-300:]
        print(f"FAIL {r['path']} config={tuple(r['config'])} D={r['head_dim']} rc={r['rc']}: {what}")
    print(f"attention configs: {len(rows) - len(bad)} of {len(rows)} cases ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
