"""int8 and ONNX variants of a classifier against its fp32 self: accuracy, agreement, latency, size.

    python benchmarks/compression.py --model outputs/finetune/model --data outputs/prepared/test.parquet
    python benchmarks/compression.py --model outputs/finetune/model --data data/imdb/reviews.csv \\
        --text-column review --label-column sentiment --limit 500
    python benchmarks/compression.py --train mini --data data/imdb/reviews.csv \\
        --text-column review --label-column sentiment [--quick]

Runs the measurements of the ``compress`` stage (bigmodel_ops.compression.compress_classifier) on a
classifier folder (what the finetune stage exports: model.safetensors + config.json +
tokenizer.json) and labeled texts (Parquet or CSV with a text and a label column; labels are the
classifier's label names, or their indices). Without a trained classifier at hand, ``--train
PRESET`` builds one: a WordPiece tokenizer and a randomly initialised masked backbone of that model
preset (tiny, mini, small, ...), fine-tuned for ``--train-steps`` AdamW steps with plain torch on
the first 80% of the rows, and measured on the other 20% (its accuracy then says little; the speed
and size ratios depend on the architecture only).

The variants: torch int8 dynamic quantisation of the Linear layers, the ONNX export run with
onnxruntime (``--exporter dynamo`` or ``torchscript``) and its onnxruntime int8 quantisation.
Latency: median ms of the forward pass on pre-tokenised batches of 1 and 32 texts, all variants
interleaved round by round (the machine may be shared); speedup = fp32 / variant at batch 32.
Size: the weight file. --quick: at most 200 texts, 5 rounds. The files go to a temporary folder
(``--out DIR`` keeps them). The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigmodel_ops import compression, onnx_export  # noqa: E402
from bigmodel_ops.classification.export import load_classifier  # noqa: E402


def read_labeled(path: Path, text_column: str, label_column: str) -> tuple[list[str], list]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
    for column in (text_column, label_column):
        if column not in table.column_names:
            raise SystemExit(f"{path}: no column {column!r} (columns: {table.column_names})")
    return [str(t) for t in table[text_column].to_pylist()], table[label_column].to_pylist()


def label_ids(values: list, labels: list[str], source: Path) -> np.ndarray:
    ids = []
    for row, value in enumerate(values):
        if isinstance(value, int) and 0 <= value < len(labels):
            ids.append(value)
        elif str(value) in labels:
            ids.append(labels.index(str(value)))
        else:
            raise SystemExit(f"{source}: row {row}: label {value!r} is not one of {labels}")
    return np.asarray(ids, dtype=np.int64)


def train_classifier(
    directory: Path, texts: list[str], labels: list, *, preset: str, steps: int, seed: int
) -> None:
    """A WordPiece tokenizer and a fresh masked backbone of ``preset``, fine-tuned for ``steps``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from bigmodel_ops.classification.export import save_classifier
    from bigmodel_ops.classification.inputs import collate
    from bigmodel_ops.classification.model import SequenceClassifier
    from bigmodel_ops.model import TransformerLM, config_from_preset

    names = sorted({str(v) for v in labels})
    y = [names.index(str(v)) for v in labels]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=4000, special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    torch.manual_seed(seed)
    config = config_from_preset(preset, vocab_size=tokenizer.get_vocab_size(), objective="masked")
    max_length = min(128, config.block_size)
    tokenizer.enable_truncation(max_length)
    model = SequenceClassifier(TransformerLM(config), num_labels=len(names), dropout=0.1)
    ids = [e.ids for e in tokenizer.encode_batch(texts)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        rows = rng.choice(len(ids), size=min(16, len(ids)), replace=False)
        batch = collate([(ids[i], y[i]) for i in rows])
        loss = torch.nn.functional.cross_entropy(model(batch["idx"], batch["lengths"]), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.no_truncation()
    tokenizer.save(str(directory.parent / "tokenizer.json"))
    save_classifier(
        model,
        directory,
        labels=names,
        max_length=max_length,
        tokenizer_file=directory.parent / "tokenizer.json",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="an exported classifier folder (outputs/finetune/model)")
    source.add_argument(
        "--train", metavar="PRESET", help="build and briefly train a classifier of this preset"
    )
    parser.add_argument("--data", type=Path, required=True, help="labeled Parquet or CSV")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--limit", type=int, default=None, help="measure on at most this many texts")
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--exporter", choices=onnx_export.EXPORTERS, default="dynamo")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved latency rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads; 0: all cores")
    parser.add_argument("--out", type=Path, default=None, help="keep the variants here")
    parser.add_argument("--quick", action="store_true", help="<= 200 texts, 5 rounds, 30 training steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    texts, raw_labels = read_labeled(args.data, args.text_column, args.label_column)
    limit = 200 if args.quick and args.limit is None else args.limit
    repeats = 5 if args.quick else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        model_dir = args.model
        if args.train:
            cut = int(0.8 * len(texts))
            model_dir = Path(tmp) / "classifier"
            steps = 30 if args.quick else args.train_steps
            train_classifier(
                model_dir, texts[:cut], raw_labels[:cut], preset=args.train, steps=steps, seed=args.seed
            )
            texts, raw_labels = texts[cut:], raw_labels[cut:]
        train_s = time.perf_counter() - started
        classifier = load_classifier(model_dir)
        texts, raw_labels = texts[:limit], raw_labels[:limit]
        y = label_ids(raw_labels, classifier.labels, args.data)
        out = args.out or Path(tmp) / "compress"
        out.mkdir(parents=True, exist_ok=True)
        settings = compression.Settings(exporter=args.exporter, latency_repeats=repeats, threads=args.threads)
        result = compression.compress_classifier(classifier, model_dir, texts, y, out, settings=settings)
    m = result.metrics
    config = classifier.config["config"]
    summary = {
        "model": str(args.model) if args.model else f"{args.train} (trained {train_s:.0f} s here)",
        "model_config": {k: config[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")},
        "examples": len(y),
        "threads": result.report["threads"],
        "exporter": args.exporter,
        **{k: round(v, 4) for k, v in m.items()},
    }
    for name in compression.VARIANTS:
        if f"{name}_speedup" in m:
            print(
                f"{name:>9}: x{m[f'{name}_speedup_b1']:.2f} (b1) x{m[f'{name}_speedup_b32']:.2f} (b32) faster, "
                f"size x{m[f'{name}_size_ratio']:.2f}, acc {-m[f'{name}_acc_drop_points']:+.2f} points, "
                f"agreement {m[f'{name}_agreement']:.1f}%",
                file=sys.stderr,
            )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
