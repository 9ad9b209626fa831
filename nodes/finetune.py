"""DreamTunerFinetune: node glue over dreamtuner_core.finetune (paper 3.3, subject-driven fine-tuning)."""

import logging
import os

from ..dreamtuner_core.errors import DreamTunerInputError
from ..dreamtuner_core.charts import loss_curve_image
from ..dreamtuner_core.finetune import UNET_FULL, UNET_LORA, UNET_MODES, UNET_NONE, UNET_PAPER, FinetuneSettings, OutputFolders, finetune
from ..dreamtuner_core.references import MASK_MODES, MASK_SUBJECT_IS_ONE
from .subject_encoder import FOLDER as ENCODER_FOLDER
from .subject_encoder import register_model_folder

CATEGORY = "DreamTuner"


def output_folders():
    """models/loras, models/embeddings and models/dreamtuner of this ComfyUI (the first path of each)."""
    folder_paths = register_model_folder()
    if folder_paths is None:
        raise DreamTunerInputError("DreamTunerFinetune runs inside ComfyUI (its folder_paths module is missing).")

    def first(kind, default):
        paths = folder_paths.get_folder_paths(kind) if kind in folder_paths.folder_names_and_paths else []
        return paths[0] if paths else os.path.join(folder_paths.models_dir, default)

    return OutputFolders(first("loras", "loras"), first("embeddings", "embeddings"),
                         first(ENCODER_FOLDER, ENCODER_FOLDER))


class _Progress:
    """The host's progress bar with the step; the loss in the console (ComfyUI's log) every 10 steps and at the end."""

    def __init__(self):
        self._bar = None

    def __call__(self, step, total, loss):
        import comfy.utils

        if self._bar is None:
            self._bar = comfy.utils.ProgressBar(total)
        self._bar.update_absolute(step, total)
        if step % 10 == 0 or step == total:
            logging.info(f"[DreamTunerFinetune] step {step}/{total} loss {loss:.4f}")


