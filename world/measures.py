"""Measures of the world: subject fidelity and prompt fidelity of generated images.

- ``identity_similarity``: cosine of the world's identity embedder (IdentityNet, trained contrastively
  on training subjects; the world's DINO) between generated images and the reference.
- ``pattern_accuracy``: exact read-out of the subject's 3x3 colour pattern (fraction of cells right;
  chance 0.2), from the generator's own rule (pattern colours are the only saturated ones).
- ``prompt_fidelity``: the scene classifier (SceneNet) reads scene, time of day and position; the
  fraction of images where each matches the caption.
Images are ComfyUI IMAGEs: float [B, 32, 32, 3] in [0, 1].
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import generator, host, nets


@functools.lru_cache(maxsize=None)
def identity_net():
    net = nets.IdentityNet()
    net.load_state_dict({k: v.float() for k, v in host.load_file("identity.safetensors").items()})
    return net.eval()


@functools.lru_cache(maxsize=None)
def scene_net():
    net = nets.SceneNet()
    net.load_state_dict({k: v.float() for k, v in host.load_file("scene.safetensors").items()})
    return net.eval()


def _chw(images):
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        images = images.float() / 255
    return images.float().permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def embed(images):
    return identity_net()(_chw(images))


@torch.no_grad()
def identity_similarity(images, reference):
    """[B] cosine similarity of each image's identity embedding to the reference's."""
    return (embed(images) @ embed(reference[None] if reference.ndim == 3 else reference)[0]).numpy()


def pattern_accuracy(images, subject):
    return np.array([generator.pattern_accuracy(np.asarray(im), subject) for im in torch.as_tensor(images)])


@torch.no_grad()
def read_caption(images):
    """dict name -> [B] predicted index (scene, time, position)."""
    out = scene_net()(_chw(images))
    return {name: logits.argmax(-1).numpy() for name, logits in out.items()}


def prompt_fidelity(images, caption):
    """dict name -> [B] bool: does the image show the caption's scene / time / position."""
    read = read_caption(images)
    return {"scene": read["scene"] == caption.scene, "time": read["time"] == caption.time,
            "position": read["position"] == caption.position}
