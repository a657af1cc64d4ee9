"""`diffaccel.info()` / `python -m diffaccel info`: versions, GPU, and per op the backend a call would use."""
from __future__ import annotations

import platform

import torch


def info() -> dict:
    from . import __version__, ops
    from .ops import _backend

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "capability": f"{props.major}.{props.minor}",
               "memory_gib": round(props.total_memory / 2**30, 1)}
    return {
        "diffaccel": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": _backend.triton_interpreting(),
        "gpu": gpu,
        "extension": {
            "loaded": _backend.extension() is not None,
            "error": _backend.extension_error(),
            "cuda_archs": list(_backend.extension_cuda_archs()),
            "cutlass_sm90": bool(_backend.extension() is not None and _backend.extension().cutlass_sm90()),
        },
        "forced_backend": _backend.forced_backend(),
        "ops": ops.explain(),
    }


def format_info(d: dict) -> str:
    lines = [
        f"diffaccel {d['diffaccel']}  python {d['python']}  torch {d['torch']} (CUDA {d['torch_cuda'] or 'none'})"
        f"  triton {d['triton'] or 'not installed'}",
    ]
    gpu = d["gpu"]
    lines.append(f"GPU: {gpu['name']} (sm_{gpu['capability'].replace('.', '')}, {gpu['memory_gib']} GiB)" if gpu
                 else "GPU: none (CPU: ops run the torch reference; Triton only under TRITON_INTERPRET=1)")
    ext = d["extension"]
    if ext["loaded"]:
        archs = ", ".join(ext["cuda_archs"]) or "none (C++ only build)"
        cutlass = "yes" if ext["cutlass_sm90"] else "no (built without CUTLASS headers or without 9.0a)"
        lines.append(f"extension diffaccel._C: loaded; CUDA archs: {archs}; CUTLASS sm_90a W8A8 GEMMs: {cutlass}")
    else:
        lines.append(f"extension diffaccel._C: NOT loaded ({ext['error']})")
    if d["forced_backend"]:
        lines.append(f"DIFFACCEL_BACKEND={d['forced_backend']} (forced)")
    rows = d["ops"]
    if rows:
        w = max(len(r["op"]) for r in rows)
        lines.append("")
        lines.append(f"{'op'.ljust(w)}  {'device':6}  {'backend':11}  why / other backends")
        for r in rows:
            others = "; ".join(f"{b}: {why}" for b, why in r["others"].items())
            lines.append(f"{r['op'].ljust(w)}  {r['device']:6}  {r['backend']:11}  {r['reason']} | {others}")
    return "\n".join(lines)
