"""The optimizer step inside backward: each parameter is updated as soon as its gradient is ready.

    opt = tigeropt.optimizer_in_backward(model.parameters(), tigeropt.Tiger, lr=1e-3)
    for batch in data:
        loss = model(batch)
        loss.backward()          # every parameter is updated here, its gradient freed at once
        scheduler.step()         # LR schedulers work on ``opt`` as usual (no opt.step() call)

One optimizer of ``optimizer_class`` per parameter steps it from a
``Tensor.register_post_accumulate_grad_hook`` and then sets its ``.grad`` to None, so the
gradients of the whole model never exist at the same time (torch documents this pattern in
"How to save memory by fusing the optimizer step into the backward pass"; torchrec's
``apply_optimizer_in_backward`` does it for embedding tables).  The peak memory of a step then
holds the largest gradient rather than all of them (``benchmarks/bench_in_backward.py``).

The result equals an ordinary ``step()`` for rules that act element-, row- or tensor-wise
(every tigeropt optimizer, and torch's), including sparse gradients and ``lazy=True`` groups.
What needs every gradient before any update cannot run this way and is refused:

* ``opt.step()`` raises ``RuntimeError``: the update already happened in ``backward()``, so a
  training loop that still calls it (typically after ``clip_grad_norm_``, a ``GradScaler``'s
  ``unscale_``/``step`` or several ``backward()`` calls of gradient accumulation) stops at
  once instead of training silently with unclipped, scaled or per-micro-batch updates;
* ``GradScaler.step(opt)`` raises the same error;
* ``on_nonfinite="skip"`` or ``"raise"`` (a decision over all gradients of a group) is a
  ``ValueError``: in backward it could only skip or stop part of the model's update.

With ``DistributedDataParallel`` the step must wait for the all-reduce of the gradient: a hook on
the parameter would step each rank with its own gradient and the replicas drift apart.  DDP runs
in-backward optimizers itself (torch's ``_apply_optimizer_in_backward`` protocol: it finds them in
``param._in_backward_optimizers`` at its first forward, removes their hooks and steps them from
its communication hook, after the all-reduce).  Built while a process group is initialized,
``optimizer_in_backward`` joins that protocol, so build it after ``init_process_group`` and before
the DDP model's first forward (before or after wrapping the model); the result equals one process
on the whole batch.  torch's hook needs an accelerator (it waits on the accelerator's stream at the
end of backward): without one (CPU-only DDP) the first step raises ``RuntimeError`` before
updating anything.  Built before ``init_process_group``, it warns at its first step on a
multi-rank group (the step may have used a rank-local gradient).  FSDP2 needs nothing: it runs the
post-accumulate-grad hooks of its sharded parameters after the reduce-scatter.

The object is a ``torch.optim.Optimizer`` (a :class:`~tigeropt.MixedOptimizer` of the
per-parameter optimizers): ``param_groups`` (one group per parameter, the inner optimizers'
dicts, so schedulers and ``group["lr"] = ...`` reach them), ``state``,
``state_dict``/``load_state_dict`` (a resumed run continues bit-identically),
``remove()`` detaches the hooks: backward() then leaves the gradients in ``.grad`` and ``step()``
(and ``GradScaler.step``) is an ordinary step of every parameter.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._base import TigerOptimizer
from ._dtensor import is_dtensor
from ._validate import check_ordered_params
from .mixed import MixedOptimizer

__all__ = ["optimizer_in_backward", "OptimizerInBackward"]

_REFUSED = ("the optimizer step runs inside backward() (optimizer_in_backward): each parameter was "
            "already updated when its gradient was ready, and the gradient freed. Remove the step() "
            "call. What needs all gradients before the update cannot run this way: gradient clipping "
            "(clip_grad_norm_), GradScaler (unscale_/inf checks) and gradient accumulation over several "
            "backward() calls; use an ordinary optimizer for those")


class _DDPStep:
    """What DDP's communication hook steps after the all-reduce (an entry of
    ``param._in_backward_optimizers``): the hook body of one parameter."""

    def __init__(self, hook: Callable[[Tensor], None], param: Tensor) -> None:
        self._hook, self._param = hook, param

    def step(self) -> None:
        if not _accelerator_available():
            raise RuntimeError(_NO_ACCELERATOR)
        self._hook(self._param)


_NO_ACCELERATOR = ("optimizer_in_backward with DistributedDataParallel: DDP steps in-backward optimizers "
                   "from its communication hook, which waits on an accelerator stream at the end of "
                   "backward and fails without one (torch's _apply_optim_in_backward_hook); nothing was "
                   "updated. On CPU use an ordinary optimizer with DDP, or FSDP2 (fully_shard), which "
                   "runs optimizer_in_backward's hooks after its reduce-scatter")


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return accelerator is not None and accelerator.is_available()


def _ddp_handle_map() -> Any:
    """torch's map parameter -> in-backward hook handles, which DDP removes when it takes the step
    over; None without an initialized process group (no DDP can be built yet; importing
    torch.distributed.optim costs seconds)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        from torch.distributed.optim import apply_optimizer_in_backward
    except ImportError:  # pragma: no cover - a torch without the protocol
        return None
    return getattr(apply_optimizer_in_backward, "param_to_optim_hook_handle_map", None)


