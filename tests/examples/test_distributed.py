"""The examples under torchrun: two gloo processes on the CPU train replicas that agree."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from treessm.models import GrootV

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def _torchrun(module, *args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", module, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    checksums = re.findall(r"^param_checksum (\S+)$", r.stdout, flags=re.M)
    summaries = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return checksums, summaries, r.stderr


def test_digits_replicas_agree(tmp_path):
    checksums, summaries, stderr = _torchrun("treessm.examples.digits", "--epochs", "1",
                                             "--quick", "--no-progress", "--out", str(tmp_path))
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # one line per rank
    assert len(summaries) == 1 and summaries[0]["processes"] == 2  # rank 0 reports
    assert float(checksums[0]) == summaries[0]["param_checksum"]
    assert (tmp_path / "digit_trees.png").exists()
    assert "Grad strides do not match" not in stderr


def test_graph_example_replicas_agree(tmp_path):
    checksums, summaries, _ = _torchrun("treessm.examples.graphs", "--quick", "--length", "6",
                                        "--out", str(tmp_path))
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert len(summaries) == 1 and summaries[0]["processes"] == 2


@pytest.mark.parametrize("loader", ["tree", "random"])
def test_large_graph_example_replicas_agree(loader):
    checksums, summaries, _ = _torchrun("treessm.examples.large_graph", "--num-nodes", "1200",
                                        "--epochs", "1", "--parts", "2", "--hidden", "16",
                                        "--device", "cpu", "--loader", loader)
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert len(summaries) == 1 and summaries[0]["processes"] == 2
    assert summaries[0]["steps_per_process"] == 2


def test_sync_batchnorm_conversion_keeps_the_network():
    torch.manual_seed(0)
    model = GrootV(num_classes=3, in_chans=1, dims=(8, 16), depths=(1, 1), stem_strides=(1, 1),
                   downsample_strides=(2,)).eval()
    x = torch.randn(2, 1, 8, 8)
    ref = model(x)
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    kinds = {type(m).__name__ for m in converted.modules()}
    assert "SyncBatchNorm" in kinds and "BatchNorm2d" not in kinds
    torch.testing.assert_close(converted(x), ref)
