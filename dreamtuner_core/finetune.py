"""Subject-driven fine-tuning (paper 3.3, appendix A): a LoRA (or weight differences) and an [S*] embedding.

Training pairs, one of each per step (batch 2):
  {reference with its background replaced by white, "a <class word> [S*]"}
  {a regular image (generated with the class prompt),  "a <class word>"}
each flipped horizontally with p = 0.5. Noise schedule and prediction target
come from the model's own ``model_sampling`` (eps for SD1.x/SDXL, v for SD2.x
768-v): the loss is the mean squared error of the raw model output against
its target, obtained from the host's ``calculate_denoised`` (which is linear
in the model output, ``x0 = a * x_t + b * output``), so every parametrisation
the host knows trains with its own target.

[S*] is a new token vector per text encoder (one for SD1.x/SD2.x, clip_l and
clip_g for SDXL), initialised from the class word's token vectors (a class
word of several tokens: the mean of its tokens' vectors) and trained at its
own learning rate. The text encoder's token table is never written: during
training a forward hook on the token-embedding module puts the trainable
vector at the placeholder's position. It is saved in the format the host's
embedding loader reads (``{embedding_key: [1, width]}``), so
``embedding:<name>`` in a prompt gives exactly the trained vector.

The UNet (and optionally the text encoder) trains through adapters around
frozen weights, added to the module outputs by forward hooks removed
afterwards, so the input MODEL/CLIP stay bitwise unchanged. Default: LoRA
(kohya ``lora_unet_*``/``lora_te*_*`` keys with ``lora_up``/``lora_down``/
``alpha``, which both the late-2024 core and current ComfyUI apply). Full
fine-tuning trains a full-size difference per layer and is saved exactly as
``.diff`` keys in the same LoRA file (both cores' ``load_lora`` apply them);
that file is as large as the trained layers. The returned MODEL/CLIP are what
the core LoraLoader gives from the written file (``comfy.sd.load_lora_for_models``).

Written by hand because the late-2024 core has no trainer
(``comfy_extras/nodes_train.py`` and ``comfy/weight_adapter`` arrived later):
the adapters, the step loop and the loss. Reused from both cores: the LoRA key
maps and loader, ``add_patches``, ``save_torch_file``-compatible safetensors,
the tokenizer and embedding loader, ``model_sampling``, ``encode_adm``, the
memory manager, the progress bar and the interrupt.

This module never imports ComfyUI's top-level modules; output folders are arguments.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import safetensors
import torch
import torch.nn.functional as F

from .encoder_file import load_encoder, save_encoder
from .errors import DreamTunerInputError
from .files import write_safetensors
from .references import MASK_SUBJECT_IS_ONE
from .subject_encoder_patch import white_background

FORMAT = "dreamtuner.finetune"
FORMAT_VERSION = "1"
UNET_LORA = "lora"
UNET_FULL = "full (saved as weight differences)"
UNET_MODES = (UNET_LORA, UNET_FULL)
LR_RANGE = (1e-8, 1e-1)
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything besides the images and models that fixes a run (hashed into the files' metadata)."""

    class_word: str
    name: str
    steps: int = 800
    unet_lr: float = 1e-4
    token_lr: float = 5e-3
    text_encoder_lr: float = 1e-6
    encoder_lr: float = 1e-6
    rank: int = 16
    seed: int = 0
    train_text_encoder: bool = False
    unet_mode: str = UNET_LORA
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class OutputFolders:
    """Where the files go (the node resolves ComfyUI's models/ folders)."""

    loras: str
    embeddings: str
    encoders: Optional[str] = None


@dataclass
class FinetuneResult:
    model: object
    clip: object
    losses: list
    files: dict
    reused: bool
    reference_losses: list = field(default_factory=list)


# ----------------------------------------------------------------------------- validation

def check_name(name: str) -> str:
    """The subject name becomes three file names: letters, digits, '_', '-', '.', no path."""
    name = (name or "").strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not _NAME_PATTERN.match(name) or name.upper().split(".")[0] in _RESERVED or name.endswith("."):
        raise DreamTunerInputError(
            f"subject_name {name!r} is not a valid file name. Use 1-100 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit (no spaces, no slashes), e.g. 'my_dog'. It names the LoRA, the "
            "embedding (embedding:<name>) and the encoder file.")
    return name


def check_settings(settings: FinetuneSettings) -> str:
    """Every setting checked; returns the subject name as the files use it (:func:`check_name`)."""
    name = check_name(settings.name)
    if not settings.class_word or not settings.class_word.strip():
        raise DreamTunerInputError("class_word is empty: give the subject's class, e.g. 'dog', 'girl', 'teapot'.")
    if "embedding:" in settings.class_word:
        raise DreamTunerInputError("class_word must be plain words (e.g. 'dog'), not an embedding.")
    if int(settings.steps) < 1:
        raise DreamTunerInputError("steps must be at least 1 (paper: 800-1200; about 300 with the subject encoder).")
    if int(settings.rank) < 1:
        raise DreamTunerInputError("rank must be at least 1 (4-32 is usual for a subject LoRA).")
    if settings.unet_mode not in UNET_MODES:
        raise DreamTunerInputError(f"unet_mode must be one of {UNET_MODES}, got {settings.unet_mode!r}.")
    for label, value in (("unet_lr", settings.unet_lr), ("token_lr", settings.token_lr),
                         ("text_encoder_lr", settings.text_encoder_lr),
                         ("encoder_lr", settings.encoder_lr)):
        if not (LR_RANGE[0] <= float(value) <= LR_RANGE[1]):
            raise DreamTunerInputError(
                f"{label} = {value} is out of range [{LR_RANGE[0]:g}, {LR_RANGE[1]:g}]. Paper: [S*] 5e-3, full "
                "fine-tuning of the UNet and text encoder 1e-6; a LoRA usually 1e-4.")
    return name


