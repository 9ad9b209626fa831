"""The scores as text and as a chart (the Subject Score node's outputs)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..charts import score_chart
from .metrics import CLIP_I, CLIP_T, DINO, LABELS, METRICS
from .scores import Scores


def report(scores: Scores, order: Optional[Sequence[int]] = None) -> str:
    """The scores as text: one line per image (in ``order``), the means, then the notes."""
    metrics = [m for m in METRICS if m in scores.per_image]
    order = list(order) if order is not None else list(range(scores.count))
    lines = []
    if metrics:
        lines.append("rank  image  " + "  ".join(f"{LABELS[m]:>7}" for m in metrics))
        for rank, i in enumerate(order, 1):
            lines.append(f"{rank:>4}  {i:>5}  " + "  ".join(f"{float(scores.per_image[m][i]):7.4f}" for m in metrics))
        lines.append("mean         " + "  ".join(f"{scores.mean(m):7.4f}" for m in metrics))
    else:
        lines.append("No metric computed.")
    return "\n".join(lines + scores.notes)


COLOURS = {CLIP_I: (66, 133, 244), CLIP_T: (244, 160, 0), DINO: (15, 157, 88)}


def chart(scores: Scores, order: Optional[Sequence[int]] = None, width: int = 512, height: int = 256) -> torch.Tensor:
    """A bar chart of the per-image scores as an IMAGE [1, height, width, 3] (:func:`..charts.score_chart`): one
    group of bars per image in ``order``, one bar per metric, axis 0..1."""
    metrics = [m for m in METRICS if m in scores.per_image]
    order = list(order) if order is not None else list(range(scores.count))
    return score_chart({m: scores.per_image[m] for m in metrics}, {m: scores.mean(m) for m in metrics}, LABELS,
                       COLOURS, order, width, height)
