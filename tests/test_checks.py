"""The argument checks of treessm._checks, and the public arguments that once slipped
through them (booleans taken for ints, strings compared with numbers, unknown devices)."""
import numpy as np
import pytest
import torch

from treessm._checks import (all_finite, check_bool, check_choice, check_device, check_int,
                             check_int_or_auto, check_ints, check_number,
                             check_optional_choice)
from treessm.models import GrootV, grootv_tiny
from treessm.nn import GrootLMixer, TreeSSM, TreeSSMConv
from treessm.topology import CausalSequenceTopology, GridTopology, chain_tree


def test_check_int():
    assert check_int(3, "n") == 3 and type(check_int(np.int16(3), "n")) is int
    assert check_int(torch.tensor(5), "n", 0) == 5
    assert check_int(-4, "n") == -4
    for bad in (True, 2.0, "3", None, torch.tensor([1]), torch.tensor(1.0), torch.tensor(True)):
        with pytest.raises(TypeError, match="n must be an int"):
            check_int(bad, "n")
    with pytest.raises(TypeError, match="n must be a positive int, got True"):
        check_int(True, "n", 1)
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        check_int(0, "n", 1)
    with pytest.raises(ValueError, match="n must be a non-negative int, got -1"):
        check_int(-1, "n", 0)
    with pytest.raises(ValueError, match="n must be an int >= 3, got 2"):
        check_int(2, "n", 3)


def test_check_ints():
    assert check_ints([1, np.int64(2)], "d", 1) == (1, 2)
    assert check_ints((), "d") == ()
    with pytest.raises(TypeError, match=r"d\[0\] must be a positive int, got True"):
        check_ints((True, 1), "d", 1)
    for bad in (3, "12", torch.tensor([1, 2]), None):
        with pytest.raises(TypeError, match="d must be a sequence"):
            check_ints(bad, "d", 1)
    with pytest.raises(ValueError, match="d must have 2 entries, got 3"):
        check_ints((1, 2, 3), "d", 1, 2)
    with pytest.raises(ValueError, match=r"d\[1\] must be a positive int, got 0"):
        check_ints((1, 0), "d", 1)


def test_check_number():
    assert check_number(1, "r", 0, low_open=True) == 1.0
    assert check_number(np.float32(0.5), "r", 0, 1) == 0.5
    for bad in (True, "a", None, torch.tensor(1.0), 1j):
        with pytest.raises(TypeError, match="r must be a real number"):
            check_number(bad, "r")
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="r must be finite"):
            check_number(bad, "r")
    with pytest.raises(ValueError, match="r must be > 0, got 0.0"):
        check_number(0, "r", 0, low_open=True)
    with pytest.raises(ValueError, match=r"r must be in \[0, 1\), got 1.0"):
        check_number(1, "r", 0, 1, high_open=True)
    with pytest.raises(ValueError, match="r must be <= 2, got 3.0"):
        check_number(3, "r", high=2)


def test_check_bool_choice_device():
    assert check_bool(np.bool_(True), "b") is True
    for bad in (0, 1, "no", None):
        with pytest.raises(TypeError, match="b must be a bool"):
            check_bool(bad, "b")
    assert check_choice(8, "c", (4, 8)) == 8
    for bad in (8.0, True, "8", np.array([4, 8]), [4]):
        with pytest.raises(ValueError, match=r"c must be one of \(4, 8\)"):
            check_choice(bad, "c", (4, 8))
    assert check_optional_choice(None, "c", ("a",)) is None
    with pytest.raises(ValueError, match=r"c must be None or one of \('a',\)"):
        check_optional_choice("b", "c", ("a",))
    assert check_int_or_auto("auto", "r", 7) == 7 and check_int_or_auto(2, "r", 7) == 2
    with pytest.raises(TypeError, match="r must be a positive int or 'auto'"):
        check_int_or_auto("x", "r", 7)
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must name a torch device"):
        check_device("xyz")
    with pytest.raises(TypeError, match="device must be a torch.device"):
        check_device(1.5)


