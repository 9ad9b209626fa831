"""Random-weight model files in the real formats, and a tiny prepared data folder, for a pretraining smoke run.

Checks a set-up (install, torchrun, the host's loaders, the data format) on a
CPU in a minute before renting GPUs. Writes into OUT:

- ``checkpoint.safetensors``: an SD1.5 single-file checkpoint (UNet under
  ``model.diffusion_model.``, CLIP-L text under ``cond_stage_model.transformer.``,
  VAE under ``first_stage_model.``) whose UNet is a narrow SD1.5 (the widths the
  host detects as SD1.5, fewer levels), loaded by ``comfy.sd.load_checkpoint_guess_config``;
- ``controlnet.safetensors``: a depth-ControlNet-shaped ControlNet for that UNet
  (original layout, ``comfy.controlnet.load_controlnet``);
- ``clip_vision.safetensors`` + ``clip_vision.json``: a small CLIP vision tower
  (26 layers, so the paper's layers {25, 4, 8, 12, 16} exist) in the host's
  layout, and its config (``--clip-vision-config``);
- ``data/``: a prepared folder (pictures, masks, depth maps, manifest) of
  synthetic images.

    python scripts/make_pretrain_smoke_files.py --out smoke/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

# SD1.5 widths (model channels 320, context 768, no linear proj): detected as SD1.5 by the host; two levels only.
SMOKE_UNET = dict(
    image_size=32, use_spatial_transformer=True, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1, num_heads=8, context_dim=768, use_linear_in_transformer=False,
    adm_in_channels=None, use_temporal_attention=False,
)
SD_VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
              ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
CLIP_L_TEXT = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
               "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
               "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
               "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
               "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
               "vocab_size": 49408}
CLIP_VISION = {"hidden_act": "gelu", "hidden_size": 32, "image_size": 28, "intermediate_size": 64,
               "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 2,
               "num_channels": 3, "num_hidden_layers": 26, "patch_size": 14, "projection_dim": 32}


def init_(module, seed, scale=1.0):
    """Seeded fan-in-scaled weights, unit norms, small biases (comfy's ops leave parameters uninitialised)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                value = torch.randn(p.shape, generator=generator) * (scale / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                value = torch.ones(p.shape)
            else:
                value = torch.randn(p.shape, generator=generator) * 0.02
            p.copy_(value.to(p.dtype))
    return module


def _save(tensors, path):
    import comfy.utils

    partial = f"{path}.partial"
    comfy.utils.save_torch_file({k: v.contiguous() for k, v in tensors.items()}, partial)
    os.replace(partial, path)


def checkpoint(path, dtype=torch.float16):
    import comfy.sd1_clip
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    state = {}
    unet = comfy.supported_models.SD15(dict(SMOKE_UNET)).get_model({}, device="cpu").diffusion_model
    state.update({f"model.diffusion_model.{k}": v.to(dtype) for k, v in init_(unet, 1).state_dict().items()})
    del unet
    import tempfile

    with tempfile.TemporaryDirectory() as folder:  # CLIP-L's config, for comfy packages that ship without it
        config = os.path.join(folder, "clip_l.json")
        with open(config, "w") as handle:
            json.dump(CLIP_L_TEXT, handle)
        clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32, textmodel_json_config=config)
    state.update({f"cond_stage_model.transformer.{k}": v.to(dtype)
                  for k, v in init_(clip.transformer, 2).state_dict().items()})
    del clip
    vae = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    state.update({f"first_stage_model.{k}": v.to(dtype) for k, v in init_(vae, 3).state_dict().items()})
    _save(state, path)


def controlnet(path, dtype=torch.float16):
    import comfy.cldm.cldm
    import comfy.ops

    config = {k: v for k, v in SMOKE_UNET.items() if k != "out_channels"}
    control = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init,
                                         dtype=torch.float32, device="cpu", **config)
    _save({f"control_model.{k}": v.to(dtype) for k, v in init_(control, 5, scale=0.5).state_dict().items()}, path)


def clip_vision(path, config_path):
    import comfy.clip_vision

    with open(config_path, "w") as handle:
        json.dump(CLIP_VISION, handle, indent=1)
    model = comfy.clip_vision.ClipVisionModel(config_path)
    _save({k: v.float() for k, v in init_(model.model, 4).state_dict().items()}, path)


def data(folder, count=8, size=64, seed=0):
    """Synthetic subjects: a coloured ellipse on a textured background; mask = the ellipse; depth = a ramp."""
    import numpy
    from PIL import Image

    sys.path.append(str(ROOT))  # after ComfyUI's own modules
    from dreamtuner_devtools import pack

    pack.load(nodes=False)  # the core as comfyui_dreamtuner.dreamtuner_core, its one import name
    from comfyui_dreamtuner.dreamtuner_core.pretrain.data import append_manifest

    folder = pathlib.Path(folder)
    for sub in ("images", "masks", "depth"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    if (folder / "manifest.jsonl").exists():
        (folder / "manifest.jsonl").unlink()
    rng = numpy.random.default_rng(seed)
    y, x = numpy.mgrid[0:size, 0:size] / size
    for i in range(count):
        cx, cy, rx, ry = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.15, 0.3), rng.uniform(0.15, 0.3)
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
        picture = rng.uniform(0, 255, (size, size, 3)) * 0.3 + 90
        picture[inside] = rng.uniform(0, 255, 3)
        depth = numpy.where(inside, 200, 60 + 80 * y).astype(numpy.uint8)
        name = f"subject_{i:03d}"
        Image.fromarray(picture.astype(numpy.uint8)).save(folder / "images" / f"{name}.png")
        Image.fromarray((inside * 255).astype(numpy.uint8)).save(folder / "masks" / f"{name}.png")
        Image.fromarray(depth).convert("RGB").save(folder / "depth" / f"{name}.png")
        append_manifest(folder, {"id": name, "image": f"images/{name}.png", "mask": f"masks/{name}.png",
                                 "depth": f"depth/{name}.png", "caption": f"a photo of a {['red', 'blue'][i % 2]} toy"})


def make_all(out, images=8, size=64):
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"checkpoint": out / "checkpoint.safetensors", "controlnet": out / "controlnet.safetensors",
             "clip_vision": out / "clip_vision.safetensors", "clip_vision_config": out / "clip_vision.json",
             "data": out / "data"}
    if not paths["checkpoint"].exists():
        checkpoint(paths["checkpoint"])
    if not paths["controlnet"].exists():
        controlnet(paths["controlnet"])
    if not paths["clip_vision"].exists():
        clip_vision(paths["clip_vision"], paths["clip_vision_config"])
    data(paths["data"], images, size)
    return {k: str(v) for k, v in paths.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the files into")
    parser.add_argument("--images", type=int, default=8, help="number of synthetic prepared images")
    parser.add_argument("--size", type=int, default=64, help="their size in px")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.getcwd())
    if not torch.cuda.is_available():
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
    paths = make_all(args.out, args.images, args.size)
    print(json.dumps(paths, indent=1))


if __name__ == "__main__":
    main()
