#!/usr/bin/env bash
# The one script a GPU session runs (`make gpu-check`): install, build, GPU tests, the benchmark,
# a kernel breakdown, an ncu check of the profile mode (and, on request, the regular tests), all
# inside one device-command limit.
#
# Needs: a CUDA machine with torch, triton, pytest, pytest-benchmark (no internet), and the
# segment-anything wheel in ./wheelhouse (make it beforehand on a machine with internet:
#   pip download segment-anything --no-deps -d wheelhouse
# and, if wheelhouse/ is git-ignored, carry it to the device: carry=["wheelhouse"]).
#
# Writes everything under $OUT (default ./gpu_check_out): logs/<stage>.log, bench/ (JSON, text
# table, PNG), results/<gpu-name>.json (copy it to benchmarks/results/ to commit it),
# kernels/convlora-kernels.json (per-kernel time of the fused layers), ncu.txt,
# auto_rule.json (backend='auto' rule from this run: convlora_kernels/auto_rule.json).
# A failing stage is reported and the next one still runs; every stage has a timeout; the stage
# summary and the benchmark table are printed last. Exit status 1 if any stage failed.
#
# Knobs (environment): CONVLORA_CHECK_BUDGET_S (total seconds, default 570),
# CONVLORA_CHECK_STAGES (comma list, default env,install,build,gpu-tests,bench,kernels,host,pytest-bench,ncu; add
# sanitize for compute-sanitizer's memcheck and racecheck of the kernels, ~3-5 min, coverage for
# the layer rows the default grid leaves out (forced scales, r = 3/32, fp16, ViT-H), ~3-4 min, and
# tests for the CPU-side tests on the GPU machine, which CI runs anyway),
# CONVLORA_BENCH_MINUTES (cap for the benchmark, default 6), CONVLORA_BENCH_ARGS (extra
# convlora-bench arguments, e.g. "--preset full --sam vit_b,vit_h"), PYTHON (default python,
# else python3), CONVLORA_CHECK_PACK (a .tgz path: pack everything under $OUT into it at the
# end; the device tool returns at most 8 files from its $OUT, and this run writes ~20).
set -u

cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT/logs"
PY="${PYTHON:-$(command -v python || command -v python3)}"
PACK="${CONVLORA_CHECK_PACK:-}"
BUDGET_S="${CONVLORA_CHECK_BUDGET_S:-570}"
STAGES=",${CONVLORA_CHECK_STAGES:-env,install,build,gpu-tests,bench,kernels,host,pytest-bench,ncu},"
BENCH_MINUTES="${CONVLORA_BENCH_MINUTES:-6}"
BENCH_ARGS="${CONVLORA_BENCH_ARGS:-}"
START=$(date +%s)
SUMMARY=()
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }
remaining() { echo $(( BUDGET_S - $(elapsed) )); }
wanted() { [[ "$STAGES" == *",$1,"* ]]; }

# stage NAME TIMEOUT_S COMMAND...: run with a timeout (cut to the budget left), log to
# $OUT/logs/NAME.log, show the log's tail, record the outcome; never stops the script.
stage() {
  local name=$1 limit=$2
  shift 2
  wanted "$name" || return 0
  local left
  left=$(remaining)
  if (( left < 30 )); then
    SUMMARY+=("$name: SKIPPED (time budget spent)")
    return 0
  fi
  (( limit > left - 15 )) && limit=$(( left - 15 ))
  echo "=== [$name] timeout ${limit}s, at $(elapsed)s"
  local t0 rc
  t0=$(date +%s)
  printf '+ %q ' "$@" >"$OUT/logs/$name.log"
  echo >>"$OUT/logs/$name.log"
  timeout -k 10 "$limit" "$@" >>"$OUT/logs/$name.log" 2>&1
  rc=$?
  tail -n "${TAIL_LINES:-12}" "$OUT/logs/$name.log"
  local dt=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then
    SUMMARY+=("$name: ok (${dt}s)")
  elif (( rc == 124 || rc == 137 )); then
    SUMMARY+=("$name: TIMEOUT after ${limit}s (logs/$name.log)")
    FAILED=1
  else
    SUMMARY+=("$name: FAILED rc=$rc in ${dt}s (logs/$name.log)")
    FAILED=1
  fi
}

