"""--long-text sliding: how windows are cut, how their logits pool, and that every scoring path agrees
(training-time metrics, evaluate, predict, the CLI, ONNX, serve) on tiny encoders and decoders."""

from __future__ import annotations

import concurrent.futures
import json
import random
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import adaptext
from adaptext import api, config, models, options
from adaptext.batching import special_token_split, tokenize
from adaptext.cli import build_parser
from adaptext.errors import AdaptextError
from adaptext.export import export_onnx
from adaptext.serve.registry import Registry
from adaptext.windows import TextRows, Windowing, pool_windows, split_windows
from conftest import TOPICS, assert_labels_agree, assert_metrics_reproduced, assert_probs_close, run_cli
from test_cli import assert_clean_failure
from test_serve import Server

MAX_LENGTH, STRIDE = 16, 4
LONG_TEXT = " ".join(["goal match team coach"] * 30 + ["market price bank"] * 20)  # ~200 tokens: many windows
TEXTS = [LONG_TEXT, "planet rocket", "", "profit " * 40 + "comet orbit"]


def long_rows(n_per_class: int, seed: int) -> list[dict[str, str]]:
    """Texts of 10-50 topic words (and fillers): most run over one 16-token window."""
    rng = random.Random(seed)
    rows = [
        {"text": " ".join(rng.choice([*words, "the", "and", "of"]) for _ in range(rng.randint(10, 50))), "label": label}
        for label, words in TOPICS.items()
        for _ in range(n_per_class)
    ]
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long-topics")
    pd.DataFrame(long_rows(15, seed=1)).to_csv(folder / "train.csv", index=False)
    pd.DataFrame(long_rows(5, seed=2)).to_csv(folder / "test.csv", index=False)
    return folder


def train_tiny(model_dir, data_dir, output, **kw):
    settings = dict(data=str(data_dir), model=str(model_dir), output=str(output), epochs=2, batch_size=8,
                    max_length=MAX_LENGTH, lr=2e-2, seed=3, long_text="sliding", stride=STRIDE)  # fmt: skip
    settings.update(kw)
    return api.train(progress=False, echo=lambda line: None, **settings)


# Three architectures: an encoder with [CLS] ... [SEP] (on top-layer LoRA, so over the feature cache),
# GPT-2 (no special tokens, last-token pooling, EOS as right padding), Llama (<s> only), mean and max pooling.
SETTINGS = {
    "bert": dict(top_layers=1),
    "gpt2": dict(window_pool="max"),
    "llama": dict(max_windows=3),
}


