"""Build of fastsft and its compiled extension ``fastsft._C``.

- CUDA + C++ when torch is a CUDA build and a CUDA toolkit is found (``CUDA_HOME``), for the architectures in
  ``FASTSFT_CUDA_ARCHS`` (default "80;90a"); C++ only otherwise, or with ``FASTSFT_CPU_ONLY=1``.
- ``FASTSFT_NO_EXTENSION=1`` skips the extension: the package then runs its Triton and reference backends.
- ``triton_kernels/`` is installed as ``fastsft.triton_kernels``: a top-level ``triton_kernels`` would shadow
  the package of that name that vLLM and Triton itself install.

Build with ``pip install --no-build-isolation -e .`` after installing torch (see README).
"""

import glob
import os

from setuptools import find_packages, setup


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


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
    cxx = ["-O3"]  # the C++ standard is torch's choice (C++20 for torch 2.14, C++17 for 2.11)
    if with_cuda:
        archs = os.environ.get("FASTSFT_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-DFASTSFT_WITH_CUDA"]
        for arch in filter(None, archs):
            nvcc.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        ext = cpp_extension.CUDAExtension(
            "fastsft._C", cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DFASTSFT_WITH_CUDA"], "nvcc": nvcc})
    else:
        ext = cpp_extension.CppExtension("fastsft._C", cpp_sources, extra_compile_args={"cxx": cxx})
    # torch sets TORCH_CUDA_ARCH_LIST-based flags too; ours are explicit above, so keep its list out.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastsft",
    version="0.1.0",
    description="Kernel-first speedups for LoRA/QLoRA supervised fine-tuning with transformers, PEFT and TRL",
    packages=find_packages(include=["fastsft", "fastsft.*"]) + ["fastsft.triton_kernels"],
    package_dir={"fastsft.triton_kernels": "triton_kernels"},
    package_data={"fastsft": ["*.json", "data/*", "data/**/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "triton>=3.6; platform_system=='Linux'", "numpy", "tqdm", "pyyaml"],
    extras_require={
        "train": ["transformers>=5.17,<6", "peft>=0.21,<0.22", "trl==1.16.0", "datasets", "accelerate"],
        "test": ["pytest", "pytest-benchmark"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["fastsft=fastsft.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
