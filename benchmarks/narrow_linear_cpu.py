"""CPU benchmark of the weight gradient of a linear layer with few input features.

Torch forms the weight gradient of ``nn.Linear`` as ``grad.t() @ x`` (``[out, rows] @
[rows, in]``); :class:`treessm.nn.NarrowLinear`, the selective SSMs' step projection
``dt_proj``, forms it as ``(x.t() @ grad).t()`` (``[in, rows] @ [rows, out]``). For each
shape this times both products alone, then a forward + backward of ``nn.Linear`` and of
``NarrowLinear`` on a split view of a wider array (as ``dt_proj`` reads its input from
``x_proj``'s output), rows ``--rows``, float32, one thread, median of ``--repeats`` calls
(rounds alternate between the two so that both see the same machine load). Prints a table
and saves ``benchmarks/results/narrow_linear_cpu.json``.

    python benchmarks/narrow_linear_cpu.py
    python benchmarks/narrow_linear_cpu.py --quick
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import treessm
from treessm.nn import NarrowLinear

RESULTS = Path(__file__).resolve().parent / "results"


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench(rows: int, fan_in: int, fan_out: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, fan_in + 8, generator=gen)[:, :fan_in]  # a split view
    grad = torch.randn(rows, fan_out, generator=gen)
    xc = x.contiguous()
    plain = torch.nn.Linear(fan_in, fan_out)
    narrow = NarrowLinear(fan_in, fan_out)
    narrow.load_state_dict(plain.state_dict())

    def step(layer):
        def run():
            layer.zero_grad(set_to_none=True)
            layer(x.detach().requires_grad_()).backward(grad)
        return run

    row = dict(rows=rows, in_features=fan_in, out_features=fan_out)
    row["torch_weight_grad_ms"] = _median_ms(lambda: grad.t().mm(xc), repeats)
    row["narrow_weight_grad_ms"] = _median_ms(lambda: xc.t().mm(grad).t().contiguous(), repeats)
    row["linear_fwd_bwd_ms"] = _median_ms(step(plain), repeats)
    row["narrow_linear_fwd_bwd_ms"] = _median_ms(step(narrow), repeats)
    row["fwd_bwd_speedup"] = row["linear_fwd_bwd_ms"] / row["narrow_linear_fwd_bwd_ms"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="two shapes, 10^4 rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shapes = [(fi, fo) for fi in (2, 4, 8, 12, 16, 48) for fo in (128, 384, 1536)]
    rows = args.rows
    if args.quick:
        shapes, rows = [(4, 128), (48, 128)], 10_000
    table = []
    print(f"{'in':>4} {'out':>5}  weight grad: torch  narrow (ms)   fwd+bwd: Linear  "
          f"NarrowLinear (ms)  speed-up")
    for fan_in, fan_out in shapes:
        r = bench(rows, fan_in, fan_out, args.repeats)
        table.append(r)
        print(f"{fan_in:>4} {fan_out:>5}  {r['torch_weight_grad_ms']:18.1f} "
              f"{r['narrow_weight_grad_ms']:7.1f}   {r['linear_fwd_bwd_ms']:15.1f} "
              f"{r['narrow_linear_fwd_bwd_ms']:13.1f}  {r['fwd_bwd_speedup']:8.1f}x", flush=True)
    out = dict(device=platform.machine(), torch=torch.__version__, treessm=treessm.__version__,
               threads=1, when=time.strftime("%Y-%m-%d %H:%M:%S"), rows=table)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "narrow_linear_cpu.json").write_text(json.dumps(out, indent=1) + "\n")
        print(f"saved {RESULTS / 'narrow_linear_cpu.json'}")


if __name__ == "__main__":
    main()
