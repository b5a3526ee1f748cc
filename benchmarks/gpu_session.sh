#!/usr/bin/env bash
# One call on a CUDA machine. Results land in $OUT (default ./gpu_out), at most eight files.
#   bash benchmarks/gpu_session.sh check   build, every test of tests/ on the GPU, a memcheck
#                                          pass over the scan tests, and the headline scan
#                                          rows of this tree against BEFORE (a checkout of
#                                          another version, when given) in the same run
#   bash benchmarks/gpu_session.sh bench   the GPU benchmarks (tree_scan, grootv, graph,
#                                          grootl), each saved as *_<card>.json
# The extension build is cached in ./.torch_ext between calls on the same machine.
set -uo pipefail
MODE=${1:-check}
OUT=${OUT:-gpu_out}
CARD=${CARD:-h200}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 NCCL_NVLS_ENABLE=0
PY=python3
NEW="$PWD"
SUMMARY="$OUT/session_${MODE}.txt"
log() { echo "$@" | tee -a "$SUMMARY"; }
: > "$SUMMARY"
$PY - <<'PYEOF' 2>&1 | tee -a "$SUMMARY"
import torch, importlib
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for m in ("numba", "torch_geometric", "transformers", "timm", "peft"):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__, e)
PYEOF
build() {  # $1: package root, $2: extension cache
  PYTHONPATH="$1" TORCH_EXTENSIONS_DIR="$2" $PY -c "
import treessm
try:
    from treessm.typing import load_cuda_extension
except ImportError:
    from treessm._extension import load as load_cuda_extension
load_cuda_extension(verbose=True)" > "$2.log" 2>&1
}
start=$(date +%s)
build "$NEW" "$NEW/.torch_ext" & pid_new=$!
if [ "$MODE" = check ] && [ -n "${BEFORE:-}" ]; then build "$BEFORE" /tmp/torch_ext_before & fi
wait $pid_new; rc=$?
log "build rc=$rc in $(( $(date +%s) - start )) s"
if [ $rc -ne 0 ]; then grep -E "error|Error" "$NEW/.torch_ext.log" | head -40 | tee -a "$SUMMARY"; exit 1; fi
export PYTHONPATH="$NEW" TORCH_EXTENSIONS_DIR="$NEW/.torch_ext"

if [ "$MODE" = check ]; then
  XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
  $PY -m pytest -q $XDIST -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
  grep -E "passed|failed" "$OUT/pytest_gpu.log" | tail -1 >> "$SUMMARY"
  grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu.log" | head -30 >> "$SUMMARY"
  log "== memcheck (the scan tests: every schedule against the oracle, launch shapes)"
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -x \
    -p no:cacheprovider tests/ops/test_tree_scan_cuda.py -k "oracle or launch_shapes or empty" \
    > /tmp/memcheck.log 2>&1
  log "memcheck rc=$?"; grep -E "ERROR SUMMARY|passed|failed" /tmp/memcheck.log | tail -3 | tee -a "$SUMMARY"
  wait  # the other build
  $PY benchmarks/tree_scan.py --headline --out "$OUT/headline_after.json" 2>&1 | tail -8 | tee -a "$SUMMARY"
  if [ -n "${BEFORE:-}" ]; then
    PYTHONPATH="$BEFORE" TORCH_EXTENSIONS_DIR=/tmp/torch_ext_before $PY benchmarks/tree_scan.py \
      --headline --out "$OUT/headline_before.json" 2>&1 | tail -8 | tee -a "$SUMMARY"
    $PY benchmarks/tree_scan.py --headline --out "$OUT/headline_after2.json" 2>&1 | tail -6 | tee -a "$SUMMARY"
  fi
  exit 0
fi

# bench: the GPU tests that changed since the last check, then the benchmarks, each step
# bounded so that the whole call fits its budget
timeout 100 $PY -m pytest -q -p no:cacheprovider tests/ops/test_tree_scan_cuda.py \
  tests/nn/test_tree_ssm_conv.py tests/nn/test_grootl.py tests/integrations/test_transformers.py \
  tests/topology/test_sequence_modes.py \
  -k "lean or compile or large_tree or equals_cpu or chunk or matches_cpu or cuda_generation or on_cuda" \
  2>&1 | grep -E "passed|failed|FAILED|Error" | tail -8 | tee -a "$SUMMARY"
timeout 120 $PY benchmarks/tree_scan.py ${SCAN_ARGS:---quick} --out "$OUT/tree_scan_gpu_$CARD.json" \
  2>&1 | tee -a "$SUMMARY" | tail -30
timeout 90 $PY benchmarks/graph.py --device cuda --timing --out "$OUT/graph_gpu_$CARD.json" \
  2>&1 | tee -a "$SUMMARY" | tail -8
timeout 120 $PY benchmarks/grootv.py --out "$OUT/grootv_gpu_$CARD.json" ${GROOTV_ARGS:-} \
  2>&1 | tee -a "$SUMMARY" | tail -14
