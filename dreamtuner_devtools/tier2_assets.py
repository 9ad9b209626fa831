"""Random-weight model files in the real formats, for the tier-2 (real ComfyUI server) tests.

Run with the Python of the ComfyUI installation under test, so the files are
made by that installation's own classes:

    python dreamtuner_devtools/tier2_assets.py sd15-checkpoint OUT.safetensors
    python dreamtuner_devtools/tier2_assets.py sdxl-checkpoint OUT.safetensors
    python dreamtuner_devtools/tier2_assets.py vit-h-clip-vision OUT.safetensors
    python dreamtuner_devtools/tier2_assets.py sd15-controlnet OUT.safetensors
    python dreamtuner_devtools/tier2_assets.py sd15-lora OUT.safetensors
    python dreamtuner_devtools/tier2_assets.py sd15-ipadapter OUT.safetensors
    python dreamtuner_devtools/tier2_assets.py sd15-motion-module OUT.safetensors PACK_DIR   (ComfyUI-AnimateDiff-Evolved)

The SD1.5 checkpoint is the original single-file layout (UNet under
``model.diffusion_model.``, CLIP-L text under ``cond_stage_model.transformer.``,
VAE under ``first_stage_model.``), fp16, as CheckpointLoaderSimple loads it.
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # after ComfyUI's own modules
from dreamtuner_devtools import pack  # noqa: E402

pack.load(nodes=False)
from comfyui_dreamtuner.dreamtuner_core.families import SD15_UNET, SDXL_UNET  # noqa: E402


NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)


def init_(module, seed):
    """Seeded random weights (variance-preserving), zero biases, and every normalisation layer the identity.

    Normalisation layers are found by type, not by name: the UNet's GroupNorms are called ``in_layers.0``,
    ``out_layers.0`` and ``out.0``, and a zero scale there would make every ResBlock the identity and the
    UNet's output exactly zero (a model that no patch could change).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                value = torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel())
            else:
                value = torch.zeros(p.shape)
            p.copy_(value.to(p.dtype))
        for norm in module.modules():
            if isinstance(norm, NORMS) and getattr(norm, "weight", None) is not None:
                norm.weight.fill_(1.0)
    return module


SD_VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
              ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)  # SD1.5 and SDXL


def sd15_checkpoint(path):
    import comfy.ops
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL

    unet_config = dict(SD15_UNET)
    state = {}
    unet = comfy.supported_models.SD15(unet_config).get_model({}, device="cpu").diffusion_model
    for k, v in init_(unet, 1).state_dict().items():
        state[f"model.diffusion_model.{k}"] = v.half()
    del unet
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    for k, v in init_(clip.transformer, 2).state_dict().items():
        state[f"cond_stage_model.transformer.{k}"] = v.half()
    del clip
    vae = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    for k, v in init_(vae, 3).state_dict().items():
        state[f"first_stage_model.{k}"] = v.half()
    tmp = f"{path}.partial"
    comfy.utils.save_torch_file({k: v.contiguous() for k, v in state.items()}, tmp)
    os.replace(tmp, path)


def sdxl_checkpoint(path):
    """SDXL base in the original single-file layout, as ``sd_xl_base_1.0.safetensors``, fp16.

    UNet under ``model.diffusion_model.``, CLIP-L under ``conditioner.embedders.0.transformer.``, OpenCLIP
    bigG under ``conditioner.embedders.1.model.``, VAE under ``first_stage_model.``: ComfyUI's own
    conversion for saving. Everything is built in fp16 (the UNet alone is 2.6 B parameters).
    """
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = comfy.supported_models.SDXL(dict(SDXL_UNET))
    config.set_inference_dtype(torch.float16, None)
    model = config.get_model({}, device="cpu")
    clip = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float16)
    vae = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4).half()
    state = model.state_dict_for_saving(init_(model.diffusion_model, 7).state_dict(), init_(clip, 8).state_dict(),
                                        init_(vae, 9).state_dict())
    del model, clip, vae
    tmp = f"{path}.partial"
    comfy.utils.save_torch_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()},
                                tmp)
    os.replace(tmp, path)


def vit_h_clip_vision(path):
    """OpenCLIP ViT-H/14 image encoder in the layout the core CLIPVisionLoader loads (as IP-Adapter users have)."""
    import comfy.clip_vision
    import comfy.utils

    config = os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_h.json")
    model = comfy.clip_vision.ClipVisionModel(config)
    init_(model.model, 4)
    tmp = f"{path}.partial"
    comfy.utils.save_torch_file({k: v.half().contiguous() for k, v in model.model.state_dict().items()}, tmp)
    os.replace(tmp, path)


def sd15_controlnet(path):
    """An SD1.5 ControlNet in the original layout (what ControlNetLoader loads for pose/depth models)."""
    import comfy.cldm.cldm
    import comfy.ops
    import comfy.utils

    config = {k: v for k, v in SD15_UNET.items() if k != "out_channels"}
    config["num_heads"] = 8  # what the SD15 model config adds for the UNet
    control = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init,
                                         dtype=torch.float32, device="cpu", **config)
    init_(control, 5)
    tmp = f"{path}.partial"
    comfy.utils.save_torch_file({f"control_model.{k}": v.half().contiguous() for k, v in control.state_dict().items()},
                                tmp)
    os.replace(tmp, path)


