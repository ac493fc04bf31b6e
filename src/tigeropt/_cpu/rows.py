"""Fused row updates on the CPU: lazy rows, sparse gradients and row-wise Adagrad.

One C call (``tigeropt_rows`` in ``kernels.c``) per parameter updates exactly the rows that have
a non-zero gradient, in one pass: the gradient is read once (a dense gradient's rows are scanned
for a non-zero in the same pass, stopping at the first one), and p and the state of each touched
row are read once and written once.  Rows are slices along dim 0 of a contiguous parameter.

* sparse COO gradient (``nn.Embedding(sparse=True)``): ``tigeropt_rows_sparse`` takes the indices
  as they are and the values; when the gradient is not coalesced it checks and stably sorts the
  indices itself (a radix sort: 2 passes for a million rows; torch's sort cost more than half a
  millisecond per call) and sums the rows of repeated indices in the order they appear (torch's
  coalesce costs a pass over all values and most of a sparse step);
* dense gradient of a ``lazy=True`` group: the kernel scans every row;
* row-wise Adagrad's dense step: every row, with the accumulator indexed by row.

Element-wise optimizers run on each row the very functions of the dense fused step, so a touched
row gets the dense update bit for bit.  :func:`fused_rows` returns False when the kernel cannot
take the tensors (not plain contiguous CPU tensors of the kernel's dtypes, options the kernel does
not implement, library unavailable); the caller then runs the reference update.
"""

from __future__ import annotations

import ctypes
from array import array
from typing import Any

import torch
from torch import Tensor

from . import _CODES, _PLAIN, _STATE, _kernel_args, _load

__all__ = ["fused_rows", "OPTS", "kernel_args"]

#: optimizer codes of ``tigeropt_rows`` (Adagrad's row-wise form is code 4)
OPTS = {"tiger": 0, "lion": 1, "adax": 2, "adagrad": 3}
_ROWWISE = 4
_declared: set[int] = set()


def _lib() -> Any:
    lib = _load()
    if lib is None:
        return None
    if id(lib) not in _declared:
        vp, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        lib.tigeropt_rows.argtypes = [i32, i32, vp, vp, vp, vp, i64, i64, vp, vp, i64, i32, vp, vp, i32]
        lib.tigeropt_rows.restype = i64
        lib.tigeropt_rows_sparse.argtypes = [i32, i32, vp, vp, vp, vp, i64, i64, vp, i64, i32, vp, vp, i32]
        lib.tigeropt_rows_sparse.restype = i64
        lib.tigeropt_rows_sort.argtypes = [vp, i64, i64, vp, vp]
        lib.tigeropt_rows_sort.restype = i32
        _declared.add(id(lib))
    return lib


def _scalar(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def kernel_args(name: str, step: float, hyper: dict[str, Any]) -> tuple[int, list[float], list[float]] | None:
    """(opt code, hp, per) of the C kernel for optimizer ``name`` at ``step``; None if it has no kernel
    for these options.  hp and per are the dense step's (``tigeropt._cpu._kernel_args``, the one
    definition of each optimizer's layout): row-wise Adagrad takes Adagrad's."""
    rowwise = name == "adagrad" and bool(hyper.get("rowwise"))
    args = _kernel_args(name, dict(hyper, rowwise=False) if rowwise else hyper)
    if args is None:
        return None
    hp, per, _ = args
    return (_ROWWISE if rowwise else OPTS[name]), hp, list(per(array("d", [step]))) if per is not None else []


def _ptrs(states: list[Tensor]) -> tuple[int | None, int | None]:
    """The state pointers of the kernel (s1, s2; None where the optimizer has fewer)."""
    return (states[0].data_ptr() if states else None, states[1].data_ptr() if len(states) > 1 else None)


def _hyper_ptrs(hp: list[float], per: list[float]) -> tuple[Any, Any]:
    """hp and per as C double arrays (ctypes passes them by pointer)."""
    return (ctypes.c_double * len(hp))(*hp), (ctypes.c_double * max(1, len(per)))(*(per or [0.0]))


def _ok(t: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    return (type(t) in _PLAIN and t.layout is torch.strided and t.is_cpu and t.dtype is dtype
            and tuple(t.shape) == shape and t.is_contiguous())


def fused_rows(name: str, p: Tensor, g: Tensor, states: list[Tensor], step: Tensor | float,
               hyper: dict[str, Any], all_rows: bool = False) -> bool:
    """Update the rows of ``p`` (and its ``states``) that have a non-zero gradient ``g``, in one C call.

    ``g`` is dense (same shape as ``p``) or sparse COO along dim 0; ``step`` is the step count the
    update uses (already incremented); ``hyper`` the optimizer's impl keyword arguments.
    ``all_rows=True`` updates every row of a dense ``g`` (row-wise Adagrad's dense step).
    Returns False, changing nothing, when the kernel cannot take this call.
    """
    if name not in OPTS or p.dim() == 0:
        return False
    lib = _lib()
    if lib is None:
        return False
    dtype = p.dtype
    code = _CODES.get(dtype)
    if code is None or (code == 3 and not lib.tigeropt_has_f16()):
        return False
    args = kernel_args(name, _scalar(step), hyper)
    if args is None:
        return False
    opt, hp, per = args
    shape = tuple(p.shape)
    rows = shape[0]
    if not _ok(p, dtype, shape):
        return False
    sd = _STATE[dtype]
    state_shape = (rows,) if opt == _ROWWISE else shape
    if not all(_ok(s, sd, state_shape) for s in states):
        return False
    if g.is_sparse:
        if all_rows or g.sparse_dim() != 1 or tuple(g.shape) != shape or g.dtype is not dtype:
            return False
        indices, values = g._indices()[0], g._values()
        if type(values) not in _PLAIN or not values.is_cpu or tuple(values.shape[1:]) != shape[1:]:
            return False
        if indices.dtype is not torch.int64:
            indices = indices.to(torch.int64)
        indices = indices.contiguous()
        values = values.contiguous()
        nidx = indices.numel()
        if rows == 0 or p.numel() == 0 or nidx == 0:
            return True
        coalesced = g.is_coalesced()
        done = lib.tigeropt_rows_sparse(opt, code, p.data_ptr(), values.data_ptr(), *_ptrs(states), rows,
                                        p.numel() // rows, indices.data_ptr(), nidx, int(coalesced),
                                        *_hyper_ptrs(hp, per), torch.get_num_threads())
        if done == -2:  # the kernel checks every index before it changes anything
            lo, hi = torch.aminmax(indices)
            bad = int(lo) if int(lo) < 0 else int(hi)
            raise IndexError(f"sparse gradient row index {bad} out of range for {rows} rows")
    else:
        if not _ok(g, dtype, shape):
            return False
        if rows == 0 or p.numel() == 0:
            return True
        done = lib.tigeropt_rows(opt, code, p.data_ptr(), g.data_ptr(), *_ptrs(states), rows,
                                 p.numel() // rows, None, None, 0, int(all_rows), *_hyper_ptrs(hp, per),
                                 torch.get_num_threads())
    if done < 0:
        raise MemoryError("tigeropt: the fused row kernel could not allocate its buffers")
    try:  # writes through raw pointers: tell autograd the tensors changed, as an in-place op would
        torch.autograd.graph.increment_version([p, *states])
    except RuntimeError:  # inference tensors have no version counter
        pass
    return True
