"""Encoding documents to token ids exactly as the trained tokenizer does, but cheaper where possible.

Measured on IMDb text, one thread, in memory, MB of text per second: the trained WordPiece
tokenizer about 2; the word-cache path below about 20 warm (every word known) and 8 cold. Three
facts make it exact, not approximate:

1. On most text the BERT normalizer's ``clean_text`` and ``handle_chinese_chars`` do nothing
   but delete a few characters: they only touch control/format/private-use/unassigned characters,
   U+FFFD and CJK ideographs, and rewrite whitespace to a space (which the BERT pre-tokenizer drops
   anyway). Documents made only of `SAFE_CHARS` and `REMOVED_CHARS` get the `REMOVED_CHARS`
   deleted first (as ``clean_text`` does, before anything else), and then a *light twin* (the same
   tokenizer with ``Lowercase`` or no normalizer) gives the same ids.
2. On such text the BERT pre-tokenizer is: pad each punctuation mark with spaces, split on
   whitespace. Arrow does both over a whole batch in C++ (`pre_tokens`).
3. WordPiece encodes each pre-token on its own. So each distinct word is encoded once by the twin
   and its ids are reused wherever it appears again (`WordCache`: a dict to a slot, and numpy
   arrays that assemble a batch with one gather).

Everything else (other characters, added-token text such as ``[SEP]``, other tokenizer kinds) goes
through the tokenizer itself. ``tests/test_tokenize_encode.py`` checks every safe and every removed
character one by one against the tokenizer, all of Unicode against the routing regex, the
pre-tokens against ``BertPreTokenizer``, and mixed text, cold and warm. The saved tokenizer.json is
untouched: consumers (fine-tuning, serving) still get the full normalizer."""

from __future__ import annotations

import json
import string
import threading
import time
import unicodedata
from concurrent.futures import Executor
from itertools import chain
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Encoding, Tokenizer, normalizers

# Characters on which BertNormalizer(clean_text, handle_chinese_chars, strip_accents=False) acts
# like nothing (or like Lowercase), up to whitespace becoming a space: tab, newline, carriage return,
# printable ASCII, Latin-1 letters and symbols (U+00A0 no-break space included, U+00AD soft hyphen
# excluded: it is a format character that clean_text removes), Latin Extended-A, and the general
# punctuation U+2010..U+2027 and U+2030..U+205E (dashes, quotes, ellipsis; the zero-width and
# bidi format characters around them are excluded). All are assigned since Unicode 1.1, so no
# Unicode-version difference between RE2 and Rust can move them.
SAFE_RANGES: tuple[tuple[int, int], ...] = (
    (0x09, 0x0A),
    (0x0D, 0x0D),
    (0x20, 0x7E),
    (0xA0, 0xAC),
    (0xAE, 0x17F),
    (0x2010, 0x2027),
    (0x2030, 0x205E),
)
# Characters that clean_text deletes before anything else looks at the text: NUL, U+FFFD, and
# "control" ones (Cc other than tab/newline/carriage return, and the format characters soft
# hyphen, zero-width space/joiners, bidi marks and the BOM). Deleting them first (Arrow, exactly as
# clean_text does) leaves a safe document with the same ids. The C1 controls U+0080..U+009F are
# the common case: cp1252 dashes and ellipses decoded as Latin-1 (3% of IMDb reviews hold one).
REMOVED_RANGES: tuple[tuple[int, int], ...] = (
    (0x00, 0x08),
    (0x0B, 0x0C),
    (0x0E, 0x1F),
    (0x7F, 0x9F),
    (0xAD, 0xAD),
    (0x200B, 0x200F),
    (0xFEFF, 0xFEFF),
    (0xFFFD, 0xFFFD),
)


def _chars(ranges: tuple[tuple[int, int], ...]) -> frozenset[str]:
    return frozenset(chr(c) for lo, hi in ranges for c in range(lo, hi + 1))


