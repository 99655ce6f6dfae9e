"""Announce a collapsed run instead of printing its numbers as if nothing happened.

Two signs, checked after every epoch:

* training accuracy on the observed labels at chance: at or below 1/K + ``collapse_margin``
  (K classes). A model that predicts one class, or noise, scores 1/K on any labels; a
  healthy one scores well above it even at high noise, because it fits the clean part.
* GAF's acceptance below ``acceptance_floor`` for the whole epoch: the fraction of
  micro-batches that entered an update (accepted in a step that was taken). A filter that
  lets through a few percent of the data trains on whatever those few micro-batches carry.

A user's own loop makes the same check from :class:`gaf.GAFTrainer`: per epoch, sum
``result.num_accepted`` over the steps that were not skipped
(``StepResult.skipped`` is False), divide by M times the number of steps, and compare with
the floor; ``trainer.stats`` (:class:`gaf.FilterStats`) holds the running totals
``accepted``, ``micro_batches`` and ``skipped_steps`` (whose anchors count as accepted: a
skipped step's anchor never reaches an update). Training accuracy on the observed labels is
the user's own evaluation.
"""

from __future__ import annotations

import math
from typing import Any


def collapse_warnings(cfg, row: dict[str, Any], num_classes: int) -> list[dict[str, Any]]:
    """Warnings for one epoch's history ``row``; each names the epoch and the figure."""
    out = []
    epoch = row["epoch"]
    acc = row.get("train_acc_observed", math.nan)
    chance = 1.0 / num_classes
    if math.isfinite(acc) and acc <= chance + cfg.collapse_margin:
        out.append({
            "epoch": epoch, "kind": "chance-accuracy", "value": acc, "limit": chance,
            "message": (f"epoch {epoch}: training accuracy on the observed labels is "
                        f"{100 * acc:.1f}%, at chance (1/{num_classes} = {100 * chance:.1f}%"
                        f" + {100 * cfg.collapse_margin:g} points): the model has collapsed"),
        })
    used = row.get("update_fraction", math.nan)
    if cfg.method == "gaf" and math.isfinite(used) and used < cfg.acceptance_floor:
        out.append({
            "epoch": epoch, "kind": "low-acceptance", "value": used,
            "limit": cfg.acceptance_floor,
            "message": (f"epoch {epoch}: only {100 * used:.1f}% of the micro-batches entered "
                        f"an update (floor {100 * cfg.acceptance_floor:g}%): the filter "
                        "trains on a sliver of the data"),
        })
    return out