def check_image(image, label: str, min_side: int = 8) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
        shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise DreamTunerInputError(f"{label} must be an IMAGE [batch, height, width, 3]; got {shape}.")
    if image.shape[0] == 0 or image.shape[1] < min_side or image.shape[2] < min_side:
        raise DreamTunerInputError(
            f"{label} is {image.shape[0]} image(s) of {image.shape[2]}x{image.shape[1]} pixels: it needs at least one "
            f"image of at least {min_side}x{min_side} pixels (512x512 for SD1.x, 1024x1024 for SDXL is usual).")
    if not torch.isfinite(image).all():
        raise DreamTunerInputError(f"{label} contains NaN or infinite values.")
    return image[..., :3].float()


def check_family(model, clip) -> None:
    """A UNet model with a linear eps/v parametrisation and a CLIP text encoder the trainer knows."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    sampling = model.get_model_object("model_sampling") if hasattr(model, "get_model_object") else None
    kind = type(sampling).__mro__ if sampling is not None else ()
    names = {c.__name__ for c in kind}
    if not isinstance(diffusion_model, UNetModel) or not ({"EPS", "V_PREDICTION"} & names) or \
            {"CONST", "EDM", "ModelSamplingDiscreteFlow", "ModelSamplingFlux"} & names:
        raise DreamTunerInputError(
            f"model: DreamTunerFinetune trains SD1.x, SD2.x and SDXL UNets (eps or v prediction); this model is "
            f"{type(getattr(model, 'model', model)).__name__} ({type(diffusion_model).__name__}). Load an SD1.5, "
            "SD2.x or SDXL checkpoint.")
    if not _text_encoders(clip):
        raise DreamTunerInputError(
            "clip: DreamTunerFinetune needs the checkpoint's CLIP text encoder (SD1.x clip_l, SD2.x clip_h or SDXL "
            "clip_l + clip_g); wire the CLIP output of the same checkpoint loader.")


# ----------------------------------------------------------------------------- text side

def _text_encoders(clip):
    """{tokens key: (tokenizer, text model)} for the CLIP families the trainer knows ('l', 'g', 'h')."""
    out = {}
    for key in ("l", "g", "h"):
        tokenizer = getattr(getattr(clip, "tokenizer", None), f"clip_{key}", None)
        model = getattr(getattr(clip, "cond_stage_model", None), f"clip_{key}", None)
        if tokenizer is not None and model is not None and hasattr(model, "transformer"):
            out[key] = (tokenizer, model)
    return out


def _token_ids(pairs):
    return [int(p[0]) for p in pairs if isinstance(p[0], int) or (torch.is_tensor(p[0]) and p[0].ndim == 0)]


class TokenSlot:
    """[S*] for one text encoder: placeholder id, position, trainable vector, hook on the token table."""

    def __init__(self, key, tokenizer, text_model, class_ids, placeholder):
        self.key, self.tokenizer, self.text_model = key, tokenizer, text_model
        self.placeholder = placeholder
        table = text_model.transformer.get_input_embeddings()
        with torch.no_grad():
            rows = table.weight[torch.tensor(class_ids, device=table.weight.device)].float()
            # A class word of several tokens: the mean of its tokens' vectors (documented choice).
            self.vector = torch.nn.Parameter(rows.mean(dim=0).detach().clone().cpu())
        self._handle = None

    @property
    def embedding_key(self):
        return getattr(self.tokenizer, "embedding_key", f"clip_{self.key}")

    def _hook(self, module, args, output):
        ids = args[0]
        where = (ids == self.placeholder)
        if not bool(where.any()):
            return output
        vector = self.vector.to(device=output.device, dtype=output.dtype)
        return torch.where(where[..., None], vector.expand_as(output), output)

    def install(self):
        table = self.text_model.transformer.get_input_embeddings()
        self._handle = table.register_forward_hook(self._hook)

    def remove(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _class_tokens(clip, class_word):
    """clip.tokenize('a <class word>') and, per encoder, the class word's own token ids."""
    prompt = clip.tokenize(f"a {class_word}")
    words = clip.tokenize(class_word)
    ids = {}
    for key, (tokenizer, _) in _text_encoders(clip).items():
        special = {getattr(tokenizer, "start_token", None), getattr(tokenizer, "end_token", None),
                   getattr(tokenizer, "pad_token", None)}
        own = [i for i in _token_ids(words[key][0]) if i not in special]
        if not own:
            raise DreamTunerInputError(f"class_word {class_word!r} gives no tokens; use a word such as 'dog'.")
        ids[key] = own
    return prompt, ids


def _insert_placeholder(pairs, placeholder, end_token):
    """The token list of 'a <class word> [S*]' as the tokenizer gives 'a <class word> embedding:<name>'.

    The embedding's row takes the place right after the prompt's words (before the end token) and the
    sequence keeps its length (one pad less).
    """
    pairs = [tuple(p) for p in pairs]
    ids = [int(p[0]) for p in pairs]
    position = ids.index(end_token, 1)
    item = (placeholder,) + tuple(pairs[position - 1][1:])
    out = pairs[:position] + [item] + pairs[position:]
    return out[:-1] if len(out) > len(pairs) and ids[-1] == ids[-2] else out


