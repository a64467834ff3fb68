"""Training speed: adaptext vs a notebook and an expert transformers+peft pipeline, in one run.

Every pipeline trains the same model on the same examples with the same seed and epochs, each in its
own process (peak RSS is its own), one after the other. "wall s" is the whole process, from start to
exit: imports, data and model loading, tokenising, training, evaluating on the test set.

    python benchmarks/train_speed.py [--quick] [--cases agnews,imdb] [--json OUT.json]

Cases (datasets from ../shared/data unless --data-dir):
  agnews   MiniLM, AG News 1,250 train x 3 epochs, full 7,600 test (quick: 500 train, 2,000 test)
  imdb     MiniLM, IMDb 1,000 train x 3 epochs, max length 512, 2,000 test reviews
  mpnet    MPNet, AG News 1,250 x 1 epoch, 2,000 test (needs `pip install "adaptext[mpnet]"`)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from flops import Shape, best_peaks, describe_peaks, matmul_peaks, mfu, run_flops  # noqa: E402

CASES = {
    "agnews": {"data": "ag_news", "model": "minilm", "train_size": 1250, "epochs": 3, "test_size": None},
    "imdb": {"data": "imdb", "model": "minilm", "train_size": 1000, "epochs": 3, "test_size": 2000, "max_length": 512},
    "mpnet": {"data": "ag_news", "model": "mpnet", "train_size": 1250, "epochs": 1, "test_size": 2000},
}
QUICK = {"agnews": {"train_size": 500, "test_size": 2000, "notebook_steps": 30, "notebook_eval": 200}}
LORA_LR, HEAD_LR = 2e-3, 5e-3  # adaptext's defaults, given to the baselines too: only the pipeline differs


SEEDS_HELP = (
    "comma-separated seeds (default 42): the first gives every figure; each further one repeats the expert "
    "and adaptext LoRA runs of each case, to show how much of the accuracy gap is seed noise"
)


def seed_list(value: str) -> tuple[int, ...]:
    """``--seeds 42,1,2`` -> (42, 1, 2): distinct integers."""
    try:
        seeds = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of integers, e.g. 42,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{value!r} repeats a seed: give each seed once, e.g. 42,1,2")
    return seeds


def default_data_dir() -> Path:
    return HERE.parent.parent / "shared" / "data"


def run_json(cmd: list[str], label: str, keep: Path | None = None) -> dict:
    """Run one pipeline in a fresh process; its JSON plus the process's wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        print(f"  {label} ...", end="", flush=True)
        started = time.perf_counter()
        env = {**os.environ, "ADAPTEXT_BENCH_KEEP": str(keep)} if keep else None
        proc = subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise SystemExit(f"\n{label} failed (exit {proc.returncode}): " + " | ".join(tail))
        record = json.loads(out.read_text())
    record["wall_s"] = round(wall, 1)
    if record.get("projected"):  # a slow baseline stopped early: project its full training and test time
        record["measured_wall_s"] = record["wall_s"]
        record["wall_s"] = round(
            wall + record["projected_train_s"] - record["train_s"] + record["projected_eval_s"] - record["eval_s"], 1
        )
        record["train_s"] = record["projected_train_s"]
        print(f" {wall:.0f} s measured, {record['wall_s']:.0f} s projected for the full run", flush=True)
    else:
        print(f" {wall:.0f} s, test accuracy {record['test_accuracy']:.4f}", flush=True)
    return record


def lengths(case: dict, data_dir: Path) -> tuple[list[int], list[int], Shape]:
    """Real token counts of the training and validation examples every pipeline sees, and the model shape."""
    from adaptext import config, data, models
    from adaptext.batching import tokenize

    cfg = config.TrainConfig(data=str(data_dir / case["data"]), train_size=case["train_size"])
    splits = data.load_training_data(cfg).splits
    source = models.resolve_model(case["model"])
    tokenizer = models.load_tokenizer(source)
    max_length = case.get("max_length", 256)
    from transformers import AutoConfig

    shape = Shape.of(AutoConfig.from_pretrained(source.path))
    lens = {k: [len(x) for x in tokenize(tokenizer, splits[k].texts, max_length, "head+tail")] for k in splits}
    return lens["train"], lens["validation"], shape


