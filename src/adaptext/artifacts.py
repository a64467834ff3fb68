"""Write and read the output directory: a standard PEFT adapter directory plus adaptext's metadata.

Layout (peft methods: lora, ia3, prompt...)::

    adapter_config.json, adapter_model.safetensors   # plain peft loads these (head included)
    tokenizer files, labels.json, adaptext.json       # label map; base model, resolved config
    metrics.json, train_log.jsonl, README.md          # results, per-step log, model card

Everything is written into a hidden sibling directory and renamed into place at the end, so a
crash or a bad input never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptext import options
from adaptext.config import TrainConfig
from adaptext.errors import AdaptextError
from adaptext.models import ModelSource, load_classifier, load_tokenizer, resolve_model
from adaptext.tasks import Task
from adaptext.windows import Windowing

FORMAT_VERSION = 1
META_FILE = "adaptext.json"
LABELS_FILE = "labels.json"
HEAD_FILE = "head_model.safetensors"
PARTIAL_METHODS = ("head", "bitfit")  # saved as the trained tensors only, on top of the base
MERGEABLE = ("lora", "dora", "rslora", "adalora", "ia3", "loha", "lokr")  # folded into the weights at load
UNLOADABLE = ("lora", "dora", "rslora", "adalora")  # ...and unwrapped into a plain transformers model


LIBRARIES = ("adaptext", "torch", "transformers", "peft", "datasets", "accelerate", "safetensors", "scikit-learn")


def peak_rss_mb() -> float:
    """This process's peak resident memory (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def library_versions() -> dict[str, str]:
    """The versions a run records beside its results (adaptext.json, results.json, export.json)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def is_peft(method: str) -> bool:
    return method not in PARTIAL_METHODS and method != "full"


def check_output(output: str | Path, overwrite: bool) -> Path:
    """Refuse to clobber an existing directory unless asked; fail before any training is done.
    Missing parent folders are fine: ``staged_dir`` creates them."""
    path = Path(output).expanduser()
    if path.exists() and not path.is_dir():
        raise AdaptextError(f"output {str(path)!r} exists and is a file; choose another --output")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise AdaptextError(f"output directory {str(path)!r} already exists; pass --overwrite to replace it")
    check_parents(path)
    return path


def check_parents(path: Path) -> None:
    """Missing folders above ``path`` are made in the nearest one that exists: it must be a writable folder."""
    existing = next(p for p in path.resolve().parents if p.exists())
    if not existing.is_dir():
        raise AdaptextError(f"cannot write {str(path)!r}: {str(existing)!r} is a file; choose another --output")
    if not os.access(existing, os.W_OK):
        raise AdaptextError(f"cannot write {str(path)!r}: folder {str(existing)!r} is not writable")


@contextlib.contextmanager
def staged_dir(output: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``output``; on success swap it into place, on failure delete it."""
    output = output.resolve()
    # `--output runs/exp1/model` works like Trainer's output_dir. Folders made here stay if the run
    # fails; the output itself only ever appears complete.
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.partial-"))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like mkdir's
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.old-"))
        os.replace(output, old / "dir")
    os.replace(staging, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` (same suffix) to write; renamed over ``path`` when the block ends
    without an error, removed otherwise. Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def label_map(
    class_names: list[str], pad_token_id: int, problem_type: str = "single_label_classification"
) -> dict[str, Any]:
    return {
        "id2label": {str(i): n for i, n in enumerate(class_names)},
        "label2id": {n: i for i, n in enumerate(class_names)},
        "num_labels": len(class_names),
        "problem_type": problem_type,
        "pad_token_id": pad_token_id,
    }


def save_model(model: nn.Module, tokenizer: Any, folder: Path, method: str, head_modules: list[str]) -> None:
    """Weights in safetensors only: a PEFT adapter (+head), the head alone, or the full model."""
    if is_peft(method):
        # adaptext never resizes the vocabulary; peft's "auto" would ask the Hub for the base's config
        # to check (the base is named by its Hub id for aliases).
        model.save_pretrained(folder, save_embedding_layers=False)
        # peft writes a stub README; adaptext writes its own model card later.
        (folder / "README.md").unlink(missing_ok=True)
    elif method in PARTIAL_METHODS:
        from safetensors.torch import save_file

        # Exactly what was trained: the head, plus every bias for bitfit.
        state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(state, str(folder / HEAD_FILE))
    else:
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


class SavedSettings:
    """What a saved model's ``adaptext.json`` (``self.meta``) says about using it: shared by the
    reloaded model and by each adapter ``serve`` holds."""

    meta: dict[str, Any]  # as read_meta returns it (migrated)

    @functools.cached_property
    def config(self) -> TrainConfig:
        """The training options the model was saved with (typed; built once: predict and serve read it per call)."""
        return options.saved_config(self.meta["config"])

    @property
    def max_length(self) -> int:
        return self.config.max_length

    @property
    def long_text(self) -> str:
        return self.config.long_text

    @property
    def windowing(self) -> Windowing:
        """How texts become rows and rows pool back, as at training time."""
        return Windowing.from_config(self.config)

    @property
    def task(self) -> Task:
        """Single-label, multi-label (with its thresholds) or regression, as trained."""
        return Task.from_meta(self.meta)


@dataclass
class LoadedModel(SavedSettings):
    """A trained classifier ready for inference."""

    model: nn.Module
    tokenizer: Any
    meta: dict[str, Any]
    class_names: list[str]
    folder: Path


def read_meta(folder: Path) -> dict[str, Any]:
    meta_path = folder / META_FILE
    if not folder.is_dir():
        raise AdaptextError(f"model directory {str(folder)!r} not found; pass the --output of adaptext train")
    if not meta_path.is_file():
        raise AdaptextError(
            f"{str(folder)!r} is not an adaptext output directory (no {META_FILE}); "
            "pass a directory written by adaptext train"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdaptextError(f"{meta_path} is corrupt; retrain or restore it") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdaptextError(f"{folder} was written by a newer adaptext; upgrade adaptext to load it")
    return migrate_meta(meta)


# What a model saved before a setting was recorded did (see options.SAVED_BEFORE for the training options).
META_SAVED_BEFORE: dict[str, Any] = {"pooling": "native", "task": {"kind": "single-label"}, "base_fingerprint": {}}


def migrate_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """adaptext.json as this version reads it: every setting present, older files filled in explicitly,
    so nothing downstream guesses with ``.get(key, default)``."""
    return {**META_SAVED_BEFORE, **meta, "config": options.saved_config(meta["config"]).to_dict()}


def read_labels(folder: Path) -> dict[str, Any]:
    """labels.json: id2label, label2id, num_labels, pad_token_id."""
    return json.loads((folder / LABELS_FILE).read_text(encoding="utf-8"))


def class_names_of(labels: dict[str, Any]) -> list[str]:
    """The class names in id order, from labels.json's content (its keys are strings: JSON)."""
    return [labels["id2label"][str(i)] for i in range(labels["num_labels"])]


def base_source(meta: dict[str, Any]) -> ModelSource:
    """The base model on this machine: alias first, then the recorded path, then the Hub id."""
    base = meta["base_model"]
    for candidate in (base["name"], base["path"], base.get("hub_id")):
        if not candidate:
            continue
        try:
            return resolve_model(candidate)
        except AdaptextError:
            continue
    raise AdaptextError(f"base model {base['name']!r} of this adapter is not available here; install or download it")


def load_model(
    folder: str | Path, device: torch.device | None = None, merge: bool = True, base: str | None = None
) -> LoadedModel:
    """Reload a trained classifier. ``merge`` folds LoRA into the weights for faster inference."""
    folder = Path(folder).expanduser()
    meta = read_meta(folder)
    labels = read_labels(folder)
    class_names = class_names_of(labels)
    method = meta["method"]
    source = resolve_model(base) if base else base_source(meta)
    tokenizer = load_tokenizer(ModelSource(str(folder), str(folder), None))
    id2label = dict(enumerate(class_names))
    problem_type = Task.from_meta(meta).problem_type
    pooling = meta["pooling"]
    if method == "full":
        model, _ = load_classifier(
            ModelSource(str(folder), str(folder), None),
            len(class_names),
            id2label,
            labels["pad_token_id"],
            problem_type,
            pooling,
        )
    else:
        model, _ = load_classifier(source, len(class_names), id2label, labels["pad_token_id"], problem_type, pooling)
        check_same_base(model, meta, source)
        if is_peft(method):
            model = _attach_adapter(model, folder, merge and method in MERGEABLE, method)
        else:
            _load_head(model, folder)
    model.eval()
    if device is not None:
        model.to(device)
    return LoadedModel(model, tokenizer, meta, class_names, folder)


def check_same_base(model: nn.Module, meta: dict[str, Any], source: ModelSource) -> None:
    expected = meta["base_fingerprint"]
    actual = base_fingerprint(model)
    for key, value in expected.items():
        if actual.get(key) != value:
            raise AdaptextError(
                f"base model {source.name!r} does not match the one this adapter was trained on "
                f"({key}: {actual.get(key)} here, {value} at training); pass the right base with --base"
            )


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    config = model.config
    return {
        "model_type": config.model_type,
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
    }


def _attach_adapter(model: nn.Module, folder: Path, merge: bool, meta_method: str) -> nn.Module:
    from peft import PeftModel

    if not (folder / "adapter_model.safetensors").is_file():
        raise AdaptextError(f"{folder} has no adapter_model.safetensors; only safetensors weights are loaded")
    try:
        with warnings.catch_warnings():
            # AdaLoRA records its pruned ranks under names peft itself no longer matches on reload;
            # the pruned entries are saved as zeros, so the reloaded model computes the same function.
            warnings.filterwarnings("ignore", message="The following rank_pattern keys")
            peft_model = PeftModel.from_pretrained(model, str(folder))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:200]
        raise AdaptextError(f"adapter in {folder} does not fit its base model ({first}); retrain it") from None
    if not merge:
        return peft_model
    if meta_method in UNLOADABLE:
        return peft_model.merge_and_unload()
    # peft's unload fails on composite heads (RoBERTa's classifier) for IA3/LoHa/LoKr; merging the
    # weights in place gives the same speed-up and keeps the module tree.
    peft_model.merge_adapter()
    return peft_model


def _load_head(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    path = folder / HEAD_FILE
    if not path.is_file():
        raise AdaptextError(f"{folder} has no {HEAD_FILE}; retrain it")
    state = load_file(str(path))
    params = dict(model.named_parameters())
    for name, value in state.items():
        if name not in params or params[name].shape != value.shape:
            raise AdaptextError(f"head weights in {folder} do not fit the base model ({name}); retrain it")
        with torch.no_grad():
            params[name].copy_(value)
