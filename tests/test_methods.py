"""Every training method on tiny models: it attaches, every trainable tensor learns, it saves and reloads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import adaptext
from adaptext import api, models
from adaptext.batching import tokenize
from adaptext.config import METHODS, TrainConfig
from adaptext.errors import AdaptextError
from adaptext.train import train_loop
from conftest import assert_logits_close, assert_metrics_reproduced, run_cli, topic_rows

# prefix tuning needs a model that takes past_key_values; none of the transformers 5 classifiers here do.
WORKING = [m for m in METHODS if m != "prefix"]
# Architectures whose head is a composite module (RoBERTa, DeBERTa pooler) or whose config names differ
# (DistilBERT's `dim`) or whose weights are Conv1D (GPT-2) break peft in different places: cover them.
EXTRA = [
    ("roberta", "ia3"), ("roberta", "loha"), ("roberta", "lokr"), ("deberta-v2", "ia3"),
    ("distilbert", "prompt"), ("distilbert", "ptuning"), ("gpt2", "ia3"), ("gpt2", "vera"),
    ("gpt2", "adalora"), ("gpt2", "bitfit"), ("llama", "ia3"),
]  # fmt: skip
TEXTS = ["goal match team coach", "market price bank", "planet rocket orbit star moon", "league"]


def _model_and_data(model_dir, method):
    source = models.resolve_model(str(model_dir))
    tokenizer = models.load_tokenizer(source)
    model, head = models.load_classifier(source, 3, {0: "money", 1: "space", 2: "sports"}, tokenizer.pad_token_id)
    cfg = TrainConfig(method=method, epochs=1, batch_size=8, max_length=32, lr=1e-2, log_every=1000)
    model, _ = models.prepare(model, cfg, head, total_steps=8)
    rows = topic_rows(20, seed=3)
    names = ["money", "space", "sports"]
    ids = tokenize(tokenizer, [r["text"] for r in rows], 32)
    labels = [names.index(r["label"]) for r in rows]
    return model, cfg, ids, labels, names, tokenizer.pad_token_id


@pytest.mark.parametrize("arch,method", [("bert", m) for m in WORKING] + EXTRA)
def test_every_trainable_tensor_learns(tiny_models, arch, method):
    model, cfg, ids, labels, names, pad = _model_and_data(tiny_models[arch], method)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before, "nothing to train"
    train_loop(model, ids, labels, ids[:12], labels[:12], names, pad, cfg, progress=False)
    after = dict(model.named_parameters())
    unchanged = [n for n, v in before.items() if torch.equal(v, after[n].detach())]
    # AdaLoRA's rank mask (lora_E) may legitimately be pruned back to its start; everything else must move.
    unchanged = [n for n in unchanged if not (method == "adalora" and "lora_E" in n)]
    assert not unchanged, f"{method} did not update: {unchanged[:5]}"
    if method not in ("head", "full"):
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert frozen, "a parameter-efficient method must leave the base frozen"


@pytest.mark.parity
@pytest.mark.parametrize("arch,method", [("bert", m) for m in WORKING] + EXTRA)
def test_saves_and_reloads_with_identical_predictions(tiny_models, topic_dir, tmp_path, arch, method):
    outcome = api.train(
        data=str(topic_dir), model=str(tiny_models[arch]), output=str(tmp_path / "out"), method=method,
        epochs=1, batch_size=8, max_length=32, lr=1e-2, seed=5, progress=False, echo=lambda line: None,
    )  # fmt: skip
    assert outcome.meta["method"] == method
    again = adaptext.evaluate(outcome.output, str(topic_dir), split="test")
    clf = adaptext.load(outcome.output)
    assert_metrics_reproduced(
        again, outcome.metrics["test"], clf.logits(pd.read_csv(topic_dir / "test.csv")["text"].tolist())
    )
    one_by_one = np.stack([clf.logits([t])[0] for t in TEXTS])
    assert_logits_close(clf.logits(TEXTS), one_by_one, fp32=1e-5)  # padding changes nothing (beyond rounding)
    weights = {p.name for p in outcome.output.iterdir() if p.suffix == ".safetensors"}
    assert weights and not any(p.suffix in (".bin", ".pt") for p in outcome.output.iterdir())


def test_zero_epochs_scores_the_untrained_model(tiny_models, topic_dir, tmp_path):
    outcome = api.train(
        data=str(topic_dir), model=str(tiny_models["bert"]), output=str(tmp_path / "zero"), method="head",
        epochs=0, max_length=32, progress=False, echo=lambda line: None,
    )  # fmt: skip
    assert outcome.metrics["train"]["steps"] == 0 and outcome.metrics["history"] == []
    again = adaptext.evaluate(outcome.output, str(topic_dir), split="test")
    assert again["accuracy"] == outcome.metrics["test"]["accuracy"]


@pytest.mark.parametrize(
    "arch,method,message",
    [
        ("bert", "prefix", "prefix could not be attached"),
        ("gpt2", "prompt", "does not work with decoder classifiers"),
        ("gpt2", "loha", "loha could not be attached"),
    ],
)
def test_unsupported_combinations_fail_clearly(tiny_models, topic_dir, tmp_path, arch, method, message):
    out = tmp_path / "out"
    result = run_cli("train", "--data", str(topic_dir), "--model", str(tiny_models[arch]), "--method", method,
                     "--output", str(out), "--quiet", "--max-length", "32")  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1] and "Traceback" not in result.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_ia3_refuses_layers(tiny_models):
    source = models.resolve_model(str(tiny_models["bert"]))
    model, head = models.load_classifier(source, 3, {0: "a", 1: "b", 2: "c"}, 0)
    with pytest.raises(AdaptextError, match="--layers is not supported by ia3"):
        models.prepare(model, TrainConfig(method="ia3", layers=[0]), head)
