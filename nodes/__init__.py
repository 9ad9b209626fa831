"""ComfyUI nodes of the pack: thin glue over dreamtuner_core."""

from .self_subject_attention import SelfSubjectAttentionPatch

NODE_CLASS_MAPPINGS = {
    "DreamTunerSelfSubjectAttention": SelfSubjectAttentionPatch,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DreamTunerSelfSubjectAttention": "Self-Subject-Attention (DreamTuner)",
}
