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
* low-precision groups through :class:`tigeropt._lowp_step.LowPrecisionSteps` (a base class),
  DTensor shards through :mod:`tigeropt._dtensor`;
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
    How each path runs these options, lazy rows and DTensor shards included: :mod:`tigeropt._lowp_step`.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _lowp, kernels
from ._dtensor import (
    all_finite,
    check_whole_rows,
    dtensor_module,
    dtensor_rows_state,
    global_bool,
    is_dtensor,
    to_local,
)
from ._lowp_step import (
    LowPrecisionSteps,
    check_low_precision_param,
    convert_state,
    low_precision,
    lp_options,
    new_8bit_state,
    sr_without_effect,
    state_dtype,
    storage_dtype,
)
from ._ops import compiling, to_float
from ._rows import check_sparse_rows, sparse_rows_out_of_range, touched_rows
from ._validate import (
    check,
    check_bool,
    check_choice,
    check_lr,
    check_optional_bool,
    check_ordered_params,
    plain_numbers,
)

# re-exported: the optimizer modules and LazyOptimizer import these from here
__all__ = ["TigerOptimizer", "Impl", "check", "check_lr", "global_bool", "nan_sign", "to_float",
           "state_dtype", "working", "write_back", "touched_rows", "sparse_rows_out_of_range",
           "check_sparse_rows", "dtensor_module"]

Impl = Callable[..., None]
_NONFINITE = ("ignore", "skip", "raise")
#: How the model runs here, not part of the trajectory: a checkpoint's values never override these.
EXECUTION_FLAGS = ("foreach", "fused", "capturable")
#: Options every tigeropt optimizer takes besides its hyperparameters.
COMMON_OPTIONS = ("maximize", "foreach", "fused", "on_nonfinite", "capturable", "lazy", "state_precision",
                  "stochastic_rounding", "sr_seed")
#: Options a checkpoint never overrides: the execution flags and the state precision (a checkpoint
#: of another precision is converted on load).
LOADER_OPTIONS = (*EXECUTION_FLAGS, "state_precision")
#: (optimizer class, path) -> fused launcher (a plain dict: cheap, and traceable by Dynamo).
_FUSED_IMPLS: dict[tuple[type, str], Impl] = {}


def nan_sign(x: Tensor) -> Tensor:
    """``sign(x)``, but NaN where ``x`` is inf or NaN (torch.sign gives 0 for NaN on CPU and +-1 for inf).

    The sign optimizers use it so that a non-finite gradient reaches the parameter visibly, as it
    does with AdamW (``inf/inf``), instead of silently freezing the element: ``sign(x) + 0*x``.
    """
    return torch.sign(x).add_(x, alpha=0.0)


