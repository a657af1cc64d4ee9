"""The package under test is the built one: the extension and the Triton kernels import.

These fail loudly if the source folder shadows the installed wheel (it holds no _C), which
would otherwise turn every extension test into a skip."""
import importlib

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
