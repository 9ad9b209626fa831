"""Tier 2: a real, current ComfyUI server (v0.15.1) with this pack, driven through its HTTP API.

Needs ``COMFYUI_PATH`` (a ComfyUI checkout with its requirements installed) and,
optionally, ``COMFYUI_PYTHON`` (that installation's Python; default: this one).
One server runs for the whole test session on 127.0.0.1, with a throw-away
``--base-directory`` holding ``custom_nodes/comfyui-dreamtuner`` (a link to this
repository), random-weight model files made by that installation's own classes
under the names the tests and the workflow files use, and the sample images.
The model files are cached between runs in ``~/.cache/comfyui-dreamtuner``.

Other packs in the same graph: with ``DREAMTUNER_PACKS`` set to a folder holding
unpacked copies of the packs in ``PACKS`` (under their repository names), those
found there are copied into the server's ``custom_nodes/`` (a copy, so the
server writes nothing into the originals) and get their random-weight model
files; tests that need a missing one skip with ``needs_pack``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from comfyui_dreamtuner.headless import server as comfy_server

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
needs_comfyui = pytest.mark.skipif(
    not COMFYUI_PATH, reason="COMFYUI_PATH is not set: tier-2 tests need a ComfyUI v0.15.1 installation "
                             "(see README, 'Testing against a real ComfyUI')")

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = pathlib.Path(os.environ.get("DREAMTUNER_TIER2_CACHE", pathlib.Path.home() / ".cache" / "comfyui-dreamtuner"))
ENCODER = "dreamtuner_sd15_untrained.safetensors"

# models/<folder>/<name> -> the random-weight file behind it (kind for dreamtuner_devtools/tier2_assets.py, cache name).
# "-v2": made with normalisation layers at identity (tier2_assets.init_); the first files had zero GroupNorm
# scales, so their UNet output was exactly zero. The SDXL file is still the first kind (7 GB to remake).
MODEL_FILES = {
    "checkpoints/sd15-random.safetensors": ("sd15-checkpoint", "sd15-random-v2.safetensors"),
    "checkpoints/v1-5-pruned-emaonly-fp16.safetensors": ("sd15-checkpoint", "sd15-random-v2.safetensors"),
    "checkpoints/sd_xl_base_1.0.safetensors": ("sdxl-checkpoint", "sdxl-random.safetensors"),
    "clip_vision/vit-h-random.safetensors": ("vit-h-clip-vision", "vit-h-random-v2.safetensors"),
    "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors": ("vit-h-clip-vision", "vit-h-random-v2.safetensors"),
    "controlnet/control-random.safetensors": ("sd15-controlnet", "sd15-controlnet-random-v2.safetensors"),
    "controlnet/control_v11f1p_sd15_depth_fp16.safetensors": ("sd15-controlnet",
                                                              "sd15-controlnet-random-v2.safetensors"),
    "controlnet/control_v11p_sd15_openpose_fp16.safetensors": ("sd15-controlnet",
                                                               "sd15-controlnet-random-v2.safetensors"),
    "loras/lora-random.safetensors": ("sd15-lora", "sd15-lora-random.safetensors"),
}


PACKS_DIR = os.environ.get("DREAMTUNER_PACKS")
# Short name -> the pack's repository (folder) name.
PACKS = {
    "advanced-controlnet": "ComfyUI-Advanced-ControlNet",  # Kosinkadink, Reference ControlNet: no model file
    "ipadapter": "ComfyUI_IPAdapter_plus",  # cubiq
    "animatediff": "ComfyUI-AnimateDiff-Evolved",  # Kosinkadink
}
# models/<folder>/<name> of each pack's random-weight file: (pack, kind for dreamtuner_devtools/tier2_assets.py, cache name).
PACK_MODEL_FILES = {
    "ipadapter/ip-adapter_sd15-random.safetensors": ("ipadapter", "sd15-ipadapter", "sd15-ipadapter-random.safetensors"),
    "animatediff_models/mm_sd_v15_v2-random.safetensors": ("animatediff", "sd15-motion-module",
                                                           "sd15-motion-module-v2-random.safetensors"),
}


def pack_dir(name):
    """The unpacked pack ``name`` (a key of ``PACKS``) under ``DREAMTUNER_PACKS``, or None."""
    if not PACKS_DIR:
        return None
    path = pathlib.Path(PACKS_DIR) / PACKS[name]
    return path if (path / "__init__.py").is_file() else None


def needs_pack(name):
    """Skip a test unless ComfyUI and the pack are both there, saying which is missing and how to provide it."""
    if not COMFYUI_PATH:
        reason = "COMFYUI_PATH is not set: tier-2 tests need a ComfyUI v0.15.1 installation"
    elif not PACKS_DIR:
        reason = (f"DREAMTUNER_PACKS is not set: this test needs the pack {PACKS[name]} unpacked in a folder "
                  "that DREAMTUNER_PACKS names (README, 'Testing against a real ComfyUI')")
    elif pack_dir(name) is None:
        reason = f"{PACKS[name]} is not in DREAMTUNER_PACKS={PACKS_DIR} (no {PACKS[name]}/__init__.py there)"
    else:
        reason = ""
    return pytest.mark.skipif(bool(reason), reason=reason or "-")


def python():
    return os.environ.get("COMFYUI_PYTHON", sys.executable)


def asset(kind, name, *extra):
    """A random-weight model file made by the ComfyUI under test (cached between runs)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / name
    if not path.exists():
        subprocess.run([python(), str(ROOT / "dreamtuner_devtools" / "tier2_assets.py"), kind, str(path), *map(str, extra)],
                       cwd=COMFYUI_PATH, check=True, timeout=900)
    return path


