"""Tiny random-weight scoring models in the real file formats, for the fidelity tests.

- an open_clip CLIP model of a registered tiny architecture, saved as a
  safetensors state dict (the layout of open_clip_model.safetensors);
- a transformers ViTModel saved with ``save_pretrained`` (config.json +
  model.safetensors), DINO's Hugging Face layout.
Each factory returns the in-memory model it saved too, so tests compute the
expected embeddings from the model itself, independent of the loaders.
"""

import json
import os

import torch

TINY_CLIP = "dreamtuner-test-tiny-clip"
TINY_CLIP_OTHER = "dreamtuner-test-tiny-clip-wide"
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register_tiny_clip(folder):
    """Register the tiny architectures with open_clip (as a user's own model config would be)."""
    import open_clip

    os.makedirs(folder, exist_ok=True)
    wide = json.loads(json.dumps(TINY_CLIP_CONFIG))
    wide["vision_cfg"]["width"] = 48
    for name, config in ((TINY_CLIP, TINY_CLIP_CONFIG), (TINY_CLIP_OTHER, wide)):
        with open(os.path.join(folder, f"{name}.json"), "w") as handle:
            json.dump(config, handle)
    open_clip.add_model_config(folder)


def write_open_clip(path, seed=0, architecture=TINY_CLIP):
    """A random-weight open_clip model written as safetensors; returns the model."""
    import open_clip
    import safetensors.torch

    torch.manual_seed(seed)
    model = open_clip.create_model(architecture, pretrained=None, load_weights=False).eval()
    with torch.no_grad():  # open_clip starts some projections at zero-ish scale; make every tensor matter
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def write_dino(folder, seed=0):
    """A random-weight ViT (DINO's architecture at toy size) saved with save_pretrained; returns the model."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, qkv_bias=True)
    model = ViTModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    return model
