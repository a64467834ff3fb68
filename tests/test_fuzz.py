"""Property-based bad-input fuzzing (Hypothesis) of the data loaders and the predict path.

The property everywhere: the input is either used, or refused with an AdaptextError whose message
is one line (the CLI prints it as ``error: ...`` and exits 2); never another exception.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from adaptext import api, config, data, option_files, options
from adaptext.config import TrainConfig
from adaptext.errors import AdaptextError
from conftest import run_cli

FORMATS = ("csv", "tsv", "json", "jsonl", "parquet")
# A few dozen examples per property keep the file fast; ADAPTEXT_FUZZ_EXAMPLES=2000 hunts longer.
FUZZ = settings(
    max_examples=int(os.environ.get("ADAPTEXT_FUZZ_EXAMPLES", "50")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Text with the awkward characters files carry: separators, quotes, newlines, NUL and other controls,
# BOMs, Unicode line separators, and (through JSON's \ud800 escapes) lone surrogates.
AWKWARD = ",\t\n\r\"'\\\x00\x0b\x0c\x1c\x85\u2028\ufeff\ud800\udfff "
texts = st.text(alphabet=st.characters(codec=None) | st.sampled_from(AWKWARD), max_size=30)
labels = st.one_of(
    st.sampled_from(["a", "b", "c", " b ", "B"]),
    st.integers(-2, 3),
    texts.filter(str.strip),
    st.binary(min_size=1, max_size=3),
    st.lists(st.integers(0, 2), min_size=1, max_size=2),  # multi-label rows: not single-label classification
)
column_names = st.sampled_from(["text", "label", "sentence", "y", "extra", "Text", "", "0", "1"]) | texts
cells = st.one_of(
    texts,
    st.sampled_from(["", "   ", "NA", "null", "nan", "a", "b", "0", "1", "x" * 5000]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.lists(st.integers(0, 3), max_size=3),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), max_size=2),
    st.binary(max_size=8),
)


def one_line(exc: AdaptextError) -> None:
    message = str(exc)
    assert message and len(message.splitlines()) == 1 and message.strip() == message, repr(message)


def refused_cleanly(call, *args: Any, **kwargs: Any) -> Any:
    """Run ``call``: its result, or None when it raised a one-line AdaptextError."""
    try:
        result = call(*args, **kwargs)
    except AdaptextError as exc:
        one_line(exc)
        tally(f"{call.__name__}: refused")
        return None
    tally(f"{call.__name__}: used")
    return result


def tally(outcome: str) -> None:
    """Count outcomes for --hypothesis-show-statistics: how much of the random input was usable."""
    if currently_in_test_context():
        event(outcome)


def load(cfg: TrainConfig) -> data.TextDataset:
    """What adaptext train does first: validate the options, then load the data."""
    return data.load_training_data(options.validate(cfg))


# ------------------------------------------------------------------ writing random tables


@st.composite
def tables(draw) -> tuple[list[str], list[dict[str, Any]]]:
    """Column names (text column first, label column second) and rows. Mostly a usable table (repeating
    labels) with a few cells broken, so that both the loading and the refusing paths are exercised."""
    text_name = draw(st.just("text") | column_names)
    label_name = draw((st.just("label") | column_names).filter(lambda name: name != text_name))
    extra = draw(st.lists(column_names.filter(lambda name: name not in (text_name, label_name)), max_size=2))
    columns = [text_name, label_name, *dict.fromkeys(extra)]
    label_pool = draw(st.lists(labels, min_size=2, max_size=4, unique_by=str))
    text_values = draw(st.sampled_from([texts.filter(str.strip)] * 3 + [st.binary(min_size=1, max_size=8)]))
    rows = []
    for _ in range(draw(st.integers(0, 12))):
        row = {c: draw(cells) for c in columns[2:]}
        rows.append({text_name: draw(text_values), label_name: draw(st.sampled_from(label_pool)), **row})
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):  # break a few cells
        if rows:
            draw(st.sampled_from(rows))[draw(st.sampled_from(columns))] = draw(cells)
    return columns, rows


def _json_safe(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value if not isinstance(value, float) or math.isfinite(value) else str(value)


def write_table(path: Path, columns: list[str], rows: list[dict[str, Any]], mode: int) -> None:
    """One table in the file's format; ``mode`` picks among well-formed and subtly malformed writings."""
    ext = path.suffix[1:]
    if ext in ("csv", "tsv"):
        sep = "," if ext == "csv" else "\t"

        def render(v: Any) -> str:
            text = "" if v is None else str(v)
            if mode % 2 and ext == "csv":  # quoted properly
                return '"' + text.replace('"', '""') + '"'
            return text  # raw: separators and newlines inside cells break the rows

        lines = [sep.join(render(c) for c in columns)] + [sep.join(render(r.get(c)) for c in columns) for r in rows]
        encoding = ("utf-8", "utf-16", "latin-1", "utf-8-sig")[mode % 4]
        errors = "surrogatepass" if encoding.startswith("utf") else "replace"  # lone surrogates as raw bytes
        path.write_bytes("\n".join(lines).encode(encoding, errors=errors))
    elif ext == "json":
        records = [{c: _json_safe(r.get(c)) for c in columns} for r in rows]
        body = records if mode % 3 else {c: [r[c] for r in records] for c in columns}  # records or columns
        path.write_text(json.dumps(body, allow_nan=mode % 2 == 0), encoding="utf-8")
    elif ext == "jsonl":
        lines = [
            json.dumps({c: _json_safe(r.get(c)) for c in columns if mode % 3 or r.get(c) is not None}) for r in rows
        ]
        path.write_text("\n".join(lines) + ("\n{broken" if mode % 5 == 4 else ""), encoding="utf-8")
    else:
        try:
            write_parquet(path, columns, rows, mode, as_strings=False)
        except (pa.ArrowException, OverflowError):  # mixed or unstorable types (e.g. an empty struct): as strings
            write_parquet(path, columns, rows, mode, as_strings=True)


