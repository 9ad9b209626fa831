"""The shipped workflow files, and the conversion from the web UI's format to the engine's (tier 1: no server).

The reference for the conversion is ComfyUI's own frontend: ``tests/data/frontend_api``
holds what its ``graphToPrompt`` made of each workflow (recorded with
``scripts/ui_snapshot.py``; the tier-2 tests redo it live).
"""

import copy
import json

import pytest

from comfyui_dreamtuner.headless import workflow as wf
from workflow_defs import ROOT, WORKFLOWS, installation, without_page_previews

DEFS = installation()
NAMES = [path.stem for path in WORKFLOWS]


# The folders ComfyUI v0.15.1 lists a pack's templates from (app/custom_node_manager.py): each one shown there.
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")


def test_there_are_the_eight_workflows_each_once_in_the_template_browser_with_its_thumbnail():
    assert len(WORKFLOWS) == 8 and {p.parent.name for p in WORKFLOWS} == {"example_workflows"}
    listed = [p.stem for folder in TEMPLATE_FOLDERS for p in (ROOT / folder).glob("*.json")]
    assert sorted(listed) == NAMES  # once each: no second folder the host also reads
    for path in WORKFLOWS:
        assert path.with_suffix(".jpg").is_file(), f"{path.name} has no thumbnail"


def _builder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "scripts" / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_the_workflow_file_is_what_the_builder_writes_from_the_node_definitions(path):
    """A file edited by hand, or left behind by a change of a node's inputs, fails here: rebuild it with
    scripts/build_workflows.py (and record the frontend's conversion again)."""
    builder = _builder()
    build = builder.WORKFLOWS[path.stem.removeprefix("dreamtuner_")]
    assert json.loads(json.dumps(build(installation()))) == json.loads(path.read_text())


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_the_workflow_uses_only_core_and_pack_nodes_with_valid_widget_values(path):
    workflow = wf.load(path)
    assert workflow["version"] == 0.4 and workflow["links"]
    assert wf.check(workflow, DEFS) == []
    assert not [n["type"] for n in workflow["nodes"] if DEFS.get(n["type"], {}).get("deprecated")]


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_the_workflow_has_a_note_saying_what_to_change_and_which_model_files(path):
    workflow = wf.load(path)
    (note,) = [n for n in workflow["nodes"] if n["type"] == "MarkdownNote"]
    text = note["widgets_values"][0]
    files = {v for n in workflow["nodes"] for v in n.get("widgets_values") or () if str(v).endswith(".safetensors")}
    assert files and all(name in text for name in files), files


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_the_conversion_gives_what_the_comfyui_frontend_gives(path):
    recorded = ROOT / "tests" / "data" / "frontend_api" / path.name
    if not recorded.exists():
        pytest.skip(f"no frontend recording of {path.name} yet: record it with scripts/ui_snapshot.py")
    ours = wf.to_api(wf.load(path), DEFS)
    frontend = without_page_previews(json.loads(recorded.read_text()), DEFS)
    assert {k: (v["class_type"], v["inputs"], v["_meta"]) for k, v in ours.items()} == \
           {k: (v["class_type"], v["inputs"], v["_meta"]) for k, v in frontend.items()}


def test_the_only_page_preview_value_dropped_is_load_videos_and_it_is_no_input_of_the_node():
    recorded = {}
    for path in WORKFLOWS:
        recorded.update({f"{path.stem}:{k}": v for k, v in
                         json.loads((ROOT / "tests" / "data" / "frontend_api" / path.name).read_text()).items()})
    kept = without_page_previews(recorded, DEFS)
    dropped = {(v["class_type"], name) for key, v in recorded.items() for name in set(v["inputs"]) - set(kept[key]["inputs"])}
    assert dropped == {("LoadVideo", "video-preview")}
    assert "video-preview" not in dict(wf.spec_inputs(DEFS["LoadVideo"]))


