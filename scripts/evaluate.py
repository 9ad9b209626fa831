"""Measure subject fidelity (CLIP-I, DINO) and prompt fidelity (CLIP-T) on DreamBench or on two folders.

    python scripts/evaluate.py --dreambench DATASET --generated OUT --clip ViT-B-32.safetensors --dino dino-vits16/
    python scripts/evaluate.py --help                                # every option, generation and sweeps
"""

import pathlib
import sys

sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))
from dreamtuner_devtools import pack  # noqa: E402

pack.load(nodes=False)  # the pack under its one import name, without the nodes
from comfyui_dreamtuner.headless.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
