#!/usr/bin/env bash
# The one command for a GPU machine without network access (see bench/README.md). It works
# against one deadline, most valuable first, and a run cut short keeps what it measured
# (rows stream to rows.jsonl as they finish):
#   1  environment to run.log; install; the CUDA and CPU extensions start building in the
#      background
#   2  meanwhile, on the idle GPU: copy bandwidth and the anchors on the 1.5B preset
#   3  smoke check: each fused backend x mode bit for bit against the reference on the GPU
#   4  our headline rows on the 1.5B preset: default mode, tracking off and step
#   5  the remaining modes and the CUDA-graph rows, then the many-small and mixed presets
#   6  the GPU test suite with the time left (-v: a kill still shows what passed)
#   7  TUNE=1 / PROFILE=1, only when asked and at least 90 s remain
# and last the short table, rendered from rows.jsonl.
#
# Settings (environment): OUT (required) the results folder; DEADLINE seconds from start
# (default 330: one run may last 10 minutes, the whole GPU lease is about 15); DEVICE cuda
# (default) or cpu: every phase on the CPU with the cpu-tiny preset, the GPU-only parts
# report that they were skipped (tests/test_gpu_check.py runs it so); PYTHON (default
# python3); RLVR_OPTIM_COMMIT, the commit measured, where the tree has no .git. Each
# phase's timeout is its cap or what is left of the deadline, less 15 s kept for the
# table. A failed extension build goes on without the CUDA rows and says why.
# At most 6 files under $OUT: run.log, rows.jsonl, env.json, tests.log, and with TUNE=1 /
# PROFILE=1 tune.jsonl / ncu.log; other logs go to a scratch folder and are summarized.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results (at most 6 files are written there)}"
device="${DEVICE:-cuda}"
py="${PYTHON:-python3}"
case "$device" in
  cuda) big=r1-distill-qwen-1.5b; steps=15; warmup=3 ;;
  cpu) big=cpu-tiny; steps=1; warmup=0; export TRITON_INTERPRET=1 ;;  # Triton on a CPU
  *) echo "gpu_check.sh: DEVICE must be cuda or cpu, got '$device'" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
scratch=$(mktemp -d)
export PYTHONUNBUFFERED=1
t0=$SECONDS
deadline=$((t0 + ${DEADLINE:-330}))
reserve=15   # seconds kept for the short table at the end
rows="$OUT/rows.jsonl"

left() { echo $((deadline - SECONDS)); }
budget() {  # budget CAP: seconds the next phase may take
  local b=$(($(left) - reserve))
  ((b > $1)) && b=$1
  ((b < 0)) && b=0
  echo "$b"
}
phase() { echo "== phase $1 at $((SECONDS - t0)) s, $(left) s left"; }
skipped() { echo "   skipped: $*"; }
out_of_time() { skipped "$(left) s left, $reserve s of them kept for the short table"; }
start_build() {  # start_build NAME ENV...: rlvr_optim.NAME built by setup.py in the background
  # (within $build_limit s) in the scratch folder, then renamed into rlvr_optim/, so no
  # process that looks for the module meanwhile loads half of one; a stale one goes first.
  # Its log and exit status: $scratch/NAME.log and NAME.rc.
  local name=$1 dir="$scratch/build$1"
  shift
  rm -f "rlvr_optim/$name"*.so
  (
    env "$@" timeout -k 5 "$build_limit" "$py" setup.py build_ext --force \
      --build-lib "$dir/lib" --build-temp "$dir/temp" > "$scratch/$name.log" 2>&1 \
      && built=$(compgen -G "$dir/lib/rlvr_optim/$name*.so") \
      && cp "$built" "rlvr_optim/.$name.partial.so" \
      && mv "rlvr_optim/.$name.partial.so" "rlvr_optim/${built##*/}"
    echo $? > "$scratch/$name.rc"
  ) &
}
run_for() {  # run_for SECONDS CMD...: CMD under a timeout that says when it fired
  local limit=$1 rc
  shift
  timeout -s INT -k 5 "$limit" "$@"
  rc=$?
  ((rc == 124)) && echo "   stopped by its ${limit} s timeout"
  return "$rc"
}
bench() {  # bench CAP JSONL ARGS...: one benchmark run appended to JSONL
  local limit jsonl=$2
  limit=$(budget "$1")
  shift 2
  ((limit >= 10)) || { out_of_time; return 0; }
  run_for "$limit" "$py" -m rlvr_optim bench --device "$device" --jsonl "$jsonl" \
    --no-progress --steps "$steps" --warmup "$warmup" "$@" || failed+=("bench $*")
}