def _pick_placeholder(tokenizer, used):
    """A token id the prompts never contain; its row is never read (the hook replaces it)."""
    end = int(getattr(tokenizer, "end_token", 49407))
    for candidate in range(end - 2, 0, -1):
        if candidate not in used:
            return candidate
    raise RuntimeError("no free token id")


def build_prompts(clip, class_word):
    """(tokens of 'a <class>', tokens of 'a <class> [S*]', {key: TokenSlot})."""
    plain, class_ids = _class_tokens(clip, class_word)
    subject, slots = {}, {}
    for key, (tokenizer, text_model) in _text_encoders(clip).items():
        used = set()
        for batch in plain[key]:
            used.update(_token_ids(batch))
        placeholder = _pick_placeholder(tokenizer, used)
        end = int(getattr(tokenizer, "end_token", 49407))
        first = _insert_placeholder(plain[key][0], placeholder, end)
        subject[key] = [first] + [list(b) for b in plain[key][1:]]
        slots[key] = TokenSlot(key, tokenizer, text_model, class_ids[key], placeholder)
    for key in plain:
        subject.setdefault(key, plain[key])
    return plain, subject, slots


def encode_text(clip, tokens):
    """(cond, pooled) through the host's own encode path."""
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled


# ----------------------------------------------------------------------------- adapters

