"""The few places where the pack touches ComfyUI internals, guarded for old and new cores.

Supported hosts: the late-2024 ``comfy`` core (``notcomfy`` 0.1.0, used in CI)
and current ComfyUI (v0.15.1). Differences handled here:
- current ComfyUI's attention functions take ``transformer_options`` (for
  attention overrides of other packs); the late-2024 ones reject it;
- the host's kernels take no per-key bias (SageAttention and FlashAttention
  ignore or refuse masks, xformers expands them to [batch, heads, queries, keys]):
  Eq. 3 folds its bias into the keys (``ssa/attention.py``) and runs on the
  kernel the host selected, every layer alike. Both cores' kernels accept
  heads-first inputs (``skip_reshape=True``).
"""

from __future__ import annotations

import functools
import inspect

import comfy.ldm.modules.attention as attention_module
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from .errors import DreamTunerInputError

SUPPORTED_FAMILIES = "SD1.x, SD2.x and SDXL (UNet models with self-attention)"
_FUSED = ("attention_pytorch", "attention_xformers", "attention_flash", "attention_sage", "attention3_sage")


def attention_function():
    """The host's current attention (looked up per call, so backend switches apply)."""
    return attention_module.optimized_attention


def kernel_name(function) -> str:
    """The name of a host attention function (its ``__name__`` through the host's ``wrap_attn``)."""
    return getattr(function, "__name__", type(function).__name__)


def head_alignment(function) -> int:
    """The multiple a head dimension must have for ``function``'s kernel: the fused ones (SDPA's flash and
    memory-efficient kernels, xformers, FlashAttention, Sage) want 8; the host's own matmul kernels take any."""
    return 8 if kernel_name(function) in _FUSED else 1


def hook_group(base_model):
    """The LoRA hook group whose weights the host has applied for the current model call (current
    ComfyUI runs each conditioning's hooks in calls of their own); None without hooks or on older cores."""
    patcher = getattr(base_model, "current_patcher", None)
    return getattr(patcher, "current_hooks", None)


def injected_block_layers(base_model):
    """Modules other packs injected into the UNet's blocks, by injection key (current ComfyUI's ``injections``).

    A pack that injects modules (AnimateDiff-Evolved's motion modules) registers its ``PatcherInjection``
    list and the models holding those modules (``additional_models``) under one key; the injected layers
    are the blocks' children that belong to those models. Returns {key: [layer, ...]} for every key of the
    sampling patcher's ``injections`` (an empty list: that pack injected something this cannot find in the
    blocks); {} on cores without injections (late 2024) and for models without any.
    """
    patcher = getattr(base_model, "current_patcher", None)
    injections = getattr(patcher, "injections", None) or {}
    if not injections:
        return {}
    unet = getattr(base_model, "diffusion_model", None)
    blocks = list(getattr(unet, "input_blocks", None) or []) + list(getattr(unet, "output_blocks", None) or [])
    if getattr(unet, "middle_block", None) is not None:
        blocks.append(unet.middle_block)
    found = {}
    for key in injections:
        owned = {id(m) for extra in (getattr(patcher, "additional_models", None) or {}).get(key, [])
                 for m in getattr(getattr(extra, "model", None), "modules", lambda: ())()}
        found[key] = [layer for block in blocks for layer in block if id(layer) in owned]
    return found


def reaches_timestep_embed_patch(layer) -> bool:
    """Whether the host's ``forward_timestep_embed`` hands ``layer`` to a ``forward_timestep_embed_patch``:
    only layers of none of the kinds it calls itself (ResBlocks, transformers, upsampling) do."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepBlock, Upsample

    return not isinstance(layer, (TimestepBlock, SpatialTransformer, Upsample))


def on_cleanup(patcher, key, callback):
    """Run ``callback(patcher)`` when the host ends a sampling run (current ComfyUI: ``ON_CLEANUP``).

    Returns False on cores without patcher callbacks (late 2024), where the caller frees its state otherwise.
    """
    try:
        from comfy.patcher_extension import CallbacksMP
    except ImportError:
        return False
    if not hasattr(patcher, "add_callback_with_key"):
        return False
    registered = getattr(patcher, "callbacks", {}).get(CallbacksMP.ON_CLEANUP, {}).get(key)
    if not registered:
        patcher.add_callback_with_key(CallbacksMP.ON_CLEANUP, key, callback)
    return True


@functools.lru_cache(maxsize=None)
def _accepts_transformer_options(function) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or p.name == "transformer_options" for p in parameters)


@functools.lru_cache(maxsize=None)
def accepts_skip_output_reshape(function) -> bool:
    """Whether ``function`` (a host kernel) can return heads-first output (current ComfyUI; not late 2024)."""
    try:
        return "skip_output_reshape" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def attention_kwargs(function, extra_options):
    """Keyword arguments the host's own CrossAttention passes to ``function``."""
    kwargs = {"attn_precision": extra_options.get("attn_precision")}
    if _accepts_transformer_options(function):
        kwargs["transformer_options"] = extra_options
    return kwargs


