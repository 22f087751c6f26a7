"""Streaming readers, one per input format, each yielding :class:`RawBatch` chunks.

One job: read one file (or folder, or Hugging Face dataset) of a ``prepare.source.kind`` in
batches of at most ``chunk_rows`` rows, so the caller never holds more than one chunk of the
corpus: CSV and JSONL and plain text are read line by line (:func:`iter_decoded_lines`), Parquet
by record batch, aclImdb file by file and Hugging Face datasets (memory-mapped Arrow) in slices.
Which files are read, and in what order, is :mod:`bigmodel_ops.data.sources`.

Labeled batches come before unlabeled ones from the same source, so that when a
text occurs both labeled and unlabeled, deduplication keeps the labeled copy.

Errors name the file and the row/line (1-based) or byte offset; see
:class:`RawBatch.where`.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigmodel_ops.config import SourceParams
from bigmodel_ops.data.labels import label_for_folder
from bigmodel_ops.errors import DataError


@dataclass
class RawBatch:
    """Up to chunk_rows raw rows from one origin (a file, an HF split).

    `labels` is None for unlabeled input. `label_ids`, when set, holds labels that
    are already resolved to class ids (aclImdb folders); `labels` is then None.
    """

    origin: str
    first_row: int
    unit: str  # "row", "line" or "file": what `first_row` counts
    texts: list[Any]
    labels: list[Any] | None = None
    label_ids: list[int] | None = None
    # Per-row origins when each row is its own file (aclImdb).
    row_origins: list[str] | None = field(default=None, repr=False)
    # Per-row numbers when rows are not consecutive (blank lines skipped).
    row_numbers: list[int] | None = field(default=None, repr=False)

    def where(self, index: int) -> str:
        """Human-readable location of row `index` of this batch, for error messages."""
        if self.row_origins is not None:
            return self.row_origins[index]
        number = self.row_numbers[index] if self.row_numbers is not None else self.first_row + index
        return f"{self.origin}: {self.unit} {number}"

    def __len__(self) -> int:
        return len(self.texts)


# --- decoding ---------------------------------------------------------------------------------


def check_encoding(encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"prepare.source.encoding: unknown encoding {encoding!r}") from None


def iter_decoded_lines(path: Path, *, encoding: str) -> Iterator[tuple[int, str]]:
    """Yield (line number, line text with its newline) of a file, streaming.

    A byte sequence that is invalid in `encoding` raises DataError naming the
    file, the line and the byte offset. A UTF-8 byte-order mark is dropped.
    """
    check_encoding(encoding)
    if "\n".encode(encoding) != b"\n":
        # UTF-16/32: newlines are not single bytes, so split after decoding instead.
        yield from _iter_decoded_lines_wide(path, encoding=encoding)
        return
    offset = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{path}: line {number}: cannot decode as {encoding} at byte offset "
                    f"{offset + error.start} ({error.reason}); set prepare.source.encoding"
                ) from None
            if number == 1 and line.startswith("\ufeff"):
                line = line[1:]
            offset += len(raw)
            yield number, line


def _iter_decoded_lines_wide(path: Path, *, encoding: str) -> Iterator[tuple[int, str]]:
    number = 0
    with open(path, encoding=encoding, newline="") as handle:
        try:
            for line in handle:
                number += 1
                yield number, line
        except UnicodeDecodeError as error:
            raise DataError(
                f"{path}: line {number + 1}: cannot decode as {encoding} ({error.reason}); "
                "set prepare.source.encoding"
            ) from None


# --- readers ----------------------------------------------------------------------------------


def read_text_lines(path: Path, *, encoding: str, chunk_rows: int) -> Iterator[RawBatch]:
    """One unlabeled document per non-blank line."""
    texts: list[str] = []
    numbers: list[int] = []
    for number, line in iter_decoded_lines(path, encoding=encoding):
        if not line.strip():
            continue
        texts.append(line)
        numbers.append(number)
        if len(texts) >= chunk_rows:
            yield RawBatch(str(path), numbers[0], "line", texts, row_numbers=numbers)
            texts, numbers = [], []
    if texts:
        yield RawBatch(str(path), numbers[0], "line", texts, row_numbers=numbers)


def _missing_column(path: Path | str, role: str, column: str, found: list[str]) -> DataError:
    return DataError(
        f"{path}: no {role} column {column!r}; columns found: {found} (set prepare.source.{role}_column)"
    )


def read_csv(path: Path, *, source: SourceParams, chunk_rows: int) -> Iterator[RawBatch]:
    """A CSV file with a header row; quoted fields may span lines."""
    # Reviews can be longer than the csv module's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    lines = (line for _, line in iter_decoded_lines(path, encoding=source.encoding))
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: the file is empty (expected a header row)") from None
    except csv.Error as error:
        raise DataError(f"{path}: line {reader.line_num}: not valid CSV: {error}") from None
    header = [name.strip() for name in header]
    if source.text_column not in header:
        raise _missing_column(path, "text", source.text_column, header)
    text_index = header.index(source.text_column)
    label_index = None
    if source.label_column is not None:
        if source.label_column not in header:
            raise _missing_column(path, "label", source.label_column, header)
        label_index = header.index(source.label_column)
    width = len(header)
    texts: list[str] = []
    labels: list[str] | None = [] if label_index is not None else None
    numbers: list[int] = []
    row = 0
    try:
        for record in reader:
            if not record:
                continue  # blank line
            row += 1
            if len(record) != width:
                raise DataError(
                    f"{path}: row {row} (line {reader.line_num}): {len(record)} fields, "
                    f"the header has {width}"
                )
            texts.append(record[text_index])
            numbers.append(row)
            if labels is not None:
                labels.append(record[label_index])
            if len(texts) >= chunk_rows:
                yield RawBatch(str(path), numbers[0], "row", texts, labels, row_numbers=numbers)
                texts, numbers = [], []
                labels = [] if labels is not None else None
    except csv.Error as error:
        raise DataError(f"{path}: line {reader.line_num}: not valid CSV: {error}") from None
    if texts:
        yield RawBatch(str(path), numbers[0], "row", texts, labels, row_numbers=numbers)


def read_jsonl(path: Path, *, source: SourceParams, chunk_rows: int) -> Iterator[RawBatch]:
    """One JSON object per line; blank lines are skipped."""
    texts: list[Any] = []
    labels: list[Any] | None = [] if source.label_column is not None else None
    numbers: list[int] = []
    for number, line in iter_decoded_lines(path, encoding=source.encoding):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {number}: not valid JSON: {error.msg}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object, got {type(obj).__name__}")
        if source.text_column not in obj:
            raise _missing_column(f"{path}: line {number}", "text", source.text_column, list(obj))
        texts.append(obj[source.text_column])
        numbers.append(number)
        if labels is not None:
            if source.label_column not in obj:
                raise _missing_column(f"{path}: line {number}", "label", source.label_column, list(obj))
            labels.append(obj[source.label_column])
        if len(texts) >= chunk_rows:
            yield RawBatch(str(path), numbers[0], "line", texts, labels, row_numbers=numbers)
            texts, numbers = [], []
            labels = [] if labels is not None else None
    if texts:
        yield RawBatch(str(path), numbers[0], "line", texts, labels, row_numbers=numbers)


def read_parquet(path: Path, *, source: SourceParams, chunk_rows: int) -> Iterator[RawBatch]:
    """Record batches of the needed columns only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file: {error}") from None
    found = parquet.schema_arrow.names
    if source.text_column not in found:
        raise _missing_column(path, "text", source.text_column, found)
    columns = [source.text_column]
    if source.label_column is not None:
        if source.label_column not in found:
            raise _missing_column(path, "label", source.label_column, found)
        columns.append(source.label_column)
    text_type = parquet.schema_arrow.field(source.text_column).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise DataError(f"{path}: text column {source.text_column!r} has type {text_type}, expected a string")
    first = 1
    try:
        for batch in parquet.iter_batches(batch_size=chunk_rows, columns=columns):
            texts = batch.column(0).to_pylist()
            labels = batch.column(1).to_pylist() if len(columns) == 2 else None
            yield RawBatch(str(path), first, "row", texts, labels)
            first += len(texts)
    except pa.ArrowInvalid as error:
        raise DataError(f"{path}: near row {first}: cannot read: {error}") from None


