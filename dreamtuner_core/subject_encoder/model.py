"""The subject encoder, paper 3.1, Fig. 4, Eq. 1.

Multi-layer CLIP image features of the (background-removed) reference,
concatenated on the channel axis, are mapped by ResBlocks to the UNet's
context width: ``SE(r)``. One subject-encoder-attention (S-E-A) layer per UNet
transformer block, built like that block's cross-attention (same heads and
head width, keys/values from ``SE(r)``) with its output layer zero-initialised,
sits after self-attention and before the text cross-attention (the host's
``middle_patch``). Eq. 1 scales its output by beta:

    S-E-A(z, SE(r))' = beta * S-E-A(z, SE(r))      added to the hidden states z.

A freshly made (untrained) encoder therefore leaves the model's output
unchanged until it is trained.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .. import host
from ..errors import DreamTunerInputError

PAPER_CLIP_LAYERS = (25, 4, 8, 12, 16)


def layer_name(layer) -> str:
    """The S-E-A module name of a UNet layer key, e.g. ("input", 1, 0) -> "input_1_0"."""
    return "_".join(str(p) for p in layer)


@dataclass(frozen=True)
class AttentionShape:
    """One S-E-A layer: the UNet transformer block it serves and that block's cross-attention shape."""

    layer: tuple
    query_dim: int
    heads: int
    dim_head: int

    @property
    def name(self):
        return layer_name(self.layer)


@dataclass(frozen=True)
class EncoderConfig:
    """Everything that fixes an encoder's tensors; stored as the file's metadata."""

    base_family: str
    context_dim: int
    clip_width: int
    clip_layers: tuple = PAPER_CLIP_LAYERS
    resblocks: int = 4
    attention: tuple = field(default_factory=tuple)

    def to_metadata(self):
        data = asdict(self)
        data["attention"] = [dict(asdict(a), layer=list(a.layer)) for a in self.attention]
        return {k: json.dumps(v) if not isinstance(v, str) else v for k, v in data.items()}

    @classmethod
    def from_metadata(cls, metadata):
        attention = tuple(AttentionShape(tuple(a["layer"]), int(a["query_dim"]), int(a["heads"]), int(a["dim_head"]))
                          for a in json.loads(metadata["attention"]))
        return cls(base_family=metadata["base_family"], context_dim=int(json.loads(metadata["context_dim"])),
                   clip_width=int(json.loads(metadata["clip_width"])),
                   clip_layers=tuple(int(i) for i in json.loads(metadata["clip_layers"])),
                   resblocks=int(json.loads(metadata["resblocks"])), attention=attention)


def attention_layout(model):
    """(context_dim, AttentionShape of every transformer block) of a ModelPatcher's UNet."""
    unet = host.unet_of(model)
    shapes, context_dims = [], set()
    for layer in host.self_attention_layers(model):
        block = host.transformer_block(unet, layer)
        cross = block.attn2
        inner = cross.to_q.out_features
        shapes.append(AttentionShape(layer, cross.to_q.in_features, cross.heads, inner // cross.heads))
        context_dims.add(cross.to_k.in_features)
    if len(context_dims) != 1:
        raise DreamTunerInputError(f"model: its cross-attention layers take several context widths {sorted(context_dims)}.")
    return context_dims.pop(), tuple(shapes)


class ResBlock(nn.Module):
    """Pre-norm residual MLP block on the encoder's tokens."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class SubjectEncoderAttention(nn.Module):
    """One S-E-A layer, shaped like its block's cross-attention (query from z, keys/values from SE(r))."""

    def __init__(self, shape: AttentionShape, context_dim: int):
        super().__init__()
        inner = shape.heads * shape.dim_head
        self.heads = shape.heads
        self.norm = nn.LayerNorm(shape.query_dim)
        self.to_q = nn.Linear(shape.query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, shape.query_dim)


class SubjectEncoder(nn.Module):
    """ResBlocks over concatenated multi-layer CLIP features, and the S-E-A layers."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.proj_in = nn.Linear(len(config.clip_layers) * config.clip_width, config.context_dim)
        self.resblocks = nn.Sequential(*[ResBlock(config.context_dim) for _ in range(config.resblocks)])
        self.attention = nn.ModuleDict({a.name: SubjectEncoderAttention(a, config.context_dim) for a in config.attention})

    def encode(self, clip_features):
        """SE(r): [B, tokens, len(layers) * clip_width] -> [B, tokens, context_dim]."""
        return self.resblocks(self.proj_in(clip_features))

    def initialise_untrained(self, seed=0):
        """ResBlocks and projections initialised (seeded); every S-E-A output layer zero."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.ndim == 2:
                    p.copy_(torch.randn(p.shape, generator=generator) * p.shape[1] ** -0.5)
                elif name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
            for attention in self.attention.values():
                attention.to_out.weight.zero_()
                attention.to_out.bias.zero_()
        return self


def subject_encoder_attention(z, attention: SubjectEncoderAttention, k, v, beta, attention_fn=None, **kwargs):
    """Eq. 1: ``z + beta * S-E-A(z, SE(r))``.

    z: [B, N, query_dim] hidden states after self-attention; k, v: [1 or B, T, inner], the
    layer's projections of SE(r); beta: a float or a [B, 1, 1] tensor (0 for rows it skips).
    """
    attention_fn = attention_fn or host.attention_function()
    q = attention.to_q(attention.norm(z))
    k, v = k.expand(z.shape[0], -1, -1), v.expand(z.shape[0], -1, -1)
    out = attention.to_out(attention_fn(q, k, v, attention.heads, **kwargs))
    return z + beta * out


def check_compatible(config: EncoderConfig, model, source="subject_encoder"):
    """An encoder file fits a model when its S-E-A layers match the model's cross-attention layers."""
    context_dim, shapes = attention_layout(model)
    if config.context_dim != context_dim or tuple(config.attention) != shapes:
        raise DreamTunerInputError(
            f"{source} was made for a {config.base_family} UNet (context width {config.context_dim}, "
            f"{len(config.attention)} transformer blocks) but this model has context width {context_dim} and "
            f"{len(shapes)} transformer blocks. Load the encoder made for this model's family "
            "(SD1.x and SDXL encoders are not interchangeable)."
        )
