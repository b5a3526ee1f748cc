"""Shared test set-up: the dense oracle is importable as ``oracle``; ``slow`` tests run only
with ``--runslow`` (or TREESSM_RUN_SLOW=1); ``cuda_ops`` is ``torch.ops.treessm`` with the
CUDA extension loaded (the test is skipped when it cannot be)."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("TREESSM_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or TREESSM_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cuda_ops():
    import torch

    from treessm.typing import load_cuda_extension

    try:
        load_cuda_extension()
    except RuntimeError as exc:
        pytest.skip(f"CUDA extension unavailable: {exc}")
    return torch.ops.treessm
