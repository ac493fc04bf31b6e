"""Peak memory of training steps with and without ``tigeropt.optimizer_in_backward``.

Two models, each trained for ``--steps`` steps with Tiger, once with an ordinary ``step()`` after
``backward()`` (every gradient of the model exists at once) and once with the step inside
backward (each parameter updated as soon as its gradient is ready, and the gradient freed):

* ``demo``: the character transformer of ``tigeropt.demo`` at ``--d-model``/``--layers``;
* ``embeddings``: ``--tables`` embedding tables of ``--rows`` x ``--dim`` (dense gradients) summed
  into a linear head: a recommender-style model whose gradients are as large as its tables.

Each run is a fresh process, repeated ``--repeats`` times (the two modes alternating); the table
gives the median peak and the range over the repeats.  CPU: the peak resident set size
(``ru_maxrss``) of that process, which varies by some 10-40 MB from one process to the next;
CUDA: ``torch.cuda.max_memory_allocated``.  Printed as a markdown table with the bytes of
parameters and of optimizer state for reference; with ``--out PATH`` also written there as markdown
(date, command, versions, device), otherwise nothing is written.

    python benchmarks/bench_in_backward.py
    python benchmarks/bench_in_backward.py --out benchmarks/results/in-backward-cpu-<date>.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import tigeropt
from tigeropt.demo import CharTransformer


class Tables(nn.Module):
    def __init__(self, tables: int, rows: int, dim: int) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(rows, dim) for _ in range(tables))
        self.head = nn.Linear(dim, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = sum(t(idx[:, i]).mean(1) for i, t in enumerate(self.tables))
        return self.head(h).pow(2).mean()


def child(args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.model == "demo":
        model = CharTransformer(d_model=args.d_model, n_layers=args.layers, n_heads=4, context=64).to(device)

        def loss_fn() -> torch.Tensor:
            idx = torch.randint(0, 96, (8, 64), device=device)
            return nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    else:
        model = Tables(args.tables, args.rows, args.dim).to(device)

        def loss_fn() -> torch.Tensor:
            return model(torch.randint(0, args.rows, (64, args.tables, 8), device=device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.mode == "in_backward":
        tigeropt.optimizer_in_backward(model.parameters(), tigeropt.Tiger, lr=1e-3)
        for _ in range(args.steps):
            loss_fn().backward()
    else:
        opt = tigeropt.Tiger(model.parameters(), lr=1e-3)
        for _ in range(args.steps):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"peak": peak, "params": params, "state": params}  # Tiger: one state tensor like each param


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tables", type=int, default=4)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per model and mode")
    parser.add_argument("--out", type=Path, default=None, metavar="PATH",
                        help="also write the table as markdown to PATH (default: print only, write nothing)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    if args.child:
        args.model, args.mode = args.child
        print(json.dumps(child(args)))
        return ""
    base = [sys.executable, __file__, "--device", args.device, "--steps", str(args.steps), "--d-model",
            str(args.d_model), "--layers", str(args.layers), "--tables", str(args.tables), "--rows",
            str(args.rows), "--dim", str(args.dim)]
    lines = ["| model | params (MB) | optimizer state (MB) | peak, ordinary step (MB) "
             "| peak, step in backward (MB) | saved (MB, medians) |", "|---|---|---|---|---|---|"]

    def mb(peaks: list[float]) -> str:
        return f"{statistics.median(peaks) / 1e6:.0f} ({min(peaks) / 1e6:.0f}-{max(peaks) / 1e6:.0f})"

    for model in ("demo", "embeddings"):
        res: dict[str, list[dict[str, float]]] = {"ordinary": [], "in_backward": []}
        for _ in range(args.repeats):
            for mode in res:
                out = subprocess.run([*base, "--child", model, mode], capture_output=True, text=True,
                                     check=True)
                res[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
        a = [r["peak"] for r in res["ordinary"]]
        b = [r["peak"] for r in res["in_backward"]]
        first = res["ordinary"][0]
        name = (f"demo transformer d={args.d_model} x{args.layers}" if model == "demo"
                else f"{args.tables} tables {args.rows} x {args.dim} + head")
        saved = (statistics.median(a) - statistics.median(b)) / 1e6
        lines.append(f"| {name} | {first['params'] / 1e6:.0f} | {first['state'] / 1e6:.0f} | {mb(a)} "
                     f"| {mb(b)} | {saved:.0f} |")
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"CPU ({platform.machine()}), peak RSS of a fresh process")
    lines.append(f"\nTiger, {args.steps} steps, {where}, median (min-max) of {args.repeats} processes each, "
                 f"torch {torch.__version__}")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        command = " ".join(sys.argv[1:] if argv is None else argv)
        header = [f"# optimizer_in_backward: peak memory, {dt.date.today().isoformat()}", "",
                  f"- command: `{f'python benchmarks/{Path(__file__).name} {command}'.strip()}`",
                  f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
                  f"tigeropt {tigeropt.__version__}",
                  f"- device: {where}; MB = 10^6 bytes", ""]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(header) + "\n" + text + "\n")
        print(f"wrote {args.out}")
    return text


if __name__ == "__main__":
    main()
