"""Data loading: formats, columns, label spaces, sampling, and every bad-input message."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adaptext import data, readers
from adaptext.config import TrainConfig
from adaptext.errors import AdaptextError
from conftest import SHARED_DATA, needs_shared_data, topic_rows


def cfg(**kw) -> TrainConfig:
    # These tests are about loading and carving; the small-data policy (no carving under
    # --validation-min-train examples) has its own in test_fewshot.py.
    return TrainConfig(**{"validation_min_train": 0, **kw})


@pytest.mark.parametrize("ext", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_every_file_format_loads_the_same_examples(tmp_path, ext):
    frame = pd.DataFrame(topic_rows(8, seed=3))
    path = tmp_path / f"train.{ext}"
    if ext == "csv":
        frame.to_csv(path, index=False)
    elif ext == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif ext == "json":
        frame.to_json(path, orient="records")
    elif ext == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    ds = data.load_training_data(cfg(data=str(path), validation_min_train=0))
    assert ds.class_names == ["money", "space", "sports"]  # discovered and sorted
    total = len(ds.splits["train"]) + len(ds.splits["validation"])
    assert total == len(frame)
    joined = ds.splits["train"].texts + ds.splits["validation"].texts
    assert sorted(joined) == sorted(frame["text"])


def test_texts_that_look_like_missing_values_stay_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nNA,a\nnull,b\nNone,a\nnan,b\nok,a\nfine,b\n", encoding="utf-8")
    ds = data.load_training_data(cfg(data=str(path), validation_fraction=0.34))
    assert "NA" in ds.splits["train"].texts + ds.splits["validation"].texts


def test_split_directory_with_classes_json_and_int_labels(tmp_path):
    rows = [{"text": r["text"], "label": ["sports", "money", "space"].index(r["label"])} for r in topic_rows(10)]
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(rows[:9]).to_csv(tmp_path / "dev.csv", index=False)
    (tmp_path / "classes.json").write_text(json.dumps({"names": ["sports", "money", "space"]}))
    ds = data.load_training_data(cfg(data=str(tmp_path)))
    assert ds.class_names == ["sports", "money", "space"]
    assert len(ds.splits["validation"]) == 9  # dev.csv used, nothing carved
    assert ds.splits["train"].labels == [r["label"] for r in rows]


def test_parquet_metadata_class_names(tmp_path):
    table = pa.table({"text": ["a b", "c d", "e f", "g h"], "label": [0, 1, 0, 1]})
    table = table.replace_schema_metadata({"class_names": json.dumps(["neg", "pos"])})
    pq.write_table(table, tmp_path / "train.parquet")
    pq.write_table(table, tmp_path / "validation.parquet")
    assert data.load_training_data(cfg(data=str(tmp_path))).class_names == ["neg", "pos"]


def test_several_text_columns_are_joined_and_label_column_mapped(tmp_path):
    frame = pd.DataFrame(
        {
            "title": ["Rocket up", "Stocks down", "Goal!", "Moon"] * 3,
            "body": ["orbit", "market", "match", "crater"] * 3,
            "topic": ["sci", "biz", "sport", "sci"] * 3,
        }
    )
    frame.to_csv(tmp_path / "train.csv", index=False)
    ds = data.load_training_data(
        cfg(
            data=str(tmp_path / "train.csv"),
            text_column=["title", "body"],
            label_column="topic",
            validation_fraction=0.25,
        )
    )
    texts = ds.splits["train"].texts + ds.splits["validation"].texts
    assert "Rocket up orbit" in texts
    assert ds.class_names == ["biz", "sci", "sport"]


def test_stratified_train_size_keeps_class_balance_and_is_seeded(topic_dir):
    a = data.load_training_data(cfg(data=str(topic_dir), train_size=30, seed=1))
    b = data.load_training_data(cfg(data=str(topic_dir), train_size=30, seed=1))
    c = data.load_training_data(cfg(data=str(topic_dir), train_size=30, seed=2))
    assert len(a.splits["train"]) == 30
    assert a.splits["train"].texts == b.splits["train"].texts
    assert a.splits["train"].texts != c.splits["train"].texts
    counts = pd.Series(a.splits["train"].labels).value_counts()
    assert counts.max() - counts.min() <= 1
    # Validation is carved from the examples *not* sampled for training: no overlap.
    assert not set(a.splits["train"].texts) & set(a.splits["validation"].texts) - set(a.splits["train"].texts)


def test_validation_is_carved_stratified_when_missing(tmp_path):
    pd.DataFrame(topic_rows(40, seed=1)).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(topic_rows(10, seed=2)).to_csv(tmp_path / "test.csv", index=False)
    ds = data.load_training_data(cfg(data=str(tmp_path), validation_min_train=0))
    assert sorted(set(ds.splits["validation"].labels)) == [0, 1, 2]
    assert "test" in ds.splits and len(ds.splits["test"]) == 30
    assert any("carved" in n for n in ds.notes)


@needs_shared_data()
def test_shared_ag_news_directory():
    ds = data.load_training_data(cfg(data=str(SHARED_DATA / "ag_news"), train_size=100, eval_size=40))
    assert ds.class_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert len(ds.splits["train"]) == 100 and len(ds.splits["validation"]) == 40
    assert len(ds.splits["test"]) == 7600


# ------------------------------------------------------------------ bad input


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


BAD_INPUTS = {
    "missing_file": (None, "not found"),
    "empty_file": ("", "is empty"),
    "header_only": ("text,label\n", "has no rows"),
    "single_class": ("text,label\na,x\nb,x\nc,x\nd,x\n", "same label"),
    "empty_text": ("text,label\nhello,a\n,b\nworld,a\nthere,b\n", "empty or missing 'text'"),
    "missing_label": ("text,label\nhello,a\nyo,\nworld,a\nthere,b\n", "no label"),
    "unknown_text_column": ("blurb,label\nhello,a\nworld,b\nx,a\ny,b\n", "cannot tell which column holds the text"),
    "non_utf8": (b"text,label\ncaf\xe9,a\nbar,b\nbaz,a\nqux,b\n", "not valid utf-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_training_inputs_name_the_problem(tmp_path, case):
    content, expected = BAD_INPUTS[case]
    path = tmp_path / "train.csv" if content is None else write(tmp_path, "train.csv", content)
    with pytest.raises(AdaptextError) as err:
        data.load_training_data(cfg(data=str(path)))
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_explicit_columns(topic_dir):
    with pytest.raises(AdaptextError, match="no text column 'body'.*--text-column"):
        data.load_training_data(cfg(data=str(topic_dir), text_column=["body"]))
    with pytest.raises(AdaptextError, match="no label column 'y2'.*--label-column"):
        data.load_training_data(cfg(data=str(topic_dir), label_column="y2"))


def test_test_labels_unseen_in_train(tmp_path):
    pd.DataFrame(topic_rows(10, classes=("sports", "money"))).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(topic_rows(3, classes=("sports", "space"))).to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(AdaptextError, match="'space'"):
        data.load_training_data(cfg(data=str(tmp_path)))


def test_absurdly_long_text(tmp_path):
    path = tmp_path / "train.csv"
    pd.DataFrame({"text": ["x " * 600_000, "b", "c", "d"], "label": [0, 1, 0, 1]}).to_csv(path, index=False)
    with pytest.raises(AdaptextError, match="characters long"):
        data.load_training_data(cfg(data=str(path)))


def test_unreachable_hub_dataset_is_one_clear_line():
    with pytest.raises(AdaptextError, match="cannot load dataset 'no-such-user/no-such-dataset'"):
        data.load_training_data(cfg(data="no-such-user/no-such-dataset"))


def test_directory_without_split_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(AdaptextError, match="holds no split files"):
        data.load_training_data(cfg(data=str(tmp_path)))


def test_datasets_library_path_reads_classlabel_names(tmp_path):
    """The Hub code path (datasets.load_dataset) on a local dataset: ClassLabel names are used."""
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "neu", "pos"])}
    )
    rows = {"text": [f"t{i}" for i in range(12)], "label": [i % 3 for i in range(12)]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "train.parquet"))
    tables = readers._load_hub(str(tmp_path), None)
    assert tables["train"].class_names == ["neg", "neu", "pos"]
    split = data.table_to_split(tables["train"], None, None, ["neg", "neu", "pos"], declared=True)
    assert split.labels == rows["label"]