def test_every_widget_the_frontend_adds_has_its_place_in_widgets_values():
    """The frontend (1.39, ComfyUI v0.15.1) draws a 'control after generate' combo after every INT named seed or
    noise_seed unless its spec says control_after_generate False, after an INT, FLOAT or COMBO whose spec asks for
    one, and a filter text after a COMBO's; each is saved in widgets_values."""
    def names(spec_by_name):
        definition = {"input": {"required": spec_by_name}, "input_order": {"required": list(spec_by_name)}}
        return [w.name for w in wf.widgets(definition)]

    assert names({"seed": ("INT", {"min": 0}), "steps": ("INT", {})}) == ["seed", "control_after_generate", "steps"]
    assert names({"noise_seed": ("INT", {}), "x": ("FLOAT", {})}) == ["noise_seed", "control_after_generate", "x"]
    assert names({"seed": ("INT", {"control_after_generate": False})}) == ["seed"]
    assert names({"n": ("INT", {"control_after_generate": True})}) == ["n", "control_after_generate"]
    assert names({"strength": ("FLOAT", {"control_after_generate": True})}) == ["strength", "control_after_generate"]
    assert names({"pick": (["a", "b"], {"control_after_generate": True})}) == \
           ["pick", "control_after_generate", "control_filter_list"]
    assert names({"seed": ("FLOAT", {})}) == ["seed"]  # only an INT gets one by its name


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_every_seed_of_a_workflow_is_followed_by_its_control_value(path):
    workflow = wf.load(path)
    seeds = 0
    for node in workflow["nodes"]:
        if node["type"] not in DEFS or node["type"] in wf.UI_ONLY_NODES:
            continue
        slots = wf.widgets(DEFS[node["type"]])
        for index, slot in enumerate(slots):
            if slot.input in ("seed", "noise_seed"):
                assert slots[index + 1].name == "control_after_generate", (node["type"], slot.input)
                assert node["widgets_values"][index + 1] == "fixed", (node["id"], node["widgets_values"])
                seeds += 1
    assert seeds >= 1


def _finetune_node(workflow):
    return next(n for n in workflow["nodes"] if n["type"] == "DreamTunerFinetune")


def test_a_missing_or_shifted_widget_value_is_caught():
    path = next(p for p in WORKFLOWS if p.stem == "dreamtuner_6_finetune_then_generate")
    slots = wf.widgets(DEFS["DreamTunerFinetune"])
    control = next(i for i, s in enumerate(slots) if s.name == "control_after_generate")
    # the file as it once shipped: the seed's control value missing, every later value one place early
    missing = wf.load(path)
    del _finetune_node(missing)["widgets_values"][control]
    (problem,) = wf.check(missing, DEFS)
    assert "DreamTunerFinetune" in problem and f"has {len(slots) - 1} widget values" in problem
    # the same count, but the control value one place late: caught where the values land
    shifted = wf.load(path)
    values = _finetune_node(shifted)["widgets_values"]
    values.insert(control + 1, values.pop(control))
    problems = wf.check(shifted, DEFS)
    assert any("control_after_generate" in p and "is not one of" in p for p in problems), problems
    # a control value that is not one of the frontend's
    wrong = wf.load(path)
    _finetune_node(wrong)["widgets_values"][control] = "sometimes"
    assert any("control_after_generate 'sometimes' is not one of its choices (fixed, increment, decrement, "
               "randomize)" in p for p in wf.check(wrong, DEFS))


def test_the_finetune_workflow_ships_with_overwrite_off():
    path = next(p for p in WORKFLOWS if p.stem == "dreamtuner_6_finetune_then_generate")
    node = _finetune_node(wf.load(path))
    assert wf.widget_values(node, DEFS["DreamTunerFinetune"])["overwrite"] is False


def test_the_sample_images_are_small_cut_outs():
    from PIL import Image

    for name in ("dreamtuner_subject.png", "dreamtuner_subject_turned.png"):
        path = ROOT / "example_workflows" / "inputs" / name
        assert path.stat().st_size < 20_000
        with Image.open(path) as image:
            alpha = image.getchannel("A")
            assert image.mode == "RGBA" and max(image.size) <= 256
            assert alpha.getextrema() == (0, 255)  # a transparent background and an opaque subject


