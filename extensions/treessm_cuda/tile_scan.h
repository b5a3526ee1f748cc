// The tiled tree scan (tile_scan.cu): the "tiles" schedule of the tree-scan operators, which
// tree_scan.cu registers and routes here. `plan` is the tensors of
// treessm.ops.tiles.TilePlan from `vertex` to `entry_ptr`, in that order (18 int32 tensors
// on x's device), laid out for tiles of at most `tile` positions. No autograd here (the
// operators' autograd calls the backward). Nothing here waits for the device.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace treessm_cuda {

// h = the scan of x [N, C] with edge weights `weight` in `direction` ("down", "up" or
// "both"), x and weight contiguous rows of one dtype on the device.
at::Tensor tile_scan_cuda(const at::Tensor& x, const at::Tensor& weight, at::TensorList plan,
                          int64_t tile, c10::string_view direction);

// (dL/dx, dL/dw) of h = tile_scan_cuda(x, weight, ...) given grad = dL/dh and out = h.
std::tuple<at::Tensor, at::Tensor> tile_scan_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
    at::TensorList plan, int64_t tile, c10::string_view direction);

}  // namespace treessm_cuda
