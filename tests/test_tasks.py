"""Multi-label and regression: loading, losses, thresholds, metrics, and the round trip
train -> save -> reload -> predict / evaluate / export -> serve, on tiny random models."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import adaptext
from adaptext import api, data, evaluation, tasks
from adaptext.config import TrainConfig
from adaptext.errors import AdaptextError
from adaptext.metrics import multilabel_metrics, regression_metrics
from adaptext.options import validate
from adaptext.tasks import Task
from conftest import TOPICS, assert_logits_close, assert_probs_close, logit_bound, run_cli
from test_serve import Server

TEXTS = ["match goal planet rocket", "bank stock price", "orbit", "team coach league market profit", "moon"]


def mixed_rows(n: int, seed: int) -> list[dict]:
    """Texts made of one or two topics' words: their labels are the topics, their score the share of
    sports words (x10, plus noise): learnable by a tiny model in a few epochs."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topics = rng.sample(sorted(TOPICS), rng.choice([1, 1, 2]))
        words = [rng.choice(TOPICS[t]) for t in topics for _ in range(rng.randint(2, 6))]
        rng.shuffle(words)
        sports = sum(w in TOPICS["sports"] for w in words) / len(words)
        rows.append({"text": " ".join(words), "topics": topics, "score": round(10 * sports + rng.gauss(0, 0.3), 3)})
    return rows


def write_mixed_dir(folder: Path, n_train: int, n_test: int) -> Path:
    """train.parquet and test.parquet of ``mixed_rows``: a topics column (label lists) and a score column."""
    pd.DataFrame(mixed_rows(n_train, 1)).to_parquet(folder / "train.parquet")
    pd.DataFrame(mixed_rows(n_test, 2)).to_parquet(folder / "test.parquet")
    return folder


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory) -> Path:
    return write_mixed_dir(tmp_path_factory.mktemp("mixed"), 240, 60)


def cfg(**kw) -> TrainConfig:
    return validate(TrainConfig(**kw))


# ---------------------------------------------------------------- loading


def test_list_cells_are_multi_label_and_non_integer_numbers_are_regression(mixed_dir):
    multi = data.load_training_data(cfg(data=str(mixed_dir), label_column="topics"))
    assert multi.task == "multi-label" and multi.class_names == ["money", "space", "sports"]
    assert all(isinstance(row, list) and row == sorted(set(row)) for row in multi.splits["train"].labels)
    assert any(len(row) == 2 for row in multi.splits["train"].labels)
    assert any("task: multi-label" in note for note in multi.notes)
    regression = data.load_training_data(cfg(data=str(mixed_dir), label_column="score"))
    assert regression.task == "regression" and regression.class_names == ["score"] and regression.num_labels == 1
    assert all(isinstance(v, float) for v in regression.splits["test"].labels)
    # Stratified on the target's quintiles: both parts span the range.
    train, validation = regression.splits["train"].labels, regression.splits["validation"].labels
    assert min(validation) < np.quantile(train, 0.25) and max(validation) > np.quantile(train, 0.75)


def test_label_strings_split_at_the_separator_and_list_literals(tmp_path):
    rows = [("goal match", "sports"), ("bank moon", "money|space"), ("", ""), ("orbit", "space"), ("price", "money")]
    frame = pd.DataFrame([{"text": t or "blank", "label": labels} for t, labels in rows])
    frame.to_csv(tmp_path / "sep.csv", index=False)
    loaded = data.load_training_data(cfg(data=str(tmp_path / "sep.csv"), label_separator="|", validation_fraction=0.2))
    assert loaded.task == "multi-label" and loaded.class_names == ["money", "space", "sports"]
    everything = loaded.splits["train"].labels + loaded.splits["validation"].labels
    assert sorted(map(tuple, everything)) == [(), (0,), (0, 1), (1,), (2,)]  # the blank cell: no label
    # pandas writes list columns to CSV as Python literals; JSON lists work too.
    literal = pd.DataFrame({"text": ["a b", "c d", "e f", "g h"], "label": ["['x', 'y']", '["x"]', "['y']", "[]"]})
    literal.to_csv(tmp_path / "literal.csv", index=False)
    loaded = data.load_training_data(
        cfg(data=str(tmp_path / "literal.csv"), task="multi-label", validation_fraction=0.25)
    )
    assert loaded.class_names == ["x", "y"]


