"""The machinery every tigeropt optimizer shares.

An optimizer module only states its hyperparameters, its state and its update
rule (a plain single-tensor *reference*, a *foreach* twin, and optionally the
name of a fused kernel).  :class:`TigerOptimizer` owns everything else:

* hyperparameter validation helpers (``ValueError`` naming argument and value);
* lazy state initialisation with torch's key names (``step`` + the optimizer's
  state keys), state kept in fp32 for bf16/fp16 parameters;
* complex parameters through :func:`torch.view_as_real`, as torch.optim does;
* grouping of tensors by device and dtype, and the choice of path
  (``reference`` / ``foreach`` / ``fused`` Triton / ``cpu`` fused C kernel);
* sparse gradients and ``lazy=True`` groups: only the touched rows (a non-zero
  gradient, :func:`touched_rows`) change, through the fused C/Triton row kernels,
  or on the reference path by gathering the rows, updating and scattering them back;
* cached step plans (buckets, launchers, pointer tables) reused while the
  parameter set, state and flags are unchanged;
* the non-finite gradient policy (``on_nonfinite``);
* one validation routine (``_validate``) for the constructor, ``add_param_group``
  and ``load_state_dict``, which checks a checkpoint completely (class, state
  keys and shapes, hyperparameters) before changing anything and keeps
  ``foreach``/``fused``/``capturable`` the loading optimizer's.

Shared flag documentation (every optimizer accepts these keyword arguments):

    maximize (bool): maximize the objective instead of minimizing it.
    foreach (bool | None): use the multi-tensor (``torch._foreach_*``) path.
    fused (bool | None): ``True`` runs the fused Triton kernels (CUDA, or CPU
        under ``TRITON_INTERPRET=1``).  ``None`` (default) picks the fastest
        path available: Triton on CUDA, the fused C kernel on CPU, else foreach.
        ``foreach=False`` with ``fused`` unset selects the plain reference path.
    capturable (bool): keep the step count on the parameters' device so the
        fused CUDA step can be captured in a CUDA graph (Triton path only).
    on_nonfinite ("ignore" | "skip" | "raise"): what to do when a group's
        gradients hold inf/NaN. "skip" leaves parameters, state and step count
        untouched for that group; "raise" raises ``FloatingPointError`` before any
        group of the optimizer changes. The check costs one reduction and one host
        sync per group and step.
    state_precision (None | "fp32" | "bf16" | "8bit"): how the state tensors are
        stored (math is fp32, or fp64 for fp64 parameters).  None: fp32 for bf16/fp16
        parameters, the parameter's dtype otherwise.  "bf16": rounded once per step at
        the store.  "8bit": block-scaled fp8 e4m3 codes, 256-element blocks with one
        fp32 absmax each (state ``<key>`` uint8 codes of the state's shape, plus
        ``<key>_absmax``; see :mod:`tigeropt._lowp`) for the keys in ``state_8bit_keys``
        (signed momenta), bf16 for the others (AdaX's exp_avg_sq, Adagrad's sum).  A checkpoint loads into any
        precision: fp32/bf16 state is quantized into "8bit", 8-bit state decoded into
        fp32/bf16 (rounded to nearest); the same precision loads bit-exactly.
    stochastic_rounding (bool): bf16 parameters, bf16 state and 8-bit state are rounded
        stochastically from the fp32 result (expected value exact), with bits from a
        counter-based hash of (sr_seed, step, parameter index, element index).  With
        neither bf16 parameters nor low-precision state it has no effect: a warning says so.
        fp16 parameters are refused (ValueError).
    sr_seed (int): seed of the rounding hash, in [0, 2^32) (saved in the state_dict).
    Groups with low-precision state or stochastic rounding: on CPU the default path
    (``fused=None``) runs the whole step in the fused C kernel, one pass (load, fp32 math,
    rounded stores: :func:`tigeropt._cpu.lowp_step`); on CUDA the default path, and
    ``fused=True`` (on CPU under ``TRITON_INTERPRET=1``), run it in the Triton step kernels'
    low-precision variants, one pass too (not ``capturable=True``); ``foreach=False``/``True``
    run the reference/foreach math on working copies with the stores of :mod:`tigeropt._lowp`,
    and so do tensors and options the kernels do not take (on CUDA the rounding then runs in
    Triton); all bit for bit the same (float32 sqrt correctly rounded on every path:
    :func:`tigeropt._math.sqrt_rn`, torch's CPU sqrt is not).  Lazy rows and sparse
    gradients take bf16 state and stochastic rounding (the rows' element indices in the whole
    tensor key the hash, so touching every row equals the dense step), and 8-bit state whose
    256-element blocks each lie inside one row (rows of a multiple of 256 elements, or one row;
    other shapes in a lazy 8-bit group: ValueError): untouched rows keep codes and absmax bit
    for bit.  Complex parameters are refused.  DTensor parameters sharded along dim 0 (FSDP2)
    or replicated take them all: global element indices key the hash, the 8-bit blocks are the
    whole tensor's (absmax replicated, blocks split between shards all-reduced), so sharding
    changes no bit.
"""

from __future__ import annotations

import functools
import itertools
import operator
import sys
import warnings
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _lowp, kernels
from ._ops import compiling
from ._validate import check, check_bool, check_choice, check_lr, check_optional_bool, check_ordered_params

# DTensor (FSDP2, tensor parallel) is looked up, never imported: importing torch.distributed.tensor costs
# about half a second, and while nobody has imported it no tensor can be a DTensor.
_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")  # public since torch 2.5


def _dtensor_module() -> Any:
    """The module defining DTensor if someone imported it (else None: no DTensor can exist)."""
    for name in _DTENSOR_MODULES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "DTensor"):
            return module
    return None


__all__ = ["TigerOptimizer", "Impl", "check", "check_lr", "global_bool", "nan_sign", "to_float",
           "state_dtype",
           "working", "write_back", "touched_rows", "sparse_rows_out_of_range",
           "check_sparse_rows"]

Impl = Callable[..., None]
LOW_PRECISION = (torch.bfloat16, torch.float16)
_NONFINITE = ("ignore", "skip", "raise")
#: How the model runs here, not part of the trajectory: a checkpoint's values never override these.
EXECUTION_FLAGS = ("foreach", "fused", "capturable")
#: Options every tigeropt optimizer takes besides its hyperparameters.
COMMON_OPTIONS = ("maximize", "foreach", "fused", "on_nonfinite", "capturable", "lazy", "state_precision",
                  "stochastic_rounding", "sr_seed")
#: Options a checkpoint never overrides: the execution flags and the state precision (a checkpoint
#: of another precision is converted on load).
LOADER_OPTIONS = (*EXECUTION_FLAGS, "state_precision")
STATE_PRECISIONS = ("fp32", "bf16", "8bit")
#: parameter dtypes the Triton kernels take (math in fp32); fp64 stays on the foreach path.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: (optimizer class, path) -> fused launcher (a plain dict: cheap, and traceable by Dynamo).
_FUSED_IMPLS: dict[tuple[type, str], Impl] = {}


def nan_sign(x: Tensor) -> Tensor:
    """``sign(x)``, but NaN where ``x`` is inf or NaN (torch.sign gives 0 for NaN on CPU and +-1 for inf).

    The sign optimizers use it so that a non-finite gradient reaches the parameter visibly, as it
    does with AdamW (``inf/inf``), instead of silently freezing the element: ``sign(x) + 0*x``.
    """
    return torch.sign(x).add_(x, alpha=0.0)


