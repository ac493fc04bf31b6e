"""Shared machinery of the Triton multi-tensor kernels: launch tables, block sizes, jit helpers.

Launch design (one launch per optimizer step and tensor group, like torch's ``multi_tensor_apply``):

* Every tensor *role* (param, grad, each state) has one dtype per launch.  The kernel gets, per
  role, a typed *base pointer* (a small persistent "witness" tensor of that dtype, allocated once
  per device and dtype and never freed) and addresses each tensor as ``base + offset``, with the
  offsets (in elements, or in 16-byte units when every tensor is 16-byte aligned, which lets the
  compiler emit 128-bit vector loads) read from a device table.
* ``table`` (int64, one row per tensor): ``[numel, off_param, off_state1, ...]``;
  ``gtab`` (int64, one entry per tensor): the gradient offsets (gradients are often re-allocated
  between steps, so they live in their own small table); ``work`` (int32 pairs): one
  ``(tensor, chunk)`` item per program, ``CHUNK`` elements each, walked ``BLOCK`` elements at a
  time: full blocks unmasked, the tail masked.  Empty tensors have no work items.
* Tables are cached, keyed by the tensors' data pointers and sizes (and the launch config), so a
  steady training loop builds them once; a miss (new tensors, new gradient buffers) rebuilds them
  on the host and uploads them with a pinned, non-blocking copy: no host synchronization.
* Hyperparameters are runtime scalars (never ``constexpr``), so a changing lr never recompiles;
  an lr tensor on the parameters' device is read by the kernel through its pointer (CUDA-graph
  friendly).  No integer runtime arguments are passed (Triton specializes integers on their value).
* Tensors must be non-overlapping and dense, with the same strides for a parameter, its gradient
  and its state (true for ordinary and ``channels_last`` parameters).  Anything else is handled
  by a contiguous working copy that is written back after the kernel (correct, but slower, and
  such groups rebuild their tables every step).  A gradient laid out unlike its parameter is
  copied into the parameter's layout.  A tensor that is not 16-byte aligned (a view at an odd
  offset) also gets an aligned working copy, so that it does not drop every other tensor of the
  launch to scalar accesses (``tests/test_codegen.py`` checks the vector widths).
* DTensor (FSDP2) parameters: the kernels update the local shards (``to_local()``).
* CUDA graphs: a step whose tables are cached (one eager step with the same tensors first) is
  captured as a single kernel.  Tables missing at capture time are written inside the graph (one
  small fill per entry, once) and kept alive for the graph, never reused by eager steps.  Cached
  tables used by a capture are never evicted.  Floats are frozen into a graph: pass lr as a
  device tensor; AdaX/Adagrad-with-lr_decay need step counts on the device to be captured.
* Assumption of the fast path: a tensor at the same address with the same size keeps its
  strides (only checked when the tables are built; gradients are checked every step).

Low precision (:mod:`tigeropt._lowp`, bit for bit): a state role may be bf16 (rounded to nearest,
or stochastically) or 8-bit (uint8 e4m3 codes plus one fp32 absmax per 256-element block, passed
as ``absmax``), and bf16 parameters may be rounded stochastically.  Such a launch (:class:`LowPrecision`)
appends to each table row the parameter's index in the optimizer, its element offset (a DTensor
shard's first global element) and the offsets of the absmax tensors; the kernels hash
(seed, step, parameter index, stream, element index) themselves, so the only per-step input is
one key argument (or a small table when the tensors' steps differ).  Element indices are logical
(row-major): non-contiguous tensors get contiguous working copies.  A launch with 8-bit state
walks whole 256-element blocks (``block`` a multiple of 256, the tile viewed as
``[block // 256, 256]``) so that each block's absmax is one row reduction.
"""

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import TRITON_DTYPES

__all__ = ["LaunchConfig", "launch_config", "use_launch_config", "Launch", "prepare", "lr_argument",
           "step_values", "per_tensor_table", "check_not_capturing_host_steps", "SUPPORTED_DTYPES",
           "clear_cache", "LowPrecision", "low_precision", "Q8_BLOCK"]

#: Parameter dtypes the kernels take (math is always fp32; state is fp32, bf16 or 8-bit).
SUPPORTED_DTYPES = TRITON_DTYPES
#: Elements per 8-bit block (one fp32 absmax each): tigeropt._lowp.BLOCK.
Q8_BLOCK = 256
_ALIGN = 16  # bytes: one 128-bit vector access


@dataclass(frozen=True)
class LaunchConfig:
    """Fixed tile sizes of a launch: ``block`` elements per inner step, ``chunk`` per program."""

    block: int
    chunk: int
    num_warps: int

    def __post_init__(self) -> None:
        for name in ("block", "chunk"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"Invalid {name}: {value!r} (must be a power of two >= 1)")
        if self.chunk % self.block:
            raise ValueError(f"Invalid chunk: {self.chunk!r} (must be a multiple of block={self.block})")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"Invalid num_warps: {self.num_warps!r} (must be a power of two <= 32)")


