"""How often torch's float32 CPU ``sqrt`` is not correctly rounded, against ``tigeropt._math.sqrt_rn``.

tigeropt's paths take a correctly rounded float32 square root (C's ``sqrtf``, CUDA's and Triton's
``sqrt_rn``; on the CPU reference path ``tigeropt._math.sqrt_rn``), so they agree bit for bit;
``torch.sqrt`` on CPU float32 tensors goes through a vectorized loop that is not always correctly
rounded, which is why ``torch.optim.Adagrad`` and tigeropt's ``Adagrad`` differ in the last bit.
This script measures the share of elements where ``torch.sqrt`` differs from the correctly rounded
result (and by how many units in the last place at most), for a few input distributions:

    python benchmarks/bench_sqrt_rounding.py
    python benchmarks/bench_sqrt_rounding.py --out benchmarks/results/sqrt-rounding-cpu-<date>.md

Prints a markdown table; with ``--out PATH`` also writes it there (with date, versions and the
CPU capability torch dispatches to), otherwise nothing is written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import tigeropt
from tigeropt._math import sqrt_rn


def distributions(n: int, gen: torch.Generator) -> dict[str, Callable[[], torch.Tensor]]:
    return {
        "random bit patterns (every positive finite float32 equally likely)":
            lambda: torch.randint(0, 0x7F800000, (n,), generator=gen, dtype=torch.int32).view(torch.float32),
        "uniform [0, 1)": lambda: torch.rand(n, generator=gen),
        "uniform [2, 3) (one binade)": lambda: torch.rand(n, generator=gen) + 2.0,
        # after one step the sum is g^2, whose root |g| is exact in float32: every sqrt gets it right
        "g1^2 + g2^2, g normal (an Adagrad sum after two steps)":
            lambda: torch.randn(n, generator=gen).square() + torch.randn(n, generator=gen).square(),
    }


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=4_000_000, help="elements per distribution")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, metavar="PATH",
                        help="also write the table as markdown to PATH (default: print only, write nothing)")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(args.seed)
    lines = ["| input | elements | torch.sqrt not correctly rounded | largest difference (ulp) |",
             "|---|---:|---:|---:|"]
    for name, make in distributions(args.elements, gen).items():
        x = make()
        got, exact = torch.sqrt(x), sqrt_rn(x)
        diff = (got.view(torch.int32).long() - exact.view(torch.int32).long()).abs()
        lines.append(f"| {name} | {x.numel():,} | {100 * (diff != 0).double().mean().item():.2f}% "
                     f"| {int(diff.max())} |")
    cap = torch.backends.cpu.get_cpu_capability()
    lines.append(f"\ntorch {torch.__version__} on {platform.machine()}, CPU capability {cap}; "
                 "correctly rounded reference: tigeropt._math.sqrt_rn (float64 sqrt rounded to float32)")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        command = " ".join(sys.argv[1:] if argv is None else argv)
        header = [f"# torch float32 CPU sqrt rounding, {dt.date.today().isoformat()}", "",
                  f"- command: `{f'python benchmarks/{Path(__file__).name} {command}'.strip()}`",
                  f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
                  f"tigeropt {tigeropt.__version__}; seed {args.seed}", ""]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(header) + "\n" + text + "\n")
        print(f"wrote {args.out}")
    return text


if __name__ == "__main__":
    main()
