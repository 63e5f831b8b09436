"""Build of fastsft and its compiled extension ``fastsft._C``.

- CUDA + C++ when torch is a CUDA build and a CUDA toolkit is found (``CUDA_HOME``), for the architectures in
  ``FASTSFT_CUDA_ARCHS`` (default "80;90a"); C++ only otherwise, or with ``FASTSFT_CPU_ONLY=1``.
- torch's CUDA headers include cuBLAS/cuSPARSE/cuSOLVER headers that a bare toolkit may lack; the ``nvidia`` pip
  packages installed beside torch have them, so their ``include`` folders are searched after the toolkit's. When
  the headers are found nowhere, the build says so and makes the C++-only extension, or fails with
  ``FASTSFT_REQUIRE_EXTENSION=1``.
- ``FASTSFT_NO_EXTENSION=1`` skips the extension: the package then runs its Triton and reference backends.
- ``triton_kernels/`` is installed as ``fastsft.triton_kernels``: a top-level ``triton_kernels`` would shadow
  the package of that name that vLLM and Triton itself install.

Build with ``pip install --no-build-isolation -e .`` after installing torch (see README).
"""

import glob
import importlib.util
import os
import re
import sys

from setuptools import find_packages, setup

# What torch's ATen/cuda headers include from the CUDA libraries (beyond the runtime)
CUDA_HEADERS = ("cuda_runtime_api.h", "cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h")
HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


def _version():
    with open(os.path.join(HERE, "fastsft", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def nvidia_include_dirs():
    """The ``include`` folders of the installed ``nvidia`` pip packages (``nvidia/cu13/include`` for CUDA 13,
    ``nvidia/<library>/include`` for CUDA 12), found without importing them."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    return sorted(d for root in roots for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d))


def missing_cuda_headers(include_dirs):
    """The headers of ``CUDA_HEADERS`` that neither ``include_dirs`` nor CPATH / CPLUS_INCLUDE_PATH provide."""
    search = list(include_dirs)
    for var in ("CPATH", "CPLUS_INCLUDE_PATH"):
        search += [d for d in os.environ.get(var, "").split(os.pathsep) if d]
    return [h for h in CUDA_HEADERS if not any(os.path.isfile(os.path.join(d, h)) for d in search)]


def _extensions():
    if _flag("FASTSFT_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cpp_sources = [s for s in cpp_sources if not s.startswith("csrc/tests/")]
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and not _flag("FASTSFT_CPU_ONLY"))
    extra_includes = []
    if with_cuda:
        toolkit = cpp_extension.include_paths(device_type="cuda")
        gaps = missing_cuda_headers(toolkit)
        extra_includes = [d for d in nvidia_include_dirs() if any(os.path.isfile(os.path.join(d, h)) for h in gaps)]
        missing = missing_cuda_headers(toolkit + extra_includes)
        if missing:
            reason = (f"fastsft: cannot compile the CUDA kernels: {', '.join(missing)} found neither in the CUDA "
                      f"toolkit ({cpp_extension.CUDA_HOME}) nor in the nvidia pip packages nor on CPATH")
            if _flag("FASTSFT_REQUIRE_EXTENSION"):
                sys.exit(f"{reason} (FASTSFT_REQUIRE_EXTENSION is set)")
            print(f"{reason}; building the C++-only extension (the Triton and reference backends run on the GPU)",
                  file=sys.stderr)
            with_cuda = False
    cxx = ["-O3"]  # the C++ standard is torch's choice (C++20 for torch 2.14, C++17 for 2.11)
    if with_cuda:
        archs = os.environ.get("FASTSFT_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-DFASTSFT_WITH_CUDA"]
        for arch in filter(None, archs):
            nvcc.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        ext = cpp_extension.CUDAExtension(
            "fastsft._C", cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DFASTSFT_WITH_CUDA"], "nvcc": nvcc})
        # After the toolkit's own folders (as CPATH would be), so they fill only the gaps
        ext.include_dirs += extra_includes
    else:
        ext = cpp_extension.CppExtension("fastsft._C", cpp_sources, extra_compile_args={"cxx": cxx})
    # torch sets TORCH_CUDA_ARCH_LIST-based flags too; ours are explicit above, so keep its list out.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastsft",
    version=_version(),
    description="Kernel-first speedups for LoRA/QLoRA supervised fine-tuning with transformers, PEFT and TRL",
    license="Apache-2.0",
    license_files=["LICENSE"],
    packages=find_packages(include=["fastsft", "fastsft.*"]) + ["fastsft.triton_kernels"],
    package_dir={"fastsft.triton_kernels": "triton_kernels"},
    package_data={"fastsft": ["*.json", "data/*", "data/**/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "triton>=3.6; platform_system=='Linux'", "numpy", "pyyaml"],
    extras_require={
        "train": ["transformers>=5.17,<6", "peft>=0.21,<0.22", "trl>=1.16,<2", "datasets", "accelerate"],
        "test": ["pytest", "pytest-benchmark"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["fastsft=fastsft.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
