"""The ops build with toolchains that link the C++ runtime statically.

The device machines' GCC (/opt/gcc 13.3) links libstdc++ statically, so it put a
private copy of the C++ runtime into each module. Its locale ids clashed with the
process's libstdc++: the first error message an op formatted segfaulted there (and
here, with the same flag, loses every number after the first). CMakeLists.txt links
the libstdc++ torch loads; this builds the CPU module the way that GCC would.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CMAKE = shutil.which("cmake", path=str(Path(sys.executable).parent)) or shutil.which("cmake")

LOAD_AND_FAIL = """
import sys, torch
torch.ops.load_library(sys.argv[1])
key = torch.zeros(4, 16, 2, 32)
table = torch.zeros(1, 4, dtype=torch.int32)
keep = torch.zeros(1, 1, 4, dtype=torch.int32)
try:
    torch.ops.prefixkv.compact([key], [torch.zeros(4, 16, 2, 33)], torch.zeros(1, dtype=torch.int32), table, keep, torch.tensor([4], dtype=torch.int32))
except RuntimeError as error:
    print(str(error).splitlines()[0])
"""


@pytest.mark.slow  # a whole CMake build
@pytest.mark.skipif(CMAKE is None, reason="no cmake")
def test_error_messages_survive_a_static_libstdcxx_toolchain(tmp_path):
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    configure = [
        CMAKE, str(ROOT), f"-DPython_EXECUTABLE={sys.executable}", f"-DPREFIXKV_EXT_SUFFIX={suffix}",
        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={tmp_path / 'lib'}", "-DCMAKE_BUILD_TYPE=Release",
        "-DPREFIXKV_BUILD_CUDA=OFF", "-DCMAKE_MODULE_LINKER_FLAGS=-static-libstdc++",
    ]
    for command in (configure, [CMAKE, "--build", ".", "-j", "2", "--target", "_C"]):
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    library = tmp_path / "lib" / f"_C{suffix}"
    result = subprocess.run([sys.executable, "-c", LOAD_AND_FAIL, str(library)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "value_caches shape [4, 16, 2, 33] holds other blocks, slots, heads or dims than key_caches shape [4, 16, 2, 32]" in result.stdout
