"""Seed 004's "simpler GloVe" trained with sparse Adagrad, standard vs GloVe-style.

Corpus: the docstrings and comments of the Python standard library installed with this
interpreter (``sysconfig.get_paths()["stdlib"]``), so the example runs offline anywhere.
Each docstring and each block of consecutive comment lines is one segment; windows do not
cross segments.  Words are lowercase runs of letters; the ``--vocab`` most frequent with at least
``--min-count`` (5, GloVe's demo value) occurrences are kept and the others dropped before
windowing (as GloVe's cooccur does).  The stdlib has ~17k distinct such words and ~7k occur 5+ times.

Co-occurrence: every pair of in-vocabulary tokens at distance 1..``--window`` inside a segment
counts once (unweighted, as seed 004 defines it); a word paired with itself is not counted
(seed 004: "不算入相同的共现项").  With X_ij the symmetric count, c_i the unigram count,
N the number of tokens and S = sum_{i != j} X_ij:

    P_ij = X_ij / S,   P_i = c_i / N,   t_ij = log(P_ij / (P_i P_j))

Model and loss (seed 004, eqs. 16, 19, 21): one table of vectors v (``nn.Embedding(sparse=True)``),

    L = sum_{i<j, X_ij>0} 0.5 * lambda_ij * (<v_i, v_j> - t_ij)^2,
    lambda_ij = min(X_ij / x_max, 1)^alpha    (x_max = 100, alpha = 0.75; '-untruncated' runs drop the min)

The 0.5 makes the gradient exactly seed 004's eq. (22) (and glove.c's), which matters for the
GloVe-style update because it is not invariant to the loss scale.  Mini-batches of pairs sum
their losses, so a batch is the sum of GloVe's per-pair updates for the words it touches.

It trains with :class:`tigeropt.Adagrad` in standard form (lr 0.1, seed 004's default eta),
GloVe-style (``glove=True``, GloVe's lr 0.05) and row-wise (``rowwise=True``, FBGEMM's one
accumulator per word: 4 bytes per word instead of 4*dim), with lambda truncated at x_max (GloVe's
weighting) and, for the first two, untruncated (seed 004 lets the user drop the min); it prints
each run's time per epoch and optimizer-state memory, reports whether each run
diverges (non-finite loss) and prints nearest neighbours for the runs that stayed finite.  With
``--out DIR`` it also writes ``DIR/simpler_glove.md`` (date, command, versions and everything it
printed), the loss curves ``DIR/simpler_glove_loss.csv`` and, with matplotlib installed, ``.png``;
without it nothing is written.

What we found on this corpus (10 epochs, batch 4096): standard Adagrad never diverges, with or
without truncation (its step is at most lr per coordinate and it ignores the loss scale).
GloVe-style with truncated weights does not diverge either, but starts slowly (its first steps
are SGD with lr*g and the tiny initial vectors sit near the saddle at v = 0).  Without
truncation lambda reaches ~44 for the most frequent pairs and GloVe-style goes to inf/NaN within
the first epoch (also with batch 256), as seed 004 reports; it also diverges with truncation at
lr 0.5.

Row-wise Adagrad at the largest vocabulary the stdlib has (``--vocab 50000 --min-count 1``: all
17,194 words, 764k pairs, dim 64, 5 epochs; ``--runs standard,glove,rowwise``) on a shared 2-core
CPU: standard 2.48 s/epoch, 4.40 MB of optimizer state, final loss per pair 0.0148; GloVe-style
2.27 s/epoch, 4.40 MB, 0.172 (still in its slow start); row-wise 1.90 s/epoch, 0.069 MB (one
float per word), 0.0145.  Row-wise matches standard Adagrad's loss and neighbours (both fit the
PMI of rare words: "file" -> sndt, voc, hcom) with 1/64 of the state; GloVe-style's neighbours
after 5 epochs look the most semantic ("error" -> raised, raises, exception, oserror).

    python examples/simpler_glove.py                    # default, a few minutes on 2 CPU cores
    python examples/simpler_glove.py --max-files 200 --epochs 3    # quick look
    python examples/simpler_glove.py --runs glove-untruncated --batch-size 256
    python examples/simpler_glove.py --runs standard,glove,rowwise --vocab 50000 --min-count 1 --epochs 5
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import io
import math
import os
import platform
import re
import sys
import sysconfig
import time
import tokenize
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import tigeropt

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is in the demo extra
    def tqdm(it: Iterable, **_: object) -> Iterable:  # type: ignore[no-redef]
        return it

OUT = Path(__file__).resolve().parent / "out"
WORD = re.compile(r"[a-z]+")


# ----------------------------------------------------------------------------- corpus

def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files (site-packages excluded), sorted."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def extract_text(source: str) -> list[str]:
    """Docstrings (module, class, function) and comment blocks of one Python source, in order.

    Consecutive comment lines form one block.  Returns [] for sources that do not parse.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    located: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                located.append((node.body[0].lineno, doc))
    block: list[str] = []
    block_start = last_line = -2
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            line = tok.start[0]
            if block and line != last_line + 1:
                located.append((block_start, " ".join(block)))
                block = []
            if not block:
                block_start = line
            block.append(tok.string.lstrip("#"))
            last_line = line
    except (tokenize.TokenError, SyntaxError):
        pass
    if block:
        located.append((block_start, " ".join(block)))
    return [text for _, text in sorted(located, key=lambda t: t[0])]