@pytest.fixture(scope="module")
def trained(tiny_models, long_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sliding")
    out = {arch: train_tiny(tiny_models[arch], long_dir, root / arch, **kw) for arch, kw in SETTINGS.items()}
    out["bert-truncate"] = train_tiny(tiny_models["bert"], long_dir, root / "bert-truncate", long_text="truncate",
                                      stride=None)  # fmt: skip
    out["bert-ia3"] = train_tiny(tiny_models["bert"], long_dir, root / "bert-ia3", method="ia3", window_pool="max")
    return out


def tokenizer_of(model_dir):
    return models.load_tokenizer(models.resolve_model(str(model_dir)))


# ---------------------------------------------------------------- cutting and pooling


@pytest.mark.parametrize("before,after", [(1, 1), (0, 0), (1, 0)])
@pytest.mark.parametrize("length,budget,stride", [(37, 10, 3), (100, 14, 0), (15, 14, 7), (200, 30, 29)])
def test_windows_cover_every_token_with_the_stride_and_the_special_tokens(before, after, length, budget, stride):
    body = list(range(1000, 1000 + length))  # distinct ids: where a window starts is where its first id sits
    seq = [1] * before + body + [2] * after
    windows = split_windows(seq, before, after, budget, stride)
    starts = []
    for window in windows:
        assert len(window) == before + budget + after
        assert window[:before] == [1] * before and window[len(window) - after :] == [2] * after
        inner = window[before : len(window) - after]
        starts.append(inner[0] - 1000)
        assert inner == body[starts[-1] : starts[-1] + budget]
    assert starts[0] == 0 and starts[-1] == length - budget  # first and last tokens covered
    steps = np.diff(starts).tolist()
    assert all(step == budget - stride for step in steps[:-1])  # consecutive windows share exactly `stride`
    assert 0 < steps[-1] <= budget - stride  # the last one is flush with the end, sharing at least `stride`
    assert set().union(*(range(s, s + budget) for s in starts)) == set(range(length))


def test_a_text_that_fits_is_one_window_equal_to_itself():
    seq = [1, 5, 6, 7, 2]
    assert split_windows(seq, 1, 1, 3, 1) == [seq]
    assert split_windows(seq, 1, 1, 10, 9) == [seq]


def test_max_windows_spreads_them_from_first_to_last():
    seq = list(range(1000, 1100))
    every = split_windows(seq, 0, 0, 10, 0)
    assert len(every) == 10
    assert split_windows(seq, 0, 0, 10, 0, max_windows=3) == [every[0], every[4], every[9]]  # round(4.5) -> 4
    assert split_windows(seq, 0, 0, 10, 0, max_windows=1) == [seq[:10]]  # the first: what truncation keeps
    assert split_windows(seq, 0, 0, 10, 0, max_windows=50) == every


@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2", "llama"])
def test_real_tokenizers_put_their_special_tokens_in_every_window(tiny_models, arch):
    tokenizer = tokenizer_of(tiny_models[arch])
    before, after = special_token_split(tokenizer)
    windowing = Windowing(MAX_LENGTH, "sliding", STRIDE)
    rows = windowing.encode(tokenizer, TEXTS)
    assert rows.num_texts == len(TEXTS) and rows.text_index == sorted(rows.text_index)
    full = tokenizer(LONG_TEXT)["input_ids"]
    long_rows_ = [ids for ids, i in zip(rows.ids, rows.text_index) if i == 0]
    budget = MAX_LENGTH - before - after
    assert len(long_rows_) == 1 + -(-(len(full) - before - after - budget) // (budget - STRIDE))
    for window in long_rows_:
        assert len(window) == MAX_LENGTH
        assert window[:before] == full[:before] and window[MAX_LENGTH - after :] == full[len(full) - after :]
    body = full[before : len(full) - after]
    assert long_rows_[0][before : MAX_LENGTH - after] == body[:budget]
    assert long_rows_[-1][before : MAX_LENGTH - after] == body[-budget:]
    # Texts that fit: one window each, exactly the truncated encoding (the empty text included).
    short = TEXTS[1:3]
    assert windowing.encode(tokenizer, short).ids == tokenize(tokenizer, short, MAX_LENGTH, "truncate")
    # One window at most: sliding is truncation.
    capped = Windowing(MAX_LENGTH, "sliding", STRIDE, max_windows=1).encode(tokenizer, TEXTS)
    assert capped.ids == tokenize(tokenizer, TEXTS, MAX_LENGTH, "truncate")


def test_pooling_is_the_mean_or_max_of_each_texts_windows():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(9, 3)).astype(np.float32)
    index = [0, 0, 0, 1, 2, 2, 3, 3, 3]
    for how, reduce in (("mean", np.mean), ("max", np.max)):
        pooled = pool_windows(logits, index, 4, how)
        expected = np.stack([reduce(logits[np.array(index) == t], axis=0) for t in range(4)])
        np.testing.assert_allclose(pooled, expected, rtol=1e-6)
    rows = TextRows([[1]] * 3, [0, 1, 2], 3)  # without windows, rows are texts: nothing to pool
    np.testing.assert_array_equal(Windowing(MAX_LENGTH, "head+tail").pool_logits(logits[:3], rows), logits[:3])


def test_models_saved_before_the_options_read_as_before():
    saved = options.saved_config  # how a saved model's adaptext.json config is read
    assert Windowing.from_config(saved({"max_length": 64})) == Windowing(64, "truncate", 16, "mean", 0)
    assert not Windowing.from_config(saved({"max_length": 64, "long_text": "head+tail"})).sliding
    cfg = config.TrainConfig(max_length=128, long_text="sliding")
    assert Windowing.from_config(cfg).stride == 32  # default: a quarter of the window
    assert Windowing.from_config(saved(cfg.to_dict())) == Windowing.from_config(cfg)


# ---------------------------------------------------------------- trained models


@pytest.mark.parity
@pytest.mark.parametrize("arch", list(SETTINGS))
def test_reload_reproduces_training_time_test_metrics_per_text(trained, long_dir, arch, precision):
    outcome = trained[arch]
    n_test = len(pd.read_csv(long_dir / "test.csv"))
    assert outcome.metrics["test"]["n"] == n_test  # metrics on texts, not on windows
    assert outcome.metrics["train"]["rows"] > len(pd.read_csv(long_dir / "train.csv"))  # every window trains
    saved = json.loads((outcome.output / "adaptext.json").read_text())["config"]
    assert saved["long_text"] == "sliding" and saved["stride"] == STRIDE
    again = adaptext.evaluate(outcome.output, str(long_dir), split="test")
    logits = adaptext.load(outcome.output).logits(pd.read_csv(long_dir / "test.csv")["text"].tolist())
    assert again["precision"] == precision
    assert_metrics_reproduced(again, outcome.metrics["test"], logits)
    if arch == "bert":  # LoRA on the top layer only: the layer below ran once over the windows, cached
        assert outcome.metrics["train"]["cached_layers"] == 1


@pytest.mark.parametrize("arch", list(SETTINGS))
def test_text_logits_are_its_windows_logits_pooled_by_hand(trained, arch):
    clf = adaptext.load(trained[arch].output, precision="fp32")
    windowing = clf.loaded.windowing
    assert windowing.sliding and windowing.window_pool == SETTINGS[arch].get("window_pool", "mean")
    rows = windowing.encode(clf.loaded.tokenizer, TEXTS)
    with torch.no_grad():  # every window alone: no padding, no batching
        by_window = np.stack([clf.loaded.model(input_ids=torch.tensor([ids])).logits[0].numpy() for ids in rows.ids])
    index = np.array(rows.text_index)
    reduce = np.max if windowing.window_pool == "max" else np.mean
    expected = np.stack([reduce(by_window[index == t], axis=0) for t in range(len(TEXTS))])
    windows_of_long_text = int((index == 0).sum())
    assert windows_of_long_text == 3 if arch == "llama" else windows_of_long_text > 10  # llama: --max-windows 3
    np.testing.assert_allclose(clf.logits(TEXTS), expected, atol=1e-5)


@pytest.mark.parity
@pytest.mark.parametrize("arch", list(SETTINGS))
def test_predict_onnx_and_serve_agree_on_long_texts(trained, long_dir, arch):
    folder = trained[arch].output
    export_onnx(folder)
    torch_clf = adaptext.load(folder, precision="fp32")
    onnx_clf = adaptext.load(folder, backend="onnx")
    expected = torch_clf.predict_proba(TEXTS)
    np.testing.assert_allclose(onnx_clf.predict_proba(TEXTS), expected, atol=1e-5)  # ONNX runs fp32
    on_onnx = adaptext.evaluate(folder, str(long_dir), split="test", backend="onnx")
    assert on_onnx["precision"] == "fp32"
    # ONNX (fp32) against training-time metrics, which were computed in the run's precision.
    test_logits = torch_clf.logits(pd.read_csv(long_dir / "test.csv")["text"].tolist())
    on_torch = adaptext.evaluate(folder, str(long_dir), split="test")
    assert_metrics_reproduced(
        {**on_onnx, "precision": on_torch["precision"]}, trained[arch].metrics["test"], test_logits
    )
    registry = Registry([folder.parent])
    registry.load(folder.name)
    # serve in the run's precision against torch in fp32
    assert_probs_close(registry.probabilities([(folder.name, TEXTS)])[0], expected, torch_clf.logits(TEXTS))


@pytest.mark.parity
def test_cli_evaluate_and_predict_use_the_saved_windows(trained, long_dir):
    folder = trained["gpt2"].output
    evaluated = run_cli("evaluate", "--model", str(folder), "--data", str(long_dir), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    test_logits = adaptext.load(folder).logits(pd.read_csv(long_dir / "test.csv")["text"].tolist())
    assert_metrics_reproduced(json.loads(evaluated.stdout), trained["gpt2"].metrics["test"], test_logits)
    predicted = run_cli("predict", "--model", str(folder), "--json", LONG_TEXT, "planet rocket")
    assert predicted.returncode == 0, predicted.stderr
    clf = adaptext.load(folder)
    expected = clf.predict([LONG_TEXT, "planet rocket"])
    rows = [json.loads(line) for line in predicted.stdout.splitlines()]
    # A fresh process, the same precision and batches: the same numbers.
    assert_labels_agree(
        [r["label"] for r in rows], [e["label"] for e in expected], clf.logits([LONG_TEXT, "planet rocket"])
    )
    for row, exp in zip(rows, expected):
        assert row["score"] == pytest.approx(exp["score"], abs=1e-5)


@pytest.mark.parity
def test_serve_pools_window_rows_of_many_adapters_sharing_batches(trained):
    root = trained["bert"].output.parent
    names = ["bert", "bert-truncate", "bert-ia3", "gpt2", "llama"]
    registry = Registry([root])
    for name in names:
        registry.load(name)
    bert_base = registry.get("bert").runner
    assert registry.get("bert-truncate").runner is bert_base  # sliding and truncating adapters share one base
    rng = random.Random(0)
    requests = [(rng.choice(names), rng.sample(TEXTS, rng.randint(1, 4))) for _ in range(20)]
    refs = {name: dict(zip(TEXTS, adaptext.load(root / name).predict_proba(TEXTS))) for name in names}
    ref_logits = {name: adaptext.load(root / name).logits(TEXTS) for name in names}
    for (name, texts), probs in zip(requests, registry.probabilities(requests)):
        assert probs.shape == (len(texts), 3)
        assert_probs_close(probs, np.stack([refs[name][t] for t in texts]), ref_logits[name], err_msg=name)
    assert registry.get("bert").describe()["long_text"] == "sliding"


def histogram(server, name: str) -> tuple[dict[float, float], float, float]:
    """A Prometheus histogram from the server's /metrics: cumulative count per bucket bound, count, sum."""
    text = server.get("/metrics", token=None)[1]
    buckets = {
        float(bound): float(value) for bound, value in re.findall(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.M)
    }
    count = float(re.search(rf"^{name}_count (\S+)$", text, re.M).group(1))
    total = float(re.search(rf"^{name}_sum (\S+)$", text, re.M).group(1))
    return buckets, count, total


@pytest.mark.parity
def test_serve_cuts_long_requests_into_pieces_of_max_batch_rows_and_still_matches_predict(trained):
    """--max-batch-rows counts windows: a request of many windows runs in pieces of at most that many rows (seen in
    the server's own histograms of rows per micro-batch and per forward pass), each text pooled over all its
    windows across pieces; short concurrent requests still share micro-batches."""
    root = trained["bert"].output.parent
    limit = 8
    srv = Server(
        ["--adapters", str(root / "bert"), str(root / "bert-ia3"), "--max-batch-rows", str(limit),
         "--max-wait-ms", "50"],  # --batch-size stays 64: only the row limit keeps passes at 8 rows
        env={"ADAPTEXT_SERVE_TOKEN": ""},
    )  # fmt: skip
    try:
        texts = [LONG_TEXT, "planet rocket", "profit " * 40 + "comet orbit", "planet rocket orbit " * 40]
        rows = 0
        for name in ("bert", "bert-ia3"):  # a shared-base LoRA (mean pooling) and a standalone IA3 (max pooling)
            clf = adaptext.load(root / name)
            windows = len(clf.loaded.windowing.encode(clf.loaded.tokenizer, texts).ids)
            assert windows > 3 * limit  # several pieces, texts straddling their boundaries
            status, body = srv.post("/v1/classify", {"adapter": name, "texts": texts})
            assert status == 200, body
            probs = [[result["probabilities"][label] for label in body["labels"]] for result in body["results"]]
            assert_probs_close(probs, clf.predict_proba(texts), clf.logits(texts), err_msg=name)
            rows += windows
        for metric in ("adaptext_batch_rows", "adaptext_forward_rows"):
            buckets, count, total = histogram(srv, metric)
            assert total == rows, metric  # every window through the model exactly once
            assert count >= rows / limit and buckets[float(limit)] == count, (metric, buckets)  # none over the limit

        short_texts = ["planet rocket", "goal match", "profit bank"]  # one window each
        expected = dict(zip(short_texts, adaptext.load(root / "bert").predict_proba(short_texts)))
        short_logits = adaptext.load(root / "bert").logits(short_texts)
        requests = short_texts * 8
        _, batches_before, _ = histogram(srv, "adaptext_batch_requests")
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda t: srv.post("/v1/classify", {"adapter": "bert", "texts": [t]}), requests))
        for text, (status, body) in zip(requests, answers):
            assert status == 200, body
            got = [body["results"][0]["probabilities"][label] for label in body["labels"]]
            assert_probs_close(got, expected[text], short_logits)
        _, batches_after, _ = histogram(srv, "adaptext_batch_requests")
        assert batches_after - batches_before < len(requests)  # some micro-batches served several requests
        buckets, count, _ = histogram(srv, "adaptext_batch_rows")
        assert buckets[float(limit)] == count
    finally:
        srv.stop()
    assert srv.proc.returncode == 0, srv.proc.stderr.read()


