"""Saved folders work away from the machine that trained them, and --output takes nested new folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import adaptext
from adaptext import api, artifacts
from adaptext.errors import AdaptextError
from adaptext.models import ALIASES
from conftest import SHARED_DATA, needs_shared_data, run_cli

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
PROBE_TEXTS = ["Oil prices climb on supply fears", "Striker scores twice in the derby", "New chip doubles battery life"]

# Another machine: adaptext cannot be imported, the base comes from the Hugging Face cache by Hub id.
PLAIN_PEFT = """
import sys
sys.modules["adaptext"] = None  # any import of adaptext now fails
import json, re, torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification
folder, hub_id, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
# The model card's own plain-peft snippet, run as written (it builds `model` and `tokenizer`; for a
# mean-pooled model it defines and installs the `mean_pool` hook).
card = open(folder + "/README.md").read()
snippet = re.search(r"With plain `peft`.*?```python\\n(.*?)```", card, re.S).group(1)
scope = {}
exec(snippet, scope)
auto, tokenizer = scope["model"].eval(), scope["tokenizer"]
labels = json.load(open(folder + "/labels.json"))
kwargs = dict(num_labels=labels["num_labels"], pad_token_id=labels["pad_token_id"], dtype=torch.float32)
base = AutoModelForSequenceClassification.from_pretrained(hub_id, **kwargs)
manual = PeftModel.from_pretrained(base, folder).eval()
if "mean_pool" in scope:
    manual.get_base_model().base_model.register_forward_hook(scope["mean_pool"], with_kwargs=True)
with torch.no_grad():
    out = {name: [m(**tokenizer([t], return_tensors="pt")).logits[0].tolist() for t in texts]
           for name, m in (("auto", auto), ("manual", manual))}
    out["batch"] = auto(**tokenizer(texts, return_tensors="pt", padding=True)).logits.tolist()
print(json.dumps(out))
"""


def hub_cache(hf_home: Path, hub_id: str, model_dir: Path) -> Path:
    """What huggingface_hub leaves in ``$HF_HOME`` after downloading ``hub_id``: ``hub/models--org--name``
    whose ``refs/main`` names a commit, and ``snapshots/<commit>/`` holding the files (links to blobs)."""
    commit = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"
    repo = hf_home / "hub" / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in model_dir.iterdir():
        if file.is_file():
            (snapshot / file.name).symlink_to(file)
    return hf_home


@pytest.mark.e2e
@needs_shared_data()
def test_minilm_adapter_names_its_hub_base_and_loads_elsewhere(tmp_path):
    model_dir = Path(ALIASES["minilm"].resolve())
    assert ALIASES["minilm"].hub_id == MINILM_HUB_ID
    output = tmp_path / "trained"
    # fmt: off
    api.train(data=str(SHARED_DATA / "ag_news"), train_size=64, eval_size=32, test_size=32, epochs=1, max_length=32,
              seed=1, min_steps=0, output=str(output), progress=False, echo=lambda line: None)
    # fmt: on
    adapter_config = json.loads((output / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == MINILM_HUB_ID
    meta = artifacts.read_meta(output)
    assert meta["base_model"] == {"name": "minilm", "path": MINILM_HUB_ID, "hub_id": MINILM_HUB_ID}
    for file in output.rglob("*"):  # no trace of this machine's virtualenv, in any file
        if file.is_file():
            data = file.read_bytes()
            for needle in (str(model_dir), "site-packages", sys.prefix):
                assert needle.encode() not in data, f"{file.name} holds {needle}"

    copy = tmp_path / "elsewhere" / output.name  # the card's snippet names the folder as trained
    shutil.copytree(output, copy)
    hf_home = hub_cache(tmp_path / "hf-home", MINILM_HUB_ID, model_dir)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    cwd = tmp_path / "elsewhere"
    plain = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT, str(copy), MINILM_HUB_ID, json.dumps(PROBE_TEXTS)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )
    assert plain.returncode == 0, plain.stderr
    plain_logits = json.loads(plain.stdout)
    ours = adaptext.load(output, precision="fp32").logits(PROBE_TEXTS)
    np.testing.assert_allclose(np.array(plain_logits["auto"]), ours, atol=1e-4)
    np.testing.assert_allclose(np.array(plain_logits["manual"]), ours, atol=1e-4)
    np.testing.assert_allclose(np.array(plain_logits["batch"]), ours, atol=1e-4)  # padding does not leak in
    assert artifacts.read_meta(output)["pooling"] == "mean"  # MiniLM's own: the snippet had to restore it

    # adaptext resolves the alias from the installed package, not from the Hub id (no HF cache here).
    assert artifacts.base_source(artifacts.read_meta(copy)).path == str(model_dir)
    np.testing.assert_allclose(adaptext.load(copy, precision="fp32").logits(PROBE_TEXTS), ours, atol=1e-5)


def test_local_base_directory_is_recorded_as_its_path(tiny_models, topic_dir, tmp_path):
    outcome = api.train(
        data=str(topic_dir),
        model=str(tiny_models["bert"]),
        output=str(tmp_path / "model"),
        epochs=1,
        max_length=32,
        progress=False,
        echo=lambda line: None,
    )
    adapter_config = json.loads((outcome.output / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_models["bert"].resolve())
    assert outcome.meta["base_model"]["path"] == str(tiny_models["bert"].resolve())


def test_output_creates_missing_parents_and_still_refuses_a_finished_run(tiny_models, topic_dir, tmp_path):
    # fmt: off
    args = ("train", "--data", str(topic_dir), "--model", str(tiny_models["bert"]), "--epochs", "1",
            "--max-length", "32", "--output", "runs/exp1/model", "--quiet")
    # fmt: on
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    model = tmp_path / "runs" / "exp1" / "model"
    assert (model / artifacts.META_FILE).is_file()
    assert [p.name for p in (tmp_path / "runs" / "exp1").iterdir()] == ["model"]  # no staging left over
    written = (model / artifacts.META_FILE).stat().st_mtime_ns

    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode != 0
    assert "--overwrite" in again.stderr
    assert (model / artifacts.META_FILE).stat().st_mtime_ns == written


def test_failed_run_leaves_no_model_in_the_new_folders(tiny_models, topic_dir, tmp_path):
    def stop(record):
        raise RuntimeError("stopped by the test")

    output = tmp_path / "runs" / "exp2" / "model"
    with pytest.raises(RuntimeError, match="stopped by the test"):
        # fmt: off
        api.train(data=str(topic_dir), model=str(tiny_models["bert"]), output=str(output), epochs=1, max_length=32,
                  progress=False, echo=lambda line: None, on_eval=stop)
        # fmt: on
    assert not output.exists()
    assert list(output.parent.iterdir()) == []  # the parents may stay; nothing half-written in them


def test_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(AdaptextError, match="is a file"):
        artifacts.check_output(tmp_path / "notes.txt" / "runs" / "model", overwrite=False)


def test_compare_and_tune_outputs_may_have_missing_parents_too(tmp_path):
    from adaptext import compare

    compare.check_output(tmp_path / "studies" / "ag" / "compare")  # made by the study, as by train
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(AdaptextError, match="is a file"):
        compare.check_output(tmp_path / "notes.txt" / "compare")
    tune = run_cli("tune", "--data", "x", "--output", str(tmp_path / "notes.txt" / "study"), "--trials", "1")
    assert tune.returncode == 2 and "notes.txt' is a file; choose another --output" in tune.stderr
