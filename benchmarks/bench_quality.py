"""Convergence benchmark: AdamW vs Tiger, Lion, AdaX (and Adagrad) on two real tasks, on CPU, offline.

    python benchmarks/bench_quality.py                 # ~15 minutes on 2 CPU cores
    python benchmarks/bench_quality.py --quick         # a minute, to check that it runs

Tasks
* ``charlm``: the demo's character-level transformer (``tigeropt.demo``) on the Python
  standard library's source, longer than the demo; metric: held-out cross-entropy
  (nats/char) on fixed batches after the last step.
* ``digits``: a small CNN on scikit-learn's bundled 8x8 digits (1797 images; fixed
  75/25 split); metric: test cross-entropy and accuracy, mean over ``--seeds`` seeds.
  Skipped, with a note, when scikit-learn is not installed.

Each optimizer runs a small lr sweep (``--lr-factors`` times its recommended lr; weight
decay fixed at its recommended value), every run with the same initialisation, batches,
warm-up + cosine schedule and gradient clipping.  The best lr per optimizer (by the
held-out metric) is compared with AdamW's best at equal steps: the target is a final
loss within 2% of AdamW's with Tiger/Lion's half of AdamW's optimizer-state memory.

Writes ``benchmarks/results/quality-cpu-<date>.md`` (tables), ``.json`` (every run) and
``.png`` (loss curves of the best runs; needs matplotlib).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from tigeropt import demo

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.02  # relative final-loss gap to AdamW
#: Centre of each lr sweep.  char-LM: the demo's recipes (tigeropt.demo.RECIPES); digits: the small
#: CNN takes larger steps (scouted once with factors 0.3-10).  Weight decay is the recipe's in both.
LR_CENTERS = {
    "charlm": {name: r.lr for name, r in demo.RECIPES.items()},
    "digits": {"adamw": 1e-2, "tiger": 2e-3, "lion": 1e-3, "adax": 1e-2, "adagrad": 6e-2},
}


@dataclass
class Run:
    task: str
    optimizer: str
    label: str
    lr: float
    weight_decay: float
    steps: int
    train_loss: float
    heldout_loss: float
    accuracy: float | None
    wall_s: float
    opt_ms_per_step: float
    state_bytes: int
    param_bytes: int
    curve: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------- char-LM
def run_charlm(name: str, lr: float, *, steps: int, corpus: demo.CharCorpus, seed: int,
               batch_size: int = 32) -> Run:
    r = demo.train(name, corpus, steps=steps, seed=seed, lr=lr, batch_size=batch_size, progress=False,
                   eval_batches=32)
    return Run("charlm", name, r.label, r.lr, r.weight_decay, steps, r.train_loss, r.heldout_loss, None,
               r.wall_s, r.opt_ms_per_step, r.state_bytes, r.param_bytes, _smooth(r.curve))


# --------------------------------------------------------------------------- digits
def load_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """scikit-learn's bundled digits as (x_train, y_train, x_test, y_test); None without sklearn."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        return None
    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_train = int(0.75 * len(y))
    mean, std = x[:n_train].mean(), x[:n_train].std()
    x = (x - mean) / std
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def digits_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def run_digits(name: str, lr: float, *, epochs: int, data: tuple[torch.Tensor, ...], seeds: int,
               batch_size: int = 64) -> Run:
    x_tr, y_tr, x_te, y_te = data
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 40k-parameter CNN: threads only add overhead (and suffer on a busy machine)
    per_epoch = math.ceil(len(y_tr) / batch_size)
    steps = epochs * per_epoch
    metrics: list[tuple[float, float, float]] = []
    curves: list[list[float]] = []
    wall = opt_s = 0.0
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = digits_model()
        opt, lr_used, wd = demo.make_optimizer(name, model, lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, demo.cosine_with_warmup(steps))
        gen = torch.Generator().manual_seed(seed)
        curve: list[float] = []
        start = time.perf_counter()
        for _ in range(epochs):
            order = torch.randperm(len(y_tr), generator=gen)
            for i in range(per_epoch):
                idx = order[i * batch_size:(i + 1) * batch_size]
                loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                t0 = time.perf_counter()
                opt.step()
                opt_s += time.perf_counter() - t0
                sched.step()
                curve.append(loss.item())
        wall += time.perf_counter() - start
        with torch.no_grad():
            train_loss = float(nn.functional.cross_entropy(model(x_tr), y_tr))
            logits = model(x_te)
            test_loss = float(nn.functional.cross_entropy(logits, y_te))
            acc = float((logits.argmax(1) == y_te).float().mean())
        metrics.append((train_loss, test_loss, acc))
        curves.append(curve)
    torch.set_num_threads(threads)
    mean = [sum(m[i] for m in metrics) / seeds for i in range(3)]
    curve = [sum(c[i] for c in curves) / seeds for i in range(steps)]
    return Run("digits", name, demo.RECIPES[name].label, lr_used, wd, steps, mean[0], mean[1], mean[2],
               wall / seeds, 1e3 * opt_s / (seeds * steps), demo.state_bytes(opt), demo.param_bytes(model),
               _smooth(curve))


