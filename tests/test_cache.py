"""Frozen-prefix feature cache: cached == uncached (logits, training), where it engages, and its errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import adaptext
from adaptext import api, cache, models
from adaptext.batching import predict_logits, tokenize
from adaptext.config import TrainConfig
from adaptext.train import train_loop
from conftest import run_cli, topic_rows

NAMES = ["money", "space", "sports"]
CACHED_ARCHS = ["bert", "roberta", "distilbert", "mpnet", "deberta-v2", "modernbert", "llama"]


def _setup(model_dir, method="lora", top_layers=1, n_per_class=12, no_dropout=False):
    source = models.resolve_model(str(model_dir))
    tokenizer = models.load_tokenizer(source)
    model, head = models.load_classifier(source, 3, dict(enumerate(NAMES)), tokenizer.pad_token_id)
    cfg = TrainConfig(method=method, top_layers=top_layers, epochs=2, batch_size=8, max_length=32, lr=1e-2,
                      log_every=1000, seed=3)  # fmt: skip
    model, _ = models.prepare(model, cfg, head, total_steps=10)
    if no_dropout:  # dropout is the one thing the cached layers skip: without it, both paths are one computation
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    rows = topic_rows(n_per_class, seed=4)
    ids = tokenize(tokenizer, [r["text"] + " extra words" * (i % 5) for i, r in enumerate(rows)], 32)
    labels = [NAMES.index(r["label"]) for r in rows]
    return model, cfg, ids, labels, tokenizer.pad_token_id


@pytest.mark.parametrize("arch", CACHED_ARCHS)
@pytest.mark.parametrize("method,top", [("lora", 1), ("head", None), ("full", 1)])
def test_cached_logits_equal_full_model(tiny_models, arch, method, top):
    model, cfg, ids, _, pad = _setup(tiny_models[arch], method, top)
    features, note = cache.plan(model, method, "auto")
    assert features is not None, note
    assert features.depth == (2 if method == "head" else 1)
    expected = predict_logits(model, ids, pad, 8, "fp32", torch.device("cpu"))
    features.build(model, "x", ids, pad, 5, "fp32")  # other batches than the check: widths must not matter
    with features.attached():
        got = predict_logits(
            model, ids, pad, 8, "fp32", torch.device("cpu"), lambda b, w: features.feed("x", b, w, "cpu")
        )
    np.testing.assert_allclose(got, expected, atol=2e-5)
    # the stand-ins are gone again: the model computes the same logits on its own
    np.testing.assert_allclose(predict_logits(model, ids, pad, 8, "fp32", torch.device("cpu")), expected, atol=1e-6)


@pytest.mark.parametrize("arch,method", [("bert", "lora"), ("bert", "head"), ("roberta", "full"), ("llama", "lora")])
def test_training_on_cached_features_equals_training_the_full_model(tiny_models, arch, method):
    model, cfg, ids, labels, pad = _setup(tiny_models[arch], method, 1 if method != "head" else None, no_dropout=True)
    twin = copy.deepcopy(model)
    features, _ = cache.plan(model, method, "auto")
    cached = train_loop(model, ids, labels, ids[:9], labels[:9], NAMES, pad, cfg, progress=False, features=features)
    plain = train_loop(twin, ids, labels, ids[:9], labels[:9], NAMES, pad, cfg, progress=False)
    assert [h["loss"] for h in cached.history] == pytest.approx([h["loss"] for h in plain.history], abs=1e-5)
    mine, theirs = dict(model.named_parameters()), dict(twin.named_parameters())
    trained = [n for n, p in mine.items() if p.requires_grad]
    assert trained
    for name in trained:
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-5, rtol=1e-4)


def test_memory_mapped_cache_gives_the_same_logits(tiny_models, monkeypatch):
    monkeypatch.setenv("ADAPTEXT_CACHE_MEMORY_MB", "0")
    model, cfg, ids, _, pad = _setup(tiny_models["bert"], "head", None)
    features, _ = cache.plan(model, "head", "auto")
    expected = predict_logits(model, ids, pad, 8, "fp32", torch.device("cpu"))
    features.build(model, "x", ids, pad, 8, "fp32")
    assert features.memory_mapped
    folder = features._tmp.name
    with features.attached():
        got = predict_logits(
            model, ids, pad, 8, "fp32", torch.device("cpu"), lambda b, w: features.feed("x", b, w, "cpu")
        )
    np.testing.assert_allclose(got, expected, atol=2e-5)
    features.close()
    assert not __import__("os").path.exists(folder), "the memory-mapped file must be removed"


@pytest.mark.parametrize(
    "arch,method,top,reason",
    [
        ("gpt2", "head", None, "no separate embeddings"),
        ("bert", "lora", 0, "lowest layer trains"),
        ("bert", "bitfit", None, "lowest layer trains"),
        ("bert", "prompt", None, "virtual tokens"),
    ],
)
def test_cache_stays_off_where_it_cannot_help(tiny_models, arch, method, top, reason):
    model, *_ = _setup(tiny_models[arch], method, top)
    features, note = cache.plan(model, method, "auto")
    assert features is None and reason in note
    model, *_ = _setup(tiny_models["bert"], "head", None)
    assert cache.plan(model, "head", "off") == (None, "off (--feature-cache off)")


def test_top_layers_trains_only_the_top_and_round_trips(tiny_models, topic_dir, tmp_path):
    lines = []
    outcome = api.train(data=str(topic_dir), model=str(tiny_models["bert"]), output=str(tmp_path / "out"),
                        top_layers=1, epochs=2, batch_size=8, max_length=32, lr=1e-2, seed=5, progress=False,
                        echo=lines.append)  # fmt: skip
    assert any(line.startswith("feature cache: layers 0-0 of 2 run once") for line in lines), lines
    assert "run once" in outcome.metrics["train"]["feature_cache"]
    lora_names = [n for n in outcome.meta["params"] and adaptext.load(outcome.output).loaded.model.state_dict()]
    assert lora_names  # loads
    again = adaptext.evaluate(outcome.output, str(topic_dir), split="test")
    assert again["accuracy"] == outcome.metrics["test"]["accuracy"]
    assert again["loss"] == pytest.approx(outcome.metrics["test"]["loss"], abs=1e-4)
    adapter_config = (outcome.output / "adapter_config.json").read_text()
    assert '"layers_to_transform": [\n    1\n  ]' in adapter_config or '"layers_to_transform": [1]' in adapter_config


@pytest.mark.parametrize(
    "args,message",
    [
        (["--top-layers", "5"], "--top-layers 5 but the model has 2 layers"),
        (["--top-layers", "1", "--layers", "0"], "pass only one of them"),
        (["--top-layers", "1", "--method", "ia3"], "--top-layers does not apply to --method ia3"),
        (["--top-layers", "-1"], "--top-layers must be >= 0"),
        (["--feature-cache", "always"], "--feature-cache 'always' is not one of auto, off"),
    ],
)
def test_bad_cache_options_fail_cleanly(tiny_models, topic_dir, tmp_path, args, message):
    out = tmp_path / "out"
    result = run_cli("train", "--data", str(topic_dir), "--model", str(tiny_models["bert"]), "--output", str(out),
                     "--epochs", "1", *args)  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()
