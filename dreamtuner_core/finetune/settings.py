"""The fine-tune's settings and the checks of its inputs (paper 3.3, appendix A).

Every setting, name, image and model is checked before anything trains, with an
error that says what to change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from .. import host
from ..errors import DreamTunerInputError
from .subject_token import text_encoders

FORMAT = "dreamtuner.finetune"


FORMAT_VERSION = "1"


UNET_LORA = "lora"


UNET_FULL = "full (saved as weight differences)"


# The paper's recipe (3.3, Appendix B) as one choice: every UNet and text-encoder weight at 1e-6, 800 steps.
UNET_PAPER = "paper: full UNet + text encoder, lr 1e-6, 800 steps"


# [S*] only (Textual Inversion-like): no UNet adapter trains; the LoRA file is written with no tensors.
UNET_NONE = "none: [S*] only"


UNET_MODES = (UNET_LORA, UNET_FULL, UNET_PAPER, UNET_NONE)


PAPER_RECIPE = dict(unet_mode=UNET_FULL, train_text_encoder=True, full_unet_lr=1e-6, text_encoder_lr=1e-6,
                    encoder_lr=1e-6, steps=800)


LR_RANGE = (1e-8, 1e-1)


_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything besides the images and models that fixes a run (hashed into the files' metadata)."""

    class_word: str
    name: str
    steps: int = 800
    unet_lr: float = 1e-4  # the UNet LoRA's
    full_unet_lr: float = 1e-6  # full fine-tuning's (paper: 1e-6)
    token_lr: float = 5e-3
    text_encoder_lr: float = 1e-6
    encoder_lr: float = 1e-6
    rank: int = 16
    seed: int = 0
    train_text_encoder: bool = False
    unet_mode: str = UNET_LORA
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class OutputFolders:
    """Where the files go (the node resolves ComfyUI's models/ folders)."""

    loras: str
    embeddings: str
    encoders: Optional[str] = None


@dataclass
class FinetuneResult:
    model: object
    clip: object
    losses: list
    files: dict
    reused: bool
    reference_losses: list = field(default_factory=list)


def check_name(name: str) -> str:
    """The subject name becomes three file names: letters, digits, '_', '-', '.', no path."""
    name = (name or "").strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not _NAME_PATTERN.match(name) or name.upper().split(".")[0] in _RESERVED or name.endswith("."):
        raise DreamTunerInputError(
            f"subject_name {name!r} is not a valid file name. Use 1-100 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit (no spaces, no slashes), e.g. 'my_dog'. It names the LoRA, the "
            "embedding (embedding:<name>) and the encoder file.")
    return name


def resolve_preset(settings: FinetuneSettings) -> FinetuneSettings:
    """The settings a run uses: the paper preset (:data:`UNET_PAPER`) becomes :data:`PAPER_RECIPE`."""
    if settings.unet_mode == UNET_PAPER:
        return replace(settings, **PAPER_RECIPE)
    return settings


def unet_learning_rate(settings: FinetuneSettings) -> float:
    """Full fine-tuning has its own learning rate (paper 1e-6); a LoRA takes ``unet_lr``."""
    return settings.full_unet_lr if settings.unet_mode == UNET_FULL else settings.unet_lr


def check_settings(settings: FinetuneSettings) -> str:
    """Every setting checked; returns the subject name as the files use it (:func:`check_name`)."""
    name = check_name(settings.name)
    if not settings.class_word or not settings.class_word.strip():
        raise DreamTunerInputError("class_word is empty: give the subject's class, e.g. 'dog', 'girl', 'teapot'.")
    if "embedding:" in settings.class_word:
        raise DreamTunerInputError("class_word must be plain words (e.g. 'dog'), not an embedding.")
    if int(settings.steps) < 1:
        raise DreamTunerInputError("steps must be at least 1 (paper: 800-1200; about 300 with the subject encoder).")
    if int(settings.rank) < 1:
        raise DreamTunerInputError("rank must be at least 1 (4-32 is usual for a subject LoRA).")
    if settings.unet_mode not in UNET_MODES:
        raise DreamTunerInputError(f"unet_mode must be one of {UNET_MODES}, got {settings.unet_mode!r}.")
    if settings.unet_mode == UNET_NONE and settings.train_text_encoder:
        raise DreamTunerInputError(
            f"unet_mode '{UNET_NONE}' trains only the [S*] token; turn train_text_encoder off, or choose "
            f"'{UNET_LORA}' to train a LoRA of the text encoder too.")
    for label, value in (("unet_lr", settings.unet_lr), ("full_unet_lr", settings.full_unet_lr),
                         ("token_lr", settings.token_lr),
                         ("text_encoder_lr", settings.text_encoder_lr),
                         ("encoder_lr", settings.encoder_lr)):
        if not (LR_RANGE[0] <= float(value) <= LR_RANGE[1]):
            raise DreamTunerInputError(
                f"{label} = {value} is out of range [{LR_RANGE[0]:g}, {LR_RANGE[1]:g}]. Paper: [S*] 5e-3, full "
                "fine-tuning of the UNet and text encoder 1e-6; a LoRA usually 1e-4.")
    return name


