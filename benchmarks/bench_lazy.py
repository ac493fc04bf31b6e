"""Lazy-row step vs dense step on a large embedding table with few rows touched.

For each optimizer, one step over a ``--rows`` x ``--dim`` fp32 table whose gradient is
non-zero on ``--frac`` of the rows (1% by default, drawn like the tokens of a batch:
with repeats), timed three ways:

* dense step — plain group, dense gradient: every row and its state is read and written
  (default path: fused Triton on CUDA, fused C kernel or foreach on CPU);
* lazy, dense grad — ``lazy=True``, the same dense gradient: on CPU the fused C row kernel
  scans the gradient and updates the rows holding a non-zero in the same pass;
* lazy, sparse grad — ``lazy=True`` with the sparse COO gradient that
  ``nn.Embedding(sparse=True)`` produces (uncoalesced, repeats summed in the step): on CPU one
  C call that sums the repeats and updates exactly the touched rows.

The bytes-moved floor: a dense step reads p, g and the state and writes p and the state for
every element (Tiger/Lion/Adagrad 20 B, AdaX 28 B per fp32 element; row-wise Adagrad 12 B per
element + 8 B per row); a sparse lazy step does so for the touched rows only and reads the
sparse gradient's values and indices.  "floor ratio" is dense bytes / lazy bytes: the speed-up
a step limited by memory traffic alone would get.

For comparison, torch's AdamW dense step, ``tigeropt.LazyOptimizer(AdamW)`` (dense step plus
snapshot/restore of the untouched rows) and ``torch.optim.SparseAdam`` on the sparse gradient.

Median and fastest of ``--reps`` steps after ``--warmup`` steps (other load only adds time: on
a shared machine the fastest step is the closer estimate of the code's own cost; the "target"
column judges the medians), printed as a markdown table, on the CPU
(one table per ``--threads`` count: 1 and torch's default unless told) and, when CUDA is
available, on the GPU too (``--devices`` picks).  "GB/s" divides the floor's bytes by the
measured time: the dense step streams memory, the lazy step's scattered rows are bound by
memory latency, and the gap between the two rates is why the measured speed-up stays below the
floor ratio.  "target" is issue 13's: the lazy sparse step at least 50x faster than the dense
step on the CPU, 20x on the GPU ("met", or how many times short of it).  On CUDA the steps run the
Triton kernels (the dense step kernels and the row kernels); ``--fused`` asks for them on any
device (on the CPU under ``TRITON_INTERPRET=1``, slowly: for checking that path at a tiny size).

Each CPU table's last line says how the tensors were paged: the transparent-huge-page mode, torch's
``THP_MEM_ALLOC_ENABLE`` (with ``1`` and THP ``madvise`` torch asks for 2 MB pages for its large CPU
allocations: table, gradient, state) and how much of the process was in huge pages.
``benchmarks/rows_ceiling.c`` times the same rows in a stand-alone C loop (the memory ceiling).

Before timing, each optimizer's lazy steps (dense and sparse gradient) on a table of at most
``--check-rows`` rows are compared with the reference path (gather, reference rule, scatter) and
the row kernel's calls are counted: the "vs reference" column gives the largest difference
relative to the largest value of p and state, and which row kernel took how many of the steps.
A difference above 1e-5, or a step the kernel did not take, makes the script exit with status 1
after printing the tables.

    python benchmarks/bench_lazy.py                      # 1M x 512 (~2 GB per tensor, ~8 GB peak)
    python benchmarks/bench_lazy.py --rows 100000        # smaller
    python benchmarks/bench_lazy.py --threads 1 --cpu-time   # one core, CPU time: immune to other load
    python benchmarks/bench_lazy.py --threads 1 2 --cpu-time # and 2 threads (wall clock: needs idle cores)
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/bench_lazy.py   # torch's large CPU tensors in 2 MB pages
    python benchmarks/bench_lazy.py --devices cuda           # the GPU rows only
    TRITON_INTERPRET=1 python benchmarks/bench_lazy.py --fused --rows 200 --dim 64 --reps 1 --warmup 0
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

import tigeropt
import tigeropt._cpu
import tigeropt.kernels
from tigeropt.lazy import LazyOptimizer

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "Tiger": lambda ps, **kw: tigeropt.Tiger(ps, lr=1e-3, **kw),
    "Lion": lambda ps, **kw: tigeropt.Lion(ps, lr=1e-4, weight_decay=0.1, **kw),
    "AdaX": lambda ps, **kw: tigeropt.AdaX(ps, **kw),
    "Adagrad": lambda ps, **kw: tigeropt.Adagrad(ps, lr=1e-2, **kw),
    "Adagrad (glove)": lambda ps, **kw: tigeropt.Adagrad(ps, lr=0.05, glove=True, **kw),
    "Adagrad (rowwise)": lambda ps, **kw: tigeropt.Adagrad(ps, lr=1e-2, rowwise=True, **kw),
}
#: bytes of optimizer state per element (row-wise Adagrad: per row, see ROW_STATE)
STATE_BYTES = {"Tiger": 4, "Lion": 4, "AdaX": 8, "Adagrad": 4, "Adagrad (glove)": 4, "Adagrad (rowwise)": 0}
ROW_STATE = {"Adagrad (rowwise)": 4}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], device: torch.device, reps: int, warmup: int,
               clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """(median, fastest) time of one ``step()`` in milliseconds (wall clock, or ``clock``)."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(reps):
        start = clock()
        step()
        sync(device)
        times.append((clock() - start) * 1e3)
    return statistics.median(times), min(times)


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


