#!/usr/bin/env bash
# The whole CUDA check in one command, for a machine with an NVIDIA GPU and a CUDA build
# of torch (such as the device machines lent to this project): builds the CUDA ops for
# the local GPU against that torch, runs the CUDA tests, runs a few of them under
# compute-sanitizer memcheck and runs benchmarks/kernels.py.
#
#   bash scripts/gpu_check.sh        # PYTHON=... picks the interpreter (default python3)
#
# Everything lands in $OUT when set, else gpu-check-out/ (git-ignored), as at most eight
# files, since the device tool brings back no more: summary.txt (machine, versions,
# each step's status and time), build.log, pytest.log, sanitizer.log, bench.log, and
# the benchmark's kernels.md/.json/.png. A failing step does not stop the later ones
# (except a failed build, which leaves nothing to test); the exit status is 0 only when
# every step passed, and 2 when there is no CUDA GPU or CUDA torch, checked first.
# Every step has a time limit and all of them share one budget, so the whole run ends
# within 8 minutes.
#
# pytest and hypothesis are on the device machines' image (Python 3.12). Should a
# version there not do, fetch wheels into .whl/ (git-ignored) in the repository root,
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl NAME==VERSION ...
# naming their own requirements too (--no-deps fetches none), and name .whl in the
# device run's carry: wheels found there are installed first, ahead of the image's.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-$root/gpu-check-out}"
python="${PYTHON:-python3}"
summary="$out/summary.txt"
budget_s=450 # from the start; a step's 10 s kill grace still ends well inside 8 minutes
deadline=$((SECONDS + budget_s))
failures=0

mkdir -p "$out"
(cd "$out" && rm -f summary.txt build.log pytest.log sanitizer.log bench.log kernels.md kernels.json kernels.png)
cd "$root" || exit 2
export PYTHONUNBUFFERED=1 # logs of a step killed at its limit keep what it printed

note() { echo "$*" | tee -a "$summary"; }

no_device() {
  note "gpu_check: $* (nothing was built or run)"
  exit 2
} >&2

note "gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(uname -n), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

command -v nvidia-smi >/dev/null || no_device "no CUDA GPU: nvidia-smi not found"
if ! smi="$(timeout 30 nvidia-smi 2>&1)"; then
  no_device "no CUDA GPU: nvidia-smi failed: $(tail -n 1 <<<"$smi")"
fi
command -v "$python" >/dev/null || no_device "no python: $python not found"
# Prints the TORCH_CUDA_ARCH_LIST entry for the local GPU, then a description line.
probe="$(timeout 60 "$python" - 2>&1 <<'EOF'
import sys

try:
    import torch
except ImportError as error:
    sys.exit(f"no torch: {sys.executable} cannot import torch ({error})")
if torch.version.cuda is None:
    sys.exit(f"no CUDA torch: {sys.executable} has torch {torch.__version__}, a CPU build")
if not torch.cuda.is_available():
    sys.exit(f"no CUDA GPU: torch {torch.__version__} sees no device (torch.cuda.is_available() is false)")
major, minor = torch.cuda.get_device_capability()
# Hopper and later have arch-specific instructions only in the "a" targets (sm_90a);
# the build runs on the GPU it is for, so forward compatibility does not matter.
print(f"{major}.{minor}{'a' if major >= 9 else ''}")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name()}, capability {major}.{minor}")
EOF
)" || no_device "$(tail -n 1 <<<"$probe")"
arch="$(head -n 1 <<<"$probe")"
note "$(tail -n 1 <<<"$probe"); building for TORCH_CUDA_ARCH_LIST=$arch"
# The device machines' toolkit may be on PATH or only under CUDA_HOME.
cuda_tool() { command -v "$1" || echo "${CUDA_HOME:-/usr/local/cuda}/bin/$1"; }
note "nvcc: $("$(cuda_tool nvcc)" --version 2>&1 | tail -n 1)"
echo "$smi" >>"$summary"
echo >>"$summary"

# run_step NAME LIMIT_S LOG COMMAND...: runs COMMAND (a program or an exported function)
# with its output appended to LOG, for at most LIMIT_S seconds or what is left of the budget.
run_step() {
  local name="$1" limit="$2" log="$out/$3" left=$((deadline - SECONDS)) begun=$SECONDS rc status
  shift 3
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    skip "$name" "the ${budget_s} s budget is spent"
    return 1
  fi
  echo "gpu_check: $name (at most $limit s) ..."
  timeout -k 10 "$limit" bash -c '"$@"' _ "$@" >>"$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMED OUT after $limit s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  step_line "$name" "$status" $((SECONDS - begun)) "$log"
  if ((rc != 0)); then
    failures=$((failures + 1))
    tail -n 20 "$log"
  fi
  return $rc
}

