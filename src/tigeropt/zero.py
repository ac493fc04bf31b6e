"""tigeropt optimizers inside ``torch.distributed.optim.ZeroRedundancyOptimizer`` (ZeRO stage 1).

    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=tigeropt.Tiger, lr=1e-3)
    tigeropt.attach_zero(zero)   # once, before the first step

ZeRO gives each rank a local optimizer over a subset of the parameters (largest first, to the
rank with the fewest elements so far), steps it and broadcasts the updated parameters.  The
element-wise, row-wise and tensor-wise rules of every tigeropt optimizer need nothing else: the
trajectory equals one process bit for bit.  Two things depend on where a parameter sits in the
whole optimizer, which the local optimizer cannot know by itself:

* the stochastic-rounding hash keys on the parameter's index (its position in ``param_groups``,
  as in the state_dict).  A rank's local optimizer numbers its own subset 0, 1, ...: without
  :func:`attach_zero` the rounding is as good but not one process's, and parameters on different
  ranks that share a local index share their rounding bits for equal element indices;
* ``on_nonfinite="skip"``/``"raise"`` decide over a whole param group.  A rank sees only its own
  parameters' gradients: without :func:`attach_zero` the rank holding a NaN gradient skips (or
  raises) and the others step (or go on to the parameter broadcast and wait there).

:func:`attach_zero` points the local optimizer at the ZeRO object, whose ``param_groups`` hold
every parameter in the order of the consolidated ``state_dict``: the hash keys on those global
indices (so a ZeRO checkpoint resumes identically in one process, and a one-process checkpoint in
ZeRO), and the non-finite check reads the whole group's gradients, which every rank holds after
data-parallel averaging (DDP or an all-reduce), so every rank takes the same decision without
communication.  ``add_param_group`` on the ZeRO object keeps working (new parameters are appended
to the global order).

It also routes the ZeRO object's ``load_state_dict`` through the local optimizer's: torch's writes
each rank's share of the checkpoint into the local optimizer's ``state`` directly and copies every
group option of the checkpoint (``state_precision``, ``foreach``, ``fused`` included) into the
groups, so a checkpoint of another ``state_precision`` ran on in the checkpoint's precision and
was never validated.  Attached, each rank loads its share with tigeropt's ``load_state_dict``: the
checkpoint is checked (optimizer, state keys and shapes, hyperparameters), its state converted to
this optimizer's ``state_precision``, and the execution flags and ``state_precision`` stay the
loader's, as in one process; the checkpoint dict is not modified.
"""

from __future__ import annotations

import types
import weakref
from itertools import chain
from typing import Any

from ._base import TigerOptimizer

__all__ = ["attach_zero"]


def attach_zero(zero: Any) -> Any:
    """Let the tigeropt optimizer inside a ``ZeroRedundancyOptimizer`` key its stochastic rounding
    on global parameter indices and take ``on_nonfinite`` decisions over whole param groups, so that
    ZeRO training equals one process bit for bit.  Call it on every rank, once, after constructing
    ``zero`` (before its first step); returns ``zero``.  See :mod:`tigeropt.zero`.

    Raises ``TypeError`` when ``zero`` is not a ``ZeroRedundancyOptimizer`` or its local optimizer
    is not a tigeropt optimizer.  (``overlap_with_ddp=True`` does not reach here: torch takes only
    its own functional optimizers there and refuses tigeropt's classes with a ValueError.)
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if not isinstance(zero, ZeroRedundancyOptimizer):
        raise TypeError(f"attach_zero needs a torch.distributed.optim.ZeroRedundancyOptimizer, got "
                        f"{type(zero).__name__}")
    local = getattr(zero, "optim", None)
    if not isinstance(local, TigerOptimizer):
        raise TypeError(f"attach_zero: the ZeroRedundancyOptimizer's optimizer_class must be a tigeropt "
                        f"optimizer, got {type(local).__name__}")
    if len(local.param_groups) != len(zero.param_groups):  # ZeRO keeps one local group per group
        raise ValueError(f"attach_zero: the local optimizer has {len(local.param_groups)} param groups, the "
                         f"ZeroRedundancyOptimizer {len(zero.param_groups)}")
    local._zero = weakref.ref(zero)
    local._drop_plans()  # cached plans hold the local hash indices
    zero.load_state_dict = types.MethodType(_load_state_dict, zero)
    return zero


def _load_state_dict(zero: Any, state_dict: dict[str, Any]) -> None:
    """``ZeroRedundancyOptimizer.load_state_dict`` under :func:`attach_zero`: this rank's share of the
    (consolidated, global) ``state_dict`` through the local optimizer's ``load_state_dict``."""
    name = "ZeroRedundancyOptimizer.load_state_dict"
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise TypeError(f"{name}: expected a dict with 'state' and 'param_groups' (an optimizer's "
                        f"state_dict()), got {type(state_dict).__name__}")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(zero.param_groups):
        raise ValueError(f"{name}: the checkpoint's param groups do not match this optimizer's "
                         f"{len(zero.param_groups)} groups")
    for i, (saved, group) in enumerate(zip(saved_groups, zero.param_groups)):
        if not isinstance(saved, dict) or len(saved.get("params", ())) != len(group["params"]):
            raise ValueError(f"{name}: param group {i} of the checkpoint does not have the "
                             f"{len(group['params'])} parameters of this optimizer's group {i}")
    saved_ids = [pid for g in saved_groups for pid in g["params"]]
    position = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in zero.param_groups))}
    local = zero.optim
    groups: list[dict[str, Any]] = []
    state: dict[int, Any] = {}
    n = 0
    for saved, group in zip(saved_groups, local.param_groups):
        ids = []
        for p in group["params"]:  # local numbering, as the local optimizer's own state_dict numbers them
            pid = saved_ids[position[id(p)]]
            if pid in saved_state:
                state[n] = saved_state[pid]
            ids.append(n)
            n += 1
        groups.append({**saved, "params": ids})
    local.load_state_dict({"state": state, "param_groups": groups})
    zero._sync_param_groups(local.param_groups, zero.param_groups)
