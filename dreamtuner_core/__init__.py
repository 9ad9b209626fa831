"""DreamTuner's method for ComfyUI models, free of node code.

- :mod:`.self_subject_attention`: Eq. 3, self-subject-attention.
- :mod:`.reference_pass`: the reference's noised forward pass, shared per step.
- :mod:`.references`: reference latents, masks and their validation.
- :mod:`.patch_model`: installing it all on a clone of a ModelPatcher.
- :mod:`.host`: the guarded touch points with ComfyUI's internals.
"""

from .errors import DreamTunerInputError

__all__ = ["DreamTunerInputError"]