def to_float(x: float | Tensor) -> float:
    """A Python float from a number or a one-element tensor (lr may be a tensor)."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Optimizer state dtype: fp32 for bf16/fp16 parameters, else the parameter's dtype."""
    return torch.float32 if param_dtype in LOW_PRECISION else param_dtype


class TigerOptimizer(Optimizer):
    """Base class: subclasses set the class attributes below and implement ``_hyper``."""

    #: Names of the per-parameter state tensors, in the order the impls take them.
    state_keys: ClassVar[tuple[str, ...]] = ()
    #: Plain per-tensor loop written from the equations: the ground truth.
    reference_impl: ClassVar[Impl]
    #: Multi-tensor twin of the reference (``torch._foreach_*``).
    foreach_impl: ClassVar[Impl]
    #: Name of the kernel family in :mod:`tigeropt.kernels` (None: no fused path).
    kernel: ClassVar[str | None] = None
    #: Whether sparse gradients are accepted without ``lazy=True``.
    supports_sparse: ClassVar[bool] = False
    #: State keys stored as 8-bit codes under ``state_precision="8bit"`` (None: all); the others are
    #: stored in bf16 there (non-negative second moments: see benchmarks/bench_8bit_maps.py).
    state_8bit_keys: ClassVar[tuple[str, ...] | None] = None

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        on_nonfinite: str = "ignore",
        capturable: bool = False,
        state_precision: str | None = None,
        stochastic_rounding: bool = False,
        sr_seed: int = 0,
    ) -> None:
        defaults = dict(defaults, maximize=maximize, foreach=foreach, fused=fused,
                        on_nonfinite=on_nonfinite, capturable=capturable, lazy=defaults.get("lazy", False),
                        state_precision=state_precision, stochastic_rounding=stochastic_rounding,
                        sr_seed=sr_seed)
        self._validate({**defaults, "params": []})  # bad arguments fail here even with no parameters
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._drop_plans()
        for group in self.param_groups:
            for key, value in (("maximize", False), ("foreach", None), ("fused", None),
                               ("on_nonfinite", "ignore"), ("lazy", False), ("capturable", False),
                               ("state_precision", None), ("stochastic_rounding", False), ("sr_seed", 0)):
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, with the group's options validated *before* it is added:
        a rejected group leaves ``param_groups`` as it was."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        check_ordered_params(params)
        if params is not None and not isinstance(params, (Tensor, list)):
            param_group["params"] = params = list(params)  # a generator is read once, here
        candidate = {**self.defaults, **param_group}
        if isinstance(params, Tensor):
            candidate["params"] = [params]
        listed = candidate.get("params") or []
        if len({id(p) for p in listed}) != len(listed):
            # torch.optim only warns; here one tensor would be stepped twice per step (and the fused
            # C step would update it from two threads at once)
            raise ValueError("Invalid params: the same tensor appears twice in one param group")
        self._validate(candidate)
        self._drop_plans()
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group.get("fused"):
            try:
                self._check_fused_devices(group)
            except Exception:
                self.param_groups.pop()
                raise

    def _validate(self, group: dict[str, Any]) -> None:
        """The one validation routine: constructor, ``add_param_group`` and ``load_state_dict``."""
        check_bool("maximize", group["maximize"])
        check_optional_bool("foreach", group["foreach"])
        check_optional_bool("fused", group["fused"])
        check_bool("capturable", group["capturable"])
        check_bool("lazy", group["lazy"])
        check_choice("on_nonfinite", group["on_nonfinite"], _NONFINITE)
        self._validate_precision(group)
        self._validate_group(group)
        fused, foreach, capturable = group["fused"], group["foreach"], group["capturable"]
        if fused and foreach:
            raise ValueError("fused=True and foreach=True cannot both be set")
        if capturable and (fused is False or foreach):
            raise ValueError("capturable=True needs the fused Triton path (leave fused unset or True)")
        if (fused or capturable) and not (self._fused_ok(group) or (fused and not capturable
                                                                  and self._lowp_fused_ok(group))):
            raise ValueError(f"{type(self).__name__}(fused=True or capturable=True) does not support the "
                             f"options this group uses "
                             f"({self._unfused_options(group) or _lp_options(group)}); leave fused unset "
                             "(the default path runs them: "
                             + ("the foreach path)" if self._unfused_options(group)
                                else "the fused C step on CPU, the Triton kernels on CUDA)"))
        if fused and (self.kernel is None or not kernels.triton_usable()):
            why = kernels.triton_status() if self.kernel else "this optimizer has no fused kernel"
            raise RuntimeError(f"{type(self).__name__}(fused=True) is not available: {why}")

    def _validate_precision(self, group: dict[str, Any]) -> None:
        """state_precision, stochastic_rounding and sr_seed of a group (part of ``_validate``)."""
        precision = group.get("state_precision")
        if precision is not None:
            check_choice("state_precision", precision, STATE_PRECISIONS)
        sr = group.get("stochastic_rounding", False)
        check_bool("stochastic_rounding", sr)
        seed = group.get("sr_seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
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
        if sr and params:
            if any(p.dtype == torch.float16 for p in params):
                raise ValueError("Invalid stochastic_rounding: True (rounds to bf16; this group holds fp16 "
                                 "parameters: use bf16 parameters or stochastic_rounding=False)")
            if precision not in ("bf16", "8bit") and not any(p.dtype == torch.bfloat16 for p in params):
                warnings.warn("stochastic_rounding=True has no effect in this group: it rounds bf16 "
                              "parameters and bf16/8bit state, and the group has neither", stacklevel=4)

    # ----------------------------------------------------------------- hooks for subclasses
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check a group's hyperparameters (called for every group, also added ones)."""

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of the impls for this group."""
        raise NotImplementedError

    def _state_shape(self, key: str, p: Tensor, group: dict[str, Any]) -> tuple[int, ...]:
        """Shape of state tensor ``key`` of ``p`` in ``group`` (the parameter's shape unless the
        optimizer says otherwise, e.g. row-wise Adagrad's ``(rows,)``).  ``_init_state`` creates it
        and ``load_state_dict`` checks a checkpoint against it."""
        return tuple(p.shape)

    def _initial_value(self, key: str, group: dict[str, Any]) -> float:
        """Starting value of state tensor ``key`` (0 unless the optimizer says otherwise)."""
        return 0.0

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """Fresh state for ``p``: the step count and one tensor per state key."""
        device = p.device if group["capturable"] else "cpu"
        state = {"step": torch.tensor(0.0, dtype=_scalar_dtype(), device=device)}
        precision = group.get("state_precision")
        if precision is not None or group.get("stochastic_rounding"):
            _check_low_precision_param(type(self).__name__, p, group)
        for key in self.state_keys:
            shape = self._state_shape(key, p, group)
            value = self._initial_value(key, group)
            key_precision = self._key_precision(key, precision)
            if key_precision == "8bit" and _is_dtensor(p) and shape == tuple(p.shape):
                state[key], state[key + "_absmax"] = _init_8bit_sharded(p, value)
                continue
            if key_precision == "8bit":
                full = torch.full(shape, value, dtype=torch.float32, device=p.device)
                state[key], state[key + "_absmax"] = _lowp.encode_8bit(full)
                continue
            dtype = _storage_dtype(p, key_precision)
            if shape == tuple(p.shape):
                t = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            else:
                t = torch.zeros(shape, dtype=dtype, device=p.device)
            if value != 0.0:  # complex: both components of view_as_real start at value
                (torch.view_as_real(t) if t.is_complex() else t).fill_(value)
            state[key] = t
        return state

    def _key_precision(self, key: str, precision: str | None) -> str | None:
        """How state ``key`` is stored under the group's ``state_precision``."""
        if precision == "8bit" and self.state_8bit_keys is not None and key not in self.state_8bit_keys:
            return "bf16"
        return precision

    def _fused_ok(self, group: dict[str, Any]) -> bool:
        """Whether the fused kernels implement every option this group uses."""
        return not self._unfused_options(group) and not _lp_options(group)

    def _unfused_options(self, group: dict[str, Any]) -> str:
        """The options of this group the fused kernels do not implement ('' if none)."""
        return ""

    def _lowp_fused_ok(self, group: dict[str, Any]) -> bool:
        """Whether the Triton kernels' low-precision variants run this group's low-precision options
        (:meth:`_step_lowp_triton`; not with capturable=True: the rounding keys follow the host's
        step counts)."""
        return (self.kernel is not None and bool(_lp_options(group)) and not self._unfused_options(group)
                and not group["capturable"])

    # ----------------------------------------------------------------- path choice
    def _check_fused_devices(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            if p.device.type == "cpu" and not kernels.interpreter_enabled():
                raise RuntimeError(
                    f"{type(self).__name__}(fused=True) runs Triton kernels, which need a CUDA device "
                    "(or TRITON_INTERPRET=1 for testing on CPU); leave fused=None to get the fused "
                    "C kernel on CPU.")

    def _path(self, group: dict[str, Any], device: torch.device, dtype: torch.dtype) -> str:
        fused_ok = self._fused_ok(group)
        if not fused_ok and (device.type == "cuda" or group["fused"]) and self._lowp_fused_ok(group):
            fused_ok = True  # the Triton kernels' low-precision variants (the C step: its own routing)
        return _choose_path(type(self).__name__, self.kernel, group["fused"], group["foreach"],
                            group["capturable"], fused_ok, device, dtype)

    def _impl(self, path: str) -> Impl:
        if path == "reference":
            return type(self).reference_impl
        if path == "foreach":
            return type(self).foreach_impl
        assert self.kernel is not None
        key = (type(self), path)
        impl = _FUSED_IMPLS.get(key)
        if impl is None:
            impl = kernels.get_impl(self.kernel, path)
            if path == "cpu":  # the C step hands what it cannot take to the path the base chooses
                impl = functools.partial(impl, fallback=type(self).foreach_impl)
            _FUSED_IMPLS[key] = impl
        return impl

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (``closure`` re-evaluates the loss, as in torch.optim)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = None if compiling() else self._valid_plans()
        # sparse gradients are checked before any group changes (a planned group has dense gradients
        # unless its plan falls back below: that group is checked then)
        self._check_sparse_grads([g for i, g in enumerate(self.param_groups) if not (plans and i in plans)])
        self._check_nonfinite_raise()
        for i, group in enumerate(self.param_groups):
            plan = plans.get(i) if plans else None
            if plan is None:
                self._step_group(group, i if plans is not None else None)
            elif not self._step_planned(group, plan):
                self._check_sparse_grads([group])
                self._step_group(group, i)
        if plans is not None:
            self._snapshot_state()
        return loss

    # ----------------------------------------------------------------- cached step plans
    # A group's plan holds what the step loop would otherwise rebuild every step: the buckets of
    # (params, states, step counts) per (device, dtype), their paths and launchers, and for the
    # fused C step its pointer tables.  Per step a planned group only reads the gradients.  A plan
    # is dropped by add_param_group, load_state_dict and __setstate__, and rebuilt whenever a check
    # fails: another parameter object in the group, a parameter's storage moved (p.data replaced,
    # dtype or device changed), a gradient missing or sparse, state created or replaced, group flags
    # changed.  Lazy, complex, DTensor and compiled steps are never planned.

    def _drop_plans(self) -> None:
        self._plans: dict[int, _GroupPlan] = {}
        self._state_snapshot: list[Any] | None = None

    def _valid_plans(self) -> dict[int, _GroupPlan]:
        plans = getattr(self, "_plans", None)
        if plans is None:
            self._drop_plans()
            return self._plans
        if plans:
            snap = self._state_snapshot
            state = self.state
            if snap is None or len(state) != len(snap) or not all(map(_is, state.values(), snap)):
                plans.clear()  # state created, replaced or dropped since the plans were built
                self._state_snapshot = None  # the plans rebuilt this step take a new snapshot
        return plans

    def _snapshot_state(self) -> None:
        if self._plans:
            snap = self._state_snapshot
            if snap is None or len(snap) != len(self.state):
                self._state_snapshot = list(self.state.values())
        else:
            self._state_snapshot = None

    def _plan_flags(self, group: dict[str, Any]) -> tuple[Any, ...]:
        return (group["fused"], group["foreach"], group["capturable"], group["lazy"], group["on_nonfinite"],
                self._fused_ok(group), torch.get_default_dtype(), group.get("state_precision"),
                group.get("stochastic_rounding"))

    def _step_planned(self, group: dict[str, Any], plan: _GroupPlan) -> bool:
        """One step of ``group`` with its plan; False (nothing changed) when the plan does not fit."""
        params = group["params"]
        if len(params) != plan.n or not all(map(_is, params, plan.group_params)):
            return False
        grads = [p.grad for p in params]
        nones = tuple(itertools.compress(range(plan.n), map(_is, grads, itertools.repeat(None))))
        if nones != plan.nones:
            return False
        if nones:
            params = plan.params
            grads = [g for g in grads if g is not None]
        if _ptrs(params) != plan.p_ptrs or self._plan_flags(group) != plan.flags:
            return False
        for b in plan.buckets:
            for key, lst in zip(b.keys, b.checked):
                try:
                    if not all(map(_is, map(operator.itemgetter(key), b.state_dicts), lst)):
                        return False  # a state tensor was replaced
                except KeyError:  # a state dict was emptied (state[p].clear())
                    return False
            gb = grads if b.idx is None else [grads[i] for i in b.idx]
            if b.cpu is not None:
                # the C plan holds raw addresses: a state tensor whose storage moved (t.data = ...)
                # would be written where it no longer lives
                if not all(_ptrs(lst) == ptrs for lst, ptrs in zip(b.checked, b.ptrs)):
                    return False
                if not b.cpu.fits(gb):
                    return False
            elif any(map(_IS_SPARSE, gb)):
                return False
        if group["on_nonfinite"] == "skip" and not _all_finite(grads):  # "raise": checked by step()
            return True
        hyper = self._hyper(group)
        for b in plan.buckets:
            gb = grads if b.idx is None else [grads[i] for i in b.idx]
            if b.cpu is not None and b.cpu.run(gb, hyper):
                continue
            torch._foreach_add_(b.steps, 1)
            b.impl(b.lists[0], gb, *b.lists[1:], b.steps, **hyper)
        return True

    def _build_plan(self, group: dict[str, Any], index: int, params: list[Tensor],
                    buckets: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]],
                    paths: dict[tuple[torch.device, torch.dtype], str]) -> None:
        """Record this step's buckets as the group's plan (called after a plain step of the group)."""
        group_params = list(group["params"])
        pos = {id(p): i for i, p in enumerate(params)}
        planned = []
        for key, lists in buckets.items():
            path = paths[key]
            ps = lists[0]
            idx = None if len(ps) == len(params) else [pos[id(p)] for p in ps]
            states = lists[2:-1]
            cpu_plan = None
            if path == "cpu" and self.kernel is not None:
                from . import _cpu

                cpu_plan = _cpu.StepPlan.build(self.kernel, ps, states, lists[-1])
            planned.append(_Bucket(idx=idx, impl=self._impl(path), lists=[ps, *states], steps=lists[-1],
                                   cpu=cpu_plan, state_dicts=[self.state[p] for p in ps],
                                   keys=(*self.state_keys, "step"), checked=(*states, lists[-1]),
                                   ptrs=(*map(_ptrs, states), _ptrs(lists[-1])) if cpu_plan else ()))
        with_grad = {id(p) for p in params}
        self._plans[index] = _GroupPlan(
            n=len(group_params), group_params=group_params, params=params,
            nones=tuple(i for i, p in enumerate(group_params) if id(p) not in with_grad),
            p_ptrs=_ptrs(params), flags=self._plan_flags(group), buckets=planned)

    def _init_group(self, group: dict[str, Any]) -> None:
        """Create the missing state of the group's parameters that have gradients.

        Named as torch's optimizers name it: while Dynamo traces a step, it runs this method
        eagerly instead of tracing it (and guards on the state), so a compiled step never
        recompiles because the state was created inside it.
        """
        kinds = set()
        for p in group["params"]:
            if p.grad is not None:
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p, group))
                if not (group["lazy"] or p.grad.is_sparse):
                    kinds.add((p.device, p.real.dtype if p.is_complex() else p.dtype))
        for device, dtype in kinds:  # look the fused launchers up now: a traced step only reads them
            path = self._path(group, device, dtype)
            if path in ("fused", "cpu"):
                self._impl(path)

    def _step_group(self, group: dict[str, Any], plan_index: int | None = None) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        lazy = group["lazy"]
        if group["on_nonfinite"] == "skip" and not _all_finite(grads):  # "raise": checked by step()
            return
        self._init_group(group)
        hyper = self._hyper(group)
        if _low_precision(group):
            self._step_low_precision(group, params, grads, hyper)
            return

        buckets: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] = {}
        paths: dict[tuple[torch.device, torch.dtype], str] = {}
        n = len(self.state_keys)
        plannable = plan_index is not None and not lazy
        for p, g in zip(params, grads):
            state = self.state[p]
            if not state:
                state.update(self._init_state(p, group))
            tensors = [p, g] + [state[k] for k in self.state_keys]
            if torch.is_complex(p):
                plannable = False
                tensors = [torch.view_as_real(t) if not t.is_sparse else _sparse_as_real(t)
                           for t in tensors]
            if g.is_sparse or lazy:
                plannable = False
                state["step"] += 1
                self._rows_update(tensors, state["step"], hyper, self._rows_path(group, p.device))
                continue
            bucket = buckets.setdefault((p.device, tensors[0].dtype), [[] for _ in range(n + 3)])
            for lst, t in zip(bucket, tensors + [state["step"]]):
                lst.append(t)

        for (device, dtype), lists in buckets.items():
            steps = lists[-1]
            torch._foreach_add_(steps, 1)
            path = paths[(device, dtype)] = self._path(group, device, dtype)
            if any(_is_dtensor(p) for p in lists[0]):
                plannable = False
            if path in ("fused", "cpu") and any(_is_dtensor(p) for p in lists[0]):
                # The kernels read raw storage, which a DTensor (FSDP2) does not have: give them the
                # local shards (views, so the updates land in the DTensors).  Only element-wise rules
                # reach these paths (_fused_ok), so the local shards are all they need.  The reference
                # and foreach paths keep DTensors, whose ops make whole-tensor statistics (Tiger's
                # lr_scaling RMS, nan_guard) global.
                lists = [[_local(t) for t in lst] for lst in lists]
            impl = self._impl(path)
            impl(*lists[:-1], steps, **hyper)
        if plannable and plan_index is not None:
            self._build_plan(group, plan_index, params, buckets, paths)

    def _check_nonfinite_raise(self) -> None:
        """``on_nonfinite="raise"``: the gradients of every such group are checked before any group
        changes, so a raised step leaves every group (parameters, state, step counts) as it was."""
        for gi, group in enumerate(self.param_groups):
            if group["on_nonfinite"] == "raise":
                grads = [p.grad for p in group["params"] if p.grad is not None]
                if grads and not _all_finite(grads):
                    raise FloatingPointError(f"{type(self).__name__}: non-finite gradient (inf/NaN) in param "
                                             f"group {gi}; nothing was updated")

    def _check_step(self) -> None:
        """Everything that can refuse a step, checked without changing anything (MixedOptimizer runs
        it for every inner optimizer before stepping any)."""
        self._check_sparse_grads(self.param_groups)
        self._check_nonfinite_raise()

    def _check_sparse_grads(self, groups: list[dict[str, Any]]) -> None:
        """Refuse, before anything changes, the sparse gradients of ``groups`` that no path can take.

        A sparse gradient needs ``lazy=True`` (or an optimizer that supports sparse gradients:
        RuntimeError), sparsity along dim 0 only (RuntimeError), and row indices the parameter has:
        every path (reference, C, Triton) reads the listed rows, and one out of range would index
        outside the tensors, so ``IndexError`` names the parameter (its index in ``state_dict()``,
        its group) and the first bad index.  One reduction per sparse gradient and one host sync.
        """
        pairs = []
        for group in groups:
            for p in group["params"]:
                g = p.grad
                if g is None or not g.is_sparse:
                    continue
                if not (group["lazy"] or self.supports_sparse):
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients unless the group sets "
                        "lazy=True (only the rows present are then updated)")
                if _local(g).sparse_dim() != 1:
                    raise RuntimeError(f"sparse gradients must be sparse along dim 0 only, got sparse_dim="
                                       f"{_local(g).sparse_dim()}")
                pairs.append((p, g))
        check_sparse_rows(type(self).__name__, pairs, self.param_groups)

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
            _check_low_precision_param(name, p, group)
        index = {id(q): i for i, q in enumerate(q for grp in self.param_groups for q in grp["params"])}
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
        for (device, md), js in buckets.items():
            if c_store and device.type == "cpu" and md == torch.float32 and self.kernel is not None:
                js = self._step_low_precision_c(group, [params[j] for j in js], [grads[j] for j in js], hyper,
                                                index, js)
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
            sharded: list[tuple[Tensor, Tensor, Tensor, int | None]] = []  # 8-bit DTensor state
            for p, st, w, *ws in zip(ps, states, work_p, *work_s):
                step, pidx = st["step"] if traced else int(st["step"]), index[id(p)]
                if w is not p:
                    if sr and p.dtype == torch.bfloat16:
                        key = _key32(seed, step, pidx, 0)
                        p_local, w_local, offset = _local(p), _local(w), _shard_offset(p)
                        if not (c_store and _fast_sr_bf16(w_local, p_local, key, offset)):
                            p_local.copy_(_lowp.round_bf16(w_local, key, offset=offset))
                    else:
                        p.copy_(w)
                for i, (k, w_s) in enumerate(zip(self.state_keys, ws)):
                    _write_state(st, k, w_s, _key32(seed, step, pidx, 1 + i) if sr else None, c_store,
                                 sharded)
            if sharded:
                _encode_sharded(sharded)

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
        global indices (``element_offset``: :func:`_shard_offset`).
        """
        if md != torch.float32 or compiling() or self._path(group, device, md) != "fused":
            return js
        launches: dict[tuple[torch.dtype, ...], list[int]] = {}
        rest = []
        for j in js:
            p, g = params[j], grads[j]
            st = self.state[p]
            if (p.dtype not in TRITON_DTYPES or g.is_sparse
                    or (_is_dtensor(p) and any(st[k].dtype == torch.uint8 for k in self.state_keys))):
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
                 element_offset=[_shard_offset(p, type(self).__name__) for p in ps])
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
        sharded = _is_dtensor(p)
        if sharded:
            _check_whole_rows(p)
        tensors = [p, *(state[k] for k in self.state_keys)]
        offsets = [_shard_offset(t, name) for t in tensors]  # global index of each local shard's start
        state["step"] += 1
        p, g, *states = [_local(t) for t in [p, g, *tensors[1:]]]
        local_absmax = [None if a is None else _local(a) for a in absmax]
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
                key = None if seed is None else _lowp.key32(seed, step, pidx, i)
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
                    _sync_owned_absmax(state[key], a)

    def _rows_path(self, group: dict[str, Any], device: torch.device) -> str:
        """How lazy rows and sparse gradients are updated: 'cpu' (the fused C row kernel) where the
        group's dense step would take the fused C step, 'fused' (the Triton row kernels) where it
        would take the Triton kernels, else 'reference' (gather, reference rule, scatter)."""
        if group["capturable"] or self.kernel is None or not self._fused_ok(group) or group["foreach"]:
            return "reference"
        if group["fused"] and (device.type == "cuda" or kernels.interpreter_enabled()):
            return "fused"
        if group["fused"] is None and group["foreach"] is None:
            if device.type == "cpu":
                return "cpu"
            if device.type == "cuda" and kernels.triton_usable():
                return "fused"
        return "reference"

    def _rows_update(self, tensors: list[Tensor], step: Tensor, hyper: dict[str, Any],
                     path: str = "reference") -> None:
        """Update only the rows (slices along dim 0) that have a non-zero gradient.

        A row is *touched* when its gradient holds any non-zero (NaN and inf count as non-zero):
        for a dense gradient of a ``lazy=True`` group, rows holding a non-zero; for a sparse COO
        gradient, the rows it lists whose values, after coalescing (duplicates summed), are not
        all zero.  A 0-d parameter is one row.  The touched rows' parameters and state are
        gathered, updated by the reference rule exactly as a dense step would, and scattered
        back; other rows do not change.  On the ``'cpu'`` path the fused C row kernel does the
        same in one pass (falling back to the above for tensors it cannot take).
        """
        if _is_dtensor(tensors[0]):
            # Gathering rows (nonzero/index_select) has no DTensor sharding rule; with whole rows on
            # every rank (FSDP2 shards dim 0) the local rows are exactly the global rows.
            _check_whole_rows(tensors[0])
            tensors = [_local(t) for t in tensors]
        if tensors[0].dim() == 0:  # a 0-d parameter is one row
            tensors = [t.reshape(1) for t in tensors]
        p, g, *states = tensors
        if path != "reference" and self.kernel is not None and kernels.get_rows_impl(self.kernel, path)(
                p, g, states, step, hyper):
            return
        idx, rows = touched_rows(g)
        if idx.numel() == 0 or rows is None:
            return
        p_rows = p.index_select(0, idx)
        state_rows = [s.index_select(0, idx) for s in states]
        type(self).reference_impl([p_rows], [rows], *[[s] for s in state_rows], [step], **hyper)
        p.index_copy_(0, idx, p_rows)
        for s, s_rows in zip(states, state_rows):
            s.index_copy_(0, idx, s_rows)

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    # ----------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict (ours, or torch.optim's of the compatible class: Adagrad <-> Adagrad).

        Everything is checked before anything changes, so a rejected checkpoint leaves the
        optimizer exactly as it was: the checkpoint must come from this optimizer class (its
        param groups may not hold another optimizer's hyperparameters, its state no other state
        keys), every state tensor must have the shape its parameter needs, and the loaded
        hyperparameters are validated like constructor arguments.  ``foreach``/``fused``/
        ``capturable`` stay this optimizer's (how the model runs here, not the checkpoint's
        machine).  torch's loader casts floating state to the parameter's dtype; ours keeps fp32
        state for bf16/fp16 parameters bit-exact.  State of another ``state_precision`` is converted
        (quantized into "8bit", decoded out of it); a float state next to a ``<key>_absmax`` loads as
        float state, the absmax ignored: torch.distributed.checkpoint's full-state-dict loader merges
        a checkpoint into the optimizer's own state dict, so a float checkpoint loaded into an
        "8bit" optimizer arrives with the optimizer's old absmax beside it.
        """
        groups = self._check_state_dict(state_dict)
        flags = [{k: g.get(k) for k in LOADER_OPTIONS} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, own in zip(self.param_groups, flags):
            for key, value in self.defaults.items():  # a torch.optim.Adagrad checkpoint lacks our options
                if key != "differentiable":  # torch's __setstate__ adds it to defaults
                    group.setdefault(key, value)
            group.update(own)
        id_map = {pid: p for saved_group, group in zip(groups, self.param_groups)
                  for pid, p in zip(saved_group["params"], group["params"])}
        for pid, st in state_dict["state"].items():
            p = id_map.get(pid)
            if p is None:
                continue
            mine = self.state[p]
            group = self._group_of(p)
            for key in self.state_keys:
                mine.pop(key + "_absmax", None)
                mine.update(_convert_state(st, key, p, self._key_precision(key, group.get("state_precision")),
                                           self._state_shape(key, p, group)))
            step = st.get("step")
            if step is not None:
                step = step.detach() if isinstance(step, Tensor) else torch.tensor(float(step))
                device = p.device if self._group_of(p).get("capturable") else "cpu"
                mine["step"] = step.to(device=device, dtype=_scalar_dtype(), copy=True)
        self._drop_plans()  # the plans hold the replaced state tensors

    def _check_state_dict(self, state_dict: Any) -> list[dict[str, Any]]:
        """Raise unless ``state_dict`` loads into this optimizer; changes nothing.  Returns its groups."""
        name = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise TypeError(f"{name}: expected a dict with 'state' and 'param_groups' (an optimizer's "
                            f"state_dict()), got {type(state_dict).__name__}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}: the checkpoint has {len(saved_groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}")
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            own_keys = set(self.defaults) | set(group) | {"differentiable"}  # also keys a scheduler added
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{name}: param group {i} of the checkpoint has {len(saved['params'])} "
                                 f"parameters, this optimizer's {len(group['params'])}")
            foreign = sorted((saved.keys() - own_keys) & _known_hyperparameters())
            missing = sorted(k for k in _core_hyperparameters(type(self))
                             if k in self.defaults and k not in saved)
            if foreign or missing:
                source = _guess_optimizer(saved)
                raise ValueError(
                    f"{name}: the checkpoint was saved by {source or 'another optimizer'}, not "
                    f"{type(self).__name__}: its param group {i} "
                    + (f"holds {foreign}, which {type(self).__name__} does not use" if foreign else "")
                    + (" and " if foreign and missing else "")
                    + (f"lacks {missing}" if missing else ""))
        # each group as it will be once loaded: the checkpoint's options, this optimizer's execution flags
        merged = [{**self.defaults, **group, **saved,
                   **{k: group.get(k) for k in (*LOADER_OPTIONS, "params")}}
                  for saved, group in zip(saved_groups, self.param_groups)]
        id_map: dict[Any, tuple[Tensor, dict[str, Any]]] = {}
        for saved, group, loaded in zip(saved_groups, self.param_groups, merged):
            id_map.update((pid, (p, loaded)) for pid, p in zip(saved["params"], group["params"]))
        for pid, st in state_dict["state"].items():
            if pid not in id_map:
                continue
            p, group = id_map[pid]
            extra = sorted(k for k in st if k != "step" and k not in self.state_keys
                           and not (k.endswith("_absmax") and k[:-7] in self.state_keys))
            if extra:
                source = _guess_optimizer(saved_groups[0])
                raise ValueError(f"{name}: the state of parameter {pid} holds {extra}, which "
                                 f"{type(self).__name__} does not keep (it keeps {list(self.state_keys)}); "
                                 f"the checkpoint looks like {source or 'another optimizer'}'s")
            for key in self.state_keys:
                if key not in st:
                    raise ValueError(f"{name}: state of parameter {pid} lacks {key!r} (has {sorted(st)})")
                want = self._state_shape(key, p, group)
                if tuple(st[key].shape) != want:
                    raise ValueError(f"{name}: state {key!r} of parameter {pid} has shape "
                                     f"{tuple(st[key].shape)}, expected {want} for a parameter of shape "
                                     f"{tuple(p.shape)}")
                # an absmax next to float state is ignored (see load_state_dict)
                absmax = st.get(key + "_absmax") if st[key].dtype == torch.uint8 else None
                if absmax is None and st[key].dtype == torch.uint8:
                    raise ValueError(f"{name}: state {key!r} of parameter {pid} is 8-bit codes without "
                                     f"{key + '_absmax'!r}")
                if absmax is not None and tuple(absmax.shape) != (_lowp.nblocks(st[key].numel()),):
                    raise ValueError(f"{name}: state {key + '_absmax'!r} of parameter {pid} has shape "
                                     f"{tuple(absmax.shape)}, expected ({_lowp.nblocks(st[key].numel())},) "
                                     "(one per 256-element block)")
        for i, candidate in enumerate(merged):
            try:
                self._validate(candidate)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{name}: param group {i} of the checkpoint: {exc}") from None
        return saved_groups