def commands(case: dict, data_dir: Path, seed: int) -> tuple[list[str], list[str]]:
    """The baseline's command (hf_baseline.py, epochs given) and adaptext's (adaptext_run.py, no epochs)."""
    py = sys.executable
    data = str(data_dir / case["data"])
    common = ["--data", data, "--train-size", str(case["train_size"]), "--seed", str(seed), "--model", case["model"]]
    if case.get("test_size"):
        common += ["--test-size", str(case["test_size"])]
    if case.get("max_length"):
        common += ["--max-length", str(case["max_length"])]
    baseline = [py, str(HERE / "hf_baseline.py"), *common, "--epochs", str(case["epochs"])]
    return baseline, [py, str(HERE / "adaptext_run.py"), *common]


def run_case(
    name: str,
    case: dict,
    data_dir: Path,
    peaks: dict[str, float],
    keep: Path | None = None,
    seeds: tuple[int, ...] = (42,),
) -> dict:
    """All pipelines on one case with the first seed; ``keep`` saves adaptext's default model there (for
    infer_speed.py). Every further seed repeats the expert and adaptext LoRA runs (seed spread). Each
    run's MFU is against ``peaks[<the precision it recorded>]`` (flops.matmul_peaks)."""
    epochs = ["--epochs", str(case["epochs"])]
    baseline, ours = commands(case, data_dir, seeds[0])
    print(f"{name}: {case}", flush=True)
    runs = {}
    limits = []
    if case.get("notebook_steps"):
        limits = ["--max-steps", str(case["notebook_steps"]), "--eval-limit", str(case["notebook_eval"])]
    notebook = [*baseline, "--style", "notebook", "--method", "lora", "--lr", str(LORA_LR), *limits]
    runs["notebook"] = run_json(notebook, "notebook")
    runs["expert"] = run_json([*baseline, "--style", "expert", "--method", "lora", "--lr", str(LORA_LR)], "expert")
    runs["adaptext"] = run_json([*ours, *epochs], "adaptext", keep)
    runs["expert-head"] = run_json(
        [*baseline, "--style", "expert", "--method", "head", "--lr", str(HEAD_LR)], "expert head-only"
    )
    runs["adaptext-head"] = run_json([*ours, *epochs, "--method", "head"], "adaptext head-only")
    # Time to reach the expert's final accuracy: adaptext with fewer epochs, shortest first.
    target = runs["expert"]["test_accuracy"]
    reach = None
    for fewer in range(1, int(case["epochs"])):
        run = run_json([*ours, "--epochs", str(fewer)], f"adaptext {fewer} epoch(s)")
        runs[f"adaptext-{fewer}ep"] = run
        if run["test_accuracy"] >= target:
            reach = {"epochs": fewer, "wall_s": run["wall_s"]}
            break
    if reach is None and runs["adaptext"]["test_accuracy"] >= target:
        reach = {"epochs": case["epochs"], "wall_s": runs["adaptext"]["wall_s"]}

    train_lens, _, shape = lengths(case, data_dir)
    for run in runs.values():
        method = run.get("method", "lora")
        run_epochs = run.get("epochs", case["epochs"])
        cached = run.get("cached_layers", 0)
        # The cache's validation pass counts as evaluation (not in train_s), so only its train pass counts here.
        run["flops"] = run_flops(shape, train_lens, run_epochs, method, cached, train_lens)
    score(runs, peaks)
    expert, ours_run = runs["expert"], runs["adaptext"]
    summary = {
        "time_ratio_vs_expert": ours_run["wall_s"] / expert["wall_s"],
        "accuracy_delta_vs_expert_pt": 100 * (ours_run["test_accuracy"] - expert["test_accuracy"]),
        "time_to_expert_accuracy": reach,
        "head_speedup_vs_expert": runs["expert-head"]["train_s"] / runs["adaptext-head"]["train_s"],
        "head_wall_speedup_vs_expert": runs["expert-head"]["wall_s"] / runs["adaptext-head"]["wall_s"],
        "head_accuracy_delta_pt": 100 * (runs["adaptext-head"]["test_accuracy"] - runs["expert-head"]["test_accuracy"]),
    }
    summary["time_ratio_vs_notebook"] = ours_run["wall_s"] / runs["notebook"]["wall_s"]
    if not runs["notebook"].get("projected"):
        summary["accuracy_delta_vs_notebook_pt"] = 100 * (ours_run["test_accuracy"] - runs["notebook"]["test_accuracy"])
    pairs = [{"seed": seeds[0], "expert": expert, "adaptext": ours_run}]
    for seed in seeds[1:]:
        seed_baseline, seed_ours = commands(case, data_dir, seed)
        expert_cmd = [*seed_baseline, "--style", "expert", "--method", "lora", "--lr", str(LORA_LR)]
        pairs.append(
            {
                "seed": seed,
                "expert": run_json(expert_cmd, f"expert, seed {seed}"),
                "adaptext": run_json([*seed_ours, *epochs], f"adaptext, seed {seed}"),
            }
        )
    result = {"case": name, "settings": case, "runs": runs, "summary": summary}
    if len(pairs) > 1:
        result["seeds"] = seed_spread(pairs)
        summary["seeds"] = {k: v for k, v in result["seeds"].items() if k != "rows"}
    return result