def ms(times: tuple[float, float]) -> str:
    """(median, fastest) milliseconds as a table cell."""
    return f"{times[0]:.2f} / {times[1]:.2f}"


def floor_bytes(name: str, rows: int, dim: int, touched: int, nnz: int) -> tuple[int, int]:
    """(dense step, sparse lazy step) bytes moved at least, fp32 table: p read+write, g read, state
    read+write per element (and per row for row-wise state); the sparse step for the touched rows,
    plus the gradient's nnz value rows and its indices (+ the sort permutation)."""
    per_elem = 4 + 4 + 4 + 2 * STATE_BYTES[name]
    per_row = 2 * ROW_STATE.get(name, 0)
    dense = rows * dim * per_elem + rows * per_row
    lazy = touched * dim * (8 + 2 * STATE_BYTES[name]) + touched * per_row + nnz * dim * 4 + nnz * 16
    return dense, lazy


#: issue 13's target: the lazy sparse step this many times faster than the dense step
TARGET = {"cpu": 50, "cuda": 20}


def huge_page_bytes() -> int | None:
    """Bytes of this process's memory in transparent huge pages (AnonHugePages), None where the kernel
    does not say (not Linux)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def pages_note(huge: int | None) -> str:
    """How the CPU tensors were paged: the THP mode, torch's THP_MEM_ALLOC_ENABLE, the huge-page bytes
    seen while the tables were allocated."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "transparent huge pages: unknown"
    env = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    seen = "" if huge is None else f", {huge / 2**30:.1f} GiB in huge pages"
    return f"transparent huge pages `{mode}`, THP_MEM_ALLOC_ENABLE={env}{seen}"


def cpu_time(args: argparse.Namespace, device: torch.device) -> bool:
    """Whether this table is timed by process CPU time: asked for, on the CPU, one thread (with more,
    CPU time adds the threads up, so their tables take the wall clock)."""
    return args.cpu_time and device.type == "cpu" and torch.get_num_threads() == 1


KERNEL_NAMES = {"cpu": "C", "fused": "Triton", "reference": "none (reference path)"}
TOLERANCE = 1e-5


