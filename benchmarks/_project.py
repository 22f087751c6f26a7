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


def make_shards(directory: Path, *, vocab: int, tokens: int, seed: int = 0, val_tokens: int = 65_536) -> None:
    """Token shards of random ids in ``directory`` (throughput does not depend on what text says)."""
    import numpy as np

    from bigmodel_ops.shards import ShardIndex, ShardWriter, dtype_for_vocab

    rng = np.random.default_rng(seed)
    dtype = dtype_for_vocab(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", tokens), ("val", val_tokens)):
        writer = ShardWriter(directory, split=split, dtype=dtype, shard_tokens=max(n, 1024))
        writer.append(rng.integers(5, vocab, size=n).astype(dtype), documents=1)
        splits[split] = writer.close()
    specials = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    ShardIndex(directory, dtype.name, vocab, specials, "", splits).write()


def repo_params() -> dict:
    """The repo's params.yaml as a raw mapping, its data paths made absolute (the benchmarks run
    the stages in a throwaway folder)."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "params.yaml").read_text())
    source = raw["prepare"]["source"]
    source["path"] = str((root / source["path"]).resolve())
    if source.get("unlabeled_path"):
        source["unlabeled_path"] = str((root / source["unlabeled_path"]).resolve())
    return raw