def _smooth(curve: list[float], points: int = 200) -> list[float]:
    """Mean over equal chunks: at most ``points`` values (keeps the JSON and the plot small)."""
    if len(curve) <= points:
        return list(curve)
    size = len(curve) / points
    return [sum(curve[int(i * size):int((i + 1) * size)]) / max(1, int((i + 1) * size) - int(i * size))
            for i in range(points)]


# --------------------------------------------------------------------------- report
def best_runs(runs: list[Run]) -> dict[str, Run]:
    best: dict[str, Run] = {}
    for r in runs:
        if math.isfinite(r.heldout_loss) and (r.optimizer not in best
                                              or r.heldout_loss < best[r.optimizer].heldout_loss):
            best[r.optimizer] = r
    return best


def task_table(task: str, runs: list[Run]) -> list[str]:
    best = best_runs(runs)
    if not best:
        return [f"No finished runs for {task}."]
    ref = best.get("adamw")
    acc = task == "digits"
    head = ("| optimizer | lr sweep | best lr | wd | train loss | held-out loss | vs AdamW "
            + ("| test acc. " if acc else "")
            + "| wall s / run | ms / opt.step | state bytes | state / params |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if acc else "") + "---:|---:|---:|---:|"]
    for name, r in best.items():
        sweep = ", ".join(f"{x.lr:g}" + ("*" if x is r else "") for x in runs if x.optimizer == name)
        gap = "" if ref is None else f"{100 * (r.heldout_loss / ref.heldout_loss - 1):+.1f}%"
        lines.append(f"| {r.label} | {sweep} | {r.lr:g} | {r.weight_decay:g} | {r.train_loss:.4f} "
                     f"| {r.heldout_loss:.4f} | {gap} " + (f"| {100 * r.accuracy:.2f}% " if acc else "")
                     + f"| {r.wall_s:.1f} | {r.opt_ms_per_step:.2f} | {r.state_bytes:,} "
                     f"| {r.state_bytes / r.param_bytes:.2f}x |")
    return lines


def verdict(task: str, runs: list[Run]) -> list[str]:
    """One line per Tiger/Lion: final loss relative to AdamW's (both best lr), and state memory.

    char-LM: held-out and training loss.  digits: the training loss goes to ~0 for every
    optimizer, so a relative 2% says nothing there; test accuracy and test loss are compared.
    """
    best = best_runs(runs)
    ref = best.get("adamw")
    if ref is None:
        return []
    out = []
    for name in ("tiger", "lion"):
        r = best.get(name)
        if r is None:
            continue
        mem = r.state_bytes / ref.state_bytes
        gap = r.heldout_loss / ref.heldout_loss - 1
        if task == "digits":
            assert r.accuracy is not None and ref.accuracy is not None
            out.append(f"- digits: {r.label} test accuracy {100 * r.accuracy:.2f}% vs AdamW "
                       f"{100 * ref.accuracy:.2f}% ({100 * (r.accuracy - ref.accuracy):+.2f} points), "
                       f"test loss {r.heldout_loss:.4f} vs {ref.heldout_loss:.4f}; "
                       f"{mem:.2f}x AdamW's state bytes.")
            continue
        train_gap = r.train_loss / ref.train_loss - 1
        ok = gap <= TARGET and train_gap <= TARGET
        out.append(f"- {task}: {r.label} held-out loss {r.heldout_loss:.4f} vs AdamW {ref.heldout_loss:.4f} "
                   f"({100 * gap:+.1f}%), train loss {100 * train_gap:+.1f}%: "
                   f"**{'within' if ok else 'not within'} 2%**, with {mem:.2f}x AdamW's "
                   "optimizer-state bytes.")
    return out


def plot(runs: list[Run], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = sorted({r.task for r in runs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        task_runs = [r for r in runs if r.task == task]
        for r in best_runs(task_runs).values():
            xs = [(i + 0.5) * r.steps / len(r.curve) for i in range(len(r.curve))]
            ax.plot(xs, r.curve, label=f"{r.label} (lr {r.lr:g}): {r.heldout_loss:.3f}")
        ax.set_title({"charlm": "char-level LM on stdlib source (train loss)",
                      "digits": "sklearn digits CNN (train loss, mean of seeds)"}.get(task, task))
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        if task == "digits":
            ax.set_yscale("log")
        else:
            ax.set_ylim(top=min(3.5, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
        ax.legend(title="best lr: final held-out loss", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(runs: list[Run], notes: list[str], args: argparse.Namespace, stem: Path,
                 elapsed: float) -> Path:
    png = stem.with_suffix(".png")
    has_png = plot(runs, png)
    lines = [f"# Convergence benchmark (CPU) — {dt.date.today().isoformat()}", "",
             f"`python benchmarks/bench_quality.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
             "",
             f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
             f"{platform.processor() or 'cpu'}, Python {platform.python_version()}; "
             f"total {elapsed / 60:.1f} min. "
             "Every optimizer: same init, "
             "same batches, warm-up (5%) + cosine to 10% lr, gradient clipping at 1.0; weight decay on "
             "matrices/embeddings only. lr sweep = recommended lr x " + ", ".join(args.lr_factors.split(","))
             + " (best marked *). Held-out loss = cross-entropy after the last step; 'vs AdamW' compares "
             "best runs at equal steps. State bytes exclude the scalar step counters.", ""]
    for task in ("charlm", "digits"):
        task_runs = [r for r in runs if r.task == task]
        if not task_runs:
            continue
        title = {"charlm": f"## Character-level LM ({task_runs[0].steps} steps x {args.lm_batch_size} x 64 "
                           "characters, held-out = unseen stdlib files)",
                 "digits": f"## sklearn digits, small CNN ({task_runs[0].steps} steps, mean of {args.seeds} "
                           "seeds, held-out = test split)"}[task]
        lines += [title, "", *task_table(task, task_runs), ""]
    lines += ["## Target: Tiger and Lion within 2% of AdamW's final loss, with half its state memory", ""]
    for task in ("charlm", "digits"):
        lines += verdict(task, [r for r in runs if r.task == task])
    lines += [""] + notes
    if has_png:
        lines += ["", f"![loss curves]({png.name})"]
    md = stem.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps([asdict(r) for r in runs], indent=1))
    return md


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="charlm,digits")
    parser.add_argument("--optimizers", default="adamw,tiger,lion,adax,adagrad")
    parser.add_argument("--lm-optimizers", default="adamw,tiger,lion,adax",
                        help="optimizers for the char-LM (Adagrad is left out: it does not fit transformers)")
    parser.add_argument("--lr-factors", default="0.5,1,2", help="multiples of each recommended lr")
    parser.add_argument("--lm-steps", type=int, default=600)
    parser.add_argument("--lm-batch-size", type=int, default=32, help="char-LM windows per step")
    parser.add_argument("--digits-epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3, help="digits: seeds averaged per setting")
    parser.add_argument("--seed", type=int, default=0, help="char-LM seed")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steady timings on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="appended to the results file names")
    args = parser.parse_args(argv)
    if args.quick:
        args.lm_steps, args.digits_epochs, args.seeds, args.lr_factors = 20, 2, 1, "1"
    torch.set_num_threads(args.threads)
    factors = [float(f) for f in args.lr_factors.split(",")]
    tasks = [t.strip() for t in args.tasks.split(",")]
    notes: list[str] = []
    runs: list[Run] = []
    start = time.perf_counter()

    def sweep(task: str, names: list[str], fn: Callable[[str, float], Run]) -> None:
        for name in names:
            for f in factors:
                lr = LR_CENTERS[task][name] * f
                r = fn(name, lr)
                runs.append(r)
                print(f"{task:>7} {r.label:>8} lr {lr:<9.3g} train {r.train_loss:.4f} held-out "
                      f"{r.heldout_loss:.4f}" + (f" acc {r.accuracy:.4f}" if r.accuracy is not None else "")
                      + f"  {r.wall_s:.1f}s", flush=True)

    if "charlm" in tasks:
        corpus = demo.load_corpus()
        names = [n.strip() for n in args.lm_optimizers.split(",") if n.strip()]
        sweep("charlm", names,
              lambda n, lr: run_charlm(n, lr, steps=args.lm_steps, corpus=corpus, seed=args.seed,
                                       batch_size=args.lm_batch_size))
    if "digits" in tasks:
        data = load_digits()
        if data is None:
            notes.append("- digits skipped: scikit-learn is not installed (`pip install scikit-learn`).")
        else:
            names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
            sweep("digits", names, lambda n, lr: run_digits(n, lr, epochs=args.digits_epochs, data=data,
                                                               seeds=args.seeds))
    args.out.mkdir(parents=True, exist_ok=True)
    tag = ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    stem = args.out / f"quality-cpu-{dt.date.today().isoformat()}{tag}"
    md = write_report(runs, notes, args, stem, time.perf_counter() - start)
    print(md.read_text())
    print(f"wrote {md}", flush=True)


if __name__ == "__main__":
    main()
