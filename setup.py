"""Build the native vAttention extension from csrc/ with pybind11 only.

No libtorch and no CUDA toolkit: the CUDA backend dlopen()s libcuda.so.1 at run time.
"""
import glob
import os

from setuptools import setup

ext_modules = []
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources:
    from pybind11.setup_helpers import Pybind11Extension

    ext_modules.append(
        Pybind11Extension(
            "vattention_ext._C",
            sources,
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=["-O3", "-march=native", "-fopenmp"] if os.environ.get("SARATHI_NATIVE_ARCH", "1") == "1" else ["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp", "-ldl", "-lpthread"],
        )
    )

setup(ext_modules=ext_modules)
