"""Tiger: a Tight-fisted Optimizer (Su 2023, https://kexue.fm/archives/9512, github.com/bojone/tiger).

Lion with b1 = b2 = beta, so the interpolation and the momentum are one tensor:

    m = beta*m + (1-beta)*g
    p = p - lr*(sign(m) + wd*p)

sign(0) = 0; sign of an inf/NaN momentum is NaN on every path, so a non-finite
gradient makes the element's parameter NaN (as AdamW does), never a silent freeze.

Defaults are the original's: lr=1e-3, beta=0.965, weight_decay=0.01.  State:
``exp_avg`` (m), one tensor the size of the parameter — the cheapest optimizer
here (20 bytes moved per fp32 parameter and step).

The original (TensorFlow) implementation's extras are options, off by default:

* ``lr_scaling=True`` — lr by parameter kind (LAMB-like): "bias"/"norm" params
  get lr*0.5 and no weight decay; "embedding" tables lr*RMS(row); everything
  else ("dense") lr*RMS(tensor), RMS of the parameter before the step.  A
  group's ``kind`` says which kind its tensors are; ``"auto"`` (default) calls
  tensors with ndim <= 1 "bias" and the rest "dense" (use
  :func:`tigeropt.tiger.kind_groups` to also tell embeddings and norms apart).
* ``accumulation_steps=k`` — gradient accumulation without a buffer: call
  ``step()`` and ``zero_grad()`` every micro-step; m decays only on the first
  micro-step of a cycle, each adds ((1-beta)/k)*g, and p moves on the last.
* ``nan_guard=True`` — a tensor whose gradient holds a NaN keeps its m and is
  shrunk, p = (p - c)*shrink_ratio + c, with c = 1 for "norm" kind, else 0.

With any extra on, the foreach path runs the reference update; ``fused=True`` (and
``capturable=True``) with an extra is refused in the constructor (ValueError), and the
default path (``fused=None``) picks the foreach path for such a group.

LR schedulers that cycle momentum (``OneCycleLR``/``CyclicLR`` with the default
``cycle_momentum=True``) look for ``betas`` (or ``momentum``) in ``defaults`` and
write ``group["betas"] = (new, *group["betas"][1:])``.  Tiger keeps its one ``beta``
and mirrors it as ``betas = (beta, beta)`` in ``defaults`` and in every param group
(Tiger is Lion with b1 = b2 = beta), so a scheduler cycles Tiger's beta, also inside a
:class:`~tigeropt.MixedOptimizer` next to AdamW or Lion.  At each ``step()`` a group
whose ``betas`` was written since Tiger mirrored it (by a scheduler, or by hand, also as
an equal pair ``(0.9, 0.9)``) takes ``beta = betas[0]``; otherwise ``beta`` wins (set
``group["beta"]`` by hand as before); then ``betas = (beta, beta)`` again.  (Where Tiger has
not mirrored the group yet, e.g. a group just loaded, a write is recognized by
``betas[0] != betas[1]``, what a scheduler's write leaves.)  A param group given ``betas`` but no ``beta``
(constructor or ``add_param_group``) takes ``beta = betas[0]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ._base import TigerOptimizer, global_bool, nan_sign, to_float, working, write_back
from ._ops import compiling
from ._validate import check_betas, check_bool, check_choice, check_int, check_lr, check_number
from .lazy import EMBEDDING_TYPES
from .param_groups import NORM_TYPES

__all__ = ["Tiger", "kind_groups"]

KINDS = ("auto", "bias", "norm", "embedding", "dense")


def _single_tensor_tiger(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                         state_steps: list[Tensor], *, lr: float | Tensor, beta: float,
                         weight_decay: float, maximize: bool, lr_scaling: bool = False,
                         accumulation_steps: int = 1, nan_guard: bool = False, shrink_ratio: float = 0.99,
                         kind: str = "auto") -> None:
    lr = to_float(lr)
    k = accumulation_steps
    for param, grad, m, step_t in zip(params, grads, exp_avgs, state_steps):
        p = param.to(m.dtype)
        g = grad.to(m.dtype)
        if maximize:
            g = -g
        this_kind = kind if kind != "auto" else ("bias" if p.dim() <= 1 else "dense")
        if nan_guard and global_bool(torch.isnan(g).any()):
            c = 1.0 if this_kind == "norm" else 0.0
            p.sub_(c).mul_(shrink_ratio).add_(c)
        else:
            step = int(step_t.item()) if k > 1 else 1
            first_micro_step = (step - 1) % k == 0
            m.mul_(beta if first_micro_step else 1.0).add_(g, alpha=(1 - beta) / k)
            if step % k == 0:
                lr_t: float | Tensor = lr
                wd = weight_decay
                if lr_scaling:
                    if this_kind in ("bias", "norm"):
                        lr_t, wd = lr * 0.5, 0.0
                    elif this_kind == "embedding":
                        lr_t = lr * p.square().mean(dim=-1, keepdim=True).sqrt()
                    else:
                        lr_t = lr * p.square().mean().sqrt()
                update = nan_sign(m).add_(p, alpha=wd)
                if isinstance(lr_t, Tensor):
                    p.sub_(update.mul_(lr_t))
                else:
                    p.add_(update, alpha=-lr_t)
        if p is not param:
            param.copy_(p)


def _multi_tensor_tiger(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        state_steps: list[Tensor], *, lr: float | Tensor, beta: float,
                        weight_decay: float, maximize: bool, lr_scaling: bool = False,
                        accumulation_steps: int = 1, nan_guard: bool = False, shrink_ratio: float = 0.99,
                        kind: str = "auto") -> None:
    if lr_scaling or accumulation_steps > 1 or nan_guard:
        _single_tensor_tiger(params, grads, exp_avgs, state_steps, lr=lr, beta=beta,
                             weight_decay=weight_decay, maximize=maximize, lr_scaling=lr_scaling,
                             accumulation_steps=accumulation_steps, nan_guard=nan_guard,
                             shrink_ratio=shrink_ratio, kind=kind)
        return
    if not params:
        return
    lr = to_float(lr)
    dtype = exp_avgs[0].dtype
    ps, gs = working(params, dtype), working(grads, dtype)
    torch._foreach_mul_(exp_avgs, beta)
    torch._foreach_add_(exp_avgs, gs, alpha=-(1 - beta) if maximize else 1 - beta)
    update = torch._foreach_sign(exp_avgs)
    torch._foreach_add_(update, exp_avgs, alpha=0.0)  # nan_sign: NaN for a non-finite m
    if weight_decay != 0.0:
        torch._foreach_add_(update, ps, alpha=weight_decay)
    torch._foreach_add_(ps, update, alpha=-lr)
    write_back(params, ps)


class Tiger(TigerOptimizer):
    """Tiger (Su 2023).  See the module docstring for the rule and the original's extras.

    Args:
        params: parameters or param-group dicts (a group may set ``kind``).
        lr: learning rate (default 1e-3, the original's).
        beta: momentum decay (default 0.965); LR schedulers see it as ``betas = (beta, beta)``.
        weight_decay: ``p -= lr*wd*p`` (default 0.01).
        maximize, foreach, fused, on_nonfinite, capturable: see :mod:`tigeropt._base`.
        state_precision, stochastic_rounding, sr_seed: low-precision state and bf16 stochastic
            rounding, see :mod:`tigeropt._base`.
        lr_scaling, accumulation_steps, nan_guard, shrink_ratio, kind: the original's extras.
        lazy: per-group; only rows (dim 0) with gradient change (sparse gradients allowed).

    Setting Tiger and Lion (``benchmarks/bench_quality.py``; README "Setting Tiger and Lion"):
    start from a tuned AdamW: lr = AdamW's lr / 3 and weight_decay = AdamW's x 3 (the same
    decay per step, lr*wd).  The default beta=0.965 is made for long runs: in a run of about a
    thousand optimizer steps or fewer use beta about 0.8 (1/(1-beta) = 5 steps of momentum).  On
    the study's 600-step char-LM, beta 0.965 ended 22% above AdamW's best held-out loss, beta 0.8
    2.6% (mean of 3 seeds).
    :func:`tigeropt.suggest_hparams` ("tiger", adamw_lr=..., adamw_weight_decay=..., steps=...)
    returns these as keyword arguments.
    """

    state_keys = ("exp_avg",)
    reference_impl = staticmethod(_single_tensor_tiger)
    foreach_impl = staticmethod(_multi_tensor_tiger)
    kernel = "tiger"

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float | Tensor = 1e-3,
                 beta: float = 0.965, weight_decay: float = 0.01, *, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None, lr_scaling: bool = False,
                 accumulation_steps: int = 1, nan_guard: bool = False, shrink_ratio: float = 0.99,
                 kind: str = "auto", lazy: bool = False, on_nonfinite: str = "ignore",
                 capturable: bool = False, state_precision: str | None = None,
                 stochastic_rounding: bool = False, sr_seed: int = 0) -> None:
        defaults = dict(lr=lr, beta=beta, betas=(beta, beta), weight_decay=weight_decay,
                        lr_scaling=lr_scaling, accumulation_steps=accumulation_steps, nan_guard=nan_guard,
                        shrink_ratio=shrink_ratio, kind=kind, lazy=lazy)
        super().__init__(params, defaults, maximize=maximize, foreach=foreach, fused=fused,
                         on_nonfinite=on_nonfinite, capturable=capturable,
                         state_precision=state_precision, stochastic_rounding=stochastic_rounding,
                         sr_seed=sr_seed)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        betas = param_group.get("betas") if isinstance(param_group, dict) else None
        added = isinstance(betas, (tuple, list)) and len(betas) == 2 and "beta" not in param_group
        if added:
            # a group that sets only betas (written for Lion, or by hand) means beta = betas[0]; the
            # defaults' beta would otherwise win the mirror and the group's betas be dropped silently.
            # Set in the caller's dict, which becomes the group (as torch stores it), not in a copy
            param_group["beta"] = betas[0]
        try:
            super().add_param_group(param_group)
        except Exception:
            if added:
                del param_group["beta"]
            raise
        self._sync_beta(self.param_groups[-1])  # {"beta": 0.9} got the default betas: mirror 0.9

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._remirror()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._remirror()

    def _remirror(self) -> None:
        """New group objects (a copy, a loaded checkpoint): mirror each group's beta afresh."""
        self._mirrors: dict[int, tuple[dict[str, Any], Any]] = {}
        for group in self.param_groups:
            self._sync_beta(group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        if "betas" in group:  # Tiger's mirror of beta for LR schedulers (module docstring)
            check_betas("betas", group["betas"], [(0.0, 1.0, False, True)] * 2)
        check_number("beta", group["beta"], 0.0, 1.0, hi_open=True)
        check_number("weight_decay", group["weight_decay"], 0.0)
        check_bool("lr_scaling", group["lr_scaling"])
        check_int("accumulation_steps", group["accumulation_steps"], 1)
        check_bool("nan_guard", group["nan_guard"])
        check_number("shrink_ratio", group["shrink_ratio"], 0.0, 1.0)
        check_choice("kind", group["kind"], KINDS)
        if group["lazy"] and group["lr_scaling"] and group["kind"] in ("auto", "dense"):
            raise ValueError("lazy=True with lr_scaling=True needs kind='embedding', 'bias' or 'norm': "
                             "a whole-tensor RMS is not defined on the touched rows alone")

    def _unfused_options(self, group: dict[str, Any]) -> str:
        used = [k for k in ("lr_scaling", "nan_guard") if group[k]]
        if group["accumulation_steps"] > 1:
            used.append("accumulation_steps > 1")
        return ", ".join(used)

    def _sync_beta(self, group: dict[str, Any]) -> None:
        """Take a scheduler's (or a user's) ``betas`` write into ``beta`` and mirror ``beta`` back (module
        docstring).  The mirror written last is remembered per group: any other ``betas`` object was
        written since, also an equal pair (which the rule ``betas[0] != betas[1]`` alone dropped)."""
        betas = group.get("betas")
        if betas is None:
            return
        traced = compiling()  # while Dynamo traces a step: the plain rule (no guards on the memory)
        mirrors = None if traced else self.__dict__.setdefault("_mirrors", {})
        mirror = None if mirrors is None else mirrors.get(id(group))
        written = betas[0] != betas[1] if mirror is None or mirror[0] is not group else betas is not mirror[1]
        if written:
            group["beta"] = betas[0]
        if betas[0] != group["beta"] or betas[1] != group["beta"]:
            group["betas"] = (group["beta"], group["beta"])
        if mirrors is not None:
            mirrors[id(group)] = (group, group["betas"])

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        self._sync_beta(group)
        hyper = dict(lr=group["lr"], beta=group["beta"], weight_decay=group["weight_decay"],
                     maximize=group["maximize"])
        if not self._fused_ok(group):
            hyper.update(lr_scaling=group["lr_scaling"], accumulation_steps=group["accumulation_steps"],
                         nan_guard=group["nan_guard"], shrink_ratio=group["shrink_ratio"], kind=group["kind"])
        return hyper


def kind_groups(model: nn.Module, **options: Any) -> list[dict[str, Any]]:
    """Param groups of ``model`` with Tiger's ``kind`` set from the module types.

    ``nn.Embedding``/``nn.EmbeddingBag`` weights are "embedding", the weights of
    normalization layers "norm", other tensors with ndim <= 1 "bias", the rest
    "dense".  ``options`` (e.g. ``lr=...``) are copied into every group.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid type for model: expected an nn.Module, got {type(model).__name__}")
    by_kind: dict[str, list[Tensor]] = {k: [] for k in KINDS[1:]}
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, EMBEDDING_TYPES):
                kind = "embedding"
            elif isinstance(module, NORM_TYPES) and name == "weight":
                kind = "norm"
            else:
                kind = "bias" if p.dim() <= 1 else "dense"
            by_kind[kind].append(p)
    return [dict(params=ps, kind=k, **options) for k, ps in by_kind.items() if ps]
