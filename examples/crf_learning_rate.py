"""Seed 003 reproduced: "your CRF layer's learning rate may not be large enough" (kexue.fm/archives/7196).

Seed 003 fine-tunes BERT + CRF for Chinese word segmentation at lr 1e-5 and finds a meaningless
transition matrix (S->E scoring above S->B): the encoder fits the per-character tag scores long
before the transitions have moved, after which their gradient is small.  With the CRF's lr
100-1000x the encoder's, impossible transitions get strongly negative scores.  This script
shows the same on CPU in a few minutes:

* **Task**: BMES word segmentation of generated "Chinese" text.  A synthetic lexicon of
  ``--words`` words (1-4 characters, 1: 25%, 2: 50%, 3: 15%, 4: 10%) over ``--chars`` characters
  (CJK code points; characters drawn with Zipf frequencies, so common characters occur in many
  words at every position and a character alone does not give its tag); sentences are words drawn
  with Zipf frequencies until a random length in [``--min-len``, ``--max-len``] is filled exactly.
  Tags: B(egin), M(iddle), E(nd) of a multi-character word, S(ingle).  Impossible transitions:
  B->B, B->S, M->B, M->S, S->M, S->E, E->M, E->E, start->M/E and B/M->end.
* **Encoder**: character embeddings + a 2-layer BiLSTM (the classic BiLSTM-CRF tagger; a
  Transformer this small, with learned absolute positions, learns segmentation far slower on
  CPU), *pretrained* for ``--pretrain-steps`` steps by masked-character prediction on the
  unlabelled training text at ``--pretrain-lr`` (the analogue of BERT's pretraining: a masked
  character is predicted from the word it sits in), then fine-tuned for ``--steps`` steps with a new
  linear emission head and a CRF at ``--lr`` 1e-3 with linear decay to 0.  The seed's 1e-5 suits
  BERT-base; this encoder is ~60k parameters and has a minute, so its lr is larger, and what
  matters is the CRF's lr *relative* to the encoder's: the per-character scores are fitted within
  a few hundred steps at 1e-3 while the transitions, at that lr, move by at most ~0.2.
* **CRF**: written here (forward algorithm for log Z, Viterbi decoding), with transition, start
  and end scores.
* **Runs** (same pretrained encoder, same batches): softmax (emission argmax, no CRF) and CRF with
  its lr ``scale`` x the encoder's for each of ``--scales`` (default 1, 100, 1000), the groups made
  by ``param_groups(model, lr, weight_decay, lr_scale={"crf": scale}, no_decay=(*DEFAULT_NO_DECAY,
  "crf"))`` (no weight decay on biases, norms and the CRF scores; default optimizer:
  ``torch.optim.AdamW`` as in the seed's Adam; ``--optimizer tiger|lion|adax`` for ours).

It prints the param groups, each run's transition matrix and a table of per-tag F1 (token level),
word F1 and the share of test sentences decoded with an impossible transition; with ``--out DIR``
it also writes them to ``DIR/crf_learning_rate.txt`` (with date, command and versions) and ``.csv``
(without it nothing is written).  Scores of a CRF are defined up to a
constant per table (only differences matter); compare impossible with possible entries.

Result (AdamW, defaults): at 1x the matrix stays within ~0.25 of its random init, impossible
entries mixed among possible ones (S->E -0.24, S->B 0.22, B->E 0.10), and ~28% of
test sentences decode with an impossible transition (softmax: ~32%); at 100x/1000x every
impossible transition scores -2..-8, below every possible one, none is decoded, and word F1 rises
by ~1 point.  With ``--optimizer tiger`` the encoder fits better (word F1 ~0.983 for every run:
the seed's strong-encoder case, the CRF changes little) and the sign update moves the impossible
scores by lr x (sum of the schedule) = -20 at 100x, -200 at 1000x.

    python examples/crf_learning_rate.py                      # 7.5 minutes wall at load average 8 on 2 cores
    python examples/crf_learning_rate.py --optimizer tiger --scales 1,10,100,1000
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import itertools
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import tigeropt
from tigeropt.param_groups import DEFAULT_NO_DECAY, describe, param_groups

TAGS = "SBME"  # the seed's order
S, B, M, E = range(4)
#: (from, to) pairs that no BMES sequence contains.
IMPOSSIBLE = [(B, B), (B, S), (M, B), (M, S), (S, M), (S, E), (E, M), (E, E)]
IMPOSSIBLE_START = [M, E]
IMPOSSIBLE_END = [B, M]
PAD, MASK, FIRST_CHAR = 0, 1, 2
OUT = Path(__file__).resolve().parent / "out"


@dataclass
class Config:
    chars: int = 150
    words: int = 400
    min_len: int = 12
    max_len: int = 32
    train: int = 6000
    test: int = 1000
    dim: int = 64
    layers: int = 2
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    steps: int = 400
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    optimizer: str = "adamw"
    seed: int = 0


# --------------------------------------------------------------------------- data
def word_tags(n: int) -> list[int]:
    """BMES tags of a word of ``n`` characters."""
    return [S] if n == 1 else [B] + [M] * (n - 2) + [E]


def make_lexicon(cfg: Config, rng: random.Random) -> list[tuple[int, ...]]:
    """``cfg.words`` distinct words (tuples of character ids), most frequent first."""
    char_w = [1.0 / (k + 1) for k in range(cfg.chars)]
    chars = list(range(FIRST_CHAR, FIRST_CHAR + cfg.chars))
    lexicon: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    while len(lexicon) < cfg.words:
        n = rng.choices([1, 2, 3, 4], weights=[25, 50, 15, 10])[0]
        word = tuple(rng.choices(chars, weights=char_w, k=n))
        if word not in seen:
            seen.add(word)
            lexicon.append(word)
    return lexicon


def make_sentences(lexicon: Sequence[tuple[int, ...]], n: int, cfg: Config,
                   rng: random.Random) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` sentences: (chars, tags, mask), each ``(n, cfg.max_len)``, padded with PAD / S / False."""
    weights = [1.0 / (r + 1) ** 1.1 for r in range(len(lexicon))]
    cum = list(itertools.accumulate(weights))
    by_len = {k: [w for w in lexicon if len(w) == k] for k in range(1, 5)}
    cum_by_len = {k: list(itertools.accumulate(weights[i] for i, w in enumerate(lexicon) if len(w) == k))
                  for k in range(1, 5)}
    chars = [[PAD] * cfg.max_len for _ in range(n)]
    tags = [[S] * cfg.max_len for _ in range(n)]
    for row in range(n):
        length = rng.randint(cfg.min_len, cfg.max_len)
        pos = 0
        while pos < length:
            word = rng.choices(lexicon, cum_weights=cum)[0]
            if len(word) > length - pos:  # fill the rest exactly with a word of that length
                k = min(length - pos, 4)
                word = rng.choices(by_len[k], cum_weights=cum_by_len[k])[0]
            chars[row][pos:pos + len(word)] = word
            tags[row][pos:pos + len(word)] = word_tags(len(word))
            pos += len(word)
    c = torch.tensor(chars)
    return c, torch.tensor(tags), c != PAD


