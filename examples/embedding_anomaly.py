"""Seed 000's embedding anomaly under Tiger, and its two remedies, on a small language model.

Seed 000 (Su, "Lion/Tiger优化器训练下的Embedding异常和对策", https://kexue.fm/archives/9736):
with a sign optimizer a token's embedding row keeps moving after the token's last
occurrence, because sign(m) stays +-1 while m decays, until m underflows to 0.  With
Tiger's decoupled weight decay the row then drifts to the fixed point of

    p = p - lr*(sign(m) + wd*p)    ->    p* = -sign(m)/wd    (+-100 for wd = 0.01)

so rare tokens end up with components near +-100 while the loss looks normal.  Adam's
update m/sqrt(v) shrinks with m, so it does not drift.  Remedies: lazy rows (a row
without gradient in a step does not move) or a mixed optimizer (AdamW for the embedding,
Tiger for the rest).

Data: sequences of a Markov chain over ``--vocab`` tokens whose token frequencies follow
Zipf's law, p(rank r) ~ r^-s (``--zipf``): the next token is a fixed function pi(x) of
the current one with probability 1/2, otherwise a fresh Zipf draw (pi(x) is itself a
Zipf draw, so the marginal stays Zipf-like and the model has something to learn).
Model: a ``--context``-token MLP language model (embedding -> concat -> Linear -> tanh ->
Linear to the vocabulary, untied).  Three runs from the same initial weights and data:

    tiger   plain Tiger, weight decay ``--wd`` (0.01)
    lazy    Tiger with ``lazy=True`` on the embedding group
    mixed   tigeropt.split_embeddings: AdamW on the embedding, Tiger on the rest

The drift takes about 1/(lr*wd) steps to approach +-1/wd; to see it in a one-minute run
the embedding group uses a large lr (``--emb-lr`` 0.1, so 1/(lr*wd) = 1000 steps), the
other weights ``--lr``.  "Rare" tokens are those seen in a context 1..``--rare-max`` times,
the last time at least half a run before its end; "frequent" ones are the ``--top`` most
frequent.  Magnitude of a row: mean |component|.

    python examples/embedding_anomaly.py                  # 3 minutes wall at load average 8 on 2 cores
    python examples/embedding_anomaly.py --steps 500      # quick look

Prints a table; with ``--out DIR`` also writes ``DIR/embedding_anomaly.md`` (the table with date,
command and versions), ``DIR/embedding_anomaly.csv`` (every row's magnitude) and, with matplotlib
installed, ``DIR/embedding_anomaly.png`` (row magnitude against frequency rank); without it nothing
is written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import tigeropt
from tigeropt.mixed import split_embeddings

OUT = Path(__file__).resolve().parent / "out"
RUNS = ("tiger", "lazy", "mixed")


@dataclass
class Config:
    vocab: int = 5000
    zipf: float = 1.3
    dim: int = 32
    hidden: int = 128
    context: int = 2
    batch: int = 64
    steps: int = 2000
    lr: float = 1e-3          # Tiger lr of the non-embedding weights (Tiger's default)
    emb_lr: float = 0.1       # Tiger lr of the embedding
    adamw_lr: float = 1e-2    # AdamW lr of the embedding in the mixed run
    wd: float = 0.01
    rare_max: int = 3
    top: int = 100
    seed: int = 0


@dataclass
class Result:
    name: str
    losses: list[float]
    weight: Tensor             # final embedding table
    counts: Tensor             # occurrences of each token in a context
    last_seen: Tensor          # last step each token was in a context (-1: never)
    stats: dict[str, float] = field(default_factory=dict)


class ContextLM(nn.Module):
    """Predict the next token from the previous ``context`` tokens."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.hidden = nn.Linear(cfg.context * cfg.dim, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.vocab)

    def forward(self, ctx: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(self.embedding(ctx).flatten(1))))


def zipf_probs(vocab: int, exponent: float) -> Tensor:
    """p(rank r) proportional to r^-exponent, r = 1..vocab (token id = rank - 1)."""
    p = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-exponent)
    return p / p.sum()


