"""Lazy embedding rows for any ``torch.optim.Optimizer`` (seed 000's first remedy).

With sign optimizers (Tiger, Lion) a row of an embedding table that stops
receiving gradient keeps moving by ``lr*sign(m)`` until it sits at
``-sign(m)/weight_decay``; Adam-type optimizers keep decaying it too.  *Lazy*
updates (TensorFlow's ``LazyAdam``, torch's ``SparseAdam``) leave a row alone
in a step where its gradient is all zero:

    touched_i = any(g[i] != 0)            (row i = slice p[i] along dim 0; a 0-d tensor is one row)

A sparse COO gradient is coalesced first (duplicates summed), so a row it lists
with all-zero values, or whose duplicates cancel, is untouched exactly like the
same row of a dense gradient: "touched" means "has a non-zero gradient", on
every path (:func:`tigeropt._base.touched_rows` is the one definition).
    p[i], state[i] = update(p[i], g[i], state[i])   if touched_i
    p[i], state[i] unchanged                        otherwise (no weight decay either)

tigeropt's own optimizers do this natively and at a cost that scales with the
rows touched: put ``lazy=True`` in a param group.  :class:`LazyOptimizer` gives
the same semantics to any other optimizer (AdamW, Adam, SGD, RMSprop, ...) by
snapshotting the untouched rows of the lazy parameters and of their per-row
state, running the wrapped optimizer's ordinary dense step, and writing the
snapshot back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import _lowp
from ._base import TigerOptimizer, check_sparse_rows, touched_rows

__all__ = ["LazyOptimizer", "embedding_weights"]

EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


def _check_module(name: str, value: Any) -> None:
    if not isinstance(value, nn.Module):
        raise TypeError(f"Invalid type for {name}: expected an nn.Module, got {type(value).__name__}")


def embedding_weights(model: nn.Module, types: tuple[type[nn.Module], ...] = EMBEDDING_TYPES) -> list[Tensor]:
    """The weights of every ``nn.Embedding``/``nn.EmbeddingBag`` (or ``types``) inside ``model``.

    Each tensor appears once, in module order (a weight tied to an output layer
    is still listed, once); weights with ``requires_grad=False`` are left out.
    """
    _check_module("model", model)
    out: list[Tensor] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, types):
            w = module.weight
            if w.requires_grad and id(w) not in seen:
                seen.add(id(w))
                out.append(w)
    return out


class _WrapperOptimizer(Optimizer):
    """Plumbing shared by optimizers that delegate to inner ``torch.optim.Optimizer`` objects.

    It does not call ``Optimizer.__init__`` (which would copy the param groups
    into new dicts): subclasses expose the inner optimizers' ``param_groups``
    and ``state`` as properties, so a scheduler, ``GradScaler`` or
    ``load_state_dict`` of the inner optimizer is always seen.  This class sets
    up torch's hook registries and the step-hook wrapper, runs the state-dict
    hooks around :meth:`_pack` / :meth:`_unpack`, and makes the object picklable.
    """

    def _init_plumbing(self, defaults: dict[str, Any]) -> None:
        torch._C._log_api_usage_once("python.optimizer")
        self.defaults = defaults
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()  # step pre/post hooks, profiler record

    # what gets pickled / deep-copied: the inner optimizers, not views of them
    def _own_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        return self._own_state()

    def __setstate__(self, state: dict[str, Any]) -> None:
        defaults = state.pop("defaults", {})
        self.__dict__.update(state)
        self._init_plumbing(defaults)

    # ----------------------------------------------------------------- checkpoints with hooks
    def _pack(self) -> dict[str, Any]:
        raise NotImplementedError

    def _unpack(self, state_dict: dict[str, Any]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's format (``state`` by parameter index, ``param_groups``); runs the hooks."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self._pack()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict made by :meth:`state_dict`; runs the load-state-dict hooks."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._unpack(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


class LazyOptimizer(_WrapperOptimizer):
    """Lazy-row updates for the chosen parameters of any ``torch.optim.Optimizer``.

    A row (slice along dim 0) of a lazy parameter whose gradient is all zero in
    a step keeps its value and its optimizer state; touched rows get exactly the
    wrapped optimizer's update.  Use it for embedding tables::

        opt = LazyOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model)
        # lazy: every nn.Embedding / nn.EmbeddingBag weight inside ``model``

        opt = LazyOptimizer(torch.optim.AdamW([
            {"params": model.emb.parameters(), "lazy": True},      # lazy
            {"params": model.body.parameters()},                    # ordinary
        ], lr=1e-3))                                                # params=None: the lazy=True groups

    Args:
        optimizer: the optimizer to wrap; it keeps doing the update.
        params: which parameters are lazy.  ``None`` (default): those in the
            wrapped optimizer's groups that set ``lazy=True`` (looked up at every
            step, so groups added later count too).  Otherwise an iterable of
            tensors and/or modules (a module stands for the weights of every
            ``nn.Embedding``/``nn.EmbeddingBag`` in it), or a single module.
            Every tensor must be in the wrapped optimizer (a 0-d tensor is one row:
            it keeps its value and state in a step where its gradient is zero).

    Semantics and limits:

    * Which rows are touched: rows whose gradient holds any non-zero, for dense
      and sparse COO gradients alike (a sparse gradient is coalesced first: a
      listed row with all-zero values is untouched).  A sparse gradient is
      handed to the wrapped optimizer densified (most torch optimizers reject
      sparse gradients) and put back afterwards, so the wrapped step costs as
      much as a dense one (``torch.optim.SparseAdam``, which takes only sparse
      gradients and updates only the listed rows itself, gets it as it is).
    * Restored state: every per-parameter state tensor of the parameter's shape
      (AdamW's ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; SGD's
      ``momentum_buffer``; Adagrad's ``sum``; ...) and every per-row statistic:
      a tensor whose dim 0 has the parameter's rows and whose other dims are 1 or
      the parameter's (``tigeropt.Adagrad(rowwise=True)``'s ``sum`` of shape
      ``(rows,)``; Adafactor's ``row_var``, ``(rows, 1)``); 8-bit state
      (``state_precision="8bit"``) with the absmax of the rows' 256-element blocks,
      which needs rows of a multiple of 256 elements (other shapes: ``ValueError`` at
      the step, before anything changes).  Other state is left as
      the wrapped optimizer leaves it: scalars such as the per-tensor ``step``
      counter, and statistics across rows (Adafactor's ``col_var``).
    * Step count: torch's optimizers keep one ``step`` per tensor and it keeps
      counting every step, as in ``torch.optim.SparseAdam`` and TF's
      ``LazyAdam``.  A row's bias correction therefore uses the tensor's step,
      not the number of times the row was touched (per-row counts would need a
      per-row state the wrapped optimizer does not have); for Adam-type
      optimizers a row first touched late gets an update of about
      ``lr*(1-b1)/sqrt(1-b2)`` per component instead of ``lr``.
    * First step: state that the wrapped optimizer creates in this step has
      no earlier value to restore; untouched rows keep what its first step gives
      a zero-gradient row (the initial value for Adam/AdamW without L2 decay,
      SGD, Adagrad, RMSprop).
    * tigeropt optimizers' own ``lazy=True`` groups are left to the native lazy
      path (cheaper); wrapping such an optimizer changes nothing for them.

    Cost per step and lazy parameter with at least one untouched row: one
    ``index_select`` before and one ``index_copy_`` after the wrapped step of
    the untouched rows of the parameter and of each restored state tensor,
    i.e. about twice the bytes of (1 + number of state tensors) x the untouched
    part of the table in extra traffic (AdamW: ~3x the table's bytes read and
    written twice), plus the dense-gradient row scan (one read of the gradient).
    Extra memory, transient during the step: the untouched rows of the
    parameter and its restored state (AdamW: up to 3x the table), plus a dense
    copy of a sparse gradient.  For tables where the cost matters use a tigeropt
    optimizer with ``lazy=True``, whose cost scales with the rows touched.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's (the
    same objects); ``zero_grad``, ``add_param_group``, ``state_dict`` and
    ``load_state_dict`` delegate to it, so checkpoints are interchangeable with
    the unwrapped optimizer's.  Step and state-dict hooks registered on the
    wrapper run around the wrapper's calls; the wrapped optimizer's own hooks
    run too.
    """

    def __init__(self, optimizer: Optimizer,
                 params: Iterable[Tensor | nn.Module] | nn.Module | None = None) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"LazyOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self._explicit: list[Tensor] | None = None
        if params is not None:
            self._explicit = self._resolve(params)
        elif not any(g.get("lazy") for g in optimizer.param_groups):
            raise ValueError("LazyOptimizer: params=None but no param group of the wrapped "
                             f"{type(optimizer).__name__} sets lazy=True; pass params=[...] "
                             "(tensors or modules) or add 'lazy': True to a group")
        self._init_plumbing(optimizer.defaults)

    def _resolve(self, params: Iterable[Tensor | nn.Module] | nn.Module) -> list[Tensor]:
        if isinstance(params, Tensor):
            raise TypeError("LazyOptimizer: params must be an iterable of tensors or modules, got a Tensor")
        if not isinstance(params, (nn.Module, Iterable)):
            raise TypeError(f"Invalid type for params: expected tensors or modules, "
                            f"got {type(params).__name__}")
        items = [params] if isinstance(params, nn.Module) else list(params)
        tensors: list[Tensor] = []
        for item in items:
            if isinstance(item, nn.Module):
                tensors.extend(embedding_weights(item))
            elif isinstance(item, Tensor):
                tensors.append(item)
            else:
                raise TypeError("LazyOptimizer: params must hold tensors or modules, got "
                                f"{type(item).__name__}")
        owned = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        out: list[Tensor] = []
        seen: set[int] = set()
        for p in tensors:
            if id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) not in owned:
                raise ValueError(f"LazyOptimizer: a lazy parameter of shape {tuple(p.shape)} is not in the "
                                 f"wrapped {type(self.optimizer).__name__}'s param groups")
            out.append(p)
        if not out:
            raise ValueError("LazyOptimizer: params holds no tensor (a module stands for its nn.Embedding/"
                             "nn.EmbeddingBag weights; does it have any?)")
        return out

    def _lazy_params(self) -> list[Tensor]:
        native = isinstance(self.optimizer, TigerOptimizer)
        if self._explicit is not None:
            if not native:
                return self._explicit
            natively_lazy = {id(p) for g in self.optimizer.param_groups if g.get("lazy")
                             for p in g["params"]}
            return [p for p in self._explicit if id(p) not in natively_lazy]
        if native:
            return []
        return [p for g in self.optimizer.param_groups if g.get("lazy") for p in g["params"]]

    # ----------------------------------------------------------------- views of the wrapped optimizer
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        pass  # always the wrapped optimizer's

    def _own_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "_explicit": self._explicit}

    def __repr__(self) -> str:
        return f"LazyOptimizer({self.optimizer!r})"

    # ----------------------------------------------------------------- delegation
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer (with ``params=None``, ``lazy=True`` makes it lazy)."""
        self.optimizer.add_param_group(param_group)

    def _pack(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def _unpack(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    # ----------------------------------------------------------------- the step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run ``closure`` (if given) once, then the wrapped step with untouched rows restored."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            lazy = [p for p in self._lazy_params() if p.grad is not None]
            self._check_sparse_rows(lazy)
            self._check_8bit_rows(lazy)
            saved = [self._snapshot(p) for p in lazy]
        try:
            self.optimizer.step()
        finally:
            with torch.no_grad():
                for item in saved:
                    self._restore(*item)
        return loss

    def _check_sparse_rows(self, params: list[Tensor]) -> None:
        """IndexError, before anything changes, for a sparse gradient listing a row its parameter lacks
        (densifying it would index outside the table)."""
        pairs = [(p, p.grad) for p in params if p.grad is not None and p.grad.is_sparse]
        check_sparse_rows("LazyOptimizer", pairs, self.param_groups)

    def _check_8bit_rows(self, params: list[Tensor]) -> None:
        """ValueError, before anything changes, for 8-bit state (codes + a per-256-element-block absmax,
        tigeropt's ``state_precision="8bit"``) of a lazy parameter whose blocks are not whole rows: an
        untouched row sharing a block with a touched one would keep its codes but get the block's new
        absmax, i.e. other state values."""
        opt = self.optimizer
        for p in params:
            if _rows_are_blocks(p):
                continue
            state = opt.state.get(p, {})
            will_be_8bit = (isinstance(opt, TigerOptimizer) and opt.state_8bit_keys != ()
                            and any(g.get("state_precision") == "8bit" and any(q is p for q in g["params"])
                                    for g in opt.param_groups))
            if will_be_8bit or any(_is_8bit_codes(k, v, state) for k, v in state.items()):
                raise ValueError(
                    f"LazyOptimizer: 8-bit state of a parameter of shape {tuple(p.shape)}: rows of "
                    f"{p[0].numel()} elements share 256-element blocks (one absmax each), so untouched rows "
                    "cannot keep their state; use rows of a multiple of 256 elements or "
                    "state_precision='bf16' for this parameter")

    def _snapshot(self, p: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None, dict[str, Tensor]]:
        grad = p.grad
        assert grad is not None
        sparse_grad = None
        if grad.is_sparse and not _sparse_only(self.optimizer, p):
            sparse_grad = grad
            p.grad = grad.to_dense()
        idx, _ = touched_rows(grad if p.dim() else grad.reshape(1), gather=False)
        rows_of = _rows_view(p)
        touched = torch.zeros(rows_of(p).shape[0], dtype=torch.bool, device=p.device)
        touched[idx] = True
        untouched = (~touched).nonzero().squeeze(1)
        if untouched.numel() == 0:
            return p, sparse_grad, None, {}
        rows = {"": rows_of(p).index_select(0, untouched)}
        state = self.optimizer.state.get(p, {})
        for key, value in state.items():
            if _is_8bit_codes(key[:-7], state.get(key[:-7]), state) and key.endswith("_absmax"):
                # the absmax of the untouched rows' blocks (whole rows: _check_8bit_rows), with their codes
                rows[key] = value.index_select(0, _row_blocks(p, untouched).to(value.device))
            elif _per_row_state(key, value, p):
                rows[key] = rows_of(value).index_select(0, untouched.to(value.device))
        return p, sparse_grad, untouched, rows

    def _restore(self, p: Tensor, sparse_grad: Tensor | None, untouched: Tensor | None,
                 rows: dict[str, Tensor]) -> None:
        if untouched is not None:
            state = self.optimizer.state.get(p, {})
            rows_of = _rows_view(p)
            for key, saved in rows.items():
                target = p if key == "" else state.get(key)
                if key.endswith("_absmax") and _is_8bit_codes(key[:-7], state.get(key[:-7]), state):
                    target.index_copy_(0, _row_blocks(p, untouched).to(target.device), saved)
                elif target is p or _per_row_state(key, target, p):
                    rows_of(target).index_copy_(0, untouched.to(target.device), saved.to(target.dtype))
        if sparse_grad is not None:
            p.grad = sparse_grad


def _sparse_only(opt: Optimizer, p: Tensor) -> bool:
    """Whether the optimizer that steps ``p`` (inside ``opt``, a wrapper such as MixedOptimizer included)
    takes only sparse gradients (torch.optim.SparseAdam refuses a densified one; it updates the listed
    rows only, so its gradient is handed on as it is)."""
    inner = getattr(opt, "optimizers", None)
    if inner is not None:
        return any(_sparse_only(o, p) for o in inner
                   if any(q is p for g in o.param_groups for q in g["params"]))
    wrapped = getattr(opt, "optimizer", None)
    if isinstance(wrapped, Optimizer):
        return _sparse_only(wrapped, p)
    return isinstance(opt, torch.optim.SparseAdam)


def _rows_view(p: Tensor) -> Callable[[Tensor], Tensor]:
    """Tensors of ``p``'s shape as rows: themselves, or a one-row view for a 0-d ``p``."""
    return (lambda t: t) if p.dim() else (lambda t: t.view(1))


def _is_8bit_codes(key: str, value: Any, state: dict[str, Any]) -> bool:
    """Whether state ``key`` is 8-bit codes with a per-block ``<key>_absmax`` beside it."""
    return isinstance(value, Tensor) and value.dtype == torch.uint8 and isinstance(state.get(key + "_absmax"),
                                                                                    Tensor)


def _rows_are_blocks(p: Tensor) -> bool:
    """Whether each 256-element block of ``p``'s state lies inside one row (or p has at most one row)."""
    return p.dim() == 0 or p.shape[0] <= 1 or p[0].numel() % _lowp.BLOCK == 0


def _row_blocks(p: Tensor, rows: Tensor) -> Tensor:
    """Indices of the 8-bit blocks of ``rows`` (rows that are whole blocks, or the only row)."""
    if p.dim() == 0 or p.shape[0] <= 1:
        return torch.arange(_lowp.nblocks(p.numel()), device=rows.device)
    per_row = p[0].numel() // _lowp.BLOCK
    return (rows[:, None] * per_row + torch.arange(per_row, device=rows.device)).reshape(-1)


def _per_row_state(key: str, value: Any, p: Tensor) -> bool:
    """State restored with its rows, except the step counter: tensors of the parameter's shape, and
    per-row statistics, whose dim 0 is the parameter's rows and whose other dims are 1 or the
    parameter's (row-wise Adagrad's ``sum`` of shape ``(rows,)``, Adafactor's ``row_var``
    ``(rows, 1)``).  Statistics across rows (Adafactor's ``col_var`` ``(1, cols)``) are not per row."""
    if not isinstance(value, Tensor) or key == "step":
        return False
    if value.shape == p.shape:
        return True
    if p.dim() == 0 or value.dim() == 0 or value.dim() > p.dim() or value.shape[0] != p.shape[0]:
        return False
    return all(n in (1, m) for n, m in zip(value.shape[1:], p.shape[1:]))