def unet_of(model):
    """The openaimodel UNet inside a ModelPatcher, or a clear error naming the model family."""
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(diffusion_model, UNetModel):
        family = type(getattr(model, "model", model)).__name__
        raise DreamTunerInputError(
            f"model: self-subject-attention needs a UNet with self-attention layers; this model is "
            f"{family} ({type(diffusion_model).__name__}). Supported: {SUPPORTED_FAMILIES}. "
            "Flux, SD3 and other DiT models are not supported."
        )
    return diffusion_model


def self_attention_layers(model):
    """Keys (block kind, block number, depth index) of every UNet self-attention layer."""
    unet = unet_of(model)
    layers = []
    kinds = (("input", getattr(unet, "input_blocks", [])),
             ("middle", [getattr(unet, "middle_block", [])]),
             ("output", getattr(unet, "output_blocks", [])))
    for kind, blocks in kinds:
        for number, block in enumerate(blocks):
            for module in block if block is not None else []:
                for index, _ in enumerate(getattr(module, "transformer_blocks", []) or []):
                    layers.append((kind, number, index))
    if not layers:
        raise DreamTunerInputError(
            f"model: this UNet has no transformer blocks, so there is no self-attention to patch. "
            f"Supported: {SUPPORTED_FAMILIES}."
        )
    return layers


def context_width(model):
    """The text-conditioning width the UNet's cross-attention takes (``context_dim``), or None when unknown."""
    unet = unet_of(model)
    widths = set()
    for layer in self_attention_layers(model):
        cross = getattr(transformer_block(unet, layer), "attn2", None)
        to_k = getattr(cross, "to_k", None)
        if to_k is not None and hasattr(to_k, "in_features"):
            widths.add(int(to_k.in_features))
    return widths.pop() if len(widths) == 1 else None


def latent_channels(model) -> int:
    latent_format = getattr(getattr(model, "model", None), "latent_format", None)
    return int(getattr(latent_format, "latent_channels", 4))


def model_sampling(model):
    return model.get_model_object("model_sampling")


def output_scale(model_sampling, sigma, like):
    """b of ``calculate_denoised(sigma, output, x) = a * x + b * output`` per sigma, shaped to broadcast over ``like``."""
    ones = torch.ones((sigma.shape[0],) + (1,) * (like.ndim - 1), device=like.device, dtype=torch.float32)
    return model_sampling.calculate_denoised(sigma, ones, torch.zeros_like(ones))


def describe(obj) -> str:
    """A readable name for another pack's patch object (class and module)."""
    target = obj if inspect.isfunction(obj) or inspect.ismethod(obj) else type(obj)
    name = getattr(target, "__qualname__", repr(target))
    module = getattr(target, "__module__", "")
    return f"'{name}' (from {module})" if module else f"'{name}'"


def transformer_block(unet, layer):
    """The BasicTransformerBlock of a layer key (kind, number, index)."""
    kind, number, index = layer
    block = {"input": lambda: unet.input_blocks[number], "middle": lambda: unet.middle_block,
             "output": lambda: unet.output_blocks[number]}[kind]()
    for module in block:
        blocks = getattr(module, "transformer_blocks", None)
        if blocks is not None:
            return blocks[index]
    raise KeyError(layer)


def apply_controlnet(positive, negative, control_net, image, strength, start_percent=0.0, end_percent=1.0, vae=None):
    """(positive, negative) with ``control_net`` hinted by ``image`` ([B, H, W, 3]), as the core's Apply
    ControlNet (ControlNetApplyAdvanced) gives them.

    Inside ComfyUI the host's own node does it (its ``nodes`` module is loaded before any pack); the
    late-2024 ``comfy`` package has no ``nodes`` module, so the same steps run here on the host's
    ControlNet objects: one hinted copy per previous ControlNet, chained to it, not applied to uncond.
    """
    import sys

    node = getattr(sys.modules.get("nodes"), "ControlNetApplyAdvanced", None)
    if node is not None:
        return tuple(node().apply_controlnet(positive, negative, control_net, image, strength, start_percent,
                                             end_percent, vae=vae))
    if strength == 0:
        return positive, negative
    hint = image.movedim(-1, 1)
    hinted = {}
    out = []
    for conditioning in (positive, negative):
        items = []
        for cond, extra in conditioning:
            extra = extra.copy()
            previous = extra.get("control")
            if previous not in hinted:
                copy = control_net.copy().set_cond_hint(hint, strength, (start_percent, end_percent), vae=vae)
                copy.set_previous_controlnet(previous)
                hinted[previous] = copy
            extra["control"] = hinted[previous]
            extra["control_apply_to_uncond"] = False
            items.append([cond, extra])
        out.append(items)
    return out[0], out[1]


def execution_blocker(message):
    """The host's ExecutionBlocker: an output that stops the nodes fed by it with ``message`` (ComfyUI's
    executor shows it). Current ComfyUI defines it in ``comfy_execution.graph_utils``, the late-2024 one in
    ``comfy_execution.graph`` (which imports ComfyUI's ``nodes``, so it loads only inside ComfyUI); None
    where neither loads (the comfy package alone, where no graph runs)."""
    try:
        from comfy_execution.graph_utils import ExecutionBlocker
    except ImportError:
        try:
            from comfy_execution.graph import ExecutionBlocker
        except ImportError:
            return None
    return ExecutionBlocker(message)