def check_rows(name: str, args: argparse.Namespace, device: torch.device,
               flags: dict[str, object]) -> tuple[float, str, bool]:
    """(largest relative difference, "<kernel> k/n", ok) of optimizer ``name``'s lazy steps (dense and
    sparse gradient, two steps each) on a table of at most ``--check-rows`` rows against the reference
    path, with the row kernel's calls counted (a call it cannot take falls back to the reference)."""
    rows = min(args.rows, args.check_rows)
    dense_grad, sparse_grad = make_grads(rows, args.dim, args.frac, device, seed=1)
    W0 = torch.randn(rows, args.dim, generator=torch.Generator().manual_seed(2)).to(device)
    taken: list[bool] = []
    original = tigeropt.kernels.get_rows_impl

    def counting(kernel: str, path: str) -> Callable[..., bool]:
        fn = original(kernel, path)

        def run(*a: object, **kw: object) -> bool:
            taken.append(bool(fn(*a, **kw)))
            return taken[-1]

        return run

    worst, path = 0.0, "reference"
    for grad in (dense_grad, sparse_grad):
        out = []
        for kw in (flags, {"foreach": False}):
            W = W0.clone().requires_grad_()
            opt = OPTIMIZERS[name]([W], lazy=True, **kw)
            if kw is flags:
                path = opt._rows_path(opt.param_groups[0], device)
                tigeropt.kernels.get_rows_impl = counting
            try:
                for _ in range(2):
                    W.grad = grad
                    opt.step()
            finally:
                tigeropt.kernels.get_rows_impl = original
            out.append([W.detach(), *(v for k, v in opt.state[W].items() if k != "step")])
        for a, b in zip(*out):
            scale = float(b.abs().max()) or 1.0
            worst = max(worst, float((a.float() - b.float()).abs().max()) / scale)
    steps = 4 if path != "reference" else 0
    # the kernel must take every step, unless the C library cannot be built here (then the default CPU
    # path is the reference, and says so: "C 0/4")
    required = path == "fused" or (path == "cpu" and tigeropt._cpu.available())
    ok = worst <= TOLERANCE and (all(taken) and len(taken) == steps or not required)
    return worst, f"{KERNEL_NAMES.get(path, path)} {sum(taken)}/{steps}", ok


def bench(args: argparse.Namespace, device: torch.device) -> tuple[list[list[str]], bool]:
    flags: dict[str, object] = {"fused": True} if args.fused else {}
    ok = True
    dense_grad, sparse_grad = make_grads(args.rows, args.dim, args.frac, device)
    touched = int(sparse_grad.coalesce().indices().shape[1])
    nnz = int(sparse_grad._nnz())
    W = torch.randn(args.rows, args.dim, device=device).requires_grad_()
    table = []
    huge: list[int] = []

    def run(make: Callable[[], torch.optim.Optimizer], grad: Tensor) -> tuple[float, float]:
        opt = make()
        W.grad = grad
        clock = time.process_time if cpu_time(args, device) else time.perf_counter
        ms = time_steps(opt.step, device, args.reps, args.warmup, clock)
        seen = huge_page_bytes()
        if seen is not None:
            huge.append(seen)
        W.grad = None
        del opt  # free the state before the next optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return ms

    for name in args.optimizers:
        make = OPTIMIZERS[name]
        worst, kernel, good = check_rows(name, args, device, flags)
        ok = ok and good
        dense = run(functools.partial(make, [W], **flags), dense_grad)
        lazy_dense = run(functools.partial(make, [W], lazy=True, **flags), dense_grad)
        lazy_sparse = run(functools.partial(make, [W], lazy=True, **flags), sparse_grad)
        b_dense, b_lazy = floor_bytes(name, args.rows, args.dim, touched, nnz)
        ratio, target = dense[0] / lazy_sparse[0], TARGET[device.type]
        table.append([name, ms(dense), ms(lazy_dense), ms(lazy_sparse),
                      f"{ratio:.1f}x ({dense[1] / lazy_sparse[1]:.1f}x)",
                      "met" if ratio >= target else f"{target / ratio:.2f}x short",
                      f"{b_dense / 1e6:.0f}", f"{b_lazy / 1e6:.1f}", f"{b_dense / b_lazy:.0f}x",
                      f"{b_dense / dense[0] / 1e6:.0f} / {b_lazy / lazy_sparse[0] / 1e6:.1f}",
                      f"{worst:.1e}, {kernel}" + ("" if good else " FAIL")])
    if args.torch_reference:
        adamw = run(lambda: torch.optim.AdamW([W], lr=1e-3), dense_grad)
        wrapped = run(lambda: LazyOptimizer(torch.optim.AdamW([W], lr=1e-3), [W]), dense_grad)
        sparse_adam = run(lambda: torch.optim.SparseAdam([W], lr=1e-3), sparse_grad)
        table.append(["torch AdamW / LazyOptimizer(AdamW) / SparseAdam", ms(adamw), ms(wrapped),
                      ms(sparse_adam), f"{adamw[0] / sparse_adam[0]:.1f}x ({adamw[1] / sparse_adam[1]:.1f}x)",
                      *[""] * 6])
    if device.type == "cpu":
        args.pages = pages_note(max(huge) if huge else None)
    return table, ok


