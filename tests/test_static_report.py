"""The static kernel report (benchmarks/static_report.py): parsers on known text, checker controls
compiled for real (a spilling kernel and a kernel without tensor cores must be flagged), then
every kernels/ module's STATIC_REPORT_CASES for sm_80 and sm_90a, and the _C extension's archs.

Compilation runs in a subprocess: this process imported triton under TRITON_INTERPRET=1, where
@triton.jit yields interpreter objects. No GPU is needed (ptxas/cuobjdump ship in Triton's wheel).
Set DIFFACCEL_STATIC_REPORT_SO to check a built wheel's _C instead of the importable one.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # appended: an installed diffaccel wheel must not be shadowed by the source tree
    sys.path.append(str(REPO))
from benchmarks import static_report as sr  # noqa: E402

TEST_ARCHS = "80,90a"  # sm_89 adds compile time and shares sm_80's instruction set for these checks
REQUIRED_ARCHS = ("80", "89", "90a")


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(args, timeout=900):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


# -- parsers -------------------------------------------------------------------------------

SASS = """
	code for sm_90a
		Function : gemm_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/              @!P0 BRA 0x0090 ;
        /*0020*/                   HGMMA.64x128x16.F32 R24, gdesc[UR4], R24 ;
        /*0030*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0040*/              @P1 BRA 0x0020 ;
        /*0050*/                   STL [R1], R2 ;
        /*0060*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0068*/                   QMMA.16832.F32.E4M3.E4M3 R4, R8, R12, R4 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x0080;
		Function : copy_kernel
        /*0000*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*0010*/                   LDL R4, [R1] ;
        /*0020*/                   EXIT ;
