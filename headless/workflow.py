"""ComfyUI workflow files: the web UI's format, its widgets, and the API format the engine executes.

A workflow saved by the web UI lists nodes with ``widgets_values`` (the widget
values in the order the UI draws them) and a ``links`` table. The execution
engine takes the API format instead: ``{node id: {"class_type", "inputs"}}``
with every input named. The names come from the node definitions of the
installation that will run the graph (``GET /object_info``), so the
conversion here takes those definitions as an argument and never guesses.

Rules of the UI format that matter for the conversion (checked against the
frontend's own ``graphToPrompt`` in ``tests/test_tier2_comfyui.py``):

* every widget input has one entry in ``widgets_values``, in input order,
  also when a link feeds it (the link wins); a file saved before a node gained
  optional widgets after its others lacks their values: they take their
  defaults, as in the frontend;
* an INT with ``control_after_generate`` (or, when its spec does not say,
  named seed or noise_seed), and a FLOAT or COMBO with it, is followed by
  that control's value ("fixed", "randomize", ...; a COMBO's also by a filter
  text), and an image-upload combo by the upload button's value; none goes
  to the engine;
* Note, MarkdownNote, Reroute and PrimitiveNode live only in the UI: notes are
  dropped, links through a Reroute are followed to their origin, and an input
  fed by a PrimitiveNode takes the value the UI keeps in the target's widget;
* a muted node (mode 2) is left out; a bypassed node (mode 4) passes its
  first input of the matching type through to its consumers.
"""

from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
UI_ONLY_NODES = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
MUTED, BYPASSED = 2, 4
# Where a file-list widget's files live, to name the fix when a workflow asks for a file this ComfyUI lacks.
FILE_FOLDERS = {"ckpt_name": "models/checkpoints", "clip_name": "models/clip_vision", "lora_name": "models/loras",
                "control_net_name": "models/controlnet", "vae_name": "models/vae", "unet_name": "models/unet",
                "encoder_name": "models/dreamtuner", "clip_name1": "models/text_encoders",
                "clip_name2": "models/text_encoders", "image": "input", "file": "input"}
FILE_HINTS = {"encoder_name": (" No pretrained DreamTuner subject encoder is published yet: make an untrained one "
                               "with scripts/make_untrained_encoder.py (it runs but adds nothing), or use a "
                               "workflow without the encoder (3 or 4).")}


class WorkflowError(ValueError):
    """A problem with a workflow file, phrased for the person who will fix it (one line per problem)."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Widget:
    """One entry of ``widgets_values``: an input of the node, or a UI-only companion of one (``input`` None)."""

    name: str
    input: str | None
    kind: str = ""
    options: dict | None = None
    choices: tuple | None = None


def load(path) -> dict:
    path = pathlib.Path(path)
    try:
        workflow = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WorkflowError(f"{path}: not a readable workflow JSON file ({error})") from None
    if not isinstance(workflow, dict):
        raise WorkflowError(f"{path}: a workflow file holds a JSON object")
    if "nodes" not in workflow:
        if all(isinstance(v, dict) and "class_type" in v for v in workflow.values()):
            raise WorkflowError(f"{path}: this is an API-format prompt, not a UI workflow; queue it as it is")
        raise WorkflowError(f"{path}: no 'nodes' list; save the workflow from the ComfyUI menu (Workflow > Save)")
    return workflow


def spec_inputs(definition):
    """(name, spec) of a node definition's inputs, required then optional, in the order the UI draws them."""
    inputs = definition.get("input", {})
    order = definition.get("input_order") or {}
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        for name in order.get(section) or list(specs):
            if name in specs:
                yield name, specs[name]


def _kind(spec):
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    return "COMBO" if isinstance(kind, (list, tuple)) else kind


def _options(spec):
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec) -> bool:
    """Whether the UI draws this input as a widget (with a value in ``widgets_values``) rather than a socket."""
    return _kind(spec) in WIDGET_TYPES and not _options(spec).get("forceInput")


def _choices(spec):
    if isinstance(spec[0], (list, tuple)):
        return tuple(spec[0])
    return tuple(_options(spec).get("options", ()))


