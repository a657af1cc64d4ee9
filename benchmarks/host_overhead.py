"""Host time of one eager call: what diffaccel's Python costs before a GPU sees a kernel.

An eager denoising step of a patched SDXL UNet makes hundreds of these calls; on the H200 the
SDXL-sized ops took 0.2-0.4 ms each where their kernels need a fraction of that (BENCHMARKS.md),
so this path decides eager speed. Measured on CPU tensors with the kernel launches stubbed out
(the Triton interpreter's launch replaced by a no-op, backend forced to Triton): what is timed
is the module's forward, the argument checks, the backend choice, the custom-op call, the output
allocation and the launchers' own Python (grid, config). Not timed: Triton's JIT launcher
(argument binding, specialisation, the driver call), which only a GPU runs.

Each case is timed twice in the same process: ``direct`` (the default: a plain eager call runs
the op's body, ``diffaccel.ops._backend.direct_call_ok``) and ``dispatcher`` (every call through
the torch dispatcher, as before the fast path; ``_backend.through_dispatcher``).

    python -m benchmarks.host_overhead [--out benchmarks/results/host-overhead-<date>.json]

``--gpu`` (on a CUDA machine) measures what the CPU run cannot: the same cases on CUDA tensors,
kernels compiled and autotuned first, the backend the automatic choice picks (and Triton forced
where that differs). Per call, three figures: ``python_us`` with every Triton launch stubbed
(diffaccel's Python, the _C launches that are not Triton's, allocation from the caching
allocator), ``host_us`` with the real launches until the loop returns (``python_us`` plus
Triton's JIT launcher and the driver), and ``wall_us`` until the GPU has finished. Shapes are
small, so the GPU work per call is a few microseconds: where ``wall_us`` is close to
``host_us``, the host decides the speed of an eager call.

    python -m benchmarks.host_overhead --gpu [--out ...]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

if "--gpu" not in sys.argv[1:]:  # decided before triton is imported: CPU tensors reach the launchers
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

GUIDANCE = 7.5


@contextlib.contextmanager
def launches_stubbed():
    """Every Triton launch returns at once (outputs stay uninitialised: only host time matters here)."""
    from triton.runtime.interpreter import InterpretedFunction

    real = InterpretedFunction.run
    InterpretedFunction.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        InterpretedFunction.run = real


@contextlib.contextmanager
def value_checks_off():
    """Skip the checks that read tensor values (scales > 0, zero point in range). They run only on
    CPU tensors (on a GPU each would be a host sync), so a GPU call never pays them; and with the
    launches stubbed, the scales they would read were never written. Every such check asks
    ``_checks.values_readable``; a tree from before it (the baseline commit) asked gemm's
    ``_value_checks_enabled`` or called ``check_positive_finite`` unguarded."""
    saved = []
    for name, mod in list(sys.modules.items()):
        if not name.startswith("diffaccel.ops"):
            continue
        for attr, off in (("values_readable", lambda t: False), ("_value_checks_enabled", lambda t: False),
                          ("check_positive_finite", lambda *a, **k: None)):
            if hasattr(mod, attr):
                saved.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, off)
    try:
        yield
    finally:
        for mod, attr, real in saved:
            setattr(mod, attr, real)


def _linear(preset: str, M: int, K: int = 1280, N: int = 1280, dtype=torch.float16, device="cpu"):
    from diffaccel.nn import QuantLinear

    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.nn.Linear(K, N).to(dtype), preset).to(device)
    x = torch.randn(M, K, dtype=dtype, device=device)
    return lambda: layer(x)


def _attention(L: int = 128, D: int = 64, H: int = 10, quant=None, device="cpu"):
    from diffaccel.ops import attention

    q, k, v = (torch.randn(2, H, L, D, dtype=torch.float16, device=device) for _ in range(3))
    return lambda: attention(q, k, v, quant=quant)


def _solver_step(device="cpu"):
    from diffusers import DPMSolverMultistepScheduler

    from diffaccel.solvers import patch_scheduler

    s = DPMSolverMultistepScheduler()
    patch_scheduler(s)
    s.set_timesteps(20, device=device)
    x, u, c = (torch.randn(2, 4, 64, 64, dtype=torch.float16, device=device) for _ in range(3))
    s.model_outputs = [torch.randn_like(x) for _ in s.model_outputs]
    s.lower_order_nums = s.config.solver_order
    t = s.timesteps[10]

    def step():
        s._step_index = 10  # the same mid-trajectory step every call
        return s.step_with_guidance(u, c, GUIDANCE, t, x)
    return step


# name: (what it is, factory of a zero-argument call). Shapes are small: no kernel runs, and CPU
# tensors of SDXL size would add CPU allocation and torch-op time a GPU call does not have; only the
# path matters, which M selects (quantize pass + GEMM above FUSED_QUANT_MAX_M = 64, one fused
# kernel at or below it; split-K for the weight-only GEMM at small M).
CASES = {
    "w8a8-linear-M128": ("QuantLinear w8a8, 256x256, M = 128: quantize pass + int8 GEMM",
                         lambda dev: _linear("w8a8", 128, 256, 256, device=dev)),
    "w8a8-linear-M16": ("QuantLinear w8a8, 256x256, M = 16: one fused kernel",
                        lambda dev: _linear("w8a8", 16, 256, 256, device=dev)),
    "fp8-linear-M128": ("QuantLinear fp8, 256x256, M = 128: quantize pass + fp8 GEMM",
                        lambda dev: _linear("fp8", 128, 256, 256, device=dev)),
    "w4a16-linear-M1": ("QuantLinear w4a16, 1280x1280, M = 1: split-K GEMM + reduce",
                        lambda dev: _linear("w4a16", 1, device=dev)),
    "attention-fp16": ("ops.attention, [2, 10, 128, 64] fp16", lambda dev: _attention(device=dev)),
    "attention-int8": ("ops.attention quant='int8', [2, 10, 128, 64]: k mean, q/k quantize, attention",
                       lambda dev: _attention(quant="int8", device=dev)),
    "solver-dpm2m-cfg": ("patched DPMSolverMultistep step_with_guidance, [2, 4, 64, 64] fp16",
                         lambda dev: _solver_step(device=dev)),
}


def _int8_gemm_codes(M: int, N: int, K: int, device="cpu"):
    from diffaccel.ops import gemm as G

    torch.manual_seed(0)
    a, sa = G.quantize_activation_int8(torch.randn(M, K, dtype=torch.float16, device=device))
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
    ws = torch.rand(N, device=device) * 0.01 + 1e-4
    return lambda: G.int8_gemm(a, w, sa, ws, out_dtype=torch.float16)


# GPU runs only (CPU tensors this size would time CPU allocation): a shape whose GEMM needs a few tens
# of microseconds on an H200, which took 0.27 ms per call there on 2026-12-04 (bench_gemm
# w8a8-gemm-only): wall against host tells whether the host or the kernel set that time
GPU_ONLY_CASES = {
    "int8-gemm-sdxl-attn-M4096": ("ops.int8_gemm on int8 codes, M = 4096, N = K = 1280 (sdxl-attn1280)",
                                  lambda dev: _int8_gemm_codes(4096, 1280, 1280, device=dev)),
}
# the op whose backend a case's main kernel takes (the GPU run adds a Triton-forced row where the
# automatic choice is another backend)
CASE_OPS = {"w8a8-linear-M128": "int8_linear", "w8a8-linear-M16": "int8_linear", "fp8-linear-M128": "fp8_gemm",
            "w4a16-linear-M1": "weight_only_gemm", "attention-fp16": "attention", "attention-int8": "attention_int8",
            "solver-dpm2m-cfg": "fused_solver_step", "int8-gemm-sdxl-attn-M4096": "int8_act_gemm"}


def time_call(fn, calls: int, rounds: int, warmup: int = None) -> list:
    """Microseconds per call, one figure per round."""
    for _ in range(max(10, calls // 10) if warmup is None else warmup):
        fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls * 1e6)
    return out


def run(names, calls: int = 500, rounds: int = 7) -> list:
    from diffaccel.ops import _backend, use_backend

    # a tree from before the fast path has one mode (this file runs unchanged against an older
    # checkout, which is how the table's baseline commit is measured)
    modes = ("direct", "dispatcher") if hasattr(_backend, "through_dispatcher") else ("default",)
    rows = []
    with launches_stubbed(), value_checks_off(), use_backend("triton"), torch.no_grad():
        for name in names:
            what, factory = CASES[name]
            fn = factory("cpu")
            for mode in modes:
                ctx = _backend.through_dispatcher() if mode == "dispatcher" else contextlib.nullcontext()
                with ctx:
                    us = time_call(fn, calls, rounds)
                rows.append(dict(case=name, what=what, mode=mode, median_us=statistics.median(us),
                                 min_us=min(us), rounds=rounds, calls_per_round=calls))
                print(f"{name:20} {mode:10} {rows[-1]['median_us']:8.1f} us/call", flush=True)
    return rows


@contextlib.contextmanager
def gpu_launches_stubbed():
    """On the GPU: every Triton launch (JIT kernels and autotuned ones, whose cache hit ends in the
    same call) returns at once; _C kernels still launch."""
    from triton.runtime.jit import JITFunction

    real = JITFunction.run
    JITFunction.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        JITFunction.run = real


def time_gpu_call(fn, calls: int, rounds: int, sync) -> tuple:
    """(host, wall) microseconds per call, one figure per round: host until the loop of calls returns,
    wall until the GPU has finished it. ``calls`` small enough that the launch queue never fills
    (a full queue would make the host wait for the GPU)."""
    host, wall = [], []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        host.append((t1 - t0) / calls * 1e6)
        wall.append((t2 - t0) / calls * 1e6)
    return host, wall


def run_gpu(names, calls: int = 100, rounds: int = 7, device="cuda", warmup: int = 20, on_row=None) -> list:
    """Each case on CUDA tensors, with the automatic backend and, where that is not Triton, with
    Triton forced; per call python_us (Triton launches stubbed), host_us and wall_us (module
    docstring). ``on_row(rows)`` after each row (main saves the JSON there); under gpu_session.sh's
    stage deadline no case starts after it. (``device="cpu"`` only exercises this code in the CPU
    tests: there the stub does not apply, as the interpreter does not launch through JITFunction.run.)"""
    from benchmarks._util import past_deadline
    from diffaccel.ops import _backend, use_backend

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    with torch.no_grad():
        for i, name in enumerate(names):
            if past_deadline():
                print(f"stage deadline passed: not run {', '.join(names[i:])}", flush=True)
                break
            what, factory = {**CASES, **GPU_ONLY_CASES}[name]
            fn = factory(dev)
            auto = _backend.choose(CASE_OPS[name], dev)[0]
            for backend in dict.fromkeys((auto, "triton")):
                ctx = contextlib.nullcontext() if backend == auto else use_backend("triton")
                with ctx:
                    for _ in range(warmup):  # compile, autotune, warm the allocator
                        fn()
                    sync()
                    host, wall = time_gpu_call(fn, calls, rounds, sync)
                    with gpu_launches_stubbed():
                        python = time_call(fn, calls, rounds, warmup=0)
                    sync()
                row = dict(case=name, what=what, mode="auto" if backend == auto else "triton-forced", backend=backend,
                           python_us=statistics.median(python), host_us=statistics.median(host),
                           wall_us=statistics.median(wall), rounds=rounds, calls_per_round=calls)
                rows.append(row)
                print(f"{name:20} {row['mode']:13} {backend:7} python {row['python_us']:7.1f}  host "
                      f"{row['host_us']:7.1f}  wall {row['wall_us']:7.1f} us/call", flush=True)
                if on_row is not None:
                    on_row(rows)
    return rows


def markdown_gpu(rows: list) -> str:
    lines = ["| case | what | mode (backend) | python us/call | host us/call | wall us/call |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['what']} | {r['mode']} ({r['backend']}) | {r['python_us']:.1f} | "
                     f"{r['host_us']:.1f} | {r['wall_us']:.1f} |")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def markdown(rows: list) -> str:
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    by_case: dict = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["mode"]] = r
    lines = ["| case | what | " + " | ".join(f"{m} us/call" for m in modes) + " |", "|---|---|" + "---|" * len(modes)]
    for case, m in by_case.items():
        what = next(iter(m.values()))["what"]
        lines.append(f"| {case} | {what} | " + " | ".join(f"{m[k]['median_us']:.1f}" if k in m else "—"
                                                        for k in modes) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from benchmarks._util import positive_int

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=None, help=f"comma-separated, of: {', '.join(CASES)} (all); with --gpu also "
                                                f"{', '.join(GPU_ONLY_CASES)}")
    p.add_argument("--calls", type=positive_int, default=500)
    p.add_argument("--rounds", type=positive_int, default=7)
    p.add_argument("--out", default=None, help="JSON file to write")
    p.add_argument("--gpu", action="store_true", help="on CUDA tensors, real launches (module docstring)")
    a = p.parse_args(argv)
    known = {**CASES, **GPU_ONLY_CASES} if a.gpu else CASES
    names = [n for n in (a.cases or ",".join(known)).split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"--cases: unknown {unknown}; expected some of {list(known)}")
    if a.gpu and not torch.cuda.is_available():
        p.error("--gpu: no CUDA device here")
    import triton

    from benchmarks._util import write_json

    doc = dict(kind="host-overhead-gpu" if a.gpu else "host-overhead", date=datetime.date.today().isoformat(),
               cpu=_cpu_name(), cores=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
               triton=triton.__version__, commit=_git("rev-parse", "HEAD"),
               dirty=bool(_git("status", "--porcelain", "--untracked-files=no")), cases=[])
    if a.gpu:
        doc["device"] = torch.cuda.get_device_name()

    def save(rows):
        if a.out:
            doc["cases"] = rows
            write_json(a.out, doc)

    if a.gpu:
        # at most 100 calls a round: with up to four launches a call, the launch queue (about a
        # thousand entries) never fills, which would make the host wait for the GPU
        rows = run_gpu(names, min(a.calls, 100), a.rounds, on_row=save)
        print(markdown_gpu(rows))
    else:
        rows = run(names, a.calls, a.rounds)
        print(markdown(rows))
    save(rows)
    if a.out:
        print(f"wrote {a.out}")
    missing = [n for n in names if n not in {r["case"] for r in rows}]
    if missing:
        print(f"NOT RUN (stage deadline): {', '.join(missing)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
