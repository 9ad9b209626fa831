"""The embedders the scores read: open_clip (CLIP-I, CLIP-T), DINO, and the host's CLIP vision (CLIP-I)."""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch

from ..errors import DreamTunerInputError
from .metrics import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, Images, _as_batches, normalise, resize_center_crop


class _TorchEmbedder:
    """A torch model kept on ``offload_device`` between calls and moved to ``device`` while embedding."""

    name = ""

    def __init__(self, model: torch.nn.Module, device="cpu", offload_device="cpu"):
        self.model = model.eval().requires_grad_(False)
        self.device, self.offload_device = torch.device(device), torch.device(offload_device)
        self.model.to(self.offload_device)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _pixels(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_images(self, images: Images, check_interrupt: Optional[Callable[[], None]] = None) -> torch.Tensor:
        """Embeddings [N, D] (float32, CPU) of every image, in order."""
        out = []
        try:
            self.model.to(self.device)
            dtype = next(self.model.parameters()).dtype
            with torch.no_grad():
                for batch in _as_batches(images):
                    if check_interrupt is not None:
                        check_interrupt()
                    pixels = self._pixels(batch).to(self.device, dtype)
                    out.append(self._forward(pixels).float().cpu())
        finally:
            self.model.to(self.offload_device)
        return torch.cat(out) if out else torch.zeros(0)


class OpenClipScorer(_TorchEmbedder):
    """An open_clip CLIP model: image embeddings (CLIP-I) and text embeddings (CLIP-T)."""

    def __init__(self, model, tokenizer, architecture: str, source: str = "", device="cpu", offload_device="cpu"):
        super().__init__(model, device, offload_device)
        self.tokenizer, self.architecture = tokenizer, architecture
        self.name = f"open_clip {architecture}" + (f" ({os.path.basename(source)})" if source else "")
        cfg = getattr(model.visual, "preprocess_cfg", None) or {}
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(cfg.get("mean") or getattr(model.visual, "image_mean", None) or CLIP_MEAN)
        self.std = tuple(cfg.get("std") or getattr(model.visual, "image_std", None) or CLIP_STD)

    def _pixels(self, image):
        return normalise(resize_center_crop(image, self.size), self.mean, self.std)

    def _forward(self, pixels):
        return self.model.encode_image(pixels)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings [N, D] (float32, CPU) of the prompts, in order."""
        try:
            self.model.to(self.device)
            with torch.no_grad():
                tokens = self.tokenizer(list(texts)).to(self.device)
                return self.model.encode_text(tokens).float().cpu()
        finally:
            self.model.to(self.offload_device)


class DinoScorer(_TorchEmbedder):
    """A DINO ViT (transformers ``ViTModel``): the final-norm CLS token, as DINO's own evaluation reads it."""

    def __init__(self, model, source: str = "", size: int = 224, device="cpu", offload_device="cpu"):
        super().__init__(model, device, offload_device)
        self.size = size
        self.name = "DINO " + (os.path.basename(os.path.normpath(source)) if source else type(model).__name__)

    def _pixels(self, image):
        return normalise(resize_center_crop(image, self.size), IMAGENET_MEAN, IMAGENET_STD)

    def _forward(self, pixels):
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


class HostClipVision:
    """The host's CLIP vision model (ComfyUI's CLIPVisionLoader): ``encode_image``'s projected ``image_embeds``.

    The host resizes, crops and normalises as its CLIP expects and manages the device itself.
    """

    def __init__(self, clip_vision, name: str = "CLIP vision (CLIPVisionLoader)"):
        if not hasattr(clip_vision, "encode_image"):
            raise DreamTunerInputError("clip_vision must be a CLIP_VISION from the core CLIPVisionLoader.")
        self.clip_vision, self.name = clip_vision, name

    def embed_images(self, images: Images, check_interrupt: Optional[Callable[[], None]] = None) -> torch.Tensor:
        out = []
        for batch in _as_batches(images):
            if check_interrupt is not None:
                check_interrupt()
            out.append(self.clip_vision.encode_image(batch[..., :3].float())["image_embeds"].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)
