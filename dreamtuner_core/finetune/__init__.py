"""Subject-driven fine-tuning (paper 3.3, appendix A): the room the DreamTunerFinetune node calls.

:mod:`.settings` (the settings and input checks), :mod:`.subject_token` ([S*]),
:mod:`.adapters` (LoRA or weight differences), :mod:`.data` (the training pairs),
:mod:`.run_files` (hash, files, reuse), :mod:`.loop` (the run and its steps).
"""

from .adapters import text_targets, unet_targets
from .data import prepare_latents
from .loop import finetune, predict, train
from .run_files import run_hash
from .settings import PAPER_RECIPE, UNET_FULL, UNET_LORA, UNET_MODES, UNET_NONE, UNET_PAPER, FinetuneResult, FinetuneSettings, OutputFolders
from .subject_token import build_prompts

__all__ = ["PAPER_RECIPE", "UNET_FULL", "UNET_LORA", "UNET_MODES", "UNET_NONE", "UNET_PAPER", "FinetuneResult", "FinetuneSettings", "OutputFolders",
           "build_prompts", "finetune", "predict", "prepare_latents", "run_hash", "text_targets", "train",
           "unet_targets"]
