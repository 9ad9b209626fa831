"""Tier 2: DreamTunerFinetune in a real ComfyUI v0.15.1 server (nodes run under torch.inference_mode there).

A random-weight full-size SD1.5 checkpoint, a 96x64 subject, two steps: the node writes its LoRA and
embedding into the server's models/ folders; a second prompt loads them with the core LoraLoader and
writes embedding:<name> in the core CLIPTextEncode, and samples.
"""

from __future__ import annotations

import safetensors

import tier2
from tier2 import run

pytestmark = tier2.needs_comfyui
NAME = "tier2_subject"


def finetune_graph(steps=2, seed=0):
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15-random.safetensors"}},
        "subject": {"class_type": "LoadImage", "inputs": {"image": "subject.png"}},
        "regular": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2,
                                                           "color": 0x808080}},
        "tune": {"class_type": "DreamTunerFinetune", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "reference": ["subject", 0],
            "regular_images": ["regular", 0], "class_word": "ball", "subject_name": NAME, "steps": steps,
            "unet_mode": "lora", "unet_lr": 1e-4, "token_lr": 5e-3, "rank": 4, "seed": seed,
            "train_text_encoder": False, "text_encoder_lr": 1e-6, "gradient_checkpointing": True,
            "overwrite": False, "mask": ["subject", 1], "mask_mode": "background is 1 (LoadImage alpha)"}},
        "curve": {"class_type": "PreviewImage", "inputs": {"images": ["tune", 2]}},
    }


def loader_graph():
    """A later graph: the core LoraLoader picks the file from models/loras, the prompt uses the embedding."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15-random.safetensors"}},
        "lora": {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                        "lora_name": f"{NAME}.safetensors", "strength_model": 1.0,
                                                        "strength_clip": 1.0}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["lora", 1], "text": f"a ball embedding:{NAME} on the moon"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["lora", 1], "text": "blurry"}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["lora", 0], "seed": 1, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "after_lora"}},
    }


def test_finetune_in_the_server_then_the_core_loaders_use_its_files(comfyui, tmp_path):
    models = comfyui.base / "models"
    entry = run(comfyui, finetune_graph(), timeout=1500)
    assert entry["outputs"]["curve"]["images"]
    lora = models / "loras" / f"{NAME}.safetensors"
    embedding = models / "embeddings" / f"{NAME}.safetensors"
    with safetensors.safe_open(str(lora), "pt") as handle:
        keys = list(handle.keys())
        digest = handle.metadata()["dreamtuner.finetune_hash"]
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    with safetensors.safe_open(str(embedding), "pt") as handle:
        assert list(handle.keys()) == ["clip_l"] and handle.get_tensor("clip_l").shape == (1, 768)
        assert handle.metadata()["dreamtuner.finetune_hash"] == digest
    log = comfyui.log_path.read_text()
    assert "[DreamTunerFinetune] step 2/2 loss" in log

    # The core LoraLoader lists the new file and applies every key of it (no "lora key not loaded").
    info = comfyui.object_info()["LoraLoader"]["input"]["required"]["lora_name"]
    names = info[0] if isinstance(info[0], list) else info[1]["options"]
    assert f"{NAME}.safetensors" in names
    before = len(log)
    tier2.free_memory(comfyui)  # one SD1.5 in fp32 at a time on this CPU machine
    entry = run(comfyui, loader_graph())
    with tier2.saved_image(comfyui, entry, "save", tmp_path) as image:
        assert image.size == (64, 64)
    after = comfyui.log_path.read_text()[before:]
    assert "lora key not loaded" not in after and "NOT LOADED" not in after
    assert f"embedding:{NAME}" not in after and "warning, embedding" not in after.lower()

    # Re-queueing the same graph after the server dropped its cache (as after a restart) reuses the files.
    mtime = lora.stat().st_mtime_ns
    tier2.free_memory(comfyui)
    run(comfyui, finetune_graph())
    assert lora.stat().st_mtime_ns == mtime
    assert "files of this run found, loaded without training" in comfyui.log_path.read_text()

    # Another seed with the same subject name stops with the fix in the message, and no file changes.
    try:
        run(comfyui, finetune_graph(seed=5))
    except AssertionError as error:
        assert "overwrite" in str(error) and NAME in str(error)
    else:
        raise AssertionError("a second run over existing files was not refused")
    assert lora.stat().st_mtime_ns == mtime
