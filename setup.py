"""Build script: pure-Python package, plus the optional ahead-of-time CUDA extension.

``pip install .`` never needs a compiler; the CUDA extension is compiled on first GPU use.
Set ``TREESSM_BUILD_CUDA=1`` to compile it at install time instead (needs nvcc and a CUDA
build of PyTorch).
"""
import glob
import os

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
if os.environ.get("TREESSM_BUILD_CUDA") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules.append(CUDAExtension(
        "treessm._treessm_cuda",
        sorted(glob.glob("extensions/treessm_cuda/*.cu")),  # every .cu is one translation unit
        include_dirs=[os.path.abspath("extensions/treessm_cuda")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
    ))
    cmdclass["build_ext"] = BuildExtension

setup(
    packages=find_packages(include=["treessm", "treessm.*"]) + ["treessm.csrc"],
    package_dir={"treessm.csrc": "extensions/treessm_cuda"},
    package_data={"treessm.csrc": ["*.cu", "*.cuh"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
