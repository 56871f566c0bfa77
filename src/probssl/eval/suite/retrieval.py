"""Leave-one-out retrieval blocks on the test split: ``ret/`` recall@k, mAP@R, sparsification (AUSC)
and retrieval ECE, and R-AUROC — every key of the point estimate from one pass, one tie rule."""

from __future__ import annotations

from torch import Tensor

from probssl.eval.features import FeatureBank
from probssl.eval.metrics import Metrics
from probssl.eval.retrieval import (
    LeaveOneOut,
    leave_one_out,
    retrieval_ece,
    retrieval_metrics,
    sparsification,
)
from probssl.eval.selective import error_auroc

RETRIEVAL_MAX_ITEMS = 10_000
"""Leave-one-out retrieval (``ret/``) runs on the first 10k test items: its cost is quadratic in N."""


def leave_one_out_retrieval(
    test: FeatureBank, average_precision: bool = True, max_items: int = RETRIEVAL_MAX_ITEMS
) -> LeaveOneOut:
    """The leave-one-out retrieval pass over the test split's point estimate (its first ``max_items``)
    that every ``ret/`` metric of the point estimate reads: R-AUROC's and AUSC's hits, and with
    ``average_precision`` the ranks and AP@R of recall@k and mAP@R — one pass, one tie rule."""
    n = min(test.num_items, max_items)
    return leave_one_out(
        test.mean[:n], test.labels[:n], average_precision=average_precision, ranks=average_precision
    )


def r_auroc_suite(
    test: FeatureBank,
    scores: dict[str, Tensor],
    max_items: int = RETRIEVAL_MAX_ITEMS,
    retrieval: LeaveOneOut | None = None,
) -> Metrics:
    """R-AUROC (Kirchhof et al., URL benchmark): does an uncertainty predict its own retrieval errors?

    Item i's leave-one-out retrieval on the test split (cosine, the point estimate) is an error when
    its nearest other item has another label — a recall@1 miss, ties resolved against the query as in
    :mod:`probssl.eval.retrieval`. ``ret/<criterion>/r_auroc`` is the AUROC of each criterion for
    those errors (errors positive); ``ret/r_auroc`` uses the embedding's own uncertainty, or the
    probe's entropy for a method without one (the same choice as ``ret/ausc``). Absent when every
    retrieval is right (or every one wrong). ``retrieval``: the pass of
    :func:`leave_one_out_retrieval`, when already made.
    """
    if retrieval is None:
        retrieval = leave_one_out_retrieval(test, average_precision=False, max_items=max_items)
    correct = retrieval.hit
    n = correct.numel()
    if bool(correct.all()) or not bool(correct.any()):
        return {"ret/r_auroc_items": n}  # no errors (or no hits) to rank: R-AUROC is undefined, not 0.5
    out: Metrics = {f"ret/{c}/r_auroc": error_auroc(score[:n], correct) for c, score in scores.items()}
    out["ret/r_auroc"] = out["ret/emb/r_auroc" if "emb" in scores else "ret/entropy/r_auroc"]
    out["ret/r_auroc_items"] = n
    return out


def retrieval_suite(
    test: FeatureBank,
    uncertainty: Tensor,
    max_items: int = RETRIEVAL_MAX_ITEMS,
    retrieval: LeaveOneOut | None = None,
) -> tuple[Metrics, dict]:
    """Leave-one-out retrieval on the test split; AUSC with ``uncertainty`` (higher = less certain).

    One tie rule (against the query, :mod:`probssl.eval.retrieval`) for every key: recall@k, mAP@R
    and the hits AUSC ranks come from one pass over the point estimate (``retrieval``, as from
    :func:`leave_one_out_retrieval`, or made here), the retrieval ECE from one pass per draw.
    """
    if retrieval is None or retrieval.average_precision is None:
        retrieval = leave_one_out_retrieval(test, max_items=max_items)
    n = retrieval.hit.numel()
    mean, labels, draws = test.mean[:n], test.labels[:n], test.draws[:, :n]
    out: Metrics = {f"ret/{k}": v for k, v in retrieval_metrics(mean, labels, retrieval=retrieval).items()}
    curve = sparsification(uncertainty[:n], retrieval.hit)
    out["ret/ausc"] = curve["ausc"]
    out["ret/ausc_oracle"] = curve["ausc_oracle"]
    out["ret/ece"] = retrieval_ece(draws, labels)
    out["ret/items"] = n
    details = {
        "fractions_removed": curve["fractions_removed"],
        "accuracy": curve["accuracy"],
        "oracle": curve["accuracy_oracle"],
    }
    return out, details
