"""Optimizers by name, for configs and training frameworks.

    opt = tigeropt.create_optimizer(model, "tiger", lr=3e-4, weight_decay=0.1)

Built-in names (case and ``-``/``_`` do not matter):

=================  =====================================================================
``"tiger"``        :class:`tigeropt.Tiger`
``"lion"``         :class:`tigeropt.Lion`
``"adax"``         :class:`tigeropt.AdaX` (L2 weight decay, the official AdaX)
``"adaxw"``        :class:`tigeropt.AdaX` with ``decoupled_weight_decay=True``; lr and weight
                   decay default to the authors' AdaX-W values 5e-3 and 5e-2
``"adagrad"``      :class:`tigeropt.Adagrad`
``"adagrad_glove"`` :class:`tigeropt.Adagrad` with ``glove=True``
``"adamw"``        ``torch.optim.AdamW``
``"mixed"``        :func:`tigeropt.split_embeddings`: ``embedding_optimizer`` (default
                   ``"adamw"``) for the ``nn.Embedding`` weights, ``other_optimizer``
                   (default ``"tiger"``) for the rest; both names from this registry, both
                   get ``lr``/``weight_decay``; ``embedding_kwargs``/``other_kwargs`` add or
                   override keyword arguments for one side (e.g. a larger lr for AdamW)
=================  =====================================================================

Given a module, the trainable parameters are split into two param groups (the reason timm's
``create_optimizer_v2`` exists): biases and normalization weights get ``weight_decay=0``
(:data:`tigeropt.DEFAULT_NO_DECAY`, or ``no_decay=`` with :func:`tigeropt.param_groups`'s
matches), everything else the optimizer's weight decay.  Given parameters or param-group
dicts, they go to the optimizer as they are.  ``lr``/``weight_decay`` left at ``None`` keep
the optimizer's own defaults; other keyword arguments go to the optimizer.

:func:`register_optimizer` adds a name: ``factory(params, **kwargs)`` must return a
``torch.optim.Optimizer`` (a class such as ``torch.optim.SGD`` is such a factory).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .adagrad import Adagrad
from .adax import AdaX
from .lion import Lion
from .mixed import split_embeddings
from .param_groups import DEFAULT, param_groups
from .tiger import Tiger

__all__ = ["create_optimizer", "register_optimizer", "available_optimizers"]

OptimizerFactory = Callable[..., Optimizer]


class _Entry:
    def __init__(self, factory: OptimizerFactory, takes_module: bool) -> None:
        self.factory, self.takes_module = factory, takes_module


_REGISTRY: dict[str, _Entry] = {}


def _key(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    return name.strip().lower().replace("-", "_")


def available_optimizers() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def register_optimizer(name: str, factory: OptimizerFactory, *, takes_module: bool = False,
                       overwrite: bool = False) -> None:
    """Make ``create_optimizer(model_or_params, name, ...)`` build ``factory``'s optimizer.

    Args:
        name: the new name (stored lower-case, ``-`` as ``_``).
        factory: ``factory(params, **kwargs) -> torch.optim.Optimizer``, e.g. ``torch.optim.SGD``
            or ``functools.partial(torch.optim.SGD, momentum=0.9)``; it receives the param groups
            (no decay for biases/norms when given a module) and ``lr``/``weight_decay`` when set.
        takes_module: the factory needs the module itself (``factory(model, **kwargs)``, like
            ``"mixed"``; it also gets ``no_decay`` when the caller sets it); ``create_optimizer``
            then refuses plain parameters.
        overwrite: replace an existing name (else that is a ``ValueError``).
    """
    key = _key(name)
    if not key:
        raise ValueError(f"Invalid name: {name!r} (must not be empty)")
    if not callable(factory):
        raise TypeError(f"factory must be callable, not {type(factory).__name__}")
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"Invalid name: {name!r} (already registered; pass overwrite=True to replace it)")
    _REGISTRY[key] = _Entry(factory, takes_module)


def _split_decay(model: nn.Module, no_decay: Any) -> list[dict[str, Any]]:
    """Two groups: parameters with the optimizer's weight decay, and the no-decay ones (wd 0)."""
    groups = param_groups(model, lr=1.0, weight_decay=1.0, no_decay=no_decay, names=False)
    decay = [p for g in groups if g["weight_decay"] != 0.0 for p in g["params"]]
    plain = [p for g in groups if g["weight_decay"] == 0.0 for p in g["params"]]
    out: list[dict[str, Any]] = []
    if decay:
        out.append({"params": decay})
    if plain:
        out.append({"params": plain, "weight_decay": 0.0})
    return out


