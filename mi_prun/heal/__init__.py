"""Healing without training: a closed-form linear bridge for every removed run, folded into a weight
the model already has, so the healed model keeps its architecture and loads with plain
`from_pretrained`.

- `core`: `heal(model, removed, calib, config=HealConfig())` -> (healed model, `Healing` record);
  `heal_calibration(loaded, config)` draws the calibration tokens; `check_healable` refuses early.
- `fit`: the streaming float64 sums (`BridgeStats`) and the ridge solve.
- `folds`: the family table `FOLDS` (which module each family's bridge folds into, and how) and
  the one-line refusals (`HealRefused`).

Blocks are numbered from 0 everywhere.
"""

from mi_prun.heal.core import (HEAL_INFO_ATTR, Healing, RunHealing, check_healable, heal, heal_calibration,
                               healing_of)
from mi_prun.heal.fit import Bridge, BridgeStats, solve, sse, unexplained
from mi_prun.heal.folds import FOLDS, Fold, HealRefused, Site, fold_for

__all__ = ["FOLDS", "HEAL_INFO_ATTR", "Bridge", "BridgeStats", "Fold", "HealRefused", "Healing", "RunHealing",
           "Site", "check_healable", "fold_for", "heal", "heal_calibration", "healing_of", "solve", "sse",
           "unexplained"]