# GPU, fp32 parameters: 2048 elements per step and 8 warps give every thread 8 elements (two 16-byte
# loads per stream); 4 steps per program keep the table look-ups amortized while leaving enough
# programs (>= 6 waves on an H100 at 100M parameters) for good load balance.
_CUDA_CONFIG = LaunchConfig(block=2048, chunk=8192, num_warps=8)
# bf16/fp16 parameters: 1024 elements and 8 warps give every thread 4 elements, one access of 64 bits
# per 16-bit stream and of 128 bits per fp32 state stream, in the same register layout.  With 2048
# (8 per thread) the 16-bit loads become 128-bit but the fp32 streams get another layout, and every
# state store goes through shared memory with two barriers (checked by tests/test_codegen.py).
_CUDA_CONFIG_16 = LaunchConfig(block=1024, chunk=8192, num_warps=8)
_CUDA_CONFIGS = {torch.float32: _CUDA_CONFIG, torch.bfloat16: _CUDA_CONFIG_16, torch.float16: _CUDA_CONFIG_16}
# 8-bit state with 16-bit parameters: a 256-element block sits in one warp (8 elements per thread,
# 128-bit bf16 accesses, 64-bit code accesses), so its absmax is a warp reduction (shuffles); only
# the tile's 8 absmax values cross warps for their store (through shared memory, one float each).
# With fp32 parameters (or fp32 next to 16-bit state) 4 elements per thread keep every stream in one
# layout (the fp32 stores take at most 128 bits); a block then spans two warps, whose partial
# maxima meet in shared memory.
_CUDA_CONFIG_Q8 = LaunchConfig(block=2048, chunk=8192, num_warps=8)
# Interpreter (tests on CPU): small tiles so that little tensors still span several programs.
_INTERPRETER_CONFIG = LaunchConfig(block=128, chunk=512, num_warps=4)
_override: LaunchConfig | None = None


def launch_config(device: torch.device, dtype: torch.dtype = torch.float32, q8: bool = False,
                  narrow_state: bool = False) -> LaunchConfig:
    """The fixed tile sizes for ``device`` and parameter ``dtype`` (no autotuning on live parameters);
    ``q8``: a launch with 8-bit state, whose tiles hold whole 256-element blocks; ``narrow_state``:
    a 16-bit or 8-bit state role."""
    if _override is not None:
        config = _override
    elif device.type == "cuda":
        wide = dtype == torch.float32
        if q8 and not wide:
            config = _CUDA_CONFIG_Q8
        elif wide and narrow_state:  # fp32 parameters next to 16-bit/8-bit state: 4 elements per thread
            config = _CUDA_CONFIG_16
        else:
            config = _CUDA_CONFIGS.get(dtype, _CUDA_CONFIG)
    else:
        config = _INTERPRETER_CONFIG
    if q8 and config.block % Q8_BLOCK:
        block = max(config.block, Q8_BLOCK)
        config = LaunchConfig(block, max(config.chunk, block), config.num_warps)
    return config


@contextlib.contextmanager
def use_launch_config(config: LaunchConfig) -> Iterator[LaunchConfig]:
    """Temporarily force a launch config (tests use tiny tiles; benchmarks compare tiles offline)."""
    global _override
    previous, _override = _override, config
    try:
        yield config
    finally:
        _override = previous


# ------------------------------------------------------------------------------------- host side
_witnesses: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _witness(device: torch.device, dtype: torch.dtype) -> Tensor:
    """A persistent, 16-byte aligned tensor whose address is the base of one role's offsets."""
    key = (device, dtype)
    w = _witnesses.get(key)
    if w is None:
        w = torch.zeros(_ALIGN, dtype=dtype, device=device)
        _witnesses[key] = w
    return w


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _upload(host: Tensor, device: torch.device) -> Tensor:
    """Copy a small host table to ``device`` without synchronizing the host.

    Normally a pinned, non-blocking copy.  While a CUDA graph is being captured (tables missing
    from the cache at capture time, e.g. gradients allocated inside the graph) it is written by
    one ``fill_`` per entry instead: slow, but legal in a capture, happens once, and the graph
    then holds the finished table.
    """
    if device.type != "cuda":
        return host.to(device)
    if torch.cuda.is_current_stream_capturing():
        out = torch.empty(host.shape, dtype=host.dtype, device=device)
        flat = out.view(-1)
        for i, value in enumerate(host.reshape(-1).tolist()):
            flat[i].fill_(value)
        return out
    return host.pin_memory().to(device, non_blocking=True)


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s elements exactly fill a span of memory (non-overlapping and dense)."""
    if t.is_contiguous():
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _offsets(tensors: Sequence[Tensor], base: Tensor, unit: int) -> list[int]:
    """Offsets of ``tensors`` from ``base`` in units of ``unit`` elements (0 for empty tensors)."""
    step = base.element_size() * unit
    b = base.data_ptr()
    out = []
    for t in tensors:
        if t.numel() == 0:
            out.append(0)
            continue
        diff = t.data_ptr() - b
        if diff % step:
            raise RuntimeError(f"tensor at address {t.data_ptr():#x} is not aligned to its element size")
        out.append(diff // step)
    return out


def _aligned(tensors: Sequence[Tensor]) -> bool:
    return all(t.data_ptr() % _ALIGN == 0 for t in tensors if t.numel())


@dataclass
class _Plan:
    """Device tables of one (params, states) list, reusable while the tensors stay where they are."""

    table: Tensor
    work: Tensor
    n_work: int
    aligned: bool
    units: tuple[int, ...]
    contiguous: bool
    shapes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    grads: OrderedDict = field(default_factory=OrderedDict)
    captured: bool = False


_MAX_PLANS = 64
_MAX_GRAD_TABLES = 4
_plans: OrderedDict[tuple, _Plan] = OrderedDict()
# Tables first built while a CUDA graph was being captured: their contents are written only when
# the graph replays, so eager steps must never use them; they stay alive as long as the graph may.
_capture_keepalive: list[Tensor] = []
_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every cached table.  Only call it when no captured CUDA graph will replay again."""
    with _lock:
        _plans.clear()
        _capture_keepalive.clear()


