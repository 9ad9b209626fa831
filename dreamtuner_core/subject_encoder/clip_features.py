"""Multi-layer CLIP image features for DreamTuner's subject encoder.

DreamTuner's subject encoder reads the hidden states of several CLIP vision
layers at once (the paper uses layers {25, 4, 8, 12, 16} of OpenCLIP ViT-H/14)
and concatenates them on the channel axis.

Layer indices follow the Hugging Face ``output_hidden_states`` convention:

- index 0 is the input to the first transformer layer (the patch and class
  embeddings after ``pre_layrnorm`` / open_clip's ``ln_pre``);
- index k >= 1 is the output of the k-th transformer layer (1-based), so for a
  model with L layers the valid indices are 0..L.

Both functions capture the requested hidden states in a single forward pass with
hooks (a forward pre-hook on the first transformer layer for index 0, forward
hooks on layer k-1 for index k) and always remove the hooks again:

- :func:`clip_layer_features` runs the host's own ``ClipVisionModel.encode_image``,
  so the image is resized, cropped and normalised exactly as ComfyUI does;
- :func:`open_clip_layer_features` reads the same features from an open_clip
  ``VisionTransformer`` for already preprocessed pixels (pretraining side).

The CLIP encoder is frozen in DreamTuner, so both forwards run without autograd.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Callable, Sequence

import torch

from ..errors import DreamTunerInputError

# Names for the CLIP vision towers ComfyUI loads, to make error messages readable.
_KNOWN_TOWERS = {
    (24, 1024): "CLIP ViT-L/14",
    (32, 1280): "OpenCLIP ViT-H/14",
    (48, 1664): "OpenCLIP ViT-bigG/14",
}


def _describe(num_layers: int, width: int | None) -> str:
    text = f"{num_layers} layers" + (f" of width {width}" if width is not None else "")
    name = _KNOWN_TOWERS.get((num_layers, width))
    return f"{text} ({name})" if name else text


def _check_layers(layers: Sequence[int]) -> list[int]:
    try:  # operator.index takes ints of any kind (Python, NumPy), never floats or strings
        given = [layers] if isinstance(layers, str) else list(layers)
        checked = [operator.index(k) for k in given if not isinstance(k, bool)]
    except TypeError:
        given, checked = [], []
    if not checked or len(checked) != len(given) or min(checked) < 0:
        raise DreamTunerInputError(
            f"CLIP layer indices must be a non-empty list of integers >= 0 (0 = embeddings after the "
            f"pre-norm, k = output of the k-th transformer layer); got {layers!r}.")
    return checked


def _check_depth(num_layers: int, width: int | None, layers: list[int], expected_width: int | None, what: str):
    if max(layers) > num_layers or (expected_width is not None and width != expected_width):
        raise DreamTunerInputError(
            f"The subject encoder needs CLIP vision hidden states of layers {layers}, i.e. a CLIP vision "
            f"model with at least {_describe(max(layers), expected_width)}; the {what} has "
            f"{_describe(num_layers, width)}. Load the CLIP vision model the encoder file was made with "
            f"(DreamTuner uses OpenCLIP ViT-H/14).")


@contextlib.contextmanager
def _capture(blocks: Sequence[torch.nn.Module], layers: list[int],
             to_bnd: Callable[[torch.Tensor], torch.Tensor] = lambda x: x):
    """Collect hidden states ``{index: tensor}`` of ``blocks`` while the context is open.

    Tensors are cloned: the host's CLIP layers add their residuals in place, so
    the tensor a layer returns is modified by the next layer.
    """
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def store(index: int, x):
        x = x[0] if isinstance(x, (tuple, list)) else x
        captured[index] = to_bnd(x.detach()).clone()

    try:
        if 0 in layers:
            handles.append(blocks[0].register_forward_pre_hook(lambda module, args: store(0, args[0])))
        for k in sorted(set(layers) - {0}):
            handles.append(blocks[k - 1].register_forward_hook(
                lambda module, args, output, k=k: store(k, output)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _concat(captured: dict[int, torch.Tensor], layers: list[int], device=None) -> torch.Tensor:
    missing = [k for k in layers if k not in captured]
    if missing:
        raise DreamTunerInputError(
            f"The CLIP vision forward did not pass through layers {missing}; this CLIP vision model "
            f"cannot provide the subject encoder's features.")
    return torch.cat([captured[k].to(device=device, dtype=torch.float32) for k in layers], dim=-1)


def _host_layers(clip_vision) -> torch.nn.ModuleList:
    """The transformer layers of the host's CLIP vision tower (``comfy.clip_model.CLIPVision``)."""
    model = getattr(clip_vision, "model", None)
    vision = getattr(model, "vision_model", None)
    layers = getattr(getattr(vision, "encoder", None), "layers", None)
    if not hasattr(clip_vision, "encode_image") or not isinstance(layers, torch.nn.ModuleList) or not layers:
        raise DreamTunerInputError(
            f"The subject encoder needs a CLIP vision transformer (as the Load CLIP Vision node gives for "
            f"OpenCLIP ViT-H/14); the CLIP vision input holds a {type(model).__name__} whose layers this "
            f"pack cannot find (no vision_model.encoder.layers).")
    return layers


