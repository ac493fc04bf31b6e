"""The low-precision step: groups with ``state_precision="bf16"``/``"8bit"`` or ``stochastic_rounding``.

The formats and their torch reference live in :mod:`tigeropt._lowp`; this module routes a group's
step through the paths that implement them and owns the state's storage rules:

* :class:`LowPrecisionSteps`, a base of :class:`tigeropt._base.TigerOptimizer`: validation of the
  options, the step itself (the fused C step on CPU, the Triton kernels' low-precision variants,
  else working copies in the math dtype updated by the reference/foreach rule and stored rounded),
  and lazy rows / sparse gradients with low precision;
* the storage of state tensors (:func:`storage_dtype`, :func:`new_8bit_state`), reading and writing
  them through working copies, and converting a checkpoint's state to this optimizer's precision
  (:func:`convert_state`).

Paths. On CPU the default path (``fused=None``) runs the whole step in the fused C kernel, one pass
(load, fp32 math, rounded stores: :func:`tigeropt._cpu.lowp_step`); on CUDA the default path, and
``fused=True`` (on CPU under ``TRITON_INTERPRET=1``), run it in the Triton step kernels'
low-precision variants, one pass too (not ``capturable=True``); ``foreach=False``/``True`` run the
reference/foreach math on working copies with the stores of :mod:`tigeropt._lowp`, and so do tensors
and options the kernels do not take (on CUDA the rounding then runs in Triton); all bit for bit the
same (float32 sqrt correctly rounded on every path: :func:`tigeropt._math.sqrt_rn`, torch's CPU sqrt
is not). Lazy rows and sparse gradients take bf16 state and stochastic rounding (the rows' element
indices in the whole tensor key the hash, so touching every row equals the dense step), and 8-bit
state whose 256-element blocks each lie inside one row (rows of a multiple of 256 elements, or one
row; other shapes in a lazy 8-bit group: ValueError): untouched rows keep codes and absmax bit for
bit. Complex parameters are refused. DTensor parameters sharded along dim 0 (FSDP2) or replicated
take them all: global element indices key the hash, the 8-bit blocks are the whole tensor's (absmax
replicated, blocks split between shards all-reduced), so sharding changes no bit
(:mod:`tigeropt._dtensor`).
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import torch
from torch import Tensor

from . import _lowp, kernels
from ._dtensor import (
    ShardedEncode,
    as_shard_like,
    check_whole_rows,
    decode_sharded,
    encode_sharded,
    init_8bit_sharded,
    is_dtensor,
    replicated,
    shard_encode,
    shard_offset,
    sync_owned_absmax,
    to_local,
)
from ._ops import compiling, to_float
from ._rows import touched_rows
from ._validate import check, check_bool, check_choice

__all__ = ["LowPrecisionSteps", "STATE_PRECISIONS", "LOW_PRECISION", "state_dtype", "storage_dtype",
           "lp_options", "sr_without_effect", "low_precision", "check_low_precision_param", "new_8bit_state",
           "convert_state"]

LOW_PRECISION = (torch.bfloat16, torch.float16)
STATE_PRECISIONS = ("fp32", "bf16", "8bit")


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Optimizer state dtype: fp32 for bf16/fp16 parameters, else the parameter's dtype."""
    return torch.float32 if param_dtype in LOW_PRECISION else param_dtype


