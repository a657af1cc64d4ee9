"""Build of diffaccel: one extension, diffaccel._C, compiled with ninja.

CUDA sources are compiled whenever a CUDA toolkit and a CUDA build of torch are present
(no GPU needed). Environment:
  DIFFACCEL_CUDA_ARCH        archs to build, default "8.0;8.9;9.0a"
  DIFFACCEL_SKIP_CUDA_BUILD  1: build the C++ part only
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
        ext = CUDAExtension("diffaccel._C", cpp_sources + cu_sources, include_dirs=[os.path.join(ROOT, "csrc")],
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
