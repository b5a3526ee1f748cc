"""Shared test set-up: the dense oracle is importable as ``oracle``; ``shared_data`` is the
folder of offline datasets; ``slow`` tests run only
with ``--runslow`` (or TREESSM_RUN_SLOW=1); ``cuda_ops`` is ``torch.ops.treessm`` with the
CUDA extension loaded (the test is skipped when it cannot be); hypothesis profiles."""
import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# torch and numba each load an OpenMP runtime; on a machine of few cores their waiting
# threads spin against each other's work (a small training step 5-20x slower on two cores).
# Set before either is imported; a value given by the caller is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Property tests: a bounded, reproducible set of examples by default (the same in every
# run, so the suite keeps its time and never flickers); HYPOTHESIS_PROFILE=explore draws
# many more, new ones each run.
settings.register_profile("default", max_examples=40, deadline=None, derandomize=True,
                          print_blob=True)
settings.register_profile("explore", max_examples=2000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("TREESSM_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or TREESSM_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def find_shared_data() -> Path:
    """The offline raw files of PyG's datasets: $TREESSM_DATA, or a ``shared/data`` beside a
    folder above the tests."""
    if os.environ.get("TREESSM_DATA"):
        return Path(os.environ["TREESSM_DATA"])
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "data" / "planetoid").is_dir():
            return parent / "shared" / "data"
    return Path("shared/data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """:func:`find_shared_data`, or a skip when it is not there."""
    root = find_shared_data().resolve()
    if not (root / "planetoid").is_dir():
        pytest.skip(f"the offline datasets were not found (set TREESSM_DATA; looked at {root})")
    return root


@pytest.fixture(scope="session")
def cuda_ops():
    import torch

    from treessm.typing import load_cuda_extension

    try:
        load_cuda_extension()
    except RuntimeError as exc:
        pytest.skip(f"CUDA extension unavailable: {exc}")
    return torch.ops.treessm
