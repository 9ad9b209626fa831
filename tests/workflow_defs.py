"""Node definitions to check the workflow files against, without a ComfyUI server (tier 1).

Core nodes: ``tests/data/core_node_defs.json``, the ``/object_info`` entries of
the core nodes the workflows use, as ComfyUI v0.15.1 serves them; the tier-2
tests compare it with a live server (``DREAMTUNER_UPDATE_NODE_DEFS=1`` rewrites
it). File lists (checkpoints, images, ...) depend on the installation, so they
are stored empty and filled here with the model files the README tells users
to get and the sample images (and pose video) shipped in ``example_workflows/inputs``.
This pack's nodes: from their classes, as the server would list them.
"""

from __future__ import annotations

import json
import pathlib
import re

from comfyui_dreamtuner import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfyui_dreamtuner.headless import workflow as wf

ROOT = pathlib.Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "data" / "core_node_defs.json"
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
KEPT = ("input", "input_order", "output", "output_name", "display_name", "deprecated")


def without_files(definition):
    """A node definition with its file-list choices emptied and only the fields the workflow checks read."""
    definition = json.loads(json.dumps({k: definition[k] for k in KEPT if k in definition}))
    for section in definition.get("input", {}).values():
        for name, spec in section.items():
            if name in wf.FILE_FOLDERS and isinstance(spec, list) and isinstance(spec[0], list):
                spec[0] = []
            elif name in wf.FILE_FOLDERS and isinstance(spec, list) and spec[0] == "COMBO":  # the newer form
                spec[1]["options"] = []
    return definition


def core_types():
    """The core node types the workflow files use."""
    used = {node["type"] for path in WORKFLOWS for node in wf.load(path)["nodes"]}
    return sorted(used - set(NODE_CLASS_MAPPINGS) - set(wf.UI_ONLY_NODES))


def documented_files():
    """Model file names in the README's model table, and the sample images."""
    names = set(re.findall(r"`([\w.\-]+\.safetensors)`", (ROOT / "README.md").read_text()))
    return names | {p.name for p in (ROOT / "example_workflows" / "inputs").iterdir()}


def pack_defs():
    out = {}
    for name, node in NODE_CLASS_MAPPINGS.items():
        inputs = json.loads(json.dumps(node.INPUT_TYPES()))
        out[name] = {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                     "output": list(node.RETURN_TYPES),
                     "output_name": list(getattr(node, "RETURN_NAMES", node.RETURN_TYPES)),
                     "display_name": NODE_DISPLAY_NAME_MAPPINGS[name]}
    return out


def installation():
    """Definitions of every node the workflows may use, in an installation that has the documented files."""
    defs = {**json.loads(SNAPSHOT.read_text()), **pack_defs()}
    files = sorted(documented_files())
    for definition in defs.values():
        for section in definition["input"].values():
            for name, spec in section.items():
                if name in wf.FILE_FOLDERS and isinstance(spec[0], list) and not spec[0]:
                    spec[0] = files
                elif name in wf.FILE_FOLDERS and spec[0] == "COMBO" and not spec[1].get("options"):
                    spec[1]["options"] = files
    return defs


PAGE_PREVIEWS = ("video-preview",)  # the page's preview of a loaded video: in its prompt, no input of the node


def without_page_previews(prompt, defs):
    """The page's prompt without the values of its preview widgets, which the engine ignores (they are no input
    of the node's definition)."""
    prompt = json.loads(json.dumps(prompt))
    for entry in prompt.values():
        names = dict(wf.spec_inputs(defs[entry["class_type"]]))
        for name in PAGE_PREVIEWS:
            if name in entry["inputs"] and name not in names:
                del entry["inputs"][name]
    return prompt
