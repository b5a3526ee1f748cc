"""The argument checks of the CUDA operators (``TREESSM_CHECK``, ``check.cuh``) build their
messages without C++ streams. Where a toolchain links libstdc++ statically into an extension
(a second copy beside torch's), c10's own message streams cut the message at the first number
or crash the process (seen on a GPU machine whose compiler links that way: a short tile plan
ended the process instead of raising). Here a CPU library is linked the same way and both
kinds of check are raised through a torch.library operator."""
import pytest
import torch

from treessm.typing import cuda_source_dir

_SOURCE = r"""
#include <torch/library.h>
#include "check.cuh"

void raise_check(const at::Tensor& x, int64_t which) {
  const size_t count = 19;
  if (which == 0)
    TORCH_CHECK(false, "plan must hold the ", 20, " tensors, got ", count);
  TREESSM_CHECK(which != 1, "plan must hold the ", 20, " tensors, got ", count);
  TREESSM_CHECK(which != 2, "x must have shape ", x.sizes(), ", got ", x.dim(), " dims on ",
                x.device(), " as ", x.scalar_type());
  TREESSM_CHECK(which != 3, "tile ", -5, " (", static_cast<int64_t>(-1) << 40, "), ratio ",
                0.5, ", flag ", true, ", unit '", 'u', "' ", std::string("end"));
}

TORCH_LIBRARY(treessm_check_messages, m) {
  m.def("raise_check(Tensor x, int which) -> ()");
}
TORCH_LIBRARY_IMPL(treessm_check_messages, CPU, m) {
  m.impl("raise_check", &raise_check);
}
"""


@pytest.fixture(scope="module")
def raise_check(tmp_path_factory):
    from torch.utils.cpp_extension import load_inline

    try:
        load_inline("treessm_check_messages", cpp_sources=[_SOURCE], is_python_module=False,
                    extra_include_paths=[str(cuda_source_dir())],
                    extra_ldflags=["-static-libstdc++"],
                    build_directory=str(tmp_path_factory.mktemp("check_messages")))
    except (RuntimeError, OSError) as exc:  # no compiler, or no static libstdc++ to link
        pytest.skip(f"cannot build a statically linked test library: {exc}")
    return torch.ops.treessm_check_messages.raise_check


def _message(op, which):
    x = torch.zeros(6, 2)
    with pytest.raises(RuntimeError) as info:
        op(x, which)
    return str(info.value).splitlines()[0]


def test_messages_keep_their_numbers_where_c10_streams_lose_them(raise_check):
    streamed = _message(raise_check, 0)
    if streamed.endswith("got 19"):
        pytest.skip("this toolchain's static libstdc++ streams numbers; nothing to show")
    assert streamed == "plan must hold the "  # c10's stream stops at the first number
    assert _message(raise_check, 1) == "plan must hold the 20 tensors, got 19"
    assert _message(raise_check, 2) == "x must have shape [6, 2], got 2 dims on cpu as Float"
    assert _message(raise_check, 3) == ("tile -5 (-1099511627776), ratio 0.5, flag true, "
                                        "unit 'u' end")