def _evict(cache: OrderedDict, limit: int) -> None:
    """Drop the oldest entries, never one that a CUDA graph may be reading."""
    while len(cache) > limit:
        for key, value in cache.items():
            captured = value.captured if isinstance(value, _Plan) else value[2]
            if not captured:
                del cache[key]
                break
        else:
            return


@dataclass
class Launch:
    """Everything a kernel launch needs, plus the write-backs of working copies."""

    table: Tensor
    gtab: Tensor
    work: Tensor
    n_work: int
    bases: tuple[Tensor, ...]  # param, grad, states... witnesses
    units: tuple[int, ...]  # same order as bases
    config: LaunchConfig
    round_bf16: bool
    write_back: list[tuple[Tensor, Tensor]]
    keep: list[Tensor] = field(default_factory=list)  # working copies the tables point into
    ncols: int = 0  # table columns
    amax_base: Tensor | None = None  # fp32 witness: base of the absmax offsets (8-bit state)
    lowp: "LowPrecision | None" = None

    @property
    def grid(self) -> tuple[int]:
        return (self.n_work,)

    def pointers(self) -> tuple[Tensor | None, ...]:
        """The kernels' leading arguments: table, work, gtab, the witnesses (param, grad, states...),
        the absmax witness and the key table (the table when the launch has none)."""
        ktab = self.lowp.ktab if self.lowp is not None else None
        return (self.table, self.work, self.gtab, *self.bases, self.amax_base,
                self.table if ktab is None else ktab)

    @property
    def k1(self) -> int:
        """The kernels' ``k1`` argument (:class:`LowPrecision`)."""
        return self.lowp.k1 if self.lowp is not None else 0

    def meta(self, *states: str) -> dict[str, Any]:
        """The constexprs of every kernel for state roles ``states`` (their suffixes, e.g. "M", "V"):
        ``NCOLS``, the units ``U_P``, ``U_G``, ``U_<state>``, ``SR``, ``Q8_<state>``, ``KEY_TABLE``, the
        tile and ``num_warps``."""
        lowp, cfg = self.lowp, self.config
        return dict(NCOLS=self.ncols, **{f"U_{r}": u for r, u in zip(("P", "G", *states), self.units)},
                    SR=lowp is not None and lowp.sr,
                    **{f"Q8_{s}": lowp is not None and lowp.q8[i] for i, s in enumerate(states)},
                    KEY_TABLE=lowp is not None and lowp.ktab is not None, BLOCK=cfg.block, CHUNK=cfg.chunk,
                    num_warps=cfg.num_warps)

    def finish(self) -> None:
        """Copy working copies back into the tensors they stand for (non-dense inputs only)."""
        for dst, src in self.write_back:
            dst.copy_(src)
        self.keep.clear()


