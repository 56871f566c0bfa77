"""The uncertainty evaluation suite (design.md §4): one function per protocol, all on cached features.

Every function takes feature banks (``[S, N, D]`` draws, so deterministic and probabilistic methods
go through the same code) and returns flat, prefixed metrics plus plot data for the report:

- ``cal/``    calibration of the marginalised linear probe on the test split
- ``sel/``    uncertainty vs error (predictive entropy for every method; ``sel/emb/`` the embedding's own)
- ``ood/<set>/``   OOD detection, every criterion "higher = more OOD", OOD is the positive class:
  the probe's MSP / entropy / MI, the embedding's own uncertainty (``emb``) and the deterministic
  feature-space detectors (``FeatureDetectors``); ``ood/near/``, ``ood/far/`` group means
- ``shift/<corruption>/<severity>/``   accuracy, ECE and mean uncertainty under corruptions
- ``lowshot/``   1% / 10% labels, class-balanced fixed index files, 3 seeds
- ``transfer/<set>/``   a probe on a frozen encoder, fitted and tested on the two halves of another set
- ``ret/``    leave-one-out retrieval, sparsification (AUSC) and retrieval ECE; R-AUROC
- ``sel/crop_up``   the crop test (share of images whose own uncertainty rises on a small crop)

A metric that does not exist for a run is absent, never a stand-in value: ``emb`` criteria only for
methods with a per-input uncertainty, ``mi`` only with more than one sample.

The suite never sees a method: only features, labels and probabilities. Its blocks live in one module
per question — :mod:`.probe` (the per-draw probe), :mod:`.detectors` (every score), :mod:`.uncertainty`,
:mod:`.detection`, :mod:`.shift`, :mod:`.few_labels`, :mod:`.retrieval` — and are all importable from
here, which is how :mod:`probssl.eval.evaluate` calls them.
"""

from probssl.eval.suite.detection import (
    OOD_PROTOCOL,
    conformal_id_suite,
    conformal_ood_suite,
    member_fpr_suite,
    ood_group_means,
    ood_suite,
    pvalue_scores,
)
from probssl.eval.suite.detectors import (
    BMA_MAX_DRAWS,
    FEATURE_KS,
    REFERENCE_DETECTOR,
    FeatureDetectors,
    has_own_uncertainty,
    uncertainty_scores,
)
from probssl.eval.suite.few_labels import lowshot_suite, transfer_suite, write_index_file
from probssl.eval.suite.probe import WARM_START_DRAWS, MarginalProbe
from probssl.eval.suite.retrieval import (
    RETRIEVAL_MAX_ITEMS,
    leave_one_out_retrieval,
    r_auroc_suite,
    retrieval_suite,
)
from probssl.eval.suite.shift import SEVERITIES, shift_suite
from probssl.eval.suite.uncertainty import (
    calibration_suite,
    crop_suite,
    ranked_images,
    reliability_suite,
    selective_suite,
)

__all__ = [
    "BMA_MAX_DRAWS",
    "FEATURE_KS",
    "OOD_PROTOCOL",
    "REFERENCE_DETECTOR",
    "RETRIEVAL_MAX_ITEMS",
    "SEVERITIES",
    "WARM_START_DRAWS",
    "FeatureDetectors",
    "MarginalProbe",
    "calibration_suite",
    "conformal_id_suite",
    "conformal_ood_suite",
    "crop_suite",
    "has_own_uncertainty",
    "leave_one_out_retrieval",
    "lowshot_suite",
    "member_fpr_suite",
    "ood_group_means",
    "ood_suite",
    "pvalue_scores",
    "r_auroc_suite",
    "ranked_images",
    "reliability_suite",
    "retrieval_suite",
    "selective_suite",
    "shift_suite",
    "transfer_suite",
    "uncertainty_scores",
    "write_index_file",
]
