"""Checks of configuration values (dataclass fields, saved configs): a ``ValueError`` naming the field, the
value and what is accepted, which the command line reports in one line."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["one_of", "at_least"]


def one_of(name: str, value: Any, accepted: Iterable[Any]) -> None:
    """Refuse ``value`` unless it is one of ``accepted``.

    Example:
        >>> one_of("split", "valid", ("train", "test"))
        Traceback (most recent call last):
        ...
        ValueError: unknown split 'valid'; choose one of test, train
    """
    accepted = list(accepted)
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(sorted(map(str, accepted)))}")


def at_least(name: str, value: Any, minimum: int) -> None:
    """Refuse ``value`` unless it is an integer (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
