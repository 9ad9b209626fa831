"""Adapters: trainable additions to the frozen UNet and text-encoder layers, saved as the host's LoRA keys.

The UNet (and optionally the text encoder) trains through adapters around
frozen weights, added to the module outputs by forward hooks removed
afterwards, so the input MODEL/CLIP stay bitwise unchanged. Default: LoRA
(kohya ``lora_unet_*``/``lora_te*_*`` keys with ``lora_up``/``lora_down``/
``alpha``, which both the late-2024 core and current ComfyUI apply). Full
fine-tuning trains a full-size difference per layer and is saved exactly as
``.diff`` keys in the same LoRA file (both cores' ``load_lora`` apply them);
that file is as large as the trained layers.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from .settings import UNET_LORA
from .subject_token import text_encoders


class Adapter(torch.nn.Module):
    """A trainable addition to a frozen Linear/Conv2d's output (its weight is never written).

    lora: ``out += (alpha / rank) * up(down(x))``; diff: ``out += layer(x; weight = delta)``.
    Both are exactly what the host's ``calculate_weight`` adds to the weight for the saved keys.
    """

    def __init__(self, module, kind, rank, generator):
        super().__init__()
        self.kind, self.is_conv = kind, isinstance(module, torch.nn.Conv2d)
        self._target = [module]  # a list, so the frozen layer is not registered as a submodule
        weight = module.weight
        if self.is_conv:
            self.conv_args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
        if kind == UNET_LORA:
            rank = min(rank, weight.shape[0], weight[0].numel())
            self.rank, self.alpha = rank, float(rank)
            down_shape = (rank,) + tuple(weight.shape[1:])
            up_shape = (weight.shape[0], rank) + ((1, 1) if self.is_conv else ())
            fan_in = weight[0].numel()
            self.down = torch.nn.Parameter(torch.randn(down_shape, generator=generator) / math.sqrt(fan_in))
            self.up = torch.nn.Parameter(torch.zeros(up_shape))  # starts as the identity change
        else:
            self.delta = torch.nn.Parameter(torch.zeros(tuple(weight.shape)))
        self._handle = None

    def addition(self, x):
        if self.kind == UNET_LORA:
            down = self.down.to(x.dtype)
            up = self.up.to(x.dtype) * (self.alpha / self.rank)
            if self.is_conv:
                return F.conv2d(F.conv2d(x, down, **self.conv_args), up)
            return F.linear(F.linear(x, down), up)
        delta = self.delta.to(x.dtype)
        return F.conv2d(x, delta, **self.conv_args) if self.is_conv else F.linear(x, delta)

    def _hook(self, module, args, output):
        return output + self.addition(args[0]).to(output.dtype)

    def install(self):
        module = self._target[0]
        self.to(module.weight.device)
        self._handle = module.register_forward_hook(self._hook)

    def remove(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def tensors(self, key):
        """The saved keys (kohya LoRA or .diff), in float32 on the CPU."""
        if self.kind == UNET_LORA:
            return {f"{key}.lora_down.weight": self.down.detach().float().cpu().contiguous(),
                    f"{key}.lora_up.weight": self.up.detach().float().cpu().contiguous(),
                    f"{key}.alpha": torch.tensor(self.alpha)}
        return {f"{key}.diff": self.delta.detach().float().cpu().contiguous()}


def unet_targets(model):
    """{kohya key: (module, weight key)} of every Linear/Conv2d of the UNet the host's key map resolves."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    out = {}
    for name, module in model.model.diffusion_model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or getattr(module, "weight", None) is None:
            continue
        if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
            continue
        weight_key = f"diffusion_model.{name}.weight"
        key = "lora_unet_" + name.replace(".", "_")
        if key_map.get(key) == weight_key:
            out[key] = (module, weight_key)
    return out


def text_targets(clip):
    """{kohya key: (module, weight key)} of the text encoders' attention and MLP layers."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    encoders = text_encoders(clip)
    prefixes = {"l": "lora_te1_" if "g" in encoders else "lora_te_", "g": "lora_te2_" if "l" in encoders else "lora_te_",
                "h": "lora_te_"}
    out = {}
    for key, (_, text_model) in encoders.items():
        for name, module in text_model.named_modules():
            if not isinstance(module, torch.nn.Linear) or ".encoder.layers." not in f".{name}":
                continue
            weight_key = f"clip_{key}.{name}.weight"
            match = re.search(r"encoder\.layers\.(\d+)\.(.+)$", name)
            if not match:
                continue
            lora_key = f"{prefixes[key]}text_model_encoder_layers_{match.group(1)}_{match.group(2).replace('.', '_')}"
            if key_map.get(lora_key) == weight_key:
                out[lora_key] = (module, weight_key)
    return out
