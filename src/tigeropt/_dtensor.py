"""DTensor (FSDP2, tensor parallel) helpers of the optimizer base and its low-precision step.

DTensor is looked up, never imported: importing ``torch.distributed.tensor`` costs about half a
second, and while nobody has imported it no tensor can be a DTensor (:func:`dtensor_module`).

* Whole-tensor decisions on shards: :func:`all_finite` and :func:`global_bool` agree on every rank.
* Local shards: :func:`to_local` (a view: in-place updates reach the DTensor), and for row-wise
  updates :func:`check_whole_rows`.
* Low precision on DTensor shards.  A DTensor's local shard (FSDP2: Shard(0), rows r0..r1 of the
  parameter) holds the elements o..o+n-1 of the row-major flattened tensor (:func:`shard_offset`).
  Stochastic rounding keys its hash on o+i (the global index), and 8-bit state keeps the whole
  tensor's 256-element blocks: the codes are sharded like the parameter, the absmax of every block
  is replicated on every rank (a Replicate DTensor of (nblocks,)), and a block split between two
  shards is encoded with the maximum of their partial absmax (one all-reduce per step and device
  mesh: :func:`encode_sharded`).  So sharded training equals one process bit for bit, and a
  checkpoint's state is the one-process state (DCP reshards it to any world size).

Below the optimizers: imports nothing from tigeropt but :mod:`tigeropt._lowp`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import _lowp

__all__ = ["dtensor_module", "is_dtensor", "to_local", "whole_rows", "check_whole_rows", "dtensor_rows_state",
           "all_finite", "global_bool",
           "shard_offset", "replicated", "decode_sharded", "encode_sharded", "shard_encode", "ShardedEncode",
           "init_8bit_sharded", "sync_owned_absmax", "as_shard_like"]

_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")  # public since torch 2.5


def dtensor_module() -> Any:
    """The module defining DTensor if someone imported it (else None: no DTensor can exist)."""
    for name in _DTENSOR_MODULES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "DTensor"):
            return module
    return None


def is_dtensor(t: Tensor) -> bool:
    module = dtensor_module()
    return module is not None and isinstance(t, module.DTensor)


def to_local(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view: in-place updates reach the DTensor); other tensors as they are."""
    return t.to_local() if is_dtensor(t) else t


def whole_rows(p: Tensor) -> bool:
    """Whether each rank holds whole rows of DTensor ``p`` (sharded along dim 0 or replicated)."""
    dt = dtensor_module()
    return all(isinstance(pl, dt.Replicate) or (isinstance(pl, dt.Shard) and pl.dim == 0)
               for pl in p.placements)  # type: ignore[attr-defined]


def check_whole_rows(p: Tensor, what: str = "lazy=True and sparse gradients") -> None:
    """Row-wise updates on local shards equal the global update only if each rank holds whole rows."""
    if not whole_rows(p):
        raise RuntimeError(f"{what} need DTensor parameters sharded along dim 0 "
                           f"(FSDP2's default) or replicated, got placements {p.placements}")  # type: ignore