BAD = {
    "text_target": ("text,label\na,1.5\nb,high\nc,2.5\nd,0.5\n", {"task": "regression"}, "not a finite number"),
    "constant_target": ("text,label\na,1.5\nb,1.5\nc,1.5\nd,1.5\n", {"task": "regression"}, "needs variation"),
    "float_class": ("text,label\na,0.5\nb,1.5\nc,0.5\nd,1.5\n", {"task": "single-label"}, "--task regression"),
    "bad_literal": ('text,label\na,"[x, y]"\nb,[]\nc,[]\nd,[]\n', {"task": "multi-label"}, "does not parse"),
    "no_labels_at_all": ("text,label\na,[]\nb,[]\nc,[]\nd,[]\n", {"task": "multi-label"}, "no row has a label"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_task_data_names_the_problem(tmp_path, case):
    content, options, expected = BAD[case]
    (tmp_path / "train.csv").write_text(content)
    with pytest.raises(AdaptextError) as err:
        data.load_training_data(cfg(data=str(tmp_path / "train.csv"), **options))
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"task": "regression", "label_separator": ","}, "applies to multi-label"),
        ({"task": "single-label", "threshold": 0.3}, "applies to multi-label"),
        ({"threshold": 1.5}, "between 0 and 1"),
        ({"label_separator": ""}, "must not be empty"),
        ({"task": "regression", "class_weights": True}, "applies to classification"),
        ({"task": "regression", "loss": "focal"}, "applies to classification"),
        ({"task": "tagging"}, "is not one of"),
    ],
)
def test_contradictory_task_options_are_refused(options, expected):
    with pytest.raises(AdaptextError, match=expected):
        cfg(**options)


def test_a_metric_the_task_lacks_is_refused_before_training(mixed_dir, tiny_models, tmp_path):
    with pytest.raises(AdaptextError, match="--metric accuracy does not apply to multi-label"):
        api.train(
            data=str(mixed_dir), label_column="topics", model=str(tiny_models["bert"]), metric="accuracy",
            output=str(tmp_path / "never"), progress=False, echo=lambda line: None,
        )  # fmt: skip
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------- losses, thresholds, metrics


def test_sigmoid_focal_at_gamma_zero_is_weighted_bce_and_gamma_discounts_easy_cells():
    logits, targets = torch.randn(6, 3), (torch.rand(6, 3) > 0.5).float()
    pos_weight = torch.tensor([1.0, 3.0, 0.5])
    bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight)(logits, targets)
    assert tasks.sigmoid_focal_loss(logits, targets, 0.0, pos_weight).item() == pytest.approx(bce.item(), rel=1e-6)
    assert tasks.sigmoid_focal_loss(logits, targets, 2.0) < tasks.sigmoid_focal_loss(logits, targets, 0.0)
    weights = tasks.positive_weight_tensor([[0], [0, 1], [0], []], 3)
    assert weights.tolist() == [1.0, 3.0, 4.0]  # negatives / positives, floored at 1; class 2 has none: 4 / 1


def test_thresholds_maximise_each_class_f1_and_stay_at_half_without_positives():
    truth = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=bool)
    probs = np.array([[0.30, 0.6, 0.1], [0.35, 0.2, 0.2], [0.1, 0.8, 0.3], [0.2, 0.1, 0.9]])
    cuts = tasks.tune_thresholds(truth, probs)
    # Class 0: F1 1 for cuts in (0.2, 0.3], class 1 for cuts in (0.6, 0.8]; of the grid's ties, nearest 0.5.
    assert cuts[0] == pytest.approx(0.30) and cuts[1] == pytest.approx(0.65)
    assert cuts[2] == 0.5  # no positive row to tune on
    task = Task("multi-label").with_tuned_thresholds([[0], [0], [1], []], np.log(probs / (1 - probs)), 3, None)
    assert task.thresholds == tuple(cuts)
    assert Task("multi-label").with_tuned_thresholds([[0]], np.zeros((1, 3)), 3, 0.7).thresholds == (0.7,) * 3


