"""The model card (README.md) written next to every trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from adaptext import options
from adaptext.artifacts import is_peft
from adaptext.windows import Windowing

METHOD_NAMES = {
    "lora": "LoRA", "dora": "DoRA", "rslora": "rsLoRA", "adalora": "AdaLoRA", "ia3": "IA3", "vera": "VeRA",
    "loha": "LoHa", "lokr": "LoKr", "prompt": "prompt-tuned", "prefix": "prefix-tuned", "ptuning": "P-tuned",
    "bitfit": "BitFit (bias-only)", "head": "head-only", "full": "fully fine-tuned", "setfit": "SetFit library",
}  # fmt: skip


def dataset_name(spec: str | None) -> str:
    """A Hub dataset id as is; a local file or folder by its name (an absolute path means nothing elsewhere)."""
    if not spec:
        return "adaptext-demo-headlines"
    path = Path(spec)
    if path.exists():
        return path.stem if path.is_file() else path.name
    return spec


def _long_text(cfg: dict[str, Any]) -> str:
    windowing = Windowing.from_config(options.saved_config(cfg))
    if not windowing.sliding:
        return f" ({windowing.long_text})"
    cap = f", at most {windowing.max_windows} per text" if windowing.max_windows else ""
    return (
        f" (sliding windows overlapping by {windowing.stride} tokens{cap}; each window trained with its text's "
        f"label, window logits {windowing.window_pool}-pooled per text at prediction)"
    )


# Per task: the results table's columns (metric key, heading), and the model index's headline metrics.
RESULT_COLUMNS = {
    "single-label": [("accuracy", "accuracy"), ("macro_f1", "macro F1"), ("weighted_f1", "weighted F1"), ("loss", "loss")],
    "multi-label": [
        ("micro_f1", "micro F1"), ("macro_f1", "macro F1"), ("subset_accuracy", "subset accuracy"),
        ("hamming_loss", "Hamming loss"), ("loss", "BCE loss"),
    ],
    "regression": [("rmse", "RMSE"), ("mae", "MAE"), ("r2", "R²"), ("pearson", "Pearson r"), ("spearman", "Spearman ρ")],
}  # fmt: skip
INDEX_METRICS = {
    "single-label": [("accuracy", "accuracy", None), ("f1", "macro_f1", "macro F1")],
    "multi-label": [("f1", "micro_f1", "micro F1"), ("f1", "macro_f1", "macro F1")],
    "regression": [("rmse", "rmse", None), ("pearsonr", "pearson", "Pearson r")],
}
TASK_WORDS = {
    "single-label": "text classifier",
    "multi-label": "multi-label text classifier (a sigmoid per label; thresholds tuned per label on validation)",
    "regression": "text regression model",
}


def _results_table(kind: str, metrics: dict[str, Any]) -> str:
    columns = RESULT_COLUMNS[kind]
    head = "| split | " + " | ".join(title for _, title in columns) + " | n |"
    rule = "|---" * (len(columns) + 2) + "|"
    rows = [
        f"| {name} | " + " | ".join(f"{m[key]:.4f}" for key, _ in columns) + f" | {m['n']} |"
        for name, m in (("validation", metrics.get("validation")), ("test", metrics.get("test")))
        if m
    ]
    return "\n".join([head, rule, *rows])


def _base_note(path: str, base_id: str, num_labels: int, folder_name: str) -> str:
    if path == base_id:
        return (
            f"The adapter names its base by its Hub id, `{base_id}`: the snippet above loads it wherever the Hub, or a "
            "Hugging Face cache holding that model, is reachable."
        )
    return (
        f"The adapter's `base_model_name_or_path` is `{path}`; on another machine load the base\n"
        f"(`{base_id}`) with `AutoModelForSequenceClassification.from_pretrained(..., num_labels={num_labels})`\n"
        f'and attach this folder with `PeftModel.from_pretrained(base, "{folder_name}")`.'
    )


# A mean-pooled model (adaptext.pooling) needs its pooling back in plain transformers, whose class pools
# the first token. The hook is adaptext.pooling's, written out (tests/test_portable.py runs this code).
MEAN_POOL_SNIPPET = """import torch

