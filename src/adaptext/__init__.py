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

from adaptext.api import TrainOutcome, evaluate, train
from adaptext.config import TrainConfig
from adaptext.errors import AdaptextError
from adaptext.predict import Classifier, load

__all__ = ["AdaptextError", "Classifier", "TrainConfig", "TrainOutcome", "__version__", "evaluate", "load", "train"]
