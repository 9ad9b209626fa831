"""Tier 2: the pack inside a real, current ComfyUI server (v0.15.1), driven through its HTTP API.

Needs ``COMFYUI_PATH`` (a ComfyUI checkout with its requirements installed) and,
optionally, ``COMFYUI_PYTHON`` (that installation's Python; default: this one).
The server runs on 127.0.0.1 with a throw-away ``--base-directory`` holding
``custom_nodes/comfyui-dreamtuner`` (a link to this repository), a random-weight
SD1.5 checkpoint made by that installation's own classes, and a subject image.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(
    not COMFYUI_PATH, reason="COMFYUI_PATH is not set: tier-2 tests need a ComfyUI v0.15.1 installation "
                             "(see README, 'Testing against a real ComfyUI')")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NODE = "DreamTunerSelfSubjectAttention"
CACHE = pathlib.Path(os.environ.get("DREAMTUNER_TIER2_CACHE", pathlib.Path.home() / ".cache" / "comfyui-dreamtuner"))


def _python():
    return os.environ.get("COMFYUI_PYTHON", sys.executable)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _post(url, payload):
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise AssertionError(f"/prompt refused the graph: {error.read().decode()}") from None


def _asset(kind, name):
    """A random-weight model file made by the ComfyUI under test (cached between runs)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / name
    if not path.exists():
        subprocess.run([_python(), str(ROOT / "tests" / "tier2_assets.py"), kind, str(path)],
                       cwd=COMFYUI_PATH, check=True, timeout=600)
    return path