def untrained_encoder(path):
    subprocess.run([python(), str(ROOT / "scripts" / "make_untrained_encoder.py"), "--family", "sd15", "--out",
                    str(path)], cwd=COMFYUI_PATH, check=True, timeout=600)
    return path


def make_base(base):
    """A ComfyUI base directory with this pack, the model files and the input images."""
    for sub in ("custom_nodes", "models/dreamtuner", "input", "output", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "comfyui-dreamtuner").symlink_to(ROOT, target_is_directory=True)
    for target, (kind, name) in MODEL_FILES.items():
        (base / "models" / target).parent.mkdir(parents=True, exist_ok=True)
        (base / "models" / target).symlink_to(asset(kind, name))
    add_packs(base)
    encoder = untrained_encoder(base / "models" / "dreamtuner" / ENCODER)
    # The encoder the workflows name (none is published: the untrained one stands in).
    (base / "models" / "dreamtuner" / "dreamtuner_subject_encoder_sd15.safetensors").symlink_to(encoder)
    # A second folder for encoders, given the way users do: extra_model_paths.yaml.
    extra = base / "elsewhere"
    extra.mkdir()
    (extra / "from_extra_paths.safetensors").symlink_to(encoder)
    (base / "extra_model_paths.yaml").write_text(f"mine:\n    dreamtuner: {extra}\n")
    for image in (ROOT / "example_workflows" / "inputs").iterdir():  # the sample images and pose video
        shutil.copy(image, base / "input" / image.name)
    from PIL import Image, ImageDraw

    subject = Image.new("RGBA", (96, 64), (0, 0, 0, 0))
    ImageDraw.Draw(subject).ellipse((24, 8, 72, 56), fill=(200, 60, 40, 255))
    subject.save(base / "input" / "subject.png")


def add_packs(base):
    """Copy the other packs found under DREAMTUNER_PACKS into custom_nodes and give them their model files."""
    for name, folder in PACKS.items():
        source = pack_dir(name)
        if source is not None:
            shutil.copytree(source, base / "custom_nodes" / folder, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", ".git"))
    for target, (name, kind, cache_name) in PACK_MODEL_FILES.items():
        source = pack_dir(name)
        if source is not None:
            (base / "models" / target).parent.mkdir(parents=True, exist_ok=True)
            (base / "models" / target).symlink_to(asset(kind, cache_name, *([source] if name == "animatediff" else [])))


def server_args(base):
    return ["--cpu", "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
            "--extra-model-paths-config", str(base / "extra_model_paths.yaml")]


def free_memory(comfy):
    """Ask the server to drop its loaded models and cached outputs (before and after an SDXL run)."""
    comfy.post("/free", {"unload_models": True, "free_memory": True})
    time.sleep(3)  # the prompt worker applies the flags between prompts, within about a second


def run(comfy, graph, timeout=900):
    """Queue an API-format graph and wait; returns its history entry, or fails with the server's own words."""
    try:
        prompt_id = comfy.queue(graph)
    except comfy_server.ServerError as error:
        raise AssertionError(f"/prompt refused the graph: {error}") from None
    entry = comfy.follow(prompt_id, lambda kind, data: None, timeout)
    if entry["status"].get("status_str") != "success":
        raise AssertionError(f"graph failed: {comfy_server.failure_line(entry, graph)}")
    return entry


def saved_image(comfy, entry, node_id, folder):
    """The image a SaveImage node wrote, fetched the way a client does (``/view``), opened with PIL."""
    from PIL import Image

    (image,) = entry["outputs"][node_id]["images"]
    return Image.open(comfy.download(image, folder))
