"""Run a DreamTuner workflow file with a ComfyUI installation's own engine, without the web UI.

    python scripts/run_workflow.py --comfyui /path/to/ComfyUI            # workflow 1 on the sample subject
    python scripts/run_workflow.py --help                                # every option
"""

import pathlib
import sys

sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))
from dreamtuner_devtools import pack  # noqa: E402

pack.load(nodes=False)  # the pack under its one import name, without the nodes
from comfyui_dreamtuner.headless.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
