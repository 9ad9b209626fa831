"""Test set-up: make ComfyUI's comfy core importable without a GPU and load this pack as ComfyUI does.

ComfyUI imports a custom node folder (whose name may contain dashes) as a
package from its ``__init__.py``; the tests do the same under the name
``comfyui_dreamtuner``, so relative imports inside the pack are exercised.
"""

import importlib.util
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_dreamtuner"

if not torch.cuda.is_available():
    # comfy.model_management probes CUDA at import unless --cpu is set first.
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def load_pack():
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return sys.modules[PACKAGE]


load_pack()
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