def read_aclimdb(root: Path, *, labels: list[str], encoding: str, chunk_rows: int) -> Iterator[RawBatch]:
    """The Stanford aclImdb layout: <split>/<class>/*.txt, one review per file.

    Class folders (`neg`, `pos`) map to declared labels by exact name or unique
    prefix; `unsup` folders (top-level or under a split) are unlabeled. The
    original train/test division is not kept: every labeled review is pooled and
    re-split by `prepare.split`, so the split fractions mean the same for every
    source. Labeled folders are read before `unsup`.
    """
    labeled: list[tuple[Path, int]] = []
    unlabeled: list[Path] = []
    candidates = [root / "train", root / "test"]
    for split_dir in candidates:
        if not split_dir.is_dir():
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if class_dir.name == "unsup":
                unlabeled.append(class_dir)
            else:
                labeled.append((class_dir, label_for_folder(class_dir.name, labels, where=str(class_dir))))
    if (root / "unsup").is_dir():
        unlabeled.append(root / "unsup")
    if not labeled and not unlabeled:
        raise DataError(
            f"{root}: not an aclImdb folder: expected train/pos/*.txt, train/neg/*.txt, "
            f"test/pos|neg/*.txt and/or unsup/*.txt; found {sorted(p.name for p in root.iterdir())}"
        )
    total = 0
    for class_dir, label_id in labeled:
        total += yield from _read_file_docs(class_dir, label_id, encoding=encoding, chunk_rows=chunk_rows)
    for folder in unlabeled:
        total += yield from _read_file_docs(folder, None, encoding=encoding, chunk_rows=chunk_rows)
    if total == 0:
        raise DataError(f"{root}: the aclImdb folders hold no *.txt files")


