"""Which 8-bit map for optimizer state?  The fraction of elements whose update is lost.

    python benchmarks/bench_8bit_maps.py                 # ~1 minute on one CPU thread
    python benchmarks/bench_8bit_maps.py --steps 300 --out benchmarks/results/8bit-maps.md

Trains the demo's character-level transformer in fp32 with each optimizer (Tiger, Lion, AdaX,
Adagrad) for ``--steps`` steps, and at a few points quantizes the real fp32 state with each
candidate map (256-element blocks, one fp32 absmax per block) and measures:

* sign optimizers (Tiger, Lion; Lion's update is sign(b1*m + (1-b1)*g)): the fraction of
  elements whose update is *lost* (zero from the quantized state while the fp32 state gives a
  non-zero update: the element is frozen this step) and the fraction whose update sign flips;
* AdaX and Adagrad: the fraction of elements whose update (from the quantized first and second
  moments) is lost, off by more than 10% and off by more than 10x (a second moment quantized to
  0 next to a non-zero first moment: the update blows up).

Fractions are over all elements of all tensors at the measured steps.

Maps: ``linear-int8`` (round(x/absmax*127), a plain absmax int8 map; ``linear-uint8`` for
non-negative state), ``e5m2`` and ``e4m3`` (block-scaled fp8; e4m3 is what tigeropt's "8bit"
stores for signed state), ``bf16`` (2 bytes; what "8bit" stores for AdaX's exp_avg_sq and
Adagrad's sum).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import tigeropt
from tigeropt import demo
from tigeropt._lowp import BLOCK, decode_8bit, encode_8bit


def block_scaled(x: Tensor, top: float, code: Callable[[Tensor], Tensor]) -> Tensor:
    """``code(x / scale) * scale`` over 256-element blocks (zero-padded), scale = the block's absmax
    / ``top`` (1 for an all-zero block)."""
    flat = x.reshape(-1)
    n = flat.numel()
    nb = -(-n // BLOCK)
    flat = torch.cat([flat, flat.new_zeros(nb * BLOCK - n)]).view(nb, BLOCK)
    absmax = flat.abs().amax(1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / top, 1.0)
    return (code(flat / scale) * scale).reshape(-1)[:n].view_as(x)


def linear_int8(x: Tensor) -> Tensor:
    return block_scaled(x, 127, lambda y: torch.round(y).clamp(-127, 127))


def linear_uint8(x: Tensor) -> Tensor:
    """Non-negative state: round(x/absmax*255)."""
    return block_scaled(x, 255, lambda y: torch.round(y).clamp(0, 255))


def e5m2(x: Tensor) -> Tensor:
    """Block-scaled fp8 e5m2 (round to nearest): wider range than e4m3, one mantissa bit less."""
    return block_scaled(x, 57344, lambda y: y.to(torch.float8_e5m2).float())


MAPS = {
    "linear-int8": linear_int8,
    "e5m2": e5m2,
    "e4m3": lambda x: decode_8bit(*encode_8bit(x)),
    "bf16": lambda x: x.to(torch.bfloat16).float(),
}
MAPS_NONNEG = {"linear-uint8": linear_uint8, "e5m2": e5m2, "e4m3": MAPS["e4m3"], "bf16": MAPS["bf16"]}


def sign_update(name: str, opt: torch.optim.Optimizer, p: Tensor, m: Tensor) -> Tensor:
    if name == "lion":
        b1 = opt.param_groups[0]["betas"][0]
        return torch.sign(b1 * m + (1 - b1) * p.grad)
    return torch.sign(m)


def add(rows: dict[tuple[str, str], list[float]], map_name: str, metric: str, hits: Tensor) -> None:
    """Accumulate (elements hit, elements) so the fractions are over all elements, not per tensor."""
    acc = rows.setdefault((map_name, metric), [0.0, 0.0])
    acc[0] += float(hits.sum())
    acc[1] += hits.numel()


def measure(name: str, opt: torch.optim.Optimizer, rows: dict[tuple[str, str], list[float]]) -> None:
    for p, st in opt.state.items():
        if p.grad is None or p.numel() < BLOCK:
            continue
        if name in ("tiger", "lion"):
            m = st["exp_avg"]
            ref = sign_update(name, opt, p, m)
            for map_name, q in MAPS.items():
                upd = sign_update(name, opt, p, q(m))
                live = ref != 0
                add(rows, map_name, "lost", upd[live] == 0)
                add(rows, map_name, "flipped", upd[live] == -ref[live])
        else:
            if name == "adax":
                m, v = st["exp_avg"], st["exp_avg_sq"]
                ref = m / (v.sqrt() + 1e-12)
            else:
                m, v = p.grad, st["sum"]
                ref = m / (v.sqrt() + 1e-10)
            for map_name, q in MAPS_NONNEG.items():
                signed = MAPS["linear-int8" if map_name == "linear-uint8" else map_name]
                qm = signed(m) if name == "adax" else m  # Adagrad's numerator is the gradient
                denom = q(v).sqrt() + (1e-12 if name == "adax" else 1e-10)
                upd = qm / denom
                live = ref != 0
                rel = ((upd - ref).abs() / ref.abs())[live]
                add(rows, map_name, "lost", upd[live] == 0)
                add(rows, map_name, "update off by > 10%", rel > 0.1)
                add(rows, map_name, "update off by > 10x", rel > 10)


def run(name: str, steps: int, corpus: demo.CharCorpus, seed: int = 0) -> dict[tuple[str, str], float]:
    torch.manual_seed(seed)
    model = demo.CharTransformer()
    params = [p for p in model.parameters()]
    opt = {"tiger": lambda: tigeropt.Tiger(params, lr=5e-4, beta=0.9, weight_decay=0.1),
           "lion": lambda: tigeropt.Lion(params, lr=5e-4, weight_decay=0.1),
           "adax": lambda: tigeropt.AdaX(params, lr=3e-3),
           "adagrad": lambda: tigeropt.Adagrad(params, lr=1e-2)}[name]()
    gen = torch.Generator().manual_seed(seed)
    rows: dict[tuple[str, str], list[float]] = {}
    points = {steps // 4, steps // 2, steps - 1}
    for step in range(steps):
        x, y = corpus.batch("train", 32, model.context, gen)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in points:
            measure(name, opt, rows)
    return {k: v[0] / max(v[1], 1.0) for k, v in rows.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--optimizers", default="tiger,lion,adax,adagrad")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = demo.load_corpus(max_chars=2_000_000)
    lines = [f"`python benchmarks/bench_8bit_maps.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
             "", "| optimizer | map | metric | value |", "|---|---|---|---:|"]
    t0 = time.time()
    for name in args.optimizers.split(","):
        for (map_name, metric), value in sorted(run(name, args.steps, corpus).items()):
            fmt = f"{100 * value:.4f}%"
            lines.append(f"| {name} | {map_name} | {metric} | {fmt} |")
    lines.append("")
    lines.append(f"({args.steps} fp32 training steps each, state measured at 1/4, 1/2 and the end, "
                 f"fractions of all elements with a non-zero fp32 update; {time.time() - t0:.0f} s)")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
