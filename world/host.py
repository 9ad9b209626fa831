"""The world's host models: ComfyUI's own classes, small configurations, loaded from the shipped files.

Everything that touches ComfyUI or the pack goes through this module:
- ``setup()`` makes ComfyUI's ``comfy`` importable on a CPU-only machine and sets torch's threads;
- ``load_pack()`` imports the pack as ComfyUI does (its folder's ``__init__.py``, as the package
  ``comfyui_dreamtuner``) and ``nodes()`` returns its node classes by their stable registered names;
- ``make_unet`` / ``make_vae`` / ``make_clip`` build ``comfy.model_base.BaseModel`` (SD1.5 config, eps
  prediction, the host's model sampling) in a ``ModelPatcher``, ``comfy.sd.VAE`` (AutoencoderKL) and
  ``comfy.sd.CLIP`` (SD1 tokenizer + SD1ClipModel) from explicit configs.

Why explicit configs: the core loaders (CheckpointLoaderSimple, VAELoader, CLIPLoader) detect a model
from its tensor shapes against fixed full-size configurations (SD1.5's UNet has model_channels 320 and
context 768; its VAE ch 128 with 8x downscale; its text encoder is CLIP-L with width 768). Files this
small (20 MB for the whole world) cannot match those, so they are read here with
``comfy.utils.load_torch_file`` and loaded into the host classes built from the configs below.
"""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib
import tempfile

import torch

MODELS = pathlib.Path(__file__).resolve().parent / "models"

# SD1.x-family UNet: attention at the 16x16 latent (256 tokens) and at 8x8.
UNET_CONFIG = dict(
    image_size=16, use_spatial_transformer=True, in_channels=4, out_channels=4, model_channels=64,
    num_res_blocks=[1, 1], channel_mult=[1, 1], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1, num_head_channels=16, context_dim=32, use_linear_in_transformer=True,
    adm_in_channels=None, use_temporal_attention=False,
)
# AutoencoderKL with one downsampling: 32x32 RGB <-> 16x16x4 latent.
VAE_PARAMS = {"ddconfig": {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3,
                           "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
                           "dropout": 0.0}, "embed_dim": 4}
VAE_RATIO = 2
# SD1-style CLIP text model, width 32 (the UNet's context_dim), the real CLIP tokenizer and vocabulary.
# Kept apart from dreamtuner_devtools.tiny_models.CLIP_TEXT_TINY (equal today) on purpose: the shipped
# clip_text.safetensors was built with this config, which must not follow the tests' tiny model.
CLIP_TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 32, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 1,
    "projection_dim": 32, "torch_dtype": "float32", "vocab_size": 49408,
}

# The image encoder of the subject encoder, in the host's CLIP-vision class (comfy.clip_vision.ClipVisionModel):
# a ViT on the world's 32x32 renders, 4x4 patches (an 8x8 token grid), trained contrastively on the world
# (world/encoder.py). Its hidden states feed the subject encoder as OpenCLIP ViT-H/14's do in the paper.
CLIP_VISION_CONFIG = {
    "hidden_act": "gelu", "hidden_size": 64, "image_size": 32, "intermediate_size": 256,
    "model_type": "clip_vision_model", "num_attention_heads": 4, "num_channels": 3, "num_hidden_layers": 6,
    "patch_size": 4, "projection_dim": 64, "torch_dtype": "float32",
}
CLIP_VISION_FILE = "clip_vision.safetensors"
# The subject encoder pretrained in the part-marked world against unet_marks (world/encoder.py).
ENCODER_FILE = "subject_encoder_marks.safetensors"


def setup(threads: int = 1):
    torch.set_num_threads(threads)
    if not torch.cuda.is_available():
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401


def load_pack():
    """The pack, imported as ComfyUI imports a custom node folder, under its one import name."""
    from dreamtuner_devtools import pack

    pack.cpu_unless_cuda()
    return pack.load()


def pack_module(name: str):
    """A module of the pack's core (``dreamtuner_core.X``), imported under the pack's one import name."""
    import importlib

    from dreamtuner_devtools import pack

    pack.load(nodes=False)
    return importlib.import_module(f"comfyui_dreamtuner.{name}")


def core_files():
    """The pack's atomic writer (``dreamtuner_core.files``): a model file or the manifest is whole or absent."""
    return pack_module("dreamtuner_core.files")


def nodes():
    """The pack's node classes by registered name (NODE_CLASS_MAPPINGS): the only way the world calls it."""
    return load_pack().NODE_CLASS_MAPPINGS


@contextlib.contextmanager
def fast_attention():
    """Use PyTorch's SDPA for the host's attention (CPU default, sub-quadratic chunking, is ~10x slower here).

    Same maths; only the host's own ``optimized_attention`` is swapped, and restored afterwards.
    """
    import comfy.ldm.modules.attention as attention

    saved = attention.optimized_attention
    attention.optimized_attention = attention.attention_pytorch
    try:
        yield
    finally:
        attention.optimized_attention = saved


def make_unet(sd=None):
    """A ModelPatcher around comfy.model_base.BaseModel with the SD1.5 model config (eps prediction)."""
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(UNET_CONFIG))
    model = config.get_model({}, device="cpu")
    if sd is not None:
        missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"UNet file does not match UNET_CONFIG: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.diffusion_model.to(torch.float32)
    device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def make_vae(sd):
    import comfy.sd

    vae = comfy.sd.VAE(sd=sd, config={"params": VAE_PARAMS}, dtype=torch.float32)
    vae.downscale_ratio = vae.upscale_ratio = VAE_RATIO
    return vae