class TigerOptimizer(LowPrecisionSteps, Optimizer):
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
        plain_numbers(defaults)  # numpy scalars (np.float32 lr, np.int64 sr_seed) as Python numbers
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
        plain_numbers(param_group)
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

    def _validate(self, group: dict[str, Any], warn: bool = True) -> None:
        """The one validation routine: constructor, ``add_param_group`` and ``load_state_dict`` (``warn``:
        see :meth:`_validate_precision`)."""
        check_bool("maximize", group["maximize"])
        check_optional_bool("foreach", group["foreach"])
        check_optional_bool("fused", group["fused"])
        check_bool("capturable", group["capturable"])
        check_bool("lazy", group["lazy"])
        check_choice("on_nonfinite", group["on_nonfinite"], _NONFINITE)
        self._validate_precision(group, warn)
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
                             f"({self._unfused_options(group) or lp_options(group)}); leave fused unset "
                             "(the default path runs them: "
                             + ("the foreach path)" if self._unfused_options(group)
                                else "the fused C step on CPU, the Triton kernels on CUDA)"))
        if fused and (self.kernel is None or not kernels.triton_usable()):
            why = kernels.triton_status() if self.kernel else "this optimizer has no fused kernel"
            raise RuntimeError(f"{type(self).__name__}(fused=True) is not available: {why}")
        if fused:
            wide = sorted({str(p.dtype) for p in group.get("params", []) if isinstance(p, Tensor)
                           and (p.real.dtype if p.is_complex() else p.dtype) not in kernels.TRITON_DTYPES})
            if wide:
                raise ValueError(f"Invalid fused: True (the Triton kernels take fp32/bf16/fp16 parameters, "
                                 f"this group holds {', '.join(wide)}; use foreach=True or leave fused "
                                 "unset)")


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
            check_low_precision_param(type(self).__name__, p, group)
        for key in self.state_keys:
            shape = self._state_shape(key, p, group)
            value = self._initial_value(key, group)
            key_precision = self._key_precision(key, precision)
            if key_precision == "8bit":
                state[key], state[key + "_absmax"] = new_8bit_state(p, shape, value)
                continue
            dtype = storage_dtype(p, key_precision)
            if shape == tuple(p.shape):
                t = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            elif is_dtensor(p):  # (rows,) state of a row-sharded parameter: sharded with its rows
                t = dtensor_rows_state(p, shape, dtype)
            else:
                t = torch.zeros(shape, dtype=dtype, device=p.device)
            if value != 0.0:  # complex: both components of view_as_real start at value
                (torch.view_as_real(t) if t.is_complex() else t).fill_(value)
            state[key] = t
        return state


    def _fused_ok(self, group: dict[str, Any]) -> bool:
        """Whether the fused kernels implement every option this group uses."""
        return not self._unfused_options(group) and not lp_options(group)

    def _unfused_options(self, group: dict[str, Any]) -> str:
        """The options of this group the fused kernels do not implement ('' if none)."""
        return ""


    # ----------------------------------------------------------------- path choice
    def _check_fused_devices(self, group: dict[str, Any]) -> None:
        """fused=True runs the Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
        Parameters on any other device (meta, an accelerator without the kernels) are refused here,
        in the constructor / add_param_group, not at the first step."""
        for i, p in enumerate(group["params"]):
            if p.device.type == "cpu" and not kernels.interpreter_enabled():
                raise RuntimeError(
                    f"{type(self).__name__}(fused=True) runs Triton kernels, which need a CUDA device "
                    "(or TRITON_INTERPRET=1 for testing on CPU); leave fused=None to get the fused "
                    "C kernel on CPU.")
            if p.device.type not in ("cpu", "cuda"):
                raise RuntimeError(
                    f"{type(self).__name__}(fused=True) runs Triton kernels on CUDA tensors (CPU ones under "
                    f"TRITON_INTERPRET=1); parameter {i} of the group is on {p.device}: leave fused unset "
                    "or move the parameters first")

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
            elif not self._step_planned(group, plan, i):
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
                group.get("stochastic_rounding"), group.get("sr_seed"))

    def _step_planned(self, group: dict[str, Any], plan: _GroupPlan, index: int | None = None) -> bool:
        """One step of ``group`` (number ``index``) with its plan; False (nothing changed) when the plan
        does not fit."""
        params = group["params"]
        if len(params) != plan.n or not all(map(_is, params, plan.group_params)):
            return False
        if plan.first is not None and (index is None or self._first_index(index) != plan.first):
            return False  # parameters added to or removed from an earlier group: other hash keys
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
                # ... and reads them as contiguous memory: a tensor re-viewed in place over the same
                # storage (p.data = p.data.t(), the state too) keeps its address but not its layout
                # (the last list, the 0-d step counts, always is)
                if not (all(map(_IS_CONTIGUOUS, b.lists[0])) and all(all(map(_IS_CONTIGUOUS, lst))
                                                                     for lst in b.checked[:-1])):
                    return False
                if not b.cpu.fits(gb):
                    return False
            elif any(map(_IS_SPARSE, gb)):
                return False
        if group["on_nonfinite"] == "skip" and not self._finite(group, grads):  # "raise": checked by step()
            return True
        hyper = self._hyper(group)
        for b in plan.buckets:
            gb = grads if b.idx is None else [grads[i] for i in b.idx]
            if b.cpu is not None and b.cpu.run(gb, hyper):
                continue
            if b.impl is None:  # a low-precision plan (its only bucket) that did not run: nothing changed
                return False
            torch._foreach_add_(b.steps, 1)
            b.impl(b.lists[0], gb, *b.lists[1:], b.steps, **hyper)
        return True

    def _build_plan(self, group: dict[str, Any], index: int, params: list[Tensor],
                    buckets: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] | None = None,
                    paths: dict[tuple[torch.device, torch.dtype], str] | None = None) -> None:
        """Record this step's buckets as the group's plan (called after a plain step of the group;
        without buckets, after the low-precision step: :meth:`_build_lowp_plan`)."""
        if buckets is None or paths is None:
            self._build_lowp_plan(group, index, params)
            return
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

    def _build_lowp_plan(self, group: dict[str, Any], index: int, params: list[Tensor]) -> None:
        """Record a low-precision group's plan (after a plain step of the group): one bucket, the fused
        C low-precision step with its pointer tables (:meth:`_lowp_c_plan`), where it took the group
        whole; other low-precision groups are not planned.  Besides the usual checks, the plan holds
        the global index of the group's first parameter (the hash keys' parameter indices follow it)."""
        first = self._first_index(index)
        cpu_plan = self._lowp_c_plan(group, params, first)
        if cpu_plan is None:
            return
        group_params = list(group["params"])
        state_dicts = [self.state[p] for p in params]
        keys = [*self.state_keys,
                *(k + "_absmax" for k in self.state_keys if k + "_absmax" in state_dicts[0])]
        checked = tuple([st[k] for st in state_dicts] for k in (*keys, "step"))
        with_grad = {id(p) for p in params}
        bucket = _Bucket(idx=None, impl=None, lists=[params, *checked[:len(self.state_keys)]],
                         steps=checked[-1], cpu=cpu_plan, state_dicts=state_dicts, keys=(*keys, "step"),
                         checked=checked, ptrs=tuple(map(_ptrs, checked)))
        self._plans[index] = _GroupPlan(
            n=len(group_params), group_params=group_params, params=params,
            nones=tuple(i for i, p in enumerate(group_params) if id(p) not in with_grad),
            p_ptrs=_ptrs(params), flags=self._plan_flags(group), buckets=[bucket], first=first)

    def _first_index(self, index: int) -> int | tuple[int, ...]:
        """The global index (param_groups order, as in the state_dict) of group ``index``'s first
        parameter; under :func:`tigeropt.attach_zero` the global indices of all its parameters (a
        rank's subset of a ZeroRedundancyOptimizer's group is not a contiguous range)."""
        if self._zero is not None and self._whole_groups() is not None:
            hashed = self._hash_indices()
            return tuple(hashed[id(p)] for p in self.param_groups[index]["params"])
        return self._param_index_offset + sum(len(g["params"]) for g in self.param_groups[:index])

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
                else:
                    self._match_state_precision(p, state, group)
                if not (group["lazy"] or p.grad.is_sparse):
                    kinds.add((p.device, p.real.dtype if p.is_complex() else p.dtype))
        for device, dtype in kinds:  # look the fused launchers up now: a traced step only reads them
            path = self._path(group, device, dtype)
            if path in ("fused", "cpu"):
                self._impl(path)

    def _match_state_precision(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Store ``p``'s state as the group's ``state_precision`` says.  A ``state_precision`` changed
        by hand between steps (``group["state_precision"] = "8bit"``) converts the state at the next
        step as ``load_state_dict`` converts a checkpoint (quantized into "8bit", decoded out of it,
        cast otherwise); before, 8-bit codes met float math (an obscure error) and float state
        stayed float under "8bit"/"bf16" (no memory saved, silently)."""
        precision = group.get("state_precision")
        for key in self.state_keys:
            t = state.get(key)
            if not isinstance(t, Tensor):
                continue
            key_precision = self._key_precision(key, precision)
            stored = "8bit" if t.dtype == torch.uint8 else t.dtype
            if stored == ("8bit" if key_precision == "8bit" else storage_dtype(p, key_precision)):
                continue
            converted = convert_state(dict(state), key, p, key_precision, self._state_shape(key, p, group))
            state.pop(key + "_absmax", None)
            state.update(converted)

    def _step_group(self, group: dict[str, Any], plan_index: int | None = None) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        lazy = group["lazy"]
        if group["on_nonfinite"] == "skip" and not self._finite(group, grads):  # "raise": checked by step()
            return
        self._init_group(group)
        hyper = self._hyper(group)
        if low_precision(group):
            self._step_low_precision(group, params, grads, hyper)
            if plan_index is not None and not lazy:
                self._build_plan(group, plan_index, params)
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
            if any(is_dtensor(p) for p in lists[0]):
                plannable = False
            if path in ("fused", "cpu") and any(is_dtensor(p) for p in lists[0]):
                # The kernels read raw storage, which a DTensor (FSDP2) does not have: give them the
                # local shards (views, so the updates land in the DTensors).  Only element-wise rules
                # reach these paths (_fused_ok), so the local shards are all they need.  The reference
                # and foreach paths keep DTensors, whose ops make whole-tensor statistics (Tiger's
                # lr_scaling RMS, nan_guard) global.
                lists = [[to_local(t) for t in lst] for lst in lists]
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
                if not self._finite(group, grads):
                    raise FloatingPointError(f"{type(self).__name__}: non-finite gradient (inf/NaN) in param "
                                             f"group {gi}; nothing was updated")

    def _finite(self, group: dict[str, Any], grads: list[Tensor]) -> bool:
        """Whether ``grads`` (of ``group``) are all finite: the ``on_nonfinite`` decision.  Under
        :func:`tigeropt.attach_zero` the whole group's gradients decide (every rank holds every
        gradient after data-parallel averaging, so every rank skips or raises alike, as one process)."""
        whole = self._whole_groups() if self._zero is not None else None
        if whole is not None:
            gi = next(i for i, g in enumerate(self.param_groups) if g is group)
            grads = [p.grad for p in whole[gi]["params"] if p.grad is not None]
        return not grads or all_finite(grads)

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
                if to_local(g).sparse_dim() != 1:
                    raise RuntimeError(f"sparse gradients must be sparse along dim 0 only, got sparse_dim="
                                       f"{to_local(g).sparse_dim()}")
                pairs.append((p, g))
        check_sparse_rows(type(self).__name__, pairs, self.param_groups)


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
        if is_dtensor(tensors[0]):
            # Gathering rows (nonzero/index_select) has no DTensor sharding rule; with whole rows on
            # every rank (FSDP2 shards dim 0) the local rows are exactly the global rows.
            check_whole_rows(tensors[0])
            tensors = [to_local(t) for t in tensors]
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
        # torch's load-state-dict hooks run around the whole load, as torch's loader runs them: the pre
        # hooks first (what they return is what is checked and loaded, state included), the post hooks
        # once the state is converted; torch's loader below runs with none (it would run them again,
        # the post hooks before the state conversion that follows it)
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        post_hooks = self._optimizer_load_state_dict_post_hooks
        state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict
        for pre_hook in list(pre_hooks.values()):
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = self._check_state_dict(state_dict)
        flags = [{k: g.get(k) for k in LOADER_OPTIONS} for g in self.param_groups]
        self._optimizer_load_state_dict_pre_hooks = self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
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
                mine.update(convert_state(st, key, p, self._key_precision(key, group.get("state_precision")),
                                           self._state_shape(key, p, group)))
            step = st.get("step")
            if step is not None:
                step = step.detach() if isinstance(step, Tensor) else torch.tensor(float(step))
                device = p.device if self._group_of(p).get("capturable") else "cpu"
                mine["step"] = step.to(device=device, dtype=_scalar_dtype(), copy=True)
        self._drop_plans()  # the plans hold the replaced state tensors
        for post_hook in list(post_hooks.values()):
            post_hook(self)

    def _check_state_dict(self, state_dict: Any) -> list[dict[str, Any]]:
        """Raise unless ``state_dict`` loads into this optimizer; changes nothing.  Returns its groups."""
        name = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise TypeError(f"{name}: expected a dict with 'state' and 'param_groups' (an optimizer's "
                            f"state_dict()), got {type(state_dict).__name__}")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved_state, dict):
            raise TypeError(f"{name}: the checkpoint's 'state' must be a dict, got "
                            f"{type(saved_state).__name__}")
        if not (isinstance(saved_groups, (list, tuple))
                and all(isinstance(g, dict) and isinstance(g.get("params"), (list, tuple))
                        for g in saved_groups)):
            raise TypeError(f"{name}: the checkpoint's 'param_groups' must be a list of dicts, each with a "
                            "'params' list")
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
            _check_saved_state(name, pid, st, p, self.state_keys)
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
        for i, (candidate, group) in enumerate(zip(merged, self.param_groups)):
            try:
                # capturable stays this optimizer's, and torch.compile sets it on every group it traces on
                # a GPU, whatever the group's options (see _choose_path): not the checkpoint's to fail on.
                # The "stochastic rounding has no effect" warning: only for a group that had no such cause.
                self._validate({**candidate, "capturable": False}, warn=not sr_without_effect(group))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{name}: param group {i} of the checkpoint: {exc}") from None
        return saved_groups


def _check_saved_state(name: str, pid: Any, st: Any, p: Tensor, keys: tuple[str, ...]) -> None:
    """The types of one parameter's checkpoint state: a dict holding a step count (a finite number >= 0,
    or a one-element tensor of one) and, for each state key, a floating tensor (complex for a complex
    parameter), or uint8 8-bit codes beside a floating ``<key>_absmax``."""
    if not isinstance(st, dict):
        raise TypeError(f"{name}: the state of parameter {pid} must be a dict, got {type(st).__name__}")
    if any(k in st for k in keys) and st.get("step") is None:
        raise ValueError(f"{name}: the state of parameter {pid} lacks 'step' (has {sorted(st)})")
    step = st.get("step")
    if step is not None:
        if isinstance(step, Tensor):
            if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
                raise ValueError(f"{name}: 'step' of parameter {pid} must be a one-element real tensor, got "
                                 f"shape {tuple(step.shape)} and dtype {step.dtype}")
            value = float(step.detach().to("cpu", torch.float64))
        elif isinstance(step, (int, float)) and not isinstance(step, bool):
            value = float(step)
        else:
            raise TypeError(f"{name}: 'step' of parameter {pid} must be a number or a one-element tensor, "
                            f"got {type(step).__name__} ({step!r})")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}: 'step' of parameter {pid} must be a finite number >= 0, got {value!r}")
    for k in (*keys, *(key + "_absmax" for key in keys)):
        t = st.get(k)
        if t is None and k not in keys:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: state {k!r} of parameter {pid} must be a tensor, got "
                            f"{type(t).__name__}")
        codes = k in keys and t.dtype == torch.uint8
        if not (codes or t.is_floating_point() or (t.is_complex() and p.is_complex() and k in keys)):
            raise ValueError(f"{name}: state {k!r} of parameter {pid} has dtype {t.dtype}, expected a "
                             f"floating{' or complex' if p.is_complex() else ''} tensor"
                             + (" (or uint8 8-bit codes)" if k in keys else ""))


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


_is = operator.is_
_IS_SPARSE = operator.attrgetter("is_sparse")
_IS_CONTIGUOUS = Tensor.is_contiguous


def _ptrs(tensors: list[Tensor]) -> array:
    return array("Q", map(Tensor.data_ptr, tensors))


@dataclass
class _Bucket:
    """One (device, dtype) bucket of a group plan."""

    idx: list[int] | None  # positions of its tensors among the group's params with gradients (None: all)
    impl: Impl | None  # None: a low-precision plan (its C plan is the only way it runs)
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
    first: int | tuple[int, ...] | None = None  # low-precision plans: _first_index of the group


def _choose_path(name: str, kernel: str | None, fused: bool | None, foreach: bool | None, capturable: bool,
                 fused_ok: bool, device: torch.device, dtype: torch.dtype) -> str:
    """The path of one (group, device, dtype) bucket: 'reference', 'foreach', 'fused' or 'cpu'.

    A pure function of its arguments, run eagerly even while Dynamo traces a step (it asks the
    kernels package what is available: a build, a Triton import), its result a constant there.
    """
    if capturable and device.type == "cuda" and kernel and fused_ok and dtype in kernels.TRITON_DTYPES \
            and kernels.triton_usable():
        return "fused"
    # capturable=True where the Triton step cannot take the group (options it lacks, fp64, no Triton):
    # the path below, with the step counts on the device.  The constructor refuses capturable=True
    # with such options, but torch.compile sets it on every group it traces on a GPU (as for
    # torch.optim.Adam), and a compiled step must not raise for it.
    if fused:
        if not fused_ok:
            raise RuntimeError(f"{name}(fused=True) does not support the options "
                               "this group uses; use foreach=True")
        if dtype not in kernels.TRITON_DTYPES:
            raise TypeError(f"{name}(fused=True) supports fp32/bf16/fp16 parameters, "
                            f"not {dtype}; use foreach=True")
        return "fused"
    if foreach:
        return "foreach"
    if foreach is False and fused is None:
        return "reference"
    if fused is None and foreach is None and kernel is not None and fused_ok:
        if device.type == "cuda" and dtype in kernels.TRITON_DTYPES and kernels.triton_usable():
            return "fused"
        if device.type == "cpu" and kernels.cpu_fused_usable(kernel, dtype):
            return "cpu"
    return "foreach"


# What torch.compiler.assume_constant_result does, without importing torch._dynamo at import time.
_choose_path._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


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