def write_parquet(path: Path, columns: list[str], rows: list[dict[str, Any]], mode: int, as_strings: bool) -> None:
    storable = lambda v: v.encode("utf-8", "replace").decode() if isinstance(v, str) else v  # no lone surrogates
    arrays = {}
    for c in columns:
        values = [storable(r.get(c)) for r in rows]
        try:
            arrays[storable(c)] = pa.array(values) if not as_strings else None
        except (pa.ArrowException, OverflowError):  # mixed types in this column
            pass
        if arrays.get(storable(c)) is None:
            arrays[storable(c)] = pa.array([None if v is None else storable(str(v)) for v in values], type=pa.string())
    table = pa.table(arrays)
    if mode % 4 == 3:  # the same column name twice (pyarrow writes it, and refuses to read it)
        table = table.append_column(storable(columns[0]), table.column(0))
    if mode % 5 == 4:
        table = table.replace_schema_metadata({"class_names": json.dumps(["a", "b", "\n"])})
    pq.write_table(table, path)


def check_dataset(ds: data.TextDataset) -> None:
    """A loaded dataset is usable as is: texts valid, labels of the kind its task says, in range."""
    n = len(ds.class_names)
    assert n >= (1 if ds.task != "single-label" else 2) and (n == 1 or ds.task != "regression")
    for split in ds.splits.values():
        assert len(split.texts) == len(split.labels) > 0
        assert all(isinstance(t, str) and t.strip() for t in split.texts)
        for t in split.texts:
            t.encode("utf-8")  # tokenizers need valid Unicode
        if ds.task == "regression":
            assert all(isinstance(v, float) and math.isfinite(v) for v in split.labels)
        elif ds.task == "multi-label":
            assert all(row == sorted(set(row)) and all(0 <= i < n for i in row) for row in split.labels)
        else:
            assert all(isinstance(i, int) and 0 <= i < n for i in split.labels)


# ------------------------------------------------------------------ the loaders


@FUZZ
@given(
    fmt=st.sampled_from(FORMATS),
    table=tables(),
    mode=st.integers(0, 19),
    train_size=st.none() | st.integers(2, 12),
    name_columns=st.booleans(),
)
@example(fmt="json", table=(["0", "1"], [{"0": "a", "1": "x"}, {"0": "b", "1": "y"}] * 2), mode=1, train_size=None,
         name_columns=True)  # fmt: skip
def test_any_table_loads_or_is_refused_in_one_line(fmt, table, mode, train_size, name_columns):
    columns = table[0]
    # Name the columns (--text-column/--label-column) instead of leaving them to auto-detection.
    detectable = columns[:2] == ["text", "label"]
    text_column, label_column = ([columns[0]], columns[1]) if name_columns or not detectable else (None, None)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"train.{fmt}"
        write_table(path, *table, mode)
        cfg = TrainConfig(data=str(path), train_size=train_size, text_column=text_column, label_column=label_column)
        ds = refused_cleanly(load, cfg)
        if ds is not None:
            check_dataset(ds)
        texts = refused_cleanly(data.read_texts, str(path), text_column)
        if texts is not None:
            assert all(isinstance(t, str) for t in texts)
        refused_cleanly(data.load_eval_split, str(path), None, ["a", "b", "0"], None, None)


