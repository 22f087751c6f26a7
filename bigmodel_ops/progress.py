"""Progress reporting for long work: a tqdm bar (rate and ETA), silent with quiet=True."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
    iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it", quiet: bool = False
) -> Iterator[T]:
    """Wrap an iterable in a progress bar on stderr (plain periodic lines when not a TTY)."""
    if quiet:
        yield from iterable
        return
    interactive = sys.stderr.isatty()
    yield from tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        unit_scale=True,
        file=sys.stderr,
        mininterval=0.5 if interactive else 10.0,
        dynamic_ncols=True,
    )


def progress_bar(*, desc: str, total: int | None = None, unit: str = "it", quiet: bool = False) -> tqdm:
    """A manual progress bar (call .update(n)); disabled when quiet."""
    return tqdm(
        desc=desc,
        total=total,
        unit=unit,
        unit_scale=True,
        file=sys.stderr,
        disable=quiet,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
        dynamic_ncols=True,
    )
