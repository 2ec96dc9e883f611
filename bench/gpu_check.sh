#!/usr/bin/env bash
# The one command for a GPU machine without network access (see bench/README.md):
# install the checkout, run the GPU tests, benchmark the 1.5B and many-small presets,
# write everything under $OUT (or bench/results), and print a short table last.
#
# Budget: under 6 minutes on an H100: install and CUDA build ~45 s, GPU tests 150 s at
# most (8 shards side by side: compiling the Triton variants is the long part, and it runs
# on the CPU cores), benchmark 130 s at most.
# Optional, each with its own time box, after the short table:
#   TUNE=1     Triton block/warps/blocks-per-program sweep on the flat preset (75 s at most)
#   PROFILE=1  ncu speed of light of torch fused and our default, SR and fp32-master
#              steps on each backend (bench/profile_step.py; 60 s at most)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
start=$SECONDS

# Optional anchors (torchao, torch-optimi) travel as wheels in .whl/ (bench/README.md).
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# Build the extension for this GPU only (CI compiles every arch): half the nvcc time.
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
[ -n "$cap" ] && export RLVR_OPTIM_CUDA_ARCHS="${RLVR_OPTIM_CUDA_ARCHS:-$cap}"
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$out/install.log" 2>&1 \
  || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
echo "installed in $((SECONDS - start)) s"

# GPU tests only (-m gpu): the CPU suite runs in CI. Eight shards (tests/conftest.py
# --shard) run side by side; exit 5 means a shard collected nothing. One log per shard,
# concatenated into gpu_tests.log.
shards=8
for i in $(seq 0 $((shards - 1))); do
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider --shard "$i/$shards" tests \
    > "$out/gpu_tests.$i.log" 2>&1 &
done
tests_ok=0
for job in $(jobs -p); do
  wait "$job"; rc=$?
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || tests_ok=1
done
for i in $(seq 0 $((shards - 1))); do
  echo "== shard $i/$shards"; cat "$out/gpu_tests.$i.log"; rm -f "$out/gpu_tests.$i.log"
done > "$out/gpu_tests.log"
grep -hE "^== shard|(passed|failed|skipped|errors?|no tests ran).* in [0-9.]+s|^(FAILED|ERROR) " \
  "$out/gpu_tests.log" | head -n 60
echo "GPU tests done at $((SECONDS - start)) s"

timeout 130 python3 -m rlvr_optim bench --preset r1-distill-qwen-1.5b --preset many-small \
  --no-progress --out "$out" > "$out/bench.log" 2>&1
bench_rc=$?

latest=$(ls -t "$out"/*/*.json 2>/dev/null | head -n 1)
if [ -n "$latest" ]; then
  python3 -c "import json, sys; from rlvr_optim import bench; print(bench.render_short(json.load(open(sys.argv[1]))))" "$latest"
else
  tail -n 30 "$out/bench.log"
fi
echo "GPU tests $([ $tests_ok -eq 0 ] && echo passed || echo FAILED), bench exit $bench_rc, $((SECONDS - start)) s"

if [ "${TUNE:-0}" = 1 ]; then
  timeout 75 python3 -m rlvr_optim bench --preset flat --backend triton --anchor "torch fused" \
    --mode none --tune --no-graph --no-progress --out "$out/tune" > "$out/tune.log" 2>&1
  echo "tune exit $?"; grep -E "^\| rlvr_optim triton default, tracking step|^\| torch fused \|" "$out/tune.log"
fi
if [ "${PROFILE:-0}" = 1 ]; then
  timeout 60 ncu --clock-control none --section SpeedOfLight --kernel-name 'regex:adamw|Adam' \
    python3 bench/profile_step.py > "$out/ncu.log" 2>&1
  echo "ncu exit $?"; grep -E "adamw|Memory Throughput|Compute \(SM\) Throughput|Duration" "$out/ncu.log" | head -n 40
fi
[ "$bench_rc" -eq 0 ] && [ "$tests_ok" -eq 0 ]
