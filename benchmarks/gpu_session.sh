#!/usr/bin/env bash
# One call on a CUDA machine: build the extension, run the GPU tests (and a memcheck pass),
# then the GPU benchmarks. Logs and JSON land in $OUT (default ./gpu_out).
#   bash benchmarks/gpu_session.sh [scan|bench|quick|full]
# scan: the tree-scan and grid tests only, memcheck and racecheck of the scan kernels,
# the scan benchmark (QUICK=1: headline rows only), GROOTV=1: the GrootV table, NCU=1: an
# Nsight Compute warp-state profile of the staged kernels. bench: the scan and GrootV
# benchmarks only.
set -uo pipefail
MODE=${1:-full}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext MAX_JOBS=16
PY=python3
if ! $PY -c "import numba" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
$PY - <<'PYEOF' 2>&1 | tee "$OUT/env.txt"
import torch, importlib
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for m in ("numba", "scipy", "torch_geometric", "timm", "triton", "sklearn", "skimage"):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__, e)
PYEOF
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee -a "$OUT/env.txt"
echo "== build"; start=$(date +%s)
$PY -c "import treessm.ops.cuda as c; c.load(verbose=True)" > "$OUT/build.log" 2>&1; rc=$?
echo "build rc=$rc in $(( $(date +%s) - start )) s"; tail -5 "$OUT/build.log"
[ $rc -ne 0 ] && { grep -E "error|Error" "$OUT/build.log" | head -30; exit 1; }
echo "== error path of the extension (child process)"
$PY - <<'PYEOF' 2>&1 | tail -3; echo "error-path rc=${PIPESTATUS[0]}"
import torch, treessm
treessm.ops.cuda.load()
x = torch.zeros(3, 4, device="cuda")
i = torch.zeros(3, dtype=torch.long, device="cuda")
try:
    torch.ops.treessm.cuda_scan_forward(x, x, i, torch.zeros(4, dtype=torch.long, device="cuda"),
                                        i, i, i, i, "sideways")
except RuntimeError as exc:
    print("scan op raised cleanly:", str(exc).splitlines()[0][:100])
PYEOF
if [ "$MODE" = bench ]; then  # benchmarks only: the scan table and GrootV
  $PY benchmarks/tree_scan.py ${QUICK:+--quick --quick-sweep} --out "$OUT/tree_scan_gpu.json" 2>&1 | tee "$OUT/bench_scan.log"
  $PY benchmarks/grootv.py --out "$OUT/grootv_gpu.json" 2>&1 | tee "$OUT/bench_grootv.log" | grep -v "^\s*$" | tail -14
  exit 0
fi
echo "== gpu tests"
if [ "$MODE" = scan ]; then
  # at most 8 files come back from a device call: the sanitizer logs share one file
  $PY -m pytest -q tests/ops/test_tree_scan_cuda.py tests/topology/test_grid_tree_cuda.py \
    tests/topology/test_grid_costs_cuda.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
  echo "== memcheck + racecheck (path and staged kernels)"
  timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -x \
    tests/ops/test_tree_scan_cuda.py -k "path or staged or oracle or unaligned" > "$OUT/sanitizers.log" 2>&1
  echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizers.log" | tail -3
  timeout 200 compute-sanitizer --tool racecheck --error-exitcode 9 $PY -m pytest -q -x \
    tests/ops/test_tree_scan_cuda.py -k "(oracle and deep) or plan_kernel" > /tmp/racecheck.log 2>&1
  echo "racecheck rc=$?"; cat /tmp/racecheck.log >> "$OUT/sanitizers.log"
  grep -E "RACECHECK SUMMARY|passed|failed" /tmp/racecheck.log | tail -3
  $PY benchmarks/tree_scan.py ${QUICK:+--quick --quick-sweep} --out "$OUT/tree_scan_gpu.json" 2>&1 | tee "$OUT/bench_scan.log"
  if [ "${GROOTV:-0}" = 1 ]; then
    $PY benchmarks/grootv.py --out "$OUT/grootv_gpu.json" 2>&1 | tee "$OUT/bench_grootv.log" | grep -v "^\s*$" | tail -14
  fi
  if [ "${NCU:-0}" = 1 ] && command -v ncu >/dev/null; then
    echo "== ncu: warp states of the staged kernels (one forward and backward of 'both')"
    timeout 150 ncu --kernel-name regex:staged --launch-count 4 --section WarpStateStats \
      --section SchedulerStats --section LaunchStats --section SourceCounters $PY - > "$OUT/ncu.txt" 2>&1 <<'PYEOF'
import torch, treessm
from treessm.ops import tree_scan
treessm.ops.cuda.load()
feat = torch.randn(32, 56, 56, 160, device="cuda")
tree = treessm.GridTopology(connectivity=4, distance="cosine")(feat)
x = torch.randn(32 * 56 * 56, 160, device="cuda", requires_grad=True)
w = (torch.rand_like(x) * 0.9 + 0.05).requires_grad_()
tree_scan(x, w, tree, "both").sum().backward()
torch.cuda.synchronize()
PYEOF
    echo "ncu rc=$?"; grep -E "staged_scan_kernel|Issued Warp|No Eligible|Warp Cycles" "$OUT/ncu.txt" | head -30
  fi
  exit 0
fi
GPU_TESTS="tests/ops/test_tree_scan_cuda.py tests/topology/test_device.py tests/topology/test_grid_tree_cuda.py tests/topology/test_grid_costs_cuda.py tests/topology/test_mst.py tests/topology/test_topologies.py tests/nn tests/models tests/test_tree.py"
$PY -m pytest -q $GPU_TESTS 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
echo "== memcheck"
timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -x \
  tests/ops/test_tree_scan_cuda.py -k "oracle or empty or deterministic" > "$OUT/memcheck.log" 2>&1
echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -3
timeout 200 compute-sanitizer --tool racecheck --error-exitcode 9 $PY -m pytest -q -x \
  tests/ops/test_tree_scan_cuda.py -k "oracle and deep" > "$OUT/racecheck.log" 2>&1
echo "racecheck rc=$?"; grep -E "RACECHECK SUMMARY|passed|failed" "$OUT/racecheck.log" | tail -3
echo "== benchmarks"
if [ "$MODE" = quick ]; then
  $PY benchmarks/tree_scan.py --quick --out "$OUT/tree_scan_gpu.json" 2>&1 | tee "$OUT/bench_scan.log"
else
  $PY benchmarks/tree_scan.py --out "$OUT/tree_scan_gpu.json" 2>&1 | tee "$OUT/bench_scan.log"
  $PY benchmarks/grootv.py --out "$OUT/grootv_gpu.json" 2>&1 | tee "$OUT/bench_grootv.log" | grep -v "^\s*$" | tail -14
  echo "== one training step of each variant, launches blocking"
  CUDA_LAUNCH_BLOCKING=1 $PY - <<'PYEOF' 2>&1 | tail -12
import sys, torch, torch.nn.functional as F
sys.path.insert(0, "benchmarks")
import grootv as gb
from treessm.models import grootv_tiny
for scan in ("tree", "standin"):
    try:
        m = grootv_tiny(num_classes=10).cuda().train()
        if scan == "standin":
            gb.use_standin(m)
        x = torch.randn(8, 3, 224, 224, device="cuda")
        F.cross_entropy(m(x), torch.zeros(8, dtype=torch.long, device="cuda")).backward()
        torch.cuda.synchronize()
        print(scan, "training step ok")
    except Exception as exc:
        import traceback; traceback.print_exc(limit=-4); break
PYEOF
fi
