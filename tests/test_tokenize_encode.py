"""The encode fast path: a cheaper normalizer where it is exact, the full one elsewhere, same ids."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from bigmodel_ops.config import TokenizerParams
from bigmodel_ops.tokenizer import (
    SAFE_CHARS,
    BatchEncoder,
    TextPool,
    build_tokenizer,
    light_twin,
    needs_full_normalizer,
    pack_shards,
    plan_split,
)
from bigmodel_ops.tokenizer.encode import PUNCT_CHARS, REMOVED_CHARS, SPACE_CHARS, pre_tokens
from tests.test_tokenize import make_docs

# Characters the BERT normalizer deletes (clean_text): C1 controls seen in real IMDb text (cp1252
# debris), format characters, U+FFFD, NUL, other C0 controls, DEL. The fast path deletes them first.
REMOVABLE = [
    "\x96",
    "\x85",
    "\x97",
    "\u00ad",
    "\u200b",
    "\u200e",
    "\ufeff",
    "\ufffd",
    "\x00",
    "\x01",
    "\x0b",
    "\x7f",
]
# Characters it rewrites or pads, and ones outside the safe set: line separator, CJK (padded with
# spaces), ideographic space, an emoji, combining accents, private use, an unassigned code point,
# Greek. These documents go through the tokenizer itself.
UNSAFE = [
    "\u2028",
    "中",
    "日本",
    "\u3000",
    "\U0001f642",
    "e\u0301",
    "\ue000",
    "\u0378",
    "\u0100\u0301",
    "Σ",
]


def trained(*, lowercase: bool = True, strip_accents: bool = False, kind: str = "wordpiece") -> Tokenizer:
    """A tiny tokenizer whose alphabet holds every safe and unsafe test character (so they get ids)."""
    params = TokenizerParams(
        kind=kind, vocab_size=600, lowercase=lowercase, strip_accents=strip_accents, limit_alphabet=1000
    )
    tokenizer, trainer = build_tokenizer(params)
    alphabet = "".join(sorted(SAFE_CHARS)) + "".join(UNSAFE) + "".join(REMOVABLE)
    corpus = make_docs(300) + [" ".join(alphabet[i : i + 5] for i in range(0, len(alphabet), 5))] * 3
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def ids(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def encoder(tokenizer: Tokenizer, **options) -> BatchEncoder:
    return BatchEncoder(tokenizer, sep=3, dtype=np.dtype(np.uint16), **options)


@pytest.mark.parametrize("lowercase", [True, False])
def test_every_safe_character_gives_identical_ids(lowercase: bool) -> None:
    tokenizer = trained(lowercase=lowercase)
    twin = light_twin(tokenizer)
    assert twin is not None
    texts = []
    for char in sorted(SAFE_CHARS):
        texts += [char, f"a{char}b", f"The{char}{char}Movie {char}x, {char}.", f"naïve{char}CAFÉ"]
    texts += ["x" * 150, "\xa0", "İstanbul ŁÓDŹ"]  # an over-long word ([UNK]); no word at all
    assert not needs_full_normalizer(pa.array(texts)).any()
    expected = ids(tokenizer, texts)
    assert ids(twin, texts) == expected
    # The word cache (our own pre-tokenizer regex) must agree too, cold and warm.
    fast = encoder(tokenizer)
    light, heavy, _ = fast.split(pa.array(texts))
    assert len(light) == len(texts) and not len(heavy)
    assert fast.encode_texts(texts) == expected
    assert fast.encode_texts(texts[::-1]) == expected[::-1]


def test_pre_tokens_cut_each_safe_character_as_the_bert_pre_tokenizer_does() -> None:
    from tokenizers.pre_tokenizers import BertPreTokenizer

    bert = BertPreTokenizer()
    texts = [f"ab{c}cd {c}{c}e{c}" for c in sorted(SAFE_CHARS)] + [" lead", "trail\t", "", "x"]
    ours = [[w for w in words if w] for words in pre_tokens(pa.array(texts)).to_pylist()]
    theirs = [[piece for piece, _ in bert.pre_tokenize_str(t)] for t in texts]
    assert ours == theirs
    # Within the safe set, Arrow's Unicode whitespace is exactly these five characters.
    assert {c for c in SAFE_CHARS if len(pre_tokens(pa.array([f"a{c}b"]))[0]) == 2} == SPACE_CHARS
    assert PUNCT_CHARS.isdisjoint(SPACE_CHARS) and "." in PUNCT_CHARS and "\u2019" in PUNCT_CHARS


def test_safe_set_and_regex_agree_on_all_of_unicode() -> None:
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    flagged = needs_full_normalizer(pa.array(chars))
    safe = np.array([c in SAFE_CHARS or c in REMOVED_CHARS for c in chars])
    assert np.array_equal(~flagged, safe)


def test_removed_characters_are_deleted_first_and_give_identical_ids() -> None:
    tokenizer = trained()
    twin = light_twin(tokenizer)
    assert twin is not None
    texts = []
    for char in sorted(REMOVED_CHARS):
        texts += [f"the{char}movie {char}", f"a{char}{char}b.{char}c", f"{char}Film\x85It{char}"]
    assert not needs_full_normalizer(pa.array(texts)).any()
    expected = ids(tokenizer, texts)
    fast = encoder(tokenizer)
    assert fast.encode_texts(texts) == expected
    assert fast.encode_texts(texts) == expected  # warm
    # Deleting them is what makes it exact: the twin alone keeps most of them (or makes them [UNK]).
    examples = [f"the{u}movie {u}" for u in REMOVABLE]
    wrong = sum(a != b for a, b in zip(ids(twin, examples), ids(tokenizer, examples), strict=True))
    assert wrong >= len(REMOVABLE) // 2


def test_unsafe_characters_take_the_full_path_and_would_differ_otherwise() -> None:
    tokenizer = trained()
    twin = light_twin(tokenizer)
    assert twin is not None
    texts = [f"the{u}movie {u}" for u in UNSAFE]
    assert needs_full_normalizer(pa.array(texts)).all()
    # The routing is what keeps the ids exact: the twin alone is wrong on several of these (the
    # others are outside the safe set only because it is kept small and Unicode-version proof).
    wrong = sum(a != b for a, b in zip(ids(twin, texts), ids(tokenizer, texts), strict=True))
    assert wrong >= 3
    assert needs_full_normalizer(pa.array(["fine", None])).tolist() == [False, True]


def test_mixed_batches_keep_order_and_ids() -> None:
    tokenizer = trained()
    rng = random.Random(7)
    pieces = sorted(SAFE_CHARS) + UNSAFE
    docs = make_docs(200, seed=3)
    texts = []
    for i, doc in enumerate(docs):
        if i % 3 == 0:  # a third of the documents get random characters, some of them unsafe
            doc = doc + " " + "".join(rng.choices(pieces, k=rng.randint(1, 40)))
        texts.append(doc)
    texts[5] = "a [CLS] b[SEP]c [MASK] d"  # added tokens: matched on raw text by the tokenizer
    texts[6] = "[UNK][PAD] plain"
    fast = encoder(tokenizer)
    light, heavy, full = fast.split(pa.array(texts))
    assert len(light) and len(heavy) and len(light) + len(heavy) == len(texts)
    assert full[5] and full[6]
    expected = ids(tokenizer, texts)
    assert fast.encode_texts(texts) == expected
    assert 2 in expected[5] and 4 in expected[5]
    # With a second thread: the Rust share (heavy documents and a prefix of the light ones) runs
    # there; the split moves batch by batch with the measured speeds, the ids never change.
    with ThreadPoolExecutor(max_workers=1) as executor:
        two = encoder(tokenizer)
        for _ in range(3):
            assert two.encode_texts(texts, executor=executor) == expected
        assert two._rates is not None
    # A cache far too small for the batch starts over again and again; the ids stay exact.
    tiny = encoder(tokenizer, cache_words=16)
    assert tiny.encode_texts(texts[:100]) == expected[:100]
    assert tiny.encode_texts(texts[100:]) == expected[100:]
    last_batch_words = set(pre_tokens(pa.array(texts[100:])).flatten().to_pylist())
    assert len(fast.cache) > 16 and len(tiny.cache) <= len(last_batch_words) + 1


@pytest.mark.parametrize(
    ("kind", "strip_accents", "lowercase"),
    [("bpe", False, True), ("wordpiece", True, True)],
)
def test_no_twin_where_no_cheaper_normalizer_is_exact(
    kind: str, strip_accents: bool, lowercase: bool
) -> None:
    tokenizer = trained(kind=kind, strip_accents=strip_accents, lowercase=lowercase)
    assert light_twin(tokenizer) is None
    plain = encoder(tokenizer)
    texts = ["Naïve CAFÉ", "plain text", "中文 \x96"]
    assert len(plain.split(pa.array(texts))[0]) == 0
    assert plain.encode_texts(texts) == ids(tokenizer, texts)


def test_no_twin_for_hand_made_tokenizers() -> None:
    from tokenizers import models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    assert light_twin(tokenizer) is None
    # BERT-like front end but a BPE model (may use dropout: not the same ids for a word each time).
    bpe = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[], dropout=0.5))
    bpe.normalizer = normalizers.BertNormalizer(strip_accents=False)
    bpe.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    assert light_twin(bpe) is None
    bpe.model = models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")
    assert light_twin(bpe) is not None  # the same front end with WordPiece qualifies


def test_pack_shards_fast_path_writes_the_same_bytes(tmp_path: Path) -> None:
    tokenizer = trained()
    rng = random.Random(11)
    texts: list[str | None] = []
    for i, doc in enumerate(make_docs(400, seed=5)):
        if i % 4 == 0:
            doc += " " + rng.choice(UNSAFE)
        texts.append(doc)
    texts[10] = None  # skipped rows stay skipped either way
    texts[20] = "   "
    path = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=64)
    pool = TextPool.open(path)
    plan = plan_split(pool, seed=1, val_fraction=0.2)
    outputs = {}
    for fast_path, pipelined in [(True, True), (False, True), (True, False)]:
        out = tmp_path / f"shards-{fast_path}-{pipelined}"
        _, stats = pack_shards(
            tokenizer,
            pool=pool,
            out_dir=out,
            plan=plan,
            batch_rows=50,
            shard_tokens=2048,
            fast_path=fast_path,
            pipelined=pipelined,
        )
        files = sorted(p.name for p in out.iterdir())
        outputs[(fast_path, pipelined)] = {name: (out / name).read_bytes() for name in files}
        if fast_path:
            assert stats.light_documents > 0 and stats.full_documents > 0
        else:
            assert stats.light_documents == 0 and stats.full_documents == 398
        assert stats.light_documents + stats.full_documents == 398
    exact = outputs[(False, True)]
    assert len([n for n in exact if n.endswith(".bin")]) > 2  # several shards, rollover included
    assert outputs[(True, True)] == exact
    assert outputs[(True, False)] == exact


def test_word_cache_encodes_new_words_in_chunks_and_falls_back_where_a_word_is_not_one_pre_token() -> None:
    from bigmodel_ops.tokenizer.encode import WORDS_PER_CALL, WordCache

    tokenizer = trained()
    twin = light_twin(tokenizer)
    assert twin is not None
    rng = random.Random(5)
    letters = "abcdefghijklmnopqrstuvwxyzéñ"
    words = sorted({"".join(rng.choices(letters, k=rng.randint(1, 12))) for _ in range(3 * WORDS_PER_CALL)})
    words += [".", "'", "\u2019"]
    assert len(words) > 2 * WORDS_PER_CALL  # several chunks
    cache = WordCache(twin, dtype=np.dtype(np.uint16), max_words=1 << 16)
    got, _ = cache.gather(cache.slots_of(words))
    assert got.tolist() == [i for w in ids(twin, words) for i in w]
    # "two words" is two pre-tokens: its chunk cannot be cut by word_ids, so it is encoded word by word.
    odd = ["two words", "plain", "x" * 150]
    got, ends = cache.gather(cache.slots_of(odd))
    expected = ids(twin, odd)
    assert got.tolist() == [i for w in expected for i in w]
    assert np.diff(ends, prepend=0).tolist() == [len(w) for w in expected]
