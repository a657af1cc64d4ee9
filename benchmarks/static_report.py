"""Static kernel report: resource usage and tensor-core use of every kernel, no GPU needed.

Triton: every entry of each ``diffaccel.kernels.<module>.STATIC_REPORT_CASES`` is compiled with
``triton.compile`` for a ``GPUTarget`` (sm_80, sm_89, sm_90a by default); registers and shared
memory come from the cubin (``cuobjdump --dump-resource-usage``), spills from ``ptxas -v`` re-run
on the same PTX with Triton's flags, tensor-core instructions from the SASS (HMMA/IMMA/HGMMA/...)
and the PTX (mma/wgmma). "In the main loop" means inside a backward branch of the SASS.
Pointer arguments are assumed 16-byte aligned, as the JIT sees torch allocations; integer
arguments only where a case lists them under ``divisible_by_16``. Optional case keys beyond the
brief's format: ``archs`` (e.g. ``["89", "90a"]``: the targets the kernel supports, such as fp8
ones) and ``divisible_by_16`` (integer argument names). A case that fails to compile for a target
it claims is reported as a problem.

CUDA: the ``diffaccel._C`` shared object (``--so PATH``, default the importable one) is read with
``cuobjdump --list-elf / --dump-resource-usage / --dump-sass``: per arch and kernel, registers,
stack, shared memory, local-memory instructions (STL/LDL: spills or stack arrays) and
tensor-core instructions.

    python -m benchmarks.static_report                    # markdown to stdout
    python -m benchmarks.static_report --json report.json --markdown report.md
    python -m benchmarks.static_report --check            # exit 1 if a hot kernel spills / lacks tensor cores
    python -m benchmarks.static_report --check-archs 80,89,90a --so PATH   # exit 1 if _C lacks SASS for an arch

cuobjdump, nvdisasm and ptxas come from Triton's wheel (``triton/backends/nvidia/bin``), else PATH.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional

DEFAULT_ARCHS = ("80", "89", "90a")

# SASS opcodes that run on tensor cores: mma.sync (HMMA/IMMA/DMMA/BMMA, QMMA: fp8 on sm_89),
# Hopper wgmma (HGMMA/IGMMA/QGMMA/BGMMA), Blackwell tcgen05 (UTC*MMA).
SASS_TENSOR_CORE = re.compile(r"^(HMMA|IMMA|QMMA|DMMA|BMMA|OMMA|HGMMA|IGMMA|QGMMA|BGMMA|UTC\w*MMA)$")
PTX_TENSOR_CORE = re.compile(r"\b(wgmma\.mma_async|tcgen05\.mma|mma\.sync|wmma\.mma)\b")
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")
# What each _C kernel must show, first matching regex (on the demangled name) wins. Kernels are
# "hot" (no local-memory spills/stack traffic) unless listed otherwise; authors of tensor-core
# CUDA kernels add their pattern here with tensor_cores=True.
CUDA_EXPECTATIONS = [
    (r"quantize_per_(token|tensor)_kernel", {"hot": True, "tensor_cores": False}),
]
CUDA_DEFAULT_EXPECTATION = {"hot": True, "tensor_cores": False}
REQUIRED_CASE_KEYS = ("name", "fn", "signature", "constexprs", "num_warps", "num_stages", "hot", "tensor_cores")


class ReportError(RuntimeError):
    pass


# -- tools ---------------------------------------------------------------------------------

def tool_path(name: str) -> str:
    """cuobjdump / nvdisasm / ptxas: Triton's copy first (the CUDA toolkit here lacks the first two)."""
    try:
        import triton
        candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        return found
    raise ReportError(f"{name} not found: install triton (ships it in triton/backends/nvidia/bin) "
                      f"or the PyPI package nvidia-cuda-{name}")


