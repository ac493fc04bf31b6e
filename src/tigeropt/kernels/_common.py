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
"""

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["LaunchConfig", "launch_config", "use_launch_config", "Launch", "prepare", "lr_argument",
           "step_values", "per_tensor_table", "check_not_capturing_host_steps", "SUPPORTED_DTYPES",
           "clear_cache"]

#: Parameter dtypes the kernels take (math is always fp32; state is fp32).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
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
# Interpreter (tests on CPU): small tiles so that little tensors still span several programs.
_INTERPRETER_CONFIG = LaunchConfig(block=128, chunk=512, num_warps=4)
_override: LaunchConfig | None = None


def launch_config(device: torch.device, dtype: torch.dtype = torch.float32) -> LaunchConfig:
    """The fixed tile sizes for ``device`` and parameter ``dtype`` (no autotuning on live parameters)."""
    if _override is not None:
        return _override
    if device.type == "cuda":
        return _CUDA_CONFIGS.get(dtype, _CUDA_CONFIG)
    return _INTERPRETER_CONFIG


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

    @property
    def grid(self) -> tuple[int]:
        return (self.n_work,)

    def finish(self) -> None:
        """Copy working copies back into the tensors they stand for (non-dense inputs only)."""
        for dst, src in self.write_back:
            dst.copy_(src)
        self.keep.clear()


def _check_lists(params: Sequence[Tensor], grads: Sequence[Tensor],
                 states: Sequence[Sequence[Tensor]]) -> None:
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
        if not s[0].is_floating_point() or s[0].dtype == torch.float64:
            raise TypeError(f"Invalid states[{k}] dtype {s[0].dtype}: the fused kernels keep state in "
                            "float32 (or bfloat16/float16)")


def _build_plan(params: Sequence[Tensor], states: Sequence[Sequence[Tensor]], config: LaunchConfig) -> _Plan:
    device = params[0].device
    n = len(params)
    roles = [params, *states]
    aligned = all(_aligned(lst) for lst in roles)
    units = tuple((_ALIGN // lst[0].element_size()) if aligned else 1 for lst in roles)
    columns = [[t.numel() for t in params]]
    for lst, unit in zip(roles, units):
        columns.append(_offsets(lst, _witness(device, lst[0].dtype), unit))
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
            states: Sequence[Sequence[Tensor]]) -> Launch | None:
    """Tables and witnesses for one launch over ``params``/``grads``/``states`` (None: nothing to do).

    Fast path (cache hit): O(len(params)) pointer reads, no allocation, no device work.
    """
    if not params:
        return None
    device = params[0].device
    config = launch_config(device, params[0].dtype)
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
    if len(grads) != len(params):
        _check_lists(params, grads, states)
    plan = _plans.get(key)
    if plan is None:
        _check_lists(params, grads, states)
        params, states, write_back = _normalize(params, states)
        plan = _build_plan(params, states, config)
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
        _check_lists(params, grads, states)
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
                  keep=list(grads) if copied_grads else [])


def _local(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


def _normalize(params: Sequence[Tensor], states: Sequence[Sequence[Tensor]]
               ) -> tuple[list[Tensor], list[list[Tensor]], list[tuple[Tensor, Tensor]]]:
    """Replace tensors the kernel cannot walk linearly by contiguous working copies."""
    params, states = list(params), [list(s) for s in states]
    write_back: list[tuple[Tensor, Tensor]] = []
    for i, p in enumerate(params):
        group = [p] + [s[i] for s in states]
        if all(t.is_contiguous() for t in group):
            continue
        if _dense(p) and all(t.stride() == p.stride() for t in group):
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
    """sign(x): -1, 0 or 1, NaN for an inf/NaN x (tigeropt._base.nan_sign: sign(x) + 0*x)."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x)) + x * 0.0