def words(text: str) -> list[str]:
    """Lowercase runs of ASCII letters."""
    return WORD.findall(text.lower())


def _file_segments(path: Path) -> list[list[str]]:
    try:
        raw = path.read_bytes()
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        source = raw.decode(encoding)
    except (OSError, SyntaxError, UnicodeDecodeError, LookupError):
        return []
    return [w for w in (words(t) for t in extract_text(source)) if w]


def read_corpus(files: Sequence[Path], workers: int = 1, progress: bool = True) -> list[list[str]]:
    """Segments (lists of words) of all files, with a progress bar over files (unless ``progress=False``)."""
    segments: list[list[str]] = []
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for segs in tqdm(pool.map(_file_segments, files, chunksize=16), total=len(files),
                             desc="files", unit="file", disable=not progress):
                segments.extend(segs)
    else:
        for path in tqdm(files, desc="files", unit="file", disable=not progress):
            segments.extend(_file_segments(path))
    return segments


@dataclass
class Vocab:
    words: list[str]
    counts: Tensor                       # unigram count of each kept word (int64)
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.words)}


def build_vocab(segments: Iterable[Sequence[str]], size: int, min_count: int = 1) -> Vocab:
    """The ``size`` most frequent words (ties broken alphabetically) with count >= min_count."""
    counter = Counter(w for seg in segments for w in seg)
    frequent = (item for item in counter.items() if item[1] >= min_count)
    ranked = sorted(frequent, key=lambda kv: (-kv[1], kv[0]))
    kept = ranked[:size]
    return Vocab([w for w, _ in kept], torch.tensor([c for _, c in kept], dtype=torch.int64))


def encode(segments: Iterable[Sequence[str]], vocab: Vocab) -> tuple[Tensor, Tensor]:
    """Flat token ids (out-of-vocabulary words dropped) and the segment id of each token."""
    ids: list[int] = []
    seg_ids: list[int] = []
    for s, seg in enumerate(segments):
        kept = [vocab.index[w] for w in seg if w in vocab.index]
        ids.extend(kept)
        seg_ids.extend([s] * len(kept))
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(seg_ids, dtype=torch.int64)