def make_data(cfg: Config) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    rng = random.Random(cfg.seed)
    lexicon = make_lexicon(cfg, rng)
    return {"train": make_sentences(lexicon, cfg.train, cfg, rng),
            "test": make_sentences(lexicon, cfg.test, cfg, rng)}


def show(chars: Tensor, tags: Tensor, mask: Tensor) -> str:
    """A sentence as CJK text with spaces between words."""
    out = []
    for c, t in zip(chars[mask].tolist(), tags[mask].tolist()):
        out.append(chr(0x4E00 + 37 * c))
        if t in (S, E):
            out.append(" ")
    return "".join(out).strip()


# --------------------------------------------------------------------------- CRF
class CRF(nn.Module):
    """Linear-chain CRF: score(y) = start[y_1] + sum_t (emit[t, y_t] + trans[y_{t-1}, y_t]) + end[y_T].

    ``nll`` is log Z - score(gold) with log Z from the forward algorithm; ``decode`` is Viterbi.
    Masks must be left-aligned (True for the first ``length`` positions, length >= 1).
    """

    def __init__(self, num_tags: int) -> None:
        super().__init__()
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags).uniform_(-0.1, 0.1))
        self.start = nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))
        self.end = nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))

    def score(self, emissions: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        """score(gold) per sequence, ``(batch,)``."""
        m = mask.to(emissions.dtype)
        emit = emissions.gather(2, tags.unsqueeze(2)).squeeze(2)
        trans = self.transitions[tags[:, :-1], tags[:, 1:]]
        last = tags.gather(1, (mask.sum(1) - 1).unsqueeze(1)).squeeze(1)
        return self.start[tags[:, 0]] + (emit * m).sum(1) + (trans * m[:, 1:]).sum(1) + self.end[last]

    def log_partition(self, emissions: Tensor, mask: Tensor) -> Tensor:
        """log Z per sequence by the forward algorithm, ``(batch,)``."""
        alpha = self.start + emissions[:, 0]
        for t in range(1, emissions.shape[1]):
            nxt = torch.logsumexp(alpha.unsqueeze(2) + self.transitions, dim=1) + emissions[:, t]
            alpha = torch.where(mask[:, t:t + 1], nxt, alpha)
        return torch.logsumexp(alpha + self.end, dim=1)

    def nll(self, emissions: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        """Mean over the batch of -log p(tags | x)."""
        return (self.log_partition(emissions, mask) - self.score(emissions, tags, mask)).mean()

    @torch.no_grad()
    def decode(self, emissions: Tensor, mask: Tensor) -> Tensor:
        """Viterbi: the best tag sequence per row, ``(batch, T)`` (padding positions: S)."""
        batch, length, _ = emissions.shape
        best = self.start + emissions[:, 0]
        back = []
        for t in range(1, length):
            cand = best.unsqueeze(2) + self.transitions  # (batch, from, to)
            value, arg = cand.max(dim=1)
            on = mask[:, t:t + 1]
            best = torch.where(on, value + emissions[:, t], best)
            back.append(torch.where(on, arg, torch.arange(arg.shape[1]).expand_as(arg)))  # pad: stay
        tag = (best + self.end).argmax(dim=1)
        out = [tag]
        for arg in reversed(back):
            tag = arg.gather(1, tag.unsqueeze(1)).squeeze(1)
            out.append(tag)
        tags = torch.stack(out[::-1], dim=1)
        return tags.masked_fill(~mask, S)


# --------------------------------------------------------------------------- model
class Encoder(nn.Module):
    """Character embeddings + a ``cfg.layers``-layer BiLSTM (``cfg.dim`` wide) + a final LayerNorm."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.chars + FIRST_CHAR, cfg.dim, padding_idx=PAD)
        self.lstm = nn.LSTM(cfg.dim, cfg.dim // 2, num_layers=cfg.layers, bidirectional=True,
                            batch_first=True, dropout=0.1 if cfg.layers > 1 else 0.0)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, chars: Tensor, mask: Tensor) -> Tensor:
        lengths = mask.sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(chars), lengths, batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=chars.shape[1])
        return self.norm(out)


class Tagger(nn.Module):
    """Encoder + linear emission head + (optional) CRF."""

    def __init__(self, encoder: Encoder, dim: int, crf: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(dim, len(TAGS))
        self.crf = CRF(len(TAGS)) if crf else None

    def loss(self, chars: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        emissions = self.head(self.encoder(chars, mask))
        if self.crf is not None:
            return self.crf.nll(emissions, tags, mask)
        return nn.functional.cross_entropy(emissions[mask], tags[mask])

    @torch.no_grad()
    def predict(self, chars: Tensor, mask: Tensor) -> Tensor:
        emissions = self.head(self.encoder(chars, mask))
        if self.crf is not None:
            return self.crf.decode(emissions, mask)
        return emissions.argmax(-1).masked_fill(~mask, S)


def make_optimizer(groups: list[dict], name: str) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(groups)
    return {"tiger": tigeropt.Tiger, "lion": tigeropt.Lion, "adax": tigeropt.AdaX}[name](groups)


def batches(n: int, cfg: Config, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(n, (cfg.batch,), generator=g)


def pretrain(data: dict, cfg: Config) -> Encoder:
    """Masked-character pretraining (15% of characters -> MASK, predict them) of a fresh encoder."""
    torch.manual_seed(cfg.seed)
    encoder = Encoder(cfg)
    mlm_head = nn.Linear(cfg.dim, cfg.chars + FIRST_CHAR)
    model = nn.ModuleDict({"encoder": encoder, "mlm_head": mlm_head})
    opt = torch.optim.AdamW(param_groups(model, cfg.pretrain_lr, cfg.weight_decay))
    chars, _, mask = data["train"]
    g = torch.Generator().manual_seed(cfg.seed + 1)
    model.train()
    for idx in batches(len(chars), cfg, cfg.pretrain_steps, cfg.seed + 2):
        c, m = chars[idx], mask[idx]
        hide = (torch.rand(c.shape, generator=g) < 0.15) & m
        if not hide.any():
            continue
        logits = mlm_head(encoder(c.masked_fill(hide, MASK), m)[hide])
        loss = nn.functional.cross_entropy(logits, c[hide])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return encoder


def train_tagger(encoder: Encoder, data: dict, cfg: Config, crf_scale: float | None,
                 verbose: bool = False) -> Tagger:
    """Fine-tune a copy of ``encoder`` + head (+ CRF at ``crf_scale`` x lr; None: softmax)."""
    torch.manual_seed(cfg.seed + 3)  # same head / CRF init in every run
    enc = Encoder(cfg)
    enc.load_state_dict(encoder.state_dict())
    model = Tagger(enc, cfg.dim, crf=crf_scale is not None)
    # CRF scores get lr x crf_scale and no weight decay (nor do biases and norm weights, the default)
    crf = crf_scale is not None
    groups = param_groups(model, cfg.lr, cfg.weight_decay, lr_scale={"crf": crf_scale} if crf else None,
                          no_decay=(*DEFAULT_NO_DECAY, "crf") if crf else DEFAULT_NO_DECAY)
    if verbose:
        print(f"param groups with the CRF at lr x{crf_scale:g}:\n{describe(groups)}")
    opt = make_optimizer(groups, cfg.optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / cfg.steps)  # linear decay to 0
    chars, tags, mask = data["train"]
    model.train()
    for idx in batches(len(chars), cfg, cfg.steps, cfg.seed + 4):
        loss = model.loss(chars[idx], tags[idx], mask[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model


# --------------------------------------------------------------------------- evaluation
def spans(tags: list[int]) -> set[tuple[int, int]]:
    """Words as (start, end) spans; a word ends at E/S or before B/S (lenient on invalid sequences)."""
    out, start = set(), 0
    for t, tag in enumerate(tags):
        nxt = tags[t + 1] if t + 1 < len(tags) else S
        if tag in (E, S) or nxt in (B, S):
            out.add((start, t))
            start = t + 1
    return out


def is_valid(tags: list[int]) -> bool:
    bad = set(IMPOSSIBLE)
    return (tags[0] not in IMPOSSIBLE_START and tags[-1] not in IMPOSSIBLE_END
            and not any((a, b) in bad for a, b in zip(tags, tags[1:])))


def evaluate(model: Tagger, split: tuple[Tensor, Tensor, Tensor]) -> dict[str, float]:
    """Per-tag F1 (token level), word F1 and the share of sentences with an impossible transition."""
    chars, gold, mask = split
    pred = torch.cat([model.predict(chars[i:i + 500], mask[i:i + 500]) for i in range(0, len(chars), 500)])
    g, p = gold[mask], pred[mask]
    res: dict[str, float] = {}
    for k, name in enumerate(TAGS):
        tp = ((p == k) & (g == k)).sum().item()
        prec, rec = tp / max((p == k).sum().item(), 1), tp / max((g == k).sum().item(), 1)
        res[f"F1_{name}"] = 2 * prec * rec / max(prec + rec, 1e-12)
    res["F1_macro"] = sum(res[f"F1_{n}"] for n in TAGS) / len(TAGS)
    tp = n_gold = n_pred = invalid = 0
    for row in range(len(chars)):
        n = int(mask[row].sum())
        gs, ps = spans(gold[row, :n].tolist()), spans(pred[row, :n].tolist())
        tp += len(gs & ps)
        n_gold += len(gs)
        n_pred += len(ps)
        invalid += not is_valid(pred[row, :n].tolist())
    prec, rec = tp / max(n_pred, 1), tp / max(n_gold, 1)
    res["word_F1"] = 2 * prec * rec / max(prec + rec, 1e-12)
    res["invalid"] = invalid / len(chars)
    return res


def transition_scores(crf: CRF) -> dict[str, float]:
    """Mean score of the impossible and of the possible transitions (start/end included)."""
    t, st, en = crf.transitions.detach(), crf.start.detach(), crf.end.detach()
    bad = ([t[a, b] for a, b in IMPOSSIBLE] + [st[k] for k in IMPOSSIBLE_START]
           + [en[k] for k in IMPOSSIBLE_END])
    good = ([t[a, b] for a in range(4) for b in range(4) if (a, b) not in IMPOSSIBLE]
            + [st[k] for k in range(4) if k not in IMPOSSIBLE_START]
            + [en[k] for k in range(4) if k not in IMPOSSIBLE_END])
    return {"impossible": torch.stack(bad).mean().item(), "possible": torch.stack(good).mean().item(),
            "max_impossible_minus_min_possible": (torch.stack(bad).max() - torch.stack(good).min()).item()}


def format_transitions(crf: CRF) -> str:
    """The transition matrix (row: from, column: to) with start and end scores; impossible marked *."""
    t, st, en = crf.transitions.detach(), crf.start.detach(), crf.end.detach()
    bad = set(IMPOSSIBLE)
    lines = ["from\\to " + "".join(f"{n:>9}" for n in TAGS) + f"{'end':>9}"]
    for a in range(4):
        cells = "".join(f"{t[a, b].item():8.2f}{'*' if (a, b) in bad else ' '}" for b in range(4))
        lines.append(f"{TAGS[a]:<8}" + cells + f"{en[a].item():8.2f}{'*' if a in IMPOSSIBLE_END else ' '}")
    lines.append(f"{'start':<8}" + "".join(f"{st[b].item():8.2f}{'*' if b in IMPOSSIBLE_START else ' '}"
                                           for b in range(4)))
    return "\n".join(lines)


def run(cfg: Config, scales: Sequence[float], softmax: bool = True, verbose: bool = False,
        data: dict | None = None) -> list[tuple[str, Tagger, dict[str, float]]]:
    """Pretrain once, then fine-tune the softmax baseline and one CRF model per lr scale."""
    data = make_data(cfg) if data is None else data
    t0 = time.perf_counter()
    encoder = pretrain(data, cfg)
    if verbose:
        print(f"pretrained the encoder ({cfg.pretrain_steps} masked-character steps) in "
              f"{time.perf_counter() - t0:.1f}s")
    runs: list[tuple[str, float | None]] = ([("softmax", None)] if softmax else []) + [
        (f"CRF lr x{s:g}", s) for s in scales]
    results = []
    for name, scale in runs:
        t0 = time.perf_counter()
        model = train_tagger(encoder, data, cfg, scale, verbose=verbose and scale == max(scales))
        res = evaluate(model, data["test"])
        results.append((name, model, res))
        if verbose:
            print(f"{name}: fine-tuned in {time.perf_counter() - t0:.1f}s, test word F1 {res['word_F1']:.4f}")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Config()
    for key, value in asdict(defaults).items():
        ap.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    ap.add_argument("--scales", default="1,100,1000", help="CRF lr multipliers (comma-separated)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the ops are tiny: 1 is fastest)")
    ap.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help=f"write crf_learning_rate.txt and .csv into DIR, e.g. {OUT} (default: print only)")
    args = ap.parse_args(argv)
    cfg = Config(**{k: getattr(args, k) for k in asdict(defaults)})
    scales = [float(s) for s in args.scales.split(",")]
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    data = make_data(cfg)
    print("sample sentences (gold segmentation):")
    for i in range(3):
        print("  " + show(*(x[i] for x in data["train"])))
    print(f"config: {cfg}")
    results = run(cfg, scales, verbose=True, data=data)

    report = []
    for name, model, _ in results:
        if model.crf is not None:
            sc = transition_scores(model.crf)
            report.append(f"\n{name} (lr {cfg.lr:g} encoder, {cfg.lr * float(name.split('x')[1]):g} CRF): "
                          f"transition scores (* impossible; mean impossible {sc['impossible']:.2f}, "
                          f"mean possible {sc['possible']:.2f})\n" + format_transitions(model.crf))
    cols = [f"F1_{n}" for n in TAGS] + ["F1_macro", "word_F1", "invalid"]
    table = [f"{'run':<16}" + "".join(f"{c:>10}" for c in cols)]
    for name, _, res in results:
        table.append(f"{name:<16}" + "".join(f"{res[c]:10.4f}" for c in cols))
    report.append("\ntest set (invalid: share of sentences decoded with an impossible transition)\n"
                  + "\n".join(table))
    text = "\n".join(report)
    print(text)

    if args.out is None:
        return
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    header = (f"date: {dt.date.today().isoformat()}; command: "
              f"{f'python examples/{Path(__file__).name} {command}'.strip()}\n"
              f"versions: python {platform.python_version()}, torch {torch.__version__}, "
              f"tigeropt {tigeropt.__version__}; {torch.get_num_threads()} torch thread(s); "
              f"{time.perf_counter() - start:.0f} s wall\n")
    (out / "crf_learning_rate.txt").write_text(f"{header}config: {cfg}\n{text}\n", encoding="utf-8")
    with open(out / "crf_learning_rate.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", *cols, "mean_impossible", "mean_possible"])
        for name, model, res in results:
            sc = transition_scores(model.crf) if model.crf is not None else {}
            w.writerow([name, *(f"{res[c]:.4f}" for c in cols),
                        f"{sc['impossible']:.4f}" if sc else "", f"{sc['possible']:.4f}" if sc else ""])
    print(f"\nsaved {out / 'crf_learning_rate.txt'} and .csv")


TINY = Config(chars=40, words=120, min_len=6, max_len=12, train=600, test=200, dim=16, layers=1,
              pretrain_steps=0, steps=150, batch=32, lr=1e-3)
"""A configuration the test trains in a few seconds."""

if __name__ == "__main__":
    main()

__all__ = ["Config", "TINY", "CRF", "Encoder", "Tagger", "make_data", "pretrain", "train_tagger", "evaluate",
           "transition_scores", "format_transitions", "run"]