class Adapter(torch.nn.Module):
    """A trainable addition to a frozen Linear/Conv2d's output (its weight is never written).

    lora: ``out += (alpha / rank) * up(down(x))``; diff: ``out += layer(x; weight = delta)``.
    Both are exactly what the host's ``calculate_weight`` adds to the weight for the saved keys.
    """

    def __init__(self, module, kind, rank, generator):
        super().__init__()
        self.kind, self.is_conv = kind, isinstance(module, torch.nn.Conv2d)
        self._target = [module]  # a list, so the frozen layer is not registered as a submodule
        weight = module.weight
        if self.is_conv:
            self.conv_args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
        if kind == UNET_LORA:
            rank = min(rank, weight.shape[0], weight[0].numel())
            self.rank, self.alpha = rank, float(rank)
            down_shape = (rank,) + tuple(weight.shape[1:])
            up_shape = (weight.shape[0], rank) + ((1, 1) if self.is_conv else ())
            fan_in = weight[0].numel()
            self.down = torch.nn.Parameter(torch.randn(down_shape, generator=generator) / math.sqrt(fan_in))
            self.up = torch.nn.Parameter(torch.zeros(up_shape))  # starts as the identity change
        else:
            self.delta = torch.nn.Parameter(torch.zeros(tuple(weight.shape)))
        self._handle = None

    def addition(self, x):
        if self.kind == UNET_LORA:
            down = self.down.to(x.dtype)
            up = self.up.to(x.dtype) * (self.alpha / self.rank)
            if self.is_conv:
                return F.conv2d(F.conv2d(x, down, **self.conv_args), up)
            return F.linear(F.linear(x, down), up)
        delta = self.delta.to(x.dtype)
        return F.conv2d(x, delta, **self.conv_args) if self.is_conv else F.linear(x, delta)

    def _hook(self, module, args, output):
        return output + self.addition(args[0]).to(output.dtype)

    def install(self):
        module = self._target[0]
        self.to(module.weight.device)
        self._handle = module.register_forward_hook(self._hook)

    def remove(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def tensors(self, key):
        """The saved keys (kohya LoRA or .diff), in float32 on the CPU."""
        if self.kind == UNET_LORA:
            return {f"{key}.lora_down.weight": self.down.detach().float().cpu().contiguous(),
                    f"{key}.lora_up.weight": self.up.detach().float().cpu().contiguous(),
                    f"{key}.alpha": torch.tensor(self.alpha)}
        return {f"{key}.diff": self.delta.detach().float().cpu().contiguous()}


def unet_targets(model):
    """{kohya key: (module, weight key)} of every Linear/Conv2d of the UNet the host's key map resolves."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    out = {}
    for name, module in model.model.diffusion_model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or getattr(module, "weight", None) is None:
            continue
        if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
            continue
        weight_key = f"diffusion_model.{name}.weight"
        key = "lora_unet_" + name.replace(".", "_")
        if key_map.get(key) == weight_key:
            out[key] = (module, weight_key)
    return out


def text_targets(clip):
    """{kohya key: (module, weight key)} of the text encoders' attention and MLP layers."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    encoders = _text_encoders(clip)
    prefixes = {"l": "lora_te1_" if "g" in encoders else "lora_te_", "g": "lora_te2_" if "l" in encoders else "lora_te_",
                "h": "lora_te_"}
    out = {}
    for key, (_, text_model) in encoders.items():
        for name, module in text_model.named_modules():
            if not isinstance(module, torch.nn.Linear) or ".encoder.layers." not in f".{name}":
                continue
            weight_key = f"clip_{key}.{name}.weight"
            match = re.search(r"encoder\.layers\.(\d+)\.(.+)$", name)
            if not match:
                continue
            lora_key = f"{prefixes[key]}text_model_encoder_layers_{match.group(1)}_{match.group(2).replace('.', '_')}"
            if key_map.get(lora_key) == weight_key:
                out[lora_key] = (module, weight_key)
    return out


# ----------------------------------------------------------------------------- data

def _resize_like(images, height, width):
    """Regular images resized (scale to cover, centre crop) to the reference's size, so both form one batch."""
    if images.shape[1:3] == (height, width):
        return images
    x = images.movedim(-1, 1)
    scale = max(height / x.shape[2], width / x.shape[3])
    size = (max(height, round(x.shape[2] * scale)), max(width, round(x.shape[3] * scale)))
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return x[:, :, top:top + height, left:left + width].movedim(1, -1).clamp(0, 1)


def encode_images(vae, images, model):
    """Latents in the model's working scale of the images and of their mirror images (VAE once each)."""
    with torch.no_grad():
        plain = vae.encode(images[..., :3])
        flipped = vae.encode(torch.flip(images[..., :3], dims=[2]))
    latent_format = model.model
    return (latent_format.process_latent_in(plain.float().cpu()),
            latent_format.process_latent_in(flipped.float().cpu()))


# ----------------------------------------------------------------------------- hashing, files

def _tensor_digest(h, tensor):
    t = tensor.detach().float().cpu().contiguous()
    h.update(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())


def _model_fingerprint(h, state_dict):
    """Names, shapes, dtypes and a strided sample of every tensor (hashing 2 GB each queue would be slow)."""
    for key in sorted(state_dict):
        t = state_dict[key]
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(flat[::step][:64].float().cpu().contiguous().numpy().tobytes())


def unpatched_state_dict(patcher):
    """The UNet's weights as loaded, without the LoRA of whichever clone the host has loaded last.

    The host patches weights in place in the model that all clones of a checkpoint share and keeps the
    originals in the patchers' shared ``backup``; a later graph's LoraLoader would otherwise change the
    fingerprint of the same checkpoint.
    """
    state = patcher.model.state_dict()
    for key, saved in (getattr(patcher, "backup", None) or {}).items():
        if key in state:
            state[key] = getattr(saved, "weight", saved)  # current ComfyUI keeps (weight, inplace_update)
    return state


def _clip_fingerprint(h, clip, class_word, uses_pooled):
    """The text encoder as training sees it: its conditioning of the regular images' prompt.

    Not its weights: a checkpoint without some of them (SD1.5 files have no CLIP-L ``text_projection``)
    leaves those uninitialised at every load, so they would change the fingerprint of the same file. The
    pooled output (which reads that projection) counts only for models that use it (SDXL's ADM input).
    """
    cond, pooled = clip.encode_from_tokens(clip.tokenize(f"a {class_word}"), return_pooled=True)
    _tensor_digest(h, cond)
    if uses_pooled and pooled is not None:
        _tensor_digest(h, pooled)


def _patches_fingerprint(h, patches):
    """Keys, strengths and sampled tensors of a ModelPatcher's weight patches (a LoRA stack under the model)."""

    def walk(value):
        if isinstance(value, torch.Tensor):
            flat = value.detach().reshape(-1)
            h.update(f"{tuple(value.shape)}".encode())
            h.update(flat[::max(1, flat.numel() // 16)][:16].float().cpu().contiguous().numpy().tobytes())
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif hasattr(value, "weights"):  # current ComfyUI's weight adapters
            walk(value.weights)
        else:
            h.update(repr(value).encode() if isinstance(value, (int, float, str, type(None))) else
                     type(value).__name__.encode())

    for key in sorted(patches, key=str):
        h.update(str(key).encode())
        walk(patches[key])


def _options_fingerprint(h, model):
    """The kinds of model patches (e.g. a subject encoder, another pack's attention patch) on the model."""
    options = getattr(model, "model_options", {}) or {}
    patches = options.get("transformer_options", {}).get("patches", {})
    h.update(json.dumps({k: [type(p).__name__ for p in v] for k, v in sorted(patches.items())}).encode())
    for patch in patches.get("middle_patch", []):
        tokens = getattr(patch, "tokens", None)
        if isinstance(tokens, torch.Tensor):
            _tensor_digest(h, tokens)
            h.update(repr(getattr(patch, "beta", None)).encode())


def run_hash(settings, reference, mask, mask_mode, regular, model, clip) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    h.update(mask_mode.encode())
    for t in (reference, regular):
        _tensor_digest(h, t)
    if mask is not None:
        _tensor_digest(h, mask)
    _model_fingerprint(h, unpatched_state_dict(model))
    _patches_fingerprint(h, getattr(model, "patches", {}))
    _options_fingerprint(h, model)
    _clip_fingerprint(h, clip, settings.class_word, uses_pooled=bool(getattr(model.model, "adm_channels", 0)))
    _patches_fingerprint(h, getattr(clip.patcher, "patches", {}))
    h.update(repr(getattr(clip, "layer_idx", None)).encode())
    return h.hexdigest()


def _paths(folders: OutputFolders, name: str, with_encoder: bool):
    paths = {"lora": os.path.join(folders.loras, f"{name}.safetensors"),
             "embedding": os.path.join(folders.embeddings, f"{name}.safetensors")}
    if with_encoder:
        if not folders.encoders:
            raise DreamTunerInputError("model carries a subject encoder but no folder for encoder files was given.")
        paths["encoder"] = os.path.join(folders.encoders, f"{name}.safetensors")
    return paths


def _metadata_of(path):
    try:
        with safetensors.safe_open(path, framework="pt") as handle:
            return handle.metadata() or {}
    except Exception:
        return {}


def existing_run(paths, digest, overwrite, embeddings_folder, name):
    """True when every file exists and records this run; raises when a foreign file is in the way."""
    for ext in (".pt", ".bin"):
        other = os.path.join(embeddings_folder, name + ext)
        if os.path.exists(other):
            raise DreamTunerInputError(
                f"subject_name {name!r} collides with the existing embedding {other}; choose another subject_name "
                "(embedding:<name> would be ambiguous).")
    found = {kind: path for kind, path in paths.items() if os.path.exists(path)}
    ours = {kind: _metadata_of(path).get("dreamtuner.finetune_hash") == digest for kind, path in found.items()}
    if found and len(found) == len(paths) and all(ours.values()):
        return True
    if not overwrite:
        for kind, path in found.items():
            if ours[kind]:
                continue  # this run's own file (another of its files is missing): made again
            what = "embedding" if kind == "embedding" else f"{kind} file"
            raise DreamTunerInputError(
                f"subject_name {name!r}: the {what} {path} already exists and was not made by this run (other inputs "
                "or settings). Choose another subject_name, or set overwrite to true to replace it.")
    return False


def load_lora_file(path):
    import comfy.utils

    return comfy.utils.load_torch_file(path, safe_load=True)


def apply_lora(model, clip, lora_sd):
    """What the core LoraLoader node does with the file (strength 1, 1)."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, clip, lora_sd, 1.0, 1.0)


# ----------------------------------------------------------------------------- training

def prediction_loss(model_sampling, denoised, x0, sigma):
    """MSE of the raw output against its target (eps or v), per item (:func:`.host.prediction_error`)."""
    from .host import prediction_error

    return prediction_error(model_sampling, sigma, denoised, x0).pow(2).mean(dim=tuple(range(1, denoised.ndim)))


def _adm(model, pooled, height, width):
    """SDXL's ADM ("y") input for a training image of this size (None for SD1.x/SD2.x)."""
    if pooled is None or not getattr(model.model, "adm_channels", 0):
        return None
    return model.model.encode_adm(pooled_output=pooled, width=width, height=height, crop_w=0, crop_h=0,
                                  target_width=width, target_height=height)


@contextlib.contextmanager
def _grad_mode():
    """Nodes of current ComfyUI run under inference_mode; training steps out of it."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


@contextlib.contextmanager
def _checkpointing(unet, enabled):
    """Gradient checkpointing of every layer of the UNet's blocks (recomputed in backward); restored afterwards.

    The UNet calls the layers of each block itself (``forward_timestep_embed``), so the layers are wrapped,
    not the blocks. Their ``transformer_options`` is copied per call: the UNet updates its block indices in
    that dict as it goes, and a recomputation must see the indices of its own layer.
    """
    patched = []
    if enabled:
        import torch.utils.checkpoint

        def own(value):
            return dict(value) if isinstance(value, dict) else value

        for block in list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks):
            for layer in block:
                original = layer.forward

                def forward(*args, _original=original, **kwargs):
                    args, kwargs = tuple(own(a) for a in args), {k: own(v) for k, v in kwargs.items()}
                    return torch.utils.checkpoint.checkpoint(_original, *args, use_reentrant=False, **kwargs)

                layer.forward = forward
                patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward


def _inplace_blocks():
    """(block class, its norms, the in-place line) of host blocks that add to their input in place."""
    import comfy.clip_model
    from comfy.ldm.modules.attention import BasicTransformerBlock

    return ((BasicTransformerBlock, ("norm1", "norm2", "norm3"), "x += n"),
            (comfy.clip_model.CLIPLayer, ("layer_norm1", "layer_norm2"), "x += self."))


@contextlib.contextmanager
def _inplace_safe_norms(*roots):
    """Blocks that add to ``x`` in place (``x += n``) after a LayerNorm saved ``x`` for backward are
    rejected by autograd once anything before them trains: the UNet's BasicTransformerBlock in the
    late-2024 core, CLIP's CLIPLayer in both cores (the host's own trainer trains neither text nor
    anything upstream of such a block). Their norms get a copy of their input (pre-hooks, removed
    afterwards); blocks whose source adds out of place are left alone.
    """
    import inspect

    handles = []
    for block_class, norms, line in _inplace_blocks():
        try:
            inplace = line in inspect.getsource(block_class.forward)
        except (OSError, TypeError):
            inplace = True
        if not inplace:
            continue
        for root in roots:
            for module in root.modules():
                if isinstance(module, block_class):
                    for norm in norms:
                        handles.append(getattr(module, norm).register_forward_pre_hook(
                            lambda m, args: (args[0].clone(),) + tuple(args[1:])))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _autocast(device):
    """bf16 autocast on a CUDA device that supports it; otherwise full precision."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _memory_estimate(model, latents_shape, checkpointing):
    """Bytes to ask the memory manager for: weights plus activations of a batch-2 step."""
    params = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())
    pixels = latents_shape[-1] * latents_shape[-2]
    activations = pixels * 2 * 1.2e5 * (0.3 if checkpointing else 1.0)
    return params + int(activations)


def loss_curve_image(losses, reference_losses=None, width=512, height=256):
    """The loss per step as an IMAGE [1, H, W, 3] (drawn with PIL, which ComfyUI requires)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 48, width - 8, 20, height - 24
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    series = [(losses, (40, 90, 200))]
    if reference_losses:
        series.append((reference_losses, (220, 90, 40)))
    values = [v for s, _ in series for v in s if math.isfinite(v)]
    if values:
        low, high = min(values), max(values)
        span = (high - low) or 1.0
        for data, colour in series:
            smooth, acc = [], None
            for v in data:  # exponential moving average, so the trend reads through the noise of random timesteps
                acc = v if acc is None else 0.9 * acc + 0.1 * v
                smooth.append(acc)
            n = max(1, len(smooth) - 1)
            points = [(left + (right - left) * i / n, bottom - (bottom - top) * (v - low) / span)
                      for i, v in enumerate(smooth)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
        draw.text((4, top), f"{high:.3g}", fill=(0, 0, 0))
        draw.text((4, bottom - 10), f"{low:.3g}", fill=(0, 0, 0))
    draw.text((left, 4), "loss (blue: step, orange: reference pair; smoothed)", fill=(0, 0, 0))
    draw.text((left, bottom + 6), f"steps: {len(losses)}", fill=(0, 0, 0))
    import numpy as np

    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


@dataclass
class TrainedState:
    """What training produced: adapters, [S*] vectors, the trained encoder (if any) and the losses."""

    adapters: dict
    text_adapters: dict
    slots: dict
    encoder: Optional[object]
    losses: list
    reference_losses: list
    subject_tokens: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def active(self):
        """The model/CLIP as at the end of training (hooks installed; removed on exit)."""
        hooks = list(self.adapters.values()) + list(self.text_adapters.values()) + list(self.slots.values())
        try:
            for hook in hooks:
                hook.install()
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def lora_state_dict(self):
        out = {}
        for key, adapter in sorted(list(self.adapters.items()) + list(self.text_adapters.items())):
            out.update(adapter.tensors(key))
        return out

    def embedding_state_dict(self):
        """{embedding_key: [1, width]}: what the host's load_embed reads for embedding:<name>."""
        return {slot.embedding_key: slot.vector.detach().float().cpu()[None].contiguous()
                for slot in self.slots.values()}


def prepare_latents(vae, model, reference, regular, mask=None, mask_mode=MASK_SUBJECT_IS_ONE):
    """((reference, mirrored), (regular, mirrored)) latents in the model's working scale, VAE once per image.

    The reference's background is whitened with its mask (any mask size: resized to the image); the
    regular images are resized (cover, centre crop) to the reference's size so both form one batch.
    """
    reference = check_image(reference, "reference")
    regular = check_image(regular, "regular_images")
    prepared = white_background(reference, mask, mask_mode)
    regular = _resize_like(regular, prepared.shape[1], prepared.shape[2])
    with torch.inference_mode(False):
        return encode_images(vae, prepared, model), encode_images(vae, regular, model)


def finetune(model, clip, vae, reference, regular, settings: FinetuneSettings, folders: OutputFolders,
             mask=None, mask_mode=MASK_SUBJECT_IS_ONE, overwrite=False,
             progress: Optional[Callable[[int, int, float], None]] = None,
             interrupt: Optional[Callable[[], None]] = None) -> FinetuneResult:
    """Fine-tune on one reference and the regular images, write the files, return MODEL/CLIP as loaders give them.

    Same inputs and seed give byte-identical files; a re-queue with the same inputs finds the files by the
    hash in their metadata and loads them instead of training again.
    """
    name = check_settings(settings)
    check_family(model, clip)
    reference = check_image(reference, "reference")
    regular = check_image(regular, "regular_images")
    from .subject_encoder_patch import SubjectEncoderPatch

    encoder_patch = _find_encoder_patch(model, SubjectEncoderPatch)
    digest = run_hash(settings, reference, None if mask is None else mask.float(), mask_mode, regular, model, clip)
    paths = _paths(folders, name, encoder_patch is not None)
    if existing_run(paths, digest, overwrite, folders.embeddings, name):
        return _from_files(model, clip, paths, encoder_patch, reused=True)

    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):  # the VAE samples its posterior with the global generator
        torch.manual_seed(int(settings.seed))
        ref_latents, reg_latents = prepare_latents(vae, model, reference, regular, mask, mask_mode)
    state = train(model, clip, settings, ref_latents, reg_latents, encoder_patch, progress, interrupt)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "dreamtuner.finetune_hash": digest,
                "dreamtuner.settings": json.dumps(asdict(settings), sort_keys=True),
                "dreamtuner.losses": json.dumps([round(v, 6) for v in state.losses]),
                "dreamtuner.reference_losses": json.dumps([round(v, 6) for v in state.reference_losses])}
    if settings.unet_mode == UNET_LORA:
        metadata.update({"ss_network_dim": str(settings.rank), "ss_network_alpha": str(settings.rank)})
    if interrupt is not None:
        interrupt()
    write_safetensors(state.lora_state_dict(), metadata, paths["lora"])
    write_safetensors(state.embedding_state_dict(), metadata, paths["embedding"])
    if state.encoder is not None:
        save_encoder(state.encoder, paths["encoder"], extra_metadata={"dreamtuner.finetune_hash": digest})
    return _from_files(model, clip, paths, encoder_patch, reused=False)


