"""Argument checks shared by the estimators: errors name the argument and what is accepted."""

from __future__ import annotations

import operator as _operator

__all__ = ["check_int", "check_operator"]


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) ``>= minimum``.

    Raises:
        TypeError: not an integer.
        ValueError: below ``minimum``.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer >= {minimum}; got {value!r}")
    try:
        value = _operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer >= {minimum}; got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value}")
    return value


def check_operator(op: object) -> int:
    """The size ``n`` of a square linear operator with a real floating dtype.

    Raises:
        TypeError: ``op`` lacks ``.shape``/``.matvec`` or is not square.
        ValueError: its dtype is not a real floating dtype, or ``n < 1``.
    """
    shape = getattr(op, "shape", None)
    if shape is None or not hasattr(op, "matvec") or len(shape) != 2 or shape[0] != shape[1]:
        raise TypeError(f"op must be a square LinearOperator with .shape, .dtype, .device and .matvec; got {op!r}")
    dtype = getattr(op, "dtype", None)
    if dtype is None or not dtype.is_floating_point:
        raise ValueError(f"op.dtype must be a real floating dtype; got {dtype}")
    if shape[0] < 1:
        raise ValueError(f"op must have size n >= 1; got shape {tuple(shape)}")
    return int(shape[0])
