"""The real CLI in fresh processes: config files, predict inputs/outputs, evaluate --json, bad input."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml

from conftest import run_cli, topic_rows


@pytest.fixture(scope="module")
def cli_model(tiny_models, topic_dir, tmp_path_factory):
    """One model trained through the CLI with a YAML config plus an overriding flag."""
    root = tmp_path_factory.mktemp("cli")
    config = root / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": str(topic_dir),
                "model": str(tiny_models["bert"]),
                "epochs": 5,
                "batch_size": 8,
                "lr": 0.004,
                "max_length": 32,
                "seed": 3,
            }
        )
    )
    result = run_cli("train", "--config", str(config), "--epochs", "1", "--output", str(root / "model"), "--quiet")
    assert result.returncode == 0, result.stderr
    return root / "model"


def test_flags_override_the_config_file_and_resolved_config_is_saved(cli_model, tiny_models):
    saved = yaml.safe_load((cli_model / "run_config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["lr"] == 0.004 and saved["model"] == str(tiny_models["bert"])
    # The saved config re-runs as is (to a new output).
    rerun = run_cli(
        "train", "--config", str(cli_model / "run_config.yaml"), "--output", str(cli_model.parent / "rerun"), "--quiet"
    )
    assert rerun.returncode == 0, rerun.stderr
    first = json.loads((cli_model / "metrics.json").read_text())
    second = json.loads((cli_model.parent / "rerun" / "metrics.json").read_text())
    assert first["test"]["accuracy"] == second["test"]["accuracy"]


def test_evaluate_json_is_one_object(cli_model, topic_dir, tmp_path):
    result = run_cli(
        "evaluate",
        "--model",
        str(cli_model),
        "--data",
        str(topic_dir),
        "--split",
        "test",
        "--json",
        "--save",
        str(tmp_path / "eval"),
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert {"accuracy", "macro_f1", "weighted_f1", "n", "loss", "per_class", "confusion_matrix"} <= set(metrics)
    assert metrics["n"] == 30
    assert (tmp_path / "eval" / "confusion_matrix.png").stat().st_size > 1000


def test_predict_from_arguments_stdin_and_files(cli_model, tmp_path):
    args = run_cli("predict", "--model", str(cli_model), "--top-k", "2", "--json", "goal team", "bank price")
    assert args.returncode == 0, args.stderr
    rows = [json.loads(line) for line in args.stdout.splitlines()]
    assert len(rows) == 2 and len(rows[0]["top_k"]) == 2
    assert set(rows[0]["probabilities"]) == {"money", "space", "sports"}
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

    stdin = run_cli("predict", "--model", str(cli_model), "--json", input="goal team\nbank price\n")
    assert [json.loads(x)["label"] for x in stdin.stdout.splitlines()] == [r["label"] for r in rows]

    source = tmp_path / "in.csv"
    pd.DataFrame({"text": ["goal team", "bank price"]}).to_csv(source, index=False)
    for ext in ("csv", "jsonl"):
        target = tmp_path / f"out.{ext}"
        result = run_cli("predict", "--model", str(cli_model), "--input", str(source), "--output", str(target))
        assert result.returncode == 0, result.stderr
        frame = pd.read_csv(target) if ext == "csv" else pd.read_json(target, lines=True)
        assert list(frame["label"]) == [r["label"] for r in rows]
    assert {"prob_money", "prob_space", "prob_sports"} <= set(pd.read_csv(tmp_path / "out.csv").columns)


def test_python_m_and_console_script_agree():
    import subprocess
    import sys
    from pathlib import Path

    assert run_cli("--version").stdout.startswith("adaptext ")
    script = Path(sys.executable).parent / "adaptext"  # installed next to this interpreter
    assert script.is_file(), "console script not installed"
    assert subprocess.run([str(script), "--version"], capture_output=True, text=True).stdout.startswith("adaptext ")


# ------------------------------------------------------------------ bad input through the CLI


def assert_clean_failure(result, expected: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert expected in lines[-1], lines[-1]
    assert "Traceback" not in result.stderr


def bad_csv(tmp_path, name, content: bytes | str):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize(
    "case,content,expected",
    [
        ("missing_file", None, "not found"),
        ("single_class", "text,label\na,x\nb,x\nc,x\n", "same label"),
        ("nan_text", "text,label\nhi,a\n,b\nyo,a\nho,b\n", "empty or missing"),
        ("non_utf8", b"text,label\ncaf\xe9,a\nb,b\nc,a\nd,b\n", "not valid utf-8"),
        ("unknown_column", "text,label\na,x\nb,y\nc,x\nd,y\n", "no text column 'body'"),
    ],
)
def test_bad_training_input_exits_2_and_writes_nothing(tiny_models, tmp_path, case, content, expected):
    data = tmp_path / "train.csv" if content is None else bad_csv(tmp_path, "train.csv", content)
    output = tmp_path / "out"
    extra = ["--text-column", "body"] if case == "unknown_column" else []
    result = run_cli(
        "train", "--data", str(data), "--model", str(tiny_models["bert"]), "--output", str(output), "--quiet", *extra
    )
    assert_clean_failure(result, expected)
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_unseen_eval_labels_and_long_texts(tiny_models, tmp_path):
    pd.DataFrame(topic_rows(6, classes=("sports", "money"))).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(topic_rows(2, classes=("space", "money"))).to_csv(tmp_path / "test.csv", index=False)
    result = run_cli(
        "train",
        "--data",
        str(tmp_path),
        "--model",
        str(tiny_models["bert"]),
        "--output",
        str(tmp_path / "out"),
        "--quiet",
    )
    assert_clean_failure(result, "not among the training classes")
    long_file = tmp_path / "long.csv"
    pd.DataFrame({"text": ["word " * 300_000, "b", "c", "d"], "label": [0, 1, 0, 1]}).to_csv(long_file, index=False)
    result = run_cli(
        "train",
        "--data",
        str(long_file),
        "--model",
        str(tiny_models["bert"]),
        "--output",
        str(tmp_path / "out"),
        "--quiet",
    )
    assert_clean_failure(result, "characters long")
    assert not (tmp_path / "out").exists()


def test_unknown_model_and_unreachable_hub(topic_dir, tmp_path):
    result = run_cli("train", "--data", str(topic_dir), "--model", "./no/such/dir", "--output", str(tmp_path / "o"))
    assert_clean_failure(result, "not found")
    result = run_cli(
        "train", "--data", str(topic_dir), "--model", "nobody/not-a-model", "--output", str(tmp_path / "o")
    )
    assert_clean_failure(result, "cannot load model 'nobody/not-a-model'")
    result = run_cli("train", "--data", "nobody/not-a-dataset", "--output", str(tmp_path / "o"))
    assert_clean_failure(result, "cannot load dataset 'nobody/not-a-dataset'")
    assert not (tmp_path / "o").exists()


def test_bad_options(topic_dir, tmp_path):
    assert_clean_failure(run_cli("train", "--data", str(topic_dir), "--method", "qlora"), "--method 'qlora'")
    assert_clean_failure(run_cli("train", "--data", str(topic_dir), "--epochs", "-1"), "--epochs must be >= 0")
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 0.1\n")
    assert_clean_failure(run_cli("train", "--config", str(config)), "unknown option 'learning_rate'")
    config.write_text("data: [unclosed\n")
    assert_clean_failure(run_cli("train", "--config", str(config)), "not valid YAML")


def test_existing_output_is_not_clobbered(cli_model, topic_dir, tiny_models):
    before = sorted(p.name for p in cli_model.iterdir())
    result = run_cli("train", "--data", str(topic_dir), "--model", str(tiny_models["bert"]), "--output", str(cli_model))
    assert_clean_failure(result, "--overwrite")
    assert sorted(p.name for p in cli_model.iterdir()) == before


def test_adapter_from_another_base_or_label_count(cli_model, tiny_models, tmp_path, topic_dir):
    other_base = tmp_path / "other-base"
    shutil.copytree(cli_model, other_base)
    meta = json.loads((other_base / "adaptext.json").read_text())
    meta["base_model"].update(name=str(tiny_models["roberta"]), path=str(tiny_models["roberta"]))
    (other_base / "adaptext.json").write_text(json.dumps(meta))
    assert_clean_failure(run_cli("predict", "--model", str(other_base), "hello"), "does not match")
    fixed = run_cli("predict", "--model", str(other_base), "--base", str(tiny_models["bert"]), "hello")
    assert fixed.returncode == 0, fixed.stderr  # the fix the message names works

    other_labels = tmp_path / "other-labels"
    shutil.copytree(cli_model, other_labels)
    labels = json.loads((other_labels / "labels.json").read_text())
    labels["id2label"]["3"] = "extra"
    labels["num_labels"] = 4
    (other_labels / "labels.json").write_text(json.dumps(labels))
    assert_clean_failure(run_cli("predict", "--model", str(other_labels), "hello"), "does not fit")

    assert_clean_failure(run_cli("evaluate", "--model", str(tmp_path / "nope")), "not found")
    assert_clean_failure(run_cli("predict", "--model", str(topic_dir), "x"), "not an adaptext output directory")


def test_predict_output_errors_leave_nothing(cli_model, tmp_path):
    target = tmp_path / "preds.txt"
    assert_clean_failure(
        run_cli("predict", "--model", str(cli_model), "--output", str(target), "hi"), ".csv, .jsonl or .parquet"
    )
    assert not target.exists()


def test_predict_bad_stdin_and_odd_texts(cli_model, tiny_models, topic_dir, tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "adaptext", "predict", "--model", str(cli_model)],
        input=b"caf\xe9 au lait\n",
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == 2 and b"not valid UTF-8" in result.stderr and b"Traceback" not in result.stderr
    # Empty and enormous texts are classified, not crashed on.
    import adaptext

    rows = adaptext.load(cli_model).predict(["", "goal " * 200_000])
    assert len(rows) == 2
