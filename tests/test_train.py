"""Training-loop pieces: batching, padding, schedules, class weights, early stopping, accumulation."""

from __future__ import annotations

import random
import shutil

import pandas as pd
import pytest
import torch

from adaptext import api, evaluation, policy
from adaptext.batching import bucketed_batches, collate, sorted_batches
from adaptext.precision import resolve as resolve_precision
from adaptext.tasks import class_weight_tensor
from adaptext.train import lr_factor
from conftest import topic_rows


def test_bucketed_batches_cover_everything_once_and_pad_little():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    batches = bucketed_batches(lengths, 16, random.Random(1))
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    naive = sum(
        max(lengths[i] for i in range(s, min(s + 16, 1000))) * len(range(s, min(s + 16, 1000)))
        for s in range(0, 1000, 16)
    )
    assert padded < 0.75 * naive  # length bucketing removes most padding
    assert bucketed_batches(lengths, 16, random.Random(1)) == batches  # seeded
    assert sorted(i for b in sorted_batches(lengths, 64) for i in b) == list(range(1000))


def test_snug_inference_batches_bound_padding_and_keep_every_row():
    rng = random.Random(3)
    lengths = [rng.choice([8, 12, 25, 30, 60, 190]) + rng.randint(0, 5) for _ in range(300)]
    batches = sorted_batches(lengths, 64, slack=1.25, max_tokens=2048)
    assert sorted(i for b in batches for i in b) == list(range(300))
    for b in batches:
        width, real = max(lengths[i] for i in b), sum(lengths[i] for i in b)
        assert len(b) <= 64 and (len(b) == 1 or (len(b) * width <= 1.25 * real and len(b) * width <= 2048))
        assert lengths[b[0]] == width  # longest first
    assert len(batches) > len(sorted_batches(lengths, 64))  # it did cut
    assert sorted_batches([5, 5, 5], 2, slack=2.0) == [[0, 1], [2]]


def test_collate_pads_dynamically_to_a_multiple_of_8():
    batch = collate([[1, 2, 3], [4]], pad_id=0)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].tolist()[1] == [1, 0, 0, 0, 0, 0, 0, 0]
    assert collate([[1] * 9], pad_id=0)["input_ids"].shape == (1, 16)


def test_schedules():
    assert lr_factor(0, 100, 10, "linear") == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_factor(99, 100, 10, "linear") == pytest.approx(1 / 90, abs=1e-6)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(80, 100, 10, "constant") == 1.0


def test_class_weights_are_inverse_frequency():
    weights = class_weight_tensor([0, 0, 0, 1], 2)
    assert weights[1] / weights[0] == pytest.approx(3.0)


def test_precision_auto_never_picks_slow_bf16_on_plain_cpus(monkeypatch):
    from adaptext.precision import cpu_has_fast_bf16

    monkeypatch.delenv("ADAPTEXT_PRECISION", raising=False)  # the test run forces one: undo it here
    chosen = resolve_precision("auto", torch.device("cpu"))
    assert chosen == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_adaptext_precision_decides_auto_for_a_whole_run(monkeypatch):
    from adaptext.errors import AdaptextError

    cpu = torch.device("cpu")
    for value, expected in (("bf16", "bf16"), ("fp32", "fp32"), (" BF16 ", "bf16")):
        monkeypatch.setenv("ADAPTEXT_PRECISION", value)
        assert resolve_precision("auto", cpu) == expected
        assert resolve_precision("fp32", cpu) == "fp32"  # an explicit --precision still wins
    monkeypatch.setenv("ADAPTEXT_PRECISION", "fp8")
    with pytest.raises(AdaptextError, match="ADAPTEXT_PRECISION='fp8' is not one of fp32, bf16, fp16, auto"):
        resolve_precision("auto", cpu)


def test_precision_bounds_follow_from_the_format():
    import numpy as np

    from adaptext.precision import EPS, decided_rows, logit_bound

    assert EPS["bf16"] == 2**-7 and EPS["fp16"] == 2**-10
    logits = np.array([[4.0, -2.0], [0.30, 0.29], [0.9, -0.9]])
    assert logit_bound("bf16", logits) == pytest.approx(4 * 2**-7 * 4.0)
    assert logit_bound("bf16", logits[1:]) == pytest.approx(4 * 2**-7)  # small logits: the scale is floored at 1
    assert logit_bound("fp32", logits) == 1e-4
    # Row 1's top two are 0.01 apart, within twice the bound: its label may go either way in bf16.
    assert decided_rows(logits, logit_bound("bf16", logits)).tolist() == [True, False, True]