# This model reads the mean of the token vectors (adaptext --pooling mean); transformers' class would
# read the first token. Put the mean back with a forward hook on the encoder:
def mean_pool(module, args, kwargs, output):
    mask = kwargs["attention_mask"].unsqueeze(-1).to(output[0].dtype)
    mean = (output[0] * mask).sum(1) / mask.sum(1).clamp(min=1)
    if output.get("pooler_output") is not None:  # BERT-style heads read the pooler output
        output["pooler_output"] = mean
    else:  # the others read position 0
        output["last_hidden_state"] = torch.cat([mean[:, None], output[0][:, 1:]], dim=1)
    return output

model.get_base_model().base_model.register_forward_hook(mean_pool, with_kwargs=True)
"""


def _schedule(meta: dict[str, Any], cfg: dict[str, Any]) -> str:
    schedule = meta.get("schedule")
    if not schedule:  # saved before the schedule was recorded
        return f"epochs={cfg['epochs']}"
    keep = "best validation evaluation kept" if schedule["validation"] else "no validation split: final weights kept"
    return f"{schedule['steps']} steps ({schedule['epochs']:.3g} epochs; {keep})"


def _start(meta: dict[str, Any], cfg: dict[str, Any]) -> str:
    """Pooling, head start and the contrastive term: the few-label recipe (docs/RESULTS.md "Few labels")."""
    head = meta.get("head_init") or {"kind": "random"}
    start = "a random head"
    if head["kind"] == "probe":
        cv = f", cross-validated accuracy {head['cv_accuracy']:.3f}" if head.get("cv_accuracy") is not None else ""
        start = f"a head fitted by logistic regression on the frozen features of {head['rows']:,} examples{cv}"
    contrast = f", contrastive weight {meta['contrastive']:g}" if meta.get("contrastive") else ""
    refit = meta.get("head_refit")
    end = ""
    if refit and refit["kept"]:
        end = f" After training, the output layer was refitted by logistic regression on the trained features of {refit['rows']:,} examples"
        if refit.get("trained_accuracy") is not None:
            end += f" (validation accuracy {refit['refit_accuracy']:.3f} vs {refit['trained_accuracy']:.3f})"
        end += "."
    return f"Pooling {meta.get('pooling', 'native')}; training started from {start}{contrast}.{end}"


def _precision_note(precision: str) -> str:
    if precision == "fp32":
        return ""
    return (
        f"; an evaluation in {precision} reproduces them within {precision}'s rounding, and one in fp32 "
        "(`--precision fp32`) may differ in the last digits"
    )


def _hub_header(meta: dict[str, Any], final: dict[str, Any], folder_name: str, dataset: str, split: str) -> dict:
    """The card's YAML front matter: what the Hub indexes (base model, library, task, model-index results)."""
    kind = (meta.get("task") or {}).get("kind", "single-label")
    base = meta["base_model"]
    base_id = base.get("hub_id") or base["name"]
    return {
        "base_model": base_id,
        "library_name": "peft" if is_peft(meta["method"]) else "transformers",
        "pipeline_tag": "text-classification",
        "tags": ["adaptext", "text-classification", meta["method"]],
        "datasets": [dataset],
        "metrics": sorted({kind_ for kind_, _, _ in INDEX_METRICS[kind]}),
        "model-index": [
            {
                "name": folder_name,
                "results": [
                    {
                        "task": {"type": "text-classification"},
                        "dataset": {"name": dataset, "type": dataset, "split": split},
                        "metrics": [
                            {"type": type_, **({"name": name} if name else {}), "value": round(final.get(key, 0.0), 4)}
                            for type_, key, name in INDEX_METRICS[kind]
                        ],
                    }
                ],
            }
        ],
    }


