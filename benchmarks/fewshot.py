"""Few labels: adaptext's defaults against SetFit on the same splits, as learning curves (issue #17).

    python benchmarks/fewshot.py --output fewshot-study                 # 4 datasets, 8/class, 3 splits (~45 min, 2 cores)
    python benchmarks/fewshot.py --sizes 8/class,64/class --datasets emotion --output curve
    python benchmarks/fewshot.py --quick --output quick                 # CI-sized: 2 datasets, 4/class, 1 split

Each dataset is one ``adaptext compare --methods lora,setfit --train-sizes ... --seeds N --seed 1
--test-size 1000`` (resumable: a re-run skips finished runs). SST-2's test labels are not public: its
validation split serves as the test split (a folder of links is made in the output). The table gives
per dataset, size and arm the test accuracy (mean ± std over splits), the training time, and SetFit's
published MiniLM figure where there is one; the last column is adaptext minus SetFit in points,
measured in the same run. ``--json`` writes every figure; ``--markdown`` the table for docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from adaptext import compare, config, options

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = ("ag_news", "emotion", "trec", "sst2")
# SetFit paper's released results on all-MiniLM-L6-v2, 8 per class (../shared/ANCHORS.md).
PUBLISHED_MINILM = {("ag_news", "8/class"): 0.831, ("emotion", "8/class"): 0.391}


def data_folder(name: str, data_dir: Path, scratch: Path) -> Path:
    """The dataset as `adaptext compare` reads it; SST-2 gets its validation split as test (links)."""
    source = data_dir / name
    if name != "sst2" or (source / "test.parquet").exists():
        return source
    folder = scratch / "sst2-validation-as-test"
    folder.mkdir(parents=True, exist_ok=True)
    for link, target in (("train.parquet", "train.parquet"), ("test.parquet", "validation.parquet")):
        if not (folder / link).exists():
            (folder / link).symlink_to((source / target).resolve())
    return folder


def run(args: argparse.Namespace) -> dict:
    rows = []
    for name in args.datasets:
        folder = data_folder(name, args.data_dir, args.output / "data")
        base = options.validate(
            config.TrainConfig(
                data=str(folder), model=args.model, seed=1, test_size=args.test_size, max_length=args.max_length
            )
        )
        study = compare.Study(
            base=base, methods=args.methods, seeds=args.seeds, output=args.output / name, train_sizes=args.sizes
        )
        started = time.perf_counter()
        results = compare.run_study(study, echo=lambda line, n=name: print(f"{n}: {line}", flush=True))
        for arm in results["arms"]:
            rows.append({"dataset": name, **{k: arm.get(k) for k in (
                "method", "train_size", "status", "accuracy_mean", "accuracy_std", "macro_f1_mean", "accuracy_per_seed",
                "train_seconds_mean", "peak_rss_mb", "train_rows_mean", "at_or_below_chance", "chance_accuracy")}})  # fmt: skip
        print(f"{name}: done in {time.perf_counter() - started:.0f} s", flush=True)
    return {"rows": rows, "sizes": args.sizes, "seeds": args.seeds, "methods": args.methods, "model": args.model}


def table(study: dict) -> str:
    """Markdown: one line per dataset and size, the arms side by side, and adaptext - SetFit in points."""
    arms = [m for m in study["methods"]]
    header = ["data", "size"] + [f"{m} accuracy" for m in arms] + [f"{m} train s" for m in arms]
    header += ["SetFit published (MiniLM)", "adaptext − SetFit, points"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_key = {(r["dataset"], str(r["train_size"]), r["method"]): r for r in study["rows"]}
    for dataset in dict.fromkeys(r["dataset"] for r in study["rows"]):
        for size in study["sizes"]:
            cells = [dataset, str(size)]
            got = [by_key.get((dataset, str(size), m)) for m in arms]
            for r in got:
                if not r or r["status"] != "ok":
                    cells.append("failed" if r else "-")
                    continue
                flag = " ⚠ chance" if r["at_or_below_chance"] else ""
                per = ", ".join(f"{a:.3f}" for a in r["accuracy_per_seed"])
                cells.append(f"**{r['accuracy_mean']:.3f}** ± {r['accuracy_std']:.3f} ({per}){flag}")
            cells += [f"{r['train_seconds_mean']:.0f}" if r and r["status"] == "ok" else "-" for r in got]
            published = PUBLISHED_MINILM.get((dataset, str(size)))
            cells.append(f"{published:.3f}" if published and study["model"] == "minilm" else "–")
            ours = by_key.get((dataset, str(size), "lora"))
            peer = by_key.get((dataset, str(size), "setfit"))
            if ours and peer and ours["status"] == peer["status"] == "ok":
                cells.append(f"{100 * (ours['accuracy_mean'] - peer['accuracy_mean']):+.1f}")
            else:
                cells.append("–")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="study folder (one compare study per dataset)")
    parser.add_argument("--datasets", type=lambda s: s.split(","), default=list(DATASETS))
    parser.add_argument("--sizes", type=lambda s: compare.parse_sizes(s.split(",")), default=["8/class"])
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["lora", "setfit"])
    parser.add_argument("--seeds", type=int, default=3, help="splits per size (seeds 1, 2, ...)")
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data-dir", type=Path, default=SHARED)
    parser.add_argument("--quick", action="store_true", help="CI-sized: trec and sst2, 4/class, 1 split, 200 test")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets, args.sizes, args.seeds, args.test_size = ["trec", "sst2"], ["4/class"], 1, 200
    study = run(args)
    text = table(study)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(study, indent=2))
    if args.markdown:
        args.markdown.write_text(text + "\n")
    failed = [r for r in study["rows"] if r["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