#: Hyperparameter names of torch.optim's optimizers that tigeropt's do not all share: a checkpoint
#: group holding one that the loading optimizer does not use comes from another optimizer.
_TORCH_OPTIMIZERS = ("Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "ASGD", "LBFGS", "NAdam",
                     "RAdam", "RMSprop", "Rprop", "SGD", "SparseAdam")


def _signature_keys(cls: type) -> set[str]:
    """Hyperparameter names of an optimizer class: its constructor's arguments but params."""
    import inspect

    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return set()
    return {n for n, prm in sig.parameters.items()
            if n not in ("self", "params") and prm.kind not in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD)}


def _core_hyperparameters(cls: type) -> list[str]:
    """The positional hyperparameters of ``cls`` (lr, betas, ...): every checkpoint of it has them."""
    import inspect

    sig = inspect.signature(cls.__init__)
    return [n for n, prm in sig.parameters.items()
            if n not in ("self", "params") and prm.kind is prm.POSITIONAL_OR_KEYWORD]


def _candidate_classes() -> list[type]:
    import torch.optim as optim

    ours = []
    todo = list(TigerOptimizer.__subclasses__())
    while todo:
        cls = todo.pop()
        ours.append(cls)
        todo.extend(cls.__subclasses__())
    return ours + [getattr(optim, n) for n in _TORCH_OPTIMIZERS if hasattr(optim, n)]


