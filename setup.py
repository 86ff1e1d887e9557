"""Builds the compiled kernels (wclust._C, sources in wclust/csrc/) with torch's C++
extension helper; everything else is in pyproject.toml. A failed compile does not
fail the install: the kernels then fall back to torch ops (see wclust/kernels) and
say so once at run time. WCLUST_NO_EXT=1 skips the build."""

import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("WCLUST_NO_EXT", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    class _BuildOptional(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # no compiler, unsupported platform, ...
                print(
                    f"wclust: building {ext.name} failed ({e}); torch-op fallback", file=sys.stderr
                )

    ext_modules = [
        CppExtension(
            "wclust._C",
            ["wclust/csrc/lut.cpp"],
            # -fopenmp: at::parallel_for is inline OpenMP in torch's headers (torch's
            # own pool, libgomp, which torch already links); without it, it runs serially
            extra_compile_args=[
                "-O3",
                "-fopenmp",
                "-fvisibility=hidden",
                "-Wno-maybe-uninitialized",
            ],
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": _BuildOptional.with_options(use_ninja=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
