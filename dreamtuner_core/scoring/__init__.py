"""Subject fidelity and prompt fidelity (CLIP-I, CLIP-T, DINO): the room the scoring nodes call.

:mod:`.metrics` is the maths, :mod:`.embedders` the models it reads, :mod:`.loaders` loads them
from the user's files, :mod:`.scores` scores a batch, :mod:`.report` gives its text and chart,
:mod:`.dreambench` the DreamBench protocol of the command line. Nothing here imports ComfyUI.
"""

from .embedders import DinoScorer, HostClipVision, OpenClipScorer
from .loaders import is_dino_folder, load_dino, load_open_clip
from .metrics import CLIP_I, CLIP_T, DINO, LABELS, METRICS, normalise, resize_center_crop
from .report import chart, report
from .scores import ScoringModels, Scores, prepare_references, ranking, score_images

__all__ = ["CLIP_I", "CLIP_T", "DINO", "LABELS", "METRICS", "DinoScorer", "HostClipVision", "OpenClipScorer",
           "ScoringModels", "Scores", "chart", "is_dino_folder", "load_dino", "load_open_clip", "normalise",
           "prepare_references", "ranking", "report", "resize_center_crop", "score_images"]
