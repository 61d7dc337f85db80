"""Builds catalyst_fused and its C++ operator library (catalyst_fused._C).

Install with `pip install --no-build-isolation .` into an environment that already has torch==2.13.0
(see README). The C++ kernels are compiled and linked with OpenMP so that at::parallel_for is parallel.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    debug = os.environ.get("CATALYST_FUSED_DEBUG", "0") == "1"
    cxx_flags = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    cxx_flags += ["-fopenmp", "-std=c++20"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    return [
        CppExtension(
            name="catalyst_fused._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    packages=find_packages(include=["catalyst_fused", "catalyst_fused.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
