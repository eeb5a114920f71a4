"""Progress of long work: a live bar on a terminal or in Jupyter, plain lines in a log file or a pipe.

On a terminal :func:`progress_bar` is ``tqdm``. When standard error is not a terminal (CI, ``nohup``,
``| tee``, a file), a redrawn bar would fill the log with carriage returns and cursor movements, so it is
a :class:`LineProgress` instead: it writes whole lines only, either one per update (``lines="each"``: an
epoch of training) or one each time another tenth of the work is done (``lines="tenths"``: a long
analysis), or nothing (``lines=None``: the inner bars of nested loops).

Example:
    >>> import io
    >>> log = io.StringIO()
    >>> bar = progress_bar(total=4, desc="surface", unit="pt", stream=log)
    >>> for _ in range(4):
    ...     bar.update(1)
    >>> bar.close()
    >>> print(log.getvalue().replace("\\r", "<CR>"), end="")  # doctest: +ELLIPSIS
    surface: 25% (1/4 pt, ... s)
    surface: 50% (2/4 pt, ... s)
    surface: 75% (3/4 pt, ... s)
    surface: 100% (4/4 pt, ... s)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

__all__ = ["progress_bar", "LineProgress", "interactive"]


def interactive(stream: IO[str] | None = None) -> bool:
    """True when ``stream`` (default: standard error) is a terminal, or when running in a Jupyter kernel."""
    stream = sys.stderr if stream is None else stream
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # closed or not a real file
        return False
    return _in_jupyter_kernel() and stream in (sys.stderr, sys.stdout)


def _in_jupyter_kernel() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - any failure means: not a kernel we can draw widgets in
        return False
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    leave: bool = True,
    initial: float = 0,
    lines: str | None = "tenths",
    stream: IO[str] | None = None,
) -> Any:
    """A progress bar over ``iterable`` (or updated by hand up to ``total``).

    Args:
        iterable: what to iterate over; ``total`` defaults to its length.
        total: the amount of work.
        desc: what is being done, the start of every line.
        unit: the unit of work (``"pt"``, ``"epoch"``, ``"matvec"``).
        enabled: ``False`` shows nothing (``--no-progress``).
        leave: keep the terminal bar when done.
        initial: work already done (a resumed run).
        lines: when not on a terminal: ``"tenths"`` writes a line each time another 10% is done,
            ``"each"`` one line per update, ``None`` nothing.
        stream: where to write (default: standard error).

    Returns:
        A ``tqdm`` bar on a terminal or in Jupyter, else a :class:`LineProgress`; both support iteration,
        ``update``, ``set_postfix`` and ``close``.
    """
    if lines not in ("tenths", "each", None):
        raise ValueError(f"lines must be 'tenths', 'each' or None; got {lines!r}")
    if enabled and interactive(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, initial=initial, file=stream)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial,
                        lines=lines if enabled else None, stream=stream)


class LineProgress:
    """Progress as whole lines (no carriage returns or escape codes), for logs and pipes.

    Each line reads ``DESC: 40% (20/50 UNIT, 12.3 s) key=value ...`` with the fields of the last
    :meth:`set_postfix`.
    """

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", initial: float = 0, lines: str | None = "tenths",
                 stream: IO[str] | None = None) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.lines = lines
        self.stream = stream
        self.postfix: dict[str, Any] = {}
        self.disable = lines is None
        self._start = time.perf_counter()
        self._next_tenth = self._tenths_done() + 1

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LineProgress without an iterable is updated by hand")
        for item in self.iterable:
            yield item
            self.update(1)

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _tenths_done(self) -> int:
        if not self.total:
            return 0
        return int(10 * self.n // self.total)

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.lines == "each":
            self._write()
        elif self.lines == "tenths" and self._tenths_done() >= self._next_tenth:
            self._write()
            self._next_tenth = self._tenths_done() + 1

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = {"": text} if text else {}

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def _write(self) -> None:
        stream = sys.stderr if self.stream is None else self.stream
        amount = f"{_fmt(self.n)}/{_fmt(self.total)} {self.unit}" if self.total else f"{_fmt(self.n)} {self.unit}"
        percent = f"{100 * self.n / self.total:.0f}% " if self.total else ""
        extra = " ".join(f"{k}={v}" if k else str(v) for k, v in self.postfix.items())
        line = f"{self.desc}: {percent}({amount}, {time.perf_counter() - self._start:.1f} s)"
        stream.write(line + (f" {extra}" if extra else "") + "\n")
        stream.flush()


def _fmt(value: float | None) -> str:
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"
