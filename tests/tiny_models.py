"""Tiny, randomly initialised, saved-to-disk Hugging Face models for offline tests.

``make_tiny_model(arch, out_dir)`` writes a *base* model (no task head) plus a
locally trained fast tokenizer into ``out_dir``, so that loading it with
``AutoModelForSequenceClassification.from_pretrained(out_dir, num_labels=...)``
exercises the real "newly initialised head" code path without any download.

Run ``python tests/tiny_models.py`` for a self-check over all architectures.
"""

from __future__ import annotations

import functools
import pathlib
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

ARCHS = ["bert", "roberta", "distilbert", "gpt2", "mpnet", "deberta-v2", "modernbert", "llama"]

MAX_LEN = 128  # tokenizer model_max_length
MAX_POSITIONS = MAX_LEN + 2  # RoBERTa/MPNet positions start at pad_id + 1
VOCAB_SIZE = 600  # upper bound; WordPiece stops earlier (~280) once every corpus word is in


# --------------------------------------------------------------------------- corpus
_SUBJECTS = (
    "the cat",
    "a dog",
    "my friend",
    "the teacher",
    "our team",
    "the old man",
    "a young girl",
    "the company",
    "this movie",
    "the weather",
    "my neighbour",
    "the driver",
    "a student",
    "the doctor",
    "her brother",
    "the crowd",
    "every child",
    "the author",
)
_VERBS = (
    "likes",
    "hates",
    "watches",
    "finds",
    "loves",
    "needs",
    "builds",
    "describes",
    "remembers",
    "ignores",
    "paints",
    "borrows",
    "sells",
    "criticises",
    "recommends",
    "enjoys",
)
_ADJECTIVES = (
    "red",
    "good",
    "fresh",
    "new",
    "cold",
    "long",
    "big",
    "green",
    "strange",
    "boring",
    "beautiful",
    "expensive",
    "wonderful",
    "terrible",
    "quiet",
    "dangerous",
    "simple",
)
_OBJECTS = (
    "ball",
    "book",
    "bread",
    "song",
    "water",
    "story",
    "house",
    "apples",
    "garden",
    "computer",
    "painting",
    "bicycle",
    "restaurant",
    "television",
    "mountain",
    "letter",
    "festival",
)
_ENDINGS = (
    "today.",
    "every morning.",
    "with great joy!",
    "but nobody knows why.",
    "and it was terrible.",
    "in the small town?",
    "after the long winter.",
    "again and again.",
)


@functools.cache
def _corpus() -> tuple[str, ...]:
    """~400 deterministic English sentences used to train every tokenizer."""
    rng = random.Random(1234)  # seeded, so identical in every process
    sentences = [
        f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} the "
        f"{rng.choice(_ADJECTIVES)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}"
        for _ in range(300)
    ]
    reviews = [f"Review number {n}: it was {rng.choice(_ADJECTIVES)}, {rng.randint(1, 10)}/10." for n in range(100)]
    return tuple(sentences + reviews)


# ----------------------------------------------------------------------- tokenizers
@dataclass(frozen=True)
class _TokSpec:
    """Special tokens of a tokenizer family (in vocabulary order) and its HF kwargs."""

    kind: str  # "wordpiece" | "bytelevel"
    specials: tuple[str, ...]
    hf_kwargs: tuple[tuple[str, str], ...]  # e.g. (("pad_token", "[PAD]"), ...)
    template: tuple[str, str] | None  # (single, pair) TemplateProcessing strings
    input_names: tuple[str, ...] = ("input_ids", "attention_mask")


_BERT_KW = (
    ("unk_token", "[UNK]"),
    ("sep_token", "[SEP]"),
    ("pad_token", "[PAD]"),
    ("cls_token", "[CLS]"),
    ("mask_token", "[MASK]"),
)
_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_BERT_TEMPLATE = ("[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1")
_ROBERTA_KW = (
    ("bos_token", "<s>"),
    ("eos_token", "</s>"),
    ("unk_token", "<unk>"),
    ("sep_token", "</s>"),
    ("cls_token", "<s>"),
    ("pad_token", "<pad>"),
    ("mask_token", "<mask>"),
)
_ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # pad must be id 1
_ROBERTA_TEMPLATE = ("<s> $A </s>", "<s> $A </s> </s> $B </s>")