def score(runs: dict, peaks: dict[str, float]) -> None:
    """(Re)compute every run's MFU against the peak of the precision it recorded (adaptext's resolved
    ``auto``, the expert's own bf16 test, the notebook's fp32)."""
    for run in runs.values():
        run["mfu"] = mfu(run["flops"], run["train_s"], run["precision"], peaks)


def seed_spread(pairs: list[dict]) -> dict:
    """Per seed, adaptext against the expert (test accuracy in points, wall-time ratio), and their mean
    and sample standard deviation: how much of one run's accuracy gap is seed noise."""
    rows = [
        {
            "seed": p["seed"],
            "expert_accuracy": p["expert"]["test_accuracy"],
            "adaptext_accuracy": p["adaptext"]["test_accuracy"],
            "accuracy_delta_pt": 100 * (p["adaptext"]["test_accuracy"] - p["expert"]["test_accuracy"]),
            "expert_wall_s": p["expert"]["wall_s"],
            "adaptext_wall_s": p["adaptext"]["wall_s"],
            "time_ratio": p["adaptext"]["wall_s"] / p["expert"]["wall_s"],
        }
        for p in pairs
    ]
    deltas = [r["accuracy_delta_pt"] for r in rows]
    ratios = [r["time_ratio"] for r in rows]
    return {
        "seeds": [r["seed"] for r in rows],
        "accuracy_delta_pt_mean": statistics.fmean(deltas),
        "accuracy_delta_pt_sd": statistics.stdev(deltas),
        "expert_accuracy_mean": statistics.fmean(r["expert_accuracy"] for r in rows),
        "adaptext_accuracy_mean": statistics.fmean(r["adaptext_accuracy"] for r in rows),
        "time_ratio_mean": statistics.fmean(ratios),
        "time_ratio_range": [min(ratios), max(ratios)],
        "rows": rows,
    }