def _from_files(model, clip, paths, encoder_patch, reused):
    """MODEL/CLIP from the written files, exactly as the core loaders give them."""
    lora_sd = load_lora_file(paths["lora"])
    out_model, out_clip = apply_lora(model, clip, lora_sd)
    metadata = _metadata_of(paths["lora"])
    if encoder_patch is not None and "encoder" in paths:
        out_model = _swap_encoder(out_model, encoder_patch, load_encoder(paths["encoder"]))
    losses = json.loads(metadata.get("dreamtuner.losses", "[]"))
    ref_losses = json.loads(metadata.get("dreamtuner.reference_losses", "[]"))
    return FinetuneResult(out_model, out_clip, losses, dict(paths), reused, ref_losses)


def _find_encoder_patch(model, patch_class):
    patches = model.model_options.get("transformer_options", {}).get("patches", {}).get("middle_patch", [])
    found = [p for p in patches if isinstance(p, patch_class)]
    return found[0] if found else None


def _replace_patch(model, old, new):
    """A clone whose middle_patch list has ``new`` in place of ``old`` (the input's options untouched)."""
    clone = model.clone()
    options = clone.model_options
    transformer_options = dict(options.get("transformer_options", {}))
    patches = dict(transformer_options.get("patches", {}))
    patches["middle_patch"] = [new if p is old else p for p in patches.get("middle_patch", [])]
    transformer_options["patches"] = patches
    options["transformer_options"] = transformer_options
    return clone


