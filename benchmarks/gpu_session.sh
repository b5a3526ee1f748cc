#!/usr/bin/env bash
# One call on a CUDA machine; every step bounded so the call fits its budget. Results land in
# $OUT (default ./gpu_out), at most eight files a call (bench's steps write ten tables and a
# summary and take more than ten minutes together: split them with $STEPS, below).
#   bash benchmarks/gpu_session.sh check   build, the GPU tests of the scans (heavy-path,
#                                          tiled), of the device spanning forests and of
#                                          the fused selective scan, the
#                                          benchmark rows of the scan, memcheck (and
#                                          racecheck of the tiled scan, the expansion
#                                          kernels, the row-wise kernels, the columns and
#                                          the fused walk)
#   bash benchmarks/gpu_session.sh tests   build, the GPU tests of every file that touches CUDA
#   bash benchmarks/gpu_session.sh bench   build, the GPU benchmarks (tree_scan, grootv, graph
#                                          and its small graphs, grootl, the tiled kernels,
#                                          selective_scan, keep_less, the host's waits
#                                          and device operations of a training step, every
#                                          schedule), each saved as *_<card>.json; every step
#                                          bounded by what is left of $BUDGET seconds
#                                          (default 570), and skipped under 30
#   bash benchmarks/gpu_session.sh large   build, the inputs past 2^31 elements (--runslow; one
#                                          process on the whole GPU), then torch.compile of every
#                                          module on CUDA
#   bash benchmarks/gpu_session.sh real    build, the real-data protocol of the tree model on the
#                                          GPU (graph.py --real, eight splits at once) for
#                                          $TASKS (default tolokers) from the raw files under
#                                          $DATA (default gpu_out/data, PyG's layout)
# The extension is built into $TORCH_EXTENSIONS_DIR (default /tmp/treessm_ext), outside the
# working tree. $CARD, the tables' suffix, defaults to the device's kind (h200, h100, or the
# name's last word in lower case).
set -uo pipefail
MODE=${1:-check}
OUT=${OUT:-gpu_out}
if [ -z "${CARD:-}" ]; then
  NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  case "$NAME" in
    *H200*) CARD=h200 ;;
    *H100*) CARD=h100 ;;
    *) CARD=$(echo "${NAME:-gpu}" | awk '{print tolower($NF)}') ;;
  esac
fi
T0=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 NCCL_NVLS_ENABLE=0
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/treessm_ext}
export PYTHONPATH="$PWD"
PY=python3
SUMMARY="$OUT/session_${MODE}.txt"
log() { echo "$@" | tee -a "$SUMMARY"; }
: > "$SUMMARY"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" 2>&1 | tee -a "$SUMMARY"
start=$(date +%s)
timeout 400 $PY -c "from treessm.typing import load_cuda_extension; load_cuda_extension(verbose=True)" \
  > "$OUT/build.log" 2>&1
rc=$?
log "build rc=$rc in $(( $(date +%s) - start )) s"
if [ $rc -ne 0 ]; then grep -E "error|Error" "$OUT/build.log" | head -40 | tee -a "$SUMMARY"; exit 1; fi
XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n 8"

if [ "$MODE" = check ]; then
  timeout ${TEST_S:-300} $PY -m pytest -q $XDIST -p no:cacheprovider tests/ops/test_tree_scan_cuda.py \
    tests/ops/test_plan.py tests/topology/test_grid_tree_cuda.py tests/ops/test_selective_scan.py \
    tests/ops/test_tiles.py tests/ops/test_tile_scan_cuda.py tests/topology/test_euler_tour.py \
    -k "cuda or plan or grid or tile" 2>&1 | tee "$OUT/pytest_scan.log" | tail -25
  grep -E "passed|failed" "$OUT/pytest_scan.log" | tail -1 >> "$SUMMARY"
  timeout ${BENCH_S:-220} $PY benchmarks/tree_scan.py ${SCAN_ARGS:---quick} \
    --out "$OUT/tree_scan_gpu_$CARD.json" 2>&1 | tee "$OUT/bench.log" | tail -40
  # sanitize NAME TOOLS FILTER FILES...: each compute-sanitizer tool over the tests of FILES
  # that FILTER selects, its log in $OUT/TOOL.NAME.log and its summary in $SUMMARY
  sanitize() {
    local name=$1 tools=$2 filter=$3 tool; shift 3
    for tool in $tools; do
      timeout ${MEMCHECK_S:-120} compute-sanitizer --tool $tool --error-exitcode 9 $PY -m pytest \
        -q -x -p no:cacheprovider "$@" -k "$filter" > "$OUT/$tool.$name.log" 2>&1
      log "$tool rc=$?"
      grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/$tool.$name.log" | tail -3 \
        | tee -a "$SUMMARY"
    done
  }
  log "== memcheck (the scan against the oracle, both schedules)"
  sanitize scan memcheck "matches_dense_oracle or launch_shape" tests/ops/test_tree_scan_cuda.py
  log "== memcheck and racecheck (the tiled scan and its parts, the expansion kernels)"
  sanitize tiles "memcheck racecheck" \
    "(dense_oracle and 7 and (both or up)) or (parts and graph_forest and float32) or (cuda_kernels_match_the_reference and child and both)" \
    tests/ops/test_tile_scan_cuda.py tests/ops/test_expansion_cuda.py
  log "== memcheck and racecheck (columns: chains in registers, long trees in global columns)"
  sanitize columns "memcheck racecheck" "long_chains and not both" tests/ops/test_tree_scan_cuda.py
  log "== memcheck and racecheck (the layers' row-wise kernels: one channel, a row past a warp, wide rows)"
  sanitize pointwise "memcheck racecheck" "cuda_kernels_match and (1-1 or 7-37 or 600-1536)" \
    tests/ops/test_pointwise.py
  log "== memcheck and racecheck (the fused selective walk against the reference, every lane count; the chain backward)"
  sanitize walk "memcheck racecheck" \
    "(fused_walk_matches_reference and (deep or many_roots)) or fused_walk_lanes or chain_kernel" \
    tests/ops/test_selective_scan.py
  exit 0
