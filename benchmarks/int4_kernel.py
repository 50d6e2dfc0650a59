"""Weight-only int4 matmul kernels at small batches: lowbit's C kernel against torch's
``_weight_int4pack_mm_for_cpu`` and dense bf16 / fp32 ``F.linear``.

    python benchmarks/int4_kernel.py

Each kernel runs over 24 layers of the same shape in turn (codes 24 x 5.8 MB for 5632 x 2048,
more than the L3 cache), as decoding does, so the weights come from DRAM. Kernels alternate;
the table has the median of 5 rounds and the fastest and slowest in brackets.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_result

from lowbit.kernels import int4_alignment, int4_gemm, pack_int4


def candidates(x: torch.Tensor, layers: list[dict], dense: dict, group: int) -> dict:
    """Each kernel over every layer once."""
    xb = x.bfloat16()
    return {
        "lowbit int4": lambda: [int4_gemm(x, *lay["lowbit"], group) for lay in layers],
        "torch int4": lambda: [
            torch.ops.aten._weight_int4pack_mm_for_cpu(xb, lay["torch"][0], group, lay["torch"][1]) for lay in layers
        ],
        # one dense weight reused: it sits in cache, so this is the dense kernels' best case
        "bf16 dense": lambda: [F.linear(xb, dense["bf16 dense"]) for _ in layers],
        "fp32 dense": lambda: [F.linear(x, dense["fp32 dense"]) for _ in layers],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--group", type=int, default=128)
    args = p.parse_args()
    if int4_alignment() is None:
        raise SystemExit("lowbit's C kernel is unavailable here (no C compiler)")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k in ((2048, 2048), (5632, 2048), (2048, 5632)):
        layers = []
        for _ in range(args.layers):
            codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
            scale = torch.rand(n, k // args.group, generator=gen) * 0.01
            layers.append(
                dict(
                    lowbit=(pack_int4(codes), scale, -8 * scale),
                    torch=(
                        torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1),
                        torch.stack([scale, torch.zeros_like(scale)], -1).transpose(0, 1).bfloat16().contiguous(),
                    ),
                )
            )
        dense = {
            "bf16 dense": torch.randn(n, k, generator=gen).bfloat16(),
            "fp32 dense": torch.randn(n, k, generator=gen),
        }
        for batch in (1, 4, 16):
            x = torch.randn(batch, k, generator=gen)
            kernels = candidates(x, layers, dense, args.group)
            times = {name: [] for name in kernels}
            for run in kernels.values():
                run()  # warm-up
            for _ in range(args.rounds):
                for name, run in kernels.items():
                    start = time.perf_counter()
                    run()
                    times[name].append((time.perf_counter() - start) / len(layers) * 1e6)
            row = {"layer": f"{n} x {k}", "batch": batch}
            for name, ts in times.items():
                row[f"{name} us"] = f"{statistics.median(ts):.0f} [{min(ts):.0f}, {max(ts):.0f}]"
            row["torch / lowbit"] = (
                f"{statistics.median(times['torch int4']) / statistics.median(times['lowbit int4']):.2f}"
            )
            rows.append(row)
            print(row, flush=True)
    columns = list(rows[0])
    body = (
        f"Microseconds per layer call, int4 g{args.group}; {args.layers} layers per shape cycled (codes from DRAM); "
        f"median of {args.rounds} alternating rounds [min, max]. lowbit's kernel rounds activations to int8 per 32 "
        "inputs; torch's computes in bf16. The dense rows reuse one weight (cache-resident: their best case).\n\n"
        + markdown_table(rows, columns)
    )
    write_result("kernels_int4", "Weight-only int4 kernels at small batches", body, {"rows": rows})


if __name__ == "__main__":
    main()
