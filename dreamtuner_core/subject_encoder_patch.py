"""Applying a subject encoder to a ModelPatcher clone (the ApplySubjectEncoder node's work).

The reference image is prepared as the paper does (background replaced by
white where a mask is given), encoded once per run (CLIP vision, then the
ResBlocks) and projected to each S-E-A layer's keys/values once per device;
every model evaluation only runs the S-E-A queries and Eq. 1.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from . import host
from .clip_features import clip_layer_features, clip_vision_shape
from .errors import DreamTunerInputError
from .interleaved_cfg import ENCODER_OFF_KEY
from .reference_pass import layer_key
from .references import MASK_SUBJECT_IS_ONE, sigma_range, subject_mask
from .subject_encoder import SubjectEncoder, check_compatible, layer_name, subject_encoder_attention


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


class AppliedAttention(nn.Module):
    """What one S-E-A layer needs at sampling time: its query/output projections and SE(r)'s keys/values.

    The key/value projections are applied once to SE(r) and dropped: each evaluation only runs the
    query side of Eq. 1.
    """

    def __init__(self, attention, tokens):
        super().__init__()
        self.heads = attention.heads
        self.norm, self.to_q, self.to_out = (copy.deepcopy(m) for m in (attention.norm, attention.to_q, attention.to_out))
        with torch.no_grad():
            self.register_buffer("k", attention.to_k(tokens).detach().clone())
            self.register_buffer("v", attention.to_v(tokens).detach().clone())


class SubjectEncoderPatch:
    """``middle_patch``: Eq. 1 in every transformer block, between self- and cross-attention.

    Holds the S-E-A layers applied to SE(r) (:class:`AppliedAttention`), shared by clones. The host
    moves them with the model: ``to(device)``/``to(dtype)`` when it loads or offloads the model
    (``model_patches_to``), and current ComfyUI counts them through ``models()``. A call on another
    device or dtype moves them there, in place: no second copy is kept.
    """

    dreamtuner_patch = True

    def __init__(self, encoder: SubjectEncoder, tokens, beta, sigma_start, sigma_end):
        self.beta, self.sigma_start, self.sigma_end = float(beta), sigma_start, sigma_end
        # The encoder as loaded (on the CPU, the loader node's own output): DreamTunerFinetune tunes its
        # ResBlocks from it. Sampling uses only ``layers``.
        self.encoder, self.tokens = encoder, tokens  # SE(r) [1, T, context], on the CPU
        self.layers = nn.ModuleDict({name: AppliedAttention(attention, tokens)
                                     for name, attention in encoder.attention.items()})
        self._patcher = None

    @classmethod
    def from_features(cls, encoder: SubjectEncoder, features, beta, sigma_start, sigma_end):
        """The patch for the CLIP layer ``features`` of one or more photos of the subject (SE(r) averaged)."""
        features = features.float().cpu()
        with torch.no_grad():
            tokens = encoder.encode(features).mean(dim=0, keepdim=True)
        patch = cls(encoder, tokens, beta, sigma_start, sigma_end)
        patch.features = features  # DreamTunerFinetune re-encodes them with trained ResBlocks
        return patch

    def __deepcopy__(self, memo):
        return self

    def to(self, *args, **kwargs):
        self.layers.to(*args, **kwargs)
        return self

    def models(self):
        """The S-E-A weights as a ModelPatcher, so the host's memory manager loads, counts and offloads them."""
        if self._patcher is None:
            import comfy.model_management
            import comfy.model_patcher

            self._patcher = comfy.model_patcher.ModelPatcher(
                self.layers, load_device=comfy.model_management.get_torch_device(),
                offload_device=comfy.model_management.unet_offload_device())
        return [self._patcher]

    def layer(self, name, like):
        """The applied S-E-A layer ``name``, on ``like``'s device and dtype."""
        layer = self.layers[name]
        if layer.k.device != like.device or layer.k.dtype != like.dtype:
            self.layers.to(device=like.device, dtype=like.dtype)
        return layer

    def __call__(self, x, extra_options):
        sigmas = extra_options.get("sigmas")
        if sigmas is not None and not (self.sigma_end <= float(sigmas.max()) <= self.sigma_start):
            return x
        layer = layer_key(extra_options)
        name = layer_name(layer) if layer is not None else None
        if name not in self.layers:
            return x
        layer = self.layer(name, x)
        fn = host.attention_function()
        return subject_encoder_attention(x, layer, layer.k, layer.v, self._row_beta(x, extra_options), fn,
                                         **host.attention_kwargs(fn, extra_options))

    def _row_beta(self, x, extra_options):
        """beta, or per row 0 for the conditionings a guider evaluates without the encoder."""
        off = extra_options.get(ENCODER_OFF_KEY)
        if not off:
            return self.beta
        chunks = list(extra_options.get("cond_or_uncond") or [0])
        per_chunk = x.shape[0] // len(chunks)
        rows = [0.0 if index in off else self.beta for index in chunks for _ in range(per_chunk)]
        return torch.tensor(rows, dtype=x.dtype, device=x.device).view(-1, 1, 1)


def apply_subject_encoder(model, encoder: SubjectEncoder, clip_vision, image, mask=None,
                          mask_mode=MASK_SUBJECT_IS_ONE, beta=0.2, start_percent=0.0, end_percent=1.0):
    """A clone of ``model`` with the encoder's S-E-A layers; returns (model, the image the encoder saw).

    Several images are several photos of one subject: their encoded tokens are averaged.
    """
    check_compatible(encoder.config, model, source=f"subject encoder '{getattr(encoder, 'source', 'given')}'")
    sigma_start, sigma_end = sigma_range(host.model_sampling(model), start_percent, end_percent)
    if not beta == beta:
        raise DreamTunerInputError("beta must be a number.")
    layers, width = clip_vision_shape(clip_vision)
    config = encoder.config
    if width != config.clip_width or layers < max(config.clip_layers):
        raise DreamTunerInputError(
            f"clip_vision has {layers} layers of width {width}; the subject encoder needs at least "
            f"{max(config.clip_layers)} layers of width {config.clip_width} (layers {list(config.clip_layers)}, "
            "e.g. OpenCLIP ViT-H/14 as used by IP-Adapter). Load the CLIP vision model the encoder was trained with.")
    prepared = white_background(image, mask, mask_mode)
    features = clip_layer_features(clip_vision, prepared, config.clip_layers)
    patch = SubjectEncoderPatch.from_features(encoder, features, beta, sigma_start, sigma_end)
    clone = model.clone()
    clone.set_model_patch(patch, "middle_patch")
    return clone, prepared