def _check_lists(params: Sequence[Tensor], grads: Sequence[Tensor],
                 states: Sequence[Sequence[Tensor]], absmax: Sequence[Sequence[Tensor] | None] = ()) -> None:
    n = len(params)
    if len(grads) != n or any(len(s) != n for s in states):
        raise ValueError(f"Invalid tensor lists: lengths params={n}, grads={len(grads)}, "
                         f"states={[len(s) for s in states]} (must be equal)")
    device, pdt = params[0].device, params[0].dtype
    if pdt not in SUPPORTED_DTYPES:
        raise TypeError(f"the fused Triton kernels take float32/bfloat16/float16 parameters, got {pdt}; "
                        "use the foreach path (fused=False) for other dtypes")
    if device.type == "cpu":
        from . import interpreter_enabled

        if not interpreter_enabled():
            raise RuntimeError("the fused Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set "
                               "before triton is imported, for testing on CPU)")
    roles = [("params", params), ("grads", grads)] + [(f"states[{k}]", s) for k, s in enumerate(states)]
    for name, lst in roles:
        dt = lst[0].dtype
        for i, t in enumerate(lst):
            if t.is_sparse or t.layout != torch.strided:
                raise ValueError(f"Invalid {name}[{i}]: a {t.layout} tensor (the fused kernels take dense "
                                 "tensors)")
            if t.numel() and t.data_ptr() == 0:
                raise ValueError(f"Invalid {name}[{i}]: a {type(t).__name__} without storage (pass plain "
                                 "or local tensors)")
            if t.device != device:
                raise ValueError(f"Invalid {name}[{i}]: on {t.device}, params[0] is on {device}")
            if t.dtype != dt:
                raise ValueError(f"Invalid {name}[{i}]: dtype {t.dtype}, {name}[0] has {dt} (one dtype "
                                 "per role and launch)")
            if t.shape != params[i].shape:
                raise ValueError(f"Invalid {name}[{i}]: shape {tuple(t.shape)}, params[{i}] has "
                                 f"{tuple(params[i].shape)}")
    for k, s in enumerate(states):
        amax = absmax[k] if k < len(absmax) else None
        if amax is not None:
            if s[0].dtype != torch.uint8:
                raise TypeError(f"Invalid states[{k}] dtype {s[0].dtype}: 8-bit state (absmax given) is "
                                "uint8 codes")
            if len(amax) != n:
                raise ValueError(f"Invalid absmax[{k}]: {len(amax)} tensors for {n} parameters")
            for i, (a, t) in enumerate(zip(amax, s)):
                nb = -(-t.numel() // Q8_BLOCK)
                if (a.dtype != torch.float32 or a.device != device or not a.is_contiguous()
                        or a.numel() != nb or a.layout != torch.strided):
                    raise ValueError(f"Invalid absmax[{k}][{i}]: expected a contiguous float32 tensor of "
                                     f"{nb} elements on {device}, got {a.dtype} {tuple(a.shape)} on "
                                     f"{a.device}")
        elif not s[0].is_floating_point() or s[0].dtype == torch.float64:
            raise TypeError(f"Invalid states[{k}] dtype {s[0].dtype}: the fused kernels keep state in "
                            "float32 (or bfloat16/float16), or 8-bit codes with their absmax")


def _build_plan(params: Sequence[Tensor], states: Sequence[Sequence[Tensor]], config: LaunchConfig,
                lowp: "LowPrecision | None" = None) -> _Plan:
    device = params[0].device
    n = len(params)
    roles = [params, *states]
    aligned = all(_aligned(lst) for lst in roles)
    units = tuple((_ALIGN // lst[0].element_size()) if aligned else 1 for lst in roles)
    columns = [[t.numel() for t in params]]
    for lst, unit in zip(roles, units):
        columns.append(_offsets(lst, _witness(device, lst[0].dtype), unit))
    if lowp is not None and lowp.on:  # parameter index, element offset, absmax offsets (elements)
        columns.append(list(lowp.param_indices))
        columns.append(list(lowp.element_offsets))
        amax_base = _witness(device, torch.float32)
        for amax in lowp.absmax:
            columns.append([0] * n if amax is None else _offsets(amax, amax_base, 1))
    table = torch.tensor(columns, dtype=torch.int64).t().contiguous()
    counts = torch.tensor([-(-t.numel() // config.chunk) for t in params], dtype=torch.int64)
    n_work = int(counts.sum())
    tensor_ids = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), counts)
    firsts = torch.cumsum(counts, 0) - counts
    chunk_ids = torch.arange(n_work, dtype=torch.int64) - firsts[tensor_ids]
    work = torch.stack([tensor_ids, chunk_ids], dim=1).to(torch.int32).reshape(-1)
    return _Plan(table=_upload(table, device), work=_upload(work, device), n_work=n_work,
                 aligned=aligned, units=units, contiguous=all(t.is_contiguous() for t in params),
                 shapes=tuple(tuple(t.shape) for t in params), strides=tuple(t.stride() for t in params))


def _grad_table(plan: _Plan, grads: Sequence[Tensor], grad_ptrs: tuple[int, ...],
                capturing: bool) -> tuple[Tensor, int]:
    """The cached gradient offsets for these gradient buffers (built on a miss)."""
    key = (grads[0].dtype, grad_ptrs)
    entry = plan.grads.get(key)
    if entry is None:
        device = grads[0].device
        aligned = _aligned(grads)
        unit = _ALIGN // grads[0].element_size() if aligned else 1
        offs = torch.tensor(_offsets(grads, _witness(device, grads[0].dtype), unit), dtype=torch.int64)
        entry = [_upload(offs, device), unit, capturing]
        if capturing:
            _capture_keepalive.append(entry[0])
        else:
            plan.grads[key] = entry
            _evict(plan.grads, _MAX_GRAD_TABLES)
    elif capturing:
        entry[2] = True
    return entry[0], entry[1]


def _grads_match(plan: _Plan, grads: Sequence[Tensor]) -> bool:
    """Whether every gradient has its parameter's layout (so one linear walk covers both) and is
    16-byte aligned (one misaligned gradient would drop every gradient access to scalar width)."""
    if plan.contiguous:
        return all(map(Tensor.is_contiguous, grads)) and _aligned(grads)
    return all(g.stride() == s for g, s in zip(grads, plan.strides)) and _aligned(grads)


def prepare(params: Sequence[Tensor], grads: Sequence[Tensor],
            states: Sequence[Sequence[Tensor]], lowp: "LowPrecision | None" = None) -> Launch | None:
    """Tables and witnesses for one launch over ``params``/``grads``/``states`` (None: nothing to do);
    ``lowp``: the launch stores with stochastic rounding and/or 8-bit state (:func:`low_precision`).

    Fast path (cache hit): O(len(params)) pointer reads, no allocation, no device work.
    """
    if not params:
        return None
    device = params[0].device
    lowp = lowp if lowp is not None and lowp.on else None
    absmax = lowp.absmax if lowp is not None else ()
    config = launch_config(device, params[0].dtype, q8=lowp is not None and any(lowp.q8),
                           narrow_state=any(s[0].element_size() < 4 for s in states if s))
    capturing = _capturing(device)
    write_back: list[tuple[Tensor, Tensor]] = []
    try:
        ptrs = [tuple(map(Tensor.data_ptr, lst)) for lst in (params, grads, *states)]
    except RuntimeError:  # e.g. a sparse tensor: let the full check name it
        _check_lists(params, grads, states)
        raise
    if any(0 in p for p in ptrs):
        # A null pointer: an empty tensor, or a DTensor (FSDP2), whose data_ptr() is 0.  The kernels
        # update the local shards, which share the DTensors' storage.
        params, grads = _local(params), _local(grads)
        states = [_local(s) for s in states]
        ptrs = [tuple(map(Tensor.data_ptr, lst)) for lst in (params, grads, *states)]
    key = (device, params[0].dtype, tuple(s[0].dtype for s in states), config, ptrs[0], tuple(ptrs[2:]),
           tuple(map(Tensor.numel, params)))
    if lowp is not None:
        key += (lowp.param_indices, lowp.element_offsets,
                tuple(None if a is None else tuple(map(Tensor.data_ptr, a)) for a in absmax))
    if len(grads) != len(params):
        _check_lists(params, grads, states, absmax)
    plan = _plans.get(key)
    if plan is None:
        _check_lists(params, grads, states, absmax)
        params, states, write_back = _normalize(params, states, logical=lowp is not None)
        plan = _build_plan(params, states, config, lowp)
        if capturing:
            _capture_keepalive.extend((plan.table, plan.work))
        elif not write_back:
            with _lock:
                _plans[key] = plan
                _evict(_plans, _MAX_PLANS)
    elif capturing:
        plan.captured = True
    copied_grads = not _grads_match(plan, grads)
    if copied_grads:
        _check_lists(params, grads, states, absmax)
        grads = [g if g.stride() == p.stride() and _dense(g) and (not g.numel() or g.data_ptr() % _ALIGN == 0)
                 else torch.empty_strided(p.shape, p.stride(), dtype=g.dtype, device=device).copy_(g)
                 for g, p in zip(grads, params)]
        ptrs[1] = tuple(map(Tensor.data_ptr, grads))
    if plan.n_work == 0:
        return None
    gtab, gunit = _grad_table(plan, grads, ptrs[1], capturing)
    units = (plan.units[0], gunit, *plan.units[1:])
    bases = (_witness(device, params[0].dtype), _witness(device, grads[0].dtype),
             *(_witness(device, s[0].dtype) for s in states))
    return Launch(table=plan.table, gtab=gtab, work=plan.work, n_work=plan.n_work, bases=bases, units=units,
                  config=config, round_bf16=params[0].dtype == torch.bfloat16, write_back=write_back,
                  keep=list(grads) if copied_grads else [],
                  ncols=(2 + len(states)) * (2 if lowp is not None else 1),
                  amax_base=_witness(device, torch.float32), lowp=lowp)


def _local(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


def _normalize(params: Sequence[Tensor], states: Sequence[Sequence[Tensor]], logical: bool = False
               ) -> tuple[list[Tensor], list[list[Tensor]], list[tuple[Tensor, Tensor]]]:
    """Replace tensors the kernel cannot walk linearly by contiguous working copies (``logical``:
    every non-contiguous tensor, so that memory order is the row-major order the hash indexes)."""
    params, states = list(params), [list(s) for s in states]
    write_back: list[tuple[Tensor, Tensor]] = []
    for i, p in enumerate(params):
        group = [p] + [s[i] for s in states]
        if all(t.is_contiguous() for t in group):
            continue
        if not logical and _dense(p) and all(t.stride() == p.stride() for t in group):
            continue
        for lst in [params, *states]:
            t = lst[i]
            c = t.contiguous()
            if c is not t:
                write_back.append((t, c))
                lst[i] = c
    # A tensor that is not 16-byte aligned would make its whole role (every tensor of the launch)
    # use scalar accesses: it alone gets an aligned working copy (fresh allocations are aligned).
    for lst in [params, *states]:
        for i, t in enumerate(lst):
            if t.numel() and t.data_ptr() % _ALIGN:
                c = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
                write_back.append((t, c))
                lst[i] = c
    return params, states, write_back


@dataclass(frozen=True)
class LowPrecision:
    """The low-precision part of one launch (:func:`low_precision`)."""

    sr: bool  # stochastic rounding of bf16 parameters, bf16 state and 8-bit state
    q8: tuple[bool, ...]  # per state role: 8-bit codes + absmax
    absmax: tuple[tuple[Tensor, ...] | None, ...]  # per state role (None: a float role)
    param_indices: tuple[int, ...]
    element_offsets: tuple[int, ...]
    k1: int = 0  # int32 bits of hash(hash(seed) ^ step), the tensors' common step
    ktab: Tensor | None = None  # else per tensor (int64 table on the device)

    @property
    def on(self) -> bool:
        return self.sr or any(self.q8)


def _to_i32(x: int) -> int:
    return x - (1 << 32) if x >= 1 << 31 else x


def low_precision(params: Sequence[Tensor], state_steps: Sequence[Tensor], n_states: int, *,
                  sr_seed: int | None = None, param_indices: Sequence[int] | None = None,
                  absmax: Sequence[Sequence[Tensor] | None] | None = None,
                  element_offset: int | Sequence[int] = 0) -> LowPrecision | None:
    """The launchers' low-precision arguments as one :class:`LowPrecision` (None: none used).

    ``sr_seed``: round stochastically with the hash of :mod:`tigeropt._lowp` (None: to nearest);
    ``param_indices``: each parameter's index in the optimizer (the hash's parameter index; default
    0, 1, ...); ``absmax``: per state role, the absmax tensors of 8-bit codes (None for a float
    role); ``element_offset``: added to every element index (one int, or one per tensor: a DTensor
    shard's first global element).  ``state_steps`` are already incremented (the hash's step).
    """
    from .. import _lowp

    absmax = tuple(None if a is None else tuple(a) for a in (absmax or ()))
    absmax = absmax + (None,) * (n_states - len(absmax))
    q8 = tuple(a is not None for a in absmax)
    if sr_seed is None and not any(q8):
        return None
    n = len(params)
    indices = tuple(range(n)) if param_indices is None else tuple(int(i) for i in param_indices)
    offsets = (element_offset,) * n if isinstance(element_offset, int) else tuple(map(int, element_offset))
    if len(indices) != n or len(offsets) != n:
        raise ValueError(f"Invalid param_indices/element_offset: {len(indices)}/{len(offsets)} entries for "
                         f"{n} parameters")
    k1, ktab = 0, None
    if sr_seed is not None:
        seed = _lowp.hash32_int(int(sr_seed))
        steps = step_values(state_steps)
        if steps is None:  # step counts on the device: the keys by device ops (no host sync)
            t = torch.stack([s.reshape(()) for s in state_steps]).to(torch.int64) & _lowp.M32
            ktab = _lowp.hash32(t ^ seed)
        elif steps.count(steps[0]) == len(steps):
            k1 = _to_i32(_lowp.hash32_int(seed ^ (int(steps[0]) & _lowp.M32)))
        else:
            device = params[0].device
            ktab = _upload(torch.tensor([_lowp.hash32_int(seed ^ (int(s) & _lowp.M32)) for s in steps],
                                        dtype=torch.int64), device)
    return LowPrecision(sr=sr_seed is not None, q8=q8, absmax=absmax, param_indices=indices,
                        element_offsets=offsets, k1=k1, ktab=ktab)


def lr_argument(lr: float | Tensor, device: torch.device) -> tuple[float | Tensor, bool]:
    """(argument, is_pointer): an lr tensor on the parameters' device is read by the kernel."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Invalid lr: a tensor with {lr.numel()} elements (must hold one)")
        if lr.device == device:
            return (lr if lr.dtype == torch.float32 else lr.to(torch.float32)), True
        return float(lr.item()), False
    return float(lr), False


def step_values(state_steps: Sequence[Tensor]) -> list[float] | None:
    """Host values of the step counts (None when they live on a GPU: use device math instead)."""
    if state_steps[0].device.type != "cpu":
        return None
    return list(map(Tensor.item, state_steps))


def per_tensor_table(values: Sequence[Sequence[float]] | Sequence[float], device: torch.device) -> Tensor:
    """A float32 table of per-tensor scalars (one row per tensor) on ``device``, uploaded without a sync."""
    return _upload(torch.tensor(values, dtype=torch.float32), device)


def check_not_capturing_host_steps(device: torch.device, what: str) -> None:
    if _capturing(device):
        raise RuntimeError(f"{what}: the step counts are on the host, so a CUDA graph would freeze this "
                           "step's scalars; keep the step counts on the device to capture the step")


# ------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _work_item(work, table, NCOLS: tl.constexpr, CHUNK: tl.constexpr):
    """(tensor index, table row, chunk start, elements in this chunk) of this program."""
    pid = tl.program_id(0)
    t = tl.load(work + 2 * pid).to(tl.int64)
    c = tl.load(work + 2 * pid + 1).to(tl.int64)
    row = table + t * NCOLS
    numel = tl.load(row)
    start = c * CHUNK
    n = (tl.minimum(numel - start, CHUNK)).to(tl.int32)
    return t, row, start, n


@triton.jit
def _tensor_ptr(base, offset, UNIT: tl.constexpr, start):
    """Pointer to element ``start`` of a tensor ``offset * UNIT`` elements away from ``base``.

    Multiplying by the constexpr UNIT (16 bytes' worth of elements when aligned) is what tells
    the compiler that the address is 16-byte aligned, so full blocks use vector accesses.
    """
    return base + (offset * UNIT + start)


@triton.jit
def _lr_value(lr, LR_PTR: tl.constexpr):
    if LR_PTR:
        value = tl.load(lr).to(tl.float32)
    else:
        value = lr
    return value


@triton.jit
def _decay_value(lr_v, wd, decay, LR_PTR: tl.constexpr):
    """1 - lr*wd: from an lr tensor's value, else the host's ``decay`` (computed in float64, as the
    reference does)."""
    if LR_PTR:
        value = 1.0 - lr_v * wd
    else:
        value = decay
    return value


@triton.jit
def _ld(ptr, offs, n, MASKED: tl.constexpr):
    """Load a block as float32 (the tail block masked)."""
    if MASKED:
        x = tl.load(ptr + offs, mask=offs < n, other=0.0)
    else:
        x = tl.load(ptr + offs)
    return x.to(tl.float32)


@triton.jit
def _to_bf16(x):
    """float32 -> bfloat16 rounded to nearest, ties to even, NaN kept: torch's ``copy_`` rounding.

    Done on the bits (the upper half of the rounded float32 is the bfloat16), so the result does
    not depend on how a Triton version, or its interpreter, converts float32 to bfloat16.
    """
    bits = x.to(tl.int32, bitcast=True)
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))
    rounded = tl.where(x == x, rounded, bits | 0x400000)  # NaN: keep it (quiet), never round to inf
    return (rounded >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _st(ptr, offs, x, n, MASKED: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Store a float32 block into ``ptr``'s dtype, rounding once (the tail block masked)."""
    if ROUND_BF16:
        y = _to_bf16(x)
    else:
        y = x.to(ptr.dtype.element_ty)
    if MASKED:
        tl.store(ptr + offs, y, mask=offs < n)
    else:
        tl.store(ptr + offs, y)


@triton.jit
def _sign(x):
    """sign(x): -1, 0 or 1, NaN for an inf/NaN x: tigeropt._base.nan_sign, ``sign(x) + 0*x``, bit for
    bit (torch.sign(-0.0) is +0.0, and the sum keeps a NaN's sign)."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)) + x * 0.0


# ------------------------------------------------------------------------------ low-precision helpers
@triton.jit
def _lowbias32(x):
    """Chris Wellons' lowbias32 on uint32 (tigeropt._lowp.hash32)."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _element_bits(key, e0, offs):
    """32 random bits of elements ``e0 + offs`` (e0: int64 scalar) under ``key``
    (tigeropt._lowp.element_bits: ``h(lo ^ h(key ^ hi))``), the 64-bit index as 32-bit halves with
    a carry."""
    e0_lo = (e0 & 0xFFFFFFFF).to(tl.uint32)
    lo = e0_lo + offs.to(tl.uint32)
    hi = (e0 >> 32).to(tl.uint32) + (lo < e0_lo).to(tl.uint32)
    return _lowbias32(lo ^ _lowbias32(key ^ hi))


@triton.jit
def _lowp_item(ktab, k1, t, row, start, K: tl.constexpr, SR: tl.constexpr,
               KEY_TABLE: tl.constexpr, LOWP: tl.constexpr):
    """(first element index, per-tensor key) of this program: the table's lowp columns (after the
    K state offsets: parameter index, element offset) and ``hash(k1 ^ parameter index)``, with
    k1 = hash(hash(seed) ^ step) the launch's argument or, per tensor, ``ktab[t]``.  Without
    ``LOWP`` (no stochastic rounding, no 8-bit state: no lowp columns) ``(start, 0)``."""
    if LOWP:
        e0 = tl.load(row + 3 + K) + start
    else:
        e0 = start
    if SR:
        if KEY_TABLE:
            k = tl.load(ktab + t).to(tl.uint32)
        else:
            k = k1.to(tl.uint32, bitcast=True)
        kt = _lowbias32(k ^ tl.load(row + 2 + K).to(tl.uint32))
    else:
        kt = tl.full((), 0, tl.uint32)
    return e0, kt


@triton.jit
def _absmax_ptr(a_base, row, COL: tl.constexpr, start, Q8: tl.constexpr):
    """The absmax of this program's first 256-element block of an 8-bit state whose absmax offset is
    in table column ``COL``; ``a_base`` (unused) for a float state."""
    if Q8:
        ptr = a_base + tl.load(row + COL) + start // 256
    else:
        ptr = a_base
    return ptr


@triton.jit
def _stream_key(kt, stream: tl.constexpr):
    """The key of one stream (0: the parameter, 1 + i: state i) of a tensor: _lowp.key32."""
    return _lowbias32(kt ^ stream)


@triton.jit
def _sr_bf16(x, r):
    """float32 -> bfloat16 rounded stochastically: (bits of x + 16 random bits r) >> 16, NaN ->
    0x7fc0 (tigeropt._lowp.round_bf16)."""
    hi = (x.to(tl.uint32, bitcast=True) + r) >> 16
    hi = tl.where(x == x, hi, tl.full(hi.shape, 0x7FC0, tl.uint32))
    return hi.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _st_lowp(ptr, offs, x, n, kt, STREAM: tl.constexpr, e0, SR: tl.constexpr, MASKED: tl.constexpr):
    """Store a float32 block of stream ``STREAM`` (0: the parameter, 1 + i: state i) of a tensor
    (stream keys from ``kt``) into ``ptr``'s dtype: bfloat16 rounded to nearest (:func:`_to_bf16`)
    or, with SR, stochastically (element indices ``e0 + offs``; tigeropt._lowp.sr_key: stream 1
    takes the low 16 bits of stream 0's hash, the others the high 16 bits of their own); other
    dtypes by a cast."""
    if ptr.dtype.element_ty == tl.bfloat16:
        if SR:
            if STREAM == 1:
                r = _element_bits(_stream_key(kt, 0), e0, offs) & 0xFFFF
            else:
                r = _element_bits(_stream_key(kt, STREAM), e0, offs) >> 16
            y = _sr_bf16(x, r)
        else:
            y = _to_bf16(x)
    else:
        y = x.to(ptr.dtype.element_ty)
    if MASKED:
        tl.store(ptr + offs, y, mask=offs < n)
    else:
        tl.store(ptr + offs, y)


@triton.jit
def _q8_offsets(i, BLOCK: tl.constexpr, Q8: tl.constexpr):
    """(element offsets, block rows) of inner step ``i``: the tile as [BLOCK // 256, 256] with 8-bit
    state (rows: the 256-element blocks' indices in the chunk), else flat (rows unused)."""
    if Q8:
        rows = i * (BLOCK // 256) + tl.arange(0, BLOCK // 256)
        offs = rows[:, None] * 256 + tl.arange(0, 256)[None, :]
    else:
        rows = i
        offs = i * BLOCK + tl.arange(0, BLOCK)
    return offs, rows


@triton.jit
def _ld_q8(cp, ap, offs, rows, n, MASKED: tl.constexpr):
    """Decode a [R, 256] tile of e4m3 codes with their blocks' absmax (tigeropt._lowp.decode_8bit)."""
    if MASKED:
        c = tl.load(cp + offs, mask=offs < n, other=0)
        amax = tl.load(ap + rows, mask=rows * 256 < n, other=0.0)
    else:
        c = tl.load(cp + offs)
        amax = tl.load(ap + rows)
    c = c.to(tl.int32)
    e = (c >> 3) & 15
    mant = c & 7
    q = tl.where(e == 0, mant, mant + 8).to(tl.float32)
    v = q * ((tl.maximum(e, 1) + 117) << 23).to(tl.float32, bitcast=True)  # * 2^(max(e, 1) - 10)
    v = tl.where((c & 0x80) != 0, -v, v)
    nan = (((c & 0x80) << 24) | 0x7FF00000).to(tl.float32, bitcast=True)  # torch's e4m3 NaN, signed
    v = tl.where((c & 0x7F) == 0x7F, nan, v)
    scale = tl.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    return v * scale[:, None]


@triton.jit
def _st_q8(cp, ap, offs, rows, x, n, key, e0, SR: tl.constexpr, MASKED: tl.constexpr):
    """Encode a [R, 256] float32 tile as e4m3 codes + one absmax per row (tigeropt._lowp.encode_8bit:
    rounded to nearest, ties to even, or with SR up with probability the discarded fraction)."""
    a = tl.abs(x)
    finite = a < float("inf")  # False for inf and NaN
    a = tl.where(finite, a, 0.0)
    if MASKED:
        a = tl.where(offs < n, a, 0.0)
    amax = tl.max(a, axis=1)
    scale = tl.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    y = tl.div_rn(a, tl.where(scale > 0, scale, 1.0)[:, None])
    y = tl.minimum(y, 448.0)
    ex = tl.maximum((y.to(tl.int32, bitcast=True) >> 23) - 127, -6)  # e4m3's exponent (subnormals: -6)
    t = y * ((130 - ex) << 23).to(tl.float32, bitcast=True)  # y / 2^(ex - 3): units of the spacing
    fl = tl.floor(t)
    frac = t - fl
    k = fl.to(tl.int32)
    if SR:
        r = (_element_bits(key, e0, offs) >> 8).to(tl.float32) * 5.9604644775390625e-08  # * 2^-24
        up = frac > r
    else:
        up = (frac > 0.5) | ((frac == 0.5) & ((k & 1) == 1))
    code = (ex + 6) * 8 + k + up.to(tl.int32)  # exponent field * 8 + mantissa, carries included
    code = tl.where(finite, code, 0x7F) | ((x.to(tl.int32, bitcast=True) >> 24) & 0x80)
    amax = scale * 448.0  # tigeropt._lowp.stored_absmax: what the largest code decodes to
    if MASKED:
        tl.store(cp + offs, code.to(tl.uint8), mask=offs < n)
        tl.store(ap + rows, amax, mask=rows * 256 < n)
    else:
        tl.store(cp + offs, code.to(tl.uint8))
        tl.store(ap + rows, amax)


@triton.jit
def _ld_state(ptr, ap, offs, rows, n, Q8: tl.constexpr, MASKED: tl.constexpr):
    """A state block as float32: decoded 8-bit codes, or a float load."""
    if Q8:
        x = _ld_q8(ptr, ap, offs, rows, n, MASKED)
    else:
        x = _ld(ptr, offs, n, MASKED)
    return x


@triton.jit
def _st_state(ptr, ap, offs, rows, x, n, kt, STREAM: tl.constexpr, e0, SR: tl.constexpr, Q8: tl.constexpr,
              MASKED: tl.constexpr):
    """Store a float32 state block of stream ``STREAM``: 8-bit encoded (the high 24 bits of the
    stream's hash), or float (bf16 rounded, stochastically with SR: :func:`_st_lowp`)."""
    if Q8:
        _st_q8(ptr, ap, offs, rows, x, n, _stream_key(kt, STREAM), e0, SR, MASKED)
    else:
        _st_lowp(ptr, offs, x, n, kt, STREAM, e0, SR, MASKED)
