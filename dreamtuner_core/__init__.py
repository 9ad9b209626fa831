"""DreamTuner's method for ComfyUI models, free of node code.

- :mod:`.self_subject_attention`: Eq. 3, self-subject-attention.
- :mod:`.interleaved_cfg`: Eq. 4-6, interleaved classifier-free guidance (and its GUIDER).
- :mod:`.subject_encoder`: the subject encoder and Eq. 1; :mod:`.subject_encoder_patch` applies it,
  :mod:`.encoder_file` reads and writes its files, :mod:`.clip_features` gives its CLIP features,
  :mod:`.families` the base-model layouts it can be made for.
- :mod:`.reference_pass`: the reference's noised forward pass, shared per step.
- :mod:`.references`: reference latents, masks and their validation.
- :mod:`.patch_model`: installing it all on a clone of a ModelPatcher.
- :mod:`.host`: the guarded touch points with ComfyUI's internals.
"""

from .errors import DreamTunerInputError

__all__ = ["DreamTunerInputError"]
