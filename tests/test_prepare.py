"""The prepare stage: sources, normalisation, dedup, splitting, outputs, MLflow, bad input.

Real files in tmp_path, a real sqlite MLflow store per test (conftest.py), the real CLI.
"""

from __future__ import annotations

import copy
import json
import unicodedata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from bigmodel_ops.cli import main
from bigmodel_ops.config import parse_params
from bigmodel_ops.data.labels import UNLABELED, LabelError, LabelMapper, label_for_folder
from bigmodel_ops.data.normalize import normalize_text
from bigmodel_ops.data.prepare import build_prepared
from bigmodel_ops.data.sources import plan_sources
from bigmodel_ops.data.stats import LengthStats

REPO = Path(__file__).resolve().parents[1]
OUTPUT_FILES = ("train", "val", "test", "pretrain")

POSITIVE = ["a wonderful film", "great acting", "I loved every minute", "not bad at all", "a small gem"]
NEGATIVE = ["a dull mess", "awful script", "I did not enjoy it", "a waste of time", "painfully slow"]


# --- helpers ----------------------------------------------------------------------------------


def _merge(base: dict[str, Any], override: dict[str, Any]) -> None:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def params_dict(**prepare: Any) -> dict[str, Any]:
    """The repo's params.yaml with `prepare` fields overridden (source replaced when given)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    if "source" in prepare:
        raw["prepare"]["source"] = prepare.pop("source")
    _merge(raw["prepare"], prepare)
    return raw


def write_params(directory: Path, raw: dict[str, Any]) -> Path:
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def review(i: int, positive: bool) -> str:
    phrase = (POSITIVE if positive else NEGATIVE)[i % 5]
    return f"Review number {i}: {phrase}, said viewer {i * 7919 % 1000}."


def labeled_rows(n: int, *, positive_share: float = 0.5) -> list[tuple[str, str]]:
    cut = round(n * positive_share)
    return [(review(i, i < cut), "positive" if i < cut else "negative") for i in range(n)]


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        out.writerow(header)
        out.writerows(rows)
    return path


def run_direct(tmp_path: Path, raw: dict[str, Any], name: str = "out") -> tuple[dict[str, Any], Path]:
    """build_prepared without MLflow or the CLI: for tests of the data logic."""
    params = parse_params(copy.deepcopy(raw))
    out = tmp_path / name
    out.mkdir()
    report = build_prepared(
        plan_sources(params.prepare), params.prepare, seed=params.project.seed, out_dir=out
    )
    return report, out


def read(out: Path, name: str) -> list[dict[str, Any]]:
    return pq.read_table(out / f"{name}.parquet").to_pylist()


def texts(out: Path, name: str) -> list[str]:
    return [row["text"] for row in read(out, name)]


def assert_no_outputs(root: Path) -> None:
    assert not (root / "outputs" / "prepared").exists()
    assert not (root / "outputs" / "metrics" / "prepare.json").exists()
    leftovers = list((root / "outputs").rglob("*")) if (root / "outputs").exists() else []
    assert leftovers == [], leftovers


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str) -> Path:
    """cwd = tmp_path; MLFLOW_TRACKING_URI points at this test's own store (conftest.py)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(raw: dict[str, Any], root: Path) -> int:
    return main(["prepare", "--params", str(write_params(root, raw)), "--quiet"])


# --- normalisation and labels -----------------------------------------------------------------


def test_normalize_strips_markup_unescapes_and_collapses_whitespace() -> None:
    raw = "  Great <i>film</i>!<br /><br />Tom &amp; Jerry said &quot;wow&quot;\n\t<!-- c -->ok  "
    assert normalize_text(raw) == 'Great film ! Tom & Jerry said "wow" ok'
    # Escaped markup is text, not a tag; comparisons and hearts survive.
    assert normalize_text("show &lt;b&gt; then a < b > c <3") == "show <b> then a < b > c <3"
    assert normalize_text("<br/>", strip_markup=True) == ""
    assert normalize_text("Keep <br /> tags", strip_markup=False) == "Keep <br /> tags"
    assert normalize_text("MiXeD Case", lowercase=True) == "mixed case"


def test_normalize_applies_nfc() -> None:
    decomposed = "Cafe\u0301 sce\u0300ne"
    result = normalize_text(decomposed)
    assert result == "Café scène"
    assert unicodedata.is_normalized("NFC", result)
    # Entities that unescape to combining sequences are composed too.
    assert normalize_text("e&#769;") == "é"