def widgets(definition) -> list[Widget]:
    """The entries of ``widgets_values`` the web UI writes for a node of this definition, in order."""
    out = []
    for name, spec in spec_inputs(definition):
        if not is_widget(spec):
            continue
        kind, options = _kind(spec), _options(spec)
        out.append(Widget(name, name, kind, options, _choices(spec) if kind == "COMBO" else None))
        if has_control(name, kind, options):
            out.append(Widget("control_after_generate", None, "COMBO", {},
                              CONTROL_VALUES + (("increment-wrap",) if kind == "COMBO" else ())))
            if kind == "COMBO":
                out.append(Widget("control_filter_list", None, "STRING", {}))
        if kind == "COMBO" and any(options.get(flag) for flag in UPLOAD_OPTIONS):
            out.append(Widget("upload", None))
    return out


CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
SEED_NAMES = ("seed", "noise_seed")


def has_control(name, kind, options) -> bool:
    """Whether the frontend draws a 'control after generate' widget after this input (and saves its value).

    As ComfyUI's frontend (1.39) does: an INT when its spec says ``control_after_generate`` or, when the spec
    does not say, when it is named seed or noise_seed; a FLOAT or COMBO only when its spec asks for one.
    """
    control = options.get("control_after_generate")
    if kind == "INT":
        return bool(name in SEED_NAMES if control is None else control)
    return kind in ("FLOAT", "COMBO") and bool(control)


def node_label(node_id, kind, title=None) -> str:
    """How every message names a node: ``node #12 'Title' (ClassType)``."""
    return f"node #{node_id} '{title}' ({kind})" if title else f"node #{node_id} ({kind})"


def _describe(node, object_info=None) -> str:
    title = node.get("title") or ((object_info or {}).get(node.get("type")) or {}).get("display_name")
    return node_label(node.get("id"), node.get("type"), title)


def _subgraph_ids(workflow):
    return {graph.get("id") for graph in (workflow.get("definitions") or {}).get("subgraphs") or ()}


def _missing_node(node, workflow):
    if node.get("type") in _subgraph_ids(workflow):
        return (f"{_describe(node)} is a subgraph, which this runner does not expand: right-click it, choose "
                "'Unpack Subgraph', and save the workflow again")
    return (f"{_describe(node)} is not installed in this ComfyUI: install the custom node pack that provides "
            f"'{node.get('type')}' (ComfyUI-Manager: Install Missing Custom Nodes) and restart ComfyUI")


def widget_values(node, definition) -> dict:
    """{input name: value} from a node's ``widgets_values`` (a list, or the dict some packs save)."""
    values = node.get("widgets_values")
    if values is None:
        return {}
    if isinstance(values, dict):
        return dict(values)
    slots = widgets(definition)
    values = values + _defaults_of_later_widgets(values, slots, definition)
    if len(values) != len(slots):
        raise WorkflowError(
            f"{_describe(node)} has {len(values)} widget values where this ComfyUI's '{node.get('type')}' has "
            f"{len(slots)} ({', '.join(s.name for s in slots)}): the node changed between versions; open the "
            "workflow in the web UI, check the node's values, and save it again")
    return {slot.input: value for slot, value in zip(slots, values) if slot.input is not None}


def _defaults_of_later_widgets(values, slots, definition):
    """The defaults of the widgets a file saved before they existed lacks: optional inputs added after every
    older widget. The frontend leaves such widgets at their defaults when it loads the file; a missing
    required widget, or one in the middle, stays an error (the values would land in the wrong places)."""
    missing = slots[len(values):]
    optional = (definition.get("input") or {}).get("optional") or {}
    if not missing or not all(slot.input in optional and "default" in (slot.options or {}) for slot in missing):
        return []
    if not all(_fits(slot, value) for slot, value in zip(slots, values)):
        return []  # a value missing in the middle shifted the later ones: not a file from before the new widgets
    return [slot.options["default"] for slot in missing]


def _fits(slot, value):
    """Whether a saved value can be this widget's (a file list's choices depend on the installation: not read)."""
    if slot.input is None:
        return not slot.choices or value in slot.choices
    return slot.input in FILE_FOLDERS or check_value(slot, value) is None


def set_widget(node, definition, name, value):
    """Set the widget input ``name`` of a UI node (as the user would in the web UI)."""
    if isinstance(node.get("widgets_values"), dict):
        node["widgets_values"][name] = value
        return
    slots = widgets(definition)
    index = next((i for i, slot in enumerate(slots) if slot.input == name), None)
    if index is None:
        raise WorkflowError(f"{_describe(node)} has no widget '{name}' (it has: "
                            f"{', '.join(s.input for s in slots if s.input)})")
    widget_values(node, definition)  # the same count check as for reading
    node["widgets_values"] += _defaults_of_later_widgets(node["widgets_values"], slots, definition)
    node["widgets_values"][index] = value


