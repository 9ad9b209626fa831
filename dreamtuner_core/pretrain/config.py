"""The settings of a pretraining run (the command line's options); stored in each checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from ..subject_encoder.model import PAPER_CLIP_LAYERS


@dataclass
class TrainConfig:
    """Every setting of a run (the CLI's options); stored in each checkpoint."""

    data: str
    checkpoint: str
    controlnet: str
    clip_vision: str
    out: str
    clip_vision_config: str | None = None  # a CLIP vision file of another shape: its HF-style config JSON
    init_encoder: str | None = None
    clip_layers: tuple = PAPER_CLIP_LAYERS
    resblocks: int = 4
    size: int = 512
    global_batch: int = 16
    batch_per_device: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    max_steps: int = 10000
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    beta: float = 1.0
    control_strength: float = 1.0
    augment: bool = True
    precision: str = "auto"  # auto | fp32 | bf16
    gradient_checkpointing: bool = False
    workers: int = 2
    encoder_dtype: str = "float16"
    resume: str | None = None  # a checkpoint file, or "latest" (the newest in OUT/checkpoints)
    progress: bool = True

    def __post_init__(self):
        self.clip_layers = tuple(int(i) for i in self.clip_layers)