def test_label_mapper_rules() -> None:
    mapper = LabelMapper(["negative", "positive"])
    assert mapper.resolve("positive") == 1
    assert mapper.resolve(0) == 0 and mapper.resolve("1") == 1 and mapper.resolve(1.0) == 1
    assert mapper.resolve(-1) == UNLABELED and mapper.resolve("-1") == UNLABELED
    with pytest.raises(LabelError, match=r"integer label 2 is out of range"):
        mapper.resolve(2)
    with pytest.raises(LabelError, match=r"'neutral' is not one of the declared labels"):
        mapper.resolve("neutral")
    with pytest.raises(LabelError, match="the label is empty"):
        mapper.resolve("")
    # Declared labels that look like integers match as strings first (star ratings).
    stars = LabelMapper(["1", "2", "3", "4", "5"])
    assert stars.resolve(1) == 0 and stars.resolve("5") == 4
    assert label_for_folder("neg", ["negative", "positive"], where="x") == 0
    assert label_for_folder("POS", ["negative", "positive"], where="x") == 1


def test_length_stats_percentiles_match_exact_values() -> None:
    import random

    rng = random.Random(0)
    values = [rng.randint(1, 5000) for _ in range(9999)]
    stats = LengthStats()
    for value in values:
        stats.add(value)
    ordered = sorted(values)
    summary = stats.as_dict()
    assert summary["min"] == ordered[0] and summary["max"] == ordered[-1]
    assert summary["p50"] == ordered[4999]  # nearest rank: ceil(0.5 * 9999) = 5000th value
    assert summary["p95"] == ordered[9499]
    assert summary["mean"] == pytest.approx(sum(values) / len(values), abs=0.01)
    # Long texts are binned to 3 significant digits.
    long = LengthStats()
    long.add(123_456)
    assert long.as_dict()["p50"] == 123_000 and long.as_dict()["max"] == 123_456


# --- sources ----------------------------------------------------------------------------------


def test_csv_source_with_unlabeled_text(tmp_path: Path) -> None:
    rows = labeled_rows(200)
    write_csv(tmp_path / "reviews.csv", rows)
    (tmp_path / "more.txt").write_text(
        "\n".join(f"Unlabeled line {i} about a movie." for i in range(50)) + "\n\n"
    )
    raw = params_dict(
        source={
            "kind": "csv",
            "path": str(tmp_path / "reviews.csv"),
            "unlabeled_path": str(tmp_path / "*.txt"),
        },
        min_chars=5,
    )
    report, out = run_direct(tmp_path, raw)
    labeled = read(out, "train") + read(out, "val") + read(out, "test")
    assert sorted((r["text"], r["label"]) for r in labeled) == sorted(rows)
    assert all(r["label_id"] == ["negative", "positive"].index(r["label"]) for r in labeled)
    assert report["input"] == {"rows": 250, "labeled_rows": 200, "unlabeled_rows": 50}
    # pretrain_pool: all = train + val + unlabeled, never test.
    expected_pool = (
        set(texts(out, "train"))
        | set(texts(out, "val"))
        | {f"Unlabeled line {i} about a movie." for i in range(50)}
    )
    assert set(texts(out, "pretrain")) == expected_pool
    assert report["rows"]["pretrain"] == len(expected_pool)
    schema = pq.read_schema(out / "train.parquet")
    assert schema.field("text").type == pa.string() and schema.field("label_id").type == pa.int32()
    assert pq.read_schema(out / "pretrain.parquet").names == ["text"]


def test_csv_with_bom_crlf_multiline_fields_and_other_encodings(tmp_path: Path) -> None:
    body = "".join(f'"{text}\r\nsecond line, with a comma",{label}\r\n' for text, label in labeled_rows(60))
    (tmp_path / "crlf.csv").write_bytes(("\ufefftext,label\r\n" + body).encode("utf-8"))
    raw = params_dict(source={"kind": "csv", "path": str(tmp_path / "crlf.csv")})
    report, out = run_direct(tmp_path, raw)
    assert report["input"]["labeled_rows"] == 60
    assert all(t.endswith(" second line, with a comma") for t in texts(out, "train"))
    # A declared encoding is honoured.
    rows = [(text + " Café crème.", label) for text, label in labeled_rows(60)]
    write_csv(tmp_path / "utf8.csv", rows)
    (tmp_path / "latin.csv").write_bytes((tmp_path / "utf8.csv").read_text("utf-8").encode("latin-1"))
    raw = params_dict(source={"kind": "csv", "path": str(tmp_path / "latin.csv"), "encoding": "latin-1"})
    report, out = run_direct(tmp_path, raw, name="latin")
    assert all(t.endswith("Café crème.") for t in texts(out, "train"))


