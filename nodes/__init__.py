"""ComfyUI nodes of the pack: thin glue over dreamtuner_core."""

from .interleaved_cfg import InterleavedCFGGuider, InterleavedCFGSampler
from .self_subject_attention import SelfSubjectAttentionPatch

NODE_CLASS_MAPPINGS = {
    "DreamTunerSelfSubjectAttention": SelfSubjectAttentionPatch,
    "DreamTunerInterleavedCFGSampler": InterleavedCFGSampler,
    "DreamTunerInterleavedCFGGuider": InterleavedCFGGuider,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DreamTunerSelfSubjectAttention": "Self-Subject-Attention (DreamTuner)",
    "DreamTunerInterleavedCFGSampler": "InterleavedCFGSampler (DreamTuner)",
    "DreamTunerInterleavedCFGGuider": "InterleavedCFGGuider (DreamTuner)",
}
