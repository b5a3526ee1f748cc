"""A training step captured in a CUDA graph, for the layers' GPU tests: the replays must
give the gradients of eager steps bit for bit, on inputs the capture never saw."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def check_captured_step(loss: Callable[[Tensor], Tensor], static: Tensor,
                        params: Sequence[Tensor], fresh: Sequence[Tensor]) -> None:
    """Capture ``loss(static).backward()`` after three eager steps on a side stream (as
    ``torch.cuda.graph`` asks), then for each tensor of ``fresh`` copy it into ``static``,
    replay, and assert that the gradients of ``static`` and of ``params`` equal those of an
    eager step on that tensor, bit for bit."""
    params = list(params)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            static.grad = None
            for p in params:
                p.grad = None
            loss(static).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static.grad = None
    for p in params:
        p.grad = torch.zeros_like(p)  # the replays add into these, as eager steps do
    with torch.cuda.graph(graph):
        loss(static).backward()
    written = [static.grad] + [p.grad for p in params]
    for k, value in enumerate(fresh):
        with torch.no_grad():
            static.copy_(value)
        for p in params:
            p.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        eager = value.detach().clone().requires_grad_()
        want = torch.autograd.grad(loss(eager), [eager] + params)
        for i, (got, ref) in enumerate(zip(written, want)):
            assert torch.equal(got, ref), (k, i)
