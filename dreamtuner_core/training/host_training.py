"""Training through the host's inference code: grad mode, gradient checkpointing, in-place adds, autocast, the loss.

The host's UNet and text encoders are written for inference. Both trainers of
the pack (DreamTunerFinetune, subject-encoder pretraining) train through them
with these helpers, and nothing else of the host is changed.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from ..host import output_scale


# ----------------------------------------------------------------------------- grad mode, inference tensors

@contextlib.contextmanager
def grad_mode():
    """Nodes of current ComfyUI run under inference_mode; training steps out of it."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def normal_tensors(*roots):
    """Weights loaded under ``torch.inference_mode`` (current ComfyUI loads checkpoints so) cannot be saved
    for backward. Each such parameter or buffer is replaced by a bitwise-equal ordinary copy, one tensor at a
    time (no second copy of the model); values, dtypes, devices and requires_grad stay as they were.
    """
    with torch.inference_mode(False):
        for root in roots:
            for module in root.modules():
                for store in (module._parameters, module._buffers):
                    for name, tensor in list(store.items()):
                        if tensor is None or not tensor.is_inference():
                            continue
                        copy = tensor.clone()
                        if isinstance(tensor, torch.nn.Parameter):
                            copy = torch.nn.Parameter(copy, requires_grad=tensor.requires_grad)
                        store[name] = copy


# ----------------------------------------------------------------------------- gradient checkpointing

def _checkpointed(original):
    """``original`` recomputed in the backward pass (non-reentrant ``torch.utils.checkpoint``).

    Its ``transformer_options`` is copied per call: the UNet updates its block indices in that dict as it
    goes, and a recomputation must see the indices of its own layer.
    """
    import torch.utils.checkpoint

    def own(value):
        return dict(value) if isinstance(value, dict) else value

    def forward(*args, **kwargs):
        args, kwargs = tuple(own(a) for a in args), {k: own(v) for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(original, *args, use_reentrant=False, **kwargs)

    forward.dreamtuner_checkpoint = True
    return forward


def enable_gradient_checkpointing(unet, every_layer=False):
    """Recompute UNet layers in the backward pass instead of keeping their activations; returns them.

    The UNet calls the layers of each block itself (``forward_timestep_embed``), so layers are wrapped,
    not blocks. ``every_layer``: every layer of every block (DreamTunerFinetune); else only the ResBlocks
    (most of the convolution activations; pretraining). Either way the host's in-place adds stay safe in
    the recomputation (:func:`inputs_copied`).
    """
    if every_layer:
        layers = [layer for block in list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks)
                  for layer in block]
    else:
        from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

        layers = [module for module in unet.modules() if isinstance(module, ResBlock)]
    wrapped = []
    for layer in layers:
        if "forward" not in layer.__dict__:
            layer.forward = _checkpointed(layer.forward)
            wrapped.append(layer)
    return wrapped


def disable_gradient_checkpointing(unet, layers=None):
    """Undo :func:`enable_gradient_checkpointing` (on ``layers``, or on the whole UNet)."""
    for module in layers if layers is not None else unet.modules():
        if getattr(module.__dict__.get("forward"), "dreamtuner_checkpoint", False):
            del module.forward


@contextlib.contextmanager
def gradient_checkpointing(unet, enabled, every_layer=False):
    """:func:`enable_gradient_checkpointing` for the duration of the block when ``enabled``; restored afterwards."""
    wrapped = enable_gradient_checkpointing(unet, every_layer) if enabled else []
    try:
        yield
    finally:
        disable_gradient_checkpointing(unet, wrapped)


# ----------------------------------------------------------------------------- the host's in-place adds

@functools.lru_cache(maxsize=None)
def _adds_in_place(block_class, line) -> bool:
    try:
        return line in inspect.getsource(block_class.forward)
    except (OSError, TypeError):
        return True


def _inplace_blocks():
    """(block class, its norms, the in-place line) of host blocks that add to their input in place."""
    import comfy.clip_model
    from comfy.ldm.modules.attention import BasicTransformerBlock

    return ((BasicTransformerBlock, ("norm1", "norm2", "norm3"), "x += n"),
            (comfy.clip_model.CLIPLayer, ("layer_norm1", "layer_norm2"), "x += self."))


def inplace_block_norms(*roots):
    """The norms of host blocks that add to ``x`` in place (``x += n``) after the norm saved ``x``: the UNet's
    BasicTransformerBlock in the late-2024 core, CLIP's CLIPLayer in both cores. Blocks whose source adds out
    of place are left out."""
    norms = []
    for block_class, names, line in _inplace_blocks():
        if not _adds_in_place(block_class, line):
            continue
        for root in roots:
            for module in root.modules():
                if isinstance(module, block_class):
                    norms += [getattr(module, name) for name in names]
    return norms


def skip_consumers(unet):
    """The first layer of every block that reads a skip connection before the host's ``apply_control`` adds
    the ControlNet's output residuals to it in place (the input blocks after the first, the middle block)."""
    blocks = list(unet.input_blocks)[1:] + ([unet.middle_block] if unet.middle_block is not None else [])
    return [block[0] for block in blocks if len(block)]


@contextlib.contextmanager
def inputs_copied(modules):
    """The one fix for the host's in-place adds: each of ``modules`` gets a copy of its input.

    The host's code is written for inference and adds in place to tensors that autograd saved for backward
    (a block's ``x += n`` after its norm saved ``x``; ``apply_control``'s ``h += residual`` on a skip
    connection the next block saved), which autograd rejects once anything before them trains (the host's own
    trainer trains neither text nor anything upstream of such a block). A module that gets a copy saves the
    copy; the in-place add then changes only the host's own tensor. Pre-hooks, removed afterwards: they run
    again in a checkpoint's recomputation, so checkpointed layers are protected as well.
    """
    handles = [module.register_forward_pre_hook(lambda m, args: (args[0].clone(),) + tuple(args[1:]))
               for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------- autocast

def autocast_dtype(precision: str, device):
    """The autocast dtype of a ``precision`` setting: fp32 none, bf16 bfloat16, auto bfloat16 on a CUDA
    device that supports it (else none)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device, dtype):
    """Autocast to ``dtype`` on ``device``'s kind; full precision for ``dtype`` None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------- the loss

def prediction_error(model_sampling, sigma, denoised, x0):
    """Raw model output minus the model's own prediction target (eps or v), for any ``model_sampling``.

    ``calculate_denoised`` is affine in the raw output: denoised = a(x) + b * output,
    so ``(denoised - x0) / b`` = output - target, where target is the output whose
    denoised value is x0. b comes from the model's own formula, so eps and v
    models (and any other affine parameterisation) get their own targets.
    """
    return (denoised.float() - x0.float()) / output_scale(model_sampling, sigma, denoised)


def prediction_loss(model_sampling, denoised, x0, sigma, per_item=True):
    """The training loss of both trainers: the mean square of :func:`prediction_error`, per item or over the batch."""
    error = prediction_error(model_sampling, sigma, denoised, x0).pow(2)
    return error.mean(dim=tuple(range(1, denoised.ndim))) if per_item else error.mean()