def _swap_encoder(model, old_patch, encoder):
    """A clone whose subject encoder patch uses the trained ``encoder`` (same beta and sigma range)."""
    from .subject_encoder_patch import SubjectEncoderPatch

    patch = SubjectEncoderPatch.from_features(encoder, old_patch.features, old_patch.beta, old_patch.sigma_start,
                                              old_patch.sigma_end)
    return _replace_patch(model, old_patch, patch)


class _TrainableEncoderPatch:
    """Eq. 1 during training: the S-E-A layers read SE(r) through the trainable ResBlocks.

    :meth:`encode` computes SE(r) once per step, before the UNet's forward; every
    S-E-A layer of that forward reads those tokens (the host calls a middle_patch
    once per transformer block, so encoding inside the call would run the ResBlocks,
    forward and backward, once per block).
    """

    def __init__(self, patch, encoder):
        self.patch, self.encoder = patch, encoder
        self.features = self.tokens = None

    def __deepcopy__(self, memo):
        return self

    def encode(self, device):
        if self.features is None:  # a copy outside inference mode (the node's features may be inference tensors)
            self.features = self.patch.features.to(device=device, dtype=torch.float32).clone()
        self.tokens = self.encoder.encode(self.features).mean(dim=0, keepdim=True)

    def __call__(self, x, extra_options):
        from . import host
        from .reference_pass import layer_key
        from .subject_encoder import layer_name, subject_encoder_attention

        layer = layer_key(extra_options)
        name = layer_name(layer) if layer is not None else None
        if name not in self.encoder.attention:
            return x
        attention = self.encoder.attention[name]
        k, v = attention.to_k(self.tokens), attention.to_v(self.tokens)
        fn = host.attention_function()
        out = subject_encoder_attention(x.float(), attention, k, v, self.patch.beta, fn,
                                        **host.attention_kwargs(fn, extra_options))
        return out.to(x.dtype)