@FUZZ
@given(fmt=st.sampled_from(FORMATS), content=st.binary(max_size=300), encoding=st.sampled_from(["utf-8", "latin-1"]))
@example(fmt="csv", content=b"", encoding="utf-8")
@example(fmt="json", content=b"[]", encoding="utf-8")
@example(fmt="json", content=b"{}", encoding="utf-8")
@example(fmt="json", content=b"null", encoding="utf-8")
@example(fmt="json", content=b'"text"', encoding="utf-8")
@example(fmt="json", content=b'[{"text": "a\\ud800", "label": 1}, {"text": "b", "label": 2}]', encoding="utf-8")
@example(fmt="jsonl", content=b'{"text": 1}\n[1, 2]\n', encoding="utf-8")
@example(fmt="csv", content=b"\xff\xfet\x00e\x00", encoding="utf-8")
@example(fmt="csv", content=b'text,label\n"unclosed,a\nb,c\n', encoding="utf-8")
@example(fmt="parquet", content=b"PAR1garbagePAR1", encoding="utf-8")
def test_random_bytes_load_or_are_refused_in_one_line(fmt, content, encoding):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"train.{fmt}"
        path.write_bytes(content)
        ds = refused_cleanly(load, TrainConfig(data=str(path), encoding=encoding))
        if ds is not None:
            check_dataset(ds)
        refused_cleanly(data.read_texts, str(path), None, encoding)


@FUZZ
@given(
    text_column=st.none() | st.lists(column_names, min_size=1, max_size=2),
    label_column=st.none() | column_names,
    encoding=st.sampled_from(["utf-8", "latin-1", "utf-16", "no-such-codec", ""]),
    seed=st.integers(0, 2**40),
    validation_fraction=st.floats(0.01, 0.99),
)
def test_options_against_a_split_folder(topic_dir, text_column, label_column, encoding, seed, validation_fraction):
    cfg = TrainConfig(
        data=str(topic_dir),
        text_column=text_column,
        label_column=label_column,
        encoding=encoding,
        seed=seed,
        validation_fraction=validation_fraction,
    )
    ds = refused_cleanly(load, cfg)
    if ds is not None:
        check_dataset(ds)


@pytest.mark.parametrize(
    "labels",
    [
        [1, "1", 1.0, True],  # the same class written four ways
        [True, False, True, False],
        [0.5, 1, 0, 1],
        [[1], [2], [1], [2]],
        [np.int64(3), np.int64(4), np.int64(3), np.int64(4)],
        ["a\nb", "c", "a\nb", "c"],
        [2**70, 1, 2**70, 1],
        [float("inf"), 1, 2, 1],
    ],
)
def test_label_types(tmp_path, labels):
    frame = {"text": ["one", "two", "three", "four"], "label": labels}
    for ext in ("json", "parquet"):
        path = tmp_path / f"train.{ext}"
        try:
            pq.write_table(pa.table(frame), path) if ext == "parquet" else path.write_text(json.dumps(
                [{"text": t, "label": _json_safe(v.item() if hasattr(v, "item") else v)} for t, v in zip(*frame.values())]
            ))  # fmt: skip
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            continue
        ds = refused_cleanly(load, TrainConfig(data=str(path), validation_fraction=0.5))
        if ds is not None:
            check_dataset(ds)


# ------------------------------------------------------------------ the predict path


@pytest.fixture(scope="module")
def classifier(tiny_models, topic_dir, tmp_path_factory):
    """An (untrained: epochs 0) tiny BERT classifier, saved and reloaded like any model."""
    import adaptext

    output = tmp_path_factory.mktemp("fuzz") / "model"
    api.train(
        data=str(topic_dir), model=str(tiny_models["bert"]), output=str(output), epochs=0, max_length=32,
        progress=False, echo=lambda line: None,
    )  # fmt: skip
    return adaptext.load(output)


ODD_TEXTS = [
    "",
    " ",
    "\t\n",
    "\x00",
    "\x01\x1f\x7f",
    "\u200b" * 50,
    "\u202eRTL",
    "🙂" * 40,
    "é" * 3000,
    "word " * 100_000,
]
NOT_TEXTS = st.one_of(
    st.sampled_from(["\ud800", "a\udfffb"]),  # lone surrogates: not valid Unicode text
    st.integers(),
    st.none(),
    st.binary(max_size=10),
    st.floats(),
    st.lists(st.text(max_size=3), max_size=2),
)