def _known_hyperparameters() -> set[str]:
    keys: set[str] = set()
    for cls in _candidate_classes():
        keys |= _signature_keys(cls)
    # "momentum": schedulers that cycle momentum may add it to any optimizer's groups
    return keys - set(COMMON_OPTIONS) - {"lr", "weight_decay", "differentiable", "decoupled_weight_decay",
                                         "momentum"}


def _guess_optimizer(saved_group: Any) -> str | None:
    """The class whose constructor arguments best match a checkpoint's group keys ("torch.optim.AdamW")."""
    best, best_score = None, 0
    for cls in _candidate_classes():
        keys = _signature_keys(cls) - set(COMMON_OPTIONS)
        if keys and keys <= set(saved_group) and len(keys) > best_score:
            best, best_score = cls, len(keys)
    if best is None:
        return None
    if best.__name__ == "Adam" and saved_group.get("decoupled_weight_decay"):  # AdamW is Adam(decoupled=True)
        return "torch.optim.AdamW"
    module = "torch.optim" if best.__module__.startswith("torch.optim") else "tigeropt"
    return f"{module}.{best.__name__}"


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
    bad = sparse_rows_out_of_range([(_local(g), _local(p).shape[0] if p.dim() else 1) for p, g in pairs])
    if bad is None:
        return
    k, index, rows = bad
    p = pairs[k][0]
    owners = [(gi, q) for gi, grp in enumerate(param_groups) for q in grp["params"]]
    pid, gi = next((pid, gi) for pid, (gi, q) in enumerate(owners) if q is p)
    raise IndexError(f"{name}: the sparse gradient of parameter {pid} (param group {gi}, shape "
                     f"{tuple(p.shape)}) lists row index {index}, out of range for {rows} rows; nothing was "
                     "updated")


