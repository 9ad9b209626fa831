"""Tier 2: every shipped workflow file in a real ComfyUI v0.15.1, through /prompt and through the headless runner.

The model files are random-weight files in the real formats under the names the
workflows use (tests/tier2.py). Images are sampled at 64 px with 2 steps: the
point is that the graphs run in the real engine, not what they draw.
With ``DREAMTUNER_BROWSER_PYTHON`` (a Python with ``playwright``) and Chromium at
/usr/bin/chromium, each workflow is also loaded into the real web page and the
frontend's own conversion is compared with the runner's.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

import tier2
from comfyui_dreamtuner.headless import workflow as wf
from workflow_defs import ROOT, SNAPSHOT, WORKFLOWS, core_types, without_files, without_page_previews

pytestmark = tier2.needs_comfyui
NAMES = [path.stem for path in WORKFLOWS]
RUNNER = [sys.executable, str(ROOT / "scripts" / "run_workflow.py")]
SDXL = "dreamtuner_3_sdxl_training_free"
VIDEO, FLUX = "dreamtuner_7_video_pose_sequence", "dreamtuner_8_flux_reference"
FLUX_FILES = ("flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors")
NO_FLUX_FILES = ("tier 2 has no Flux model files in the real formats yet (a full-width Flux.1 file is tens of GB; "
                 "a reduced-depth one is issue 21's remaining work): workflow 8 is checked for loading only")
OWN_VIDEO_TEST = "workflow 7 writes frames and a video: test_the_video_workflow_runs_through_prompt runs it"
BROWSER_PYTHON = os.environ.get("DREAMTUNER_BROWSER_PYTHON")


def small(workflow, object_info, size=64, steps=2):
    """The workflow with a small output size and few steps, set in its widgets as a user would."""
    for node in workflow["nodes"]:
        definition = object_info.get(node["type"])
        names = {w.input for w in wf.widgets(definition)} if definition else set()
        for name, value in (("width", size), ("height", size), ("steps", steps)):
            if name in names:
                wf.set_widget(node, definition, name, value)
    return workflow


def test_the_core_node_definitions_the_tier1_tests_use_are_this_comfyuis(comfyui):
    live = comfyui.object_info()
    current = {t: without_files(live[t]) for t in core_types()}
    if os.environ.get("DREAMTUNER_UPDATE_NODE_DEFS"):
        SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    assert current == json.loads(SNAPSHOT.read_text())


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_the_workflow_loads_with_valid_widgets_in_real_comfyui(comfyui, path):
    object_info = comfyui.object_info()
    workflow = wf.load(path)
    problems = wf.check(workflow, object_info)
    if path.stem == FLUX:  # every node and widget is there; only the Flux model files are missing (NO_FLUX_FILES)
        assert len(problems) == len(FLUX_FILES) and all(
            any(f"'{name}' is not in this ComfyUI" in p for p in problems) for name in FLUX_FILES), problems
    else:
        assert problems == []
    assert not [n["type"] for n in workflow["nodes"] if object_info.get(n["type"], {}).get("deprecated")]


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_the_workflow_runs_through_prompt_and_saves_an_image_of_the_requested_size(comfyui, path, tmp_path):
    if path.stem in (VIDEO, FLUX):
        pytest.skip(OWN_VIDEO_TEST if path.stem == VIDEO else NO_FLUX_FILES)
    object_info = comfyui.object_info()
    workflow = small(wf.load(path), object_info, size=64)
    for node in workflow["nodes"]:
        if node["type"] == "EmptyLatentImage":
            wf.set_widget(node, object_info[node["type"]], "width", 96)  # not square: width and height kept apart
    if path.stem == SDXL:
        tier2.free_memory(comfyui)  # an SDXL UNet in fp32 on the CPU takes 10 GB
    prompt = wf.to_api(workflow, object_info)
    entry = tier2.run(comfyui, prompt)
    (save_id,) = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
    with tier2.saved_image(comfyui, entry, save_id, tmp_path) as image:
        assert image.size == (96, 64)
    if path.stem == SDXL:
        tier2.free_memory(comfyui)


def test_the_video_workflow_runs_through_prompt_and_saves_the_frames_and_a_video(comfyui, tmp_path):
    """Workflow 7 as shipped, at 96x64 px, 2 steps and 3 of the sample video's 8 pose frames (set in its widgets
    as a user would): three frames of that size, and a video of three frames at the pose video's frame rate
    (linked from GetVideoComponents)."""
    object_info = comfyui.object_info()
    workflow = small(wf.load(ROOT / "example_workflows" / f"{VIDEO}.json"), object_info, size=64)
    for node in workflow["nodes"]:
        definition = object_info.get(node["type"])
        if node["type"] in ("DreamTunerVideoSequence", "ImageScale"):
            wf.set_widget(node, definition, "width", 96)
        if node["type"] == "DreamTunerVideoSequence":
            wf.set_widget(node, definition, "frames", 3)
        if node["type"] == "ImageFromBatch":
            wf.set_widget(node, definition, "length", 3)
    prompt = wf.to_api(workflow, object_info)
    entry = tier2.run(comfyui, prompt)
    (frames_id,) = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
    (video_id,) = [k for k, v in prompt.items() if v["class_type"] == "SaveVideo"]
    from PIL import Image

    frames = entry["outputs"][frames_id]["images"]
    assert len(frames) == 3
    for frame in frames:
        with Image.open(comfyui.download(frame, tmp_path / "frames")) as image:
            assert image.size == (96, 64)
    (video,) = next(v for v in entry["outputs"][video_id].values() if isinstance(v, list) and v
                    and isinstance(v[0], dict))
    path = comfyui.download(video, tmp_path / "video")
    probe = ("import av, sys; c = av.open(sys.argv[1]); s = c.streams.video[0]; "
             "n = sum(1 for _ in c.decode(video=0)); print(n, s.width, s.height, float(s.average_rate))")
    counted = subprocess.run([tier2.python(), "-c", probe, str(path)], capture_output=True, text=True, check=True)
    assert counted.stdout.split() == ["3", "96", "64", "8.0"], counted.stdout


def _runner(*args, timeout=900):
    return subprocess.run([*RUNNER, *args], capture_output=True, text=True, timeout=timeout)


def _finetune_id(path):
    return next((n["id"] for n in wf.load(path)["nodes"] if n["type"] == "DreamTunerFinetune"), None)


def _with_ctrl_c():
    """In the runner's process, before Python starts: SIGINT as a terminal gives it (a test run started in the
    background by a shell without job control inherits it ignored, and Python then installs no Ctrl-C handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_the_runner_default_starts_comfyui_and_runs_workflow_1_on_the_sample_subject(comfyui, tmp_path):
    tier2.free_memory(comfyui)  # this starts a second ComfyUI
    result = _runner("--comfyui", tier2.COMFYUI_PATH, "--python", tier2.python(), "--cpu",
                     *[f"--comfy-arg={a}" for a in tier2.server_args(comfyui.base)[1:]],
                     "--size", "64x64", "--steps", "2", "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DreamTunerInterleavedCFGSampler" in result.stdout or "InterleavedCFGSampler" in result.stdout
    assert "2/2 [" in result.stdout  # the sampler's progress bar
    (written,) = (tmp_path / "out").iterdir()
    from PIL import Image

    with Image.open(written) as image:
        assert image.size == (64, 64)
        assert json.loads(image.info["workflow"])["nodes"]  # drops back onto the canvas


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_the_runner_runs_the_workflow_and_writes_an_image_of_the_requested_size(comfyui, path, tmp_path):
    if path.stem in (VIDEO, FLUX):
        pytest.skip(OWN_VIDEO_TEST if path.stem == VIDEO else NO_FLUX_FILES)
    if path.stem == SDXL:
        tier2.free_memory(comfyui)
    # Workflow 6 ships with overwrite off: the /prompt test above trained its subject at another size, so this
    # run (other inputs) retrains under that name only when the user turns it on.
    retrain = [f"--set={_finetune_id(path)}.overwrite=true"] if _finetune_id(path) else []
    result = _runner("--server", comfyui.url, "--workflow", str(path), "--size", "64x96", "--steps", "2",
                     *retrain, "--output", str(tmp_path / "out"))
    if path.stem == SDXL:
        tier2.free_memory(comfyui)
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = (tmp_path / "out").iterdir()
    from PIL import Image

    with Image.open(written) as image:
        assert image.size == (64, 96)


def test_the_runner_on_a_running_server_with_image_mask_prompt_and_seed(comfyui, tmp_path):
    from PIL import Image, ImageDraw

    subject = tmp_path / "my_subject.jpg"
    Image.new("RGB", (120, 80), (30, 120, 200)).save(subject)
    mask = tmp_path / "my_mask.png"
    picture = Image.new("L", (60, 40), 0)
    ImageDraw.Draw(picture).ellipse((15, 5, 45, 35), fill=255)
    picture.save(mask)
    users_own = comfyui.base / "input" / "my_subject_masked.png"  # the name the masked upload once had
    users_own.write_bytes((ROOT / "example_workflows" / "inputs" / "dreamtuner_depth.png").read_bytes())
    result = _runner("--server", comfyui.url, "--workflow", str(ROOT / "example_workflows" / f"{NAMES[1]}.json"),
                     "--image", str(subject), "--mask", str(mask), "--prompt", "a blue toy on the moon",
                     "--seed", "5", "--steps", "2", "--size", "64x80", "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = (tmp_path / "out").iterdir()
    with Image.open(written) as image:
        assert image.size == (64, 80)
        prompt = json.loads(image.info["prompt"])  # what the engine ran
    by_title = {v.get("_meta", {}).get("title"): v["inputs"] for v in prompt.values()}
    assert by_title["Positive prompt"]["text"] == "a blue toy on the moon"
    name = by_title["Subject (PNG with a transparent background)"]["image"]
    assert re.fullmatch(r"dreamtuner_runner/my_subject_masked-[0-9a-f]{12}\.png", name)
    assert users_own.read_bytes() == (ROOT / "example_workflows" / "inputs" / "dreamtuner_depth.png").read_bytes()
    stored = (comfyui.base / "input" / name).read_bytes()
    assert name.endswith(f"-{hashlib.sha256(stored).hexdigest()[:12]}.png")
    uploaded = Image.open(comfyui.base / "input" / name)
    assert uploaded.mode == "RGBA" and uploaded.getpixel((60, 40))[3] == 255 and uploaded.getpixel((2, 2))[3] == 0
    assert [v["inputs"]["seed"] for v in prompt.values() if "seed" in v["inputs"]] == [5]


def test_the_runner_reports_a_missing_model_and_a_missing_node_one_line_each(comfyui, tmp_path):
    workflow = wf.load(WORKFLOWS[3])
    workflow["nodes"][1]["widgets_values"][0] = "not_here.safetensors"
    workflow["nodes"].append({"id": 99, "type": "SomeoneElsesUpscaler", "title": "Upscale", "mode": 0,
                              "inputs": [], "outputs": [], "widgets_values": [2]})
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(workflow))
    result = _runner("--server", comfyui.url, "--workflow", str(path), "--output", str(tmp_path / "out"))
    assert result.returncode == 1 and not (tmp_path / "out").exists()
    assert result.stderr.splitlines() == [
        "error: node #99 'Upscale' (SomeoneElsesUpscaler) is not installed in this ComfyUI: install the custom node "
        "pack that provides 'SomeoneElsesUpscaler' (ComfyUI-Manager: Install Missing Custom Nodes) and restart "
        "ComfyUI"]
    workflow["nodes"].pop()
    path.write_text(json.dumps(workflow))
    result = _runner("--server", comfyui.url, "--workflow", str(path), "--output", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: node #2 'Load Checkpoint' (CheckpointLoaderSimple): ckpt_name 'not_here.safetensors' is not in this "
        "ComfyUI: put the file in ComfyUI/models/checkpoints/ (or choose one you have in the node), then run it "
        "again."]


def test_the_runner_reports_a_failing_node_in_one_line(comfyui, tmp_path):
    ssa = next(n for n in wf.load(WORKFLOWS[3])["nodes"] if n["type"] == "DreamTunerSelfSubjectAttention")
    result = _runner("--server", comfyui.url, "--workflow", str(WORKFLOWS[3]), "--steps", "2", "--size", "64x64",
                     "--set", f"{ssa['id']}.start_percent=0.9", "--set", f"{ssa['id']}.end_percent=0.1",
                     "--output", str(tmp_path / "out"))
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: node #{ssa['id']} 'Self-Subject-Attention (DreamTuner)' "
                           "(DreamTunerSelfSubjectAttention) failed: ") and "start_percent" in line


