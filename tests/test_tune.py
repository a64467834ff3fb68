"""`adaptext tune`: a real Optuna study on a tiny model — resume, pruning, a kill midway, best.yaml, bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from adaptext import api, checkpoint, cli, config, option_files, tune, tune_space
from adaptext.errors import AdaptextError
from conftest import run_cli

optuna = pytest.importorskip("optuna")

SMALL = ("--epochs", "2", "--min-steps", "0", "--evals-per-epoch", "2", "--batch-size", "8", "--max-length", "32",
         "--metric", "loss", "--quiet")  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two per process fight for them
    (a 1-second trial took 30 s): every process of this module runs on one."""
    import torch

    patch, threads = pytest.MonkeyPatch(), torch.get_num_threads()
    patch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    patch.undo()


def args(tiny_models, topic_dir, out, *extra):
    return ["tune", "--data", str(topic_dir), "--model", str(tiny_models["bert"]), "--output", str(out), *SMALL, *extra]


def load(out):
    name = json.loads((out / "tune.json").read_text())["study_name"]  # the folder's name when the study began
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def states(study):
    return [t.state.name for t in study.trials]


@pytest.fixture(scope="module")
def study(tiny_models, topic_dir, tmp_path_factory):
    """Two trials, then the same command asking for four: the study continues where it stopped."""
    out = tmp_path_factory.mktemp("tune") / "study"
    first = run_cli(*args(tiny_models, topic_dir, out, "--trials", "2"))
    assert first.returncode == 0, first.stderr + first.stdout
    before = {t.number: (t.params, t.datetime_complete, t.state.name) for t in load(out).trials}
    stamps = {p.name: (p / "adaptext.json").stat().st_mtime_ns for p in (out / "trials").iterdir()}
    second = run_cli(*args(tiny_models, topic_dir, out, "--trials", "4"))
    assert second.returncode == 0, second.stderr + second.stdout
    return out, first, second, before, stamps


def test_resume_runs_only_the_remaining_trials(study):
    out, first, second, before, stamps = study
    assert "0 of 2 trials finished" in first.stdout and "2 of 4 trials finished" in second.stdout
    trials = load(out).trials
    assert len(trials) == 4 and set(states(load(out))) <= {"COMPLETE", "PRUNED"}
    assert {t.number: (t.params, t.datetime_complete, t.state.name) for t in trials[:2]} == before
    assert "trial 0 " not in second.stdout and "trial 2 " in second.stdout and "trial 3 " in second.stdout
    for name, stamp in stamps.items():  # the first run's models were not trained again
        assert (out / "trials" / name / "adaptext.json").stat().st_mtime_ns == stamp
    assert trials[2].params != trials[0].params  # a resumed sampler does not replay the first run's draws


def test_every_evaluation_is_reported_and_the_objective_is_validation(study):
    out, *_ = study
    for trial in load(out).trials:
        folder = out / "trials" / f"{trial.number:04d}"
        if trial.state.name == "PRUNED":
            assert not folder.exists() and (out / "logs" / f"{folder.name}.log").is_file()
            assert len(trial.intermediate_values) < 4 and trial.user_attrs["epochs"] < 2
            continue
        metrics = json.loads((folder / "metrics.json").read_text())
        assert [trial.intermediate_values[i] for i in range(4)] == [r["loss"] for r in metrics["history"]]
        assert trial.value == metrics["best"]["loss"] == min(r["loss"] for r in metrics["history"])
        assert trial.user_attrs["test"]["loss"] == metrics["test"]["loss"]  # recorded, never the objective
        config_saved = json.loads((folder / "adaptext.json").read_text())["config"]
        assert config_saved["lora_alpha"] == trial.params["lora_r"] * trial.params["alpha_per_r"]
        assert config_saved["lr"] == trial.params["lr"] and config_saved["seed"] == 42


