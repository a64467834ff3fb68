"""Class imbalance: focal loss, class weights as its alpha, the skew warning, stratified sampling of skewed data."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch
import yaml

import adaptext
from adaptext import api, data, options, policy
from adaptext.config import TrainConfig
from adaptext.errors import AdaptextError
from adaptext.tasks import class_weight_tensor, focal_loss, make_loss
from conftest import run_cli, topic_rows


def random_batch(seed: int = 0, n: int = 32, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=generator) * 3
    labels = torch.randint(0, classes, (n,), generator=generator)
    return logits, labels


@pytest.mark.parametrize("weighted", [False, True])
def test_focal_with_gamma_0_is_cross_entropy_value_and_gradient(weighted):
    logits, labels = random_batch()
    weight = class_weight_tensor(labels.tolist(), 4) if weighted else None
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    focal = focal_loss(a, labels, 0.0, weight)
    ce = torch.nn.CrossEntropyLoss(weight=weight)(b, labels)
    focal.backward()
    ce.backward()
    assert focal.item() == pytest.approx(ce.item(), rel=1e-6)
    assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_focal_down_weights_easy_examples():
    # Row 0 is easy (p_true ~0.98), row 1 is hard (p_true ~0.02).
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0]])
    labels = torch.tensor([0, 0])
    per_ce = [focal_loss(logits[i : i + 1], labels[i : i + 1], 0.0).item() for i in range(2)]
    per_focal = [focal_loss(logits[i : i + 1], labels[i : i + 1], 2.0).item() for i in range(2)]
    easy_scale, hard_scale = per_focal[0] / per_ce[0], per_focal[1] / per_ce[1]
    assert easy_scale < 1e-3 and hard_scale > 0.9  # (1 - p)^2: 0.018^2 vs 0.98^2
    # The easy example's share of the gradient shrinks too.
    grads = {}
    for gamma in (0.0, 2.0):
        x = logits.clone().requires_grad_(True)
        focal_loss(x, labels, gamma).backward()
        grads[gamma] = x.grad.norm(dim=1)
    assert grads[2.0][0] / grads[2.0][1] < 0.01 * grads[0.0][0] / grads[0.0][1]
    # Larger gamma, smaller loss; every value finite, also where the model is certain.
    certain = torch.tensor([[60.0, -60.0]], requires_grad=True)
    for gamma in (0.5, 1.0, 2.0, 5.0):
        value = focal_loss(certain, torch.tensor([0]), gamma)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(certain.grad).all()
    assert focal_loss(logits, labels, 5.0) < focal_loss(logits, labels, 2.0) < focal_loss(logits, labels, 0.0)


def test_make_loss_follows_the_config():
    logits, labels = random_batch(1)
    weights = class_weight_tensor(labels.tolist(), 4)
    ce = make_loss(TrainConfig(), labels.tolist(), 4, torch.device("cpu"))
    weighted = make_loss(TrainConfig(class_weights=True), labels.tolist(), 4, torch.device("cpu"))
    focal = make_loss(TrainConfig(loss="focal", class_weights=True), labels.tolist(), 4, torch.device("cpu"))
    assert ce(logits, labels).item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    expected = torch.nn.functional.cross_entropy(logits, labels, weight=weights).item()
    assert weighted(logits, labels).item() == pytest.approx(expected)
    assert focal(logits, labels).item() == pytest.approx(focal_loss(logits, labels, 2.0, weights).item())


# ------------------------------------------------------------------ training with it


def skewed_rows(seed: int = 0) -> list[dict]:
    """sports 40, money 40, space 8: 5x."""
    rows = topic_rows(40, seed=seed, classes=("sports", "money")) + topic_rows(8, seed=seed + 1, classes=("space",))
    return rows


def test_focal_with_class_weights_trains_saves_and_reloads(tiny_models, tmp_path):
    pd.DataFrame(skewed_rows()).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(skewed_rows(seed=7)).to_csv(tmp_path / "test.csv", index=False)
    lines: list[str] = []
    outcome = api.train(
        data=str(tmp_path),
        model=str(tiny_models["bert"]),
        output=str(tmp_path / "out"),
        loss="focal",
        focal_gamma=1.5,
        class_weights=True,
        epochs=2,
        batch_size=8,
        max_length=32,
        progress=False,
        echo=lines.append,
    )
    saved = yaml.safe_load((outcome.output / "run_config.yaml").read_text())
    assert saved["loss"] == "focal" and saved["focal_gamma"] == 1.5 and saved["class_weights"] is True
    assert json.loads((outcome.output / "adaptext.json").read_text())["config"]["loss"] == "focal"
    assert "loss focal (gamma 1.5), class-weighted" in (outcome.output / "README.md").read_text()  # model card
    again = adaptext.evaluate(outcome.output, str(tmp_path), split="test")
    assert again["accuracy"] == outcome.metrics["test"]["accuracy"]
    assert again["macro_f1"] == outcome.metrics["test"]["macro_f1"]
    # Remedies already in use are not suggested again; the one that is not still is.
    warning = [line for line in lines if "imbalanced" in line]
    assert len(warning) == 1 and "--class-weights" not in warning[0].split(": try")[-1]
    assert "--metric macro_f1" in warning[0]


def test_skew_warning_lists_counts_once_and_only_for_skewed_data():
    lines: list[str] = []
    labels = [0] * 40 + [1] * 40 + [2] * 8
    policy.warn_if_imbalanced(labels, ["money", "sports", "space"], TrainConfig(), lines.append)
    assert len(lines) == 1 and lines[0].startswith("warning: ")
    assert "money 40, sports 40, space 8" in lines[0] and "5.0x" in lines[0]
    assert "--class-weights and/or --loss focal" in lines[0] and "--metric macro_f1" in lines[0]
    lines.clear()
    policy.warn_if_imbalanced([0] * 20 + [1] * 7, ["a", "b"], TrainConfig(), lines.append)  # 2.9x: under the rule
    policy.warn_if_imbalanced([0, 1, 2] * 10, ["a", "b", "c"], TrainConfig(), lines.append)
    assert lines == []
    full = TrainConfig(class_weights=True, loss="focal", metric="macro_f1")
    policy.warn_if_imbalanced(labels, ["money", "sports", "space"], full, lines.append)
    assert len(lines) == 1 and lines[0].startswith("data: ") and "using --class-weights" in lines[0]
    assert data.skew([0] * 30 + [1] * 10, ["a", "b"]) == (3.0, {"a": 30, "b": 10})


def test_skew_warning_is_printed_by_the_cli(tiny_models, tmp_path):
    pd.DataFrame(skewed_rows()).to_csv(tmp_path / "train.csv", index=False)
    result = run_cli(
        "train", "--data", str(tmp_path / "train.csv"), "--model", str(tiny_models["bert"]), "--epochs", "0",
        "--output", str(tmp_path / "out"), "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if "imbalanced" in line]
    assert len(warnings) == 1 and re.search(r"money \d+, sports \d+, space \d+;", warnings[0]), warnings


# ------------------------------------------------------------------ bad values


@pytest.mark.parametrize(
    "values,expected",
    [
        ({"loss": "dice"}, "--loss 'dice' is not one of auto, cross-entropy, focal, contrastive"),
        ({"focal_gamma": -1}, "--focal-gamma must be between 0 and 10"),
        ({"focal_gamma": float("nan")}, "--focal-gamma must be a finite number"),
        ({"focal_gamma": 11}, "--focal-gamma must be between 0 and 10"),
        ({"focal_gamma": "strong"}, "--focal-gamma must be a number (got 'strong')"),
        ({"class_weights": "yes"}, "--class-weights must be true or false"),
        ({"epochs": float("inf")}, "--epochs must be a finite number"),
        ({"batch_size": 2.5}, "--batch-size must be a whole number"),
    ],
)
def test_bad_values_are_one_line_errors(values, expected):
    with pytest.raises(AdaptextError) as err:
        options.validate(options.from_dict(values))
    assert expected in str(err.value) and len(str(err.value).splitlines()) == 1


def test_yaml_numbers_pyyaml_reads_as_strings_are_numbers():
    # PyYAML reads 2e-3 (no dot) as a string; it used to reach a comparison and end in a TypeError.
    values = yaml.safe_load("lr: 2e-3\nfocal_gamma: '1'\nbatch_size: 8.0\nlayers: 1\n")
    cfg = options.validate(options.from_dict(values))
    assert (cfg.lr, cfg.focal_gamma, cfg.batch_size, cfg.layers) == (0.002, 1.0, 8, [1])
    assert isinstance(cfg.batch_size, int)


def test_bad_loss_options_through_the_cli(topic_dir, tmp_path):
    from test_cli import assert_clean_failure

    out = tmp_path / "out"
    assert_clean_failure(run_cli("train", "--data", str(topic_dir), "--loss", "focall", "--output", str(out)), "--loss")
    config_file = tmp_path / "c.yaml"
    config_file.write_text("loss: focal\nfocal_gamma: -2\n")
    result = run_cli("train", "--config", str(config_file), "--data", str(topic_dir), "--output", str(out))
    assert_clean_failure(result, "--focal-gamma must be between 0 and 10 (got -2)")
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    assert not out.exists()


# ------------------------------------------------------------------ stratified sampling of skewed data


def skewed_file(tmp_path, counts: dict[str, int]):
    rows = [{"text": f"{label} example {i}", "label": label} for label, n in counts.items() for i in range(n)]
    path = tmp_path / "train.csv"
    pd.DataFrame(rows).sample(frac=1, random_state=0).to_csv(path, index=False)
    return path


def test_train_size_sample_and_validation_keep_skewed_class_shares(tmp_path):
    counts = {"big": 600, "mid": 300, "small": 60, "tiny": 20}  # 980 examples, 30x
    path = skewed_file(tmp_path, counts)
    ds = data.load_training_data(TrainConfig(data=str(path), train_size=196, eval_size=98, seed=3))
    for split, size in (("train", 196), ("validation", 98)):
        got = data.class_counts(ds.splits[split].labels, ds.class_names)
        assert sum(got.values()) == size
        for name, n in counts.items():
            assert abs(got[name] - n * size / 980) <= 1, (split, got)
    assert not set(ds.splits["train"].texts) & set(ds.splits["validation"].texts)


def test_carved_validation_keeps_skewed_class_shares(tmp_path):
    counts = {"big": 400, "small": 40, "tiny": 10}
    ds = data.load_training_data(
        TrainConfig(data=str(skewed_file(tmp_path, counts)), validation_fraction=0.2, validation_min_train=0)
    )
    val = data.class_counts(ds.splits["validation"].labels, ds.class_names)
    assert val == {"big": 80, "small": 8, "tiny": 2}


def test_a_class_with_one_example_stays_in_training_and_the_rest_stays_stratified(tmp_path):
    counts = {"big": 200, "small": 20, "once": 1}
    for seed in range(3):  # sklearn cannot stratify with a singleton: it used to split all classes at random
        ds = data.load_training_data(
            TrainConfig(data=str(skewed_file(tmp_path, counts)), seed=seed, validation_min_train=0)
        )
        train = data.class_counts(ds.splits["train"].labels, ds.class_names)
        val = data.class_counts(ds.splits["validation"].labels, ds.class_names)
        assert train["once"] == 1 and "once" not in val
        assert val == {"big": 20, "small": 2}


def test_compare_resume_treats_options_newer_than_a_run_as_their_defaults(tmp_path):
    from adaptext import compare
    from adaptext.artifacts import META_FILE

    cfg = options.validate(TrainConfig(output=str(tmp_path / "run")))
    saved = cfg.to_dict()
    del saved["loss"], saved["focal_gamma"]  # a run made before these options existed
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / META_FILE).write_text(json.dumps({"config": saved}))
    (tmp_path / "run" / "metrics.json").write_text("{}")
    assert compare.finished(cfg)
    assert not compare.finished(options.validate(TrainConfig(output=str(tmp_path / "run"), loss="focal")))