def test_ctrl_c_stops_the_run_on_the_server_too(comfyui, tmp_path):
    process = subprocess.Popen([*RUNNER, "--server", comfyui.url, "--workflow", str(WORKFLOWS[3]), "--steps", "500",
                                "--size", "64x64", "--output", str(tmp_path / "out")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_with_ctrl_c)
    for line in process.stdout:
        if "SamplerCustomAdvanced" in line:  # sampling has started
            break
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in err
    deadline = time.time() + 30
    while comfyui.get("/queue")["queue_running"] and time.time() < deadline:
        time.sleep(0.5)
    assert comfyui.get("/queue") == {"queue_running": [], "queue_pending": []}
    assert not (tmp_path / "out").exists()


def _children(pid):
    """The ids of the processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_mid_run_stops_the_comfyui_the_runner_started_and_all_its_processes(comfyui, tmp_path):
    tier2.free_memory(comfyui)  # this starts a second ComfyUI
    process = subprocess.Popen([*RUNNER, "--comfyui", tier2.COMFYUI_PATH, "--python", tier2.python(), "--cpu",
                                *[f"--comfy-arg={a}" for a in tier2.server_args(comfyui.base)[1:]],
                                "--workflow", str(WORKFLOWS[3]), "--steps", "500", "--size", "64x64",
                                "--output", str(tmp_path / "out")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    group = None
    try:
        for line in process.stdout:
            if "SamplerCustomAdvanced" in line:  # sampling has started
                break
        (started,) = _children(process.pid)
        group = os.getpgid(started)
        assert group != os.getpgid(process.pid)  # a group of its own, ended as a whole
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=90)
        assert process.returncode == 128 + signal.SIGTERM and "interrupted (SIGTERM)" in err
        deadline = time.time() + 10
        while _group_alive(group) and time.time() < deadline:
            time.sleep(0.2)
        assert not _group_alive(group), "a process of the ComfyUI the runner started is still running"
    finally:
        if process.poll() is None:
            process.kill()
        if group is not None and _group_alive(group):
            os.killpg(group, signal.SIGKILL)


def _queue(comfyui):
    return {kind: [item[1] for item in items] for kind, items in comfyui.get("/queue").items()}


def _wait_idle(comfyui, timeout):
    deadline = time.time() + timeout
    while _queue(comfyui) != {"queue_running": [], "queue_pending": []}:
        if time.time() > deadline:
            return False
        time.sleep(0.5)
    return True


def test_a_timeout_cancels_the_run_whether_queued_or_running_and_nothing_else(comfyui, tmp_path):
    object_info = comfyui.object_info()
    other = comfyui.queue(wf.to_api(small(wf.load(WORKFLOWS[3]), object_info, steps=500), object_info))
    try:  # the runner's run waits behind another client's: it is taken off the queue, the other one runs on
        result = _runner("--server", comfyui.url, "--workflow", str(WORKFLOWS[3]), "--steps", "2", "--size", "64x64",
                         "--timeout", "3", "--output", str(tmp_path / "out"))
        assert result.returncode == 1 and "did not finish within 3.0 s" in result.stderr
        assert _queue(comfyui) == {"queue_running": [other], "queue_pending": []}
    finally:
        comfyui.interrupt(other)
    assert _wait_idle(comfyui, 60)
    result = _runner("--server", comfyui.url, "--workflow", str(WORKFLOWS[3]), "--steps", "500", "--size", "64x64",
                     "--timeout", "8", "--output", str(tmp_path / "out"))  # now it runs when the time is up
    assert result.returncode == 1 and "did not finish within 8.0 s" in result.stderr
    assert _wait_idle(comfyui, 60)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not BROWSER_PYTHON or not pathlib.Path("/usr/bin/chromium").exists(),
                    reason="DREAMTUNER_BROWSER_PYTHON (a Python with playwright) and /usr/bin/chromium are needed "
                           "to load the workflows into the real web page")
def test_the_web_page_loads_every_workflow_and_converts_it_as_the_runner_does(comfyui, tmp_path):
    command = [BROWSER_PYTHON, str(ROOT / "scripts" / "ui_snapshot.py"), "--url", comfyui.url, "--out-dir",
               str(tmp_path)] + [arg for path in WORKFLOWS for arg in ("--workflow", str(path))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    object_info = comfyui.object_info()
    for path in WORKFLOWS:
        assert " missing=0 " in next(line for line in result.stdout.splitlines() if path.name in line)
        frontend = without_page_previews(json.loads((tmp_path / f"{path.stem}.api.json").read_text()), object_info)
        ours = wf.to_api(wf.load(path), object_info)
        recorded = without_page_previews(json.loads((ROOT / "tests" / "data" / "frontend_api" / path.name)
                                                    .read_text()), object_info)
        strip = lambda prompt: {k: (v["class_type"], v["inputs"], v["_meta"]) for k, v in prompt.items()}  # noqa: E731
        assert strip(ours) == strip(frontend) == strip(recorded), path.name
