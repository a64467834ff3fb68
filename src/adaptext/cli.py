"""Command line: a table of subcommands mapped to the plain functions in adaptext.api.

Each command imports what it runs inside its function (lazy: `adaptext --help` and argument errors answer
without loading torch); nothing here is imported lazily to break an import cycle.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from adaptext import config, option_files, options
from adaptext.errors import AdaptextError


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; unset flags stay absent so YAML values are not overridden."""
    for f in dataclasses.fields(config.TrainConfig):
        kind = config.field_types()[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata.get("help")}
        if kind.base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind.is_list:
            kwargs["type"] = _int_list if kind.base is int else _str_list
            kwargs["metavar"] = "A,B"
        else:
            kwargs["type"] = kind.base
        parser.add_argument(_flag(f.name), **kwargs)


def _size_list(value: Any) -> list[str] | None:
    """train_sizes from the command line or YAML: "8/class,500" or a list."""
    if value is None:
        return None
    return _str_list(value) if isinstance(value, str) else [str(v) for v in value]


def _str_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in _str_list(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


COMMAND_KEYS = ("command", "config", "func", "quiet", "preset", "methods", "seeds", "set", "train_sizes")
TUNE_KEYS = ("trials", "timeout", "study_name", "storage", "pruner", "space", "sampler_seed")


def gather_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Preset, then config file, then command-line flags (later wins): training options and study keys."""
    values = option_files.load_preset(args.preset) if getattr(args, "preset", None) else {}
    if args.config:
        values.update(option_files.load_file(args.config))
    values.update(given_flags(args))
    return option_files.split_study(values)


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The training options typed on the command line (unset flags are absent: argparse.SUPPRESS)."""
    return {k: v for k, v in vars(args).items() if k not in COMMAND_KEYS + TUNE_KEYS}


def cmd_train(args: argparse.Namespace) -> int:
    from adaptext import api

    values, _ = gather_options(args)
    outcome = api.train(options.from_dict(values, source=args.config or "arguments"), progress=not args.quiet)
    if not values.get("data"):  # the built-in set: show a few of its test headlines classified
        _show_samples(outcome.output)
    return 0


def _show_samples(output: Path) -> None:
    from adaptext import data
    from adaptext.predict import load

    texts = data.load_eval_split(str(data.demo_data_dir()), "test", load_labels(output), None, None).texts[:5]
    for row, text in zip(load(output).predict(texts), texts):
        print(f"  {row['label']:<10} {row['score']:.2f}  {text[:90]}")


def load_labels(output: Path) -> list[str]:
    from adaptext import artifacts

    return artifacts.class_names_of(artifacts.read_labels(output))


def cmd_compare(args: argparse.Namespace) -> int:
    from adaptext import compare

    values, study = gather_options(args)
    if args.methods is not None:
        study["methods"] = args.methods
    if args.seeds is not None:
        study["seeds"] = args.seeds
    if args.train_sizes is not None:
        study["train_sizes"] = args.train_sizes
    unknown = set(study.get("arms") or {}) - set(compare.ARMS)
    if not isinstance(study.get("arms") or {}, dict) or unknown:
        raise AdaptextError(f"arms: expected a mapping of method -> options (unknown: {', '.join(sorted(unknown))})")
    base = options.validate(options.from_dict(values, source=args.config or "arguments"))
    output = Path(base.output) if base.output else Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S")
    seeds = study.get("seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool):
        raise AdaptextError(f"seeds: expected a whole number (got {seeds!r})")
    plan = compare.Study(
        base=base,
        methods=list(study.get("methods") or compare.DEFAULT_METHODS),
        seeds=seeds,
        overrides=compare.parse_overrides(args.set, study.get("arms")),
        output=output,
        train_sizes=compare.parse_sizes(_size_list(study.get("train_sizes"))),
    )
    compare.run_study(plan, progress=not args.quiet)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from adaptext import tune

    values, _ = gather_options(args)  # a preset's compare arms (methods, seeds) do not apply to a search
    base = options.validate(options.from_dict(values, source=args.config or "arguments"))
    plan = tune.Plan(
        base=base,
        output=Path(base.output) if base.output else Path(),
        trials=args.trials,
        timeout=args.timeout,
        study_name=args.study_name,
        storage=args.storage,
        pruner=args.pruner,
        space_file=args.space,
        sampler_seed=args.sampler_seed,
        fixed=frozenset(given_flags(args)),
    )
    tune.run_study(plan, progress=not args.quiet)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from adaptext import evaluation
    from adaptext.metrics import format_report

    metrics = evaluation.evaluate(args.model, args.data, args.split, args.text_column, args.label_column,
                                  args.batch_size, args.save, args.data_subset, args.encoding, args.limit, args.base,
                                  backend=args.backend, precision=args.precision)  # fmt: skip
    if args.json:
        print(json.dumps(metrics))
    else:
        print(format_report(metrics))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from adaptext.outputs import result_line, write_predictions
    from adaptext.predict import load

    if args.texts and args.input:
        raise AdaptextError("give texts as arguments or --input FILE, not both")
    if args.input:
        return _predict_bulk(args)
    for flag in ("resume", "keep_columns", "chunk_rows"):
        if getattr(args, flag):
            raise AdaptextError(f"--{flag.replace('_', '-')} applies to --input FILE; give the texts as a file")
    if args.texts:
        texts = args.texts
    else:
        raw = sys.stdin.buffer.read()
        try:
            texts = [line for line in raw.decode("utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as exc:
            raise AdaptextError(f"stdin is not valid UTF-8 (bad byte at position {exc.start}); re-encode it") from None
    classifier = load(
        args.model, batch_size=args.batch_size, precision=args.precision, base=args.base, backend=args.backend
    )
    results = classifier.predict(texts, top_k=args.top_k)
    # Every output says what computed it: bf16 and fp32 can differ in the last digits (adaptext.precision).
    precision = classifier.precision
    if args.output:
        write_predictions(Path(args.output), texts, results, classifier.class_names, precision)
        print(f"wrote {len(results)} predictions to {args.output} ({precision})")
    elif args.json:
        for text, row in zip(texts, results):
            print(json.dumps({"text": text, **row, "precision": precision}, ensure_ascii=False))
    else:
        for text, row in zip(texts, results):
            print(result_line(row, text))
        print(f"precision: {precision}", file=sys.stderr)
    return 0


def _predict_bulk(args: argparse.Namespace) -> int:
    """--input: read, score and write a chunk at a time (adaptext.bulk), whatever the input's size."""
    from adaptext import bulk
    from adaptext.bulk_input import CHUNK_ROWS, Source

    source = Source(
        args.input,
        args.text_column,
        args.keep_columns,
        args.encoding,
        CHUNK_ROWS if args.chunk_rows is None else args.chunk_rows,
    )
    job = bulk.Job(model=args.model, source=source, output=Path(args.output) if args.output else None,
                   top_k=args.top_k, batch_size=args.batch_size, precision=args.precision, base=args.base,
                   backend=args.backend, resume=args.resume, workers=args.workers, as_json=args.json,
                   progress=not args.quiet, engine=args.engine)  # fmt: skip
    summary = bulk.run(job)
    if args.output:
        print(summary.line())
    else:
        print(summary.line().replace("wrote", "printed", 1), file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from adaptext.export import export

    result = export(args.model, args.format, args.output, args.quantize, args.opset)
    for name, size in sorted(result.report["files"].items(), key=lambda item: ".int8." in item[0]):  # fp32 first
        parity = result.report["parity"]["int8" if ".int8." in name else "fp32"]
        print(
            f"wrote {result.folder / name} ({size / 2**20:.1f} MiB; max |logit difference| from torch "
            f"{parity['max_abs_logit_diff']:.2g}, same label on {parity['same_label']:.0%} of probe texts)"
        )
    print(f"wrote {result.folder / 'export.json'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from adaptext.serve.app import Limits, ServeOptions

    for flag in ("max_texts", "max_text_chars", "max_body_bytes", "max_batch_rows", "batch_size", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise AdaptextError(f"{_flag(flag)} {getattr(args, flag)}: must be at least 1")
    if args.max_wait_ms < 0:
        raise AdaptextError(f"--max-wait-ms {args.max_wait_ms}: must be 0 or more")
    if not 0 <= args.port <= 65535:
        raise AdaptextError(f"--port {args.port}: use 0 to 65535 (0 picks a free port)")
    token = args.token or os.environ.get("ADAPTEXT_SERVE_TOKEN") or None
    limits = Limits(args.max_body_bytes, args.max_texts, args.max_text_chars)
    options = ServeOptions(token, limits, args.max_batch_rows, args.max_wait_ms, args.batching)
    try:
        _serve(args, options)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl+C it shut down on: a normal stop
        print("stopped", flush=True)
    return 0


def _serve(args: argparse.Namespace, options: Any) -> None:
    from adaptext.serve.server import run

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    run(args.adapters, args.host, args.port, args.allow_dir or [], options, args.device, args.precision,
        args.batch_size, args.log_level)  # fmt: skip


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        help="start from a shipped recipe (" + ", ".join(option_files.preset_names()) + ") or a .yaml file such as "
        "a tune study's best.yaml",
    )
    p.add_argument("--config", help="YAML/JSON file of options; flags given on the command line win")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(p)


PRECISION_HELP = config.field_help()["precision"] + " The output says which computed it."
BACKEND_HELP = "torch (default), onnx or onnx-int8: ONNX Runtime on the CPU, after adaptext export"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaptext", description="Fine-tune transformers for text classification with LoRA, evaluate, and predict."
    )
    from adaptext import __version__

    parser.add_argument("--version", action="version", version=f"adaptext {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, help_text in (
        ("train", "fine-tune a model (no --data: the built-in demo set)"),
        ("demo", "train on the built-in news-headline set and show predictions"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(p)
        p.set_defaults(func=cmd_train)

    help_text = "compare training methods (zero, head, PEFT methods, full) on identical data; resumable"
    p = sub.add_parser("compare", help=help_text, description=help_text)
    p.add_argument(
        "--methods",
        type=_str_list,
        metavar="A,B",
        help="arms to run: zero, "
        + ", ".join(config.METHODS)
        + ", setfit (the SetFit library on the same splits; pip install 'adaptext[setfit]')"
        + " (default: "
        + ",".join(["zero", "head", "lora", "ia3", "full"])
        + ")",
    )
    p.add_argument(
        "--seeds", type=int, help="runs per arm with seeds --seed, --seed+1, ... (default 1); mean and std are reported"
    )
    p.add_argument(
        "--train-sizes",
        type=_str_list,
        metavar="A,B",
        help="a learning curve: every arm at every training size, N or N/class (e.g. 8/class,64/class,500); each "
        "seed draws its own split (the same for every arm); the report plots accuracy against labelled examples",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="METHOD.OPTION=VALUE",
        help="per-arm override, e.g. --set ia3.lr=0.01 (repeatable)",
    )
    _add_common(p)
    p.set_defaults(func=cmd_compare)

    help_text = "search hyper-parameters with Optuna (SQLite study, resumable, median pruning); best config as a preset"
    p = sub.add_parser("tune", help=help_text, description=help_text)
    p.add_argument("--trials", type=int, default=20, help="finished trials the study should have (default 20)")
    p.add_argument("--timeout", type=float, help="start no new trial after this many seconds")
    p.add_argument("--study-name", help="Optuna study name (default: the output directory's name)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUTPUT/study.db)")
    p.add_argument(
        "--pruner", default="median", choices=("median", "none"), help="stop trials worse than the median (default)"
    )
    p.add_argument(
        "--space",
        metavar="FILE",
        help="YAML of searched options, e.g. lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}; "
        "merged over the default space (option: null drops one)",
    )
    p.add_argument("--sampler-seed", type=int, help="seed of the TPE sampler (default: --seed)")
    _add_common(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("evaluate", help="metrics of a trained model on a split or file")
    p.add_argument("--model", required=True, help="output directory of adaptext train")
    p.add_argument("--data", help="dataset (default: the one the model was trained on)")
    p.add_argument("--data-subset", help="Hub dataset configuration name")
    p.add_argument("--split", help="split to evaluate (default: test, else validation)")
    p.add_argument("--text-column", type=_str_list)
    p.add_argument("--label-column")
    p.add_argument("--encoding", default="utf-8")
    p.add_argument("--limit", type=int, help="evaluate a stratified sample of this many examples")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--base", help="base model to load the adapter onto (default: the one recorded at training)")
    p.add_argument("--save", help="also write eval_metrics.json and confusion_matrix.png into this folder")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--backend", default="torch", help=BACKEND_HELP)
    p.add_argument("--precision", default="auto", choices=config.PRECISIONS, help=PRECISION_HELP)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify texts (arguments, stdin lines, or --input FILE)")
    p.add_argument("--model", required=True, help="output directory of adaptext train")
    p.add_argument("texts", nargs="*", help="texts to classify (default: one per line on stdin)")
    p.add_argument(
        "--input",
        help="CSV/TSV/JSONL/Parquet file, folder or glob of them, with a text column (read a chunk at a time)",
    )
    p.add_argument("--text-column", type=_str_list, help="the text column(s), comma-separated (default: detected)")
    p.add_argument("--keep-columns", type=_str_list, help="--input columns to copy into the output (e.g. id)")
    p.add_argument("--output", help="write predictions to this .csv, .jsonl or .parquet file")
    p.add_argument("--resume", action="store_true", help="continue an interrupted --input run from its finished parts")
    p.add_argument(
        "--workers", type=int, default=1, help="--input: score in this many processes (the cores shared out)"
    )
    p.add_argument("--chunk-rows", type=int, help="--input: rows read, scored and saved at a time (default 4096)")
    p.add_argument("--encoding", default="utf-8", help="--input: text encoding of CSV/TSV/JSONL files")
    p.add_argument("--quiet", action="store_true", help="--input: no progress on stderr")
    p.add_argument(
        "--engine", default="local", choices=("local", "ray"),
        help="--input: local (this machine's processes) or ray (Ray Data actors: a local cluster, or RAY_ADDRESS's)",
    )  # fmt: skip
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--base", help="base model to load the adapter onto (default: the one recorded at training)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="auto", choices=config.PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--json", action="store_true", help="one JSON object per text on stdout")
    p.add_argument("--backend", default="torch", help=BACKEND_HELP)
    p.set_defaults(func=cmd_predict)

    help_text = "export a trained model to ONNX (LoRA merged, optional int8), checked against torch"
    p = sub.add_parser("export", help=help_text, description=help_text)
    p.add_argument("--model", required=True, help="output directory of adaptext train")
    p.add_argument("--format", default="onnx", help="onnx (the only format so far)")
    p.add_argument("--quantize", help="int8: also write model.int8.onnx (dynamic quantisation of the weights)")
    p.add_argument("--output", help="folder for model.onnx, model.int8.onnx and export.json (default MODEL/onnx)")
    p.add_argument("--opset", type=int, help="ONNX opset, 14 to 20 (default 17)")
    p.set_defaults(func=cmd_export)

    help_text = "serve many adapters on one base model over HTTP (JSON API, /metrics, a page to try them)"
    p = sub.add_parser("serve", help=help_text, description=help_text)
    p.add_argument(
        "--adapters",
        nargs="+",
        required=True,
        metavar="[NAME=]DIR",
        help="adapter directories written by adaptext train, or folders of them; hot-loads may come from these too",
    )
    p.add_argument("--allow-dir", action="append", metavar="DIR", help="another folder adapters may be hot-loaded from")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--token",
        help="bearer token every /v1 request must carry; enables the admin endpoints (or ADAPTEXT_SERVE_TOKEN)",
    )
    p.add_argument("--max-texts", type=int, default=64, help="texts per request (default 64)")
    p.add_argument("--max-text-chars", type=int, default=10_000, help="characters per text (default 10,000)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size (default 1 MiB)")
    p.add_argument(
        "--max-batch-rows",
        "--max-batch-texts",  # the old name: it counted texts, and a long text may be many windows
        dest="max_batch_rows",
        type=int,
        default=64,
        help="model rows per micro-batch: one per text, or one per window of a --long-text sliding model; a request "
        "with more rows runs this many at a time (default 64; --max-batch-texts is an old name for it)",
    )
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests (5)")
    p.add_argument(
        "--batching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="micro-batch concurrent requests (--no-batching: one forward per request, the naive baseline)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward pass inside a micro-batch (default 64)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--precision", default="auto", choices=config.PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--threads", type=int, help="CPU threads for the model (default: torch's, one per core)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.quiet = getattr(args, "quiet", False)
    try:
        return args.func(args)
    except AdaptextError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
