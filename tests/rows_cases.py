"""Shared cases of the row-kernel tests (C: test_rows_fused.py, Triton: test_rows_triton.py)."""

from __future__ import annotations

import torch

from tigeropt import Adagrad, AdaX, Lion, Tiger

OPTIMIZERS = [
    ("tiger", Tiger, dict(lr=0.1, beta=0.9, weight_decay=0.1)),
    ("tiger-max", Tiger, dict(lr=0.05, beta=0.8, weight_decay=0.0, maximize=True)),
    ("lion", Lion, dict(lr=0.1, betas=(0.8, 0.95), weight_decay=0.1)),
    ("adax", AdaX, dict(lr=0.05, weight_decay=0.1)),
    ("adax-w-max", AdaX, dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    ("adagrad", Adagrad, dict(lr=0.1, weight_decay=0.1, lr_decay=0.2, initial_accumulator_value=0.3)),
    ("glove", Adagrad, dict(lr=0.05, glove=True, grad_clip_value=0.5, weight_decay=0.1)),
    ("rowwise", Adagrad, dict(lr=0.1, weight_decay=0.1, lr_decay=0.2, rowwise=True, maximize=True)),
]
IDS = [n for n, _, _ in OPTIMIZERS]


def sparse_grads(rows: int, dim: int, dtype: torch.dtype, steps: int, seed: int) -> list[torch.Tensor]:
    """Uncoalesced sparse gradients: repeats, a listed all-zero row, duplicates that cancel, the first and
    last rows, and one step listing nothing."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in range(steps):
        if s == 1:
            out.append(torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.int64), torch.zeros(0, dim),
                                               (rows, dim)).to(dtype))
            continue
        idx = torch.randint(0, rows, (max(1, rows // 2),), generator=gen).tolist()
        idx += [0, rows - 1, idx[0]]  # first, last, a repeat
        vals = torch.randn(len(idx), dim, generator=gen)
        if rows > 2:
            idx += [rows // 2, rows // 2, 1]
            cancel = torch.randn(dim, generator=gen)
            vals = torch.cat([vals, cancel[None], -cancel[None], torch.zeros(1, dim)])  # cancels; zero row
        out.append(torch.sparse_coo_tensor(torch.tensor([idx]), vals.to(dtype), (rows, dim)))
    return out


def stable_coalesce(g: torch.Tensor) -> torch.Tensor:
    """``g`` coalesced with the kernel's documented order: the rows of a repeated index added in the order
    they appear, in g's dtype (torch's coalesce adds them in an unspecified order)."""
    idx, vals = g._indices()[0], g._values()
    rows = sorted(set(idx.tolist()))
    out = []
    for r in rows:
        ks = (idx == r).nonzero().flatten().tolist()
        acc = vals[ks[0]].clone()
        for k in ks[1:]:
            acc = acc + vals[k]
        out.append(acc)
    values = torch.stack(out) if out else vals[:0]
    return torch.sparse_coo_tensor(torch.tensor([rows], dtype=torch.int64).reshape(1, -1), values, g.shape,
                                   is_coalesced=True)