@st.composite
def predict_inputs(draw) -> list[Any]:
    """Mostly texts (random Unicode, odd ones); one time in four a non-text or invalid one among them."""
    items = draw(st.lists(st.text(max_size=200) | st.sampled_from(ODD_TEXTS), max_size=6))
    if not draw(st.integers(0, 3)):
        items.insert(draw(st.integers(0, len(items))), draw(NOT_TEXTS))
    return items


@settings(FUZZ, max_examples=max(FUZZ.max_examples // 2, 1))  # each example runs the model: half as many
@given(items=predict_inputs(), top_k=st.integers(-2, 5))
@example(items=[], top_k=1)
def test_predict_answers_or_refuses_in_one_line(classifier, items, top_k):
    rows = refused_cleanly(classifier.predict, items, top_k=top_k)
    if rows is None:
        assert any(not isinstance(t, str) or not _encodable(t) for t in items)
        return
    assert len(rows) == len(items)
    for row in rows:
        assert row["label"] in classifier.class_names
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert 1 <= len(row["top_k"]) <= len(classifier.class_names)


@pytest.mark.parametrize(
    "value", [None, 5, 2.5, b"bytes", {"text": "a"}, object(), "one text", ("a", "b"), iter(["a"])]
)
def test_predict_argument_that_is_not_a_list_of_texts(classifier, value):
    rows = refused_cleanly(classifier.predict, value)
    if rows is not None:
        assert isinstance(value, (str, tuple)) or hasattr(value, "__next__")
    if isinstance(value, str):  # one string is one text everywhere, not a list of characters
        assert len(rows) == 1 and classifier.logits(value).shape == (1, len(classifier.class_names))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ------------------------------------------------------------------ through the CLI (a few; processes are slow)


def assert_exit_0_or_one_error(result) -> None:
    assert result.returncode in (0, 2), (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_cli_list_labels_train_multi_label_and_refuse_single_label_cleanly(tiny_models, tmp_path):
    # A Parquet list column as labels used to end in a numpy ValueError traceback; now it is a
    # multi-label file, and --task single-label refuses it in one line, writing nothing.
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["a b", "c d", "e f", "g h"], "label": [[0, 1], [1], [0], [1, 0]]}), path)
    out = tmp_path / "out"
    model = ["--model", str(tiny_models["bert"]), "--epochs", "1", "--quiet"]
    result = run_cli("train", "--data", str(path), *model, "--task", "single-label", "--output", str(out))
    assert_exit_0_or_one_error(result)
    assert result.returncode == 2 and "not a single label" in result.stderr and "--task multi-label" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.parquet"]  # no output, partial or not
    result = run_cli("train", "--data", str(path), *model, "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "adaptext.json").read_text())["task"]["kind"] == "multi-label"


def test_cli_predict_odd_inputs_write_all_or_nothing(classifier, tmp_path):
    model = classifier.loaded.folder
    odd = [" x ", "\x07bell", "é" * 3000, "tab\there", "\u2028 line separator", "\x00nul", "🙂" * 5]
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": t}) for t in odd) + "\n")
    out = tmp_path / "preds.jsonl"
    result = run_cli("predict", "--model", str(model), "--input", str(good), "--output", str(out))
    assert_exit_0_or_one_error(result)
    rows = out.read_text(encoding="utf-8").split("\n")[:-1]  # not splitlines(): U+2028 is a line break to it
    assert result.returncode == 0 and [json.loads(line)["text"] for line in rows] == odd
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "\\udc80"}\n')
    refused = tmp_path / "refused.csv"
    result = run_cli("predict", "--model", str(model), "--input", str(bad), "--output", str(refused))
    assert_exit_0_or_one_error(result)
    assert result.returncode == 2 and not refused.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


# ------------------------------------------------------------------ config files


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
option_names = st.sampled_from(["lr", "epochs", "batch_size", "loss", "focal_gamma", "class_weights", "layers",
                                "text_column", "seed", "model", "metric", "top_layers"])  # fmt: skip


@FUZZ
@given(
    values=st.dictionaries(option_names | st.text(max_size=6) | st.integers(), yaml_values, max_size=4),
    raw=st.text(max_size=60),
)
@example(values={1: 2}, raw="")
@example(values={"lr": "2e-3", "epochs": "1e400"}, raw="? [a]\n: 1\n")
def test_config_files_are_options_or_one_line_errors(tmp_path, values, raw):
    import yaml

    for text in (yaml.safe_dump(values), raw):
        path = tmp_path / "run.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        loaded = refused_cleanly(option_files.load_file, path)
        if loaded is not None:
            refused_cleanly(resolve, loaded, str(path))


def resolve(values: dict[str, Any], source: str) -> config.TrainConfig:
    return options.validate(options.from_dict(values, source=source))