class OptimizerInBackward(MixedOptimizer):
    """Per-parameter optimizers stepped from post-accumulate-grad hooks.  See the module docstring."""

    @property
    def _step_supports_amp_scaling(self) -> bool:  # type: ignore[override]
        """While attached, GradScaler.step hands itself to step(), which refuses; after remove(), GradScaler
        unscales and checks the gradients itself and calls the ordinary step()."""
        return self.attached

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 optimizer_class: Callable[..., Optimizer], **kwargs: Any) -> None:
        if not callable(optimizer_class):
            raise TypeError(f"optimizer_class must be an optimizer class (or factory), got "
                            f"{type(optimizer_class).__name__}")
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of tensors or param-group dicts, got a Tensor")
        groups = list(params)
        if not groups:
            raise ValueError("optimizer_in_backward got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self._factory = (optimizer_class, kwargs)
        self._params, inner = self._build(groups, set())
        super().__init__(inner)
        self._handles: list[Any] = []
        self._ddp_steps: list[tuple[Tensor, _DDPStep]] = []
        self._warned = False
        self._attach()

    def _build(self, groups: list[dict[str, Any]], held: set[int]) -> tuple[list[Tensor], list[Optimizer]]:
        """The parameters of ``groups`` (checked; none of them in ``held``) and one new optimizer each."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            params, inner = self._build_each(groups, held)
        # one optimizer per parameter: a warning about the options (stochastic rounding with no effect)
        # came once per parameter; the user passed them once
        seen_warnings = set()
        for w in caught:
            if (w.category, str(w.message)) not in seen_warnings:
                seen_warnings.add((w.category, str(w.message)))
                warnings.warn(w.message, w.category, stacklevel=4)
        return params, inner

    def _build_each(self, groups: list[dict[str, Any]], held: set[int]
                    ) -> tuple[list[Tensor], list[Optimizer]]:
        optimizer_class, kwargs = self._factory
        params: list[Tensor] = []
        inner: list[Optimizer] = []
        seen = set(held)
        for group in groups:
            ps = group["params"]
            check_ordered_params(ps)
            ps = [ps] if isinstance(ps, Tensor) else list(ps)
            options = {k: v for k, v in group.items() if k != "params"}
            for item in ps:
                # named parameters (model.named_parameters(), as torch.optim takes them): the inner
                # optimizer gets the (name, tensor) pair and keeps the name in its param_names
                named = (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                         and isinstance(item[1], Tensor))
                p = item[1] if named else item
                if not isinstance(p, Tensor):
                    raise TypeError("optimizer_in_backward: params must hold tensors (or (name, tensor) "
                                    f"pairs), got {type(p).__name__}")
                if id(p) in seen:
                    raise ValueError(f"optimizer_in_backward: a parameter of shape {tuple(p.shape)} is given "
                                     "twice")
                if not p.is_leaf or not p.requires_grad:
                    raise ValueError("optimizer_in_backward: parameters must be leaf tensors with "
                                     f"requires_grad=True (shape {tuple(p.shape)})")
                seen.add(id(p))
                params.append(p)
                opt = optimizer_class([{"params": [item], **options}], **kwargs)
                mode = opt.param_groups[0].get("on_nonfinite", "ignore") if opt.param_groups else "ignore"
                if mode != "ignore":
                    raise ValueError(
                        f"Invalid on_nonfinite: {mode!r} (optimizer_in_backward steps each parameter as its "
                        "gradient arrives: 'skip' would skip only the parameters whose own gradient is "
                        "non-finite and step the others, and 'raise' would raise after earlier parameters "
                        "were updated; both need all gradients first: use an ordinary optimizer, or "
                        "GradScaler with one)")
                inner.append(opt)
        return params, inner

    def _attach(self, start: int = 0) -> None:
        handle_map = _ddp_handle_map()
        self._ddp_wired = handle_map is not None
        self._number(start)
        for k, (p, opt) in enumerate(zip(self._params, self.optimizers)):
            if k < start:
                continue
            hook = self._hook(opt)
            handle = p.register_post_accumulate_grad_hook(hook)
            self._handles.append(handle)
            if handle_map is not None:  # DDP (at its first forward) removes the handle, steps _DDPStep
                step = _DDPStep(hook, p)
                self._ddp_steps.append((p, step))
                if not hasattr(p, "_in_backward_optimizers"):
                    p._in_backward_optimizers = []  # type: ignore[attr-defined]
                p._in_backward_optimizers.append(step)  # type: ignore[attr-defined]
                handle_map.setdefault(p, []).append(handle)

    def _number(self, start: int = 0) -> None:
        """Give the per-parameter optimizers from ``start`` on their parameter's position as the first
        index of their rounding hash: the stochastic rounding of one optimizer over all parameters
        (attached or not: after :meth:`remove`, ``step()`` steps them as one optimizer would)."""
        for k, opt in enumerate(self.optimizers[start:], start=start):
            if isinstance(opt, TigerOptimizer):
                opt._param_index_offset = self._param_index_offset + k

    def add_param_group(self, param_group: dict[str, Any], optimizer: Any = None) -> None:
        """Add a param group (``params`` and its options): like the constructor's groups, one new
        optimizer per parameter, stepped by its own hook.  (MixedOptimizer's ``add_param_group`` put
        the parameters into an existing per-parameter optimizer: they were stepped by another
        parameter's hook, with whatever gradient they held then, and their gradients never freed.)"""
        if optimizer is not None:
            raise TypeError("OptimizerInBackward.add_param_group takes no optimizer: each parameter gets "
                            "its own")
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params, inner = self._build([param_group], {id(p) for p in self._params})
        start = len(self._params)
        self._params.extend(params)
        self.optimizers.extend(inner)
        self._number(start)  # after remove() too (was: only where the hooks were attached, so a group
        # added after remove() rounded with the first parameter's index)
        if self.attached:
            self._attach(start)

    def _hook(self, opt: Optimizer) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            if not self._ddp_wired and not self._warned:
                self._warn_unwired(p)
            for pre in self._optimizer_step_pre_hooks.values():
                pre(self, (), {})
            opt.step()
            p.grad = None  # free it now: no step needs it any more
            self._opt_called = True  # type: ignore[attr-defined]  # what LR schedulers check
            for post in self._optimizer_step_post_hooks.values():
                post(self, (), {})

        return hook

    def _warn_unwired(self, p: Tensor) -> None:
        self._warned = True
        dist = torch.distributed
        if (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
                and not is_dtensor(p)):  # DTensor (FSDP2) parameters: reduced before the hook
            warnings.warn("optimizer_in_backward was built before torch.distributed.init_process_group: if "
                          "these parameters belong to a DistributedDataParallel model, each rank stepped "
                          "with its own gradient before the all-reduce. Build it after init_process_group "
                          "(and before the DDP model's first forward) so that DDP steps it after the "
                          "all-reduce", stacklevel=2)

    def remove(self) -> None:
        """Detach the hooks: backward() leaves gradients in ``.grad`` again and updates nothing; ``step()``
        then steps every parameter, as an ordinary optimizer."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, step in self._ddp_steps:
            steps = getattr(p, "_in_backward_optimizers", [])
            if step in steps:
                steps.remove(step)
        self._ddp_steps.clear()

    @property
    def attached(self) -> bool:
        """Whether the hooks are attached (False after :meth:`remove`)."""
        return bool(self._handles)

    def __repr__(self) -> str:
        name = type(self.optimizers[0]).__name__
        return f"OptimizerInBackward({name} x {len(self.optimizers)} parameters, attached={self.attached})"

    def _own_state(self) -> dict[str, Any]:
        return {"optimizers": self.optimizers, "defaults": self.defaults, "_params": self._params,
                "_handles": [], "_ddp_steps": [], "_warned": False, "_factory": self._factory,
                "_copy_attached": self.attached}

    def __setstate__(self, state: dict[str, Any]) -> None:
        attached = state.pop("_copy_attached", True)
        super().__setstate__(state)
        self._number()  # the inner optimizers' own pickled state does not hold their hash offsets
        if attached:  # a copy updates its own (copied) parameters; a copy of a removed one stays removed
            self._attach()

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """Refused while the hooks are attached: the step runs inside backward() (``RuntimeError`` saying
        why).  After :meth:`remove`, backward() leaves the gradients and this is an ordinary step of every
        parameter (it raised the same error, which no longer held, and nothing could step them)."""
        if self.attached or kwargs:
            raise RuntimeError(_REFUSED)
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are freed in backward already; clears any left (e.g. after :meth:`remove`)."""
        super().zero_grad(set_to_none=set_to_none)


def optimizer_in_backward(params: Iterable[Tensor] | Iterable[dict[str, Any]],
                          optimizer_class: Callable[..., Optimizer], **kwargs: Any) -> OptimizerInBackward:
    """Update each parameter inside ``backward()`` as soon as its gradient is accumulated.

    ``params`` are tensors or param-group dicts (as for any optimizer); ``optimizer_class`` and
    ``kwargs`` build one optimizer per parameter (``optimizer_class([{"params": [p], **group}],
    **kwargs)``).  Returns an :class:`OptimizerInBackward`: see :mod:`tigeropt.in_backward` for
    what works (schedulers, checkpoints, sparse gradients, ``lazy=True``) and what is refused.
    """
    return OptimizerInBackward(params, optimizer_class, **kwargs)