_TOK_SPECS: dict[str, _TokSpec] = {
    "bert": _TokSpec(
        "wordpiece", _BERT_SPECIALS, _BERT_KW, _BERT_TEMPLATE, ("input_ids", "token_type_ids", "attention_mask")
    ),
    "distilbert": _TokSpec("wordpiece", _BERT_SPECIALS, _BERT_KW, _BERT_TEMPLATE),
    "modernbert": _TokSpec("wordpiece", _BERT_SPECIALS, _BERT_KW, _BERT_TEMPLATE),
    "deberta-v2": _TokSpec(
        "wordpiece", _BERT_SPECIALS, _BERT_KW, _BERT_TEMPLATE, ("input_ids", "token_type_ids", "attention_mask")
    ),
    "mpnet": _TokSpec("wordpiece", _ROBERTA_SPECIALS, _ROBERTA_KW, _ROBERTA_TEMPLATE),
    "roberta": _TokSpec("bytelevel", _ROBERTA_SPECIALS, _ROBERTA_KW, _ROBERTA_TEMPLATE),
    # Decoder-only families: eos/bos but deliberately NO pad token.
    "gpt2": _TokSpec(
        "bytelevel",
        ("<|endoftext|>",),
        (("bos_token", "<|endoftext|>"), ("eos_token", "<|endoftext|>"), ("unk_token", "<|endoftext|>")),
        None,
    ),
    "llama": _TokSpec(
        "bytelevel",
        ("<unk>", "<s>", "</s>"),
        (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")),
        ("<s> $A", "<s> $A <s>:1 $B:1"),
    ),
}


_WORDPIECE_SUFFIXES = ("##s", "##es", "##ed", "##ing", "##er", "##ly", "##ion", "##able")


def _wordpiece_vocab(specials: tuple[str, ...]) -> dict[str, int]:
    """Deterministic WordPiece vocab: specials, characters, ##characters, suffixes, frequent words.

    (``trainers.WordPieceTrainer`` is not reproducible across processes: it numbers the
    ``##x`` pieces in hash-map order, so merge ties -- and hence the vocab -- vary per run.)
    """
    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for text in _corpus() for word, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    pieces = list(dict.fromkeys([*specials, *chars, *(f"##{c}" for c in chars), *_WORDPIECE_SUFFIXES]))
    words = [w for w in sorted(counts, key=lambda w: (-counts[w], w)) if w not in pieces]
    return {p: i for i, p in enumerate(pieces + words[: VOCAB_SIZE - len(pieces)])}


@functools.cache
def _train_tokenizer(kind: str, specials: tuple[str, ...]) -> Tokenizer:
    """Build a raw `tokenizers` tokenizer (cached; callers must copy before mutating)."""
    if kind == "wordpiece":
        unk = next(t for t in specials if "unk" in t.lower())
        tok = Tokenizer(models.WordPiece(_wordpiece_vocab(specials), unk_token=unk))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        return tok
    # Byte-level BPE training is deterministic: ids come from the sorted 256-byte alphabet.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _build_tokenizer(arch: str) -> PreTrainedTokenizerFast:
    """Wrap the cached trained tokenizer with the family's post-processor and specials."""
    spec = _TOK_SPECS[arch]
    tok = Tokenizer.from_str(_train_tokenizer(spec.kind, spec.specials).to_str())
    if spec.template is not None:
        single, pair = spec.template
        tok.post_processor = processors.TemplateProcessing(
            single=single,
            pair=pair,
            special_tokens=[(t, tok.token_to_id(t)) for t in spec.specials if t in single or t in pair],
        )
    elif spec.kind == "bytelevel":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=MAX_LEN, model_input_names=list(spec.input_names), **dict(spec.hf_kwargs)
    )


