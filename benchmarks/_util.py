"""Helpers for benchmarks/bench_*.py (importable as ``from benchmarks._util import ...`` when pytest
runs from the repository root; conftest.py cannot be imported by name).

Every benchmark test:

    def test_foo(benchmark, impl, shape):
        fn = ...                                   # a zero-argument callable doing one call
        annotate(benchmark, family="gemm", case="w8a8", shape=shape, dtype="fp16",
                 impl="diffaccel" | "diffaccel:<backend>" | "baseline:<name>", flops=..., bytes=...)
        measure(benchmark, fn)

``measure`` synchronizes CUDA inside the timed call (pytest-benchmark times wall clock), and on a
GPU runs ``inner_calls`` back-to-back calls per round so a round lasts about a millisecond and
launch latency does not dominate small kernels; ``benchmarks/results.py`` divides by it.
Without CUDA (``is_smoke()``) it runs the callable once: a smoke check that the code runs.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Optional, Sequence, Union

import torch

SMOKE_ENV = "DIFFACCEL_BENCH_SMOKE"  # =1 forces smoke mode on a GPU machine (a quick check, never recorded)
TARGET_ROUND_S = 1e-3
MAX_INNER_CALLS = 1000
GPU_ROUNDS = 30


DEADLINE_ENV = "DIFFACCEL_PYTEST_DEADLINE"  # unix time, set per stage by gpu_session.sh: start nothing after it


def stage_deadline() -> Optional[float]:
    """The unix time after which a time-limited stage (gpu_session.sh) starts no new case, or None."""
    value = os.environ.get(DEADLINE_ENV)
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{DEADLINE_ENV}: expected a unix time in seconds, got {value!r}") from None


def past_deadline() -> bool:
    deadline = stage_deadline()
    return deadline is not None and time.time() >= deadline


def write_json(path, doc) -> None:
    """Write ``doc`` whole or not at all (a file half written when the stage is killed would be
    unreadable): tools that save after every case call this each time."""
    import json

    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def run_in_child(module: str, function: str, args: tuple, timeout: int, env: Optional[dict] = None):
    """``module.function(*args)`` (JSON-able in and out) in a fresh Python process, so a kernel that
    faults (an illegal memory access poisons its whole CUDA context) fails that call alone.
    Returns (result, None), or (None, the end of its output) when it failed or ran out of time.
    Under a stage deadline the child gets at most the time left before it, so no child outlives the
    stage (whose own limit ends 45 s after the deadline), and none starts once it has passed."""
    import json
    import subprocess
    import sys

    deadline = stage_deadline()
    if deadline is not None:
        left = deadline - time.time()
        if left <= 1:
            return None, f"not run: the stage deadline ({DEADLINE_ENV}) had passed"
        timeout = min(timeout, left)
    code = f"import json, {module} as m; print('RESULT', json.dumps(m.{function}(*{tuple(args)!r})))"
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                           env=env)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    out = p.stdout + p.stderr
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if p.returncode == 0 and lines:
        return json.loads(lines[-1][len("RESULT "):]), None
    return None, " | ".join(out.strip().splitlines()[-6:])


def _driver_version():
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment_info() -> dict:
    """What results files record about a run (benchmarks/conftest.py for pytest-benchmark, e2e.py for its
    raw file): device, versions, smoke flag; ``benchmarks/results.py`` checks it."""
    import diffaccel
    from diffaccel.ops import _backend

    info = diffaccel.info()  # one place that reads the versions and the GPU
    device = dict(info["gpu"], driver=_driver_version()) if info["gpu"] else None
    return {"smoke": is_smoke(), "device": device, "torch": info["torch"], "cuda": info["torch_cuda"],
            "triton": info["triton"], "diffaccel": info["diffaccel"], "python": info["python"],
            "triton_interpret": info["triton_interpret"], "torchao": _version_of("torchao"),
            # a source tree that was never built runs every op's torch reference: results.py refuses it
            "backend_errors": _backend.gpu_kernels_missing()}


def _version_of(package: str):
    """A baseline package's version, or None when it is not installed (its cases then skip)."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cuda_graph_replay(fn: Callable) -> Callable:
    """``fn`` (no arguments) captured once in a CUDA graph, after warm-up on a side stream (Triton
    compiles, allocations), as torch asks; returns a function that replays it and returns the
    captured output: the GPU work without the per-call host work."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


def positive_int(text: str) -> int:
    """argparse type for counts (--reps, --calls, --rounds, --samples): an int >= 1, so 0 is refused
    at the command line rather than failing in statistics.median([]) after a model was built."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def is_smoke() -> bool:
    """True without CUDA (or with DIFFACCEL_BENCH_SMOKE=1): tiny shapes, one round, nothing recorded."""
    if os.environ.get(SMOKE_ENV, "0") == "1":
        return True
    return not torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cpu" if not torch.cuda.is_available() else "cuda")


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int8: "int8",
            torch.float8_e4m3fn: "fp8e4m3"}.get(dtype, str(dtype).replace("torch.", ""))


def shape_str(shape: Union[str, Sequence[int], dict]) -> str:
    """(4096, 1280) -> '4096x1280'; {'M': 4096, 'K': 1280} -> 'M=4096 K=1280'; strings pass through."""
    if isinstance(shape, str):
        return shape
    if isinstance(shape, dict):
        return " ".join(f"{k}={v}" for k, v in shape.items())
    return "x".join(str(int(s)) for s in shape)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable, inner_calls: int = 1) -> Callable:
    """``fn`` called ``inner_calls`` times, then a CUDA synchronize, so wall clock covers the GPU work."""
    def run():
        for _ in range(inner_calls):
            fn()
        sync()
    return run


def annotate(benchmark, *, family: str, case: str, shape, dtype, impl: str,
             flops: Optional[int] = None, bytes: Optional[int] = None, **extra) -> None:  # noqa: A002
    """Name the group (``<family>/<case>``) and record what ``benchmarks/results.py`` needs."""
    if not (impl == "diffaccel" or impl.startswith("diffaccel:") or impl.startswith("baseline:")):
        raise ValueError(f"impl: expected 'diffaccel', 'diffaccel:<backend>' or 'baseline:<name>', got {impl!r}")
    if isinstance(dtype, torch.dtype):
        dtype = dtype_name(dtype)
    benchmark.group = f"{family}/{case}"
    benchmark.extra_info.update(family=family, case=case, shape=shape_str(shape), dtype=str(dtype), impl=impl,
                                flops=None if flops is None else int(flops),
                                bytes=None if bytes is None else int(bytes), smoke=is_smoke(), **extra)


def measure(benchmark, fn: Callable, *, rounds: int = GPU_ROUNDS, warmup: int = 3):
    """Time ``fn`` (zero arguments, one call of the op) and return its last result."""
    if is_smoke():
        benchmark.extra_info["inner_calls"] = 1
        return benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    for _ in range(warmup):  # compile / autotune / allocate outside the timed rounds
        fn()
    sync()
    start = time.perf_counter()
    probe = 5
    timed(fn, probe)()
    per_call = max((time.perf_counter() - start) / probe, 1e-7)
    inner = max(1, min(MAX_INNER_CALLS, math.ceil(TARGET_ROUND_S / per_call)))
    benchmark.extra_info["inner_calls"] = inner
    benchmark.pedantic(timed(fn, inner), rounds=rounds, iterations=1, warmup_rounds=1)
    return fn()