def check_image(image, label: str, min_side: int = 8) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
        shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise DreamTunerInputError(f"{label} must be an IMAGE [batch, height, width, 3]; got {shape}.")
    if image.shape[0] == 0 or image.shape[1] < min_side or image.shape[2] < min_side:
        raise DreamTunerInputError(
            f"{label} is {image.shape[0]} image(s) of {image.shape[2]}x{image.shape[1]} pixels: it needs at least one "
            f"image of at least {min_side}x{min_side} pixels (512x512 for SD1.x, 1024x1024 for SDXL is usual).")
    if not torch.isfinite(image).all():
        raise DreamTunerInputError(f"{label} contains NaN or infinite values.")
    return image[..., :3].float()


def check_family(model, clip) -> None:
    """A UNet model with a linear eps/v parametrisation and a CLIP text encoder the trainer knows."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    sampling = model.get_model_object("model_sampling") if hasattr(model, "get_model_object") else None
    kind = type(sampling).__mro__ if sampling is not None else ()
    names = {c.__name__ for c in kind}
    if not isinstance(diffusion_model, UNetModel) or not ({"EPS", "V_PREDICTION"} & names) or \
            {"CONST", "EDM", "ModelSamplingDiscreteFlow", "ModelSamplingFlux"} & names:
        raise DreamTunerInputError(
            f"model: DreamTunerFinetune trains SD1.x, SD2.x and SDXL UNets (eps or v prediction); this model is "
            f"{type(getattr(model, 'model', model)).__name__} ({type(diffusion_model).__name__}). Load an SD1.5, "
            "SD2.x or SDXL checkpoint.")
    if not text_encoders(clip):
        raise DreamTunerInputError(
            "clip: DreamTunerFinetune needs the checkpoint's CLIP text encoder (SD1.x clip_l, SD2.x clip_h or SDXL "
            "clip_l + clip_g); wire the CLIP output of the same checkpoint loader.")


def clip_width(clip):
    """The width of the conditioning the CLIP gives (SDXL: clip_l and clip_g side by side), from an empty prompt."""
    with torch.no_grad():
        cond = clip.encode_from_tokens(clip.tokenize(""))
    cond = cond[0] if isinstance(cond, (tuple, list)) else cond
    return int(cond.shape[-1])


def check_parts(model, clip, vae) -> None:
    """The CLIP and the VAE belong to the model's family: the CLIP's conditioning width is the UNet's context
    width, the VAE's latent channels are the model's latent format's."""
    width, context = clip_width(clip), host.context_width(model)
    if context is not None and width != context:
        raise DreamTunerInputError(
            f"clip gives conditioning of width {width} but this model's UNet takes {context}: it is the CLIP of "
            "another model family (e.g. SD1.5's 768 with SDXL's 2048). Wire the CLIP output of the checkpoint "
            "loader that gives the MODEL.")
    channels, expected = getattr(vae, "latent_channels", None), host.latent_channels(model)
    if channels is not None and int(channels) != expected:
        raise DreamTunerInputError(
            f"vae makes latents of {channels} channels but this model takes {expected}: it is the VAE of another "
            "model family (e.g. SD3/Flux's 16 with SD1.5/SDXL's 4). Wire the VAE output of the checkpoint loader "
            "that gives the MODEL, or a VAE Loader with that family's VAE.")
