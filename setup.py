"""Builds the optional native CPU extension ``blockmdm_kernels._C`` from csrc/.

The extension is an accelerator, never a requirement: when csrc/ holds no sources, torch's C++
toolchain is missing, the compile fails or ``BLOCKMDM_NO_NATIVE=1`` is set, the package installs
without it and ``blockmdm_kernels._native`` reports why. Build with
``pip install --no-build-isolation`` so the extension compiles against the torch already installed.
"""

import glob
import os

from setuptools import setup


def _cpu_capability():
    """The at::vec instruction set to compile for: the build machine's best (the extension is
    built where it runs), or BLOCKMDM_CPU_CAPABILITY=DEFAULT|AVX2|AVX512."""
    forced = os.environ.get("BLOCKMDM_CPU_CAPABILITY")
    if forced:
        return forced.upper()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return "DEFAULT"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags):
        return "AVX512"
    if {"avx2", "fma"} <= set(flags):
        return "AVX2"
    return "DEFAULT"


_ISA_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("BLOCKMDM_NO_NATIVE", "") not in ("", "0"):
        return {}, []
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return {}, []

    class OptionalBuild(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001 - the pure-Python path stays usable
                print(f"blockmdm: native extension not built ({err}); using the Python paths")

    isa = _cpu_capability()
    if isa not in _ISA_FLAGS:
        raise ValueError(f"BLOCKMDM_CPU_CAPABILITY must be one of {list(_ISA_FLAGS)}, got {isa!r}")
    # at::vec picks its Vectorized<T> implementation from these macros.
    capability = [f"-DCPU_CAPABILITY={isa}"] + ([f"-DCPU_CAPABILITY_{isa}"] if isa != "DEFAULT"
                                                 else [])
    ext = CppExtension(
        "blockmdm_kernels._C", sources,
        extra_compile_args=["-O3", "-fopenmp", *capability, *_ISA_FLAGS[isa]],
        extra_link_args=["-fopenmp"],
    )
    return {"build_ext": OptionalBuild}, [ext]


cmdclass, ext_modules = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