def _re2_class(ranges: tuple[tuple[int, int], ...], *, negate: bool = False) -> str:
    """An RE2 (Arrow's regex engine) character class of `ranges`, or of everything else."""
    return "[" + "^" * negate + "".join(f"\\x{{{lo:x}}}-\\x{{{hi:x}}}" for lo, hi in ranges) + "]"


SAFE_CHARS = _chars(SAFE_RANGES)
REMOVED_CHARS = _chars(REMOVED_RANGES)
_UNSAFE = _re2_class(SAFE_RANGES + REMOVED_RANGES, negate=True)
_REMOVED = _re2_class(REMOVED_RANGES)


def light_twin(tokenizer: Tokenizer) -> Tokenizer | None:
    """A copy of `tokenizer` with a cheaper normalizer that is exact on `SAFE_CHARS`, or None.

    Only a WordPiece model behind a ``BertPreTokenizer`` and a ``BertNormalizer`` with
    ``clean_text`` and ``handle_chinese_chars`` on and accent stripping off qualifies (accent
    stripping is an NFD pass that acts on Latin-1 letters), and only when no added token is matched
    on normalized text (the twin's normalized text keeps tabs and newlines where the full one has
    spaces). Any other tokenizer (byte-level BPE, a hand-made one) gets None: encode everything
    with the tokenizer itself.
    """
    spec: dict[str, Any] = json.loads(tokenizer.to_str())
    norm = spec.get("normalizer") or {}
    if norm.get("type") != "BertNormalizer" or not (
        norm.get("clean_text") and norm.get("handle_chinese_chars")
    ):
        return None
    lowercase = bool(norm.get("lowercase"))
    strip = norm.get("strip_accents")
    if strip is None:
        strip = lowercase  # BertNormalizer's own default
    if strip:
        return None
    if any(token.get("normalized") for token in spec.get("added_tokens", [])):
        return None
    if (spec.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer":
        return None  # whitespace equivalence relies on the BERT pre-tokenizer dropping all whitespace
    if (spec.get("model") or {}).get("type") != "WordPiece":
        return None  # deterministic per word (a BPE with dropout is not, so a word cache would lie)
    twin = Tokenizer.from_str(tokenizer.to_str())
    twin.normalizer = normalizers.Lowercase() if lowercase else None
    return twin


def _re2_literal(text: str) -> str:
    return "".join(c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):x}}}" for c in text)


def needs_full_normalizer(array: pa.Array, *, also: tuple[str, ...] = ()) -> np.ndarray:
    """True for strings holding a character in neither `SAFE_CHARS` nor `REMOVED_CHARS`, or any of
    the texts `also` (nulls: True). One RE2 pass over the text, whatever the number of texts."""
    pattern = "|".join([_UNSAFE, *map(_re2_literal, also)])
    unsafe = pc.match_substring_regex(array, pattern=pattern)
    return pc.fill_null(unsafe, True).to_numpy(zero_copy_only=False)


# What BertPreTokenizer does on safe text: split on whitespace (dropped) and isolate every
# punctuation character (ASCII punctuation or a Unicode P* category, as tokenizers' is_bert_punc).
# Done by Arrow (C++, GIL released): pad each punctuation mark with spaces (RE2), then split on
# Unicode whitespace, which within SAFE_CHARS is exactly tab, newline, carriage return, space and
# U+00A0 (``tests/test_tokenize_encode.py`` checks each safe character).
SPACE_CHARS = frozenset("\t\n\r \xa0")
PUNCT_CHARS = frozenset(
    c for c in SAFE_CHARS if unicodedata.category(c).startswith("P") or c in string.punctuation
)
_PUNCT_RE2 = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in sorted(PUNCT_CHARS)) + "]"


def pre_tokens(array: pa.Array) -> pa.ListArray:
    """Per document, its pre-tokens as BertPreTokenizer cuts safe text (empty strings may appear
    at whitespace ends; they encode to no ids)."""
    spaced = pc.replace_substring_regex(array, pattern=_PUNCT_RE2, replacement=" \\0 ")
    return pc.utf8_split_whitespace(spaced)