class DreamTunerFinetune:
    """Fine-tunes the model on one subject picture: a LoRA and an [S*] embedding (DreamTuner 3.3)."""

    DESCRIPTION = (
        "DreamTuner subject-driven fine-tuning (paper 3.3). Trains on the reference picture (background made "
        "white with its mask) captioned 'a <class_word> [S*]' and the regular images captioned 'a <class_word>', "
        "one of each per step. Writes models/loras/<subject_name>.safetensors (load it with the core LoraLoader "
        "in any graph) and models/embeddings/<subject_name>.safetensors (write embedding:<subject_name> in a "
        "prompt); with a subject encoder on the model, also a tuned encoder in models/dreamtuner/. Returns the "
        "model and CLIP with the LoRA applied. Re-queueing the same inputs loads the files instead of training.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": (
                    "The checkpoint's model (SD1.x, SD2.x or SDXL), optionally with ApplySubjectEncoder (its "
                    "ResBlocks are tuned too). Not changed; a LoRA is trained around it.")}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP: [S*] is a new token of its text encoder."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE (encodes the pictures once)."}),
                "reference": ("IMAGE", {"tooltip": (
                    "The subject picture (a cut-out PNG or picture + mask). Any size from 8 px; 512 px for "
                    "SD1.x, 1024 px for SDXL is usual.")}),
                "regular_images": ("IMAGE", {"tooltip": (
                    "Regular images of the class (paper: 32, made with the subject encoder at beta 0.2 and "
                    "self-subject-attention at omega_ref 3, prompt 'a <class_word>'). Resized (cover, centre "
                    "crop) to the reference's size.")}),
                "class_word": ("STRING", {"default": "dog", "tooltip": (
                    "The subject's class, e.g. 'dog', 'girl', 'teapot'. [S*] starts from its token vector (the "
                    "mean of its tokens' vectors if it has several).")}),
                "subject_name": ("STRING", {"default": "my_subject", "tooltip": (
                    "Names the files: loras/<name>.safetensors, embeddings/<name>.safetensors, "
                    "dreamtuner/<name>.safetensors. Letters, digits, '_', '-', '.'. Use embedding:<name> in prompts.")}),
                "steps": ("INT", {"default": 800, "min": 1, "max": 20000, "tooltip": (
                    "Training steps, batch 2 (one reference, one regular). Paper: 800-1200; about 300 with the "
                    "subject encoder.")}),
                "unet_mode": (list(UNET_MODES), {"default": UNET_LORA, "tooltip": (
                    f"'{UNET_LORA}': a LoRA of the given rank at unet_lr (paper: LoRA 'also works'; small file). "
                    f"'{UNET_FULL}': full fine-tuning at full_unet_lr (default 1e-6, the paper's), saved exactly "
                    "as the full-size weight differences in the LoRA file (.diff keys, as large as the UNet; "
                    f"LoraLoader applies it). '{UNET_PAPER}': the paper's recipe (3.3): every UNet and text-encoder "
                    "weight at 1e-6 for 800 steps (steps, unet_lr, full_unet_lr, train_text_encoder and "
                    "text_encoder_lr are not used). Full modes need far more memory than a LoRA. "
                    f"'{UNET_NONE}': only [S*] trains (Textual Inversion-like); the UNet is not changed and the "
                    "LoRA file holds no weights (unet_lr and rank are not used).")}),
                "unet_lr": ("FLOAT", {"default": 1e-4, "min": 1e-8, "max": 0.1, "step": 1e-6, "round": False,
                                      "tooltip": "UNet learning rate of a LoRA (about 1e-4). Full fine-tuning "
                                                 "takes full_unet_lr instead."}),
                "token_lr": ("FLOAT", {"default": 5e-3, "min": 1e-8, "max": 0.1, "step": 1e-5, "round": False,
                                       "tooltip": "[S*] learning rate (paper: 5e-3)."}),
                "rank": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip": "LoRA rank (LoRA mode)."}),
                # control_after_generate said outright (the frontend draws it for a seed anyway): without it the
                # frontend's legacy migration (migrateWidgetsValues) counts one value too few beside the forceInput
                # full_unet_lr and drops the overwrite value from a saved workflow, shifting mask_mode into it.
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                                 "tooltip": (
                    "Seeds the LoRA's initialisation, the pairs' order, mirroring, timesteps and noise: the "
                    "same inputs and seed give the same files.")}),
                "train_text_encoder": ("BOOLEAN", {"default": False, "tooltip": (
                    "Also train the text encoder's attention and MLP layers (same mode as the UNet) at "
                    "text_encoder_lr; saved in the same LoRA file.")}),
                "text_encoder_lr": ("FLOAT", {"default": 1e-6, "min": 1e-8, "max": 0.1, "step": 1e-7,
                                              "round": False, "tooltip": (
                    "Text encoder learning rate (paper 1e-6 for full fine-tuning; about 1e-5 for a LoRA). "
                    "Also the subject encoder ResBlocks' learning rate.")}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": (
                    "Recompute each UNet block in the backward pass: much less memory, about 30% slower.")}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": (
                    "Replace existing files of this subject_name that an earlier fine-tune wrote (their metadata "
                    "says so). Off: such files stop the run with an error (files of this very run are reused, "
                    "never retrained). A LoRA or embedding of that name the pack did not write is never "
                    "replaced, even when on.")}),
            },
            "optional": {
                "full_unet_lr": ("FLOAT", {"default": 1e-6, "min": 1e-8, "max": 0.1, "step": 1e-7, "round": False,
                                           "forceInput": True, "tooltip": (
                    f"UNet learning rate of '{UNET_FULL}' (its own; not connected: 1e-6, the paper's). Connect a "
                    "float (e.g. a Primitive) to change it.")}),
                "mask": ("MASK", {"tooltip": (
                    "Where the subject is in the reference; its background becomes white (paper). Any size "
                    "(resized to the picture). A mask selecting nothing is an error. Not connected: the "
                    "background is NOT whitened and is learnt with the subject (a warning is logged).")}),
                "mask_mode": (list(MASK_MODES), {"default": MASK_SUBJECT_IS_ONE, "tooltip": (
                    "What 1 means in mask. LoadImage's MASK is 1 on transparent pixels: choose "
                    "'background is 1 (LoadImage alpha)' for it.")}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP", "IMAGE")
    RETURN_NAMES = ("model", "clip", "loss_curve")
    OUTPUT_TOOLTIPS = ("The model with the trained LoRA (as LoraLoader gives it from the file).",
                       "The CLIP with the LoRA's text part; use embedding:<subject_name> in prompts.",
                       "Loss per step (smoothed): blue the batch, orange the reference pair.")
    FUNCTION = "train"
    CATEGORY = CATEGORY

    def train(self, model, clip, vae, reference, regular_images, class_word, subject_name, steps, unet_mode,
              unet_lr, token_lr, rank, seed, train_text_encoder, text_encoder_lr, gradient_checkpointing,
              overwrite, mask=None, mask_mode=MASK_SUBJECT_IS_ONE, full_unet_lr=None):
        import comfy.model_management

        settings = FinetuneSettings(class_word=class_word.strip(), name=subject_name.strip(), steps=int(steps),
                                    unet_lr=float(unet_lr), token_lr=float(token_lr),
                                    full_unet_lr=1e-6 if full_unet_lr is None else float(full_unet_lr),
                                    text_encoder_lr=float(text_encoder_lr), encoder_lr=float(text_encoder_lr),
                                    rank=int(rank), seed=int(seed), train_text_encoder=bool(train_text_encoder),
                                    unet_mode=unet_mode, gradient_checkpointing=bool(gradient_checkpointing))
        result = finetune(model, clip, vae, reference, regular_images, settings, output_folders(), mask=mask,
                          mask_mode=mask_mode, overwrite=bool(overwrite), progress=_Progress(),
                          interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
        if result.reused:
            logging.info(f"[DreamTunerFinetune] '{settings.name}': files of this run found, loaded without training.")
        return (result.model, result.clip, loss_curve_image(result.losses, result.reference_losses))