main() {
  failed=()
  phase "1: environment, install, CUDA extension build"
  commit=$(git describe --always --dirty --exclude='*' 2>/dev/null || echo "${RLVR_OPTIM_COMMIT:-unknown}")
  echo "   $(date -u +%FT%TZ), commit $commit, DEVICE=$device," \
    "DEADLINE=${DEADLINE:-330} s, $("$py" --version 2>&1)"
  "$py" -c 'from importlib.metadata import version
for name in ("torch", "triton", "torchao", "torch-optimi"):
    try:
        print(f"   {name} {version(name)}")
    except Exception:
        print(f"   {name} not installed")'
  if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,compute_cap \
      --format=csv
  fi
  # Optional anchors (torchao, torch-optimi) travel as wheels in .whl/ (bench/README.md).
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  # Installed without the extensions, so the package imports at once; both are built below
  # in the background. -I: this checkout's own folder must not count as installed.
  installed=$("$py" -I -c 'import importlib.util as u; s = u.find_spec("rlvr_optim"); print(s.origin if s else "")')
  if [ "$installed" = "$PWD/rlvr_optim/__init__.py" ]; then
    echo "   rlvr_optim is installed from this checkout already"
  elif ! RLVR_OPTIM_SKIP_CUDA_BUILD=1 RLVR_OPTIM_SKIP_CPU_BUILD=1 "$py" -m pip install -q --no-build-isolation --no-deps -e . \
    > "$scratch/install.log" 2>&1; then
    tail -n 20 "$scratch/install.log"
    echo "   pip install failed; going on from the checkout (python -m finds it in this folder)"
  fi
  build_pid=""
  cpu_build_pid=""
  if [ "$device" = cuda ]; then
    # For this GPU's architecture only (CI compiles sm_80 and sm_90): half the nvcc time.
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
    build_limit=$(budget 150)
    start_build _C RLVR_OPTIM_SKIP_CPU_BUILD=1 RLVR_OPTIM_CUDA_ARCHS="${RLVR_OPTIM_CUDA_ARCHS:-$cap}"
    build_pid=$!
    echo "   extension build started (sm_${RLVR_OPTIM_CUDA_ARCHS:-$cap}, at most $build_limit s)"
    # The CPU extension is the host path of every fused step, GPU steps too (one pass that
    # reads the grads, one that compares the params' addresses: rlvr_optim/plan.py), and a
    # pip install with a C++ compiler builds it; without it the Python passes run and the
    # many-small rows time host work no user has. Its own job: a failure costs no CUDA row.
    start_build _cpu RLVR_OPTIM_SKIP_CUDA_BUILD=1
    cpu_build_pid=$!
  else
    skipped "the CUDA extension build (GPU only)"
    skipped "the CPU extension build (GPU only; the installed one, if any, is used)"
  fi

  phase "2: copy bandwidth and anchors, $big"
  bench 90 "$rows" --preset "$big" --backend none --mode none --no-graph \
    --anchor "torch fused" --anchor "torch foreach" --anchor "torch fused + clone/compare/count" \
    --anchor "torch fused + 1-byte snapshot diff" --anchor "torch fused fp32 master + bf16 cast" \
    --anchor "torchao _AdamW bf16 SR" --anchor "optimi AdamW Kahan (Triton)"

  phase "3: smoke check, every fused backend x mode against the reference"
  fused=(triton)
  build_ok=0
  if [ -n "$build_pid" ]; then
    wait "$build_pid"
    build_rc=$(cat "$scratch/_C.rc" 2>/dev/null || echo "?")
    if [ "$build_rc" = 0 ] && compgen -G "rlvr_optim/_C*.so" > /dev/null; then
      build_ok=1
      fused=(cuda triton)
      echo "   CUDA extension built at $((SECONDS - t0)) s"
    else
      tail -n 15 "$scratch/_C.log" | sed 's/^/   build: /'
      echo "   CUDA extension build FAILED (exit $build_rc$([ "$build_rc" = 124 ] && echo ", timed out")):" \
        "no cuda rows in this run; the Triton rows and the anchors go on"
      rm -f rlvr_optim/_C*.so  # so nothing compiles it on first use in a timed phase
    fi
  fi
  if [ -n "$cpu_build_pid" ]; then
    wait "$cpu_build_pid"
    if [ "$(cat "$scratch/_cpu.rc" 2>/dev/null)" = 0 ]; then
      echo "   CPU extension (the steps' host path) built at $((SECONDS - t0)) s"
    else
      tail -n 8 "$scratch/_cpu.log" | sed 's/^/   cpu build: /'
      echo "   CPU extension build FAILED: the host path runs in Python (env.json: host_path)"
    fi
  fi
  backend_args=()
  for b in "${fused[@]}"; do backend_args+=(--backend "$b"); done
  limit=$(budget 60)
  if ((limit >= 10)); then
    run_for "$limit" "$py" -m rlvr_optim.smoke --device "$device" "${backend_args[@]}" \
      || failed+=("smoke check")
  else
    out_of_time
  fi

  phase "4: headline rows, $big, default mode, tracking off and step (${fused[*]})"
  bench 90 "$rows" --preset "$big" "${backend_args[@]}" --mode default --track off --track step \
    --anchor none --no-graph

  phase "5: remaining modes and CUDA-graph rows ($big), then many-small and mixed"
  bench 120 "$rows" --preset "$big" "${backend_args[@]}" --mode "sr + fp32 states" \
    --mode "fp32 master" --mode remainder --mode "freeze mask" --anchor "torch fused (CUDA graph)"
  if [ "$device" = cuda ]; then
    bench 60 "$rows" --preset many-small "${backend_args[@]}" --mode default \
      --anchor "torch fused" --anchor "torch foreach" --anchor "torch fused (CUDA graph)"
    bench 45 "$rows" --preset mixed "${backend_args[@]}" --mode default --track step \
      --anchor "torch fused" --anchor "torch fused (CUDA graph)"
  else
    skipped "the many-small and mixed presets (sized for a GPU)"
  fi

  phase "6: GPU test suite"
  extras=0  # seconds kept for what TUNE / PROFILE asked for
  [ "${TUNE:-0}" = 1 ] && extras=$((extras + 90))
  [ "${PROFILE:-0}" = 1 ] && extras=$((extras + 90))
  if [ "$device" != cuda ]; then
    skipped "the GPU tests (pytest -m gpu) need a GPU; the CPU suite runs in CI"
  else
    limit=$(($(budget 600) - extras))
    if ((limit < 20)); then
      out_of_time
    else
      # Eight shards side by side (tests/conftest.py --shard): compiling the Triton variants,
      # on the CPU cores, dominates otherwise. Exit 5: a shard collected nothing.
      shards=8
      for i in $(seq 0 $((shards - 1))); do
        timeout -s TERM -k 5 "$limit" "$py" -m pytest -v -m gpu -p no:cacheprovider \
          --shard "$i/$shards" tests > "$scratch/tests.$i.log" 2>&1 &
      done
      tests_ok=1
      for job in $(jobs -p); do
        wait "$job"
        rc=$?
        ((rc == 0 || rc == 5)) || tests_ok=0
      done
      for i in $(seq 0 $((shards - 1))); do
        echo "== shard $i/$shards"
        cat "$scratch/tests.$i.log"
      done > "$OUT/tests.log"
      echo "   $(grep -c ' PASSED' "$OUT/tests.log") passed, $(grep -c ' FAILED' "$OUT/tests.log")" \
        "failed, $(grep -c ' SKIPPED' "$OUT/tests.log") skipped (tests.log; ${limit} s allowed)"
      grep -hE "^(FAILED|ERROR) " "$OUT/tests.log" | head -n 30
      ((tests_ok)) || failed+=("GPU tests")
    fi
  fi

  phase "7: TUNE / PROFILE"
  if [ "${TUNE:-0}" != 1 ] && [ "${PROFILE:-0}" != 1 ]; then
    skipped "not asked (TUNE=1, PROFILE=1)"
  elif [ "$device" != cuda ]; then
    skipped "TUNE and PROFILE time GPU kernels"
  fi
  if [ "${TUNE:-0}" = 1 ] && [ "$device" = cuda ]; then
    if (($(left) - reserve >= 90)); then
      bench 75 "$OUT/tune.jsonl" --preset flat --backend triton --anchor "torch fused" \
        --mode none --tune --no-graph
    else
      skipped "TUNE: $(left) s left, it needs 90"
    fi
  fi
  if [ "${PROFILE:-0}" = 1 ] && [ "$device" = cuda ]; then
    if ((build_ok == 0)); then
      skipped "PROFILE: without the extension, profile_step.py would compile it on first use"
    elif (($(left) - reserve >= 90)); then
      run_for "$(budget 60)" ncu --clock-control none --section SpeedOfLight \
        --kernel-name 'regex:adamw|Adam' "$py" bench/profile_step.py > "$OUT/ncu.log" 2>&1
      echo "   ncu exit $?"
      grep -E "adamw|Memory Throughput|Compute \(SM\) Throughput|Duration" "$OUT/ncu.log" | head -n 40
    else
      skipped "PROFILE: $(left) s left, it needs 90"
    fi
  fi

  echo "== short table at $((SECONDS - t0)) s (from rows.jsonl; environment in env.json)"
  "$py" - "$rows" "$OUT/env.json" "$device" <<'PY'
import json
import sys
from pathlib import Path

from rlvr_optim import bench

rows, env, device = sys.argv[1:]
if Path(rows).is_file() and Path(rows).stat().st_size:
    result = bench.load(rows)
    first = result["runs"][0]
    keys = ("copy_gbps", "cpu_timings_are_not_performance_results")
    Path(env).write_text(json.dumps({**first["environment"], **{k: first[k] for k in keys}},
                                    indent=1) + "\n")
    print(bench.render_short(result))
else:
    Path(env).write_text(json.dumps(bench.environment(device), indent=1) + "\n")
    print("no rows were measured")
PY
  rm -rf "$scratch"
  if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]} ($((SECONDS - t0)) s)"
    return 1
  fi
  echo "done in $((SECONDS - t0)) s"
}

main 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
