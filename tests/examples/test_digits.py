import json
import os

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("skimage")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from treessm.examples import digits  # noqa: E402


def test_quick_run_prints_summary_and_writes_pictures(tmp_path, capsys):
    out = tmp_path / "digits"
    digits.main(["--out", str(out), "--quick", "--no-progress", "--seed", "3"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    summary = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
    assert lines[-1] == f"param_checksum {summary['param_checksum']!r}"
    for key in ("test_accuracy", "raster_test_accuracy", "train_seconds", "raster_train_seconds",
                "params"):
        assert key in summary
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and 0.0 <= summary["raster_test_accuracy"] <= 1.0
    # 10 classes: two quick epochs already beat chance
    assert summary["test_accuracy"] > 0.1 and summary["epochs"] == 2 and summary["seed"] == 3
    assert summary["num_train"] + summary["num_test"] == 400
    for name in ("digit_trees.png", "photo_tree.png"):
        path = out / name
        assert str(path) in summary["figures"]
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(path) > 10_000


def test_same_split_and_initial_weights_for_both_scans():
    x_tr, y_tr, x_te, y_te = digits.load_digits_split(0)
    again = digits.load_digits_split(0)
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert (x_tr == again[0]).all() and (y_te == again[3]).all()
    assert 0.0 <= float(x_tr.min()) and float(x_tr.max()) <= 1.0
    import torch

    torch.manual_seed(0)
    tree = digits.make_model("tree").state_dict()
    torch.manual_seed(0)
    raster = digits.make_model("raster").state_dict()
    assert tree.keys() == raster.keys() and all(torch.equal(tree[k], raster[k]) for k in tree)


def test_invalid_arguments(tmp_path):
    with pytest.raises(SystemExit):
        digits.main(["--out", str(tmp_path), "--epochs", "0"])
    with pytest.raises(ValueError, match="threads"):
        digits.run(str(tmp_path), threads=0)


def test_tree_colours_are_decay_rates_on_a_log_scale():
    import torch

    # decays of 0.9995 and 0.99 differ by 1% on a linear scale, by a factor 20 in rate
    decay = torch.tensor([[0.9995, 0.9995], [0.99, 0.99], [0.5, 0.5]])
    rate = digits._decay_rate(decay)
    assert [round(float(r), 4) for r in rate] == [0.0005, 0.0101, 0.6931]
    norm = digits._rate_norm(rate)
    assert norm.vmax / norm.vmin > 100 and norm.vmax == rate.max()