# The conversion rules, on small hand-made graphs.

def _node(node_id, kind, widgets=None, inputs=(), mode=0, title=None):
    node = {"id": node_id, "type": kind, "mode": mode, "inputs": [dict(i) for i in inputs], "outputs": [],
            "widgets_values": widgets}
    if title:
        node["title"] = title
    return node


def _graph(nodes, links):
    return {"nodes": nodes, "links": links, "version": 0.4}


def _ksampler_graph():
    nodes = [
        _node(1, "CheckpointLoaderSimple", ["v1-5-pruned-emaonly-fp16.safetensors"]),
        _node(2, "EmptyLatentImage", [64, 48, 1]),
        _node(3, "KSamplerSelect", ["euler"]),
        _node(4, "RandomNoise", [77, "randomize"]),
        _node(5, "Reroute", inputs=[{"name": "", "type": "*", "link": 1}]),
        _node(6, "BasicScheduler", ["karras", 9, 1.0], inputs=[{"name": "model", "type": "MODEL", "link": 2}]),
        _node(7, "Note", ["read me"]),
    ]
    links = [[1, 1, 0, 5, 0, "MODEL"], [2, 5, 0, 6, 0, "MODEL"]]
    return _graph(nodes, links)


def test_a_seed_control_value_is_not_an_input_and_a_reroute_is_followed_to_its_origin():
    prompt = wf.to_api(_ksampler_graph(), DEFS)
    assert prompt["4"] == {"class_type": "RandomNoise", "inputs": {"noise_seed": 77}, "_meta": {"title": "RandomNoise"}}
    assert prompt["6"]["inputs"] == {"scheduler": "karras", "steps": 9, "denoise": 1.0, "model": ["1", 0]}
    assert set(prompt) == {"1", "2", "3", "4", "6"}  # the Note and the Reroute exist only in the UI


def test_the_upload_button_value_of_load_image_is_not_an_input():
    graph = _graph([_node(1, "LoadImage", ["dreamtuner_subject.png", "image"])], [])
    assert wf.to_api(graph, DEFS)["1"]["inputs"] == {"image": "dreamtuner_subject.png"}


def test_a_bypassed_node_passes_its_input_of_the_same_type_and_a_muted_one_is_left_out():
    graph = _ksampler_graph()
    graph["nodes"][4] = _node(5, "DreamTunerSelfSubjectAttention", [3.0, 0.0, 1.0, "subject is 1", "all", 0],
                              inputs=[{"name": "model", "type": "MODEL", "link": 1},
                                      {"name": "reference", "type": "LATENT", "link": None}], mode=4)
    assert wf.to_api(graph, DEFS)["6"]["inputs"]["model"] == ["1", 0]
    graph["nodes"][4]["mode"] = 2
    prompt = wf.to_api(graph, DEFS)
    assert "5" not in prompt and "model" not in prompt["6"]["inputs"]