step_line() { printf '%-10s %-36s %4d s  %s\n' "$1" "$2" "$3" "$(basename "$4")" | tee -a "$summary"; }

skip() { step_line "$1" "skipped: $2" 0 "-"; failures=$((failures + 1)); }

build() {
  # --no-deps: the package pins the torch vLLM runs with (2.13), but the ops must link
  # against the torch already here. --no-index: the device machines have no network.
  # TORCH_CUDA_ARCH_LIST, not CMAKE_CUDA_ARCHITECTURES: torch's CMake config replaces
  # the latter with its own gencode flags.
  PREFIXKV_TARGET_DEVICE=cuda TORCH_CUDA_ARCH_LIST="$arch" "$python" -m pip install -v \
    --no-build-isolation --no-deps --no-index --disable-pip-version-check -e . || return
  "$(cuda_tool cuobjdump)" --list-elf prefixkv_vllm/_cuda_C*.so || return
  # A private static libstdc++ in a module breaks its error messages (CMakeLists.txt).
  local lib
  for lib in prefixkv_vllm/_C*.so prefixkv_vllm/_cuda_C*.so; do
    readelf -d "$lib" | grep 'NEEDED.*libstdc++' || { echo "$lib does not link the shared libstdc++"; return 1; }
  done
}

install_wheels() {
  "$python" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --disable-pip-version-check --target /tmp/gpu-check-site .whl/*.whl
}
sanitize() {
  local tool=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$(cuda_tool compute-sanitizer)" --report-api-errors no --error-exitcode 86)
  "${tool[@]}" --tool memcheck "$python" -m pytest -q \
    "tests/test_ops_cuda.py::test_importance_cuda_model_shapes[False-4-64-dtype0]" \
    "tests/test_ops_cuda.py::test_importance_cuda_model_shapes[True-4-128-dtype1]" \
    "tests/test_ops_cuda.py::test_importance_cuda_model_shapes[False-4-40-dtype2]" \
    "tests/test_ops_cuda.py::test_importance_cuda_accumulates_across_chunks" \
    "tests/test_ops_cuda.py::test_compact_cuda_model_shapes[64-dtype1]" \
    "tests/test_ops_cuda.py::test_compact_cuda_model_shapes[128-dtype0]" || return
  "${tool[@]}" --tool initcheck "$python" -m pytest -q \
    "tests/test_ops_cuda.py::test_importance_cuda_model_shapes[False-4-64-dtype0]" \
    "tests/test_ops_cuda.py::test_importance_cuda_model_shapes[False-4-40-dtype2]"
}
export -f cuda_tool build install_wheels sanitize
export python arch

if compgen -G ".whl/*.whl" >/dev/null; then
  run_step wheels 60 build.log install_wheels
  export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
fi

if run_step build 240 build.log build; then
  mapfile -t cuda_tests < <(grep -l 'pytest.mark.cuda' tests/test_*.py)
  run_step pytest 150 pytest.log "$python" -m pytest -m cuda -q -rfEs --durations=10 "${cuda_tests[@]}"

  # One case per kernel path: tensor-core scoring computing and given the lse, SIMT
  # scoring at an odd head dim, chunked accumulation, compaction of bytes (fp8 caches)
  # and of bf16. No caching allocator, so every tensor is its own allocation and an
  # access past one is not hidden inside a cached block. API errors are not reported:
  # torch probes the driver with calls that may fail, and the ops check their launches.
  # Then initcheck on the two lse passes, which skip the query tiles below a window:
  # the score pass must read no lse they left unwritten. On a 132-SM H200 both cases
  # also split their keys (3 and 2 splits, csrc/cuda/lse_split.cuh): the combine must
  # read only partial states the splits wrote. The two compaction cases run the
  # in-order head and the parallel tail kernels over three layers. Exit status 86 means a tool
  # found errors; others are pytest's.
  run_step sanitizer 120 sanitizer.log sanitize

  run_step bench 150 bench.log "$python" benchmarks/kernels.py --out-dir "$out"
else
  for name in pytest sanitizer bench; do skip "$name" "the build failed"; done
fi

note "gpu_check: $failures step(s) failed; logs and results in $out"
[ -f "$out/kernels.md" ] && cat "$out/kernels.md"
((failures == 0))
