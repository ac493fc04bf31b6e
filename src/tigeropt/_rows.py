"""Which rows a lazy step or a sparse gradient updates: the one definition of a *touched* row, and
the range check of sparse gradients' row indices (the optimizer base and LazyOptimizer share both)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._dtensor import to_local

__all__ = ["touched_rows", "sparse_rows_out_of_range", "check_sparse_rows"]


def touched_rows(g: Tensor, gather: bool = True) -> tuple[Tensor, Tensor | None]:
    """(row indices, their gradient rows) of the rows of ``g`` that hold a non-zero.

    The one definition of "touched" for lazy rows and sparse gradients: a dense gradient's
    rows (slices along dim 0; elements of a 1-D tensor) holding any non-zero; a sparse COO
    gradient's rows, after coalescing (duplicates summed), whose values are not all zero (a
    listed row whose values are zero, or whose duplicates cancel, is not touched).  Indices
    are sorted and unique (int64).  ``gather=False`` skips gathering a dense gradient's rows
    (returns None for them).
    """
    if g.is_sparse:
        g = g.coalesce()
        if g.sparse_dim() != 1:
            raise RuntimeError(f"sparse gradients must be sparse along dim 0 only, got sparse_dim="
                               f"{g.sparse_dim()}")
        idx, rows = g.indices()[0], g.values()
        nonzero = rows.flatten(1).any(dim=1) if rows.dim() > 1 else rows.ne(0)
        if not bool(nonzero.all()):
            keep = nonzero.nonzero().squeeze(1)
            idx, rows = idx.index_select(0, keep), rows.index_select(0, keep)
        return idx, rows
    touched = g.flatten(1).any(dim=1) if g.dim() > 1 else g.ne(0)
    idx = touched.nonzero().squeeze(1)
    return idx, g.index_select(0, idx) if gather else None


def sparse_rows_out_of_range(pairs: list[tuple[Tensor, int]]) -> tuple[int, int, int] | None:
    """The first (pair number, row index, rows) whose sparse COO gradient (sparse along dim 0) lists a
    row index outside ``[0, rows)``, or None: one ``aminmax`` per gradient, one host sync in all."""
    ks = [k for k, (g, _) in enumerate(pairs) if g._nnz()]
    if not ks:
        return None
    mm = [torch.stack(torch.aminmax(pairs[k][0]._indices()[0])) for k in ks]
    if len({t.device for t in mm}) == 1:
        ranges = torch.stack(mm).tolist()
    else:
        ranges = [t.tolist() for t in mm]
    for k, (lo, hi) in zip(ks, ranges):
        rows = pairs[k][1]
        if lo < 0 or hi >= rows:
            return k, (lo if lo < 0 else hi), rows
    return None


def check_sparse_rows(name: str, pairs: list[tuple[Tensor, Tensor]],
                      param_groups: list[dict[str, Any]]) -> None:
    """IndexError for the first (parameter, sparse gradient) pair whose gradient lists a row the
    parameter lacks, naming the parameter (its index in ``state_dict()``, its group) and the index."""
    bad = sparse_rows_out_of_range([(to_local(g), to_local(p).shape[0] if p.dim() else 1) for p, g in pairs])
    if bad is None:
        return
    k, index, rows = bad
    p = pairs[k][0]
    owners = [(gi, q) for gi, grp in enumerate(param_groups) for q in grp["params"]]
    pid, gi = next((pid, gi) for pid, (gi, q) in enumerate(owners) if q is p)
    raise IndexError(f"{name}: the sparse gradient of parameter {pid} (param group {gi}, shape "
                     f"{tuple(p.shape)}) lists row index {index}, out of range for {rows} rows; nothing was "
                     "updated")
