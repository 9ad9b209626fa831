"""The scoring models from the user's files, without downloading anything and without pickle.

CLIP from an open_clip ``.safetensors`` file (read with safetensors), DINO from a
local Hugging Face folder through ``transformers``.
"""

from __future__ import annotations

import logging
import os

from ..errors import DreamTunerInputError
from ..files import safetensors_model_folder
from .embedders import DinoScorer, OpenClipScorer


class _quiet_about_random_init(logging.Filter):
    """Drops open_clip's "initialized randomly" warning while the model is created: its weights follow."""

    def filter(self, record):
        return not str(record.msg).startswith("No pretrained weights loaded")

    def __enter__(self):
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self)


def load_open_clip(path: str, architecture: str = "ViT-B-32", device="cpu", offload_device="cpu") -> OpenClipScorer:
    """An open_clip model of ``architecture`` with the weights of the safetensors file ``path``.

    The model is created without weights (nothing is downloaded) and the file is read with
    safetensors' own loader, never pickle, whatever open_clip's version does with files.
    """
    try:
        import open_clip
    except ImportError:
        raise DreamTunerInputError("CLIP-T needs the package open_clip_torch: pip install open_clip_torch "
                                   "(in ComfyUI's Python).") from None
    import safetensors
    import safetensors.torch

    if not str(path).endswith(".safetensors") or not os.path.isfile(path):
        raise DreamTunerInputError(f"clip model '{path}' must be an existing .safetensors file of open_clip "
                                   "weights (the open_clip_*model.safetensors file of an OpenCLIP model).")
    if architecture not in open_clip.list_models():
        raise DreamTunerInputError(f"clip architecture '{architecture}' is not an open_clip model name; use the "
                                   "name the file was trained as, e.g. ViT-B-32 (the protocol's), ViT-L-14, ViT-H-14.")
    check_offline_architecture(open_clip, architecture)
    name = os.path.basename(path)
    try:
        state = safetensors.torch.load_file(str(path))
    except (safetensors.SafetensorError, OSError, ValueError) as error:
        raise DreamTunerInputError(f"clip model '{name}' is not a readable safetensors file ({error}).") from None
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    with _quiet_about_random_init():
        try:
            model = open_clip.create_model(architecture, pretrained=None, load_weights=False, device="cpu")
        except TypeError:  # open_clip before 3.0: no load_weights, and pretrained=None loads nothing either
            model = open_clip.create_model(architecture, pretrained=None, device="cpu")
    scale = state.get("logit_scale")
    if scale is not None and scale.ndim != model.logit_scale.ndim:
        state["logit_scale"] = scale.reshape(model.logit_scale.shape)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise DreamTunerInputError(
            f"clip model '{name}' does not hold open_clip {architecture} weights "
            f"({str(error).splitlines()[0][:200]}). Give the architecture the file was made for.") from None
    return OpenClipScorer(model, open_clip.get_tokenizer(architecture), architecture, str(path), device, offload_device)


def check_offline_architecture(open_clip, architecture):
    """open_clip architectures whose text tower or tokenizer is a Hugging Face model (``hf_model_name``,
    ``hf_tokenizer_name`` in their config) would download it while the model or tokenizer is made: refused."""
    text = (open_clip.get_model_config(architecture) or {}).get("text_cfg") or {}
    hub = text.get("hf_model_name") or text.get("hf_tokenizer_name")
    if hub:
        raise DreamTunerInputError(
            f"clip architecture '{architecture}' takes its text tower or tokenizer from Hugging Face ('{hub}'), "
            "which would be downloaded at run time; the pack downloads nothing. Use an architecture with "
            "open_clip's own text tower and tokenizer, e.g. ViT-B-32 (the protocol's), ViT-L-14, ViT-H-14.")


def is_dino_folder(folder) -> bool:
    """A local Hugging Face ViT folder as load_dino reads it: config.json and model.safetensors."""
    return os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(
        os.path.join(folder, "model.safetensors"))


def load_dino(folder: str, device="cpu", offload_device="cpu") -> DinoScorer:
    """A DINO ViT from a local Hugging Face folder (config.json + model.safetensors, e.g. facebook/dino-vits16)."""
    try:
        from transformers import ViTModel
    except ImportError:
        raise DreamTunerInputError("DINO needs the package transformers: pip install transformers.") from None
    safetensors_model_folder(folder, "dino folder")  # names a folder of pickled weights only
    if not is_dino_folder(folder):
        raise DreamTunerInputError(
            f"dino folder '{folder}' must hold config.json and model.safetensors (the files of "
            "facebook/dino-vits16 on Hugging Face).")
    try:
        model = ViTModel.from_pretrained(folder, use_safetensors=True, local_files_only=True, add_pooling_layer=False)
    except (OSError, ValueError, RuntimeError) as error:
        raise DreamTunerInputError(f"dino folder '{folder}' could not be loaded as a ViT "
                                   f"({str(error).splitlines()[0][:200]}).") from None
    size = model.config.image_size
    return DinoScorer(model, folder, int(size[0] if isinstance(size, (tuple, list)) else size), device,
                      offload_device)
