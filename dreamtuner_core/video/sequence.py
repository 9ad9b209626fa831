"""The sequence loop of the paper's video generation (Fig. 9), through the host's own sampler.

Frame 1 is sampled with the model as it comes (its subject's self-subject-attention, encoder and
LoRAs); every next frame with the first frame and the previous frame(s) added as references of
self-subject-attention, on a clone made for that frame alone (``ssa.install``). Each frame gets
its own control image through the host's ControlNet application to the conditioning.

Memory: what a frame holds is one frame's sampling and its references; the frames already made
are kept as latents on the host's intermediate device (CPU), the IMAGE output decoded frame by
frame at the end. Progress: one host progress bar over frames x steps. Interrupts: checked
before every frame (and by the host during sampling); an interrupted run returns nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import host
from ..errors import DreamTunerInputError
from ..ssa.cache import end_of_run
from ..ssa.install import apply_self_subject_attention
from .frames import (NOISE_INDEPENDENT, NOISE_MODES, NOISE_SHARED, check_control_size, check_family_channels,
                     check_frames, frame_item, frame_noise, reference_frames, start_latents)


@dataclass(frozen=True)
class SequenceSettings:
    """How a sequence is sampled.

    previous_frames: how many frames before each frame it reads (the paper: 1).
    frame_omega_ref: omega_ref (Eq. 3) of the frame references; 0 samples every frame on its own.
    first_frame_reference: every frame also reads frame 1 (the paper), or the anchor latent when given.
    reference_seed: seed of the noise the frame references are noised with (reference r gets seed + r).
    """

    frames: int
    steps: int = 20
    cfg: float = 7.0
    sampler_name: str = "euler"
    scheduler: str = "normal"
    seed: int = 0
    noise_mode: str = NOISE_INDEPENDENT
    denoise: float = 1.0
    previous_frames: int = 1
    frame_omega_ref: float = 3.0
    first_frame_reference: bool = True
    reference_seed: int = 0
    control_strength: float = 1.0
    control_start: float = 0.0
    control_end: float = 1.0


@dataclass
class SequenceResult:
    latents: torch.Tensor            # [frames, C, h, w], raw VAE latents (a LATENT's "samples")
    images: Optional[torch.Tensor]   # [frames, H, W, 3] when a VAE was given


def check_settings(settings: SequenceSettings):
    import comfy.samplers

    if settings.steps < 1:
        raise DreamTunerInputError(f"steps must be 1 or more, got {settings.steps}.")
    if settings.previous_frames < 0:
        raise DreamTunerInputError(f"previous_frames must be 0 or more, got {settings.previous_frames}.")
    if not (settings.frame_omega_ref >= 0.0):
        raise DreamTunerInputError(f"frame_omega_ref must be 0 or more, got {settings.frame_omega_ref}.")
    if not 0.0 < settings.denoise <= 1.0:
        raise DreamTunerInputError(f"denoise must be in (0, 1], got {settings.denoise}.")
    if settings.noise_mode not in NOISE_MODES:
        raise DreamTunerInputError(f"noise: must be one of {NOISE_MODES}, got {settings.noise_mode!r}.")
    if settings.sampler_name not in comfy.samplers.KSampler.SAMPLERS:
        raise DreamTunerInputError(f"sampler_name: {settings.sampler_name!r} is not a sampler of this ComfyUI.")
    if settings.scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise DreamTunerInputError(f"scheduler: {settings.scheduler!r} is not a scheduler of this ComfyUI.")
    if not 0.0 <= settings.control_start <= settings.control_end <= 1.0:
        raise DreamTunerInputError(
            f"control_start_percent ({settings.control_start}) must not exceed control_end_percent "
            f"({settings.control_end}); both lie in [0, 1].")


def frame_model(model, made, index, settings: SequenceSettings, anchor=None):
    """The model frame ``index`` is sampled with: ``model`` itself, or a clone whose self-subject-attention
    also reads the anchor and the earlier frames :func:`frames.reference_frames` names (raw latents)."""
    chosen = reference_frames(index, settings.previous_frames, settings.first_frame_reference, anchor is not None)
    parts = ([anchor] if anchor is not None and settings.first_frame_reference else []) + [made[j] for j in chosen]
    if not parts:
        return model, False
    references = torch.cat(parts)
    return apply_self_subject_attention(model, references, omega_ref=settings.frame_omega_ref,
                                        seed=settings.reference_seed), True


def generate_sequence(model, positive, negative, control_net, control_images, settings: SequenceSettings,
                      width: int = 512, height: int = 512, latent: Optional[dict] = None,
                      anchor: Optional[torch.Tensor] = None, vae=None) -> SequenceResult:
    """Sample ``settings.frames`` frames, frame i driven by ``control_images[i]``, each next frame reading
    the first and the previous frame(s) through self-subject-attention (paper Fig. 9).

    latent: a LATENT whose size (and content, with denoise < 1) the frames start from: batch 1 for every
        frame or one per frame; None: zeros of ``width`` x ``height``.
    anchor: raw latents [R, C, h, w] read in place of frame 1 by every frame (first_frame_reference).
    """
    import comfy.model_management
    import comfy.sample
    import comfy.utils

    frames = check_frames(settings.frames, control_images)
    check_settings(settings)
    channels = host.latent_channels(model)
    host.self_attention_layers(model)  # the family check, before any sampling
    starts, noise_mask = start_latents(model, frames, width, height, latent)
    check_control_size(control_images, starts.shape[-2:])
    if anchor is not None:
        if not isinstance(anchor, torch.Tensor) or anchor.ndim != 4:
            raise DreamTunerInputError("first_frame must be an image LATENT [batch, channels, height, width] (VAEEncode).")
        check_family_channels(anchor, channels, "first_frame")
        anchor = anchor.float().cpu()

    total = frames * settings.steps
    bar = comfy.utils.ProgressBar(total)
    made = []
    for index in range(frames):
        comfy.model_management.throw_exception_if_processing_interrupted()
        made.append(_sample_frame(model, positive, negative, control_net, control_images, settings, starts,
                                  noise_mask, made, index, anchor, bar, total))
    latents = torch.cat(made)
    images = None
    if vae is not None:
        decoded = []
        for index in range(frames):
            comfy.model_management.throw_exception_if_processing_interrupted()
            image = vae.decode(latents[index:index + 1])
            decoded.append(image.reshape((-1,) + tuple(image.shape[-3:])).cpu())
        images = torch.cat(decoded)
    return SequenceResult(latents=latents, images=images)


def _sample_frame(model, positive, negative, control_net, control_images, settings, starts, noise_mask, made, index,
                  anchor, bar, total):
    import comfy.sample

    latent_image = frame_item(starts, index)
    noise = frame_noise(latent_image, settings.seed, index, settings.noise_mode)
    frame_seed = settings.seed if settings.noise_mode == NOISE_SHARED else settings.seed + index
    positive_i, negative_i = host.apply_controlnet(positive, negative, control_net, frame_item(control_images, index),
                                                   settings.control_strength, settings.control_start,
                                                   settings.control_end)
    patched, own = frame_model(model, made, index, settings, anchor)
    done = index * settings.steps

    def callback(step, x0, x, total_steps):
        bar.update_absolute(done + min(step + 1, settings.steps), total)

    try:
        samples = comfy.sample.sample(patched, noise, settings.steps, settings.cfg, settings.sampler_name,
                                      settings.scheduler, positive_i, negative_i, latent_image,
                                      denoise=settings.denoise, noise_mask=_frame_mask(noise_mask, index, settings.frames),
                                      callback=callback, disable_pbar=True, seed=frame_seed)
    finally:
        if own:
            end_of_run(patched)
    return samples.float().to(comfy.model_management.intermediate_device())


def _frame_mask(mask, index, frames):
    """A LATENT's noise mask for one frame: one per frame ([frames, H, W]) or one for all."""
    if mask is None or mask.ndim < 3 or mask.shape[0] != frames or frames == 1:
        return mask
    return mask[index:index + 1]