def _peft_snippet(meta: dict[str, Any], folder_name: str, num_labels: int) -> str:
    """How to load the adapter with plain peft + transformers (PEFT methods only)."""
    if not is_peft(meta["method"]):
        return ""
    base = meta["base_model"]
    base_id = base.get("hub_id") or base["name"]
    return f"""
With plain `peft` + `transformers` (no adaptext needed):

```python
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer

model = AutoPeftModelForSequenceClassification.from_pretrained(
    "{folder_name}", num_labels={num_labels}, pad_token_id={meta["pad_token_id"]})
tokenizer = AutoTokenizer.from_pretrained("{folder_name}")
{MEAN_POOL_SNIPPET if meta.get("pooling") == "mean" else ""}logits = model(**tokenizer(["your text"], return_tensors="pt")).logits
```
{_base_note(base["path"], base_id, num_labels, folder_name)}
"""


def _loss_words(meta: dict[str, Any], cfg: dict[str, Any]) -> str:
    """The loss in words: which one, its gamma, class weights."""
    used = meta.get("loss") or cfg.get("loss", "cross-entropy")
    if used == "auto":  # saved before the loss was recorded: auto meant cross-entropy then
        used = "cross-entropy"
    loss = used + (f" (gamma {cfg['focal_gamma']:g})" if used == "focal" else "")
    if used == "contrastive":
        loss = "supervised contrastive (the head refitted by logistic regression after training)"
    return loss + (", class-weighted" if cfg.get("class_weights") else "")


def model_card(meta: dict[str, Any], metrics: dict[str, Any], folder_name: str) -> str:
    cfg = meta["config"]
    kind = (meta.get("task") or {}).get("kind", "single-label")
    base = meta["base_model"]
    base_id = base.get("hub_id") or base["name"]
    dataset = dataset_name(cfg.get("data"))
    final = metrics.get("test") or metrics.get("validation") or {}
    split = "test" if metrics.get("test") else "validation"
    precision = final.get("precision") or metrics["train"]["precision"]  # older metrics: the training's
    header = _hub_header(meta, final, folder_name, dataset, split)
    params = meta["params"]
    labels = ", ".join(meta["class_names"])
    num_labels = len(meta["class_names"])
    peft_snippet = _peft_snippet(meta, folder_name, num_labels)
    loss = _loss_words(meta, cfg)
    return f"""---
{yaml.safe_dump(header, sort_keys=False).strip()}
---

# {folder_name}

A {METHOD_NAMES.get(meta["method"], meta["method"])} {TASK_WORDS[kind]} fine-tuned from
`{base_id}` with [adaptext](https://pypi.org/project/adaptext/) on `{dataset}`.

{f"Target: {labels}" if kind == "regression" else f"Labels ({num_labels}): {labels}"}

## Results

{_results_table(kind, metrics)}

Computed in {precision}{_precision_note(precision)}.

Trainable parameters: {params["adapter"]:,} adapter + {params["head"]:,} head = {params["trainable"]:,}
({params["trainable_percent"]:.3f}% of {params["total"]:,}). Training took {metrics["train"]["seconds"]:.1f} s
({metrics["train"]["samples_per_second"]:.1f} samples/s, precision {metrics["train"]["precision"]}).

## Training configuration

method {meta["method"]}, target modules {", ".join(meta.get("target_modules") or []) or "-"},
r={cfg["lora_r"]}, alpha={cfg["lora_alpha"]}, dropout={cfg["lora_dropout"]}, lr={meta["lr"]}, {_schedule(meta, cfg)},
batch size {cfg["batch_size"]}, max length {cfg["max_length"]}{_long_text(cfg)}, scheduler {cfg["scheduler"]}, loss {loss}, seed {cfg["seed"]}.
{_start(meta, cfg)}
Newly initialised modules trained and saved with the adapter: {", ".join(meta["head_modules"]) or "-"}.
The full resolved configuration is in `run_config.yaml`; re-run it with
`adaptext train --config {folder_name}/run_config.yaml --output NEW_DIR`.

## Usage

```bash
adaptext predict --model {folder_name} "your text here"
```

```python
import adaptext
clf = adaptext.load("{folder_name}")
print(clf.predict(["your text here"]))
```
{peft_snippet}"""
