"""Scoring Models Loader and Subject Score (DreamTuner): node glue over dreamtuner_core.scoring."""

import os

import torch

from ..dreamtuner_core import scoring
from ..dreamtuner_core.errors import DreamTunerInputError
from ..dreamtuner_core.references import MASK_MODES, MASK_SUBJECT_IS_ONE
from .subject_encoder import register_model_folder

CATEGORY = "DreamTuner"
FOLDER = "dreamtuner_scoring"  # ComfyUI/models/dreamtuner/scoring/
NONE = "none"
SORT_CHOICES = {"CLIP-I": scoring.CLIP_I, "DINO": scoring.DINO, "CLIP-T": scoring.CLIP_T, "batch order": None}


def _folder_paths():
    """Register models/dreamtuner/scoring/ (keeping extra_model_paths.yaml entries); None outside ComfyUI."""
    return register_model_folder(FOLDER, "dreamtuner", "scoring")


def _scoring_files():
    """(open_clip files, DINO folders) under the registered scoring folders, as names relative to them."""
    folder_paths = _folder_paths()
    if folder_paths is None:
        return [], []
    clips, dinos = set(), set()
    for base in folder_paths.get_folder_paths(FOLDER):
        for name in folder_paths.get_filename_list(FOLDER):
            full = os.path.join(base, name)
            if not os.path.isfile(full):
                continue
            parent = os.path.dirname(name)
            if parent and scoring.is_dino_folder(os.path.dirname(full)):
                dinos.add(parent.replace(os.sep, "/"))
            else:
                clips.add(name)
    return sorted(clips), sorted(dinos)


def _full_path(name, folder=False):
    folder_paths = _folder_paths()
    for base in (folder_paths.get_folder_paths(FOLDER) if folder_paths is not None else []):
        path = os.path.join(base, name)
        if (os.path.isdir(path) if folder else os.path.isfile(path)):
            return path
    raise DreamTunerInputError(f"'{name}' is not in models/dreamtuner/scoring/; put it there and refresh the page.")


