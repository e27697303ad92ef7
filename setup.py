"""Builds the prefixkv torch ops with CMake, the way vLLM builds its own.

CPU ops are always built. CUDA ops are built when torch is a CUDA build and a
CUDA toolkit (nvcc) is found; ``PREFIXKV_TARGET_DEVICE=cpu`` forces CPU only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def _build_cuda() -> bool:
    target = os.environ.get("PREFIXKV_TARGET_DEVICE", "auto")
    if target == "cpu":
        return False
    import torch

    has_cuda = torch.version.cuda is not None and _find_nvcc() is not None
    if target == "cuda" and not has_cuda:
        raise RuntimeError("PREFIXKV_TARGET_DEVICE=cuda needs a CUDA build of torch and nvcc")
    return has_cuda


class CMakeBuild(build_ext):
    def build_extensions(self) -> None:
        # One CMake project produces every library; configure and build it once.
        output_dir = Path(self.get_ext_fullpath(self.extensions[0].name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake",
            str(ROOT),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPREFIXKV_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
            f"-DPREFIXKV_BUILD_CUDA={'ON' if CUDA else 'OFF'}",
        ]
        if CUDA:
            configure.append(f"-DCMAKE_CUDA_COMPILER={_find_nvcc()}")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


CUDA = _build_cuda()
extensions = [CMakeExtension("prefixkv_vllm._C")]
if CUDA:
    extensions.append(CMakeExtension("prefixkv_vllm._cuda_C"))

setup(ext_modules=extensions, cmdclass={"build_ext": CMakeBuild})
