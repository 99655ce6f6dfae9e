"""Announce a collapsed run instead of printing its numbers as if nothing happened.

Two signs, checked after every epoch:

* training accuracy on the observed labels at chance: at or below 1/K + ``collapse_margin``
  (K classes), from the second epoch on. A model that predicts one class, or noise,
  scores 1/K on any labels; a healthy one scores well above it even at high noise,
  because it fits the clean part.
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


def _at_chance(cfg, row: dict[str, Any], num_classes: int) -> bool:
    acc = row.get("train_acc_observed", math.nan)
    return math.isfinite(acc) and acc <= 1.0 / num_classes + cfg.collapse_margin


def _starved(cfg, row: dict[str, Any]) -> bool:
    used = row.get("update_fraction", math.nan)
    return cfg.method == "gaf" and math.isfinite(used) and used < cfg.acceptance_floor


def collapse_warnings(cfg, history: list[dict[str, Any]], num_classes: int
                      ) -> list[dict[str, Any]]:
    """Warnings raised by the latest epoch of ``history``; each names the epoch and the
    figure. One warning per streak: a run that stays collapsed is not re-announced every
    epoch. Chance accuracy counts from the second epoch on (a first epoch may simply not
    have learned yet): at chance in epochs 1 and 2 warns at epoch 2, "since epoch 1"."""
    out = []
    row, prev = history[-1], (history[-2] if len(history) > 1 else None)
    epoch = row["epoch"]
    chance = 1.0 / num_classes
    # A streak is announced at its first epoch, or at epoch 2 if it began at epoch 1.
    if epoch > 1 and _at_chance(cfg, row, num_classes) and not (
            prev["epoch"] >= 2 and _at_chance(cfg, prev, num_classes)):
        since = prev["epoch"] if _at_chance(cfg, prev, num_classes) else epoch
        acc = row["train_acc_observed"]
        out.append({
            "epoch": epoch, "since": since, "kind": "chance-accuracy", "value": acc,
            "limit": chance,
            "message": (f"epoch {epoch}: training accuracy on the observed labels is "
                        f"{100 * acc:.1f}%, at chance (1/{num_classes} = {100 * chance:.1f}%"
                        f" + {100 * cfg.collapse_margin:g} points) since epoch {since}: the "
                        "model has collapsed"),
        })
    if _starved(cfg, row) and not (prev is not None and _starved(cfg, prev)):
        used = row["update_fraction"]
        out.append({
            "epoch": epoch, "kind": "low-acceptance", "value": used,
            "limit": cfg.acceptance_floor,
            "message": (f"epoch {epoch}: only {100 * used:.1f}% of the micro-batches entered "
                        f"an update (floor {100 * cfg.acceptance_floor:g}%): the filter "
                        "trains on a sliver of the data"),
        })
    return out
