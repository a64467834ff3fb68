"""Training data at scale: flat token rows, the on-disk token cache, Arrow-held texts and --max-steps
(issue #19, item 5), on tiny random models and real files."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest

from adaptext import api, config, data, models, options, readers, token_store
from adaptext.errors import AdaptextError
from adaptext.train_state import planned_epochs, planned_steps
from adaptext.windows import Windowing
from conftest import TOPICS, run_cli, topic_rows

TEXTS = [
    " ".join(random.Random(i).choice([*TOPICS["sports"], "the", "of"]) for _ in range(random.Random(i).randint(1, 60)))
    for i in range(300)
] + ["", "planet"]


def windowings() -> list[Windowing]:
    return [
        Windowing(16),
        Windowing(16, "head+tail"),
        Windowing(16, "sliding", stride=4),
        Windowing(16, "sliding", stride=4, window_pool="max", max_windows=2),
    ]


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTEXT_TOKEN_CACHE", str(tmp_path / "tokens"))
    return tmp_path / "tokens"


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("windowing", windowings(), ids=lambda w: f"{w.long_text}-{w.max_windows}")
@pytest.mark.parametrize("cache", ["off", "on"])
def test_flat_rows_equal_the_list_encoding(tiny_models, arch, windowing, cache):
    tokenizer = models.load_tokenizer(models.resolve_model(str(tiny_models[arch])))
    expected = windowing.encode(tokenizer, TEXTS)
    for _ in range(2):  # with the cache on: built, then read back
        rows = token_store.encode(windowing, tokenizer, TEXTS, cache)
        assert isinstance(rows.ids, token_store.TokenRows)
        assert list(rows.ids) == expected.ids
        assert [rows.ids[i] for i in range(len(rows.ids))] == expected.ids
        assert rows.ids[-1] == expected.ids[-1] and rows.ids[1:3] == expected.ids[1:3]
        assert rows.ids.lengths.tolist() == [len(x) for x in expected.ids]
        assert list(rows.text_index) == list(expected.text_index) and rows.num_texts == len(TEXTS)
        assert rows.per_row(list(range(len(TEXTS)))) == expected.per_row(list(range(len(TEXTS))))


def test_a_second_encoding_reads_the_cache_and_any_change_makes_a_new_entry(tiny_models, token_cache):
    tokenizer = models.load_tokenizer(models.resolve_model(str(tiny_models["bert"])))
    lines: list[str] = []
    first = token_store.encode(Windowing(16), tokenizer, TEXTS, "on", lines.append, "train texts")
    again = token_store.encode(Windowing(16), tokenizer, TEXTS, "on", lines.append, "train texts")
    assert "302 train texts tokenised in" in lines[0] and "tokenisation skipped" not in lines[0]
    assert lines[1].startswith("tokens: 302 train texts read from the token cache") and "skipped" in lines[1]
    assert isinstance(again.ids.flat, np.memmap) and list(again.ids) == list(first.ids)
    entries = {p.name for p in token_cache.iterdir()}
    assert len(entries) == 1
    meta = json.loads((token_cache / entries.pop() / "meta.json").read_text())
    assert meta["texts"] == 302 and meta["dtype"] == "uint16" and meta["windowing"]["max_length"] == 16
    # Another length, mode, text order, text or tokenizer: other entries.
    token_store.encode(Windowing(24), tokenizer, TEXTS, "on")
    token_store.encode(Windowing(16, "head+tail"), tokenizer, TEXTS, "on")
    token_store.encode(Windowing(16), tokenizer, TEXTS[::-1], "on")
    token_store.encode(Windowing(16), tokenizer, [*TEXTS[:-1], "planet!"], "on")
    token_store.encode(
        Windowing(16), models.load_tokenizer(models.resolve_model(str(tiny_models["roberta"]))), TEXTS, "on"
    )
    assert len(list(token_cache.iterdir())) == 6
    assert not [p for p in token_cache.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_auto_caches_large_splits_only_and_off_never(tiny_models, token_cache, monkeypatch):
    tokenizer = models.load_tokenizer(models.resolve_model(str(tiny_models["bert"])))
    token_store.encode(Windowing(16), tokenizer, TEXTS, "auto")
    token_store.encode(Windowing(16), tokenizer, TEXTS, "off")
    assert not token_cache.exists()
    monkeypatch.setattr(token_store, "CACHE_MIN_TEXTS", 300)
    token_store.encode(Windowing(16), tokenizer, TEXTS, "auto")
    assert len(list(token_cache.iterdir())) == 1


def test_a_damaged_or_unfinished_entry_is_rebuilt(tiny_models, token_cache):
    tokenizer = models.load_tokenizer(models.resolve_model(str(tiny_models["bert"])))
    expected = list(token_store.encode(Windowing(16), tokenizer, TEXTS, "off").ids)
    token_store.encode(Windowing(16), tokenizer, TEXTS, "on")
    (entry,) = token_cache.iterdir()
    ids = entry / "ids.bin"
    ids.write_bytes(ids.read_bytes()[:-6])  # a torn write
    lines: list[str] = []
    rows = token_store.encode(Windowing(16), tokenizer, TEXTS, "on", lines.append)
    assert "tokenised" in lines[0] and list(rows.ids) == expected
    (entry / "meta.json").unlink()  # killed before the entry was complete
    rows = token_store.encode(Windowing(16), tokenizer, TEXTS, "on", lines.append)
    assert "tokenised" in lines[1] and list(rows.ids) == expected


def big_table(tmp_path, n_per_class: int, blank_at: int | None = None):
    rows = topic_rows(n_per_class, seed=4)
    if blank_at is not None:
        rows[blank_at]["text"] = "   "
    path = tmp_path / "train.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_large_text_columns_stay_in_arrow_with_the_same_splits(tmp_path, monkeypatch):
    path = big_table(tmp_path, 200)
    cfg = options.validate(config.TrainConfig(data=str(path), train_size=450, eval_size=60))
    as_lists = data.load_training_data(cfg)
    monkeypatch.setattr(readers, "ARROW_TEXTS_MIN_ROWS", 100)
    as_arrow = data.load_training_data(cfg)
    for name, split in as_arrow.splits.items():
        assert isinstance(split.texts, readers.ArrowTexts), name
        assert isinstance(as_lists.splits[name].texts, list), name
        assert list(split.texts) == as_lists.splits[name].texts and split.labels == as_lists.splits[name].labels
    texts = as_arrow.splits["train"].texts
    assert texts[3] == as_lists.splits["train"].texts[3] and list(texts[5:9]) == as_lists.splits["train"].texts[5:9]
    assert list(texts.take([4, 0])) == [texts[4], texts[0]]


def test_arrow_texts_refuse_blank_and_huge_rows_like_lists(tmp_path, monkeypatch):
    path = big_table(tmp_path, 100, blank_at=137)
    cfg = options.validate(config.TrainConfig(data=str(path)))
    with pytest.raises(AdaptextError) as as_lists:
        data.load_training_data(cfg)
    monkeypatch.setattr(readers, "ARROW_TEXTS_MIN_ROWS", 100)
    with pytest.raises(AdaptextError) as as_arrow:
        data.load_training_data(cfg)
    assert str(as_arrow.value) == str(as_lists.value) and "first at row 137" in str(as_arrow.value)
    monkeypatch.setattr(readers, "MAX_TEXT_CHARS", 40)
    path = big_table(tmp_path, 100)
    with pytest.raises(AdaptextError, match=r"characters long \(limit 40\)"):
        data.load_training_data(cfg)


@pytest.mark.parametrize(
    ("rows", "max_steps", "epochs", "batches"),
    [(160, 3, 0.3, 3), (160, 25, 2.5, 25), (16, 7, 7, 7)],  # under an epoch, over two, one batch an epoch
)
def test_max_steps_plans_exactly_that_many_steps_whatever_the_epochs(rows, max_steps, epochs, batches):
    cfg = options.validate(config.TrainConfig(max_steps=max_steps, epochs=3, min_steps=100, batch_size=16))
    assert planned_epochs(rows, cfg) == pytest.approx(epochs)
    assert planned_steps(rows, cfg) == (-(-rows // 16), batches, max_steps)


def test_max_steps_is_checked_at_the_edge():
    with pytest.raises(AdaptextError, match="--max-steps"):
        options.validate(config.TrainConfig(max_steps=-1))
    with pytest.raises(AdaptextError, match="--token-cache 'sometimes' is not one of auto, on, off"):
        options.validate(config.TrainConfig(token_cache="sometimes"))


def test_training_reuses_the_cache_and_trains_the_same_model(tiny_models, tmp_path, token_cache, monkeypatch):
    """Two CLI runs on the same data: the second skips tokenisation and saves the same model; --max-steps
    caps the run and says so; large texts held in Arrow train exactly like lists."""
    monkeypatch.setattr(readers, "ARROW_TEXTS_MIN_ROWS", 100)
    path = big_table(tmp_path, 150)
    common = ["train", "--data", path, "--model", tiny_models["bert"], "--max-length", "32", "--seed", "5",
              "--token-cache", "on", "--max-steps", "6", "--validation-min-train", "0", "--quiet"]  # fmt: skip
    first = run_cli(*common, "--output", tmp_path / "a")
    second = run_cli(*common, "--output", tmp_path / "b")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "train texts tokenised in" in first.stdout and "tokenisation skipped" not in first.stdout
    assert "405 train texts read from the token cache" in second.stdout, second.stdout
    assert "schedule: 6 optimiser steps (--max-steps 6" in first.stdout, first.stdout
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [r["eval"]["step"] for r in log if "eval" in r] == [6]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert a["validation"] == b["validation"]
    monkeypatch.setattr(readers, "ARROW_TEXTS_MIN_ROWS", 10**9)
    lists = api.train(data=str(path), model=str(tiny_models["bert"]), max_length=32, seed=5, token_cache="off",
                      max_steps=6, validation_min_train=0, output=str(tmp_path / "c"), progress=False, echo=lambda line: None)  # fmt: skip
    assert lists.metrics["validation"] == a["validation"]