_is = operator.is_
_IS_SPARSE = operator.attrgetter("is_sparse")


def _ptrs(tensors: list[Tensor]) -> array:
    return array("Q", map(Tensor.data_ptr, tensors))


@dataclass
class _Bucket:
    """One (device, dtype) bucket of a group plan."""

    idx: list[int] | None  # positions of its tensors among the group's params with gradients (None: all)
    impl: Impl
    lists: list[list[Tensor]]  # params, then one list per state key
    steps: list[Tensor]
    cpu: Any  # tigeropt._cpu.StepPlan, or None
    state_dicts: list[dict[str, Any]]  # self.state[p] of each param
    keys: tuple[str, ...]  # state keys checked for identity every step ...
    checked: tuple[list[Tensor], ...]  # ... against these tensors
    ptrs: tuple[array, ...] = ()  # C plans: the data pointers of ``checked`` when built


@dataclass
class _GroupPlan:
    n: int  # len(group["params"]) when built
    group_params: list[Tensor]
    params: list[Tensor]  # those with gradients
    nones: tuple[int, ...]  # positions of the params without gradients
    p_ptrs: array
    flags: tuple[Any, ...]
    buckets: list[_Bucket]


def _choose_path(name: str, kernel: str | None, fused: bool | None, foreach: bool | None, capturable: bool,
                 fused_ok: bool, device: torch.device, dtype: torch.dtype) -> str:
    """The path of one (group, device, dtype) bucket: 'reference', 'foreach', 'fused' or 'cpu'.

    A pure function of its arguments, run eagerly even while Dynamo traces a step (it asks the
    kernels package what is available: a build, a Triton import), its result a constant there.
    """
    if capturable and device.type == "cuda":
        if not (kernel and fused_ok and dtype in TRITON_DTYPES and kernels.triton_usable()):
            raise RuntimeError(f"{name}(capturable=True) needs the fused Triton path "
                               "for these parameters and options")
        return "fused"
    if fused:
        if not fused_ok:
            raise RuntimeError(f"{name}(fused=True) does not support the options "
                               "this group uses; use foreach=True")
        if dtype not in TRITON_DTYPES:
            raise TypeError(f"{name}(fused=True) supports fp32/bf16/fp16 parameters, "
                            f"not {dtype}; use foreach=True")
        return "fused"
    if foreach:
        return "foreach"
    if foreach is False and fused is None:
        return "reference"
    if fused is None and foreach is None and kernel is not None and fused_ok:
        if device.type == "cuda" and dtype in TRITON_DTYPES and kernels.triton_usable():
            return "fused"
        if device.type == "cpu" and kernels.cpu_fused_usable(kernel, dtype):
            return "cpu"
    return "foreach"


