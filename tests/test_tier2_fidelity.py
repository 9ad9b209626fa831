"""Tier 2: the scoring nodes and scripts/evaluate.py's generation in a real ComfyUI v0.15.1.

Random-weight scoring models at the protocol's real sizes, in the real formats,
in the server's models/dreamtuner/scoring/: an open_clip ViT-B-32 checkpoint
(safetensors) and a DINO ViT-S/16 folder written with save_pretrained.
- The loader lists them; a graph scores a batch against a reference that is
  one of its images: sorted by CLIP-I or DINO that image comes first (cosine 1).
- evaluate.py generates a small DreamBench sweep through the headless runner
  on workflow 4, scores it, and a second run generates nothing.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

import tier2
from workflow_defs import ROOT

pytestmark = tier2.needs_comfyui
EVALUATE = [sys.executable, str(ROOT / "scripts" / "evaluate.py")]


@pytest.fixture(scope="module")
def scoring(comfyui):
    open_clip = pytest.importorskip("open_clip")
    transformers = pytest.importorskip("transformers")
    import safetensors.torch
    import torch

    folder = comfyui.base / "models" / "dreamtuner" / "scoring"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32", pretrained=None, load_weights=False)
    safetensors.torch.save_file({k: v.contiguous() for k, v in clip.state_dict().items()},
                                str(folder / "vit-b-32-random.safetensors"))
    config = transformers.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                    intermediate_size=1536, image_size=224, patch_size=16, qkv_bias=True)
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(str(folder / "dino-vits16-random"))
    return folder


def test_the_loader_lists_the_scoring_files(comfyui, scoring):
    spec = comfyui.get("/object_info/DreamTunerScoringModelsLoader")["DreamTunerScoringModelsLoader"]
    required = spec["input"]["required"]
    assert required["clip_name"][0] == ["none", "vit-b-32-random.safetensors"]
    assert required["dino_name"][0] == ["none", "dino-vits16-random"]
    assert "DreamTunerSubjectScore" in comfyui.get("/object_info/DreamTunerSubjectScore")


@pytest.mark.parametrize("sort_by", ["CLIP-I", "DINO", "batch order"])
def test_the_graph_ranks_the_reference_itself_first(comfyui, scoring, sort_by, tmp_path):
    from PIL import Image

    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "dreamtuner_subject_turned.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "dreamtuner_subject.png"}},
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "4": {"class_type": "ImageFromBatch", "inputs": {"image": ["3", 0], "batch_index": 1, "length": 1}},
        "5": {"class_type": "DreamTunerScoringModelsLoader", "inputs": {
            "clip_name": "vit-b-32-random.safetensors", "clip_architecture": "ViT-B-32",
            "dino_name": "dino-vits16-random"}},
        "6": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "vit-h-random.safetensors"}},
        "7": {"class_type": "DreamTunerSubjectScore", "inputs": {
            "images": ["3", 0], "reference": ["4", 0], "sort_by": sort_by, "scoring_models": ["5", 0],
            "clip_vision": ["6", 0], "prompt": "a toy on the beach"}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 4], "filename_prefix": "sorted"}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["7", 5], "filename_prefix": "chart"}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "batch"}},
    }
    entry = tier2.run(comfyui, graph)
    saved = {}
    for node_id in ("8", "9", "10"):
        saved[node_id] = [Image.open(comfyui.download(image, tmp_path / node_id)).convert("RGB")
                          for image in entry["outputs"][node_id]["images"]]
    batch, ranked, (chart,) = saved["10"], saved["8"], saved["9"]
    assert len(ranked) == 2 and chart.size == (512, 256)
    first = 0 if sort_by == "batch order" else 1  # the reference is batch item 1: cosine 1 with itself
    assert ranked[0].tobytes() == batch[first].tobytes() and ranked[1].tobytes() == batch[1 - first].tobytes()


def test_evaluate_generates_a_sweep_through_the_runner_and_resumes(comfyui, scoring, tmp_path):
    from PIL import Image

    dataset = tmp_path / "dataset" / "dog"
    dataset.mkdir(parents=True)
    for i, colour in enumerate(((200, 60, 40), (40, 60, 200))):
        Image.new("RGB", (80, 64), colour).save(dataset / f"{i:02d}.png")
    out = tmp_path / "out"
    tier2.free_memory(comfyui)  # the graph tests' CLIP models: this machine's memory is shared
    # workflow 4 (SD1.5, self-subject-attention, the guider): the runner's whole path without the ViT-H tower
    argv = [*EVALUATE, "--server", comfyui.url, "--workflow",
            str(ROOT / "example_workflows" / "dreamtuner_4_guider_custom_sampling.json"),
            "--dreambench", str(tmp_path / "dataset"), "--generated", str(out), "--subjects", "dog",
            "--prompts-per-subject", "1", "--images-per-prompt", "1", "--seed", "7", "--sweep", "omega_ref=0,2.5",
            "--steps", "2", "--size", "64x64", "--clip", str(scoring / "vit-b-32-random.safetensors"),
            "--dino", str(scoring / "dino-vits16-random")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated 2 images, 0 were already there" in result.stderr

    files = sorted(out.rglob("*.png"))
    names = {str(p.relative_to(out)) for p in files if p.name != "fidelity_plot.png"}
    assert names == {f"omega_ref={w}/dog/00_7.png" for w in (0, 2.5)}
    for w in (0, 2.5):
        for seed in (7,):
            with Image.open(out / f"omega_ref={w}" / "dog" / f"00_{seed}.png") as image:
                assert image.size == (64, 64)
                prompt = json.loads(image.info["prompt"])  # what the engine ran
            inputs = [v["inputs"] for v in prompt.values()]
            assert [i["omega_ref"] for i in inputs if "omega_ref" in i] == [w]
            assert [i["noise_seed"] for i in inputs if "noise_seed" in i] == [seed]
            assert "a dog in the jungle" in [i.get("text") for i in inputs]
            # Uploaded under a name of its own (the runner's folder, the subject in the name, a content hash).
            assert any(str(i.get("image")).startswith("dreamtuner_runner/dreambench-dog-00-") for i in inputs)
    with open(out / "fidelity.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(r["clip_i"] and r["clip_t"] and r["dino"] for r in rows)
    assert (out / "fidelity.md").is_file() and (out / "fidelity_plot.png").is_file()

    before = {p: p.stat().st_mtime_ns for p in files if p.name != "fidelity_plot.png"}
    again = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "generated" not in again.stderr or "generated 0 images" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before
