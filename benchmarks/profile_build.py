"""Where the GPU tree build spends its time: torch profiler table of one GridTopology call
(B=32, 56x56, C=160, float32), after warm-up.

    python benchmarks/profile_build.py
"""
import torch
from torch.profiler import ProfilerActivity, profile

import treessm
from treessm.ops.plan import level_plan


def main():
    feat = torch.randn(32, 56, 56, 160, device="cuda")
    topo = treessm.GridTopology()
    for _ in range(3):
        level_plan(topo(feat))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            level_plan(topo(feat))
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=48))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=8, max_name_column_width=48))


if __name__ == "__main__":
    main()
