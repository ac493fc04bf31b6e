"""Demo: a small character-level language model trained with AdamW, Tiger, Lion and AdaX on CPU.

    python -m tigeropt.demo                       # about 2.5 minutes of CPU time (1 thread)
    python -m tigeropt.demo --steps 600 --optimizers adamw,tiger --plot curves.png

The text is the Python standard library's own source (the ``*.py`` files in
``sysconfig.get_paths()["stdlib"]``), so it runs offline on every machine.  Every
optimizer starts from the same model initialisation and sees the same batches;
only the optimizer (and its learning rate / weight decay) changes.  The table at
the end lists the final loss on training and held-out text (cross-entropy in nats
per character, on fixed evaluation batches), the time per training step and per
``optimizer.step()``, and the bytes of optimizer state (step counters excluded):
Tiger and Lion keep one buffer per parameter, AdamW and AdaX two.

The pieces (:func:`load_corpus`, :class:`CharTransformer`, :func:`make_optimizer`,
:func:`train`, :func:`state_bytes`) are reused by ``benchmarks/bench_quality.py``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .adagrad import Adagrad
from .adax import AdaX
from .lion import Lion
from .suggest import suggest_hparams
from .tiger import Tiger

__all__ = ["CharCorpus", "CharTransformer", "Recipe", "RECIPES", "RunResult", "load_corpus", "make_optimizer",
           "state_bytes", "param_bytes", "evaluate", "train", "markdown_table", "smooth", "save_plot", "main",
           "cpu_name", "load_average"]

# --------------------------------------------------------------------------- data
#: Fixed vocabulary: newline, tab, printable ASCII, and one "other" token (non-ASCII bytes).
VOCAB = "\n\t" + "".join(chr(c) for c in range(32, 127))
UNK = len(VOCAB)
VOCAB_SIZE = len(VOCAB) + 1


@dataclass
class CharCorpus:
    """Token ids (uint8) of the training and held-out text, and where they came from."""

    train: Tensor
    heldout: Tensor
    files: int
    source: str

    def batch(self, split: str, batch_size: int, context: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random windows: inputs ``x`` (B, T) and next-character targets ``y`` (B, T), int64."""
        ids = self.train if split == "train" else self.heldout
        start = torch.randint(0, ids.numel() - context - 1, (batch_size,), generator=gen)
        rows = start[:, None] + torch.arange(context + 1)
        window = ids[rows].long()
        return window[:, :-1], window[:, 1:]


def encode(raw: bytes) -> Tensor:
    """UTF-8 bytes to token ids of :data:`VOCAB` (bytes outside it become the UNK token)."""
    table = torch.full((256,), UNK, dtype=torch.uint8)
    for i, ch in enumerate(VOCAB):
        table[ord(ch)] = i
    if not raw:
        return torch.empty(0, dtype=torch.uint8)
    return table[torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()]


def load_corpus(max_chars: int | None = None, heldout_every: int = 10,
                root: str | Path | None = None) -> CharCorpus:
    """The standard library's top-level ``*.py`` files as character ids.

    Files are taken in sorted order; every ``heldout_every``-th file is held out
    (a split by file, so held-out text is code the model never saw).  ``max_chars``
    caps the total size read (None: everything, about 5 MB).
    """
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    files = sorted(base.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no *.py files in {base} to train on")
    train_parts: list[bytes] = []
    heldout_parts: list[bytes] = []
    total = 0
    for i, f in enumerate(files):
        raw = f.read_bytes()
        (heldout_parts if i % heldout_every == heldout_every - 1 else train_parts).append(raw)
        total += len(raw)
        if max_chars is not None and total >= max_chars:
            break
    if not heldout_parts:  # a tiny cap: hold out the last file read
        heldout_parts.append(train_parts.pop())
    train_ids, heldout_ids = encode(b"\n".join(train_parts)), encode(b"\n".join(heldout_parts))
    return CharCorpus(train_ids, heldout_ids, len(train_parts) + len(heldout_parts), str(base))


# --------------------------------------------------------------------------- model
class CharTransformer(nn.Module):
    """A small pre-norm causal transformer over characters (learned positions, GELU MLP, untied head)."""

    def __init__(self, vocab_size: int = VOCAB_SIZE, d_model: int = 128, n_layers: int = 2, n_heads: int = 4,
                 context: int = 64) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


# --------------------------------------------------------------------------- optimizers
@dataclass(frozen=True)
class Recipe:
    """How to build one optimizer, with the demo's learning rate and weight decay."""

    label: str
    build: Callable[..., torch.optim.Optimizer]  # (param groups, lr, wd, **momentum kwargs)
    lr: float
    weight_decay: float


def _adamw(groups: list[dict[str, Any]], lr: float, wd: float, **kw: Any) -> torch.optim.Optimizer:
    """torch's AdamW on its fastest path: the fused kernel (CPU too since torch 2.4), else its default."""
    try:
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd, fused=True, **kw)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd, **kw)