def cooccurrence(ids: Tensor, seg: Tensor, vocab_size: int, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric co-occurrence counts as (i, j, X_ij) with i < j, vectorized over offsets.

    Every pair of tokens at distance 1..window in the same segment counts once; a word paired
    with itself is dropped.  Pairs are keyed by ``i * V + j`` and summed with ``torch.unique``.
    """
    if window < 1:
        raise ValueError(f"Invalid window: {window} (must be >= 1)")
    keys: list[Tensor] = []
    counts: list[Tensor] = []
    for d in range(1, min(window, max(ids.numel() - 1, 0)) + 1):
        a, b = ids[:-d], ids[d:]
        keep = (seg[:-d] == seg[d:]) & (a != b)
        a, b = a[keep], b[keep]
        key = torch.minimum(a, b) * vocab_size + torch.maximum(a, b)
        k, c = torch.unique(key, return_counts=True)
        keys.append(k)
        counts.append(c)
    if not keys:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty, empty
    key, inverse = torch.unique(torch.cat(keys), return_inverse=True)
    x = torch.zeros(key.numel(), dtype=torch.int64).index_add_(0, inverse, torch.cat(counts))
    return key // vocab_size, key % vocab_size, x


def pmi_targets(i: Tensor, j: Tensor, x: Tensor, unigram: Tensor) -> Tensor:
    """t_ij = log(P_ij / (P_i P_j)) with P_ij = X_ij / sum_{i!=j} X_ij (ordered) and P_i = c_i / N."""
    total_pairs = 2.0 * x.sum().double()  # both orders i, j and j, i
    n = unigram.sum().double()
    p_ij = x.double() / total_pairs
    p_i, p_j = unigram[i].double() / n, unigram[j].double() / n
    return torch.log(p_ij / (p_i * p_j)).float()


def glove_weight(x: Tensor, x_max: float = 100.0, alpha: float = 0.75, truncate: bool = True) -> Tensor:
    """lambda = min(x / x_max, 1)^alpha (GloVe eq. 9 / seed 004 eq. 19); no min with truncate=False."""
    r = x.double() / x_max
    if truncate:
        r = r.clamp(max=1.0)
    return r.pow(alpha).float()


# ----------------------------------------------------------------------------- model

class SimplerGloVe(nn.Module):
    """One table of word vectors; the score of a pair is <v_i, v_j> (no biases, no context table)."""

    def __init__(self, vocab_size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, dim, sparse=True)
        with torch.no_grad():  # glove.c's init: uniform in [-0.5, 0.5] / dim
            self.emb.weight.copy_((torch.rand(vocab_size, dim, generator=generator) - 0.5) / dim)

    def forward(self, i: Tensor, j: Tensor) -> Tensor:
        return (self.emb(i) * self.emb(j)).sum(dim=-1)


def pair_loss(model: SimplerGloVe, i: Tensor, j: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """sum 0.5 * lambda * (<v_i, v_j> - t)^2 over the batch."""
    return 0.5 * (weight * (model(i, j) - target).square()).sum()


@dataclass
class RunResult:
    name: str
    losses: list[float]                  # mean weighted loss per pair, per logged chunk of steps
    epoch_losses: list[float]            # mean weighted loss per pair, per epoch
    diverged_at: int | None              # optimizer step at which the loss became non-finite
    seconds: float
    steps: int


def train(model: SimplerGloVe, opt: torch.optim.Optimizer, i: Tensor, j: Tensor, target: Tensor,
          weight: Tensor, *, epochs: int, batch_size: int, generator: torch.Generator | None = None,
          log_every: int = 20, name: str = "", progress: bool = True) -> RunResult:
    """Shuffle the pairs each epoch and step on mini-batches; stop at the first non-finite loss."""
    n = i.numel()
    losses: list[float] = []
    epoch_losses: list[float] = []
    chunk, chunk_pairs, step = 0.0, 0, 0
    start = time.perf_counter()
    diverged_at = None
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        batches = range(0, n, batch_size)
        bar = tqdm(batches, desc=f"{name} epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                   disable=not progress)
        for s in bar:
            b = order[s:s + batch_size]
            loss = pair_loss(model, i[b], j[b], target[b], weight[b])
            value = loss.item()
            step += 1
            if not math.isfinite(value):
                diverged_at = step
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += value
            chunk += value
            chunk_pairs += b.numel()
            if step % log_every == 0:
                losses.append(chunk / chunk_pairs)
                chunk, chunk_pairs = 0.0, 0
        if diverged_at is not None:
            break
        if not torch.isfinite(model.emb.weight).all():
            diverged_at = step
            break
        epoch_losses.append(total / n)
    return RunResult(name, losses, epoch_losses, diverged_at, time.perf_counter() - start, step)


def nearest(model: SimplerGloVe, vocab: Vocab, word: str, k: int = 8) -> list[tuple[str, float]]:
    """The k words with the highest cosine similarity to ``word`` (itself excluded)."""
    if word not in vocab.index:
        return []
    w = model.emb.weight.detach()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sims = w @ w[vocab.index[word]]
    sims[vocab.index[word]] = -2.0
    top = sims.topk(min(k, len(vocab.words) - 1))
    return [(vocab.words[t], s) for t, s in zip(top.indices.tolist(), top.values.tolist())]


# ----------------------------------------------------------------------------- reporting

def save_curves(results: Sequence[RunResult], log_every: int, batch_size: int, path_stem: Path) -> str:
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    csv = path_stem.with_suffix(".csv")
    with csv.open("w") as f:
        f.write("run,step,mean_loss_per_pair\n")
        for r in results:
            for k, v in enumerate(r.losses):
                f.write(f"{r.name},{(k + 1) * log_every},{v:.6g}\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"wrote {csv} (matplotlib is not installed: no PNG; `pip install matplotlib` for one)"
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        steps = [(k + 1) * log_every for k in range(len(r.losses))]
        label = r.name + (f" (non-finite at step {r.diverged_at})" if r.diverged_at else "")
        ax.plot(steps, r.losses, label=label)
        if r.diverged_at:
            ax.axvline(r.diverged_at, ls=":", color=ax.lines[-1].get_color())
    ax.set_yscale("log")
    ax.set_xlabel(f"optimizer step (batch = {batch_size} pairs)")
    ax.set_ylabel("mean weighted loss per pair")
    ax.set_title("simpler GloVe on stdlib docstrings/comments")
    ax.legend()
    fig.tight_layout()
    png = path_stem.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return f"wrote {png} and {csv}"


RUNS = {  # name -> (GloVe-style update?, truncate lambda at x_max?, row-wise Adagrad?)
    "standard": (False, True, False),
    "glove": (True, True, False),
    "rowwise": (False, True, True),
    "standard-untruncated": (False, False, False),
    "glove-untruncated": (True, False, False),
}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--vocab", type=int, default=20000, help="words kept (most frequent)")
    ap.add_argument("--min-count", type=int, default=5, help="drop rarer words (GloVe's demo uses 5)")
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4096, help="pairs per optimizer step")
    ap.add_argument("--lr", type=float, default=0.1, help="standard Adagrad lr (seed 004's eta)")
    ap.add_argument("--glove-lr", type=float, default=0.05, help="GloVe-style Adagrad lr (GloVe's eta)")
    ap.add_argument("--x-max", type=float, default=100.0)
    ap.add_argument("--alpha", type=float, default=0.75)
    ap.add_argument("--runs", default=",".join(RUNS),
                    help=f"comma list of {list(RUNS)}; '-untruncated' drops the min in lambda")
    ap.add_argument("--max-files", type=int, default=0, help="use only the first N stdlib files (0 = all)")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help=f"write the report and loss curves (CSV, PNG) into DIR, e.g. {OUT} "
                         "(default: print only, write nothing)")
    ap.add_argument("--words", default="list,file,error,thread", help="words to show neighbours of")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads for training; the per-batch ops are small (0 = leave as is)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (reading files, training)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [r.strip() for r in args.runs.split(",") if r.strip()]
    for name in names:
        if name not in RUNS:
            raise SystemExit(f"unknown run {name!r} (choose from {list(RUNS)})")
    torch.manual_seed(args.seed)

    report: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        report.append(line)

    t0 = time.perf_counter()
    files = stdlib_files()
    if args.max_files:
        files = files[:args.max_files]
    segments = read_corpus(files, args.workers, progress=not args.no_progress)
    t_read = time.perf_counter() - t0
    vocab = build_vocab(segments, args.vocab, args.min_count)
    ids, seg = encode(segments, vocab)
    i, j, x = cooccurrence(ids, seg, len(vocab.words), args.window)
    target = pmi_targets(i, j, x, vocab.counts)
    t_count = time.perf_counter() - t0 - t_read
    say(f"corpus: {len(files)} files, {len(segments)} segments, {ids.numel()} in-vocab tokens, "
        f"vocab {len(vocab.words)} (of {len({w for s in segments for w in s})} distinct words); "
        f"{i.numel()} distinct pairs (window {args.window}); read {t_read:.1f}s, count {t_count:.1f}s")
    say(f"targets log(P_ij/(P_i P_j)): min {target.min():.2f}, mean {target.mean():.2f}, "
        f"max {target.max():.2f}; X_ij max {int(x.max())}")

    results: list[RunResult] = []
    models: dict[str, SimplerGloVe] = {}
    for name in names:
        glove, truncate, rowwise = RUNS[name]
        weight = glove_weight(x, args.x_max, args.alpha, truncate=truncate)
        lr = args.glove_lr if glove else args.lr
        gen = torch.Generator().manual_seed(args.seed)
        model = SimplerGloVe(len(vocab.words), args.dim, generator=gen)
        opt = tigeropt.Adagrad(model.parameters(), lr=lr, glove=glove, rowwise=rowwise)
        res = train(model, opt, i, j, target, weight, epochs=args.epochs, batch_size=args.batch_size,
                    generator=gen, name=name, progress=not args.no_progress)
        results.append(res)
        models[name] = model
        verdict = (f"DIVERGED (non-finite loss at step {res.diverged_at})" if res.diverged_at
                   else "no divergence")
        epochs_txt = ", ".join(f"{v:.4g}" for v in res.epoch_losses)
        ms = 1e3 * res.seconds / max(res.steps, 1)
        state_mb = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                       if isinstance(t, Tensor) and t.dim() > 0) / 1e6
        say(f"[{name}: Adagrad(lr={lr}, glove={glove}, rowwise={rowwise}), lambda max {weight.max():.3g}] "
            f"{verdict}; {res.steps} steps in {res.seconds:.1f}s ({ms:.2f} ms/step, "
            f"{res.seconds / args.epochs:.2f} s/epoch); optimizer state {state_mb:.4g} MB; "
            f"loss per pair by epoch: {epochs_txt}")

    for res in results:
        if res.diverged_at:
            continue
        say(f"nearest neighbours ({res.name}):")
        for w in [w.strip() for w in args.words.split(",") if w.strip()]:
            nn_ = nearest(models[res.name], vocab, w)
            shown = ", ".join(f"{u} {s:.2f}" for u, s in nn_) if nn_ else "(not in vocabulary)"
            say(f"  {w:>8}: {shown}")
    say(f"total wall time {time.perf_counter() - t0:.1f}s")
    if args.out is not None:
        print(save_curves(results, 20, args.batch_size, args.out / "simpler_glove_loss"))
        command = " ".join(sys.argv[1:] if argv is None else argv)
        header = [f"# simpler GloVe with sparse Adagrad ({dt.date.today().isoformat()})", "",
                  f"- command: `{f'python examples/{Path(__file__).name} {command}'.strip()}`",
                  f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
                  f"tigeropt {tigeropt.__version__}; {torch.get_num_threads()} torch thread(s)", "", "```"]
        md = args.out / "simpler_glove.md"
        md.write_text("\n".join(header + report + ["```"]) + "\n")
        print(f"wrote {md}")


if __name__ == "__main__":
    main()
