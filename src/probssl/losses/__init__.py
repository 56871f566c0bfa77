"""Self-supervised losses, one module per family; each is a plain function (and NT-Xent a module too)
that works in any training loop.

- :mod:`~probssl.losses.contrastive`: SimCLR's NT-Xent (gathered across ranks), SimSiam's negative
  cosine and BYOL's regression loss;
- :mod:`~probssl.losses.scoring_rules`: proper scoring rules for sampled predictive distributions
  (ProSMIN's L1 energy score);
- :mod:`~probssl.losses.metric_learning`: pair mining and LAM's contrastive pair loss.
"""

from probssl.losses.contrastive import NTXentLoss, byol_loss, negative_cosine_similarity, nt_xent_loss
from probssl.losses.metric_learning import contrastive_pair_loss, mine_pairs
from probssl.losses.scoring_rules import energy_score_l1

__all__ = [
    "NTXentLoss",
    "byol_loss",
    "contrastive_pair_loss",
    "energy_score_l1",
    "mine_pairs",
    "negative_cosine_similarity",
    "nt_xent_loss",
]
