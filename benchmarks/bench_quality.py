"""Training-quality study: where do Tiger and Lion match AdamW, and with which settings?

    python benchmarks/bench_quality.py --out results/           # the study: hours on 2 CPU cores, resumable
    python benchmarks/bench_quality.py --out results/ --report  # tables + PNG from what has finished
    python benchmarks/bench_quality.py --quick --out /tmp/q/    # seconds: CI smoke test only

Every run (task, optimizer, lr, weight decay, momentum, batch size / accumulation, steps,
seed) appends one JSON line to ``<out>/quality-runs.jsonl``; a restart skips the runs
already there, so the study can be stopped and resumed (also in chunks across sessions).
Runs are taken in priority order, stage by stage:

1. ``coarse``  char-LM, batch 32, 600 steps (the demo's setting), seed 0: lr x momentum
   grid per optimizer (AdamW betas too, for fairness), weight decay coupled to lr as the
   Lion paper recommends: ``lr * wd`` (the decay per step) is held at a fixed value.
2. ``refine``  coordinate search around each optimizer's best: lr x/÷ sqrt 2, lr*wd x/÷ 3,
   the neighbouring momentum values, until the best is surrounded (or a run cap).
3. ``suggest`` Tiger and Lion at ``tigeropt.suggest_hparams`` from AdamW's best; ``seeds``:
   seeds 1, 2 for each optimizer's best setting.
4. ``digits``  scikit-learn's 8x8 digits, small CNN: lr x momentum grid, 3 seeds each.
5. ``demo``    the demo's length (300 steps): its AdamW recipe, Tiger/Lion at the suggestion
   and at their default momentum.
6. ``long``    3,000 steps at batch 32 (5x the windows): the best 600-step settings, several betas;
   then seeds 1, 2 of each optimizer's best 3,000-step setting.
7. ``batch``   fixed budget of 19,200 windows: batch 128 x 150 steps and 512 x 38 steps
   (gradient accumulation over micro-batches of 32), lr steps around the batch-32 best; then
   seeds 1, 2 of each optimizer's best there.
8. ``lr_scaling``  Tiger with the original's ``lr_scaling`` (its wd 0.01), a few lr.
   (Stages 6-8 are interleaved: the most telling runs of each first.)
9. more ``refine`` and ``seeds`` rounds.

Metric: held-out cross-entropy (nats/char) on fixed batches of unseen stdlib files after
the last step (digits: test loss/accuracy).  Same init, batches, warm-up + cosine schedule
and gradient clipping for every optimizer; weight decay on matrices/embeddings only.
``--report`` writes ``<out>/quality-study.md`` and ``quality-study.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tigeropt import Lion, Tiger, demo
from tigeropt.suggest import suggest_hparams

RUNS_FILE = "quality-runs.jsonl"
Records = dict[str, dict[str, Any]]  # Spec.key() -> the run's record
TARGET = 0.02  # relative held-out-loss gap to AdamW's best
LABELS = {"adamw": "AdamW", "tiger": "Tiger", "lion": "Lion"}
COLORS = {"adamw": "tab:blue", "tiger": "tab:orange", "lion": "tab:red"}
DEFAULT_MOMENTUM = {"adamw": (0.9, 0.999), "tiger": (0.965,), "lion": (0.9, 0.99)}
#: lr * weight decay (the decay applied per step) of the demo's AdamW recipe, 3e-3 x 0.1.
LM_DECAY = 3e-4
DIGITS_DECAY = 1e-3  # the digits AdamW recipe: 1e-2 x 0.1


@dataclass(frozen=True)
class Spec:
    """One training run.  ``momentum``: AdamW/Lion (beta1, beta2), Tiger (beta,)."""

    task: str
    optimizer: str
    lr: float
    weight_decay: float
    momentum: tuple[float, ...]
    batch_size: int
    accumulation: int
    steps: int
    seed: int
    lr_scaling: bool = False
    model: str = "d128-l2-h4-c64"

    def key(self) -> str:
        return json.dumps([self.task, self.optimizer, _r(self.lr), _r(self.weight_decay),
                           [_r(m) for m in self.momentum], self.batch_size, self.accumulation, self.steps,
                           self.seed, self.lr_scaling, self.model])


def _r(x: float) -> float:
    """3 significant digits: grid values built by multiplication compare equal."""
    return float(f"{x:.3g}")


def spec(task: str, optimizer: str, lr: float, decay: float, momentum: tuple[float, ...], *,
         batch_size: int, steps: int, seed: int = 0, micro: int = 32, lr_scaling: bool = False,
         wd: float | None = None, model: str = "d128-l2-h4-c64") -> Spec:
    """A spec with weight decay ``decay / lr`` (lr * wd = decay) unless ``wd`` is given."""
    lr = _r(lr)
    return Spec(task, optimizer, lr, _r(decay / lr if wd is None else wd), tuple(_r(m) for m in momentum),
                batch_size, max(1, batch_size // micro), steps, seed, lr_scaling, model)


# --------------------------------------------------------------------------- optimizers
def build_optimizer(s: Spec, model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups: list[dict[str, Any]] = [dict(params=decay), dict(params=no_decay, weight_decay=0.0)]
    if s.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=s.lr, betas=s.momentum, weight_decay=s.weight_decay, fused=True)
    if s.optimizer == "tiger":
        return Tiger(groups, lr=s.lr, beta=s.momentum[0], weight_decay=s.weight_decay,
                     lr_scaling=s.lr_scaling)
    if s.optimizer == "lion":
        return Lion(groups, lr=s.lr, betas=s.momentum, weight_decay=s.weight_decay)
    raise ValueError(f"Invalid optimizer: {s.optimizer!r}")


# --------------------------------------------------------------------------- tasks
def parse_model(name: str) -> dict[str, int]:
    d, layers, heads, context = (int(part[1:]) for part in name.split("-"))
    return dict(d_model=d, n_layers=layers, n_heads=heads, context=context)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int,
          backward: Callable[[int, torch.Generator], float]) -> tuple[dict[str, float], list[float]]:
    """The training loop of every run: ``backward(step, gen)`` draws a batch with ``gen`` (seeded with
    ``seed``), computes its gradients and returns its loss; then the gradients are clipped to norm 1,
    the optimizer steps (timed) and the cosine schedule moves on.  Returns ({wall_s, opt_ms_per_step},
    the smoothed loss curve)."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, demo.cosine_with_warmup(steps))
    gen = torch.Generator().manual_seed(seed)
    curve: list[float] = []
    opt_s = 0.0
    start = time.perf_counter()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        curve.append(backward(step, gen))
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t0 = time.perf_counter()
        opt.step()
        opt_s += time.perf_counter() - t0
        sched.step()
    return dict(wall_s=time.perf_counter() - start, opt_ms_per_step=1e3 * opt_s / steps), _smooth(curve)


def char_model(cfg: dict[str, int], seed: int) -> demo.CharTransformer:
    """The character transformer of ``parse_model``'s ``cfg``, initialized from ``seed``."""
    torch.manual_seed(seed)
    return demo.CharTransformer(demo.VOCAB_SIZE, cfg["d_model"], cfg["n_layers"], cfg["n_heads"],
                                cfg["context"])