def _run(cmd: list, what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ReportError(f"{what} failed ({' '.join(map(str, cmd))}):\n{proc.stderr.strip()}")
    return proc.stdout


def arch_name(arch: str) -> str:
    """'90a' / 'sm_90a' / '9.0a' -> 'sm_90a'."""
    a = str(arch).strip().lower().replace("sm_", "").replace(".", "")
    if not re.fullmatch(r"\d{2,3}[af]?", a):
        raise ValueError(f"arch: expected something like 80, 89 or 90a, got {arch!r}")
    return f"sm_{a}"


# -- SASS / resource-usage parsing ---------------------------------------------------------

def parse_sass(text: str) -> dict:
    """{(arch or None, function): [(addr, opcode, modifiers, operands)]} from cuobjdump --dump-sass."""
    kernels: dict = {}
    arch, func = None, None
    for line in text.splitlines():
        m = re.search(r"code for (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function\s*:\s*(\S+)", line)
        if m:
            func = m.group(1)
            kernels[(arch, func)] = []
            continue
        m = SASS_LINE.search(line)
        if m and func is not None:
            kernels[(arch, func)].append((int(m.group(1), 16), m.group(2), m.group(3), m.group(4).strip()))
    return kernels


def analyse_sass(instrs: list) -> dict:
    """Tensor-core opcodes overall and inside loops; local-memory (spill/stack) instructions."""
    loops = []
    for addr, op, _mods, operands in instrs:
        if op in ("BRA", "JMP"):
            m = re.match(r"(0x[0-9a-f]+)", operands)
            if m:
                target = int(m.group(1), 16)
                if target < addr:  # a backward branch closes a loop; target == addr is the trap tail
                    loops.append((target, addr))
    tc_all, tc_loop = set(), set()
    local_stores = local_loads = 0
    for addr, op, _mods, _operands in instrs:
        if SASS_TENSOR_CORE.match(op):
            tc_all.add(op)
            if any(lo <= addr <= hi for lo, hi in loops):
                tc_loop.add(op)
        elif op == "STL":
            local_stores += 1
        elif op == "LDL":
            local_loads += 1
    return {"sass_tensor_core": sorted(tc_all), "loop_tensor_core": sorted(tc_loop), "loops": len(loops),
            "local_store_instrs": local_stores, "local_load_instrs": local_loads,
            "instructions": len(instrs)}


def parse_resource_usage(text: str) -> dict:
    """{(arch or None, function): {REG, STACK, SHARED, LOCAL, ...}} from cuobjdump --dump-resource-usage."""
    usage: dict = {}
    arch = None
    func = None
    for line in text.splitlines():
        m = re.match(r"\s*arch\s*=\s*(sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function\s+(\S+?):\s*$", line)
        if m:
            func = m.group(1)
            continue
        if func is not None and "REG:" in line:
            usage[(arch, func)] = {k: int(v) for k, v in re.findall(r"([A-Z_]+(?:\[\d+\])?):(\d+)", line)}
            func = None
    return usage


def parse_ptxas_log(text: str) -> dict:
    out = {}
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if m:
        out.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
    m = re.search(r"Used (\d+) registers", text)
    if m:
        out["ptxas_registers"] = int(m.group(1))
    return out


def demangle(names: Iterable[str]) -> dict:
    names = list(names)
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    proc = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    return dict(zip(names, lines)) if proc.returncode == 0 and len(lines) == len(names) else {n: n for n in names}


# -- Triton --------------------------------------------------------------------------------

SOURCE_KERNELS = "_diffaccel_source_kernels"


def kernels_package() -> str:
    """'diffaccel.kernels' (installed or editable), else the checkout's kernels/ folder loaded as
    ``SOURCE_KERNELS`` (run from a clone whose diffaccel/ directory shadows an installed wheel; not
    as the bare name 'kernels', which is Hugging Face's package where that is installed)."""
    try:
        importlib.import_module("diffaccel.kernels")
        return "diffaccel.kernels"
    except ModuleNotFoundError:
        pass
    if SOURCE_KERNELS not in sys.modules:
        folder = Path(__file__).resolve().parents[1] / "kernels"
        spec = importlib.util.spec_from_file_location(SOURCE_KERNELS, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        if spec is None or not (folder / "__init__.py").is_file():
            raise ReportError("neither diffaccel.kernels nor the checkout's kernels/ folder is importable")
        module = importlib.util.module_from_spec(spec)
        sys.modules[SOURCE_KERNELS] = module
        spec.loader.exec_module(module)
    return SOURCE_KERNELS


def kernel_modules(package: Optional[str] = None, names: Optional[Iterable[str]] = None) -> list:
    """The public modules of the kernels package (files starting with '_' are helpers), or ``names``."""
    package = package or kernels_package()
    pkg = importlib.import_module(package)
    known = [m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")]
    if names is None:
        names = known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ReportError(f"--module: no kernels module {', '.join(map(repr, unknown))} (known: {', '.join(known)})")
    return [importlib.import_module(f"{package}.{n}") for n in names]


def collect_cases(modules: Iterable) -> list:
    """(module name, case) for every STATIC_REPORT_CASES entry; a module without the list is an error."""
    cases = []
    for mod in modules:
        short = mod.__name__.rsplit(".", 1)[-1]
        if not hasattr(mod, "STATIC_REPORT_CASES"):
            raise ReportError(f"kernels/{short}.py defines no STATIC_REPORT_CASES (every Triton kernel file must)")
        for case in mod.STATIC_REPORT_CASES:
            missing = [k for k in REQUIRED_CASE_KEYS if k not in case]
            if missing:
                raise ReportError(f"kernels/{short}.py STATIC_REPORT_CASES entry {case.get('name')!r} "
                                  f"lacks {', '.join(missing)}")
            cases.append((short, case))
    return cases


def _compile_triton(case: dict, arch: str):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    fn = case["fn"]
    if not isinstance(fn, JITFunction):
        raise ReportError(f"{case['name']}: fn is {type(fn).__name__}, not a compilable @triton.jit function "
                          "(was TRITON_INTERPRET=1 set when the kernel module was imported? run the report "
                          "in its own process)")
    signature = dict(case["signature"])
    for name in case["constexprs"]:
        signature.setdefault(name, "constexpr")
    unknown = [a for a in signature if a not in fn.arg_names]
    if unknown:
        raise ReportError(f"{case['name']}: signature names {unknown} are not arguments of {fn.__name__}")
    absent = [a for a in fn.arg_names if a not in signature]
    if absent:
        raise ReportError(f"{case['name']}: signature lacks arguments {absent} of {fn.__name__}")
    aligned = [a for a, t in signature.items() if t.startswith("*")] + list(case.get("divisible_by_16", ()))
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=dict(case["constexprs"]), attrs=attrs)
    cap = cap_of(arch)
    # Triton appends the "a" itself for capability >= 90 (sm_90a)
    target = GPUTarget("cuda", cap, 32)
    return triton.compile(src, target=target,
                          options={"num_warps": case["num_warps"], "num_stages": case["num_stages"]})


def _failed_row(module: str, case: dict, arch: str, problem: str) -> dict:
    return {"source": "triton", "module": module, "case": case["name"], "kernel": getattr(case["fn"], "__name__", "?"),
            "arch": arch, "num_warps": case["num_warps"], "num_stages": case["num_stages"],
            "constexprs": dict(case["constexprs"]), "hot": bool(case["hot"]),
            "tensor_cores_expected": bool(case["tensor_cores"]), "registers": None, "stack": None, "shared": None,
            "static_shared": None, "local": None, "spill_stores": None, "spill_loads": None,
            "ptx_tensor_core": [], "sass_tensor_core": [], "loop_tensor_core": [], "loops": 0,
            "local_store_instrs": 0, "local_load_instrs": 0, "instructions": 0, "problems": [problem]}


def triton_case_report(module: str, case: dict, arch: str) -> dict:
    arch = arch_name(arch)
    try:
        kernel = _compile_triton(case, arch)
    except ReportError:
        raise
    except Exception as e:  # a kernel that does not compile for a target it claims is a finding, not a crash
        # Triton's CompilationError puts the source excerpt first and the cause last
        last = next((ln for ln in reversed(str(e).splitlines()) if ln.strip()), type(e).__name__)
        return _failed_row(module, case, arch, f"compile failed: {type(e).__name__}: {last.strip()[:300]}")
    cubin, ptx = kernel.asm["cubin"], kernel.asm["ptx"]
    fname = kernel.metadata.name
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = Path(tmp) / f"{fname}.cubin"
        cubin_path.write_bytes(cubin)
        cuobjdump = tool_path("cuobjdump")
        sass = parse_sass(_run([cuobjdump, "--dump-sass", str(cubin_path)], "cuobjdump --dump-sass"))
        usage = parse_resource_usage(_run([cuobjdump, "--dump-resource-usage", str(cubin_path)],
                                          "cuobjdump --dump-resource-usage"))
        # Triton does not keep ptxas' log; re-run it on the same PTX with Triton's flags for spill counts
        flags = ["-lineinfo", "-v", "--regAllocOptLevel=2"]
        if not kernel.metadata.enable_fp_fusion:
            flags.append("--fmad=false")
        ptxas = _ptxas_figures(ptx, arch, flags, case["name"])
    instrs = next((v for (a, f), v in sass.items() if f == fname), [])
    res = next((v for (a, f), v in usage.items() if f == fname), {})
    sass_info = analyse_sass(instrs)
    row = {
        "source": "triton", "module": module, "case": case["name"], "kernel": fname, "arch": arch,
        "num_warps": case["num_warps"], "num_stages": case["num_stages"],
        "constexprs": {k: v for k, v in case["constexprs"].items()},
        "hot": bool(case["hot"]), "tensor_cores_expected": bool(case["tensor_cores"]),
        "registers": res.get("REG"), "stack": res.get("STACK", ptxas.get("stack")),
        "shared": kernel.metadata.shared, "static_shared": res.get("SHARED"), "local": res.get("LOCAL"),
        "spill_stores": ptxas.get("spill_stores"), "spill_loads": ptxas.get("spill_loads"),
        "ptx_tensor_core": sorted(set(PTX_TENSOR_CORE.findall(ptx))),
        **sass_info,
    }
    row["problems"] = triton_problems(row)
    return row


def _ptxas_figures(ptx: str, arch: str, flags: list, what: str) -> dict:
    """ptxas -v figures for this PTX, cached on disk by content (big kernels take seconds to assemble)."""
    exe = _triton_ptxas(cap_of(arch))
    key = hashlib.sha256("\0".join([ptx, arch, exe, *flags]).encode()).hexdigest()
    cache = Path(os.environ.get("DIFFACCEL_STATIC_REPORT_CACHE",
                                Path.home() / ".cache" / "diffaccel" / "static_report")) / f"{key}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = Path(tmp) / "kernel.ptx"
        ptx_path.write_text(ptx)
        proc = subprocess.run([exe, *flags, f"--gpu-name={arch}", str(ptx_path), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise ReportError(f"{what} ({arch}): ptxas failed:\n{proc.stderr.strip()}")
    figures = parse_ptxas_log(proc.stderr + proc.stdout)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(figures))
    except OSError:
        pass  # a read-only home only costs the re-run next time
    return figures


def cap_of(arch: str) -> int:
    return int(re.sub(r"\D", "", arch_name(arch)))


def _triton_ptxas(cap: int) -> str:
    """The ptxas Triton itself runs for this target (TRITON_PTXAS_PATH honoured), so spill counts match."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(cap).path
    except (ImportError, RuntimeError):
        return tool_path("ptxas")


def triton_problems(row: dict) -> list:
    problems = []
    if row["spill_stores"] is None:
        problems.append("ptxas reported no spill figures")
    elif row["hot"] and (row["spill_stores"] or row["spill_loads"]):
        problems.append(f"hot kernel spills ({row['spill_stores']} B stores, {row['spill_loads']} B loads)")
    if row["tensor_cores_expected"]:
        if not row["sass_tensor_core"]:
            problems.append("no tensor-core instruction in the SASS")
        elif row["loops"] and not row["loop_tensor_core"]:
            problems.append("main loop has no tensor-core instruction")
    return problems


def triton_report(archs: Iterable[str] = DEFAULT_ARCHS, modules: Optional[Iterable] = None) -> list:
    if modules is None:
        modules = kernel_modules()
    rows = []
    for module, case in collect_cases(modules):
        # a case may name the archs it targets (e.g. fp8 kernels: no fp8 tensor cores before sm_89)
        case_archs = {arch_name(a) for a in case.get("archs", archs)}
        for arch in archs:
            if arch_name(arch) in case_archs:
                rows.append(triton_case_report(module, case, arch))
    return rows


# -- CUDA extension ------------------------------------------------------------------------

def default_so() -> str:
    """The importable diffaccel._C file, found without importing it (no torch load needed)."""
    import importlib.util
    spec = importlib.util.find_spec("diffaccel._C")
    if spec is None or not spec.origin:
        raise ReportError("diffaccel._C not found: build the extension or pass --so PATH")
    return spec.origin


def so_archs(so: str) -> dict:
    """{'sass': [...], 'ptx': [...]} archs embedded in the shared object."""
    cuobjdump = tool_path("cuobjdump")
    proc = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0 and "does not contain device code" not in text:
        raise ReportError(f"cuobjdump --list-elf {so} failed:\n{text.strip()}")
    sass = sorted(set(re.findall(r"\bsm_(\d+[af]?)\b", proc.stdout)))
    proc = subprocess.run([cuobjdump, "--list-ptx", so], capture_output=True, text=True)
    ptx = sorted(set(re.findall(r"\bsm_(\d+[af]?)\b", proc.stdout))) if proc.returncode == 0 else []
    return {"sass": sass, "ptx": ptx}


def cuda_report(so: str) -> dict:
    """Per (arch, kernel): registers, stack, shared, local-memory and tensor-core instructions."""
    if not Path(so).is_file():
        raise ReportError(f"--so: no such file {so}")
    archs = so_archs(so)
    report = {"so": str(so), "sass_archs": archs["sass"], "ptx_archs": archs["ptx"], "kernels": []}
    if not archs["sass"]:
        return report
    cuobjdump = tool_path("cuobjdump")
    usage = parse_resource_usage(_run([cuobjdump, "--dump-resource-usage", so], "cuobjdump --dump-resource-usage"))
    sass = parse_sass(_run([cuobjdump, "--dump-sass", so], "cuobjdump --dump-sass"))
    names = demangle({f for _a, f in usage} | {f for _a, f in sass})
    for key in sorted(set(usage) | set(sass), key=lambda k: (k[0] or "", k[1])):
        arch, func = key
        res = usage.get(key, {})
        info = analyse_sass(sass.get(key, []))
        report["kernels"].append({
            "source": "cuda", "arch": arch, "kernel": func, "name": names.get(func, func),
            "registers": res.get("REG"), "stack": res.get("STACK"), "shared": res.get("SHARED"),
            "local": res.get("LOCAL"), **info})
        row = report["kernels"][-1]
        row.update(cuda_expectation(row["name"]))
        row["problems"] = cuda_problems(row)
    return report


def cuda_expectation(name: str) -> dict:
    for pattern, expect in CUDA_EXPECTATIONS:
        if re.search(pattern, name):
            return {"hot": expect["hot"], "tensor_cores_expected": expect["tensor_cores"]}
    return {"hot": CUDA_DEFAULT_EXPECTATION["hot"], "tensor_cores_expected": CUDA_DEFAULT_EXPECTATION["tensor_cores"]}


def cuda_problems(row: dict) -> list:
    problems = []
    if row["hot"] and (row["local_store_instrs"] or row["local_load_instrs"]):
        problems.append(f"hot kernel uses local memory ({row['local_store_instrs']} STL, "
                        f"{row['local_load_instrs']} LDL: spills or a stack array; stack {row['stack']} B)")
    if row["tensor_cores_expected"]:
        if not row["sass_tensor_core"]:
            problems.append("no tensor-core instruction in the SASS")
        elif row["loops"] and not row["loop_tensor_core"]:
            problems.append("main loop has no tensor-core instruction")
    return problems


def missing_archs(so: str, required: Iterable[str]) -> list:
    have = {f"sm_{a}" for a in so_archs(so)["sass"]}
    return [arch_name(a) for a in required if arch_name(a) not in have]


# -- output --------------------------------------------------------------------------------

def _short(name: str, width: int = 80) -> str:
    """'void diffaccel::(anonymous namespace)::k<c10::Half, 256>(c10::Half const*, ...)' -> 'k<Half, 256>'."""
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"\(anonymous namespace\)::|\b(diffaccel|c10|at|cute|cutlass)::", "", name)
    depth = 0
    for i, ch in enumerate(name):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0 and i > 0:
            name = name[:i]
            break
    return name if len(name) <= width else name[: width - 1] + "…"


def _tc(row: dict) -> str:
    if not row["sass_tensor_core"]:
        return "none"
    loop = ",".join(row["loop_tensor_core"]) or "not in a loop"
    return f"{','.join(row['sass_tensor_core'])} (loop: {loop})"


def to_markdown(triton_rows: Optional[list], cuda: Optional[dict]) -> str:
    out = ["# Static kernel report", "",
           "Compiled without a GPU; figures are per thread (registers) and per block (shared memory, bytes).", ""]
    rows = list(triton_rows or []) + list((cuda or {}).get("kernels", []))
    n_bad = sum(bool(r["problems"]) for r in rows)
    out += [f"{len(rows)} kernel configs x archs, {n_bad} with problems.", ""]
    if triton_rows is not None:
        out += ["## Triton kernels", "",
                "| module | case | arch | warps/stages | regs | spills st/ld (B) | shared (B) | tensor cores | hot | problems |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in triton_rows:
            out.append(f"| {r['module']} | {r['case']} | {r['arch']} | {r['num_warps']}/{r['num_stages']} | "
                       f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['shared']} | {_tc(r)} | "
                       f"{'yes' if r['hot'] else 'no'} | {'; '.join(r['problems']) or 'ok'} |")
        out.append("")
    if cuda is not None:
        out += ["## CUDA extension `_C`", "", f"File: `{cuda['so']}`", "",
                f"SASS for: {', '.join('sm_' + a for a in cuda['sass_archs']) or 'none (C++-only build)'}; "
                f"PTX for: {', '.join('sm_' + a for a in cuda['ptx_archs']) or 'none'}", ""]
        if cuda["kernels"]:
            out += ["| arch | kernel | regs | stack (B) | shared (B) | STL/LDL instrs | tensor cores | hot | problems |",
                    "|---|---|---|---|---|---|---|---|---|"]
            for k in cuda["kernels"]:
                out.append(f"| {k['arch']} | `{_short(k['name'])}` | {k['registers']} | {k['stack']} | {k['shared']} | "
                           f"{k['local_store_instrs']}/{k['local_load_instrs']} | {_tc(k)} | "
                           f"{'yes' if k['hot'] else 'no'} | {'; '.join(k['problems']) or 'ok'} |")
            out.append("")
    return "\n".join(out)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.static_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help="Triton targets, e.g. 80,89,90a")
    p.add_argument("--so", help="the _C shared object (default: the importable diffaccel._C)")
    p.add_argument("--triton-only", action="store_true")
    p.add_argument("--cuda-only", action="store_true")
    p.add_argument("--module", action="append", help="only these kernels/ modules (repeatable)")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--markdown", help="write the markdown report here (default: stdout)")
    p.add_argument("--check", action="store_true", help="exit 1 if a hot kernel spills or lacks expected tensor cores")
    p.add_argument("--check-archs", help="only check that _C holds SASS for these archs, e.g. 80,89,90a")
    args = p.parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if args.triton_only and args.cuda_only:
        p.error("--triton-only and --cuda-only together leave nothing to report")
    if not args.cuda_only and not args.check_archs and not archs:
        p.error(f"--archs: expected Triton targets such as 80,89,90a, got {args.archs!r}")
    for a in archs:
        try:
            arch_name(a)
        except ValueError as e:
            p.error(f"--archs: {e}")
    # Under TRITON_INTERPRET=1 @triton.jit builds interpreter objects that cannot be compiled. Only
    # the command does this (before it imports any kernel): importing this module must not change
    # the environment of a test session that runs Triton in the interpreter.
    os.environ.pop("TRITON_INTERPRET", None)

    try:
        if args.check_archs:
            so = args.so or default_so()
            required = [a for a in args.check_archs.split(",") if a.strip()]
            missing = missing_archs(so, required)
            have = so_archs(so)["sass"]
            if missing:
                print(f"{so}: no SASS for {', '.join(missing)} (holds: "
                      f"{', '.join('sm_' + a for a in have) or 'no device code'})", file=sys.stderr)
                return 1
            print(f"{so}: SASS for {', '.join(arch_name(a) for a in required)} present")
            return 0

        triton_rows = cuda = None
        if not args.cuda_only:
            modules = kernel_modules(names=args.module)
            triton_rows = triton_report(archs, modules)
        if not args.triton_only:
            cuda = cuda_report(args.so or default_so())
    except ReportError as e:
        print(f"static_report: {e}", file=sys.stderr)
        return 2

    md = to_markdown(triton_rows, cuda)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    else:
        print(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton_rows, "cuda": cuda}, indent=1) + "\n")
    if args.check:
        bad = [f"{r['module']}.{r['case']} {r['arch']}: {'; '.join(r['problems'])}"
               for r in triton_rows or [] if r["problems"]]
        bad += [f"_C {_short(k['name'])} {k['arch']}: {'; '.join(k['problems'])}"
                for k in (cuda or {}).get("kernels", []) if k["problems"]]
        for line in bad:
            print(f"FAIL {line}", file=sys.stderr)
        if bad:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
