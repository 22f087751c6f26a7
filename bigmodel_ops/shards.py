"""Packed token shards: flat binary files of token ids plus an index.json.

Layout of a shards folder::

    index.json            format, dtype, vocab size, special ids, tokenizer hash, shard list per split
    train_00000.bin       raw little-endian token ids (uint16 when the vocab fits, else uint32)
    val_00000.bin

Documents are concatenated, each followed by the separator token, so a reader can
cut windows of any length at any offset with a zero-copy ``np.memmap`` slice.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bigmodel_ops.errors import DataError

FORMAT = "bigmodel_ops.shards/1"
INDEX_FILE = "index.json"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 halves disk and page-cache use whenever every id fits in it."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class ShardInfo:
    file: str
    tokens: int
    documents: int


@dataclass
class ShardIndex:
    directory: Path
    dtype: str
    vocab_size: int
    special_ids: dict[str, int]
    tokenizer_sha256: str
    splits: dict[str, list[ShardInfo]] = field(default_factory=dict)

    def tokens(self, split: str) -> int:
        return sum(info.tokens for info in self.splits.get(split, []))

    def write(self) -> Path:
        payload = {
            "format": FORMAT,
            "dtype": self.dtype,
            "vocab_size": self.vocab_size,
            "special_ids": self.special_ids,
            "tokenizer_sha256": self.tokenizer_sha256,
            "splits": {name: [asdict(info) for info in infos] for name, infos in self.splits.items()},
            "total_tokens": {name: self.tokens(name) for name in self.splits},
        }
        path = self.directory / INDEX_FILE
        path.write_text(json.dumps(payload, indent=2))
        return path

    @classmethod
    def load(cls, directory: Path | str) -> ShardIndex:
        """Read and check an index: every shard exists, is non-empty and has the size the index says.

        Raises DataError naming the folder or shard file on any mismatch (missing index,
        unknown format, empty split, truncated or missing shard).
        """
        directory = Path(directory)
        path = directory / INDEX_FILE
        if not path.is_file():
            raise DataError(f"{path}: token shard index not found (run the tokenize stage first)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: corrupt shard index: {error}") from None
        if raw.get("format") != FORMAT:
            raise DataError(f"{path}: unknown shard format {raw.get('format')!r}, expected {FORMAT!r}")
        index = cls(
            directory=directory,
            dtype=raw["dtype"],
            vocab_size=int(raw["vocab_size"]),
            special_ids={k: int(v) for k, v in raw["special_ids"].items()},
            tokenizer_sha256=raw.get("tokenizer_sha256", ""),
            splits={
                name: [ShardInfo(**info) for info in infos] for name, infos in raw.get("splits", {}).items()
            },
        )
        itemsize = np.dtype(index.dtype).itemsize
        for name, infos in index.splits.items():
            if not infos or index.tokens(name) == 0:
                raise DataError(f"{path}: split {name!r} has no tokens")
            for info in infos:
                shard = directory / info.file
                if not shard.is_file():
                    raise DataError(f"{shard}: shard listed in {path} is missing")
                size = shard.stat().st_size
                if size != info.tokens * itemsize:
                    raise DataError(
                        f"{shard}: truncated or corrupt shard: {size} bytes on disk, "
                        f"index says {info.tokens} tokens x {itemsize} bytes = {info.tokens * itemsize}"
                    )
        return index

    def open_split(self, split: str) -> list[np.memmap]:
        """Memory-map every shard of a split read-only (no copy, no read until touched)."""
        if split not in self.splits:
            raise DataError(f"{self.directory / INDEX_FILE}: no split {split!r}; has {sorted(self.splits)}")
        return [
            np.memmap(self.directory / info.file, dtype=self.dtype, mode="r", shape=(info.tokens,))
            for info in self.splits[split]
        ]


class ShardWriter:
    """Appends token arrays to `<split>_NNNNN.bin` files, starting a new file every `shard_tokens`."""

    def __init__(self, directory: Path, *, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory = Path(directory)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.infos: list[ShardInfo] = []
        self._file = None
        self._name = ""
        self._tokens = 0
        self._documents = 0

    def _open_next(self) -> None:
        self._close_current()
        self._name = f"{self.split}_{len(self.infos):05d}.bin"
        self._file = open(self.directory / self._name, "wb")  # noqa: SIM115 - closed in _close_current

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.close()
            self.infos.append(ShardInfo(self._name, self._tokens, self._documents))
            self._file = None
            self._tokens = 0
            self._documents = 0

    def append(self, ids: np.ndarray, *, documents: int) -> None:
        """Write already-converted ids (dtype must match); a new file starts when the current one is full."""
        if ids.dtype != self.dtype:
            raise TypeError(f"expected {self.dtype}, got {ids.dtype}")
        if self._file is None or self._tokens >= self.shard_tokens:
            self._open_next()
        self._file.write(memoryview(np.ascontiguousarray(ids)))  # no extra copy, unlike tobytes()
        self._tokens += int(ids.size)
        self._documents += documents

    def close(self) -> list[ShardInfo]:
        self._close_current()
        return self.infos
