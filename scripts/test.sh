#!/usr/bin/env bash
# Sets up the environment if needed, then runs the test suite (extra args go to pytest).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$(bash "$root/scripts/setup_env.sh")"
cd "$root"
exec "$python" -m pytest -q -ra "$@"
