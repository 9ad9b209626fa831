"""The one factory of real host models for the tests.

Every model is built through ComfyUI's own classes (``supported_models`` config
-> ``model_base`` -> ``ModelPatcher``) with small UNet configurations and a
seeded, explicit initialisation of every parameter (comfy's ops skip weight
initialisation, so a fresh model holds uninitialised memory).
"""

from __future__ import annotations

import math

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.supported_models

# A tiny SD1.5-shaped UNet: two levels, self-attention in input, middle and output blocks.
SD15_TINY = dict(
    image_size=32, use_spatial_transformer=True, in_channels=4, out_channels=4, model_channels=32,
    num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1, num_heads=2, context_dim=32, use_linear_in_transformer=True,
    adm_in_channels=None, use_temporal_attention=False,
)
# SDXL-shaped: no attention at the first level, depth-2 transformers, ADM ("y") input of SDXL's width.
SDXL_TINY = dict(
    image_size=32, use_spatial_transformer=True, in_channels=4, out_channels=4, model_channels=32,
    num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[0, 2], transformer_depth_output=[0, 0, 2, 2],
    transformer_depth_middle=2, num_head_channels=16, context_dim=48, use_linear_in_transformer=True,
    adm_in_channels=2816, num_classes="sequential", use_temporal_attention=False,
)
# SD2-shaped (v-prediction; the SD2 config fixes 64 channels per head and fp32 attention).
SD21_TINY = dict(SD15_TINY, model_channels=64, context_dim=40)
# SD1.5 widths (model_channels 320, context 768) so host loaders detect it as SD1.5 (ControlNet).
SD15_NARROW = dict(
    image_size=32, use_spatial_transformer=True, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1, num_heads=8, context_dim=768, use_linear_in_transformer=False,
    adm_in_channels=None, use_temporal_attention=False,
)
# The least UNet AnimateDiff-Evolved's SD1.5 motion modules fit: its down-block modules go after the first
# layer of each input block, with widths 320, 640, 1280, 1280 and two blocks per level, so the four levels
# and two res blocks each are those of SD1.5; attention only at the first level (input 1, 2 and output 9-11),
# a middle block of two res blocks (no transformer; ADE's eject walks the middle block). About 700 M
# parameters: build it with weights stored in fp8 (weight_dtype), computed in fp32 by the host's manual
# cast, about 0.7 GB.
SD15_MOTION = dict(
    image_size=32, use_spatial_transformer=True, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 0, 0, 0, 0, 0, 0],
    transformer_depth_output=[0] * 9 + [1, 1, 1], transformer_depth_middle=-1, num_heads=8, context_dim=768,
    use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False,
)

# A Flux-shaped DiT (no UNet self-attention), for the unsupported-family error.
FLUX_TINY = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=64,
    mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000,
    qkv_bias=True, guidance_embed=False, patch_size=2,
)


def _flux_fields_of_this_host():
    """Fields current ComfyUI's FluxParams requires and the late-2024 one lacks."""
    import dataclasses

    import comfy.ldm.flux.model

    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return {"txt_ids_dims": []} if "txt_ids_dims" in fields else {}


