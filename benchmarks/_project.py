"""Shared by the benchmarks that run the pipeline's stages in a throwaway project folder."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def project_dir(keep: Path | None, *, prefix: str) -> Iterator[Path]:
    """A temporary project folder (or ``keep``), made the working directory while in use."""
    previous = Path.cwd()
    with contextlib.ExitStack() as stack:
        if keep is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
        else:
            root = keep.resolve()
            root.mkdir(parents=True, exist_ok=True)
        os.chdir(root)
        try:
            yield root
        finally:
            os.chdir(previous)


def log(message: str) -> None:
    print(message, flush=True)