# --------------------------------------------------------------------------- models
def _config_kwargs(arch: str, tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    """Tiny architecture-specific config kwargs with special ids matching ``tok``."""
    ids: dict[str, Any] = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id}  # None: gpt2/llama
    common = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": MAX_POSITIONS,
    }
    if arch in ("bert", "deberta-v2"):
        extra: dict[str, Any] = {}
        if arch == "deberta-v2":  # DeBERTa-v3 style disentangled attention
            extra = {
                "relative_attention": True,
                "pos_att_type": ["p2c", "c2p"],
                "position_biased_input": False,
                "position_buckets": 32,
                "norm_rel_ebd": "layer_norm",
                "share_att_key": True,
                "type_vocab_size": 0,
            }
        return {**common, **ids, **extra}
    if arch == "distilbert":
        return {
            "dim": 32,
            "n_layers": 2,
            "n_heads": 2,
            "hidden_dim": 64,
            "max_position_embeddings": MAX_POSITIONS,
            **ids,
        }
    if arch in ("roberta", "mpnet"):
        return {**common, **ids, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    if arch == "modernbert":
        return {
            **common,
            **ids,
            "bos_token_id": tok.cls_token_id,
            "eos_token_id": tok.sep_token_id,
            "cls_token_id": tok.cls_token_id,
            "sep_token_id": tok.sep_token_id,
            "layer_types": ["full_attention", "sliding_attention"],  # global, then local
            "local_attention": 16,
        }
    if arch == "gpt2":
        return {
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 2,
            "n_inner": 64,
            "n_positions": MAX_POSITIONS,
            **ids,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        }
    if arch == "llama":
        return {
            **common,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            **ids,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "tie_word_embeddings": False,
        }
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def make_tiny_model(arch: str, out_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Build and save a tiny random <arch> base model + tokenizer into out_dir; return out_dir."""
    if arch not in _TOK_SPECS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _build_tokenizer(arch)
    config = AutoConfig.for_model(arch, **_config_kwargs(arch, tok))
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)  # base class: BertModel, GPT2Model, LlamaModel, ...
    model.save_pretrained(out_dir)  # transformers 5 always writes model.safetensors
    tok.save_pretrained(out_dir)
    return out_dir


# ------------------------------------------------------------------------ self-check
def _self_check() -> None:
    """Build every arch, reload with a classification head and run a padded forward."""
    import tempfile
    import time

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # Second text is > MAX_LEN tokens: exercises truncation and the last position embedding.
    texts = ["A dog likes fresh bread today.", "The teacher watches the new song with great joy! " * 20]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHS:
            path = make_tiny_model(arch, pathlib.Path(tmp) / arch)
            tok = AutoTokenizer.from_pretrained(path)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=3, output_loading_info=True
            )
            assert tok.is_fast and model.config.vocab_size == len(tok), arch
            assert model.config.pad_token_id == tok.pad_token_id, arch
            for name in ("bos", "eos", "cls", "sep"):  # ids both sides define must agree
                ids = getattr(tok, f"{name}_token_id"), getattr(model.config, f"{name}_token_id", None)
                assert None in ids or ids[0] == ids[1], (arch, name, ids)
            if arch in ("gpt2", "llama"):
                assert tok.pad_token is None and model.config.pad_token_id is None, arch
                tok.pad_token = tok.eos_token
                model.config.pad_token_id = tok.pad_token_id
            batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
            assert batch["input_ids"].shape[1] == tok.model_max_length == MAX_LEN, arch
            assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum(), arch
            model.eval()
            with torch.no_grad():
                logits = model(**batch).logits
            assert logits.shape == (2, 3) and torch.isfinite(logits).all(), (arch, logits)
            print(
                f"{arch:11s} {type(model).__name__:36s} vocab={len(tok)} inputs={sorted(batch)}\n"
                f"    first tokens={tok.convert_ids_to_tokens(batch['input_ids'][0][:4])}\n"
                f"    missing={sorted(info['missing_keys'])}\n"
                f"    unexpected={sorted(info['unexpected_keys'])}"
            )
    print(f"all {len(ARCHS)} archs OK in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    _self_check()