class LowPrecisionSteps:
    """The low-precision part of :class:`tigeropt._base.TigerOptimizer` (which it is a base of: it
    uses the optimizer's ``state``, ``param_groups``, ``state_keys``, ``state_8bit_keys``, ``kernel``,
    ``reference_impl``, ``_impl`` and ``_path``)."""

    state: Any
    param_groups: list[dict[str, Any]]
    state_keys: tuple[str, ...]
    state_8bit_keys: tuple[str, ...] | None
    kernel: str | None
    #: Index of this optimizer's first parameter in the rounding hash (its parameter index): a wrapper
    #: that steps one optimizer per parameter (``optimizer_in_backward``) sets it to the parameter's
    #: position, so that the rounding equals one optimizer over all parameters.
    _param_index_offset: int = 0
    #: Set by :func:`tigeropt.attach_zero`: a weak reference to the ``ZeroRedundancyOptimizer`` whose
    #: local optimizer this is; its ``param_groups`` (every rank's parameters, group by group in the
    #: order of this optimizer's groups) give the global parameter indices and whole-group decisions.
    _zero: Any = None

    def _whole_groups(self) -> list[dict[str, Any]] | None:
        """The param_groups of the ZeroRedundancyOptimizer this optimizer is attached to, else None."""
        zero = self._zero() if self._zero is not None else None
        return None if zero is None else zero.param_groups

    def _hash_indices(self) -> dict[int, int]:
        """id(parameter) -> its parameter index in the rounding hash: its position in ``param_groups``
        order (as in the state_dict) after ``_param_index_offset``; under :func:`tigeropt.attach_zero`
        its position in the ZeroRedundancyOptimizer's ``param_groups`` (its consolidated state_dict's
        order), so that each rank's subset is keyed as one process keys the whole model."""
        whole = self._whole_groups()
        groups, start = (self.param_groups, self._param_index_offset) if whole is None else (whole, 0)
        return {id(q): i for i, q in enumerate((q for grp in groups for q in grp["params"]), start=start)}

    def _validate_precision(self, group: dict[str, Any], warn: bool = True) -> None:
        """state_precision, stochastic_rounding and sr_seed of a group (part of ``_validate``); ``warn``:
        warn when stochastic rounding has no effect in the group (``load_state_dict`` passes False where
        the group it loads into already had that cause, so a user sees it once, not on every load)."""
        precision = group.get("state_precision")
        if precision is not None:
            check_choice("state_precision", precision, STATE_PRECISIONS)
        sr = group.get("stochastic_rounding", False)
        check_bool("stochastic_rounding", sr)
        seed = group.get("sr_seed", 0)
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise TypeError(f"Invalid type for sr_seed: expected an int, got {type(seed).__name__} "
                            f"({seed!r})")
        check(0 <= seed < 2 ** 32, "sr_seed", seed, "must be an int in [0, 2**32)")
        params = [p for p in group.get("params", []) if isinstance(p, Tensor)]
        if group["lazy"] and precision == "8bit" and self.state_8bit_keys != ():
            for i, p in enumerate(params):
                if not _rows_are_blocks(p):
                    raise ValueError(
                        f"Invalid lazy: True (with state_precision='8bit' each 256-element block of the "
                        f"8-bit state must lie inside one row, so that untouched rows keep their state bit "
                        f"for bit; parameter {i} of shape {tuple(p.shape)} has rows of {p[0].numel()} "
                        "elements: use rows of a multiple of 256 elements, or put it in a group with "
                        "state_precision='bf16' or lazy=False)")
        complex_params = [p.dtype for p in params if p.is_complex()]
        options = lp_options(group)
        if complex_params and (options or (precision == "fp32" and torch.complex128 in complex_params)):
            name = "stochastic_rounding" if sr else "state_precision"
            raise ValueError(f"Invalid {name}: {sr if sr else precision!r} (complex parameters are not "
                             f"supported with {options or 'state_precision=fp32 for complex128 parameters'}; "
                             "put them in a group without these options)")
        if sr and params:
            if any(p.dtype == torch.float16 for p in params):
                raise ValueError("Invalid stochastic_rounding: True (rounds to bf16; this group holds fp16 "
                                 "parameters: use bf16 parameters or stochastic_rounding=False)")
            if warn and sr_without_effect(group):
                warnings.warn("stochastic_rounding=True has no effect in this group: it rounds bf16 "
                              "parameters and bf16/8bit state, and the group has neither", stacklevel=4)

    def _key_precision(self, key: str, precision: str | None) -> str | None:
        """How state ``key`` is stored under the group's ``state_precision``."""
        if precision == "8bit" and self.state_8bit_keys is not None and key not in self.state_8bit_keys:
            return "bf16"
        return precision

    def _lowp_fused_ok(self, group: dict[str, Any]) -> bool:
        """Whether the Triton kernels' low-precision variants run this group's low-precision options
        (:meth:`_step_lowp_triton`; not with capturable=True: the rounding keys follow the host's
        step counts)."""
        return (self.kernel is not None and bool(lp_options(group)) and not self._unfused_options(group)
                and not group["capturable"])

    def _step_low_precision(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                            hyper: dict[str, Any]) -> None:
        """One step of a group with low-precision state or stochastic rounding.

        Each parameter and state tensor is read into a working copy in the math dtype (fp32, fp64 for
        fp64 parameters; 8-bit state decoded), the optimizer's reference or foreach rule updates the
        working copies, and each is stored back once: bf16 with round-to-nearest or stochastic
        rounding, 8-bit re-encoded (:mod:`tigeropt._lowp`).  The rounding bits depend on (sr_seed,
        step, parameter index, element index) only, so both paths give bit-identical results.
        """
        name = type(self).__name__
        for p in params:
            check_low_precision_param(name, p, group)
        index = self._hash_indices()
        seed, sr = group["sr_seed"], group["stochastic_rounding"]
        if group["lazy"] or any(g.is_sparse for g in grads):
            dense = []
            for j, (p, g) in enumerate(zip(params, grads)):
                if group["lazy"] or g.is_sparse:
                    self._rows_low_precision(p, g, hyper, seed if sr else None, index[id(p)])
                else:
                    dense.append(j)
            params, grads = [params[j] for j in dense], [grads[j] for j in dense]
        # the default path rounds in C on CPU and in Triton on CUDA, encodes 8-bit state in C on CPU
        # (bit for bit the torch code of _lowp); while Dynamo traces, the keys are computed from the
        # step tensors (no int(): no graph break) and the stores run the torch code (the C and
        # Triton twins are not traceable)
        traced = compiling()
        c_store = group["fused"] is None and group["foreach"] is None and not traced
        buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for j, p in enumerate(params):
            md = torch.float64 if p.dtype == torch.float64 else torch.float32
            buckets.setdefault((p.device, md), []).append(j)
        sharded: list[ShardedEncode] = []  # 8-bit DTensor state: one all-reduce for the whole step
        for (device, md), js in buckets.items():
            if c_store and device.type == "cpu" and md == torch.float32 and self.kernel is not None:
                shards = [j for j in js if is_dtensor(params[j])]
                plain = [j for j in js if not is_dtensor(params[j])] if shards else js
                if shards:
                    shards = self._step_lowp_shards_c(group, params, grads, shards, index, hyper, sharded)
                if plain:
                    plain = self._step_low_precision_c(group, [params[j] for j in plain],
                                                       [grads[j] for j in plain], hyper, index, plain)
                js = sorted(plain + shards)
                if not js:
                    continue
            js = self._step_lowp_triton(group, device, md, params, grads, js, index, hyper)
            if not js:
                continue
            ps = [params[j] for j in js]
            states = [self.state[p] for p in ps]
            steps = [st["step"] for st in states]
            torch._foreach_add_(steps, 1)
            work_p = [p if p.dtype == md else p.to(md) for p in ps]
            work_s = [[_read_state(st, k, md) for st in states] for k in self.state_keys]
            impl = self._impl(self._path(group, device, md))
            impl(work_p, [grads[j] for j in js], *work_s, steps, **hyper)
            for p, st, w, *ws in zip(ps, states, work_p, *work_s):
                step, pidx = st["step"] if traced else int(st["step"]), index[id(p)]
                if w is not p:
                    if sr and p.dtype == torch.bfloat16:
                        key = _lowp.sr_key(seed, step, pidx, 0)
                        p_local, w_local, offset = to_local(p), to_local(w), shard_offset(p)
                        if not (c_store and _fast_sr_bf16(w_local, p_local, key, offset)):
                            p_local.copy_(_lowp.round_bf16(w_local, key, offset=offset))
                    else:
                        p.copy_(w)
                for i, (k, w_s) in enumerate(zip(self.state_keys, ws)):
                    key = _lowp.sr_key(seed, step, pidx, 1 + i, st[k].dtype == torch.uint8) if sr else None
                    _write_state(st, k, w_s, key, c_store, sharded, (pidx, i))
        if sharded:
            encode_sharded(sharded)

    def _step_lowp_shards_c(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                            js: list[int], index: dict[int, int], hyper: dict[str, Any],
                            sharded: list[ShardedEncode]) -> list[int]:
        """The low-precision step of DTensor parameters ``params[j]``, ``j`` in ``js`` (FSDP2 Shard(0) or
        Replicate, on CPU), in the fused C kernel: each local shard with the global index of its first
        element (hash keys, 8-bit block grid).  8-bit state keeps the whole tensor's blocks
        (:mod:`tigeropt._dtensor`): the kernel takes the elements of the blocks the shard holds whole,
        the torch code the elements of a block split with a neighbouring shard (at most one at each
        end), whose partial absmax join ``sharded`` (the step's one all-reduce), as do the kernel's
        blocks (so that every rank's replicated absmax gets them).  Bit for bit the torch code on
        the DTensors.  Returns the entries of ``js`` it did not take (untouched)."""
        c = _c_lowp()
        if c is None or self._unfused_options(group):  # options with whole-tensor or row-wise semantics
            return js
        keys = self.state_keys
        rest: list[int] = []
        todo = []  # (j, offset, numel, (start, end) of the kernel's part)
        for j in js:
            p, g = params[j], grads[j]
            st = self.state[p]
            tensors = [p, g, *(st[k] for k in keys)]
            if not (is_dtensor(g) and g.placements == p.placements  # type: ignore[attr-defined]
                    and all(is_dtensor(t) for t in tensors[2:])):
                rest.append(j)
                continue
            local = [to_local(t) for t in tensors]
            if (not all(t.is_contiguous() for t in local)
                    or any(t.numel() != local[0].numel() for t in local)):
                rest.append(j)
                continue
            offset, n = shard_offset(p), local[0].numel()
            a, b = 0, n
            if any(st[k].dtype == torch.uint8 for k in keys):  # split blocks at the ends: the torch code
                total = p.numel()
                if offset % _lowp.BLOCK:
                    a = min(n, _lowp.BLOCK - offset % _lowp.BLOCK)
                if (offset + n) % _lowp.BLOCK and offset + n < total:
                    b = max(a, n - (offset + n) % _lowp.BLOCK)
            todo.append((j, offset, n, (a, b)))
        flat = {}  # j -> flattened local p, g, states
        for j, _, _, _ in todo:
            p = params[j]
            st = self.state[p]
            flat[j] = [to_local(t).view(-1) for t in (p, grads[j], *(st[k] for k in keys))]
        absmax = {j: [to_local(self.state[params[j]][k + "_absmax"]) if self.state[params[j]][k].dtype ==
                      torch.uint8 else None for k in keys] for j in flat}
        # the kernel's parts: one call for every shard
        inner = [(j, o, a, b) for j, o, _, (a, b) in todo if b > a]
        taken = set(j for j, _, _, _ in todo)
        if inner:
            ps, gs = [flat[j][0][a:b] for j, _, a, b in inner], [flat[j][1][a:b] for j, _, a, b in inner]
            ss = [[flat[j][2 + i][a:b] for j, _, a, b in inner] for i in range(len(keys))]
            ams = [[None if absmax[j][i] is None else
                    absmax[j][i][(o + a) // _lowp.BLOCK:][:c.lowp_absmax_len(b - a, o + a)]
                    for j, o, a, b in inner] for i in range(len(keys))]
            steps = [self.state[params[j]]["step"] for j, *_ in inner]
            back = c.lowp_step(self.kernel, ps, gs, ss, ams, steps, hyper,
                               param_index=[index[id(params[j])] for j, *_ in inner],
                               seed=group["sr_seed"], stochastic_rounding=group["stochastic_rounding"],
                               offsets=[o + a for _, o, a, _ in inner])
            for k in back:
                taken.discard(inner[k][0])
                rest.append(inner[k][0])
        ran = {j for j, *_ in inner}
        # the split blocks' elements: the torch code (working copies, the group's foreach rule)
        edges = []  # (j, start, end)
        for j, _, n, (a, b) in todo:
            if j not in taken:
                continue
            if j not in ran:  # no element for the kernel: the step count is incremented here
                self.state[params[j]]["step"] += 1
            edges += [(j, lo, hi) for lo, hi in ((0, a), (b, n)) if hi > lo]
        if edges:
            md = torch.float32
            work_p = [flat[j][0][lo:hi].to(md) for j, lo, hi in edges]
            work_s = [[flat[j][2 + i][lo:hi].to(md) if absmax[j][i] is None
                       else _decode_piece(flat[j][2 + i][lo:hi], absmax[j][i], shard_offset(params[j]) + lo)
                       for j, lo, hi in edges] for i in range(len(keys))]
            impl = self._impl(self._path(group, params[edges[0][0]].device, md))
            impl(work_p, [flat[j][1][lo:hi] for j, lo, hi in edges], *work_s,
                 [self.state[params[j]]["step"] for j, _, _ in edges], **hyper)
        seed = group["sr_seed"] if group["stochastic_rounding"] else None
        pieces: dict[tuple[int, int], list[tuple[Tensor, Tensor, int, int | None]]] = {}
        for e, (j, lo, hi) in enumerate(edges):
            p = params[j]
            pidx, step, off = index[id(p)], int(self.state[p]["step"]), shard_offset(p) + lo
            dst, w = flat[j][0][lo:hi], work_p[e]
            if seed is not None and dst.dtype == torch.bfloat16:
                w = _lowp.round_bf16(w, _lowp.sr_key(seed, step, pidx, 0), offset=off)
            dst.copy_(w)
            for i in range(len(keys)):
                dst, w = flat[j][2 + i][lo:hi], work_s[i][e]
                eight = absmax[j][i] is not None
                key = None if seed is None else _lowp.sr_key(seed, step, pidx, 1 + i, eight)
                if absmax[j][i] is not None:
                    pieces.setdefault((j, i), []).append((dst, w, off, key))
                    continue
                if key is not None and dst.dtype == torch.bfloat16:
                    w = _lowp.round_bf16(w, key, offset=off)
                dst.copy_(w)
        # every 8-bit state of a taken shard joins the step's all-reduce (the same items on every rank)
        for j, o, _, (a, b) in todo:
            if j not in taken:
                continue
            st = self.state[params[j]]
            for i, k in enumerate(keys):
                am = absmax[j][i]
                if am is None:
                    continue
                partial = torch.zeros_like(am)
                if b > a:  # the kernel's blocks, their absmax as it stored them
                    first, count = _lowp.covered_blocks(b - a, o + a)
                    partial[first:first + count] = am[first:first + count]
                for _, values, off, _ in pieces.get((j, i), []):
                    first, count = _lowp.covered_blocks(values.numel(), off)
                    partial[first:first + count] = _lowp.block_absmax(values, off)
                sharded.append(ShardedEncode((index[id(params[j])], i), st[k + "_absmax"], partial,
                                             pieces.get((j, i), [])))
        return sorted(rest)

    def _lowp_c_plan(self, group: dict[str, Any], params: list[Tensor], first: int | tuple[int, ...]) -> Any:
        """The fused C step of this low-precision group's ``params`` (those with gradients) as a
        :class:`tigeropt._cpu.LowpStepPlan` for the cached step plans, or None: only where the step
        just taken ran them all in one C launch (default path, CPU, dense gradients, not lazy, no
        DTensor; one parameter dtype and one storage per state key).  ``first``: the global index
        (param_groups order) of the group's first parameter, whence the hash keys' parameter indices
        (under :func:`tigeropt.attach_zero`: the tuple of every group parameter's global index)."""
        if (self.kernel is None or group["fused"] is not None or group["foreach"] is not None or group["lazy"]
                or compiling() or not params):
            return None
        for p in params:
            if p.device.type != "cpu" or p.grad is None or p.grad.is_sparse or is_dtensor(p):
                return None
        c = _c_lowp()
        if c is None:
            return None
        pos = {id(q): i for i, q in enumerate(group["params"])}
        states = [self.state[p] for p in params]
        keys = self.state_keys
        return c.LowpStepPlan.build(self.kernel, params, [[st[k] for st in states] for k in keys],
                                    [[st.get(k + "_absmax") for st in states] for k in keys],
                                    [st["step"] for st in states],
                                    param_index=[first[pos[id(p)]] if isinstance(first, tuple)
                                                 else first + pos[id(p)] for p in params],
                                    seed=group["sr_seed"], stochastic_rounding=group["stochastic_rounding"])

    def _step_low_precision_c(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                              hyper: dict[str, Any], index: dict[int, int], js: list[int]) -> list[int]:
        """The low-precision step of CPU tensors in the fused C kernel (one pass: load, fp32 math,
        rounded stores; bit for bit the code below it); returns the entries of ``js`` it did not take."""
        c = _c_lowp()
        if c is None or compiling():
            return js
        states = [self.state[p] for p in params]
        keys = self.state_keys
        rest = c.lowp_step(self.kernel, params, grads, [[st[k] for st in states] for k in keys],
                           [[st.get(k + "_absmax") for st in states] for k in keys],
                           [st["step"] for st in states], hyper, param_index=[index[id(p)] for p in params],
                           seed=group["sr_seed"], stochastic_rounding=group["stochastic_rounding"])
        return [js[i] for i in rest]

    def _step_lowp_triton(self, group: dict[str, Any], device: torch.device, md: torch.dtype,
                          params: list[Tensor], grads: list[Tensor], js: list[int], index: dict[int, int],
                          hyper: dict[str, Any]) -> list[int]:
        """The low-precision step of parameters ``params[j]``, ``j`` in ``js``, by the Triton kernels
        where the group's path is Triton (CUDA, or ``fused=True``): one pass over memory per
        (parameter, gradient, state dtypes) launch, reading and storing the low-precision tensors
        themselves, bit for bit the reference low-precision step (:mod:`tigeropt._lowp`; the keys
        from the same step counts, parameter indices and element indices).  Returns the positions
        it left to the caller (fp64 math, sparse gradients, DTensors with 8-bit state, whose blocks
        may span shards; a path that is not Triton).  A DTensor shard's elements are keyed by their
        global indices (``element_offset``: :func:`shard_offset`).
        """
        if md != torch.float32 or compiling() or self._path(group, device, md) != "fused":
            return js
        launches: dict[tuple[torch.dtype, ...], list[int]] = {}
        rest = []
        for j in js:
            p, g = params[j], grads[j]
            st = self.state[p]
            if (p.dtype not in kernels.TRITON_DTYPES or g.is_sparse
                    or (is_dtensor(p) and any(st[k].dtype == torch.uint8 for k in self.state_keys))):
                rest.append(j)
                continue
            launches.setdefault((p.dtype, g.dtype, *(st[k].dtype for k in self.state_keys)), []).append(j)
        if not launches:
            return js
        impl = self._impl("fused")
        seed = group["sr_seed"] if group["stochastic_rounding"] else None
        hyper = dict(hyper, lr=to_float(hyper["lr"]))  # the reference's float64 lr, whence its scalars
        for members in launches.values():
            ps = [params[j] for j in members]
            states = [self.state[p] for p in ps]
            steps = [st["step"] for st in states]
            torch._foreach_add_(steps, 1)
            lists = [[st[k] for st in states] for k in self.state_keys]
            absmax = [[st[k + "_absmax"] for st in states] if lst[0].dtype == torch.uint8 else None
                      for k, lst in zip(self.state_keys, lists)]
            impl(ps, [grads[j] for j in members], *lists, steps, **hyper, sr_seed=seed,
                 param_indices=[index[id(p)] for p in ps], absmax=absmax,
                 element_offset=[shard_offset(p, type(self).__name__) for p in ps])
        return rest

    def _rows_low_precision(self, p: Tensor, g: Tensor, hyper: dict[str, Any], seed: int | None,
                            pidx: int) -> None:
        """Lazy rows / sparse gradient step of one parameter with low precision: the touched rows
        (:func:`touched_rows`) of p and its state are gathered in the math dtype (8-bit rows
        decoded), updated by the reference rule and stored back rounded (stochastically with the
        element indices of those rows in the whole tensor; 8-bit rows re-encoded block by block);
        other rows do not change, bit for bit.  8-bit state needs each 256-element block inside one
        row (:func:`_rows_are_blocks`, checked by ``_validate``), so a step touching every row is
        the dense step.  DTensor parameters (FSDP2, dim-0 shards of whole rows) update their local
        rows with global element indices; their replicated 8-bit absmax is then all-reduced."""
        name = type(self).__name__
        state = self.state[p]
        absmax = [state.get(k + "_absmax") if state[k].dtype == torch.uint8 else None
                  for k in self.state_keys]
        if any(a is not None for a in absmax) and not _rows_are_blocks(p):
            raise RuntimeError(f"{name}: lazy rows and sparse gradients with 8-bit state need rows of a "
                               f"multiple of 256 elements (each block inside one row); got shape "
                               f"{tuple(p.shape)}: use bf16 state for this parameter")
        sharded = is_dtensor(p)
        if sharded:
            check_whole_rows(p)
        tensors = [p, *(state[k] for k in self.state_keys)]
        offsets = [shard_offset(t, name) for t in tensors]  # global index of each local shard's start
        state["step"] += 1
        p, g, *states = [to_local(t) for t in [p, g, *tensors[1:]]]
        local_absmax = [None if a is None else to_local(a) for a in absmax]
        if p.dim() == 0:
            p, g, states = p.reshape(1), g.reshape(1), [s.reshape(1) for s in states]
        idx, rows = touched_rows(g)
        if idx.numel() and rows is not None:
            md = torch.float64 if p.dtype == torch.float64 else torch.float32

            def elements(t: Tensor, offset: int) -> Tensor:  # global indices of t's touched rows
                row = t[0].numel() if t.dim() > 1 else 1
                return offset + idx[:, None] * row + torch.arange(row, device=idx.device)

            def blocks(t: Tensor, offset: int) -> Tensor:  # 8-bit rows are whole blocks (or one row)
                row = t[0].numel() if t.dim() > 1 else 1
                return ((offset + idx * row) // _lowp.BLOCK)[:, None] + torch.arange(
                    _lowp.nblocks(row), device=idx.device)

            p_rows = p.index_select(0, idx).to(md)
            s_rows = [s.index_select(0, idx).to(md) if a is None else
                      _lowp.decode_8bit(s.index_select(0, idx), a[blocks(s, o)].reshape(-1)).to(md)
                      for s, a, o in zip(states, local_absmax, offsets[1:])]
            type(self).reference_impl([p_rows], [rows], *[[s] for s in s_rows], [state["step"]], **hyper)
            step = int(state["step"])
            for i, (t, w, a, o) in enumerate(zip([p, *states], [p_rows, *s_rows], [None, *local_absmax],
                                                 offsets)):
                key = None if seed is None else _lowp.sr_key(seed, step, pidx, i, a is not None)
                if a is not None:
                    codes, block_absmax = _lowp.encode_8bit(w, key, index=elements(t, o))
                    t.index_copy_(0, idx, codes)
                    a[blocks(t, o).reshape(-1)] = block_absmax
                    continue
                if key is not None and t.dtype == torch.bfloat16:
                    w = _lowp.round_bf16(w, key, index=elements(t, o).reshape(w.shape))
                t.index_copy_(0, idx, w.to(t.dtype))
        if sharded:  # every rank, touched rows or not: the replicated absmax of the blocks it owns
            for key, a in zip(self.state_keys, absmax):
                if a is not None:
                    sync_owned_absmax(state[key], a)


def new_8bit_state(p: Tensor, shape: tuple[int, ...], value: float) -> tuple[Tensor, Tensor]:
    """(codes, absmax) of 8-bit state of ``shape`` for parameter ``p``, every element ``value`` (a DTensor
    parameter's state of its shape: codes sharded like it, absmax replicated)."""
    if is_dtensor(p) and shape == tuple(p.shape):
        return init_8bit_sharded(p, value)
    return _lowp.encode_8bit(torch.full(shape, value, dtype=torch.float32, device=p.device))


def sr_without_effect(group: dict[str, Any]) -> bool:
    """Whether ``stochastic_rounding=True`` has nothing to round in ``group``: neither bf16 parameters
    nor bf16/8-bit state (the case the constructor warns about)."""
    params = [p for p in group.get("params", []) if isinstance(p, Tensor)]
    return (bool(group.get("stochastic_rounding")) and bool(params)
            and group.get("state_precision") not in ("bf16", "8bit")
            and not any(p.dtype == torch.bfloat16 for p in params))


def lp_options(group: dict[str, Any]) -> str:
    """The low-precision options a group uses that only the reference/foreach paths implement."""
    used = []
    if group.get("stochastic_rounding"):
        used.append("stochastic_rounding=True")
    precision = group.get("state_precision")
    if precision in ("bf16", "8bit"):
        used.append(f"state_precision={precision!r}")
    return ", ".join(used)


def low_precision(group: dict[str, Any]) -> bool:
    """Whether a group's step runs :meth:`TigerOptimizer._step_low_precision` (state stored in
    another dtype than the math, or stochastic rounding)."""
    if lp_options(group):
        return True
    return group.get("state_precision") == "fp32" and any(p.dtype == torch.float64 for p in group["params"])


def storage_dtype(p: Tensor, precision: str | None) -> torch.dtype:
    """dtype of the (non-8-bit) state of parameter ``p`` under ``state_precision``."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.complex64 if p.is_complex() else torch.float32
    return state_dtype(p.dtype)


def check_low_precision_param(name: str, p: Tensor, group: dict[str, Any]) -> None:
    options = lp_options(group)
    if p.is_complex() and (options or p.dtype == torch.complex128 and group.get("state_precision") == "fp32"):
        raise RuntimeError(f"{name}: complex parameters are not supported with "
                           f"{options or 'state_precision=fp32 for complex128 parameters'}")
    if is_dtensor(p):
        shard_offset(p, name)  # placements whose shards are ranges of the flattened tensor
    if group.get("stochastic_rounding") and p.dtype == torch.float16:
        raise RuntimeError(f"{name}: stochastic_rounding=True rounds to bf16, not fp16 parameters")


def _read_state(state: dict[str, Any], key: str, dtype: torch.dtype) -> Tensor:
    """State tensor ``key`` in the math ``dtype`` (8-bit decoded; the tensor itself if already so)."""
    t = state[key]
    if t.dtype == torch.uint8:
        if is_dtensor(t):
            return decode_sharded(t, state[key + "_absmax"]).to(dtype)
        return _lowp.decode_8bit(t, state[key + "_absmax"]).to(dtype)
    return t if t.dtype == dtype else t.to(dtype)


def _decode_piece(codes: Tensor, absmax: Tensor, offset: int) -> Tensor:
    """fp32 values of 8-bit ``codes`` whose first element has the global index ``offset``, from the
    whole tensor's block maxima ``absmax``."""
    first, count = _lowp.covered_blocks(codes.numel(), offset)
    return _lowp.decode_8bit(codes, absmax[first:first + count], offset)


def _c_lowp() -> Any:
    """tigeropt._cpu if its library loads (its low-precision stores), else None."""
    from . import _cpu

    return _cpu if _cpu.available() else None


def _fast_sr_bf16(src: Tensor, dst: Tensor, key: int, offset: int = 0) -> bool:
    """Stochastic rounding into ``dst`` by the C (CPU) or Triton (CUDA) twin of _lowp.round_bf16;
    False when neither takes the tensors (the caller then runs the torch code).  ``offset``: the
    global index of the first element (a DTensor shard's; the twins take 0 only so far)."""
    if offset:
        return False
    if src.device.type == "cpu":
        c = _c_lowp()
        return c is not None and c.sr_bf16(src, dst, key)
    if src.device.type == "cuda" and kernels.triton_usable():
        from .kernels import lowp

        return lowp.sr_bf16(src, dst, key)
    return False


def _write_state(state: dict[str, Any], key: str, work: Tensor, sr_key: int | None, c_store: bool = False,
                 sharded: list[ShardedEncode] | None = None, order: tuple[int, int] = (0, 0)) -> None:
    """Store a working copy into state ``key``: once rounded (stochastically with ``sr_key``); with
    ``c_store`` by the C twins of the torch code where they take the tensors.  DTensor state is
    stored shard by shard with global element indices; its 8-bit stores are appended to ``sharded``
    (for one :func:`encode_sharded` of the whole step; ``order``: (parameter index, state index))
    or, without it, done at once."""
    t = state[key]
    if work is t:
        return
    if is_dtensor(t):
        if t.dtype == torch.uint8:
            item = shard_encode(t, state[key + "_absmax"], to_local(work), sr_key, order)
            encode_sharded([item]) if sharded is None else sharded.append(item)
        elif t.dtype == torch.bfloat16 and sr_key is not None:
            to_local(t).copy_(_lowp.round_bf16(to_local(work), sr_key, offset=shard_offset(t)))
        else:
            t.copy_(work)
        return
    c = _c_lowp() if c_store and t.device.type == "cpu" else None
    if t.dtype == torch.uint8:
        if c is None or not c.encode_e4m3(work, t, state[key + "_absmax"], sr_key):
            codes, absmax = _lowp.encode_8bit(work, sr_key)
            t.copy_(codes)
            state[key + "_absmax"].copy_(absmax)
    elif t.dtype == torch.bfloat16 and sr_key is not None:
        if not (c_store and _fast_sr_bf16(work, t, sr_key)):
            t.copy_(_lowp.round_bf16(work, sr_key))
    else:
        t.copy_(work)


def convert_state(st: dict[str, Any], key: str, p: Tensor, precision: str | None, shape: tuple[int, ...]
                   ) -> dict[str, Tensor]:
    """Checkpoint state ``key`` (float, or 8-bit codes + absmax) as this optimizer stores it.

    Same storage: copied bit-exactly.  Float into "8bit": quantized (round to nearest).  8-bit
    into float: decoded, then cast (round to nearest).
    """
    src = st[key]
    absmax = st.get(key + "_absmax")
    if is_dtensor(p) and shape == tuple(p.shape):
        return _convert_sharded(key, src, absmax, p, precision)
    if precision == "8bit":
        if src.dtype == torch.uint8 and absmax is not None:
            return {key: src.to(device=p.device, copy=True).reshape(shape),
                    key + "_absmax": absmax.to(device=p.device, dtype=torch.float32, copy=True)}
        codes, am = _lowp.encode_8bit(src.to(device=p.device, dtype=torch.float32))
        return {key: codes, key + "_absmax": am}
    if src.dtype == torch.uint8 and absmax is not None:
        src = _lowp.decode_8bit(src.to(p.device), absmax.to(device=p.device, dtype=torch.float32))
    return {key: src.to(device=p.device, dtype=storage_dtype(p, precision), copy=True)}


def _convert_sharded(key: str, src: Tensor, absmax: Tensor | None, p: Tensor, precision: str | None
                     ) -> dict[str, Tensor]:
    """:func:`convert_state` for a DTensor parameter (state sharded like it, 8-bit absmax replicated);
    the checkpoint's tensors may be DTensors or whole tensors.  Quantizing all-reduces (collective)."""
    src = as_shard_like(src, p)
    if src.dtype == torch.uint8 and absmax is not None:
        absmax = as_shard_like(absmax.to(torch.float32), p)
        if precision == "8bit":
            return {key: src.to(device=p.device, copy=True),
                    key + "_absmax": absmax.to(device=p.device, copy=True)}
        src = decode_sharded(src, absmax)
    if precision == "8bit":
        codes = torch.zeros_like(p, dtype=torch.uint8)
        whole = replicated(torch.zeros(_lowp.nblocks(p.numel()), device=to_local(p).device), p)
        encode_sharded([shard_encode(codes, whole, to_local(src).to(torch.float32), None)])
        return {key: codes, key + "_absmax": whole}
    return {key: src.to(device=p.device, dtype=storage_dtype(p, precision), copy=True)}


def _rows_are_blocks(p: Tensor) -> bool:
    """Whether each 256-element block of ``p``'s flattened tensor lies inside one row (slice along
    dim 0): rows of a multiple of 256 elements, or at most one row."""
    return p.dim() == 0 or p.shape[0] <= 1 or p[0].numel() % _lowp.BLOCK == 0
