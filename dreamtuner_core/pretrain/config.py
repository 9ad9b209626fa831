"""The settings of a pretraining run (the command line's options); stored in each checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, fields

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
    overwrite: bool = False  # a fresh run into a folder that holds an earlier run: remove that run's files first
    progress: bool = True

    def __post_init__(self):
        from ..errors import DreamTunerInputError

        try:
            self.clip_layers = tuple(int(i) for i in self.clip_layers)
        except (TypeError, ValueError):
            raise DreamTunerInputError(
                f"--clip-layers {self.clip_layers!r} is not a list of CLIP hidden-state indices; give whole numbers "
                "such as 25,4,8,12,16 (the paper's).") from None
        if not self.clip_layers or any(i < 0 for i in self.clip_layers):
            raise DreamTunerInputError(f"--clip-layers {list(self.clip_layers)}: give one or more indices of 0 or "
                                       "above, such as 25,4,8,12,16 (the paper's).")
        for name in ("size", "global_batch", "batch_per_device", "max_steps", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DreamTunerInputError(f"{flag_name(name)} {value!r}: give a whole number of 1 or more.")


# What a resumed run may change: how long it runs, how often it saves and logs, and how each process
# computes the same steps (processes, per-device batch, precision, recomputation, loader processes, the
# storage dtype of exported encoder files). Everything else (files, data, the encoder's shape, optimiser,
# schedule, global batch, seed, loss weighting, augmentation) must equal the stored configuration.
RESUMABLE_CHANGES = frozenset({
    "out", "resume", "overwrite", "max_steps", "checkpoint_every", "keep_checkpoints", "progress", "workers",
    "batch_per_device", "precision", "gradient_checkpointing", "encoder_dtype"})

PATH_FIELDS = frozenset({"data", "checkpoint", "controlnet", "clip_vision", "clip_vision_config", "init_encoder"})


def flag_name(name):
    """The command-line flag of a field."""
    return {"augment": "--no-augment", "progress": "--no-progress"}.get(name, "--" + name.replace("_", "-"))


def _same(name, stored, current):
    if name in PATH_FIELDS and stored is not None and current is not None:
        import os

        return stored == current or os.path.realpath(stored) == os.path.realpath(current)
    if isinstance(stored, (list, tuple)) or isinstance(current, (list, tuple)):
        return list(stored or ()) == list(current or ())
    return stored == current


def config_differences(stored: dict, config: TrainConfig):
    """``(flag, stored, current)`` for every field that a resume may not change and that differs."""
    differences = []
    for f in fields(config):
        if f.name in RESUMABLE_CHANGES or f.name not in stored:
            continue
        current = getattr(config, f.name)
        if not _same(f.name, stored[f.name], current):
            differences.append((flag_name(f.name), stored[f.name], current))
    return differences
