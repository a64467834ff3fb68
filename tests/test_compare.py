"""`adaptext compare`: outputs, resume after a kill, per-arm overrides, presets, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import adaptext
from adaptext import compare, option_files, options
from adaptext.errors import AdaptextError
from conftest import run_cli

SMALL = ("--epochs", "1", "--batch-size", "8", "--max-length", "32", "--quiet")


def compare_cli(tiny_models, topic_dir, out, *extra):
    return run_cli("compare", "--data", str(topic_dir), "--model", str(tiny_models["bert"]), "--output", str(out),
                   *SMALL, *extra)  # fmt: skip


def stamps(out):
    return {
        p.name: (p / "adaptext.json").stat().st_mtime_ns for p in (out / "runs").iterdir() if not p.name.startswith(".")
    }


@pytest.fixture(scope="module")
def study(tiny_models, topic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "cmp"
    result = compare_cli(tiny_models, topic_dir, out, "--methods", "zero,head,lora", "--seeds", "2")
    assert result.returncode == 0, result.stderr + result.stdout
    return out, result


@pytest.mark.processes
def test_outputs_results_report_and_plots(study):
    out, _ = study
    results = json.loads((out / "results.json").read_text())
    assert [a["method"] for a in results["arms"]] == ["zero", "head", "lora"]
    for arm in results["arms"]:
        for key in ("accuracy_mean", "accuracy_std", "macro_f1_mean", "trainable_params", "train_seconds_mean",
                    "adapter_params", "head_params", "size_bytes", "peak_rss_mb", "per_class_f1", "curve"):  # fmt: skip
            assert key in arm, key
        assert arm["seeds"] == [42, 43] and arm["n"] == 30 and len(arm["accuracy_per_seed"]) == 2
    zero, head, lora = results["arms"]
    assert zero["trainable_params"] == 0 and zero["curve"] == []
    assert head["adapter_params"] == 0 and head["head_params"] > 0
    assert lora["adapter_params"] > 0 and lora["head_params"] == head["head_params"]
    assert lora["curve"] and lora["curve"][0]["epoch"] == 1.0
    assert results["versions"]["peft"] and results["config"]["model"]
    # every seed's run trained on the same data: the data seed is fixed, the training seed varies
    runs = results["run_configs"]
    assert {c["data_seed"] for c in runs.values()} == {42} and {c["seed"] for c in runs.values()} == {42, 43}
    for name in ("accuracy_vs_params.png", "accuracy_vs_time.png", "learning_curves.png", "confusion_best.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and 'src="http' not in page  # self-contained
    md = (out / "report.md").read_text()
    assert "| lora (LoRA) |" in md and "![Accuracy vs trainable parameters](accuracy_vs_params.png)" in md


def chromium_path():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("ADAPTEXT_REQUIRE_BROWSER"):
            pytest.fail("CI needs Debian's chromium for the browser tests (apt-get install chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    return path


@pytest.mark.processes
def test_report_html_renders_its_plots_in_a_browser(study):
    from playwright.sync_api import sync_playwright

    out, _ = study
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto((out / "report.html").resolve().as_uri())
        images = page.evaluate(
            "[...document.images].map(i => ({ok: i.complete && i.naturalWidth > 100, w: i.getBoundingClientRect().width}))"
        )
        rows = page.locator("table").first.locator("tbody tr").count()
        browser.close()
    assert len(images) == 4 and all(i["ok"] and i["w"] > 100 for i in images), images
    assert rows == 3


@pytest.mark.processes
def test_arms_flagged_at_or_below_chance(study):
    out, _ = study
    results = json.loads((out / "results.json").read_text())
    zero = results["arms"][0]
    assert zero["chance_accuracy"] == pytest.approx(1 / 3)
    assert zero["at_or_below_chance"] == (zero["accuracy_mean"] <= zero["chance_accuracy"] + 0.01)
    if zero["at_or_below_chance"]:
        assert "at or below chance" in (out / "report.md").read_text()


@pytest.mark.processes
def test_every_arm_reloads_like_a_train_output(study):
    out, _ = study
    for folder in (out / "runs").iterdir():
        row = adaptext.load(folder).predict(["goal match team"])[0]
        assert row["label"] in ("money", "space", "sports")


@pytest.mark.processes
def test_rerun_skips_finished_arms_and_reruns_changed_ones(study, tiny_models, topic_dir):
    out, _ = study
    before = stamps(out)
    again = compare_cli(tiny_models, topic_dir, out, "--methods", "zero,head,lora", "--seeds", "2")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("done already, skipped") == 6 and stamps(out) == before
    changed = compare_cli(
        tiny_models, topic_dir, out, "--methods", "zero,lora", "--seeds", "1", "--set", "lora.lr=0.02"
    )
    assert changed.returncode == 0, changed.stderr
    after = stamps(out)
    assert after["zero-seed42"] == before["zero-seed42"] and after["lora-seed42"] != before["lora-seed42"]
    assert json.loads((out / "runs" / "lora-seed42" / "adaptext.json").read_text())["lr"] == 0.02


@pytest.mark.processes
def test_killed_midway_then_rerun_finishes_without_recomputing(tiny_models, topic_dir, tmp_path):
    out = tmp_path / "cmp"
    command = [sys.executable, "-m", "adaptext", "compare", "--data", str(topic_dir), "--model", str(tiny_models["bert"]),
               "--output", str(out), "--methods", "zero,head,lora", *SMALL]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "runs" / "zero-seed42").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the study and the arm it is training
    proc.wait()
    assert (out / "runs" / "zero-seed42").is_dir() and not (out / "results.json").exists()
    first = stamps(out)
    rerun = run_cli(*command[3:])
    assert rerun.returncode == 0, rerun.stderr
    assert "zero seed 42: done already, skipped" in rerun.stdout
    finished = stamps(out)
    assert set(finished) == {"zero-seed42", "head-seed42", "lora-seed42"}
    assert all(finished[name] == first[name] for name in first)  # nothing finished was recomputed
    assert not [p for p in (out / "runs").iterdir() if p.name.startswith(".")]  # killed run's leftovers cleared
    assert len(json.loads((out / "results.json").read_text())["arms"]) == 3


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--methods", "zero,lorra"), "unknown method 'lorra'"),
        (("--set", "lora-lr=1"), "write METHOD.OPTION=VALUE"),
        (("--set", "lora.learning_rate=1"), "unknown option 'learning_rate'"),
        (("--seeds", "0"), "--seeds must be >= 1"),
        (("--preset", "bert-agnews"), "unknown preset 'bert-agnews'; did you mean 'bert-agnews-500'?"),
    ],
)
def test_bad_input_fails_before_any_run(tiny_models, topic_dir, tmp_path, extra, message):
    out = tmp_path / "cmp"
    result = compare_cli(tiny_models, topic_dir, out, *extra)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr
    assert not out.exists()


def test_refuses_an_unrelated_existing_directory(tiny_models, topic_dir, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = compare_cli(tiny_models, topic_dir, tmp_path / "mine", "--methods", "zero")
    assert result.returncode == 2 and "is not an adaptext compare directory" in result.stderr
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("name", option_files.preset_names())
def test_presets_load_and_validate(name):
    values, study = option_files.split_study(option_files.load_preset(name))
    cfg = options.validate(options.from_dict(values, source=name))
    assert cfg.model not in ("minilm", "mpnet"), "a preset names its original base model"
    assert cfg.data and cfg.method == "lora"
    assert set(study["methods"]) <= set(compare.ARMS)


def test_preset_recipes_match_the_seeds():
    assert set(option_files.preset_names()) == {
        "bert-agnews-500", "roberta-agnews-r4", "bert-imdb-1000", "gpt2-agnews", "distilbert-imdb-r4"
    }  # fmt: skip
    gpt2 = option_files.load_preset("gpt2-agnews")
    assert [gpt2[k] for k in ("lora_r", "lora_alpha", "lr")] == [8, 32, 5e-4]
    assert gpt2["target_modules"] == ["c_attn", "c_proj"]
    assert (gpt2["train_size"], gpt2["test_size"], gpt2["methods"]) == (1250, 500, ["zero", "head", "lora"])
    roberta = option_files.load_preset("roberta-agnews-r4")
    assert [roberta[k] for k in ("lora_r", "scheduler", "warmup_steps", "epochs")] == [4, "cosine", 500, 5]


def test_preset_with_model_and_data_overrides_trains(tiny_models, topic_dir, tmp_path):
    out = tmp_path / "gpt2"
    result = run_cli("train", "--preset", "gpt2-agnews", "--model", str(tiny_models["gpt2"]), "--data", str(topic_dir),
                     "--output", str(out), "--epochs", "1", "--max-length", "32", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "adaptext.json").read_text())
    assert meta["target_modules"] == ["c_attn", "c_proj"] and meta["config"]["lora_alpha"] == 32
    assert meta["config"]["test_size"] == 500 and meta["config"]["epochs"] == 1


def test_parse_overrides():
    assert compare.parse_overrides(["ia3.lr=0.01", "lora.target_modules=[query, key]"], {"full": {"epochs": 1}}) == {
        "full": {"epochs": 1}, "ia3": {"lr": 0.01}, "lora": {"target_modules": ["query", "key"]},
    }  # fmt: skip
    with pytest.raises(AdaptextError, match="unknown method"):
        compare.parse_overrides(["bogus.lr=1"])
