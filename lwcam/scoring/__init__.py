"""Every score of a saliency map, one module per family, and the runner that scores many methods.

The rule for where a score goes:

* **One module per family** (Quantus' categories): :mod:`~lwcam.scoring.games` and
  :mod:`~lwcam.scoring.faithfulness` (does removing what the map ranks first change the model's answer?),
  :mod:`~lwcam.scoring.localisation` (does it point at the object?), :mod:`~lwcam.scoring.randomisation`,
  :mod:`~lwcam.scoring.robustness` and :mod:`~lwcam.scoring.complexity`.
* **Each score is declared** with :func:`~lwcam.scoring._meta.score`, beside its ``def``: its family, its
  direction (higher or lower is better) and what it needs (the model, a mask, an explainer). The
  declarations are collected in :data:`SCORES`; tables and plots read directions from there.
* Every score returns one value per image (a tensor whose first dimension is the batch), so that the
  statistics of :mod:`~lwcam.scoring.stats` (bootstrap CIs, paired tests) apply to all of them.
* :mod:`~lwcam.scoring.correlation` holds the rank correlation that several families share.
* :mod:`~lwcam.scoring.evaluation` runs explainers through the registry of :mod:`lwcam.baselines` and
  scores them; it is imported on its own (``from lwcam.scoring import evaluation``), since it loads
  every explainer.

Example:
    >>> from lwcam.scoring import SCORES
    >>> SCORES["deletion_game"].direction, SCORES["targeted_mass"].family
    ('lower', 'localisation')
    >>> sorted({info.family for info in SCORES.values()})
    ['complexity', 'faithfulness', 'localisation', 'randomisation', 'robustness']
"""

from __future__ import annotations

from ._meta import FAMILIES, NEEDS, SCORES, ScoreInfo, score
from .complexity import sparseness
from .correlation import map_rank_correlation
from .faithfulness import ROAD_PERCENTAGES, road, road_score, targeted_deletion
from .games import GameResult, deletion_game, game_auc, gaussian_blur, insertion_game
from .localisation import class_sensitivity, pointing_game, relevance_mass, targeted_mass, targeted_pointing
from .randomisation import model_randomisation
from .robustness import max_sensitivity
from .stats import PairedResult, bootstrap_ci, paired_test

__all__ = [
    "FAMILIES", "NEEDS", "SCORES", "ScoreInfo", "score",
    "GameResult", "deletion_game", "insertion_game", "game_auc", "gaussian_blur",
    "pointing_game", "relevance_mass", "targeted_pointing", "targeted_mass", "class_sensitivity",
    "targeted_deletion", "road", "road_score", "ROAD_PERCENTAGES",
    "model_randomisation", "max_sensitivity", "sparseness", "map_rank_correlation",
    "PairedResult", "bootstrap_ci", "paired_test",
]
