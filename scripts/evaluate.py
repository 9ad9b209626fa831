"""Measure subject fidelity (CLIP-I, DINO) and prompt fidelity (CLIP-T) on DreamBench or on two folders.

    python scripts/evaluate.py --dreambench DATASET --generated OUT --clip ViT-B-32.safetensors --dino dino-vits16/
    python scripts/evaluate.py --help                                # every option, generation and sweeps
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from headless.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
