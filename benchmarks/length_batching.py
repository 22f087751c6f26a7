"""Inference and training on batches of similar length against batches in input or shuffled order.

    python benchmarks/length_batching.py [--data CSV] [--rows N] [--max-length 256] [--quick]

``TextClassifier.logits`` (the evaluate stage, ``bigmodel-ops predict``, the served pyfunc model) and
the fine-tuning val loader batch texts longest first, so a batch is padded to a length close to its
texts' own. The baseline is the same model, tokens and batch size in input order, where nearly
every batch of 64 reviews holds one that reaches ``max_length``. Both run interleaved in this
process (``--repeats`` rounds, the median of each); the logits must agree. The model is the `cpu`
profile's `mini` classifier at random init (speed does not depend on the weights); the tokenizer
is a WordPiece trained on the texts, as the tokenize stage trains one. The last line printed is
one JSON object: ``speedup`` (input order / by length), both median seconds, the share of padding
in each, and the largest logit difference.

Training (``finetune.group_by_length``): one epoch of fine-tuning steps (forward, backward, AdamW)
over the same texts, batched by the fine-tuning data module with plain shuffling and with length
grouping (:class:`~bigmodel_ops.classification.datamodule.LengthGroupedSampler`), each round a new
epoch's order, interleaved the same way. Keys: ``train_speedup`` (shuffled / grouped),
``train_shuffled_s``, ``train_grouped_s`` (median seconds an epoch) and the padding share of each.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=4000, special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "imdb" / "reviews.csv")
    parser.add_argument("--text-column", default="review")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-batch-size", type=int, default=32, help="fine-tuning's batch size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="200 rows, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.repeats = 200, 2

    import numpy as np

    from bigmodel_ops.classification.datamodule import ClassificationDataModule
    from bigmodel_ops.classification.export import TextClassifier
    from bigmodel_ops.classification.inputs import TokenizedSplit, collate, tokenize_texts
    from bigmodel_ops.classification.model import SequenceClassifier
    from bigmodel_ops.contract import Truncation
    from bigmodel_ops.model import PRESETS, ModelConfig, TransformerLM

    with args.data.open(newline="", encoding="utf-8") as handle:
        texts = [row[args.text_column] for row in csv.DictReader(handle)][: args.rows]
    tokenizer = _tokenizer(texts)
    config = ModelConfig(
        **{**PRESETS["mini"], "block_size": args.max_length},
        vocab_size=tokenizer.get_vocab_size(),
        objective="masked",
        alibi=True,
    )
    torch.manual_seed(0)
    model = SequenceClassifier(TransformerLM(config), num_labels=2, dropout=0.0, pooling="mean").eval()
    truncation = Truncation(args.max_length, "tail")
    classifier = TextClassifier(
        model=model,
        tokenizer=tokenizer,
        labels=["negative", "positive"],
        config={},
        truncation=truncation,
    )

    def by_length() -> torch.Tensor:
        return classifier.logits(texts, batch_size=args.batch_size)

    def input_order() -> torch.Tensor:
        ids = tokenize_texts(tokenizer, texts, objective="masked", truncation=truncation)
        out = []
        with torch.inference_mode():
            for start in range(0, len(ids), args.batch_size):
                batch = collate([(row, 0) for row in ids[start : start + args.batch_size]])
                out.append(model(batch["idx"], batch["lengths"]).float())
        return torch.cat(out)

    times: dict[str, list[float]] = {"by_length": [], "input_order": []}
    results: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, run in (("input_order", input_order), ("by_length", by_length)):
            started = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - started)

    ids = tokenize_texts(tokenizer, texts, objective="masked", truncation=truncation)
    real = sum(map(len, ids))

    # Training: the same steps over one epoch, shuffled against grouped by length.
    split = TokenizedSplit(ids=ids, labels=np.arange(len(ids)) % 2)
    trainee = SequenceClassifier(TransformerLM(config), num_labels=2, dropout=0.1, pooling="mean").train()
    optimizer = torch.optim.AdamW(trainee.parameters(), lr=1e-4)
    loaders = {
        grouped: ClassificationDataModule(
            {"train": split}, batch_size=args.train_batch_size, seed=0, group_by_length=grouped
        ).train_dataloader()
        for grouped in (False, True)
    }
    train_times: dict[bool, list[float]] = {False: [], True: []}
    train_tokens: dict[bool, int] = {False: 0, True: 0}
    for epoch in range(args.repeats):
        for grouped, loader in loaders.items():
            loader.sampler.set_epoch(epoch)
            started = time.perf_counter()
            for batch in loader:
                loss = torch.nn.functional.cross_entropy(
                    trainee(batch["idx"], batch["lengths"]), batch["labels"]
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                train_tokens[grouped] += batch["idx"].numel()
            train_times[grouped].append(time.perf_counter() - started)

    def padded(order: list[int]) -> int:
        chunks = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        return sum(len(chunk) * max(len(ids[row]) for row in chunk) for chunk in chunks)

    longest_first = sorted(range(len(ids)), key=lambda row: -len(ids[row]))
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "benchmark": "length_batching",
        "rows": len(texts),
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "by_length_s": round(medians["by_length"], 4),
        "input_order_s": round(medians["input_order"], 4),
        "speedup": round(medians["input_order"] / medians["by_length"], 3),
        "pad_share_input_order": round(1 - real / padded(list(range(len(ids)))), 4),
        "pad_share_by_length": round(1 - real / padded(longest_first), 4),
        "max_abs_logit_diff": float((results["by_length"] - results["input_order"]).abs().max()),
        "train_batch_size": args.train_batch_size,
        "train_shuffled_s": round(statistics.median(train_times[False]), 4),
        "train_grouped_s": round(statistics.median(train_times[True]), 4),
        "train_speedup": round(
            statistics.median(train_times[False]) / statistics.median(train_times[True]), 3
        ),
        "pad_share_train_shuffled": round(1 - real * args.repeats / train_tokens[False], 4),
        "pad_share_train_grouped": round(1 - real * args.repeats / train_tokens[True], 4),
    }
    print(
        f"{len(texts)} texts, max_length {args.max_length}, batch {args.batch_size}: input order "
        f"{medians['input_order']:.3f}s ({result['pad_share_input_order']:.0%} padding), by length "
        f"{medians['by_length']:.3f}s ({result['pad_share_by_length']:.0%} padding); a training epoch of "
        f"batch {args.train_batch_size}: shuffled {result['train_shuffled_s']:.2f}s "
        f"({result['pad_share_train_shuffled']:.0%} padding), grouped by length {result['train_grouped_s']:.2f}s "
        f"({result['pad_share_train_grouped']:.0%} padding)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