def char_losses(model: nn.Module, corpus: demo.CharCorpus, eval_batches: int) -> dict[str, float]:
    """Train and held-out loss on fixed evaluation batches (seed 0) whatever the run's seed or batch
    size: only training varies."""
    ev = {split: demo.evaluate(model, corpus, split, batches=n, batch_size=32, seed=0)
          for split, n in (("train", max(1, eval_batches // 4)), ("heldout", eval_batches))}
    return dict(train_loss=ev["train"], heldout_loss=ev["heldout"])


def run_charlm(s: Spec, corpus: demo.CharCorpus, eval_batches: int) -> dict[str, Any]:
    cfg = parse_model(s.model)
    model = char_model(cfg, s.seed)
    opt = build_optimizer(s, model)

    def backward(step: int, gen: torch.Generator) -> float:
        x, y = corpus.batch("train", s.batch_size, cfg["context"], gen)
        total = 0.0
        for xm, ym in zip(x.chunk(s.accumulation), y.chunk(s.accumulation)):
            loss = nn.functional.cross_entropy(model(xm).flatten(0, 1), ym.flatten()) / s.accumulation
            loss.backward()
            total += loss.item()
        return total

    timing, curve = train(model, opt, s.steps, s.seed, backward)
    return dict(**char_losses(model, corpus, eval_batches), accuracy=None, **timing,
                state_bytes=demo.state_bytes(opt), param_bytes=demo.param_bytes(model), curve=curve)


def load_digits() -> tuple[torch.Tensor, ...] | None:
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


def run_digits(s: Spec, data: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    x_tr, y_tr, x_te, y_te = data
    per_epoch = math.ceil(len(y_tr) / s.batch_size)
    torch.manual_seed(s.seed)
    model = digits_model()
    opt = build_optimizer(s, model)
    order = torch.empty(0, dtype=torch.long)

    def backward(step: int, gen: torch.Generator) -> float:
        nonlocal order
        i = step % per_epoch
        if i == 0:  # a new epoch: a new order
            order = torch.randperm(len(y_tr), generator=gen)
        idx = order[i * s.batch_size:(i + 1) * s.batch_size]
        loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
        loss.backward()
        return loss.item()

    timing, curve = train(model, opt, s.steps, s.seed, backward)
    with torch.no_grad():
        train_loss = float(nn.functional.cross_entropy(model(x_tr), y_tr))
        logits = model(x_te)
        test_loss = float(nn.functional.cross_entropy(logits, y_te))
        acc = float((logits.argmax(1) == y_te).float().mean())
    return dict(train_loss=train_loss, heldout_loss=test_loss, accuracy=acc, **timing,
                state_bytes=demo.state_bytes(opt), param_bytes=demo.param_bytes(model), curve=curve)


def _smooth(curve: list[float], points: int = 100) -> list[float]:
    """Mean over equal chunks: at most ``points`` values (keeps the records and the plot small)."""
    if len(curve) <= points:
        return [round(c, 5) for c in curve]
    size = len(curve) / points
    return [round(sum(curve[int(i * size):int((i + 1) * size)])
                  / max(1, int((i + 1) * size) - int(i * size)), 5) for i in range(points)]


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    """Grids of the study (``quick``: one point each, a tiny model and a few steps)."""

    model: str = "d128-l2-h4-c64"
    steps: int = 600
    batch: int = 32
    coarse: tuple[tuple[str, float, tuple[float, ...]], ...] = ()
    refine_caps: tuple[tuple[int, int], ...] = ((3, 0), (6, 0), (10, 2))  # (best, default momentum) per round
    demo_steps: int = 300
    seeds: tuple[int, ...] = (1, 2)
    digits_epochs: int = 20
    digits_seeds: tuple[int, ...] = (0, 1, 2)
    batch_regimes: tuple[tuple[int, int], ...] = ((128, 150), (512, 38))
    long_steps: int = 3000
    long_cap: int = 6
    small: bool = False  # the --quick plan

    @staticmethod
    def full() -> Plan:
        a, t, lion = "adamw", "tiger", "lion"
        return Plan(coarse=(
            (a, 3e-3, (0.9, 0.999)), (t, 1e-3, (0.8,)), (lion, 1e-3, (0.8, 0.9)), (t, 1e-3, (0.965,)),
            (lion, 1e-3, (0.9, 0.99)), (a, 1.5e-3, (0.9, 0.999)), (a, 6e-3, (0.9, 0.999)), (t, 1e-3, (0.9,)),
            (lion, 1e-3, (0.9, 0.9)), (t, 5e-4, (0.8,)), (t, 2e-3, (0.8,)), (lion, 5e-4, (0.8, 0.9)),
            (lion, 2e-3, (0.8, 0.9)), (a, 3e-3, (0.9, 0.95)), (a, 3e-3, (0.8, 0.99)), (t, 1e-3, (0.6,)),
            (lion, 1e-3, (0.8, 0.99)), (t, 5e-4, (0.965,)), (lion, 5e-4, (0.9, 0.99))))

    @staticmethod
    def quick() -> Plan:
        return Plan(model="d32-l1-h2-c16", steps=12, batch=8, small=True,
                    coarse=(("adamw", 3e-3, (0.9, 0.999)), ("tiger", 1e-3, (0.8,)), ("tiger", 1e-3, (0.965,)),
                            ("lion", 1e-3, (0.9, 0.99))),
                    refine_caps=((1, 0),), seeds=(1,), digits_epochs=1, digits_seeds=(0,),
                    batch_regimes=((16, 6),),
                    long_steps=24, long_cap=1, demo_steps=6)


#: Momentum values the refine stage steps between (per coordinate).
LADDERS = {"adamw": ((0.7, 0.8, 0.9, 0.95), (0.95, 0.99, 0.999)),
           "tiger": ((0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.965, 0.98),),
           "lion": ((0.6, 0.7, 0.8, 0.9, 0.95), (0.8, 0.9, 0.95, 0.99, 0.995))}
OPTIMIZERS = ("adamw", "tiger", "lion")


def matching(records: dict[str, dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    return [r for r in records.values() if all(r[k] == v for k, v in where.items())
            and math.isfinite(r["heldout_loss"])]


def best(records: dict[str, dict[str, Any]], **where: Any) -> dict[str, Any] | None:
    rs = matching(records, **where)
    return min(rs, key=lambda r: r["heldout_loss"]) if rs else None


def as_spec(r: dict[str, Any]) -> Spec:
    return Spec(r["task"], r["optimizer"], r["lr"], r["weight_decay"], tuple(r["momentum"]), r["batch_size"],
                r["accumulation"], r["steps"], r["seed"], r["lr_scaling"], r["model"])


def neighbours(s: Spec, decay_steps: bool = True, momentum_first: bool = True) -> Iterator[Spec]:
    """One step along each coordinate: the first momentum coordinate (ladder), lr x/÷ sqrt 2 (lr*wd
    kept), lr*wd x/÷ 3, the other momentum coordinate.  ``momentum_first=False``: lr steps first."""

    def mom_steps(i: int) -> Iterator[Spec]:
        ladder = LADDERS[s.optimizer][i]
        if s.momentum[i] in ladder:
            j = ladder.index(s.momentum[i])
            for k in (j - 1, j + 1):
                if 0 <= k < len(ladder):
                    mom = list(s.momentum)
                    mom[i] = ladder[k]
                    yield replace(s, momentum=tuple(mom))

    decay = s.lr * s.weight_decay
    lr_steps = [replace(s, lr=_r(s.lr * f), weight_decay=_r(decay / _r(s.lr * f)))
                for f in (math.sqrt(2), 1 / math.sqrt(2))]
    if not momentum_first:
        yield from lr_steps
    yield from mom_steps(0)
    if momentum_first:
        yield from lr_steps
    if decay_steps:
        for f in (3.0, 1 / 3):
            yield replace(s, weight_decay=_r(s.weight_decay * f))
    for i in range(1, len(s.momentum)):
        yield from mom_steps(i)


def already_run(records: Records, s: Spec) -> bool:
    """``s`` or the same setting up to the 3-digit rounding of lr and wd (seed and all else equal)."""
    if s.key() in records:
        return True
    return any(math.isclose(r["lr"], s.lr, rel_tol=0.01) and math.isclose(r["weight_decay"], s.weight_decay,
                                                                          rel_tol=0.01)
               and replace(as_spec(r), lr=s.lr, weight_decay=s.weight_decay).key() == s.key()
               for r in records.values())


def _where(main: dict[str, Any], name: str, mom: tuple[float, ...] | None) -> dict[str, Any]:
    where = dict(main, optimizer=name, seed=0)
    if mom is not None:
        where["momentum"] = list(mom)
    return where


#: (optimizer, momentum or None for "best at any momentum") searched around in the main regime.
TARGETS: list[tuple[str, tuple[float, ...] | None]] = [(n, None) for n in OPTIMIZERS] + [
    ("tiger", DEFAULT_MOMENTUM["tiger"]), ("lion", DEFAULT_MOMENTUM["lion"])]


def _refine(plan: Plan, records: dict[str, dict[str, Any]], main: dict[str, Any],
            caps: tuple[int, int]) -> Iterator[tuple[str, Spec]]:
    """Coordinate search: one untried neighbour of each target's current best (``caps`` runs each)."""
    for name, mom in TARGETS:
        where = _where(main, name, mom)
        top = best(records, **where)
        cap = caps[0] if mom is None else caps[1]
        if top is None or len(matching(records, stage="refine", **where)) >= cap:
            continue
        for n in neighbours(as_spec(top)):
            if (mom is None or n.momentum == mom) and not already_run(records, n):
                yield "refine", n
                break


def _seeds(plan: Plan, records: Records, main: dict[str, Any]) -> Iterator[tuple[str, Spec]]:
    """More seeds for each optimizer's best setting."""
    for name in OPTIMIZERS:
        top = best(records, **_where(main, name, None))
        if top is not None:
            for seed in plan.seeds:
                yield "seeds", replace(as_spec(top), seed=seed)


def _suggested(plan: Plan, records: Records, main: dict[str, Any]) -> Iterator[tuple[str, Spec]]:
    """Tiger and Lion at what suggest_hparams proposes from AdamW's best (seed 0) setting."""
    adamw = best(records, **_where(main, "adamw", None))
    if adamw is None:
        return
    for name in ("tiger", "lion"):
        hp = suggest_hparams(name, adamw_lr=adamw["lr"], adamw_weight_decay=adamw["weight_decay"],
                             steps=main["steps"], batch_size=main["batch_size"])
        mom = (hp["beta"],) if name == "tiger" else hp["betas"]
        s = spec("charlm", name, hp["lr"], 0, mom, wd=hp["weight_decay"], batch_size=main["batch_size"],
                 steps=main["steps"], model=main["model"])
        if not already_run(records, s):
            yield "suggest", s


def _digits(plan: Plan) -> Iterator[tuple[str, Spec]]:
    """lr x momentum, 3 seeds each (cheap)."""
    steps = plan.digits_epochs * math.ceil(1347 / 64)  # 1347 training images in the 75/25 split
    dgrid = {"adamw": ((3e-3, 1e-2, 3e-2), ((0.9, 0.999), (0.8, 0.99))),
             "tiger": ((1e-3, 2e-3, 4e-3), ((0.965,), (0.9,), (0.8,))),
             "lion": ((2.5e-4, 5e-4, 1e-3, 2e-3), ((0.9, 0.99), (0.8, 0.9)))}
    for name, (lrs, moms) in dgrid.items():
        if plan.small:
            lrs, moms = lrs[:1], moms[:1]
        for mom in moms:
            for lr in lrs:
                for seed in plan.digits_seeds:
                    yield "digits", spec("digits", name, lr, DIGITS_DECAY, mom, batch_size=64, steps=steps,
                                         seed=seed, micro=64, model="cnn")


def _demo(plan: Plan, main: dict[str, Any]) -> Iterator[tuple[str, Spec]]:
    """The demo's length: AdamW's recipe (default and short-run betas), Tiger/Lion at suggest_hparams
    and at their default momentum."""
    adamw = demo.RECIPES["adamw"]
    kw = dict(batch_size=plan.batch, steps=plan.demo_steps, model=plan.model)
    for betas in (DEFAULT_MOMENTUM["adamw"], demo.SHORT_RUN_ADAMW_BETAS):
        yield "demo", spec("charlm", "adamw", adamw.lr, 0, betas, wd=adamw.weight_decay, **kw)
    for name in ("tiger", "lion"):
        hp = suggest_hparams(name, adamw_lr=adamw.lr, adamw_weight_decay=adamw.weight_decay,
                             steps=plan.demo_steps, batch_size=plan.batch)
        mom = (hp["beta"],) if name == "tiger" else hp["betas"]
        for m in (mom, DEFAULT_MOMENTUM[name]):
            yield "demo", spec("charlm", name, hp["lr"], 0, m, wd=hp["weight_decay"], **kw)


LONG_ORDER: list[tuple[str, tuple[float, ...] | None]] = [
    ("adamw", None), ("tiger", None), ("tiger", (0.965,)), ("tiger", (0.9,)), ("lion", None),
    ("lion", (0.9, 0.99))]


def _long(plan: Plan, records: Records, main: dict[str, Any], part: slice) -> Iterator[tuple[str, Spec]]:
    """``long_steps`` steps (batch as main) at the best 600-step lr/wd, for several momenta."""
    for name, mom in LONG_ORDER[:plan.long_cap][part]:
        top = best(records, **_where(main, name, mom))
        if top is None and mom is not None:  # this momentum not tried at 600 steps: the best's lr/wd
            top = best(records, **_where(main, name, None))
            top = None if top is None else dict(top, momentum=list(mom))
        if top is not None:
            yield "long", replace(as_spec(top), steps=plan.long_steps)


def _long_seeds(plan: Plan, records: Records, main: dict[str, Any]) -> Iterator[tuple[str, Spec]]:
    """More seeds for each optimizer's best ``long_steps`` run."""
    for name in OPTIMIZERS:
        top = best(records, **_where(dict(main, steps=plan.long_steps), name, None))
        if top is not None:
            for seed in plan.seeds:
                yield "long", replace(as_spec(top), seed=seed)


def _batch(plan: Plan, records: Records, main: dict[str, Any], regimes: slice,
           more: bool) -> Iterator[tuple[str, Spec]]:
    """Same number of windows at larger batches: the batch-32 best at lr x 1, 2 (``more``: then lr and
    momentum steps around the best, 4 runs, and past that lr steps until the best lr is surrounded)."""
    for batch, steps in plan.batch_regimes[regimes]:
        where_b = dict(main, batch_size=batch, steps=steps, seed=0)
        for name in OPTIMIZERS:
            top = best(records, **_where(main, name, None))
            if top is None:
                continue
            s0 = replace(as_spec(top), batch_size=batch, accumulation=max(1, batch // plan.batch),
                         steps=steps)
            decay = s0.lr * s0.weight_decay
            for f in (1.0, 2.0)[:1 if plan.small else 2]:
                lr = _r(s0.lr * f)
                yield "batch", replace(s0, lr=lr, weight_decay=_r(decay / lr))
            top_b = best(records, **where_b, optimizer=name)
            tried = len(matching(records, **where_b, optimizer=name))
            if not more or top_b is None:
                continue
            steps_b = [n for n in neighbours(as_spec(top_b), decay_steps=False, momentum_first=False)
                       if not already_run(records, n)]
            lr_steps = [n for n in steps_b if n.momentum == tuple(top_b["momentum"])]
            if tried < (1 if plan.small else 4) and steps_b:
                yield "batch", steps_b[0]
            elif lr_steps and tried < (1 if plan.small else 8):  # past the cap: until the best lr is inside
                yield "batch", lr_steps[0]


def _batch_seeds(plan: Plan, records: Records, main: dict[str, Any]) -> Iterator[tuple[str, Spec]]:
    """Seeds 1, 2 of each optimizer's best (seed 0) in each larger-batch regime."""
    for batch, steps in plan.batch_regimes:
        for name in OPTIMIZERS:
            top = best(records, **dict(main, batch_size=batch, steps=steps, seed=0), optimizer=name)
            if top is not None:
                for seed in plan.seeds:
                    yield "batch", replace(as_spec(top), seed=seed)


def _lr_scaling(plan: Plan) -> Iterator[tuple[str, Spec]]:
    """Tiger's lr_scaling (lr relative to each tensor's RMS): the original's wd 0.01, a few lr and betas."""
    for beta in ((0.965,),) if plan.small else ((0.8,),):
        for lr in (1e-2,) if plan.small else (1e-2, 2e-2, 5e-3):
            yield "lr_scaling", spec("charlm", "tiger", lr, 0, beta, batch_size=plan.batch, steps=plan.steps,
                                     lr_scaling=True, wd=0.01, model=plan.model)


def stages(plan: Plan, records: dict[str, dict[str, Any]]) -> Iterator[tuple[str, Spec]]:
    """Every run of the study in priority order (later ones depend on the results so far)."""
    main = dict(task="charlm", batch_size=plan.batch, steps=plan.steps, model=plan.model, lr_scaling=False)
    for name, lr, mom in plan.coarse:  # in priority order, balanced across optimizers
        yield "coarse", spec("charlm", name, lr, LM_DECAY, mom, batch_size=plan.batch, steps=plan.steps,
                             model=plan.model)
    yield from _refine(plan, records, main, plan.refine_caps[0])
    yield from _suggested(plan, records, main)
    yield from _seeds(plan, records, main)
    yield from _digits(plan)
    yield from _demo(plan, main)
    yield from itertools.islice(_lr_scaling(plan), 1)
    yield from _long(plan, records, main, slice(0, 5))
    for caps in plan.refine_caps[1:2]:
        yield from _refine(plan, records, main, caps)
        yield from _suggested(plan, records, main)
        yield from _seeds(plan, records, main)
    yield from _lr_scaling(plan)
    yield from _batch(plan, records, main, slice(0, 1), more=False)
    yield from _long(plan, records, main, slice(5, None))
    yield from _long_seeds(plan, records, main)
    yield from _batch(plan, records, main, slice(1, None), more=False)
    yield from _batch(plan, records, main, slice(None), more=True)
    yield from _batch_seeds(plan, records, main)
    for caps in plan.refine_caps[2:]:
        yield from _refine(plan, records, main, caps)
        yield from _seeds(plan, records, main)


# --------------------------------------------------------------------------- running
def load_jsonl(path: Path, key: Callable[[dict[str, Any]], str]) -> Records:
    """The records of a runs file by ``key(record)``; a later line replaces an earlier one."""
    records: Records = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                records[key(r)] = r
    return records


def load_records(path: Path) -> Records:
    return load_jsonl(path, lambda r: as_spec(r).key())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def study(args: argparse.Namespace) -> int:
    """Run what is missing, in priority order; returns the number of new runs."""
    plan = Plan.quick() if args.quick else Plan.full()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / RUNS_FILE
    records = load_records(path)
    wanted = set(args.stages.split(",")) if args.stages else None
    corpus = None
    data: tuple[torch.Tensor, ...] | None = None
    new = 0
    deadline = time.time() + args.max_minutes * 60 if args.max_minutes else None
    while True:
        nxt = next(((stage, s) for stage, s in stages(plan, records)
                    if s.key() not in records and (wanted is None or stage in wanted)), None)
        if nxt is None or (deadline is not None and time.time() > deadline):
            return new
        stage, s = nxt
        if s.task == "charlm":
            if corpus is None:
                corpus = demo.load_corpus(300_000 if args.quick else None)
            result = run_charlm(s, corpus, eval_batches=4 if args.quick else 64)
        else:
            if data is None:
                data = load_digits()
                if data is None:
                    print("digits skipped: scikit-learn is not installed", flush=True)
                    wanted = (wanted or {st for st, _ in stages(plan, records)}) - {"digits"}
                    continue
            result = run_digits(s, data)
        rec = dict(asdict(s), stage=stage, **result, threads=torch.get_num_threads(),
                   torch=torch.__version__, machine=machine(),
                   finished=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        line = json.dumps(rec)
        records[s.key()] = json.loads(line)  # as it will read back (tuples -> lists)
        with path.open("a") as f:
            f.write(line + "\n")
        new += 1
        mom = "/".join(f"{m:g}" for m in s.momentum)
        print(f"[{stage:>10}] {s.task} {s.optimizer:>5} lr {s.lr:<8g} wd {s.weight_decay:<8g} mom {mom:<10} "
              f"B{s.batch_size}x{s.steps} seed {s.seed}{' lr_scaling' if s.lr_scaling else ''}: "
              f"held-out {result['heldout_loss']:.4f} train {result['train_loss']:.4f}"
              + (f" acc {result['accuracy']:.4f}" if result["accuracy"] is not None else "")
              + f"  {result['wall_s']:.0f}s", flush=True)


# --------------------------------------------------------------------------- report
def fmt_mom(r: dict[str, Any]) -> str:
    m = r["momentum"]
    return f"beta {m[0]:g}" if r["optimizer"] == "tiger" else f"({m[0]:g}, {m[1]:g})"


def seed_stats(records: dict[str, dict[str, Any]], r: dict[str, Any], key: str = "heldout_loss"
               ) -> tuple[float, float, int]:
    """Mean, (max - min) and count over the seeds of ``r``'s setting."""
    same = [x for x in records.values() if as_spec(x).key() == replace(as_spec(r), seed=x["seed"]).key()]
    vals = [x[key] for x in same if x[key] is not None and math.isfinite(x[key])]
    return statistics.fmean(vals), max(vals) - min(vals), len(vals)


def regime_table(records: dict[str, dict[str, Any]], where: dict[str, Any], title: str) -> list[str]:
    """Best per optimizer (and at the default momentum) in one regime, by mean over seeds where run."""
    rows: list[tuple[str, dict[str, Any]]] = []
    for name in OPTIMIZERS:
        rs = matching(records, **where, optimizer=name)
        if not rs:
            continue
        settings: dict[str, list[dict[str, Any]]] = {}
        for r in rs:
            settings.setdefault(replace(as_spec(r), seed=0).key(), []).append(r)

        def score(group: list[dict[str, Any]]) -> float:
            """char-LM: the search's seed-0 loss; digits (every setting has 3 seeds): the mean."""
            seed0 = [r["heldout_loss"] for r in group if r["seed"] == 0]
            if seed0 and where.get("task") != "digits":
                return seed0[0]
            return statistics.fmean(r["heldout_loss"] for r in group)

        ranked = sorted(settings.values(), key=score)
        rows.append((f"{LABELS[name]}, best", ranked[0][0]))
        default = [g for g in ranked if tuple(g[0]["momentum"]) == DEFAULT_MOMENTUM[name]]
        if default and default[0] is not ranked[0]:
            rows.append((f"{LABELS[name]}, default {'betas' if len(DEFAULT_MOMENTUM[name]) > 1 else 'beta'}",
                         default[0][0]))
    if not rows:
        return []
    ref_rows = [r for label, r in rows if label.startswith("AdamW")]
    ref = seed_stats(records, ref_rows[0])[0] if ref_rows else None
    acc = where.get("task") == "digits"
    out = [f"### {title}", "",
           "| optimizer | lr | wd | momentum | held-out loss (mean) | seed spread (max-min) | seeds "
           "| vs AdamW best " + ("| test acc. " if acc else "")
           + "| runs tried | wall s / run | state bytes |",
           "|---|---:|---:|---|---:|---:|---:|---:|" + ("---:|" if acc else "") + "---:|---:|---:|"]
    for label, r in rows:
        mean, spread, n = seed_stats(records, r)
        gap = "" if ref is None else f"{100 * (mean / ref - 1):+.1f}%"
        tried = len(matching(records, **where, optimizer=r["optimizer"], seed=0))
        accs = ""
        if acc:
            accs = f"| {100 * seed_stats(records, r, 'accuracy')[0]:.2f}% "
        out.append(f"| {label} | {r['lr']:g} | {r['weight_decay']:g} | {fmt_mom(r)} | {mean:.4f} "
                   f"| {spread:.4f} | {n} | {gap} {accs}| {tried} | {r['wall_s']:.0f} "
                   f"| {r['state_bytes']:,} |")
    return out + [""]


def momentum_table(records: dict[str, dict[str, Any]], where: dict[str, Any]) -> list[str]:
    """Best held-out loss (seed 0) per optimizer and momentum, over lr and wd."""
    out = ["| optimizer | momentum | best lr | wd | held-out loss | vs AdamW best | runs |",
           "|---|---|---:|---:|---:|---:|---:|"]
    ref = best(records, **where, optimizer="adamw", seed=0)
    for name in OPTIMIZERS:
        moms = sorted({tuple(r["momentum"]) for r in matching(records, **where, optimizer=name, seed=0)})
        for mom in moms:
            rs = matching(records, **where, optimizer=name, seed=0, momentum=list(mom))
            b = min(rs, key=lambda r: r["heldout_loss"])
            gap = "" if ref is None else f"{100 * (b['heldout_loss'] / ref['heldout_loss'] - 1):+.1f}%"
            out.append(f"| {LABELS[name]} | {fmt_mom(b)} | {b['lr']:g} | {b['weight_decay']:g} "
                       f"| {b['heldout_loss']:.4f} | {gap} | {len(rs)} |")
    return out + [""]


def plot(records: dict[str, dict[str, Any]], regimes: list[tuple[str, dict[str, Any]]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    regimes = [(t, w) for t, w in regimes if matching(records, **w)]
    if not regimes:
        return False
    fig, axes = plt.subplots(1, len(regimes), figsize=(5.5 * len(regimes), 4.2), squeeze=False)
    for ax, (title, where) in zip(axes[0], regimes):
        for name in OPTIMIZERS:
            shown = None
            for mom in (None, DEFAULT_MOMENTUM[name]):
                w = dict(where, optimizer=name, seed=0)
                if mom is not None:
                    w["momentum"] = list(mom)
                r = best(records, **w)
                if r is None or r is shown:
                    continue
                shown = r
                xs = [(i + 0.5) * r["steps"] / len(r["curve"]) for i in range(len(r["curve"]))]
                ax.plot(xs, r["curve"], linestyle="--" if mom is not None else "-", color=COLORS[name],
                        label=f"{LABELS[name]} {fmt_mom(r)} lr {r['lr']:g}: {r['heldout_loss']:.3f}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("train cross-entropy (nats)")
        if where["task"] == "digits":
            ax.set_yscale("log")
        else:
            ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
        ax.legend(title="best (solid) / default momentum (dashed): held-out loss", fontsize=7,
                  title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def regimes_of(plan: Plan) -> list[tuple[str, dict[str, Any]]]:
    main = dict(task="charlm", batch_size=plan.batch, steps=plan.steps, model=plan.model, lr_scaling=False)
    regimes = [(f"char-LM, batch {plan.batch} x {plan.steps} steps (the demo's batch)", main)]
    regimes += [(f"char-LM, batch {plan.batch} x {plan.long_steps} steps (5x the windows; lr and wd: the "
                 "600-step best's)", dict(main, steps=plan.long_steps))]
    regimes += [(f"char-LM, batch {b} x {s} steps (same windows as {plan.batch} x {plan.steps}; "
                 f"accumulation {b // plan.batch} x {plan.batch})", dict(main, batch_size=b, steps=s))
                for b, s in plan.batch_regimes]
    regimes += [(f"char-LM, batch {plan.batch} x {plan.demo_steps} steps (the demo's default length: its "
                 "settings, and the default momentum)",
                 dict(main, steps=plan.demo_steps))]
    return regimes


def tables(records: Records, plan: Plan) -> tuple[list[str], list[str]]:
    """(the main regime's table, every other table) as markdown lines."""
    regimes = regimes_of(plan)
    main_title, main = regimes[0]
    main_lines = regime_table(records, main, main_title)[2:]  # without the title
    more: list[str] = []
    for title, where in regimes[1:]:
        more += regime_table(records, where, title)
    more += [f"### Best per momentum setting (char-LM, batch {plan.batch} x {plan.steps} steps, seed 0)", "",
             *momentum_table(records, main)]
    ls = matching(records, task="charlm", lr_scaling=True)
    if ls:
        more += [f"### Tiger with the original's lr_scaling (char-LM, batch {plan.batch} x {plan.steps}, "
                 "seed 0)", "", "| lr | wd | beta | held-out loss | vs AdamW best |",
                 "|---:|---:|---|---:|---:|"]
        ref = best(records, **main, optimizer="adamw", seed=0)
        for r in sorted(ls, key=lambda r: (r["momentum"][0], r["lr"])):
            gap = "" if ref is None else f"{100 * (r['heldout_loss'] / ref['heldout_loss'] - 1):+.1f}%"
            more.append(f"| {r['lr']:g} | {r['weight_decay']:g} | {r['momentum'][0]:g} "
                        f"| {r['heldout_loss']:.4f} | {gap} |")
        more.append("")
    more += regime_table(records, dict(task="digits", model="cnn"),
                         "sklearn digits, small CNN (20 epochs, batch 64; mean of 3 seeds)")
    return main_lines, more


def report(args: argparse.Namespace) -> Path:
    records = load_records(args.out / RUNS_FILE)
    plan = Plan.quick() if args.quick else Plan.full()
    if not records:
        raise SystemExit(f"no runs in {args.out / RUNS_FILE}")
    any_r = next(iter(records.values()))
    first = min(r["finished"] for r in records.values())
    last = max(r["finished"] for r in records.values())
    regimes = regimes_of(plan)
    lines = ["# Training-quality study (CPU)", "",
             f"`python benchmarks/bench_quality.py --threads {any_r['threads']} --out <dir>` "
             f"(then `--report`); {len(records)} runs finished between {first} and {last} UTC on "
             f"{any_r['machine']} (shared with other jobs: wall times are a rough guide), "
             f"{any_r['threads']} torch thread(s), torch {any_r['torch']}. Raw runs: `{RUNS_FILE}` "
             "(one JSON line per run).", "",
             "Same init, batches, warm-up (5%) + cosine to 10% lr and clipping at 1.0 for every optimizer; "
             "weight decay on matrices/embeddings only. Held-out loss: cross-entropy (nats/char) on 64 fixed "
             "batches of 32 x 64 characters of stdlib files never trained on. The lr grid keeps lr x wd "
             "(the decay per step) fixed, as the Lion paper advises; the refine stage also varies it. "
             "'best' = lowest seed-0 loss; mean/spread over the seeds run for that setting. State bytes "
             "exclude step counters.", ""]
    main_lines, more = tables(records, plan)
    lines += [f"### {regimes[0][0]}", "", *main_lines, *more]
    png = args.out / "quality-study.png"
    shown = regimes[:2] + [("digits CNN (seed-0 runs)", dict(task="digits", model="cnn"))]
    if not getattr(args, "no_plot", False) and plot(records, shown, png):
        lines += [f"![loss curves]({png.name})", ""]
    md = args.out / "quality-study.md"
    md.write_text("\n".join(lines) + "\n")
    readme = getattr(args, "readme", None)
    if readme is not None:
        text = readme.read_text()
        for block, body in (("main", main_lines), ("more", more)):
            begin, end = f"<!-- quality-study:{block} -->", f"<!-- /quality-study:{block} -->"
            i, j = text.index(begin) + len(begin), text.index(end)
            text = text[:i] + "\n" + "\n".join(body).strip() + "\n" + text[j:]
        readme.write_text(text)
    return md


# --------------------------------------------------------------------------- precision table (issue 12)
PRECISION_FILE = "precision-runs.jsonl"
#: The study's best AdamW at batch 32 x 600 steps (mean of 3 seeds 1.5853); Tiger and Lion run at
#: what ``suggest_hparams`` proposes from it.
STUDY_ADAMW = dict(lr=4.24e-3, weight_decay=0.0708, betas=(0.8, 0.99))
_SR = {"stochastic_rounding": True}
#: setting -> (parameters, state, parameter dtype, tigeropt options); sr_seed is the run's seed.
PRECISION_SETTINGS: dict[str, tuple[str, str, torch.dtype, dict[str, Any]]] = {
    "fp32": ("fp32", "fp32", torch.float32, {}),
    "bf16-rtn": ("bf16, round-to-nearest", "fp32", torch.bfloat16, {}),
    "bf16-sr": ("bf16 + stochastic rounding", "fp32", torch.bfloat16, _SR),
    "bf16-sr-bf16": ("bf16 + stochastic rounding", "bf16", torch.bfloat16,
                     {**_SR, "state_precision": "bf16"}),
    "bf16-sr-8bit": ("bf16 + stochastic rounding", "8-bit", torch.bfloat16,
                     {**_SR, "state_precision": "8bit"}),
}
#: peer rows: optimizer -> (label, module to import, parameter dtype, parameters, state)
PEERS: dict[str, tuple[str, str, torch.dtype, str, str]] = {
    "bnb-lion8bit": ("bitsandbytes Lion8bit", "bitsandbytes", torch.float32, "fp32", "8-bit (dynamic map)"),
    "bnb-adamw8bit": ("bitsandbytes AdamW8bit", "bitsandbytes", torch.float32, "fp32", "8-bit (dynamic map)"),
    "torchao-adamw8bit": ("torchao AdamW8bit", "torchao", torch.float32, "fp32", "8-bit (dynamic map)"),
    "torchao-adamw8bit-sr": ("torchao AdamW8bit", "torchao", torch.bfloat16,
                             "bf16 + stochastic rounding (`bf16_stochastic_round`)", "8-bit (dynamic map)"),
}
PRECISION_LABELS = {**LABELS, **{k: v[0] for k, v in PEERS.items()}}


@dataclass(frozen=True)
class PSpec:
    """One run of the precision table: ``setting`` is a PRECISION_SETTINGS key (peers: "peer")."""

    optimizer: str
    setting: str
    lr: float
    weight_decay: float
    momentum: tuple[float, ...]
    batch_size: int
    steps: int
    seed: int
    model: str = "d128-l2-h4-c64"

    def key(self) -> str:
        return json.dumps([self.optimizer, self.setting, _r(self.lr), _r(self.weight_decay),
                           [_r(m) for m in self.momentum], self.batch_size, self.steps, self.seed,
                           self.model])


def as_pspec(r: dict[str, Any]) -> PSpec:
    return PSpec(r["optimizer"], r["setting"], r["lr"], r["weight_decay"], tuple(r["momentum"]),
                 r["batch_size"], r["steps"], r["seed"], r["model"])


@dataclass(frozen=True)
class PrecisionPlan:
    """The precision runs: seed 0 of every row, then paired seeds where the comparisons need them."""

    model: str = "d128-l2-h4-c64"
    steps: int = 600
    batch: int = 32
    #: (optimizers, settings, seeds) blocks in priority order; a block runs seed by seed.
    blocks: tuple[tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]], ...] = (
        (("tiger", "lion"), tuple(PRECISION_SETTINGS), (0,)),
        (("tiger",), ("bf16-rtn", "bf16-sr"), tuple(range(1, 8))),
        (("tiger",), ("fp32", "bf16-sr-8bit"), (1, 2)),
        (("lion",), ("bf16-rtn", "bf16-sr"), (1, 2, 3)),
        (("lion",), ("fp32", "bf16-sr-8bit"), (1, 2)),
        (("lion",), ("bf16-rtn", "bf16-sr"), tuple(range(4, 8))),
        (("tiger", "lion"), ("bf16-sr-bf16",), (1, 2)),
        (("tiger",), ("bf16-rtn", "bf16-sr"), tuple(range(8, 16))),
        (("lion",), ("bf16-rtn", "bf16-sr"), tuple(range(8, 16))),
    )
    peers: bool = True

    @staticmethod
    def quick() -> PrecisionPlan:
        return PrecisionPlan(model="d32-l1-h2-c16", steps=12, batch=8, peers=False,
                             blocks=((("tiger", "lion"), tuple(PRECISION_SETTINGS), (0,)),
                                     (("tiger",), ("bf16-rtn", "bf16-sr"), (1, 2))))


def precision_hparams(name: str, steps: int, batch_size: int) -> tuple[float, float, tuple[float, ...]]:
    """(lr, weight decay, momentum): AdamW-type rows the study's best AdamW, Tiger/Lion-type rows the
    suggestion from it."""
    if "adamw" in name:
        return STUDY_ADAMW["lr"], STUDY_ADAMW["weight_decay"], STUDY_ADAMW["betas"]
    base = "lion" if "lion" in name else "tiger"
    hp = suggest_hparams(base, adamw_lr=STUDY_ADAMW["lr"], adamw_weight_decay=STUDY_ADAMW["weight_decay"],
                         steps=steps, batch_size=batch_size)
    return hp["lr"], hp["weight_decay"], (hp["beta"],) if base == "tiger" else tuple(hp["betas"])


def precision_specs(plan: PrecisionPlan) -> Iterator[PSpec]:
    """Every run in priority order: AdamW, then the blocks (peers after the seed-0 block)."""
    def make(name: str, setting: str, seed: int) -> PSpec:
        lr, wd, mom = precision_hparams(name, plan.steps, plan.batch)
        return PSpec(name, setting, _r(lr), _r(wd), tuple(_r(m) for m in mom), plan.batch, plan.steps, seed,
                     plan.model)

    def block(names: tuple[str, ...], settings: tuple[str, ...], seeds: tuple[int, ...]) -> Iterator[PSpec]:
        for seed in seeds:
            for name in names:
                for setting in settings:
                    yield make(name, setting, seed)

    yield make("adamw", "fp32", 0)
    for b in plan.blocks[:1]:
        yield from block(*b)
    if plan.peers:
        for name in PEERS:
            yield make(name, "peer", 0)
    for b in plan.blocks[1:]:
        yield from block(*b)


def peer_missing(name: str) -> str | None:
    """Why peer ``name`` cannot run here (None: it can)."""
    module = PEERS[name][1]
    try:
        lib = importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken native library
        return f"{module} does not import: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return None if hasattr(lib, "optim") else f"{module} has no optim module"


def build_precision_optimizer(s: PSpec, model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups: list[dict[str, Any]] = [dict(params=decay), dict(params=no_decay, weight_decay=0.0)]
    kw = dict(lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(groups, betas=s.momentum, fused=True, **kw)
    if s.optimizer in ("tiger", "lion"):
        options = dict(PRECISION_SETTINGS[s.setting][3])
        if options.get("stochastic_rounding"):
            options["sr_seed"] = s.seed
        if s.optimizer == "tiger":
            return Tiger(groups, beta=s.momentum[0], **kw, **options)
        return Lion(groups, betas=s.momentum, **kw, **options)
    if s.optimizer.startswith("bnb-"):
        import bitsandbytes as bnb

        cls = bnb.optim.Lion8bit if s.optimizer == "bnb-lion8bit" else bnb.optim.AdamW8bit
        return cls(groups, betas=s.momentum, **kw)  # its defaults: 8-bit state for tensors >= 4096 elements
    if s.optimizer.startswith("torchao-"):
        from torchao.optim import AdamW8bit

        return AdamW8bit(groups, betas=s.momentum, bf16_stochastic_round=s.optimizer.endswith("-sr"), **kw)
    raise ValueError(f"Invalid optimizer: {s.optimizer!r}")


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of ``t``; a tensor subclass (torchao's 8-bit state) counts its inner tensors."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the per-parameter state (step counters excluded), 8-bit codes, scales and maps included."""
    return sum(tensor_bytes(v) for st in opt.state.values() for k, v in st.items()
               if k != "step" and isinstance(v, torch.Tensor))


def run_precision(s: PSpec, corpus: demo.CharCorpus, eval_batches: int) -> dict[str, Any]:
    """Train one row (same init, batches and schedule per seed); held-out loss on an fp32 copy."""
    cfg = parse_model(s.model)
    dtype = PEERS[s.optimizer][2] if s.setting == "peer" else PRECISION_SETTINGS[s.setting][2]
    model = char_model(cfg, s.seed).to(dtype)
    opt = build_precision_optimizer(s, model)
    tail_from = s.steps - max(1, s.steps // 10)
    snapshot: list[torch.Tensor] = []

    def backward(step: int, gen: torch.Generator) -> float:
        if step == tail_from:
            snapshot[:] = [p.detach().clone() for p in model.parameters()]
        x, y = corpus.batch("train", s.batch_size, cfg["context"], gen)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        return loss.item()

    timing, curve = train(model, opt, s.steps, s.seed, backward)
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    unchanged = sum(int((p.detach() == q).sum()) for p, q in zip(params, snapshot))
    norms = [m.weight.detach() for m in model.modules() if isinstance(m, nn.LayerNorm)]
    at_one = sum(int((w == 1).sum()) for w in norms) / sum(w.numel() for w in norms)
    losses = char_losses(model.float(), corpus, eval_batches)  # the final weights: bf16 -> fp32 is exact
    pbytes, sbytes = demo.param_bytes(model.to(dtype)), optimizer_state_bytes(opt)
    return dict(**losses, **timing, param_bytes=pbytes, state_bytes=sbytes, numel=numel,
                bytes_per_param=(pbytes + sbytes) / numel, ln_at_one=at_one, tail_unchanged=unchanged / numel,
                curve=curve)


def load_precision(path: Path) -> Records:
    """Records by key; a later line replaces an earlier one (a peer's skip note by its run)."""
    return load_jsonl(path, lambda r: as_pspec(r).key())


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for module in ("bitsandbytes", "torchao"):
        lib = sys.modules.get(module)
        if lib is not None:
            out[module] = getattr(lib, "__version__", "?")
    return out


def precision_study(args: argparse.Namespace) -> int:
    """Run the missing precision runs in priority order (peers that do not import: a skip note,
    retried on the next start); returns the number of new records."""
    plan = PrecisionPlan.quick() if args.quick else PrecisionPlan()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / PRECISION_FILE
    records = load_precision(path)
    deadline = time.time() + args.max_minutes * 60 if args.max_minutes else None
    corpus = None
    new = 0
    only = set(args.optimizers.split(",")) if getattr(args, "optimizers", "") else None
    for s in precision_specs(plan):
        if deadline is not None and time.time() > deadline:
            break
        if only is not None and s.optimizer not in only:
            continue
        done = records.get(s.key())
        if done is not None and "skipped" not in done:
            continue
        why = peer_missing(s.optimizer) if s.setting == "peer" else None
        if why is not None:
            if done is not None:
                continue
            result: dict[str, Any] = dict(skipped=why)
        else:
            if corpus is None:
                corpus = demo.load_corpus(300_000 if args.quick else None)
            result = run_precision(s, corpus, eval_batches=4 if args.quick else 64)
        rec = dict(asdict(s), **result, threads=torch.get_num_threads(), versions=_versions(),
                   machine=machine(), finished=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        line = json.dumps(rec)
        records[s.key()] = json.loads(line)
        with path.open("a") as f:
            f.write(line + "\n")
        new += 1
        print(f"[precision] {s.optimizer:>20} {s.setting:>13} seed {s.seed:<2} "
              + (f"skipped: {why}" if why else f"held-out {result['heldout_loss']:.4f} "
                 f"{result['bytes_per_param']:.3f} B/param  {result['wall_s']:.0f}s"), flush=True)
    return new


#: two-sided 95% quantiles of Student's t by degrees of freedom (1..30; beyond: 1.96 is close enough)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


@dataclass(frozen=True)
class Paired:
    """Paired comparison of held-out losses, ``b - a`` per seed (negative: ``b`` is better)."""

    n: int
    mean: float  # nats
    se: float  # standard error of the mean (nan for n < 2)
    half_ci: float  # half-width of the 95% confidence interval (t distribution)
    rel_mean: float  # mean of (b / a - 1), percent
    rel_worst: float  # largest (b / a - 1) over the seeds, percent
    wins: int  # seeds where b < a


def paired(a: list[float], b: list[float]) -> Paired:
    d = [y - x for x, y in zip(a, b)]
    rel = [100 * (y / x - 1) for x, y in zip(a, b)]
    n = len(d)
    se = statistics.stdev(d) / math.sqrt(n) if n > 1 else math.nan
    t = _T975[n - 2] if 2 <= n <= len(_T975) + 1 else 1.96
    return Paired(n, statistics.fmean(d), se, t * se, statistics.fmean(rel), max(rel),
                  sum(y < x for x, y in zip(a, b)))


def _prows(records: Records, optimizer: str, setting: str) -> dict[int, dict[str, Any]]:
    """Finished runs of one row by seed (the plan's settings: the runs share steps and model)."""
    return {r["seed"]: r for r in records.values() if r["optimizer"] == optimizer and r["setting"] == setting
            and "skipped" not in r and math.isfinite(r["heldout_loss"])}


def compare(records: Records, opt_a: str, set_a: str, opt_b: str, set_b: str) -> Paired | None:
    a, b = _prows(records, opt_a, set_a), _prows(records, opt_b, set_b)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return paired([a[s]["heldout_loss"] for s in seeds], [b[s]["heldout_loss"] for s in seeds])


def _fmt_pair(p: Paired) -> str:
    se = "" if math.isnan(p.se) else f" ± {p.se:.4f}"
    ci = "" if math.isnan(p.se) else f" | [{p.mean - p.half_ci:+.4f}, {p.mean + p.half_ci:+.4f}]"
    return (f"| {p.n} | {p.mean:+.4f}{se}{ci if ci else ' | '} | {p.rel_mean:+.2f}% | {p.rel_worst:+.2f}% "
            f"| {p.wins}/{p.n} |")


def precision_tables(records: Records) -> list[str]:
    """The precision table, the paired comparisons and the target verdicts (markdown lines)."""
    out = ["| optimizer | parameters | state | held-out loss (mean) | seeds | vs fp32, paired seeds "
           "| bytes / param | wall s / run | optimizer ms / step | LayerNorm weights still 1.0 "
           "| weights unchanged in the last 10% of steps |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [("adamw", "fp32")] + [(n, s) for n in ("tiger", "lion") for s in PRECISION_SETTINGS]
    rows += [(n, "peer") for n in PEERS]
    skipped: list[str] = []
    for name, setting in rows:
        runs = _prows(records, name, setting)
        if setting == "peer":
            label, _, _, params, state = PEERS[name]
            note = next((r["skipped"] for r in records.values()
                         if r["optimizer"] == name and "skipped" in r), None)
            if not runs and note:
                skipped.append(f"{label} ({params} parameters): not run, {note}.")
                continue
        else:
            label = LABELS[name]
            params, state = PRECISION_SETTINGS[setting][:2]
        if not runs:
            continue
        rs = list(runs.values())
        mean = statistics.fmean(r["heldout_loss"] for r in rs)
        base = "lion" if "lion" in name else "tiger" if name == "tiger" else "adamw"  # the fp32 twin
        vs = ""
        if (name, setting) != (base, "fp32"):
            p = compare(records, base, "fp32", name, setting)
            twin = f" (vs {LABELS[base]})" if setting == "peer" else ""
            vs = "" if p is None else f"{p.rel_mean:+.2f}%{twin}"
        out.append(f"| {label} | {params} | {state} | {mean:.4f} | {len(rs)} | {vs} "
                   f"| {statistics.fmean(r['bytes_per_param'] for r in rs):.3f} "
                   f"| {statistics.fmean(r['wall_s'] for r in rs):.0f} "
                   f"| {statistics.fmean(r['opt_ms_per_step'] for r in rs):.1f} "
                   f"| {100 * statistics.fmean(r['ln_at_one'] for r in rs):.0f}% "
                   f"| {100 * statistics.fmean(r['tail_unchanged'] for r in rs):.1f}% |")
    out += [""] + skipped + ([""] if skipped else [])
    out += ["Paired comparisons (same seeds: same initial weights and batches; difference of held-out loss, "
            "B minus A, in nats: negative = B better; ± one standard error; 95% t interval):", "",
            "| A | B | seeds | mean difference ± SE | 95% interval | mean relative | worst seed "
            "| B better on |",
            "|---|---|---:|---:|---|---:|---:|---:|"]
    names = {k: ", ".join(v[:2]) for k, v in PRECISION_SETTINGS.items()}
    pairs = [(n, a, b) for n in ("tiger", "lion") for a, b in
             (("bf16-rtn", "bf16-sr"), ("fp32", "bf16-rtn"), ("fp32", "bf16-sr"), ("fp32", "bf16-sr-bf16"),
              ("fp32", "bf16-sr-8bit"))]
    results: dict[tuple[str, str, str], Paired] = {}
    for n, a, b in pairs:
        p = compare(records, n, a, n, b)
        if p is not None:
            results[(n, a, b)] = p
            out.append(f"| {LABELS[n]} {names[a]} | {LABELS[n]} {names[b]} {_fmt_pair(p)}")
    out += ["", *precision_verdicts(records, results)]
    return out + [""]


def precision_verdicts(records: Records, results: dict[tuple[str, str, str], Paired]) -> list[str]:
    """The issue's targets, each met / missed / not shown, with the numbers."""
    out = []
    r8 = _prows(records, "tiger", "bf16-sr-8bit")
    p8 = results.get(("tiger", "fp32", "bf16-sr-8bit"))
    if r8 and p8 is not None:
        bpp = statistics.fmean(r["bytes_per_param"] for r in r8.values())
        ok = bpp <= 3.1 and p8.rel_mean <= 1.0
        out.append(f"* Tiger, bf16 + SR + 8-bit state: {bpp:.3f} bytes/param (target <= 3.1) and "
                   f"{p8.rel_mean:+.2f}% held-out loss vs fp32 Tiger, mean of {p8.n} paired seed(s), worst "
                   f"{p8.rel_worst:+.2f}% (target within 1%): **{'met' if ok else 'missed'}**.")
    for n in ("tiger", "lion"):
        p = results.get((n, "fp32", "bf16-sr"))
        if p is not None:
            out.append(f"* {LABELS[n]}, bf16 + SR vs fp32: {p.rel_mean:+.2f}% (mean of {p.n} paired seed(s), "
                       f"worst {p.rel_worst:+.2f}%; target within 1%): "
                       f"**{'met' if p.rel_mean <= 1.0 else 'missed'}**.")
        q = results.get((n, "bf16-rtn", "bf16-sr"))
        if q is not None and q.n >= 2:
            better = q.mean + q.half_ci < 0
            worse = q.mean - q.half_ci > 0
            verdict = ("**met**: SR is better, the 95% interval excludes 0" if better else
                       "**not met**: SR is worse, the 95% interval excludes 0" if worse else
                       "**not shown**: the 95% interval includes 0")
            out.append(f"* {LABELS[n]}, bf16 + SR vs bf16 round-to-nearest: {q.mean:+.4f} ± {q.se:.4f} nats "
                       f"({q.rel_mean:+.2f}%) over {q.n} paired seeds, 95% interval "
                       f"[{q.mean - q.half_ci:+.4f}, {q.mean + q.half_ci:+.4f}], SR better on "
                       f"{q.wins}/{q.n}: measurably better? {verdict}.")
    return out


def precision_report(args: argparse.Namespace) -> Path:
    records = load_precision(args.out / PRECISION_FILE)
    runs = [r for r in records.values() if "skipped" not in r]
    if not runs:
        raise SystemExit(f"no runs in {args.out / PRECISION_FILE}")
    r0 = runs[0]
    versions = sorted({f"{k} {v}" for r in runs for k, v in r["versions"].items()})
    first, last = min(r["finished"] for r in runs), max(r["finished"] for r in runs)
    tiger = precision_hparams("tiger", r0["steps"], r0["batch_size"])
    lion = precision_hparams("lion", r0["steps"], r0["batch_size"])
    body = precision_tables(records)
    lines = ["# Low precision on the char-LM (CPU)", "",
             f"`python benchmarks/bench_quality.py --precision --threads {r0['threads']} --out <dir>` (then "
             f"`--precision --report`); {len(runs)} runs finished between {first} and {last} UTC on "
             f"{r0['machine']} (shared with other jobs: wall times are a rough guide), {r0['threads']} torch "
             f"thread(s), {', '.join(versions)}. Raw runs: `{PRECISION_FILE}` (one JSON line per run).", "",
             f"Model {r0['model']}, batch {r0['batch_size']} x {r0['steps']} steps, warm-up + cosine to 10% "
             f"lr, clipping at 1.0. AdamW (and the peers' AdamW8bit): the quality study's best, lr "
             f"{STUDY_ADAMW['lr']:g}, wd {STUDY_ADAMW['weight_decay']:g}, betas {STUDY_ADAMW['betas']}; "
             f"Tiger (lr {tiger[0]:g}, wd {tiger[1]:g}, beta {tiger[2][0]:g}) and Lion and Lion8bit (lr "
             f"{lion[0]:g}, wd {lion[1]:g}, betas {lion[2]}): `tigeropt.suggest_hparams` from it. bf16 rows "
             "train a bf16 "
             "model (forward and backward in bf16, no fp32 master weights); the held-out loss (64 fixed "
             "batches) is measured on the final weights converted to fp32. Bytes/param: parameters + "
             "optimizer state (8-bit codes, scales and maps; step counters excluded). Seed s fixes the "
             "initial weights, the batches and the rounding seed (`sr_seed`).", "", *body]
    md = args.out / "precision-study.md"
    md.write_text("\n".join(lines) + "\n")
    readme = getattr(args, "readme", None)
    if readme is not None:
        text = readme.read_text()
        begin, end = "<!-- precision-study -->", "<!-- /precision-study -->"
        i, j = text.index(begin) + len(begin), text.index(end)
        readme.write_text(text[:i] + "\n" + "\n".join(body).strip() + "\n" + text[j:])
    return md


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help=f"folder of {RUNS_FILE} and the report")
    parser.add_argument("--stages", default="", help="only these stages (comma-separated; default all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--max-minutes", type=float, default=0, help="stop starting runs after this long")
    parser.add_argument("--quick", action="store_true", help="tiny grid, model and runs: CI smoke test only")
    parser.add_argument("--report", action="store_true", help="only write the report from the runs so far")
    parser.add_argument("--no-plot", action="store_true", help="no loss-curve PNG")
    parser.add_argument("--readme", type=Path, default=None,
                        help="also rewrite the study's blocks of this README (--precision: its own)")
    parser.add_argument("--precision", action="store_true",
                        help=f"the low-precision table instead of the study ({PRECISION_FILE})")
    parser.add_argument("--optimizers", default="",
                        help="--precision: only these rows' optimizers (comma-separated, e.g. bnb-lion8bit)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.report:
        n = (precision_study if args.precision else study)(args)
        print(f"{n} new runs in {args.out / (PRECISION_FILE if args.precision else RUNS_FILE)}", flush=True)
    md = (precision_report if args.precision else report)(args)
    print(f"wrote {md}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