def test_outputs_table_csv_best_yaml_and_link(study):
    out, _, second, *_ = study
    best = load(out).best_trial
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["number"] for r in rows] == ["0", "1", "2", "3"]
    assert list(rows[0]) == ["number", "state", "value", "lr", "lora_r", "alpha_per_r", "lora_dropout", "top_layers",
                             "epochs", "seconds"]  # fmt: skip
    assert {r["state"] for r in rows} <= {"complete", "pruned"}
    assert (out / "best").resolve() == (out / "trials" / f"{best.number:04d}").resolve()
    assert f"best: trial {best.number}, validation loss {best.value:.4f}" in second.stdout
    table = [line.split() for line in second.stdout.splitlines()]
    assert ["trial", "state", "loss", "lr", "lora_r", "alpha_per_r", "lora_dropout", "top_layers", "epochs",
            "seconds"] in table and [f"{best.number}*", "complete", f"{best.value:.4f}"] in [r[:3] for r in table]  # fmt: skip
    options = option_files.load_file(out / "best.yaml")
    assert "output" not in options and options["lr"] == best.params["lr"]
    assert option_files.load_preset(str(out / "best.yaml")) == options  # usable as --preset as well
    assert json.loads((out / "tune.json").read_text())["results"]["best"]["number"] == best.number