def make_batches(cfg: Config) -> list[tuple[Tensor, Tensor]]:
    """``cfg.steps`` batches of (context tokens, next token) from the Zipf Markov chain."""
    gen = torch.Generator().manual_seed(cfg.seed)
    probs = zipf_probs(cfg.vocab, cfg.zipf)
    pi = torch.multinomial(probs, cfg.vocab, replacement=True, generator=gen)
    n = cfg.steps * cfg.batch
    seq = [torch.multinomial(probs, n, replacement=True, generator=gen)]
    for _ in range(cfg.context):
        fresh = torch.multinomial(probs, n, replacement=True, generator=gen)
        follow = torch.rand(n, generator=gen) < 0.5
        seq.append(torch.where(follow, pi[seq[-1]], fresh))
    tokens = torch.stack(seq, dim=1).view(cfg.steps, cfg.batch, cfg.context + 1)
    return [(b[:, :-1].contiguous(), b[:, -1].contiguous()) for b in tokens]


def make_optimizer(name: str, model: ContextLM, cfg: Config) -> torch.optim.Optimizer:
    rest = [p for n, p in model.named_parameters() if not n.startswith("embedding")]
    if name in ("tiger", "lazy"):
        return tigeropt.Tiger([{"params": [model.embedding.weight], "lr": cfg.emb_lr, "lazy": name == "lazy"},
                               {"params": rest}], lr=cfg.lr, weight_decay=cfg.wd)
    if name == "mixed":
        return split_embeddings(
            model, functools.partial(torch.optim.AdamW, lr=cfg.adamw_lr, weight_decay=cfg.wd),
            functools.partial(tigeropt.Tiger, lr=cfg.lr, weight_decay=cfg.wd))
    raise ValueError(f"Invalid run name: {name!r} (one of {RUNS})")


def train(name: str, cfg: Config, batches: Sequence[tuple[Tensor, Tensor]] | None = None) -> Result:
    """Train one run; same initial weights and data for every ``name``."""
    batches = make_batches(cfg) if batches is None else batches
    torch.manual_seed(cfg.seed)
    model = ContextLM(cfg)
    opt = make_optimizer(name, model, cfg)
    counts = torch.zeros(cfg.vocab, dtype=torch.long)
    last_seen = torch.full((cfg.vocab,), -1, dtype=torch.long)
    losses = []
    for step, (ctx, target) in enumerate(batches):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(ctx), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        flat = ctx.flatten()
        counts += torch.bincount(flat, minlength=cfg.vocab)
        last_seen[flat] = step
    result = Result(name, losses, model.embedding.weight.detach().clone(), counts, last_seen)
    result.stats = embedding_stats(result, cfg)
    return result