# What torch.compiler.assume_constant_result does, without importing torch._dynamo at import time.
_choose_path._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _lp_options(group: dict[str, Any]) -> str:
    """The low-precision options a group uses that only the reference/foreach paths implement."""
    used = []
    if group.get("stochastic_rounding"):
        used.append("stochastic_rounding=True")
    precision = group.get("state_precision")
    if precision in ("bf16", "8bit"):
        used.append(f"state_precision={precision!r}")
    return ", ".join(used)


def _low_precision(group: dict[str, Any]) -> bool:
    """Whether a group's step runs :meth:`TigerOptimizer._step_low_precision` (state stored in
    another dtype than the math, or stochastic rounding)."""
    if _lp_options(group):
        return True
    return group.get("state_precision") == "fp32" and any(p.dtype == torch.float64 for p in group["params"])


def _storage_dtype(p: Tensor, precision: str | None) -> torch.dtype:
    """dtype of the (non-8-bit) state of parameter ``p`` under ``state_precision``."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.complex64 if p.is_complex() else torch.float32
    return state_dtype(p.dtype)


def _check_low_precision_param(name: str, p: Tensor, group: dict[str, Any]) -> None:
    options = _lp_options(group)
    if p.is_complex() and (options or p.dtype == torch.complex128 and group.get("state_precision") == "fp32"):
        raise RuntimeError(f"{name}: complex parameters are not supported with "
                           f"{options or 'state_precision=fp32 for complex128 parameters'}")
    if _is_dtensor(p):
        _shard_offset(p, name)  # placements whose shards are ranges of the flattened tensor
    if group.get("stochastic_rounding") and p.dtype == torch.float16:
        raise RuntimeError(f"{name}: stochastic_rounding=True rounds to bf16, not fp16 parameters")


def _read_state(state: dict[str, Any], key: str, dtype: torch.dtype) -> Tensor:
    """State tensor ``key`` in the math ``dtype`` (8-bit decoded; the tensor itself if already so)."""
    t = state[key]
    if t.dtype == torch.uint8:
        if _is_dtensor(t):
            return _decode_sharded(t, state[key + "_absmax"]).to(dtype)
        return _lowp.decode_8bit(t, state[key + "_absmax"]).to(dtype)
    return t if t.dtype == dtype else t.to(dtype)


# ----------------------------------------------------------------- low precision on DTensor shards
# A DTensor's local shard (FSDP2: Shard(0), rows r0..r1 of the parameter) holds the elements
# o..o+n-1 of the row-major flattened tensor.  Stochastic rounding keys its hash on o+i (the global
# index), and 8-bit state keeps the whole tensor's 256-element blocks: the codes are sharded like
# the parameter, the absmax of every block is replicated on every rank (a Replicate DTensor of
# (nblocks,)), and a block split between two shards is encoded with the maximum of their partial
# absmax (one all-reduce per step and device mesh).  So sharded training equals one process bit for
# bit, and a checkpoint's state is the one-process state (DCP reshards it to any world size).

def _shard_offset(t: Tensor, name: str = "tigeropt") -> int:
    """Global row-major index of the first element of a DTensor's local shard (0 for other tensors).

    The shard must be a range of the flattened tensor: placements Shard(0) (FSDP2, uneven shards
    included) and Replicate; others (tensor parallel Shard(1), strided shards) raise RuntimeError.
    """
    if not _is_dtensor(t):
        return 0
    dt = _dtensor_module()
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


def _replicated(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (the whole tensor on every rank) as a Replicate DTensor on ``like``'s device mesh."""
    dt = _dtensor_module()
    mesh = like.device_mesh  # type: ignore[attr-defined]
    return dt.DTensor.from_local(t, mesh, [dt.Replicate()] * mesh.ndim, run_check=False)