def check_value(widget: Widget, value):
    """Why ``value`` is not valid for this widget input, or None when it is."""
    options = widget.options or {}
    if widget.kind == "COMBO":
        if value in widget.choices:
            return None
        if widget.input in FILE_FOLDERS:
            return (f"'{value}' is not in this ComfyUI: put the file in ComfyUI/{FILE_FOLDERS[widget.input]}/ "
                    f"(or choose one you have in the node), then run it again.{FILE_HINTS.get(widget.input, '')}")
        shown = ", ".join(map(str, widget.choices[:12])) + (", ..." if len(widget.choices) > 12 else "")
        return f"'{value}' is not one of its choices ({shown})"
    if widget.kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not true or false"
    if widget.kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not text"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{value!r} is not a number"
    if widget.kind == "INT" and value != int(value):
        return f"{value!r} is not a whole number"
    low, high = options.get("min", -math.inf), options.get("max", math.inf)
    if not low <= value <= high:
        return f"{value} is outside [{low}, {high}]"
    return None


def check(workflow: dict, object_info: dict, check_values=True) -> list[str]:
    """Every problem that would stop the workflow's nodes from loading (and, with ``check_values``, from validating)."""
    problems = []
    for node in workflow.get("nodes", ()):
        kind = node.get("type")
        if kind in UI_ONLY_NODES:
            continue
        if kind not in object_info:
            problems.append(_missing_node(node, workflow))
            continue
        definition = object_info[kind]
        try:
            values = widget_values(node, definition)
        except WorkflowError as error:
            problems.extend(error.problems)
            continue
        for slot in widgets(definition) if check_values else ():
            if slot.input in values:
                reason = check_value(slot, values[slot.input])
                if reason:
                    problems.append(f"{_describe(node, object_info)}: {slot.input} {reason}")
        if check_values and isinstance(node.get("widgets_values"), list):
            for slot, value in zip(widgets(definition), node["widgets_values"]):
                # the frontend's own widgets: a value out of place here means the values after it moved
                if slot.input is None and slot.choices and value not in slot.choices:
                    problems.append(f"{_describe(node, object_info)}: {slot.name} {value!r} is not one of its "
                                    f"choices ({', '.join(slot.choices)}): a widget value is missing or out of "
                                    "place; open the workflow in the web UI, check the node's values, and save "
                                    "it again")
    return problems


class _Links:
    """The ``links`` table, resolved through the UI-only and bypassed nodes."""

    def __init__(self, workflow):
        self.nodes = {node["id"]: node for node in workflow.get("nodes", ())}
        self.links = {}
        for link in workflow.get("links", ()):
            if isinstance(link, dict):  # the frontend's newer serialisation
                link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                        link.get("type")]
            self.links[link[0]] = link

    def origin(self, link_id, seen=()):
        """(node id, output slot) that really feeds this link, "primitive", or None (muted or dangling)."""
        link = self.links.get(link_id)
        if link is None or link_id in seen:
            return None
        node = self.nodes.get(link[1])
        if node is None or node.get("mode") == MUTED:
            return None
        if node.get("type") == "PrimitiveNode":
            return "primitive"
        if node.get("type") == "Reroute" or node.get("mode") == BYPASSED:
            kind = link[5]
            for slot in node.get("inputs") or ():
                if slot.get("link") is not None and (node.get("type") == "Reroute" or slot.get("type") in (kind, "*")):
                    return self.origin(slot["link"], seen + (link_id,))
            return None
        return str(link[1]), link[2]


def to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt of a UI workflow, named by this installation's node definitions."""
    problems = check(workflow, object_info, check_values=False)
    if problems:
        raise WorkflowError(problems)
    links = _Links(workflow)
    prompt = {}
    for node in workflow.get("nodes", ()):
        kind = node.get("type")
        if kind in UI_ONLY_NODES or node.get("mode") in (MUTED, BYPASSED):
            continue
        inputs = widget_values(node, object_info[kind])
        for slot in node.get("inputs") or ():
            if slot.get("link") is None:
                continue
            name = (slot.get("widget") or {}).get("name", slot["name"])
            origin = links.origin(slot["link"])
            if origin == "primitive":
                continue  # the UI mirrors a primitive's value into the target widget
            if origin is None:
                inputs.pop(name, None)
            else:
                inputs[name] = list(origin)
        title = node.get("title") or object_info[kind].get("display_name") or kind
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs, "_meta": {"title": title}}
    return prompt
