"""Readable names for the report's metric columns (the eval.json key stays in the header's tooltip).

A column is headed by its key less the group's prefix, which the group heading above it already says
(``ood/noise/msp/auroc`` under "OOD detection" reads "noise: MSP AUROC"). Names are built from the
key's parts through one vocabulary, so a key added to eval.json later still gets a sensible name (its
unknown words with spaces for underscores) instead of needing an entry of its own; docs/methods.md §4
says what each one is.
"""

from __future__ import annotations

import re

NON_BREAKING_HYPHEN = "\u2011"

# One word of a key (a part between slashes, or a criterion name) → how a reader calls it.
_WORDS = {
    "top1": "top-1",
    "top1_std": "top-1 std",
    "acc": "accuracy",
    "nll": "NLL",
    "brier": "Brier",
    "l2": "L2 penalty",
    "ece": "ECE",
    "ece15": "ECE (15 bins)",
    "aece15": "adaptive ECE (15 bins)",
    "auroc": "AUROC",
    "aupr_in": "AUPR-in",
    "aupr_out": "AUPR-out",
    "fpr95": "FPR@95%TPR",
    "msp": "MSP",
    "entropy": "entropy",
    "mi": "mutual information",
    "emb": "own uncertainty",
    "emb_uncertainty": "own uncertainty",
    "best_feature": "feature reference",
    "maxlogit": "max logit",
    "mahalanobis": "Mahalanobis",
    "mahalanobis_raw": "Mahalanobis (raw features)",
    "mahalanobis_unsup": "Mahalanobis (k-means)",
    "near": "near-OOD mean",
    "far": "far-OOD mean",
    "err_auroc": "error AUROC",
    "aurc": "AURC",
    "spearman": "Spearman",
    "crop_up": "crop test: own uncertainty up",
    "map@r": "mAP@R",
    "ausc": "AUSC",
    "ausc_oracle": "AUSC oracle",
    "r_auroc": "R-AUROC",
    "r_auroc_items": "R-AUROC items",
    "mean": "mean",
}

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"top1@(\d+)"), r"top-1, k=\1"),
    (re.compile(r"knn(\d+)"), r"\1-NN distance"),
    (re.compile(r"recall@(\d+)"), r"recall@\1"),
    (re.compile(r"severity(\d+)"), r"severity \1"),
    (re.compile(r"(\d+)pct"), r"\1% labels"),
)


def readable_word(word: str) -> str:
    """One part of a key as a reader calls it; unknown words keep their letters, spaces for underscores."""
    if word in _WORDS:
        return _WORDS[word]
    if word.endswith("_bma"):  # a detector averaged over the posterior's draws
        return f"{readable_word(word.removesuffix('_bma'))}, BMA"
    for pattern, replacement in _PATTERNS:
        if pattern.fullmatch(word):
            return pattern.sub(replacement, word)
    return word.replace("_", " ")


def readable_label(label: str) -> str:
    """A column label (a key less its group prefix, e.g. ``noise/msp/auroc``) as a header reads it:
    the first part names what is measured on ("noise: ..."), the rest says what is measured.

    Hyphens are non-breaking (U+2011): a header wraps at its spaces only, so "top‑1" never splits
    into "top-" over "1", and the table's width estimate (one piece per space) holds.
    """
    first, *rest = [readable_word(part) for part in label.split("/") if part] or [label]
    text = f"{first}: {' '.join(rest)}" if rest else first
    return text.replace("-", NON_BREAKING_HYPHEN)
