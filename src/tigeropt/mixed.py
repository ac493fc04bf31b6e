"""One optimizer object that drives several optimizers over disjoint parameters (seed 000's second remedy).

Seed 000 suggests training the embedding of a model with an Adam-type
optimizer and the rest with Tiger: a sign optimizer pushes a rarely used row
by ``lr`` every step towards ``-sign(m)/weight_decay``, while Adam's update
shrinks with its momentum.  :class:`MixedOptimizer` makes such a split look like
one ``torch.optim.Optimizer`` to the code around it (LR schedulers,
``torch.amp.GradScaler``, ``clip_grad_norm_``, checkpoints, Trainer loops), and
:func:`split_embeddings` builds the common split in one line::

    opt = tigeropt.split_embeddings(model)        # nn.Embedding weights: AdamW, the rest: Tiger
    opt = tigeropt.split_embeddings(model, functools.partial(torch.optim.AdamW, lr=3e-4),
                                    lambda ps: tigeropt.Tiger(ps, lr=3e-4))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._base import TigerOptimizer
from ._validate import check_ordered_params
from .lazy import EMBEDDING_TYPES, _WrapperOptimizer, embedding_weights
from .tiger import Tiger

__all__ = ["MixedOptimizer", "split_embeddings"]

OptimizerFactory = Callable[[list[Tensor]], Optimizer]
#: keys of ``defaults`` by which torch's LR schedulers recognise an optimizer with momentum
MOMENTUM_KEYS = ("betas", "momentum")


def _describe(i: int, opt: Optimizer) -> str:
    return f"optimizer {i} ({type(opt).__name__})"


class _MergedState(MutableMapping):
    """``MixedOptimizer.state``: one mapping over the inner optimizers' ``state`` dicts.

    Reading ``state[p]`` for a parameter without state gives the owning
    optimizer's fresh entry (its ``state`` is a ``defaultdict``); a tensor that
    no inner optimizer holds is a ``KeyError``.
    """

    def __init__(self, owner: MixedOptimizer) -> None:
        self._owner = owner

    def _owner_of(self, key: Any) -> Optimizer | None:
        optimizers = self._owner.optimizers
        for opt in optimizers:
            if key in opt.state:
                return opt
        for opt in optimizers:
            if any(p is key for g in opt.param_groups for p in g["params"]):
                return opt
        return None

    def __getitem__(self, key: Any) -> Any:
        opt = self._owner_of(key)
        if opt is None:
            raise KeyError("tensor is not a parameter of any of the MixedOptimizer's optimizers")
        return opt.state[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        opt = self._owner_of(key)
        if opt is None:
            raise KeyError("tensor is not a parameter of any of the MixedOptimizer's optimizers")
        opt.state[key] = value

    def __delitem__(self, key: Any) -> None:
        for opt in self._owner.optimizers:
            if key in opt.state:
                del opt.state[key]
                return
        raise KeyError("no state for this tensor")

    def __contains__(self, key: object) -> bool:
        return any(key in opt.state for opt in self._owner.optimizers)

    def __iter__(self) -> Iterator[Any]:
        for opt in self._owner.optimizers:
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._owner.optimizers)

    def __repr__(self) -> str:
        return f"_MergedState({len(self)} entries over {len(self._owner.optimizers)} optimizers)"


class MixedOptimizer(_WrapperOptimizer):
    """Several optimizers over disjoint parameters, behaving as one ``torch.optim.Optimizer``.

    Args:
        *optimizers: the inner optimizers (any ``torch.optim.Optimizer``, also
            :class:`~tigeropt.LazyOptimizer` or another ``MixedOptimizer``), or a
            single list of them.  No parameter may be in two of them.

    What it shares and how:

    * ``param_groups``: the inner optimizers' groups, concatenated in order; the
      *same* dict objects, so an LR scheduler, ``GradScaler`` or a hand-written
      ``group["lr"] = ...`` changes the inner optimizer.  Schedulers that
      cycle momentum (``OneCycleLR``/``CyclicLR`` with ``cycle_momentum=True``)
      write ``betas`` (or ``momentum``) into every group: they work when every
      inner optimizer has that key (AdamW, Lion, AdaX and Tiger all have
      ``betas``; Tiger's mirrors its ``beta``).  With an inner optimizer without
      momentum (Adagrad) pass ``cycle_momentum=False``, as for Adagrad alone.
    * ``step(closure)``: calls ``closure`` once (with grad enabled), then each
      inner optimizer's ``step()`` in order; returns the closure's loss.
    * ``zero_grad``, ``state`` (one mapping over the inner states), ``defaults``
      (the hyperparameters on which all inner optimizers agree, plus ``betas``
      and ``momentum`` when every inner optimizer has them, with the first
      one's value: schedulers check these keys before cycling momentum).
    * ``state_dict()``: torch.optim's format with parameters numbered across all
      inner optimizers and ``param_groups`` concatenated; ``load_state_dict``
      splits it by the inner optimizers' group counts and hands each part to its
      optimizer's own ``load_state_dict`` (so tigeropt's exact-dtype loading
      applies); a checkpoint resumes bit-identically.
    * ``add_param_group(group, optimizer=0)``: adds the group to the inner
      optimizer given by index or object (default: the first one), after
      checking that none of its parameters is already held.
    * Hooks registered on the MixedOptimizer (step pre/post, state-dict) run
      around its own calls; those of the inner optimizers run around theirs.

    ``GradScaler.step(mixed)`` unscales every group's gradient and skips the
    whole step (all inner optimizers) when any gradient is inf/NaN.
    """

    def __init__(self, *optimizers: Optimizer | Iterable[Optimizer]) -> None:
        if len(optimizers) == 1 and isinstance(optimizers[0], (list, tuple)):
            optimizers = tuple(optimizers[0])
        if not optimizers:
            raise ValueError("MixedOptimizer needs at least one optimizer")
        for i, opt in enumerate(optimizers):
            if not isinstance(opt, Optimizer):
                raise TypeError(f"MixedOptimizer: argument {i} is a {type(opt).__name__}, not a "
                                "torch.optim.Optimizer")
        if len({id(o) for o in optimizers}) != len(optimizers):
            raise ValueError("MixedOptimizer: the same optimizer object is given twice")
        self.optimizers: list[Optimizer] = list(optimizers)  # type: ignore[arg-type]
        owners: dict[int, int] = {}
        for i, opt in enumerate(self.optimizers):
            for p in (p for g in opt.param_groups for p in g["params"]):
                j = owners.setdefault(id(p), i)
                if j != i:
                    raise ValueError(
                        f"MixedOptimizer: a parameter of shape {tuple(p.shape)} is in "
                        f"{_describe(j, self.optimizers[j])} and in {_describe(i, opt)}; the optimizers "
                        "must hold disjoint parameters")
        first = self.optimizers[0].defaults
        common = {k: v for k, v in first.items()
                  if all(k in o.defaults and _same(o.defaults[k], v) for o in self.optimizers[1:])}
        for key in MOMENTUM_KEYS:  # what LR schedulers look for before they cycle momentum
            if key not in common and all(key in o.defaults for o in self.optimizers):
                common[key] = first[key]
        self._init_plumbing(common)
        self._number()

    #: The rounding hash's index of this optimizer's first parameter (set by an outer MixedOptimizer).
    _param_index_offset: int = 0

    def _number(self) -> None:
        """Key the inner tigeropt optimizers' stochastic rounding on the parameters' positions in this
        optimizer's ``param_groups`` (as in its state_dict), as one optimizer over all of them does:
        each inner optimizer numbered from 0 gave the first parameter of every inner optimizer the
        same random bits.  Run at construction, ``add_param_group`` and every step (an inner
        optimizer may gain groups directly)."""
        start = self._param_index_offset
        for opt in self.optimizers:
            inner = opt
            while isinstance(inner, _WrapperOptimizer) and not isinstance(inner, MixedOptimizer):
                inner = getattr(inner, "optimizer", None)  # LazyOptimizer(opt): opt's own parameters
            if isinstance(inner, (TigerOptimizer, MixedOptimizer)):
                inner._param_index_offset = start
                if isinstance(inner, MixedOptimizer):
                    inner._number()
            start += sum(len(g["params"]) for g in opt.param_groups)

    # ----------------------------------------------------------------- views
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizers' param groups, concatenated (a new list of the same dicts)."""
        return [g for opt in self.optimizers for g in opt.param_groups]

    @param_groups.setter
    def param_groups(self, value: Any) -> None:
        raise AttributeError("MixedOptimizer.param_groups is a view of the inner optimizers' groups; "
                             "change the inner optimizers or use add_param_group")

    @property  # type: ignore[override]
    def state(self) -> _MergedState:
        """One mapping over the inner optimizers' ``state`` dicts."""
        return _MergedState(self)

    @state.setter
    def state(self, value: Any) -> None:
        raise AttributeError("MixedOptimizer.state is a view of the inner optimizers' state")

    def _own_state(self) -> dict[str, Any]:
        return {"optimizers": self.optimizers, "defaults": self.defaults}

    def __repr__(self) -> str:
        inner = "\n".join(f"  [{i}] " + repr(o).replace("\n", "\n      ")
                          for i, o in enumerate(self.optimizers))
        return f"MixedOptimizer(\n{inner}\n)"

    # ----------------------------------------------------------------- optimizer API
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Call ``closure`` once (if given), then step every inner optimizer; return the loss.

        The refusals of tigeropt inner optimizers (out-of-range sparse rows, sparse gradients a
        group cannot take, ``on_nonfinite="raise"``) are checked for all of them first, so a
        refused step changes none."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._number()
        for opt in self.optimizers:  # what can refuse the step, before any inner optimizer changes
            check = getattr(opt, "_check_step", None)
            if check is not None:
                check()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any], optimizer: int | Optimizer = 0) -> None:
        """Add ``param_group`` to the inner optimizer ``optimizer`` (an index or the object; default 0)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"Invalid type for param_group: expected a dict, got "
                            f"{type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError(f"Invalid param_group: {param_group!r} (must hold 'params')")
        if isinstance(optimizer, bool) or not isinstance(optimizer, (int, Optimizer)):
            raise TypeError(f"Invalid type for optimizer: expected an index or one of the inner optimizers, "
                            f"got {type(optimizer).__name__} ({optimizer!r})")
        if isinstance(optimizer, Optimizer):
            matches = [i for i, o in enumerate(self.optimizers) if o is optimizer]
            if not matches:
                raise ValueError("MixedOptimizer.add_param_group: optimizer is not one of the inner "
                                 "optimizers")
            index = matches[0]
        else:
            index = optimizer
            if not (isinstance(index, int) and -len(self.optimizers) <= index < len(self.optimizers)):
                raise ValueError(f"Invalid optimizer: {index!r} (an index in [0, {len(self.optimizers)}) "
                                 "or one of the inner optimizers)")
        params = param_group["params"]
        check_ordered_params(params)
        params = [params] if isinstance(params, Tensor) else list(params)
        held = {id(p): i for i, o in enumerate(self.optimizers) for g in o.param_groups for p in g["params"]}
        for p in params:
            if isinstance(p, Tensor) and id(p) in held:
                j = held[id(p)]
                raise ValueError(f"MixedOptimizer.add_param_group: a parameter of shape {tuple(p.shape)} is "
                                 f"already in {_describe(j, self.optimizers[j])}")
        self.optimizers[index].add_param_group({**param_group, "params": params})
        self._number()

    # ----------------------------------------------------------------- checkpoints
    def _pack(self) -> dict[str, Any]:
        groups: list[dict[str, Any]] = []
        state: dict[Any, Any] = {}
        offset = 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            mapping: dict[Any, int] = {}
            for g in sd["param_groups"]:
                for pid in g["params"]:
                    mapping.setdefault(pid, offset + len(mapping))
            groups.extend({**g, "params": [mapping[pid] for pid in g["params"]]} for g in sd["param_groups"])
            state.update((mapping[k], v) for k, v in sd["state"].items() if k in mapping)
            offset += len(mapping)
        return {"state": state, "param_groups": groups}

    def _split(self, state_dict: dict[str, Any]) -> list[dict[str, Any]]:
        """The state dict cut into one part per inner optimizer (by their group counts)."""
        saved_groups = state_dict["param_groups"]
        counts = [len(opt.param_groups) for opt in self.optimizers]
        if len(saved_groups) != sum(counts):
            raise ValueError(f"MixedOptimizer.load_state_dict: the state dict has {len(saved_groups)} param "
                             f"groups, the optimizers have {sum(counts)} ({' + '.join(map(str, counts))})")
        parts: list[dict[str, Any]] = []
        start = 0
        for n in counts:
            part = saved_groups[start:start + n]
            start += n
            ids = {pid for g in part for pid in g["params"]}
            parts.append({"state": {k: v for k, v in state_dict["state"].items() if k in ids},
                          "param_groups": part})
        return parts

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise if an inner optimizer that can check without loading (tigeropt's) rejects its part."""
        for opt, part in zip(self.optimizers, self._split(state_dict)):
            check = getattr(opt, "_check_state_dict", None)
            if check is not None:
                check(part)

    def _unpack(self, state_dict: dict[str, Any]) -> None:
        # All or nothing: check every part before loading any; an inner optimizer that still
        # rejects its part (one that cannot check beforehand) makes the ones already loaded go
        # back to their own state dicts, taken before.
        self._check_state_dict(state_dict)
        parts = self._split(state_dict)
        before = [opt.state_dict() for opt in self.optimizers]
        for i, (opt, part) in enumerate(zip(self.optimizers, parts)):
            try:
                opt.load_state_dict(part)
            except Exception:
                for done, old in zip(self.optimizers[:i], before):
                    done.load_state_dict(old)
                raise


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except (RuntimeError, TypeError, ValueError):  # e.g. tensors with several elements
        return a is b