def _batch_method(tokenizer: Tokenizer) -> Any:
    # encode_batch_fast (tokenizers >= 0.21) skips computing offsets, which shards do not need.
    return getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)


def flatten(encodings: list[Encoding], sep: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(ids of all documents, each followed by `sep`; tokens per document, sep included)."""
    # Growing one list with += is the fastest pure-Python concatenation measured here (faster
    # than np.fromiter over itertools.chain and than per-document np.asarray + np.concatenate).
    flat: list[int] = []
    lengths = np.empty(len(encodings), dtype=np.int64)
    extend, append = flat.extend, flat.append
    for i, encoding in enumerate(encodings):
        ids = encoding.ids
        extend(ids)
        append(sep)
        lengths[i] = len(ids) + 1
    return np.asarray(flat, dtype=dtype), lengths


# Words per tokenizer call when the word cache encodes new words (see WordCache._encode_new).
WORDS_PER_CALL = 256


class WordCache:
    """Token ids of words, each word encoded once: a dict word -> slot, and the ids of all slots in
    flat numpy arrays, so that a batch is assembled by one numpy gather, not a loop over its words.

    Holds at most `max_words` words: when a batch's new words would pass that, it starts over (a
    single batch with more distinct words than that still gets all of them, for that batch).
    """

    def __init__(self, tokenizer: Tokenizer, *, dtype: np.dtype, max_words: int) -> None:
        # encode_batch, not encode_batch_fast: word_ids are needed (the fast one leaves them None).
        self._encode_with_words = tokenizer.encode_batch
        self.dtype = np.dtype(dtype)
        self.max_words = max_words
        self.clear()

    def clear(self) -> None:
        self.slots: dict[str, int] = {"": 0}  # an empty pre-token (at whitespace ends): no ids
        self._starts = np.zeros(1 << 12, dtype=np.int64)
        self._lengths = np.zeros(1 << 12, dtype=np.int64)
        self._ids = np.zeros(1 << 14, dtype=self.dtype)
        self._used = 0

    def __len__(self) -> int:
        return len(self.slots)

    def slots_of(self, words: list[str]) -> np.ndarray:
        """The slot of each of `words` (distinct), encoding the ones not yet known."""
        unseen = [w for w in words if w not in self.slots]
        if unseen and len(self.slots) + len(unseen) > self.max_words:
            self.clear()
            unseen = [w for w in words if w not in self.slots]
        if unseen:
            self._add(unseen)
        return np.fromiter(map(self.slots.__getitem__, words), dtype=np.int64, count=len(words))

    def _add(self, words: list[str]) -> None:
        ids, lengths = self._encode_new(words)
        first, stop = len(self.slots), len(self.slots) + len(words)
        if stop > self._starts.size:
            size = max(stop, 2 * self._starts.size)
            self._starts = np.resize(self._starts, size)
            self._lengths = np.resize(self._lengths, size)
        if self._used + ids.size > self._ids.size:
            self._ids = np.resize(self._ids, max(self._used + ids.size, 2 * self._ids.size))
        self._starts[first:stop] = self._used + np.cumsum(lengths) - lengths
        self._lengths[first:stop] = lengths
        self._ids[self._used : self._used + ids.size] = ids
        self._used += ids.size
        self.slots.update(zip(words, range(first, stop), strict=True))

    def _encode_new(self, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of `words` concatenated, tokens per word).

        Words go to the tokenizer joined by spaces, `WORDS_PER_CALL` at a time, and each
        encoding's ``word_ids`` cut its ids back into words: 3x faster than one encoding per word
        (measured on IMDb's 33k distinct words), as most of a tiny encoding's cost is the object.
        Each word is one pre-token, so the tokenizer sees exactly these words; a chunk where it
        does not (an invariant, checked) is encoded word by word instead.
        """
        chunks = [words[i : i + WORDS_PER_CALL] for i in range(0, len(words), WORDS_PER_CALL)]
        encodings = self._encode_with_words([" ".join(chunk) for chunk in chunks], add_special_tokens=False)
        ids: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        for chunk, encoding in zip(chunks, encodings, strict=True):
            word_ids = encoding.word_ids
            per_word = (
                np.bincount(np.asarray(word_ids, dtype=np.int64), minlength=len(chunk))
                if (None not in word_ids)
                else np.zeros(0, dtype=np.int64)
            )
            if per_word.size != len(chunk) or not per_word.all():
                singles = [e.ids for e in self._encode_with_words(chunk, add_special_tokens=False)]
                per_word = np.fromiter(map(len, singles), dtype=np.int64, count=len(singles))
                ids.append(
                    np.fromiter(chain.from_iterable(singles), dtype=self.dtype, count=int(per_word.sum()))
                )
            else:
                ids.append(np.asarray(encoding.ids, dtype=self.dtype))
            lengths.append(per_word)
        if not ids:
            return np.empty(0, dtype=self.dtype), np.empty(0, dtype=np.int64)
        return np.concatenate(ids), np.concatenate(lengths)

    def gather(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the ids of the words at `slots`, concatenated; the cumulative token count after each)."""
        lengths = self._lengths[slots]
        return self._ids[segments(self._starts[slots], lengths)], np.cumsum(lengths)


def segments(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices that gather the segments [start, start + length) one after the other.

    Output position p falls in some segment j at offset p - (its output start); so its index is
    starts[j] + that offset. Empty segments contribute nothing.
    """
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if ends.size else 0
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(total)


