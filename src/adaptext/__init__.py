"""adaptext: fine-tune pretrained transformers for text classification with LoRA, measure, and serve.

Python API (the CLI calls the same functions)::

    import adaptext
    outcome = adaptext.train(data="../shared/data/ag_news", train_size=1250, output="agnews-lora")
    clf = adaptext.load("agnews-lora")
    clf.predict(["Stocks rally as the central bank holds rates"])
    adaptext.evaluate("agnews-lora", "../shared/data/ag_news", split="test")
"""

from __future__ import annotations

__version__ = "0.1.0"

# Heavy imports (torch, transformers) load on first use, so `adaptext --help` answers at once.
_EXPORTS = {
    "AdaptextError": "adaptext.errors",
    "Classifier": "adaptext.predict",
    "TrainConfig": "adaptext.config",
    "TrainOutcome": "adaptext.api",
    "evaluate": "adaptext.evaluation",
    "export_onnx": "adaptext.export",
    "load": "adaptext.predict",
    "train": "adaptext.api",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'adaptext' has no attribute {name!r}")
