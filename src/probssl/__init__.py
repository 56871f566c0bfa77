"""probssl: probabilistic self-supervised learning in PyTorch.

Encoders trained without labels whose embeddings come with uncertainty. Every method, deterministic
or probabilistic, answers one question: for an image x, what is the distribution of its
representation? That answer is an :class:`Embedding` (``mean [N, D]``, optional ``samples
[S, N, D]``, ``uncertainty [N]``); the evaluation suite sees nothing else.

Workflow::

    import probssl

    cfg = probssl.build_config(method="simclr", data={"dataset": "digits"}, train={"epochs": 50})
    run_dir = probssl.fit(cfg, "runs/quick")         # checkpoints, metrics.csv, model.safetensors
    results = probssl.evaluate_run(run_dir)          # the evaluation suite; writes runs/quick/eval.json
    method = probssl.load_run(run_dir).method        # an SSLMethod
    emb = method.embed(images)                       # an Embedding (images normalised, float)
    found = probssl.embed_images(run_dir, "my_images/")  # embedding, uncertainty, ood_score, path

What is available::

    probssl.list_methods()     registered methods (the names build_config(method=...) takes)
    probssl.list_datasets()    dataset names (data={"dataset": ...})
    probssl.list_backbones()   backbone names (build_config(backbone=...))
    probssl.list_configs()     bundled YAML configs (build_config("fashion_mnist"), --config NAME)

Configuration: :func:`build_config` (one dataclass default per value, validated; see
``probssl.config``). Training: :func:`fit`. Evaluation: :func:`evaluate_run`. Loading: :func:`load_run`,
:func:`load_dataset`. The command line (``probssl --help``) wraps the same functions. The formulas
behind each method and metric are in the repository's ``docs/methods.md``.
"""

from __future__ import annotations

from typing import Any

from probssl.threads import prefer_passive_waiting

prefer_passive_waiting()  # before anything imports torch: OpenMP reads it once (probssl/threads.py)

from probssl.embedding import Embedding  # noqa: E402

__version__ = "0.1.0"

# public name -> (module, attribute). `fit` is `probssl.train.train` (the module owns the name `train`).
_LAZY = {
    "build_config": ("probssl.config", "build_config"),
    "RunConfig": ("probssl.config", "RunConfig"),
    "ConfigError": ("probssl.config", "ConfigError"),
    "fit": ("probssl.train", "train"),
    "evaluate_run": ("probssl.eval.evaluate", "evaluate_run"),
    "load_run": ("probssl.runs", "load_run"),
    "build_method": ("probssl.methods", "build_method"),
    "SSLMethod": ("probssl.methods", "SSLMethod"),
    "load_dataset": ("probssl.data", "load_dataset"),
    "embed_images": ("probssl.apply_run", "embed_images"),
    "DatasetError": ("probssl.data", "DatasetError"),
}


def list_methods() -> list[str]:
    """Names of the registered methods, e.g. ``['byol', 'csghmc', ..., 'simclr', ...]``."""
    from probssl.methods import METHODS

    return METHODS.names()


def list_datasets() -> list[str]:
    """Names of the datasets :func:`load_dataset` and ``data.dataset`` accept."""
    from probssl.data import dataset_names

    return list(dataset_names())


def list_backbones() -> list[str]:
    """Names of the registered backbones (``backbone="auto"`` picks one by image size)."""
    from probssl.nn import BACKBONES

    return BACKBONES.names()


def list_configs() -> list[str]:
    """Names of the YAML configs bundled with the package (``--config NAME``)."""
    from probssl.config import bundled_configs

    return bundled_configs()


def __getattr__(name: str) -> Any:
    # Lazy so that `import probssl` stays cheap and import cycles stay impossible.
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'probssl' has no attribute '{name}'")


def __dir__() -> list[str]:
    # dir(probssl) and help(probssl) list the lazy names too.
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "Embedding",
    "__version__",
    "list_methods",
    "list_datasets",
    "list_backbones",
    "list_configs",
    *_LAZY,
]
