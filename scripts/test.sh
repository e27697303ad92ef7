#!/usr/bin/env bash
# Sets up the environment if needed, then runs the test suite (extra args go to pytest).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$(bash "$root/scripts/setup_env.sh")"
cd "$root"
# Two workers: the modules that start vLLM servers run on one, first, and the rest of the
# suite beside them on the other (tests/conftest.py).
exec "$python" -m pytest -q -ra -n 2 --dist loadscope --no-loadscope-reorder "$@"