def row_groups(counts: Tensor, last_seen: Tensor, cfg: Config) -> tuple[Tensor, Tensor]:
    """Indices of the rare rows (seen 1..rare_max times, last before steps/2) and of the frequent ones."""
    rare = ((counts >= 1) & (counts <= cfg.rare_max) & (last_seen < cfg.steps // 2)).nonzero().squeeze(1)
    frequent = counts.argsort(descending=True)[:cfg.top]
    return rare, frequent


def embedding_stats(result: Result, cfg: Config) -> dict[str, float]:
    rare, frequent = row_groups(result.counts, result.last_seen, cfg)
    mag = result.weight.abs().mean(dim=1)
    tail = max(1, len(result.losses) // 10)
    nan = float("nan")
    return {
        "loss": sum(result.losses[-tail:]) / tail,       # mean training loss over the last 10% of steps
        "n_rare": float(len(rare)),
        "frequent_mean_abs": mag[frequent].mean().item(),
        "rare_mean_abs": mag[rare].mean().item() if len(rare) else nan,
        "rare_max_abs": result.weight[rare].abs().max().item() if len(rare) else nan,
        "table_max_abs": result.weight.abs().max().item(),
    }


def format_table(results: Sequence[Result], cfg: Config) -> str:
    header = (f"| run   | final loss | mean abs, {cfg.top} most frequent rows | mean abs, rare rows | "
              f"max abs, rare rows | max abs, table |")
    lines = [header, "|" + "|".join("---" for _ in range(6)) + "|"]
    for r in results:
        s = r.stats
        lines.append(f"| {r.name:5} | {s['loss']:.3f} | {s['frequent_mean_abs']:.2f} | "
                     f"{s['rare_mean_abs']:.2f} | {s['rare_max_abs']:.2f} | {s['table_max_abs']:.2f} |")
    n_rare = int(results[0].stats["n_rare"])
    lines.append(f"\nrare rows: {n_rare} tokens seen 1..{cfg.rare_max} times, the last time before step "
                 f"{cfg.steps // 2} of {cfg.steps}; the sign-optimizer fixed point is "
                 f"+-1/wd = {1 / cfg.wd:g}")
    return "\n".join(lines)


def save_outputs(results: Sequence[Result], cfg: Config, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    csv = out / "embedding_anomaly.csv"
    with csv.open("w") as f:
        f.write("run,token,count,last_seen,mean_abs\n")
        for r in results:
            mag = r.weight.abs().mean(dim=1)
            for t in range(cfg.vocab):
                f.write(f"{r.name},{t},{int(r.counts[t])},{int(r.last_seen[t])},{mag[t].item():.6g}\n")
    written.append(csv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib); the CSV has the same data")
        return written
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), sharey=True)
    for ax, r in zip(axes, results):
        rare, frequent = row_groups(r.counts, r.last_seen, cfg)
        mag = r.weight.abs().mean(dim=1)
        seen = (r.counts > 0).nonzero().squeeze(1)
        ax.scatter(seen + 1, mag[seen], s=2, c="0.6", label="seen tokens")
        ax.scatter(rare + 1, mag[rare], s=4, c="tab:red", label=f"rare (seen early, <= {cfg.rare_max} times)")
        ax.scatter(frequent + 1, mag[frequent], s=4, c="tab:blue", label=f"{cfg.top} most frequent")
        ax.axhline(1 / cfg.wd, ls="--", c="k", lw=0.8, label="1/wd")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel("token frequency rank")
        ax.set_title(f"{r.name}: loss {r.stats['loss']:.3f}")
    axes[0].set_ylabel("embedding row mean |component|")
    axes[0].legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    png = out / "embedding_anomaly.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    written.append(png)
    return written


def run_all(cfg: Config, names: Sequence[str] = RUNS) -> list[Result]:
    batches = make_batches(cfg)
    return [train(name, cfg, batches) for name in names]


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in Config().__dict__.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help=f"write the table, a CSV and a PNG into DIR, e.g. {OUT} (default: print only)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (small model: 1 is fastest)")
    args = parser.parse_args(argv)
    cfg = Config(**{k: getattr(args, k) for k in Config().__dict__})
    return cfg, args


def main(argv: Sequence[str] | None = None) -> list[Result]:
    cfg, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = run_all(cfg)
    table = format_table(results, cfg)
    print(table)
    if args.out is not None:
        for path in save_outputs(results, cfg, args.out):
            print(f"wrote {path}")
        command = " ".join(sys.argv[1:] if argv is None else argv)
        header = [f"# Embedding anomaly under Tiger and its remedies ({dt.date.today().isoformat()})", "",
                  f"- command: `{f'python examples/{Path(__file__).name} {command}'.strip()}`",
                  f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
                  f"tigeropt {tigeropt.__version__}; {torch.get_num_threads()} torch thread(s); "
                  f"{time.perf_counter() - start:.0f} s wall",
                  f"- config: {cfg}", ""]
        md = args.out / "embedding_anomaly.md"
        md.write_text("\n".join(header) + "\n" + table + "\n")
        print(f"wrote {md}")
    print(f"{time.perf_counter() - start:.1f} s")
    return results


if __name__ == "__main__":
    main()
