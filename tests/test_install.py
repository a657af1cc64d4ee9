"""The package under test is the built one: the extension and the Triton kernels import.

These fail loudly if the source folder shadows the installed wheel (it holds no _C), which
would otherwise turn every extension test into a skip."""
import importlib

import pytest
import torch

import diffaccel
from diffaccel.ops import _backend


def test_extension_is_loaded():
    assert _backend.extension() is not None, _backend.extension_error()


def test_triton_kernels_are_importable():
    assert _backend.triton_error() is None, _backend.triton_error()
    importlib.import_module("diffaccel.kernels.quantize")


def test_extension_registers_its_ops():
    assert hasattr(torch.ops.diffaccel, "ext_quantize_per_token")
    archs = _backend.extension_cuda_archs()
    if torch.version.cuda is not None and archs:
        assert "9.0a" in archs, archs


def test_info_reports_every_op():
    d = diffaccel.info()
    ops = {row["op"] for row in d["ops"]}
    assert {"quantize_per_tensor", "quantize_per_token"} <= ops
    text = diffaccel._info.format_info(d)
    assert "quantize_per_token" in text and d["torch"] == torch.__version__


def test_cli_info_runs():
    from diffaccel.__main__ import main

    assert main(["info"]) == 0
    assert main(["info", "--json"]) == 0


def test_the_checkouts_kernels_folder_does_not_shadow_hugging_faces_kernels():
    """Run from the checkout's root (python -m benchmarks.e2e, python -c), the top-level kernels/ folder
    was found as `kernels`, which transformers imports as Hugging Face's package: importing a diffusers
    model failed ("cannot import name 'CUDAProperties' from 'kernels'"). It now hands the name over."""
    import importlib.machinery
    import os
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    others = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != str(repo)])
    expected = others.origin if others is not None else str(repo / "kernels" / "__init__.py")
    proc = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == expected


# -- GPU dispatch and arch gating, decided on CPU (nothing is launched: only the choice) -------------