class ScoringModelsLoader:
    """Loads the models that measure subject and prompt fidelity (CLIP for CLIP-I/CLIP-T, DINO)."""

    DESCRIPTION = ("Loads the scoring models of DreamBench's protocol from ComfyUI/models/dreamtuner/scoring/: an "
                   "open_clip CLIP model (.safetensors; ViT-B-32 is the protocol's) for CLIP-T and CLIP-I, and a "
                   "DINO ViT-S/16 folder (config.json + model.safetensors, e.g. facebook/dino-vits16) for DINO. "
                   "Either may be 'none': its metrics are then skipped. Nothing is downloaded.")

    @classmethod
    def INPUT_TYPES(cls):
        clips, dinos = _scoring_files()
        return {"required": {
            "clip_name": ([NONE] + clips, {"tooltip": (
                "An open_clip CLIP model file (.safetensors) in models/dreamtuner/scoring/: the open_clip "
                "weights of an OpenCLIP model (open_clip_*model.safetensors in its Hugging Face repository), "
                "renamed as you like. 'none' skips "
                "CLIP-T (and CLIP-I unless a CLIP_VISION is connected to the score node).")}),
            "clip_architecture": ("STRING", {"default": "ViT-B-32", "tooltip": (
                "open_clip's name of the file's architecture: ViT-B-32 (the protocol's), ViT-L-14, ViT-H-14, ...")}),
            "dino_name": ([NONE] + dinos, {"tooltip": (
                "A folder in models/dreamtuner/scoring/ holding config.json and model.safetensors of a DINO ViT "
                "(facebook/dino-vits16 is the protocol's). 'none' skips DINO.")}),
        }}

    RETURN_TYPES = ("DREAMTUNER_SCORING_MODELS",)
    RETURN_NAMES = ("scoring_models",)
    OUTPUT_TOOLTIPS = ("The loaded scoring models, for Subject Score (DreamTuner).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, clip_name, clip_architecture, dino_name):
        import comfy.model_management as mm

        device, offload = mm.get_torch_device(), mm.unet_offload_device()
        clip = None if clip_name == NONE else scoring.load_open_clip(
            _full_path(clip_name), clip_architecture.strip(), device, offload)
        dino = None if dino_name == NONE else scoring.load_dino(_full_path(dino_name, folder=True), device, offload)
        return (scoring.ScoringModels(clip_i=clip, clip_t=clip, dino=dino),)


class SubjectScore:
    """Scores generated images for subject fidelity (CLIP-I, DINO) and prompt fidelity (CLIP-T); ranks them."""

    DESCRIPTION = ("Measures how much each generated image looks like the subject (CLIP-I, DINO: cosine with the "
                   "reference images, averaged over them) and how well it follows the prompt (CLIP-T), as the "
                   "DreamBooth/DreamTuner papers do. Outputs the scores as text and numbers, the batch sorted "
                   "best first, and a chart. Metrics whose model is missing are skipped with a note.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The generated images to score (a batch, e.g. several seeds)."}),
                "reference": ("IMAGE", {"tooltip": (
                    "The real subject image(s). With several, each generated image's score is its mean over them.")}),
                "sort_by": (list(SORT_CHOICES), {"tooltip": (
                    "The score that orders the sorted_images output, best first ('batch order' keeps the batch).")}),
            },
            "optional": {
                "scoring_models": ("DREAMTUNER_SCORING_MODELS", {"tooltip": (
                    "From Scoring Models Loader (DreamTuner): open_clip for CLIP-T (and CLIP-I), DINO for DINO.")}),
                "clip_vision": ("CLIP_VISION", {"tooltip": (
                    "From the core CLIPVisionLoader: when connected, CLIP-I uses it (its projected image "
                    "embeddings) instead of the open_clip model.")}),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": (
                    "The prompt the images were made with, for CLIP-T (without trigger words such as [S*], "
                    "as the protocol scores the plain text). Empty skips CLIP-T.")}),
                "reference_mask": ("MASK", {"tooltip": (
                    "Where the subject is in the reference(s): their background is whitened before scoring, as "
                    "the subject encoder sees them. Any size. One mask for all references or one each.")}),
                "mask_mode": (list(MASK_MODES), {"default": MASK_SUBJECT_IS_ONE, "tooltip": (
                    "What 1 means in reference_mask. LoadImage's MASK is 1 on transparent pixels: choose "
                    "'background is 1 (LoadImage alpha)' for it.")}),
            },
        }

    RETURN_TYPES = ("STRING", "FLOAT", "FLOAT", "FLOAT", "IMAGE", "IMAGE")
    RETURN_NAMES = ("report", "clip_i", "clip_t", "dino", "sorted_images", "chart")
    OUTPUT_TOOLTIPS = (
        "One line per image (best first) with its scores, the means and notes on skipped metrics.",
        "Mean CLIP-I over all (image, reference) pairs; NaN when skipped.",
        "Mean CLIP-T over the images; NaN when skipped.",
        "Mean DINO over all (image, reference) pairs; NaN when skipped.",
        "The images sorted by sort_by, best first.",
        "A bar chart of the per-image scores, in the sorted order.",
    )
    FUNCTION = "score"
    CATEGORY = CATEGORY

    def score(self, images, reference, sort_by, scoring_models=None, clip_vision=None, prompt="",
              reference_mask=None, mask_mode=MASK_SUBJECT_IS_ONE):
        import comfy.model_management as mm

        if sort_by not in SORT_CHOICES:
            raise DreamTunerInputError(f"sort_by must be one of {list(SORT_CHOICES)}, got {sort_by!r}.")
        loaded = scoring_models or scoring.ScoringModels()
        models = scoring.ScoringModels(
            clip_i=scoring.HostClipVision(clip_vision) if clip_vision is not None else loaded.clip_i,
            clip_t=loaded.clip_t, dino=loaded.dino)
        references = scoring.prepare_references(reference, reference_mask, mask_mode)
        scores = scoring.score_images(images, references, prompt, models, mm.throw_exception_if_processing_interrupted)
        metric = SORT_CHOICES[sort_by]
        order = scoring.ranking(scores, metric)
        if metric is not None and metric not in scores.per_image:
            scores.notes.append(f"Sorted in batch order: {sort_by} was not computed.")
        text = scoring.report(scores, order)
        sorted_images = images[torch.tensor(order, dtype=torch.long)]
        return (text, scores.mean(scoring.CLIP_I), scores.mean(scoring.CLIP_T), scores.mean(scoring.DINO),
                sorted_images, scoring.chart(scores, order))