def test_jsonl_source_with_custom_columns(tmp_path: Path) -> None:
    lines = [
        json.dumps({"review": text, "sentiment": label, "id": i})
        for i, (text, label) in enumerate(labeled_rows(120))
    ]
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(lines[:60]) + "\n\n" + "\n".join(lines[60:]) + "\n")
    raw = params_dict(
        source={"kind": "jsonl", "path": str(path), "text_column": "review", "label_column": "sentiment"},
        pretrain_pool="all",
    )
    report, out = run_direct(tmp_path, raw)
    assert sum(report["rows"][s] for s in ("train", "val", "test")) == 120
    assert report["labels"]["train"]["positive"] > 0 and report["labels"]["test"]["negative"] > 0


def test_parquet_glob_source_with_integer_labels(tmp_path: Path) -> None:
    rows = labeled_rows(150)
    for part in range(3):
        chunk = rows[part::3]
        table = pa.table(
            {"body": [t for t, _ in chunk], "y": [1 if label == "positive" else 0 for _, label in chunk]}
        )
        (tmp_path / "parts").mkdir(exist_ok=True)
        pq.write_table(table, tmp_path / "parts" / f"part-{part}.parquet")
    raw = params_dict(
        source={
            "kind": "parquet",
            "path": str(tmp_path / "parts" / "*.parquet"),
            "text_column": "body",
            "label_column": "y",
        },
        chunk_rows=16,
    )
    report, out = run_direct(tmp_path, raw)
    assert report["source"]["files"] == 3
    labeled = read(out, "train") + read(out, "val") + read(out, "test")
    # Integer labels index the declared labels: 0 -> negative, 1 -> positive.
    assert sorted((r["text"], r["label"]) for r in labeled) == sorted(rows)


def test_text_source_feeds_only_the_pretraining_pool(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"Plain text document number {i}.\n" for i in range(40)))
    raw = params_dict(source={"kind": "text", "path": str(path), "label_column": None})
    report, out = run_direct(tmp_path, raw)
    assert report["rows"] == {"train": 0, "val": 0, "test": 0, "pretrain": 40}
    assert read(out, "train") == []  # an empty file with the labeled schema
    assert pq.read_schema(out / "train.parquet").names == ["text", "label", "label_id"]


def test_aclimdb_folder_layout(tmp_path: Path) -> None:
    root = tmp_path / "aclImdb"
    expected = {}
    for split in ("train", "test"):
        for folder, positive in (("pos", True), ("neg", False)):
            (root / split / folder).mkdir(parents=True)
            for i in range(40):
                text = review(i + (0 if split == "train" else 1000), positive) + f" ({split})"
                (root / split / folder / f"{i}_{7 if positive else 2}.txt").write_text(
                    text + "<br /><br />The end."
                )
                expected[text + " The end."] = "positive" if positive else "negative"
    (root / "train" / "unsup").mkdir()
    for i in range(30):
        (root / "train" / "unsup" / f"{i}_0.txt").write_text(f"Unlabeled review {i} with no verdict.")
    (root / "train" / "labeledBow.feat").write_text("ignored")
    raw = params_dict(source={"kind": "aclimdb", "path": str(root), "label_column": None})
    report, out = run_direct(tmp_path, raw)
    labeled = read(out, "train") + read(out, "val") + read(out, "test")
    assert {r["text"]: r["label"] for r in labeled} == expected
    assert report["input"]["unlabeled_rows"] == 30
    assert {f"Unlabeled review {i} with no verdict." for i in range(30)} <= set(texts(out, "pretrain"))


