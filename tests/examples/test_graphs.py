"""The graph example runs offline, prints one JSON line and draws the karate club."""
import json

from treessm.examples import graphs


def test_quick_run_prints_summary_and_draws(tmp_path, capsys):
    summary = graphs.main(["--out", str(tmp_path), "--quick", "--length", "8"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-2]) == json.loads(json.dumps(summary))
    assert lines[-1] == f"param_checksum {summary['param_checksum']!r}"
    for key in ("karate/tree_ssm", "karate/gcn", "far_label_8/tree_ssm", "far_label_8/gcn"):
        r = summary["results"][key]
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["seconds_per_epoch"] > 0
    assert (tmp_path / "karate.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_tasks_are_what_they_say():
    task = graphs.far_label(length=6, num_colors=3, num_train=5, num_test=2, seed=1)
    data = task.train
    assert data.num_graphs == 5 and data.num_nodes == 30
    for b in range(5):
        nodes = (data.batch == b).nonzero().squeeze(1)
        heads = nodes[data.x[nodes, :3].sum(1) == 1]
        assert heads.numel() == 1  # one coloured head per path
        assert (data.y[nodes] == data.x[heads[0], :3].argmax()).all()
    karate = graphs.karate()
    assert int(karate.train.train_mask.sum()) == 4 and karate.num_classes == 4
    # matched parameter counts within 15 %
    target = graphs.num_params(graphs.matched_model("tree_ssm", task, 2))
    for kind in ("gcn", "gat", "gin"):
        n = graphs.num_params(graphs.matched_model(kind, task, 2))
        assert abs(n - target) <= 0.15 * target, (kind, n, target)


def test_cora_alone_from_the_shared_layout_prints_json_and_draws_the_tree(tmp_path, capsys):
    import os
    from pathlib import Path

    import pytest

    SHARED = Path(os.environ.get("TREESSM_DATA") or next(
        (p / "shared" / "data" for p in Path(__file__).resolve().parents
         if (p / "shared" / "data" / "planetoid").is_dir()), "shared/data"))
    if not (SHARED / "planetoid" / "Cora").is_dir():
        pytest.skip("shared raw data not found")
    picture = tmp_path / "pictures" / "cora.png"
    summary = graphs.main(["--out", str(tmp_path), "--quick", "--root", str(SHARED),
                           "--cora-only", "--cora-picture", str(picture)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-2]) == json.loads(json.dumps(summary))
    r = summary["results"]["cora/gcn_tree"]
    assert set(summary["results"]) == {"cora/gcn_tree"}
    assert 0.0 <= r["test_accuracy"] <= 1.0 and r["params"] > 90_000
    assert summary["cora_picture"] == str(picture) and picture.stat().st_size > 10_000