stage env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name())'; \
  command -v nvcc ncu nsys || true"

install_sam() {
  if "$PY" -c "import segment_anything" 2>/dev/null; then
    echo "segment_anything already installed"
    return 0
  fi
  local wheels=(wheelhouse/segment_anything-*.whl)
  if [[ ! -e "${wheels[0]}" ]]; then
    echo "no wheelhouse/segment_anything-*.whl: run 'pip download segment-anything --no-deps -d wheelhouse'" \
      "where there is internet, and carry wheelhouse/ to this machine"
    return 1
  fi
  "$PY" -m pip install --no-index --no-deps "${wheels[@]}"
}
stage install 120 bash -c "$(declare -f install_sam); PY=$PY install_sam"

# pytest-xdist (wheelhouse/ carries it and execnet: the device lacks it) runs test files in
# parallel; on the GPU that mostly parallelises Triton's JIT compiles, the bulk of the tests'
# time. Optional: without it the tests run serially.
if ! "$PY" -c "import xdist" 2>/dev/null; then
  "$PY" -m pip install --no-index --no-deps wheelhouse/execnet-*.whl wheelhouse/pytest_xdist-*.whl \
    >"$OUT/logs/xdist.log" 2>&1 || echo "pytest-xdist not installed (logs/xdist.log): tests run serially"
fi
XDIST=()
GPU_XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then
  XDIST=(-n 8)
  GPU_XDIST=(-n 4)  # four processes share the one GPU: compile-bound, not GPU-bound
fi

# The extension must be compiled here against this machine's torch; sm_90 only, to halve the build.
# An editable install needs setuptools >= 70.1; with an older one, build the extension in place
# instead (the scripts run from the repository root, where the package then imports from).
build() {
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
  if ! "$PY" -m pip install --no-index --no-build-isolation --no-deps -e .; then
    echo "editable install failed: building the extension in place (setup.py build_ext --inplace)"
    "$PY" setup.py build_ext --inplace || return 1
  fi
  "$PY" - <<'EOF'
import torch
from convlora_kernels import backends
x = torch.zeros(1, 2, 2, 8, device="cuda", dtype=torch.bfloat16)
for name in ("eager", "triton", "cuda"):
    why = backends.unavailable_reason(name, x)
    print(f"backend {name}: {'available' if why is None else 'UNAVAILABLE: ' + why}")
EOF
}
stage build 300 bash -c "$(declare -f build); PY=$PY build"

# Order = priority: GPU correctness, then the benchmark (the issues' figures), then ncu, then the
# CPU-side tests on this machine (they also run in CI).
# -v: a run cut by the timeout still names every test that finished (logs/gpu-tests.log).
TAIL_LINES=40 stage gpu-tests 150 env -u TRITON_INTERPRET "$PY" -m pytest tests -m gpu -v -p no:cacheprovider -rfEs \
  --durations=10 "${GPU_XDIST[@]}"

# The benchmark gets what is left but ~160 s (kernels, pytest-bench, ncu; the regular tests, when
# asked for, get what remains after those), at most CONVLORA_BENCH_MINUTES. With the default
# budget, a ~60 s build and a full gpu-tests stage that is ~3 min of rows. --max-minutes stops
# starting rows 60 s before the stage's timeout, and the JSON is rewritten after every row
# (meta.partial), so a row that overruns (a torch.compile row runs last and can take a minute)
# still leaves the rows before it.
LEFT=$(remaining)
# kernels ~15 s at r = 8 (H200, 2026-11-28; ~30 s with r = 3), host ~30 s, pytest-bench ~40 s,
# ncu ~40 s, with margin
RESERVE=230
MINUTES=$("$PY" -c "print(round(max(0.5, min($BENCH_MINUTES, ($LEFT - $RESERVE - 60) / 60)), 1))")
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
stage bench $(( LEFT - RESERVE )) "$PY" -m convlora_kernels.bench --out "$OUT/bench" --results "$OUT/results" \
  --auto-rule "$OUT/auto_rule.json" --no-progress --max-minutes "$MINUTES" $BENCH_ARGS

