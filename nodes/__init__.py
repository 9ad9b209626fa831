"""ComfyUI nodes of the pack: thin glue over dreamtuner_core."""

from .guidance import InterleavedCFGGuider, InterleavedCFGSampler
from .ssa import SelfSubjectAttentionPatch
from .subject_encoder import ApplySubjectEncoder, SubjectEncoderLoader, register_model_folder
from .scoring import ScoringModelsLoader, SubjectScore
from .finetune import DreamTunerFinetune
from .video import VideoSequence

register_model_folder()

NODE_CLASS_MAPPINGS = {
    "DreamTunerSelfSubjectAttention": SelfSubjectAttentionPatch,
    "DreamTunerInterleavedCFGSampler": InterleavedCFGSampler,
    "DreamTunerInterleavedCFGGuider": InterleavedCFGGuider,
    "DreamTunerSubjectEncoderLoader": SubjectEncoderLoader,
    "DreamTunerApplySubjectEncoder": ApplySubjectEncoder,
    "DreamTunerScoringModelsLoader": ScoringModelsLoader,
    "DreamTunerSubjectScore": SubjectScore,
    "DreamTunerFinetune": DreamTunerFinetune,
    "DreamTunerVideoSequence": VideoSequence,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DreamTunerSelfSubjectAttention": "Self-Subject-Attention (DreamTuner)",
    "DreamTunerInterleavedCFGSampler": "InterleavedCFGSampler (DreamTuner)",
    "DreamTunerInterleavedCFGGuider": "InterleavedCFGGuider (DreamTuner)",
    "DreamTunerSubjectEncoderLoader": "SubjectEncoderLoader (DreamTuner)",
    "DreamTunerApplySubjectEncoder": "ApplySubjectEncoder (DreamTuner)",
    "DreamTunerScoringModelsLoader": "Scoring Models Loader (DreamTuner)",
    "DreamTunerSubjectScore": "Subject Score (DreamTuner)",
    "DreamTunerFinetune": "Finetune subject (DreamTuner)",
    "DreamTunerVideoSequence": "Video Sequence (DreamTuner)",
}
