"""Scoring a batch: each generated image's CLIP-I, CLIP-T and DINO against the references, and its rank."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..errors import DreamTunerInputError
from ..images import white_background
from ..references import MASK_SUBJECT_IS_ONE
from .embedders import DinoScorer, OpenClipScorer
from .metrics import CLIP_I, CLIP_T, DINO, Images, _as_batches, mean_over_references, text_cosines


@dataclass
class ScoringModels:
    """What measures what; a metric whose model is None is skipped with a note."""

    clip_i: Optional[object] = None  # anything with embed_images: OpenClipScorer or HostClipVision
    clip_t: Optional[OpenClipScorer] = None
    dino: Optional[DinoScorer] = None


@dataclass
class Scores:
    """Per-image scores [N] (float64) of each computed metric, and notes on what was skipped or used."""

    per_image: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def mean(self, metric: str) -> float:
        values = self.per_image.get(metric)
        return float(values.mean()) if values is not None and values.numel() else float("nan")

    @property
    def count(self) -> int:
        return next((len(v) for v in self.per_image.values()), 0)


def prepare_references(references: torch.Tensor, mask=None, mask_mode=None) -> torch.Tensor:
    """Reference IMAGEs with the background (mask 0) whitened, as the subject encoder sees them."""
    if mask is None:
        return references[..., :3].float()
    return white_background(references, mask, mask_mode or MASK_SUBJECT_IS_ONE)


def _prompts_for(prompts, count: int):
    if prompts is None:
        return []
    if isinstance(prompts, str):
        return [prompts] if prompts.strip() else []
    prompts = list(prompts)
    if len(prompts) not in (1, count):
        raise DreamTunerInputError(f"prompts: {len(prompts)} prompts for {count} images; give one prompt "
                                   "for all images or one per image.")
    return prompts if all(p.strip() for p in prompts) else []


def score_images(generated: Images, references: Images, prompts=None, models: Optional[ScoringModels] = None,
                 check_interrupt: Optional[Callable[[], None]] = None, reference_cache: Optional[dict] = None) -> Scores:
    """CLIP-I, CLIP-T and DINO of each generated image; references already prepared (see prepare_references).

    prompts: one prompt for all images, one per image, or None/"" to skip CLIP-T.
    reference_cache: a dict the caller keeps while it scores several batches against the same ``references``
    object (which it keeps alive, as the key is its id): their embeddings are then computed once.
    """
    count = sum(b.shape[0] for b in _as_batches(generated))
    if count == 0:
        raise DreamTunerInputError("images: no generated image to score.")
    if sum(b.shape[0] for b in _as_batches(references)) == 0:
        raise DreamTunerInputError("reference: no reference image to compare with.")
    models = models or ScoringModels()
    scores = Scores()
    texts = _prompts_for(prompts, count)
    cache = {}

    def embed(model, images):
        store = reference_cache if reference_cache is not None and images is references else cache
        key = (id(model), id(images))
        if key not in store:
            store[key] = model.embed_images(images, check_interrupt)
        return store[key]

    if models.clip_i is not None:
        scores.per_image[CLIP_I] = mean_over_references(embed(models.clip_i, generated),
                                                        embed(models.clip_i, references))
        scores.notes.append(f"CLIP-I: {models.clip_i.name}")
    else:
        scores.notes.append("CLIP-I skipped: no CLIP model (connect a CLIP_VISION or load an open_clip file).")
    if models.clip_t is not None and texts:
        scores.per_image[CLIP_T] = text_cosines(embed(models.clip_t, generated), models.clip_t.embed_texts(texts))
        scores.notes.append(f"CLIP-T: {models.clip_t.name}")
    elif models.clip_t is None:
        scores.notes.append("CLIP-T skipped: no open_clip model (CLIP-T needs CLIP's text and image towers).")
    else:
        scores.notes.append("CLIP-T skipped: no prompt given.")
    if models.dino is not None:
        scores.per_image[DINO] = mean_over_references(embed(models.dino, generated), embed(models.dino, references))
        scores.notes.append(f"DINO: {models.dino.name}")
    else:
        scores.notes.append("DINO skipped: no DINO model loaded.")
    return scores


def ranking(scores: Scores, metric: str) -> list:
    """Indices of the images, best ``metric`` first (ties keep batch order); batch order if not computed."""
    values = scores.per_image.get(metric)
    if values is None:
        return list(range(scores.count))
    return sorted(range(len(values)), key=lambda i: (-float(values[i]), i))
