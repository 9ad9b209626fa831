"""The pack's charts: the fine-tune's loss curve and the scores' bars as IMAGE tensors (drawn with Pillow,
which ComfyUI already requires), and the pretraining run's loss.png (matplotlib, the [train] extra).

No ComfyUI import: the command lines use it too.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .files import replacing


def _canvas(width, height):
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (width, height), (255, 255, 255))
    return picture, ImageDraw.Draw(picture)


def _as_image(picture) -> torch.Tensor:
    """A Pillow RGB picture as an IMAGE [1, H, W, 3] in [0, 1]."""
    width, height = picture.size
    pixels = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return (pixels.float() / 255.0)[None]


def loss_curve_image(losses, reference_losses=None, width=512, height=256):
    """The fine-tune's loss per step as an IMAGE [1, H, W, 3] (smoothed; the reference pair's loss beside it)."""
    img, draw = _canvas(width, height)
    left, right, top, bottom = 48, width - 8, 20, height - 24
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    series = [(losses, (40, 90, 200))]
    if reference_losses:
        series.append((reference_losses, (220, 90, 40)))
    values = [v for s, _ in series for v in s if math.isfinite(v)]
    if values:
        low, high = min(values), max(values)
        span = (high - low) or 1.0
        for data, colour in series:
            smooth, acc = [], None
            for v in data:  # exponential moving average, so the trend reads through the noise of random timesteps
                acc = v if acc is None else 0.9 * acc + 0.1 * v
                smooth.append(acc)
            n = max(1, len(smooth) - 1)
            points = [(left + (right - left) * i / n, bottom - (bottom - top) * (v - low) / span)
                      for i, v in enumerate(smooth)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
        draw.text((4, top), f"{high:.3g}", fill=(0, 0, 0))
        draw.text((4, bottom - 10), f"{low:.3g}", fill=(0, 0, 0))
    draw.text((left, 4), "loss (blue: step, orange: reference pair; smoothed)", fill=(0, 0, 0))
    draw.text((left, bottom + 6), f"steps: {len(losses)}", fill=(0, 0, 0))
    return _as_image(img)


def score_chart(per_image: dict, means: dict, labels: dict, colours: dict, order: Sequence[int],
                width: int = 512, height: int = 256) -> torch.Tensor:
    """A bar chart of per-image scores as an IMAGE [1, height, width, 3]: one group of bars per image in
    ``order``, one bar per metric (in ``per_image``'s order), axis 0..1, the means in the legend."""
    picture, draw = _canvas(width, height)
    metrics = list(per_image)
    left, right, top, bottom = 34, width - 8, 22, height - 20
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = bottom - tick * (bottom - top)
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((4, y - 6), f"{tick:.2f}", fill=(90, 90, 90))
    x = left + 4
    for metric in metrics:  # legend
        draw.rectangle([x, 6, x + 10, 16], fill=colours[metric])
        draw.text((x + 14, 5), f"{labels[metric]} = {means[metric]:.3f}", fill=(0, 0, 0))
        x += 110
    if metrics and order:
        group = (right - left) / len(order)
        bar = max(1.0, group * 0.8 / len(metrics))
        for slot, i in enumerate(order):
            x0 = left + slot * group + group * 0.1
            for k, metric in enumerate(metrics):
                value = min(max(float(per_image[metric][i]), 0.0), 1.0)
                bx = x0 + k * bar
                draw.rectangle([bx, bottom - value * (bottom - top), bx + bar - 1, bottom], fill=colours[metric])
            if group >= 14:
                draw.text((x0, bottom + 4), f"#{i}", fill=(0, 0, 0))
    else:
        draw.text((left, height // 2), "no metric computed", fill=(0, 0, 0))
    draw.line([(left, bottom), (right, bottom)], fill=(0, 0, 0))
    return _as_image(picture)


def loss_plot_png(steps, losses, path, title: Optional[str] = None) -> bool:
    """The loss per step (and its running mean) written to ``path`` as a PNG, atomically. Returns False
    without matplotlib (optional: the [train] extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        axis.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (MSE to the model's target)")
    axis.set_title(title or "")
    axis.legend()
    figure.tight_layout()
    try:
        with replacing(path) as partial:
            figure.savefig(partial, format="png", dpi=100)
    finally:
        plt.close(figure)
    return True
