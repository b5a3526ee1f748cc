import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tqdm")

from treessm.examples import text  # noqa: E402


def test_quick_run_prints_one_json_line_and_writes_results(tmp_path, capsys):
    out = tmp_path / "text"
    text.main(["--out", str(out), "--quick", "--no-progress", "--seeds", "3", "5"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    summary = json.loads(lines[-1])
    assert summary["seeds"] == [3, 5] and summary["steps"] == 3
    assert set(summary["modes"]) == {"chain", "causal"}
    for mode, entry in summary["modes"].items():
        values = entry["bits_per_byte"]
        assert set(values) == {"3", "5"}
        # a few steps from a random start: close to 8 bits, the cost of a uniform guess
        assert all(0 < v < 9 for v in values.values())
        assert math.isclose(entry["mean_bits_per_byte"], sum(values.values()) / 2, abs_tol=1e-4)
        assert entry["causal"] is True
        if mode == "causal":  # one fraction per layer and seed
            fractions = entry["skip_fraction_per_layer"]
            assert set(fractions) == {"3", "5"}
            assert all(len(v) == 1 and 0 <= v[0] <= 1 for v in fractions.values())
        assert len(entry["samples"]) == len(text.PROMPTS)
        assert all(s.startswith(p) for s, p in zip(entry["samples"], text.PROMPTS))
    assert summary["val_bytes"] == 2048 and summary["train_bytes"] > 400_000
    files = list(out.iterdir())
    assert [f.name for f in files] == ["text_results.json"]
    saved = json.loads(files[0].read_text())
    assert saved["modes"] == summary["modes"]


def test_same_data_and_initial_weights_for_every_mode():
    train, val = text.load_text()
    assert train.shape[0] + val.shape[0] > 460_000
    assert abs(val.shape[0] / (train.shape[0] + val.shape[0]) - 0.1) < 1e-3
    import torch

    chain = text.make_model("chain", 7, hidden_size=16, num_layers=1, state_size=2)
    causal = text.make_model("causal", 7, hidden_size=16, num_layers=1, state_size=2)
    a, b = chain.state_dict(), causal.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert causal.backbone.layers[0].mixer.mode == "causal"
    first = next(text._batches(train, 1, 2, 8, seed=1))
    assert torch.equal(first, next(text._batches(train, 1, 2, 8, seed=1)))


def test_invalid_arguments(tmp_path):
    with pytest.raises(SystemExit):
        text.main(["--out", str(tmp_path), "--steps", "0"])
    with pytest.raises(ValueError, match="modes"):
        text.run(str(tmp_path), modes=["tree"])
    with pytest.raises(ValueError, match="seeds"):
        text.run(str(tmp_path), seeds=[1, 1])
    with pytest.raises(ValueError, match="threads"):
        text.run(str(tmp_path), threads=0)