def _trainable_encoder(encoder_patch):
    import copy

    if getattr(encoder_patch, "features", None) is None:
        raise DreamTunerInputError(
            "model carries a subject encoder applied without its CLIP features (an older ApplySubjectEncoder); "
            "apply the subject encoder again before DreamTunerFinetune.")
    encoder = copy.deepcopy(encoder_patch.encoder).float().requires_grad_(False)
    encoder.resblocks.requires_grad_(True)  # paper 3.3: the encoder's ResBlocks train; S-E-A stays as pretrained
    return encoder


def _normal_tensors(*roots):
    """Weights loaded under ``torch.inference_mode`` (current ComfyUI loads checkpoints so) cannot be saved
    for backward. Each such parameter or buffer is replaced by a bitwise-equal ordinary copy, one tensor at a
    time (no second copy of the model); values, dtypes, devices and requires_grad stay as they were.
    """
    with torch.inference_mode(False):
        for root in roots:
            for module in root.modules():
                for store in (module._parameters, module._buffers):
                    for name, tensor in list(store.items()):
                        if tensor is None or not tensor.is_inference():
                            continue
                        copy = tensor.clone()
                        if isinstance(tensor, torch.nn.Parameter):
                            copy = torch.nn.Parameter(copy, requires_grad=tensor.requires_grad)
                        store[name] = copy


def train(model, clip, settings: FinetuneSettings, reference, regular, encoder_patch=None, progress=None,
          interrupt=None) -> TrainedState:
    """The training loop on latents from :func:`prepare_latents`; the input MODEL/CLIP are left unchanged.

    Runs outside inference mode (current ComfyUI runs nodes inside it): every tensor it creates is an
    ordinary one autograd can use.
    """
    with _grad_mode():
        return _train(model, clip, settings, reference, regular, encoder_patch, progress, interrupt)


