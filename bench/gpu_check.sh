#!/usr/bin/env bash
# The one command for a GPU machine without network access (see bench/README.md):
# install the checkout, run the GPU tests, benchmark the 1.5B and many-small presets,
# write everything under $OUT (or bench/results), and print a short table last.
# Budget: under 6 minutes on an H100 (build ~45 s, tests 2 x 90 s at most, benchmark 130 s
# at most).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

# Optional anchors (torchao, torch-optimi) travel as wheels in .whl/ (bench/README.md).
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$out/install.log" 2>&1 \
  || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

# GPU tests only: the CPU suite runs in CI (and needs Triton's interpreter, which a
# process with a GPU does not use). Two runs, so that the long Triton matrix cannot starve
# the others; exit 5 means nothing was collected.
run_tests() {  # name, timeout, pytest args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m pytest -q -m gpu -p no:cacheprovider "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc, $(tail -n 1 "$out/$name.log")"
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ]
}
tests_ok=0
run_tests gpu_tests 90 tests --ignore=tests/test_triton_kernels.py || tests_ok=1
run_tests triton_gpu_tests 90 tests/test_triton_kernels.py || tests_ok=1

timeout 130 python3 -m rlvr_optim bench --preset r1-distill-qwen-1.5b --preset many-small \
  --no-progress --out "$out" > "$out/bench.log" 2>&1
bench_rc=$?

latest=$(ls -t "$out"/*/*.json 2>/dev/null | head -n 1)
if [ -n "$latest" ]; then
  python3 -c "import json, sys; from rlvr_optim import bench; print(bench.render_short(json.load(open(sys.argv[1]))))" "$latest"
else
  tail -n 30 "$out/bench.log"
fi
echo "GPU tests $([ $tests_ok -eq 0 ] && echo passed || echo FAILED), bench exit $bench_rc"
[ "$bench_rc" -eq 0 ] && [ "$tests_ok" -eq 0 ]