def _byte_count(array: pa.Array) -> int:
    return int(pc.sum(pc.binary_length(array)).as_py() or 0)


class BatchEncoder:
    """Encode documents (no special tokens) into token ids identical to `tokenizer`'s, each + `sep`.

    With `fast_path` and a tokenizer that has a light twin, safe documents (see module doc) that
    hold no added-token text are cut into pre-tokens by Arrow over the whole batch, and each
    distinct pre-token is encoded once by the twin and remembered (`WordCache`): WordPiece works
    word by word, so a word's ids do not depend on its context, and most words of a corpus repeat.
    The cache holds at most `cache_words` words, so it does not grow with the corpus. Every other
    document goes through the tokenizer itself (Rust, all cores, GIL released).

    ``split`` runs on the reading thread (Arrow only); ``encode`` may run on another thread.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        sep: int,
        dtype: np.dtype,
        fast_path: bool = True,
        cache_words: int = 1 << 18,
    ) -> None:
        self.tokenizer = tokenizer
        self.sep = sep
        self.dtype = np.dtype(dtype)
        self.twin = light_twin(tokenizer) if fast_path else None
        self._full = _batch_method(tokenizer)
        self.cache = WordCache(self.twin or tokenizer, dtype=self.dtype, max_words=cache_words)
        self._cache_lock = threading.Lock()
        # Bytes per second of (the second thread, this one) in `encode`, smoothed; None until measured.
        self._rates: tuple[float, float] | None = None
        # Added tokens are matched on raw text before pre-tokenization: documents holding one go
        # through the tokenizer itself.
        self._added = tuple(t.content for t in tokenizer.get_added_tokens_decoder().values())

    def _needs_full(self, array: pa.Array) -> np.ndarray:
        return needs_full_normalizer(array, also=self._added)

    def split(self, array: pa.Array) -> tuple[pa.Array, pa.Array, np.ndarray]:
        """(documents for the word cache, documents for the tokenizer, per-row True = tokenizer),
        each in row order."""
        empty = pa.array([], type=array.type)
        if self.twin is None:
            return empty, array, np.ones(len(array), dtype=bool)
        full = self._needs_full(array)
        if not full.any():
            return array, empty, full
        if full.all():
            return empty, array, full
        return array.filter(pa.array(~full)), array.filter(pa.array(full)), full

    def _encode_light(self, array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        # The Arrow work runs outside the lock and releases the GIL: two threads overlap there.
        documents = pre_tokens(pc.replace_substring_regex(array, pattern=_REMOVED, replacement=""))
        words = pc.dictionary_encode(pc.list_flatten(documents))
        distinct = words.dictionary.to_pylist()
        with self._cache_lock:
            ids, word_ends = self.cache.gather(self.cache.slots_of(distinct)[words.indices.to_numpy()])
        offsets = documents.offsets.to_numpy()
        doc_ends = np.concatenate(([0], word_ends))[offsets - offsets[0]]  # tokens before each doc end
        return np.insert(ids, doc_ends[1:], self.sep), np.diff(doc_ends) + 1

    def _second_share(self, light: pa.Array, heavy_bytes: int) -> int:
        """How many light documents (a prefix) the second thread takes, besides the heavy ones, so
        that both threads end together."""
        if self._rates is None:
            return len(light) // 2
        second_rate, first_rate = self._rates
        light_bytes = _byte_count(light)
        if light_bytes == 0:
            return 0
        seconds = (heavy_bytes + light_bytes) / (second_rate + first_rate)
        share = min(max(second_rate * seconds - heavy_bytes, 0.0), light_bytes) / light_bytes
        return round(share * len(light))

    def encode(
        self, light: pa.Array, heavy: pa.Array, full: np.ndarray, *, executor: Executor | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids of every document + sep, in row order; tokens per document): row i from `heavy` if full[i].

        With an `executor` (one thread), that thread takes the heavy documents (the tokenizer, GIL
        released) and a prefix of the light ones (the word cache, whose Arrow work releases the GIL
        too), and this thread the other light ones; the split adapts batch by batch to the measured
        speeds of both sides. Without one, everything runs here, one after the other.
        """
        if not len(heavy) and not len(light):
            return np.empty(0, dtype=self.dtype), np.empty(0, dtype=np.int64)
        heavy_bytes = _byte_count(heavy) if executor is not None else 0
        k = self._second_share(light, heavy_bytes) if executor is not None else 0
        to_second, to_first = light.slice(0, k), light.slice(k)

        def second() -> tuple[
            tuple[np.ndarray, np.ndarray] | None, tuple[np.ndarray, np.ndarray] | None, float
        ]:
            began = time.perf_counter()
            h = None
            if len(heavy):
                h = flatten(self._full(heavy.to_pylist(), add_special_tokens=False), self.sep, self.dtype)
            r = self._encode_light(to_second) if len(to_second) else None
            return h, r, time.perf_counter() - began

        future = executor.submit(second) if executor is not None else None
        began = time.perf_counter()
        p = self._encode_light(to_first) if len(to_first) else None
        first_seconds = time.perf_counter() - began
        h, r, second_seconds = future.result() if future is not None else second()
        if future is not None and p is not None and (h is not None or r is not None):
            rates = (
                (heavy_bytes + _byte_count(to_second)) / max(second_seconds, 1e-6),
                _byte_count(to_first) / max(first_seconds, 1e-6),
            )
            old = self._rates or rates
            self._rates = (0.5 * (old[0] + rates[0]), 0.5 * (old[1] + rates[1]))

        parts = [part for part in (h, r, p) if part is not None]
        if len(parts) == 1:
            return parts[0]
        # Row order: heavy rows from h; light rows from r (the first k of them), then from p.
        source = np.where(full, 0, 2)
        source[np.flatnonzero(~full)[:k]] = 1
        lengths = np.empty(len(full), dtype=np.int64)
        starts = np.empty(len(full), dtype=np.int64)
        offset = 0
        for i, part in enumerate((h, r, p)):
            if part is not None:
                rows = source == i
                lengths[rows] = part[1]
                starts[rows] = offset + np.cumsum(part[1]) - part[1]
                offset += part[0].size
        return np.concatenate([part[0] for part in parts])[segments(starts, lengths)], lengths

    def encode_texts(self, texts: list[str], *, executor: Executor | None = None) -> list[list[int]]:
        """Ids per document, without the sep (for callers holding Python strings: tests, benchmarks)."""
        ids, lengths = self.encode(*self.split(pa.array(texts, type=pa.string())), executor=executor)
        return [doc[:-1].tolist() for doc in np.split(ids, np.cumsum(lengths)[:-1])]
