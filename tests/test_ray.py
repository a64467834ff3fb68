"""Ray Data: `adaptext predict --engine ray` and adaptext.ray_data.Predictor in map_batches, on a local cluster."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from conftest import assert_labels_agree, assert_probs_close, run_cli, topic_rows

ray = pytest.importorskip("ray", reason="Ray Data is the optional extra adaptext[ray]; CI installs it")
pytestmark = pytest.mark.processes  # a local Ray cluster: a dozen processes


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(trained_tiny) -> Path:
    return trained_tiny


def test_engine_ray_writes_the_same_file_as_adaptext_predict(cluster, model, tmp_path):
    frame = pd.DataFrame(topic_rows(50, seed=8))[["text"]]
    frame.insert(0, "id", range(len(frame)))
    source = tmp_path / "in.parquet"
    frame.to_parquet(source, index=False)
    common = ["predict", "--model", str(model), "--input", str(source), "--keep-columns", "id", "--chunk-rows", "40"]
    assert run_cli(*common, "--output", str(tmp_path / "local.csv"), "--quiet").returncode == 0
    result = run_cli(*common, "--output", str(tmp_path / "ray.csv"), "--engine", "ray", "--workers", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()
    refused = run_cli(*common, "--output", str(tmp_path / "x.csv"), "--engine", "ray", "--resume")
    assert refused.returncode == 2 and "--resume is not available with --engine ray" in refused.stderr


def test_predictor_class_in_a_users_map_batches(cluster, model):
    import adaptext
    from adaptext.ray_data import Predictor

    texts = list(pd.DataFrame(topic_rows(20, seed=9))["text"])
    dataset = ray.data.from_pandas(pd.DataFrame({"doc_id": range(len(texts)), "text": texts}))
    labelled = dataset.map_batches(
        Predictor, fn_constructor_kwargs={"model": str(model), "top_k": 2}, batch_format="pandas", batch_size=16,
        concurrency=1, num_cpus=1,
    ).to_pandas().sort_values("doc_id")  # fmt: skip
    classifier = adaptext.load(model)
    logits = classifier.logits(texts)
    expected = classifier.predict(texts, top_k=2)
    assert list(labelled["text"]) == texts  # the batch's own columns stay
    assert_labels_agree(list(labelled["label"]), [r["label"] for r in expected], logits)
    probs = [[r["probabilities"][c] for c in classifier.class_names] for r in expected]
    assert_probs_close(labelled[[f"prob_{c}" for c in classifier.class_names]].to_numpy(dtype=float), probs, logits)
    assert all(len(top) == 2 for top in labelled["top_k"])