# ---------------------------------------------------------------------------- public boundary
@pytest.mark.parametrize("make, error, match", [
    (lambda: TreeSSM(True), TypeError, "d_model must be a positive int, got True"),
    (lambda: TreeSSM(8, dt_rank=True), TypeError, "dt_rank must be a positive int or 'auto'"),
    (lambda: TreeSSM(8, d_state=True), TypeError, "d_state must be a positive int"),
    (lambda: TreeSSM(8, d_conv=True), TypeError, "d_conv must be a non-negative int"),
    (lambda: TreeSSM(8, ssm_ratio="2"), TypeError, "ssm_ratio must be a real number"),
    (lambda: TreeSSM(8, bias=1), TypeError, "bias must be a bool"),
    (lambda: TreeSSM(8, dt_min=float("nan")), ValueError, "dt_min must be finite"),
    (lambda: grootv_tiny(num_classes=True), TypeError, "num_classes must be a non-negative int"),
    (lambda: grootv_tiny(in_chans=True), TypeError, "in_chans must be a positive int"),
    (lambda: GrootV(dims=(8, 16), depths=(True, 1)), TypeError, r"depths\[0\] must be a positive"),
    (lambda: GrootV(dims=(8, 16), depths=(1, 1), drop_rate="0"), TypeError, "drop_rate"),
    (lambda: GrootV(dims=(8, 16), depths=(1, 1), features_only=1), TypeError, "features_only"),
    (lambda: GrootV(dims=(8, 16), depths=()), ValueError, "depths must hold at least one"),
    (lambda: TreeSSMConv(4, 4, d_inner="x"), TypeError, "d_inner must be a positive int"),
    (lambda: TreeSSMConv(True, 4), TypeError, "in_channels must be a positive int"),
    (lambda: TreeSSMConv(4, 4, local_mixing="yes"), TypeError, "local_mixing must be a bool"),
    (lambda: GrootLMixer(8, mode="paper", tree_scale="a"), TypeError,
     "tree_scale must be a real number"),
    (lambda: GrootLMixer(8, mode="paper", tree_scale=float("inf")), ValueError,
     "tree_scale must be finite"),
    (lambda: GrootLMixer(8, layer_idx=True), TypeError, "layer_idx must be a non-negative int"),
    (lambda: GrootLMixer(8, use_bias="no"), TypeError, "use_bias must be a bool"),
    (lambda: chain_tree(2, 3, device="xyz"), ValueError, "device must name a torch device"),
    (lambda: chain_tree(True, 3), TypeError, "num_chains must be a non-negative int"),
    (lambda: GridTopology(connectivity=4.0), ValueError, r"connectivity must be one of \(4, 8\)"),
    (lambda: CausalSequenceTopology(k=True), TypeError, "k must be a positive int"),
    (lambda: CausalSequenceTopology(tie_rtol="0"), TypeError, "tie_rtol must be a real number"),
])
def test_constructor_arguments_are_checked(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_grootl_forward_arguments_are_checked():
    mixer = GrootLMixer(8)
    x = torch.randn(1, 3, 8)
    with pytest.raises(TypeError, match="attention_mask must be a tensor"):
        mixer(x, attention_mask=[[1, 1, 1]])
    with pytest.raises(TypeError, match="cache must be a transformers Cache"):
        mixer(x, cache=object())
    with pytest.raises(TypeError, match="cache must be a transformers Cache"):
        mixer(x, cache_params=object())
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[1, >= 3\]"):
        mixer(x, attention_mask=torch.ones(1, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_finds_one_non_finite_entry_anywhere_and_accepts_extreme_finite_values(dtype):
    x = torch.randn(40, 3).to(dtype)
    assert all_finite(x) and all_finite(x[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        for at in ((0, 0), (17, 1), (39, 2)):
            y = x.clone()
            y[at] = bad
            assert not all_finite(y), (bad, at)
    big = torch.finfo(dtype).max
    assert all_finite(torch.tensor([big, -big, torch.finfo(dtype).tiny], dtype=dtype))


def test_an_old_torch_is_named_at_import():
    # the operators need torch.library.custom_op (torch 2.4): an older torch fails at
    # ``import treessm`` with the release needed, not with an AttributeError deep inside
    import subprocess
    import sys

    from treessm.typing import TORCH_MIN, check_torch_version

    assert TORCH_MIN == (2, 4)
    check_torch_version("2.4.0a0+gitabc")  # a nightly of the release
    want = r'torch>=2\.4, found 2\.3\.1: pip install -U "torch>=2\.4"'
    with pytest.raises(ImportError, match=want):
        check_torch_version("2.3.1")
    with pytest.raises(ImportError, match="cannot read the torch version"):
        check_torch_version("unknown")
    code = "import torch; torch.__version__ = '2.3.1'; import treessm"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0 and "ImportError: treessm needs torch>=2.4" in done.stderr