fi

if [ "$MODE" = tests ]; then
  # the tests that run on the GPU: those of every file that touches CUDA whose names say so
  # (the rest run on the CPU in CI); -v names each result as it comes, so a run cut short by
  # its timeout still says what failed; the workers are killed with it
  FILES=$(grep -rlE "cuda|CUDA" tests --include="test_*.py" | grep -v "tests/extensions/" | sort)
  setsid timeout -k 5 ${TEST_S:-400} $PY -m pytest -v -n 12 -p no:cacheprovider -k "cuda or gpu or device" \
    $FILES > "$OUT/pytest_gpu.log" 2>&1
  log "gpu tests rc=$?"; pkill -9 -f pytest; sleep 1
  log "passed: $(grep -c PASSED "$OUT/pytest_gpu.log")"
  grep -E "FAILED|ERROR" "$OUT/pytest_gpu.log" | grep -v "^E " | sed -E 's/^\[gw[0-9]+\] \[ *[0-9]+%\] //' \
    | sort -u | head -40 | tee -a "$SUMMARY"
  exit 0
fi

if [ "$MODE" = large ]; then
  setsid timeout -k 5 ${LARGE_S:-240} $PY -m pytest -v -rs -p no:cacheprovider --runslow \
    tests/test_large_inputs.py -k "cuda or selective" > "$OUT/pytest_large.log" 2>&1
  log "large inputs rc=$?"; grep -E "PASSED|FAILED|SKIPPED" "$OUT/pytest_large.log" | tee -a "$SUMMARY"
  setsid timeout -k 5 ${TEST_S:-300} $PY -m pytest -v $XDIST -p no:cacheprovider \
    tests/test_module_contract.py -k "compile and cuda" > "$OUT/pytest_compile.log" 2>&1
  log "compile tests rc=$?"; log "passed: $(grep -c PASSED "$OUT/pytest_compile.log")"
  grep -E "FAILED|ERROR" "$OUT/pytest_compile.log" | grep -v "^E " | sort -u | head -20 | tee -a "$SUMMARY"
  exit 0
fi

if [ "$MODE" = real ]; then
  timeout ${REAL_S:-540} $PY benchmarks/graph.py --real --device cuda --root "${DATA:-gpu_out/data}" \
    --copy-to /tmp/treessm_data --tasks "${TASKS:-tolokers}" --models tree --jobs 8 \
    --out "$OUT/graph_real_${TASKS:-tolokers}_gpu_$CARD.json" 2>&1 | tee -a "$SUMMARY" | tail -8
  exit 0
fi

# bench: $STEPS names the steps this call runs (default all of them, more than ten minutes:
# split them over calls, e.g. STEPS="scan grootv graph" then STEPS="small grootl tiles
# selective keep waits schedules"); a step's limit is its own ($SCAN_S and so on) or what is left of
# $BUDGET, whichever is less
STEPS=${STEPS:-scan grootv graph small grootl tiles selective keep waits schedules}
BUDGET=${BUDGET:-570}
step() {  # step NAME LIMIT_S COMMAND...: run COMMAND bounded, its tail in the summary
  local name=$1 limit=$2 left; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ $left -lt 30 ]; then log "skipped $name: ${left} s left"; return 0; fi
  [ $limit -gt $left ] && limit=$left
  local s=$(date +%s)
  timeout $limit "$@" 2>&1 | tee -a "$SUMMARY" | tail -${TAIL:-12}
  log "$name rc=${PIPESTATUS[0]} in $(( $(date +%s) - s )) s"
}
step scan ${SCAN_S:-200} $PY benchmarks/tree_scan.py ${SCAN_ARGS:---quick} \
  --out "$OUT/tree_scan_gpu_$CARD.json"
step grootv ${GROOTV_S:-150} $PY benchmarks/grootv.py --out "$OUT/grootv_gpu_$CARD.json" \
  ${GROOTV_ARGS:-}
step graph ${GRAPH_S:-240} $PY benchmarks/graph.py --device cuda --timing \
  ${GRAPH_ARGS:---sizes 4,5,6,7} --out "$OUT/graph_gpu_$CARD.json"
step small ${SMALL_S:-70} $PY benchmarks/graph.py --device cuda --small \
  --out "$OUT/graph_small_gpu_$CARD.json"
step grootl ${GROOTL_S:-90} $PY benchmarks/grootl.py --out "$OUT/grootl_gpu_$CARD.json"
step tiles ${TILES_S:-150} $PY benchmarks/tree_scan.py --tiles \
  --out "$OUT/tree_scan_tiles_gpu_$CARD.json"
step selective ${SELECTIVE_S:-150} $PY benchmarks/selective_scan.py --device cuda \
  --out "$OUT/selective_scan_gpu_$CARD.json"
step keep ${KEEP_S:-120} $PY benchmarks/keep_less.py --out "$OUT/keep_less_gpu_$CARD.json"
step waits ${WAITS_S:-90} $PY benchmarks/host_waits.py --out "$OUT/host_waits_gpu_$CARD.json"
step schedules ${SCHEDULES_S:-200} $PY benchmarks/tree_scan.py --schedules \
  --out "$OUT/tree_scan_schedules_gpu_$CARD.json"
exit 0
