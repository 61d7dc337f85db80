"""Builds catalyst_fused and its C++ operator library (catalyst_fused._C).

Install with `pip install --no-build-isolation .` into an environment that already has torch==2.13.0
(see README). The C++ kernels are compiled and linked with OpenMP so that at::parallel_for is parallel.
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_enabled():
    """CUDA kernels are built whenever torch has CUDA and nvcc is found (no GPU is needed to build).
    CATALYST_FUSED_CUDA=0 turns them off, =1 makes their absence an error."""
    setting = os.environ.get("CATALYST_FUSED_CUDA", "auto")
    possible = torch.version.cuda is not None and CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if setting == "1" and not possible:
        raise RuntimeError(
            f"CATALYST_FUSED_CUDA=1 but CUDA cannot be built: torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
        )
    return possible and setting != "0"


def _nvidia_include_dirs():
    # ATen/cuda/CUDAContext.h includes cuBLAS/cuSPARSE/cuSOLVER headers, which the CUDA build of torch
    # ships in the nvidia-* wheels rather than in CUDA_HOME.
    try:
        import nvidia
    except ImportError:
        return []
    roots = [os.path.join(p, "*", "include") for p in nvidia.__path__] + [os.path.join(p, "*", "*", "include") for p in nvidia.__path__]
    return sorted({d for pattern in roots for d in glob.glob(pattern)})


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    debug = os.environ.get("CATALYST_FUSED_DEBUG", "0") == "1"
    cxx_flags = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    cxx_flags += ["-fopenmp", "-std=c++20", "-Wno-psabi"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not _cuda_enabled():
        return [
            CppExtension(
                name="catalyst_fused._C",
                sources=sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=["-fopenmp"],
            )
        ]
    # Hopper (H100/H200) and Ampere machine code, plus PTX for newer GPUs; override with TORCH_CUDA_ARCH_LIST.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    nvcc_flags = ["-O3", "-std=c++20", "-DNDEBUG"] if not debug else ["-O0", "-g", "-std=c++20"]
    return [
        CUDAExtension(
            name="catalyst_fused._C",
            sources=sources + _sources("csrc/cuda/*.cu"),
            include_dirs=include_dirs + _nvidia_include_dirs(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    packages=find_packages(include=["catalyst_fused", "catalyst_fused.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
