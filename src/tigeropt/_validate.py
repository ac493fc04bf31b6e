"""Argument checks shared by every optimizer and wrapper (one message format everywhere).

A wrong type raises ``TypeError`` naming the argument and the type it got; a wrong value
(out of range, wrong length, NaN or inf) raises ``ValueError`` naming the argument and the
value.  ``bool`` is not accepted where a number is expected (``lr=True`` is a mistake).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

__all__ = ["check", "check_lr", "check_number", "check_int", "check_bool", "check_choice", "check_betas",
           "check_optional_bool", "check_ordered_params", "plain_number", "plain_numbers"]


def check(ok: bool, name: str, value: Any, requirement: str) -> None:
    """Raise ``ValueError("Invalid <name>: <value> (<requirement>)")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} ({requirement})")


def _type_error(name: str, value: Any, expected: str) -> TypeError:
    kind = type(value)
    got = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    return TypeError(f"Invalid type for {name}: expected {expected}, got {got} ({value!r})")


def _is_real(value: Any) -> bool:
    """A real number: int, float, or another ``numbers.Real`` such as a numpy scalar (``np.float32(1e-3)``
    from a sweep, as torch.optim takes it); not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def plain_number(value: Any) -> Any:
    """``value`` as a Python number when it is another ``numbers.Real`` (a numpy scalar), elements of a
    tuple/list likewise; anything else unchanged (a tensor lr stays a tensor)."""
    if isinstance(value, (tuple, list)):
        items = [plain_number(v) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value  # unchanged: the same object (a namedtuple, a list subclass, param_names)
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, (bool, int, float)) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def plain_numbers(options: dict[str, Any]) -> None:
    """:func:`plain_number` on every option of a param group or defaults dict (in place; ``params`` kept), so
    the kernels, ``repr`` and ``state_dict`` see the Python numbers the checks accept."""
    for key, value in options.items():
        if key != "params":
            options[key] = plain_number(value)


def check_number(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False, hi_open: bool = False) -> None:
    """A finite real number in [lo, hi] (``lo_open``/``hi_open`` exclude the bound)."""
    if not _is_real(value):
        raise _type_error(name, value, "a real number")
    ok = math.isfinite(value)
    if lo is not None:
        ok = ok and (value > lo if lo_open else value >= lo)
    if hi is not None:
        ok = ok and (value < hi if hi_open else value <= hi)
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        interval = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        check(False, name, value, f"must be a finite number in {interval}")


def check_int(name: str, value: Any, lo: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise _type_error(name, value, "an int")
    check(value >= lo, name, value, f"must be an int >= {lo}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _type_error(name, value, "a bool")


def check_optional_bool(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise _type_error(name, value, "a bool or None")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if not isinstance(value, str):
        raise _type_error(name, value, f"one of {choices}")
    check(value in choices, name, value, f"must be one of {choices}")


def check_betas(name: str, value: Any, ranges: list[tuple[float, float, bool, bool]]) -> None:
    """A tuple/list of ``len(ranges)`` numbers, element i in ``ranges[i] = (lo, hi, lo_open, hi_open)``."""
    if not isinstance(value, (tuple, list)):
        raise _type_error(name, value, f"a tuple of {len(ranges)} numbers")
    check(len(value) == len(ranges), name, value, f"must hold {len(ranges)} numbers")
    for i, (v, (lo, hi, lo_open, hi_open)) in enumerate(zip(value, ranges)):
        check_number(f"{name}[{i}]", v, lo, hi, lo_open=lo_open, hi_open=hi_open)


def check_lr(lr: Any, name: str = "lr") -> None:
    """A finite number >= 0, or a one-element floating tensor holding one."""
    if isinstance(lr, Tensor):
        check(lr.numel() == 1, name, lr, "a tensor lr must hold one element")
        check(lr.is_floating_point(), name, lr, "a tensor lr must be floating point")
        value = float(lr.detach().to("cpu", torch.float64))
        check(math.isfinite(value) and value >= 0.0, name, lr, "must be a finite number >= 0")
        return
    check_number(name, lr, 0.0)


def check_ordered_params(value: Any) -> None:
    """torch.optim's rule for a param group's ``params``: not a set (its order changes between runs,
    so a checkpoint's state would land on other tensors of the same shape)."""
    if isinstance(value, (set, frozenset)):
        raise TypeError("Invalid type for params: optimizer parameters need to be organized in ordered "
                        "collections, but the ordering of tensors in sets will change between runs "
                        "(checkpoints would map state to the wrong tensors); use a list")