def test_best_yaml_reproduces_the_best_trial(study, tmp_path):
    out, *_ = study
    best = load(out).best_trial
    assert cli.main(["train", "--config", str(out / "best.yaml"), "--output", str(tmp_path / "again"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert metrics["best"]["loss"] == pytest.approx(best.value, abs=1e-6)


def test_a_bad_trial_is_pruned(tiny_models, topic_dir, tmp_path, capsys):
    """Three trials at a good lr, then one at a diverging lr, queued in that order through Optuna itself
    (in a study of its own storage): the last one's loss is above the median after one epoch."""
    out, storage = tmp_path / "prune", f"sqlite:///{tmp_path / 'queued.db'}"
    queued = optuna.create_study(study_name="queued", storage=storage, direction="minimize")
    for lr in (0.01, 0.01, 0.01, 0.9):
        queued.enqueue_trial({"lr": lr})
    (tmp_path / "lr.yaml").write_text("lr: {type: float, low: 0.001, high: 0.95, log: true}\n")
    fixed = ("--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0.1", "--top-layers", "0")  # lr alone searched
    command = args(tiny_models, topic_dir, out, *fixed, "--space", str(tmp_path / "lr.yaml"), "--storage", storage,
                   "--study-name", "queued")  # fmt: skip
    assert cli.main([*command, "--trials", "4"]) == 0
    assert "trial 3 lr=0.9: pruned at epoch 1.00" in capsys.readouterr().out
    study = optuna.load_study(study_name="queued", storage=storage)
    assert states(study) == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    assert sorted(study.trials[3].intermediate_values) == [0, 1]  # warm-up: no verdict before half an epoch
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000", "0001", "0002"]
    assert (out / "logs" / "0003.log").is_file()
    row = list(csv.DictReader((out / "trials.csv").open()))[3]
    assert (row["state"], row["epochs"], row["lr"]) == ("pruned", "1.0", "0.9")
    # A timeout stops before the next trial starts; the study is unchanged and can go on later.
    assert cli.main([*command, "--trials", "9", "--timeout", "1e-9"]) == 0
    assert "--timeout 1e-09 s reached" in capsys.readouterr().out and len(study.trials) == 4
    # Another space is another study: the sampler cannot follow changed choices, and values stop comparing.
    (tmp_path / "lr.yaml").write_text("lr: {type: float, low: 0.001, high: 0.5, log: true}\n")
    assert cli.main([*command, "--trials", "9"]) == 2
    assert "holds a study with another search space (changed: lr)" in capsys.readouterr().err


@pytest.mark.processes
def test_killed_mid_trial_then_rerun_completes_the_study(tiny_models, topic_dir, tmp_path):
    out = tmp_path / "killed"
    command = args(tiny_models, topic_dir, out, "--trials", "3", "--epochs", "3")
    proc = subprocess.Popen([sys.executable, "-m", "adaptext", *command], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    while not (out / "logs" / "0001.log").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # trial 1 has just started
    proc.wait()
    assert states(load(out)) == ["COMPLETE", "RUNNING"]
    stamp = (out / "trials" / "0000" / "adaptext.json").stat().st_mtime_ns
    rerun = run_cli(*command)
    assert rerun.returncode == 0, rerun.stderr
    assert "trial 1 was interrupted; its parameters are queued to run again" in rerun.stdout
    study = load(out)
    assert states(study)[:2] == ["COMPLETE", "FAIL"] and sum(s in ("COMPLETE", "PRUNED") for s in states(study)) == 3
    assert study.trials[2].params == study.trials[1].params and study.trials[2].user_attrs["retry_of"] == 1
    assert (out / "trials" / "0000" / "adaptext.json").stat().st_mtime_ns == stamp  # not trained again
    assert not (out / "trials" / "0001").exists() and not [p for p in (out / "trials").iterdir() if p.name[0] == "."]
    assert [r["state"] for r in csv.DictReader((out / "trials.csv").open())][1] == "fail"


# Checkpoints at steps 4, 8, 12... (the first evaluation is at step 7); an lr that learns, so that a resumed run
# which went astray would show in its losses.
KILLED = ("--trials", "1", "--checkpoint-steps", "4", "--lr", "0.02")


@pytest.fixture(scope="module")
def killed_in_a_save(tiny_models, topic_dir, tmp_path_factory):
    """A one-trial study whose process is SIGKILLed (as by `kill -9`) inside trial 0's third checkpoint save,
    by the fault injection of test_resume: no race with the trial's end, two whole checkpoints before."""
    out = tmp_path_factory.mktemp("tune-killed") / "killed"
    env = {**os.environ, "ADAPTEXT_FAULT_KILL_IN_SAVE": "3"}
    proc = subprocess.run([sys.executable, "-m", "adaptext", *args(tiny_models, topic_dir, out, *KILLED)],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert states(load(out)) == ["RUNNING"] and list(checkpoint_file(out, 0).parent.glob(".state.pt.partial-*"))
    return out


def copy_of(study_dir, tmp_path):
    """Each test re-runs its own copy of the killed study (it keeps its name: tune.json has it)."""
    shutil.copytree(study_dir, tmp_path / "killed")
    return tmp_path / "killed"


def checkpoint_file(out, number):
    return checkpoint.state_path(tune.trial_dir(out, number))


def assert_retry_complete(out):
    """Trial 0 failed, trial 1 re-ran it and finished: its model alone in trials/, whole, with no checkpoint."""
    assert states(load(out)) == ["FAIL", "COMPLETE"] and load(out).trials[1].user_attrs["retry_of"] == 0
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0001"]
    folder = out / "trials" / "0001"
    assert (folder / "adaptext.json").is_file() and not (folder / "checkpoint").exists()
    assert (out / "best").resolve() == folder.resolve()
    assert [r["state"] for r in csv.DictReader((out / "trials.csv").open())] == ["fail", "complete"]


@pytest.mark.processes
def test_a_trial_killed_after_a_checkpoint_resumes_from_it(killed_in_a_save, tiny_models, topic_dir, tmp_path, capsys):
    out = copy_of(killed_in_a_save, tmp_path)
    step = torch.load(checkpoint_file(out, 0), weights_only=True)["step"]
    reported = load(out).trials[0].intermediate_values  # before the kill
    assert step == 8 and len(reported) >= 1
    assert cli.main(args(tiny_models, topic_dir, out, *KILLED)) == 0
    printed = capsys.readouterr().out
    assert "trial 0 was interrupted; its parameters are queued to run again" in printed
    assert "trial 1 resumes trial 0 from step 8 of its checkpoint" in printed
    assert_retry_complete(out)
    trial = load(out).trials[1]
    metrics = json.loads((out / "trials" / "0001" / "metrics.json").read_text())
    assert metrics["train"]["resumed_from_step"] == 8
    # Every evaluation is reported to the retry at its own step, those made before the kill included.
    losses = [r["loss"] for r in metrics["history"]]
    assert [trial.intermediate_values[i] for i in range(len(losses))] == losses
    assert [reported[i] for i in range(len(reported))] == losses[: len(reported)]
    # The same trial trained without a break ends at the same values.
    whole = api.train({**trial.user_attrs["config"], "output": str(tmp_path / "whole")}, progress=False)
    assert trial.value == pytest.approx(whole.metrics["best"]["loss"], abs=1e-6)
    assert losses == pytest.approx([r["loss"] for r in whole.metrics["history"]], abs=1e-6)
    resumed, uninterrupted = (load_file(str(d / "adapter_model.safetensors")) for d in (out / "best", whole.output))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-6, rtol=1e-6)


def corrupt(state_file):
    state_file.write_bytes(b"\x00not a checkpoint")


def other_options(state_file):
    state = torch.load(state_file, weights_only=True)
    state["config"]["lr"] = 0.5
    torch.save(state, state_file)


@pytest.mark.processes
@pytest.mark.parametrize(
    "damage,reason", [(corrupt, "cannot be read ("), (other_options, "was made with other options (lr: 0.5 -> ")]
)
def test_a_killed_trial_with_an_unusable_checkpoint_is_trained_from_scratch(
    killed_in_a_save, tiny_models, topic_dir, tmp_path, capsys, damage, reason
):
    out = copy_of(killed_in_a_save, tmp_path)
    damage(checkpoint_file(out, 0))
    assert cli.main(args(tiny_models, topic_dir, out, *KILLED)) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trial 1 ")]
    assert notes[0].startswith(f"trial 1 trains from scratch: the checkpoint of trial 0 {reason}"), notes
    assert not any("resumes" in line for line in notes)
    assert_retry_complete(out)
    metrics = json.loads((out / "trials" / "0001" / "metrics.json").read_text())
    assert metrics["train"]["resumed_from_step"] is None


def test_a_trial_stopped_by_ctrl_c_resumes_from_its_checkpoint(tiny_models, topic_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "stopped"
    save = checkpoint.Checkpointer.save

    def interrupted_save(self, state):  # Ctrl-C arrives after two checkpoints
        if self.saves == 2:
            raise KeyboardInterrupt
        save(self, state)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", interrupted_save)
    assert cli.main(args(tiny_models, topic_dir, out, *KILLED)) == 130
    monkeypatch.undo()
    assert states(load(out)) == ["FAIL", "WAITING"] and checkpoint_file(out, 0).is_file()
    assert cli.main(args(tiny_models, topic_dir, out, *KILLED)) == 0
    assert "trial 1 resumes trial 0 from step 8 of its checkpoint" in capsys.readouterr().out
    assert_retry_complete(out)


SPACE_ERRORS = [
    ("lora_rank: {type: int, low: 4, high: 32}", "unknown option 'lora_rank'; did you mean 'lora_r'?"),
    ("lr: {type: uniform, low: 0.001, high: 0.01}", "type must be float, int or categorical"),
    ("lr: {type: float, low: 0.01, high: 0.001}", "give low and high with low < high"),
    ("lr: {type: float, low: 0.001, high: 0.01, logscale: true}", "unknown key 'logscale'"),
    ("lr: {type: float, low: 0, high: 0.01, log: true}", "a log scale needs low > 0"),
    ("lora_r: {type: int, low: 2.5, high: 8}", "low must be a whole number"),
    ("lora_r: {type: categorical, choices: []}", "choices must be a non-empty list"),
    ("lora_dropout: {type: float, low: 0.0, high: 1.5}", "lora_dropout 1.5: --lora-dropout must be in [0, 1)"),
    ("top_layers: {type: categorical, choices: [0, 5]}", "top_layers 5 is more than the model's 2 layers"),
    ("vera_r: {type: categorical, choices: [64, 128]}", "vera_r does not apply to --method lora (only to vera)"),
    ("lora_r: {type: categorical, choices: [4, 8]}", "lora_r is also fixed on the command line (--lora-r)"),
    ("- lr", "must hold a mapping of option"),
    ("lr: [", "is not valid YAML"),
]


@pytest.mark.parametrize("text,message", SPACE_ERRORS)
def test_bad_space_files(tiny_models, topic_dir, tmp_path, capsys, text, message):
    space = tmp_path / "space.yaml"
    space.write_text(text + "\n")
    extra = ("--lora-r", "8") if "fixed on the command line" in message else ()
    assert cli.main(args(tiny_models, topic_dir, tmp_path / "study", "--space", str(space), *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: space file ") and message in err[0], err
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--trials", "0"), "--trials must be at least 1 (got 0)"),
        (("--timeout", "0"), "--timeout must be > 0 seconds"),
        (("--storage", "not a url"), "--storage 'not a url' is not a database URL; use sqlite:///"),
        (("--storage", "sqlite:////no/such/folder/s.db"), "folder '/no/such/folder' does not exist"),
        (("--resume",), "adaptext tune resumes by itself: re-run the same command without --resume"),
        (("--overwrite",), "does not take --overwrite"),
        (("--epochs", "0"), "a trial must train"),
        (("--space", "nowhere.yaml"), "space file 'nowhere.yaml' not found"),
        (("--method", "head", "--space", "SPACE"), "lora_alpha does not apply to --method head"),
        (("--preset", "nowhere.yaml"), "preset file 'nowhere.yaml' not found; give a shipped preset"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tiny_models, topic_dir, tmp_path, capsys, extra, message):
    (tmp_path / "space.yaml").write_text("lora_alpha: {type: int, low: 8, high: 64}\n")
    extra = tuple(str(tmp_path / "space.yaml") if e == "SPACE" else e for e in extra)
    assert cli.main(args(tiny_models, topic_dir, tmp_path / "study", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "study").exists()


def test_output_is_required_and_never_a_foreign_directory(tiny_models, topic_dir, tmp_path, capsys):
    assert cli.main(["tune", "--data", str(topic_dir), "--model", str(tiny_models["bert"]), "--quiet"]) == 2
    assert "adaptext tune needs --output DIR" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert cli.main(args(tiny_models, topic_dir, tmp_path / "mine")) == 2
    assert "is not an adaptext tune directory" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_missing_optuna_says_how_to_install(tiny_models, topic_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError
    assert cli.main(args(tiny_models, topic_dir, tmp_path / "study")) == 2
    assert "pip install 'adaptext[tune]' (or pip install optuna)" in capsys.readouterr().err


def test_default_space_follows_the_method_and_the_model_depth():
    def space(method, fixed=(), depth=6, **options):
        return tune_space.default_space(config.TrainConfig(method=method, **options), depth, frozenset(fixed))

    lora = space("lora")
    assert list(lora) == ["lr", "lora_r", "alpha_per_r", "lora_dropout", "top_layers"]
    assert (lora["lr"].low, lora["lr"].high, lora["lr"].log) == (pytest.approx(4e-4), pytest.approx(1e-2), True)
    assert lora["lora_r"].choices == (4, 8, 16, 32) and lora["top_layers"].choices == (0, 1, 2, 3, 4)
    assert list(space("head")) == list(space("ia3")) == list(space("bitfit")) == list(space("prompt")) == ["lr"]
    assert list(space("full")) == ["lr", "top_layers"] and list(space("vera")) == ["lr", "lora_dropout", "top_layers"]
    assert list(space("lora", fixed=("lr", "lora_alpha"))) == ["lora_r", "lora_dropout", "top_layers"]
    assert "top_layers" not in space("lora", layers=[4, 5]) and "top_layers" not in space("lora", depth=1)
    assert space("lora", lr=0.5)["lr"].high == 0.5  # never past what --lr accepts
    assert tune_space.top_layer_choices(12) == [0, 1, 2, 4, 6, 8] and tune_space.top_layer_choices(2) == [0, 1]


def test_trial_options_and_direction(tmp_path):
    cfg = tune_space.trial_options(
        config.TrainConfig(), {"lora_r": 16, "alpha_per_r": 4, "top_layers": 0}, tmp_path / "t"
    )
    assert (cfg.lora_r, cfg.lora_alpha, cfg.top_layers, cfg.output, cfg.overwrite) == (
        16,
        64,
        None,
        str(tmp_path / "t"),
        True,
    )
    with pytest.raises(AdaptextError, match="--top-layers does not apply to --method head"):
        tune_space.trial_options(config.TrainConfig(method="head"), {"top_layers": 1}, tmp_path)
    assert [tune.direction(m) for m in ("loss", "mse", "rmse", "mae")] == ["minimize"] * 4
    assert [tune.direction(m) for m in ("accuracy", "macro_f1", "weighted_f1")] == ["maximize"] * 3


def test_preset_takes_a_yaml_path_or_a_shipped_name(tmp_path):
    (tmp_path / "mine.yaml").write_text("description: mine\nlr: 1.0e-3\nlora_r: 4\n")
    assert option_files.load_preset(str(tmp_path / "mine.yaml")) == {"lr": 1e-3, "lora_r": 4}
    with pytest.raises(AdaptextError, match=r"unknown preset 'bert'; .* \(or give the path of a .yaml file"):
        option_files.load_preset("bert")
