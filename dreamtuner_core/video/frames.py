"""The frames of a sequence: input checks, which earlier frames each frame reads, and its noise.

Frame ``i`` (from 0) reads, as references of self-subject-attention (paper Fig. 9):
- the first frame (``first_frame_reference``), or the ``anchor`` latent when one is given;
- the ``previous_frames`` frames before it, oldest first.
A frame is read once: for frame 1 (index 1) the first frame is also the previous one.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import host
from ..errors import DreamTunerInputError

NOISE_INDEPENDENT = "independent"
NOISE_SHARED = "shared"
NOISE_MODES = (NOISE_INDEPENDENT, NOISE_SHARED)


def reference_frames(index: int, previous_frames: int, first_frame_reference: bool, anchor: bool = False):
    """The indices of the generated frames that frame ``index`` reads (the anchor, when used, comes first
    and is not among them)."""
    chosen = []
    if first_frame_reference and not anchor and index > 0:
        chosen.append(0)
    for j in range(max(0, index - previous_frames), index):
        if j not in chosen:
            chosen.append(j)
    return chosen


def frame_noise(latent_image: torch.Tensor, seed: int, index: int, noise_mode: str) -> torch.Tensor:
    """The initial noise of frame ``index``: ``shared`` gives every frame the noise of ``seed``;
    ``independent`` gives frame i the noise of ``seed + i`` (the host's ``prepare_noise``)."""
    import comfy.sample

    if noise_mode not in NOISE_MODES:
        raise DreamTunerInputError(f"noise: must be one of {NOISE_MODES}, got {noise_mode!r}.")
    frame_seed = int(seed) if noise_mode == NOISE_SHARED else int(seed) + index
    return comfy.sample.prepare_noise(latent_image, frame_seed)


def check_frames(frames: int, control_images: torch.Tensor) -> int:
    if not isinstance(frames, int) or frames < 1:
        raise DreamTunerInputError(
            f"frames: {frames!r} frames asked for; give 1 or more (one control image per frame).")
    if not isinstance(control_images, torch.Tensor) or control_images.ndim != 4 or control_images.shape[-1] not in (1, 3, 4):
        shape = list(control_images.shape) if isinstance(control_images, torch.Tensor) else type(control_images).__name__
        raise DreamTunerInputError(
            f"control_images must be an IMAGE batch [frames, height, width, 3] (e.g. LoadImage, a video's frames "
            f"from GetVideoComponents); got {shape}.")
    if control_images.shape[0] != frames:
        raise DreamTunerInputError(
            f"control_images holds {control_images.shape[0]} images but frames is {frames}: give one control "
            f"image per frame (set frames to {control_images.shape[0]}, or select {frames} images with "
            "ImageFromBatch / RepeatImageBatch).")
    if not torch.isfinite(control_images).all():
        raise DreamTunerInputError("control_images contains NaN or infinite values; give images in [0, 1].")
    return frames


def check_control_size(control_images: torch.Tensor, latent_hw, ratio: int = 8):
    """The control images must show the generated frame: the same size, or the same shape at another
    size (the host's ControlNet scales the hint to the latent, as Apply ControlNet does). Another aspect
    ratio would stretch the poses: an error."""
    height, width = int(control_images.shape[1]), int(control_images.shape[2])
    target_h, target_w = int(latent_hw[0]) * ratio, int(latent_hw[1]) * ratio
    if (height, width) == (target_h, target_w):
        return
    # Same aspect ratio up to one latent pixel of rounding either way.
    if abs(height * target_w - width * target_h) <= ratio * max(height, width, target_h, target_w):
        return
    raise DreamTunerInputError(
        f"control_images are {width}x{height} but the frames are {target_w}x{target_h} (another aspect ratio: "
        f"the poses would be stretched). Scale or crop the control images to {target_w}x{target_h} (ImageScale "
        f"with crop 'center'), or set width/height (or the latent) to the control images' shape.")


def start_latents(model, frames: int, width: int, height: int, latent: Optional[dict]):
    """The latent each frame starts from ([1 or frames, C, h, w]) and its noise mask, from a LATENT or from
    width/height (zeros, as EmptyLatentImage)."""
    import comfy.sample

    channels = host.latent_channels(model)
    if latent is None:
        if width < 8 or height < 8 or width % 8 or height % 8:
            raise DreamTunerInputError(
                f"width/height: {width}x{height} is not a multiple of 8 of at least 8 (the VAE's scale); "
                f"use {max(8, width // 8 * 8)}x{max(8, height // 8 * 8)}.")
        return torch.zeros((1, channels, height // 8, width // 8)), None
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        shape = list(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise DreamTunerInputError(
            f"latent must be an image LATENT [batch, channels, height, width] (EmptyLatentImage, VAEEncode); "
            f"got {shape}. Video latents of other models are not supported.")
    if hasattr(comfy.sample, "fix_empty_latent_channels"):  # an empty latent of any family becomes this model's
        samples = comfy.sample.fix_empty_latent_channels(model, samples)
    check_family_channels(samples, channels, "latent")
    if samples.shape[0] not in (1, frames):
        raise DreamTunerInputError(
            f"latent has a batch of {samples.shape[0]} but frames is {frames}: give one latent for all frames "
            f"(EmptyLatentImage batch_size 1) or one per frame.")
    mask = latent.get("noise_mask")
    return samples.float(), mask


def check_family_channels(samples: torch.Tensor, channels: int, name: str):
    if samples.shape[1] != channels:
        raise DreamTunerInputError(
            f"{name} has {samples.shape[1]} latent channels but this model takes {channels}: it belongs to "
            "another model family. Encode it with this model's VAE (the one of the same checkpoint).")
    if not torch.isfinite(samples).all():
        raise DreamTunerInputError(f"{name} contains NaN or infinite values; re-encode it with VAEEncode.")


def frame_item(batch: Optional[torch.Tensor], index: int):
    """Item ``index`` of a per-frame batch ([1, ...] serves every frame), or None."""
    if batch is None:
        return None
    return batch[index:index + 1] if batch.shape[0] > 1 else batch