def test_max_batch_texts_is_an_old_name_for_max_batch_rows():
    parse = build_parser().parse_args
    assert parse(["serve", "--adapters", "x", "--max-batch-texts", "5"]).max_batch_rows == 5
    assert parse(["serve", "--adapters", "x"]).max_batch_rows == 64


def test_old_model_directories_without_window_keys_load_as_before(trained, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(trained["bert-truncate"].output, folder)
    meta = json.loads((folder / "adaptext.json").read_text())
    for key in ("long_text", "stride", "window_pool", "max_windows"):  # before the options existed
        del meta["config"][key]
    del meta["pooling"], meta["task"], meta["base_fingerprint"]  # before they were recorded
    (folder / "adaptext.json").write_text(json.dumps(meta))
    expected = adaptext.load(trained["bert-truncate"].output).logits(TEXTS)
    np.testing.assert_allclose(adaptext.load(folder).logits(TEXTS), expected, atol=1e-6)
    registry = Registry([tmp_path])
    registry.load("old")
    assert registry.probabilities([("old", TEXTS)])[0].shape == (len(TEXTS), 3)


def test_saved_settings_are_migrated_explicitly_not_defaulted():
    """An option a saved model predates reads as what models of its time did, which is not always today's
    default (--long-text became head+tail; older models truncated)."""
    from adaptext import artifacts, config

    assert config.TrainConfig().long_text == "head+tail"
    old = options.saved_config({"max_length": 64, "not_an_option_any_more": 1})
    assert (old.long_text, old.stride, old.window_pool, old.max_windows, old.max_length) == (
        "truncate",
        None,
        "mean",
        0,
        64,
    )
    assert options.saved_config({"max_length": 64, "long_text": "sliding"}).long_text == "sliding"
    meta = artifacts.migrate_meta({"method": "lora", "config": {"max_length": 64}})
    assert meta["pooling"] == "native" and meta["task"] == {"kind": "single-label"} and meta["base_fingerprint"] == {}
    assert meta["config"]["long_text"] == "truncate" and "not_an_option_any_more" not in meta["config"]


# ---------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    "given,message",
    [
        (dict(stride=-1), "--stride -1: the overlap of consecutive windows must be at least 0"),
        (dict(stride=16), "less than --max-length 16"),
        (dict(window_pool="median"), "--window-pool 'median' is not one of mean, max"),
        (dict(max_windows=-2), "--max-windows must be >= 0"),
        (dict(long_text="head+tail"), "--stride applies to --long-text sliding only"),
        (dict(long_text="truncate", stride=None, window_pool="max"), "--window-pool applies to --long-text sliding"),
    ],
)
def test_bad_window_options_are_refused_at_the_edge(given, message):
    values = dict(max_length=MAX_LENGTH, long_text="sliding", stride=STRIDE)
    values.update(given)
    with pytest.raises(AdaptextError, match=re.escape(message)):
        options.validate(config.TrainConfig(**values))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--stride", "-4"], "--stride -4: the overlap"),
        (["--stride", "15"], "--stride 15 leaves no new tokens per window"),  # BERT: 14 text tokens per window
        (["--max-length", "2", "--stride", "0"], "--max-length 2 leaves no room for text"),
    ],
)
def test_bad_window_options_exit_2_with_one_line(tiny_models, long_dir, tmp_path, args, message):
    output = tmp_path / "out"
    common = ["--data", str(long_dir), "--model", str(tiny_models["bert"]), "--output", str(output), "--quiet"]
    result = run_cli("train", *common, "--long-text", "sliding", "--max-length", str(MAX_LENGTH), *args)
    assert_clean_failure(result, message)
    assert not output.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_compare_runs_saved_before_the_window_options_still_count_as_finished(tmp_path):
    from adaptext import compare

    cfg = config.TrainConfig(output=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    saved = {k: v for k, v in cfg.to_dict().items() if k not in config.WINDOW_DEFAULTS}
    (tmp_path / "run" / "adaptext.json").write_text(json.dumps({"config": saved}))
    (tmp_path / "run" / "metrics.json").write_text("{}")
    assert compare.finished(cfg)
    assert not compare.finished(config.TrainConfig(output=str(tmp_path / "run"), long_text="sliding"))
