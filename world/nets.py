"""The world's measuring networks (plain torch; not host models): an identity embedder and a scene classifier.

IdentityNet is the world's DINO: trained contrastively on renders of training subjects (two renders of
one subject in different captions are a positive pair), it embeds an image so that renders of one
subject lie close whatever the scene. SceneNet reads the caption's scene, time of day and position.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _trunk(width):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
        nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.AvgPool2d(2),  # 16
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(), nn.AvgPool2d(2),  # 8
        nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.GELU(), nn.AvgPool2d(2),  # 4
        nn.Flatten(), nn.Linear(4 * width * 16, 256), nn.GELU())


class IdentityNet(nn.Module):
    def __init__(self, width=16, dim=64):
        super().__init__()
        self.trunk = _trunk(width)
        self.head = nn.Linear(256, dim)

    def forward(self, images):
        """images [B,3,32,32] in [0,1] -> unit embeddings [B,dim]."""
        return F.normalize(self.head(self.trunk(images * 2 - 1)), dim=-1)


class SceneNet(nn.Module):
    HEADS = (("scene", 6), ("time", 2), ("position", 3))

    def __init__(self, width=16):
        super().__init__()
        self.trunk = _trunk(width)
        self.heads = nn.ModuleDict({name: nn.Linear(256, n) for name, n in self.HEADS})

    def forward(self, images):
        h = self.trunk(images * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}


def augment(images, generator):
    """Robustness to a generator's renderings: random blur, noise and brightness (images [B,3,H,W] in [0,1])."""
    b = images.shape[0]
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = (torch.rand(b, 1, 1, 1, generator=generator) < 0.5).float()
    images = pick * blur + (1 - pick) * images
    images = images * (1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5))
    images = images + 0.03 * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1)