def test_multilabel_and_regression_metrics_match_hand_counts():
    truth = np.array([[1, 0], [1, 1], [0, 0]])
    logits = np.array([[3.0, -3.0], [3.0, -3.0], [-3.0, 3.0]])  # right, half right, wrong
    m = multilabel_metrics(truth, logits, ["a", "b"], np.array([0.5, 0.5]))
    assert m["subset_accuracy"] == pytest.approx(1 / 3)
    assert m["hamming_loss"] == pytest.approx(2 / 6)
    assert m["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # tp 2, fp 1, fn 1
    assert m["per_class"]["a"]["f1"] == 1.0 and m["per_class"]["b"]["f1"] == 0.0
    r = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0]), "y")
    assert r["mse"] == pytest.approx(4 / 3) and r["mae"] == pytest.approx(2 / 3) and r["r2"] == pytest.approx(1 - 4 / 2)
    assert r["pearson"] == pytest.approx(np.corrcoef([1, 2, 3], [1, 2, 5])[0, 1])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_folding_the_target_scale_turns_standardised_outputs_into_values(tiny_models, method):
    from adaptext import models

    source = models.resolve_model(str(tiny_models["bert"]))
    model, heads = models.load_classifier(source, 1, {0: "y"}, 0, "regression")
    model, _ = models.prepare(model, TrainConfig(method=method), heads, 10)
    with torch.no_grad():
        tasks.output_layer(model).bias.fill_(0.3)  # a head that has learned something
    batch = {
        "input_ids": torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]]),
        "attention_mask": torch.tensor([[1] * 4, [1, 1, 1, 0]]),
    }
    model.eval()
    with torch.no_grad():
        standardised = model(**batch).logits
        tasks.fold_target_scale(model, mean=40.0, std=7.5)
        folded = model(**batch).logits
    torch.testing.assert_close(folded, standardised * 7.5 + 40.0, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- the round trip


def _train(tiny_models, mixed_dir, output: Path, column: str, **kw):
    return api.train(
        data=str(mixed_dir), label_column=column, model=str(tiny_models["bert"]), output=str(output),
        epochs=6, batch_size=8, max_length=32, lr=0.02, seed=3, progress=False, echo=lambda line: None, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_models, mixed_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("task-models")
    _train(tiny_models, mixed_dir, root / "topics", "topics")
    _train(tiny_models, mixed_dir, root / "score", "score")
    return {"multi": root / "topics", "regression": root / "score"}


def threshold_cells_decided(logits: np.ndarray, thresholds: list[float], precision: str) -> bool:
    """Multi-label: no cell's logit is within the precision's bound of its class's threshold (so no label
    can flip between two evaluations that agree within the bound)."""
    if precision == "fp32":
        return True
    cuts = np.log(np.asarray(thresholds)) - np.log1p(-np.asarray(thresholds))  # thresholds as logits
    return bool((np.abs(logits - cuts) > logit_bound(logits, precision)).all())


@pytest.mark.parity
def test_multi_label_model_learns_saves_its_thresholds_and_reloads_exactly(trained, mixed_dir, precision):
    folder = trained["multi"]
    metrics = json.loads((folder / "metrics.json").read_text())
    meta = json.loads((folder / "adaptext.json").read_text())
    assert meta["task"]["kind"] == "multi-label" and len(meta["task"]["thresholds"]) == 3
    assert json.loads((folder / "labels.json").read_text())["problem_type"] == "multi_label_classification"
    test = metrics["test"]
    assert test["micro_f1"] > 0.55 and test["thresholds"] == meta["task"]["thresholds"]
    assert {"subset_accuracy", "macro_f1", "hamming_loss", "per_class"} <= set(test)
    assert "Hamming loss" in (folder / "README.md").read_text()
    classifier = adaptext.load(folder)
    probs = classifier.predict_proba(TEXTS)
    assert probs.shape == (5, 3) and not np.allclose(probs.sum(axis=1), 1.0)  # a sigmoid per class, not a softmax
    results = classifier.predict(TEXTS, top_k=2)
    for row, p in zip(results, probs):
        chosen = {name for name, cut, q in zip(classifier.class_names, meta["task"]["thresholds"], p) if q >= cut}
        assert set(row["labels"]) == chosen and len(row["top_k"]) == 2 and "label" not in row
    # evaluate reloads the model and re-scores the test split in the same precision: the saved test figures,
    # exactly in fp32; in bf16 the loss (binary cross-entropy is 1-Lipschitz in each logit) within the bound,
    # and micro-F1 exactly unless a cell sits within the bound of its threshold.
    again = evaluation.evaluate(folder)
    assert again["precision"] == test["precision"] == precision
    test_logits = classifier.logits(pd.read_parquet(mixed_dir / "test.parquet")["text"].tolist())
    assert again["loss"] == pytest.approx(test["loss"], abs=1e-5 if precision == "fp32" else logit_bound(test_logits))
    if threshold_cells_decided(test_logits, meta["task"]["thresholds"], precision):
        assert again["micro_f1"] == pytest.approx(test["micro_f1"])


@pytest.mark.parity
def test_regression_model_learns_and_predicts_on_the_targets_scale(trained, mixed_dir, precision):
    folder = trained["regression"]
    metrics = json.loads((folder / "metrics.json").read_text())
    meta = json.loads((folder / "adaptext.json").read_text())
    assert meta["task"]["kind"] == "regression" and meta["class_names"] == ["score"]
    assert metrics["test"]["r2"] > 0.3 and metrics["test"]["pearson"] > 0.6
    # Validation during training ran on standardised outputs rescaled; after the fold the saved model
    # gives the same figure by itself.
    # (An RMSE moves at most as far as the values do: within the precision's bound of them.)
    test_values = adaptext.load(folder).logits(pd.read_parquet(mixed_dir / "test.parquet")["text"].tolist())
    fp32 = precision == "fp32"
    assert metrics["validation"]["rmse"] == pytest.approx(
        metrics["best"]["rmse"], **({"rel": 1e-4} if fp32 else {"abs": logit_bound(test_values)})
    )
    values = adaptext.load(folder).predict(["goal match team goal", "bank price stock"])
    assert values[0]["value"] > values[1]["value"] + 2 and set(values[0]) == {"value", "label"}
    again = evaluation.evaluate(folder)
    assert again["precision"] == metrics["test"]["precision"] == precision
    assert again["rmse"] == pytest.approx(
        metrics["test"]["rmse"], **({"rel": 1e-5} if fp32 else {"abs": logit_bound(test_values)})
    )


def test_predict_cli_writes_each_tasks_columns(trained, tmp_path):
    for kind, header in (
        ("multi", ["text", "labels", "prob_money", "prob_space", "prob_sports", "precision"]),
        ("regression", ["text", "value", "precision"]),
    ):
        out = tmp_path / f"{kind}.csv"
        result = run_cli("predict", "--model", str(trained[kind]), "--output", str(out), *TEXTS[:3])
        assert result.returncode == 0, result.stderr
        frame = pd.read_csv(out)
        assert list(frame.columns) == header and len(frame) == 3
        shown = run_cli("predict", "--model", str(trained[kind]), "--json", TEXTS[0])
        row = json.loads(shown.stdout.splitlines()[0])
        assert ("labels" in row) if kind == "multi" else isinstance(row["value"], float)
    expected = adaptext.load(trained["multi"]).predict(TEXTS[:3])
    assert [json.loads(cell) for cell in pd.read_csv(tmp_path / "multi.csv")["labels"]] == [
        r["labels"] for r in expected
    ]


def test_onnx_export_keeps_each_tasks_answers(trained):
    pytest.importorskip("onnxruntime")
    from adaptext.export import export

    for kind in ("multi", "regression"):
        export(trained[kind], "onnx")
        torch_model = adaptext.load(trained[kind], precision="fp32")  # ONNX computes in fp32
        onnx_model = adaptext.load(trained[kind], backend="onnx")
        np.testing.assert_allclose(onnx_model.predict_proba(TEXTS), torch_model.predict_proba(TEXTS), atol=1e-4)
        key = "labels" if kind == "multi" else "label"
        assert [r[key] for r in onnx_model.predict(TEXTS)] == [r[key] for r in torch_model.predict(TEXTS)]


@pytest.mark.parity
def test_serve_answers_every_task_from_one_shared_base(trained, tiny_models, topic_dir, tmp_path, precision):
    single = tmp_path / "single"
    api.train(
        data=str(topic_dir), model=str(tiny_models["bert"]), output=str(single), epochs=2, batch_size=8,
        max_length=32, lr=0.02, progress=False, echo=lambda line: None,
    )  # fmt: skip
    server = Server(["--adapters", str(trained["multi"]), str(trained["regression"]), str(single)])
    try:
        status, listing = server.get("/v1/adapters", token=None)
        assert status == 200 and len(listing["bases"]) == 1  # three tasks, one base in memory
        assert {a["name"]: a["task"] for a in listing["adapters"]} == {
            "topics": "multi-label", "score": "regression", "single": "single-label",
        }  # fmt: skip
        for name, folder in (("topics", trained["multi"]), ("score", trained["regression"]), ("single", single)):
            status, body = server.post("/v1/classify", {"adapter": name, "texts": TEXTS, "top_k": 2}, token=None)
            assert (
                status == 200
                and body["task"] == listing["adapters"][[a["name"] for a in listing["adapters"]].index(name)]["task"]
            )
            reference = adaptext.load(folder)
            expected = reference.predict(TEXTS, top_k=2)
            logits = reference.logits(TEXTS)
            assert body["precision"] == precision
            if "value" in expected[0]:
                assert_logits_close([g["value"] for g in body["results"]], [w["value"] for w in expected], fp32=1e-4)
            else:
                probs = [[g["probabilities"][label] for label in body["labels"]] for g in body["results"]]
                assert_probs_close(probs, reference.predict_proba(TEXTS), logits)
            thresholds = reference.meta["task"].get("thresholds")
            decided = threshold_cells_decided(logits, thresholds, precision) if thresholds else True
            for got, want, row in zip(body["results"], expected, logits):
                assert set(got) == set(want)  # no empty fields of the other tasks
                if "labels" in want and decided:
                    assert got["labels"] == want["labels"]
                elif "label" in want and "value" not in want:
                    if precision == "fp32" or np.sort(row)[-1] - np.sort(row)[-2] > 2 * logit_bound(logits):
                        assert got["label"] == want["label"]
    finally:
        server.stop()


def test_tune_searches_a_regression_study_on_rmse(tiny_models, mixed_dir, tmp_path, capsys):
    optuna = pytest.importorskip("optuna")
    from adaptext import cli

    out = tmp_path / "study"
    # fmt: off
    code = cli.main(["tune", "--data", str(mixed_dir), "--label-column", "score", "--model", str(tiny_models["bert"]),
                     "--output", str(out), "--epochs", "1", "--batch-size", "8", "--max-length", "32", "--trials", "2",
                     "--quiet"])
    # fmt: on
    assert code == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{out / 'study.db'}")
    assert study.direction.name == "MINIMIZE" and len(study.trials) == 2  # --metric auto: rmse, lower is better
    best = json.loads((out / "best" / "metrics.json").read_text())["best"]
    assert study.best_value == pytest.approx(best["rmse"]) and "validation rmse" in capsys.readouterr().out
