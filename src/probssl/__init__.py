"""probssl: probabilistic self-supervised learning.

Every method, deterministic or probabilistic, answers one question: for an image x, what is the
distribution of its representation? That answer is an :class:`Embedding`; the evaluation suite
sees nothing else.

The workflow API::

    cfg = probssl.build_config(method="simclr", data={"dataset": "digits"}, train={"epochs": 50})
    run_dir = probssl.fit(cfg, "runs/quick")
    results = probssl.evaluate_run(run_dir)          # also writes runs/quick/eval.json
    method = probssl.load_run(run_dir).method        # an SSLMethod: method.embed(x) -> Embedding
    found = probssl.embed_images(run_dir, "my_images/")  # embedding, uncertainty, ood_score, path
"""

from __future__ import annotations

from typing import Any

from probssl.embedding import Embedding

__version__ = "0.1.0"

# public name -> (module, attribute). `fit` is `probssl.train.train` (the module owns the name `train`).
_LAZY = {
    "build_config": ("probssl.config", "build_config"),
    "RunConfig": ("probssl.config", "RunConfig"),
    "fit": ("probssl.train", "train"),
    "evaluate_run": ("probssl.eval.evaluate", "evaluate_run"),
    "load_run": ("probssl.runs", "load_run"),
    "build_method": ("probssl.methods", "build_method"),
    "load_dataset": ("probssl.data", "load_dataset"),
    "embed_images": ("probssl.apply_run", "embed_images"),
}


def __getattr__(name: str) -> Any:
    # Lazy so that `import probssl` stays cheap and import cycles stay impossible.
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'probssl' has no attribute '{name}'")


__all__ = ["Embedding", "__version__", *_LAZY]
