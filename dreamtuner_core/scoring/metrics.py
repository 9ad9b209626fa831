"""Subject fidelity and prompt fidelity, the maths: CLIP-I, CLIP-T and DINO.

The measures of DreamBooth's DreamBench protocol, which DreamTuner's Table 1
reports (CLIP-T and CLIP-I):

- **CLIP-I**: cosine similarity of the CLIP image embeddings of a generated
  image and a real image of the subject, averaged over all (generated, real)
  pairs.
- **CLIP-T**: cosine similarity of the CLIP image embedding of a generated
  image and the CLIP text embedding of its prompt, averaged over the images.
- **DINO**: cosine similarity of the CLS tokens of a self-supervised DINO
  ViT-S/16 for a generated and a real image, averaged over all pairs. DINO is
  not trained to ignore what CLIP ignores (pose, colour details), so it tells
  two instances of one class apart better than CLIP-I.

Every average over pairs equals the average over generated images of each
image's mean over the real images, so one score per generated image (used to
rank a batch) and the protocol's mean come from the same numbers.

Models come from the user's files, loaded without downloading anything and
without pickle: CLIP from an open_clip ``.safetensors`` file (read with safetensors) (or, for CLIP-I
in the graph, the host's CLIP vision model), DINO from a local Hugging Face
folder through ``transformers``. Nothing here imports ComfyUI, so the command
line evaluation uses the same code as the node.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F

from ..errors import DreamTunerInputError

CLIP_I, CLIP_T, DINO = "clip_i", "clip_t", "dino"


METRICS = (CLIP_I, CLIP_T, DINO)


LABELS = {CLIP_I: "CLIP-I", CLIP_T: "CLIP-T", DINO: "DINO"}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


CHUNK = 16  # images per forward: bounds memory on a large batch

Images = Union[torch.Tensor, Sequence[torch.Tensor]]


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """IMAGE [B, H, W, C] in [0, 1] -> pixels [B, 3, size, size]: shorter side to ``size`` (bicubic,
    antialiased), centre crop, clamped to [0, 1]. What CLIP's and DINO's evaluation transforms do."""
    pixels = image[..., :3].float().movedim(-1, 1)
    h, w = pixels.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        pixels = F.interpolate(pixels, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                               mode="bicubic", antialias=True, align_corners=False)
        top, left = (pixels.shape[-2] - size) // 2, (pixels.shape[-1] - size) // 2
        pixels = pixels[..., top:top + size, left:left + size]
    return pixels.clamp(0.0, 1.0)


def normalise(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[A, D] x [B, D] -> [A, B] cosine similarities (float64, so means over thousands of pairs stay exact)."""
    a = F.normalize(a.double(), dim=-1)
    b = F.normalize(b.double(), dim=-1)
    return a @ b.T


def mean_over_references(generated: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Each generated image's mean cosine over the real images: [G]. Its mean is the mean over all pairs."""
    return cosine_matrix(generated, real).mean(dim=1)


def text_cosines(generated: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Each generated image's cosine with its own prompt ([G, D] with [G, D], or one prompt [1, D] for all)."""
    a = F.normalize(generated.double(), dim=-1)
    b = F.normalize(texts.double(), dim=-1).expand_as(a)
    return (a * b).sum(dim=-1)


def _as_batches(images: Images):
    """Split the input into same-size IMAGE batches [b, H, W, C] of at most CHUNK images."""
    if isinstance(images, torch.Tensor):
        images = [images] if images.ndim == 4 else [images[None]]
    else:
        images = [im if im.ndim == 4 else im[None] for im in images]
    for batch in images:
        if batch.ndim != 4 or batch.shape[-1] < 3:
            raise DreamTunerInputError(f"images must be IMAGE tensors [batch, height, width, 3]; got "
                                       f"shape {list(batch.shape)}.")
        for start in range(0, batch.shape[0], CHUNK):
            yield batch[start:start + CHUNK]