def new_autoencoder():
    import comfy.ldm.models.autoencoder

    return comfy.ldm.models.autoencoder.AutoencoderKL(**VAE_PARAMS)


def make_clip(sd=None):
    """comfy.sd.CLIP with the SD1 tokenizer and an SD1ClipModel of CLIP_TEXT_CONFIG."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    config_path = _config_file("dreamtuner_world_clip_text.json", CLIP_TEXT_CONFIG)
    tokenizer = comfy.sd1_clip.SD1Tokenizer
    vocabulary = clip_tokenizer_dir()
    if vocabulary is not None:
        tokenizer = functools.partial(comfy.sd1_clip.SD1Tokenizer, tokenizer=functools.partial(
            comfy.sd1_clip.SDTokenizer, tokenizer_path=vocabulary))
    target = comfy.supported_models_base.ClipTarget(
        tokenizer, functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=functools.partial(
            comfy.sd1_clip.SDClipModel, textmodel_json_config=str(config_path))))
    clip = comfy.sd.CLIP(target=target)
    if sd is not None:
        missing, unexpected = clip.cond_stage_model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if "position_ids" not in k and "logit_scale" not in k]
        if missing:
            raise ValueError(f"CLIP file does not match CLIP_TEXT_CONFIG: missing {missing[:3]}")
    clip.cond_stage_model.to(torch.float32)
    return clip


def _config_file(name, config):
    """A host config JSON (the host's CLIP classes take a path) written to the temporary folder."""
    path = pathlib.Path(tempfile.gettempdir()) / name
    path.write_text(json.dumps(config))
    return path


def make_clip_vision(sd=None):
    """comfy.clip_vision.ClipVisionModel of CLIP_VISION_CONFIG (the CLIP_VISION class the core CLIPVisionLoader
    gives), fp32; ``sd`` its state dict as ``ClipVisionModel.get_sd`` writes it, loaded after the cast (the
    host's own loader would build fp16 weights on this CPU and round the file's fp32 ones)."""
    import comfy.clip_vision

    model = comfy.clip_vision.ClipVisionModel(str(_config_file("dreamtuner_world_clip_vision.json", CLIP_VISION_CONFIG)))
    model.model.to(torch.float32)
    model.dtype = torch.float32
    if sd is not None:
        missing, unexpected = model.load_sd(sd)
        if missing or unexpected:
            raise ValueError(f"CLIP vision file does not match CLIP_VISION_CONFIG: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    return model


def world_clip_vision():
    """The world's CLIP_VISION from the shipped file (checked against the manifest)."""
    from . import manifest

    manifest.verify()
    return make_clip_vision({k: v.float() for k, v in load_file(CLIP_VISION_FILE).items()})


def encode_text(clip, text: str):
    """A CONDITIONING, as the core CLIPTextEncode node makes it."""
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def load_file(name: str):
    import comfy.utils

    return comfy.utils.load_torch_file(str(MODELS / name), safe_load=True)


# The VAE file the commands read and write; ``use_marks`` switches the world to its part-marked renders.
VAE_FILE = "vae.safetensors"
MARKS_VAE_FILE = "vae_marks.safetensors"
MARKS_UNET_FILE = "unet_marks.safetensors"


def use_marks(on: bool = True):
    """Switch to the part-marked world (generator.MARKS; world/README.md, "Fourth part"): its renders and
    its own VAE; ``use_marks(False)`` switches back. Returns the previous state."""
    global VAE_FILE
    from . import generator

    previous = generator.MARKS
    generator.MARKS = on
    VAE_FILE = MARKS_VAE_FILE if on else "vae.safetensors"
    return previous


@contextlib.contextmanager
def marked_world():
    """The part-marked world for a block (a test module beside the shipped world's), restored after."""
    previous = use_marks(True)
    try:
        yield
    finally:
        use_marks(previous)


def world_models(unet_name="unet.safetensors"):
    """(unet ModelPatcher, vae, clip) from the shipped files, checked against the manifest first.

    unet_name: a path to another UNet file (a candidate under diagnosis), or a shipped file's name.
    The VAE is the current world's (VAE_FILE).
    """
    return _world_models(unet_name, VAE_FILE)


@functools.lru_cache(maxsize=None)
def _world_models(unet_name, vae_name):
    from . import manifest

    manifest.verify()
    path = MODELS / unet_name if not pathlib.Path(unet_name).is_absolute() else pathlib.Path(unet_name)
    import comfy.utils

    unet = make_unet({k: v.float() for k, v in comfy.utils.load_torch_file(str(path), safe_load=True).items()})
    vae = make_vae({k: v.float() for k, v in load_file(vae_name).items()})
    clip = make_clip({k: v.float() for k, v in load_file("clip_text.safetensors").items()})
    return unet, vae, clip


def clip_tokenizer_dir():
    """A folder with CLIP's vocabulary for the host's SD1 tokenizer where the installed core lacks it (the
    tests' own helper, imported late: it imports comfy.model_management, which needs --cpu set first)."""
    from dreamtuner_devtools import pack

    pack.cpu_unless_cuda()
    from dreamtuner_devtools import tiny_models

    return tiny_models.clip_tokenizer_dir()