def init_weights(module: torch.nn.Module, seed: int = 0, scale: float = 1.0, fp16_exact: bool = False):
    """Seeded explicit initialisation: fan-in scaled normal weights, small biases, unit norms.

    fp16_exact rounds every value to one fp16 holds exactly, so a host model that stores
    fp16 weights (ComfyUI's CLIP vision on the CPU) computes with exactly the same weights.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                value = torch.randn(p.shape, generator=generator) * (scale / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                value = torch.ones(p.shape)
            else:
                value = torch.randn(p.shape, generator=generator) * 0.02
            p.copy_((value.half() if fp16_exact else value).to(p.dtype))
    return module


def build(family: str = "sd15", seed: int = 0, unet_config=None, weight_dtype=torch.float32):
    """A ModelPatcher around a real BaseModel of the family, on the CPU.

    weight_dtype: the dtype the UNet stores its weights in; another than float32 is computed in float32
    (the host's manual cast), for a large UNet in less memory.
    """
    classes = {
        "sd15": (comfy.supported_models.SD15, SD15_TINY),
        "sd15_narrow": (comfy.supported_models.SD15, SD15_NARROW),
        "sd15_motion": (comfy.supported_models.SD15, SD15_MOTION),
        "sd21": (comfy.supported_models.SD20, SD21_TINY),
        "sdxl": (comfy.supported_models.SDXL, SDXL_TINY),
        "flux": (comfy.supported_models.Flux, FLUX_TINY),
    }
    config_class, default = classes[family]
    unet_config = dict(unet_config or default)
    if family == "flux":
        unet_config.update(_flux_fields_of_this_host())
    config = config_class(unet_config)
    if weight_dtype != torch.float32:
        config.set_inference_dtype(weight_dtype, torch.float32)
    if family == "sd21":  # SD2.x 768-v: v-prediction
        model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.V_PREDICTION, device="cpu")
    else:
        model = config.get_model({}, device="cpu")
    init_weights(model.diffusion_model, seed)
    model.diffusion_model.to(weight_dtype)
    device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def context_dim(model) -> int:
    return model.model.model_config.unet_config["context_dim"]


def conditioning(model, seed: int, tokens: int = 77):
    """A CONDITIONING as a text encoder gives it (with SDXL's pooled output)."""
    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn((1, tokens, context_dim(model)), generator=generator)
    extra = {"pooled_output": torch.randn((1, 1280), generator=generator)}
    return [[cond, extra]]


def latent(seed: int, height: int = 8, width: int = 8, batch: int = 1, channels: int = 4):
    """A raw VAE latent ("samples" of a LATENT), as VAEEncode returns it."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, channels, height, width), generator=generator) * 5.0


def sample(model, positive, negative, latent_image, seed=1, steps=3, cfg=5.0, sampler="euler",
           scheduler="normal", denoise=1.0, noise_mask=None, start_step=None, last_step=None,
           force_full_denoise=False, disable_noise=False):
    """The core KSampler / KSamplerAdvanced path (comfy.sample.sample)."""
    noise = comfy.sample.prepare_noise(latent_image, seed)
    if disable_noise:
        noise = torch.zeros_like(latent_image)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent_image,
                               denoise=denoise, noise_mask=noise_mask, start_step=start_step,
                               last_step=last_step, force_full_denoise=force_full_denoise,
                               disable_pbar=True, seed=seed)


def sample_custom(guider, latent_image, seed=1, steps=3, sampler="euler", scheduler="normal"):
    """The core SamplerCustomAdvanced path: a GUIDER, a SAMPLER object and SIGMAS."""
    model_sampling = guider.model_patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps).cpu()
    noise = comfy.sample.prepare_noise(latent_image, seed)
    return guider.sample(noise, latent_image, comfy.samplers.sampler_object(sampler), sigmas,
                         disable_pbar=True, seed=seed)


class UNetItemCounter:
    """Counts batch items through the UNet forward (one item = one image-evaluation)."""

    def __init__(self, model):
        self.items = []
        self._unet = model.model.diffusion_model
        self._handle = self._unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.items.append(args[0].shape[0])

    def close(self):
        self._handle.remove()


def write_controlnet(path, unet_config=SD15_NARROW, seed=11):
    """A random-weight ControlNet in the original (ldm) safetensors layout, for the host's loader."""
    import comfy.cldm.cldm
    import comfy.ops
    import comfy.utils

    config = {k: v for k, v in unet_config.items() if k != "out_channels"}
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    control = init_weights(comfy.cldm.cldm.ControlNet(**config), seed, scale=0.5)
    comfy.utils.save_torch_file({k: v.contiguous() for k, v in control.state_dict().items()}, str(path))
    return path


def write_lora(path, model, rank=4, seed=12, match="attn", accept=None):
    """A random-weight LoRA (kohya 'lora_unet_' keys), written as the host writes safetensors.

    accept(key): which of the host's LoRA keys get a pair (default: the UNet's attention q/k/v
    projections whose key contains ``match``; a DiT test passes its own, e.g. Flux's ``_attn_qkv``);
    only keys of 2-d weights are kept.
    """
    import comfy.lora
    import comfy.utils

    if accept is None:
        def accept(key):
            return (key.startswith("lora_unet_") and match in key and key.count("_") >= 3
                    and key.endswith(("to_q", "to_k", "to_v")))
    generator = torch.Generator().manual_seed(seed)
    weights = model.model.state_dict()
    tensors = {}
    for key, target in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        if not accept(key) or weights[target].ndim != 2:
            continue
        out_features, in_features = weights[target].shape
        tensors[f"{key}.lora_up.weight"] = torch.randn((out_features, rank), generator=generator) * 0.1
        tensors[f"{key}.lora_down.weight"] = torch.randn((rank, in_features), generator=generator) * 0.1
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    comfy.utils.save_torch_file(tensors, str(path))
    return path


def apply_controlnet(conditioning, control_net, image, strength=1.0, start=0.0, end=1.0):
    """What the core ControlNetApplyAdvanced node does to a CONDITIONING."""
    hinted = control_net.copy().set_cond_hint(image.movedim(-1, 1), strength, (start, end))
    out = []
    for cond, extra in conditioning:
        extra = dict(extra)
        previous = extra.get("control")
        if previous is not None:
            hinted.set_previous_controlnet(previous)
        extra["control"] = hinted
        extra["control_apply_to_uncond"] = False
        out.append([cond, extra])
    return out


def clip_vision(width=16, layers=26, heads=2, image_size=28, patch_size=14, seed=21):
    """A host CLIP vision model (comfy.clip_vision.ClipVisionModel) from a small config, seeded fp32 weights."""
    import json
    import tempfile

    import comfy.clip_vision

    config = {"hidden_act": "gelu", "hidden_size": width, "image_size": image_size, "intermediate_size": width * 4,
              "model_type": "clip_vision_model", "num_attention_heads": heads, "num_channels": 3,
              "num_hidden_layers": layers, "patch_size": patch_size, "projection_dim": width,
              "torch_dtype": "float32"}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(config, handle)
    model = comfy.clip_vision.ClipVisionModel(handle.name)
    init_weights(model.model, seed)
    model.model.to(torch.float32)
    return model


def image(seed, height=32, width=32, batch=1):
    """An IMAGE (ComfyUI layout [B, H, W, 3] in [0, 1])."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch, height, width, 3), generator=generator)


# A small SD1-style CLIP text model (the host's own CLIPTextModel class, the real CLIP tokenizer and
# vocabulary, hidden width 32 to match SD15_TINY's context_dim).
CLIP_TEXT_TINY = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 32, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 1,
    "projection_dim": 32, "torch_dtype": "float32", "vocab_size": 49408,
}


def clip_text(embedding_directory=None, width=32, seed=31):
    """A host CLIP (comfy.sd.CLIP: SD1 tokenizer + SD1ClipModel) with a small text model, seeded fp32 weights."""
    import functools
    import json
    import tempfile

    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    config = dict(CLIP_TEXT_TINY, hidden_size=width, projection_dim=width, intermediate_size=2 * width)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(config, handle)
    tokenizer_path = clip_tokenizer_dir()
    tokenizer = comfy.sd1_clip.SD1Tokenizer
    if tokenizer_path is not None:
        tokenizer = functools.partial(comfy.sd1_clip.SD1Tokenizer, tokenizer=functools.partial(
            comfy.sd1_clip.SDTokenizer, tokenizer_path=tokenizer_path))
    target = comfy.supported_models_base.ClipTarget(
        tokenizer,
        functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=functools.partial(
            comfy.sd1_clip.SDClipModel, textmodel_json_config=handle.name)))
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory)
    init_weights(clip.cond_stage_model, seed)
    clip.cond_stage_model.to(torch.float32)
    return clip


def vae(seed=41):
    """A host VAE (comfy.sd.VAE) with a small SD-style autoencoder (8x downscale, 4 latent channels)."""
    import comfy.ldm.models.autoencoder
    import comfy.sd

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    params = {"ddconfig": ddconfig, "embed_dim": 4}
    model = comfy.ldm.models.autoencoder.AutoencoderKL(**params)
    init_weights(model, seed)
    sd = {k: v.float() for k, v in model.state_dict().items()}
    return comfy.sd.VAE(sd=sd, config={"params": params}, dtype=torch.float32)


def _bytes_to_unicode():
    """CLIP's byte -> printable character table (as in the BPE tokenizer CLIP was trained with)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_tokenizer_dir():
    """A folder with CLIP's vocab.json and merges.txt for the host's SDTokenizer.

    The late-2024 core's package (notcomfy) ships comfy/sd1_tokenizer without its vocabulary, so its
    tokenizer knows no words. The same vocabulary is rebuilt here from open_clip's BPE file (CLIP's
    original merges): 256 byte tokens, their '</w>' forms, one token per merge, then the two specials.
    Current ComfyUI ships the files; they are used as they are.
    """
    import gzip
    import json
    import os
    import pathlib

    import comfy.sd1_clip

    shipped = pathlib.Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer"
    if (shipped / "vocab.json").exists():
        return None
    cache = pathlib.Path(os.path.expanduser("~/.cache/comfyui-dreamtuner/clip_tokenizer"))
    if not (cache / "vocab.json").exists():
        import open_clip

        bpe = pathlib.Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
        merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        vocab = list(_bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
        (cache / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            source = shipped / name
            if source.exists():
                (cache / name).write_text(source.read_text())
    return str(cache)