def _adax(groups: list[dict[str, Any]], lr: float, wd: float, **kw: Any) -> torch.optim.Optimizer:
    return AdaX(groups, lr=lr, weight_decay=wd, decoupled_weight_decay=True, **kw)


#: lr / wd for the demo model.  Tiger and Lion: :func:`tigeropt.suggest_hparams` from AdamW's
#: recipe (lr / 3, wd x 3: the same decay per step), with the momentum it suggests for the run's
#: length (see :func:`make_optimizer`); benchmarks/bench_quality.py measured these settings.
RECIPES: dict[str, Recipe] = {
    "adamw": Recipe("AdamW", _adamw, 3e-3, 0.1),
    "tiger": Recipe("Tiger", lambda g, lr, wd, **kw: Tiger(g, lr=lr, weight_decay=wd, **kw), 1e-3, 0.3),
    "lion": Recipe("Lion", lambda g, lr, wd, **kw: Lion(g, lr=lr, weight_decay=wd, **kw), 1e-3, 0.3),
    "adax": Recipe("AdaX-W", _adax, 3e-3, 0.1),
    "adagrad": Recipe("Adagrad", lambda g, lr, wd, **kw: Adagrad(g, lr=lr, weight_decay=wd, **kw), 2e-2, 0.0),
}


#: AdamW's betas in short runs: the quality study's best at 600 steps ((0.9, 0.999) was 3% worse).
SHORT_RUN_ADAMW_BETAS = (0.8, 0.99)
SHORT_RUN = 1000  # optimizer steps


def momentum_kwargs(name: str, steps: int | None, batch_size: int | None = None) -> dict[str, Any]:
    """The momentum for a run of ``steps``: Tiger/Lion from :func:`tigeropt.suggest_hparams`, AdamW
    :data:`SHORT_RUN_ADAMW_BETAS` up to 1,000 steps (the study's best); {} otherwise (the defaults)."""
    if name == "adamw" and steps is not None and steps <= SHORT_RUN:
        return {"betas": SHORT_RUN_ADAMW_BETAS}
    if name not in ("tiger", "lion") or steps is None:
        return {}
    adamw = RECIPES["adamw"]
    hp = suggest_hparams(name, adamw_lr=adamw.lr, adamw_weight_decay=adamw.weight_decay, steps=steps,
                         batch_size=batch_size)
    return {"beta": hp["beta"]} if name == "tiger" else {"betas": hp["betas"]}


