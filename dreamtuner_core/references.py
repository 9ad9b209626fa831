"""Reference images for self-subject-attention (paper 3.2, Fig. 5).

A :class:`Reference` is everything one reference item needs for a whole run:
the latent in the model's working scale, the fixed seeded noise it is noised
with, its foreground mask, ``omega_ref``, the sigma range it is active in and
the self-attention layers it feeds. It is immutable; building one validates
the user's inputs and turns them into clear errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .errors import DreamTunerInputError

MASK_SUBJECT_IS_ONE = "subject is 1"
MASK_BACKGROUND_IS_ONE = "background is 1 (LoadImage alpha)"
MASK_MODES = (MASK_SUBJECT_IS_ONE, MASK_BACKGROUND_IS_ONE)


@dataclass(frozen=True, eq=False)
class Reference:
    """One reference latent and how it is attended.

    latent: [C, H, W], already in the model's working scale (``process_latent_in``).
    noise: [C, H, W], standard normal, seeded: the same for every step of a run.
    mask: [h, w] in [0, 1], 1 = subject; ``None`` attends the whole reference.
    omega_ref: the reference weight of Eq. 3.
    sigma_start, sigma_end: active while sigma_end <= sigma <= sigma_start.
    layers: the self-attention layers it feeds, ``None`` for all of them.
    context: [1, L, D] text conditioning for the reference pass, or ``None``
        to use the positive conditioning of the evaluation.
    """

    latent: torch.Tensor
    noise: torch.Tensor
    mask: Optional[torch.Tensor]
    omega_ref: float
    sigma_start: float = float("inf")
    sigma_end: float = 0.0
    layers: Optional[frozenset] = None
    context: Optional[torch.Tensor] = None
    _token_masks: dict = field(default_factory=dict, repr=False, compare=False)

    def is_active(self, sigma: float) -> bool:
        return self.omega_ref > 0 and self.sigma_end <= sigma <= self.sigma_start

    def feeds(self, layer) -> bool:
        return self.layers is None or layer in self.layers

    def token_mask(self, tokens: int) -> torch.Tensor:
        """``m^r`` on the token grid of a layer with ``tokens`` reference tokens (flattened, float32)."""
        cached = self._token_masks.get(tokens)
        if cached is None:
            h, w = token_grid(self.latent.shape[-2:], tokens)
            if self.mask is None:
                cached = torch.ones(h * w)
            else:
                cached = F.adaptive_avg_pool2d(self.mask[None, None].float(), (h, w)).flatten()
            self._token_masks[tokens] = cached
        return cached


def token_grid(latent_hw, tokens: int):
    """The (h, w) grid of a UNet level with ``tokens`` tokens for a latent of size ``latent_hw``.

    Each UNet downsample is a stride-2 convolution with padding 1, so a level's
    grid is the latent size halved with rounding up, once per level.
    """
    h, w = int(latent_hw[0]), int(latent_hw[1])
    while h * w > tokens and (h > 1 or w > 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != tokens:
        raise DreamTunerInputError(
            f"A self-attention layer holds {tokens} reference tokens, which is no UNet level of a "
            f"{latent_hw[0]}x{latent_hw[1]} reference latent. Another patch on this model changes the "
            "number of tokens (token merging or tiling); remove it or exclude these blocks in 'blocks'."
        )
    return h, w


def subject_mask(mask: torch.Tensor, count: int, mask_mode: str = MASK_SUBJECT_IS_ONE, name: str = "reference_mask",
                 items: str = "reference latents") -> torch.Tensor:
    """A ComfyUI MASK ([N, H, W] or [H, W]) as validated subject masks [1 or count, H, W], 1 = subject.

    A batch of 1 serves every item; otherwise the batch must equal ``count``.
    """
    if mask_mode not in MASK_MODES:
        raise DreamTunerInputError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}.")
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise DreamTunerInputError(f"{name} must be a MASK of shape [batch, height, width]; got shape {list(mask.shape)}.")
    if mask.shape[0] not in (1, count):
        raise DreamTunerInputError(
            f"{name} has a batch of {mask.shape[0]} but there are {count} {items}: give one mask for all "
            f"or exactly {count}, in the same order.")
    if not torch.isfinite(mask).all():
        raise DreamTunerInputError(f"{name} contains NaN or infinite values; give a mask in [0, 1].")
    mask = mask.float().clamp(0.0, 1.0)
    if mask_mode == MASK_BACKGROUND_IS_ONE:
        mask = 1.0 - mask
    for i, m in enumerate(mask):
        if not (m > 0).any():
            raise DreamTunerInputError(
                f"{name} selects no subject pixels in item {i} (it is all zero with mask_mode {mask_mode!r}). "
                f"If the mask comes from LoadImage's alpha (1 on transparent background), set mask_mode to "
                f"{MASK_BACKGROUND_IS_ONE!r}; or leave {name} unconnected to use the whole image.")
    return mask


def prepare_masks(mask: Optional[torch.Tensor], count: int, mask_mode: str = MASK_SUBJECT_IS_ONE):
    """One subject mask (or None: the whole reference) per reference latent."""
    if mask is None:
        return [None] * count
    masks = subject_mask(mask, count, mask_mode)
    return [masks[i if masks.shape[0] == count else 0] for i in range(count)]


def reference_noise(shape, seed: int) -> torch.Tensor:
    """Seeded standard-normal noise for the reference, fixed for a whole run (CPU, float32)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def sigma_range(model_sampling, start_percent: float, end_percent: float):
    """(sigma_start, sigma_end) of a patch active from start_percent to end_percent of the schedule."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise DreamTunerInputError(
            f"start_percent ({start_percent}) must not be greater than end_percent ({end_percent}), and "
            "both lie in [0, 1]: the patch is active from start_percent to end_percent of the schedule.")
    return float(model_sampling.percent_to_sigma(start_percent)), float(model_sampling.percent_to_sigma(end_percent))


def check_reference_latent(samples, latent_channels: int) -> torch.Tensor:
    """Validate a LATENT's ``samples`` as references: [R, C, H, W], the model's channels, finite."""
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        shape = list(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise DreamTunerInputError(
            f"reference must be an image LATENT of shape [batch, channels, height, width] (from "
            f"VAEEncode); got {shape}. Video or audio latents are not references."
        )
    if samples.shape[1] != latent_channels:
        raise DreamTunerInputError(
            f"reference has {samples.shape[1]} latent channels but this model takes {latent_channels}. "
            "Encode the reference image with the VAE that belongs to this model (the one loaded with "
            "the checkpoint)."
        )
    if not torch.isfinite(samples).all():
        raise DreamTunerInputError(
            "reference contains NaN or infinite values. Re-encode the reference image with VAEEncode "
            "(an fp16 VAE overflowing is a common cause: try the VAE in fp32 or bf16)."
        )
    return samples.float()
