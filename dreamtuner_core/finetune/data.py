"""The training pairs' latents: the reference (background whitened) and the regular images, each also mirrored."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..images import white_background
from ..references import MASK_SUBJECT_IS_ONE
from .settings import check_image


def _resize_like(images, height, width):
    """Regular images resized (scale to cover, centre crop) to the reference's size, so both form one batch."""
    if images.shape[1:3] == (height, width):
        return images
    x = images.movedim(-1, 1)
    scale = max(height / x.shape[2], width / x.shape[3])
    size = (max(height, round(x.shape[2] * scale)), max(width, round(x.shape[3] * scale)))
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return x[:, :, top:top + height, left:left + width].movedim(1, -1).clamp(0, 1)


def encode_images(vae, images, model):
    """Latents in the model's working scale of the images and of their mirror images (VAE once each)."""
    with torch.no_grad():
        plain = vae.encode(images[..., :3])
        flipped = vae.encode(torch.flip(images[..., :3], dims=[2]))
    latent_format = model.model
    return (latent_format.process_latent_in(plain.float().cpu()),
            latent_format.process_latent_in(flipped.float().cpu()))


def prepare_latents(vae, model, reference, regular, mask=None, mask_mode=MASK_SUBJECT_IS_ONE):
    """((reference, mirrored), (regular, mirrored)) latents in the model's working scale, VAE once per image.

    The reference's background is whitened with its mask (any mask size: resized to the image); the
    regular images are resized (cover, centre crop) to the reference's size so both form one batch.
    """
    reference = check_image(reference, "reference")
    regular = check_image(regular, "regular_images")
    prepared = white_background(reference, mask, mask_mode)
    regular = _resize_like(regular, prepared.shape[1], prepared.shape[2])
    with torch.inference_mode(False):
        return encode_images(vae, prepared, model), encode_images(vae, regular, model)