# Where the fused layers' time goes, kernel by kernel, for both backends at ViT-B's two qkv
# shapes (torch.profiler; seconds, as the benchmark has already compiled everything): the first
# thing the next optimisation needs. r = 3 (the paper's rank) as well as the benchmark's r = 8:
# the CUDA expert kernels take another code path at r <= 4 (c12: 4-channel chunks).
TAIL_LINES=60 stage kernels 60 "$PY" -m convlora_kernels.bench --kernels --out "$OUT/kernels" \
  --shapes vitb-window-b4,vitb-global-b4 --providers linear,triton,cuda --dtype bf16 --r 3,8 \
  --routing random --mode fwdbwd --sam none

# Host time per layer call at a tiny shape (kernels negligible: what the host needs to issue a
# forward+backward), fused backends against the frozen Linear (scripts/host_time.py, ~15 s each):
# float32, then SAM fine-tuning's setting (bf16 autocast over float32 parameters: the casts are
# launches too).
host_times() {
  "$PY" scripts/host_time.py --device cuda --backends cuda,triton --rounds 5 --calls 50 || return 1
  "$PY" scripts/host_time.py --device cuda --backends cuda,triton --rounds 5 --calls 50 --autocast
}
stage host 60 bash -c "$(declare -f host_times); PY=$PY host_times"

# `pytest benchmarks/` on the GPU (the pytest-benchmark face of the same harness): one shape,
# the fused backends against the Linear and LoRA, no SAM rows; its JSON beside the others.
stage pytest-bench 60 "$PY" -m pytest benchmarks -q -p no:cacheprovider -p no:xdist \
  --convlora-preset quick --convlora-providers linear,lora,triton,cuda --convlora-sam none \
  --benchmark-json "$OUT/pytest-bench.json"

# Profile mode under Nsight Compute: only the steady-state iterations are captured, and their
# kernels carry the NVTX stack (convlora-bench:<row>#i > convlora.<stage>). One Triton and one
# cuda forward+backward of ViT-B's windowed qkv (100 windows, r = 8, random routing): the
# per-kernel table (scripts/ncu_summary.py) says which kernel to work on next, and the cuda
# rows show the ranges csrc/layer.cpp pushes from C++ (convlora.cuda.*).
ncu_check() {
  if ! command -v ncu >/dev/null; then
    echo "ncu not found: profile mode not checked"
    return 1
  fi
  ncu --profile-from-start off --nvtx --section SpeedOfLight -c 80 \
    "$PY" -m convlora_kernels.bench --profile --profile-iters 1 --shapes vitb-window-b4 \
    --providers triton,cuda --dtype bf16 --r 8 --routing random --mode fwdbwd --sam none \
    >"$OUT/ncu.txt" 2>&1
  local rc=$?
  "$PY" scripts/ncu_summary.py "$OUT/ncu.txt" | tee "$OUT/ncu_summary.txt" | head -n 40
  local kernels
  kernels=$(grep -cE "Context [0-9]+, Stream [0-9]+" "$OUT/ncu.txt")
  echo "ncu captured $kernels kernel(s); NVTX stage ranges seen: $(grep -oE 'convlora\.[a-z_]+' "$OUT/ncu.txt" | sort -u | tr '\n' ' ')"
  (( rc == 0 && kernels > 0 ))
}
stage ncu 75 bash -c "$(declare -f ncu_check); OUT=$OUT PY=$PY ncu_check"

