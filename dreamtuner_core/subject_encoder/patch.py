"""Eq. 1 on a model: the subject encoder's ``middle_patch``, for sampling and for training.

Sampling (the ApplySubjectEncoder node's work, :func:`apply_subject_encoder`): the
reference image is prepared as the paper does (background replaced by white
where a mask is given), encoded once per run (CLIP vision, then the ResBlocks)
and projected to each S-E-A layer's keys/values once per device; every model
evaluation only runs the S-E-A queries and Eq. 1.

Training (DreamTunerFinetune, pretraining): the same patch with gradients
(:meth:`SubjectEncoderPatch.trainable`): the keys/values of the trainer's
current SE(r) are computed in the graph at every call, by the encoder's own
trainable S-E-A layers.
"""

from __future__ import annotations

import logging

import copy
from types import SimpleNamespace

import torch
from torch import nn

from .. import host
from ..errors import DreamTunerInputError
from ..images import white_background
from ..keys import ENCODER_OFF_KEY, ENCODER_PATCH_SLOT, PackPatch, layer_key
from ..references import MASK_SUBJECT_IS_ONE, sigma_range
from .clip_features import clip_layer_features, clip_vision_shape
from .model import SubjectEncoder, check_compatible, layer_name, subject_encoder_attention


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


class SubjectEncoderPatch(PackPatch):
    """``middle_patch``: Eq. 1 in every transformer block, between self- and cross-attention.

    The one Eq. 1 of the pack, for sampling and for training:

    - sampling (the constructor, :meth:`from_features`): holds the S-E-A layers applied to SE(r)
      (:class:`AppliedAttention`), shared by clones. The host moves them with the model:
      ``to(device)``/``to(dtype)`` when it loads or offloads the model (``model_patches_to``), and
      current ComfyUI counts them through ``models()``. A call on another device or dtype moves them
      there, in place: no second copy is kept.
    - training (:meth:`trainable`): the encoder's own S-E-A layers; ``tokens`` (SE(r), set by the
      trainer) is projected to keys/values in the graph at every call. The trainer moves the encoder
      itself: ``to`` and ``models`` leave it alone. ``compute_dtype``: the dtype Eq. 1 runs in (the
      result is given back in the hidden states' own dtype); None runs it in theirs.
    """

    def __init__(self, encoder: SubjectEncoder, tokens, beta, sigma_start=float("inf"), sigma_end=0.0,
                 features=None, trainable=False, compute_dtype=None):
        self.beta, self.sigma_start, self.sigma_end = float(beta), sigma_start, sigma_end
        # The encoder as loaded (on the CPU, the loader node's own output): DreamTunerFinetune tunes its
        # ResBlocks from it, re-encoding ``features`` (the photos' CLIP layer features). Sampling uses only ``layers``.
        self.encoder, self.tokens, self.features = encoder, tokens, features  # SE(r) [1, T, context]
        self.is_trainable, self.compute_dtype = bool(trainable), compute_dtype
        self.layers = encoder.attention if trainable else nn.ModuleDict(
            {name: AppliedAttention(attention, tokens) for name, attention in encoder.attention.items()})
        self._patcher = None

    @classmethod
    def from_features(cls, encoder: SubjectEncoder, features, beta, sigma_start, sigma_end):
        """The patch for the CLIP layer ``features`` of one or more photos of the subject (SE(r) averaged)."""
        features = features.float().cpu()
        with torch.no_grad():
            tokens = encoder.encode(features).mean(dim=0, keepdim=True)
        return cls(encoder, tokens, beta, sigma_start, sigma_end, features=features)

    @classmethod
    def trainable(cls, encoder: SubjectEncoder, beta, tokens=None, features=None, compute_dtype=None):
        """Eq. 1 with gradients through ``encoder``, active at every noise level; the trainer sets ``tokens``."""
        return cls(encoder, tokens, beta, features=features, trainable=True, compute_dtype=compute_dtype)

    def __deepcopy__(self, memo):
        return self

    def to(self, *args, **kwargs):
        if not self.is_trainable:
            self.layers.to(*args, **kwargs)
        return self

    def models(self):
        """The S-E-A weights as a ModelPatcher, so the host's memory manager loads, counts and offloads them."""
        if self.is_trainable:
            return []
        if self._patcher is None:
            import comfy.model_management
            import comfy.model_patcher

            self._patcher = comfy.model_patcher.ModelPatcher(
                self.layers, load_device=comfy.model_management.get_torch_device(),
                offload_device=comfy.model_management.unet_offload_device())
        return [self._patcher]

    def layer(self, name, like):
        """The S-E-A layer ``name`` with SE(r)'s keys/values ``k``, ``v``, on ``like``'s device and dtype."""
        if self.is_trainable:
            attention = self.layers[name]
            tokens = self.tokens if self.tokens.dtype == like.dtype or torch.is_autocast_enabled() else \
                self.tokens.to(like.dtype)
            return SimpleNamespace(heads=attention.heads, norm=attention.norm, to_q=attention.to_q,
                                   to_out=attention.to_out, k=attention.to_k(tokens), v=attention.to_v(tokens))
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
        z = x if self.compute_dtype is None else x.to(self.compute_dtype)
        layer = self.layer(name, z)
        fn = host.attention_function()
        out = subject_encoder_attention(z, layer, layer.k, layer.v, self._row_beta(z, extra_options), fn,
                                        **host.attention_kwargs(fn, extra_options))
        return out if self.compute_dtype is None else out.to(x.dtype)

    def _row_beta(self, x, extra_options):
        """beta, or per row 0 for the conditionings a guider evaluates without the encoder."""
        off = extra_options.get(ENCODER_OFF_KEY)
        if not off:
            return self.beta
        chunks = list(extra_options.get("cond_or_uncond") or [0])
        per_chunk = x.shape[0] // len(chunks)
        rows = [0.0 if index in off else self.beta for index in chunks for _ in range(per_chunk)]
        return torch.tensor(rows, dtype=x.dtype, device=x.device).view(-1, 1, 1)


def encoder_patch_of(model):
    """The subject encoder patch on a ModelPatcher (the first one), or None."""
    patches = model.model_options.get("transformer_options", {}).get("patches", {}).get(ENCODER_PATCH_SLOT, [])
    found = [p for p in patches if isinstance(p, SubjectEncoderPatch)]
    return found[0] if found else None


def with_encoder_patch(model, old, new):
    """A clone whose subject encoder patch ``old`` is replaced by ``new`` (the input's options untouched)."""
    clone = model.clone()
    options = clone.model_options
    transformer_options = dict(options.get("transformer_options", {}))
    patches = dict(transformer_options.get("patches", {}))
    patches[ENCODER_PATCH_SLOT] = [new if p is old else p for p in patches.get(ENCODER_PATCH_SLOT, [])]
    transformer_options["patches"] = patches
    options["transformer_options"] = transformer_options
    return clone


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
    if mask is None:
        logging.warning("ApplySubjectEncoder: no mask, so the reference's background is not whitened and the "
                        "subject encoder encodes it with the subject (the paper whitens it). Connect a mask of "
                        "the subject (or a cut-out PNG's alpha with mask_mode 'background is 1').")
    prepared = white_background(image, mask, mask_mode)
    features = clip_layer_features(clip_vision, prepared, config.clip_layers)
    patch = SubjectEncoderPatch.from_features(encoder, features, beta, sigma_start, sigma_end)
    clone = model.clone()
    clone.set_model_patch(patch, ENCODER_PATCH_SLOT)
    return clone, prepared