def _decode_sharded(codes: Tensor, absmax: Tensor) -> Tensor:
    """The fp32 values of sharded 8-bit codes, a DTensor sharded like them."""
    local, offset = codes.to_local(), _shard_offset(codes)  # type: ignore[attr-defined]
    first, count = _lowp.covered_blocks(local.numel(), offset)
    values = _lowp.decode_8bit(local, _local(absmax)[first:first + count], offset)
    return type(codes).from_local(values, codes.device_mesh, codes.placements,  # type: ignore[attr-defined]
                                  run_check=False, shape=codes.shape, stride=codes.stride())


def _encode_sharded(items: list[tuple[Tensor, Tensor, Tensor, int | None]]) -> None:
    """Store (codes, absmax, fp32 values, hash key) of sharded 8-bit state: each shard's partial block
    absmax, one all-reduce (max) per device mesh for the whole tensors' absmax, then every shard
    encoded with its blocks' absmax (a block split between shards gets the same on both)."""
    dt = _dtensor_module()
    by_mesh: dict[Any, list[tuple[Tensor, Tensor, Tensor, int | None]]] = {}
    for item in items:
        by_mesh.setdefault(item[1].device_mesh, []).append(item)  # type: ignore[attr-defined]
    for mesh, group in by_mesh.items():
        partial = []
        for codes, absmax, values, _ in group:
            full = torch.zeros(absmax.shape[0], dtype=torch.float32, device=_local(absmax).device)
            offset = _shard_offset(codes)
            first, count = _lowp.covered_blocks(values.numel(), offset)
            full[first:first + count] = _lowp.block_absmax(values, offset)
            partial.append(full)
        reduced = dt.DTensor.from_local(torch.cat(partial), mesh, [dt.Partial("max")] * mesh.ndim,
                                        run_check=False)
        whole = reduced.redistribute(mesh, [dt.Replicate()] * mesh.ndim).to_local()
        start = 0
        for codes, absmax, values, key in group:
            nb = absmax.shape[0]
            blocks = whole[start:start + nb]
            start += nb
            offset = _shard_offset(codes)
            first, count = _lowp.covered_blocks(values.numel(), offset)
            local = codes.to_local()  # type: ignore[attr-defined]
            local.copy_(_lowp.encode_8bit(values.reshape(local.shape), key, offset=offset,
                                          absmax=blocks[first:first + count])[0])
            _local(absmax).copy_(blocks)


def _init_8bit_sharded(p: Tensor, value: float) -> tuple[Tensor, Tensor]:
    """8-bit state of DTensor ``p`` all equal to ``value``: codes sharded like p, absmax replicated
    (every block's absmax is |value|: no communication)."""
    codes = torch.zeros_like(p, dtype=torch.uint8)
    local, offset = codes.to_local(), _shard_offset(codes)  # type: ignore[attr-defined]
    whole = torch.full((_lowp.nblocks(p.numel()),), abs(value) if abs(value) < float("inf") else 0.0,
                       dtype=torch.float32, device=local.device)
    first, count = _lowp.covered_blocks(local.numel(), offset)
    full = torch.full(local.shape, value, dtype=torch.float32, device=local.device)
    local.copy_(_lowp.encode_8bit(full, offset=offset, absmax=whole[first:first + count])[0])
    return codes, _replicated(whole, p)


def _rows_are_blocks(p: Tensor) -> bool:
    """Whether each 256-element block of ``p``'s flattened tensor lies inside one row (slice along
    dim 0): rows of a multiple of 256 elements, or at most one row."""
    return p.dim() == 0 or p.shape[0] <= 1 or p[0].numel() % _lowp.BLOCK == 0


def _sync_owned_absmax(codes: Tensor, absmax: Tensor) -> None:
    """After a rows step on DTensor shards whose boundaries are block boundaries: every rank's
    replicated absmax takes each block's value from the rank holding the block (an all-reduce max
    of each rank's own blocks, zero elsewhere)."""
    dt = _dtensor_module()
    local = _local(absmax)
    first, count = _lowp.covered_blocks(codes.to_local().numel(), _shard_offset(codes))  # type: ignore
    own = torch.zeros_like(local)
    own[first:first + count] = local[first:first + count]
    mesh = absmax.device_mesh  # type: ignore[attr-defined]
    reduced = dt.DTensor.from_local(own, mesh, [dt.Partial("max")] * mesh.ndim, run_check=False)
    local.copy_(reduced.redistribute(mesh, [dt.Replicate()] * mesh.ndim).to_local())


