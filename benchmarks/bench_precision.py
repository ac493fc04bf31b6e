"""Does low precision still train?  fp32 vs bf16 parameters (round-to-nearest / stochastic rounding),
bf16 and 8-bit optimizer state, on the demo's character-level LM: a quick one-seed check.

The evidence table (the quality study's settings, paired seeds, standard errors, bitsandbytes and
torchao rows) is ``python benchmarks/bench_quality.py --precision --out <dir>``.

    python benchmarks/bench_precision.py                                  # ~15 min on 1 CPU thread
    python benchmarks/bench_precision.py --steps 300 --optimizers tiger,lion --out results/precision.md

Rows (same initial weights, same batches, warm-up + cosine schedule, gradient clipping):

* AdamW, fp32 parameters (torch.optim.AdamW, the baseline for bytes);
* per optimizer: fp32 parameters + fp32 state; bf16 parameters, round-to-nearest (fp32 state);
  bf16 + stochastic rounding (fp32 state); + bf16 state; + 8-bit state.

bf16 rows train a bf16 model (forward and backward in bf16, no fp32 master weights).  The
held-out loss is measured with an fp32 copy of the final weights, so every row is judged by
the same evaluation.  Bytes/param counts parameters + optimizer state (step counters aside).
Wall time is the whole run (training steps only) on this machine, sensitive to other load; the
last table times Tiger's ``optimizer.step()`` alone per setting, interleaved (``--step-only``:
just that table).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tigeropt
from tigeropt import demo

SR = {"stochastic_rounding": True}
SETTINGS: list[tuple[str, torch.dtype, dict[str, Any]]] = [
    ("fp32 params, fp32 state", torch.float32, {}),
    ("bf16 params, round-to-nearest", torch.bfloat16, {}),
    ("bf16 params + SR", torch.bfloat16, SR),
    ("bf16 params + SR, bf16 state", torch.bfloat16, {**SR, "state_precision": "bf16"}),
    ("bf16 params + SR, 8-bit state", torch.bfloat16, {**SR, "state_precision": "8bit"}),
]


@dataclass
class Row:
    optimizer: str
    setting: str
    heldout: float
    bytes_per_param: float
    wall_s: float


def build(name: str, model: nn.Module, steps: int, options: dict[str, Any]) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    recipe = demo.RECIPES[name]
    groups = [dict(params=decay), dict(params=no_decay, weight_decay=0.0)]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    cls = {"tiger": tigeropt.Tiger, "lion": tigeropt.Lion}[name]
    return cls(groups, lr=recipe.lr, weight_decay=recipe.weight_decay, **demo.momentum_kwargs(name, steps),
               **options)


def run(name: str, setting: str, dtype: torch.dtype, options: dict[str, Any], corpus: demo.CharCorpus,
        steps: int, batch_size: int, eval_batches: int, seed: int) -> Row:
    torch.manual_seed(seed)
    model = demo.CharTransformer().to(dtype)
    opt = build(name, model, steps, options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, demo.cosine_with_warmup(steps))
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = corpus.batch("train", batch_size, model.context, gen)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    wall = time.perf_counter() - start
    evaluated = copy.deepcopy(model).float()
    heldout = demo.evaluate(evaluated, corpus, "heldout", batches=eval_batches, batch_size=batch_size,
                            seed=seed)
    n = sum(p.numel() for p in model.parameters())
    nbytes = demo.param_bytes(model) + demo.state_bytes(opt)
    return Row(name, setting, heldout, nbytes / n, wall)


def step_times(numel: int, repeats: int) -> list[str]:
    """Markdown rows: ms per Tiger ``optimizer.step()`` on one tensor of ``numel`` elements per setting
    (best of ``repeats``, the settings interleaved so machine load hits them alike)."""
    opts = []
    for setting, dtype, options in SETTINGS:
        p = torch.randn(numel).to(dtype).requires_grad_()
        p.grad = torch.randn_like(p)
        opt = tigeropt.Tiger([p], **options)
        opt.step()
        opts.append((setting, opt))
    best = {s: math.inf for s, _ in opts}
    for _ in range(repeats):
        for setting, opt in opts:
            t0 = time.perf_counter()
            opt.step()
            best[setting] = min(best[setting], time.perf_counter() - t0)
    return [f"| {s} | {1e3 * t:.2f} |" for s, t in best.items()]


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--optimizers", default="tiger,lion")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table to this file")
    ap.add_argument("--step-only", action="store_true", help="only the optimizer.step() timing table")
    ap.add_argument("--step-numel", type=int, default=1 << 22)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cmd = "python benchmarks/bench_precision.py " + " ".join(sys.argv[1:] if argv is None else argv)
    step_table = [f"Tiger `optimizer.step()` on one tensor of {args.step_numel:,} elements, default path, "
                  f"{args.threads} thread(s), best of 20:", "", "| setting | ms / step |", "|---|---:|",
                  *step_times(args.step_numel, 20)]
    if args.step_only:
        text = f"`{cmd.strip()}`\n\n" + "\n".join(step_table)
        print(text)
        if args.out is not None:
            args.out.write_text(text + "\n")
        return []
    corpus = demo.load_corpus()
    jobs = [("adamw", "fp32 params, fp32 state", torch.float32, {})]
    jobs += [(name, *s) for name in args.optimizers.split(",") for s in SETTINGS]
    rows = []
    for name, setting, dtype, options in jobs:
        rows.append(run(name, setting, dtype, options, corpus, args.steps, args.batch_size, args.eval_batches,
                        args.seed))
        r = rows[-1]
        print(f"{r.optimizer:6s} {r.setting:32s} held-out {r.heldout:.4f}  {r.bytes_per_param:.3f} B/param  "
              f"{r.wall_s:.1f} s", flush=True)
    base = {r.optimizer: r.heldout for r in rows if r.setting == SETTINGS[0][0]}
    lines = [f"`{cmd.strip()}` ({args.steps} steps, batch {args.batch_size}, seed {args.seed}, "
             f"{args.threads} thread(s))", "",
             "| optimizer | setting | held-out loss | vs fp32 | bytes / param | wall s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        rel = 100 * (r.heldout / base[r.optimizer] - 1)
        lines.append(f"| {r.optimizer} | {r.setting} | {r.heldout:.4f} | {rel:+.2f}% | "
                     f"{r.bytes_per_param:.3f} | {r.wall_s:.1f} |")
    text = "\n".join([*lines, "", *step_table])
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return rows


if __name__ == "__main__":
    main()