def quiet_train(tiny_models, topic_dir, tmp_path, name, **kw):
    settings = dict(
        data=str(topic_dir),
        model=str(tiny_models["bert"]),
        output=str(tmp_path / name),
        batch_size=8,
        max_length=32,
        seed=5,
        min_steps=0,  # these tests count steps and evaluations; the small-data floor has its own (test_fewshot.py)
    )
    settings.update(kw)
    return api.train(progress=False, echo=lambda line: None, **settings)


def test_early_stopping_and_evals_per_epoch(tiny_models, topic_dir, tmp_path):
    # A learning rate this small cannot move the validation loss: patience 2 stops after 3 evaluations.
    outcome = quiet_train(
        tiny_models,
        topic_dir,
        tmp_path,
        "es",
        epochs=10,
        lr=1e-9,
        early_stopping=2,
        metric="accuracy",
        evals_per_epoch=2,
    )
    assert outcome.metrics["train"]["stopped_early"]
    assert len(outcome.metrics["history"]) == 3
    assert outcome.metrics["history"][0]["epoch"] == 0.5333  # batch 8 of 15 (120 rows, batch 8)


def test_the_saved_epoch_is_the_lowest_validation_loss_unless_told_otherwise(tiny_models, topic_dir, tmp_path):
    folder = tmp_path / "split"
    folder.mkdir()
    for name in ("train", "test"):
        shutil.copy(topic_dir / f"{name}.csv", folder / f"{name}.csv")
    pd.DataFrame(topic_rows(24, seed=7)).to_csv(folder / "validation.csv", index=False)
    outcome = quiet_train(tiny_models, folder, tmp_path, "by-loss", epochs=4, lr=5e-3)
    history, best = outcome.metrics["history"], outcome.metrics["best"]
    assert len(history) == 4 and best == min(history, key=lambda r: r["loss"])
    # The saved weights are that evaluation's: the saved model, loaded afresh, scores its loss and accuracy.
    again = evaluation.evaluate(outcome.output, str(folder), split="validation")
    assert again["loss"] == pytest.approx(best["loss"], abs=1e-5) and again["accuracy"] == best["accuracy"]
    assert outcome.metrics["validation"]["loss"] == pytest.approx(best["loss"], abs=1e-6)
    chosen = quiet_train(tiny_models, folder, tmp_path, "by-acc", epochs=4, lr=5e-3, metric="accuracy")
    history = chosen.metrics["history"]
    assert chosen.metrics["best"] == next(r for r in history if r["accuracy"] == max(h["accuracy"] for h in history))
    again = evaluation.evaluate(chosen.output, str(folder), split="validation")
    assert again["accuracy"] == chosen.metrics["best"]["accuracy"]
    assert again["loss"] == pytest.approx(chosen.metrics["best"]["loss"], abs=1e-5)


def test_grad_accumulation_counts_optimizer_steps(tiny_models, topic_dir, tmp_path):
    plain = quiet_train(tiny_models, topic_dir, tmp_path, "a1", epochs=1)
    accum = quiet_train(
        tiny_models,
        topic_dir,
        tmp_path,
        "a2",
        epochs=1,
        grad_accum=4,
        scheduler="cosine",
        class_weights=True,
        use_rslora=True,
    )
    assert accum.metrics["train"]["steps"] == -(-plain.metrics["train"]["steps"] // 4)


def test_dora_trains_and_reloads(tiny_models, topic_dir, tmp_path):
    import adaptext

    outcome = quiet_train(tiny_models, topic_dir, tmp_path, "dora", epochs=1, use_dora=True, layers=[1])
    again = adaptext.evaluate(outcome.output, str(topic_dir), split="test")
    assert again["accuracy"] == outcome.metrics["test"]["accuracy"]


def test_warns_when_validation_ends_at_the_majority_class_rate():
    from adaptext.config import TrainConfig

    lines = []
    stuck = {"accuracy": 0.5}
    policy.warn_if_nothing_learned(stuck, [0, 0, 1, 1], TrainConfig(lr=2e-3), lines.append)
    assert len(lines) == 1 and "no better than always answering the most common class (0.500)" in lines[0]
    assert "--lr (now 0.002)" in lines[0]
    policy.warn_if_nothing_learned({"accuracy": 0.8}, [0, 0, 1, 1], TrainConfig(), lines.append)
    assert len(lines) == 1
