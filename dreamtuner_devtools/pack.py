"""Load the pack under its one import name, as ComfyUI loads a custom node folder.

ComfyUI imports a custom node folder (whose name may contain dashes) as a
package from its ``__init__.py``; :func:`load` does the same under the name
``comfyui_dreamtuner``, so relative imports inside the pack are exercised and
the core is ``comfyui_dreamtuner.dreamtuner_core`` for every caller.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_dreamtuner"


def cpu_unless_cuda():
    """comfy.model_management probes CUDA at import unless --cpu is set first."""
    import torch

    if not torch.cuda.is_available():
        import comfy.cli_args

        comfy.cli_args.args.cpu = True


def load(nodes: bool = True):
    """The pack's package module (made once per process).

    nodes: run the pack's ``__init__.py`` (the nodes and their registrations), as ComfyUI does; False makes
    only the package, for command lines that use the core alone (its submodules import on demand).
    """
    module = sys.modules.get(PACKAGE)
    if module is None:
        spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        if nodes:
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[PACKAGE]
                raise
        module.__dreamtuner_nodes__ = nodes
    elif nodes and not getattr(module, "__dreamtuner_nodes__", True):
        module.__spec__.loader.exec_module(module)
        module.__dreamtuner_nodes__ = True
    return module