"""


def test_sass_loops_and_tensor_cores():
    kernels = sr.parse_sass(SASS)
    assert set(kernels) == {("sm_90a", "gemm_kernel"), ("sm_90a", "copy_kernel")}
    gemm = sr.analyse_sass(kernels[("sm_90a", "gemm_kernel")])
    assert gemm["loops"] == 1  # the self-branch at 0x80 is the trap tail, not a loop
    assert gemm["sass_tensor_core"] == ["HGMMA", "HMMA", "QMMA"]  # QMMA: sm_89's fp8 mma
    assert gemm["loop_tensor_core"] == ["HGMMA"]
    assert (gemm["local_store_instrs"], gemm["local_load_instrs"]) == (1, 0)
    copy = sr.analyse_sass(kernels[("sm_90a", "copy_kernel")])
    assert copy["sass_tensor_core"] == [] and copy["loops"] == 0 and copy["local_load_instrs"] == 1


def test_tensor_core_outside_loop_is_a_problem():
    row = {"spill_stores": 0, "spill_loads": 0, "hot": True, "tensor_cores_expected": True,
           "sass_tensor_core": ["HMMA"], "loop_tensor_core": [], "loops": 1}
    assert sr.triton_problems(row) == ["main loop has no tensor-core instruction"]
    row.update(loop_tensor_core=["HMMA"], spill_stores=8)
    assert sr.triton_problems(row) == ["hot kernel spills (8 B stores, 0 B loads)"]
    row.update(hot=False)
    assert sr.triton_problems(row) == []


def test_cuda_kernel_problems():
    row = {"name": "void diffaccel::gemm_kernel<cutlass::half_t>(Params)", "stack": 16, "local_store_instrs": 3,
           "local_load_instrs": 2, "sass_tensor_core": [], "loop_tensor_core": [], "loops": 1}
    row.update(hot=True, tensor_cores_expected=True)
    assert sr.cuda_problems(row) == ["hot kernel uses local memory (3 STL, 2 LDL: spills or a stack array; stack 16 B)",
                                     "no tensor-core instruction in the SASS"]
    assert sr.cuda_expectation("void diffaccel::(anonymous namespace)::quantize_per_token_kernel<c10::Half, 256>"
                               "(c10::Half const*, signed char*, float*, long)") == \
        {"hot": True, "tensor_cores_expected": False}
    assert sr._short("void diffaccel::(anonymous namespace)::quantize_per_token_kernel<c10::Half, 256>"
                     "(c10::Half const*, signed char*, float*, long)") == "quantize_per_token_kernel<Half, 256>"


def test_resource_usage_and_ptxas_log():
    usage = sr.parse_resource_usage(textwrap.dedent("""
        Fatbin elf code:
        arch = sm_80
        Resource usage:
         Common:
          GLOBAL:0
         Function _Z3fooPf:
          REG:40 STACK:16 SHARED:1024 LOCAL:0 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0
        arch = sm_90a
        Resource usage:
         Function _Z3fooPf:
          REG:64 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0
        """))
    assert usage[("sm_80", "_Z3fooPf")]["REG"] == 40 and usage[("sm_80", "_Z3fooPf")]["STACK"] == 16
    assert usage[("sm_90a", "_Z3fooPf")]["REG"] == 64
    log = ("ptxas info    : Function properties for k\n"
           "    288 bytes stack frame, 280 bytes spill stores, 272 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert sr.parse_ptxas_log(log) == {"stack": 288, "spill_stores": 280, "spill_loads": 272, "ptxas_registers": 255}


def test_importing_the_report_leaves_the_interpreter_setting_alone():
    # tests/conftest.py sets TRITON_INTERPRET=1 without CUDA; only the command may clear it
    expected = os.environ.get("TRITON_INTERPRET")
    import importlib
    importlib.reload(sr)
    assert os.environ.get("TRITON_INTERPRET") == expected


@pytest.mark.parametrize("argv, message", [
    (["--archs", ","], "--archs: expected Triton targets"),
    (["--archs", "75x"], "--archs: arch: expected something like 80"),
    (["--triton-only", "--cuda-only"], "leave nothing to report"),
])
def test_bad_arguments_are_refused_before_any_work(argv, message, capsys):
    """--archs , / --triton-only --cuda-only passed --check with nothing checked (exit 0); --archs
    75x raised a ValueError traceback."""
    with pytest.raises(SystemExit) as e:
        sr.main(argv + ["--check"])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_an_unknown_module_is_named(capsys, monkeypatch):
    # (main drops TRITON_INTERPRET for the compiles it runs: monkeypatch puts the session's value back)
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    assert sr.main(["--module", "nope", "--triton-only"]) == 2  # (was ModuleNotFoundError)
    assert "--module: no kernels module 'nope'" in capsys.readouterr().err


def test_arch_names():
    assert [sr.arch_name(a) for a in ("80", "sm_89", "9.0a", "90a")] == ["sm_80", "sm_89", "sm_90a", "sm_90a"]
    with pytest.raises(ValueError, match="arch"):
        sr.arch_name("hopper")


# -- the checker, compiled for real --------------------------------------------------------

CONTROLS = '''
import json, sys
import triton
import triton.language as tl
from benchmarks import static_report as sr

@triton.jit
def dot_loop(a, b, c, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    m = tl.arange(0, BM); n = tl.arange(0, BN); k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        x = tl.load(a + m[:, None] * K + k0 + k[None, :])
        y = tl.load(b + (k0 + k[:, None]) * BN + n[None, :])
        acc += tl.dot(x, y)
    tl.store(c + m[:, None] * BN + n[None, :], acc)

@triton.jit
def scale_loop(x, y, n, BLOCK: tl.constexpr):
    for s in range(0, n, BLOCK):
        o = s + tl.arange(0, BLOCK)
        tl.store(y + o, tl.load(x + o, mask=o < n) * 2.0, mask=o < n)

def case(name, fn, sig, consts, warps, tc):
    return {"name": name, "fn": fn, "signature": sig, "constexprs": consts, "num_warps": warps,
            "num_stages": 2, "hot": True, "tensor_cores": tc}

dot_sig = {"a": "*fp16", "b": "*fp16", "c": "*fp32", "K": "i32"}
rows = [
    sr.triton_case_report("controls", case("dot_ok", dot_loop, dot_sig, {"BM": 64, "BN": 64, "BK": 32}, 4, True), "90a"),
    sr.triton_case_report("controls", case("dot_ok", dot_loop, dot_sig, {"BM": 64, "BN": 64, "BK": 32}, 4, True), "80"),
    # a 256x256 fp32 accumulator over 128 threads is 512 values a thread: more than the 255 registers
    sr.triton_case_report("controls", case("dot_spills", dot_loop, dot_sig, {"BM": 256, "BN": 256, "BK": 32}, 4, True), "80"),
    sr.triton_case_report("controls", case("no_dot", scale_loop, {"x": "*fp32", "y": "*fp32", "n": "i32"},
                                            {"BLOCK": 1024}, 4, True), "90a"),
]
json.dump(rows, sys.stdout)
'''


@pytest.fixture(scope="module")
def control_rows(tmp_path_factory):
    script = tmp_path_factory.mktemp("controls") / "controls.py"
    script.write_text(CONTROLS)
    proc = _run([str(script)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {(r["case"], r["arch"]): r for r in json.loads(proc.stdout)}


def test_controls_tensor_cores_found_in_main_loop(control_rows):
    hopper, ampere = control_rows[("dot_ok", "sm_90a")], control_rows[("dot_ok", "sm_80")]
    assert "HGMMA" in hopper["loop_tensor_core"] and "wgmma.mma_async" in hopper["ptx_tensor_core"]
    assert "HMMA" in ampere["loop_tensor_core"] and "mma.sync" in ampere["ptx_tensor_core"]
    assert hopper["problems"] == [] and ampere["problems"] == []
    assert isinstance(hopper["registers"], int) and hopper["registers"] > 0


def test_controls_spill_and_missing_tensor_cores_are_flagged(control_rows):
    spills = control_rows[("dot_spills", "sm_80")]
    assert spills["spill_stores"] > 0
    assert any(p.startswith("hot kernel spills") for p in spills["problems"])
    no_dot = control_rows[("no_dot", "sm_90a")]
    assert no_dot["sass_tensor_core"] == [] and no_dot["problems"] == ["no tensor-core instruction in the SASS"]


# -- the project's kernels -----------------------------------------------------------------

KERNEL_MODULES = sorted(p.stem for p in (REPO / "kernels").glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_triton_kernels_do_not_spill_and_use_tensor_cores(module, tmp_path):
    out = tmp_path / "report.json"
    proc = _run(["-m", "benchmarks.static_report", "--triton-only", "--module", module, "--archs", TEST_ARCHS,
                 "--json", str(out), "--markdown", str(tmp_path / "report.md"), "--check"])
    assert proc.returncode in (0, 1), f"report failed to run:\n{proc.stderr[-4000:]}"
    rows = json.loads(out.read_text())["triton"]
    assert rows, f"kernels/{module}.py: STATIC_REPORT_CASES is empty"
    problems = [f"{r['case']} {r['arch']}: {'; '.join(r['problems'])}" for r in rows if r["problems"]]
    assert not problems, "\n".join(problems)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _extension_so():
    path = os.environ.get("DIFFACCEL_STATIC_REPORT_SO")
    if path:
        return path
    try:
        return sr.default_so()
    except sr.ReportError as e:
        pytest.skip(str(e))


def test_cuda_extension_archs_and_kernels():
    so = _extension_so()
    archs = sr.so_archs(so)
    if not archs["sass"]:
        pytest.skip(f"{so} is a C++-only build (no device code); the CI's wheel build checks the CUDA kernels")
    missing = sr.missing_archs(so, REQUIRED_ARCHS)
    assert not missing, f"{so}: no SASS for {missing}"
    report = sr.cuda_report(so)
    assert report["kernels"], f"{so}: device code but no kernels parsed"
    problems = [f"{k['arch']} {sr._short(k['name'])}: {'; '.join(k['problems'])}"
                for k in report["kernels"] if k["problems"]]
    assert not problems, "\n".join(problems)


def test_check_archs_cli_fails_on_a_missing_arch():
    so = _extension_so()
    proc = _run(["-m", "benchmarks.static_report", "--check-archs", "80,89,90a,100a", "--so", so], timeout=120)
    assert proc.returncode == 1 and "sm_100a" in proc.stderr