def split_embeddings(model: nn.Module, embedding_optimizer: OptimizerFactory | None = None,
                     other_optimizer: OptimizerFactory | None = None, *,
                     types: tuple[type[nn.Module], ...] = EMBEDDING_TYPES) -> MixedOptimizer:
    """A :class:`MixedOptimizer` with the embedding weights of ``model`` apart from everything else.

    The weights of every ``nn.Embedding``/``nn.EmbeddingBag`` (or ``types``) in
    ``model`` go to ``embedding_optimizer(params)``; every other parameter
    with ``requires_grad`` goes to ``other_optimizer(params)``.  A weight tied
    to an output layer counts as an embedding.  The factories take a list of
    tensors: an optimizer class, ``functools.partial(torch.optim.AdamW, lr=...)``
    or a lambda.

    Defaults: ``torch.optim.AdamW`` with its defaults (lr=1e-3, weight_decay=0.01)
    for the embeddings — seed 000's remedy for the sign-optimizer embedding
    drift — and :class:`tigeropt.Tiger` with its defaults for the rest.  The
    returned optimizer's ``optimizers[0]`` is the embedding optimizer.
    """
    for name, factory in (("embedding_optimizer", embedding_optimizer), ("other_optimizer", other_optimizer)):
        if factory is not None and not callable(factory):
            raise TypeError(f"Invalid type for {name}: expected an optimizer class or a callable taking a "
                            f"list of tensors, got {type(factory).__name__}")
    emb = embedding_weights(model, types)
    if not emb:
        raise ValueError(f"split_embeddings: model has no trainable {'/'.join(t.__name__ for t in types)} "
                         "weight")
    emb_ids = {id(p) for p in emb}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in emb_ids]
    if not rest:
        raise ValueError("split_embeddings: every trainable parameter of the model is an embedding weight; "
                         "use the embedding optimizer alone")
    make_emb = embedding_optimizer if embedding_optimizer is not None else torch.optim.AdamW
    make_rest = other_optimizer if other_optimizer is not None else Tiger
    return MixedOptimizer(make_emb(emb), make_rest(rest))