def clip_vision_shape(clip_vision) -> tuple[int, int]:
    """``(num_layers, width)`` of the host's CLIP vision model (a ``comfy.clip_vision.ClipVisionModel``)."""
    layers = _host_layers(clip_vision)
    width = clip_vision.model.vision_model.post_layernorm.weight.shape[0]
    return len(layers), int(width)


def clip_layer_features(clip_vision, image: torch.Tensor, layers: Sequence[int], *,
                        width: int | None = None) -> torch.Tensor:
    """Hidden states of CLIP vision ``layers`` for ComfyUI IMAGE ``image``, concatenated on channels.

    ``clip_vision`` is the host's ``ClipVisionModel`` (the CLIP_VISION the Load
    CLIP Vision node gives); ``image`` is [B, H, W, C] in [0, 1] (an alpha
    channel is dropped). One ``clip_vision.encode_image`` call does the host's
    preprocessing and forward. ``width``, when given, is the hidden width the
    caller needs (1280 for ViT-H/14) and is checked before the forward.

    Returns float32 [B, tokens, len(layers) * width] on ComfyUI's intermediate
    device, layers in the given order. Raises :class:`DreamTunerInputError`
    when the model is not a CLIP vision transformer, has too few layers or the
    wrong width.
    """
    layers = _check_layers(layers)
    blocks = _host_layers(clip_vision)
    _check_depth(*clip_vision_shape(clip_vision), layers, width, "CLIP vision model given")
    if image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise DreamTunerInputError(
            f"The subject image must be an IMAGE of shape [batch, height, width, 3]; got {list(image.shape)}.")

    import comfy.model_management  # here, so the open_clip side needs no ComfyUI

    with _capture(blocks, layers) as captured, torch.no_grad():
        clip_vision.encode_image(image[..., :3])
    return _concat(captured, layers, comfy.model_management.intermediate_device())


def open_clip_layer_features(visual: torch.nn.Module, pixels: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """The features of :func:`clip_layer_features` from an open_clip ``VisionTransformer``.

    ``visual`` is ``model.visual`` of an open_clip CLIP model; ``pixels`` are
    preprocessed images [B, 3, H, W]. open_clip runs its transformer batch-first
    (``visual.transformer.batch_first``, open_clip >= 2.24) or sequence-first
    (older versions, no such attribute); the result is always [B, tokens,
    len(layers) * width], float32, on the device of ``pixels``.
    """
    layers = _check_layers(layers)
    transformer = getattr(visual, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or not blocks:
        raise DreamTunerInputError(
            f"Expected an open_clip VisionTransformer (model.visual); got a {type(visual).__name__} "
            f"without transformer.resblocks.")
    _check_depth(len(blocks), getattr(transformer, "width", None), layers, None, "open_clip vision tower")

    batch_first = getattr(transformer, "batch_first", False)
    with _capture(blocks, layers, (lambda x: x) if batch_first else (lambda x: x.transpose(0, 1))) as captured, \
            torch.no_grad():
        visual(pixels)
    features = _concat(captured, layers, pixels.device)
    if features.shape[0] != pixels.shape[0]:
        raise ValueError(f"open_clip hidden states of shape {list(features.shape)} do not have the batch of "
                         f"{pixels.shape[0]} images first; unexpected transformer layout.")
    return features
