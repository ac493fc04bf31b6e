"""Lazy-row step vs dense step on a large embedding table with few rows touched.

For each optimizer, one step over a ``--rows`` x ``--dim`` fp32 table whose gradient is
non-zero on ``--frac`` of the rows (1% by default, drawn like the tokens of a batch:
with repeats), timed three ways:

* dense step — plain group, dense gradient: every row and its state is read and written
  (default path: fused Triton on CUDA, fused C kernel or foreach on CPU);
* lazy, dense grad — ``lazy=True``, the same dense gradient: rows found by a scan of the
  gradient, then gather -> update -> scatter of the touched rows;
* lazy, sparse grad — ``lazy=True`` with the sparse COO gradient that
  ``nn.Embedding(sparse=True)`` produces (uncoalesced, repeats summed in the step):
  cost scales with the rows touched.

For comparison, torch's AdamW dense step, ``tigeropt.LazyOptimizer(AdamW)`` (dense step plus
snapshot/restore of the untouched rows) and ``torch.optim.SparseAdam`` on the sparse gradient.

Median over ``--reps`` steps after ``--warmup`` steps, printed as a markdown table.

    python benchmarks/bench_lazy.py                      # CUDA: 1M x 512; CPU: 100k x 512
    python benchmarks/bench_lazy.py --rows 1000000       # the full table on CPU (~2 GB per tensor)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

import tigeropt
from tigeropt.lazy import LazyOptimizer

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "Tiger": lambda ps, **kw: tigeropt.Tiger(ps, lr=1e-3, **kw),
    "Lion": lambda ps, **kw: tigeropt.Lion(ps, lr=1e-4, weight_decay=0.1, **kw),
    "AdaX": lambda ps, **kw: tigeropt.AdaX(ps, **kw),
    "Adagrad": lambda ps, **kw: tigeropt.Adagrad(ps, lr=1e-2, **kw),
    "Adagrad (glove)": lambda ps, **kw: tigeropt.Adagrad(ps, lr=0.05, glove=True, **kw),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """Median wall time of one ``step()`` in milliseconds."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def make_grads(rows: int, dim: int, frac: float, device: torch.device,
               seed: int = 0) -> tuple[Tensor, Tensor]:
    """(dense gradient, the same as an uncoalesced sparse COO tensor) touching ~frac of the rows."""
    gen = torch.Generator().manual_seed(seed)
    n_touched = max(1, int(rows * frac))
    # draw the rows like tokens of a batch: n_touched distinct rows, some repeated
    distinct = torch.randperm(rows, generator=gen)[:n_touched]
    repeats = distinct[torch.randint(0, n_touched, (n_touched // 4,), generator=gen)]
    idx = torch.cat([distinct, repeats])
    values = torch.randn(len(idx), dim, generator=gen)
    sparse = torch.sparse_coo_tensor(idx[None], values, (rows, dim), check_invariants=True).to(device)
    dense = torch.zeros(rows, dim).index_add_(0, idx, values).to(device)
    return dense, sparse


def bench(args: argparse.Namespace) -> list[list[str]]:
    device = torch.device(args.device)
    dense_grad, sparse_grad = make_grads(args.rows, args.dim, args.frac, device)
    W = torch.randn(args.rows, args.dim, device=device).requires_grad_()
    table = []

    def run(opt: torch.optim.Optimizer, grad: Tensor) -> float:
        W.grad = grad
        ms = time_steps(opt.step, device, args.reps, args.warmup)
        W.grad = None
        return ms

    for name in args.optimizers:
        make = OPTIMIZERS[name]
        dense = run(make([W]), dense_grad)
        lazy_dense = run(make([W], lazy=True), dense_grad)
        lazy_sparse = run(make([W], lazy=True), sparse_grad)
        table.append([name, f"{dense:.2f}", f"{lazy_dense:.2f}", f"{lazy_sparse:.2f}",
                      f"{dense / lazy_sparse:.1f}x"])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.torch_reference:
        adamw = run(torch.optim.AdamW([W], lr=1e-3), dense_grad)
        wrapped = run(LazyOptimizer(torch.optim.AdamW([W], lr=1e-3), [W]), dense_grad)
        sparse_adam = run(torch.optim.SparseAdam([W], lr=1e-3), sparse_grad)
        table.append(["torch AdamW / LazyOptimizer(AdamW) / SparseAdam", f"{adamw:.2f}", f"{wrapped:.2f}",
                      f"{sparse_adam:.2f}", f"{adamw / sparse_adam:.1f}x"])
    return table


def markdown(table: Sequence[Sequence[str]], args: argparse.Namespace) -> str:
    header = ["optimizer", "dense step (ms)", "lazy, dense grad (ms)", "lazy, sparse grad (ms)",
              "dense / lazy sparse"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    device = torch.device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    lines.append(f"\n{args.rows} x {args.dim} fp32 table, {args.frac:.2%} of rows touched, median of "
                 f"{args.reps} steps, {where}, torch {torch.__version__}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000 if cuda else 100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--frac", type=float, default=0.01, help="fraction of rows touched")
    parser.add_argument("--reps", type=int, default=20 if cuda else 7)
    parser.add_argument("--warmup", type=int, default=3 if cuda else 2)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--no-torch-reference", dest="torch_reference", action="store_false",
                        help="skip the torch AdamW / LazyOptimizer / SparseAdam row")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    text = markdown(bench(args), args)
    print(text)
    return text


if __name__ == "__main__":
    main()
