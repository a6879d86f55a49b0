"""Build the native vAttention extension from csrc/ with pybind11 only.

No libtorch and no CUDA toolkit: the CUDA backend dlopen()s libcuda.so.1 at run time.

Environment variables:

SARATHI_NATIVE_ARCH=1  compile for the building machine's CPU (-march=native). The
    default is portable (-O3, x86-64 baseline), so a wheel runs on any x86-64 CPU;
    the attention kernel's row loop is compiled for AVX2+FMA as well and picked at
    run time (csrc/attention.cpp). On an AVX-512 EPYC that portable build is as fast
    as -march=native or faster (baseline SSE2 alone was 1.2-2.3x slower).

SARATHI_SANITIZE=1  AddressSanitizer + UndefinedBehaviorSanitizer build, for the fuzz
    tests. Build it beside the normal extension, not in place:

        SARATHI_SANITIZE=1 .venv/bin/python setup.py build_ext \\
            --build-lib build/sanitize --build-temp build/sanitize-tmp

    tests/test_native_fuzz.py finds build/sanitize/vattention_ext/_C*.so and runs the
    same fuzz against it. Python itself is not instrumented, so a process that loads
    it needs the ASan runtime preloaded, and libstdc++ with it (else ASan's __cxa_throw
    interceptor is unresolved and the first C++ exception aborts):

        LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \\
            ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \\
            .venv/bin/python ...
"""
import glob
import os

from setuptools import setup

compile_args = ["-O3", "-fopenmp"]
link_args = ["-fopenmp", "-ldl", "-lpthread"]
if os.environ.get("SARATHI_NATIVE_ARCH") == "1":
    compile_args.append("-march=native")
if os.environ.get("SARATHI_SANITIZE") == "1":
    sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    compile_args = ["-O1", "-g", "-fopenmp"] + sanitize
    link_args += sanitize

def native(name, folder, shared=()):
    """One pybind11 extension from csrc/<folder>/*.cpp (plus shared csrc/ files), or None."""
    here = os.path.join("csrc", folder) if folder else "csrc"
    sources = sorted(glob.glob(os.path.join(here, "*.cpp")))
    if not sources:
        return None
    from pybind11.setup_helpers import Pybind11Extension

    return Pybind11Extension(
        name,
        sources + [os.path.join("csrc", f + ".cpp") for f in shared],
        include_dirs=sorted({"csrc", here}),
        depends=sorted(glob.glob(os.path.join(here, "*.h"))) + [os.path.join("csrc", f + ".h") for f in shared]
        + ([os.path.join("csrc", "checked.h")] if folder else []),
        cxx_std=17,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )


ext_modules = [ext for ext in (
    # The KV cache (memfd / CUDA VMM) and the attention kernel.
    native("vattention_ext._C", ""),
    # Weight-only quantized linear kernels (csrc/quant/). The ISA-specific functions carry
    # their own target attributes and are picked at run time, so the portable build has them.
    native("sarathi.model_executor.quantization._C", "quant", shared=["work_pool"]),
    # The exact optimal-sampling math (csrc/sampling/): alpha*, diagnostics, the draw.
    native("sarathi.optimal_sampling._C", "sampling", shared=["work_pool"]),
    native("sarathi.model_executor._sampler", "sampler"),
) if ext is not None]

setup(ext_modules=ext_modules)
