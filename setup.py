"""Build of diffaccel: one extension, diffaccel._C, compiled with ninja.

CUDA sources are compiled whenever a CUDA toolkit and a CUDA build of torch are present
(no GPU needed). Environment:
  DIFFACCEL_CUDA_ARCH        archs to build, default "8.0;8.9;9.0a"
  DIFFACCEL_SKIP_CUDA_BUILD  1: build the C++ part only
  CUTLASS_DIR                a CUTLASS checkout (include/ and tools/util/include/); else the headers
                             of the nvidia-cutlass package; needed for the Hopper W8A8 GEMM (9.0a)
  CUDA_HOME / CUDA_PATH      the toolkit; else found by following nvcc on PATH
  MAX_JOBS                   parallel compile jobs (ninja)
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.9;9.0a"


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and \
        os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def resolve_cuda_home():
    """The real toolkit folder. The nvcc on PATH may be a wrapper script outside the toolkit
    (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`); torch would then guess CUDA_HOME from the
    wrapper's folder and the link fails with `cannot find -lcudart`."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path:
            if not _is_toolkit(path):
                sys.exit(f"diffaccel setup: {var}={path} is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h)")
            return path
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return _is_toolkit("/usr/local/cuda") and "/usr/local/cuda" or None
    nvcc = os.path.realpath(nvcc)
    candidate = os.path.dirname(os.path.dirname(nvcc))
    if _is_toolkit(candidate):
        return candidate
    try:  # a wrapper script: follow the path it execs
        with open(nvcc, "r", errors="ignore") as f:
            text = f.read(4096)
        for match in re.finditer(r"(/[^\s\"']+/bin/nvcc)\b", text):
            candidate = os.path.dirname(os.path.dirname(os.path.realpath(match.group(1))))
            if _is_toolkit(candidate):
                return candidate
    except OSError:
        pass
    return None


def find_cutlass():
    """[include dirs] of CUTLASS 3 headers, or None. Located without importing the package (it
    imports cuda-python at import time)."""
    roots = []
    if os.environ.get("CUTLASS_DIR"):
        roots.append(os.environ["CUTLASS_DIR"])
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.origin:
        roots.append(os.path.join(os.path.dirname(spec.origin), "source"))
    for root in roots:
        dirs = [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
        if all(os.path.isdir(d) for d in dirs) and \
                os.path.isfile(os.path.join(dirs[0], "cutlass", "gemm", "collective", "collective_builder.hpp")):
            return dirs
    return None


def gencode_flags(archs):
    flags = []
    for arch in archs:
        if not re.fullmatch(r"\d+\.\d+[af]?", arch):
            sys.exit(f"diffaccel setup: DIFFACCEL_CUDA_ARCH entry {arch!r} is not like 8.0, 8.9 or 9.0a")
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def build_extension():
    cuda_home = None
    skip_cuda = os.environ.get("DIFFACCEL_SKIP_CUDA_BUILD", "0") == "1"
    if not skip_cuda:
        cuda_home = resolve_cuda_home()
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = not skip_cuda and cuda_home is not None and torch.version.cuda is not None
    if not skip_cuda and not with_cuda:
        why = "no CUDA toolkit found" if cuda_home is None else f"torch {torch.__version__} is a CPU build"
        print(f"diffaccel setup: building C++ only ({why})", file=sys.stderr)

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    cxx_flags = ["-O3", "-std=c++20"]
    archs = [a for a in os.environ.get("DIFFACCEL_CUDA_ARCH", DEFAULT_ARCHS).replace(",", ";").split(";") if a]
    define_archs = ";".join(archs) if with_cuda else ""
    cxx_flags.append(f'-DDIFFACCEL_CUDA_ARCHS="{define_archs}"')
    if with_cuda:
        cxx_flags.append("-DDIFFACCEL_WITH_CUDA")
        nvcc_flags = ["-O3", "-std=c++20", "-DDIFFACCEL_WITH_CUDA", "--expt-relaxed-constexpr", "-lineinfo",
                      "--threads", os.environ.get("DIFFACCEL_NVCC_THREADS", "2")] + gencode_flags(archs)
        include_dirs = [os.path.join(ROOT, "csrc")]
        # the Hopper W8A8 int8/fp8 GEMMs (csrc/gemm_sm90.cuh) are CUTLASS 3; without the headers or the
        # 9.0a target it compiles to a stub that raises, and diffaccel runs that GEMM on Triton
        cutlass = find_cutlass() if "9.0a" in archs else None
        if cutlass:
            include_dirs += cutlass
            cxx_flags.append("-DDIFFACCEL_WITH_CUTLASS")
            nvcc_flags.append("-DDIFFACCEL_WITH_CUTLASS")
        else:
            why = "no 9.0a in DIFFACCEL_CUDA_ARCH" if "9.0a" not in archs else \
                "no CUTLASS headers (pip install nvidia-cutlass, or set CUTLASS_DIR)"
            print(f"diffaccel setup: building without the CUTLASS sm_90a W8A8 GEMMs ({why})", file=sys.stderr)
        ext = CUDAExtension("diffaccel._C", cpp_sources + cu_sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags})
    else:
        ext = CppExtension("diffaccel._C", cpp_sources, include_dirs=[os.path.join(ROOT, "csrc")],
                           extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = build_extension()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    packages=find_packages(include=["diffaccel", "diffaccel.*"]) + ["diffaccel.kernels"],
    package_dir={"diffaccel.kernels": "kernels"},
    package_data={"diffaccel": ["assets/**/*"]},
)