def sd15_lora(path, rank=4):
    """A kohya-format LoRA on every UNet attention projection (what LoraLoader loads)."""
    import comfy.lora
    import comfy.supported_models
    import comfy.utils

    base = comfy.supported_models.SD15(dict(SD15_UNET)).get_model({}, device="meta")
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    generator = torch.Generator().manual_seed(6)
    tensors = {}
    for key, target in comfy.lora.model_lora_keys_unet(base, {}).items():
        if key.startswith("lora_unet_") and key.endswith(("attn1_to_q", "attn1_to_k", "attn1_to_v")):
            out_features, in_features = shapes[target][:2]
            tensors[f"{key}.lora_up.weight"] = (torch.randn((out_features, rank), generator=generator) * 0.05).half()
            tensors[f"{key}.lora_down.weight"] = (torch.randn((rank, in_features), generator=generator) * 0.05).half()
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    comfy.utils.save_torch_file(tensors, path)


def sd15_ipadapter(path):
    """An IP-Adapter for SD1.5 in the layout of ``ip-adapter_sd15.safetensors`` (cubiq's IPAdapterModelLoader).

    ``image_proj.proj`` maps the ViT-H image embedding (1024) to 4 tokens of the text width (768),
    ``image_proj.norm`` normalises them; ``ip_adapter.{2i+1}.to_k_ip/to_v_ip`` are the extra key/value
    projections of the i-th cross-attention layer, numbered in IP-Adapter's order (input blocks, output
    blocks, middle block). Their widths are read from the host's own SD1.5 UNet, built on the meta device.
    """
    import comfy.supported_models
    import comfy.utils

    unet = comfy.supported_models.SD15(dict(SD15_UNET)).get_model({}, device="meta").diffusion_model
    order = {"input_blocks": 0, "output_blocks": 1, "middle_block": 2}
    cross = sorted((name for name, _ in unet.named_modules() if name.endswith(".attn2.to_k")),
                   key=lambda name: (order[name.split(".")[0]], int(name.split(".")[1])))
    text_width, tokens, image_width = SD15_UNET["context_dim"], 4, 1024
    generator = torch.Generator().manual_seed(10)

    def randn(*shape):
        return (torch.randn(shape, generator=generator) / math.sqrt(shape[-1])).half()

    tensors = {"image_proj.proj.weight": randn(tokens * text_width, image_width),
               "image_proj.proj.bias": torch.zeros(tokens * text_width, dtype=torch.float16),
               "image_proj.norm.weight": torch.ones(text_width, dtype=torch.float16),
               "image_proj.norm.bias": torch.zeros(text_width, dtype=torch.float16)}
    for number, name in enumerate(cross):
        width = comfy.utils.get_attr(unet, name).weight.shape[0]
        for projection in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{2 * number + 1}.{projection}.weight"] = randn(width, text_width)
    tmp = f"{path}.partial"
    comfy.utils.save_torch_file(tensors, tmp)
    os.replace(tmp, path)


def sd15_motion_module(path, pack):
    """An AnimateDiff v2 motion module for SD1.5 (the layout of ``mm_sd_v15_v2``), built by AnimateDiff-Evolved.

    ``pack`` is the ComfyUI-AnimateDiff-Evolved folder: its own ``AnimateDiffModel`` is built from a key
    list that describes the layout (four down blocks, a middle block, 32 positions: what its loader
    detects as SD1.5 v2), every weight initialised with random values, and saved as safetensors, fp16.
    """
    import comfy.utils

    sys.dont_write_bytecode = True  # the pack's folder is read-only material: leave no __pycache__ in it
    sys.path.insert(0, os.path.abspath(pack))
    from animatediff.motion_module_ad import AnimateDiffModel, normalize_ad_state_dict

    # The least a state dict must hold for the pack's own detection: block count, middle block, positions.
    layout = {"down_blocks.3.motion_modules.0.temporal_transformer.norm.weight": torch.zeros(1),
              "mid_block.motion_modules.0.temporal_transformer.norm.weight": torch.zeros(1),
              "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1"
              ".pos_encoder.pe": torch.zeros(1, 32, 320)}
    layout, info = normalize_ad_state_dict(layout, os.path.basename(path))
    model = AnimateDiffModel(mm_state_dict=layout, mm_info=info)
    init_(model, 11)
    # Every weight random (proj_out included, which a fresh module would start at zero), so the frames mix.
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    tmp = f"{path}.partial"
    comfy.utils.save_torch_file(state, tmp)
    os.replace(tmp, path)


MAKERS = {"sd15-checkpoint": sd15_checkpoint, "sdxl-checkpoint": sdxl_checkpoint,
          "vit-h-clip-vision": vit_h_clip_vision, "sd15-controlnet": sd15_controlnet, "sd15-lora": sd15_lora,
          "sd15-ipadapter": sd15_ipadapter, "sd15-motion-module": sd15_motion_module}

if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] not in MAKERS:
        sys.exit(__doc__)
    sys.path.insert(0, os.getcwd())
    if not torch.cuda.is_available():
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
    MAKERS[sys.argv[1]](*sys.argv[2:])
