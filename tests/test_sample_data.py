"""The committed DEMO sample is exactly what the seeded generator produces, and it is usable."""

from __future__ import annotations

import copy
import csv
import hashlib
from collections import Counter
from pathlib import Path

import yaml

from bigmodel_ops.config import parse_params
from bigmodel_ops.data.prepare import build_prepared
from bigmodel_ops.data.sample import main as sample_main
from bigmodel_ops.data.sources import plan_sources

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
FILES = ("reviews.csv", "unlabeled.txt")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_committed_sample_matches_the_generator(tmp_path: Path) -> None:
    assert sample_main(["--out", str(tmp_path)]) == 0
    for name in FILES:
        assert _sha256(tmp_path / name) == _sha256(SAMPLE / name), (
            f"data/sample/{name} differs from the generator's output: "
            "regenerate with `python -m bigmodel_ops.data.sample --out data/sample`"
        )


def test_another_seed_gives_another_sample(tmp_path: Path) -> None:
    assert sample_main(["--out", str(tmp_path), "--seed", "1"]) == 0
    assert _sha256(tmp_path / "reviews.csv") != _sha256(SAMPLE / "reviews.csv")


def test_sample_shape() -> None:
    assert sum((SAMPLE / name).stat().st_size for name in FILES) < 3 * 1024 * 1024
    with open(SAMPLE / "reviews.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    labels = Counter(row["label"] for row in rows)
    assert set(labels) == {"negative", "positive"} and len(rows) >= 2000
    assert abs(labels["positive"] / len(rows) - 0.5) < 0.05
    texts = [row["text"] for row in rows]
    assert sum("<br /><br />" in t for t in texts) > len(texts) / 2
    assert any("&quot;" in t for t in texts) and any("&amp;" in t for t in texts)
    assert any("Not bad at all" in t for t in texts) and any("did not enjoy" in t for t in texts)
    lengths = sorted(len(t) for t in texts)
    assert lengths[len(lengths) // 20] < 150 and lengths[-1] > 1000  # one-liners to several paragraphs
    lines = (SAMPLE / "unlabeled.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 2000 and all(line.strip() for line in lines)


def test_the_sample_prepares_with_work_for_every_filter(tmp_path: Path) -> None:
    """The generated sample (not the default data: that is data/imdb) exercises dedup and filters."""
    raw = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    raw["prepare"]["source"] = {
        "kind": "csv",
        "path": str(REPO / "data/sample/reviews.csv"),
        "text_column": "text",
        "label_column": "label",
        "unlabeled_path": str(REPO / "data/sample/unlabeled.txt"),
    }
    params = parse_params(raw)
    report = build_prepared(
        plan_sources(params.prepare), params.prepare, seed=params.project.seed, out_dir=tmp_path
    )
    # Dedup and the min_chars filter have work to do, and every split has both labels.
    assert report["dropped"]["duplicates"] > 20 and report["dropped"]["short"] == 5
    for split in ("train", "val", "test"):
        assert min(report["labels"][split].values()) > 50
    assert report["rows"]["pretrain"] > 3000
