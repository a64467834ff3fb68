"""One base model in memory serving many adapters: LoRA deltas and heads picked per row.

LoRA (and rsLoRA) adapters of one base live in one peft model: a batch mixing them runs in one forward
pass, peft adding each row's own low-rank delta (``adapter_names``). Heads differ per adapter (their own
label sets), so each head layer of the shared base is replaced by a :class:`HeadSwitch` that sends every
row through its adapter's copy. Head-only adapters share the base too (their rows take no LoRA delta).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adaptext.artifacts import HEAD_FILE, check_same_base
from adaptext.batching import collate, inference_batches
from adaptext.errors import AdaptextError
from adaptext.models import ModelSource, load_classifier
from adaptext.precision import autocast

ADAPTER_FILE = "adapter_model.safetensors"


class HeadSwitch(nn.Module):
    """Stands in for one head layer of a shared base: each row goes through its own adapter's copy.

    The copies sit in a plain dict, outside the module tree, so peft never injects LoRA into them.
    Outputs of different widths (label counts) are zero-padded to the widest; the caller keeps each
    row's own columns.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.__dict__["original"] = original  # for rows of adapters that did not train this layer
        self.copies: dict[str, nn.Module] = {}
        self.rows: list[str] | None = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.rows is None or len(self.rows) != x.shape[0]:
            raise RuntimeError("HeadSwitch needs one adapter name per row (set by SharedBase.logits)")
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(self.rows):
            groups.setdefault(name, []).append(i)
        outputs = []
        for name, rows in groups.items():
            index = torch.tensor(rows, device=x.device)
            module = self.copies.get(name, self.original)
            outputs.append((index, module(x.index_select(0, index), *args, **kwargs)))
        if len(outputs) == 1:
            return outputs[0][1]
        width = max(out.shape[-1] for _, out in outputs)
        first = outputs[0][1]
        result = first.new_zeros((x.shape[0], *first.shape[1:-1], width))
        for index, out in outputs:
            result[index, ..., : out.shape[-1]] = out
        return result


class SharedBase:
    """One base model in memory; LoRA deltas and heads picked per row."""

    def __init__(
        self, source: ModelSource, pad_token_id: int, device: torch.device, precision: str, pooling: str = "native"
    ):
        self.source = source
        self.device = device
        self.precision = precision
        self.pad_token_id = pad_token_id
        self.pooling = pooling
        model, _ = load_classifier(source, 2, {0: "0", 1: "1"}, pad_token_id, pooling=pooling)
        self.model = model.eval().to(device)
        self.peft: Any = None  # the peft model around self.model, once a LoRA adapter arrives
        self.switches: dict[str, HeadSwitch] = {}
        self.lora: set[str] = set()
        self.labels: dict[str, int] = {}

    @property
    def names(self) -> list[str]:
        return list(self.labels)

    def add(self, name: str, folder: Path, meta: dict[str, Any], num_labels: int) -> None:
        from safetensors.torch import load_file

        check_same_base(self.model, meta, self.source)
        if meta["method"] == "head":
            heads, lora = load_file(str(folder / HEAD_FILE)), {}
        else:
            state = load_file(str(folder / ADAPTER_FILE))
            lora = {k: v for k, v in state.items() if ".lora_" in k}
            heads = {k.removeprefix("base_model.model."): v for k, v in state.items() if ".lora_" not in k}
        if not heads:
            raise AdaptextError(f"{folder} holds no classification head; retrain it with adaptext train")
        self._add_heads(name, folder, heads)
        try:
            if lora:
                self._add_lora(name, folder, lora)
        except BaseException:
            for switch in self.switches.values():
                switch.copies.pop(name, None)
            raise
        self.labels[name] = num_labels

    def _add_heads(self, name: str, folder: Path, state: dict[str, torch.Tensor]) -> None:
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            module, _, param = key.rpartition(".")
            by_module.setdefault(module, {})[param] = value
        copies = {}
        for path, params in by_module.items():
            original = self.switches[path].original if path in self.switches else self._module(path, folder)
            head = copy.deepcopy(original)
            for param, value in params.items():
                current = getattr(original, param, None)
                if not isinstance(current, torch.Tensor) or current.shape[1:] != value.shape[1:]:
                    raise AdaptextError(
                        f"head weights in {folder} do not fit the base model ({path}.{param}); retrain it"
                    )
                setattr(head, param, nn.Parameter(value.to(self.device, current.dtype), requires_grad=False))
            if isinstance(head, nn.Linear):
                head.out_features = head.weight.shape[0]
            copies[path] = head.eval()
        for path, head in copies.items():
            if path not in self.switches:
                parent, _, leaf = path.rpartition(".")
                switch = HeadSwitch(self._module(path, folder))
                setattr(self.model.get_submodule(parent) if parent else self.model, leaf, switch)
                self.switches[path] = switch
            self.switches[path].copies[name] = head

    def _module(self, path: str, folder: Path) -> nn.Module:
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            raise AdaptextError(f"head weights in {folder} name a layer the base lacks ({path}); retrain it") from None
        if isinstance(module, HeadSwitch):
            return module.original
        return module

    def _add_lora(self, name: str, folder: Path, state: dict[str, torch.Tensor]) -> None:
        from peft import LoraConfig, PeftModel, set_peft_model_state_dict

        config = LoraConfig.from_pretrained(str(folder))
        config.modules_to_save, config.task_type, config.inference_mode = None, None, True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes on adapter names and already-wrapped models
            if self.peft is None:
                self.peft = PeftModel(self.model, config, adapter_name=name)
            else:
                self.peft.add_adapter(name, config)
            result = set_peft_model_state_dict(self.peft, state, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k and ".lora_" in k]
        if result.unexpected_keys or missing:
            self.peft.delete_adapter(name)
            first = (result.unexpected_keys or missing)[0]
            raise AdaptextError(f"adapter in {folder} does not fit its base model ({first}); retrain it")
        self.peft.to(self.device).eval()
        self.lora.add(name)

    def remove(self, name: str) -> None:
        for switch in self.switches.values():
            switch.copies.pop(name, None)
        if name in self.lora:
            self.lora.discard(name)
            if self.lora:
                self.peft.delete_adapter(name)
            else:  # the last LoRA adapter: take the LoRA layers out again (peft keeps no adapter-less state)
                self.model = self.peft.unload()
                self.peft = None
        self.labels.pop(name, None)

    @torch.inference_mode()
    def logits(
        self, rows: list[tuple[str, list[int]]], batch_size: int, on_forward: Callable[[int], None] | None = None
    ) -> list[np.ndarray]:
        """Each row (adapter name, token ids) through its own adapter; rows of many adapters share batches."""
        out: list[np.ndarray] = [np.zeros(0)] * len(rows)
        for batch in inference_batches([len(ids) for _, ids in rows], batch_size, self.device):
            if on_forward is not None:
                on_forward(len(batch))
            names = [rows[i][0] for i in batch]
            inputs = {k: v.to(self.device) for k, v in collate([rows[i][1] for i in batch], self.pad_token_id).items()}
            for switch in self.switches.values():
                switch.rows = names
            try:
                with autocast(self.precision, self.device):
                    if self.peft is not None:
                        peft_names = [n if n in self.lora else "__base__" for n in names]
                        logits = self.peft(**inputs, adapter_names=peft_names).logits
                    else:
                        logits = self.model(**inputs).logits
            finally:
                for switch in self.switches.values():
                    switch.rows = None
            logits = logits.float().cpu().numpy()
            for row, i in enumerate(batch):
                out[i] = logits[row, : self.labels[names[row]]]
        return out
