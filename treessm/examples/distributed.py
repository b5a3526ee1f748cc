"""What the examples need to run unchanged under ``torchrun``: the process group, rank-0
output and a checksum that shows the replicas agree.

A run started by ``torchrun`` has ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in its
environment (the launcher's contract); :func:`setup` then joins the process group (NCCL
on GPUs, gloo on the CPU) and picks this process's GPU. A plain ``python -m ...`` run is a
world of one and changes nothing. See ``docs/distributed.md``.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "setup", "param_checksum"]


class World:
    """This process's place in the run."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0,
                 device: Optional[torch.device] = None):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.device = device or torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Whether this process prints progress and writes files (rank 0)."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` on this process's device, in DistributedDataParallel when the run has
        several processes (every parameter takes part in every step, so no unused-parameter
        search is needed)."""
        model = model.to(self.device)
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # The depthwise convolutions' weight gradients ([C, 1, k, k]) come with a different
        # stride on their size-1 dimension than the weights: the same memory, but the reducer
        # compares strides and warns on every step.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str = "auto") -> World:
    """Join the process group when started by ``torchrun`` (else a world of one).

    Args:
        device (str): ``"auto"`` (this process's GPU when there are GPUs, else the CPU),
            ``"cpu"`` or ``"cuda"``. (default: ``"auto"``)
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank, size, local, dev)


@torch.no_grad()
def param_checksum(model: nn.Module) -> float:
    """Sum of every parameter in float64: equal on every replica exactly when their
    parameters are."""
    return float(sum(p.detach().double().sum().cpu() for p in model.parameters()))
