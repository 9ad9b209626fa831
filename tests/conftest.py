"""Test set-up: make ComfyUI's comfy core importable without a GPU and load this pack as ComfyUI does.

ComfyUI imports a custom node folder (whose name may contain dashes) as a
package from its ``__init__.py``; the tests do the same under the name
``comfyui_dreamtuner`` (:mod:`dreamtuner_devtools.pack`), so relative imports
inside the pack are exercised.
"""

import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # dreamtuner_devtools; after ComfyUI's own modules (``nodes`` is one of theirs)

from dreamtuner_devtools import pack  # noqa: E402

pack.cpu_unless_cuda()
pack.load()
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory):
    """One real ComfyUI server for the tier-2 tests (see tests/tier2.py); yields a headless.server.Server."""
    import tier2
    from comfyui_dreamtuner.headless import server as comfy_server

    if not tier2.COMFYUI_PATH:
        pytest.skip("COMFYUI_PATH is not set")
    base = tmp_path_factory.mktemp("comfyui-base")
    tier2.make_base(base)
    with comfy_server.started(tier2.COMFYUI_PATH, tier2.python(), tier2.server_args(base)) as server:
        server.base = base
        yield server
