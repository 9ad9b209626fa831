"""Tier 2: the pack's nodes inside a real, current ComfyUI server (v0.15.1), through its HTTP API (tests/tier2.py)."""

from __future__ import annotations

import pytest

import tier2
from tier2 import run

pytestmark = tier2.needs_comfyui
NODE = "DreamTunerSelfSubjectAttention"


PACK_NODES = {
    NODE: "Self-Subject-Attention (DreamTuner)",
    "DreamTunerInterleavedCFGSampler": "InterleavedCFGSampler (DreamTuner)",
    "DreamTunerInterleavedCFGGuider": "InterleavedCFGGuider (DreamTuner)",
    "DreamTunerSubjectEncoderLoader": "SubjectEncoderLoader (DreamTuner)",
    "DreamTunerApplySubjectEncoder": "ApplySubjectEncoder (DreamTuner)",
}


def test_the_pack_loads_without_import_errors_and_shows_its_tooltips(comfyui):
    everything = comfyui.object_info()
    for name, display in PACK_NODES.items():
        info = everything[name]
        assert info["display_name"] == display and info["category"] == "DreamTuner"
        inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
        assert all(len(spec[1].get("tooltip", "")) > 20 for spec in inputs.values()), name
        assert info["description"] and len(info["output_tooltips"]) == len(info["output"])
    startup = comfyui.log_path.read_text().split("Starting server")[0]
    assert "comfyui-dreamtuner" in startup and "IMPORT FAILED" not in startup
    # Nothing at start-up may be an error or a warning about this pack (core warnings about the host are allowed).
    pack = ("dreamtuner", "subject_encoder", "self_subject_attention", "interleaved_cfg")
    flagged = [line for line in startup.splitlines() if any(word in line.lower() for word in pack)
               and any(word in line.lower() for word in ("error", "traceback", "warning", "deprecat", "failed"))]
    assert not flagged, flagged


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


def test_checkpoint_ssa_ksampler_graph_completes_through_prompt(comfyui, tmp_path):
    entry = run(comfyui, ssa_graph())
    with tier2.saved_image(comfyui, entry, "save", tmp_path) as image:
        assert image.size == (64, 64)


def test_bad_input_is_reported_by_the_server_with_the_fix(comfyui):
    graph = ssa_graph()
    graph["ssa"]["inputs"]["start_percent"] = 0.9
    graph["ssa"]["inputs"]["end_percent"] = 0.1
    with pytest.raises(AssertionError, match="start_percent"):
        run(comfyui, graph)


def test_ssa_with_the_interleaved_cfg_sampler_completes(comfyui):
    graph = ssa_graph()
    sample = graph.pop("sample")["inputs"]
    graph["sample"] = {"class_type": "DreamTunerInterleavedCFGSampler", "inputs": {
        **sample, "w_r": 6.0, "p_r": 0.9, "delta_t": 10, "delta_t_prime": 10}}
    entry = run(comfyui, graph)
    assert len(entry["outputs"]["save"]["images"]) == 1


def test_the_interleaved_guider_with_sampler_custom_advanced_completes(comfyui):
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
    entry = run(comfyui, graph)
    assert len(entry["outputs"]["save"]["images"]) == 1


def test_the_encoder_folder_is_registered_and_lists_the_file(comfyui):
    info = comfyui.get("/object_info/DreamTunerSubjectEncoderLoader")["DreamTunerSubjectEncoderLoader"]
    assert sorted(info["input"]["required"]["encoder_name"][0]) == [
        "dreamtuner_sd15_untrained.safetensors", "dreamtuner_subject_encoder_sd15.safetensors",
        "from_extra_paths.safetensors"]


def test_clip_vision_encoder_and_ssa_graph_completes(comfyui):
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
    entry = run(comfyui, graph)
    assert len(entry["outputs"]["save"]["images"]) == 1
    assert len(entry["outputs"]["seen"]["images"]) == 1


def test_ssa_with_the_core_lora_loader_and_controlnet_apply_advanced(comfyui):
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
    entry = run(comfyui, graph)
    assert len(entry["outputs"]["save"]["images"]) == 1
