"""SubjectEncoderLoader and ApplySubjectEncoder (DreamTuner): node glue over dreamtuner_core.subject_encoder."""

import os

from ..dreamtuner_core.errors import DreamTunerInputError
from ..dreamtuner_core.references import MASK_MODES, MASK_SUBJECT_IS_ONE
from ..dreamtuner_core.subject_encoder.file import load_encoder
from ..dreamtuner_core.subject_encoder.patch import apply_subject_encoder

CATEGORY = "DreamTuner"
FOLDER = "dreamtuner"


def register_model_folder(key=FOLDER, *default):
    """Register ComfyUI/models/<default> (default: models/<key>/) under ``key``, safetensors only, keeping paths
    from extra_model_paths.yaml; returns ComfyUI's folder_paths (None outside ComfyUI)."""
    try:
        import folder_paths
    except ImportError:  # outside ComfyUI (tests of the bare core)
        return None
    paths, _ = folder_paths.folder_names_and_paths.get(key, ([], set()))
    default = os.path.join(folder_paths.models_dir, *(default or (key,)))
    folder_paths.folder_names_and_paths[key] = (list(paths) + ([default] if default not in paths else []),
                                                {".safetensors"})
    return folder_paths


def _encoder_files():
    folder_paths = register_model_folder()
    return folder_paths.get_filename_list(FOLDER) if folder_paths is not None else []


class SubjectEncoderLoader:
    """Loads a DreamTuner subject encoder from ComfyUI/models/dreamtuner/."""

    DESCRIPTION = ("Loads a DreamTuner subject encoder (.safetensors) from models/dreamtuner/. Make an "
                   "untrained one with scripts/make_untrained_encoder.py; no pretrained encoder is published.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"encoder_name": (_encoder_files(), {"tooltip": (
            "A subject encoder file in ComfyUI/models/dreamtuner/ (or a 'dreamtuner' path of "
            "extra_model_paths.yaml), made for your checkpoint's family (SD1.x or SDXL).")})}}

    RETURN_TYPES = ("DREAMTUNER_SUBJECT_ENCODER",)
    RETURN_NAMES = ("subject_encoder",)
    OUTPUT_TOOLTIPS = ("The subject encoder: ResBlocks and subject-encoder-attention layers.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, encoder_name):
        folder_paths = register_model_folder()
        path = folder_paths.get_full_path(FOLDER, encoder_name) if folder_paths is not None else None
        if path is None:
            raise DreamTunerInputError(f"encoder_name: '{encoder_name}' is not in models/{FOLDER}/; put the file "
                                       "there and refresh the page.")
        return (load_encoder(path),)


class ApplySubjectEncoder:
    """Adds DreamTuner's subject encoder (Eq. 1) to a model."""

    DESCRIPTION = ("DreamTuner subject encoder: encodes the subject image with CLIP vision (several layers) "
                   "and the encoder's ResBlocks, and adds its subject-encoder-attention to every UNet "
                   "transformer block, scaled by beta. Gives a coarse picture of the subject; combine with "
                   "Self-Subject-Attention for the detail.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to patch. It is cloned; the input model is not changed."}),
                "subject_encoder": ("DREAMTUNER_SUBJECT_ENCODER", {"tooltip": "From SubjectEncoderLoader (DreamTuner)."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": (
                    "From the core CLIPVisionLoader: the CLIP vision model the encoder was made for, "
                    "OpenCLIP ViT-H/14 by default (the file many users have for IP-Adapter).")}),
                "image": ("IMAGE", {"tooltip": (
                    "The subject. Any size and aspect ratio (resized and centre-cropped as CLIP vision does). "
                    "Several images are treated as photos of one subject: their features are averaged.")}),
                "beta": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 2.0, "step": 0.01, "tooltip": (
                    "beta of Eq. 1: how much the subject encoder adds. Paper: 0.2; 0.5 and above hurts "
                    "editability. 0 leaves the model unchanged.")}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                            "tooltip": "Fraction of the schedule at which the encoder starts acting."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                          "tooltip": "Fraction of the schedule after which the encoder stops acting."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": (
                    "Where the subject is: the background is replaced by white before encoding, as the paper "
                    "does. Any size (resized to the image). A mask selecting nothing is an error. Not "
                    "connected: the background is NOT whitened (the encoder sees it too; a warning is logged).")}),
                "mask_mode": (list(MASK_MODES), {"default": MASK_SUBJECT_IS_ONE, "tooltip": (
                    "What 1 means in mask. LoadImage's MASK is 1 on transparent pixels (the background of a "
                    "cut-out PNG): choose 'background is 1 (LoadImage alpha)' for it.")}),
            },
        }

    RETURN_TYPES = ("MODEL", "IMAGE")
    RETURN_NAMES = ("model", "encoded_image")
    OUTPUT_TOOLTIPS = ("A clone of the model with the subject encoder.",
                       "The image as the encoder saw it (background whitened), to check the masking.")
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, subject_encoder, clip_vision, image, beta, start_percent, end_percent, mask=None,
              mask_mode=MASK_SUBJECT_IS_ONE):
        return apply_subject_encoder(model, subject_encoder, clip_vision, image, mask=mask, mask_mode=mask_mode,
                                     beta=beta, start_percent=start_percent, end_percent=end_percent)