def test_hf_disk_source_with_unsup_split_and_minus_one(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    train = labeled_rows(80)
    test = [(review(i + 500, i % 2 == 0), "positive" if i % 2 == 0 else "negative") for i in range(40)]

    def as_dataset(rows: list[tuple[str, str]], extra_unlabeled: list[str] = ()) -> Any:
        return datasets.Dataset.from_dict(
            {
                "text": [t for t, _ in rows] + list(extra_unlabeled),
                "label": [1 if label == "positive" else 0 for _, label in rows] + [-1] * len(extra_unlabeled),
            }
        )

    dd = datasets.DatasetDict(
        {
            "train": as_dataset(train, ["A train row with label minus one."]),
            "test": as_dataset(test),
            "unsup": datasets.Dataset.from_dict(
                {"text": [f"Unsup review {i}." for i in range(25)], "label": [-1] * 25}
            ),
        }
    )
    dd.save_to_disk(str(tmp_path / "hf"))
    raw = params_dict(source={"kind": "hf_disk", "path": str(tmp_path / "hf")}, chunk_rows=32)
    report, out = run_direct(tmp_path, raw)
    labeled = read(out, "train") + read(out, "val") + read(out, "test")
    assert sorted((r["text"], r["label"]) for r in labeled) == sorted(train + test)
    pool = set(texts(out, "pretrain"))
    assert "A train row with label minus one." in pool
    assert {f"Unsup review {i}." for i in range(25)} <= pool
    assert report["input"] == {"rows": 146, "labeled_rows": 120, "unlabeled_rows": 26}

    # hf_splits picks splits; a missing one is named with the splits found.
    raw["prepare"]["source"]["hf_splits"] = ["train", "validation"]
    with pytest.raises(
        Exception, match=r"no split\(s\) \['validation'\]; splits found: \['train', 'test', 'unsup'\]"
    ):
        run_direct(tmp_path, raw, name="out2")


# --- dedup, splitting, determinism ------------------------------------------------------------


def test_duplicates_are_removed_across_splits_and_the_pool(tmp_path: Path) -> None:
    base = labeled_rows(300)
    rows = list(base)
    rows += base[::3]  # exact duplicates
    rows += [
        ("  " + t.replace(", ", ",<br />  ") + " ", label) for t, label in base[1::5]
    ]  # same after normalising
    rows += [
        (t, "negative" if label == "positive" else "positive") for t, label in base[2::25]
    ]  # conflicting
    write_csv(tmp_path / "reviews.csv", rows)
    # Every labeled text again as unlabeled: none of the test texts may reach pretraining.
    (tmp_path / "unlabeled.txt").write_text("".join(t + "\n" for t, _ in base))
    raw = params_dict(
        source={
            "kind": "csv",
            "path": str(tmp_path / "reviews.csv"),
            "unlabeled_path": str(tmp_path / "unlabeled.txt"),
        }
    )
    report, out = run_direct(tmp_path, raw)
    train, val, test, pool = (texts(out, name) for name in OUTPUT_FILES)
    everything = train + val + test
    assert len(everything) == len(set(everything)) == 300
    assert not set(test) & (set(train) | set(val) | set(pool))
    assert len(pool) == len(set(pool)) == len(train) + len(val)
    extra = len(rows) - 300 + 300  # the labeled extras plus every unlabeled line
    assert report["dropped"]["duplicates"] == extra
    assert report["dropped"]["conflicting_label_duplicates"] == len(base[2::25])
    # The first occurrence wins: labels are the original ones.
    assert {(r["text"], r["label"]) for name in ("train", "val", "test") for r in read(out, name)} == set(
        base
    )


def test_split_is_stratified_and_close_to_the_fractions(tmp_path: Path) -> None:
    write_csv(tmp_path / "reviews.csv", labeled_rows(3000, positive_share=0.3))
    raw = params_dict(
        source={"kind": "csv", "path": str(tmp_path / "reviews.csv")},
        split={"train": 0.7, "val": 0.15, "test": 0.15},
    )
    report, _ = run_direct(tmp_path, raw)
    for name, fraction in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        counts = report["labels"][name]
        total = counts["positive"] + counts["negative"]
        assert total == pytest.approx(3000 * fraction, rel=0.12)
        assert counts["positive"] / total == pytest.approx(0.3, abs=0.05)


def test_same_input_gives_identical_files_and_seed_changes_the_split(tmp_path: Path) -> None:
    write_csv(tmp_path / "reviews.csv", labeled_rows(400))
    (tmp_path / "u.txt").write_text("".join(f"Extra text {i}.\n" for i in range(100)))
    raw = params_dict(
        source={
            "kind": "csv",
            "path": str(tmp_path / "reviews.csv"),
            "unlabeled_path": str(tmp_path / "u.txt"),
        }
    )
    report_a, out_a = run_direct(tmp_path, raw, name="a")
    report_b, out_b = run_direct(tmp_path, raw, name="b")
    for name in OUTPUT_FILES:
        assert (out_a / f"{name}.parquet").read_bytes() == (out_b / f"{name}.parquet").read_bytes()
    assert report_a == report_b
    # Chunking changes row groups, not content.
    small_chunks = copy.deepcopy(raw)
    small_chunks["prepare"]["chunk_rows"] = 7
    report_c, out_c = run_direct(tmp_path, small_chunks, name="c")
    assert pq.ParquetFile(out_c / "train.parquet").num_row_groups > 1
    assert report_c["digests"] == report_a["digests"]
    reseeded = copy.deepcopy(raw)
    reseeded["project"]["seed"] = 7
    report_d, out_d = run_direct(tmp_path, reseeded, name="d")
    assert set(texts(out_d, "test")) != set(texts(out_a, "test"))
    assert report_d["dropped"] == report_a["dropped"]


def test_pretrain_pool_unlabeled_only(tmp_path: Path) -> None:
    write_csv(tmp_path / "reviews.csv", labeled_rows(100))
    (tmp_path / "u.txt").write_text("".join(f"Extra text {i}.\n" for i in range(30)))
    raw = params_dict(
        source={
            "kind": "csv",
            "path": str(tmp_path / "reviews.csv"),
            "unlabeled_path": str(tmp_path / "u.txt"),
        },
        pretrain_pool="unlabeled",
    )
    _, out = run_direct(tmp_path, raw)
    assert sorted(texts(out, "pretrain")) == sorted(f"Extra text {i}." for i in range(30))


def test_lowercase_and_min_chars_filtering(tmp_path: Path) -> None:
    rows = labeled_rows(100) + [("Short", "positive"), ("<br /><br />", "negative"), ("   ", "positive")]
    write_csv(tmp_path / "reviews.csv", rows)
    raw = params_dict(
        source={"kind": "csv", "path": str(tmp_path / "reviews.csv")}, lowercase=True, min_chars=10
    )
    report, out = run_direct(tmp_path, raw)
    assert report["dropped"]["short"] == 1 and report["dropped"]["empty"] == 2
    all_texts = texts(out, "train") + texts(out, "test") + texts(out, "val")
    assert all(t == t.lower() for t in all_texts) and len(all_texts) == 100


# --- the CLI, outputs and MLflow ---------------------------------------------------------------


def test_cli_writes_outputs_report_and_mlflow_run(project: Path) -> None:
    write_csv(project / "data" / "reviews.csv", labeled_rows(300))
    (project / "data" / "u.txt").write_text("".join(f"Extra text {i}.\n" for i in range(40)))
    raw = params_dict(source={"kind": "csv", "path": "data/reviews.csv", "unlabeled_path": "data/u.txt"})
    assert run_cli(raw, project) == 0

    report = json.loads((project / "outputs" / "metrics" / "prepare.json").read_text())
    assert sorted(p.name for p in (project / "outputs" / "prepared").iterdir()) == sorted(
        f"{name}.parquet" for name in OUTPUT_FILES
    )
    for name in OUTPUT_FILES:
        assert (
            pq.read_metadata(project / "outputs" / "prepared" / f"{name}.parquet").num_rows
            == report["rows"][name]
        )
    assert sum(report["rows"][s] for s in ("train", "val", "test")) == 300
    assert set(report["length_chars"]["train"]) == {"min", "mean", "max", "p50", "p95"}

    client = MlflowClient()
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`bigmodel_ops.stage` = 'prepare'",
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["prepare.source.path"] == "data/reviews.csv"
    assert run.data.params["prepare.split.train"] == "0.8"
    assert run.data.metrics["data.rows.train"] == report["rows"]["train"]
    assert run.data.metrics["data.labels.test.positive"] == report["labels"]["test"]["positive"]
    assert run.data.metrics["data.length_chars.pretrain.p95"] == report["length_chars"]["pretrain"]["p95"]
    local = client.download_artifacts(run.info.run_id, "data/prepare.json", str(project / "dl"))
    assert json.loads(Path(local).read_text()) == report
    inputs = {d.dataset.name: d for d in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert set(inputs) == {f"bigmodel-ops-demo-{name}" for name in OUTPUT_FILES}
    train = inputs["bigmodel-ops-demo-train"]
    assert json.loads(train.dataset.profile)["num_rows"] == report["rows"]["train"]
    assert train.dataset.digest == report["digests"]["train"][:36]
    assert json.loads(train.dataset.source)["uri"].endswith("outputs/prepared/train.parquet")
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "training"


def test_failed_rerun_keeps_the_previous_output(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_csv(project / "reviews.csv", labeled_rows(100))
    raw = params_dict(source={"kind": "csv", "path": "reviews.csv"}, pretrain_pool="all")
    assert run_cli(raw, project) == 0
    before = {p.name: p.read_bytes() for p in (project / "outputs" / "prepared").iterdir()}
    report_before = (project / "outputs" / "metrics" / "prepare.json").read_bytes()

    write_csv(project / "reviews.csv", labeled_rows(100) + [("A row with an odd label.", "meh")])
    assert run_cli(raw, project) == 2
    assert "label value 'meh' is not one of the declared labels" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (project / "outputs" / "prepared").iterdir()} == before
    assert (project / "outputs" / "metrics" / "prepare.json").read_bytes() == report_before
    assert sorted(p.name for p in (project / "outputs").iterdir()) == ["metrics", "prepared"]

    # A successful rerun replaces the output and leaves no temp folders.
    write_csv(project / "reviews.csv", labeled_rows(120))
    assert run_cli(raw, project) == 0
    assert sorted(p.name for p in (project / "outputs").iterdir()) == ["metrics", "prepared"]
    report = json.loads((project / "outputs" / "metrics" / "prepare.json").read_text())
    assert sum(report["rows"][s] for s in ("train", "val", "test")) == 120


# --- bad input: a clear message, exit 2, nothing written ---------------------------------------


def _csv_source(path: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "csv", "path": path, **extra}


def _bad_encoding(root: Path) -> dict[str, Any]:
    data = b"text,label\nA fine film indeed.,positive\n" + b"Caf\xe9 scenes were dull.,negative\n"
    (root / "latin.csv").write_bytes(data)
    return params_dict(source=_csv_source("latin.csv"))


def _bad_encoding_text(root: Path) -> dict[str, Any]:
    write_csv(root / "reviews.csv", labeled_rows(50))
    (root / "u.txt").write_bytes(b"fine line\nanother fine line\nbad \xff byte\n")
    return params_dict(source=_csv_source("reviews.csv", unlabeled_path="u.txt"))


def _missing_text_column(root: Path) -> dict[str, Any]:
    write_csv(root / "reviews.csv", labeled_rows(20), header=("review", "label"))
    return params_dict(source=_csv_source("reviews.csv"))


def _missing_label_column(root: Path) -> dict[str, Any]:
    write_csv(root / "reviews.csv", labeled_rows(20), header=("text", "sentiment"))
    return params_dict(source=_csv_source("reviews.csv"))


def _undeclared_label(root: Path) -> dict[str, Any]:
    rows = labeled_rows(20)
    rows.insert(6, ("An okay film, nothing more.", "neutral"))
    write_csv(root / "reviews.csv", rows)
    return params_dict(source=_csv_source("reviews.csv"))


def _empty_split(root: Path) -> dict[str, Any]:
    write_csv(root / "reviews.csv", labeled_rows(6))
    return params_dict(source=_csv_source("reviews.csv"))


def _all_filtered(root: Path) -> dict[str, Any]:
    write_csv(root / "reviews.csv", labeled_rows(30))
    return params_dict(source=_csv_source("reviews.csv"), min_chars=500)


def _missing_jsonl_column(root: Path) -> dict[str, Any]:
    (root / "r.jsonl").write_text(
        '{"text": "fine", "label": "positive"}\n{"body": "oops", "label": "negative"}\n'
    )
    return params_dict(source={"kind": "jsonl", "path": "r.jsonl"})


def _bad_json(root: Path) -> dict[str, Any]:
    (root / "r.jsonl").write_text('{"text": "fine", "label": "positive"}\n{"text": "broken\n')
    return params_dict(source={"kind": "jsonl", "path": "r.jsonl"})


def _missing_parquet_label(root: Path) -> dict[str, Any]:
    pq.write_table(pa.table({"text": ["a b c"], "stars": [3]}), root / "r.parquet")
    return params_dict(source={"kind": "parquet", "path": "r.parquet"})


def _bad_aclimdb_folder(root: Path) -> dict[str, Any]:
    (root / "acl" / "train" / "meh").mkdir(parents=True)
    (root / "acl" / "train" / "meh" / "0_5.txt").write_text("So-so.")
    return params_dict(source={"kind": "aclimdb", "path": "acl", "label_column": None})


def _fifty_mb_line(root: Path) -> dict[str, Any]:
    write_csv(root / "reviews.csv", labeled_rows(40))
    with open(root / "reviews.csv", "a", encoding="utf-8") as handle:
        handle.write("word " * (10 << 20) + ",positive\n")  # one 50 MB field: a lost newline or quote
    return params_dict(source=_csv_source("reviews.csv"))


def _fifty_mb_text_line(root: Path) -> dict[str, Any]:
    write_csv(root / "reviews.csv", labeled_rows(40))
    (root / "u.txt").write_text("a fine line\n" + "x" * (50 << 20) + "\n", encoding="utf-8")
    return params_dict(source=_csv_source("reviews.csv", unlabeled_path="u.txt"))


def _empty_pool(root: Path) -> dict[str, Any]:
    write_csv(root / "reviews.csv", labeled_rows(100))
    return params_dict(source=_csv_source("reviews.csv"), pretrain_pool="unlabeled")


BAD_INPUTS = {
    "missing file": (
        lambda root: params_dict(source=_csv_source("data/nope.csv")),
        r"prepare.source.path: file not found: data/nope.csv",
    ),
    "glob without matches": (
        lambda root: params_dict(source=_csv_source("data/*.csv")),
        r"no files match the glob 'data/\*.csv'",
    ),
    "missing unlabeled file": (
        lambda root: (
            write_csv(root / "reviews.csv", labeled_rows(20)),
            params_dict(source=_csv_source("reviews.csv", unlabeled_path="gone.txt")),
        )[1],
        r"prepare.source.unlabeled_path: file not found: gone.txt",
    ),
    "unknown encoding": (
        lambda root: params_dict(source=_csv_source("x.csv", encoding="klingon-8")),
        r"prepare.source.encoding: unknown encoding 'klingon-8'",
    ),
    "undecodable csv": (_bad_encoding, r"latin.csv: line 3: cannot decode as utf-8 at byte offset 43"),
    "undecodable text": (_bad_encoding_text, r"u.txt: line 3: cannot decode as utf-8 at byte offset 32"),
    "missing text column": (
        _missing_text_column,
        r"reviews.csv: no text column 'text'; columns found: \['review', 'label'\]",
    ),
    "missing label column": (
        _missing_label_column,
        r"reviews.csv: no label column 'label'; columns found: \['text', 'sentiment'\]",
    ),
    "undeclared label": (
        _undeclared_label,
        r"reviews.csv: row 7: label value 'neutral' is not one of the declared labels \['negative', 'positive'\]",
    ),
    "empty split": (_empty_split, r"split '(train|val|test)' has no rows with label '(negative|positive)'"),
    "everything filtered": (_all_filtered, r"no labeled rows left after filtering .*min_chars 500"),
    "jsonl row without the text key": (
        _missing_jsonl_column,
        r"r.jsonl: line 2: no text column 'text'; columns found: \['body', 'label'\]",
    ),
    "invalid json": (_bad_json, r"r.jsonl: line 2: not valid JSON"),
    "parquet without label column": (
        _missing_parquet_label,
        r"r.parquet: no label column 'label'; columns found: \['text', 'stars'\]",
    ),
    "unknown aclimdb folder": (_bad_aclimdb_folder, r"folder 'meh' matches none of the declared labels"),
    "empty pretraining pool": (_empty_pool, r"the pretraining pool is empty \(pretrain_pool: 'unlabeled'"),
    "50 MB single csv row": (
        _fifty_mb_line,
        r"reviews.csv: row 41: text of 52,428,799 characters is longer than prepare.max_chars \(1,000,000\)",
    ),
    "50 MB single text line": (
        _fifty_mb_text_line,
        r"u.txt: line 2: text of 52,428,800 characters is longer than prepare.max_chars \(1,000,000\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly(case: str, project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make, message = BAD_INPUTS[case]
    raw = make(project)
    assert run_cli(raw, project) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigmodel-ops prepare: error: ")
    import re

    assert re.search(message, err), err
    assert_no_outputs(project)