def dtensor_rows_state(p: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A zero state of ``shape`` (``(rows,)``: row-wise Adagrad's ``sum``) for a DTensor parameter
    sharded along dim 0 or replicated: a DTensor with the parameter's placements holding this rank's
    rows, so a row's state lives with the row (and checkpoints shard and reshard it like it)."""
    check_whole_rows(p, "row-wise Adagrad's state and update (rowwise=True)")
    local = p.to_local()  # type: ignore[attr-defined]
    dt = dtensor_module()
    zeros = torch.zeros(local.shape[0], dtype=dtype, device=local.device)
    return dt.DTensor.from_local(zeros, p.device_mesh, p.placements,  # type: ignore[attr-defined]
                                 run_check=False, shape=torch.Size(shape), stride=(1,))


def all_finite(grads: list[Tensor]) -> bool:
    """Whether every gradient is finite, agreed by all ranks for DTensor gradients (FSDP2).

    Each rank holds only its shard, and ``bool()`` of a reduction of a sharded DTensor reads
    this rank's partial value; one all-reduce (min) per device mesh makes the decision global.
    """
    local = [to_local(g) for g in grads]
    flags = [torch.isfinite(g._values() if g.is_sparse else g).all() for g in local]
    ok = torch.stack([f.to(flags[0].device) for f in flags]).all()
    meshes = {g.device_mesh: None for g in grads if is_dtensor(g)}
    for mesh in meshes:
        dt = dtensor_module()
        partial = [dt.Partial("min")] * mesh.ndim
        ok = dt.DTensor.from_local(ok.to(torch.int32).reshape(1), mesh, partial).full_tensor()[0].bool()
    return bool(ok)


def global_bool(t: Tensor) -> bool:
    """``bool(t)`` of a one-element result, the same on every rank when ``t`` is a DTensor.

    A reduction of a sharded DTensor (``isnan(g).any()``) is a *Partial* DTensor whose ``bool()``
    would read this rank's part only; ``full_tensor()`` all-reduces it first.
    """
    return bool(t.full_tensor() if is_dtensor(t) else t)


def shard_offset(t: Tensor, name: str = "tigeropt") -> int:
    """Global row-major index of the first element of a DTensor's local shard (0 for other tensors).

    The shard must be a range of the flattened tensor: placements Shard(0) (FSDP2, uneven shards
    included) and Replicate; others (tensor parallel Shard(1), strided shards) raise RuntimeError.
    """
    if not is_dtensor(t):
        return 0
    dt = dtensor_module()
    placements = t.placements  # type: ignore[attr-defined]
    if not all(type(pl) is dt.Replicate or (type(pl) is dt.Shard and pl.dim == 0) for pl in placements):
        raise RuntimeError(f"{name}: stochastic rounding and bf16/8-bit state need DTensor parameters "
                           f"sharded along dim 0 (FSDP2's default) or replicated, got placements "
                           f"{placements}: the rounding hash and the 8-bit blocks use the element's index "
                           "in the whole tensor")
    if t.dim() == 0:
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh,  # type: ignore[attr-defined]
                                                      placements)
    return int(offset[0]) * (t.numel() // t.shape[0] if t.shape[0] else 0)


def replicated(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (the whole tensor on every rank) as a Replicate DTensor on ``like``'s device mesh."""
    dt = dtensor_module()
    mesh = like.device_mesh  # type: ignore[attr-defined]
    return dt.DTensor.from_local(t, mesh, [dt.Replicate()] * mesh.ndim, run_check=False)


def decode_sharded(codes: Tensor, absmax: Tensor) -> Tensor:
    """The fp32 values of sharded 8-bit codes, a DTensor sharded like them."""
    local, offset = codes.to_local(), shard_offset(codes)  # type: ignore[attr-defined]
    first, count = _lowp.covered_blocks(local.numel(), offset)
    values = _lowp.decode_8bit(local, to_local(absmax)[first:first + count], offset)
    return type(codes).from_local(values, codes.device_mesh, codes.placements,  # type: ignore[attr-defined]
                                  run_check=False, shape=codes.shape, stride=codes.stride())


@dataclass
class ShardedEncode:
    """One 8-bit DTensor state tensor's part in :func:`encode_sharded`: this rank's block maxima of the
    whole tensor's blocks (``partial``, zero for blocks it holds no element of) and the pieces of its
    local shard to encode once the maxima are all-reduced."""

    order: tuple[int, int]  # (parameter index, state index): the all-reduce's order, the same on every rank
    absmax: Tensor  # the replicated absmax (a Replicate DTensor of (nblocks,))
    partial: Tensor  # (nblocks,) fp32
    #: (local codes view, fp32 values of its shape, global index of its first element, hash key or None)
    pieces: list[tuple[Tensor, Tensor, int, int | None]] = field(default_factory=list)


def shard_encode(codes: Tensor, absmax: Tensor, values: Tensor, key: int | None,
                 order: tuple[int, int] = (0, 0)) -> ShardedEncode:
    """The :class:`ShardedEncode` of a whole local shard of ``codes`` (a DTensor) from its fp32 ``values``."""
    local, offset = codes.to_local(), shard_offset(codes)  # type: ignore[attr-defined]
    partial = torch.zeros(absmax.shape[0], dtype=torch.float32, device=to_local(absmax).device)
    first, count = _lowp.covered_blocks(values.numel(), offset)
    partial[first:first + count] = _lowp.block_absmax(values, offset)
    return ShardedEncode(order, absmax, partial, [(local, values.reshape(local.shape), offset, key)])


def encode_sharded(items: list[ShardedEncode]) -> None:
    """Store sharded 8-bit state: one all-reduce (max) per device mesh of every item's partial block
    maxima gives the whole tensors' absmax (a block split between shards gets the same on both), then
    each item's pieces are encoded with their blocks' absmax and the replicated absmax is stored.
    Every rank must call it with the same items (the same ``order`` keys), in any order."""
    dt = dtensor_module()
    by_mesh: dict[Any, list[ShardedEncode]] = {}
    for item in sorted(items, key=lambda it: it.order):
        by_mesh.setdefault(item.absmax.device_mesh, []).append(item)  # type: ignore[attr-defined]
    for mesh, group in by_mesh.items():
        reduced = dt.DTensor.from_local(torch.cat([it.partial for it in group]), mesh,
                                        [dt.Partial("max")] * mesh.ndim, run_check=False)
        whole = reduced.redistribute(mesh, [dt.Replicate()] * mesh.ndim).to_local()
        start = 0
        for it in group:
            nb = it.partial.shape[0]
            blocks = whole[start:start + nb]
            start += nb
            for codes, values, offset, key in it.pieces:
                first, count = _lowp.covered_blocks(values.numel(), offset)
                codes.copy_(_lowp.encode_8bit(values, key, offset=offset,
                                              absmax=blocks[first:first + count])[0])
            to_local(it.absmax).copy_(_lowp.stored_absmax(blocks))


def init_8bit_sharded(p: Tensor, value: float) -> tuple[Tensor, Tensor]:
    """8-bit state of DTensor ``p`` all equal to ``value``: codes sharded like p, absmax replicated
    (every block's absmax is |value|: no communication)."""
    codes = torch.zeros_like(p, dtype=torch.uint8)
    local, offset = codes.to_local(), shard_offset(codes)  # type: ignore[attr-defined]
    whole = torch.full((_lowp.nblocks(p.numel()),), abs(value) if abs(value) < float("inf") else 0.0,
                       dtype=torch.float32, device=local.device)
    first, count = _lowp.covered_blocks(local.numel(), offset)
    full = torch.full(local.shape, value, dtype=torch.float32, device=local.device)
    local.copy_(_lowp.encode_8bit(full, offset=offset, absmax=whole[first:first + count])[0])
    return codes, replicated(_lowp.stored_absmax(whole), p)


def sync_owned_absmax(codes: Tensor, absmax: Tensor) -> None:
    """After a rows step on DTensor shards whose boundaries are block boundaries: every rank's
    replicated absmax takes each block's value from the rank holding the block (an all-reduce max
    of each rank's own blocks, zero elsewhere)."""
    dt = dtensor_module()
    local = to_local(absmax)
    first, count = _lowp.covered_blocks(codes.to_local().numel(), shard_offset(codes))  # type: ignore
    own = torch.zeros_like(local)
    own[first:first + count] = local[first:first + count]
    mesh = absmax.device_mesh  # type: ignore[attr-defined]
    reduced = dt.DTensor.from_local(own, mesh, [dt.Partial("max")] * mesh.ndim, run_check=False)
    local.copy_(reduced.redistribute(mesh, [dt.Replicate()] * mesh.ndim).to_local())


def as_shard_like(src: Tensor, like: Tensor) -> Tensor:
    """A checkpoint tensor for a DTensor ``like``: a DTensor as it is; a whole (unsharded) tensor cut to
    this rank's shard of ``like``'s layout (same shape; a 1-D absmax of other length: replicated)."""
    if is_dtensor(src) or not is_dtensor(like):
        return src
    if tuple(src.shape) != tuple(like.shape):
        return replicated(src.to(to_local(like).device), like)
    local = like.to_local()  # type: ignore[attr-defined]
    offset = shard_offset(like)
    part = src.reshape(-1)[offset:offset + local.numel()].reshape(local.shape).to(local.device)
    return type(like).from_local(part, like.device_mesh, like.placements,  # type: ignore[attr-defined]
                                 run_check=False, shape=like.shape, stride=like.stride())