def make_optimizer(name: str, model: nn.Module, lr: float | None = None,
                   weight_decay: float | None = None, *, steps: int | None = None,
                   batch_size: int | None = None) -> tuple[torch.optim.Optimizer, float, float]:
    """Optimizer ``name`` (a key of :data:`RECIPES`) over ``model``: (optimizer, lr, weight decay).

    Matrices and embeddings get the weight decay; biases and norm weights (ndim <= 1) none.
    With ``steps`` (the run's length), Tiger and Lion get the momentum
    :func:`tigeropt.suggest_hparams` proposes for it; without, their defaults.
    """
    if name not in RECIPES:
        raise ValueError(f"Invalid optimizer: {name!r} (one of {sorted(RECIPES)})")
    recipe = RECIPES[name]
    lr = recipe.lr if lr is None else lr
    wd = recipe.weight_decay if weight_decay is None else weight_decay
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [dict(params=decay), dict(params=no_decay, weight_decay=0.0)]
    return recipe.build(groups, lr, wd, **momentum_kwargs(name, steps, batch_size)), lr, wd


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's per-parameter state tensors (the scalar ``step`` counters excluded)."""
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != "step" and isinstance(value, Tensor):
                total += value.numel() * value.element_size()
    return total


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --------------------------------------------------------------------------- training
@dataclass
class RunResult:
    name: str
    label: str
    lr: float
    weight_decay: float
    train_loss: float
    heldout_loss: float
    ms_per_step: float
    opt_ms_per_step: float
    state_bytes: int
    param_bytes: int
    first_loss: float
    wall_s: float
    curve: list[float] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, corpus: CharCorpus, split: str, *, batches: int, batch_size: int,
             seed: int) -> float:
    """Mean cross-entropy (nats/char) over ``batches`` fixed random windows of ``split``."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    total = 0.0
    for _ in range(batches):
        x, y = corpus.batch(split, batch_size, model.context, gen)
        total += float(nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    model.train(was_training)
    return total / batches


def cosine_with_warmup(steps: int, warmup_frac: float = 0.05, floor: float = 0.1) -> Callable[[int], float]:
    """lr multiplier: linear warm-up over ``warmup_frac`` of the steps, then cosine down to ``floor``."""
    warmup = max(1, int(steps * warmup_frac))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train(name: str, corpus: CharCorpus, *, steps: int, seed: int = 0, batch_size: int = 32,
          d_model: int = 128, n_layers: int = 2, n_heads: int = 4, context: int = 64, lr: float | None = None,
          weight_decay: float | None = None, eval_batches: int = 16, clip: float = 1.0,
          progress: bool = True, clock: Callable[[], float] = time.perf_counter) -> RunResult:
    """Train a fresh :class:`CharTransformer` (seeded by ``seed``) with optimizer ``name``.

    Same ``seed`` -> same initial weights and the same batches, whatever the optimizer.
    Warm-up + cosine lr schedule, gradient clipping at ``clip``.  ``curve`` holds the
    training loss of every step.  ``clock`` times the steps (``time.thread_time`` for CPU time,
    meaningful with one torch thread).
    """
    torch.manual_seed(seed)
    model = CharTransformer(VOCAB_SIZE, d_model, n_layers, n_heads, context)
    optimizer, lr, wd = make_optimizer(name, model, lr, weight_decay, steps=steps, batch_size=batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(steps))
    gen = torch.Generator().manual_seed(seed)
    first = evaluate(model, corpus, "train", batches=eval_batches, batch_size=batch_size, seed=seed)
    bar = _progress(steps, RECIPES[name].label) if progress else None
    curve: list[float] = []
    step_s = opt_s = 0.0
    timed = 0
    start = time.perf_counter()
    for step in range(steps):
        x, y = corpus.batch("train", batch_size, context, gen)
        t0 = clock()
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        t1 = clock()
        optimizer.step()
        t2 = clock()
        scheduler.step()
        if step > 0 or steps == 1:  # the first step also allocates the state
            step_s += t2 - t0
            opt_s += t2 - t1
            timed += 1
        curve.append(loss.item())
        if bar is not None:
            bar(step, curve[-1])
    wall = time.perf_counter() - start
    if bar is not None:
        bar(None, curve[-1] if curve else float("nan"))
    final = {split: evaluate(model, corpus, split, batches=eval_batches, batch_size=batch_size, seed=seed)
             for split in ("train", "heldout")}
    return RunResult(
        name=name, label=RECIPES[name].label, lr=lr, weight_decay=wd,
        train_loss=final["train"], heldout_loss=final["heldout"],
        ms_per_step=1e3 * step_s / max(1, timed), opt_ms_per_step=1e3 * opt_s / max(1, timed),
        state_bytes=state_bytes(optimizer), param_bytes=param_bytes(model), first_loss=first, wall_s=wall,
        curve=curve)


def _progress(total: int, label: str) -> Callable[[int | None, float], None]:
    """A tqdm bar if tqdm is installed (``pip install tigeropt[demo]``), else a line every ~10%.

    Both show the loss of the current training mini-batch (noisy; the table reports the mean over
    fixed evaluation batches instead).
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, desc=f"{label:>8}", unit="step", leave=True, dynamic_ncols=True)

        def update(step: int | None, loss: float) -> None:
            if step is None:
                bar.close()
                return
            bar.update(1)
            if step % 10 == 0 or step == total - 1:
                bar.set_postfix(batch_loss=f"{loss:.3f}", refresh=False)

        return update
    every = max(1, total // 10)

    def report(step: int | None, loss: float) -> None:
        if step is not None and ((step + 1) % every == 0 or step == total - 1):
            print(f"{label:>8} step {step + 1:>5}/{total}  batch loss {loss:.3f}", file=sys.stderr,
                  flush=True)

    return report


def markdown_table(results: Sequence[RunResult]) -> str:
    """The results as a markdown table (loss in nats/char)."""
    lines = ["| optimizer | lr | weight decay | train loss | held-out loss | ms / step | ms / optimizer.step "
             "| state bytes | state / params |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.label} | {r.lr:g} | {r.weight_decay:g} | {r.train_loss:.3f} "
                     f"| {r.heldout_loss:.3f} | {r.ms_per_step:.1f} | {r.opt_ms_per_step:.2f} "
                     f"| {r.state_bytes:,} | {r.state_bytes / r.param_bytes:.2f}x |")
    return "\n".join(lines)


def smooth(curve: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, total = [], 0.0
    for i, v in enumerate(curve):
        total += v
        if i >= window:
            total -= curve[i - window]
        out.append(total / min(i + 1, window))
    return out


def save_plot(results: Sequence[RunResult], path: str | Path, window: int = 20) -> Path:
    """Training-loss curves (moving average over ``window`` steps) of every run, as a PNG at ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib (pip install tigeropt[demo]): {e}") from None
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot(range(1, len(r.curve) + 1), smooth(r.curve, window), label=f"{r.label} (lr {r.lr:g})")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"training loss, nats/char (mean of last {window} batches)")
    ax.set_title("tigeropt demo: char-level transformer on the Python stdlib")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
    parser = argparse.ArgumentParser(prog="python -m tigeropt.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per optimizer (default 300)")
    parser.add_argument("--optimizers", default="adamw,tiger,lion,adax",
                        help=f"comma-separated, from {','.join(RECIPES)} (default adamw,tiger,lion,adax)")
    parser.add_argument("--seed", type=int, default=0, help="model init and batch order (default 0)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context", type=int, default=64, help="characters per training window")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-chars", type=int, default=None, help="read at most this much stdlib text")
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--thread-time", action="store_true",
                        help="with --threads 1: time steps by the thread's CPU time (time.thread_time), "
                             "which other processes on the cores do not inflate, instead of wall time")
    parser.add_argument("--out", metavar="PATH", type=Path, default=None,
                        help="also write the table, with date, versions, CPU, threads, load and the "
                             "command, as markdown to PATH (default: print only, write nothing)")
    parser.add_argument("--plot", metavar="PATH", default=None,
                        help="save the training-loss curves as a PNG to PATH (needs matplotlib: "
                             "pip install tigeropt[demo])")
    args = parser.parse_args(argv)
    names = [n.strip().lower() for n in args.optimizers.split(",") if n.strip()]
    for n in names:
        if n not in RECIPES:
            parser.error(f"unknown optimizer {n!r}; choose from {', '.join(RECIPES)}")
    if not names:
        parser.error(f"--optimizers names none (got {args.optimizers!r}); choose from {', '.join(RECIPES)}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.thread_time and args.threads != 1:
        parser.error("--thread-time needs --threads 1 (the thread's CPU time misses other threads' work)")

    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    corpus = load_corpus(args.max_chars)
    model_size = sum(p.numel() for p in CharTransformer(VOCAB_SIZE, args.d_model, args.layers, args.heads,
                                                        args.context).parameters())
    threads = torch.get_num_threads()
    load_start, cpu_start, wall_start = load_average(), time.process_time(), time.perf_counter()
    print(f"tigeropt demo: char-level transformer ({model_size:,} parameters, {args.layers} layers, "
          f"d={args.d_model}) on {corpus.train.numel():,} training / {corpus.heldout.numel():,} held-out "
          f"characters of "
          f"{corpus.files} stdlib files; {args.steps} steps x {args.batch_size} x {args.context} chars, "
          f"seed {args.seed}, torch {torch.__version__}, {threads} thread{'s' if threads != 1 else ''}",
          flush=True)
    results = [train(n, corpus, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                     d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, context=args.context,
                     eval_batches=args.eval_batches, progress=not args.no_progress,
                     clock=time.thread_time if args.thread_time else time.perf_counter)
               for n in names]
    cpu_s, wall_s = time.process_time() - cpu_start, time.perf_counter() - wall_start
    print()
    print(markdown_table(results))
    notes = [f"Loss: cross-entropy in nats per character, the mean over {args.eval_batches} fixed batches "
             f"after training (initial {results[0].first_loss:.3f}; ln {VOCAB_SIZE} = "
             f"{math.log(VOCAB_SIZE):.3f}); the progress bar showed single training batches, which are "
             "noisier.",
             "ms / step: forward, backward, clipping and optimizer.step, first step excluded"
             + (" (the thread's CPU time)." if args.thread_time else " (wall time)."),
             "State bytes: optimizer state tensors, step counters excluded."]
    if "adamw" in names:
        notes.append("AdamW uses torch's fused kernel.")
    if "adax" in names:
        notes.append("AdaX-W is AdaX with decoupled weight decay.")
    print("\n" + " ".join(notes), flush=True)
    print(f"Total: {wall_s:.0f} s wall, {cpu_s:.0f} s CPU time of the process.", flush=True)
    if args.plot:
        print(f"Loss curves: {save_plot(results, args.plot)}", flush=True)
    ran = [n for n in names if momentum_kwargs(n, args.steps, args.batch_size)]
    if ran:
        defaults = {"adamw": "(0.9, 0.999)", "tiger": "0.965", "lion": "(0.9, 0.99)"}
        chosen = "; ".join(RECIPES[n].label + " " + ", ".join(
            f"{k}={v}" for k, v in momentum_kwargs(n, args.steps, args.batch_size).items()) for n in ran)
        print(f"Momentum for {args.steps} steps: {chosen} (the study's short-run settings"
              + ("; Tiger/Lion: tigeropt.suggest_hparams" if set(ran) & {"tiger", "lion"} else "")
              + "; the defaults, " + ", ".join(f"{RECIPES[n].label} {defaults[n]}" for n in ran)
              + ", suit long runs: README 'Setting Tiger and Lion').", flush=True)
    if args.out is not None:
        command = "python -m tigeropt.demo " + " ".join(sys.argv[1:] if argv is None else argv)
        clock_name = ("time.thread_time (CPU time of the training thread)" if args.thread_time
                      else "wall time (time.perf_counter)")
        header = [f"# tigeropt demo, {time.strftime('%Y-%m-%d')}", "",
                  f"- command: `{command.strip()}`",
                  f"- versions: python {sys.version.split()[0]}, torch {torch.__version__}",
                  f"- CPU: {cpu_name()}, {threads} torch thread{'s' if threads != 1 else ''}; load average "
                  f"{load_start} at start, {load_average()} at end (other processes share the cores)",
                  f"- timing: {clock_name}; "
                  f"the whole run took {wall_s:.0f} s wall, {cpu_s:.0f} s CPU time of the process",
                  f"- model: {model_size:,} parameters; {args.steps} steps x {args.batch_size} x "
                  f"{args.context} chars, seed {args.seed}; {corpus.files} stdlib files "
                  f"({corpus.source})", ""]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        body = markdown_table(results) + "\n\n" + " ".join(notes) + "\n"
        args.out.write_text("\n".join(header) + "\n" + body)
        print(f"wrote {args.out}", flush=True)
    return results


def load_average() -> str:
    """The 1-minute load average as text ('n/a' where the OS has none): for results files."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else what platform knows): for results files."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