def _train(model, clip, settings, reference, regular, encoder_patch, progress, interrupt):
    import comfy.model_management as mm

    generator = torch.Generator().manual_seed(int(settings.seed))
    plain_tokens, subject_tokens, slots = build_prompts(clip, settings.class_word)
    work = model.clone()
    adapters = {key: Adapter(module, settings.unet_mode, settings.rank, generator)
                for key, (module, _) in unet_targets(work).items()}
    text_adapters = {}
    if settings.train_text_encoder:
        text_adapters = {key: Adapter(module, settings.unet_mode, settings.rank, generator)
                         for key, (module, _) in text_targets(clip).items()}
    encoder = trainable = None
    if encoder_patch is not None:
        encoder = _trainable_encoder(encoder_patch)
        trainable = _TrainableEncoderPatch(encoder_patch, encoder)
        work = _replace_patch(work, encoder_patch, trainable)
    state = TrainedState(adapters, text_adapters, slots, encoder, [], [], subject_tokens)

    mm.load_models_gpu([work, clip.patcher], force_full_load=True,
                       memory_required=_memory_estimate(work, reference[0].shape, settings.gradient_checkpointing))
    _normal_tensors(work.model, clip.cond_stage_model)
    frozen = list(work.model.parameters()) + list(clip.cond_stage_model.parameters())
    flags = [p.requires_grad for p in frozen]
    reference = tuple(t.clone() for t in reference)
    regular = tuple(t.clone() for t in regular)
    device = work.load_device
    model_sampling = work.get_model_object("model_sampling")
    try:
        for p in frozen:
            p.requires_grad_(False)
        for slot in slots.values():  # made outside the training mode: fresh tensors for autograd
            slot.vector.data = slot.vector.data.detach().clone().to(device)
        if encoder is not None:
            encoder.to(device)
        groups = [{"params": [p for a in adapters.values() for p in a.parameters()], "lr": settings.unet_lr},
                  {"params": [s.vector for s in slots.values()], "lr": settings.token_lr}]
        if text_adapters:
            groups.append({"params": [p for a in text_adapters.values() for p in a.parameters()],
                           "lr": settings.text_encoder_lr})
        if encoder is not None:
            groups.append({"params": list(encoder.resblocks.parameters()), "lr": settings.encoder_lr})
        unet = work.model.diffusion_model
        with state.active(), _inplace_safe_norms(unet, clip.cond_stage_model), _checkpointing(unet, settings.gradient_checkpointing):
            optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
            with torch.no_grad():
                plain = encode_text(clip, plain_tokens)
            for step in range(int(settings.steps)):
                if interrupt is not None:
                    interrupt()
                if trainable is not None:
                    with _autocast(device):  # as the UNet's forward, where SE(r) used to be computed
                        trainable.encode(device)
                loss, reference_loss = _step(work, clip, model_sampling, reference, regular, subject_tokens,
                                             plain_tokens if text_adapters else None, plain, generator, device,
                                             interrupt)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if interrupt is not None:
                    interrupt()
                optimizer.step()
                state.losses.append(float(loss.detach()))
                state.reference_losses.append(reference_loss)
                if progress is not None:
                    progress(step + 1, int(settings.steps), state.losses[-1])
            del optimizer
    finally:
        for p, flag in zip(frozen, flags):
            p.requires_grad_(flag)
        mm.soft_empty_cache()
    for slot in slots.values():
        slot.vector.data = slot.vector.data.cpu()
    for adapter in list(adapters.values()) + list(text_adapters.values()):
        adapter.requires_grad_(False)
    if encoder is not None:
        state.encoder = encoder.cpu().eval().requires_grad_(False)
    return state


def _step(work, clip, model_sampling, reference, regular, subject_tokens, plain_tokens, plain, generator, device,
          interrupt):
    """One step, batch 2: the reference pair and one regular pair, each mirrored with p = 0.5.

    Returns (the batch's loss, the reference pair's loss as a float).
    """
    ref_plain, ref_mirror = reference
    reg_plain, reg_mirror = regular
    i = int(torch.randint(ref_plain.shape[0], (1,), generator=generator))
    j = int(torch.randint(reg_plain.shape[0], (1,), generator=generator))
    mirror = torch.rand((2,), generator=generator) < 0.5
    x0 = torch.stack([(ref_mirror if mirror[0] else ref_plain)[i], (reg_mirror if mirror[1] else reg_plain)[j]])
    noise = torch.randn(x0.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (2,), generator=generator).float()
    x0, noise = x0.to(device), noise.to(device)
    sigma = model_sampling.sigma(timesteps.to(device)).float()
    x_t = model_sampling.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0)

    subject_cond, subject_pooled = encode_text(clip, subject_tokens)
    plain_cond, plain_pooled = encode_text(clip, plain_tokens) if plain_tokens is not None else plain
    cond = torch.cat([subject_cond.to(device), plain_cond.to(device)])
    pooled = None if subject_pooled is None else torch.cat([subject_pooled.to(device), plain_pooled.to(device)])
    y = _adm(work, pooled, x0.shape[-2] * 8, x0.shape[-1] * 8)
    kwargs = {} if y is None else {"y": y.to(device)}
    with _autocast(device):
        denoised = predict(work, x_t, sigma, cond, kwargs)
    if interrupt is not None:
        interrupt()
    per_item = prediction_loss(model_sampling, denoised, x0, sigma)
    return per_item.mean(), float(per_item[0].detach())


def predict(model, x_t, sigma, cond, extra=None):
    """The model's denoised prediction with its own transformer patches, as a sampler's evaluation runs it."""
    transformer_options = dict(model.model_options.get("transformer_options", {}))
    transformer_options["cond_or_uncond"] = [0]
    transformer_options["sigmas"] = sigma
    return model.model.apply_model(x_t, sigma, c_crossattn=cond, transformer_options=transformer_options,
                                   **(extra or {}))
