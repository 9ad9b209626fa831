"""Subject-driven video (paper Fig. 9): the room the DreamTuner Video Sequence node calls.

A graph has no loops, so the loop of the paper's video generation lives here: frame 1 is
sampled, then each next frame with the first and the previous frame(s) added as references of
self-subject-attention. :mod:`.frames` holds the inputs' checks, which frames a frame reads
and each frame's noise; :mod:`.sequence` is the loop through the host's sampler.
"""

from .frames import NOISE_INDEPENDENT, NOISE_MODES, NOISE_SHARED, frame_noise, reference_frames
from .sequence import SequenceSettings, generate_sequence

__all__ = ["NOISE_INDEPENDENT", "NOISE_MODES", "NOISE_SHARED", "SequenceSettings", "frame_noise", "generate_sequence",
           "reference_frames"]