class _FakeExtension:
    """What _backend reads of the built _C: its CUDA arch list and whether the sm_90a CUTLASS GEMMs
    were compiled in."""

    def __init__(self, archs: str, cutlass_sm90: bool):
        self._archs, self._cutlass = archs, cutlass_sm90

    def cuda_archs(self):
        return self._archs

    def cutlass_sm90(self):
        return self._cutlass


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(cap, archs, cutlass_sm90): a CUDA device of capability ``cap`` and an extension built
    for ``archs`` (e.g. "8.0;8.9;9.0a"); returns cuda:0. The choice caches are cleared on each call and
    afterwards, so no fake answer outlives the test."""
    monkeypatch.delenv(_backend.ENV_BACKEND, raising=False)
    monkeypatch.setattr(_backend, "triton_error", lambda: None)  # (as if triton imported: a GPU install)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    # the uncached body, so it reads the fake extension below
    monkeypatch.setattr(_backend, "extension_cuda_archs", _backend.extension_cuda_archs.__wrapped__)

    def clear():
        _backend._choose.cache_clear()
        _backend._uncovered.cache_clear()

    def setup(cap, archs, cutlass_sm90=True):
        ext = _FakeExtension(archs, cutlass_sm90)
        monkeypatch.setattr(_backend, "extension", lambda: ext)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        clear()
        return torch.device("cuda", 0)

    yield setup
    clear()


FULL_BUILD = "8.0;8.9;9.0a"  # the default arch list (DESIGN.md)


def _why(op, backend, dev):
    return _backend._why_not(_backend.registered_ops()[op], backend, dev)


def test_sm90_cutlass_ops_run_on_sm90_only(fake_gpu):
    """int8_linear's _C kernel is the sm_90a CUTLASS GEMM (cuda_capabilities ((9, 0),)): on sm_80 / sm_89
    it must not be chosen even though _C holds code for those archs; Triton runs there."""
    for cap in ((8, 0), (8, 9)):
        dev = fake_gpu(cap, FULL_BUILD)
        sm = f"sm_{cap[0]}{cap[1]}"
        for op in ("int8_linear", "int8_act_gemm"):
            assert _why(op, "cuda", dev) == f"{op}'s _C kernel runs on sm_90 only (this GPU is {sm})"
            assert _backend.choose(op, dev) == ("triton", "fastest available")
        # fp8_gemm on sm_80: neither the sm_90 _C kernel nor the sm_89+ Triton one
        if cap == (8, 0):
            assert _backend.choose("fp8_gemm", dev) == ("torch", "no GPU kernel available")
        else:
            assert _backend.choose("fp8_gemm", dev) == ("triton", "fastest available")


def test_c_is_preferred_over_triton_where_both_run(fake_gpu):
    """On sm_90 with a 9.0a build that compiled CUTLASS: _C first (then, for the calls its kernel
    declines, Triton); an op whose _C kernel runs on every built arch takes _C on sm_80 too."""
    dev = fake_gpu((9, 0), FULL_BUILD)
    for op in ("int8_linear", "int8_act_gemm", "fp8_gemm"):
        assert _why(op, "cuda", dev) is None and _why(op, "triton", dev) is None
        assert _backend.choose(op, dev) == ("cuda", "fastest available (calls it does not cover: triton)")
    assert _backend.choose("quantize_per_token", dev) == ("cuda", "fastest available")
    # per call: a per-channel int8 GEMM above the fused-quantization size runs on _C, an int4 one on Triton
    op = _backend.registered_ops()["int8_linear"]
    M, K, N = 128, 64, 32
    x, bias = torch.zeros(M, K, dtype=torch.float16), torch.zeros(N)
    w8, s8 = torch.zeros(N, K, dtype=torch.int8), torch.ones(N)
    args8 = (x, w8, s8, None, None, None, None, bias, 0, False, torch.float16)
    assert _backend.implementation("int8_linear", dev, args8) is op.cuda
    w4, s4 = torch.zeros(N, K // 2, dtype=torch.uint8), torch.ones(N, K // 32)
    args4 = (x, w4, s4, None, None, None, None, bias, 32, True, torch.float16)
    assert _backend.implementation("int8_linear", dev, args4) is op.triton
    for cap in ((8, 0), (8, 9)):
        dev = fake_gpu(cap, FULL_BUILD)
        assert _backend.choose("quantize_per_token", dev) == ("cuda", "fastest available")


def test_cutlass_ops_need_the_kernels_compiled(fake_gpu):
    """A 9.0a build without CUTLASS (_C.cutlass_sm90() False) holds no ext_*_sm90 kernels: on sm_90
    int8_linear takes Triton, while the ops without that requirement still take _C."""
    dev = fake_gpu((9, 0), FULL_BUILD, cutlass_sm90=False)
    for op in ("int8_linear", "int8_act_gemm", "fp8_gemm"):
        assert _why(op, "cuda", dev) == (f"{op}'s _C kernel was not compiled in this build "
                                         f"(_C.cutlass_sm90() is False)")
        assert _backend.choose(op, dev) == ("triton", "fastest available")
    assert _backend.choose("quantize_per_token", dev) == ("cuda", "fastest available")


def test_c_needs_code_for_this_exact_arch(fake_gpu):
    """The built arch must be the GPU's, minor version included: sm_89 (or sm_90a) SASS does not run on
    an sm_80 GPU, so a build narrowed to "8.9;9.0a" falls back to Triton there."""
    dev = fake_gpu((8, 0), "8.9;9.0a")
    assert _why("quantize_per_token", "cuda", dev) == "_C holds no code for sm_80 (built: 8.9;9.0a)"
    assert _backend.choose("quantize_per_token", dev) == ("triton", "fastest available")
    assert _why("int8_linear", "cuda", dev) == "_C holds no code for sm_80 (built: 8.9;9.0a)"
    # the 'a' suffix names the arch-specific variant of 9.0, which an sm_90 GPU runs
    dev = fake_gpu((9, 0), "9.0a")
    assert _backend.choose("int8_linear", dev)[0] == "cuda"
    assert _backend.choose("quantize_per_token", dev) == ("cuda", "fastest available")
    assert _backend._arch_matches("9.0a", (9, 0)) and _backend._arch_matches("8.9", (8, 9))
    assert not _backend._arch_matches("8.9", (8, 0)) and not _backend._arch_matches("9.0a", (8, 0))
    # a C++-only build (no CUDA sources)
    dev = fake_gpu((9, 0), "")
    assert _why("quantize_per_token", "cuda", dev) == "_C was built without CUDA sources"
    assert _backend.choose("int8_linear", dev) == ("triton", "fastest available")