def create_optimizer(model_or_params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]], name: str,
                     lr: float | Tensor | None = None, weight_decay: float | None = None, *,
                     no_decay: Any = DEFAULT, **kwargs: Any) -> Optimizer:
    """The optimizer registered as ``name`` over a module or parameters (see the module docstring).

    Args:
        model_or_params: an ``nn.Module`` (biases and norm weights then get no weight decay), or
            parameters / param-group dicts (passed on unchanged).
        name: a registered name (:func:`available_optimizers`); unknown names raise ``ValueError``
            listing the known ones.
        lr, weight_decay: passed to the optimizer when not ``None`` (else its defaults apply).
        no_decay: with a module, what gets no weight decay (:func:`tigeropt.param_groups`'s
            ``no_decay``; default biases and normalization weights, ``()`` for none).
        **kwargs: more keyword arguments of the optimizer (e.g. ``beta=0.9`` for Tiger).
    """
    key = _key(name)
    entry = _REGISTRY.get(key)
    if entry is None:
        raise ValueError(f"Invalid name: {name!r} (known optimizers: {', '.join(available_optimizers())})")
    if lr is not None:
        if not isinstance(lr, (numbers.Real, Tensor)) or isinstance(lr, bool):
            raise TypeError(f"lr must be a number or a tensor, not {type(lr).__name__}")
        kwargs["lr"] = lr
    if weight_decay is not None:
        if not isinstance(weight_decay, numbers.Real) or isinstance(weight_decay, bool):
            raise TypeError(f"weight_decay must be a number, not {type(weight_decay).__name__}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"Invalid weight_decay: {weight_decay!r} (must be a finite number >= 0)")
        kwargs["weight_decay"] = weight_decay
    if entry.takes_module:
        if not isinstance(model_or_params, nn.Module):
            raise TypeError(f"create_optimizer(..., {name!r}) needs the model (an nn.Module), not "
                            f"{type(model_or_params).__name__}")
        if no_decay is not DEFAULT:
            kwargs["no_decay"] = no_decay
        return entry.factory(model_or_params, **kwargs)
    if isinstance(model_or_params, nn.Module):
        params: Any = _split_decay(model_or_params, no_decay)
        if not params:
            raise ValueError("create_optimizer: the model has no trainable parameter")
    else:
        if isinstance(model_or_params, Tensor):
            raise TypeError("model_or_params must be an nn.Module or an iterable of tensors or dicts, "
                            "not a single tensor (wrap it in a list)")
        params = model_or_params
    return entry.factory(params, **kwargs)


# ------------------------------------------------------------------------------- built-ins
def _adaxw(params: Any, lr: float | Tensor = 5e-3, weight_decay: float = 5e-2, **kwargs: Any) -> AdaX:
    return AdaX(params, lr=lr, weight_decay=weight_decay, decoupled_weight_decay=True, **kwargs)


def _adagrad_glove(params: Any, **kwargs: Any) -> Adagrad:
    return Adagrad(params, glove=True, **kwargs)


def _mixed(model: nn.Module, *, embedding_optimizer: str = "adamw", other_optimizer: str = "tiger",
           embedding_kwargs: dict[str, Any] | None = None, other_kwargs: dict[str, Any] | None = None,
           no_decay: Any = DEFAULT, **kwargs: Any) -> Optimizer:
    """split_embeddings with both sides built by name; ``kwargs`` (lr, weight_decay, ...) go to both."""
    for side in (embedding_optimizer, other_optimizer):
        if _REGISTRY.get(_key(side)) is None or _REGISTRY[_key(side)].takes_module:
            usable = [n for n in available_optimizers() if not _REGISTRY[n].takes_module]
            raise ValueError(f"Invalid optimizer for 'mixed': {side!r} (one of {', '.join(usable)})")
    emb_kw = {**kwargs, **(embedding_kwargs or {})}
    other_kw = {**kwargs, **(other_kwargs or {})}

    def build(side: str, kw: dict[str, Any]) -> Callable[[list[Tensor]], Optimizer]:
        def make(params: list[Tensor]) -> Optimizer:
            ids = {id(p) for p in params}  # this side's share of the model's decay / no-decay groups
            groups = [{**g, "params": [p for p in g["params"] if id(p) in ids]}
                      for g in _split_decay(model, no_decay)]
            groups = [g for g in groups if g["params"]]
            return _REGISTRY[_key(side)].factory(groups, **kw)
        return make

    return split_embeddings(model, build(embedding_optimizer, emb_kw), build(other_optimizer, other_kw))


for _name, _factory in (("tiger", Tiger), ("lion", Lion), ("adax", AdaX), ("adaxw", _adaxw),
                        ("adagrad", Adagrad), ("adagrad_glove", _adagrad_glove),
                        ("adamw", torch.optim.AdamW)):
    register_optimizer(_name, _factory)
register_optimizer("mixed", _mixed, takes_module=True)