def _read_file_docs(
    folder: Path, label_id: int | None, *, encoding: str, chunk_rows: int
) -> Iterator[RawBatch]:
    check_encoding(encoding)
    texts: list[str] = []
    origins: list[str] = []
    count = 0
    # os.scandir + sort of names only: 50k names is a few MB, the texts are read one at a time.
    names = sorted(entry.name for entry in os.scandir(folder) if entry.name.endswith(".txt"))
    for name in names:
        path = folder / name
        raw = path.read_bytes()
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as error:
            raise DataError(
                f"{path}: cannot decode as {encoding} at byte offset {error.start} ({error.reason}); "
                "set prepare.source.encoding"
            ) from None
        texts.append(text)
        origins.append(str(path))
        count += 1
        if len(texts) >= chunk_rows:
            yield _file_batch(folder, texts, origins, label_id)
            texts, origins = [], []
    if texts:
        yield _file_batch(folder, texts, origins, label_id)
    return count


def _file_batch(folder: Path, texts: list[str], origins: list[str], label_id: int | None) -> RawBatch:
    ids = None if label_id is None else [label_id] * len(texts)
    return RawBatch(str(folder), 1, "file", texts, label_ids=ids, row_origins=origins)


def read_hf(source: SourceParams, *, chunk_rows: int) -> Iterator[RawBatch]:
    """A Hugging Face dataset (hub id or `save_to_disk` folder), sliced in batches.

    Integer labels index the declared labels (HF `imdb`: 0 = neg, 1 = pos);
    a split named `unsup` and label -1 are unlabeled. Splits are read in
    the order labeled first, then `unsup`.
    """
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - datasets is a dependency
        raise DataError(
            f"prepare.source.kind {source.kind!r} needs the `datasets` package: {error}"
        ) from None

    if source.kind == "hf_disk":
        try:
            loaded = datasets.load_from_disk(source.path)
        except (FileNotFoundError, ValueError) as error:
            raise DataError(f"{source.path}: not a dataset saved with save_to_disk: {error}") from None
        origin = source.path
    else:
        try:
            loaded = datasets.load_dataset(source.path, name=source.hf_config)
        except Exception as error:  # noqa: BLE001 - network, auth, missing dataset: all user-fixable
            raise DataError(
                f"prepare.source.path: cannot load Hugging Face dataset {source.path!r}"
                f"{f' (config {source.hf_config!r})' if source.hf_config else ''}: {error}"
            ) from None
        origin = f"hf:{source.path}"
    if isinstance(loaded, datasets.Dataset):
        splits = {"data": loaded}
    else:
        splits = dict(loaded)
    wanted = source.hf_splits if source.hf_splits is not None else list(splits)
    missing = [name for name in wanted if name not in splits]
    if missing:
        raise DataError(f"{origin}: no split(s) {missing}; splits found: {list(splits)}")
    ordered = [name for name in wanted if name != "unsup"] + [name for name in wanted if name == "unsup"]
    for name in ordered:
        split = splits[name]
        found = list(split.column_names)
        if source.text_column not in found:
            raise _missing_column(f"{origin}[{name}]", "text", source.text_column, found)
        unlabeled = name == "unsup" or source.label_column is None
        if not unlabeled and source.label_column not in found:
            raise _missing_column(f"{origin}[{name}]", "label", source.label_column, found)
        columns = [source.text_column] if unlabeled else [source.text_column, source.label_column]
        # Arrow batches straight from the memory-mapped cache files (honours any index mapping).
        start = 1
        for piece in split.select_columns(columns).with_format("arrow").iter(batch_size=chunk_rows):
            texts = piece.column(source.text_column).to_pylist()
            labels = None if unlabeled else piece.column(source.label_column).to_pylist()
            yield RawBatch(f"{origin}[{name}]", start, "row", texts, labels)
            start += len(texts)