def markdown(table: Sequence[Sequence[str]], args: argparse.Namespace, device: torch.device) -> str:
    header = ["optimizer", "dense step (ms)", "lazy, dense grad (ms)", "lazy, sparse grad (ms)",
              "dense / lazy sparse (fastest)", f"target {TARGET[device.type]}x", "floor: dense (MB)",
              "floor: lazy sparse (MB)", "floor ratio", "GB/s: dense / lazy sparse",
              "vs reference, row kernel"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    clock = "process CPU time" if cpu_time(args, device) else "wall clock"
    path = "fused=True (Triton kernels)" if args.fused else "default path"
    lines.append(f"\n{args.rows} x {args.dim} fp32 table, {args.frac:.2%} of rows touched, median / fastest "
                 f"of {args.reps} steps ({clock}), {where}, {path}, torch {torch.__version__}; checked on "
                 f"{min(args.rows, args.check_rows)} rows")
    if device.type == "cpu":
        lines[-1] += f"; {args.pages}"
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--frac", type=float, default=0.01, help="fraction of rows touched")
    parser.add_argument("--reps", type=int, default=20 if cuda else 7)
    parser.add_argument("--warmup", type=int, default=3 if cuda else 2)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if cuda else ["cpu"])
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch CPU thread counts, one CPU table each (default: 1 and torch's default)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time 1-thread CPU tables by the process's CPU time instead of the wall clock "
                             "(on a shared machine: other processes on the cores); tables with more threads "
                             "take the wall clock")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--no-torch-reference", dest="torch_reference", action="store_false",
                        help="skip the torch AdamW / LazyOptimizer / SparseAdam row")
    parser.add_argument("--fused", action="store_true",
                        help="fused=True for every tigeropt optimizer: the Triton kernels (on the CPU only "
                             "under TRITON_INTERPRET=1)")
    parser.add_argument("--check-rows", type=int, default=10_000,
                        help="rows of the table on which the lazy steps are checked against the reference")
    parser.add_argument("--out", default=None, help="also write the tables (markdown) to this file")
    parser.add_argument("--note", default="", help="a line about the conditions, written under the tables")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> tuple[str, bool]:
    args = parse_args(argv)
    default_threads = torch.get_num_threads()
    threads = list(dict.fromkeys(args.threads or [1, default_threads]))
    texts = []
    ok = True
    try:
        for name in args.devices:
            device = torch.device(name)
            for n in threads if device.type == "cpu" else [default_threads]:
                torch.set_num_threads(n)
                table, good = bench(args, device)
                ok = ok and good
                texts.append(markdown(table, args, device))
                print(texts[-1] + "\n", flush=True)
    finally:
        torch.set_num_threads(default_threads)
    if args.out:
        conditions = f"\n\n{args.note}" if args.note else ""
        command = "python benchmarks/bench_lazy.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        Path(args.out).write_text(f"# Lazy-row step vs dense step\n\n`{command}`\n\n" + "\n\n".join(texts)
                                  + conditions + "\n")
    if not ok:
        print(f"FAIL: a lazy step differs from the reference by more than {TOLERANCE:g} (relative), or the "
              "row kernel did not take every step (see the last column)", flush=True)
    return "\n\n".join(texts), ok


if __name__ == "__main__":
    sys.exit(0 if main()[1] else 1)
