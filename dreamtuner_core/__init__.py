"""DreamTuner's method for ComfyUI models, free of node code: one room per part of the method.

- :mod:`.ssa`: self-subject-attention (Eq. 3) and the reference pass that feeds it.
- :mod:`.guidance`: interleaved classifier-free guidance (Eq. 4-6) and its GUIDER.
- :mod:`.subject_encoder`: the subject encoder and Eq. 1, its patch, files and CLIP features.
- :mod:`.finetune`: subject-driven fine-tuning (3.3); :mod:`.pretrain`: the encoder's pretraining (3.1);
  :mod:`.training`: what both trainers need of the host.
- :mod:`.scoring`: CLIP-I, CLIP-T and DINO, and the DreamBench protocol.
- Shared: :mod:`.keys` (every ``transformer_options`` key and marker), :mod:`.references` (reference
  latents and masks), :mod:`.images` (white backgrounds), :mod:`.charts`, :mod:`.files` (atomic writes),
  :mod:`.host` (the guarded touch points with ComfyUI's internals), :mod:`.families` (base-model
  layouts), :mod:`.errors`.

docs/ARCHITECTURE.md walks one sampling step through the rooms.
"""

from .errors import DreamTunerInputError

__all__ = ["DreamTunerInputError"]