def _as_shard_like(src: Tensor, like: Tensor) -> Tensor:
    """A checkpoint tensor for a DTensor ``like``: a DTensor as it is; a whole (unsharded) tensor cut to
    this rank's shard of ``like``'s layout (same shape; a 1-D absmax of other length: replicated)."""
    if _is_dtensor(src) or not _is_dtensor(like):
        return src
    if tuple(src.shape) != tuple(like.shape):
        return _replicated(src.to(_local(like).device), like)
    local = like.to_local()  # type: ignore[attr-defined]
    offset = _shard_offset(like)
    part = src.reshape(-1)[offset:offset + local.numel()].reshape(local.shape).to(local.device)
    return type(like).from_local(part, like.device_mesh, like.placements,  # type: ignore[attr-defined]
                                 run_check=False, shape=like.shape, stride=like.stride())


def _key32(seed: int, step: int | Tensor, param_index: int, stream: int) -> Any:
    """:func:`_lowp.key32`; with ``step`` a tensor (a traced step) an int64 0-d tensor."""
    if isinstance(step, Tensor):
        return _lowp.key32_tensor(seed, step, param_index, stream)
    return _lowp.key32(seed, step, param_index, stream)


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
                 sharded: list[tuple[Tensor, Tensor, Tensor, int | None]] | None = None) -> None:
    """Store a working copy into state ``key``: once rounded (stochastically with ``sr_key``); with
    ``c_store`` by the C twins of the torch code where they take the tensors.  DTensor state is
    stored shard by shard with global element indices; its 8-bit stores are appended to ``sharded``
    (for one :func:`_encode_sharded` of the whole step) or, without it, done at once."""
    t = state[key]
    if work is t:
        return
    if _is_dtensor(t):
        if t.dtype == torch.uint8:
            item = (t, state[key + "_absmax"], _local(work), sr_key)
            _encode_sharded([item]) if sharded is None else sharded.append(item)
        elif t.dtype == torch.bfloat16 and sr_key is not None:
            _local(t).copy_(_lowp.round_bf16(_local(work), sr_key, offset=_shard_offset(t)))
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


def _convert_state(st: dict[str, Any], key: str, p: Tensor, precision: str | None, shape: tuple[int, ...]
                   ) -> dict[str, Tensor]:
    """Checkpoint state ``key`` (float, or 8-bit codes + absmax) as this optimizer stores it.

    Same storage: copied bit-exactly.  Float into "8bit": quantized (round to nearest).  8-bit
    into float: decoded, then cast (round to nearest).
    """
    src = st[key]
    absmax = st.get(key + "_absmax")
    if _is_dtensor(p) and shape == tuple(p.shape):
        return _convert_sharded(key, src, absmax, p, precision)
    if precision == "8bit":
        if src.dtype == torch.uint8 and absmax is not None:
            return {key: src.to(device=p.device, copy=True).reshape(shape),
                    key + "_absmax": absmax.to(device=p.device, dtype=torch.float32, copy=True)}
        codes, am = _lowp.encode_8bit(src.to(device=p.device, dtype=torch.float32))
        return {key: codes, key + "_absmax": am}
    if src.dtype == torch.uint8 and absmax is not None:
        src = _lowp.decode_8bit(src.to(p.device), absmax.to(device=p.device, dtype=torch.float32))
    return {key: src.to(device=p.device, dtype=_storage_dtype(p, precision), copy=True)}


def _convert_sharded(key: str, src: Tensor, absmax: Tensor | None, p: Tensor, precision: str | None
                     ) -> dict[str, Tensor]:
    """:func:`_convert_state` for a DTensor parameter (state sharded like it, 8-bit absmax replicated);
    the checkpoint's tensors may be DTensors or whole tensors.  Quantizing all-reduces (collective)."""
    src = _as_shard_like(src, p)
    if src.dtype == torch.uint8 and absmax is not None:
        absmax = _as_shard_like(absmax.to(torch.float32), p)
        if precision == "8bit":
            return {key: src.to(device=p.device, copy=True),
                    key + "_absmax": absmax.to(device=p.device, copy=True)}
        src = _decode_sharded(src, absmax)
    if precision == "8bit":
        codes = torch.zeros_like(p, dtype=torch.uint8)
        whole = _replicated(torch.zeros(_lowp.nblocks(p.numel()), device=_local(p).device), p)
        _encode_sharded([(codes, whole, _local(src).to(torch.float32), None)])
        return {key: codes, key + "_absmax": whole}
    return {key: src.to(device=p.device, dtype=_storage_dtype(p, precision), copy=True)}


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _is_dtensor(t: Tensor) -> bool:
    module = _dtensor_module()
    return module is not None and isinstance(t, module.DTensor)


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view: in-place updates reach the DTensor); other tensors as they are."""
    return t.to_local() if _is_dtensor(t) else t


def _check_whole_rows(p: Tensor) -> None:
    """Row-wise updates on local shards equal the global update only if each rank holds whole rows."""
    placements = p.placements  # type: ignore[attr-defined]
    dt = _dtensor_module()
    if not all(isinstance(pl, dt.Replicate) or (isinstance(pl, dt.Shard) and pl.dim == 0)
               for pl in placements):
        raise RuntimeError("lazy=True and sparse gradients need DTensor parameters sharded along dim 0 "
                           f"(FSDP2's default) or replicated, got placements {placements}")


def _all_finite(grads: list[Tensor]) -> bool:
    """Whether every gradient is finite, agreed by all ranks for DTensor gradients (FSDP2).

    Each rank holds only its shard, and ``bool()`` of a reduction of a sharded DTensor reads
    this rank's partial value; one all-reduce (min) per device mesh makes the decision global.
    """
    local = [_local(g) for g in grads]
    flags = [torch.isfinite(g._values() if g.is_sparse else g).all() for g in local]
    ok = torch.stack([f.to(flags[0].device) for f in flags]).all()
    meshes = {g.device_mesh: None for g in grads if _is_dtensor(g)}
    for mesh in meshes:
        dt = _dtensor_module()
        partial = [dt.Partial("min")] * mesh.ndim
        ok = dt.DTensor.from_local(ok.to(torch.int32).reshape(1), mesh, partial).full_tensor()[0].bool()
    return bool(ok)


def global_bool(t: Tensor) -> bool:
    """``bool(t)`` of a one-element result, the same on every rank when ``t`` is a DTensor.

    A reduction of a sharded DTensor (``isnan(g).any()``) is a *Partial* DTensor whose ``bool()``
    would read this rank's part only; ``full_tensor()`` all-reduces it first.
    """
    return bool(t.full_tensor() if _is_dtensor(t) else t)


def _sparse_as_real(g: Tensor) -> Tensor:
    g = g.coalesce()
    values = torch.view_as_real(g.values())
    return torch.sparse_coo_tensor(g.indices(), values, (*g.shape, 2))


def working(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """``tensors`` in the math dtype: the same tensors when they already are (fp32/fp64)."""
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def write_back(params: list[Tensor], work: list[Tensor]) -> None:
    """Round fp32 working copies back into bf16/fp16 parameters (no-op for fp32/fp64)."""
    pairs = [(p, w) for p, w in zip(params, work) if p is not w]
    if pairs:
        torch._foreach_copy_([p for p, _ in pairs], [w for _, w in pairs])
