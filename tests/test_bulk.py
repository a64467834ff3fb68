"""`adaptext predict --input`: streamed in chunks, parts + manifest, --resume after kill -9, --workers, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import assert_labels_agree, assert_probs_close, run_cli, topic_rows


@pytest.fixture(scope="module")
def model(trained_tiny) -> Path:
    return trained_tiny


@pytest.fixture(scope="module")
def texts() -> pd.DataFrame:
    frame = pd.DataFrame(topic_rows(70, seed=11))[["text"]]
    frame.insert(0, "id", [f"row-{i}" for i in range(len(frame))])
    return frame  # 210 rows


def write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_csv(path, index=False, sep="\t" if path.suffix == ".tsv" else ",")
    return path


def predict(model: Path, *args: str, **kw):
    return run_cli("predict", "--model", str(model), "--quiet", *args, **kw)


@pytest.mark.parametrize("source", ["parquet", "csv", "tsv", "jsonl"])
@pytest.mark.parametrize("target", ["csv", "jsonl", "parquet"])
def test_streamed_output_matches_in_memory_predict_in_input_order(model, texts, tmp_path, source, target):
    import adaptext

    classifier = adaptext.load(model)
    logits = classifier.logits(list(texts["text"]))
    expected = classifier.predict(list(texts["text"]))
    path = write(texts, tmp_path / f"in.{source}")
    out = tmp_path / f"out.{target}"
    result = predict(model, "--input", path, "--output", out, "--chunk-rows", "64", "--keep-columns", "id")
    assert result.returncode == 0, result.stderr
    assert f"wrote {len(texts)} predictions to {out}" in result.stdout and "texts/s" in result.stdout
    got = {"csv": pd.read_csv, "parquet": pd.read_parquet}.get(target, lambda p: pd.read_json(p, lines=True))(out)
    assert list(got["id"]) == list(texts["id"]) and list(got["text"]) == list(texts["text"])
    assert list(got.columns[:2]) == ["id", "text"]
    assert_labels_agree(list(got["label"]), [row["label"] for row in expected], logits)
    probs = np.array([[row["probabilities"][c] for c in ("money", "space", "sports")] for row in expected])
    if target == "jsonl":  # the objects --json prints: probabilities as a mapping
        got = pd.DataFrame({f"prob_{c}": [p[c] for p in got["probabilities"]] for c in ("money", "space", "sports")})
    assert_probs_close(got[["prob_money", "prob_space", "prob_sports"]].to_numpy(), probs, logits, fp32=1e-5)
    assert not list(tmp_path.glob("*.parts")) and not list(tmp_path.glob(".*partial*"))


def test_folder_and_glob_read_every_file_in_name_order_and_stdout_streams(model, texts, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    write(texts.iloc[:100], folder / "a.parquet")
    write(texts.iloc[100:150], folder / "b.csv")
    write(texts.iloc[150:], folder / "c.jsonl")
    (folder / "notes.txt").write_text("not read")
    for spec in (folder, f"{folder}/*.[cpj]*"):  # the folder; a glob of the three data files
        result = predict(model, "--input", spec, "--json", "--chunk-rows", "40")
        assert result.returncode == 0, result.stderr
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        assert [r["text"] for r in rows] == list(texts["text"])
        assert "printed 210 predictions" in result.stderr
    plain = predict(model, "--input", folder / "a.parquet", "--top-k", "2")
    assert len(plain.stdout.splitlines()) == 100 and plain.stdout.count("=") == 100  # label, score, text, next class


def test_parquet_output_is_typed_and_keeps_top_k(model, texts, tmp_path):
    out = tmp_path / "out.parquet"
    assert predict(model, "--input", write(texts, tmp_path / "in.csv"), "--output", out, "--top-k", "2").returncode == 0
    table = pq.read_table(out)
    assert table.schema.field("score").type == pa.float64() and table.num_rows == len(texts)
    first = table.slice(0, 1).to_pylist()[0]
    assert len(first["top_k"]) == 2 and first["top_k"][0]["label"] == first["label"] and first["precision"]


def read_manifest(out: Path) -> dict:
    try:
        return json.loads((out.parent / f"{out.name}.parts" / "manifest.json").read_text())
    except (OSError, ValueError):
        return {"parts": []}


@pytest.mark.processes
def test_kill_9_midway_then_resume_equals_an_uninterrupted_run(model, tmp_path):
    frame = pd.DataFrame(topic_rows(200, seed=4))[["text"]]  # 600 rows, 60 parts of 10
    source = write(frame, tmp_path / "in.csv")
    whole = tmp_path / "whole.csv"
    args = ["--input", str(source), "--chunk-rows", "10", "--batch-size", "2", "--quiet"]
    assert predict(model, *args, "--output", whole).returncode == 0
    out = tmp_path / "out.csv"
    cmd = [sys.executable, "-m", "adaptext", "predict", "--model", str(model), *args, "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while len(read_manifest(out)["parts"]) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(read_manifest(out)["parts"])
    assert 5 <= finished < 60, f"killed after {finished} parts: make the run longer"
    assert not out.exists()  # nothing that looks complete
    again = predict(model, *args, "--output", out)
    assert again.returncode == 2 and "--resume" in again.stderr  # the parts are not silently overwritten
    resumed = predict(model, *args, "--output", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{finished * 10:,} from the finished parts" in resumed.stdout
    assert out.read_bytes() == whole.read_bytes()
    assert not (tmp_path / "out.csv.parts").exists()


def test_resume_refuses_parts_of_another_input(model, texts, tmp_path):
    source = write(texts, tmp_path / "in.csv")
    out = tmp_path / "out.csv"
    parts = tmp_path / "out.csv.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"plan": {"input": "something else"}, "parts": []}))
    result = predict(model, "--input", source, "--output", out, "--resume")
    assert result.returncode == 2 and "different" in result.stderr and "input" in result.stderr
    assert not out.exists() and parts.exists()  # another run's parts are the user's to remove


@pytest.mark.processes
def test_workers_give_the_same_file_as_one_process(model, texts, tmp_path):
    source = write(texts, tmp_path / "in.parquet")
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert predict(model, "--input", source, "--output", one, "--chunk-rows", "30").returncode == 0
    result = predict(model, "--input", source, "--output", two, "--chunk-rows", "30", "--workers", "2")
    assert result.returncode == 0, result.stderr
    a = [json.loads(line) for line in one.read_text().splitlines()]
    b = [json.loads(line) for line in two.read_text().splitlines()]
    assert [r["text"] for r in a] == [r["text"] for r in b] and [r["label"] for r in a] == [r["label"] for r in b]
    for x, y in zip(a, b):
        assert x["probabilities"] == pytest.approx(y["probabilities"], abs=1e-6)


def clean_failure(result, *expected: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(e in last for e in expected), last


def test_bad_input_late_in_the_file_names_file_and_row_and_leaves_nothing(model, texts, tmp_path):
    big = pd.concat([texts] * 4, ignore_index=True)  # 840 rows
    big["id"] = [f"row-{i}" for i in range(len(big))]
    out = tmp_path / "out.csv"
    csv_path = write(big, tmp_path / "bad.csv")
    raw = csv_path.read_bytes().replace(b"row-731,", b"row-731\xff,")
    csv_path.write_bytes(raw)
    clean_failure(
        predict(model, "--input", csv_path, "--output", out, "--chunk-rows", "50"), "bad.csv", "line 733", "UTF-8"
    )
    lines = csv_path.read_text(encoding="latin-1").splitlines()
    lines[601] = lines[601] + ",extra"
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    clean_failure(
        predict(model, "--input", csv_path, "--output", out, "--chunk-rows", "50"), "bad.csv", "row 600", "fields"
    )
    jsonl = tmp_path / "bad.jsonl"
    rows = [json.dumps({"text": t}) for t in big["text"]]
    rows[500] = json.dumps({"text": "   "})
    jsonl.write_text("\n".join(rows) + "\n")
    clean_failure(predict(model, "--input", jsonl, "--output", out, "--chunk-rows", "64"), "bad.jsonl", "row 500")
    rows[500] = "{not json"
    jsonl.write_text("\n".join(rows) + "\n")
    clean_failure(predict(model, "--input", jsonl, "--output", out), "bad.jsonl", "line 501", "not valid JSON")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "bad.jsonl"]  # no output, no parts


def test_glob_with_a_file_missing_the_column_names_that_file(model, texts, tmp_path):
    write(texts, tmp_path / "a.parquet")
    write(texts.rename(columns={"text": "body2"}), tmp_path / "b.parquet")
    clean_failure(predict(model, "--input", f"{tmp_path}/*.parquet", "--json"), "b.parquet", "--text-column")
    clean_failure(
        predict(model, "--input", tmp_path / "a.parquet", "--keep-columns", "idx", "--json"),
        "no column idx",
        "--keep-columns",
    )
    clean_failure(predict(model, "--input", f"{tmp_path}/*.csv", "--json"), "matches no files")
    (tmp_path / "b.parquet").unlink()
    (tmp_path / "c.parquet").write_bytes(b"PAR1 not really")
    clean_failure(predict(model, "--input", f"{tmp_path}/*.parquet", "--json"), "c.parquet", "Parquet")


def test_flags_that_need_an_input_file_or_an_output_are_refused(model, texts, tmp_path):
    clean_failure(predict(model, "hello", "--resume"), "--resume", "--input")
    source = write(texts, tmp_path / "in.csv")
    clean_failure(predict(model, "--input", source, "--resume"), "--resume", "--output")
    clean_failure(predict(model, "--input", source, "--output", tmp_path / "x.txt"), ".parquet")
    clean_failure(predict(model, "--input", source, "--json", "--workers", "0"), "--workers")
    clean_failure(predict(model, "--input", source, "--json", "--chunk-rows", "0"), "--chunk-rows")


def test_progress_line_counts_rate_and_time_left(texts, tmp_path):
    from adaptext.bulk import Progress
    from adaptext.bulk_input import Source

    known = Progress(Source(str(write(texts, tmp_path / "in.parquet"))))
    known.started -= 10
    known.advance(105, computed=True)
    assert known.line().startswith("predict: 105/210 texts (50%), 10 texts/s, 10 s left")
    source = Source(str(write(texts, tmp_path / "in.csv")), chunk_rows=70)
    guessed = Progress(source)
    guessed.started -= 7
    chunks = source.chunks()
    guessed.advance(len(next(chunks)), computed=True)
    assert "predict: 70 texts (3" in guessed.line() and "10 texts/s" in guessed.line()
