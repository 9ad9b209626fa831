"""Reference images as the paper prepares them: the background (mask 0) replaced by white.

Used by the subject encoder (its CLIP input), fine-tuning (the reference pair),
pretraining data and scoring (the real images). No ComfyUI import.
"""

from __future__ import annotations

import torch.nn.functional as F

from .errors import DreamTunerInputError
from .references import MASK_SUBJECT_IS_ONE, subject_mask


def white_background(image, mask=None, mask_mode=MASK_SUBJECT_IS_ONE):
    """IMAGE [B, H, W, 3] with the background (mask 0) replaced by white; the mask is resized to the image."""
    if image.ndim != 4 or image.shape[-1] < 3:
        raise DreamTunerInputError(f"image must be an IMAGE [batch, height, width, 3]; got shape {list(image.shape)}.")
    image = image[..., :3].float()
    if mask is None:
        return image
    mask = subject_mask(mask, image.shape[0], mask_mode, name="mask", items="images")
    if mask.shape[-2:] != image.shape[1:3]:  # documented automatic fix: any mask size works
        mask = F.interpolate(mask[:, None], size=image.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    m = mask[..., None].to(image)
    return image * m + (1.0 - m)
