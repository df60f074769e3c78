"""Builds the optional native CPU extension ``blockmdm_kernels._C`` from csrc/.

The extension is an accelerator, never a requirement: when csrc/ holds no sources, torch's C++
toolchain is missing, or the compile fails, the package installs without it and
``blockmdm_kernels._native`` reports why. Build with ``pip install --no-build-isolation`` so the
extension compiles against the torch already installed.
"""

import glob
import os

from setuptools import setup


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("BLOCKMDM_NO_EXTENSION"):
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

    ext = CppExtension(
        "blockmdm_kernels._C", sources, extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    return {"build_ext": OptionalBuild}, [ext]


cmdclass, ext_modules = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
