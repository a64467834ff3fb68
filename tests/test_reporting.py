"""--report-to tensorboard,mlflow: logs written while training, for every task; missing packages refused
before any work; a crashed run keeps its logs; extras that fail after training cost a warning, not the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import adaptext
from adaptext import api
from adaptext.config import TrainConfig
from adaptext.errors import AdaptextError
from adaptext.options import validate
from conftest import TOPICS, run_cli
from test_tasks import write_mixed_dir

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory) -> Path:
    return write_mixed_dir(tmp_path_factory.mktemp("mixed"), 80, 20)


@pytest.fixture(autouse=True)
def local_mlflow(monkeypatch):
    """The local store in OUTPUT, whatever the machine running the tests is set up to log to."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


def train(model_dir: Path, data_dir: Path, output: Path, lines: list[str] | None = None, **kw):
    settings = dict(
        data=str(data_dir), model=str(model_dir), output=str(output), epochs=2, batch_size=8, max_length=32,
        lr=0.02, seed=3, log_every=2, checkpoint_steps=0, min_steps=0,  # these count evaluations
    )  # fmt: skip
    settings.update(kw)
    echo = lines.append if lines is not None else (lambda line: None)
    return api.train(progress=False, echo=echo, **settings)


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_runs(output: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{output.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("adaptext")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_report_to_is_checked_and_tensorboard_is_its_alias():
    assert validate(TrainConfig(tensorboard=True)).report_to == ["tensorboard"]
    assert validate(TrainConfig(report_to=["mlflow", "tensorboard", "mlflow"])).report_to == ["mlflow", "tensorboard"]
    assert validate(TrainConfig(report_to=[])).report_to is None
    with pytest.raises(AdaptextError, match=r"^--report-to 'wandb' is not one of tensorboard, mlflow$"):
        validate(TrainConfig(report_to=["wandb"]))


def test_multi_label_logs_every_evaluation_to_tensorboard_while_it_trains(tiny_models, mixed_dir, tmp_path):
    output = tmp_path / "multi"
    seen_live: list[int] = []

    def on_eval(record):  # the events are on disk when the evaluation is, not only once training ends
        (live,) = (output / "runs").iterdir()
        seen_live.append(len(scalars(live)["validation/micro_f1"]))

    outcome = train(
        tiny_models["bert"],
        mixed_dir,
        output,
        label_column="topics",
        task="multi-label",
        report_to=["tensorboard"],
        on_eval=on_eval,
    )
    assert seen_live == [1, 2]
    (folder,) = (output / "runs").iterdir()
    logged = scalars(folder)
    history = outcome.metrics["history"]
    assert [step for step, _ in logged["validation/micro_f1"]] == [r["step"] for r in history]
    assert [value for _, value in logged["validation/micro_f1"]] == pytest.approx([r["micro_f1"] for r in history])
    assert logged["train/loss"] and "train/lr" in logged and "validation/subset_accuracy" in logged
    assert logged["final/test/micro_f1"][0][1] == pytest.approx(outcome.metrics["test"]["micro_f1"])
    assert adaptext.load(output).predict(["match goal bank"])[0]["labels"] is not None


def test_regression_logs_to_a_local_mlflow_store(tiny_models, mixed_dir, tmp_path):
    output = tmp_path / "regression"
    outcome = train(
        tiny_models["bert"], mixed_dir, output, label_column="score", task="regression", report_to=["mlflow"]
    )
    client, runs = mlflow_runs(output)
    (run,) = runs
    assert run.info.status == "FINISHED" and run.info.run_name == "regression"
    assert run.data.params["method"] == "lora" and run.data.params["report_to"] == "mlflow"
    rmse = client.get_metric_history(run.info.run_id, "validation/rmse")
    assert [(m.step, m.value) for m in rmse] == [
        (r["step"], pytest.approx(r["rmse"])) for r in outcome.metrics["history"]
    ]
    assert client.get_metric_history(run.info.run_id, "train/loss")
    assert run.data.metrics["final/test/r2"] == pytest.approx(outcome.metrics["test"]["r2"])
    assert isinstance(adaptext.load(output).predict(["match goal"])[0]["value"], float)


def test_a_crashed_run_keeps_its_logs_and_its_resumption_adds_to_them(tiny_models, topic_dir, tmp_path):
    output = tmp_path / "crashed"
    evals = []

    def crash_at_the_second_evaluation(record):
        evals.append(record)
        if len(evals) == 2:
            raise RuntimeError("power cut")

    both = ["tensorboard", "mlflow"]
    with pytest.raises(RuntimeError, match="power cut"):
        train(tiny_models["bert"], topic_dir, output, report_to=both, on_eval=crash_at_the_second_evaluation)
    assert not (output / "adaptext.json").exists()
    (folder,) = (output / "runs").iterdir()
    assert [step for step, _ in scalars(folder)["validation/accuracy"]] == [r["step"] for r in evals]
    assert [run.info.status for run in mlflow_runs(output)[1]] == ["FAILED"]

    lines: list[str] = []
    train(tiny_models["bert"], topic_dir, output, lines, report_to=both, resume=True)
    assert any(line.startswith("resume:") for line in lines)
    assert len(list((output / "runs").iterdir())) == 2  # both attempts' event folders
    assert [run.info.status for run in mlflow_runs(output)[1]] == ["FAILED", "FINISHED"]
    assert (output / "adaptext.json").is_file() and not (output / "checkpoint").exists()


def test_tensorboard_alias_through_the_cli(tiny_models, topic_dir, tmp_path):
    output = tmp_path / "cli"
    result = run_cli(
        "train", "--data", str(topic_dir), "--model", str(tiny_models["bert"]), "--output", str(output),
        "--epochs", "1", "--min-steps", "0", "--batch-size", "8", "--max-length", "32", "--log-every", "2",
        "--tensorboard", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "report: tensorboard" in result.stdout
    (folder,) = (output / "runs").iterdir()
    logged = scalars(folder)
    assert len(logged["validation/accuracy"]) == 1 and len(logged["validation/macro_f1"]) == 1 and logged["train/loss"]
    assert json.loads((output / "metrics.json").read_text())["test"]["accuracy"] >= 0


BLOCKED = """
import sys
class Refuse:  # as if the package were not installed: import and importlib.util.find_spec both fail
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == sys.argv[1]:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Refuse())
from adaptext.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(
    ("package", "flags"), [("tensorboard", ["--tensorboard"]), ("mlflow", ["--report-to", "mlflow"])]
)
def test_a_missing_package_is_refused_before_anything_runs(tiny_models, topic_dir, tmp_path, package, flags):
    output = tmp_path / "refused"
    args = ["train", "--data", str(topic_dir), "--model", str(tiny_models["bert"]), "--output", str(output), *flags]
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED, package, *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: --report-to {package} needs the {package} package; pip install {package}\n"
    assert "data:" not in result.stdout and "epoch" not in result.stdout  # refused before the data was read
    assert not output.exists()


def test_a_failing_extra_costs_a_warning_not_the_model(tiny_models, topic_dir, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(api, "save_confusion_png", full_disk)
    monkeypatch.setattr(api, "model_card", full_disk)
    lines: list[str] = []
    output = tmp_path / "extras"
    train(tiny_models["bert"], topic_dir, output, lines, epochs=1)
    warnings = [line for line in lines if line.startswith("warning: could not write")]
    assert warnings == [
        f"warning: could not write {what} (OSError: [Errno 28] No space left on device): the model is saved"
        for what in ("the model card", "the confusion matrix plot")
    ]
    assert lines[-1] == f"saved: {output}"
    assert not (output / "confusion_matrix.png").exists() and not (output / "README.md").exists()
    assert adaptext.load(output).predict(["goal match team"])[0]["label"] in TOPICS
