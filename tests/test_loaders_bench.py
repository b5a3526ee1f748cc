"""benchmarks/loaders.py runs the large-graph example under each loader and each way of
predicting, and saves one row per pair."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("loaders_bench", ROOT / "benchmarks" / "loaders.py")
loaders_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loaders_bench)


def test_quick_table(tmp_path):
    out = tmp_path / "loaders.json"
    result = loaders_bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    pairs = [(r["loader"], r["eval"]) for r in result["rows"]]
    assert pairs[:4] == [("tree", "full"), ("tree", "batches"), ("random", "full"),
                         ("random", "batches")]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["steps_per_process"] == 3
               for r in result["rows"])
