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
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU tensors reach the launchers

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
                          ("check_positive_finite", lambda *a: None)):
            if hasattr(mod, attr):
                saved.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, off)
    try:
        yield
    finally:
        for mod, attr, real in saved:
            setattr(mod, attr, real)


def _linear(preset: str, M: int, K: int = 1280, N: int = 1280, dtype=torch.float16):
    from diffaccel.nn import QuantLinear

    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.nn.Linear(K, N).to(dtype), preset)
    x = torch.randn(M, K, dtype=dtype)
    return lambda: layer(x)


def _attention(L: int = 128, D: int = 64, H: int = 10, quant=None):
    from diffaccel.ops import attention

    q, k, v = (torch.randn(2, H, L, D, dtype=torch.float16) for _ in range(3))
    return lambda: attention(q, k, v, quant=quant)


def _solver_step():
    from diffusers import DPMSolverMultistepScheduler

    from diffaccel.solvers import patch_scheduler

    s = DPMSolverMultistepScheduler()
    patch_scheduler(s)
    s.set_timesteps(20)
    x, u, c = (torch.randn(2, 4, 64, 64, dtype=torch.float16) for _ in range(3))
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
                         lambda: _linear("w8a8", 128, 256, 256)),
    "w8a8-linear-M16": ("QuantLinear w8a8, 256x256, M = 16: one fused kernel", lambda: _linear("w8a8", 16, 256, 256)),
    "fp8-linear-M128": ("QuantLinear fp8, 256x256, M = 128: quantize pass + fp8 GEMM",
                        lambda: _linear("fp8", 128, 256, 256)),
    "w4a16-linear-M1": ("QuantLinear w4a16, 1280x1280, M = 1: split-K GEMM + reduce", lambda: _linear("w4a16", 1)),
    "attention-fp16": ("ops.attention, [2, 10, 128, 64] fp16", _attention),
    "attention-int8": ("ops.attention quant='int8', [2, 10, 128, 64]: k mean, q/k quantize, attention",
                       lambda: _attention(quant="int8")),
    "solver-dpm2m-cfg": ("patched DPMSolverMultistep step_with_guidance, [2, 4, 64, 64] fp16", _solver_step),
}


def time_call(fn, calls: int, rounds: int) -> list:
    """Microseconds per call, one figure per round."""
    for _ in range(max(10, calls // 10)):
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
            fn = factory()
            for mode in modes:
                ctx = _backend.through_dispatcher() if mode == "dispatcher" else contextlib.nullcontext()
                with ctx:
                    us = time_call(fn, calls, rounds)
                rows.append(dict(case=name, what=what, mode=mode, median_us=statistics.median(us),
                                 min_us=min(us), rounds=rounds, calls_per_round=calls))
                print(f"{name:20} {mode:10} {rows[-1]['median_us']:8.1f} us/call", flush=True)
    return rows


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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=None, help="JSON file to write")
    a = p.parse_args(argv)
    names = [n for n in a.cases.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"--cases: unknown {unknown}; expected some of {list(CASES)}")
    rows = run(names, a.calls, a.rounds)
    print(markdown(rows))
    if a.out:
        import triton

        doc = dict(kind="host-overhead", date=datetime.date.today().isoformat(), cpu=_cpu_name(),
                   cores=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                   triton=triton.__version__, commit=_git("rev-parse", "HEAD"),
                   dirty=bool(_git("status", "--porcelain", "--untracked-files=no")), cases=rows)
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