def seed_table(spread: dict) -> str:
    """The per-seed comparison as Markdown, with its mean row."""
    lines = [
        "| seed | expert accuracy | adaptext accuracy | Δ points | expert wall s | adaptext wall s | wall ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in spread["rows"]:
        lines.append(
            f"| {r['seed']} | {r['expert_accuracy']:.4f} | {r['adaptext_accuracy']:.4f} | "
            f"{r['accuracy_delta_pt']:+.2f} | {r['expert_wall_s']:.0f} | {r['adaptext_wall_s']:.0f} | "
            f"{r['time_ratio']:.2f} |"
        )
    lo, hi = spread["time_ratio_range"]
    lines += [
        f"| mean | {spread['expert_accuracy_mean']:.4f} | {spread['adaptext_accuracy_mean']:.4f} | "
        f"{spread['accuracy_delta_pt_mean']:+.2f} | | | {spread['time_ratio_mean']:.2f} |",
        "",
        f"- over {len(spread['rows'])} seeds: accuracy {spread['accuracy_delta_pt_mean']:+.2f} ± "
        f"{spread['accuracy_delta_pt_sd']:.2f} points (mean ± sample SD of the per-seed gaps), "
        f"wall ratio {spread['time_ratio_mean']:.2f} ({lo:.2f}–{hi:.2f})",
    ]
    return "\n".join(lines) + "\n"


def _acc(run: dict, key: str) -> str:
    return "— (projected)" if run.get("projected") else f"{run[key]:.4f}"


def table(result: dict) -> str:
    rows = [
        "| pipeline | method | precision | wall s | train s | train samples/s | real tokens/s | padding "
        "| peak RSS MB | MFU | test accuracy | macro-F1 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in result["runs"].items():
        rows.append(
            f"| {key} | {r.get('method', 'lora')}{' (' + r['feature_cache'].split(' (')[0] + ')' if r.get('cached_layers') else ''} "
            f"| {r['precision']} | {r['wall_s']:.0f} | {r['train_s']:.1f} | {r['train_samples_per_s']:.1f} | "
            f"{r['train_real_tokens_per_s']:,.0f} | {r['padding_fraction']:.0%} | {r['peak_rss_mb']:,.0f} | "
            f"{r['mfu']:.1%} | {_acc(r, 'test_accuracy')} | {_acc(r, 'test_macro_f1')} |"
        )
    s = result["summary"]
    lines = [
        "",
        f"- adaptext / expert wall time: **{s['time_ratio_vs_expert']:.2f}**, accuracy "
        f"{s['accuracy_delta_vs_expert_pt']:+.2f} points",
    ]
    notebook = result["runs"]["notebook"]
    if notebook.get("projected"):
        note = (
            f" (notebook: {notebook['steps']} of {notebook['full_steps']} training steps and "
            f"{len(notebook['eval_batch_shapes'])} test batches measured, the full run's time projected from them)"
        )
    else:
        note = f", accuracy {s['accuracy_delta_vs_notebook_pt']:+.2f} points"
    lines.append(f"- adaptext / notebook wall time: **{s['time_ratio_vs_notebook']:.3f}**{note}")
    reach = s["time_to_expert_accuracy"]
    lines.append(
        f"- time to reach the expert's final accuracy ({result['runs']['expert']['test_accuracy']:.4f}): "
        + (
            f"adaptext {reach['wall_s']:.0f} s ({reach['epochs']} epoch(s)) vs expert "
            f"{result['runs']['expert']['wall_s']:.0f} s"
            if reach
            else "adaptext did not reach it"
        )  # fmt: skip
    )
    lines.append(
        f"- head-only: adaptext trains **{s['head_speedup_vs_expert']:.2f}x** faster than the expert's head-only "
        f"run (training phase; whole process {s['head_wall_speedup_vs_expert']:.1f}x), accuracy "
        f"{s['head_accuracy_delta_pt']:+.2f} points"
    )
    return "\n".join(rows + lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="AG News at 500 train / 2,000 test only")
    parser.add_argument("--cases", default=None, help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--seeds", type=seed_list, default=(42,), help=SEEDS_HELP)
    args = parser.parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    names = (args.cases or ("agnews" if args.quick else "agnews,imdb")).split(",")
    start = matmul_peaks("cpu")
    print(f"matmul peaks on this machine: {describe_peaks(start)} ({os.cpu_count()} cores)", flush=True)
    results = {"quick": args.quick, "cases": []}
    for name in names:
        case = {**CASES[name], **(QUICK.get(name, {}) if args.quick else {})}
        results["cases"].append(run_case(name, case, data_dir, start, seeds=args.seeds))
    # Measured again at the end, the best of both per precision (as run.py does; see flops.best_peaks).
    end = matmul_peaks("cpu")
    peaks = best_peaks(start, end)
    # peak_flops (the fp32 peak) stays for readers of older results; peaks has one entry per precision.
    results.update(peak_flops=peaks["fp32"], peaks=peaks, peak_measurements={"start": start, "end": end})
    print(f"matmul peaks used (best of start and end): {describe_peaks(peaks)}", flush=True)
    for result in results["cases"]:
        score(result["runs"], peaks)
        print(table(result), flush=True)
        if "seeds" in result:
            print(seed_table(result["seeds"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