def test_an_input_fed_by_a_primitive_takes_the_value_kept_in_the_widget():
    graph = _ksampler_graph()
    graph["nodes"].append(_node(8, "PrimitiveNode", [12, "fixed"]))
    graph["nodes"][5]["inputs"].append({"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 3})
    graph["nodes"][5]["widgets_values"] = ["karras", 12, 1.0]
    graph["links"].append({"id": 3, "origin_id": 8, "origin_slot": 0, "target_id": 6, "target_slot": 1,
                           "type": "INT"})  # the frontend's newer link form
    assert wf.to_api(graph, DEFS)["6"]["inputs"]["steps"] == 12


def test_a_widget_input_fed_by_a_node_takes_the_link():
    graph = _ksampler_graph()
    graph["nodes"][3]["inputs"] = [{"name": "noise_seed", "type": "INT", "widget": {"name": "noise_seed"},
                                    "link": 4}]
    graph["nodes"].append(_node(9, "DreamTunerSelfSubjectAttention", [3.0, 0.0, 1.0, "subject is 1", "all", 0]))
    graph["links"].append([4, 9, 0, 4, 0, "INT"])
    assert wf.to_api(graph, DEFS)["4"]["inputs"]["noise_seed"] == ["9", 0]


def test_problems_are_reported_one_line_each_naming_the_node_and_the_fix():
    graph = _ksampler_graph()
    graph["nodes"][0]["widgets_values"] = ["missing.safetensors"]
    graph["nodes"][1]["widgets_values"] = [64, 48.5, 0]
    graph["nodes"][2]["widgets_values"] = ["not_a_sampler"]
    graph["nodes"].append(_node(10, "SomePackNode", [1], title="Upscale"))
    problems = wf.check(graph, DEFS)
    assert problems == [
        "node #1 'Load Checkpoint' (CheckpointLoaderSimple): ckpt_name 'missing.safetensors' is not in this ComfyUI: put the file in "
        "ComfyUI/models/checkpoints/ (or choose one you have in the node), then run it again.",
        "node #2 'Empty Latent Image' (EmptyLatentImage): height 48.5 is not a whole number",
        "node #2 'Empty Latent Image' (EmptyLatentImage): batch_size 0 is outside [1, 4096]",
        "node #3 (KSamplerSelect): sampler_name 'not_a_sampler' is not one of its choices (euler, euler_cfg_pp, "
        "euler_ancestral, euler_ancestral_cfg_pp, heun, heunpp2, exp_heun_2_x0, exp_heun_2_x0_sde, dpm_2, "
        "dpm_2_ancestral, lms, dpm_fast, ...)",
        "node #10 'Upscale' (SomePackNode) is not installed in this ComfyUI: install the custom node pack that "
        "provides 'SomePackNode' (ComfyUI-Manager: Install Missing Custom Nodes) and restart ComfyUI",
    ]
    with pytest.raises(wf.WorkflowError, match="SomePackNode"):
        wf.to_api(graph, DEFS)


def test_a_node_whose_inputs_changed_and_a_subgraph_are_named_with_the_fix():
    graph = _ksampler_graph()
    graph["nodes"][1]["widgets_values"] = [64, 48]
    graph["nodes"].append(_node(11, "7f0c-uuid", []))
    graph["definitions"] = {"subgraphs": [{"id": "7f0c-uuid"}]}
    problems = wf.check(graph, DEFS)
    assert "has 2 widget values where this ComfyUI's 'EmptyLatentImage' has 3 (width, height, batch_size)" \
           in problems[0] and "save it again" in problems[0]
    assert "is a subgraph" in problems[1] and "Unpack Subgraph" in problems[1]


def test_files_that_are_not_ui_workflows_are_refused_with_the_reason(tmp_path):
    api = tmp_path / "api.json"
    api.write_text(json.dumps({"1": {"class_type": "KSampler", "inputs": {}}}))
    with pytest.raises(wf.WorkflowError, match="API-format prompt"):
        wf.load(api)
    broken = tmp_path / "broken.json"
    broken.write_text('{"nodes": [')
    with pytest.raises(wf.WorkflowError, match="not a readable workflow JSON"):
        wf.load(broken)


def test_set_widget_writes_the_value_where_the_ui_keeps_it():
    graph = _ksampler_graph()
    node = graph["nodes"][3]
    wf.set_widget(node, DEFS["RandomNoise"], "noise_seed", 5)
    assert node["widgets_values"] == [5, "randomize"]
    with pytest.raises(wf.WorkflowError, match="has no widget 'seed'"):
        wf.set_widget(node, DEFS["RandomNoise"], "seed", 5)
    saved = copy.deepcopy(graph["nodes"][0])
    saved["widgets_values"] = {"ckpt_name": "a.safetensors"}  # some packs save a dict
    wf.set_widget(saved, DEFS["CheckpointLoaderSimple"], "ckpt_name", "b.safetensors")
    assert wf.widget_values(saved, DEFS["CheckpointLoaderSimple"]) == {"ckpt_name": "b.safetensors"}


def frontend_migration_drops(definition, values):
    """The indices of ``values`` the frontend (1.39, ``migrateWidgetsValues``) drops when it loads a node: it lists
    each input that is a widget or forceInput (a ``control_after_generate`` flag in the spec adds a slot) and, when
    that list is exactly as long as ``widgets_values``, drops the values at the forceInput places (values an older
    frontend saved for forceInput widgets)."""
    widget_names = {w.input for w in wf.widgets(definition) if w.input}
    slots = []
    for name, spec in wf.spec_inputs(definition):
        options = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
        if name in widget_names or options.get("forceInput"):
            slots += [bool(options.get("forceInput"))] + ([False] if options.get("control_after_generate") else [])
    return [i for i, forced in enumerate(slots) if forced] if len(slots) == len(values) else []


def test_the_frontend_migration_rule_as_recorded_from_the_real_page():
    """Recorded through the v0.15.1 page: with the seed's control implicit, DreamTunerFinetune's 14 values met the
    14 slots and the page dropped the value at full_unet_lr's place (overwrite's), reading mask_mode's into it."""
    definition = json.loads(json.dumps(DEFS["DreamTunerFinetune"]))
    values = next(n for n in wf.load(next(p for p in WORKFLOWS if p.stem.startswith("dreamtuner_6")))["nodes"]
                  if n["type"] == "DreamTunerFinetune")["widgets_values"]
    definition["input"]["required"]["seed"][1].pop("control_after_generate")
    assert frontend_migration_drops(definition, values) == [12]


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_the_frontend_keeps_every_widget_value_of_the_workflow(path):
    for node in wf.load(path)["nodes"]:
        if node["type"] in DEFS and node["type"] not in wf.UI_ONLY_NODES:
            assert frontend_migration_drops(DEFS[node["type"]], node.get("widgets_values") or []) == [], node["type"]


def test_a_workflow_saved_before_the_positions_widget_loads_as_the_page_loads_it():
    """Workflow 5 as it shipped before Self-Subject-Attention had ``positions`` (six widget values): the real
    v0.15.1 page (recorded with scripts/ui_snapshot.py) leaves the new widget at its default, and so does the
    runner; every older value stays in its place."""
    saved = wf.load(ROOT / "tests" / "data" / "saved_before_positions" / "dreamtuner_5_several_references.json")
    (node,) = [n for n in saved["nodes"] if n["type"] == "DreamTunerSelfSubjectAttention"]
    assert len(node["widgets_values"]) == len(wf.widgets(DEFS[node["type"]])) - 1
    assert wf.check(saved, DEFS) == []
    frontend = json.loads((ROOT / "tests" / "data" / "frontend_api" / "saved_before_positions" /
                           "dreamtuner_5_several_references.json").read_text())
    ours = wf.to_api(saved, DEFS)
    assert {k: (v["class_type"], v["inputs"]) for k, v in ours.items()} == \
           {k: (v["class_type"], v["inputs"]) for k, v in frontend.items()}
    assert ours[str(node["id"])]["inputs"]["positions"] == "offset"
    # set_widget on such a node writes where the page keeps the value
    wf.set_widget(node, DEFS[node["type"]], "positions", "shared")
    assert wf.widget_values(node, DEFS[node["type"]])["positions"] == "shared"
    assert wf.widget_values(node, DEFS[node["type"]])["blocks"] == "all"


def test_only_missing_optional_widgets_at_the_end_take_their_defaults():
    definition = DEFS["DreamTunerSelfSubjectAttention"]
    short = _node(1, "DreamTunerSelfSubjectAttention", [3.0, 0.0, 1.0, "subject is 1", "all"])  # seed, positions
    assert wf.widget_values(short, definition)["reference_seed"] == 0
    required_missing = _node(1, "DreamTunerSelfSubjectAttention", [3.0, 0.0])  # end_percent is required
    with pytest.raises(wf.WorkflowError, match="has 2 widget values"):
        wf.widget_values(required_missing, definition)
    shifted = _node(1, "DreamTunerSelfSubjectAttention", [3.0, 0.0, "subject is 1", "all", 0])  # one gone mid-way
    with pytest.raises(wf.WorkflowError, match="has 5 widget values"):
        wf.widget_values(shifted, definition)
