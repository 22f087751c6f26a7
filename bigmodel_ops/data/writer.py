"""Chunked Parquet output: rows are buffered up to chunk_rows, then written as one row group."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

LABELED_SCHEMA = pa.schema([("text", pa.string()), ("label", pa.string()), ("label_id", pa.int32())])
UNLABELED_SCHEMA = pa.schema([("text", pa.string())])


class SplitWriter:
    """Write one split file in row groups of `chunk_rows` and fingerprint its content.

    The digest covers the texts and labels in order (not the Parquet bytes), so it
    identifies the data independently of the pyarrow version or compression.
    """

    def __init__(self, path: Path, *, labels: list[str] | None, chunk_rows: int) -> None:
        self.path = path
        self.labels = labels
        self.chunk_rows = chunk_rows
        self.schema = LABELED_SCHEMA if labels is not None else UNLABELED_SCHEMA
        self.rows = 0
        self._texts: list[str] = []
        self._label_ids: list[int] = []
        self._hash = hashlib.blake2b(digest_size=16)
        self._writer: pq.ParquetWriter | None = None

    def add(self, text: str, label_id: int | None = None) -> None:
        self._texts.append(text)
        self._hash.update(text.encode("utf-8"))
        if self.labels is not None:
            assert label_id is not None and label_id >= 0
            self._label_ids.append(label_id)
            self._hash.update(b"\x1f" + self.labels[label_id].encode("utf-8"))
        self._hash.update(b"\x1e")
        self.rows += 1
        if len(self._texts) >= self.chunk_rows:
            self._flush()

    def _flush(self) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")
        if not self._texts:
            return
        columns: list[pa.Array] = [pa.array(self._texts, type=pa.string())]
        if self.labels is not None:
            ids = pa.array(self._label_ids, type=pa.int32())
            columns.append(pa.DictionaryArray.from_arrays(ids, pa.array(self.labels)).cast(pa.string()))
            columns.append(ids)
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
        self._texts, self._label_ids = [], []

    def close(self) -> str:
        """Flush, close (an empty split still gets a valid file) and return the content digest."""
        self._flush()
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        return self._hash.hexdigest()

    def abort(self) -> None:
        """Close the file handle after a failure (the caller deletes the partial file)."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - already failing; the first error is the one to report
                pass
            self._writer = None