# The layer rows issue 3 lists that the default grid leaves out (opt-in: a second device call on
# the still-warm machine, ~3-4 min: CONVLORA_CHECK_STAGES=env,coverage): every forced scale (the
# cost must not depend on s), r = 3 and 32, fp16, ViT-H's qkv, each against the frozen Linear
# measured in the same process. One process and one JSON per grid, under $OUT/coverage/<name>/
# (merge them into benchmarks/results/ by hand). tests/test_gpu_check_script.py parses every grid.
COVERAGE_GRIDS=(
  "scales|--shapes vitb-window-b4 --providers linear,triton,cuda --r 8 --routing 1,2,3,4,5,6,7,8 --dtype bf16 --mode fwdbwd"
  "ranks|--shapes vitb-window-b4,vitb-global-b4 --providers linear,lora,triton,cuda --r 3,32 --routing random --dtype bf16"
  "fp16|--shapes vitb-window-b4,vitb-global-b4 --providers linear,lora,reference,triton,cuda --r 8 --routing random --dtype fp16"
  "vith|--shapes vith-window-b4,vith-global-b4 --providers linear,lora,reference,triton,cuda --r 8 --routing random --dtype bf16"
)
coverage() {
  local rc=0 spec name
  for spec in "${COVERAGE_GRIDS[@]}"; do
    name=${spec%%|*}
    echo "--- coverage: $name"
    # shellcheck disable=SC2086  # the grid's arguments are a list of words on purpose
    "$PY" -m convlora_kernels.bench --out "$OUT/coverage/$name" --no-progress --no-plot --sam none \
      ${spec#*|} || rc=1
    [[ -f "$OUT/coverage/$name/convlora-bench.txt" ]] && cat "$OUT/coverage/$name/convlora-bench.txt"
  done
  return $rc
}
TAIL_LINES=80 stage coverage 400 bash -c "$(declare -f coverage); COVERAGE_GRIDS=(\"\${@}\"); \
  OUT=$OUT PY=$PY coverage" coverage "${COVERAGE_GRIDS[@]}"

# compute-sanitizer on the real launches (opt-in: add "sanitize" to CONVLORA_CHECK_STAGES; it
# needs ~3-5 min, more than the default run can spare). memcheck bounds-checks every global
# access of both backends' kernels at SAM's windowed shape (the allocator's cache is off, so a
# bound is the tensor's own); racecheck checks the CUDA kernels' shared memory (the CPU emulator
# checks barriers by poisoning, not the hardware's memory ordering).
sanitize() {
  if ! command -v compute-sanitizer >/dev/null; then
    echo "compute-sanitizer not found"
    return 1
  fi
  local rc=0 triton_case="tests/test_triton.py::test_gpu_sam_shapes_fp32[False-8-100-14-14]"
  local cuda_cases=("tests/test_cuda_ext.py::test_gpu_sam_shapes_vs_reference[full-torch.float32-windows]"
                    "tests/test_cuda_ext.py::test_gpu_kernels_match_cpu_kernels_float64"
                    "tests/test_cuda_ext.py::test_gpu_expert_kernels_every_rank_path"
                    "tests/test_cuda_ext.py::test_gpu_expert_kernels_tf32"
                    "tests/test_cuda_ext.py::test_gpu_gate_matches_cpu_float64")
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  echo "--- memcheck: triton and cuda kernels"
  compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
    "$PY" -m pytest -q -p no:cacheprovider -x "$triton_case" "${cuda_cases[@]}" || rc=1
  echo "--- racecheck: cuda kernels"
  compute-sanitizer --tool racecheck --error-exitcode 9 --print-limit 20 \
    "$PY" -m pytest -q -p no:cacheprovider -x "${cuda_cases[@]:1}" || rc=1
  return $rc
}
stage sanitize 300 bash -c "$(declare -f sanitize); PY=$PY sanitize"

# (The AOT compile check and the CPU emulation of the CUDA kernels need no GPU: CI runs them.)
stage tests 150 env -u TRITON_INTERPRET "$PY" -m pytest tests -m "not gpu" --ignore=tests/test_triton_aot.py \
  --ignore=tests/test_cuda_emulated.py -q -p no:cacheprovider "${XDIST[@]}"

echo
echo "=== gpu_check summary ($(elapsed)s, outputs in $OUT)"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
if [[ -f "$OUT/auto_rule.json" ]]; then
  echo
  echo "backend='auto' rule from this run (commit as convlora_kernels/auto_rule.json if it is sound):"
  "$PY" -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1]))['rules']))" "$OUT/auto_rule.json"
fi
if [[ -f "$OUT/bench/convlora-bench.txt" ]]; then
  echo
  cat "$OUT/bench/convlora-bench.txt"
fi
if [[ -n "$PACK" ]]; then
  tar -czf "$PACK" -C "$OUT" . && echo && echo "packed $OUT into $PACK ($(du -h "$PACK" | cut -f1))"
fi
exit "$FAILED"