def _untrained_encoder(folder):
    path = folder / "dreamtuner_sd15_untrained.safetensors"
    subprocess.run([_python(), str(ROOT / "scripts" / "make_untrained_encoder.py"), "--family", "sd15", "--out",
                    str(path)], cwd=COMFYUI_PATH, check=True, timeout=600)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui-base")
    for sub in ("custom_nodes", "models/checkpoints", "models/clip_vision", "models/dreamtuner", "models/controlnet",
                "models/loras", "input", "output", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "comfyui-dreamtuner").symlink_to(ROOT, target_is_directory=True)
    (base / "models" / "checkpoints" / "sd15-random.safetensors").symlink_to(
        _asset("sd15-checkpoint", "sd15-random.safetensors"))
    (base / "models" / "clip_vision" / "vit-h-random.safetensors").symlink_to(
        _asset("vit-h-clip-vision", "vit-h-random.safetensors"))
    (base / "models" / "controlnet" / "control-random.safetensors").symlink_to(
        _asset("sd15-controlnet", "sd15-controlnet-random.safetensors"))
    (base / "models" / "loras" / "lora-random.safetensors").symlink_to(_asset("sd15-lora", "sd15-lora-random.safetensors"))
    encoder = _untrained_encoder(base / "models" / "dreamtuner")
    # A second folder for encoders, given the way users do: extra_model_paths.yaml.
    extra = base / "elsewhere"
    extra.mkdir()
    (extra / "from_extra_paths.safetensors").symlink_to(encoder)
    (base / "extra_model_paths.yaml").write_text(f"mine:\n    dreamtuner: {extra}\n")
    from PIL import Image, ImageDraw

    subject = Image.new("RGBA", (96, 64), (0, 0, 0, 0))
    ImageDraw.Draw(subject).ellipse((24, 8, 72, 56), fill=(200, 60, 40, 255))
    subject.save(base / "input" / "subject.png")

    port = _free_port()
    log_path = base / "server.log"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
         "--database-url", "sqlite:///:memory:", "--extra-model-paths-config", str(base / "extra_model_paths.yaml")],
        cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if process.poll() is not None:
                raise AssertionError(f"ComfyUI exited at start-up:\n{log_path.read_text()[-4000:]}")
            try:
                _get(f"{url}/object_info/KSampler", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                if time.time() > deadline:
                    raise AssertionError(f"ComfyUI did not answer in 180 s:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.5)
        yield url, base, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _run(url, graph, timeout=600):
    prompt_id = _post(f"{url}/prompt", {"prompt": graph})["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = _get(f"{url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            entry = history[prompt_id]
            if entry["status"].get("status_str") == "success":
                return entry
            raise AssertionError(f"graph failed: {json.dumps(entry['status'], indent=1)[-4000:]}")
        time.sleep(0.5)
    raise AssertionError(f"graph did not finish in {timeout} s")


PACK_NODES = {
    NODE: "Self-Subject-Attention (DreamTuner)",
    "DreamTunerInterleavedCFGSampler": "InterleavedCFGSampler (DreamTuner)",
    "DreamTunerInterleavedCFGGuider": "InterleavedCFGGuider (DreamTuner)",
    "DreamTunerSubjectEncoderLoader": "SubjectEncoderLoader (DreamTuner)",
    "DreamTunerApplySubjectEncoder": "ApplySubjectEncoder (DreamTuner)",
}


def test_the_pack_loads_without_import_errors_and_shows_its_tooltips(server):
    url, _, log_path = server
    everything = _get(f"{url}/object_info")
    for name, display in PACK_NODES.items():
        info = everything[name]
        assert info["display_name"] == display and info["category"] == "DreamTuner"
        inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
        assert all(len(spec[1].get("tooltip", "")) > 20 for spec in inputs.values()), name
        assert info["description"] and len(info["output_tooltips"]) == len(info["output"])
    log = log_path.read_text()
    assert "IMPORT FAILED" not in log
    pack_lines = [line for line in log.splitlines() if "dreamtuner" in line.lower()
                  and any(word in line for word in ("Error", "Traceback", "WARNING", "Warning"))]
    assert not pack_lines, pack_lines


def ssa_graph(mask_input=True, size=64, steps=3):
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15-random.safetensors"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a photo of a red ball on a beach"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "subject": {"class_type": "LoadImage", "inputs": {"image": "subject.png"}},
        "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["subject", 0], "vae": ["ckpt", 2]}},
        "ssa": {"class_type": NODE, "inputs": {
            "model": ["ckpt", 0], "reference": ["encode", 0], "omega_ref": 3.0, "start_percent": 0.0,
            "end_percent": 1.0, "mask_mode": "background is 1 (LoadImage alpha)", "blocks": "all",
            "reference_seed": 0}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["ssa", 0], "seed": 1, "steps": steps, "cfg": 6.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0],
            "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "dreamtuner_ssa"}},
    }
    if mask_input:
        graph["ssa"]["inputs"]["reference_mask"] = ["subject", 1]
    return graph


def test_checkpoint_ssa_ksampler_graph_completes_through_prompt(server):
    url, base, _ = server
    entry = _run(url, ssa_graph())
    images = entry["outputs"]["save"]["images"]
    assert len(images) == 1
    from PIL import Image

    with Image.open(base / "output" / images[0].get("subfolder", "") / images[0]["filename"]) as image:
        assert image.size == (64, 64)


def test_bad_input_is_reported_by_the_server_with_the_fix(server):
    url, _, _ = server
    graph = ssa_graph()
    graph["ssa"]["inputs"]["start_percent"] = 0.9
    graph["ssa"]["inputs"]["end_percent"] = 0.1
    with pytest.raises(AssertionError, match="start_percent"):
        _run(url, graph)


def test_ssa_with_the_interleaved_cfg_sampler_completes(server):
    url, _, _ = server
    graph = ssa_graph()
    sample = graph.pop("sample")["inputs"]
    graph["sample"] = {"class_type": "DreamTunerInterleavedCFGSampler", "inputs": {
        **sample, "w_r": 6.0, "p_r": 0.9, "delta_t": 10, "delta_t_prime": 10}}
    entry = _run(url, graph)
    assert len(entry["outputs"]["save"]["images"]) == 1


def test_the_interleaved_guider_with_sampler_custom_advanced_completes(server):
    url, _, _ = server
    graph = ssa_graph()
    graph.pop("sample")
    graph.update({
        "guider": {"class_type": "DreamTunerInterleavedCFGGuider", "inputs": {
            "model": ["ssa", 0], "positive": ["pos", 0], "negative": ["neg", 0], "cfg": 6.0, "w_r": 6.0,
            "p_r": 0.9, "delta_t": 0, "delta_t_prime": 0}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["ssa", 0], "scheduler": "karras",
                                                              "steps": 3, "denoise": 1.0}},
        "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["empty", 0]}},
    })
    entry = _run(url, graph)
    assert len(entry["outputs"]["save"]["images"]) == 1


def test_the_encoder_folder_is_registered_and_lists_the_file(server):
    url, _, _ = server
    info = _get(f"{url}/object_info/DreamTunerSubjectEncoderLoader")["DreamTunerSubjectEncoderLoader"]
    assert sorted(info["input"]["required"]["encoder_name"][0]) == [
        "dreamtuner_sd15_untrained.safetensors", "from_extra_paths.safetensors"]


def test_clip_vision_encoder_and_ssa_graph_completes(server):
    url, _, _ = server
    graph = ssa_graph()
    graph.update({
        "clip_vision": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "vit-h-random.safetensors"}},
        "encoder": {"class_type": "DreamTunerSubjectEncoderLoader", "inputs": {
            "encoder_name": "dreamtuner_sd15_untrained.safetensors"}},
        "apply": {"class_type": "DreamTunerApplySubjectEncoder", "inputs": {
            "model": ["ckpt", 0], "subject_encoder": ["encoder", 0], "clip_vision": ["clip_vision", 0],
            "image": ["subject", 0], "mask": ["subject", 1], "mask_mode": "background is 1 (LoadImage alpha)",
            "beta": 0.2, "start_percent": 0.0, "end_percent": 1.0}},
        "seen": {"class_type": "SaveImage", "inputs": {"images": ["apply", 1], "filename_prefix": "encoder_input"}},
    })
    graph["ssa"]["inputs"]["model"] = ["apply", 0]
    entry = _run(url, graph)
    assert len(entry["outputs"]["save"]["images"]) == 1
    assert len(entry["outputs"]["seen"]["images"]) == 1


def test_ssa_with_the_core_lora_loader_and_controlnet_apply_advanced(server):
    url, _, _ = server
    graph = ssa_graph()
    graph.update({
        "lora": {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                        "lora_name": "lora-random.safetensors",
                                                        "strength_model": 0.7, "strength_clip": 0.0}},
        "control": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "control-random.safetensors"}},
        "apply_control": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["control", 0], "image": ["subject", 0],
            "strength": 0.8, "start_percent": 0.0, "end_percent": 1.0, "vae": ["ckpt", 2]}},
    })
    graph["ssa"]["inputs"]["model"] = ["lora", 0]
    graph["sample"]["inputs"].update(positive=["apply_control", 0], negative=["apply_control", 1])
    entry = _run(url, graph)
    assert len(entry["outputs"]["save"]["images"]) == 1
