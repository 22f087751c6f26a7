"""The pretraining pool: the `text` column of a Parquet file, streamed in batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bigmodel_ops.errors import DataError

POOL_FILE = "pretrain.parquet"
TEXT_COLUMN = "text"


@dataclass(frozen=True)
class TextPool:
    """The `text` column of a Parquet file, read batch by batch."""

    path: Path
    rows: int

    @classmethod
    def open(cls, path: Path | str, *, column: str = TEXT_COLUMN) -> TextPool:
        """Check the file exists, is Parquet and has a string column `column`.

        Raises DataError naming the file (and the column) otherwise. Row counts come from the
        Parquet footer; no text is read here.
        """
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: pretraining pool not found (run the prepare stage first)")
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{path}: not a readable Parquet file: {error}") from None
        schema = parquet.schema_arrow
        if column not in schema.names:
            raise DataError(
                f"{path}: no column {column!r} (columns: {schema.names}); "
                "the pretraining pool needs one document per row in a string column 'text'"
            )
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise DataError(f"{path}: column {column!r} has type {kind}, expected strings")
        return cls(path=path, rows=parquet.metadata.num_rows)

    def batches(self, batch_rows: int) -> Iterator[tuple[int, pa.Array]]:
        """(first row index, string array) per batch, in file order.

        Column chunks are read through a 1 MiB stream buffer instead of whole: without it, memory
        would grow with the writer's row-group size (pyarrow's default is up to 1M rows).
        """
        parquet = pq.ParquetFile(self.path, buffer_size=1 << 20, pre_buffer=False)
        start = 0
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=[TEXT_COLUMN]):
            array = batch.column(0)
            yield start, array
            start += len(array)


def document_mask(array: pa.Array) -> np.ndarray:
    """True for rows that are documents: not null, not empty, not only whitespace."""
    has_text = pc.and_(pc.greater(pc.binary_length(array), 0), pc.invert(pc.utf8_is_space(array)))
    return pc.fill_null(has_text, False).to_numpy(zero_copy_only=False)


def byte_lengths(array: pa.Array) -> np.ndarray:
    """UTF-8 bytes per row (0 for nulls), as int64."""
    return pc.fill_null(pc.binary_length(array), 0).to_numpy(zero_copy_only=False).astype(np.int64)
