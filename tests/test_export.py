"""ONNX export: the ONNX graph gives torch's logits for every architecture, int8 keeps the labels, the CLI
exports and predicts through ONNX Runtime, bad input fails cleanly, and MiniLM end to end."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time

import numpy as np
import pandas as pd
import pytest

import adaptext
from adaptext import api, data
from adaptext.errors import AdaptextError
from adaptext.export import PROBE_TEXTS, export_onnx
from conftest import SHARED_DATA, needs_shared_data, run_cli
from test_cli import assert_clean_failure
from tiny_models import ARCHS

# Padding in every batch, one text per batch, an empty text and one far over max_length.
TEXTS = ["goal match team coach", "market", "planet rocket orbit star moon comet galaxy", "", "goal " * 500, "bank"]


def train_tiny(model_dir, data_dir, output, **kw):
    settings = dict(data=str(data_dir), model=str(model_dir), output=str(output), epochs=1, train_size=45, batch_size=8)
    settings.update(max_length=32, lr=5e-3, seed=7, **kw)
    return api.train(progress=False, echo=lambda line: None, **settings).output


@pytest.fixture(scope="module")
def exported(tiny_models, topic_dir, tmp_path_factory):
    """Every architecture trained for an epoch (so the merged LoRA weights are not zero), exported with int8."""
    root = tmp_path_factory.mktemp("exported")
    out = {}
    for arch in ARCHS:
        folder = train_tiny(tiny_models[arch], topic_dir, root / arch)
        out[arch] = (folder, export_onnx(folder, quantize="int8"))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_logits_equal_torch_logits(exported, arch):
    folder, result = exported[arch]
    assert result.folder == (folder / "onnx").resolve()
    assert result.report["parity"]["fp32"]["max_abs_logit_diff"] < 1e-4
    torch_clf = adaptext.load(folder, precision="fp32")
    onnx_clf = adaptext.load(folder, backend="onnx")
    assert onnx_clf.class_names == torch_clf.class_names
    np.testing.assert_allclose(onnx_clf.logits(TEXTS), torch_clf.logits(TEXTS), atol=1e-4)  # padded batches
    for text in TEXTS:  # batches of one: no padding beyond the multiple of 8
        np.testing.assert_allclose(onnx_clf.logits([text]), torch_clf.logits([text]), atol=1e-4)
    rows = onnx_clf.predict(TEXTS[:2], top_k=2)
    assert [r["label"] for r in rows] == [r["label"] for r in torch_clf.predict(TEXTS[:2])]
    assert len(rows[0]["top_k"]) == 2 and sum(rows[0]["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert onnx_clf.logits([]).shape == (0, 3)


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_keeps_the_labels(exported, topic_dir, arch):
    folder, result = exported[arch]
    texts = pd.read_csv(topic_dir / "test.csv")["text"].tolist() + TEXTS
    expected = adaptext.load(folder, precision="fp32").logits(texts)
    got = adaptext.load(folder, backend="onnx-int8").logits(texts)
    # Tiny random models have near-tied logits, so a few flipped labels would not mean a broken
    # quantisation; an error that is large next to the logits' own spread would.
    assert np.abs(got - expected).max() <= 0.05 * np.ptp(expected)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.9
    import onnx

    weights = onnx.load(str(result.folder / "model.int8.onnx")).graph.initializer
    assert any(w.data_type == onnx.TensorProto.INT8 for w in weights)  # really quantised


@pytest.mark.parametrize("method", ["ia3", "vera", "prompt", "full"])
def test_other_methods_export_exactly(tiny_models, topic_dir, tmp_path, method):
    """In-place merged (IA3), unmerged (VeRA), virtual tokens (prompt) and a full model."""
    folder = train_tiny(tiny_models["bert"], topic_dir, tmp_path / method, method=method)
    export_onnx(folder)
    expected = adaptext.load(folder, precision="fp32").logits(TEXTS)
    np.testing.assert_allclose(adaptext.load(folder, backend="onnx").logits(TEXTS), expected, atol=1e-4)


def test_export_json_records_the_export(exported):
    folder, result = exported["gpt2"]
    report = json.loads((folder / "onnx" / "export.json").read_text())
    assert report == json.loads(json.dumps(result.report))
    assert {"format", "opset", "quantize", "parity", "files", "versions", "tokenizer", "source"} <= set(report)
    assert report["quantize"] == "int8" and report["opset"] == 17 and report["probe_texts"] == len(PROBE_TEXTS)
    assert report["files"]["model.onnx"] == (folder / "onnx" / "model.onnx").stat().st_size
    assert {"torch", "onnx", "onnxruntime", "transformers"} <= set(report["versions"])
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == ["export.json", "model.int8.onnx", "model.onnx"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_onnx_backend_needs_no_base_model(exported, tmp_path):
    folder = tmp_path / "moved"
    shutil.copytree(exported["bert"][0], folder)
    meta = json.loads((folder / "adaptext.json").read_text())
    meta["base_model"].update(name="/nowhere/base", path="/nowhere/base", hub_id=None)
    (folder / "adaptext.json").write_text(json.dumps(meta))
    with pytest.raises(AdaptextError, match="not available here"):
        adaptext.load(folder)
    expected = adaptext.load(exported["bert"][0], precision="fp32").logits(TEXTS)
    np.testing.assert_allclose(adaptext.load(folder, backend="onnx").logits(TEXTS), expected, atol=1e-4)


def test_evaluate_with_each_backend(exported, topic_dir):
    folder = exported["llama"][0]
    # ONNX computes in fp32: torch in fp32 gives its figures (ONNX vs a bf16 torch is test_windows' parity check).
    by_backend = {
        b: adaptext.evaluate(folder, str(topic_dir), "test", backend=b, precision="fp32") for b in ("torch", "onnx")
    }
    assert by_backend["torch"]["precision"] == by_backend["onnx"]["precision"] == "fp32"
    assert by_backend["onnx"]["confusion_matrix"] == by_backend["torch"]["confusion_matrix"]
    assert by_backend["onnx"]["loss"] == pytest.approx(by_backend["torch"]["loss"], abs=1e-5)


# ------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def cli_folder(tiny_models, topic_dir, tmp_path_factory):
    return train_tiny(tiny_models["roberta"], topic_dir, tmp_path_factory.mktemp("cli") / "model")


def test_cli_export_then_predict_with_onnx(cli_folder):
    result = run_cli("export", "--model", str(cli_folder), "--format", "onnx", "--quantize", "int8")
    assert result.returncode == 0, result.stderr
    assert "model.onnx" in result.stdout and "model.int8.onnx" in result.stdout and "export.json" in result.stdout
    out = run_cli("predict", "--model", str(cli_folder), "--backend", "onnx", "--json", *TEXTS)
    assert out.returncode == 0, out.stderr
    expected = adaptext.load(cli_folder, precision="fp32").predict(TEXTS)
    assert [json.loads(line)["label"] for line in out.stdout.splitlines()] == [r["label"] for r in expected]
    evaluated = run_cli("evaluate", "--model", str(cli_folder), "--backend", "onnx-int8", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["n"] == 30


def test_export_replaces_an_earlier_export_whole_and_writes_elsewhere(cli_folder, tmp_path):
    export_onnx(cli_folder, quantize="int8")
    export_onnx(cli_folder)  # fp32 only: no int8 file from before is left behind
    assert sorted(p.name for p in (cli_folder / "onnx").iterdir()) == ["export.json", "model.onnx"]
    with pytest.raises(AdaptextError, match=f"run adaptext export --model {cli_folder} --format onnx --quantize int8"):
        adaptext.load(cli_folder, backend="onnx-int8")
    result = export_onnx(cli_folder, output=tmp_path / "deploy", quantize="int8")
    assert result.folder == (tmp_path / "deploy").resolve()
    assert sorted(p.name for p in result.folder.iterdir()) == ["export.json", "model.int8.onnx", "model.onnx"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def unexported(tiny_models, topic_dir, tmp_path_factory):
    return train_tiny(tiny_models["distilbert"], topic_dir, tmp_path_factory.mktemp("unexported") / "model")


def test_cli_bad_input_exits_2_and_writes_nothing(unexported, topic_dir, tmp_path):
    before = listing(unexported.parent)
    model = str(unexported)
    cases = [
        (("export", "--model", str(tmp_path / "nope")), "not found; pass the --output of adaptext train"),
        (("export", "--model", str(topic_dir)), "not an adaptext output directory"),
        (("export", "--model", model, "--format", "tflite"), "--format 'tflite' is not supported; use --format onnx"),
        (
            ("predict", "--model", model, "--backend", "onnx", "hi"),
            f"run adaptext export --model {model} --format onnx",
        ),
    ]
    for args, expected in cases:
        assert_clean_failure(run_cli(*args), expected)
    assert listing(unexported.parent) == before
    assert sorted(p.name for p in topic_dir.iterdir()) == ["test.csv", "train.csv", "validation.csv"]
    assert not tmp_path.joinpath("nope").exists()


@pytest.mark.parametrize(
    "call,expected",
    [
        (lambda m, d: export_onnx(m, quantize="int4"), "use --quantize int8"),
        (lambda m, d: export_onnx(m, opset=9), "--opset 9: use 14 to 20"),
        (lambda m, d: export_onnx(m, output=m / "labels.json" / "onnx"), "is a file"),  # missing folders are made
        (lambda m, d: export_onnx(m, output=d), "not an adaptext export; choose a new or empty folder"),
        (lambda m, d: adaptext.evaluate(m, backend="onnx"), "has no ONNX export (onnx/model.onnx)"),
        (lambda m, d: adaptext.load(m, backend="tensorrt"), "expected one of torch, onnx, onnx-int8"),
        (lambda m, d: adaptext.load(m, backend="onnx", precision="bf16"), "--backend torch only"),
        (lambda m, d: adaptext.load(m, backend="onnx", base="minilm"), "--backend torch only"),
    ],
)
def test_bad_export_and_backend_options(unexported, topic_dir, call, expected):
    before = listing(unexported.parent)
    with pytest.raises(AdaptextError, match=re.escape(expected)):
        call(unexported, topic_dir)
    assert listing(unexported.parent) == before
    assert sorted(p.name for p in topic_dir.iterdir()) == ["test.csv", "train.csv", "validation.csv"]


def test_missing_onnx_packages_name_the_extra(unexported, exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` sees when it is absent
    for call in (lambda: export_onnx(unexported), lambda: adaptext.load(exported["bert"][0], backend="onnx")):
        with pytest.raises(AdaptextError, match=re.escape('pip install "adaptext[onnx]"')):
            call()
    assert not (unexported / "onnx").exists()


# ------------------------------------------------------------------ end to end on MiniLM


@pytest.mark.e2e
@needs_shared_data()
def test_minilm_onnx_fp32_is_exact_and_int8_close(tmp_path):
    output = tmp_path / "agnews"
    # fmt: off
    result = run_cli("train", "--data", str(SHARED_DATA / "ag_news"), "--train-size", "300", "--eval-size", "40",
                     "--test-size", "40", "--epochs", "1", "--min-steps", "0", "--max-length", "64", "--seed", "1",
                     "--output", str(output), "--quiet")
    # fmt: on
    assert result.returncode == 0, result.stderr
    result = run_cli("export", "--model", str(output), "--format", "onnx", "--quantize", "int8")
    assert result.returncode == 0, result.stderr

    class_names = adaptext.load(output, backend="onnx").class_names
    split = data.load_eval_split(str(SHARED_DATA / "ag_news"), "test", class_names, None, None)
    split = data.stratified_sample(split, 300, 0)
    labels = np.array(split.labels)
    logits, seconds = {}, {}
    for backend in ("torch", "onnx", "onnx-int8"):
        classifier = adaptext.load(output, backend=backend, precision="fp32")
        started = time.perf_counter()
        logits[backend] = classifier.logits(split.texts)
        seconds[backend] = time.perf_counter() - started
    accuracy = {b: float((v.argmax(1) == labels).mean()) for b, v in logits.items()}
    print(f"\nMiniLM AG News 300 test texts: accuracy {accuracy}, seconds {seconds}")
    assert accuracy["torch"] > 0.5  # 300 examples, 1 epoch: far above chance (0.25)
    np.testing.assert_allclose(logits["onnx"], logits["torch"], atol=1e-4)
    np.testing.assert_array_equal(logits["onnx"].argmax(1), logits["torch"].argmax(1))
    assert abs(accuracy["onnx-int8"] - accuracy["torch"]) <= 0.03
    assert (logits["onnx-int8"].argmax(1) == logits["torch"].argmax(1)).mean() >= 0.95
